-- MCP sessions, shared by every replica: any replica serves any session (a replica that does not
-- hold one in memory re-creates it from this row), so no routing stickiness is needed and a
-- replica's loss ends no session. The session id itself is not stored, only its SHA-256.
CREATE TABLE mcp_sessions (
    id_hash      TEXT PRIMARY KEY,                      -- hex SHA-256 of the Mcp-Session-Id
    tenant_id    TEXT NOT NULL REFERENCES tenants(id),
    token_id     TEXT NOT NULL,                         -- the agent token that opened the session
    initialize   TEXT NOT NULL,                         -- the client's initialize params (JSON)
    created_at   BIGINT NOT NULL,                       -- Unix milliseconds
    last_seen_at BIGINT NOT NULL                        -- Unix milliseconds, refreshed while in use
);

CREATE INDEX mcp_sessions_token ON mcp_sessions (tenant_id, token_id, last_seen_at);
CREATE INDEX mcp_sessions_seen ON mcp_sessions (last_seen_at);
