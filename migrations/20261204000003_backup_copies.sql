-- Copies (DESIGN §13): one row per succeeded backup and configured copy destination, claimed by
-- the `copies` loop like any job (SKIP LOCKED, lease, fencing token, recovery). resource_id is the
-- backup's, kept here for the shared queue machinery (recovery reports, claims).
CREATE TABLE backup_copies (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    backup_id        uuid NOT NULL REFERENCES resource_backups (id) ON DELETE CASCADE,
    resource_id      uuid NOT NULL REFERENCES resources (id) ON DELETE CASCADE,
    destination      text NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'succeeded', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    run_after        timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    leased_by        text,
    lease_expires_at timestamptz,
    claim_token      uuid,
    object_key       text,
    sha256           text,
    finished_at      timestamptz,
    failure_reason   text CHECK (failure_reason IN ('auth', 'unreachable', 'dump', 'sanity', 'upload',
                                                    'timeout', 'config', 'integrity')),
    error_summary    text,
    internal_detail  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (backup_id, destination)
);
CREATE INDEX backup_copies_due_idx ON backup_copies (run_after, created_at) WHERE status = 'pending';
CREATE INDEX backup_copies_claim_token_idx ON backup_copies (claim_token) WHERE status = 'running';
CREATE INDEX backup_copies_expiring_idx ON backup_copies (lease_expires_at) WHERE status = 'running';
