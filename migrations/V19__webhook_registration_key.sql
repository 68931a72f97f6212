-- POST /webhooks idempotent by its Idempotency-Key (contract §18: clients
-- retry every POST with the same key, so a registration whose answer was
-- lost must not make a second endpoint with a secret nobody has).
--
-- * idempotency_key: SHA-256 of the caller's API key id (or the bootstrap
--   key) and the header, so one caller's key never finds another caller's
--   endpoint; unique where set.
-- * request_digest: SHA-256 of the registration's parameters (url, events,
--   app, description), so the same key with other parameters is a 409.
-- A retry with the key answers the endpoint it made, secret included (opened
-- from its sealed copy), while that endpoint is not deleted.
ALTER TABLE webhook_endpoints
    ADD COLUMN idempotency_key bytea CHECK (length(idempotency_key) = 32),
    ADD COLUMN request_digest bytea CHECK (length(request_digest) = 32),
    ADD CONSTRAINT webhook_endpoints_key_and_digest
        CHECK ((idempotency_key IS NULL) = (request_digest IS NULL));
CREATE UNIQUE INDEX webhook_endpoints_idempotency_key
    ON webhook_endpoints (idempotency_key) WHERE idempotency_key IS NOT NULL;
