-- Workspace storage for real images (contract §10).
--
-- * A project can be deleted: its row stays as a tombstone (status
--   'deleted', so a replayed save with its project_code answers the first
--   result instead of saving again), its content goes, and its bytes are
--   freed in the same transaction. size_bytes keeps what it counted.
-- * size_bytes is what is stored (WebP when re-encoded); original_size_bytes
--   what was sent.
-- * project_contents holds the stored media type, dimensions and an ETag,
--   set by the API at the save, and the thumbnail the worker makes.
-- * project_log records every deletion (by request, by eviction, by the
--   retention timer, by an operator); append-only like the ledger.

ALTER TABLE projects DROP CONSTRAINT projects_status_check;
ALTER TABLE projects ADD CONSTRAINT projects_status_check
    CHECK (status IN ('queued', 'saved', 'failed', 'deleted'));
ALTER TABLE projects ADD COLUMN original_size_bytes bigint;
UPDATE projects SET original_size_bytes = size_bytes;
ALTER TABLE projects ALTER COLUMN original_size_bytes SET NOT NULL;
ALTER TABLE projects ADD CONSTRAINT projects_original_size_non_negative
    CHECK (original_size_bytes >= 0);
ALTER TABLE projects ADD COLUMN deleted_at timestamptz;
ALTER TABLE projects ADD CONSTRAINT projects_deleted_fields
    CHECK ((status = 'deleted') = (deleted_at IS NOT NULL));

-- Listing shows what is not deleted; eviction takes a user's oldest saved
-- projects of one app; retention takes the oldest of everyone.
DROP INDEX projects_listing;
CREATE INDEX projects_listing ON projects (user_id, created_at DESC, id DESC)
    WHERE status <> 'deleted';
CREATE INDEX projects_evictable ON projects (user_id, app_source, created_at, id)
    WHERE status = 'saved';
CREATE INDEX projects_by_age ON projects (created_at) WHERE status <> 'deleted';

ALTER TABLE project_contents ADD COLUMN etag text;
ALTER TABLE project_contents ADD COLUMN thumbnail bytea;
ALTER TABLE project_contents ADD COLUMN thumbnail_etag text;

CREATE TABLE project_log (
    user_id     text        NOT NULL,
    id          bigint      GENERATED ALWAYS AS IDENTITY,
    project_id  uuid        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('project.deleted')),
    app_source  text        NOT NULL,
    -- 'request', 'evicted', 'retention' or 'operator'.
    cause       text        NOT NULL CHECK (cause IN ('request', 'evicted', 'retention', 'operator')),
    freed_bytes bigint      NOT NULL CHECK (freed_bytes >= 0),
    -- Who asked: the API key's id, the project that evicted it, or the worker.
    actor       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, id)
);
CREATE INDEX project_log_by_project ON project_log (user_id, project_id);
CREATE TRIGGER project_log_append_only
    BEFORE UPDATE OR DELETE ON project_log
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER project_log_no_truncate
    BEFORE TRUNCATE ON project_log
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();
