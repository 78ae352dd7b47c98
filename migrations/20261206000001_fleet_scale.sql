-- Issue 25, a fleet of a million resources: claims, the verifier's enqueue and gauge, and the
-- copies' enqueue and gauge at a cost that does not grow with the fleet; anomalies (DESIGN §15).

-- 1. Claims. The backup and restore claims order by (run_after, created_at); an index on run_after
-- alone made every claim sort the whole oldest cohort (a scheduler tick stamps its rows with one
-- run_after and created_at). With the order in the index the claim is an index scan that stops at
-- the first row it can lock.
CREATE INDEX resource_backups_due_idx ON resource_backups (run_after, created_at, id)
    WHERE status = 'pending';
DROP INDEX resource_backups_claim_idx;
CREATE INDEX resource_restores_due_idx ON resource_restores (run_after, created_at, id)
    WHERE status = 'pending';
DROP INDEX resource_restores_claim_idx;

-- 2. The verifier's marks: per resource, its newest succeeded backup and newest verification, and
-- from them when it is next due, kept by triggers in the transaction that changes them. The
-- enqueue and the unverified gauge read index ranges of due (or overdue) resources instead of
-- probing every resource's backups and verifications each VERIFY_INTERVAL. The common changes (a
-- backup succeeds, a verification is enqueued, claimed, finished) move a mark forward with one
-- upsert; the rare ones that can move it back (the newest backup expires or is deleted, a
-- verification is deleted) recompute it from the rows.
CREATE TABLE resource_verify_marks (
    resource_id         uuid PRIMARY KEY REFERENCES resources (id) ON DELETE CASCADE,
    -- the resource is not deleted (kept by a trigger on resources)
    live                boolean NOT NULL DEFAULT true,
    -- newest succeeded backup (finished_at DESC); null: none
    backup_id           uuid,
    backup_finished_at  timestamptz,
    backup_failed       boolean NOT NULL DEFAULT false,
    -- newest verification (started_at DESC)
    last_id             uuid,
    last_status         text,
    last_backup_id      uuid,
    last_started_at     timestamptz,
    last_finished_at    timestamptz,
    -- newest passing verification's started_at (-infinity: none)
    passed_at           timestamptz NOT NULL DEFAULT '-infinity',
    -- due now: a good newest backup never verified, or whose newest verification failed for an
    -- older backup
    due                 boolean GENERATED ALWAYS AS (
        backup_id IS NOT NULL AND NOT backup_failed
        AND (last_status IS NULL OR (last_status = 'failed' AND last_backup_id IS DISTINCT FROM backup_id))
    ) STORED,
    -- due an hour after this (the verifier's ENVIRONMENT_RETRY): its newest verification failed
    -- for the verifier's environment, not the backup
    retry_from          timestamptz GENERATED ALWAYS AS (
        CASE WHEN backup_id IS NOT NULL AND NOT backup_failed AND last_status = 'failed'
                  AND last_backup_id = backup_id
             THEN coalesce(last_finished_at, last_started_at) END
    ) STORED,
    -- due VERIFY_EVERY after this: its newest verification passed
    verified_since      timestamptz GENERATED ALWAYS AS (
        CASE WHEN backup_id IS NOT NULL AND NOT backup_failed AND last_status = 'verified'
             THEN last_started_at END
    ) STORED
);
CREATE INDEX resource_verify_marks_due_idx ON resource_verify_marks (resource_id)
    WHERE live AND due;
CREATE INDEX resource_verify_marks_retry_idx ON resource_verify_marks (retry_from, resource_id)
    WHERE live AND retry_from IS NOT NULL;
CREATE INDEX resource_verify_marks_verified_idx ON resource_verify_marks (verified_since, resource_id)
    WHERE live AND verified_since IS NOT NULL;
-- The gauge: a newest backup that failed verification, or no pass for a while.
CREATE INDEX resource_verify_marks_failed_idx ON resource_verify_marks (resource_id)
    WHERE live AND backup_failed;
CREATE INDEX resource_verify_marks_passed_idx ON resource_verify_marks (passed_at)
    WHERE live AND backup_id IS NOT NULL AND NOT backup_failed;
-- The newest passing verification of a resource, probed by a recompute.
CREATE INDEX backup_verifications_passed ON backup_verifications (resource_id, started_at DESC)
    WHERE status = 'verified';

-- The marks of `ids`, computed from the rows (the definitions the verifier's enqueue used).
-- PL/pgSQL, not SQL: its plan is cached per session (a SQL function is planned at every call).
CREATE FUNCTION resource_verify_state(ids uuid[])
RETURNS TABLE (resource_id uuid, live boolean, backup_id uuid, backup_finished_at timestamptz,
               backup_failed boolean, last_id uuid, last_status text, last_backup_id uuid,
               last_started_at timestamptz, last_finished_at timestamptz, passed_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT r.id, r.status <> 'deleted', n.id, n.finished_at, coalesce(n.verify_status = 'failed', false),
           v.id, v.status, v.backup_id, v.started_at, v.finished_at,
           coalesce(p.started_at, '-infinity')
      FROM resources r
      LEFT JOIN LATERAL (
            SELECT b.id, b.finished_at, b.verify_status FROM resource_backups b
             WHERE b.resource_id = r.id AND b.status = 'succeeded'
             ORDER BY b.finished_at DESC NULLS LAST LIMIT 1) n ON true
      LEFT JOIN LATERAL (
            SELECT x.id, x.status, x.backup_id, x.started_at, x.finished_at FROM backup_verifications x
             WHERE x.resource_id = r.id
             ORDER BY x.started_at DESC LIMIT 1) v ON true
      LEFT JOIN LATERAL (
            SELECT x.started_at FROM backup_verifications x
             WHERE x.resource_id = r.id AND x.status = 'verified'
             ORDER BY x.started_at DESC LIMIT 1) p ON true
     WHERE r.id = ANY(ids);
END
$$;

-- Recomputes the marks of `ids`. The mark rows are locked (created if missing) before the state
-- is read, and the read is a later statement with its own snapshot (READ COMMITTED): of two
-- transactions changing one resource's rows, the second recomputes after the first committed, so
-- neither leaves a mark computed without the other's change. (The forward upserts below are safe
-- on their own: READ COMMITTED re-evaluates them against the row's newest version.)
CREATE FUNCTION resource_verify_marks_refresh(ids uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(ids) = 0 THEN
        RETURN;
    END IF;
    INSERT INTO resource_verify_marks (resource_id)
    SELECT r.id FROM resources r WHERE r.id = ANY(ids) ORDER BY r.id
    ON CONFLICT (resource_id) DO NOTHING;
    PERFORM 1 FROM resource_verify_marks m WHERE m.resource_id = ANY(ids)
      ORDER BY m.resource_id FOR UPDATE;
    UPDATE resource_verify_marks m
       SET live = s.live, backup_id = s.backup_id, backup_finished_at = s.backup_finished_at,
           backup_failed = s.backup_failed, last_id = s.last_id, last_status = s.last_status,
           last_backup_id = s.last_backup_id, last_started_at = s.last_started_at,
           last_finished_at = s.last_finished_at, passed_at = s.passed_at
      FROM resource_verify_state(ids) s
     WHERE m.resource_id = s.resource_id;
END
$$;

-- resource_backups, row by row, only for changes that touch a succeeded row (a scheduler tick's
-- pending rows and the claims call nothing).
CREATE FUNCTION resource_verify_marks_backup() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'succeeded' AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'succeeded') THEN
        -- A new succeeded backup: the newest if nothing newer is marked.
        INSERT INTO resource_verify_marks AS m (resource_id, live, backup_id, backup_finished_at, backup_failed)
        SELECT NEW.resource_id, r.status <> 'deleted', NEW.id, NEW.finished_at,
               coalesce(NEW.verify_status = 'failed', false)
          FROM resources r WHERE r.id = NEW.resource_id
        ON CONFLICT (resource_id) DO UPDATE
           SET backup_id = EXCLUDED.backup_id, backup_finished_at = EXCLUDED.backup_finished_at,
               backup_failed = EXCLUDED.backup_failed
         WHERE m.backup_id IS NULL OR m.backup_finished_at IS NULL
            OR EXCLUDED.backup_finished_at >= m.backup_finished_at;
    ELSIF NEW.status = 'succeeded' AND OLD.finished_at IS NOT DISTINCT FROM NEW.finished_at THEN
        -- Its verdict changed.
        UPDATE resource_verify_marks
           SET backup_failed = coalesce(NEW.verify_status = 'failed', false)
         WHERE resource_id = NEW.resource_id AND backup_id = NEW.id;
    ELSIF NEW.status = 'succeeded'
          OR EXISTS (SELECT 1 FROM resource_verify_marks
                      WHERE resource_id = NEW.resource_id AND backup_id = NEW.id) THEN
        -- A succeeded backup moved in time (it may now be the newest), or the marked newest
        -- expired or failed (the next one takes its place).
        PERFORM resource_verify_marks_refresh(ARRAY[NEW.resource_id]);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER resource_verify_marks_backup_ins
    AFTER INSERT ON resource_backups
    FOR EACH ROW WHEN (NEW.status = 'succeeded')
    EXECUTE FUNCTION resource_verify_marks_backup();
CREATE TRIGGER resource_verify_marks_backup_upd
    AFTER UPDATE OF status, verify_status, finished_at ON resource_backups
    FOR EACH ROW WHEN ((OLD.status = 'succeeded' OR NEW.status = 'succeeded')
                       AND (OLD.status IS DISTINCT FROM NEW.status
                            OR OLD.verify_status IS DISTINCT FROM NEW.verify_status
                            OR OLD.finished_at IS DISTINCT FROM NEW.finished_at))
    EXECUTE FUNCTION resource_verify_marks_backup();

-- backup_verifications, row by row: the newest verification moves forward with one upsert; a
-- change that could move it back (started_at earlier, a pass withdrawn) recomputes.
CREATE FUNCTION resource_verify_marks_verification() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed bigint;
BEGIN
    IF TG_OP = 'UPDATE' AND (NEW.started_at < OLD.started_at
                             OR NEW.resource_id <> OLD.resource_id
                             OR (OLD.status = 'verified' AND NEW.status <> 'verified')) THEN
        PERFORM resource_verify_marks_refresh(ARRAY[OLD.resource_id, NEW.resource_id]);
        RETURN NULL;
    END IF;
    INSERT INTO resource_verify_marks AS m (resource_id, live, last_id, last_status, last_backup_id,
                                            last_started_at, last_finished_at, passed_at)
    SELECT NEW.resource_id, r.status <> 'deleted', NEW.id, NEW.status, NEW.backup_id,
           NEW.started_at, NEW.finished_at,
           CASE WHEN NEW.status = 'verified' THEN NEW.started_at ELSE '-infinity' END
      FROM resources r WHERE r.id = NEW.resource_id
    ON CONFLICT (resource_id) DO UPDATE
       SET last_id = EXCLUDED.last_id, last_status = EXCLUDED.last_status,
           last_backup_id = EXCLUDED.last_backup_id, last_started_at = EXCLUDED.last_started_at,
           last_finished_at = EXCLUDED.last_finished_at,
           passed_at = greatest(m.passed_at, EXCLUDED.passed_at)
     WHERE m.last_id IS NULL OR m.last_id = EXCLUDED.last_id
        OR EXCLUDED.last_started_at >= m.last_started_at;
    -- Not the newest (the upsert changed nothing): only a pass can still move passed_at.
    GET DIAGNOSTICS changed = ROW_COUNT;
    IF changed = 0 AND NEW.status = 'verified' THEN
        UPDATE resource_verify_marks SET passed_at = NEW.started_at
         WHERE resource_id = NEW.resource_id AND passed_at < NEW.started_at;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER resource_verify_marks_verification_ins
    AFTER INSERT ON backup_verifications
    FOR EACH ROW EXECUTE FUNCTION resource_verify_marks_verification();
CREATE TRIGGER resource_verify_marks_verification_upd
    AFTER UPDATE OF status, started_at, finished_at, backup_id, resource_id ON backup_verifications
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                       OR OLD.started_at IS DISTINCT FROM NEW.started_at
                       OR OLD.finished_at IS DISTINCT FROM NEW.finished_at
                       OR OLD.backup_id IS DISTINCT FROM NEW.backup_id
                       OR OLD.resource_id IS DISTINCT FROM NEW.resource_id)
    EXECUTE FUNCTION resource_verify_marks_verification();

-- Deletes, statement by statement and set-based: a bulk delete recomputes each resource once.
CREATE FUNCTION resource_verify_marks_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM resource_verify_marks_refresh(ARRAY(SELECT DISTINCT resource_id FROM deleted_rows));
    RETURN NULL;
END
$$;
CREATE TRIGGER resource_verify_marks_backup_del
    AFTER DELETE ON resource_backups
    REFERENCING OLD TABLE AS deleted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION resource_verify_marks_deleted();
CREATE TRIGGER resource_verify_marks_verification_del
    AFTER DELETE ON backup_verifications
    REFERENCING OLD TABLE AS deleted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION resource_verify_marks_deleted();

CREATE FUNCTION resource_verify_marks_resource() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE resource_verify_marks SET live = NEW.status <> 'deleted' WHERE resource_id = NEW.id;
    RETURN NULL;
END
$$;
CREATE TRIGGER resource_verify_marks_resource_status
    AFTER UPDATE OF status ON resources
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION resource_verify_marks_resource();

-- Every resource that has a succeeded backup or a verification gets its mark now.
INSERT INTO resource_verify_marks (resource_id, live, backup_id, backup_finished_at, backup_failed,
                                   last_id, last_status, last_backup_id, last_started_at,
                                   last_finished_at, passed_at)
SELECT s.* FROM resource_verify_state(ARRAY(
    SELECT resource_id FROM resource_backups WHERE status = 'succeeded'
    UNION SELECT resource_id FROM backup_verifications)) s;

-- 3. Copies (DESIGN §13): each backup row carries its copy's status (null: no copy row yet), kept
-- by triggers on backup_copies, so the enqueue (newest uncopied first) and the unprotected gauge
-- read index ranges of the backups that lack a copy, not every succeeded backup of the fleet.
ALTER TABLE resource_backups ADD COLUMN copy_status text;
UPDATE resource_backups b SET copy_status = c.status
  FROM backup_copies c WHERE c.backup_id = b.id AND c.destination = 'copy';
CREATE INDEX resource_backups_uncopied_idx ON resource_backups (finished_at DESC)
    WHERE status = 'succeeded' AND copy_status IS NULL;
CREATE INDEX resource_backups_unprotected_idx ON resource_backups (finished_at)
    WHERE status = 'succeeded' AND copy_status IS DISTINCT FROM 'succeeded';

CREATE FUNCTION resource_backups_copy_status() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE resource_backups b SET copy_status = NULL
          FROM deleted_rows d
         WHERE d.destination = 'copy' AND b.id = d.backup_id;
    ELSIF TG_OP = 'INSERT' THEN
        UPDATE resource_backups b SET copy_status = n.status
          FROM new_rows n
         WHERE n.destination = 'copy' AND b.id = n.backup_id;
    ELSIF NEW.destination = 'copy' THEN
        UPDATE resource_backups SET copy_status = NEW.status WHERE id = NEW.backup_id;
    END IF;
    RETURN NULL;
END
$$;
-- Enqueues insert up to a thousand rows at once: one statement-level update of their backups.
CREATE TRIGGER backup_copies_status_ins
    AFTER INSERT ON backup_copies
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION resource_backups_copy_status();
-- Lease renewals do not fire it.
CREATE TRIGGER backup_copies_status_upd
    AFTER UPDATE OF status ON backup_copies
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION resource_backups_copy_status();
CREATE TRIGGER backup_copies_status_del
    AFTER DELETE ON backup_copies
    REFERENCING OLD TABLE AS deleted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION resource_backups_copy_status();

-- 4. Anomalies (DESIGN §15): what changed against the resource's previous succeeded backup; null
-- when nothing did. Accepting one clears it and records who did, so it is not flagged again.
ALTER TABLE resource_backups
    ADD COLUMN anomaly jsonb,
    ADD COLUMN anomaly_accepted_at timestamptz;
CREATE INDEX resource_backups_anomaly_idx ON resource_backups (resource_id)
    WHERE anomaly IS NOT NULL;
