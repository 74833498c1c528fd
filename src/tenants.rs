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
}

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
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
        "SELECT id, display_name, idp_issuer, created_at FROM tenants WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(db.pool())
    .await?)
}

/// All tenants, by id (admin only).
pub async fn list(db: &Db) -> Result<Vec<Tenant>, StoreError> {
    Ok(sqlx::query_as::<_, Tenant>(
        "SELECT id, display_name, idp_issuer, created_at FROM tenants ORDER BY id",
    )
    .fetch_all(db.pool())
    .await?)
}

fn validate_issuer(issuer: &str) -> Result<(), TenantError> {
    let ok = url::Url::parse(issuer).is_ok_and(|url| match url.scheme() {
        "https" => url.host().is_some(),
        "http" => matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]")),
        _ => false,
    });
    if ok {
        Ok(())
    } else {
        Err(TenantError::InvalidIssuer(issuer.to_owned()))
    }
}
