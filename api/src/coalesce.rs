//! Group commit for deductions, and batched reads of account summaries.
//!
//! Every `deduct-credits` request goes through one bounded queue
//! (`DEDUCT_QUEUE_MAX`; past it, `503 busy` at once). A dispatcher takes the
//! first waiting request, and with it every other request waiting at that
//! moment (up to `DEDUCT_BATCH_MAX`), and runs them as one transaction
//! ([`ledger::deduct_all`]); at most `DEDUCT_BATCHES_IN_FLIGHT` such batches
//! run at once. When the service is quiet a request goes alone and at once;
//! under load, requests that would have queued for a connection or a row
//! lock share one commit instead. The ledger has one implementation of a
//! deduction, for a batch, so an answer never depends on the company a
//! request keeps.
//!
//! One account never holds up another. A batch does not wait for an
//! account another transaction holds (a long operator transaction, another
//! batch of the same user): it skips it ([`OnBusy::Skip`]) and hands that
//! account's requests to the account's own **lane**, which waits for the lock
//! (at most `DB_LOCK_TIMEOUT_MS`, then `503`) with one batch of that user's
//! requests at a time. While a lane is open, the user's new requests join it,
//! so they keep their order and a hot account's requests still share
//! commits. Lanes hold at most half the pool's connections.
//!
//! Nobody is left hanging: a request whose client has gone (its handler was
//! dropped) is left out before its batch starts; a batch that panics answers
//! its requests `500`.
//!
//! `user-info` reads go through a queue of the same kind ([`Summaries`]): the
//! users waiting at one moment are read together, with one statement for
//! their credits (the ledger's summaries) and one for their workspace (storage
//! and projects), sent together on one connection: two statements a batch,
//! whatever its size.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    sync::{Arc, Mutex},
    time::Instant,
};

use deadpool_postgres::Pool;
use penora_domain::UserId;
use penora_ledger as ledger;
use penora_ledger::{AccountSummary, Answer, Deduct, DeductReceipt, LedgerError, OnBusy, Queued};
use penora_store::DbError;
use penora_workspace::projects::{self, Usage};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::ApiError;

/// A request waiting for its batch, and where its answer goes.
type Waiting<T, R> = (T, oneshot::Sender<R>);

/// Why a request got no answer from its batch.
#[derive(Debug)]
enum Unanswered {
    /// The queue was full.
    Full,
    /// The dispatcher is gone.
    Stopped,
    /// The batch ended without answering (it panicked).
    Dropped,
}

/// A queue whose waiting requests are taken together: at most `in_flight`
/// batches run at once, each with every request waiting when it starts (up
/// to `batch_max`); requests whose caller has gone are left out. Cheap to
/// clone.
struct Batcher<T, R> {
    queue: mpsc::Sender<(Waiting<T, R>, Instant)>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// `queued` names the histogram of how long a request waited in the
    /// queue before a batch took it.
    fn start<F, Fut>(
        queued: &'static str,
        pool: Pool,
        capacity: usize,
        batch_max: usize,
        in_flight: usize,
        run: F,
    ) -> Self
    where
        F: Fn(Pool, Vec<Waiting<T, R>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (queue, waiting) = mpsc::channel(capacity.max(1));
        tokio::spawn(dispatch(
            queued,
            pool,
            waiting,
            batch_max.max(1),
            Arc::new(Semaphore::new(in_flight.max(1))),
            run,
        ));
        Self { queue }
    }

    /// The request's answer.
    async fn submit(&self, request: T) -> Result<R, Unanswered> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(((request, reply), Instant::now()))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Unanswered::Full,
                mpsc::error::TrySendError::Closed(_) => Unanswered::Stopped,
            })?;
        answer.await.map_err(|_| Unanswered::Dropped)
    }
}

async fn dispatch<T, R, F, Fut>(
    queued: &'static str,
    pool: Pool,
    mut waiting: mpsc::Receiver<(Waiting<T, R>, Instant)>,
    batch_max: usize,
    slots: Arc<Semaphore>,
    run: F,
) where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Pool, Vec<Waiting<T, R>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::new();
        while batch.is_empty() {
            let Some((first, at)) = waiting.recv().await else {
                return;
            };
            metrics::histogram!(queued).record(at.elapsed().as_secs_f64());
            batch.push(first);
            while batch.len() < batch_max {
                match waiting.try_recv() {
                    Ok((next, at)) => {
                        metrics::histogram!(queued).record(at.elapsed().as_secs_f64());
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            drop_abandoned(&mut batch);
        }
        // A panic ends this task only: the slot is released as it unwinds,
        // and the dropped replies answer their requests `500`.
        let work = run(pool.clone(), batch);
        tokio::spawn(async move {
            work.await;
            drop(slot);
        });
    }
}

/// Leaves out the requests whose caller has gone: carried out, they would
/// move credits that no one is told about.
fn drop_abandoned<T, R>(batch: &mut Vec<Waiting<T, R>>) {
    let before = batch.len();
    batch.retain(|(_, reply)| !reply.is_closed());
    let gone = before - batch.len();
    if gone > 0 {
        metrics::counter!("penora_requests_abandoned_total").increment(gone as u64);
    }
}

/// A deduction waiting for its batch.
type WaitingDeduct = Waiting<Queued, Answer<DeductReceipt>>;

/// The queue of deductions; cheap to clone.
#[derive(Clone)]
pub struct Coalescer {
    batcher: Batcher<Queued, Answer<DeductReceipt>>,
}

impl Coalescer {
    /// Starts the dispatcher on the current runtime.
    pub fn start(pool: Pool, capacity: usize, batch_max: usize, in_flight: usize) -> Self {
        let lanes = Lanes::new(&pool);
        Self {
            batcher: Batcher::start(
                "penora_deduct_queue_seconds",
                pool,
                capacity,
                batch_max,
                in_flight,
                move |pool, batch| run_deducts(pool, lanes.clone(), batch),
            ),
        }
    }

    /// Carries out a deduction (with whatever others are waiting).
    pub async fn deduct(
        &self,
        deduct: Deduct,
        correlation_id: Option<String>,
    ) -> Result<ledger::Outcome<DeductReceipt>, ApiError> {
        let queued = Queued {
            deduct,
            correlation_id,
        };
        match self.batcher.submit(queued).await {
            Ok(answer) => Ok(answer?),
            Err(Unanswered::Full) => {
                metrics::counter!("penora_deduct_queue_full_total").increment(1);
                Err(ApiError::Busy {
                    what: "deductions waiting",
                    retry_after_secs: 1,
                })
            }
            Err(Unanswered::Stopped) => {
                Err(ApiError::Unavailable("the deduction queue stopped".into()))
            }
            Err(Unanswered::Dropped) => Err(ApiError::Internal(
                "a deduction batch ended without answering".into(),
            )),
        }
    }
}

/// Carries out one batch of the main queue: requests of a user with an open
/// lane join it; the others go in one transaction that skips held accounts,
/// whose requests then open (or join) their user's lane.
async fn run_deducts(pool: Pool, lanes: Lanes, batch: Vec<WaitingDeduct>) {
    let batch = lanes.take_laned(batch);
    if batch.is_empty() {
        return;
    }
    metrics::histogram!("penora_deduct_batch_size").record(batch.len() as f64);
    let (queued, replies): (Vec<Queued>, Vec<oneshot::Sender<Answer<DeductReceipt>>>) =
        batch.into_iter().unzip();
    let answers = if penora_store::distributed() {
        deduct_per_shard(&pool, &queued).await
    } else {
        deduct_on(&pool, &queued, OnBusy::Skip).await
    };
    for ((q, reply), answer) in queued.into_iter().zip(replies).zip(answers) {
        match answer {
            Err(LedgerError::AccountBusy) => lanes.join((q, reply)),
            answer => {
                let _ = reply.send(answer);
            }
        }
    }
}

/// On a distributed database (Citus): the batch split per shard, each part
/// a batch of its own on a connection of its own, all at once, so that one
/// shard's transaction neither waits for another's locks nor for its turn
/// on a shared connection. Answers in the batch's order.
async fn deduct_per_shard(pool: &Pool, queued: &[Queued]) -> Vec<Answer<DeductReceipt>> {
    let split = match pool.get().await {
        Ok(client) => {
            penora_store::shard_parts(&client, queued, |q| q.deduct.user_id.as_str()).await
        }
        Err(e) => Err(DbError::from(e)),
    };
    let (groups, parts) = match split {
        Ok(split) => split,
        Err(e) => return queued.iter().map(|_| Err(e.clone().into())).collect(),
    };
    let answers = futures_util::future::join_all(
        parts.iter().map(|part| deduct_on(pool, part, OnBusy::Skip)),
    )
    .await;
    penora_store::in_places(queued.len(), &groups, answers, || {
        Err(DbError::Other("a deduction went unanswered".into()).into())
    })
}

/// [`ledger::deduct_all`] on a connection of `pool`; without one, every
/// request is answered with the pool's error. The wait for the connection
/// and the transaction are timed (`penora_deduct_pool_wait_seconds`,
/// `penora_deduct_transaction_seconds`): with the queue's wait, where a
/// deduction's time goes.
async fn deduct_on(pool: &Pool, queued: &[Queued], on_busy: OnBusy) -> Vec<Answer<DeductReceipt>> {
    let asked = Instant::now();
    let client = pool.get().await;
    metrics::histogram!("penora_deduct_pool_wait_seconds").record(asked.elapsed().as_secs_f64());
    match client {
        Ok(mut client) => {
            let started = Instant::now();
            let answers = ledger::deduct_all(&mut client, queued, on_busy).await;
            metrics::histogram!("penora_deduct_transaction_seconds")
                .record(started.elapsed().as_secs_f64());
            answers
        }
        Err(e) => {
            let e = DbError::from(e);
            queued.iter().map(|_| Err(e.clone().into())).collect()
        }
    }
}

/// The accounts that another transaction held when a batch came to them,
/// each with the requests waiting to be carried out for it, one batch of the
/// account at a time. Cheap to clone.
#[derive(Clone)]
struct Lanes {
    pool: Pool,
    open: Arc<Mutex<HashMap<String, VecDeque<WaitingDeduct>>>>,
    /// Connections the lanes may hold at once (waiting for a lock).
    slots: Arc<Semaphore>,
}

impl Lanes {
    fn new(pool: &Pool) -> Self {
        Self {
            pool: pool.clone(),
            open: Arc::default(),
            slots: Arc::new(Semaphore::new((pool.status().max_size / 2).max(1))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<WaitingDeduct>>> {
        // The map is only ever changed by whole operations: a poisoned lock
        // still holds a consistent map.
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Moves the requests of users with an open lane into it, and returns
    /// the rest.
    fn take_laned(&self, batch: Vec<WaitingDeduct>) -> Vec<WaitingDeduct> {
        let mut open = self.lock();
        if open.is_empty() {
            return batch;
        }
        let mut rest = Vec::with_capacity(batch.len());
        for waiting in batch {
            match open.get_mut(waiting.0.deduct.user_id.as_str()) {
                Some(lane) => lane.push_back(waiting),
                None => rest.push(waiting),
            }
        }
        rest
    }

    /// Adds a request to its user's lane, opening the lane if needed.
    fn join(&self, waiting: WaitingDeduct) {
        let user = waiting.0.deduct.user_id.to_string();
        let mut open = self.lock();
        if let Some(lane) = open.get_mut(&user) {
            lane.push_back(waiting);
            return;
        }
        open.insert(user.clone(), VecDeque::from([waiting]));
        drop(open);
        metrics::counter!("penora_deduct_lanes_opened_total").increment(1);
        tokio::spawn(self.clone().drive(user));
    }

    /// Carries out the lane's requests, one batch at a time, until none is
    /// left; then closes it.
    async fn drive(self, user: String) {
        loop {
            let mut batch: Vec<WaitingDeduct> = {
                let mut open = self.lock();
                let Some(lane) = open.get_mut(&user) else {
                    return;
                };
                if lane.is_empty() {
                    open.remove(&user);
                    return;
                }
                lane.drain(..).collect()
            };
            drop_abandoned(&mut batch);
            if batch.is_empty() {
                continue;
            }
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                return;
            };
            // Run apart, so that a panic answers this batch `500` and the
            // lane goes on (a lane left open and never driven would hold its
            // user's requests for ever).
            let pool = self.pool.clone();
            let timed_out = tokio::spawn(async move {
                let timed_out = run_lane_batch(pool, batch).await;
                drop(slot);
                timed_out
            })
            .await;
            if let Ok(Some(e)) = timed_out {
                // The account stayed held for the whole lock timeout: the
                // requests that queued meanwhile get the same answer rather
                // than a second wait.
                let waiting: Vec<WaitingDeduct> = match self.lock().get_mut(&user) {
                    Some(lane) => lane.drain(..).collect(),
                    None => Vec::new(),
                };
                for (_, reply) in waiting {
                    let _ = reply.send(Err(e.clone().into()));
                }
            }
        }
    }
}

/// One lane batch: one user's requests, waiting for the account's lock.
/// Returns the lock timeout, if the lock stayed held past it.
async fn run_lane_batch(pool: Pool, batch: Vec<WaitingDeduct>) -> Option<DbError> {
    metrics::histogram!("penora_deduct_batch_size").record(batch.len() as f64);
    let (queued, replies): (Vec<Queued>, Vec<_>) = batch.into_iter().unzip();
    let answers = deduct_on(&pool, &queued, OnBusy::Wait).await;
    let mut timed_out = None;
    for (reply, answer) in replies.into_iter().zip(answers) {
        if let Err(LedgerError::Db(e @ DbError::LockTimeout(_))) = &answer {
            timed_out = Some(e.clone());
        }
        let _ = reply.send(answer);
    }
    timed_out
}

/// What `user-info` shows of a user: the ledger's part and the workspace's.
#[derive(Debug, Clone)]
pub struct UserSummary {
    /// Credits: spendable, by category, reserved, the next expiry.
    pub credits: AccountSummary,
    /// Storage in use and projects.
    pub workspace: Usage,
}

impl UserSummary {
    /// Puts a user's two parts together; `None` without an account (the
    /// ledger's part says). The workspace's part is read by a statement of
    /// its own: should it miss an account made between the two, that
    /// account is new, and holds nothing.
    fn of(credits: Option<AccountSummary>, workspace: Option<Usage>) -> Option<Self> {
        credits.map(|credits| Self {
            credits,
            workspace: workspace.unwrap_or_default(),
        })
    }
}

/// Reads of account summaries (`user-info`), taken together under load: one
/// statement per part answers every user waiting at that moment. Cheap to
/// clone.
#[derive(Clone)]
pub struct Summaries {
    batcher: Batcher<UserId, Result<Option<UserSummary>, DbError>>,
}

impl Summaries {
    /// Starts the dispatcher on the current runtime.
    pub fn start(pool: Pool, capacity: usize, batch_max: usize, in_flight: usize) -> Self {
        Self {
            batcher: Batcher::start(
                "penora_read_queue_seconds",
                pool,
                capacity,
                batch_max,
                in_flight,
                run_summaries,
            ),
        }
    }

    /// The user's summary; `None` when the user has no account.
    pub async fn get(&self, user: UserId) -> Result<Option<UserSummary>, ApiError> {
        match self.batcher.submit(user).await {
            Ok(found) => Ok(found?),
            Err(Unanswered::Full) => Err(ApiError::Busy {
                what: "reads waiting",
                retry_after_secs: 1,
            }),
            Err(Unanswered::Stopped) => Err(ApiError::Unavailable("the read queue stopped".into())),
            Err(Unanswered::Dropped) => Err(ApiError::Internal(
                "a read batch ended without answering".into(),
            )),
        }
    }
}

async fn run_summaries(
    pool: Pool,
    batch: Vec<Waiting<UserId, Result<Option<UserSummary>, DbError>>>,
) {
    metrics::histogram!("penora_read_batch_size").record(batch.len() as f64);
    let found = async {
        let client = pool.get().await?;
        // The two parts' statements go out together on the one connection
        // (tokio-postgres pipelines them): one wait for both.
        if let [(user, _)] = batch.as_slice() {
            let (credits, workspace) = tokio::try_join!(
                ledger::account_summary(&client, user),
                projects::usage(&client, user),
            )?;
            let one = UserSummary::of(credits, workspace);
            return Ok(one.into_iter().map(|s| (user.to_string(), s)).collect());
        }
        let users: Vec<&str> = batch.iter().map(|(u, _)| u.as_str()).collect();
        let (mut credits, mut workspaces) = tokio::try_join!(
            ledger::account_summaries(&client, &users),
            projects::usages(&client, &users),
        )?;
        let found: HashMap<String, UserSummary> = users
            .iter()
            .filter_map(|&user| {
                let one = UserSummary::of(credits.remove(user), workspaces.remove(user))?;
                Some((user.to_owned(), one))
            })
            .collect();
        Ok::<_, DbError>(found)
    }
    .await;
    match found {
        Ok(found) => {
            // A user can be asked for several times in one batch: each gets it.
            for (user, reply) in batch {
                let _ = reply.send(Ok(found.get(user.as_str()).cloned()));
            }
        }
        Err(e) => {
            for (_, reply) in batch {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_that_panics_answers_its_requests_and_the_queue_goes_on() {
        // The pool is never used: it connects lazily.
        let pool =
            penora_store::pool_with("postgres://nobody@127.0.0.1:1/none", 1, 100).expect("pool");
        let batcher: Batcher<u32, u32> = Batcher::start(
            "penora_test_queue_seconds",
            pool,
            16,
            8,
            1,
            |_pool, batch: Vec<Waiting<u32, u32>>| async move {
                for (n, reply) in batch {
                    assert!(n != 13, "unlucky");
                    let _ = reply.send(n * 2);
                }
            },
        );
        assert!(matches!(batcher.submit(13).await, Err(Unanswered::Dropped)));
        // The dispatcher and its only slot survived the panic.
        assert_eq!(batcher.submit(21).await.ok(), Some(42));
    }
}
