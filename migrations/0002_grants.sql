-- Task grants: per-tenant IdP settings, approval policy details, grants and their event log.

ALTER TABLE tenants ADD COLUMN idp_client_id TEXT;
-- Where the client secret comes from ("env:NAME" or "file:/path"); never the secret itself.
ALTER TABLE tenants ADD COLUMN idp_client_secret_ref TEXT;
ALTER TABLE tenants ADD COLUMN idp_scopes TEXT NOT NULL DEFAULT 'openid email profile';
ALTER TABLE tenants ADD COLUMN idp_approver_claim TEXT NOT NULL DEFAULT 'email';
ALTER TABLE tenants ADD COLUMN idp_groups_claim TEXT NOT NULL DEFAULT 'groups';

ALTER TABLE environments ADD COLUMN require_fresh_login BIGINT NOT NULL DEFAULT 1;
ALTER TABLE environments ADD COLUMN accepted_acr TEXT NOT NULL DEFAULT '[]';   -- JSON: any of
ALTER TABLE environments ADD COLUMN required_amr TEXT NOT NULL DEFAULT '[]';   -- JSON: all of

CREATE TABLE grants (
    tenant_id                 TEXT NOT NULL REFERENCES tenants(id),
    id                        TEXT NOT NULL,       -- gr_ + 128 random bits; also the approval page id
    environment               TEXT NOT NULL,
    agent_token_id            TEXT NOT NULL,
    agent_name                TEXT NOT NULL,
    purpose                   TEXT NOT NULL,
    ttl_seconds               BIGINT NOT NULL,
    max_uses                  BIGINT NOT NULL,
    uses                      BIGINT NOT NULL DEFAULT 0,
    state                     TEXT NOT NULL,       -- pending|active|exhausted|expired|revoked|denied
    created_at                BIGINT NOT NULL,
    expires_at                BIGINT NOT NULL,     -- pending: device code expiry; active: approval + ttl
    user_code                 TEXT,
    verification_uri          TEXT,
    verification_uri_complete TEXT,
    device_code_sealed        TEXT,                -- AES-256-GCM; cleared when the grant leaves pending
    poll_interval_ms          BIGINT NOT NULL,
    next_poll_at_ms           BIGINT NOT NULL,
    lease_owner               TEXT,
    lease_until_ms            BIGINT,
    approved_at               BIGINT,
    approver_sub              TEXT,
    approver_name             TEXT,
    approver_email            TEXT,
    approver_groups           TEXT,
    auth_time                 BIGINT,
    end_reason                TEXT,
    ended_at                  BIGINT,
    trace_context             TEXT,
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX grants_by_id ON grants (id);
CREATE INDEX grants_due ON grants (state, next_poll_at_ms);

-- Append-only: one row per transition or notable step, numbered per grant.
CREATE TABLE grant_events (
    tenant_id TEXT NOT NULL,
    grant_id  TEXT NOT NULL,
    seq       BIGINT NOT NULL,
    at_ms     BIGINT NOT NULL,
    kind      TEXT NOT NULL,
    detail    TEXT NOT NULL,                        -- JSON, never secret material
    PRIMARY KEY (tenant_id, grant_id, seq)
);
