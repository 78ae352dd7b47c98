-- Per-resource summary of backup times, kept by triggers, so a scheduler tick is a hash join over
-- resources instead of one index probe per resource (the probes dominate at 1M resources).
CREATE TABLE resource_backup_marks (
    resource_id        uuid PRIMARY KEY,
    -- newest created_at of any backup row (the scheduler's "anything within rpo − 10" window)
    last_created_at    timestamptz NOT NULL,
    -- newest finished_at of a succeeded backup (catch-up and the RPO gauge)
    last_succeeded_at  timestamptz
);

INSERT INTO resource_backup_marks (resource_id, last_created_at, last_succeeded_at)
SELECT resource_id, max(created_at), max(finished_at) FILTER (WHERE status IN ('succeeded', 'expired'))
  FROM resource_backups
 GROUP BY resource_id;

CREATE FUNCTION resource_backup_marks_touch() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO resource_backup_marks AS m (resource_id, last_created_at, last_succeeded_at)
    VALUES (NEW.resource_id, NEW.created_at,
            CASE WHEN NEW.status = 'succeeded' THEN NEW.finished_at END)
    ON CONFLICT (resource_id) DO UPDATE
       SET last_created_at = greatest(m.last_created_at, EXCLUDED.last_created_at),
           last_succeeded_at = greatest(m.last_succeeded_at, EXCLUDED.last_succeeded_at);
    RETURN NULL;
END
$$;

CREATE TRIGGER resource_backup_marks_ins
    AFTER INSERT ON resource_backups
    FOR EACH ROW EXECUTE FUNCTION resource_backup_marks_touch();
CREATE TRIGGER resource_backup_marks_succeeded
    AFTER UPDATE OF status ON resource_backups
    FOR EACH ROW WHEN (NEW.status = 'succeeded' AND OLD.status IS DISTINCT FROM 'succeeded')
    EXECUTE FUNCTION resource_backup_marks_touch();
