//! `penora-worker`: the queue half of Penora Credits (outbox relay, the
//! `save-project` and `ledger-audit` jobs, ImageGene's generation events,
//! retries and dead letters, timers). It arrives with the queue-pipeline
//! issue; the API already writes every job to the `outbox` table in the same
//! transaction as the change it describes.
