//! Integration tests of the API against the real PostgreSQL: each test gets
//! its own database (cloned from a migrated template) and its own server on
//! port 0, so the tests run in parallel.

mod account_lock;
mod allowances;
mod audit_anchor;
mod batching;
mod chaos_findings;
mod connections;
mod console;
mod cors;
mod credits;
mod edges;
mod events;
mod fuzz_findings;
mod guide;
mod image_bombs;
mod keys;
mod limits;
mod lots;
mod management;
mod migrations;
mod refund_window;
mod roles;
mod shutdown;
mod storage;
mod support;
mod system;
mod unauthenticated;
mod uploads;
mod validation;
mod webhooks;
mod workspace;
