-- The support console (contract §17, issue 30).
--
-- * ledger_entries.acted_by: the id of the API key that asked for the entry
--   (`bootstrap` for PENORA_API_KEY) on grants, voids and refunds made
--   through the admin routes or the console; NULL for the rest (deductions,
--   events, timers, entries written before V20). It is part of the entry's
--   chain link (left out of the hashed JSON when NULL, so every link written
--   before hashes as it did): editing it breaks the chain like any column.
-- * console_sessions: one row per signed-in console. The browser holds a
--   random token in an HttpOnly cookie; the row holds its SHA-256, the
--   SHA-256 of the API key that signed in (looked up again on every request,
--   so a revoked key's sessions end at once), the CSRF token its forms carry,
--   and when it ends. The key itself is never stored.
--
-- On Citus ledger_entries is distributed (V8): Citus refuses a CHECK inside
-- ADD COLUMN and carries DDL to the shards only outside a multi-statement
-- string (see V13, V14): one block, one statement each. The column is
-- nullable without a default (no rewrite); its CHECK is NOT VALID, as every
-- existing row holds NULL: no scan of the ledger under the table's lock.
DO $v20$
BEGIN
    ALTER TABLE ledger_entries ADD COLUMN acted_by text;
    ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_acted_by_length
        CHECK (length(acted_by) BETWEEN 1 AND 64) NOT VALID;
END
$v20$;

CREATE TABLE console_sessions (
    token_digest bytea       PRIMARY KEY CHECK (length(token_digest) = 32),
    key_digest   bytea       NOT NULL CHECK (length(key_digest) = 32),
    csrf         text        NOT NULL CHECK (length(csrf) BETWEEN 32 AND 128),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX console_sessions_expires_at ON console_sessions (expires_at);

-- * ops_runs: the result of each `penora-ops reconcile` and `penora-ops
--   audit verify` (ok or not, the line it printed, the report as JSON), so
--   the console's operations page shows the last of each.
CREATE TABLE ops_runs (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text        NOT NULL CHECK (kind IN ('reconcile', 'audit_verify')),
    ok          boolean     NOT NULL,
    summary     text        NOT NULL,
    report      jsonb       NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ops_runs_kind ON ops_runs (kind, id DESC);

-- The services (penora_app) may record a run but not rewrite one: the
-- console's "audit verify OK" cannot be forged with the application's role.
DO $v20_rights$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'penora_app') THEN
        REVOKE UPDATE, DELETE, TRUNCATE ON ops_runs FROM penora_app;
    END IF;
END
$v20_rights$;
