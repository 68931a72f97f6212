-- Event time decides refunds (contract §11).
--
-- A generation.failed event whose occurred_at lies inside the reservation's
-- refund window refunds it however late it is processed. The timer settles a
-- reservation when its window passes; such a settlement only says "no one
-- asked in time", so a failure event from inside the window may still turn it
-- into a refund. Every other settlement (a success event, a save naming the
-- reservation, an explicit settlement) is final.
--
-- * settled_by records which: 'window' (the timer) or 'final'. A 'window'
--   settlement may later become 'final' (a success event arriving late) or
--   'refunded' (a failure event from inside the window); nothing else
--   changes a settled or refunded reservation, as before.
-- * A refund of a window-settled reservation keeps settled_at and
--   settled_by, so its history stays readable.

ALTER TABLE reservations ADD COLUMN settled_by text
    CHECK (settled_by IN ('window', 'final'));

-- Settlements made before this migration: the timer's carry its reason.
ALTER TABLE reservations DISABLE TRIGGER reservations_state_machine;
UPDATE reservations
   SET settled_by = CASE WHEN settle_reason = 'refund window passed' THEN 'window' ELSE 'final' END
 WHERE state = 'settled';
ALTER TABLE reservations ENABLE TRIGGER reservations_state_machine;

ALTER TABLE reservations DROP CONSTRAINT reservations_state_fields;
ALTER TABLE reservations ADD CONSTRAINT reservations_state_fields CHECK (
    (state = 'reserved' AND settled_at IS NULL AND refunded_at IS NULL AND settled_by IS NULL)
    OR (state = 'settled' AND settled_at IS NOT NULL AND refunded_at IS NULL
        AND settled_by IS NOT NULL)
    OR (state = 'refunded' AND refunded_at IS NOT NULL AND balance_after_refund IS NOT NULL
        AND ((settled_at IS NULL AND settled_by IS NULL)
             OR (settled_at IS NOT NULL AND settled_by = 'window')))
);

CREATE OR REPLACE FUNCTION reservations_one_way() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.amount <> OLD.amount OR NEW.user_id <> OLD.user_id THEN
        RAISE EXCEPTION 'reservation (%, %) amount and user are fixed', OLD.app_name, OLD.project_code
            USING ERRCODE = 'check_violation';
    END IF;
    IF OLD.state = 'reserved' THEN
        RETURN NEW;
    END IF;
    -- Settled by the window only: a late success event makes it final, a
    -- failure event from inside the window refunds it. Its settlement stays.
    IF OLD.state = 'settled' AND OLD.settled_by = 'window'
       AND NEW.settled_at = OLD.settled_at
       AND ((NEW.state = 'settled' AND NEW.settled_by = 'final')
            OR (NEW.state = 'refunded' AND NEW.settled_by = 'window')) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'reservation (%, %) is % and cannot change', OLD.app_name, OLD.project_code, OLD.state
        USING ERRCODE = 'check_violation';
END;
$$;
