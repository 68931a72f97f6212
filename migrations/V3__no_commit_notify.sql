-- Drop the outbox's NOTIFY trigger.
--
-- A transaction that has called NOTIFY takes a database-wide lock at commit
-- (PreCommit_Notify: "serialize writers ... hold till after commit"), so
-- every credit movement, which writes an outbox row, committed one at a time,
-- its WAL flush included, instead of sharing flushes with its neighbours.
-- Sampling pg_stat_activity under 64 concurrent deducts showed 66 of 88
-- active backends waiting on `Lock:object`. The processes that write outbox
-- rows (API, worker) wake their own relay in-process after the commit; the
-- worker also sweeps the outbox every second for rows written elsewhere.
DROP TRIGGER outbox_wake_relay ON outbox;
DROP FUNCTION outbox_notify();
