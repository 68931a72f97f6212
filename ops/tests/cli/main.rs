//! `penora-ops` end to end, as an operator runs it: the real binary against
//! a database of the test's own and, where a command talks to the broker,
//! the real RabbitMQ under a queue prefix of the test's own; the API and the
//! worker run in-process where a test needs their part of the flow.

mod allowances;
mod audit;
mod credits;
mod dlq;
mod event;
mod keys;
mod limits;
mod migrate;
mod outbox;
mod projects;
mod reconcile;
mod support;
mod wait_idle;
