-- Scheduler support (DESIGN §4).

-- The daily-backup slot of a team: a stable hash of its id mod 24. sha256 of the uuid's 16 bytes,
-- first 4 bytes big-endian, mod 24 — the same in every process, release and architecture, and
-- mirrored by loops::scheduler::slot_hour in Rust (a test pins both to fixed values).
CREATE FUNCTION backup_slot_hour(team_id uuid) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- One expression, no FROM: the planner inlines it (no per-row function call).
    SELECT (('x' || encode(substring(sha256(uuid_send(team_id)) FROM 1 FOR 4), 'hex'))::bit(32)::bigint % 24)::int
$$;

-- "Is a backup of this resource already queued or running?" — the scheduler never queues a second
-- one beside it (a retried row returns to pending and must not collide with a fresh one).
CREATE INDEX resource_backups_open_idx ON resource_backups (resource_id)
    WHERE status IN ('pending', 'running');
