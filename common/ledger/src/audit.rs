//! The audit log: one record per ledger entry, hash-chained per user.
//!
//! Rules: a record's content is its ledger entry as canonical JSON, read from
//! the ledger (never from the message that asked for it); its hash is
//! SHA-256(previous hash ‖ content), the first previous hash being 32 zero
//! bytes; `audit_heads` holds each chain's last link and is locked to append,
//! so concurrent workers extend a chain one at a time; `entry_id` is unique,
//! so an entry is recorded once whatever the redeliveries. `verify` recomputes
//! every chain and compares every record with its ledger entry, so an edited,
//! deleted or inserted record is found.
//!
//! The anchor outside the database: a chain rewritten by someone who can
//! write the database as a superuser (content changed, every hash after it
//! recomputed) passes those checks. With `AUDIT_HMAC_KEY` set, each record
//! also carries `mac` = HMAC-SHA256(key, hash) (migration V12); the key lives
//! in the workers' and the operators' environment only, so rewritten records
//! cannot carry valid MACs. `verify` given the key checks every MAC. A record
//! without a MAC after one with a MAC in its chain is a MAC removed; records
//! before a chain's first MAC were written before the key was set, and are
//! counted, not failed. Each committed batch also logs its chains' new heads
//! (`user:seq` and a digest of their hashes), an outside record that a chain
//! later cut short or replaced contradicts.

use deadpool_postgres::{Client, GenericClient};
use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use penora_config::Secret;
use penora_domain::timefmt::rfc3339_millis;
use penora_store::DbError;

use crate::chain::{GENESIS, canonical, link};

/// Records `verify` reads at a time.
const VERIFY_PAGE: i32 = 5000;

/// A ledger entry as the audit log records it (field order is the format).
#[derive(Debug, Serialize)]
struct Content<'a> {
    entry_id: i64,
    user_id: &'a str,
    kind: &'a str,
    amount: i64,
    balance_after: i64,
    app_name: &'a str,
    description: Option<&'a str>,
    project_code: Option<&'a str>,
    reference: Option<&'a str>,
    created_at: String,
}

const ENTRY_COLUMNS: &str = "id, user_id, kind, amount, balance_after, app_name, description, project_code, reference, created_at";

/// The canonical content of a row holding the ledger columns
/// (`ENTRY_COLUMNS`, by name).
fn content_of(row: &tokio_postgres::Row) -> Result<String, DbError> {
    let created_at: OffsetDateTime = row.get("created_at");
    let content = Content {
        entry_id: row.get("id"),
        user_id: row.get("user_id"),
        kind: row.get("kind"),
        amount: row.get("amount"),
        balance_after: row.get("balance_after"),
        app_name: row.get("app_name"),
        description: row.get("description"),
        project_code: row.get("project_code"),
        reference: row.get("reference"),
        created_at: rfc3339_millis(created_at),
    };
    canonical(&content)
}

/// Tells the backpressure how far behind the ledger this commit of records
/// was: the age of the oldest entry it recorded.
pub(crate) fn observe_lag(oldest: OffsetDateTime) {
    let lag = OffsetDateTime::now_utc() - oldest;
    crate::backpressure::observe(lag.try_into().unwrap_or_default());
}

/// The key of the audit records' MACs (`AUDIT_HMAC_KEY`, its UTF-8 bytes as
/// given): a record's `mac` is HMAC-SHA256(key, record hash). Held keyed,
/// never printed (`Debug` says `[redacted]`), never sent to the database.
#[derive(Clone)]
pub struct MacKey(Hmac<Sha256>);

/// A key HMAC refused (HMAC takes keys of any length: not expected).
#[derive(Debug, thiserror::Error)]
#[error("the audit MAC key was refused")]
pub struct BadMacKey;

impl MacKey {
    /// The key `secret`.
    pub fn new(secret: &Secret) -> Result<Self, BadMacKey> {
        Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
            .map(Self)
            .map_err(|_| BadMacKey)
    }

    /// The key of `AUDIT_HMAC_KEY`, when it is set.
    pub fn from_settings(audit: &penora_config::Audit) -> Result<Option<Self>, BadMacKey> {
        audit.hmac_key.as_ref().map(Self::new).transpose()
    }

    /// The MAC of a record whose hash is `hash`.
    pub fn mac(&self, hash: &[u8]) -> Vec<u8> {
        let mut m = self.0.clone();
        Mac::update(&mut m, hash);
        m.finalize().into_bytes().to_vec()
    }

    /// Whether `mac` is the MAC of `hash` under this key (compared in
    /// constant time).
    pub(crate) fn verifies(&self, hash: &[u8], mac: &[u8]) -> bool {
        let mut m = self.0.clone();
        Mac::update(&mut m, hash);
        m.verify_slice(mac).is_ok()
    }
}

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey([redacted])")
    }
}

/// Logs the chains a commit advanced, for an outside record of the heads
/// (the one thing a MAC cannot show: a chain's last records deleted, with
/// their ledger entries): `chains` lists `user:seq` (the seq after the last
/// colon) in byte order of the user ids, `heads` is the first 8 bytes (hex)
/// of SHA-256 over those records' hashes in that order. Checking a line
/// later: `SELECT encode(substr(sha256(string_agg(hash, ''::bytea ORDER BY
/// user_id COLLATE "C")), 1, 8), 'hex') FROM audit_records WHERE (user_id,
/// seq) IN (…)` must give `heads`; a chain cut short or rewritten since does
/// not.
pub(crate) fn log_heads<'a>(
    records: usize,
    heads: impl IntoIterator<Item = (&'a str, i64, &'a [u8])>,
) {
    let mut heads: Vec<(&str, i64, &[u8])> = heads.into_iter().collect();
    heads.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut digest = Sha256::new();
    let mut chains = String::new();
    for (user, seq, hash) in &heads {
        digest.update(hash);
        if !chains.is_empty() {
            chains.push(' ');
        }
        chains.push_str(&format!("{user}:{seq}"));
    }
    let digest = digest.finalize();
    tracing::info!(
        records,
        chains = %chains,
        heads = %hex::encode(&digest[..8]),
        "audit records committed"
    );
}

/// What appending did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// A new record, at this place in the user's chain.
    Recorded(i64),
    /// The entry had its record already.
    AlreadyRecorded,
    /// No such ledger entry for this user (a forged or corrupt job).
    NoSuchEntry,
    /// Another transaction held the user's chain, and the batch did not
    /// wait for it ([`append_many`]): nothing was done; append it alone.
    Busy,
}

/// Appends the record of ledger entry `entry_id` of `user_id`, once, with
/// its MAC when `key` is given.
pub async fn append(
    client: &mut Client,
    key: Option<&MacKey>,
    user_id: &str,
    entry_id: i64,
) -> Result<Appended, DbError> {
    let tx = client.transaction().await?;
    let entry = tx
        .query_opt(
            &format!("SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE user_id = $1 AND id = $2"),
            &[&user_id, &entry_id],
        )
        .await?;
    let Some(entry) = entry else {
        return Ok(Appended::NoSuchEntry);
    };
    tx.execute(
        "INSERT INTO audit_heads (user_id, seq, hash) VALUES ($1, 0, $2) ON CONFLICT DO NOTHING",
        &[&user_id, &GENESIS.as_slice()],
    )
    .await?;
    let head = tx
        .query_one(
            "SELECT seq, hash FROM audit_heads WHERE user_id = $1 FOR UPDATE",
            &[&user_id],
        )
        .await?;
    let done = tx
        .query_opt(
            "SELECT 1 FROM audit_records WHERE user_id = $1 AND entry_id = $2",
            &[&user_id, &entry_id],
        )
        .await?;
    if done.is_some() {
        return Ok(Appended::AlreadyRecorded);
    }
    let (seq, prev): (i64, Vec<u8>) = (head.get("seq"), head.get("hash"));
    let content = content_of(&entry)?;
    let hash = link(&prev, &content);
    let seq = seq + 1;
    let mac = key.map(|k| k.mac(&hash));
    tx.execute(
        "INSERT INTO audit_records (user_id, seq, entry_id, prev_hash, hash, content, mac) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[&user_id, &seq, &entry_id, &prev, &hash.as_slice(), &content, &mac],
    )
    .await?;
    tx.execute(
        "UPDATE audit_heads SET seq = $2, hash = $3 WHERE user_id = $1",
        &[&user_id, &seq, &hash.as_slice()],
    )
    .await?;
    tx.commit().await?;
    observe_lag(entry.get("created_at"));
    log_heads(1, [(user_id, seq, hash.as_slice())]);
    Ok(Appended::Recorded(seq))
}

/// Appends the records of many ledger entries in one transaction (the
/// worker's group commit), with the rules of [`append`]: each chain's head is
/// locked (in `user_id` order, so two batches cannot deadlock), an entry
/// already recorded is left alone, and a user's new entries are chained in
/// ledger order. Returns one answer per `(user_id, entry_id)`, in order; an
/// entry named twice is recorded once and answered `AlreadyRecorded` the
/// second time. A chain another transaction holds is not waited for (`SKIP
/// LOCKED`): its entries are answered [`Appended::Busy`], so that one held
/// chain never holds up the others. On a distributed database (Citus) the
/// items are split per shard, one transaction each.
pub async fn append_many(
    client: &mut Client,
    key: Option<&MacKey>,
    items: &[(String, i64)],
) -> Result<Vec<Appended>, DbError> {
    append_many_with(client, key, items, Held::Skip).await
}

/// [`append_many`] for the entries whose chains were held: waits for each
/// chain (never answers [`Appended::Busy`]), so the entries a busy chain
/// turned away are still recorded together, in one transaction, rather than
/// one transaction each.
pub async fn append_many_waiting(
    client: &mut Client,
    key: Option<&MacKey>,
    items: &[(String, i64)],
) -> Result<Vec<Appended>, DbError> {
    append_many_with(client, key, items, Held::Wait).await
}

/// What a batch does with a chain another transaction holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Leave its entries out (`SKIP LOCKED`), answered `Busy`.
    Skip,
    /// Wait for it.
    Wait,
}

async fn append_many_with(
    client: &mut Client,
    key: Option<&MacKey>,
    items: &[(String, i64)],
    held: Held,
) -> Result<Vec<Appended>, DbError> {
    if !penora_store::distributed() {
        return append_in_shard(client, key, items, held).await;
    }
    let (groups, parts) = penora_store::shard_parts(&*client, items, |(u, _)| u.as_str()).await?;
    if parts.len() <= 1 {
        return append_in_shard(client, key, items, held).await;
    }
    let mut answers = Vec::with_capacity(parts.len());
    for part in &parts {
        answers.push(
            append_in_shard(client, key, part, held)
                .await?
                .into_iter()
                .map(Ok)
                .collect(),
        );
    }
    penora_store::in_places(items.len(), &groups, answers, || {
        Err(DbError::Other("an audit item went unanswered".into()))
    })
    .into_iter()
    .collect()
}

/// The entries of a batch, by key (one index probe each), with whether
/// each has its record already: read under the chains' locks, so a record
/// committed by another transaction before is seen. Looking them up by user
/// instead read every entry and record of a hot account, each batch.
fn entries_by_key_sql() -> String {
    format!(
        "SELECT l.*, EXISTS (SELECT 1 FROM audit_records a \
            WHERE a.user_id = l.user_id AND a.entry_id = l.id) AS recorded \
         FROM unnest($1::text[], $2::int8[]) AS k(user_id, id) \
         CROSS JOIN LATERAL (SELECT {ENTRY_COLUMNS} FROM ledger_entries l \
            WHERE l.user_id = k.user_id AND l.id = k.id LIMIT 1) l"
    )
}

/// [`append_many`] for items whose users share a shard.
async fn append_in_shard(
    client: &mut Client,
    key: Option<&MacKey>,
    items: &[(String, i64)],
    held: Held,
) -> Result<Vec<Appended>, DbError> {
    let tx = client.transaction().await?;
    let mut users: Vec<&str> = items.iter().map(|(u, _)| u.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    let ids: Vec<i64> = items.iter().map(|(_, id)| *id).collect();
    let item_users: Vec<&str> = items.iter().map(|(u, _)| u.as_str()).collect();

    let heads_insert = tx
        .prepare_cached(
            "INSERT INTO audit_heads (user_id, seq, hash) \
             SELECT u, 0, $2 FROM unnest($1::text[]) AS u ORDER BY u ON CONFLICT DO NOTHING",
        )
        .await?;
    tx.execute(&heads_insert, &[&users, &GENESIS.as_slice()])
        .await?;
    let heads_lock = tx
        .prepare_cached(match held {
            Held::Skip => {
                "SELECT user_id, seq, hash FROM audit_heads WHERE user_id = ANY($1::text[]) \
                 ORDER BY user_id FOR UPDATE SKIP LOCKED"
            }
            Held::Wait => {
                "SELECT user_id, seq, hash FROM audit_heads WHERE user_id = ANY($1::text[]) \
                 ORDER BY user_id FOR UPDATE"
            }
        })
        .await?;
    let mut heads: std::collections::HashMap<String, (i64, Vec<u8>)> = tx
        .query(&heads_lock, &[&users])
        .await?
        .into_iter()
        .map(|r| (r.get("user_id"), (r.get("seq"), r.get("hash"))))
        .collect();
    let (entries, done): (Vec<tokio_postgres::Row>, std::collections::HashSet<i64>) =
        if penora_store::distributed() {
            // On Citus, the form verified there: the users route the reads
            // to their shard.
            let find = tx
                .prepare_cached(&format!(
                    "SELECT {ENTRY_COLUMNS} FROM ledger_entries \
                     WHERE (user_id, id) IN (SELECT * FROM unnest($1::text[], $2::int8[])) \
                       AND user_id = ANY($1)"
                ))
                .await?;
            let entries = tx.query(&find, &[&item_users, &ids]).await?;
            let done_stmt = tx
                .prepare_cached(
                    "SELECT entry_id FROM audit_records WHERE entry_id = ANY($1::int8[]) AND user_id = ANY($2)",
                )
                .await?;
            let done = tx
                .query(&done_stmt, &[&ids, &users])
                .await?
                .into_iter()
                .map(|r| r.get("entry_id"))
                .collect();
            (entries, done)
        } else {
            let find = tx.prepare_cached(&entries_by_key_sql()).await?;
            let entries = tx.query(&find, &[&item_users, &ids]).await?;
            let done = entries
                .iter()
                .filter(|r| r.get::<_, bool>("recorded"))
                .map(|r| r.get("id"))
                .collect();
            (entries, done)
        };

    // New records, chained per user in ledger order.
    let mut found: Vec<&tokio_postgres::Row> = entries.iter().collect();
    found.sort_by_key(|r| r.get::<_, i64>("id"));
    let mut recorded: std::collections::HashMap<i64, i64> = std::collections::HashMap::new();
    let (mut r_users, mut r_seqs, mut r_ids, mut r_prev, mut r_hash, mut r_content) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut r_mac: Vec<Option<Vec<u8>>> = vec![];
    for entry in found {
        let entry_id: i64 = entry.get("id");
        if done.contains(&entry_id) || recorded.contains_key(&entry_id) {
            continue;
        }
        let user: String = entry.get("user_id");
        let Some((seq, prev)) = heads.get_mut(&user) else {
            // The head exists (inserted above): another transaction holds it.
            continue;
        };
        let content = content_of(entry)?;
        let hash = link(prev, &content);
        *seq += 1;
        r_users.push(user);
        r_seqs.push(*seq);
        r_ids.push(entry_id);
        r_prev.push(std::mem::replace(prev, hash.to_vec()));
        r_hash.push(hash.to_vec());
        r_mac.push(key.map(|k| k.mac(&hash)));
        r_content.push(content);
        recorded.insert(entry_id, *seq);
    }
    if !r_ids.is_empty() {
        let insert = tx
            .prepare_cached(
                "INSERT INTO audit_records (user_id, seq, entry_id, prev_hash, hash, content, mac) \
                 SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::bytea[], $5::bytea[], $6::text[], $7::bytea[])",
            )
            .await?;
        tx.execute(
            &insert,
            &[
                &r_users, &r_seqs, &r_ids, &r_prev, &r_hash, &r_content, &r_mac,
            ],
        )
        .await?;
        let h_users: Vec<&str> = heads.keys().map(String::as_str).collect();
        let h_seqs: Vec<i64> = h_users.iter().map(|u| heads[*u].0).collect();
        let h_hashes: Vec<&[u8]> = h_users.iter().map(|u| heads[*u].1.as_slice()).collect();
        let advance = tx
            .prepare_cached(
                "UPDATE audit_heads h SET seq = v.seq, hash = v.hash \
                 FROM unnest($1::text[], $2::int8[], $3::bytea[]) AS v(user_id, seq, hash) \
                 WHERE h.user_id = v.user_id AND h.user_id = ANY($1) AND h.seq <> v.seq",
            )
            .await?;
        tx.execute(&advance, &[&h_users, &h_seqs, &h_hashes])
            .await?;
    }
    tx.commit().await?;
    if !r_ids.is_empty() {
        let advanced: std::collections::HashSet<&str> =
            r_users.iter().map(String::as_str).collect();
        log_heads(
            r_ids.len(),
            heads
                .iter()
                .filter(|(user, _)| advanced.contains(user.as_str()))
                .map(|(user, (seq, hash))| (user.as_str(), *seq, hash.as_slice())),
        );
    }
    if let Some(oldest) = entries
        .iter()
        .filter(|r| recorded.contains_key(&r.get::<_, i64>("id")))
        .map(|r| r.get::<_, OffsetDateTime>("created_at"))
        .min()
    {
        observe_lag(oldest);
    }

    let existing: std::collections::HashSet<(String, i64)> = entries
        .iter()
        .map(|r| (r.get("user_id"), r.get("id")))
        .collect();
    let mut answered = std::collections::HashSet::new();
    Ok(items
        .iter()
        .map(|(user, id)| {
            if !existing.contains(&(user.clone(), *id)) {
                Appended::NoSuchEntry
            } else if !heads.contains_key(user) {
                Appended::Busy
            } else if let Some(seq) = recorded.get(id)
                && answered.insert(*id)
            {
                Appended::Recorded(*seq)
            } else {
                Appended::AlreadyRecorded
            }
        })
        .collect())
}

/// One problem `verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Whose chain.
    pub user_id: String,
    /// What is wrong.
    pub detail: String,
}

/// What `verify` checked and found.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// Audit records checked.
    pub records_checked: i64,
    /// Ledger entries checked for a record.
    pub entries_checked: i64,
    /// Whether the records' MACs were checked (a key was given).
    pub macs_checked: bool,
    /// Records carrying a MAC (checked when `macs_checked`).
    pub records_with_mac: i64,
    /// Records without a MAC, each before its chain's first MAC'd record:
    /// written before `AUDIT_HMAC_KEY` was set (not a problem unless MACs
    /// are required).
    pub records_without_mac: i64,
    /// Links of the chain in the ledger checked (entries written since V18).
    pub links_checked: i64,
    /// Checkpoints checked.
    pub checkpoints_checked: i64,
    /// Checkpoints carrying a MAC (checked when `macs_checked`).
    pub checkpoints_with_mac: i64,
    /// Checkpoints without one (written by a worker without the key).
    pub checkpoints_without_mac: i64,
    /// Links no checkpoint covers yet: written, their `ledger-audit` job
    /// not handled yet (the audit's lag, not a problem by itself).
    pub links_awaiting_checkpoint: i64,
    /// Every problem.
    pub findings: Vec<Finding>,
}

/// How `verify` treats the records' MACs.
#[derive(Debug, Clone, Default)]
pub struct MacCheck {
    /// The keys a MAC may be made with: `AUDIT_HMAC_KEY` first, then the
    /// keys it replaced (records keep the MAC of the key they were written
    /// under). Empty: MACs are not checked.
    pub keys: Vec<MacKey>,
    /// Every record must carry a MAC (the key was set before the first
    /// record): a record without one is a finding.
    pub require: bool,
}

/// Checks every chain link, every record against its ledger entry, and that
/// every ledger entry has its record (MACs: see [`verify_with_progress`]).
pub async fn verify(client: &mut Client, macs: &MacCheck) -> Result<Verification, DbError> {
    verify_with_progress(client, macs, &|_, _, _| {}).await
}

/// [`verify`], calling `progress(stage, done, total)` along the way.
///
/// MACs: with keys, a MAC that none of them made is a finding (the record
/// was rewritten by someone without the key). With or without keys, a
/// record without a MAC after a record with one in its chain is a finding
/// (a MAC removed); records without a MAC before their chain's first MAC
/// are counted in `records_without_mac`, and are findings only when
/// `require` is set.
pub async fn verify_with_progress(
    client: &mut Client,
    macs: &MacCheck,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<Verification, DbError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    // An operator's check over millions of rows: no statement timeout, and
    // the records are streamed, one at a time, so memory stays flat.
    tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
    let mut findings = Vec::new();
    let total = tx
        .query_one("SELECT count(*) FROM audit_records", &[])
        .await?
        .get::<_, i64>(0)
        .max(0) as u64;
    // A portal read a page at a time: the connection never holds more than
    // one page, however slow the checking (a plain query's rows would all be
    // buffered by the connection as fast as the server sends them).
    let statement = tx
        .prepare(
            "SELECT a.user_id AS chain_user, a.seq, a.entry_id, a.prev_hash, a.hash, a.content, a.mac, \
                    l.id, l.user_id, l.kind, l.amount, l.balance_after, l.app_name, l.description, \
                    l.project_code, l.reference, l.created_at \
             FROM audit_records a \
             LEFT JOIN ledger_entries l ON l.user_id = a.user_id AND l.id = a.entry_id \
             ORDER BY a.user_id, a.seq",
        )
        .await?;
    let portal = tx.bind(&statement, &[]).await?;
    let mut current: Option<String> = None;
    let mut expected_seq = 1;
    let mut prev: Vec<u8> = GENESIS.to_vec();
    // The seq of the current chain's first record with a MAC, once seen.
    let mut first_mac: Option<i64> = None;
    let (mut with_mac, mut without_mac) = (0_i64, 0_i64);
    let mut checked: u64 = 0;
    let mut page = tx.query_portal(&portal, VERIFY_PAGE).await?;
    while !page.is_empty() {
        for r in &page {
            if checked.is_multiple_of(5000) {
                progress("audit records", checked, total);
            }
            checked += 1;
            let user: String = r.get("chain_user");
            if current.as_deref() != Some(user.as_str()) {
                current = Some(user.clone());
                expected_seq = 1;
                prev = GENESIS.to_vec();
                first_mac = None;
            }
            let seq: i64 = r.get("seq");
            let entry_id: i64 = r.get("entry_id");
            let stored_prev: Vec<u8> = r.get("prev_hash");
            let stored_hash: Vec<u8> = r.get("hash");
            let content: String = r.get("content");
            let mac: Option<Vec<u8>> = r.get("mac");
            let mut problem = |detail: String| {
                findings.push(Finding {
                    user_id: user.clone(),
                    detail,
                })
            };
            if seq != expected_seq {
                problem(format!(
                    "record {seq} found where {expected_seq} was expected (a record is missing)"
                ));
            }
            if stored_prev != prev {
                problem(format!(
                    "record {seq} does not link to the record before it"
                ));
            }
            if link(&stored_prev, &content).as_slice() != stored_hash.as_slice() {
                problem(format!(
                    "record {seq} (entry {entry_id}) was altered: its hash does not match its content"
                ));
            }
            let ledger_id: Option<i64> = r.get("id");
            if ledger_id.is_none() {
                // Joined on the user too (co-located on Citus): an entry of
                // another user is not this chain's entry either.
                problem(format!(
                    "record {seq} names ledger entry {entry_id}, which is not in this user's ledger"
                ));
            } else {
                let expected = content_of(r)?;
                if expected != content {
                    problem(format!(
                        "record {seq} does not match ledger entry {entry_id}"
                    ));
                }
            }
            match (&mac, first_mac) {
                (Some(mac), _) => {
                    with_mac += 1;
                    first_mac.get_or_insert(seq);
                    if !macs.keys.is_empty()
                        && !macs.keys.iter().any(|k| k.verifies(&stored_hash, mac))
                    {
                        problem(format!(
                            "record {seq} (entry {entry_id}) has a MAC that AUDIT_HMAC_KEY did not make: \
                             the record or the chain before it was rewritten"
                        ));
                    }
                }
                (None, Some(first)) => problem(format!(
                    "record {seq} (entry {entry_id}) has no MAC, but record {first} before it has one: \
                     its MAC was removed"
                )),
                (None, None) => {
                    without_mac += 1;
                    if macs.require {
                        problem(format!(
                            "record {seq} (entry {entry_id}) has no MAC, and every record must have one"
                        ));
                    }
                }
            }
            prev = stored_hash;
            expected_seq = seq + 1;
        }
        page = tx.query_portal(&portal, VERIFY_PAGE).await?;
    }
    progress("audit records", checked, checked.max(total));
    let heads = tx
        .query(
            "SELECT h.user_id, h.seq, h.hash, a.hash AS last_hash FROM audit_heads h \
             LEFT JOIN audit_records a ON a.user_id = h.user_id AND a.seq = h.seq \
             WHERE h.seq > 0 AND a.hash IS DISTINCT FROM h.hash",
            &[],
        )
        .await?;
    for h in heads {
        let head_hash: Vec<u8> = h.get("hash");
        let last: Option<Vec<u8>> = h.get("last_hash");
        if last.as_deref() != Some(head_hash.as_slice()) {
            findings.push(Finding {
                user_id: h.get("user_id"),
                detail: format!(
                    "the chain's head (record {}) is missing or altered",
                    h.get::<_, i64>("seq")
                ),
            });
        }
    }
    let chain = verify_chain(&tx, macs, progress, &mut findings).await?;
    let missing = tx
        .query(
            "SELECT l.user_id, count(*) AS missing, min(l.id) AS first FROM ledger_entries l \
             WHERE l.hash IS NULL AND NOT EXISTS (SELECT 1 FROM audit_records a \
                               WHERE a.user_id = l.user_id AND a.entry_id = l.id) \
             GROUP BY l.user_id",
            &[],
        )
        .await?;
    for m in missing {
        findings.push(Finding {
            user_id: m.get("user_id"),
            detail: format!(
                "{} ledger entries have no audit record (first: entry {})",
                m.get::<_, i64>("missing"),
                m.get::<_, i64>("first")
            ),
        });
    }
    let entries: i64 = tx
        .query_one("SELECT count(*) FROM ledger_entries", &[])
        .await?
        .get(0);
    tx.commit().await?;
    findings.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    Ok(Verification {
        records_checked: checked as i64,
        entries_checked: entries,
        macs_checked: !macs.keys.is_empty(),
        records_with_mac: with_mac,
        records_without_mac: without_mac,
        links_checked: chain.links,
        checkpoints_checked: chain.checkpoints,
        checkpoints_with_mac: chain.with_mac,
        checkpoints_without_mac: chain.without_mac,
        links_awaiting_checkpoint: chain.awaiting,
        findings,
    })
}

/// What [`verify_chain`] counted.
#[derive(Debug, Default)]
struct ChainCounts {
    links: i64,
    checkpoints: i64,
    with_mac: i64,
    without_mac: i64,
    awaiting: i64,
}

/// The chain in the ledger (V18): every link of every user in id order
/// (seq from 1 without gap, predecessor's hash, own hash over the entry as
/// stored), each chain's first link (to the start or to the old chain), the
/// heads on the accounts, and the checkpoints (their entry, hash and MAC).
async fn verify_chain(
    tx: &deadpool_postgres::Transaction<'_>,
    macs: &MacCheck,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
    findings: &mut Vec<Finding>,
) -> Result<ChainCounts, DbError> {
    let mut counts = ChainCounts::default();
    let statement = tx
        .prepare(
            "SELECT id, user_id, kind, amount, balance_after, app_name, description, project_code, \
                    reference, created_at, chain_seq, prev_hash, hash, acted_by \
             FROM ledger_entries WHERE hash IS NOT NULL ORDER BY user_id, id",
        )
        .await?;
    let portal = tx.bind(&statement, &[]).await?;
    let mut current: Option<String> = None;
    let mut expected_seq = 1;
    let mut prev: Vec<u8> = GENESIS.to_vec();
    let mut carried: Vec<(String, Vec<u8>)> = Vec::new();
    let mut page = tx.query_portal(&portal, VERIFY_PAGE).await?;
    while !page.is_empty() {
        for r in &page {
            if (counts.links as u64).is_multiple_of(5000) {
                progress("ledger chain links", counts.links as u64, 0);
            }
            counts.links += 1;
            let content = crate::chain::content_of_row(r)?;
            let user = content.user_id.to_owned();
            if current.as_deref() != Some(user.as_str()) {
                current = Some(user.clone());
                expected_seq = 1;
                prev = GENESIS.to_vec();
            }
            let stored_prev: Vec<u8> = r.try_get("prev_hash")?;
            let stored_hash: Vec<u8> = r.try_get("hash")?;
            let (id, seq) = (content.entry_id, content.seq);
            let mut problem = |detail: String| {
                findings.push(Finding {
                    user_id: user.clone(),
                    detail,
                })
            };
            if seq != expected_seq {
                problem(format!(
                    "entry {id} is link {seq} where link {expected_seq} was expected \
                     (a link was deleted, inserted or moved)"
                ));
            }
            if seq == 1 && expected_seq == 1 {
                if stored_prev != GENESIS {
                    carried.push((user.clone(), stored_prev.clone()));
                }
            } else if stored_prev != prev {
                problem(format!(
                    "entry {id} (link {seq}) does not link to the entry before it"
                ));
            }
            if crate::chain::hash_of(&content, &stored_prev)?.as_slice() != stored_hash.as_slice() {
                problem(format!(
                    "entry {id} (link {seq}) was altered: its hash does not match its content"
                ));
            }
            prev = stored_hash;
            expected_seq = seq + 1;
        }
        page = tx.query_portal(&portal, VERIFY_PAGE).await?;
    }
    progress(
        "ledger chain links",
        counts.links as u64,
        counts.links as u64,
    );
    if !carried.is_empty() {
        let users: Vec<&str> = carried.iter().map(|c| c.0.as_str()).collect();
        let hashes: Vec<&[u8]> = carried.iter().map(|c| c.1.as_slice()).collect();
        let found: std::collections::HashSet<String> = tx
            .query(
                "SELECT k.user_id FROM unnest($1::text[], $2::bytea[]) AS k(user_id, hash) \
                 WHERE EXISTS (SELECT 1 FROM audit_records a WHERE a.user_id = k.user_id AND a.hash = k.hash)",
                &[&users, &hashes],
            )
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        for (user, _) in carried.iter().filter(|(u, _)| !found.contains(u)) {
            findings.push(Finding {
                user_id: user.clone(),
                detail: "the chain's first link links to neither the start nor a record of the old chain"
                    .into(),
            });
        }
    }
    // Heads: the account's head is its chain's last link.
    for h in tx
        .query(
            "SELECT a.user_id, a.chain_seq, \
                    (SELECT max(l.chain_seq) FROM ledger_entries l WHERE l.user_id = a.user_id) AS last \
             FROM accounts a \
             WHERE (a.chain_seq > 0 AND NOT EXISTS (SELECT 1 FROM ledger_entries l \
                      WHERE l.user_id = a.user_id AND l.chain_seq = a.chain_seq AND l.hash = a.chain_hash)) \
                OR EXISTS (SELECT 1 FROM ledger_entries l WHERE l.user_id = a.user_id AND l.chain_seq > a.chain_seq)",
            &[],
        )
        .await?
    {
        let last: Option<i64> = h.get("last");
        findings.push(Finding {
            user_id: h.get("user_id"),
            detail: format!(
                "the account's chain head (link {}) is not the chain's last link ({}): \
                 links were cut off or the head was altered",
                h.get::<_, i64>("chain_seq"),
                last.map_or("none".to_owned(), |l| l.to_string())
            ),
        });
    }
    // Checkpoints: each names a link that is there, with its hash, and
    // carries a MAC the key made.
    for c in tx
        .query(
            "SELECT c.user_id, c.seq, c.entry_id, c.hash, c.mac, l.chain_seq AS link_seq, l.hash AS link_hash \
             FROM audit_checkpoints c \
             LEFT JOIN ledger_entries l ON l.user_id = c.user_id AND l.id = c.entry_id",
            &[],
        )
        .await?
    {
        counts.checkpoints += 1;
        let user: String = c.get("user_id");
        let seq: i64 = c.get("seq");
        let entry_id: i64 = c.get("entry_id");
        let hash: Vec<u8> = c.get("hash");
        let mac: Option<Vec<u8>> = c.get("mac");
        let link_seq: Option<i64> = c.get("link_seq");
        let link_hash: Option<Vec<u8>> = c.get("link_hash");
        if link_seq != Some(seq) || link_hash.as_deref() != Some(hash.as_slice()) {
            findings.push(Finding {
                user_id: user.clone(),
                detail: format!(
                    "the checkpoint (link {seq}, entry {entry_id}) does not match the ledger: \
                     the entry or the checkpoint was altered"
                ),
            });
        }
        match mac {
            Some(mac) => {
                counts.with_mac += 1;
                if !macs.keys.is_empty() && !macs.keys.iter().any(|k| k.verifies(&hash, &mac)) {
                    findings.push(Finding {
                        user_id: user,
                        detail: format!(
                            "the checkpoint (link {seq}) has a MAC that AUDIT_HMAC_KEY did not make: \
                             the checkpoint or the chain was rewritten"
                        ),
                    });
                }
            }
            None => {
                counts.without_mac += 1;
                if macs.require {
                    findings.push(Finding {
                        user_id: user,
                        detail: format!(
                            "the checkpoint (link {seq}) has no MAC, and every checkpoint must have one"
                        ),
                    });
                }
            }
        }
    }
    counts.awaiting = tx
        .query_one(
            "SELECT coalesce(sum(a.chain_seq - coalesce(c.seq, 0)), 0)::int8 FROM accounts a \
             LEFT JOIN audit_checkpoints c ON c.user_id = a.user_id \
             WHERE a.chain_seq > coalesce(c.seq, 0)",
            &[],
        )
        .await?
        .get(0);
    Ok(counts)
}

/// Fetches a ledger entry's canonical content (for tests and tools).
pub async fn entry_content(
    client: &impl GenericClient,
    entry_id: i64,
) -> Result<Option<String>, DbError> {
    client
        .query_opt(
            &format!("SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE id = $1"),
            &[&entry_id],
        )
        .await?
        .map(|r| content_of(&r))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mac_is_hmac_sha256_of_the_hash_as_rfc_4231_says() {
        // RFC 4231, test case 2: key "Jefe".
        let key = MacKey::new(&Secret::new("Jefe")).expect("key");
        assert_eq!(
            hex::encode(key.mac(b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // RFC 4231, test case 1: key 0x0b × 20.
        let key = MacKey::new(&Secret::new("\u{0b}".repeat(20))).expect("key");
        assert_eq!(
            hex::encode(key.mac(b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
    }

    #[test]
    fn a_mac_verifies_under_its_key_only() {
        let key = MacKey::new(&Secret::new("k".repeat(32))).expect("key");
        let other = MacKey::new(&Secret::new("o".repeat(32))).expect("key");
        let hash = link(&GENESIS, "{}");
        let mac = key.mac(&hash);
        assert!(key.verifies(&hash, &mac));
        assert!(!other.verifies(&hash, &mac));
        assert!(!key.verifies(&link(&GENESIS, "{ }"), &mac));
        assert!(!key.verifies(&hash, &mac[..31]));
    }

    /// A content whose serialisation fails, as a map with a non-string key
    /// or a failing `Serialize` would.
    struct Unserialisable;

    impl Serialize for Unserialisable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("no canonical form"))
        }
    }

    #[test]
    fn a_content_that_cannot_be_serialised_is_an_error_not_the_hash_of_nothing() {
        let e = canonical(&Unserialisable).expect_err("an error, not an empty content");
        assert!(
            matches!(&e, DbError::Other(m) if m.contains("no canonical form")),
            "{e}"
        );
        // Not transient: the job is parked with the reason, not retried forever.
        assert!(!e.is_transient());
        let map: std::collections::BTreeMap<(i32, i32), i32> = [((1, 2), 3)].into();
        assert!(
            canonical(&map).is_err(),
            "serde_json refuses non-string keys"
        );
    }

    #[test]
    fn an_entry_serialises_to_its_canonical_json_in_field_order() {
        let content = Content {
            entry_id: 7,
            user_id: "u1",
            kind: "deduct",
            amount: -5,
            balance_after: 45,
            app_name: "imagegene",
            description: None,
            project_code: Some("p1"),
            reference: None,
            created_at: "2026-01-02T03:04:05.678Z".into(),
        };
        assert_eq!(
            canonical(&content).expect("serialised"),
            r#"{"entry_id":7,"user_id":"u1","kind":"deduct","amount":-5,"balance_after":45,"app_name":"imagegene","description":null,"project_code":"p1","reference":null,"created_at":"2026-01-02T03:04:05.678Z"}"#
        );
    }

    #[test]
    fn a_mac_key_never_prints() {
        let key = MacKey::new(&Secret::new("secret-audit-key-0123456789abcdef")).expect("key");
        assert_eq!(format!("{key:?}"), "MacKey([redacted])");
    }
}
