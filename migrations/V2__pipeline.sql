-- The queue pipeline: the audit hash chain, processed events, and a wake-up
-- for the outbox relay.

-- Per-user hash chain of audit records: one record per ledger entry (unique
-- entry_id). hash = SHA-256(prev_hash || content); content is the ledger
-- entry as canonical JSON. audit_heads holds each chain's last link and is
-- the lock that serialises appends to one user's chain.
CREATE TABLE audit_heads (
    user_id text   PRIMARY KEY,
    seq     bigint NOT NULL CHECK (seq >= 0),
    hash    bytea  NOT NULL CHECK (length(hash) = 32)
);

CREATE TABLE audit_records (
    user_id    text        NOT NULL,
    seq        bigint      NOT NULL CHECK (seq >= 1),
    entry_id   bigint      NOT NULL,
    prev_hash  bytea       NOT NULL CHECK (length(prev_hash) = 32),
    hash       bytea       NOT NULL CHECK (length(hash) = 32),
    content    text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, seq)
);
CREATE UNIQUE INDEX audit_one_record_per_entry ON audit_records (entry_id);

CREATE TRIGGER audit_records_append_only
    BEFORE UPDATE OR DELETE ON audit_records
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER audit_records_no_truncate
    BEFORE TRUNCATE ON audit_records
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();

-- ImageGene events already handled (idempotency by event_id).
CREATE TABLE processed_events (
    user_id      text        NOT NULL,
    event_id     text        NOT NULL,
    kind         text        NOT NULL,
    outcome      text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, event_id)
);

-- Wake the relay as soon as an outbox row is committed.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('penora_outbox', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER outbox_wake_relay
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
