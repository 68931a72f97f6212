//! Group commit for deductions.
//!
//! Every `deduct-credits` request goes through one queue. A dispatcher takes
//! the first waiting request, and with it every other request waiting at
//! that moment (up to `DEDUCT_BATCH_MAX`), and runs them as one transaction
//! ([`ledger::batch::deduct_many`]); at most `DEDUCT_BATCHES_IN_FLIGHT` such
//! transactions run at once. When the service is quiet a request goes alone
//! and at once; under load, requests that would have queued for a connection
//! or a row lock share one commit instead. Answers are exactly those of
//! [`ledger::deduct`]: a batch that cannot be carried out as a whole falls
//! back to running its requests one by one.

use std::sync::Arc;

use deadpool_postgres::Pool;
use penora_common::{
    db::DbError,
    ledger::{
        self, Deduct, DeductReceipt, LedgerError, Outcome,
        batch::{Answer, Queued},
    },
};
use tokio::sync::{Semaphore, mpsc, oneshot};

struct Waiting {
    queued: Queued,
    reply: oneshot::Sender<Answer>,
}

/// The queue of deductions; cheap to clone.
#[derive(Clone)]
pub struct Coalescer {
    queue: mpsc::UnboundedSender<Waiting>,
}

impl Coalescer {
    /// Starts the dispatcher on the current runtime.
    pub fn start(pool: Pool, batch_max: usize, in_flight: usize) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(
            pool,
            waiting,
            batch_max.max(1),
            Arc::new(Semaphore::new(in_flight.max(1))),
        ));
        Self { queue }
    }

    /// Carries out a deduction (with whatever others are waiting).
    pub async fn deduct(
        &self,
        deduct: Deduct,
        correlation_id: Option<String>,
    ) -> Result<Outcome<DeductReceipt>, LedgerError> {
        let (reply, answer) = oneshot::channel();
        let waiting = Waiting {
            queued: Queued {
                deduct,
                correlation_id,
            },
            reply,
        };
        let gone = || LedgerError::Db(DbError::Unavailable("the deduction queue stopped".into()));
        self.queue.send(waiting).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn dispatch(
    pool: Pool,
    mut waiting: mpsc::UnboundedReceiver<Waiting>,
    batch_max: usize,
    slots: Arc<Semaphore>,
) {
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
        let pool = pool.clone();
        tokio::spawn(async move {
            run(&pool, batch).await;
            drop(slot);
        });
    }
}

/// Answers as many of `queued` as batches can: a batch stops at a repeated
/// key and the rest goes again as the next batch; `None` for whatever must
/// run alone (a lone request, or every request left when a batch failed).
pub async fn answer_all(
    client: &mut deadpool_postgres::Client,
    queued: &[Queued],
) -> Vec<Option<Answer>> {
    let mut answers: Vec<Option<Answer>> = Vec::with_capacity(queued.len());
    while queued.len() - answers.len() > 1 {
        let rest = &queued[answers.len()..];
        match ledger::batch::deduct_many(client, rest).await {
            Ok(got) => {
                let before = answers.len();
                answers.extend(got.into_iter().map_while(|a| a.map(Some)));
                if answers.len() == before {
                    break;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, size = rest.len(), "batch fell back to one by one");
                metrics::counter!("penora_deduct_batch_fallbacks_total").increment(1);
                break;
            }
        }
    }
    answers.resize_with(queued.len(), || None);
    answers
}

async fn run(pool: &Pool, batch: Vec<Waiting>) {
    metrics::histogram!("penora_deduct_batch_size").record(batch.len() as f64);
    let mut client = match pool.get().await {
        Ok(c) => c,
        Err(e) => {
            let e = DbError::from(e);
            for w in batch {
                let _ = w.reply.send(Err(LedgerError::Db(e.clone())));
            }
            return;
        }
    };
    let (queued, replies): (Vec<Queued>, Vec<oneshot::Sender<Answer>>) =
        batch.into_iter().map(|w| (w.queued, w.reply)).unzip();
    let answers = answer_all(&mut client, &queued).await;
    for ((q, reply), answer) in queued.iter().zip(replies).zip(answers) {
        let answer = match answer {
            Some(a) => a,
            None => ledger::deduct(&mut client, &q.deduct, q.correlation_id.as_deref()).await,
        };
        let _ = reply.send(answer);
    }
}
