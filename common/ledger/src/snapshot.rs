//! What a movement knows when it decides: the rows its transaction locked
//! and read, typed, at one instant (the transaction's `now()`). A
//! [`Snapshot`] is plain data: `decide` reads it and nothing else, so a
//! decision can be made, and checked against the model, without a
//! database.
//!
//! Rules that live here, once:
//! * **spendable now**: a lot is spendable while it is active, has credits
//!   left, and `now` is before its `expires_at` ([`Lot::spendable_at`]);
//!   from `expires_at` on it is *due*: not spendable, its `expire` entry
//!   not yet written ([`Lot::due_at`]);
//! * **burn-down order**: by `priority`, then `expires_at` (soonest first,
//!   never last), then promotional before paid, then oldest first
//!   ([`Lot::burn_key`], the only spelling of the order).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use penora_domain::{AppName, LotCategory, ProjectCode, ReservationState, SettledBy, UserId};
use time::OffsetDateTime;

/// A reservation's key, `(user_id, app_name, project_code)`: unique per user
/// (contract §15), so two users' reservations may share app and code.
pub type ResKey = (UserId, AppName, ProjectCode);

/// The key of a reservation.
pub fn res_key(user: &UserId, app: &AppName, code: &ProjectCode) -> ResKey {
    (user.clone(), app.clone(), code.clone())
}

/// A lot with credits left, as a movement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lot {
    /// Its id.
    pub lot_id: i64,
    /// Credits left in it.
    pub remaining: i64,
    /// The grant's app (expire and void entries are written in its name).
    pub app_name: AppName,
    /// `paid` or `promotional`.
    pub category: LotCategory,
    /// Lower is spent first.
    pub priority: i32,
    /// When its credits expire (`None`: never).
    pub expires_at: Option<OffsetDateTime>,
    /// When it was granted.
    pub created_at: OffsetDateTime,
}

impl Lot {
    /// Past its expiry at `now`: not spendable; its `expire` entry is due.
    pub fn due_at(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Credits of it that can be spent at `now`.
    pub fn spendable_at(&self, now: OffsetDateTime) -> i64 {
        if self.due_at(now) { 0 } else { self.remaining }
    }

    /// The burn-down order's key: lower is drawn first.
    pub fn burn_key(&self) -> (i32, i128, bool, OffsetDateTime, i64) {
        (
            self.priority,
            self.expires_at
                .map_or(i128::MAX, OffsetDateTime::unix_timestamp_nanos),
            self.category == LotCategory::Paid,
            self.created_at,
            self.lot_id,
        )
    }
}

/// Sorts `lots` in burn-down order.
pub fn burn_order(lots: &mut [Lot]) {
    lots.sort_by_key(Lot::burn_key);
}

/// A locked account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Its balance (the spendable credits once due expiries are written).
    pub balance: i64,
    /// Its active lots with credits left, in burn-down order, due ones
    /// included.
    pub lots: Vec<Lot>,
    /// Its own low-balance threshold (`accounts.low_balance_threshold`);
    /// `None`: the service's default (`LOW_BALANCE_THRESHOLD`).
    pub threshold: Option<i64>,
    /// Its spend limits and what it spent in their periods; `None` when it
    /// has no limit (contract §16).
    pub spending: Option<crate::limits::Spending>,
    /// Its audit chain's head (`accounts.chain_seq`, `chain_hash`).
    pub chain: crate::chain::Head,
}

impl Account {
    /// What the account can spend at `now`: its balance less what its due
    /// lots still hold.
    pub fn spendable_at(&self, now: OffsetDateTime) -> i64 {
        self.lots.iter().map(|l| l.spendable_at(now)).sum()
    }
}

/// A reservation, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Credits it took.
    pub amount: i64,
    /// Credits its refunds gave back.
    pub refunded: i64,
    /// Its state.
    pub state: ReservationState,
    /// Why it was settled, when it was.
    pub settled_by: Option<SettledBy>,
    /// When it was made.
    pub created_at: OffsetDateTime,
    /// Until when it may be refunded.
    pub refundable_until: OffsetDateTime,
    /// The balance right after its deduction (what a replay answers).
    pub balance_after_deduct: i64,
    /// The balance right after the refund that completed it.
    pub balance_after_refund: Option<i64>,
    /// When that refund was made.
    pub refunded_at: Option<OffsetDateTime>,
    /// Why.
    pub refund_reason: Option<String>,
    /// When it was settled, when it was.
    pub settled_at: Option<OffsetDateTime>,
    /// Why it was settled.
    pub settle_reason: Option<String>,
}

impl Reservation {
    /// Credits it still holds.
    pub fn held(&self) -> i64 {
        if self.state.holds() {
            self.amount - self.refunded
        } else {
            0
        }
    }

    /// Whether only its window passing settled it: a failure event from
    /// inside the window may still refund it.
    pub fn settled_by_window(&self) -> bool {
        self.state == ReservationState::Settled && self.settled_by == Some(SettledBy::Window)
    }
}

/// What became of a lot a reservation drew from, as a refund sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LotFate {
    /// Active and not past its expiry: credits go back into it.
    Open,
    /// Past its expiry (written or not): a part given back expires at once.
    Expired,
    /// Voided: a part given back is voided at once.
    Voided,
}

/// One lot a reservation drew from, with what was given back to it so far,
/// in burn-down order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drawn {
    /// The lot.
    pub lot_id: i64,
    /// Taken by the deduction.
    pub drawn: i64,
    /// Given back by earlier refunds.
    pub returned: i64,
    /// What became of the lot.
    pub fate: LotFate,
}

/// A refund made before under a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastRefund {
    /// How many credits it gave back.
    pub amount: i64,
    /// The balance right after it.
    pub balance_after: i64,
    /// Why.
    pub description: Option<String>,
    /// When.
    pub at: OffsetDateTime,
}

/// A grant made before under a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastGrant {
    /// How many credits.
    pub amount: i64,
    /// The balance right after it.
    pub balance_after: i64,
    /// Its ledger entry.
    pub entry_id: i64,
    /// When.
    pub at: OffsetDateTime,
    /// Its lot.
    pub lot_id: i64,
    /// The lot's category, priority and expiry.
    pub category: LotCategory,
    /// The lot's priority.
    pub priority: i32,
    /// The lot's expiry.
    pub expires_at: Option<OffsetDateTime>,
}

/// A lot as a void sees it (any status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LotRecord {
    /// The lot.
    pub lot: Lot,
    /// `active`, `expired` or `voided`, as stored.
    pub status: penora_domain::LotStatus,
    /// What an earlier void of it took away.
    pub voided: i64,
}

/// Everything a batch of one kind of movement reads, at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The transaction's `now()`: every time rule is judged at it, and the
    /// time of every row the transaction writes.
    pub now: OffsetDateTime,
    /// The transaction's `now()` as read (a test's or the timer's instant
    /// may move `now`, never this): the `created_at` of the entries it
    /// writes, which their chain links hash.
    pub stamp: OffsetDateTime,
    /// Ledger ids taken with the reads, under the locks, ascending: the
    /// first ones `plan::apply` gives its entries (unused ones are gaps).
    pub ids: Vec<i64>,
    /// The locked accounts.
    pub accounts: BTreeMap<UserId, Account>,
    /// Accounts another transaction holds (a batch that does not wait).
    pub busy: BTreeSet<UserId>,
    /// The reservations the batch names.
    pub reservations: HashMap<ResKey, Reservation>,
    /// For each reservation the batch may give back or replay: the lots it
    /// drew from.
    pub drawn: HashMap<ResKey, Vec<Drawn>>,
    /// Refunds made before under the references the batch names.
    pub refunds: HashMap<(ResKey, String), PastRefund>,
    /// For each fully refunded reservation the batch names: the amount of
    /// the refund that completed it (what a repeated whole refund answers).
    pub completing_refund: HashMap<ResKey, i64>,
    /// Events handled before, with what they did.
    pub events: HashMap<(UserId, String), String>,
    /// Grants made before under the references the batch names.
    pub grants: HashMap<(UserId, String), PastGrant>,
    /// Lots the batch names (voids).
    pub lots: HashMap<(UserId, i64), LotRecord>,
}

impl Snapshot {
    /// An empty snapshot at `now`.
    pub fn at(now: OffsetDateTime) -> Self {
        Self {
            now,
            stamp: now,
            ids: Vec::new(),
            accounts: BTreeMap::new(),
            busy: BTreeSet::new(),
            reservations: HashMap::new(),
            drawn: HashMap::new(),
            refunds: HashMap::new(),
            completing_refund: HashMap::new(),
            events: HashMap::new(),
            grants: HashMap::new(),
            lots: HashMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn lot(
        id: i64,
        category: LotCategory,
        priority: i32,
        expires_at: Option<OffsetDateTime>,
    ) -> Lot {
        Lot {
            lot_id: id,
            remaining: 5,
            app_name: AppName::penora(),
            category,
            priority,
            expires_at,
            created_at: datetime!(2026-12-01 00:00 UTC),
        }
    }

    #[test]
    fn a_lot_is_due_from_its_expiry_instant_on() {
        let at = datetime!(2026-12-06 12:00 UTC);
        let l = lot(1, LotCategory::Paid, 50, Some(at));
        let just_before = at - time::Duration::nanoseconds(1);
        assert_eq!(l.spendable_at(just_before), 5);
        assert!(!l.due_at(just_before));
        assert!(l.due_at(at));
        assert_eq!(l.spendable_at(at), 0);
        assert_eq!(lot(2, LotCategory::Paid, 50, None).spendable_at(at), 5);
    }

    #[test]
    fn the_burn_order_is_priority_then_soonest_expiry_then_promotional_then_oldest() {
        let soon = Some(datetime!(2026-12-07 00:00 UTC));
        let later = Some(datetime!(2026-12-08 00:00 UTC));
        let mut lots = vec![
            lot(1, LotCategory::Paid, 50, None),
            lot(2, LotCategory::Paid, 50, later),
            lot(3, LotCategory::Promotional, 50, later),
            lot(4, LotCategory::Paid, 10, None),
            lot(5, LotCategory::Paid, 50, soon),
            lot(6, LotCategory::Paid, 50, None),
        ];
        burn_order(&mut lots);
        let ids: Vec<i64> = lots.iter().map(|l| l.lot_id).collect();
        assert_eq!(ids, [4, 5, 3, 2, 1, 6]);
    }
}
