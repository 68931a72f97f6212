-- Webhooks (contract §14): registered endpoints, one delivery per (event,
-- endpoint), and every attempt of it.
--
-- * webhook_endpoints: global configuration, small, read by every fan-out.
--   Its signing secret is stored encrypted (ChaCha20-Poly1305 under
--   WEBHOOK_SECRET_KEY, which the database never holds): `secret_nonce` and
--   `secret_sealed` (ciphertext and tag). Deleting an endpoint sets
--   `deleted_at`: its deliveries and attempts stay readable.
-- * webhook_deliveries: written by the fan-out in the transaction of the
--   delivery job it enqueues (ON CONFLICT DO NOTHING on the key, so an event
--   delivered twice to the fan-out makes one delivery); `user_id` is the
--   event's (`data.user_id`), the distribution column on Citus.
-- * webhook_attempts: one row per try (status code or error, latency).
CREATE TABLE webhook_endpoints (
    id            text PRIMARY KEY CHECK (id ~ '^we_[0-9a-f]{32}$'),
    url           text NOT NULL CHECK (length(url) <= 2048),
    events        text[] NOT NULL CHECK (cardinality(events) > 0),
    app           text,
    description   text CHECK (length(description) <= 500),
    secret_nonce  bytea NOT NULL CHECK (length(secret_nonce) = 12),
    secret_sealed bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz
);

CREATE TABLE webhook_deliveries (
    event_id         text NOT NULL,
    endpoint_id      text NOT NULL,
    user_id          text NOT NULL,
    event_type       text NOT NULL,
    -- pending: not yet tried or waiting for a retry; failing: tried and
    -- failed, will be retried; delivered; parked (gave up, in
    -- penora.webhooks.dead); dropped (its endpoint was deleted).
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'failing', 'delivered', 'parked', 'dropped')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    first_attempt_at timestamptz,
    last_attempt_at  timestamptz,
    delivered_at     timestamptz,
    CONSTRAINT webhook_deliveries_pkey PRIMARY KEY (event_id, endpoint_id)
);
-- `penora-ops webhooks deliveries ENDPOINT_ID`, and the worker's look for
-- endpoints failing for over an hour.
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, created_at DESC);
CREATE INDEX webhook_deliveries_failing ON webhook_deliveries (endpoint_id, first_attempt_at)
    WHERE state = 'failing';

CREATE TABLE webhook_attempts (
    id           bigint GENERATED ALWAYS AS IDENTITY,
    event_id     text NOT NULL,
    endpoint_id  text NOT NULL,
    user_id      text NOT NULL,
    attempt      integer NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    status_code  integer,
    latency_ms   integer NOT NULL,
    error        text CHECK (length(error) <= 1000),
    CONSTRAINT webhook_attempts_pkey PRIMARY KEY (id)
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (endpoint_id, event_id, id);

-- On Citus (see V8): endpoints are a reference table (global, small, read
-- with every event, joined to nothing distributed); deliveries and attempts
-- are distributed by user_id, co-located with accounts and the outbox, so
-- a fan-out's delivery rows and outbox jobs for one event stay on one
-- shard. Their keys must hold the distribution column, so they are rebuilt
-- with it (an event id is unique, so the rule they keep is the same).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_pkey;
    ALTER TABLE webhook_deliveries
        ADD CONSTRAINT webhook_deliveries_pkey PRIMARY KEY (user_id, event_id, endpoint_id);
    ALTER TABLE webhook_attempts DROP CONSTRAINT webhook_attempts_pkey;
    ALTER TABLE webhook_attempts ADD CONSTRAINT webhook_attempts_pkey PRIMARY KEY (user_id, id);
    PERFORM create_reference_table('webhook_endpoints');
    PERFORM create_distributed_table('webhook_deliveries', 'user_id', colocate_with => 'accounts');
    PERFORM create_distributed_table('webhook_attempts', 'user_id', colocate_with => 'accounts');
END
$$;
