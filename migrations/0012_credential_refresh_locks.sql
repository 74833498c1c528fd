-- One refresh of an OAuth credential at a time, across every replica: a refresh token that the IdP
-- rotates can be used once, so the replica that holds this row refreshes, stores the rotated token
-- as the credential's next version and deletes the row; the others wait and use the new version. A
-- holder that dies is replaced once `expires_at_ms` has passed. Holds no secret.
CREATE TABLE credential_refresh_locks (
    tenant_id     TEXT NOT NULL,
    environment   TEXT NOT NULL,
    name          TEXT NOT NULL,
    holder        TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, environment, name)
);
