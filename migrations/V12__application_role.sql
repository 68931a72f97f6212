-- The application role, and the audit chain's anchor outside the database
-- (issue 24).
--
-- * penora_app: the role penora-api and penora-worker connect as
--   (DB_MIGRATE_ON_START=false), while migrations run as the schema's owner.
--   It owns nothing, so it cannot ALTER, DROP or DISABLE the triggers that
--   keep the ledger append-only; it reads and writes rows, except:
--     - ledger_entries, audit_records, lot_movements, project_log: no UPDATE
--       or DELETE (append-only);
--     - reservations, credit_lots: no DELETE (their triggers refuse it too);
--     - refinery_schema_history: read only (readiness compares versions);
--   and nowhere TRUNCATE, REFERENCES or TRIGGER. These are the operations
--   the guard triggers already refuse, so no path of the services loses a
--   right it used; the difference is that the role cannot take the guards
--   away. Tables created later by the role that runs the migrations get
--   SELECT, INSERT, UPDATE and DELETE for penora_app (default privileges); a
--   later append-only table revokes UPDATE and DELETE as here.
--   The role is created NOLOGIN when missing (the operator gives it LOGIN and
--   a password; deploy/postgres/10-roles.sh does for docker compose). It is
--   cluster-wide: several databases of one server (the tests') may migrate
--   at once, and the one that loses the race to create it uses the other's.
-- * audit_records.mac: HMAC-SHA256 of the record's hash under AUDIT_HMAC_KEY,
--   a key the database never holds (common/src/audit.rs); NULL for records
--   written without a key.
--
-- One block: on Citus, DDL on distributed tables is carried to the shards
-- only outside a multi-statement string (see V9), and GRANT, REVOKE and
-- CREATE ROLE are carried to every node (Citus 11+). The role comes first:
-- Citus creates a role on every node over one connection per node, which a
-- transaction can do only before it has done work in parallel. ADD COLUMN
-- and its CHECK are two statements (Citus refuses a CHECK inside ADD COLUMN).
DO $v12$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    END IF;

    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'penora_app') THEN
        BEGIN
            CREATE ROLE penora_app NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
        EXCEPTION
            -- Created meanwhile by another database's migration.
            WHEN duplicate_object OR unique_violation THEN
                NULL;
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'role penora_app does not exist, and % may not create it', current_user
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'as a superuser: CREATE ROLE penora_app LOGIN PASSWORD ''…''; then run penora-ops migrate again';
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'penora_app'
               AND (rolsuper OR rolbypassrls OR rolcreaterole OR rolcreatedb)) THEN
        RAISE WARNING 'role penora_app has SUPERUSER, BYPASSRLS, CREATEROLE or CREATEDB: services connected as it are not confined';
    END IF;

    ALTER TABLE audit_records ADD COLUMN mac bytea;
    ALTER TABLE audit_records ADD CONSTRAINT audit_records_mac_length
        CHECK (mac IS NULL OR length(mac) = 32);

    -- Exactly these rights, whatever was granted before.
    REVOKE ALL ON ALL TABLES IN SCHEMA public FROM penora_app;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM penora_app;
    GRANT USAGE ON SCHEMA public TO penora_app;
    GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO penora_app;
    GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO penora_app;
    REVOKE UPDATE, DELETE ON ledger_entries, audit_records, lot_movements, project_log FROM penora_app;
    REVOKE DELETE ON reservations, credit_lots FROM penora_app;
    REVOKE INSERT, UPDATE, DELETE ON refinery_schema_history FROM penora_app;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public
        GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO penora_app;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public
        GRANT USAGE ON SEQUENCES TO penora_app;
END
$v12$;
