-- Point-in-time recovery (DESIGN §14): continuous WAL per PITR resource, base backups beside the
-- logical dumps, restores to an instant.

-- A role with REPLICATION on the tenant's server (a secret, like connection_url).
ALTER TABLE resources ADD COLUMN replication_url text;
-- The wal loop asks every few seconds which resources may stream: an index of the few that can,
-- not a scan of the fleet.
CREATE INDEX resources_pitr_candidates_idx ON resources (team_id, id)
    WHERE replication_url IS NOT NULL AND status = 'active'
      AND resource_type IN ('postgres', 'vector');

-- `logical`: pg_dump custom format (every engine's backups so far); `base`: pg_basebackup tar of
-- the tenant's cluster, the start of a WAL chain. start_lsn/timeline/pg_major describe a base.
ALTER TABLE resource_backups
    ADD COLUMN format text NOT NULL DEFAULT 'logical'
        CONSTRAINT resource_backups_format_check CHECK (format IN ('logical', 'base')),
    ADD COLUMN start_lsn pg_lsn,
    ADD COLUMN timeline integer,
    ADD COLUMN pg_major integer;
-- At most one pending backup of each format per resource and kind stays the scheduler's rule;
-- the scheduler's and retention's per-format reads.
CREATE INDEX resource_backups_base_idx ON resource_backups (resource_id, finished_at DESC)
    WHERE format = 'base' AND status = 'succeeded';

-- A restore to an instant names the instant; the worker chooses the base backup and records it in
-- backup_id (the API may leave it null, or name any backup of the resource).
ALTER TABLE resource_restores ADD COLUMN target_time timestamptz;
ALTER TABLE resource_restores ALTER COLUMN backup_id DROP NOT NULL;
ALTER TABLE resource_restores ADD CONSTRAINT resource_restores_backup_or_time
    CHECK (backup_id IS NOT NULL OR target_time IS NOT NULL);

-- One WAL stream per PITR resource, held by one replica under a lease.
CREATE TABLE wal_streams (
    resource_id      uuid PRIMARY KEY REFERENCES resources (id) ON DELETE CASCADE,
    status           text NOT NULL DEFAULT 'stopped'
                     CONSTRAINT wal_streams_status_check
                     CHECK (status IN ('streaming', 'stopped', 'failed')),
    slot_name        text NOT NULL,
    timeline         integer,
    -- the server's wal_segment_size (segment numbers from LSNs)
    segment_bytes    bigint,
    last_lsn         pg_lsn,
    -- the stored WAL was complete up to the server's position at this time (the RPO's clock)
    last_stored_at   timestamptz,
    leased_by        text,
    lease_expires_at timestamptz,
    attempts         integer NOT NULL DEFAULT 0,
    -- a failed or restarting stream waits until then (backoff)
    run_after        timestamptz NOT NULL DEFAULT now(),
    error_summary    text,
    internal_detail  text,
    -- the stream wants a base backup taken after this time (its slot was created, a gap opened)
    base_wanted_at   timestamptz NOT NULL DEFAULT now(),
    -- the resource left PITR and its slot was dropped on the tenant's server
    slot_dropped_at  timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wal_streams_claim_idx ON wal_streams (run_after) WHERE leased_by IS NULL;
CREATE INDEX wal_streams_lease_idx ON wal_streams (lease_expires_at) WHERE leased_by IS NOT NULL;

-- Every stored WAL file: segments (complete, or the growing partial, replaced by the complete one
-- under the same key) and timeline history files (segno NULL).
CREATE TABLE wal_segments (
    id          bigserial PRIMARY KEY,
    resource_id uuid NOT NULL REFERENCES resources (id) ON DELETE CASCADE,
    timeline    integer NOT NULL,
    segno       bigint,
    object_key  text NOT NULL,
    sha256      text NOT NULL,
    size_bytes  bigint NOT NULL,
    raw_bytes   bigint NOT NULL,
    start_lsn   pg_lsn,
    end_lsn     pg_lsn,
    partial     boolean NOT NULL DEFAULT false,
    key_id      uuid,
    stored_at   timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX wal_segments_segment_idx ON wal_segments (resource_id, timeline, segno)
    WHERE segno IS NOT NULL;
CREATE UNIQUE INDEX wal_segments_history_idx ON wal_segments (resource_id, timeline)
    WHERE segno IS NULL;
CREATE INDEX wal_segments_stored_idx ON wal_segments (resource_id, stored_at DESC);

-- Gaps: WAL the tenant's server dropped before it was stored (an invalidated slot). No restore
-- target between `from_lsn` (the end of what was stored) and the next base backup is accepted.
CREATE TABLE wal_gaps (
    id          bigserial PRIMARY KEY,
    resource_id uuid NOT NULL REFERENCES resources (id) ON DELETE CASCADE,
    timeline    integer,
    from_lsn    pg_lsn,
    -- the last stored WAL's time: targets after it need a base backup taken after the gap
    from_time   timestamptz,
    detail      text,
    detected_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wal_gaps_resource_idx ON wal_gaps (resource_id, detected_at DESC);

-- resource_backup_marks drive the logical-dump cadence and the RPO gauge (§4, §8): base backups
-- are the WAL chain's anchors, on their own daily cadence, and neither hold back a dump nor stand
-- in for one. The marks' triggers and recomputations read logical rows only.
DROP TRIGGER resource_backup_marks_ins ON resource_backups;
DROP TRIGGER resource_backup_marks_succeeded ON resource_backups;
CREATE TRIGGER resource_backup_marks_ins
    AFTER INSERT ON resource_backups
    FOR EACH ROW WHEN (NEW.format = 'logical') EXECUTE FUNCTION resource_backup_marks_touch();
CREATE TRIGGER resource_backup_marks_succeeded
    AFTER UPDATE OF status ON resource_backups
    FOR EACH ROW WHEN (NEW.format = 'logical' AND NEW.status = 'succeeded'
                       AND OLD.status IS DISTINCT FROM 'succeeded')
    EXECUTE FUNCTION resource_backup_marks_touch();

CREATE OR REPLACE FUNCTION resource_backup_marks_unverified() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE resource_backup_marks m
       SET last_succeeded_at = (
            SELECT max(b.finished_at) FROM resource_backups b
             WHERE b.resource_id = NEW.resource_id AND b.format = 'logical'
               AND b.status IN ('succeeded', 'expired')
               AND b.verify_status IS DISTINCT FROM 'failed')
     WHERE m.resource_id = NEW.resource_id;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION resource_backup_marks_after_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH touched AS (
        SELECT DISTINCT o.resource_id
          FROM deleted_backup_rows o
          JOIN resource_backup_marks m ON m.resource_id = o.resource_id
         WHERE o.format = 'logical'
           AND (o.created_at >= m.last_created_at
                OR (o.status IN ('succeeded', 'expired') AND o.finished_at >= m.last_succeeded_at))
    ),
    recomputed AS (
        SELECT t.resource_id,
               (SELECT max(b.created_at) FROM resource_backups b
                 WHERE b.resource_id = t.resource_id AND b.format = 'logical') AS last_created_at,
               (SELECT max(b.finished_at) FROM resource_backups b
                 WHERE b.resource_id = t.resource_id AND b.format = 'logical'
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

-- At most one pending scheduled backup per resource *and format*: the day's base backup queues
-- beside the hour's dump (the running invariant, one operation per resource, is unchanged).
DROP INDEX resource_backups_one_pending_scheduled;
CREATE UNIQUE INDEX resource_backups_one_pending_scheduled
    ON resource_backups (resource_id, format) WHERE status = 'pending' AND kind = 'scheduled';
