-- Team sign-in: each tenant's OAuth 2.1 authorization server (clients, sign-ins in progress,
-- authorization codes, token families and tokens), and the engineer behind each grant.
-- Codes and tokens are stored only as SHA-256 hashes; nothing here unlocks anything by itself.

-- Clients registered dynamically (RFC 7591): public native clients with loopback redirect URIs.
CREATE TABLE oauth_clients (
    tenant_id     TEXT NOT NULL REFERENCES tenants(id),
    id            TEXT NOT NULL,       -- ocl_ + 128 random bits (not a secret: public clients)
    client_name   TEXT,
    redirect_uris TEXT NOT NULL,       -- JSON array, matched exactly
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);

-- An authorization request whose engineer is signing in at the tenant's IdP.
CREATE TABLE oauth_signins (
    state_hash     TEXT PRIMARY KEY,   -- SHA-256 of the state sent to the IdP (single use)
    tenant_id      TEXT NOT NULL REFERENCES tenants(id),
    client_id      TEXT NOT NULL,
    redirect_uri   TEXT NOT NULL,
    code_challenge TEXT NOT NULL,      -- the client's S256 challenge
    client_state   TEXT,
    scope          TEXT NOT NULL,
    upstream_sealed TEXT NOT NULL,     -- AES-256-GCM: PKCE verifier and nonce for the IdP
    expires_at     BIGINT NOT NULL
);

-- One per completed sign-in: the "OAuth session" admins list and revoke. Every code and token
-- issued from it belongs to it; revoking it ends them all.
CREATE TABLE oauth_families (
    tenant_id     TEXT NOT NULL REFERENCES tenants(id),
    id            TEXT NOT NULL,       -- ofa_ + 64 random bits (hex)
    client_id     TEXT NOT NULL,
    client_name   TEXT,
    subject       TEXT NOT NULL,       -- the engineer at the tenant's IdP
    name          TEXT,
    email         TEXT,                -- only when the IdP marks it verified
    scope         TEXT NOT NULL,
    resource      TEXT NOT NULL,       -- the tenant's MCP URL (RFC 8707)
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,     -- no refresh beyond this
    last_used_at  BIGINT NOT NULL,
    revoked_at    BIGINT,
    revoke_reason TEXT,
    PRIMARY KEY (tenant_id, id)
);

CREATE TABLE oauth_codes (
    code_hash      TEXT PRIMARY KEY,
    tenant_id      TEXT NOT NULL,
    family_id      TEXT NOT NULL,
    client_id      TEXT NOT NULL,
    redirect_uri   TEXT NOT NULL,
    code_challenge TEXT NOT NULL,
    expires_at     BIGINT NOT NULL,
    used_at        BIGINT
);

CREATE TABLE oauth_tokens (
    tenant_id   TEXT NOT NULL,
    id          TEXT NOT NULL,         -- public id inside the token (hex)
    family_id   TEXT NOT NULL,
    kind        TEXT NOT NULL,         -- access | refresh
    secret_hash TEXT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT,                -- refresh tokens: when rotated (a second use revokes the family)
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX oauth_tokens_family ON oauth_tokens (tenant_id, family_id);

-- The engineer who asked for a grant (signed in through OAuth; NULL for agent tokens).
ALTER TABLE grants ADD COLUMN requester_sub TEXT;
ALTER TABLE grants ADD COLUMN requester_name TEXT;

-- Who may approve relative to the requester: any | requester (the engineer who asked) |
-- not_requester (four eyes).
ALTER TABLE environments ADD COLUMN approver_vs_requester TEXT NOT NULL DEFAULT 'any';
