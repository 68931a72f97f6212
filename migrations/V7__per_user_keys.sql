-- Keys are per user (contract §15).
--
-- A reservation (and with it the idempotency of deduct-credits) is unique per
-- (user_id, app_name, project_code), and a grant per (user_id, reference).
-- Until this migration both were unique across users, and a key already used
-- by another user was answered 409 idempotency_conflict; from now on the same
-- project_code or reference used by two users makes two reservations or two
-- grants, each user's own. Every unique key now starts with user_id, the
-- column the data is distributed by on Citus, so no key makes one user's
-- write wait on another's shard.
--
-- Existing rows were unique across users, so they are unique per user too:
-- nothing is rewritten, only the keys are rebuilt.

ALTER TABLE reservations DROP CONSTRAINT reservations_pkey;
ALTER TABLE reservations ADD PRIMARY KEY (user_id, app_name, project_code);
-- (user_id, state) stays for per-user reads; the primary key serves the rest.

DROP INDEX ledger_one_grant_per_reference;
DROP INDEX ledger_one_deduct_per_reservation;
DROP INDEX ledger_one_refund_per_reservation;
DROP INDEX ledger_one_settle_per_reservation;
CREATE UNIQUE INDEX ledger_one_grant_per_reference
    ON ledger_entries (user_id, reference) WHERE kind = 'grant';
CREATE UNIQUE INDEX ledger_one_deduct_per_reservation
    ON ledger_entries (user_id, app_name, project_code) WHERE kind = 'deduct';
CREATE UNIQUE INDEX ledger_one_refund_per_reservation
    ON ledger_entries (user_id, app_name, project_code) WHERE kind = 'refund';
CREATE UNIQUE INDEX ledger_one_settle_per_reservation
    ON ledger_entries (user_id, app_name, project_code) WHERE kind = 'settle';
