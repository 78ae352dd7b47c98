-- Every claim stamps a fresh token on the row it takes. A claim whose outcome the worker could not
-- learn (the connection broke after the UPDATE committed, or the follow-up read failed) is given
-- back by its token — pending again, the attempt not counted — instead of sitting `running` until
-- its lease expires and then counting an attempt that never ran (issue 15).
ALTER TABLE resource_backups ADD COLUMN claim_token uuid;
ALTER TABLE resource_restores ADD COLUMN claim_token uuid;
ALTER TABLE backup_verifications ADD COLUMN claim_token uuid;
CREATE INDEX resource_backups_claim_token_idx ON resource_backups (claim_token) WHERE status = 'running';
CREATE INDEX resource_restores_claim_token_idx ON resource_restores (claim_token) WHERE status = 'running';
CREATE INDEX backup_verifications_claim_token_idx ON backup_verifications (claim_token) WHERE status = 'running';
