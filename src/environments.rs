//! Environments: a named set of secrets inside a tenant (e.g. `staging-db`) plus the policy that
//! governs grants for it. Agents see names and policy, never values.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::clock::UnixSeconds;
use crate::credentials::{Kind, Spec, Usage};
use crate::store::{Db, StoreError};
use crate::tenants::{InvalidName, TenantId, validate_slug};

/// Who may approve grants for an environment. Empty lists everywhere means any authenticated user
/// of the tenant's IdP; otherwise the approver must match at least one entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Approvers {
    pub subjects: Vec<String>,
    pub emails: Vec<String>,
    pub groups: Vec<String>,
}

/// The limits every grant for an environment must stay within.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub approvers: Approvers,
    /// Longest grant lifetime an agent may ask for.
    pub max_ttl_seconds: i64,
    /// Most `run` calls one grant may make.
    pub max_uses: i64,
    /// Whether the approver must have signed in at the IdP recently (see `max_auth_age_seconds`).
    pub freshness: LoginFreshness,
    /// The approver must have signed in at the IdP at most this long before approving.
    pub max_auth_age_seconds: i64,
    /// If not empty, the ID token's `acr` must be one of these.
    pub accepted_acr: Vec<String>,
    /// Every method listed here must appear in the ID token's `amr`.
    pub required_amr: Vec<String>,
    /// Which pool of runners executes commands for this environment.
    pub runner_pool: String,
    /// Whether the approver must be, or must not be, the engineer who asked (known when they
    /// signed in with `codex mcp login`; agent tokens name no engineer).
    #[serde(skip_serializing_if = "RequesterRule::is_any")]
    pub approver_vs_requester: RequesterRule,
}

/// Who may approve a grant relative to the engineer who asked for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequesterRule {
    /// Anyone the approver lists allow.
    #[default]
    Any,
    /// Only the engineer who asked (a grant requested with an agent token cannot be approved).
    Requester,
    /// Anyone but the engineer who asked: four eyes (requests with an agent token are refused).
    NotRequester,
}

impl RequesterRule {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::Requester => "requester",
            Self::NotRequester => "not_requester",
        }
    }

    /// Parses `any`, `requester` or `not_requester` (`-` accepted for `_`).
    pub fn parse(text: &str) -> Option<Self> {
        match text.replace('-', "_").as_str() {
            "any" => Some(Self::Any),
            "requester" => Some(Self::Requester),
            "not_requester" => Some(Self::NotRequester),
            _ => None,
        }
    }

    pub fn is_any(&self) -> bool {
        *self == Self::Any
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            approvers: Approvers::default(),
            max_ttl_seconds: 3600,
            max_uses: 100,
            freshness: LoginFreshness::Required,
            max_auth_age_seconds: 300,
            accepted_acr: Vec::new(),
            required_amr: Vec::new(),
            runner_pool: "default".to_owned(),
            approver_vs_requester: RequesterRule::Any,
        }
    }
}

/// Whether approval needs a recent sign-in at the IdP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoginFreshness {
    /// `auth_time` must be present and within `max_auth_age_seconds`.
    Required,
    /// Any session at the IdP will do.
    NotRequired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Environment {
    pub tenant_id: String,
    pub name: String,
    pub description: String,
    pub secret_names: Vec<String>,
    /// Kind and settings of each declared name that is not an environment variable.
    pub credentials: BTreeMap<String, Spec>,
    pub policy: Policy,
    pub created_at: UnixSeconds,
}

/// An environment an agent can request a grant for (never its secret values).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct EnvironmentSummary {
    /// Name to pass as `environment` when requesting a grant.
    pub name: String,
    pub description: String,
    /// Names of the secrets a run in this environment receives as environment variables.
    pub secret_names: Vec<String>,
    /// Credentials of other kinds (files, database roles, OAuth tokens): what a run receives
    /// for each and how long it lasts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<Usage>,
    /// Longest `ttl_seconds` a grant may have.
    pub max_ttl_seconds: i64,
    /// Most runs a grant may make.
    pub max_uses: i64,
    /// How recently the approver must have signed in at the identity provider.
    pub max_auth_age_seconds: i64,
    /// Where a run may connect (nothing else is reachable). HTTP(S) goes through a proxy set in
    /// HTTPS_PROXY/HTTP_PROXY; a tcp:host:port destination is reached at 127.0.0.1:port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressSummary>,
}

/// One destination a run may reach.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct EgressSummary {
    /// `https://host:port`, `http://host:port` or `tcp:host:port`.
    pub destination: String,
    /// A credential the proxy adds to every request to this destination, shown with the
    /// secret's name in angle brackets in place of its value (the run never holds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

impl EnvironmentSummary {
    /// The summary of `env` with its egress rules: injected secrets are not environment
    /// variables of the run, so they are shown with their destination instead.
    pub fn new(env: Environment, egress: &[crate::egress::Rule]) -> Self {
        let injected: Vec<&str> = egress
            .iter()
            .filter_map(|r| r.inject.as_ref().map(|i| i.secret.as_str()))
            .collect();
        let credentials = env
            .credentials
            .iter()
            .filter(|(name, spec)| spec.kind != Kind::Env && !injected.contains(&name.as_str()))
            .map(|(name, spec)| spec.usage(name))
            .collect();
        Self {
            name: env.name,
            description: env.description,
            secret_names: env
                .secret_names
                .into_iter()
                .filter(|name| {
                    !injected.contains(&name.as_str())
                        && env
                            .credentials
                            .get(name)
                            .is_none_or(|s| s.kind == Kind::Env)
                })
                .collect(),
            credentials,
            max_ttl_seconds: env.policy.max_ttl_seconds,
            max_uses: env.policy.max_uses,
            max_auth_age_seconds: env.policy.max_auth_age_seconds,
            egress: egress
                .iter()
                .map(|r| EgressSummary {
                    destination: r.destination.to_string(),
                    credential: r.inject.as_ref().map(crate::egress::Injection::shown),
                })
                .collect(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    #[error("environment name: {0}")]
    InvalidName(InvalidName),
    #[error("runner pool: {0}")]
    InvalidRunnerPool(InvalidName),
    #[error(
        "secret name `{0}` is not valid: use 1-128 characters of A-Z, 0-9 and '_', not starting with a digit"
    )]
    InvalidSecretName(String),
    #[error("secret name `{0}` is listed twice")]
    DuplicateSecretName(String),
    #[error("{field} must be between 1 and {max}, got {value}")]
    OutOfRange {
        field: &'static str,
        max: i64,
        value: i64,
    },
    #[error("no tenant `{0}`")]
    UnknownTenant(TenantId),
    #[error("environment `{0}` already exists in this tenant")]
    AlreadyExists(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Upper bounds on policy values, whatever an admin configures.
pub const MAX_TTL_SECONDS: i64 = 7 * 24 * 3600;
pub const MAX_USES: i64 = 100_000;
pub const MAX_AUTH_AGE_SECONDS: i64 = 24 * 3600;

/// Whether `name` can be an environment variable holding a secret.
pub fn validate_secret_name(name: &str) -> Result<(), EnvironmentError> {
    if custodian_protocol::is_variable_name(name) {
        Ok(())
    } else {
        Err(EnvironmentError::InvalidSecretName(
            name.chars().take(130).collect(),
        ))
    }
}

fn check_range(field: &'static str, value: i64, max: i64) -> Result<(), EnvironmentError> {
    if (1..=max).contains(&value) {
        Ok(())
    } else {
        Err(EnvironmentError::OutOfRange { field, max, value })
    }
}

/// Creates an environment after validating every field.
pub async fn create(
    db: &Db,
    tenant: &TenantId,
    name: &str,
    description: &str,
    secret_names: &[String],
    policy: &Policy,
    now: UnixSeconds,
) -> Result<Environment, EnvironmentError> {
    validate_slug(name).map_err(EnvironmentError::InvalidName)?;
    validate_slug(&policy.runner_pool).map_err(EnvironmentError::InvalidRunnerPool)?;
    let mut seen = std::collections::BTreeSet::new();
    for secret in secret_names {
        validate_secret_name(secret)?;
        if !seen.insert(secret) {
            return Err(EnvironmentError::DuplicateSecretName(secret.clone()));
        }
    }
    check_range("max_ttl_seconds", policy.max_ttl_seconds, MAX_TTL_SECONDS)?;
    check_range("max_uses", policy.max_uses, MAX_USES)?;
    check_range(
        "max_auth_age_seconds",
        policy.max_auth_age_seconds,
        MAX_AUTH_AGE_SECONDS,
    )?;
    if crate::tenants::get(db, tenant.as_str()).await?.is_none() {
        return Err(EnvironmentError::UnknownTenant(tenant.clone()));
    }
    let env = Environment {
        tenant_id: tenant.as_str().to_owned(),
        name: name.to_owned(),
        description: description.to_owned(),
        secret_names: secret_names.to_vec(),
        credentials: BTreeMap::new(),
        policy: policy.clone(),
        created_at: now,
    };
    let insert = sqlx::query(
        "INSERT INTO environments (tenant_id, name, description, secret_names, approvers, \
         max_ttl_seconds, max_uses, max_auth_age_seconds, runner_pool, created_at, \
         require_fresh_login, accepted_acr, required_amr, approver_vs_requester) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(&env.tenant_id)
    .bind(&env.name)
    .bind(&env.description)
    .bind(to_json(&env.secret_names))
    .bind(to_json(&env.policy.approvers))
    .bind(env.policy.max_ttl_seconds)
    .bind(env.policy.max_uses)
    .bind(env.policy.max_auth_age_seconds)
    .bind(&env.policy.runner_pool)
    .bind(env.created_at)
    .bind(i64::from(env.policy.freshness == LoginFreshness::Required))
    .bind(to_json(&env.policy.accepted_acr))
    .bind(to_json(&env.policy.required_amr))
    .bind(env.policy.approver_vs_requester.as_str());
    let inserted = crate::cache::execute_changing(db, insert).await;
    match inserted {
        Ok(_) => Ok(env),
        Err(e) if e.is_unique_violation() => Err(EnvironmentError::AlreadyExists(env.name)),
        Err(e) => Err(e.into()),
    }
}

#[derive(sqlx::FromRow)]
struct Row {
    tenant_id: String,
    name: String,
    description: String,
    secret_names: String,
    credentials: String,
    approvers: String,
    max_ttl_seconds: i64,
    max_uses: i64,
    max_auth_age_seconds: i64,
    runner_pool: String,
    created_at: i64,
    require_fresh_login: i64,
    accepted_acr: String,
    required_amr: String,
    approver_vs_requester: String,
}

impl TryFrom<Row> for Environment {
    type Error = StoreError;

    fn try_from(row: Row) -> Result<Self, StoreError> {
        let corrupt = |what: &str| {
            StoreError::Corrupt(format!(
                "environment {}/{}: {what}",
                row.tenant_id, row.name
            ))
        };
        let secret_names =
            serde_json::from_str(&row.secret_names).map_err(|_| corrupt("secret_names"))?;
        let credentials =
            serde_json::from_str(&row.credentials).map_err(|_| corrupt("credentials"))?;
        let approvers = serde_json::from_str(&row.approvers).map_err(|_| corrupt("approvers"))?;
        let accepted_acr =
            serde_json::from_str(&row.accepted_acr).map_err(|_| corrupt("accepted_acr"))?;
        let required_amr =
            serde_json::from_str(&row.required_amr).map_err(|_| corrupt("required_amr"))?;
        Ok(Environment {
            secret_names,
            credentials,
            policy: Policy {
                approvers,
                max_ttl_seconds: row.max_ttl_seconds,
                max_uses: row.max_uses,
                freshness: if row.require_fresh_login != 0 {
                    LoginFreshness::Required
                } else {
                    LoginFreshness::NotRequired
                },
                max_auth_age_seconds: row.max_auth_age_seconds,
                accepted_acr,
                required_amr,
                runner_pool: row.runner_pool,
                approver_vs_requester: RequesterRule::parse(&row.approver_vs_requester)
                    .ok_or_else(|| corrupt("approver_vs_requester"))?,
            },
            tenant_id: row.tenant_id,
            name: row.name,
            description: row.description,
            created_at: row.created_at,
        })
    }
}

/// `SELECT … FROM environments` followed by the given clause, as one static string.
macro_rules! select_environments {
    ($clause:literal) => {
        concat!(
            "SELECT tenant_id, name, description, secret_names, credentials, approvers, max_ttl_seconds, ",
            "max_uses, max_auth_age_seconds, runner_pool, created_at, require_fresh_login, ",
            "accepted_acr, required_amr, approver_vs_requester FROM environments ",
            $clause
        )
    };
}

/// The tenant's environments, by name.
pub async fn list(db: &Db, tenant: &TenantId) -> Result<Vec<Environment>, StoreError> {
    let rows = sqlx::query_as::<_, Row>(select_environments!("WHERE tenant_id = $1 ORDER BY name"))
        .bind(tenant.as_str())
        .fetch_all(db.pool())
        .await?;
    rows.into_iter().map(Environment::try_from).collect()
}

/// One environment of the tenant, if it exists.
pub async fn get(
    db: &Db,
    tenant: &TenantId,
    name: &str,
) -> Result<Option<Environment>, StoreError> {
    let row = sqlx::query_as::<_, Row>(select_environments!("WHERE tenant_id = $1 AND name = $2"))
        .bind(tenant.as_str())
        .bind(name)
        .fetch_optional(db.pool())
        .await?;
    row.map(Environment::try_from).transpose()
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serializes to JSON")
}

/// Replaces the declared secret names of an environment and the kinds of those that are not
/// environment variables (inside the caller's transaction).
pub async fn set_secret_names(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    tenant: &TenantId,
    name: &str,
    secret_names: &[String],
    credentials: &BTreeMap<String, Spec>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE environments SET secret_names = $1, credentials = $2 WHERE tenant_id = $3 AND name = $4",
    )
    .bind(to_json(&secret_names))
    .bind(to_json(credentials))
    .bind(tenant.as_str())
        .bind(name)
        .execute(&mut **tx)
        .await?;
    crate::cache::changed(tx).await
}
