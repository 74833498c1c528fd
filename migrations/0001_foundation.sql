-- Tenants, environments and agent tokens. Times are Unix seconds.
CREATE TABLE tenants (
    id           TEXT PRIMARY KEY,           -- the slug in /t/{tenant}/mcp
    display_name TEXT NOT NULL,
    idp_issuer   TEXT,                       -- OIDC issuer; advertised in RFC 9728 metadata
    created_at   BIGINT NOT NULL
);

CREATE TABLE environments (
    tenant_id            TEXT NOT NULL REFERENCES tenants(id),
    name                 TEXT NOT NULL,
    description          TEXT NOT NULL,
    secret_names         TEXT NOT NULL,      -- JSON array of names (never values)
    approvers            TEXT NOT NULL,      -- JSON: {"subjects":[],"emails":[],"groups":[]}
    max_ttl_seconds      BIGINT NOT NULL,
    max_uses             BIGINT NOT NULL,
    max_auth_age_seconds BIGINT NOT NULL,
    runner_pool          TEXT NOT NULL,
    created_at           BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, name)
);

CREATE TABLE agent_tokens (
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    id          TEXT NOT NULL,               -- public part of the token, shown in listings
    name        TEXT NOT NULL,
    secret_hash TEXT NOT NULL,               -- hex SHA-256 of the 256-bit secret part
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT,
    PRIMARY KEY (tenant_id, id)
);

CREATE UNIQUE INDEX agent_tokens_active_name ON agent_tokens (tenant_id, name) WHERE revoked_at IS NULL;
