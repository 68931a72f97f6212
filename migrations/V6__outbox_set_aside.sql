-- An outbox that cannot jam (contract §11).
--
-- A row the broker refuses (unroutable, negatively acknowledged, or not
-- confirmed within AMQP_CONFIRM_TIMEOUT_MS) is retried with backoff; after
-- OUTBOX_MAX_ATTEMPTS refusals it is set aside with its error, and every
-- other row keeps flowing. `penora-ops outbox list` shows set-aside rows and
-- `penora-ops outbox retry` puts them back.
--
-- * attempts (V1) counts every failed try, a broker outage included;
--   refusals counts only the broker's refusals of this row, which alone can
--   set it aside (an outage must never set every row aside).
-- * retry_at: the row is not tried again before it.
-- * set_aside_at: when it was set aside; the relay leaves it alone.

ALTER TABLE outbox ADD COLUMN refusals integer NOT NULL DEFAULT 0 CHECK (refusals >= 0);
ALTER TABLE outbox ADD COLUMN retry_at timestamptz;
ALTER TABLE outbox ADD COLUMN set_aside_at timestamptz;
CREATE INDEX outbox_set_aside ON outbox (id)
    WHERE set_aside_at IS NOT NULL AND published_at IS NULL;
