//! What a decided batch writes: a [`Plan`], plain data built by `decide`
//! and written by [`apply`] in a fixed number of set-based statements of the
//! caller's transaction.
//!
//! Rules:
//! * every entry moves its user's balance by its amount; the balances move
//!   in one guarded `UPDATE` (`penora_store::accounts::move_balances`);
//! * every entry gets its `ledger-audit` job in the outbox, in the same
//!   statement pass (`penora_store::outbox`);
//! * an entry that moves credits has one `lot_movements` row per lot it
//!   touches, summing to its amount; the lots change in one guarded
//!   `UPDATE` that must apply to every lot named (no draw from a lot past
//!   its expiry, no lot below zero);
//! * reservations are claimed with `ON CONFLICT DO NOTHING`: a key claimed
//!   meanwhile by a concurrent transaction is a [`DbError::Conflict`] and
//!   the batch runs again (keys are per user and every writer locks the
//!   user's account first, so it should never fire);
//! * the shared steps of deciding ([`Plan::expire_due`], [`Plan::give_back`],
//!   [`draw`]) are written once, here.

use std::collections::{BTreeMap, BTreeSet};

use deadpool_postgres::Transaction;
use futures_util::TryFutureExt;
use penora_domain::{
    AppName, EntryKind, LotCategory, LotStatus, ProjectCode, ReservationState, SettledBy, UserId,
    messages::{CommittedChain, LEDGER_AUDIT, LedgerAuditCommit},
};
use penora_store::{DbError, accounts, outbox};
use serde::Serialize;
use time::OffsetDateTime;
use tokio_postgres::types::ToSql;
use utoipa::ToSchema;

use crate::snapshot::{Drawn, Lot, LotFate, Snapshot};
pub use crate::tables::events::HandledEvent;

/// Where a deduction took its credits from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Allocation {
    /// The lot.
    pub lot_id: i64,
    /// How many credits.
    pub amount: i64,
}

/// A ledger row to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// Whose.
    pub user_id: UserId,
    /// What it records.
    pub kind: EntryKind,
    /// Signed: negative takes credits away.
    pub amount: i64,
    /// The balance right after it.
    pub balance_after: i64,
    /// The app it is written for.
    pub app_name: AppName,
    /// Why, for people.
    pub description: Option<String>,
    /// The reservation's key, for deduct, refund and settle entries (and
    /// the expire or void entry of a refund that met a closed lot).
    pub project_code: Option<ProjectCode>,
    /// A grant's or a refund's reference.
    pub reference: Option<String>,
    /// The request id, carried to the entry's audit job.
    pub correlation_id: Option<String>,
    /// The id of the API key that asked for it (admin routes, the
    /// console), recorded on the entry and covered by its link.
    pub acted_by: Option<String>,
}

/// One `lot_movements` row, naming its entry by its place in the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// The entry's place in [`Plan::entries`].
    pub entry: usize,
    /// Whose lot.
    pub user_id: UserId,
    /// The lot.
    pub lot_id: i64,
    /// The entry's kind, or `expire`/`void` for the part of a refund that
    /// meets a closed lot.
    pub kind: EntryKind,
    /// Signed amount of the lot moved.
    pub amount: i64,
    /// The reservation it is about.
    pub reservation: Option<(AppName, ProjectCode)>,
}

/// A lot's change in a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LotChange {
    /// What its `remaining` moves by.
    pub delta: i64,
    /// Closed (`expired` or `voided`) by the plan.
    pub close: Option<LotStatus>,
}

/// A reservation to claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReservation {
    /// Its key.
    pub user_id: UserId,
    /// Its app.
    pub app_name: AppName,
    /// Its code.
    pub project_code: ProjectCode,
    /// Credits it takes.
    pub amount: i64,
    /// What for.
    pub description: Option<String>,
    /// The balance right after the deduction.
    pub balance_after: i64,
    /// Until when it may be refunded.
    pub refundable_until: OffsetDateTime,
}

/// A reservation's new state: every column a movement may change, written
/// as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationChange {
    /// Whose.
    pub user_id: UserId,
    /// Its app.
    pub app_name: AppName,
    /// Its code.
    pub project_code: ProjectCode,
    /// Its state.
    pub state: ReservationState,
    /// Credits given back by all its refunds.
    pub refunded: i64,
    /// When it was settled.
    pub settled_at: Option<OffsetDateTime>,
    /// Why.
    pub settle_reason: Option<String>,
    /// Why it was settled.
    pub settled_by: Option<SettledBy>,
    /// When the refund that completed it was made.
    pub refunded_at: Option<OffsetDateTime>,
    /// Why.
    pub refund_reason: Option<String>,
    /// The balance right after that refund.
    pub balance_after_refund: Option<i64>,
}

/// A lot a grant makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLot {
    /// Its grant entry's place in [`Plan::entries`].
    pub entry: usize,
    /// Whose.
    pub user_id: UserId,
    /// Its category.
    pub category: LotCategory,
    /// Its priority.
    pub priority: i32,
    /// Credits in it.
    pub amount: i64,
    /// When they expire.
    pub expires_at: Option<OffsetDateTime>,
    /// The grant's app.
    pub app_name: AppName,
    /// The grant's reference.
    pub reference: String,
    /// The recurring allowance it is a period's grant of (named by its
    /// `credits.granted` event).
    pub allowance_id: Option<String>,
}

/// Everything one transaction writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Ledger entries, in order (ids grow with the balances they show).
    pub entries: Vec<NewEntry>,
    /// Lot movements.
    pub moves: Vec<Move>,
    /// Lot changes, by (user, lot).
    pub lots: BTreeMap<(UserId, i64), LotChange>,
    /// Lots granted.
    pub new_lots: Vec<NewLot>,
    /// Reservations claimed.
    pub reservations: Vec<NewReservation>,
    /// Reservations changed.
    pub changes: Vec<ReservationChange>,
    /// Events recorded.
    pub events: Vec<HandledEvent>,
    /// Spending changes (deductions, what is given back), written for the
    /// users with a spend limit (`crate::limits`).
    pub spend: Vec<crate::limits::SpendDelta>,
    /// Entries that belong to the step of the entry before them (of the
    /// same user): the `expire` or `void` entry that takes back at once what
    /// a refund gave to a closed lot. A step is what the events out judge a
    /// balance's crossing on (`crate::events_out`): its transient rise and
    /// fall are not two moves.
    pub joined: BTreeSet<usize>,
}

impl Plan {
    /// Whether it writes nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.moves.is_empty()
            && self.lots.is_empty()
            && self.new_lots.is_empty()
            && self.reservations.is_empty()
            && self.changes.is_empty()
            && self.events.is_empty()
            && self.spend.is_empty()
    }

    /// Adds `entry`; returns its place.
    pub fn entry(&mut self, entry: NewEntry) -> usize {
        self.entries.push(entry);
        self.entries.len() - 1
    }

    /// Records that entry `entry` moves `amount` of lot `lot_id`, changing
    /// the lot's `remaining` by `delta`.
    #[allow(clippy::too_many_arguments)]
    pub fn moves(
        &mut self,
        entry: usize,
        user_id: &UserId,
        lot_id: i64,
        kind: EntryKind,
        amount: i64,
        delta: i64,
        reservation: Option<(&AppName, &ProjectCode)>,
    ) {
        self.moves.push(Move {
            entry,
            user_id: user_id.clone(),
            lot_id,
            kind,
            amount,
            reservation: reservation.map(|(a, c)| (a.clone(), c.clone())),
        });
        if delta != 0 {
            self.lots
                .entry((user_id.clone(), lot_id))
                .or_default()
                .delta += delta;
        }
    }

    /// Marks lot `lot_id` expired or voided.
    pub fn close(&mut self, user_id: &UserId, lot_id: i64, how: LotStatus) {
        self.lots
            .entry((user_id.clone(), lot_id))
            .or_default()
            .close = Some(how);
    }

    /// Expires `user`'s lots past their expiry at `now` (removing them from
    /// `lots`): one `expire` entry per app, before any other entry of the
    /// user in this plan; lowers `balance` by what expires. Returns how many
    /// credits expired.
    pub fn expire_due(
        &mut self,
        user: &UserId,
        lots: &mut Vec<Lot>,
        balance: &mut i64,
        now: OffsetDateTime,
        correlation_id: Option<&str>,
    ) -> Result<i64, DbError> {
        let (due, keep): (Vec<Lot>, Vec<Lot>) = lots
            .drain(..)
            .partition(|l| l.due_at(now) && l.remaining > 0);
        *lots = keep;
        let mut by_app: BTreeMap<String, Vec<Lot>> = BTreeMap::new();
        for lot in due {
            by_app
                .entry(lot.app_name.to_string())
                .or_default()
                .push(lot);
        }
        let mut expired = 0;
        for app_lots in by_app.values() {
            let total: i64 = app_lots.iter().map(|l| l.remaining).sum();
            *balance = balance
                .checked_sub(total)
                .filter(|b| *b >= 0)
                .ok_or_else(|| {
                    DbError::Invariant(format!("{user}: lots hold more than the balance"))
                })?;
            expired += total;
            let at = self.entry(NewEntry {
                user_id: user.clone(),
                kind: EntryKind::Expire,
                amount: -total,
                balance_after: *balance,
                app_name: app_lots[0].app_name.clone(),
                description: Some("credits expired".into()),
                project_code: None,
                reference: None,
                correlation_id: correlation_id.map(str::to_owned),
                acted_by: None,
            });
            for lot in app_lots {
                self.moves(
                    at,
                    user,
                    lot.lot_id,
                    EntryKind::Expire,
                    -lot.remaining,
                    -lot.remaining,
                    None,
                );
                self.close(user, lot.lot_id, LotStatus::Expired);
            }
        }
        Ok(expired)
    }

    /// Expires the lots past their expiry of every account `users` names (in
    /// the order first named, each once, `correlation_id` of the request that
    /// names it first) before anything else of the plan, and checks that the
    /// lots hold the balance. Returns what each account can spend then, with
    /// its spendable lots in burn-down order; a user without an account is
    /// left out.
    pub fn expire_all<'s>(
        &mut self,
        snap: &'s Snapshot,
        users: impl IntoIterator<Item = (&'s UserId, Option<&'s str>)>,
    ) -> Result<BTreeMap<&'s UserId, (i64, Vec<Lot>)>, DbError> {
        let mut out = BTreeMap::new();
        for (user, correlation_id) in users {
            if out.contains_key(user) {
                continue;
            }
            let Some(account) = snap.accounts.get(user) else {
                continue;
            };
            let mut balance = account.balance;
            let mut lots = account.lots.clone();
            self.expire_due(user, &mut lots, &mut balance, snap.now, correlation_id)?;
            let held: i64 = lots.iter().map(|l| l.remaining).sum();
            if held != balance {
                return Err(DbError::Invariant(format!(
                    "{user}: lots hold {held} credits, the balance is {balance}"
                )));
            }
            out.insert(user, (balance, lots));
        }
        Ok(out)
    }

    /// Gives `ret.amount` of a reservation back to the lots it drew from
    /// (`drawn`, in burn-down order; the last drawn first): a `refund`
    /// entry, then, for the parts that meet an expired or voided lot, an
    /// `expire` or `void` entry taking them away again at once. Moves
    /// `balance` by what becomes spendable, and the `returned` of `drawn`.
    pub fn give_back(
        &mut self,
        ret: Returned<'_>,
        drawn: &mut [Drawn],
        balance: &mut i64,
    ) -> Result<(), DbError> {
        let reservation = Some((ret.app, ret.code));
        *balance = balance
            .checked_add(ret.amount)
            .ok_or_else(|| DbError::Invariant("a refund overflows the balance".into()))?;
        let entry = |kind: EntryKind, amount, balance_after, description: Option<&str>| NewEntry {
            user_id: ret.user.clone(),
            kind,
            amount,
            balance_after,
            app_name: ret.app.clone(),
            description: description.map(str::to_owned),
            project_code: Some(ret.code.clone()),
            reference: if kind == EntryKind::Refund {
                ret.reference.map(str::to_owned)
            } else {
                None
            },
            correlation_id: ret.correlation_id.map(str::to_owned),
            acted_by: ret.acted_by.map(str::to_owned),
        };
        let refund_at = self.entry(entry(EntryKind::Refund, ret.amount, *balance, ret.reason));
        self.spend.push(crate::limits::SpendDelta {
            user_id: ret.user.clone(),
            app_name: ret.app.clone(),
            day: crate::limits::day_of(ret.made_at),
            delta: -ret.amount,
        });
        let parts = split_back(drawn, ret.amount);
        let given: i64 = parts.iter().map(|(_, p)| p).sum();
        if given != ret.amount {
            return Err(DbError::Invariant(format!(
                "reservation ({}, {}) of {}: its lots took {} less than the refund of {}",
                ret.app,
                ret.code,
                ret.user,
                ret.amount - given,
                ret.amount
            )));
        }
        let mut closed = [
            (EntryKind::Expire, LotFate::Expired, 0),
            (EntryKind::Void, LotFate::Voided, 0),
        ];
        for &(i, part) in &parts {
            let d = &mut drawn[i];
            d.returned += part;
            let delta = if d.fate == LotFate::Open { part } else { 0 };
            self.moves(
                refund_at,
                ret.user,
                d.lot_id,
                EntryKind::Refund,
                part,
                delta,
                reservation,
            );
            for c in closed.iter_mut().filter(|c| c.1 == d.fate) {
                c.2 += part;
            }
        }
        for (kind, fate, total) in closed {
            if total == 0 {
                continue;
            }
            *balance -= total;
            let description = match kind {
                EntryKind::Void => "refund to a voided lot",
                _ => "refund to an expired lot",
            };
            let at = self.entry(entry(kind, -total, *balance, Some(description)));
            self.joined.insert(at);
            for &(i, part) in parts.iter().filter(|(i, _)| drawn[*i].fate == fate) {
                self.moves(at, ret.user, drawn[i].lot_id, kind, -part, 0, reservation);
            }
        }
        Ok(())
    }
}

/// Credits given back to a reservation's lots ([`Plan::give_back`]).
#[derive(Debug, Clone, Copy)]
pub struct Returned<'a> {
    /// Whose reservation.
    pub user: &'a UserId,
    /// Its app.
    pub app: &'a AppName,
    /// Its code.
    pub code: &'a ProjectCode,
    /// How many credits.
    pub amount: i64,
    /// Why.
    pub reason: Option<&'a str>,
    /// The refund's reference.
    pub reference: Option<&'a str>,
    /// The request id.
    pub correlation_id: Option<&'a str>,
    /// The id of the API key that asked for it.
    pub acted_by: Option<&'a str>,
    /// When the reservation was made: what is given back frees room in
    /// the spend limits' periods of that instant.
    pub made_at: OffsetDateTime,
}

/// Takes `amount` from `lots` (in burn-down order, due ones at `now`
/// skipped), lowering their `remaining`. The caller has checked the lots
/// cover it.
pub fn draw(lots: &mut [Lot], mut amount: i64, now: OffsetDateTime) -> Vec<Allocation> {
    let mut taken = Vec::new();
    for lot in lots
        .iter_mut()
        .filter(|l| !l.due_at(now) && l.remaining > 0)
    {
        if amount == 0 {
            break;
        }
        let part = amount.min(lot.remaining);
        lot.remaining -= part;
        amount -= part;
        taken.push(Allocation {
            lot_id: lot.lot_id,
            amount: part,
        });
    }
    taken
}

/// Splits `amount` given back over the lots a reservation drew from (in
/// burn-down order in `drawn`): the last drawn first. Returns (index in
/// `drawn`, part).
pub fn split_back(drawn: &[Drawn], mut amount: i64) -> Vec<(usize, i64)> {
    let mut parts = Vec::new();
    for (i, d) in drawn.iter().enumerate().rev() {
        if amount == 0 {
            break;
        }
        let part = amount.min(d.drawn - d.returned);
        if part > 0 {
            parts.push((i, part));
            amount -= part;
        }
    }
    parts
}

/// What [`apply`] wrote that the database chose.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Each entry's id and time, in order.
    pub entries: Vec<(i64, OffsetDateTime)>,
    /// Each new lot's id, in order.
    pub lots: Vec<i64>,
}

/// Writes `plan` ([`apply`]) and commits `tx`; an empty plan writes
/// nothing, and `tx` (which only locked and read) is rolled back. Returns
/// what was written, `None` for nothing.
pub async fn commit(
    tx: deadpool_postgres::Transaction<'_>,
    plan: &Plan,
    snap: &Snapshot,
) -> Result<Option<Applied>, DbError> {
    if plan.is_empty() {
        tx.rollback().await?;
        return Ok(None);
    }
    let applied = apply(&tx, plan, snap).await?;
    tx.commit().await?;
    Ok(Some(applied))
}

/// Writes `plan`, decided against `snap`, in the caller's transaction,
/// where every account an entry names is locked: the balances, the entries
/// with their audit jobs, the new lots, the lot movements and changes, the
/// reservations claimed and changed, the events recorded, and the events
/// out it implies (`crate::events_out`; no statement when there are none).
pub async fn apply(tx: &Transaction<'_>, plan: &Plan, snap: &Snapshot) -> Result<Applied, DbError> {
    // Ids taken with the snapshot's reads (one round trip fewer), and more
    // when the plan needs more: all taken under the locks, so ascending.
    let n = plan.entries.len();
    let mut ids: Vec<i64> = snap.ids.iter().copied().take(n).collect();
    if ids.len() < n {
        ids.extend(crate::tables::entries::next_ids(tx, n - ids.len()).await?);
    }
    let chained = chain_entries(plan, snap, &ids)?;
    let entries: Vec<(i64, OffsetDateTime)> = ids.iter().map(|&id| (id, snap.stamp)).collect();
    let moves: Vec<accounts::Move<'_>> = chained
        .heads
        .iter()
        .map(|(user, h)| accounts::Move {
            user_id: user,
            delta: h.delta,
            from_seq: h.from_seq,
            seq: h.seq,
            hash: &h.hash,
        })
        .collect();
    let limited: Vec<crate::limits::SpendDelta> = plan
        .spend
        .iter()
        .filter(|d| {
            snap.accounts
                .get(&d.user_id)
                .is_some_and(|a| a.spending.is_some())
        })
        .cloned()
        .collect();
    // The statements are independent of each other (no foreign key between
    // their rows; every id is known): they go to the server together, one
    // round trip, in this order (tokio-postgres pipelines a connection's
    // concurrent queries in the order they are first polled).
    let (_, _, lots, _, _, _, _, _, _) = tokio::try_join!(
        accounts::move_balances(tx, &moves),
        write_entries(tx, &plan.entries, &ids, &chained, snap.stamp),
        write_new_lots(tx, &plan.new_lots, &entries),
        write_moves(tx, &plan.moves, &entries),
        write_lot_changes(tx, &plan.lots),
        claim_reservations(tx, &plan.reservations),
        change_reservations(tx, &plan.changes),
        record_events(tx, &plan.events),
        crate::tables::limits::record(tx, &limited),
    )?;
    let out = crate::events_out::derive(plan, snap, &lots, crate::events_out::default_threshold());
    crate::events_out::write(tx, &out, snap.now).await?;
    Ok(Applied { entries, lots })
}

/// A user's chain as a plan leaves it.
#[derive(Debug, Clone)]
struct ChainEnd {
    /// The sum of the user's entries' amounts.
    delta: i64,
    /// The head's seq under the lock.
    from_seq: i64,
    /// The last link's seq.
    seq: i64,
    /// The last link's hash.
    hash: Vec<u8>,
    /// The user's entries, in chain order.
    entry_ids: Vec<i64>,
}

/// The plan's entries chained: each one's link, and each user's new head.
#[derive(Debug, Clone, Default)]
struct Chained {
    links: Vec<crate::chain::Link>,
    heads: BTreeMap<String, ChainEnd>,
}

/// Chains `plan`'s entries (ids `ids`, time `snap.stamp`) onto their users'
/// heads in `snap`, in plan order. Pure.
fn chain_entries(plan: &Plan, snap: &Snapshot, ids: &[i64]) -> Result<Chained, DbError> {
    let stamp = penora_domain::timefmt::rfc3339_millis(snap.stamp);
    let mut out = Chained::default();
    for (e, &id) in plan.entries.iter().zip(ids) {
        let end = match out.heads.get_mut(e.user_id.as_str()) {
            Some(end) => end,
            None => {
                let head = snap
                    .accounts
                    .get(&e.user_id)
                    .map(|a| a.chain.clone())
                    .ok_or_else(|| {
                        DbError::Invariant(format!(
                            "{}: an entry for an unlocked account",
                            e.user_id
                        ))
                    })?;
                out.heads.entry(e.user_id.to_string()).or_insert(ChainEnd {
                    delta: 0,
                    from_seq: head.seq,
                    seq: head.seq,
                    hash: head.prev().to_vec(),
                    entry_ids: Vec::new(),
                })
            }
        };
        let seq = end.seq + 1;
        let content = crate::chain::Content {
            entry_id: id,
            seq,
            user_id: e.user_id.as_str(),
            kind: e.kind.as_str(),
            amount: e.amount,
            balance_after: e.balance_after,
            app_name: e.app_name.as_str(),
            description: e.description.as_deref(),
            project_code: e.project_code.as_ref().map(ProjectCode::as_str),
            reference: e.reference.as_deref(),
            created_at: stamp.clone(),
            acted_by: e.acted_by.as_deref(),
        };
        let hash = crate::chain::hash_of(&content, &end.hash)?.to_vec();
        out.links.push(crate::chain::Link {
            seq,
            prev: std::mem::replace(&mut end.hash, hash.clone()),
            hash,
        });
        end.seq = seq;
        end.delta = end
            .delta
            .checked_add(e.amount)
            .ok_or_else(|| DbError::Invariant(format!("{}: a batch total overflows", e.user_id)))?;
        end.entry_ids.push(id);
    }
    Ok(out)
}

/// Writes `entries` in order, with their ids, time and chain links, and the
/// commit's one `ledger-audit` job naming them all, in two statements.
async fn write_entries(
    tx: &Transaction<'_>,
    entries: &[NewEntry],
    ids: &[i64],
    chained: &Chained,
    stamp: OffsetDateTime,
) -> Result<(), DbError> {
    if entries.is_empty() {
        return Ok(());
    }
    let users: Vec<&str> = entries.iter().map(|e| e.user_id.as_str()).collect();
    let kinds: Vec<&str> = entries.iter().map(|e| e.kind.as_str()).collect();
    let amounts: Vec<i64> = entries.iter().map(|e| e.amount).collect();
    let after: Vec<i64> = entries.iter().map(|e| e.balance_after).collect();
    let apps: Vec<&str> = entries.iter().map(|e| e.app_name.as_str()).collect();
    let descriptions: Vec<Option<&str>> =
        entries.iter().map(|e| e.description.as_deref()).collect();
    let codes: Vec<Option<&str>> = entries
        .iter()
        .map(|e| e.project_code.as_ref().map(ProjectCode::as_str))
        .collect();
    let references: Vec<Option<&str>> = entries.iter().map(|e| e.reference.as_deref()).collect();
    let actors: Vec<Option<&str>> = entries.iter().map(|e| e.acted_by.as_deref()).collect();
    let seqs: Vec<i64> = chained.links.iter().map(|l| l.seq).collect();
    let prevs: Vec<&[u8]> = chained.links.iter().map(|l| l.prev.as_slice()).collect();
    let hashes: Vec<&[u8]> = chained.links.iter().map(|l| l.hash.as_slice()).collect();
    let insert = tx
        .prepare_cached(
            "INSERT INTO ledger_entries \
               (id, user_id, kind, amount, balance_after, app_name, description, project_code, reference, \
                created_at, chain_seq, prev_hash, hash, acted_by) \
             OVERRIDING SYSTEM VALUE \
             SELECT v.id, v.user_id, v.kind, v.amount, v.balance_after, v.app_name, v.description, \
                    v.project_code, v.reference, $10, v.seq, v.prev, v.hash, v.actor \
             FROM unnest($1::int8[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::text[], \
                         $7::text[], $8::text[], $9::text[], $11::int8[], $12::bytea[], $13::bytea[], \
                         $14::text[]) \
               AS v(id, user_id, kind, amount, balance_after, app_name, description, project_code, \
                    reference, seq, prev, hash, actor)",
        )
        .await?;
    let params: [&(dyn ToSql + Sync); 14] = [
        &ids,
        &users,
        &kinds,
        &amounts,
        &after,
        &apps,
        &descriptions,
        &codes,
        &references,
        &stamp,
        &seqs,
        &prevs,
        &hashes,
        &actors,
    ];
    let job = LedgerAuditCommit {
        chains: chained
            .heads
            .iter()
            .map(|(user, end)| CommittedChain {
                user_id: user.clone(),
                entry_ids: end.entry_ids.clone(),
                seq: end.seq,
            })
            .collect(),
    };
    let jobs = [outbox::Job {
        user_id: entries[0].user_id.as_str(),
        routing_key: LEDGER_AUDIT,
        payload: serde_json::to_value(&job)
            .map_err(|err| DbError::Other(format!("job encoding: {err}")))?,
        correlation_id: entries.iter().find_map(|e| e.correlation_id.as_deref()),
    }];
    let (written, _) = tokio::try_join!(
        tx.execute(&insert, &params).map_err(DbError::from),
        outbox::enqueue_jobs(tx, &jobs),
    )?;
    if written != entries.len() as u64 {
        return Err(DbError::Invariant(
            "a ledger row of the batch was not written".into(),
        ));
    }
    Ok(())
}

/// Makes the lots of the grants, with the grant's lot movement. Returns
/// their ids, in order.
async fn write_new_lots(
    tx: &Transaction<'_>,
    lots: &[NewLot],
    entries: &[(i64, OffsetDateTime)],
) -> Result<Vec<i64>, DbError> {
    let stmt = if lots.is_empty() {
        return Ok(Vec::new());
    } else {
        tx.prepare_cached(
            "WITH lot AS ( \
               INSERT INTO credit_lots \
                 (user_id, category, priority, granted, remaining, expires_at, app_name, reference) \
               VALUES ($1, $2, $3, $4, $4, $5, $6, $7) RETURNING user_id, lot_id) \
             INSERT INTO lot_movements (user_id, lot_id, entry_id, kind, amount) \
             SELECT user_id, lot_id, $8, 'grant', $4 FROM lot RETURNING lot_id",
        )
        .await?
    };
    let mut ids = Vec::with_capacity(lots.len());
    for l in lots {
        let entry_id = entries
            .get(l.entry)
            .map(|e| e.0)
            .ok_or_else(|| DbError::Invariant("a lot names no entry".into()))?;
        let row = tx
            .query_one(
                &stmt,
                &[
                    &l.user_id,
                    &l.category,
                    &l.priority,
                    &l.amount,
                    &l.expires_at,
                    &l.app_name,
                    &l.reference,
                    &entry_id,
                ],
            )
            .await?;
        ids.push(row.try_get("lot_id")?);
    }
    Ok(ids)
}

async fn write_moves(
    tx: &Transaction<'_>,
    moves: &[Move],
    entries: &[(i64, OffsetDateTime)],
) -> Result<(), DbError> {
    if moves.is_empty() {
        return Ok(());
    }
    let users: Vec<&str> = moves.iter().map(|m| m.user_id.as_str()).collect();
    let lots: Vec<i64> = moves.iter().map(|m| m.lot_id).collect();
    let mut ids = Vec::with_capacity(moves.len());
    for m in moves {
        ids.push(
            entries
                .get(m.entry)
                .map(|e| e.0)
                .ok_or_else(|| DbError::Invariant("a lot movement names no entry".into()))?,
        );
    }
    let kinds: Vec<&str> = moves.iter().map(|m| m.kind.as_str()).collect();
    let amounts: Vec<i64> = moves.iter().map(|m| m.amount).collect();
    let apps: Vec<Option<&str>> = moves
        .iter()
        .map(|m| m.reservation.as_ref().map(|r| r.0.as_str()))
        .collect();
    let codes: Vec<Option<&str>> = moves
        .iter()
        .map(|m| m.reservation.as_ref().map(|r| r.1.as_str()))
        .collect();
    let insert = tx
        .prepare_cached(
            "INSERT INTO lot_movements (user_id, lot_id, entry_id, kind, amount, app_name, project_code) \
             SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[], $5::int8[], $6::text[], $7::text[])",
        )
        .await?;
    tx.execute(
        &insert,
        &[&users, &lots, &ids, &kinds, &amounts, &apps, &codes],
    )
    .await?;
    Ok(())
}

async fn write_lot_changes(
    tx: &Transaction<'_>,
    changes: &BTreeMap<(UserId, i64), LotChange>,
) -> Result<(), DbError> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut users = Vec::with_capacity(changes.len());
    let mut ids = Vec::with_capacity(changes.len());
    let mut deltas = Vec::with_capacity(changes.len());
    let mut closing = Vec::with_capacity(changes.len());
    for ((user, id), change) in changes {
        users.push(user.as_str());
        ids.push(*id);
        deltas.push(change.delta);
        closing.push(change.close.is_some());
    }
    // (No CASE or COALESCE around now(): Citus refuses them in a
    // distributed UPDATE; the closes are a statement of their own.)
    let update = tx
        .prepare_cached(&format!(
            "UPDATE credit_lots l SET remaining = l.remaining + v.delta \
             FROM unnest($1::text[], $2::int8[], $3::int8[], $4::bool[]) AS v(user_id, lot_id, delta, closing) \
             WHERE l.user_id = v.user_id AND l.lot_id = v.lot_id AND l.user_id = ANY($1) \
               AND l.status = 'active' AND l.remaining + v.delta >= 0 \
               AND (v.delta >= 0 OR v.closing OR {})",
            crate::tables::lots::NOT_DUE_L,
        ))
        .await?;
    if tx
        .execute(&update, &[&users, &ids, &deltas, &closing])
        .await?
        != changes.len() as u64
    {
        return Err(DbError::Invariant(
            "a lot change did not apply (lot closed, past its expiry, or short)".into(),
        ));
    }
    let (mut users, mut ids, mut how) = (Vec::new(), Vec::new(), Vec::new());
    for ((user, id), change) in changes {
        if let Some(close) = change.close {
            users.push(user.as_str());
            ids.push(*id);
            how.push(close.as_str());
        }
    }
    if !users.is_empty() {
        let close = tx
            .prepare_cached(
                "UPDATE credit_lots l SET status = v.how, closed_at = now() \
                 FROM unnest($1::text[], $2::int8[], $3::text[]) AS v(user_id, lot_id, how) \
                 WHERE l.user_id = v.user_id AND l.lot_id = v.lot_id AND l.user_id = ANY($1) \
                   AND l.status = 'active'",
            )
            .await?;
        if tx.execute(&close, &[&users, &ids, &how]).await? != users.len() as u64 {
            return Err(DbError::Invariant(
                "a lot to close was closed already".into(),
            ));
        }
    }
    Ok(())
}

/// Claims the reservations (in key order, so two batches claiming
/// overlapping keys wait for each other instead of deadlocking).
async fn claim_reservations(
    tx: &Transaction<'_>,
    claims: &[NewReservation],
) -> Result<(), DbError> {
    if claims.is_empty() {
        return Ok(());
    }
    let apps: Vec<&str> = claims.iter().map(|c| c.app_name.as_str()).collect();
    let codes: Vec<&str> = claims.iter().map(|c| c.project_code.as_str()).collect();
    let users: Vec<&str> = claims.iter().map(|c| c.user_id.as_str()).collect();
    let amounts: Vec<i64> = claims.iter().map(|c| c.amount).collect();
    let descriptions: Vec<Option<&str>> = claims.iter().map(|c| c.description.as_deref()).collect();
    let after: Vec<i64> = claims.iter().map(|c| c.balance_after).collect();
    let until: Vec<OffsetDateTime> = claims.iter().map(|c| c.refundable_until).collect();
    let claim = tx
        .prepare_cached(
            "INSERT INTO reservations \
               (app_name, project_code, user_id, amount, description, balance_after_deduct, refundable_until) \
             SELECT v.app_name, v.project_code, v.user_id, v.amount, v.description, v.balance_after, v.until \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int8[], $7::timestamptz[]) \
               AS v(app_name, project_code, user_id, amount, description, balance_after, until) \
             ORDER BY v.user_id, v.app_name, v.project_code \
             ON CONFLICT (user_id, app_name, project_code) DO NOTHING",
        )
        .await?;
    let params: [&(dyn ToSql + Sync); 7] = [
        &apps,
        &codes,
        &users,
        &amounts,
        &descriptions,
        &after,
        &until,
    ];
    if tx.execute(&claim, &params).await? != claims.len() as u64 {
        // A concurrent batch took one of these keys since it was read.
        return Err(DbError::Conflict(
            "a key of the batch was claimed concurrently".into(),
        ));
    }
    Ok(())
}

async fn change_reservations(
    tx: &Transaction<'_>,
    changes: &[ReservationChange],
) -> Result<(), DbError> {
    if changes.is_empty() {
        return Ok(());
    }
    let users: Vec<&str> = changes.iter().map(|c| c.user_id.as_str()).collect();
    let apps: Vec<&str> = changes.iter().map(|c| c.app_name.as_str()).collect();
    let codes: Vec<&str> = changes.iter().map(|c| c.project_code.as_str()).collect();
    let states: Vec<&str> = changes.iter().map(|c| c.state.as_str()).collect();
    let refunded: Vec<i64> = changes.iter().map(|c| c.refunded).collect();
    let settled_at: Vec<Option<OffsetDateTime>> = changes.iter().map(|c| c.settled_at).collect();
    let settle_reasons: Vec<Option<&str>> =
        changes.iter().map(|c| c.settle_reason.as_deref()).collect();
    let settled_by: Vec<Option<&str>> = changes
        .iter()
        .map(|c| c.settled_by.map(SettledBy::as_str))
        .collect();
    let refunded_at: Vec<Option<OffsetDateTime>> = changes.iter().map(|c| c.refunded_at).collect();
    let refund_reasons: Vec<Option<&str>> =
        changes.iter().map(|c| c.refund_reason.as_deref()).collect();
    let after_refund: Vec<Option<i64>> = changes.iter().map(|c| c.balance_after_refund).collect();
    let update = tx
        .prepare_cached(
            "UPDATE reservations r SET state = v.state, refunded_amount = v.refunded, \
                    settled_at = v.settled_at, settle_reason = v.settle_reason, settled_by = v.settled_by, \
                    refunded_at = v.refunded_at, refund_reason = v.refund_reason, \
                    balance_after_refund = v.after_refund \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::timestamptz[], \
                         $7::text[], $8::text[], $9::timestamptz[], $10::text[], $11::int8[]) \
               AS v(user_id, app_name, project_code, state, refunded, settled_at, settle_reason, \
                    settled_by, refunded_at, refund_reason, after_refund) \
             WHERE r.user_id = v.user_id AND r.app_name = v.app_name AND r.project_code = v.project_code \
               AND r.user_id = ANY($1)",
        )
        .await?;
    let params: [&(dyn ToSql + Sync); 11] = [
        &users,
        &apps,
        &codes,
        &states,
        &refunded,
        &settled_at,
        &settle_reasons,
        &settled_by,
        &refunded_at,
        &refund_reasons,
        &after_refund,
    ];
    if tx.execute(&update, &params).await? != changes.len() as u64 {
        return Err(DbError::Invariant(
            "a reservation of the batch did not change".into(),
        ));
    }
    Ok(())
}

async fn record_events(tx: &Transaction<'_>, events: &[HandledEvent]) -> Result<(), DbError> {
    if events.is_empty() {
        return Ok(());
    }
    crate::tables::events::record(tx, events).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use penora_domain::AppName;

    fn at(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + seconds).expect("a valid instant")
    }

    fn lot(id: i64, remaining: i64, expires_at: Option<OffsetDateTime>) -> Lot {
        Lot {
            lot_id: id,
            remaining,
            app_name: AppName::penora(),
            category: LotCategory::Paid,
            priority: 50,
            expires_at,
            created_at: at(-100 + id),
        }
    }

    #[test]
    fn a_draw_spans_lots_in_order_and_skips_due_ones() {
        let now = at(0);
        let mut lots = vec![
            lot(1, 3, None),
            lot(2, 5, Some(now)),
            lot(3, 4, None),
            lot(4, 9, None),
        ];
        let taken = draw(&mut lots, 9, now);
        let parts: Vec<(i64, i64)> = taken.iter().map(|a| (a.lot_id, a.amount)).collect();
        assert_eq!(parts, vec![(1, 3), (3, 4), (4, 2)]);
        assert_eq!(
            lots.iter().map(|l| l.remaining).collect::<Vec<_>>(),
            [0, 5, 0, 7]
        );
    }

    #[test]
    fn a_plan_that_only_closes_a_lot_is_not_empty() {
        // A void of a lot with nothing left writes no entry, but the lot
        // must still be closed (found by the model: the void was answered
        // and rolled back).
        let user = UserId::parse("u1").expect("a valid user id");
        let mut plan = Plan::default();
        assert!(plan.is_empty());
        plan.close(&user, 7, LotStatus::Voided);
        assert!(!plan.is_empty());
    }

    #[test]
    fn giving_back_starts_with_the_last_lot_drawn() {
        let d = |id, drawn, returned| Drawn {
            lot_id: id,
            drawn,
            returned,
            fate: LotFate::Open,
        };
        let drawn = vec![d(1, 3, 0), d(3, 4, 0), d(4, 2, 1)];
        let parts: Vec<(i64, i64)> = split_back(&drawn, 5)
            .iter()
            .map(|&(i, p)| (drawn[i].lot_id, p))
            .collect();
        assert_eq!(parts, vec![(4, 1), (3, 4)]);
    }

    #[test]
    fn due_lots_expire_in_one_entry_per_app_before_anything_else() {
        let now = at(0);
        let user = UserId::parse("u1").expect("a valid user id");
        let mut other = lot(3, 2, Some(at(-1)));
        other.app_name = AppName::imagegene();
        let mut lots = vec![lot(1, 5, Some(now)), lot(2, 7, None), other];
        let mut balance = 14;
        let mut plan = Plan::default();
        let expired = plan
            .expire_due(&user, &mut lots, &mut balance, now, None)
            .expect("the lots fit the balance");
        assert_eq!((expired, balance), (7, 7));
        assert_eq!(lots.iter().map(|l| l.lot_id).collect::<Vec<_>>(), [2]);
        let entries: Vec<(&str, i64, i64)> = plan
            .entries
            .iter()
            .map(|e| (e.app_name.as_str(), e.amount, e.balance_after))
            .collect();
        assert_eq!(entries, vec![("imagegene", -2, 12), ("penora", -5, 7)]);
        assert!(
            plan.lots
                .values()
                .all(|c| c.close == Some(LotStatus::Expired))
        );
    }

    #[test]
    fn a_refund_to_a_closed_lot_is_taken_away_again_at_once() {
        let user = UserId::parse("u1").expect("a valid user id");
        let app = AppName::imagegene();
        let code = ProjectCode::parse("p1").expect("a valid code");
        let mut drawn = vec![
            Drawn {
                lot_id: 1,
                drawn: 4,
                returned: 0,
                fate: LotFate::Open,
            },
            Drawn {
                lot_id: 2,
                drawn: 6,
                returned: 0,
                fate: LotFate::Voided,
            },
        ];
        let mut balance = 10;
        let mut plan = Plan::default();
        plan.give_back(
            Returned {
                user: &user,
                app: &app,
                code: &code,
                amount: 8,
                reason: Some("failed"),
                reference: Some("r1"),
                correlation_id: None,
                made_at: OffsetDateTime::UNIX_EPOCH,
                acted_by: None,
            },
            &mut drawn,
            &mut balance,
        )
        .expect("the lots took the refund");
        // 6 back to the voided lot (voided again), 2 to the open one.
        assert_eq!(balance, 12);
        let entries: Vec<(EntryKind, i64, i64)> = plan
            .entries
            .iter()
            .map(|e| (e.kind, e.amount, e.balance_after))
            .collect();
        assert_eq!(
            entries,
            vec![(EntryKind::Refund, 8, 18), (EntryKind::Void, -6, 12)]
        );
        assert_eq!(drawn.iter().map(|d| d.returned).collect::<Vec<_>>(), [2, 6]);
        assert_eq!(plan.lots.len(), 1, "only the open lot changes");
    }
}
