//! Tenants: the unit of isolation. Every other row belongs to exactly one tenant, and every query on
//! such rows is scoped by the tenant id.

use serde::Serialize;

use crate::clock::UnixSeconds;
use crate::store::{Db, StoreError};

/// A tenant id: the slug used in `/t/{tenant}/mcp` (lowercase letters, digits and `-`, 1–63
/// characters, starting with a letter or digit).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct TenantId(String);

impl TenantId {
    pub fn parse(text: &str) -> Result<Self, InvalidName> {
        validate_slug(text).map(|()| Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A name that is not a valid slug; the message says what is expected.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "`{0}` is not a valid name: use 1-63 lowercase letters, digits or '-', starting with a letter or digit"
)]
pub struct InvalidName(pub String);

/// Validates names used in URLs and commands (tenants, environments, runner pools).
pub fn validate_slug(text: &str) -> Result<(), InvalidName> {
    let ok = !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(InvalidName(text.chars().take(80).collect()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Tenant {
    pub id: String,
    pub display_name: String,
    pub idp_issuer: Option<String>,
    pub created_at: UnixSeconds,
    pub idp_client_id: Option<String>,
    pub idp_client_secret_ref: Option<String>,
    pub idp_scopes: String,
    pub idp_approver_claim: String,
    pub idp_groups_claim: String,
}

/// How the gateway talks to a tenant's identity provider as a device-flow client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdpSettings {
    pub issuer: String,
    pub client_id: String,
    /// Where the client secret comes from (confidential clients only).
    pub client_secret: Option<SecretRef>,
    /// Space-separated scopes; must include `openid`.
    pub scopes: String,
    /// The claim that names the approver (`email`, `sub`, or another claim), read from the ID
    /// token or, when the ID token lacks it, from userinfo.
    pub approver_claim: String,
    /// The claim that lists the approver's groups (ID token first, then userinfo).
    pub groups_claim: String,
}

/// A reference to a secret held outside the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(std::path::PathBuf),
}

impl SecretRef {
    pub fn parse(text: &str) -> Option<Self> {
        match text.split_once(':')? {
            ("env", name) if !name.is_empty() => Some(Self::Env(name.to_owned())),
            ("file", path) if !path.is_empty() => Some(Self::File(path.into())),
            _ => None,
        }
    }

    pub fn to_text(&self) -> String {
        match self {
            Self::Env(name) => format!("env:{name}"),
            Self::File(path) => format!("file:{}", path.display()),
        }
    }

    /// Reads the secret now (files are re-read, so rotation needs no restart).
    pub fn resolve(&self) -> Result<secrecy::SecretString, String> {
        match self {
            Self::Env(name) => std::env::var(name)
                .map(secrecy::SecretString::from)
                .map_err(|_| format!("environment variable {name} is not set")),
            Self::File(path) => std::fs::read_to_string(path)
                .map(|s| secrecy::SecretString::from(s.trim().to_owned()))
                .map_err(|e| format!("cannot read {}: {e}", path.display())),
        }
    }
}

impl Tenant {
    /// The tenant's IdP settings, if an issuer and a client id are configured.
    pub fn idp(&self) -> Option<IdpSettings> {
        Some(IdpSettings {
            issuer: self.idp_issuer.clone()?,
            client_id: self.idp_client_id.clone()?,
            client_secret: self
                .idp_client_secret_ref
                .as_deref()
                .and_then(SecretRef::parse),
            scopes: self.idp_scopes.clone(),
            approver_claim: self.idp_approver_claim.clone(),
            groups_claim: self.idp_groups_claim.clone(),
        })
    }
}

/// Scopes asked for by default.
pub const DEFAULT_SCOPES: &str = "openid email profile";

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("no tenant `{0}`")]
    NotFound(TenantId),
    #[error("the client id must not be empty")]
    InvalidClientId,
    #[error("scopes must include `openid`")]
    ScopesWithoutOpenid,
    #[error("{0} must be a claim name (letters, digits, '_', ':', '.', '/', '-')")]
    InvalidClaimName(&'static str),
    #[error("tenant `{0}` already exists")]
    AlreadyExists(TenantId),
    #[error("`{0}` is not a valid issuer URL (expected https://…, or http:// on loopback)")]
    InvalidIssuer(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates a tenant. `idp_issuer` is the OIDC issuer approvers sign in at.
pub async fn create(
    db: &Db,
    id: &TenantId,
    display_name: &str,
    idp_issuer: Option<&str>,
    now: UnixSeconds,
) -> Result<Tenant, TenantError> {
    if let Some(issuer) = idp_issuer {
        validate_issuer(issuer)?;
    }
    let tenant = Tenant {
        id: id.as_str().to_owned(),
        display_name: display_name.to_owned(),
        idp_issuer: idp_issuer.map(str::to_owned),
        created_at: now,
        idp_client_id: None,
        idp_client_secret_ref: None,
        idp_scopes: DEFAULT_SCOPES.to_owned(),
        idp_approver_claim: "email".to_owned(),
        idp_groups_claim: "groups".to_owned(),
    };
    let inserted = sqlx::query(
        "INSERT INTO tenants (id, display_name, idp_issuer, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(&tenant.id)
    .bind(&tenant.display_name)
    .bind(&tenant.idp_issuer)
    .bind(tenant.created_at)
    .execute(db.pool())
    .await
    .map_err(StoreError::from);
    match inserted {
        Ok(_) => Ok(tenant),
        Err(e) if e.is_unique_violation() => Err(TenantError::AlreadyExists(id.clone())),
        Err(e) => Err(e.into()),
    }
}

/// Finds a tenant by id.
pub async fn get(db: &Db, id: &str) -> Result<Option<Tenant>, StoreError> {
    Ok(sqlx::query_as::<_, Tenant>(
        "SELECT id, display_name, idp_issuer, created_at, idp_client_id, idp_client_secret_ref, \
         idp_scopes, idp_approver_claim, idp_groups_claim FROM tenants WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(db.pool())
    .await?)
}

/// All tenants, by id (admin only).
pub async fn list(db: &Db) -> Result<Vec<Tenant>, StoreError> {
    Ok(sqlx::query_as::<_, Tenant>(
        "SELECT id, display_name, idp_issuer, created_at, idp_client_id, idp_client_secret_ref, \
         idp_scopes, idp_approver_claim, idp_groups_claim FROM tenants ORDER BY id",
    )
    .fetch_all(db.pool())
    .await?)
}

fn validate_issuer(issuer: &str) -> Result<(), TenantError> {
    if crate::oidc::is_acceptable_endpoint(issuer) {
        Ok(())
    } else {
        Err(TenantError::InvalidIssuer(issuer.to_owned()))
    }
}

/// Checks IdP settings without contacting the provider (see `Oidc::check` for that).
pub fn validate_idp(idp: &IdpSettings) -> Result<(), TenantError> {
    validate_issuer(&idp.issuer)?;
    if idp.client_id.trim().is_empty() || idp.client_id.chars().any(char::is_control) {
        return Err(TenantError::InvalidClientId);
    }
    if !idp.scopes.split_whitespace().any(|s| s == "openid") {
        return Err(TenantError::ScopesWithoutOpenid);
    }
    let claim_ok = |c: &str| {
        !c.is_empty()
            && c.len() <= 128
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_:./-".contains(&b))
    };
    if !claim_ok(&idp.approver_claim) {
        return Err(TenantError::InvalidClaimName("approver claim"));
    }
    if !claim_ok(&idp.groups_claim) {
        return Err(TenantError::InvalidClaimName("groups claim"));
    }
    Ok(())
}

/// Stores the tenant's identity provider settings (validated, not contacted: the admin command
/// checks the provider with `Oidc::check` first). When the issuer or the client changes, in the
/// same transaction every OAuth sign-in of the tenant is revoked and every one in progress dropped:
/// they were made at the previous IdP (perhaps compromised, or where the engineer is no longer
/// checked). Returns how many sign-ins were revoked.
pub async fn set_idp(
    db: &Db,
    id: &TenantId,
    idp: &IdpSettings,
    now: UnixSeconds,
) -> Result<u64, TenantError> {
    validate_idp(idp)?;
    let mut tx = db.begin_write().await?;
    // Subjects are scoped to the issuer (and, with pairwise identifiers, to the client): sign-ins
    // made through another issuer or client no longer name anyone. Re-setting the same pair (new
    // scopes, a rotated client secret) keeps them.
    let before: Option<(Option<String>, Option<String>)> =
        sqlx::query_as("SELECT idp_issuer, idp_client_id FROM tenants WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from)?;
    let same_idp = before.is_some_and(|(issuer, client)| {
        issuer.as_deref() == Some(idp.issuer.as_str())
            && client.as_deref() == Some(idp.client_id.as_str())
    });
    let done = sqlx::query(
        "UPDATE tenants SET idp_issuer = $1, idp_client_id = $2, idp_client_secret_ref = $3, \
         idp_scopes = $4, idp_approver_claim = $5, idp_groups_claim = $6 WHERE id = $7",
    )
    .bind(&idp.issuer)
    .bind(&idp.client_id)
    .bind(idp.client_secret.as_ref().map(SecretRef::to_text))
    .bind(&idp.scopes)
    .bind(&idp.approver_claim)
    .bind(&idp.groups_claim)
    .bind(id.as_str())
    .execute(&mut *tx)
    .await
    .map_err(StoreError::from)?;
    if done.rows_affected() == 0 {
        return Err(TenantError::NotFound(id.clone()));
    }
    if same_idp {
        tx.commit().await.map_err(StoreError::from)?;
        return Ok(0);
    }
    let revoked = sqlx::query(
        "UPDATE oauth_families SET revoked_at = $1, revoke_reason = 'the tenant identity provider changed' \
         WHERE tenant_id = $2 AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(id.as_str())
    .execute(&mut *tx)
    .await
    .map_err(StoreError::from)?
    .rows_affected();
    sqlx::query("DELETE FROM oauth_signins WHERE tenant_id = $1")
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(revoked)
}
