-- Events out (issue 26): a user's own low-balance threshold, and the notice
-- of a lot about to expire.
--
-- accounts.low_balance_threshold: the spendable balance below which a
-- movement emits balance.low (contract §14); NULL means the service's
-- default (LOW_BALANCE_THRESHOLD). It is read with the account's lock, by
-- the statement every movement already runs, so the crossing is decided in
-- the movement's transaction.
--
-- credit_lots.expiry_noticed_at: when the worker's timer wrote the lot's
-- credits.expiring event (once per lot, in the transaction that sets it);
-- NULL while it has not. The lots' trigger (credit_lots_fixed, V9) leaves
-- this column free to change.
--
-- On Citus both tables are distributed (V8, V9): ALTER TABLE reaches every
-- shard, a nullable column without a default rewrites none; Citus refuses a
-- CHECK inside ADD COLUMN and carries DDL to the shards only outside a
-- multi-statement string (see V13): one block, one statement each.
DO $v14$
BEGIN
    ALTER TABLE accounts ADD COLUMN low_balance_threshold bigint;
    ALTER TABLE accounts ADD CONSTRAINT accounts_low_balance_threshold_non_negative
        CHECK (low_balance_threshold >= 0);
    ALTER TABLE credit_lots ADD COLUMN expiry_noticed_at timestamptz;
END
$v14$;

-- The timer's search for lots to notice: active, credits left, an expiry,
-- not yet noticed (a few rows at a time, soonest first).
CREATE INDEX credit_lots_to_notice ON credit_lots (expires_at)
    WHERE status = 'active' AND remaining > 0 AND expires_at IS NOT NULL AND expiry_noticed_at IS NULL;
