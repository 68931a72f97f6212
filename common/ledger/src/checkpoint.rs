//! The `ledger-audit` job's side of the chain (`crate::chain`): one job per
//! committed transaction names the chains it extended; the job re-reads
//! each chain from its last checkpoint to the commit's last entry, checks
//! every link again (seq without gap, predecessor's hash, own hash over the
//! entry as stored), and moves the checkpoint on (`audit_checkpoints`: seq,
//! entry id, hash, and with `AUDIT_HMAC_KEY` the MAC of the hash).
//!
//! Rules:
//! * a checkpoint only moves forward (`ON CONFLICT … WHERE seq <`), so
//!   jobs run twice, out of order or at once by two workers agree; a job
//!   whose chain is checked past its entries already has nothing to do;
//! * nothing is locked: the entries read are committed (the job is written
//!   in their transaction), and a chain's links never change;
//! * a broken link (an entry edited, deleted, inserted or reordered since
//!   it was written, or a checkpoint edited) leaves that chain's checkpoint
//!   where it was, counts `penora_audit_chain_breaks_total`, sets
//!   `penora_audit_chain_broken` (the alert `PenoraAuditChainBroken`) and is
//!   the job's failure (it is parked with the reason); the other chains of
//!   the batch are checkpointed;
//! * a chain's first link chains to 32 zero bytes or to the last record of
//!   the user's old chain (`audit_records`, before V18).

use std::collections::{BTreeMap, HashMap};

use deadpool_postgres::{GenericClient, Pool};
use penora_domain::messages::CommittedChain;
use penora_store::DbError;
use time::OffsetDateTime;

use crate::audit::MacKey;
use crate::chain::GENESIS;

/// What checking a chain found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// Every link up to `seq` holds; the checkpoint is there now (`new`
    /// links were checked for the first time).
    Checked {
        /// The checkpoint's seq.
        seq: i64,
        /// Links newly checked.
        new: usize,
    },
    /// A link is broken: the checkpoint stays where it was.
    Broken(String),
    /// Every link holds, but another transaction held the checkpoint past
    /// `DB_LOCK_TIMEOUT_MS`: to be checked again later.
    Busy,
}

/// A chain to check, up to where.
#[derive(Debug, Clone)]
struct Wanted {
    /// The last seq a job named.
    seq: i64,
    /// The last entry a job named.
    entry_id: i64,
}

/// The columns a link is checked on.
const LINK_COLUMNS: &str = "l.id, l.user_id, l.kind, l.amount, l.balance_after, l.app_name, \
     l.description, l.project_code, l.reference, l.created_at, l.chain_seq, l.prev_hash, l.hash, l.acted_by";

/// Checks the chains `commits` name (the jobs of many commits at once: a
/// user named twice is checked once, up to the later seq), and moves their
/// checkpoints on. One answer per user. On a distributed database the
/// chains are split per shard, the parts checked at once, each on a
/// connection of its own.
pub async fn check_commits(
    pool: &Pool,
    key: Option<&MacKey>,
    commits: &[CommittedChain],
) -> Result<HashMap<String, Checked>, DbError> {
    let mut wanted: BTreeMap<String, Wanted> = BTreeMap::new();
    for c in commits {
        let Some(&last) = c.entry_ids.iter().max() else {
            continue;
        };
        let w = wanted.entry(c.user_id.clone()).or_insert(Wanted {
            seq: c.seq,
            entry_id: last,
        });
        w.seq = w.seq.max(c.seq);
        w.entry_id = w.entry_id.max(last);
    }
    let wanted: Vec<(String, Wanted)> = wanted.into_iter().collect();
    if wanted.is_empty() {
        return Ok(HashMap::new());
    }
    if !penora_store::distributed() {
        let client = pool.get().await?;
        return check_part(&client, key, &wanted).await;
    }
    let client = pool.get().await?;
    let (_, parts) = penora_store::shard_parts(&client, &wanted, |(u, _)| u.as_str()).await?;
    drop(client);
    let checked = futures_util::future::try_join_all(parts.iter().map(|part| async move {
        let client = pool.get().await?;
        check_part(&client, key, part).await
    }))
    .await?;
    Ok(checked.into_iter().flatten().collect())
}

/// A user's checkpoint, as stored.
#[derive(Debug, Clone)]
struct Checkpoint {
    seq: i64,
    entry_id: i64,
    hash: Vec<u8>,
    mac: Option<Vec<u8>>,
}

/// [`check_commits`] for chains that share a shard.
async fn check_part(
    client: &impl GenericClient,
    key: Option<&MacKey>,
    wanted: &[(String, Wanted)],
) -> Result<HashMap<String, Checked>, DbError> {
    let users: Vec<&str> = wanted.iter().map(|(u, _)| u.as_str()).collect();
    let last_ids: Vec<i64> = wanted.iter().map(|(_, w)| w.entry_id).collect();
    let (checkpoints, rows) = read(client, &users, &last_ids).await?;
    let mut links: HashMap<&str, Vec<&tokio_postgres::Row>> = HashMap::new();
    for r in &rows {
        let user: &str = r.try_get("user_id")?;
        links.entry(user).or_default().push(r);
    }
    // Chains that begin here and link to the old chain (V18's carry-over).
    let mut carried: Vec<(&str, Vec<u8>)> = Vec::new();
    for (user, _) in wanted {
        if checkpoints.contains_key(user) {
            continue;
        }
        if let Some(first) = links.get(user.as_str()).and_then(|l| l.first()) {
            let prev: Vec<u8> = first.try_get("prev_hash")?;
            if prev != GENESIS {
                carried.push((user, prev));
            }
        }
    }
    let old_heads = old_chain_links(client, &carried).await?;

    let mut answers = HashMap::new();
    let mut advance: Vec<(&str, i64, i64, Vec<u8>)> = Vec::new();
    let mut oldest: Option<OffsetDateTime> = None;
    for (user, want) in wanted {
        let cp = checkpoints.get(user);
        if let Some(cp) = cp
            && cp.seq >= want.seq
        {
            answers.insert(
                user.clone(),
                Checked::Checked {
                    seq: cp.seq,
                    new: 0,
                },
            );
            continue;
        }
        let chain = links.get(user.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        match walk(user, cp, key, chain, &old_heads) {
            Ok(end) if end.seq >= want.seq => {
                if let Some(at) = end.oldest_new {
                    oldest = Some(oldest.map_or(at, |o: OffsetDateTime| o.min(at)));
                }
                advance.push((user, end.seq, end.entry_id, end.hash));
                answers.insert(
                    user.clone(),
                    Checked::Checked {
                        seq: end.seq,
                        new: end.new,
                    },
                );
            }
            Ok(end) => {
                answers.insert(
                    user.clone(),
                    Checked::Broken(format!(
                        "the chain ends at link {} (entry {}), but a commit wrote it up to link {} \
                         (entry {}): entries were deleted",
                        end.seq, end.entry_id, want.seq, want.entry_id
                    )),
                );
            }
            Err(broken) => {
                answers.insert(user.clone(), Checked::Broken(broken));
            }
        }
    }
    if !advance.is_empty() {
        let busy = advance_checkpoints(client, key, &advance).await?;
        for user in &busy {
            answers.insert((*user).to_owned(), Checked::Busy);
        }
        crate::audit::log_heads(
            advance.len() - busy.len(),
            advance
                .iter()
                .filter(|a| !busy.contains(a.0))
                .map(|a| (a.0, a.1, a.3.as_slice())),
        );
    }
    if let Some(oldest) = oldest {
        crate::audit::observe_lag(oldest);
    }
    let broken: Vec<(&String, &String)> = answers
        .iter()
        .filter_map(|(u, c)| match c {
            Checked::Broken(why) => Some((u, why)),
            Checked::Checked { .. } | Checked::Busy => None,
        })
        .collect();
    for (user, why) in &broken {
        tracing::error!(user_id = %user, problem = %why, "audit chain broken");
    }
    if !broken.is_empty() {
        metrics::counter!("penora_audit_chain_breaks_total").increment(broken.len() as u64);
        metrics::gauge!("penora_audit_chain_broken").set(1.0);
    }
    Ok(answers)
}

/// The checkpoints of `users`, and their chains' links from each
/// checkpoint's entry (or the chain's start) up to `last_ids`, in id order.
async fn read(
    client: &impl GenericClient,
    users: &[&str],
    last_ids: &[i64],
) -> Result<(HashMap<String, Checkpoint>, Vec<tokio_postgres::Row>), DbError> {
    let mut checkpoints = HashMap::new();
    let mut rows = Vec::new();
    if penora_store::distributed() {
        // On Citus: plain statements routed by the users' shard (a lateral
        // join to a distributed table is not pushed down).
        let cps = client
            .prepare_cached(
                "SELECT user_id, seq AS cp_seq, entry_id AS cp_entry_id, hash AS cp_hash, mac AS cp_mac \
                 FROM audit_checkpoints \
                 WHERE user_id = ANY($1::text[])",
            )
            .await?;
        for r in client.query(&cps, &[&users]).await? {
            checkpoints.insert(r.try_get("user_id")?, checkpoint_of(&r)?);
        }
        let from = users
            .iter()
            .map(|u| checkpoints.get(*u).map_or(0, |c: &Checkpoint| c.entry_id))
            .min()
            .unwrap_or(0);
        let to = last_ids.iter().copied().max().unwrap_or(0);
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {LINK_COLUMNS} FROM ledger_entries l \
                 WHERE l.user_id = ANY($1::text[]) AND l.id >= $2 AND l.id <= $3 AND l.hash IS NOT NULL \
                 ORDER BY l.user_id, l.id"
            ))
            .await?;
        let limits: HashMap<&str, (i64, i64)> = users
            .iter()
            .zip(last_ids)
            .map(|(u, &to)| (*u, (checkpoints.get(*u).map_or(0, |c| c.entry_id), to)))
            .collect();
        for r in client.query(&stmt, &[&users, &from, &to]).await? {
            let user: &str = r.try_get("user_id")?;
            let id: i64 = r.try_get("id")?;
            if limits
                .get(user)
                .is_some_and(|&(lo, hi)| id >= lo && id <= hi)
            {
                rows.push(r);
            }
        }
        return Ok((checkpoints, rows));
    }
    // One statement: each chain's checkpoint, and its links from the
    // checkpoint's entry on (see `read_links`).
    let stmt = client.prepare_cached(&read_links()).await?;
    for r in by_index(client, &stmt, &[&users, &last_ids]).await? {
        let user: String = r.try_get("chain_user")?;
        if r.try_get::<_, Option<i64>>("cp_seq")?.is_some() && !checkpoints.contains_key(&user) {
            checkpoints.insert(user, checkpoint_of(&r)?);
        }
        if r.try_get::<_, Option<i64>>("id")?.is_some() {
            rows.push(r);
        }
    }
    Ok((checkpoints, rows))
}

fn checkpoint_of(r: &tokio_postgres::Row) -> Result<Checkpoint, DbError> {
    Ok(Checkpoint {
        seq: r.try_get("cp_seq")?,
        entry_id: r.try_get("cp_entry_id")?,
        hash: r.try_get("cp_hash")?,
        mac: r.try_get("cp_mac")?,
    })
}

/// Which of `carried` (user, first link's prev hash) name a record of the
/// user's old chain.
async fn old_chain_links(
    client: &impl GenericClient,
    carried: &[(&str, Vec<u8>)],
) -> Result<std::collections::HashSet<(String, Vec<u8>)>, DbError> {
    let mut found = std::collections::HashSet::new();
    if carried.is_empty() {
        return Ok(found);
    }
    let users: Vec<&str> = carried.iter().map(|c| c.0).collect();
    let hashes: Vec<&[u8]> = carried.iter().map(|c| c.1.as_slice()).collect();
    let rows = client
        .query(
            "SELECT a.user_id, a.hash FROM audit_records a \
             WHERE a.user_id = ANY($1::text[]) AND (a.user_id, a.hash) IN \
                   (SELECT * FROM unnest($1::text[], $2::bytea[]))",
            &[&users, &hashes],
        )
        .await?;
    for r in rows {
        found.insert((r.try_get("user_id")?, r.try_get("hash")?));
    }
    Ok(found)
}

/// Where a walk of a chain ended.
#[derive(Debug)]
struct End {
    seq: i64,
    entry_id: i64,
    hash: Vec<u8>,
    /// Links checked that the checkpoint did not cover.
    new: usize,
    /// The time of the oldest of them.
    oldest_new: Option<OffsetDateTime>,
}

/// Checks `chain` (links in id order, from the checkpoint's entry when
/// there is a checkpoint, else from the chain's start) link by link.
fn walk(
    user: &str,
    cp: Option<&Checkpoint>,
    key: Option<&MacKey>,
    chain: &[&tokio_postgres::Row],
    old_heads: &std::collections::HashSet<(String, Vec<u8>)>,
) -> Result<End, String> {
    let db = |e: DbError| format!("a link could not be read: {e}");
    let mut rows = chain.iter();
    let mut end = match cp {
        Some(cp) => {
            if let (Some(key), Some(mac)) = (key, &cp.mac)
                && !key.verifies(&cp.hash, mac)
            {
                return Err(format!(
                    "the checkpoint at link {} has a MAC that AUDIT_HMAC_KEY did not make: \
                     the checkpoint was edited",
                    cp.seq
                ));
            }
            let Some(first) = rows.next() else {
                return Err(format!(
                    "entry {} of the checkpoint (link {}) is missing",
                    cp.entry_id, cp.seq
                ));
            };
            let (id, seq, hash) = identity(first).map_err(db)?;
            if id != cp.entry_id || seq != cp.seq || hash != cp.hash {
                return Err(format!(
                    "the checkpoint (link {}, entry {}) does not match the ledger's entry {id} \
                     (link {seq}): the entry or the checkpoint was edited",
                    cp.seq, cp.entry_id
                ));
            }
            check_own_hash(first).map_err(|e| e.unwrap_or_else(&db))?;
            End {
                seq,
                entry_id: id,
                hash,
                new: 0,
                oldest_new: None,
            }
        }
        None => End {
            seq: 0,
            entry_id: 0,
            hash: Vec::new(),
            new: 0,
            oldest_new: None,
        },
    };
    for r in rows {
        let (id, seq, hash) = identity(r).map_err(db)?;
        let prev: Vec<u8> = r.try_get("prev_hash").map_err(|e| db(e.into()))?;
        if seq != end.seq + 1 {
            return Err(format!(
                "entry {id} is link {seq} where link {} was expected: a link was deleted, \
                 inserted or moved",
                end.seq + 1
            ));
        }
        if end.seq == 0 {
            if prev != GENESIS && !old_heads.contains(&(user.to_owned(), prev.clone())) {
                return Err(format!(
                    "entry {id}, the chain's first link, links to neither the start nor a record \
                     of the old chain"
                ));
            }
        } else if prev != end.hash {
            return Err(format!(
                "entry {id} (link {seq}) does not link to the entry before it"
            ));
        }
        check_own_hash(r).map_err(|e| e.unwrap_or_else(&db))?;
        let at: OffsetDateTime = r.try_get("created_at").map_err(|e| db(e.into()))?;
        end.oldest_new = Some(end.oldest_new.map_or(at, |o| o.min(at)));
        end.new += 1;
        end.seq = seq;
        end.entry_id = id;
        end.hash = hash;
    }
    Ok(end)
}

fn identity(r: &tokio_postgres::Row) -> Result<(i64, i64, Vec<u8>), DbError> {
    Ok((
        r.try_get("id")?,
        r.try_get("chain_seq")?,
        r.try_get("hash")?,
    ))
}

/// Whether a link's stored hash is the hash of its entry as stored:
/// `Err(Ok(problem))` when not, `Err(Err(_))` when it cannot be read.
fn check_own_hash(r: &tokio_postgres::Row) -> Result<(), Result<String, DbError>> {
    let prev: Vec<u8> = r.try_get("prev_hash").map_err(|e| Err(e.into()))?;
    let stored: Vec<u8> = r.try_get("hash").map_err(|e| Err(e.into()))?;
    let content = crate::chain::content_of_row(r).map_err(Err)?;
    let hash = crate::chain::hash_of(&content, &prev).map_err(Err)?;
    if hash.as_slice() != stored.as_slice() {
        return Err(Ok(format!(
            "entry {} (link {}) was edited: its hash does not match its content",
            content.entry_id, content.seq
        )));
    }
    Ok(())
}

/// The audit job's read (not distributed): each chain's checkpoint, and its
/// links from the checkpoint's entry on. Its plan needs no statistics (a
/// fresh database's first minutes): each lateral is a parameterised probe,
/// and the row comparisons on (user_id, id) only the primary key can serve,
/// so the range is never read through the id index across other users'
/// entries. The same bounds stand again as `user_id =` and `id` between:
/// a B-tree starts a scan from the equality on its first column, and with
/// only the row comparison beside it, it started at the user's first entry
/// and read the whole history up to the checkpoint (12.7 ms a call for
/// three users of 50,000 entries each, 0.7 ms with the bounds on `id`).
fn read_links() -> String {
    format!(
        "SELECT k.user_id AS chain_user, c.seq AS cp_seq, c.entry_id AS cp_entry_id, \
                c.hash AS cp_hash, c.mac AS cp_mac, {LINK_COLUMNS} \
         FROM unnest($1::text[], $2::int8[]) AS k(user_id, last_id) \
         LEFT JOIN LATERAL (SELECT c.seq, c.entry_id, c.hash, c.mac FROM audit_checkpoints c \
             WHERE c.user_id = k.user_id LIMIT 1) c ON true \
         LEFT JOIN LATERAL (SELECT l.* FROM ledger_entries l \
             WHERE l.user_id = k.user_id \
               AND (l.user_id, l.id) >= (k.user_id, coalesce(c.entry_id, 0)) \
               AND (l.user_id, l.id) <= (k.user_id, k.last_id) \
               AND l.id >= coalesce(c.entry_id, 0) AND l.id <= k.last_id \
               AND l.hash IS NOT NULL ORDER BY l.user_id, l.id) l ON true \
         ORDER BY k.user_id, l.id"
    )
}

/// Moves checkpoints on without waiting for one another transaction holds
/// (not distributed). Every read of `audit_checkpoints` in it is by
/// `user_id = ANY(…)`, which the primary key serves whatever the planner
/// believes of the table's size.
const ADVANCE_SKIPPING_HELD: &str = "\
    WITH v AS (SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::bytea[], $5::bytea[]) \
                 AS v(user_id, seq, entry_id, hash, mac)), \
    locked AS (SELECT c.user_id FROM audit_checkpoints c WHERE c.user_id = ANY($1::text[]) \
               ORDER BY c.user_id FOR UPDATE SKIP LOCKED), \
    moved AS (UPDATE audit_checkpoints c SET seq = v.seq, entry_id = v.entry_id, hash = v.hash, \
                mac = v.mac, checked_at = now() \
              FROM v WHERE c.user_id = ANY(ARRAY(SELECT user_id FROM locked)) \
                AND c.user_id = v.user_id AND c.seq < v.seq RETURNING c.user_id), \
    made AS (INSERT INTO audit_checkpoints (user_id, seq, entry_id, hash, mac) \
             SELECT v.user_id, v.seq, v.entry_id, v.hash, v.mac FROM v \
             WHERE v.user_id <> ALL(ARRAY(SELECT c.user_id FROM audit_checkpoints c \
                                          WHERE c.user_id = ANY($1::text[]))) \
             ON CONFLICT (user_id) DO NOTHING RETURNING user_id) \
    SELECT user_id FROM locked UNION SELECT user_id FROM made";

/// Moves checkpoints on, waiting for those another transaction holds.
const ADVANCE_WAITING: &str = "\
    INSERT INTO audit_checkpoints (user_id, seq, entry_id, hash, mac) \
    SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::bytea[], $5::bytea[]) \
    ON CONFLICT (user_id) DO UPDATE SET seq = excluded.seq, entry_id = excluded.entry_id, \
       hash = excluded.hash, mac = excluded.mac, checked_at = now() \
    WHERE audit_checkpoints.seq < excluded.seq";

/// How [`by_index`] prices sequential scans out for one statement, and
/// how it puts them back (the tests plan the statements as it does).
#[doc(hidden)]
pub const BY_INDEX: (&str, &str) = ("SET enable_seqscan = off", "RESET enable_seqscan");

/// Runs a prepared `statement` with sequential scans priced out for it
/// alone: the setting, the statement and the reset are sent together (one
/// round trip; a prepared statement's request goes out when its future is
/// first polled, and `join3` polls in order) and run in that order, the
/// reset even when the statement fails. Why: a connection plans a prepared
/// statement once and keeps the plan. On a new deployment, or right after
/// V18 on an old one, `audit_checkpoints` starts empty; a plan made then
/// (or after autovacuum analyzed the table at a few dozen rows) reads it by
/// a sequential scan, and keeps doing so while the table grows to every
/// user's row within the minute before the next analyze: 13 ms a call, 445
/// µs of statement time per deduction, in the first 15 s of a benchmark
/// without warm-up; up to 2.5 s a call for a batch of 760 chains. Priced
/// out, the plan uses the primary key whatever the statistics say.
#[doc(hidden)]
pub async fn by_index(
    client: &impl GenericClient,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, DbError> {
    let (on, rows, off) = futures_util::future::join3(
        client.batch_execute(BY_INDEX.0),
        client.query(statement, params),
        client.batch_execute(BY_INDEX.1),
    )
    .await;
    on?;
    off?;
    Ok(rows?)
}

/// The audit job's statements on a database that is not distributed, with
/// how many parameters each takes: the tests of their plans on a database
/// without statistics read them.
#[doc(hidden)]
pub fn statements() -> Vec<(&'static str, String, usize)> {
    vec![
        ("read", read_links(), 2),
        (
            "advance, skipping held checkpoints",
            ADVANCE_SKIPPING_HELD.to_owned(),
            5,
        ),
        ("advance, waiting", ADVANCE_WAITING.to_owned(), 5),
    ]
}

/// A checkpoint to move: (user, seq, entry id, hash).
type Advance<'a> = (&'a str, i64, i64, Vec<u8>);

/// Moves the checkpoints of `advance` on (never back). A checkpoint another
/// transaction holds is not waited for in the first statement (`SKIP
/// LOCKED`), so that one held checkpoint never holds up the others; those
/// are then waited for together, up to the lock timeout. Returns the users
/// whose checkpoint stayed held.
async fn advance_checkpoints<'a>(
    client: &impl GenericClient,
    key: Option<&MacKey>,
    advance: &[Advance<'a>],
) -> Result<std::collections::HashSet<&'a str>, DbError> {
    let columns = |rows: &[&Advance<'a>]| {
        (
            rows.iter().map(|a| a.0).collect::<Vec<&str>>(),
            rows.iter().map(|a| a.1).collect::<Vec<i64>>(),
            rows.iter().map(|a| a.2).collect::<Vec<i64>>(),
            rows.iter().map(|a| a.3.clone()).collect::<Vec<Vec<u8>>>(),
            rows.iter()
                .map(|a| key.map(|k| k.mac(&a.3)))
                .collect::<Vec<Option<Vec<u8>>>>(),
        )
    };
    let mut held: Vec<&Advance<'a>> = advance.iter().collect();
    if !penora_store::distributed() {
        // Every read of `audit_checkpoints` here is by `user_id = ANY(…)`,
        // which the primary key can serve, and sequential scans are priced
        // out ([`by_index`]): on a new deployment, whose statistics say the
        // table is empty or tiny, a join, a `NOT EXISTS` and then even
        // `= ANY` were planned as sequential scans, kept in the prepared
        // plan while the table grew (45 ms a call after 15 s of deductions
        // on a fresh database, 0.2 ms with the primary key).
        let (users, seqs, ids, hashes, macs) = columns(&held);
        let skip = client.prepare_cached(ADVANCE_SKIPPING_HELD).await?;
        let done: std::collections::HashSet<String> =
            by_index(client, &skip, &[&users, &seqs, &ids, &hashes, &macs])
                .await?
                .into_iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
        held.retain(|a| !done.contains(a.0));
        if held.is_empty() {
            return Ok(std::collections::HashSet::new());
        }
    }
    let (users, seqs, ids, hashes, macs) = columns(&held);
    let wait = client.prepare_cached(ADVANCE_WAITING).await?;
    match by_index(client, &wait, &[&users, &seqs, &ids, &hashes, &macs]).await {
        Ok(_) => Ok(std::collections::HashSet::new()),
        Err(DbError::LockTimeout(_)) => Ok(held.iter().map(|a| a.0).collect()),
        Err(e) => Err(e),
    }
}
