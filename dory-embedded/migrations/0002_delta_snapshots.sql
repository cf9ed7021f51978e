-- A pre-copy move commits a delta snapshot: the chunks that changed since a full checkpoint
-- of the old owner (its base). The base is named here so pruning keeps it while the delta
-- is kept.
ALTER TABLE snapshots ADD COLUMN base_epoch INTEGER;
ALTER TABLE snapshots ADD COLUMN base_sequence INTEGER;
