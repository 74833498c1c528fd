//! Egress rules per environment: where runs may connect (default: nowhere) and which credentials
//! the runner's proxy adds to their requests. Destinations are `https://host[:port]`,
//! `http://host[:port]` (through the proxy) and `tcp:host:port` (a forward that appears on
//! 127.0.0.1:`port` in the run). Only secret names are stored here; values are opened per run and
//! travel to the runner inside the rule, never into the run's environment.

use std::net::IpAddr;

use custodian_protocol::{EgressRule, InjectHeader};
use serde::Serialize;

use crate::clock::UnixSeconds;
use crate::store::{Db, StoreError};
use crate::tenants::TenantId;

/// The proxy's port inside a run; a TCP forward cannot use it.
pub const PROXY_PORT: u16 = 3128;

/// A parsed destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Destination {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.scheme.as_str() {
            "tcp" => write!(f, "tcp:{host}:{}", self.port),
            scheme => write!(f, "{scheme}://{host}:{}", self.port),
        }
    }
}

/// A credential the proxy adds as a header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Injection {
    /// The environment's secret that holds the value.
    pub secret: String,
    pub header: String,
    /// The header's value with `{value}` where the secret goes (empty for basic auth).
    pub template: String,
    pub basic_user: Option<String>,
}

impl Injection {
    /// How the credential is used, with the secret's name in place of its value.
    pub fn shown(&self) -> String {
        match &self.basic_user {
            Some(user) => format!("{}: Basic base64({user}:<{}>)", self.header, self.secret),
            None => format!(
                "{}: {}",
                self.header,
                self.template
                    .replace("{value}", &format!("<{}>", self.secret))
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub destination: Destination,
    pub allow_private: bool,
    pub inject: Option<Injection>,
}

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error(
        "`{0}` is not a destination: use https://host[:port], http://host[:port] or tcp:host:port"
    )]
    InvalidDestination(String),
    #[error(
        "{0} is a private, loopback, link-local or metadata address: add --allow-private to allow it"
    )]
    Private(String),
    #[error("tcp forwards need a port from 1024 to 65535 other than {PROXY_PORT}, got {0}")]
    ForwardPort(u16),
    #[error("credentials are injected into http:// and https:// destinations only")]
    InjectOnTcp,
    #[error("--inject-secret needs --header 'Name: ...{{value}}...' or --basic-user USER")]
    InjectHow,
    #[error("--header and --basic-user need --inject-secret")]
    InjectWithoutSecret,
    #[error(
        "--header must be `Name: value` with a valid header name and `{{value}}` exactly once in the value"
    )]
    InvalidHeader,
    #[error("--basic-user must be 1-256 printable characters without `:`")]
    InvalidBasicUser,
    #[error("secret `{0}` is not declared in this environment")]
    UnknownSecret(String),
    #[error(
        "secret `{secret}` is a `{kind}` credential: only a plain secret (kind `env`) is sent as a header, never what another kind stores"
    )]
    InjectKind { secret: String, kind: &'static str },
    #[error("no environment `{0}` in this tenant")]
    UnknownEnvironment(String),
    #[error("{0} is already listed for this environment")]
    AlreadyListed(String),
    #[error("{0} is not listed for this environment")]
    NotListed(String),
    #[error("this environment already has {0} egress rules, the most a run can carry")]
    TooMany(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Refuses to inject `secret` of `env` unless it is a plain value: a credential of another kind
/// stores what the gateway makes run credentials from (a PostgreSQL admin URL, an OAuth client
/// secret or refresh token), which must never leave as a header. Checked when a rule is added and
/// again before each run, since a secret's kind can change after.
pub fn injectable(env: &crate::environments::Environment, secret: &str) -> Result<(), EgressError> {
    match env.credentials.get(secret) {
        Some(spec) if spec.kind != crate::credentials::Kind::Env => Err(EgressError::InjectKind {
            secret: secret.to_owned(),
            kind: spec.kind.as_str(),
        }),
        _ => Ok(()),
    }
}

/// Most rules per environment (the runner's limit per run).
pub const MAX_RULES: usize = 32;

fn valid_host(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Parses `https://host[:port]`, `http://host[:port]` or `tcp:host:port` (no path, user or query).
pub fn parse_destination(text: &str) -> Result<Destination, EgressError> {
    let invalid = || EgressError::InvalidDestination(text.chars().take(300).collect());
    let trimmed = text.trim().trim_end_matches('/');
    let (scheme, rest, default_port) = if let Some(rest) = trimmed.strip_prefix("https://") {
        ("https", rest, Some(443))
    } else if let Some(rest) = trimmed.strip_prefix("http://") {
        ("http", rest, Some(80))
    } else if let Some(rest) = trimmed.strip_prefix("tcp:") {
        ("tcp", rest, None)
    } else {
        return Err(invalid());
    };
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or_else(invalid)?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port),
            None if after.is_empty() => None,
            None => return Err(invalid()),
        };
        host.parse::<std::net::Ipv6Addr>().map_err(|_| invalid())?;
        (host.to_owned(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (rest.to_owned(), None),
        }
    };
    let port = match port {
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(invalid)?,
        None => default_port.ok_or_else(invalid)?,
    };
    let host = host.to_ascii_lowercase();
    if !valid_host(&host) {
        return Err(invalid());
    }
    if scheme == "tcp" && (port < 1024 || port == PROXY_PORT) {
        return Err(EgressError::ForwardPort(port));
    }
    Ok(Destination {
        scheme: scheme.to_owned(),
        host,
        port,
    })
}

/// Builds and checks an injection from the admin's flags.
pub fn injection(
    secret: Option<String>,
    header: Option<&str>,
    basic_user: Option<String>,
) -> Result<Option<Injection>, EgressError> {
    let Some(secret) = secret else {
        return if header.is_some() || basic_user.is_some() {
            Err(EgressError::InjectWithoutSecret)
        } else {
            Ok(None)
        };
    };
    crate::environments::validate_secret_name(&secret)
        .map_err(|_| EgressError::UnknownSecret(secret.chars().take(130).collect()))?;
    match (header, basic_user) {
        (Some(header), None) => {
            let (name, template) = header.split_once(':').ok_or(EgressError::InvalidHeader)?;
            let (name, template) = (name.trim(), template.trim());
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || template.matches("{value}").count() != 1
                || http::HeaderValue::from_str(template).is_err()
            {
                return Err(EgressError::InvalidHeader);
            }
            Ok(Some(Injection {
                secret,
                header: name.to_owned(),
                template: template.to_owned(),
                basic_user: None,
            }))
        }
        (None, Some(user)) => {
            if user.is_empty()
                || user.len() > 256
                || user.contains(':')
                || user.chars().any(char::is_control)
            {
                return Err(EgressError::InvalidBasicUser);
            }
            Ok(Some(Injection {
                secret,
                header: "Authorization".to_owned(),
                template: String::new(),
                basic_user: Some(user),
            }))
        }
        _ => Err(EgressError::InjectHow),
    }
}

/// Adds a rule to an environment after checking it.
pub async fn add(
    db: &Db,
    tenant: &TenantId,
    environment: &str,
    rule: &Rule,
    now: UnixSeconds,
) -> Result<(), EgressError> {
    let destination = &rule.destination;
    if let Ok(ip) = destination.host.parse::<IpAddr>()
        && !rule.allow_private
        && custodian_runner::egress::is_restricted(ip)
    {
        return Err(EgressError::Private(destination.to_string()));
    }
    if rule.inject.is_some() && destination.scheme == "tcp" {
        return Err(EgressError::InjectOnTcp);
    }
    let env = crate::environments::get(db, tenant, environment)
        .await?
        .ok_or_else(|| EgressError::UnknownEnvironment(environment.to_owned()))?;
    if let Some(inject) = &rule.inject {
        if !env.secret_names.contains(&inject.secret) {
            return Err(EgressError::UnknownSecret(inject.secret.clone()));
        }
        injectable(&env, &inject.secret)?;
    }
    let existing = list(db, tenant, environment).await?;
    if existing.len() >= MAX_RULES {
        return Err(EgressError::TooMany(existing.len()));
    }
    if destination.scheme == "tcp"
        && existing
            .iter()
            .any(|r| r.destination.scheme == "tcp" && r.destination.port == destination.port)
    {
        return Err(EgressError::AlreadyListed(format!(
            "a tcp forward on port {}",
            destination.port
        )));
    }
    let inject = rule.inject.as_ref();
    let insert = sqlx::query(
        "INSERT INTO egress_rules (tenant_id, environment, destination, scheme, host, port, \
         allow_private, inject_secret, inject_header, inject_template, basic_user, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(tenant.as_str())
    .bind(environment)
    .bind(destination.to_string())
    .bind(&destination.scheme)
    .bind(&destination.host)
    .bind(i64::from(destination.port))
    .bind(i64::from(rule.allow_private))
    .bind(inject.map(|i| i.secret.clone()))
    .bind(inject.map(|i| i.header.clone()))
    .bind(inject.map(|i| i.template.clone()))
    .bind(inject.and_then(|i| i.basic_user.clone()))
    .bind(now);
    let inserted = crate::cache::execute_changing(db, insert).await;
    match inserted {
        Ok(_) => Ok(()),
        Err(e) if e.is_unique_violation() => {
            Err(EgressError::AlreadyListed(destination.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

/// Removes the rule for `destination`.
pub async fn remove(
    db: &Db,
    tenant: &TenantId,
    environment: &str,
    destination: &Destination,
) -> Result<(), EgressError> {
    let delete = sqlx::query(
        "DELETE FROM egress_rules WHERE tenant_id = $1 AND environment = $2 AND destination = $3",
    )
    .bind(tenant.as_str())
    .bind(environment)
    .bind(destination.to_string());
    let removed = crate::cache::execute_changing(db, delete).await?;
    if removed.rows_affected() == 0 {
        return Err(EgressError::NotListed(destination.to_string()));
    }
    Ok(())
}

type RuleRow = (
    String,
    String,
    String,
    i64,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn from_row(row: RuleRow) -> Result<(String, Rule), StoreError> {
    let (environment, scheme, host, port, allow_private, secret, header, template, basic_user) =
        row;
    let port = u16::try_from(port)
        .map_err(|_| StoreError::Corrupt(format!("egress rule of {environment}: port")))?;
    let inject = match (secret, header) {
        (Some(secret), Some(header)) => Some(Injection {
            secret,
            header,
            template: template.unwrap_or_default(),
            basic_user,
        }),
        _ => None,
    };
    Ok((
        environment,
        Rule {
            destination: Destination { scheme, host, port },
            allow_private: allow_private != 0,
            inject,
        },
    ))
}

/// `SELECT … FROM egress_rules WHERE tenant_id = $1` followed by the given clause.
macro_rules! select_rules {
    ($clause:literal) => {
        concat!(
            "SELECT environment, scheme, host, port, allow_private, inject_secret, ",
            "inject_header, inject_template, basic_user FROM egress_rules WHERE tenant_id = $1 ",
            $clause
        )
    };
}

/// An environment's rules, by destination.
pub async fn list(db: &Db, tenant: &TenantId, environment: &str) -> Result<Vec<Rule>, StoreError> {
    let rows: Vec<RuleRow> =
        sqlx::query_as(select_rules!("AND environment = $2 ORDER BY destination"))
            .bind(tenant.as_str())
            .bind(environment)
            .fetch_all(db.pool())
            .await?;
    rows.into_iter()
        .map(|row| from_row(row).map(|(_, rule)| rule))
        .collect()
}

/// Every rule of the tenant, by environment.
pub async fn by_environment(
    db: &Db,
    tenant: &TenantId,
) -> Result<std::collections::BTreeMap<String, Vec<Rule>>, StoreError> {
    let rows: Vec<RuleRow> = sqlx::query_as(select_rules!("ORDER BY destination"))
        .bind(tenant.as_str())
        .fetch_all(db.pool())
        .await?;
    let mut out: std::collections::BTreeMap<String, Vec<Rule>> = Default::default();
    for row in rows {
        let (environment, rule) = from_row(row)?;
        out.entry(environment).or_default().push(rule);
    }
    Ok(out)
}

/// The rules as the runner receives them, with each injected credential's value taken from
/// `value_of` (secret name → value). A credential whose secret has no value fails the run: the
/// destination would otherwise be reached without it.
pub fn for_runner(
    rules: &[Rule],
    value_of: impl Fn(&str) -> Option<String>,
) -> Result<Vec<EgressRule>, String> {
    rules
        .iter()
        .map(|rule| {
            let inject = match &rule.inject {
                Some(inject) => Some(InjectHeader {
                    secret: inject.secret.clone(),
                    value: value_of(&inject.secret)
                        .ok_or_else(|| format!("secret {} has no value", inject.secret))?,
                    header: inject.header.clone(),
                    template: inject.template.clone(),
                    basic_user: inject.basic_user.clone(),
                }),
                None => None,
            };
            Ok(EgressRule {
                scheme: rule.destination.scheme.clone(),
                host: rule.destination.host.clone(),
                port: rule.destination.port,
                allow_private: rule.allow_private,
                inject,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_and_normalize() {
        for (text, shown) in [
            ("https://API.example.com", "https://api.example.com:443"),
            (
                "https://api.example.com:8443/",
                "https://api.example.com:8443",
            ),
            ("http://example.com", "http://example.com:80"),
            ("tcp:db.internal:5432", "tcp:db.internal:5432"),
            ("https://[::1]:8443", "https://[::1]:8443"),
            ("https://127.0.0.1:8443", "https://127.0.0.1:8443"),
        ] {
            assert_eq!(parse_destination(text).expect(text).to_string(), shown);
        }
        for text in [
            "ftp://example.com",
            "https://",
            "https://example.com/path",
            "https://user@example.com",
            "tcp:db.internal",
            "tcp:db.internal:80",
            "tcp:db.internal:3128",
            "https://example.com:0",
            "https://example.com:99999",
            "https://exa mple.com",
        ] {
            assert!(parse_destination(text).is_err(), "{text}");
        }
    }

    #[test]
    fn injections_need_a_secret_and_one_way_to_use_it() {
        assert!(injection(None, None, None).expect("none").is_none());
        let bearer = injection(
            Some("API_TOKEN".into()),
            Some("Authorization: Bearer {value}"),
            None,
        )
        .expect("bearer")
        .expect("some");
        assert_eq!(bearer.shown(), "Authorization: Bearer <API_TOKEN>");
        assert!(injection(Some("API_TOKEN".into()), None, Some("u".into())).is_ok());
        for (secret, header, user) in [
            (None, Some("X-API-Key: {value}"), None),
            (Some("API_TOKEN"), None, None),
            (Some("API_TOKEN"), Some("X-API-Key: static"), None),
            (Some("API_TOKEN"), Some("Bad Name: {value}"), None),
            (Some("API_TOKEN"), Some("X: {value}{value}"), None),
            (Some("API_TOKEN"), Some("X: {value}"), Some("u")),
            (Some("API_TOKEN"), None, Some("a:b")),
        ] {
            assert!(
                injection(secret.map(Into::into), header, user.map(Into::into)).is_err(),
                "{secret:?} {header:?} {user:?}"
            );
        }
    }
}
