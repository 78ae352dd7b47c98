-- Issue 15, reliability hardening: backup marks follow deleted rows, and indexes for retention and
-- the orphan-object reconciliation at fleet scale.

-- resource_backup_marks (20261122000003) only ever moved forward, on INSERT and on success. When the
-- API deletes a row (cancelling a pending manual backup), the marks kept the deleted row's time, and
-- the scheduler's "nothing created within rpo − 10" window held the resource's next scheduled
-- backup back by up to its RPO. After a DELETE the marks of each affected resource are recomputed
-- from the rows that remain, with the same definitions as before: last_created_at over rows of any
-- status; last_succeeded_at over succeeded or expired rows whose verification did not fail
-- (20261124000001). A resource left without rows loses its marks row (never backed up = overdue).
-- Only resources where a deleted row could have been the newest are recomputed (a delete can only
-- lower a maximum), each with index probes on its own rows.
CREATE FUNCTION resource_backup_marks_after_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH touched AS (
        SELECT DISTINCT o.resource_id
          FROM deleted_backup_rows o
          JOIN resource_backup_marks m ON m.resource_id = o.resource_id
         WHERE o.created_at >= m.last_created_at
            OR (o.status IN ('succeeded', 'expired') AND o.finished_at >= m.last_succeeded_at)
    ),
    recomputed AS (
        SELECT t.resource_id,
               (SELECT max(b.created_at) FROM resource_backups b
                 WHERE b.resource_id = t.resource_id) AS last_created_at,
               (SELECT max(b.finished_at) FROM resource_backups b
                 WHERE b.resource_id = t.resource_id
                   AND b.status IN ('succeeded', 'expired')
                   AND b.verify_status IS DISTINCT FROM 'failed') AS last_succeeded_at
          FROM touched t
    ),
    emptied AS (
        DELETE FROM resource_backup_marks m
         USING recomputed r
         WHERE m.resource_id = r.resource_id AND r.last_created_at IS NULL
    )
    UPDATE resource_backup_marks m
       SET last_created_at = r.last_created_at,
           last_succeeded_at = r.last_succeeded_at
      FROM recomputed r
     WHERE m.resource_id = r.resource_id AND r.last_created_at IS NOT NULL;
    RETURN NULL;
END
$$;

-- One statement-level trigger: a bulk DELETE recomputes each resource once.
CREATE TRIGGER resource_backup_marks_del
    AFTER DELETE ON resource_backups
    REFERENCING OLD TABLE AS deleted_backup_rows
    FOR EACH STATEMENT EXECUTE FUNCTION resource_backup_marks_after_delete();

-- Retention (DESIGN §5) walks succeeded rows oldest first, past a cursor, below the cutoff of the
-- longest retention in use: an index range scan that touches expired rows (and the few a rule
-- keeps), never the fleet's kept history.
CREATE INDEX resource_backups_retention_idx ON resource_backups (finished_at, id)
    WHERE status = 'succeeded';

-- The reconciliation of orphaned objects asks, 1000 listed keys at a time, which are referenced
-- by a running or succeeded row.
CREATE INDEX resource_backups_object_key_idx ON resource_backups (object_key)
    WHERE status IN ('running', 'succeeded') AND object_key IS NOT NULL;
