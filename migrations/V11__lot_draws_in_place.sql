-- Drawing from a lot rewrites it in place (issue 16).
--
-- The two partial indexes of credit_lots named `remaining > 0` in their
-- predicates, so every draw changed an indexed column: PostgreSQL could not
-- update the row in place (a HOT update) and wrote a new version of it and a
-- new entry in each of its indexes, about 400 bytes of WAL per deduction.
-- The predicates now name only the status; the queries still ask for
-- `remaining > 0` (a used-up lot stays in the index until it expires or is
-- voided, and is skipped there). Pages of credit_lots keep a fifth free, so a
-- lot's new version fits beside the old one. No guard changes: these indexes
-- only speed up reads.
DO $v11$
BEGIN
    DROP INDEX credit_lots_spendable;
    CREATE INDEX credit_lots_spendable ON credit_lots (user_id, priority, expires_at, lot_id)
        WHERE status = 'active';
    DROP INDEX credit_lots_due;
    CREATE INDEX credit_lots_due ON credit_lots (expires_at)
        WHERE status = 'active' AND expires_at IS NOT NULL;
    -- Citus would have to pass the storage parameter to every shard: a plain
    -- PostgreSQL only.
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        ALTER TABLE credit_lots SET (fillfactor = 80);
    END IF;
END
$v11$;
