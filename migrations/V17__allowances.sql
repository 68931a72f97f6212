-- Recurring allowances (issue 27 item 2, contract §16).
--
-- allowances: one per (user_id, allowance_id). Each period (a calendar
-- day, week or month in UTC; the first one from starts_at) the service
-- grants a lot of `amount` credits expiring at the period's end, with the
-- reference 'allowance:<allowance_id>:<period start>' (credit_lots'
-- unique (user_id, reference) index makes each period's grant happen once).
--
--   period_start   the start of the period last granted (NULL: none yet);
--   next_grant_at  when the next period starts: the end of the period last
--                  granted (its lot's expires_at), or starts_at before the
--                  first grant. The timer grants allowances whose
--                  next_grant_at has passed, in the account's transaction.
--
-- A change (PUT with other values) takes effect at the next period: the
-- row's terms change, period_start and next_grant_at do not. A delete
-- removes the row: no more grants; the lots granted stay as they are.
--
-- The table lives with its user's other rows on Citus (V8).
CREATE TABLE allowances (
    user_id       text        NOT NULL REFERENCES accounts (user_id),
    allowance_id  text        NOT NULL CHECK (length(allowance_id) BETWEEN 1 AND 64),
    amount        bigint      NOT NULL CHECK (amount > 0),
    period        text        NOT NULL CHECK (period IN ('day', 'week', 'month')),
    category      text        NOT NULL CHECK (category IN ('paid', 'promotional')),
    max_rollover  bigint      NOT NULL DEFAULT 0 CHECK (max_rollover >= 0),
    app_name      text        NOT NULL,
    starts_at     timestamptz NOT NULL,
    period_start  timestamptz,
    next_grant_at timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, allowance_id)
);

-- The timer's search: the allowances whose next period has started.
CREATE INDEX allowances_due ON allowances (next_grant_at);

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    PERFORM create_distributed_table('allowances', 'user_id', colocate_with => 'accounts');
END
$$;
