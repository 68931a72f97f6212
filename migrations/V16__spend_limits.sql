-- Spend limits (issue 27, contract §16).
--
-- spend_limits: one per (user_id, scope, period); scope is the app it holds
-- or '*' for every app. A deduction that would take spending past a limit
-- that applies is refused and moves nothing.
--
-- spend_days: what a user spent, per app and UTC day: credits deducted that
-- day minus credits refunded since from the reservations made that day (a
-- refund gives its room back to the day, so the period, its reservation was
-- made in). A day, a week and a month are unions of days, so each limit's
-- spending is a sum over at most 31 rows per app. The rows are kept while
-- the user has a limit, in the movement's transaction (under the account's
-- lock); setting a limit rebuilds them from the reservations of the current
-- week and month, so spending before the first limit counts, and rows left
-- from an earlier limit never do.
--
-- Both tables live with their user's other rows on Citus (V8).
CREATE TABLE spend_limits (
    user_id     text        NOT NULL REFERENCES accounts (user_id),
    scope       text        NOT NULL,
    period      text        NOT NULL CHECK (period IN ('day', 'week', 'month')),
    max_credits bigint      NOT NULL CHECK (max_credits >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, scope, period)
);

CREATE TABLE spend_days (
    user_id  text   NOT NULL REFERENCES accounts (user_id),
    app_name text   NOT NULL,
    day      date   NOT NULL,
    spent    bigint NOT NULL,
    -- Day before app: a deduction reads a user's days from its limits'
    -- earliest period start on, one range of the key.
    PRIMARY KEY (user_id, day, app_name)
);

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    PERFORM create_distributed_table('spend_limits', 'user_id', colocate_with => 'accounts');
    PERFORM create_distributed_table('spend_days', 'user_id', colocate_with => 'accounts');
END
$$;
