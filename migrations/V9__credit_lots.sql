-- Credit lots and partial refunds (contract §12, §13).
--
-- Credits come in lots. Every grant creates one; a deduction draws from the
-- user's lots in burn-down order and records what it took from each
-- (lot_movements, the per-lot breakdown of the ledger); a refund gives the
-- credits back to the lots they came from.
--
-- Rules this schema enforces by itself:
--   * for every lot, 0 <= remaining <= granted, and a lot that is expired or
--     voided holds nothing (CHECKs);
--   * a lot's category, priority, expiry, size, user and reference never
--     change, and an expired or voided lot never becomes active again
--     (trigger credit_lots_fixed);
--   * lot_movements, like the ledger, is append-only;
--   * the refunds of a reservation never sum past what it reserved
--     (reservations.refunded_amount <= amount, and refunded_amount only
--     grows), each refund reference is used once per reservation, and
--     there is at most one refund without a reference (the one that returns
--     whatever is left) — so a reservation is never refunded twice;
--   * the reservation state machine gains `partially_refunded`
--     (reservations_one_way, rewritten below).
--
-- Invariant 2 now reads: accounts.balance = Σ ledger = Σ remaining of the
-- user's lots, where a lot past its expires_at keeps its remaining until its
-- `expire` entry is written (by the next movement of the user, or by the
-- worker's timer); spendable credits are the remaining of the lots that are
-- active and not past their expiry.

-- On Citus, triggers on distributed tables are allowed (they read only the
-- row they guard), for the whole of this migration.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    END IF;
END
$$;

CREATE TABLE credit_lots (
    user_id     text        NOT NULL REFERENCES accounts (user_id),
    lot_id      bigint      GENERATED ALWAYS AS IDENTITY,
    category    text        NOT NULL CHECK (category IN ('paid', 'promotional')),
    priority    integer     NOT NULL CHECK (priority BETWEEN 0 AND 100),
    granted     bigint      NOT NULL CHECK (granted >= 0),
    remaining   bigint      NOT NULL,
    expires_at  timestamptz,
    status      text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'expired', 'voided')),
    -- The grant's app (expire and void entries are written in its name).
    app_name    text        NOT NULL,
    -- The grant's reference; NULL for V9's opening lots (the balances from
    -- before lots existed).
    reference   text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- When it expired or was voided.
    closed_at   timestamptz,
    PRIMARY KEY (user_id, lot_id),
    CONSTRAINT credit_lots_remaining_bounds CHECK (remaining >= 0 AND remaining <= granted),
    CONSTRAINT credit_lots_closed_are_empty CHECK (
        (status = 'active' AND closed_at IS NULL)
        OR (status <> 'active' AND remaining = 0 AND closed_at IS NOT NULL)
    )
);
-- The lots a movement may draw from or must expire, in burn-down order.
CREATE INDEX credit_lots_spendable ON credit_lots (user_id, priority, expires_at, lot_id)
    WHERE status = 'active' AND remaining > 0;
-- The timer's search for lots past their expiry.
CREATE INDEX credit_lots_due ON credit_lots (expires_at)
    WHERE status = 'active' AND remaining > 0 AND expires_at IS NOT NULL;
CREATE UNIQUE INDEX credit_lots_one_per_grant ON credit_lots (user_id, reference);

CREATE FUNCTION credit_lots_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.user_id <> OLD.user_id OR NEW.category <> OLD.category OR NEW.priority <> OLD.priority
       OR NEW.granted <> OLD.granted OR NEW.expires_at IS DISTINCT FROM OLD.expires_at
       OR NEW.reference IS DISTINCT FROM OLD.reference OR NEW.created_at <> OLD.created_at THEN
        RAISE EXCEPTION 'lot % of %: only remaining and status change', OLD.lot_id, OLD.user_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF OLD.status <> 'active' AND (NEW.status <> OLD.status OR NEW.closed_at <> OLD.closed_at) THEN
        RAISE EXCEPTION 'lot % of % is % and cannot change', OLD.lot_id, OLD.user_id, OLD.status
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER credit_lots_fixed
    BEFORE UPDATE ON credit_lots
    FOR EACH ROW EXECUTE FUNCTION credit_lots_fixed();
CREATE TRIGGER credit_lots_no_delete
    BEFORE DELETE OR TRUNCATE ON credit_lots
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();

-- The per-lot breakdown of the ledger: every ledger entry that moves credits
-- has one row per lot it touches, summing to the entry's amount. A lot's
-- remaining is the sum of its movements; a reservation's allocations are its
-- deduct entry's movements.
CREATE TABLE lot_movements (
    user_id      text        NOT NULL,
    lot_id       bigint      NOT NULL,
    -- The ledger entry this is part of; NULL only for V9's opening rows.
    entry_id     bigint,
    kind         text        NOT NULL CHECK (kind IN ('opening', 'grant', 'deduct', 'refund', 'expire', 'void')),
    amount       bigint      NOT NULL CHECK (amount <> 0),
    -- The reservation, for deduct and refund rows (and the expire or void
    -- rows of a refund that met a closed lot).
    app_name     text,
    project_code text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT lot_movements_sign CHECK (
        (kind IN ('opening', 'grant', 'refund') AND amount > 0)
        OR (kind IN ('deduct', 'expire', 'void') AND amount < 0)
    ),
    CONSTRAINT lot_movements_entry CHECK ((entry_id IS NULL) = (kind = 'opening'))
);
CREATE INDEX lot_movements_by_reservation ON lot_movements (user_id, app_name, project_code)
    WHERE project_code IS NOT NULL;
CREATE INDEX lot_movements_by_lot ON lot_movements (user_id, lot_id, created_at);
CREATE TRIGGER lot_movements_append_only
    BEFORE UPDATE OR DELETE ON lot_movements
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER lot_movements_no_truncate
    BEFORE TRUNCATE ON lot_movements
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();

-- On Citus, the new tables live with their user's other rows.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    PERFORM create_distributed_table('credit_lots', 'user_id', colocate_with => 'accounts');
    PERFORM create_distributed_table('lot_movements', 'user_id', colocate_with => 'accounts');
END
$$;

-- The changes to the ledger and the reservations run as one block: on Citus
-- these tables are distributed, and Citus carries a DDL statement to the
-- shards only when it is not part of a multi-statement query string (which
-- is how migrations are sent); inside a block each statement is its own.
DO $v9$
BEGIN
    -- Ledger: expire and void entries take credits away; a refund may carry a
    -- reference (one refund per reference and reservation; at most one without).
    ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_check;
    ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_check
        CHECK (kind IN ('grant', 'deduct', 'refund', 'settle', 'expire', 'void'));
    ALTER TABLE ledger_entries DROP CONSTRAINT ledger_amount_sign;
    ALTER TABLE ledger_entries ADD CONSTRAINT ledger_amount_sign CHECK (
        (kind IN ('grant', 'refund') AND amount > 0)
        OR (kind IN ('deduct', 'expire', 'void') AND amount < 0)
        OR (kind = 'settle' AND amount = 0)
    );
    ALTER TABLE ledger_entries DROP CONSTRAINT ledger_reservation_kinds_have_code;
    ALTER TABLE ledger_entries ADD CONSTRAINT ledger_reservation_kinds_have_code CHECK (
        kind IN ('grant', 'expire', 'void') OR project_code IS NOT NULL
    );
    DROP INDEX ledger_one_refund_per_reservation;
    CREATE UNIQUE INDEX ledger_one_refund_per_reservation
        ON ledger_entries (user_id, app_name, project_code) WHERE kind = 'refund' AND reference IS NULL;
    CREATE UNIQUE INDEX ledger_one_refund_per_reference
        ON ledger_entries (user_id, app_name, project_code, reference) WHERE kind = 'refund' AND reference IS NOT NULL;

    -- Reservations: refunded in parts.
    ALTER TABLE reservations ADD COLUMN refunded_amount bigint NOT NULL DEFAULT 0;
    ALTER TABLE reservations DISABLE TRIGGER reservations_state_machine;
    UPDATE reservations SET refunded_amount = amount WHERE state = 'refunded';
    ALTER TABLE reservations ENABLE TRIGGER reservations_state_machine;
    ALTER TABLE reservations ADD CONSTRAINT reservations_refunds_within_amount
        CHECK (refunded_amount >= 0 AND refunded_amount <= amount);
    ALTER TABLE reservations DROP CONSTRAINT reservations_state_check;
    ALTER TABLE reservations ADD CONSTRAINT reservations_state_check
        CHECK (state IN ('reserved', 'partially_refunded', 'settled', 'refunded'));
    ALTER TABLE reservations DROP CONSTRAINT reservations_state_fields;
    ALTER TABLE reservations ADD CONSTRAINT reservations_state_fields CHECK (
        (state = 'reserved' AND settled_at IS NULL AND refunded_at IS NULL AND settled_by IS NULL
            AND refunded_amount = 0)
        OR (state = 'partially_refunded' AND settled_at IS NULL AND refunded_at IS NULL
            AND settled_by IS NULL AND refunded_amount > 0 AND refunded_amount < amount)
        OR (state = 'settled' AND settled_at IS NOT NULL AND refunded_at IS NULL
            AND settled_by IS NOT NULL AND refunded_amount < amount)
        OR (state = 'refunded' AND refunded_at IS NOT NULL AND balance_after_refund IS NOT NULL
            AND refunded_amount = amount
            AND ((settled_at IS NULL AND settled_by IS NULL)
                 OR (settled_at IS NOT NULL AND settled_by = 'window')))
    );
    DROP INDEX reservations_due;
    CREATE INDEX reservations_due ON reservations (refundable_until)
        WHERE state IN ('reserved', 'partially_refunded');

    -- The state machine: reserved -> partially_refunded -> refunded or settled;
    -- a window settlement may still take refunds (an event from inside the
    -- window) or become final; refunded_amount only grows, and only while
    -- refunds are allowed.
    CREATE OR REPLACE FUNCTION reservations_one_way() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        IF NEW.amount <> OLD.amount OR NEW.user_id <> OLD.user_id THEN
            RAISE EXCEPTION 'reservation (%, %) amount and user are fixed', OLD.app_name, OLD.project_code
                USING ERRCODE = 'check_violation';
        END IF;
        IF NEW.refunded_amount < OLD.refunded_amount THEN
            RAISE EXCEPTION 'reservation (%, %): refunds cannot be taken back', OLD.app_name, OLD.project_code
                USING ERRCODE = 'check_violation';
        END IF;
        IF OLD.state IN ('reserved', 'partially_refunded') THEN
            IF NEW.state = 'reserved' AND OLD.state = 'partially_refunded' THEN
                RAISE EXCEPTION 'reservation (%, %) was partly refunded', OLD.app_name, OLD.project_code
                    USING ERRCODE = 'check_violation';
            END IF;
            RETURN NEW;
        END IF;
        -- Settled by the window only: a late success event makes it final, a
        -- failure event from inside the window refunds it (in parts or all of
        -- what is left). Its settlement stays.
        IF OLD.state = 'settled' AND OLD.settled_by = 'window'
           AND NEW.settled_at = OLD.settled_at
           AND ((NEW.state = 'settled' AND NEW.settled_by IN ('window', 'final'))
                OR (NEW.state = 'refunded' AND NEW.settled_by = 'window')) THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'reservation (%, %) is % and cannot change', OLD.app_name, OLD.project_code, OLD.state
            USING ERRCODE = 'check_violation';
    END;
    $fn$;
END
$v9$;

-- Balances from before lots existed: one paid lot without expiry per user,
-- holding the balance, from which every earlier reservation is recorded as
-- drawn (and, if refunded, given back), so that each reservation's
-- allocations sum to its amount and every lot's remaining is the sum of its
-- movements.
INSERT INTO credit_lots (user_id, category, priority, granted, remaining, app_name)
SELECT a.user_id, 'paid', 50, a.balance + coalesce(r.open, 0), a.balance, 'penora'
  FROM accounts a
  LEFT JOIN (SELECT user_id, sum(amount - refunded_amount) AS open FROM reservations
              GROUP BY user_id) r ON r.user_id = a.user_id
 WHERE a.balance > 0 OR r.user_id IS NOT NULL;
INSERT INTO lot_movements (user_id, lot_id, entry_id, kind, amount, created_at)
SELECT l.user_id, l.lot_id, NULL, 'opening', l.granted, l.created_at FROM credit_lots l
 WHERE l.granted > 0;
INSERT INTO lot_movements (user_id, lot_id, entry_id, kind, amount, app_name, project_code, created_at)
SELECT e.user_id, l.lot_id, e.id, e.kind, e.amount, e.app_name, e.project_code, e.created_at
  FROM ledger_entries e
  JOIN credit_lots l ON l.user_id = e.user_id AND l.reference IS NULL
 WHERE e.kind IN ('deduct', 'refund');

