//! The ledger's tables in memory, for checking the pure `decide` of each
//! movement without a database: [`Memory::snapshot`] reads what a
//! movement's `load` would (everything of the user, a superset of what any
//! `load` reads), and [`Memory::apply`] writes a [`Plan`] as `plan::apply`
//! does, refusing what the database's guards and constraints refuse (a
//! balance below zero, a lot change on a closed lot or one past its expiry,
//! a key claimed twice, a change of a reservation that does not exist).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};

use penora_domain::{
    AppName, EntryKind, LotCategory, LotStatus, ProjectCode, ReservationState, UserId,
};
use penora_ledger::{
    plan::{Applied, Plan},
    snapshot::{
        Account, Drawn, Lot, LotFate, LotRecord, PastGrant, PastRefund, ResKey, Reservation,
        Snapshot, burn_order,
    },
};
use time::OffsetDateTime;

/// A stored lot.
#[derive(Debug, Clone)]
pub struct Row {
    pub user: UserId,
    pub lot: Lot,
    pub status: LotStatus,
    pub reference: String,
}

/// A stored ledger entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: i64,
    pub user: UserId,
    pub kind: EntryKind,
    pub amount: i64,
    pub balance_after: i64,
    pub app: AppName,
    pub description: Option<String>,
    pub code: Option<ProjectCode>,
    pub reference: Option<String>,
    pub at: OffsetDateTime,
}

/// A stored lot movement.
#[derive(Debug, Clone)]
pub struct Movement {
    pub user: UserId,
    pub lot_id: i64,
    pub entry_id: i64,
    pub kind: EntryKind,
    pub amount: i64,
    pub reservation: Option<(AppName, ProjectCode)>,
}

/// The tables.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    pub balances: BTreeMap<UserId, i64>,
    pub lots: BTreeMap<i64, Row>,
    pub entries: Vec<Entry>,
    pub moves: Vec<Movement>,
    pub reservations: HashMap<ResKey, Reservation>,
    pub events: HashMap<(UserId, String), String>,
    /// Each account's own low-balance threshold (none: the default).
    pub thresholds: BTreeMap<UserId, i64>,
    /// The events out the plans written implied, in order
    /// (`penora_ledger::events_out::derive`), as `(user, type, data)`.
    pub out: Vec<(UserId, String, String)>,
}

impl Memory {
    /// Makes `user`'s account when it has none.
    pub fn open(&mut self, user: &UserId) {
        self.balances.entry(user.clone()).or_insert(0);
    }

    /// Everything of `users` at `now`, as the movements' `load`s read it.
    pub fn snapshot(&self, users: &[&UserId], now: OffsetDateTime) -> Snapshot {
        let mut s = Snapshot::at(now);
        for &user in users {
            let Some(&balance) = self.balances.get(user) else {
                continue;
            };
            let mut lots: Vec<Lot> = self
                .lots
                .values()
                .filter(|r| &r.user == user && r.status == LotStatus::Active && r.lot.remaining > 0)
                .map(|r| r.lot.clone())
                .collect();
            burn_order(&mut lots);
            s.accounts.insert(
                user.clone(),
                Account {
                    balance,
                    lots,
                    threshold: self.thresholds.get(user).copied(),
                    spending: None,
                    chain: Default::default(),
                },
            );
            for (id, row) in self.lots.iter().filter(|(_, r)| &r.user == user) {
                let voided = self
                    .moves
                    .iter()
                    .filter(|m| {
                        m.lot_id == *id && m.kind == EntryKind::Void && m.reservation.is_none()
                    })
                    .map(|m| -m.amount)
                    .sum();
                s.lots.insert(
                    (user.clone(), *id),
                    LotRecord {
                        lot: row.lot.clone(),
                        status: row.status,
                        voided,
                    },
                );
            }
        }
        for (key, r) in self
            .reservations
            .iter()
            .filter(|(k, _)| users.contains(&&k.0))
        {
            s.reservations.insert(key.clone(), r.clone());
            s.drawn.insert(key.clone(), self.drawn(key, now));
            if let Some(last) = self
                .entries
                .iter()
                .rev()
                .find(|e| e.kind == EntryKind::Refund && Self::names(e, key))
                && r.state == ReservationState::Refunded
            {
                s.completing_refund.insert(key.clone(), last.amount);
            }
        }
        for e in self.entries.iter().filter(|e| users.contains(&&e.user)) {
            match (e.kind, &e.reference, &e.code) {
                (EntryKind::Refund, Some(reference), Some(code)) => {
                    s.refunds.insert(
                        (
                            (e.user.clone(), e.app.clone(), code.clone()),
                            reference.clone(),
                        ),
                        PastRefund {
                            amount: e.amount,
                            balance_after: e.balance_after,
                            description: e.description.clone(),
                            at: e.at,
                        },
                    );
                }
                (EntryKind::Grant, Some(reference), _) => {
                    let lot = self
                        .lots
                        .values()
                        .find(|r| r.user == e.user && &r.reference == reference)
                        .expect("a grant has its lot");
                    s.grants.insert(
                        (e.user.clone(), reference.clone()),
                        PastGrant {
                            amount: e.amount,
                            balance_after: e.balance_after,
                            entry_id: e.id,
                            at: e.at,
                            lot_id: lot.lot.lot_id,
                            category: lot.lot.category,
                            priority: lot.lot.priority,
                            expires_at: lot.lot.expires_at,
                        },
                    );
                }
                _ => {}
            }
        }
        for ((user, event), outcome) in &self.events {
            if users.contains(&user) {
                s.events
                    .insert((user.clone(), event.clone()), outcome.clone());
            }
        }
        s
    }

    fn names(e: &Entry, key: &ResKey) -> bool {
        e.user == key.0 && e.app == key.1 && e.code.as_ref() == Some(&key.2)
    }

    /// The lots reservation `key` drew from, in burn-down order.
    fn drawn(&self, key: &ResKey, now: OffsetDateTime) -> Vec<Drawn> {
        let mut by_lot: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
        for m in self.moves.iter().filter(|m| {
            m.user == key.0 && m.reservation.as_ref() == Some(&(key.1.clone(), key.2.clone()))
        }) {
            let t = by_lot.entry(m.lot_id).or_default();
            match m.kind {
                EntryKind::Deduct => t.0 -= m.amount,
                EntryKind::Refund => t.1 += m.amount,
                _ => {}
            }
        }
        let mut out: Vec<(Lot, Drawn)> = by_lot
            .into_iter()
            .map(|(lot_id, (drawn, returned))| {
                let row = &self.lots[&lot_id];
                let fate = match row.status {
                    LotStatus::Voided => LotFate::Voided,
                    LotStatus::Expired => LotFate::Expired,
                    LotStatus::Active if row.lot.due_at(now) => LotFate::Expired,
                    LotStatus::Active => LotFate::Open,
                };
                (
                    row.lot.clone(),
                    Drawn {
                        lot_id,
                        drawn,
                        returned,
                        fate,
                    },
                )
            })
            .collect();
        out.sort_by_key(|(lot, _)| lot.burn_key());
        out.into_iter().map(|(_, d)| d).collect()
    }

    /// Writes `plan` at `now` as `plan::apply` does, or refuses it as the
    /// database would (nothing is then written: the caller's copy stands).
    /// Records the events out `plan`, decided against `snap` and written,
    /// implies (the default threshold 10; lot ids unknown, as before
    /// `apply`).
    pub fn record_out(&mut self, plan: &Plan, snap: &Snapshot) {
        for d in penora_ledger::events_out::derive(plan, snap, &[], 10) {
            self.out
                .push((d.user_id, d.kind.as_str().to_owned(), d.data.to_string()));
        }
    }

    pub fn apply(&mut self, plan: &Plan, now: OffsetDateTime) -> Result<Applied, String> {
        let mut next = self.clone();
        let applied = next.write(plan, now)?;
        *self = next;
        Ok(applied)
    }

    fn write(&mut self, plan: &Plan, now: OffsetDateTime) -> Result<Applied, String> {
        let mut totals: BTreeMap<&UserId, i64> = BTreeMap::new();
        for e in &plan.entries {
            *totals.entry(&e.user_id).or_default() += e.amount;
        }
        for (user, delta) in totals {
            let balance = self
                .balances
                .get_mut(user)
                .ok_or(format!("{user}: no account"))?;
            *balance = balance
                .checked_add(delta)
                .filter(|b| *b >= 0)
                .ok_or(format!(
                    "{user}: the balance would go below zero or overflow"
                ))?;
        }
        let mut applied = Applied::default();
        for e in &plan.entries {
            let id = self.entries.len() as i64 + 1;
            if self.entries.iter().any(|x| {
                x.user == e.user_id
                    && x.kind == e.kind
                    && x.kind == EntryKind::Grant
                    && x.reference == e.reference
            }) {
                return Err(format!("grant reference {:?} used twice", e.reference));
            }
            self.entries.push(Entry {
                id,
                user: e.user_id.clone(),
                kind: e.kind,
                amount: e.amount,
                balance_after: e.balance_after,
                app: e.app_name.clone(),
                description: e.description.clone(),
                code: e.project_code.clone(),
                reference: e.reference.clone(),
                at: now,
            });
            applied.entries.push((id, now));
        }
        for l in &plan.new_lots {
            let lot_id = self.lots.keys().next_back().copied().unwrap_or(0) + 1;
            let entry_id = applied
                .entries
                .get(l.entry)
                .ok_or("a lot names no entry")?
                .0;
            self.lots.insert(
                lot_id,
                Row {
                    user: l.user_id.clone(),
                    lot: Lot {
                        lot_id,
                        remaining: l.amount,
                        app_name: l.app_name.clone(),
                        category: l.category,
                        priority: l.priority,
                        expires_at: l.expires_at,
                        created_at: now,
                    },
                    status: LotStatus::Active,
                    reference: l.reference.clone(),
                },
            );
            self.moves.push(Movement {
                user: l.user_id.clone(),
                lot_id,
                entry_id,
                kind: EntryKind::Grant,
                amount: l.amount,
                reservation: None,
            });
            applied.lots.push(lot_id);
        }
        for m in &plan.moves {
            let entry_id = applied
                .entries
                .get(m.entry)
                .ok_or("a movement names no entry")?
                .0;
            self.moves.push(Movement {
                user: m.user_id.clone(),
                lot_id: m.lot_id,
                entry_id,
                kind: m.kind,
                amount: m.amount,
                reservation: m.reservation.clone(),
            });
        }
        // Each entry's movements sum to its amount.
        for (i, e) in plan.entries.iter().enumerate() {
            let moved: i64 = plan
                .moves
                .iter()
                .filter(|m| m.entry == i)
                .map(|m| m.amount)
                .sum::<i64>()
                + plan
                    .new_lots
                    .iter()
                    .filter(|l| l.entry == i)
                    .map(|l| l.amount)
                    .sum::<i64>();
            if e.kind != EntryKind::Settle && moved != e.amount {
                return Err(format!(
                    "entry {i} ({:?} {}) moves {moved} of its lots",
                    e.kind, e.amount
                ));
            }
        }
        for ((user, lot_id), change) in &plan.lots {
            let row = self
                .lots
                .get_mut(lot_id)
                .filter(|r| &r.user == user)
                .ok_or(format!("lot {lot_id} of {user} does not exist"))?;
            let ok = row.status == LotStatus::Active
                && row.lot.remaining + change.delta >= 0
                && (change.delta >= 0 || change.close.is_some() || !row.lot.due_at(now));
            if !ok {
                return Err(format!("lot {lot_id}: the change {change:?} did not apply"));
            }
            row.lot.remaining += change.delta;
            if let Some(close) = change.close {
                row.status = close;
            }
        }
        for c in &plan.reservations {
            let key = (
                c.user_id.clone(),
                c.app_name.clone(),
                c.project_code.clone(),
            );
            if self.reservations.contains_key(&key) {
                return Err(format!("key {key:?} claimed twice"));
            }
            self.reservations.insert(
                key,
                Reservation {
                    amount: c.amount,
                    refunded: 0,
                    state: ReservationState::Reserved,
                    settled_by: None,
                    created_at: now,
                    refundable_until: c.refundable_until,
                    balance_after_deduct: c.balance_after,
                    balance_after_refund: None,
                    refunded_at: None,
                    refund_reason: None,
                    settled_at: None,
                    settle_reason: None,
                },
            );
        }
        for c in &plan.changes {
            let key = (
                c.user_id.clone(),
                c.app_name.clone(),
                c.project_code.clone(),
            );
            let r = self
                .reservations
                .get_mut(&key)
                .ok_or(format!("no reservation {key:?} to change"))?;
            // The `reservations_one_way` trigger: no way back to reserved,
            // nothing after refunded.
            if r.state == ReservationState::Refunded || c.state == ReservationState::Reserved {
                return Err(format!("{key:?}: {:?} -> {:?}", r.state, c.state));
            }
            r.state = c.state;
            r.refunded = c.refunded;
            r.settled_at = c.settled_at;
            r.settle_reason = c.settle_reason.clone();
            r.settled_by = c.settled_by;
            r.refunded_at = c.refunded_at;
            r.refund_reason = c.refund_reason.clone();
            r.balance_after_refund = c.balance_after_refund;
            if r.refunded > r.amount {
                return Err(format!("{key:?}: refunded more than it took"));
            }
        }
        for e in &plan.events {
            self.events
                .entry((e.user_id.clone(), e.event_id.clone()))
                .or_insert_with(|| e.outcome.clone());
        }
        self.check()?;
        Ok(applied)
    }

    /// The invariants the schema and `reconcile` hold: each balance is the
    /// sum of its user's entries and of the user's active lots.
    pub fn check(&self) -> Result<(), String> {
        for (user, &balance) in &self.balances {
            let entries: i64 = self
                .entries
                .iter()
                .filter(|e| &e.user == user)
                .map(|e| e.amount)
                .sum();
            let lots: i64 = self
                .lots
                .values()
                .filter(|r| &r.user == user && r.status == LotStatus::Active)
                .map(|r| r.lot.remaining)
                .sum();
            if balance != entries || balance != lots {
                return Err(format!(
                    "{user}: balance {balance}, entries {entries}, lots {lots}"
                ));
            }
        }
        Ok(())
    }

    /// Of `category`, the credits `user` holds in active lots.
    pub fn held(&self, user: &UserId, category: LotCategory) -> i64 {
        self.lots
            .values()
            .filter(|r| &r.user == user && r.status == LotStatus::Active)
            .filter(|r| r.lot.category == category)
            .map(|r| r.lot.remaining)
            .sum()
    }
}
