-- The audit chain in the movement's own transaction (issue 28, contract §6
-- as amended).
--
-- * ledger_entries.chain_seq, prev_hash, hash: each entry written from now
--   on carries its place in its user's chain, its predecessor's hash and its
--   own: hash = SHA-256(prev_hash || content), content the entry as
--   canonical JSON with its chain_seq (common/ledger/src/chain.rs). Entries
--   written before this migration have none (NULL): their audit records
--   (audit_records, the old chain) stay theirs, and `audit verify` checks
--   both.
-- * accounts.chain_seq, chain_hash: the chain's head, on the row every
--   movement already locks and updates; no other lock, no other row. The
--   head starts at the old chain's head (audit_heads), so the new chain
--   carries the old one on: its first entry's prev_hash is the hash of the
--   old chain's last record at the time (or 32 zero bytes for a user
--   without records).
-- * audit_checkpoints: per user, the last entry a `ledger-audit` job
--   verified (its seq, id and hash), with the MAC of that hash under
--   AUDIT_HMAC_KEY when the worker holds the key: the anchor a chain
--   rewritten by someone who can write the database contradicts. A
--   checkpoint only moves forward.
ALTER TABLE ledger_entries
    ADD COLUMN chain_seq bigint CHECK (chain_seq >= 1),
    ADD COLUMN prev_hash bytea CHECK (length(prev_hash) = 32),
    ADD COLUMN hash bytea CHECK (length(hash) = 32),
    ADD CONSTRAINT ledger_chain_all_or_none CHECK (
        (chain_seq IS NULL) = (hash IS NULL) AND (hash IS NULL) = (prev_hash IS NULL)
    );

ALTER TABLE accounts
    ADD COLUMN chain_seq bigint NOT NULL DEFAULT 0 CHECK (chain_seq >= 0),
    ADD COLUMN chain_hash bytea CHECK (length(chain_hash) = 32);

UPDATE accounts a SET chain_hash = h.hash
FROM audit_heads h
WHERE h.user_id = a.user_id AND h.seq > 0;

CREATE TABLE audit_checkpoints (
    user_id    text        PRIMARY KEY REFERENCES accounts (user_id),
    seq        bigint      NOT NULL CHECK (seq >= 1),
    entry_id   bigint      NOT NULL,
    hash       bytea       NOT NULL CHECK (length(hash) = 32),
    mac        bytea       CHECK (mac IS NULL OR length(mac) = 32),
    checked_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 70);

-- The entries whose audit is still to come: an entry before V18 without
-- its record, an entry of the chain past its user's checkpoint. (For the
-- operators' `wait-idle`, the tests and the benchmark; a scan of the ledger.)
CREATE VIEW audit_pending AS
SELECT l.user_id, l.id, l.app_name, l.created_at
FROM ledger_entries l
WHERE CASE WHEN l.hash IS NULL
      THEN NOT EXISTS (SELECT 1 FROM audit_records a WHERE a.user_id = l.user_id AND a.entry_id = l.id)
      ELSE l.chain_seq > coalesce((SELECT c.seq FROM audit_checkpoints c WHERE c.user_id = l.user_id), 0)
      END;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    PERFORM create_distributed_table('audit_checkpoints', 'user_id', colocate_with => 'accounts');
END
$$;
