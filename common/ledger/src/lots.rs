//! Credit lots (contract §12): what every movement does to the lots it
//! touches.
//!
//! A movement's transaction has locked the user's account before it reads or
//! changes a lot (every writer does), so lots are read without a lock of
//! their own. Rules:
//! * **burn-down order**: lots with credits left and not past their expiry,
//!   by `priority`, then `expires_at` (soonest first, never last), then
//!   promotional before paid, then oldest first ([`SPENDABLE_ORDER`]);
//! * **exact expiry**: from `expires_at` on a lot is not spendable; the first
//!   movement of its user after that (or the worker's timer, whichever comes
//!   first) writes its `expire` entry, before anything else in that
//!   transaction, so a movement's `balance_after` is always what the user can
//!   spend;
//! * **refunds go back where they came from**: to the lots the deduction
//!   drew from, the last drawn first (so a partial refund gives back the
//!   credits that last longest); a part whose lot has expired or been voided
//!   is expired or voided at once, in the same transaction;
//! * every change is recorded: each ledger entry that moves credits has one
//!   `lot_movements` row per lot, summing to its amount; the lots' changes
//!   are one guarded `UPDATE` (no draw from a lot past its expiry, no lot
//!   below zero), checked to apply to every lot.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
};

use deadpool_postgres::Transaction;
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::{NewEntry, move_balances, write_entries};
use penora_domain::EntryKind;
use penora_store::DbError;

/// `ORDER BY` of the burn-down order, over `credit_lots`.
pub const SPENDABLE_ORDER: &str =
    "priority, expires_at NULLS LAST, (category = 'paid'), created_at, lot_id";
/// [`SPENDABLE_ORDER`] over `credit_lots l`.
const SPENDABLE_ORDER_L: &str =
    "l.priority, l.expires_at NULLS LAST, (l.category = 'paid'), l.created_at, l.lot_id";

/// Where a deduction took its credits from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Allocation {
    /// The lot.
    pub lot_id: i64,
    /// How many credits.
    pub amount: i64,
}

/// A lot as a movement sees it.
#[derive(Debug, Clone)]
pub(super) struct Lot {
    pub lot_id: i64,
    pub remaining: i64,
    pub app_name: String,
    /// Past its `expires_at`, its `expire` entry not written yet.
    pub due: bool,
}

/// The active lots with credits left of `users`, each user's in burn-down
/// order, due ones included (flagged).
pub(super) async fn active_lots(
    tx: &Transaction<'_>,
    users: &[&str],
) -> Result<HashMap<String, Vec<Lot>>, DbError> {
    read_lots(tx, users, "").await
}

/// The lots of `users` past their expiry whose `expire` entry is not
/// written yet.
pub(super) async fn due_lots(
    tx: &Transaction<'_>,
    users: &[&str],
) -> Result<HashMap<String, Vec<Lot>>, DbError> {
    read_lots(tx, users, "AND expires_at <= now()").await
}

/// The active lots with credits left of `users` that meet `and` (an extra
/// condition), by user, in burn-down order.
async fn read_lots(
    tx: &Transaction<'_>,
    users: &[&str],
    and: &str,
) -> Result<HashMap<String, Vec<Lot>>, DbError> {
    let mut out: HashMap<String, Vec<Lot>> = HashMap::new();
    if users.is_empty() {
        return Ok(out);
    }
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT user_id, lot_id, remaining, app_name, \
                    coalesce(expires_at <= now(), false) AS due \
             FROM credit_lots WHERE user_id = ANY($1::text[]) AND status = 'active' AND remaining > 0 {and} \
             ORDER BY user_id, {SPENDABLE_ORDER}"
        ))
        .await?;
    for r in tx.query(&stmt, &[&users]).await? {
        out.entry(r.get("user_id")).or_default().push(Lot {
            lot_id: r.get("lot_id"),
            remaining: r.get("remaining"),
            app_name: r.get("app_name"),
            due: r.get("due"),
        });
    }
    Ok(out)
}

/// Takes `amount` from `lots` (in burn-down order, due ones skipped),
/// lowering their `remaining`. The caller has checked the lots cover it.
pub(super) fn draw(lots: &mut [Lot], mut amount: i64) -> Vec<Allocation> {
    let mut taken = Vec::new();
    for lot in lots.iter_mut().filter(|l| !l.due && l.remaining > 0) {
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

/// What became of a lot a reservation drew from, as a refund sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LotFate {
    /// Active and not past its expiry: credits go back into it.
    Open,
    /// Past its expiry (written or not): a part given back expires at once.
    Expired,
    /// Voided: a part given back is voided at once.
    Voided,
}

/// One lot a reservation drew from, with what was given back to it so far.
#[derive(Debug, Clone)]
pub(super) struct Drawn {
    pub lot_id: i64,
    /// Taken by the deduction.
    pub drawn: i64,
    /// Given back by earlier refunds.
    pub returned: i64,
    pub fate: LotFate,
}

/// Splits `amount` given back over the lots a reservation drew from (in
/// burn-down order in `drawn`): the last drawn first.
pub(super) fn give_back(drawn: &[Drawn], mut amount: i64) -> Vec<(&Drawn, i64)> {
    let mut parts = Vec::new();
    for d in drawn.iter().rev() {
        if amount == 0 {
            break;
        }
        let part = amount.min(d.drawn - d.returned);
        if part > 0 {
            parts.push((d, part));
            amount -= part;
        }
    }
    parts
}

/// The users, apps and codes of reservation keys, as three columns.
fn key_columns<'k>(
    keys: &[(&'k str, &'k str, &'k str)],
) -> (Vec<&'k str>, Vec<&'k str>, Vec<&'k str>) {
    let mut columns = (Vec::new(), Vec::new(), Vec::new());
    for &(user, app, code) in keys {
        columns.0.push(user);
        columns.1.push(app);
        columns.2.push(code);
    }
    columns
}

/// The lots each of a set of reservations drew from, by reservation key.
pub(super) async fn drawn_from(
    tx: &Transaction<'_>,
    keys: &[(&str, &str, &str)],
) -> Result<HashMap<super::ReservationKey, Vec<Drawn>>, DbError> {
    let mut out: HashMap<super::ReservationKey, Vec<Drawn>> = HashMap::new();
    if keys.is_empty() {
        return Ok(out);
    }
    let (users, apps, codes) = key_columns(keys);
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT m.user_id, m.app_name, m.project_code, m.lot_id, \
                    coalesce(sum(-m.amount) FILTER (WHERE m.kind = 'deduct'), 0)::bigint AS drawn, \
                    coalesce(sum(m.amount) FILTER (WHERE m.kind = 'refund'), 0)::bigint AS returned, \
                    CASE WHEN l.status = 'voided' THEN 'voided' \
                         WHEN l.status = 'expired' OR l.expires_at <= now() THEN 'expired' \
                         ELSE 'open' END AS fate \
             FROM lot_movements m \
             JOIN credit_lots l ON l.user_id = m.user_id AND l.lot_id = m.lot_id \
             JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(user_id, app_name, project_code) \
               ON m.user_id = k.user_id AND m.app_name = k.app_name AND m.project_code = k.project_code \
             WHERE m.user_id = ANY($1) AND l.user_id = ANY($1) \
             GROUP BY m.user_id, m.app_name, m.project_code, m.lot_id, l.lot_id, l.status, \
                      l.expires_at, l.priority, l.category, l.created_at \
             ORDER BY m.user_id, m.app_name, m.project_code, {SPENDABLE_ORDER_L}"
        ))
        .await?;
    for r in tx.query(&stmt, &[&users, &apps, &codes]).await? {
        let fate = match r.get::<_, &str>("fate") {
            "voided" => LotFate::Voided,
            "expired" => LotFate::Expired,
            _ => LotFate::Open,
        };
        out.entry(super::reservation_key(&r))
            .or_default()
            .push(Drawn {
                lot_id: r.get("lot_id"),
                drawn: r.get("drawn"),
                returned: r.get("returned"),
                fate,
            });
    }
    Ok(out)
}

/// One `lot_movements` row to write, naming its ledger entry by its place
/// in the plan's entries.
struct Move {
    entry: usize,
    user_id: String,
    lot_id: i64,
    kind: EntryKind,
    amount: i64,
    app_name: Option<String>,
    project_code: Option<String>,
}

/// A lot's change in a plan.
#[derive(Default)]
struct LotChange {
    delta: i64,
    close: Option<&'static str>,
}

/// The ledger entries of one transaction, with the lot movements and lot
/// changes they make, written together by [`Plan::write`].
#[derive(Default)]
pub(super) struct Plan<'a> {
    pub entries: Vec<NewEntry<'a>>,
    moves: Vec<Move>,
    lots: BTreeMap<(String, i64), LotChange>,
}

impl<'a> Plan<'a> {
    /// Adds `entry`; returns its place.
    pub fn entry(&mut self, entry: NewEntry<'a>) -> usize {
        self.entries.push(entry);
        self.entries.len() - 1
    }

    /// Records that entry `entry` moves `amount` of lot `lot_id` (`kind`:
    /// the entry's kind, or `expire`/`void` for the part of a refund that
    /// meets a closed lot), changing the lot's `remaining` by `delta`.
    #[allow(clippy::too_many_arguments)]
    pub fn moves(
        &mut self,
        entry: usize,
        user_id: &str,
        lot_id: i64,
        kind: EntryKind,
        amount: i64,
        delta: i64,
        reservation: Option<(&str, &str)>,
    ) {
        self.moves.push(Move {
            entry,
            user_id: user_id.to_owned(),
            lot_id,
            kind,
            amount,
            app_name: reservation.map(|r| r.0.to_owned()),
            project_code: reservation.map(|r| r.1.to_owned()),
        });
        if delta != 0 {
            self.lots
                .entry((user_id.to_owned(), lot_id))
                .or_default()
                .delta += delta;
        }
    }

    /// Marks lot `lot_id` expired or voided (its remaining goes with it).
    pub fn close(&mut self, user_id: &str, lot_id: i64, how: &'static str) {
        self.lots
            .entry((user_id.to_owned(), lot_id))
            .or_default()
            .close = Some(how);
    }

    /// Expires `user`'s `due` lots: one `expire` entry per app, before any
    /// other entry of the user in this plan; lowers `balance` by what
    /// expires. Returns how many credits expired.
    pub fn expire_due(
        &mut self,
        user: &'a str,
        due: &[Lot],
        balance: &mut i64,
        correlation_id: Option<&'a str>,
    ) -> Result<i64, DbError> {
        let mut by_app: BTreeMap<&str, Vec<&Lot>> = BTreeMap::new();
        for lot in due.iter().filter(|l| l.due && l.remaining > 0) {
            by_app.entry(lot.app_name.as_str()).or_default().push(lot);
        }
        let mut expired = 0;
        for lots in by_app.values() {
            let total: i64 = lots.iter().map(|l| l.remaining).sum();
            *balance = balance
                .checked_sub(total)
                .filter(|b| *b >= 0)
                .ok_or_else(|| {
                    DbError::Other(format!("{user}: lots hold more than the balance"))
                })?;
            expired += total;
            let at = self.entry(NewEntry {
                user_id: user,
                kind: EntryKind::Expire,
                amount: -total,
                balance_after: *balance,
                app_name: Cow::Owned(lots[0].app_name.clone()),
                description: Some("credits expired"),
                project_code: None,
                reference: None,
                correlation_id,
            });
            for lot in lots {
                self.moves(
                    at,
                    user,
                    lot.lot_id,
                    EntryKind::Expire,
                    -lot.remaining,
                    -lot.remaining,
                    None,
                );
                self.close(user, lot.lot_id, "expired");
            }
        }
        Ok(expired)
    }

    /// Moves the balances by the entries' amounts (one guarded `UPDATE`),
    /// then writes the entries (with their audit jobs), the lot movements
    /// and the lot changes. Every user of an entry must be locked by the
    /// caller. Returns each entry's id and time, in order.
    pub async fn apply(self, tx: &Transaction<'_>) -> Result<Vec<(i64, OffsetDateTime)>, DbError> {
        let deltas: Vec<(&str, i64)> = self.entries.iter().map(|e| (e.user_id, e.amount)).collect();
        if deltas.iter().any(|&(_, d)| d != 0) {
            move_balances(tx, &deltas).await?;
        }
        self.write(tx).await
    }

    /// Writes the entries (with their audit jobs), the lot movements and
    /// the lot changes. Returns each entry's id and time, in order.
    async fn write(self, tx: &Transaction<'_>) -> Result<Vec<(i64, OffsetDateTime)>, DbError> {
        let written = write_entries(tx, &self.entries).await?;
        if !self.moves.is_empty() {
            let users: Vec<&str> = self.moves.iter().map(|m| m.user_id.as_str()).collect();
            let lots: Vec<i64> = self.moves.iter().map(|m| m.lot_id).collect();
            let entries: Vec<i64> = self.moves.iter().map(|m| written[m.entry].0).collect();
            let kinds: Vec<&str> = self.moves.iter().map(|m| m.kind.as_str()).collect();
            let amounts: Vec<i64> = self.moves.iter().map(|m| m.amount).collect();
            let apps: Vec<Option<&str>> =
                self.moves.iter().map(|m| m.app_name.as_deref()).collect();
            let codes: Vec<Option<&str>> = self
                .moves
                .iter()
                .map(|m| m.project_code.as_deref())
                .collect();
            let insert = tx
                .prepare_cached(
                    "INSERT INTO lot_movements (user_id, lot_id, entry_id, kind, amount, app_name, project_code) \
                     SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[], $5::int8[], $6::text[], $7::text[])",
                )
                .await?;
            tx.execute(
                &insert,
                &[&users, &lots, &entries, &kinds, &amounts, &apps, &codes],
            )
            .await?;
        }
        if !self.lots.is_empty() {
            let mut users = Vec::with_capacity(self.lots.len());
            let mut ids = Vec::with_capacity(self.lots.len());
            let mut deltas = Vec::with_capacity(self.lots.len());
            let mut closing = Vec::with_capacity(self.lots.len());
            for ((user, id), change) in &self.lots {
                users.push(user.as_str());
                ids.push(*id);
                deltas.push(change.delta);
                closing.push(change.close.is_some());
            }
            // (No CASE or COALESCE around now(): Citus refuses them in a
            // distributed UPDATE; the closes are a statement of their own.)
            let update = tx
                .prepare_cached(
                    "UPDATE credit_lots l SET remaining = l.remaining + v.delta \
                     FROM unnest($1::text[], $2::int8[], $3::int8[], $4::bool[]) AS v(user_id, lot_id, delta, closing) \
                     WHERE l.user_id = v.user_id AND l.lot_id = v.lot_id AND l.user_id = ANY($1) \
                       AND l.status = 'active' AND l.remaining + v.delta >= 0 \
                       AND (v.delta >= 0 OR v.closing OR l.expires_at IS NULL OR l.expires_at > now())",
                )
                .await?;
            if tx
                .execute(&update, &[&users, &ids, &deltas, &closing])
                .await?
                != self.lots.len() as u64
            {
                return Err(DbError::Other(
                    "a lot change did not apply (lot closed, past its expiry, or short)".into(),
                ));
            }
            let (mut users, mut ids, mut how) = (Vec::new(), Vec::new(), Vec::new());
            for ((user, id), change) in &self.lots {
                if let Some(close) = change.close {
                    users.push(user.as_str());
                    ids.push(*id);
                    how.push(close);
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
                    return Err(DbError::Other("a lot to close was closed already".into()));
                }
            }
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lot(id: i64, remaining: i64, due: bool) -> Lot {
        Lot {
            lot_id: id,
            remaining,
            app_name: "penora".into(),
            due,
        }
    }

    #[test]
    fn a_draw_spans_lots_in_order_and_skips_due_ones() {
        let mut lots = vec![
            lot(1, 3, false),
            lot(2, 5, true),
            lot(3, 4, false),
            lot(4, 9, false),
        ];
        let taken = draw(&mut lots, 9);
        assert_eq!(
            taken,
            vec![
                Allocation {
                    lot_id: 1,
                    amount: 3
                },
                Allocation {
                    lot_id: 3,
                    amount: 4
                },
                Allocation {
                    lot_id: 4,
                    amount: 2
                }
            ]
        );
        assert_eq!(
            lots.iter().map(|l| l.remaining).collect::<Vec<_>>(),
            [0, 5, 0, 7]
        );
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
        let parts: Vec<(i64, i64)> = give_back(&drawn, 5)
            .iter()
            .map(|(d, p)| (d.lot_id, *p))
            .collect();
        assert_eq!(parts, vec![(4, 1), (3, 4)]);
    }
}
