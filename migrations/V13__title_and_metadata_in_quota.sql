-- A project's title and metadata count in the storage quota (issue 24).
--
-- meta_bytes is what a project's title (UTF-8) and metadata (compact JSON; an
-- empty object nothing) count against the quota, beside size_bytes, its
-- stored content (which the API still answers as size_bytes). The quota
-- counter, accounts.storage_used_bytes, holds for each user the sum of
-- size_bytes + meta_bytes of the queued and saved projects, plus meta_bytes
-- of the failed ones (a failed project's content is gone, its title and
-- metadata are still stored and listed), as penora-ops reconcile checks.
--
-- Projects saved before this migration were reserved without their title
-- and metadata: they keep meta_bytes 0, so every counter stays equal to what
-- its projects count, and nothing is re-reserved behind the users' backs.
--
-- On Citus, projects is distributed (V8): ALTER TABLE reaches every shard,
-- and a column with a constant default is added without rewriting any; but
-- Citus carries DDL on a distributed table to its shards only outside a
-- multi-statement string (see V9), and refuses a CHECK inside ADD COLUMN:
-- one block, two statements.
DO $v13$
BEGIN
    ALTER TABLE projects ADD COLUMN meta_bytes bigint NOT NULL DEFAULT 0;
    ALTER TABLE projects ADD CONSTRAINT projects_meta_bytes_non_negative CHECK (meta_bytes >= 0);
END
$v13$;
