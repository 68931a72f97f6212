//! Group commit for deductions, and batched reads of account summaries.
//!
//! Every `deduct-credits` request goes through one queue. A dispatcher takes
//! the first waiting request, and with it every other request waiting at
//! that moment (up to `DEDUCT_BATCH_MAX`), and runs them as one transaction
//! ([`ledger::deduct_all`]); at most `DEDUCT_BATCHES_IN_FLIGHT` such
//! batches run at once. When the service is quiet a request goes alone
//! and at once; under load, requests that would have queued for a connection
//! or a row lock share one commit instead. The ledger has one implementation
//! of a deduction, for a batch, so an answer never depends on the company a
//! request keeps.
//!
//! `user-info` reads go through a queue of the same kind ([`Summaries`]): the
//! users waiting at one moment are read with one statement.

use std::{future::Future, sync::Arc};

use deadpool_postgres::Pool;
use penora_common::{
    db::DbError,
    domain::UserId,
    ledger::{self, AccountSummary, Answer, Deduct, DeductReceipt, LedgerError, Queued},
};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// A request waiting for its batch, and where its answer goes.
type Waiting<T, R> = (T, oneshot::Sender<R>);

/// A queue whose waiting requests are taken together: at most `in_flight`
/// batches run at once, each with every request waiting when it starts (up
/// to `batch_max`). Cheap to clone.
struct Batcher<T, R> {
    queue: mpsc::UnboundedSender<Waiting<T, R>>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    fn start<F, Fut>(pool: Pool, batch_max: usize, in_flight: usize, run: F) -> Self
    where
        F: Fn(Pool, Vec<Waiting<T, R>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(
            pool,
            waiting,
            batch_max.max(1),
            Arc::new(Semaphore::new(in_flight.max(1))),
            run,
        ));
        Self { queue }
    }

    /// The request's answer; `None` if the dispatcher is gone.
    async fn submit(&self, request: T) -> Option<R> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((request, reply)).ok()?;
        answer.await.ok()
    }
}

async fn dispatch<T, R, F, Fut>(
    pool: Pool,
    mut waiting: mpsc::UnboundedReceiver<Waiting<T, R>>,
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
        let Some(first) = waiting.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < batch_max {
            match waiting.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let work = run(pool.clone(), batch);
        tokio::spawn(async move {
            work.await;
            drop(slot);
        });
    }
}

/// The queue of deductions; cheap to clone.
#[derive(Clone)]
pub struct Coalescer {
    batcher: Batcher<Queued, Answer<DeductReceipt>>,
}

impl Coalescer {
    /// Starts the dispatcher on the current runtime.
    pub fn start(pool: Pool, batch_max: usize, in_flight: usize) -> Self {
        Self {
            batcher: Batcher::start(pool, batch_max, in_flight, run_deducts),
        }
    }

    /// Carries out a deduction (with whatever others are waiting).
    pub async fn deduct(
        &self,
        deduct: Deduct,
        correlation_id: Option<String>,
    ) -> Answer<DeductReceipt> {
        let queued = Queued {
            deduct,
            correlation_id,
        };
        self.batcher.submit(queued).await.unwrap_or_else(|| {
            Err(LedgerError::Db(DbError::Unavailable(
                "the deduction queue stopped".into(),
            )))
        })
    }
}

/// Reads of account summaries (`user-info`), taken together under load: one
/// statement answers every user waiting at that moment. Cheap to clone.
#[derive(Clone)]
pub struct Summaries {
    batcher: Batcher<UserId, Result<Option<AccountSummary>, DbError>>,
}

impl Summaries {
    /// Starts the dispatcher on the current runtime.
    pub fn start(pool: Pool, batch_max: usize, in_flight: usize) -> Self {
        Self {
            batcher: Batcher::start(pool, batch_max, in_flight, run_summaries),
        }
    }

    /// The user's summary; `None` when the user has no account.
    pub async fn get(&self, user: UserId) -> Result<Option<AccountSummary>, DbError> {
        self.batcher
            .submit(user)
            .await
            .unwrap_or_else(|| Err(DbError::Unavailable("the read queue stopped".into())))
    }
}

async fn run_summaries(
    pool: Pool,
    batch: Vec<Waiting<UserId, Result<Option<AccountSummary>, DbError>>>,
) {
    metrics::histogram!("penora_read_batch_size").record(batch.len() as f64);
    let found = async {
        let client = pool.get().await?;
        if let [(user, _)] = batch.as_slice() {
            let one = ledger::account_summary(&client, user).await?;
            return Ok(one.into_iter().map(|s| (user.to_string(), s)).collect());
        }
        let users: Vec<&str> = batch.iter().map(|(u, _)| u.as_str()).collect();
        ledger::account_summaries(&client, &users).await
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

async fn run_deducts(pool: Pool, batch: Vec<Waiting<Queued, Answer<DeductReceipt>>>) {
    metrics::histogram!("penora_deduct_batch_size").record(batch.len() as f64);
    let mut client = match pool.get().await {
        Ok(c) => c,
        Err(e) => {
            let e = DbError::from(e);
            for (_, reply) in batch {
                let _ = reply.send(Err(LedgerError::Db(e.clone())));
            }
            return;
        }
    };
    let (queued, replies): (Vec<Queued>, Vec<oneshot::Sender<Answer<DeductReceipt>>>) =
        batch.into_iter().unzip();
    let answers = ledger::deduct_all(&mut client, &queued).await;
    for (reply, answer) in replies.into_iter().zip(answers) {
        let _ = reply.send(answer);
    }
}
