-- The tamper-evident audit log replaces grant_events: one HMAC-SHA256 chain per tenant, written in
-- the same transaction as the action it records (no record, no action).
DROP TABLE grant_events;

CREATE TABLE audit_log (
    tenant_id TEXT NOT NULL,
    seq       BIGINT NOT NULL,        -- 1, 2, 3, … per tenant
    at_ms     BIGINT NOT NULL,
    kind      TEXT NOT NULL,          -- grant.requested, grant.approved, exec, …
    grant_id  TEXT NOT NULL,
    detail    TEXT NOT NULL,          -- JSON, never secret material
    prev_mac  TEXT NOT NULL,
    mac       TEXT NOT NULL,          -- HMAC-SHA256(audit key, this record + prev_mac)
    PRIMARY KEY (tenant_id, seq)
);
CREATE INDEX audit_log_by_grant ON audit_log (tenant_id, grant_id, seq);

-- The head of each chain; updating it first serializes appenders of one tenant.
CREATE TABLE audit_heads (
    tenant_id TEXT PRIMARY KEY,
    seq       BIGINT NOT NULL,
    mac       TEXT NOT NULL
);
