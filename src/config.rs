//! Configuration: a TOML file plus `CUSTODIAN_<SECTION>__<KEY>` environment overrides, validated once
//! at start-up into [`Config`]. Each section is read key by key, so every problem — unknown key,
//! wrong type, invalid value — is reported at once under its full name (`server.listen`).
//!
//! The environment is passed in as a list of pairs (an injectable source), so tests never touch the
//! process environment. Only variables whose name contains `__` are overrides: `CUSTODIAN_TOKEN`, the
//! agent-side variable Codex reads, is never taken for configuration.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

/// Prefix of environment overrides; `CUSTODIAN_DATABASE__URL` sets `database.url`.
pub const ENV_PREFIX: &str = "CUSTODIAN_";

/// Default body limit for MCP requests (1 MiB): tool arguments are small.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// Default output kept per stream of a `run` (256 KiB). Both streams at this size fit, with room to
/// spare, in the 1 MiB a standard MCP client accepts in one message (see `mcp::run_result`).
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 256 * 1024;

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub log: LogConfig,
    pub secrets: SecretsConfig,
    pub grants: GrantsConfig,
    pub runners: RunnersConfig,
}

#[derive(Debug, Clone)]
pub struct RunnersConfig {
    /// SPIFFE trust domain of gateway and runner identities.
    pub trust_domain: String,
    /// CA that issued the runners' certificates.
    pub ca_file: Option<std::path::PathBuf>,
    /// The gateway's client certificate (identity spiffe://<trust_domain>/gateway) and key.
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
    /// Longest `timeout_seconds` a run may ask for.
    pub max_timeout_seconds: u64,
    /// Output kept per stream after redaction.
    pub max_output_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct SecretsConfig {
    /// File holding the base64 master key (e.g. a mounted Kubernetes Secret).
    pub master_key_file: Option<std::path::PathBuf>,
    /// Environment variable holding the base64 master key when no file is given.
    pub master_key_env: String,
    /// A dedicated key for the audit chain (same format as the master key); without it the audit
    /// key is derived from the master key under its own label.
    pub audit_key_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone)]
pub struct GrantsConfig {
    /// `request_grant` calls allowed per agent token per minute.
    pub requests_per_minute: u32,
    /// `grant_status` waits one agent token may have open at once.
    pub concurrent_waits_per_token: u32,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Socket address the gateway listens on.
    pub listen: SocketAddr,
    /// The URL agents use to reach the gateway (scheme, host, optional port, no path). It decides
    /// the accepted `Host` and `Origin` and the URLs in metadata documents.
    pub public_url: Url,
    /// Further `Host` values accepted besides the public URL's authority (e.g. an internal name).
    pub allowed_hosts: Vec<String>,
    /// Further browser origins accepted besides the public URL's origin.
    pub allowed_origins: Vec<String>,
    /// Largest accepted request body; larger ones get `413`.
    pub max_body_bytes: usize,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// How long an idle MCP session is kept.
    pub session_idle_timeout: Duration,
    /// MCP sessions one agent token may hold open at once.
    pub max_sessions_per_token: usize,
    /// MCP sessions one tenant may hold open at once.
    pub max_sessions_per_tenant: usize,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers (also how long an idle keep-alive
    /// connection is kept).
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request body.
    pub body_read_timeout: Duration,
    /// How long a connection may stall (no byte read from or written to the client while the
    /// gateway waits on it) before it is closed.
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (embedded default) or `postgres://…`.
    pub url: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info` or `custodian=debug,info`.
    pub filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Every configuration problem found, each naming its key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

/// One section of the file, read key by key so that every bad key is reported, not just the first.
struct Section<'p> {
    name: &'static str,
    keys: &'static [&'static str],
    table: toml::Table,
    problems: &'p mut Vec<String>,
}

impl<'p> Section<'p> {
    fn new(
        root: &mut toml::Table,
        name: &'static str,
        keys: &'static [&'static str],
        problems: &'p mut Vec<String>,
    ) -> Self {
        let table = match root.remove(name) {
            None => toml::Table::new(),
            Some(toml::Value::Table(table)) => table,
            Some(_) => {
                problems.push(format!("{name}: must be a table ([{name}])"));
                toml::Table::new()
            }
        };
        Self {
            name,
            keys,
            table,
            problems,
        }
    }

    /// Takes `key`, reporting a value of the wrong type under its full name.
    fn take<T: for<'de> Deserialize<'de>>(&mut self, key: &str) -> Option<T> {
        debug_assert!(self.keys.contains(&key), "undeclared key {key}");
        let value = self.table.remove(key)?;
        match value.try_into::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                self.problems
                    .push(format!("{}.{key}: {}", self.name, e.message().trim()));
                None
            }
        }
    }

    /// Reports keys nobody took.
    fn finish(self) {
        for key in self.table.keys() {
            self.problems.push(format!(
                "{}.{key}: unknown key (expected one of: {})",
                self.name,
                self.keys.join(", ")
            ));
        }
    }
}

impl Config {
    /// Reads `path` (if any), applies the overrides found in `env`, and validates the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|e| ConfigError {
                problems: vec![format!("cannot read config file {}: {e}", path.display())],
            })?,
            None => String::new(),
        };
        Self::from_toml(&text, env)
    }

    /// Parses and validates configuration text; `env` overrides keys as described in the module docs.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let mut root: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
            problems: vec![format!("config file is not valid TOML: {}", e.message())],
        })?;
        apply_env_overrides(&mut root, env, &mut problems);

        let mut section = Section::new(&mut root, "server", SERVER_KEYS, &mut problems);
        let raw_server = RawServer {
            listen: section.take("listen"),
            public_url: section.take("public_url"),
            allowed_hosts: section.take("allowed_hosts"),
            allowed_origins: section.take("allowed_origins"),
            max_body_bytes: section.take("max_body_bytes"),
            shutdown_grace_seconds: section.take("shutdown_grace_seconds"),
            session_idle_timeout_seconds: section.take("session_idle_timeout_seconds"),
            max_sessions_per_token: section.take("max_sessions_per_token"),
            max_sessions_per_tenant: section.take("max_sessions_per_tenant"),
            max_connections: section.take("max_connections"),
            header_read_timeout_seconds: section.take("header_read_timeout_seconds"),
            body_read_timeout_seconds: section.take("body_read_timeout_seconds"),
            idle_timeout_seconds: section.take("idle_timeout_seconds"),
        };
        section.finish();
        let mut section = Section::new(&mut root, "database", DATABASE_KEYS, &mut problems);
        let raw_database = RawDatabase {
            url: section.take("url"),
            max_connections: section.take("max_connections"),
        };
        section.finish();
        let mut section = Section::new(&mut root, "secrets", SECRETS_KEYS, &mut problems);
        let secrets = SecretsConfig {
            master_key_file: section.take::<String>("master_key_file").map(Into::into),
            master_key_env: section
                .take("master_key_env")
                .unwrap_or_else(|| "CUSTODIAN_MASTER_KEY".to_owned()),
            audit_key_file: section.take::<String>("audit_key_file").map(Into::into),
        };
        section.finish();
        let mut section = Section::new(&mut root, "grants", GRANTS_KEYS, &mut problems);
        let requests_per_minute = section.take("requests_per_minute");
        let concurrent_waits = section.take("concurrent_waits_per_token");
        section.finish();
        let grants = GrantsConfig {
            requests_per_minute: small_positive(
                "grants.requests_per_minute",
                requests_per_minute,
                10,
                &mut problems,
            ),
            concurrent_waits_per_token: small_positive(
                "grants.concurrent_waits_per_token",
                concurrent_waits,
                2,
                &mut problems,
            ),
        };
        let mut section = Section::new(&mut root, "runners", RUNNERS_KEYS, &mut problems);
        let trust_domain: String = section
            .take("trust_domain")
            .unwrap_or_else(|| "custodian.local".to_owned());
        let ca_file = section.take::<String>("ca_file").map(Into::into);
        let cert_file = section.take::<String>("cert_file").map(Into::into);
        let key_file = section.take::<String>("key_file").map(Into::into);
        let max_timeout = section.take("max_timeout_seconds");
        let max_output = section.take("max_output_bytes");
        section.finish();
        if custodian_protocol::Identity::parse(&format!("spiffe://{trust_domain}/gateway")).is_err()
        {
            problems.push(format!(
                "runners.trust_domain: `{trust_domain}` is not a valid trust domain"
            ));
        }
        let tls_set = [ca_file.is_some(), cert_file.is_some(), key_file.is_some()];
        if tls_set.iter().any(|s| *s) && !tls_set.iter().all(|s| *s) {
            problems.push("runners: set ca_file, cert_file and key_file together".to_owned());
        }
        let runners = RunnersConfig {
            trust_domain,
            ca_file,
            cert_file,
            key_file,
            max_timeout_seconds: positive(
                "runners.max_timeout_seconds",
                max_timeout,
                600,
                &mut problems,
            ),
            max_output_bytes: usize::try_from(positive(
                "runners.max_output_bytes",
                max_output,
                DEFAULT_MAX_OUTPUT_BYTES as i64,
                &mut problems,
            ))
            .unwrap_or(DEFAULT_MAX_OUTPUT_BYTES),
        };
        let mut section = Section::new(&mut root, "log", LOG_KEYS, &mut problems);
        let log = LogConfig {
            format: section.take("format").unwrap_or(LogFormat::Text),
            filter: section.take("filter").unwrap_or_else(|| "info".to_owned()),
        };
        section.finish();
        for other in root.keys() {
            problems.push(format!(
                "{other}: unknown section (expected server, database, log, secrets, grants or runners)"
            ));
        }

        let server = validate_server(raw_server, &mut problems);
        let database = validate_database(raw_database, &mut problems);
        match (server, database) {
            (Some(server), Some(database)) if problems.is_empty() => Ok(Config {
                server,
                database,
                log,
                secrets,
                grants,
                runners,
            }),
            _ => Err(ConfigError { problems }),
        }
    }
}

const SERVER_KEYS: &[&str] = &[
    "listen",
    "public_url",
    "allowed_hosts",
    "allowed_origins",
    "max_body_bytes",
    "shutdown_grace_seconds",
    "session_idle_timeout_seconds",
    "max_sessions_per_token",
    "max_sessions_per_tenant",
    "max_connections",
    "header_read_timeout_seconds",
    "body_read_timeout_seconds",
    "idle_timeout_seconds",
];
const DATABASE_KEYS: &[&str] = &["url", "max_connections"];
const LOG_KEYS: &[&str] = &["format", "filter"];
const SECRETS_KEYS: &[&str] = &["master_key_file", "master_key_env", "audit_key_file"];
const GRANTS_KEYS: &[&str] = &["requests_per_minute", "concurrent_waits_per_token"];
const RUNNERS_KEYS: &[&str] = &[
    "trust_domain",
    "ca_file",
    "cert_file",
    "key_file",
    "max_timeout_seconds",
    "max_output_bytes",
];

/// The file's values before validation.
struct RawServer {
    listen: Option<String>,
    public_url: Option<String>,
    allowed_hosts: Option<Vec<String>>,
    allowed_origins: Option<Vec<String>>,
    max_body_bytes: Option<i64>,
    shutdown_grace_seconds: Option<i64>,
    session_idle_timeout_seconds: Option<i64>,
    max_sessions_per_token: Option<i64>,
    max_sessions_per_tenant: Option<i64>,
    max_connections: Option<i64>,
    header_read_timeout_seconds: Option<i64>,
    body_read_timeout_seconds: Option<i64>,
    idle_timeout_seconds: Option<i64>,
}

struct RawDatabase {
    url: Option<String>,
    max_connections: Option<i64>,
}

/// `CUSTODIAN_SERVER__PUBLIC_URL=https://x` sets `server.public_url`. Values that read as TOML
/// booleans, integers or arrays are taken as such; everything else is a string.
fn apply_env_overrides(
    root: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    problems: &mut Vec<String>,
) {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let Some((section, key)) = rest.split_once("__") else {
            continue;
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let value = parse_env_value(&raw);
        let table = root
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match table {
            toml::Value::Table(table) => {
                table.insert(key, value);
            }
            _ => problems.push(format!(
                "{name}: `{section}` is not a table in the config file"
            )),
        }
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    let looks_typed = raw == "true"
        || raw == "false"
        || raw.starts_with('[')
        || raw.strip_prefix('-').unwrap_or(raw).parse::<u64>().is_ok();
    if looks_typed
        && let Ok(mut table) = format!("v = {raw}").parse::<toml::Table>()
        && let Some(value) = table.remove("v")
    {
        return value;
    }
    toml::Value::String(raw.to_owned())
}

fn positive(key: &str, value: Option<i64>, default: i64, problems: &mut Vec<String>) -> u64 {
    match value.unwrap_or(default) {
        v if v > 0 => v.unsigned_abs(),
        v => {
            problems.push(format!("{key}: must be a positive number, got {v}"));
            default.unsigned_abs()
        }
    }
}

fn small_positive(key: &str, value: Option<i64>, default: i64, problems: &mut Vec<String>) -> u32 {
    let value = positive(key, value, default, problems);
    u32::try_from(value).unwrap_or_else(|_| {
        problems.push(format!("{key}: {value} is too large"));
        0
    })
}

fn validate_server(raw: RawServer, problems: &mut Vec<String>) -> Option<ServerConfig> {
    let listen_text = raw.listen.unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    let listen = listen_text
        .parse::<SocketAddr>()
        .map_err(|_| {
            problems.push(format!(
                "server.listen: `{listen_text}` is not an address like 127.0.0.1:8080"
            ))
        })
        .ok();
    let public_url = match raw.public_url {
        Some(text) => parse_public_url(&text, problems),
        None => listen.map(|addr| {
            let authority = if addr.ip().is_unspecified() {
                format!("localhost:{}", addr.port())
            } else {
                addr.to_string()
            };
            Url::parse(&format!("http://{authority}")).expect("a socket address forms a URL")
        }),
    };
    for origin in raw.allowed_origins.iter().flatten() {
        if Url::parse(origin).map_or(true, |u| u.origin().ascii_serialization() != *origin) {
            problems.push(format!(
                "server.allowed_origins: `{origin}` is not an origin like https://app.example.com"
            ));
        }
    }
    let max_body_bytes = positive(
        "server.max_body_bytes",
        raw.max_body_bytes,
        i64::try_from(DEFAULT_MAX_BODY_BYTES).unwrap_or(i64::MAX),
        problems,
    );
    let shutdown_grace = positive(
        "server.shutdown_grace_seconds",
        raw.shutdown_grace_seconds,
        10,
        problems,
    );
    let idle = positive(
        "server.session_idle_timeout_seconds",
        raw.session_idle_timeout_seconds,
        1800,
        problems,
    );
    let seconds = |key: &str, value: Option<i64>, default: i64, problems: &mut Vec<String>| {
        Duration::from_secs(positive(&format!("server.{key}"), value, default, problems))
    };
    let count = |key: &str, value: Option<i64>, default: i64, problems: &mut Vec<String>| {
        usize::try_from(positive(&format!("server.{key}"), value, default, problems))
            .unwrap_or(usize::MAX)
    };
    let max_sessions_per_token = count(
        "max_sessions_per_token",
        raw.max_sessions_per_token,
        32,
        problems,
    );
    let max_sessions_per_tenant = count(
        "max_sessions_per_tenant",
        raw.max_sessions_per_tenant,
        1000,
        problems,
    );
    let max_connections = count("max_connections", raw.max_connections, 1024, problems);
    let header_read_timeout = seconds(
        "header_read_timeout_seconds",
        raw.header_read_timeout_seconds,
        10,
        problems,
    );
    let body_read_timeout = seconds(
        "body_read_timeout_seconds",
        raw.body_read_timeout_seconds,
        30,
        problems,
    );
    let idle_timeout = seconds(
        "idle_timeout_seconds",
        raw.idle_timeout_seconds,
        60,
        problems,
    );
    Some(ServerConfig {
        listen: listen?,
        public_url: public_url?,
        allowed_hosts: raw.allowed_hosts.unwrap_or_default(),
        allowed_origins: raw.allowed_origins.unwrap_or_default(),
        max_body_bytes: usize::try_from(max_body_bytes).unwrap_or(usize::MAX),
        shutdown_grace: Duration::from_secs(shutdown_grace),
        session_idle_timeout: Duration::from_secs(idle),
        max_sessions_per_token,
        max_sessions_per_tenant,
        max_connections,
        header_read_timeout,
        body_read_timeout,
        idle_timeout,
    })
}

fn parse_public_url(text: &str, problems: &mut Vec<String>) -> Option<Url> {
    match Url::parse(text) {
        Ok(url)
            if matches!(url.scheme(), "http" | "https")
                && url.host().is_some()
                && url.path() == "/"
                && url.query().is_none() =>
        {
            Some(url)
        }
        _ => {
            problems.push(format!(
                "server.public_url: `{text}` must be an http(s) URL with a host and no path, like https://custodian.example.com"
            ));
            None
        }
    }
}

fn validate_database(raw: RawDatabase, problems: &mut Vec<String>) -> Option<DatabaseConfig> {
    let url = raw
        .url
        .unwrap_or_else(|| "sqlite://custodian-data/custodian.db".to_owned());
    let known = url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://");
    if !known {
        problems
            .push("database.url: must start with sqlite:, postgres:// or postgresql://".to_owned());
    }
    let max_connections = positive(
        "database.max_connections",
        raw.max_connections,
        10,
        problems,
    );
    known.then(|| DatabaseConfig {
        url,
        max_connections: u32::try_from(max_connections).unwrap_or(u32::MAX),
    })
}
