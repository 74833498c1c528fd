-- Credentials made for one grant (a PostgreSQL role now; other engines later): one row per grant and
-- credential, written BEFORE the resource is created so that a gateway killed at any point leaves a
-- row for the reaper to finish. Never a secret in plaintext: the resource's password is sealed under
-- the tenant's data key with the lease's place as associated data, and cleared when it is dropped.
CREATE TABLE credential_leases (
    tenant_id          TEXT NOT NULL,
    grant_id           TEXT NOT NULL,
    credential         TEXT NOT NULL,        -- the credential's name in the environment
    environment        TEXT NOT NULL,
    engine             TEXT NOT NULL,        -- postgres
    resource           TEXT NOT NULL,        -- the role's name
    settings           TEXT NOT NULL,        -- JSON: the settings it was made with (never secret)
    state              TEXT NOT NULL,        -- creating|live|dropping|dropped
    key_version        BIGINT,
    secret_sealed      TEXT,                 -- AES-256-GCM; NULL once dropped
    created_at         BIGINT NOT NULL,
    expires_at         BIGINT NOT NULL,
    dropped_at         BIGINT,
    attempts           BIGINT NOT NULL DEFAULT 0,
    next_attempt_at_ms BIGINT NOT NULL DEFAULT 0,
    last_error         TEXT,                 -- never secret material
    lease_owner        TEXT,                 -- the replica creating or dropping it
    lease_until_ms     BIGINT,
    PRIMARY KEY (tenant_id, grant_id, credential)
);
CREATE INDEX credential_leases_open ON credential_leases (state, next_attempt_at_ms);
