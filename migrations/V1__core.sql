-- Penora Credits core schema.
--
-- Rules this schema enforces by itself, whatever the code above it does:
--   * a balance is never negative (CHECK on accounts.balance);
--   * the ledger is append-only (trigger refuses UPDATE and DELETE);
--   * a reservation has at most one deduct, one refund and one settle entry
--     (partial unique indexes on the ledger), so it can never be refunded twice;
--   * a reservation leaves `reserved` once and never comes back (trigger);
--   * every table holding user data carries user_id, and every transaction
--     touches one user, so the data can be distributed by user_id.

CREATE TABLE accounts (
    user_id             text        PRIMARY KEY,
    balance             bigint      NOT NULL DEFAULT 0
                                    CONSTRAINT accounts_balance_non_negative CHECK (balance >= 0),
    storage_used_bytes  bigint      NOT NULL DEFAULT 0
                                    CONSTRAINT accounts_storage_non_negative CHECK (storage_used_bytes >= 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- One row per credit movement. amount is signed: grants and refunds add,
-- deducts subtract, settlements record the end of a reservation and move 0.
CREATE TABLE ledger_entries (
    id            bigint      GENERATED ALWAYS AS IDENTITY,
    user_id       text        NOT NULL REFERENCES accounts (user_id),
    kind          text        NOT NULL CHECK (kind IN ('grant', 'deduct', 'refund', 'settle')),
    amount        bigint      NOT NULL,
    balance_after bigint      NOT NULL CHECK (balance_after >= 0),
    app_name      text        NOT NULL,
    description   text,
    project_code  text,
    -- Idempotency reference of a grant (add-credits `reference`).
    reference     text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, id),
    CONSTRAINT ledger_amount_sign CHECK (
        (kind IN ('grant', 'refund') AND amount > 0)
        OR (kind = 'deduct' AND amount < 0)
        OR (kind = 'settle' AND amount = 0)
    ),
    CONSTRAINT ledger_reservation_kinds_have_code CHECK (
        kind = 'grant' OR project_code IS NOT NULL
    ),
    CONSTRAINT ledger_grant_has_reference CHECK (
        kind <> 'grant' OR reference IS NOT NULL
    )
);
CREATE UNIQUE INDEX ledger_entries_id ON ledger_entries (id);
CREATE UNIQUE INDEX ledger_one_grant_per_reference ON ledger_entries (reference) WHERE kind = 'grant';
CREATE UNIQUE INDEX ledger_one_deduct_per_reservation ON ledger_entries (app_name, project_code) WHERE kind = 'deduct';
CREATE UNIQUE INDEX ledger_one_refund_per_reservation ON ledger_entries (app_name, project_code) WHERE kind = 'refund';
CREATE UNIQUE INDEX ledger_one_settle_per_reservation ON ledger_entries (app_name, project_code) WHERE kind = 'settle';

CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER ledger_entries_append_only
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER ledger_entries_no_truncate
    BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();

-- A deduct reserves its credits; the reservation ends settled or refunded.
-- Keyed by the idempotency key (app_name, project_code).
CREATE TABLE reservations (
    app_name             text        NOT NULL,
    project_code         text        NOT NULL,
    user_id              text        NOT NULL REFERENCES accounts (user_id),
    amount               bigint      NOT NULL CHECK (amount > 0),
    state                text        NOT NULL DEFAULT 'reserved'
                                     CHECK (state IN ('reserved', 'settled', 'refunded')),
    description          text,
    -- The deduct's answer, kept so that a replay returns it unchanged.
    balance_after_deduct bigint      NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    refundable_until     timestamptz NOT NULL,
    settled_at           timestamptz,
    settle_reason        text,
    refunded_at          timestamptz,
    refund_reason        text,
    balance_after_refund bigint,
    PRIMARY KEY (app_name, project_code),
    CONSTRAINT reservations_state_fields CHECK (
        (state = 'reserved' AND settled_at IS NULL AND refunded_at IS NULL)
        OR (state = 'settled' AND settled_at IS NOT NULL AND refunded_at IS NULL)
        OR (state = 'refunded' AND refunded_at IS NOT NULL AND settled_at IS NULL
            AND balance_after_refund IS NOT NULL)
    )
);
CREATE INDEX reservations_by_user ON reservations (user_id, state);
CREATE INDEX reservations_due ON reservations (refundable_until) WHERE state = 'reserved';

CREATE FUNCTION reservations_one_way() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state <> 'reserved' THEN
        RAISE EXCEPTION 'reservation (%, %) is % and cannot change', OLD.app_name, OLD.project_code, OLD.state
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.amount <> OLD.amount OR NEW.user_id <> OLD.user_id THEN
        RAISE EXCEPTION 'reservation (%, %) amount and user are fixed', OLD.app_name, OLD.project_code
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER reservations_state_machine
    BEFORE UPDATE ON reservations
    FOR EACH ROW EXECUTE FUNCTION reservations_one_way();
CREATE TRIGGER reservations_no_delete
    BEFORE DELETE OR TRUNCATE ON reservations
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();

-- Projects of the shared workspace. size_bytes counts against the quota
-- while the project is queued or saved; a failed project releases it.
CREATE TABLE projects (
    user_id        text        NOT NULL REFERENCES accounts (user_id),
    id             uuid        NOT NULL,
    app_source     text        NOT NULL,
    project_type   text        NOT NULL,
    title          text        NOT NULL,
    status         text        NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'saved', 'failed')),
    size_bytes     bigint      NOT NULL CHECK (size_bytes >= 0),
    metadata       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    project_code   text,
    failure_reason text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, id)
);
CREATE INDEX projects_listing ON projects (user_id, created_at DESC, id DESC);
CREATE UNIQUE INDEX projects_one_per_code ON projects (user_id, app_source, project_code)
    WHERE project_code IS NOT NULL;

-- The content of a project: decoded bytes (data) or a URL reference (url).
-- media_type, width and height are filled in by the worker once it has
-- checked the bytes really are an image.
CREATE TABLE project_contents (
    user_id    text  NOT NULL,
    project_id uuid  NOT NULL,
    data       bytea,
    url        text,
    media_type text,
    width      integer,
    height     integer,
    PRIMARY KEY (user_id, project_id),
    FOREIGN KEY (user_id, project_id) REFERENCES projects (user_id, id) ON DELETE CASCADE,
    CONSTRAINT project_contents_one_kind CHECK ((data IS NULL) <> (url IS NULL))
);

-- API keys: only the SHA-256 digest of a key is stored.
CREATE TABLE api_keys (
    id         uuid        PRIMARY KEY,
    name       text        NOT NULL DEFAULT '',
    digest     bytea       NOT NULL UNIQUE CHECK (length(digest) = 32),
    -- The first characters of the key, to recognise it in a listing.
    prefix     text        NOT NULL,
    app        text        NOT NULL,
    scopes     text[]      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

-- Transactional outbox: a job is written here in the same transaction as the
-- change it describes, and published to RabbitMQ after the commit.
CREATE TABLE outbox (
    id             bigint      GENERATED ALWAYS AS IDENTITY,
    user_id        text        NOT NULL,
    exchange       text        NOT NULL,
    routing_key    text        NOT NULL,
    message_id     uuid        NOT NULL,
    correlation_id text,
    payload        jsonb       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz,
    attempts       integer     NOT NULL DEFAULT 0,
    last_error     text,
    PRIMARY KEY (user_id, id)
);
CREATE UNIQUE INDEX outbox_message_id ON outbox (message_id);
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL;
