-- Runners registered per tenant; an environment's runner_pool selects among them.
CREATE TABLE runners (
    tenant_id  TEXT NOT NULL REFERENCES tenants(id),
    name       TEXT NOT NULL,
    pool       TEXT NOT NULL,
    url        TEXT NOT NULL,                 -- https://host:port of its mTLS endpoint
    created_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, name)
);
