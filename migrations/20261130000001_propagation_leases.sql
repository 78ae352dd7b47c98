-- Propagations (DESIGN §7): a row is claimed with a committed lease instead of a row lock held
-- across provisioner calls. The claim sets all three columns in one short transaction; every
-- later write (renewal, result, release) is fenced on lease_token, a fresh uuid per claim, so a
-- worker whose lease expired and was taken over can never overwrite the new holder's result.
ALTER TABLE pending_propagations
    ADD COLUMN leased_by        text,
    ADD COLUMN lease_expires_at timestamptz,
    ADD COLUMN lease_token      uuid;

-- A lease is all or nothing, and only an open row (neither applied nor failed) holds one.
ALTER TABLE pending_propagations ADD CONSTRAINT pending_propagations_lease_check CHECK (
    (lease_token IS NULL) = (leased_by IS NULL)
    AND (lease_token IS NULL) = (lease_expires_at IS NULL)
    AND (lease_token IS NULL OR (applied_at IS NULL AND failed_at IS NULL))
);

-- Two replicas never regrade one team at once: at most one leased row per team. An expired
-- lease keeps its slot until the recovery step clears it (the claim never overwrites it).
CREATE UNIQUE INDEX pending_propagations_one_lease_per_team ON pending_propagations (team_id)
    WHERE lease_token IS NOT NULL;

-- Expired-lease recovery scans only leased rows.
CREATE INDEX pending_propagations_lease_idx ON pending_propagations (lease_expires_at)
    WHERE lease_token IS NOT NULL;

-- "Is there a newer row for this team (and target)?": superseding and the claim's order.
CREATE INDEX pending_propagations_team_created_idx ON pending_propagations (team_id, created_at, id);
