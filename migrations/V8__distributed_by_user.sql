-- On Citus, the schema is distributed by user_id (contract §8, §15).
--
-- Nothing changes on a plain PostgreSQL: everything below runs only when the
-- citus extension is installed in this database (scripts/cluster.sh citus).
-- There:
-- * every table holding user data becomes a distributed table, hash-sharded
--   by user_id and co-located with accounts, so one user's rows of every
--   table live in one shard and a movement's transaction stays on one node;
-- * api_keys (global, small, read on every request) becomes a reference
--   table, copied to every node;
-- * a unique index must contain the distribution column, so the three that
--   do not are rebuilt with it: ledger_entries (id) is dropped (ids still
--   come from one identity sequence; the primary key is (user_id, id)),
--   audit_records' one-record-per-entry becomes (user_id, entry_id) (an
--   entry belongs to one user, so it still allows one record per entry),
--   and outbox's message_id becomes (user_id, message_id) (a v7 UUID made
--   per row);
-- * the guard triggers (append-only ledger, audit and project log; the
--   reservation state machine) are kept: Citus runs them on every shard
--   (citus.enable_unsafe_triggers: the triggers only read the row they
--   guard, which is what Citus requires of them).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    DROP INDEX ledger_entries_id;
    DROP INDEX audit_one_record_per_entry;
    CREATE UNIQUE INDEX audit_one_record_per_entry ON audit_records (user_id, entry_id);
    DROP INDEX outbox_message_id;
    CREATE UNIQUE INDEX outbox_message_id ON outbox (user_id, message_id);
    PERFORM create_distributed_table('accounts', 'user_id');
    PERFORM create_distributed_table('ledger_entries', 'user_id', colocate_with => 'accounts');
    PERFORM create_distributed_table('reservations', 'user_id', colocate_with => 'accounts');
    PERFORM create_distributed_table('projects', 'user_id', colocate_with => 'accounts');
    PERFORM create_distributed_table('project_contents', 'user_id', colocate_with => 'accounts');
    PERFORM create_distributed_table('project_log', 'user_id', colocate_with => 'accounts');
    PERFORM create_distributed_table('outbox', 'user_id', colocate_with => 'accounts');
    PERFORM create_distributed_table('audit_heads', 'user_id', colocate_with => 'accounts');
    PERFORM create_distributed_table('audit_records', 'user_id', colocate_with => 'accounts');
    PERFORM create_distributed_table('processed_events', 'user_id', colocate_with => 'accounts');
    PERFORM create_reference_table('api_keys');
END
$$;
