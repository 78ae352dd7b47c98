-- Encryption at rest (DESIGN §12): each team's age identity, wrapped under the master key.
CREATE TABLE team_backup_keys (
    key_id           uuid PRIMARY KEY,
    team_id          uuid NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    recipient        text NOT NULL,                -- age1… (public)
    wrapped_identity bytea,                        -- NULL once destroyed
    created_at       timestamptz NOT NULL DEFAULT now(),
    destroyed_at     timestamptz,
    CHECK ((destroyed_at IS NULL) = (wrapped_identity IS NOT NULL))
);
-- One live identity per team, however many replicas take a team's first backup at once.
CREATE UNIQUE INDEX team_backup_keys_one_live ON team_backup_keys (team_id) WHERE destroyed_at IS NULL;

ALTER TABLE resource_backups ADD COLUMN key_id uuid REFERENCES team_backup_keys (key_id);

-- Objects to delete in the background (a destroyed team key's backups), one row per object.
CREATE TABLE pending_object_deletions (
    object_key   text PRIMARY KEY,
    requested_at timestamptz NOT NULL DEFAULT now(),
    reason       text NOT NULL
);
