-- Secret values, envelope-encrypted: each tenant has data keys wrapped by the master key; each value
-- is sealed under a data key with its place (tenant/environment/name/version) as associated data.

CREATE TABLE tenant_keys (
    tenant_id     TEXT NOT NULL REFERENCES tenants(id),
    version       BIGINT NOT NULL,
    wrapped_key   TEXT NOT NULL,      -- AES-256-GCM under a subkey of the master key
    master_key_id TEXT NOT NULL,      -- which master key wraps it (a fingerprint, not the key)
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, version)
);

CREATE TABLE secrets (
    tenant_id   TEXT NOT NULL,
    environment TEXT NOT NULL,
    name        TEXT NOT NULL,
    version     BIGINT NOT NULL,
    key_version BIGINT NOT NULL,
    ciphertext  TEXT NOT NULL,
    set_at      BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, environment, name, version),
    FOREIGN KEY (tenant_id, environment) REFERENCES environments (tenant_id, name)
);
