//! What each queue's messages do: one handler per queue, registered in one
//! table ([`HANDLERS`]).
//!
//! Rules: every handler is idempotent (running it again for a message
//! already handled changes nothing), so at-least-once delivery gives
//! exactly-once effects; a handler answers `Ok(what it did)`, a passing
//! failure (`Retryable`) or a permanent one (`Fatal`), and never touches the
//! broker. A handler with a batch form takes the messages that arrived
//! together and answers each, in order; `None` sends them one by one.

mod generation_events;
mod ledger_audit;
mod save_project;
mod webhook_delivery;
mod webhook_fanout;

use futures_util::future::BoxFuture;
use penora_domain::events::{WEBHOOK_FANOUT, WEBHOOKS};
use penora_domain::messages::{GENERATION_EVENTS, LEDGER_AUDIT, SAVE_PROJECT};

use crate::{Context, message::Message, retry::JobError};

/// What handling one message came to.
pub type JobResult = Result<String, JobError>;

/// Handles one message.
pub type One = for<'a> fn(&'a Context, &'a Message) -> BoxFuture<'a, JobResult>;

/// Handles messages that arrived together: one result per message, in
/// order, or `None` to go one by one.
pub type Many = for<'a> fn(&'a Context, &'a [Message]) -> BoxFuture<'a, Option<Vec<JobResult>>>;

/// One queue's handler.
pub struct Handler {
    /// The work queue (without the topology's prefix).
    pub queue: &'static str,
    /// Handles one message.
    pub one: One,
    /// Handles messages that arrived together, when the handler has a batch
    /// form: one result per message, in order, or `None` to go one by one.
    pub many: Option<Many>,
}

/// Every queue the worker consumes, and its handler.
pub static HANDLERS: [Handler; 5] = [
    Handler {
        queue: SAVE_PROJECT,
        one: |ctx, m| Box::pin(save_project::handle(ctx, m)),
        many: None,
    },
    Handler {
        queue: LEDGER_AUDIT,
        one: |ctx, m| Box::pin(ledger_audit::handle(ctx, m)),
        many: Some(|ctx, ms| Box::pin(ledger_audit::handle_many(ctx, ms))),
    },
    Handler {
        queue: GENERATION_EVENTS,
        one: |ctx, m| Box::pin(generation_events::handle(ctx, m)),
        many: Some(|ctx, ms| Box::pin(generation_events::handle_many(ctx, ms))),
    },
    Handler {
        queue: WEBHOOK_FANOUT,
        one: |ctx, m| Box::pin(webhook_fanout::handle(ctx, m)),
        many: None,
    },
    // No batch form: each delivery is a task of its own, so one endpoint's
    // slow answer never holds another's.
    Handler {
        queue: WEBHOOKS,
        one: |ctx, m| Box::pin(webhook_delivery::handle(ctx, m)),
        many: None,
    },
];

/// The handler of `queue`.
pub fn for_queue(queue: &str) -> Option<&'static Handler> {
    HANDLERS.iter().find(|h| h.queue == queue)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_work_queue_has_exactly_one_handler() {
        for queue in penora_platform::broker::WORK_QUEUES {
            let n = super::HANDLERS.iter().filter(|h| h.queue == queue).count();
            assert_eq!(n, 1, "{queue}");
        }
        assert_eq!(
            super::HANDLERS.len(),
            penora_platform::broker::WORK_QUEUES.len()
        );
    }
}
