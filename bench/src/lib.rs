//! The measurement tools of Penora Credits, as one library behind two thin
//! binaries: `penora-bench` ([`bench`]: the service against raw PostgreSQL
//! and RabbitMQ, in one run and on the same data) and `penora-chaos`
//! ([`chaos`]: mixed traffic while [`faults`] are injected, then every
//! [`invariants`] check). Neither is part of the test suite; the scripts
//! `scripts/bench.sh` and `scripts/chaos.sh` start everything and call them.

pub mod apitime;
pub mod bench;
pub mod chaos;
pub mod chaos_allowances;
pub mod chaos_events;
pub mod chaos_limits;
pub mod dbwork;
pub mod events;
pub mod faults;
pub mod invariants;
pub mod limits;
pub mod measure;
pub mod raw;
pub mod report;
pub mod services;
pub mod webhooks;
pub mod workloads;
