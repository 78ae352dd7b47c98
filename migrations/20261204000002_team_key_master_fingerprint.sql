-- Which master key wrapped each team key (DESIGN §12): the first 16 hex digits of
-- sha256("backup-worker master key v1" || key), never the key. NULL: wrapped before this column
-- existed; the start check fills it in for the keys the configured master key opens.
-- previous_fingerprint: the master key a `keys rotate-master` re-wrapped it from, so the start
-- check tells an unfinished rotation (keys still under the key being retired, which a re-run
-- moves) from a wrong ENCRYPTION_KEY_FILE.
ALTER TABLE team_backup_keys
    ADD COLUMN master_fingerprint text,
    ADD COLUMN previous_fingerprint text;

-- The start check and the rotation read live keys by fingerprint.
CREATE INDEX team_backup_keys_live_fingerprint
    ON team_backup_keys (master_fingerprint, previous_fingerprint) WHERE destroyed_at IS NULL;
