//! `postgres` credentials: a PostgreSQL login role made for one grant and dropped when it ends.
//!
//! The environment holds an admin connection URL (sealed like every secret) and settings (which
//! roles the new role joins, its connection limit, the database, what runs connect to, what happens
//! to objects it owns). The first run of a grant that needs it creates `cst_<grant>_<credential>`
//! with a random password, `VALID UNTIL` the grant's expiry; every run of the grant gets `PGHOST`,
//! `PGPORT`, `PGDATABASE`, `PGUSER`, `PGPASSWORD` and `DATABASE_URL` for it. When the grant ends
//! the reaper ([`super::lease`]) locks the role, ends its sessions and drops it.
//!
//! Guarantees:
//! - The admin URL never reaches a run: it is only redacted there (`[REDACTED:<credential>]`).
//! - No text from settings or from the database is interpolated into SQL by this code: identifiers
//!   are checked against `[A-Za-z_][A-Za-z0-9_]{0,62}` when set and quoted by the server itself
//!   (`format('%I')`, `%L`), with every value bound as a parameter.
//! - The password never reaches the server, nor any statement or log: the role's password is a
//!   SCRAM-SHA-256 verifier computed here (PostgreSQL stores such a verifier as given). Statement
//!   logging is off on the admin connection.
//! - The role has no privilege of its own (`NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
//!   NOBYPASSRLS`) beyond the roles named in its settings.
//! - Both operations are idempotent, so a gateway killed half way is finished by the next attempt.

use std::str::FromStr;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgSslMode};
use sqlx::{ConnectOptions, Connection};
use zeroize::Zeroizing;

use super::{CredentialError, ForRun, Kind};

/// Template roles a new role may join.
const MAX_ROLES: usize = 16;
/// The connection limit when the settings name none.
const DEFAULT_CONNECTION_LIMIT: i32 = 5;
const MAX_CONNECTION_LIMIT: i32 = 1000;
/// PostgreSQL's default SCRAM iteration count.
const SCRAM_ITERATIONS: u32 = 4096;
/// Connecting and each statement of an admin operation.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a drop waits for terminated sessions to go.
const SESSIONS_GONE_WITHIN: Duration = Duration::from_secs(5);

/// Variables every run receives for a postgres credential.
pub const VARIABLES: [&str; 7] = [
    "PGHOST",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGPASSWORD",
    "PGSSLMODE",
    "DATABASE_URL",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    #[serde(default)]
    roles: Vec<String>,
    connection_limit: Option<i32>,
    database: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    #[serde(default)]
    on_drop: Option<RawOnDrop>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawOnDrop {
    Word(String),
    Reassign(Reassign),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reassign {
    reassign_to: String,
}

/// What happens to objects the role owns when it is dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnDrop {
    /// `DROP OWNED BY` the role (its objects go with it).
    DropOwned,
    /// `REASSIGN OWNED BY` the role to this one, then `DROP OWNED` (its remaining privileges).
    ReassignTo(String),
}

/// Validated settings of a postgres credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub roles: Vec<String>,
    pub connection_limit: i32,
    /// Default: the admin URL's database.
    pub database: Option<String>,
    /// What runs connect to; default: the admin URL's host and port.
    pub host: Option<String>,
    pub port: Option<u16>,
    pub on_drop: OnDrop,
}

/// A role or database name we accept: a plain SQL identifier, at most 63 bytes.
fn check_identifier(what: &str, name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !first_ok || name.len() > 63 || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!(
            "{what} `{}` must be a plain identifier: a letter or _, then letters, digits or _, at most 63 bytes",
            name.chars().take(64).collect::<String>()
        ));
    }
    if name.starts_with("cst_") {
        return Err(format!(
            "{what} `{name}`: names starting with cst_ are the roles Custodian makes"
        ));
    }
    if [
        "public",
        "none",
        "current_user",
        "current_role",
        "session_user",
    ]
    .contains(&name.to_ascii_lowercase().as_str())
    {
        return Err(format!("{what} `{name}` is a reserved name"));
    }
    Ok(())
}

fn check_host(host: &str) -> Result<(), String> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("host must be a host name or an IP address".to_owned())
    }
}

impl Settings {
    pub fn parse(settings: &Value) -> Result<Settings, String> {
        let raw: RawSettings = if settings.is_null() {
            serde_json::from_value(serde_json::json!({}))
        } else {
            serde_json::from_value(settings.clone())
        }
        .map_err(|e| {
            format!(
                "{e}; expected {{\"roles\": [..], \"connection_limit\": N, \"database\": \"..\", \
                 \"host\": \"..\", \"port\": N, \"on_drop\": \"drop_owned\" | {{\"reassign_to\": \"role\"}}}}"
            )
        })?;
        if raw.roles.len() > MAX_ROLES {
            return Err(format!("at most {MAX_ROLES} roles"));
        }
        for role in &raw.roles {
            check_identifier("role", role)?;
        }
        let connection_limit = raw.connection_limit.unwrap_or(DEFAULT_CONNECTION_LIMIT);
        if !(1..=MAX_CONNECTION_LIMIT).contains(&connection_limit) {
            return Err(format!(
                "connection_limit must be between 1 and {MAX_CONNECTION_LIMIT}"
            ));
        }
        if let Some(database) = &raw.database {
            check_identifier("database", database)?;
        }
        if let Some(host) = &raw.host {
            check_host(host)?;
        }
        if raw.port == Some(0) {
            return Err("port must be between 1 and 65535".to_owned());
        }
        let on_drop = match raw.on_drop {
            None => OnDrop::DropOwned,
            Some(RawOnDrop::Word(word)) if word == "drop_owned" => OnDrop::DropOwned,
            Some(RawOnDrop::Word(_)) => {
                return Err(
                    "on_drop must be \"drop_owned\" or {\"reassign_to\": \"role\"}".to_owned(),
                );
            }
            Some(RawOnDrop::Reassign(Reassign { reassign_to })) => {
                check_identifier("reassign_to", &reassign_to)?;
                OnDrop::ReassignTo(reassign_to)
            }
        };
        Ok(Settings {
            roles: raw.roles,
            connection_limit,
            database: raw.database,
            host: raw.host,
            port: raw.port,
            on_drop,
        })
    }
}

pub fn validate(settings: &Value) -> Result<(), String> {
    Settings::parse(settings).map(|_| ())
}

/// Where the admin URL points, without its password.
struct Target {
    options: PgConnectOptions,
    host: String,
    port: u16,
    database: String,
    ssl_mode: &'static str,
}

impl Target {
    fn of(settings: &Settings, admin_url: &[u8]) -> Result<Target, String> {
        let text = std::str::from_utf8(admin_url)
            .map_err(|_| "the admin connection URL must be UTF-8".to_owned())?;
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            return Err("the value must be an admin connection URL postgres://USER:PASSWORD@HOST:PORT/DATABASE".to_owned());
        }
        // The parser's message may quote the URL: it is not passed on.
        let options = PgConnectOptions::from_str(text)
            .map_err(|_| "the admin connection URL cannot be parsed".to_owned())?;
        if options.get_socket().is_some() {
            return Err(
                "the admin connection URL must name a TCP host (runs cannot reach a socket)"
                    .to_owned(),
            );
        }
        let database = match (&settings.database, options.get_database()) {
            (Some(database), _) => database.clone(),
            (None, Some(database)) => {
                check_identifier("the admin URL's database", database)?;
                database.to_owned()
            }
            (None, None) => {
                return Err(
                    "name the database in the admin URL or in the settings (\"database\")"
                        .to_owned(),
                );
            }
        };
        let ssl_mode = match options.get_ssl_mode() {
            PgSslMode::Disable => "disable",
            PgSslMode::Allow => "allow",
            PgSslMode::Prefer => "prefer",
            PgSslMode::Require => "require",
            PgSslMode::VerifyCa => "verify-ca",
            PgSslMode::VerifyFull => "verify-full",
        };
        let host = match &settings.host {
            Some(host) => host.clone(),
            None => options.get_host().to_owned(),
        };
        check_host(&host)?;
        Ok(Target {
            port: settings.port.unwrap_or(options.get_port()),
            host,
            database: database.clone(),
            ssl_mode,
            options: options
                .database(&database)
                .application_name("custodian")
                .disable_statement_logging(),
        })
    }
}

pub fn check_value(settings: &Value, value: &[u8]) -> Result<(), String> {
    let settings = Settings::parse(settings)?;
    Target::of(&settings, value).map(|_| ())
}

pub fn usage(name: &str, settings: &Value) -> (Vec<String>, String) {
    let variables = VARIABLES.iter().map(|v| (*v).to_owned()).collect();
    let (member, database) = match Settings::parse(settings) {
        Ok(s) if s.roles.is_empty() => (String::new(), s.database),
        Ok(s) => (format!(", member of {}", s.roles.join(", ")), s.database),
        Err(_) => (String::new(), None),
    };
    let database = database.map_or(String::new(), |d| format!(" in database {d}"));
    let how = format!(
        "{name}: a PostgreSQL login role made for your grant{member}{database}; psql and libpq \
         clients connect with no arguments (PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD, \
         PGSSLMODE), \
         other clients use DATABASE_URL. The same role serves every run of the grant; it is \
         dropped, with its sessions and the objects it owns, when the grant is revoked, expires \
         or its last run ends"
    );
    (variables, how)
}

/// The role made for `grant_id`'s use of the credential `name`: `cst_` + the grant's 128 random
/// bits + 32 bits of the credential's name (45 bytes, within PostgreSQL's 63).
pub fn role_name(grant_id: &str, name: &str) -> String {
    let grant = grant_id.strip_prefix("gr_").unwrap_or(grant_id);
    let of_name = Sha256::digest(name.as_bytes());
    format!("cst_{}_{}", grant, hex::encode(&of_name[..4]))
}

/// A fresh password: 32 characters of `[A-Za-z0-9]` (190 bits), nothing that needs quoting in a
/// URL or a connection string.
pub fn new_password() -> Zeroizing<String> {
    use rand::Rng;
    let chars: Vec<u8> = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .collect();
    Zeroizing::new(String::from_utf8(chars).expect("alphanumeric is ASCII"))
}

/// The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677), with a fresh salt.
fn scram_verifier(password: &str) -> Zeroizing<String> {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let mut salted = Zeroizing::new([0u8; 32]);
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, SCRAM_ITERATIONS, &mut *salted);
    let mac = |label: &[u8]| {
        let mut mac = Hmac::<Sha256>::new_from_slice(&*salted).expect("any key length");
        mac.update(label);
        mac.finalize().into_bytes()
    };
    let client_key = mac(b"Client Key");
    let stored_key = Sha256::digest(client_key);
    let server_key = mac(b"Server Key");
    Zeroizing::new(format!(
        "SCRAM-SHA-256${SCRAM_ITERATIONS}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key),
        STANDARD.encode(server_key)
    ))
}

/// Replaces secret text in an error before it is stored, logged or shown.
fn scrub(text: String, secrets: &[&str]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text, |text, secret| text.replace(secret, "[REDACTED]"))
}

fn admin_password(admin_url: &[u8]) -> String {
    std::str::from_utf8(admin_url)
        .ok()
        .and_then(|u| url::Url::parse(u).ok())
        .and_then(|u| u.password().map(str::to_owned))
        .unwrap_or_default()
}

async fn admin_connection(target: &Target) -> Result<PgConnection, String> {
    tokio::time::timeout(ADMIN_TIMEOUT, target.options.connect())
        .await
        .map_err(|_| "connecting with the admin URL timed out".to_owned())?
        .map_err(|e| format!("connecting with the admin URL failed: {e}"))
}

/// Asks the server to build a statement from `template` (a constant using `%I`/`%L`) with bound
/// arguments, then runs it.
async fn run_formatted(
    conn: &mut PgConnection,
    template: &'static str,
    args: &[&str],
) -> Result<(), sqlx::Error> {
    let mut query = sqlx::query_scalar::<_, String>(match args.len() {
        1 => "SELECT format($1, $2)",
        2 => "SELECT format($1, $2, $3)",
        3 => "SELECT format($1, $2, $3, $4)",
        4 => "SELECT format($1, $2, $3, $4, $5)",
        _ => unreachable!("templates take one to four arguments"),
    })
    .bind(template);
    for arg in args {
        query = query.bind(*arg);
    }
    let statement = Zeroizing::new(query.fetch_one(&mut *conn).await?);
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement.as_str().to_owned()))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Creates `role` (or, if it exists from an interrupted attempt, resets it) with `password`,
/// valid until `expires_at`, member of the settings' roles.
pub async fn create_role(
    settings: &Value,
    admin_url: &[u8],
    role: &str,
    password: &str,
    expires_at: i64,
) -> Result<(), String> {
    let settings = Settings::parse(settings)?;
    let target = Target::of(&settings, admin_url)?;
    let verifier = scram_verifier(password);
    let secrets = [admin_password(admin_url)];
    let result = async {
        let mut conn = admin_connection(&target).await?;
        let attempt = async {
            let mut tx = conn.begin().await?;
            let (exists,): (bool,) =
                sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
                    .bind(role)
                    .fetch_one(&mut *tx)
                    .await?;
            let (until,): (String,) = sqlx::query_as(
                "SELECT to_char(to_timestamp($1) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
            )
            .bind(expires_at as f64)
            .fetch_one(&mut *tx)
            .await?;
            let template = if exists {
                "ALTER ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
                 NOBYPASSRLS INHERIT CONNECTION LIMIT %s PASSWORD %L VALID UNTIL %L"
            } else {
                "CREATE ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
                 NOBYPASSRLS INHERIT CONNECTION LIMIT %s PASSWORD %L VALID UNTIL %L"
            };
            let limit = settings.connection_limit.to_string();
            run_formatted(&mut tx, template, &[role, &limit, &verifier, &until]).await?;
            // A CREATEROLE admin that is not a superuser needs to hold the role to drop what it
            // will own (`DROP OWNED`) and to end its sessions.
            let (superuser,): (bool,) =
                sqlx::query_as("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                    .fetch_one(&mut *tx)
                    .await?;
            if !superuser {
                run_formatted(&mut tx, "GRANT %I TO CURRENT_USER", &[role]).await?;
            }
            for member_of in &settings.roles {
                run_formatted(&mut tx, "GRANT %I TO %I", &[member_of, role]).await?;
            }
            tx.commit().await
        };
        let done = tokio::time::timeout(ADMIN_TIMEOUT, attempt).await;
        let _ = conn.close().await;
        match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("creating role {role} failed: {e}")),
            Err(_) => Err(format!("creating role {role} timed out")),
        }
    }
    .await;
    result.map_err(|e| scrub(e, &[&secrets[0], password]))
}

/// Drops `role`: no more logins, its sessions terminated, its objects dropped or reassigned (in
/// the configured database), then the role. Succeeds when the role does not exist.
pub async fn drop_role(settings: &Value, admin_url: &[u8], role: &str) -> Result<(), String> {
    let settings = Settings::parse(settings)?;
    let target = Target::of(&settings, admin_url)?;
    let secrets = [admin_password(admin_url)];
    let result = async {
        let mut conn = admin_connection(&target).await?;
        let attempt = async {
            let (exists,): (bool,) =
                sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
                    .bind(role)
                    .fetch_one(&mut conn)
                    .await?;
            if !exists {
                return Ok(());
            }
            run_formatted(&mut conn, "ALTER ROLE %I WITH NOLOGIN", &[role]).await?;
            let started = std::time::Instant::now();
            loop {
                let (left,): (i64,) = sqlx::query_as(
                    "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE usename = $1) AS t",
                )
                .bind(role)
                .fetch_one(&mut conn)
                .await?;
                if left == 0 || started.elapsed() > SESSIONS_GONE_WITHIN {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut tx = conn.begin().await?;
            if let OnDrop::ReassignTo(to) = &settings.on_drop {
                // What runs with its owner's privileges would run with the new owner's, which
                // the grant's role may not have had: its SECURITY DEFINER routines and its views
                // are made to run with their caller's privileges first (views that cannot be,
                // before PostgreSQL 15, are dropped).
                let neutralize: Vec<String> = sqlx::query_scalar(
                    "SELECT format('ALTER ROUTINE %s SECURITY INVOKER', p.oid::regprocedure)                      FROM pg_proc p JOIN pg_roles o ON o.oid = p.proowner                      WHERE o.rolname = $1 AND p.prosecdef                      UNION ALL                      SELECT format(CASE WHEN current_setting('server_version_num')::int >= 150000                      THEN 'ALTER VIEW %s SET (security_invoker = true)' ELSE 'DROP VIEW %s' END,                      c.oid::regclass)                      FROM pg_class c JOIN pg_roles o ON o.oid = c.relowner                      WHERE o.rolname = $1 AND c.relkind = 'v'",
                )
                .bind(role)
                .fetch_all(&mut *tx)
                .await?;
                for statement in neutralize {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                        .execute(&mut *tx)
                        .await?;
                }
                run_formatted(&mut tx, "REASSIGN OWNED BY %I TO %I", &[role, to]).await?;
            }
            run_formatted(&mut tx, "DROP OWNED BY %I", &[role]).await?;
            run_formatted(&mut tx, "DROP ROLE %I", &[role]).await?;
            tx.commit().await
        };
        let done = tokio::time::timeout(ADMIN_TIMEOUT * 2, attempt).await;
        let _ = conn.close().await;
        match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("dropping role {role} failed: {e}")),
            Err(_) => Err(format!("dropping role {role} timed out")),
        }
    }
    .await;
    result.map_err(|e| scrub(e, &[&secrets[0]]))
}

/// The host a run reaches the database at: inside a run, a `tcp:HOST:PORT` egress rule listens on
/// 127.0.0.1:PORT (see the runner's egress module), so a database listed that way is reached there.
fn host_in_run(host: &str, port: u16, rules: &[crate::egress::Rule]) -> String {
    let forwarded = rules.iter().any(|r| {
        r.destination.scheme == "tcp"
            && r.destination.port == port
            && r.destination.host.eq_ignore_ascii_case(host)
    });
    if forwarded {
        "127.0.0.1".to_owned()
    } else {
        host.to_owned()
    }
}

/// Hands the grant's role for the credential `name` to a run (creating it on the grant's first
/// run), and the admin URL to the redactors only.
pub async fn for_run(
    app: &crate::app::App,
    grant: &crate::grants::Grant,
    name: &str,
    settings: &Value,
    value: &[u8],
    run: &mut ForRun,
) -> Result<(), CredentialError> {
    let failed = |reason: String| CredentialError::Issue {
        kind: Kind::Postgres,
        name: name.to_owned(),
        reason,
    };
    let parsed = Settings::parse(settings).map_err(failed)?;
    let mut target = Target::of(&parsed, value).map_err(failed)?;
    if parsed.host.is_none() {
        let tenant = crate::tenants::TenantId::parse(&grant.tenant_id)
            .map_err(|_| failed("the grant's tenant id is corrupt".to_owned()))?;
        let rules = crate::egress::list(&app.db, &tenant, &grant.environment)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "reading egress rules failed");
                failed("the environment's egress rules cannot be read".to_owned())
            })?;
        target.host = host_in_run(&target.host, target.port, &rules);
    }
    if run.plain.iter().any(|v| v.name == "PGUSER") {
        return Err(failed(
            "a run can take one postgres credential; this environment has several".to_owned(),
        ));
    }
    run.redact(name, value);
    let admin_password = Zeroizing::new(admin_password(value));
    if admin_password.len() >= crate::secrets::MIN_VALUE_LEN {
        run.redact(name, admin_password.as_bytes());
    }
    let issued = super::lease::issue(
        app,
        grant,
        name,
        super::lease::Engine::Postgres,
        settings,
        value,
    )
    .await
    .map_err(failed)?;
    let host_in_url = if target.host.contains(':') {
        format!("[{}]", target.host)
    } else {
        target.host.clone()
    };
    for (variable, shown) in [
        ("PGHOST", target.host.as_str()),
        ("PGPORT", &target.port.to_string()),
        ("PGDATABASE", &target.database),
        ("PGUSER", &issued.resource),
        ("PGSSLMODE", target.ssl_mode),
    ] {
        run.plain(variable, shown);
    }
    run.variable("PGPASSWORD", &issued.secret);
    let url = Zeroizing::new(format!(
        "postgres://{}:{}@{host_in_url}:{}/{}?sslmode={}",
        issued.resource, *issued.secret, target.port, target.database, target.ssl_mode
    ));
    run.variable("DATABASE_URL", &url);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_are_checked_strictly() {
        let ok = Settings::parse(&json!({"roles": ["app_read"], "connection_limit": 3, "database": "app", "on_drop": {"reassign_to": "app_owner"}})).unwrap();
        assert_eq!(ok.on_drop, OnDrop::ReassignTo("app_owner".into()));
        assert_eq!(
            Settings::parse(&Value::Null).unwrap().connection_limit,
            DEFAULT_CONNECTION_LIMIT
        );
        for bad in [
            json!({"roles": ["app\"; DROP ROLE x; --"]}),
            json!({"roles": ["1abc"]}),
            json!({"roles": ["public"]}),
            json!({"roles": ["cst_other"]}),
            json!({"roles": ["a".repeat(64)]}),
            json!({"roles": ["rôle"]}),
            json!({"connection_limit": 0}),
            json!({"database": "app db"}),
            json!({"host": "h/ost"}),
            json!({"on_drop": "cascade"}),
            json!({"on_drop": {"reassign_to": "x y"}}),
            json!({"unknown": 1}),
        ] {
            assert!(Settings::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn admin_urls_are_checked_without_echoing_them() {
        let settings = json!({"database": "app"});
        assert!(check_value(&settings, b"postgres://admin:pw-secret@db.internal:6432/x").is_ok());
        let target = Target::of(
            &Settings::parse(&settings).unwrap(),
            b"postgres://admin:pw-secret@db.internal:6432/x",
        )
        .unwrap();
        assert_eq!(
            (target.host.as_str(), target.port, target.database.as_str()),
            ("db.internal", 6432, "app")
        );
        for bad in [
            &b"mysql://admin:pw-secret@db/app"[..],
            b"postgres://admin:pw-secret@db:notaport/app",
            b"postgres://admin:pw-secret@db/bad-name",
        ] {
            let error = check_value(&Value::Null, bad).unwrap_err();
            assert!(!error.contains("pw-secret"), "{error}");
        }
    }

    #[test]
    fn a_database_listed_as_a_tcp_forward_is_reached_on_the_runs_loopback() {
        let rule = |text: &str| crate::egress::Rule {
            destination: crate::egress::parse_destination(text).unwrap(),
            allow_private: true,
            inject: None,
        };
        let rules = [rule("tcp:db.internal:5432"), rule("https://db.other:5432")];
        assert_eq!(host_in_run("db.internal", 5432, &rules), "127.0.0.1");
        assert_eq!(host_in_run("DB.internal", 5432, &rules), "127.0.0.1");
        assert_eq!(host_in_run("db.internal", 6432, &rules), "db.internal");
        assert_eq!(host_in_run("db.other", 5432, &rules), "db.other");
    }

    #[test]
    fn role_names_fit_and_differ_per_grant_and_credential() {
        let grant = "gr_0123456789abcdef0123456789abcdef";
        let role = role_name(grant, "DB");
        assert!(role.len() <= 63 && role.starts_with("cst_0123456789abcdef"));
        assert_ne!(role, role_name(grant, "OTHER_DB"));
        assert!(role.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    }

    #[test]
    fn passwords_and_verifiers_have_the_expected_shape() {
        let password = new_password();
        assert_eq!(password.len(), 32);
        assert!(password.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(*password, *new_password());
        let verifier = scram_verifier(&password);
        assert!(verifier.starts_with("SCRAM-SHA-256$4096:"));
        assert!(!verifier.contains(password.as_str()));
    }
}
