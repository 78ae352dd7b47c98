-- Restore failure classes of DESIGN §6: `conflict` (a statement the target rejects
-- deterministically) and `incomplete` (part of the backup applied, e.g. MongoDB documents
-- rejected without --stopOnError).
ALTER TABLE resource_restores DROP CONSTRAINT resource_restores_failure_reason_check;
ALTER TABLE resource_restores ADD CONSTRAINT resource_restores_failure_reason_check
    CHECK (failure_reason IN ('auth', 'unreachable', 'dump', 'sanity', 'upload', 'timeout',
                              'config', 'integrity', 'conflict', 'incomplete'));

-- A restore is applied at most once per row (DESIGN §6): the attempt that is about to take the
-- destructive step records it first (fenced on its lease). A row whose lease lapses with this set
-- is never re-run by the recovery: its outcome is unknown.
ALTER TABLE resource_restores ADD COLUMN applying_since timestamptz;
