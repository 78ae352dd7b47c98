-- DESIGN §5: a Redis backup records how it was taken — `instance` (redis-cli --rdb, a
-- point-in-time snapshot) or `keyspace` (the worker's SCAN + DUMP, for users that may not SYNC
-- and one-database resources). NULL for engines with one mode.
ALTER TABLE resource_backups ADD COLUMN dump_mode text
    CHECK (dump_mode IN ('instance', 'keyspace'));
