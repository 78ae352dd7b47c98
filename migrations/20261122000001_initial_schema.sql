-- backup-worker schema (DESIGN §2). Column names, statuses and kinds are the interface with the
-- platform API. Invariants are enforced here, never in one process's memory.

CREATE TYPE propagation_kind AS ENUM ('tier_elevation', 'tier_demotion');

CREATE TABLE teams (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    plan_tier   text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE resources (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    team_id         uuid NOT NULL REFERENCES teams (id),
    resource_type   text NOT NULL,
    connection_url  text NOT NULL,   -- a secret: never logged, never in argv
    status          text NOT NULL DEFAULT 'active',   -- active | paused | deleted (owned by the API)
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX resources_team_idx ON resources (team_id);
-- The scheduler scans active resources.
CREATE INDEX resources_active_idx ON resources (team_id, id) WHERE status = 'active';

CREATE TABLE resource_backups (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    resource_id       uuid NOT NULL REFERENCES resources (id),
    kind              text NOT NULL DEFAULT 'manual'
                      CONSTRAINT resource_backups_kind_check CHECK (kind IN ('scheduled', 'manual')),
    status            text NOT NULL DEFAULT 'pending'
                      CONSTRAINT resource_backups_status_check
                      CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'expired')),
    attempts          int NOT NULL DEFAULT 0,
    run_after         timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz NOT NULL DEFAULT now(),
    lease_expires_at  timestamptz,
    leased_by         text,
    finished_at       timestamptz,
    object_key        text,
    size_bytes        bigint,
    raw_bytes         bigint,
    sha256            text,
    failure_reason    text
                      CONSTRAINT resource_backups_failure_reason_check
                      CHECK (failure_reason IN ('auth', 'unreachable', 'dump', 'sanity', 'upload',
                                                'timeout', 'config', 'integrity')),
    error_summary     text,
    internal_detail   text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- A running row always has a lease; a succeeded row always points at its object.
    CONSTRAINT resource_backups_running_leased
        CHECK (status <> 'running' OR (leased_by IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT resource_backups_succeeded_complete
        CHECK (status <> 'succeeded' OR (object_key IS NOT NULL AND sha256 IS NOT NULL
                                         AND size_bytes IS NOT NULL AND finished_at IS NOT NULL))
);
-- Claim: the oldest due pending row.
CREATE INDEX resource_backups_claim_idx ON resource_backups (run_after) WHERE status = 'pending';
-- Recovery sweep: running rows whose lease has expired.
CREATE INDEX resource_backups_lease_idx ON resource_backups (lease_expires_at) WHERE status = 'running';
-- Scheduler anti-join ("any backup created within the window") and per-resource history.
CREATE INDEX resource_backups_resource_created_idx ON resource_backups (resource_id, created_at DESC);
-- RPO gauge and retention: newest succeeded backups per resource.
CREATE INDEX resource_backups_succeeded_idx ON resource_backups (resource_id, finished_at DESC)
    WHERE status = 'succeeded';
-- Invariant: at most one pending scheduled backup per resource, however many replicas tick.
CREATE UNIQUE INDEX resource_backups_one_pending_scheduled
    ON resource_backups (resource_id) WHERE status = 'pending' AND kind = 'scheduled';
-- Invariant: at most one running backup per resource.
CREATE UNIQUE INDEX resource_backups_one_running
    ON resource_backups (resource_id) WHERE status = 'running';

CREATE TABLE resource_restores (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    resource_id       uuid NOT NULL REFERENCES resources (id),
    backup_id         uuid NOT NULL REFERENCES resource_backups (id),
    status            text NOT NULL DEFAULT 'pending'
                      CONSTRAINT resource_restores_status_check
                      CHECK (status IN ('pending', 'running', 'succeeded', 'failed')),
    attempts          int NOT NULL DEFAULT 0,
    run_after         timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz NOT NULL DEFAULT now(),
    lease_expires_at  timestamptz,
    leased_by         text,
    finished_at       timestamptz,
    failure_reason    text
                      CONSTRAINT resource_restores_failure_reason_check
                      CHECK (failure_reason IN ('auth', 'unreachable', 'dump', 'sanity', 'upload',
                                                'timeout', 'config', 'integrity')),
    error_summary     text,
    internal_detail   text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT resource_restores_running_leased
        CHECK (status <> 'running' OR (leased_by IS NOT NULL AND lease_expires_at IS NOT NULL))
);
CREATE INDEX resource_restores_claim_idx ON resource_restores (run_after) WHERE status = 'pending';
CREATE INDEX resource_restores_lease_idx ON resource_restores (lease_expires_at) WHERE status = 'running';
CREATE INDEX resource_restores_resource_idx ON resource_restores (resource_id, created_at DESC);
CREATE INDEX resource_restores_backup_idx ON resource_restores (backup_id);
CREATE UNIQUE INDEX resource_restores_one_running
    ON resource_restores (resource_id) WHERE status = 'running';

-- Invariant: at most one running operation (backup OR restore) per resource. The partial unique
-- indexes cover each table; this trigger covers the pair. Both triggers take the same
-- per-resource transaction lock before looking at the other table, so two concurrent claims on
-- one resource are serialised and the second sees the first's committed row.
CREATE FUNCTION enforce_one_running_operation() RETURNS trigger
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- The triggers' WHEN clauses fire this only for a row becoming running.
    PERFORM pg_advisory_xact_lock(hashtextextended('resource-operation:' || NEW.resource_id::text, 0));
    IF TG_TABLE_NAME = 'resource_backups' THEN
        PERFORM 1 FROM resource_restores WHERE resource_id = NEW.resource_id AND status = 'running';
    ELSE
        PERFORM 1 FROM resource_backups WHERE resource_id = NEW.resource_id AND status = 'running';
    END IF;
    IF FOUND THEN
        RAISE EXCEPTION 'resource % already has a running operation', NEW.resource_id
            USING ERRCODE = 'unique_violation',
                  CONSTRAINT = 'one_running_operation_per_resource';
    END IF;
    RETURN NEW;
END
$$;

-- Split per event so the WHEN clause (evaluated without calling the function) can skip every
-- insert of a pending row and every update that does not start a job: bulk enqueues stay cheap.
CREATE TRIGGER resource_backups_one_running_operation_ins
    BEFORE INSERT ON resource_backups
    FOR EACH ROW WHEN (NEW.status = 'running') EXECUTE FUNCTION enforce_one_running_operation();
CREATE TRIGGER resource_backups_one_running_operation_upd
    BEFORE UPDATE OF status ON resource_backups
    FOR EACH ROW WHEN (NEW.status = 'running' AND OLD.status IS DISTINCT FROM 'running')
    EXECUTE FUNCTION enforce_one_running_operation();
CREATE TRIGGER resource_restores_one_running_operation_ins
    BEFORE INSERT ON resource_restores
    FOR EACH ROW WHEN (NEW.status = 'running') EXECUTE FUNCTION enforce_one_running_operation();
CREATE TRIGGER resource_restores_one_running_operation_upd
    BEFORE UPDATE OF status ON resource_restores
    FOR EACH ROW WHEN (NEW.status = 'running' AND OLD.status IS DISTINCT FROM 'running')
    EXECUTE FUNCTION enforce_one_running_operation();

CREATE TABLE pending_propagations (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    kind             propagation_kind NOT NULL,
    team_id          uuid NOT NULL REFERENCES teams (id),
    resource_id      uuid REFERENCES resources (id),   -- null: all the team's resources
    target_tier      text NOT NULL,
    attempts         int NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    applied_at       timestamptz,
    failed_at        timestamptz,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pending_propagations_due_idx ON pending_propagations (next_attempt_at)
    WHERE applied_at IS NULL AND failed_at IS NULL;
CREATE INDEX pending_propagations_team_idx ON pending_propagations (team_id);

CREATE TABLE audit_log (
    id           bigserial PRIMARY KEY,
    kind         text NOT NULL,
    team_id      uuid,
    resource_id  uuid,
    subject_id   uuid,
    detail       jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_kind_created_idx ON audit_log (kind, created_at);
CREATE INDEX audit_log_resource_idx ON audit_log (resource_id, created_at);
CREATE INDEX audit_log_subject_idx ON audit_log (subject_id);
