-- Where runs of an environment may connect (default: nowhere), and the credentials the runner's
-- proxy adds to requests to a destination. Only secret NAMES are stored here, never values.
CREATE TABLE egress_rules (
    tenant_id       TEXT NOT NULL,
    environment     TEXT NOT NULL,
    destination     TEXT NOT NULL,    -- normalized: https://host:port, http://host:port, tcp:host:port
    scheme          TEXT NOT NULL,    -- https, http or tcp
    host            TEXT NOT NULL,
    port            BIGINT NOT NULL,
    allow_private   BIGINT NOT NULL,  -- 1: private, loopback, link-local, metadata addresses allowed
    inject_secret   TEXT,             -- name of a secret of the environment
    inject_header   TEXT,             -- header name, e.g. Authorization
    inject_template TEXT,             -- header value with {value}, e.g. Bearer {value}
    basic_user      TEXT,             -- basic auth: the user; the secret is the password
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, environment, destination),
    FOREIGN KEY (tenant_id, environment) REFERENCES environments (tenant_id, name)
);
