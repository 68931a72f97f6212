-- Backpressure on the audit (issue 16): each worker reports here, four times
-- a second while it records, the commit-to-audit lag of what it recorded (the
-- age of the oldest ledger entry of its batches when their records were
-- committed). API processes read the largest fresh report and, while it is
-- over AUDIT_LAG_LIMIT_MS, hold new deductions back (503 `busy`, with
-- Retry-After). One small row per worker process, updated in place; rows of
-- workers gone for an hour are deleted. Not user data: on Citus it stays a
-- local table on the coordinator.
CREATE TABLE audit_lag (
    worker      text        PRIMARY KEY,
    lag_ms      bigint      NOT NULL CHECK (lag_ms >= 0),
    reported_at timestamptz NOT NULL DEFAULT now()
);
