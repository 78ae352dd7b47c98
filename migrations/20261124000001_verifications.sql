-- The verifier (DESIGN §11): one row per verification of a backup, claimed like backups and
-- restores (FOR UPDATE SKIP LOCKED + a lease), and the backup row's latest verdict.

ALTER TABLE resource_backups
    ADD COLUMN verified_at timestamptz,
    ADD COLUMN verify_status text CHECK (verify_status IN ('verified', 'failed'));

CREATE TABLE backup_verifications (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    backup_id        uuid NOT NULL REFERENCES resource_backups (id) ON DELETE CASCADE,
    resource_id      uuid NOT NULL REFERENCES resources (id) ON DELETE CASCADE,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'verified', 'failed')),
    failure_reason   text,
    error_summary    text,
    internal_detail  text,
    -- counts per table / namespace / db, the level reached, durations
    detail           jsonb NOT NULL DEFAULT '{}',
    attempts         int NOT NULL DEFAULT 0,
    run_after        timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    leased_by        text,
    lease_expires_at timestamptz,
    -- fairness: this resource's place among its team's due resources, and when the resource
    -- was last verified (NULL: never), both as of enqueueing; claims take rank 1 of every team first
    team_rank        int NOT NULL DEFAULT 1,
    previous_at      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- At most one open verification per resource, however many replicas enqueue at once.
CREATE UNIQUE INDEX backup_verifications_one_open
    ON backup_verifications (resource_id) WHERE status IN ('pending', 'running');
CREATE INDEX backup_verifications_claim
    ON backup_verifications (team_rank, previous_at NULLS FIRST, created_at) WHERE status = 'pending';
CREATE INDEX backup_verifications_newest ON backup_verifications (resource_id, started_at DESC);
CREATE INDEX backup_verifications_backup ON backup_verifications (backup_id);
CREATE INDEX backup_verifications_running
    ON backup_verifications (lease_expires_at) WHERE status = 'running';

-- A backup that failed verification is not a good backup: the scheduler's catch-up and the RPO
-- gauge read last_succeeded_at, so recompute it without that backup.
CREATE FUNCTION resource_backup_marks_unverified() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE resource_backup_marks m
       SET last_succeeded_at = (
            SELECT max(b.finished_at) FROM resource_backups b
             WHERE b.resource_id = NEW.resource_id
               AND b.status IN ('succeeded', 'expired')
               AND b.verify_status IS DISTINCT FROM 'failed')
     WHERE m.resource_id = NEW.resource_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER resource_backup_marks_verify_failed
    AFTER UPDATE OF verify_status ON resource_backups
    FOR EACH ROW WHEN (NEW.verify_status = 'failed' AND OLD.verify_status IS DISTINCT FROM 'failed')
    EXECUTE FUNCTION resource_backup_marks_unverified();
