//! Agent tokens: how an agent (Codex) proves which tenant it acts for.
//!
//! Guarantees:
//! - A token is `cst_` + a 16-hex-digit public id + `_` + 43 base64url characters carrying 256 random
//!   bits from a CSPRNG seeded by the operating system. The `cst_` prefix lets secret scanners find leaked ones.
//! - Only the SHA-256 of the random part is stored; the token itself exists once, in the output of
//!   [`create`], held in a [`SecretString`] that cannot be printed by accident.
//! - Verification looks the token up by tenant and public id, then compares hashes in constant time.
//!   An unknown id, a wrong secret, a revoked token and another tenant's token are the same
//!   [`Verified::Invalid`].
//! - The gateway verifies through the replica's cache of valid tokens ([`verify_cached`]); a
//!   revocation reaches every replica within [`crate::cache::REFRESH`] (see [`crate::cache`]).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::cache::{CachedToken, Caches};
use crate::clock::UnixSeconds;
use crate::store::{Db, StoreError};
use crate::tenants::TenantId;

pub const TOKEN_PREFIX: &str = "cst_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
const ID_CHARS: usize = ID_BYTES * 2;
const SECRET_CHARS: usize = 43;

/// An agent token as listed by admins (no secret material).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct AgentToken {
    pub tenant_id: String,
    pub id: String,
    pub name: String,
    pub created_at: UnixSeconds,
    pub revoked_at: Option<UnixSeconds>,
}

/// The caller of an MCP request, once its token has been verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub tenant: TenantId,
    pub token_id: String,
    pub token_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "token name `{0}` is not valid: use 1-64 characters of letters, digits, '.', '_', '@' or '-'"
    )]
    InvalidName(String),
    #[error("an active token named `{0}` already exists in this tenant")]
    NameTaken(String),
    #[error("no tenant `{0}`")]
    UnknownTenant(TenantId),
    #[error("no active token `{0}` in this tenant")]
    NotFound(String),
    #[error("pass the token's id or name, not the token itself (it is not echoed)")]
    LooksLikeToken,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates a token and returns it with the only copy of its secret.
pub async fn create(
    db: &Db,
    tenant: &TenantId,
    name: &str,
    now: UnixSeconds,
) -> Result<(AgentToken, SecretString), TokenError> {
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b));
    if !name_ok {
        return Err(TokenError::InvalidName(name.chars().take(80).collect()));
    }
    if crate::tenants::get(db, tenant.as_str()).await?.is_none() {
        return Err(TokenError::UnknownTenant(tenant.clone()));
    }
    let (id, secret_text) = mint();
    let token = AgentToken {
        tenant_id: tenant.as_str().to_owned(),
        id: id.clone(),
        name: name.to_owned(),
        created_at: now,
        revoked_at: None,
    };
    let inserted = sqlx::query(
        "INSERT INTO agent_tokens (tenant_id, id, name, secret_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&token.tenant_id)
    .bind(&token.id)
    .bind(&token.name)
    .bind(hash_secret(secret_text.as_bytes()))
    .bind(now)
    .execute(db.pool())
    .await
    .map_err(StoreError::from);
    match inserted {
        Ok(_) => {
            let full = format!("{TOKEN_PREFIX}{id}_{}", secret_text.as_str());
            Ok((token, SecretString::from(full)))
        }
        Err(e) if e.is_unique_violation() => Err(TokenError::NameTaken(name.to_owned())),
        Err(e) => Err(e.into()),
    }
}

/// What a presented bearer token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// There is no such tenant.
    UnknownTenant,
    /// Malformed, unknown, revoked, wrong secret, or another tenant's: deliberately one case.
    Invalid,
    Valid(AgentIdentity),
}

/// Checks a presented bearer token against the tenant's tokens in one query, which also tells
/// whether the tenant exists.
pub async fn verify(
    db: &Db,
    tenant: &TenantId,
    presented: &SecretString,
) -> Result<Verified, StoreError> {
    Ok(verify_in_db(db, tenant, presented).await?.0)
}

/// [`verify`] with the replica's cache of valid tokens in front (see [`crate::cache`]): a revoked
/// token is refused on every replica within [`crate::cache::REFRESH`] plus one query.
pub async fn verify_cached(
    caches: &Caches,
    db: &Db,
    tenant: &TenantId,
    presented: &SecretString,
) -> Result<Verified, StoreError> {
    let ticket = caches.fresh(db).await?;
    if let Some((id, secret)) = split_token(presented.expose_secret())
        && let Some(cached) = caches.token(tenant, id)
    {
        return Ok(compare(tenant, id, secret, cached));
    }
    let (verified, row) = verify_in_db(db, tenant, presented).await?;
    if let (Verified::Valid(identity), Some(row)) = (&verified, row) {
        caches.keep_token(ticket, tenant, &identity.token_id, row);
    }
    Ok(verified)
}

/// One query; returns the row that proved a valid token with the answer.
async fn verify_in_db(
    db: &Db,
    tenant: &TenantId,
    presented: &SecretString,
) -> Result<(Verified, Option<CachedToken>), StoreError> {
    // A malformed token still looks the tenant up (with an id no token has), so that both paths
    // cost one query and answer "unknown tenant" the same way.
    let (id, secret) = split_token(presented.expose_secret()).unwrap_or(("", ""));
    let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT a.name, a.secret_hash FROM tenants t \
         LEFT JOIN agent_tokens a ON a.tenant_id = t.id AND a.id = $2 AND a.revoked_at IS NULL \
         WHERE t.id = $1",
    )
    .bind(tenant.as_str())
    .bind(id)
    .fetch_optional(db.pool())
    .await?;
    let Some(row) = row else {
        // Hashed anyway, so that both answers cost the same.
        let _ = hash_secret(secret.as_bytes());
        return Ok((Verified::UnknownTenant, None));
    };
    let (Some(name), Some(secret_hash)) = row else {
        let _ = hash_secret(secret.as_bytes());
        return Ok((Verified::Invalid, None));
    };
    let stored = CachedToken { secret_hash, name };
    let verified = compare(tenant, id, secret, stored.clone());
    Ok((verified, Some(stored)))
}

/// Compares the presented secret's hash with the stored one in constant time.
fn compare(tenant: &TenantId, id: &str, secret: &str, stored: CachedToken) -> Verified {
    let presented_hash = hash_secret(secret.as_bytes());
    let matches: bool = presented_hash
        .as_bytes()
        .ct_eq(stored.secret_hash.as_bytes())
        .into();
    if !matches || id.is_empty() {
        return Verified::Invalid;
    }
    Verified::Valid(AgentIdentity {
        tenant: tenant.clone(),
        token_id: id.to_owned(),
        token_name: stored.name,
    })
}

/// The tenant's tokens, newest first.
pub async fn list(db: &Db, tenant: &TenantId) -> Result<Vec<AgentToken>, StoreError> {
    Ok(sqlx::query_as::<_, AgentToken>(
        "SELECT tenant_id, id, name, created_at, revoked_at FROM agent_tokens \
         WHERE tenant_id = $1 ORDER BY created_at DESC, name",
    )
    .bind(tenant.as_str())
    .fetch_all(db.pool())
    .await?)
}

/// Revokes the active token with this id or name; every replica refuses it within
/// [`crate::cache::REFRESH`] (this process on its next request).
pub async fn revoke(
    db: &Db,
    tenant: &TenantId,
    id_or_name: &str,
    now: UnixSeconds,
) -> Result<(), TokenError> {
    if id_or_name.starts_with(TOKEN_PREFIX) {
        return Err(TokenError::LooksLikeToken);
    }
    // Replicas that cached the token drop it (see `cache`).
    let revoke = sqlx::query(
        "UPDATE agent_tokens SET revoked_at = $1 \
         WHERE tenant_id = $2 AND (id = $3 OR name = $3) AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(tenant.as_str())
    .bind(id_or_name);
    let done = crate::cache::execute_changing(db, revoke).await?;
    if done.rows_affected() == 0 {
        return Err(TokenError::NotFound(id_or_name.chars().take(80).collect()));
    }
    Ok(())
}

/// A fresh public id (hex) and secret part (base64url) of a token: 64 and 256 random bits.
/// OAuth access and refresh tokens use the same shape under their own prefixes.
pub(crate) fn mint() -> (String, Zeroizing<String>) {
    // ThreadRng is a CSPRNG (ChaCha12) seeded and periodically reseeded from the OS.
    let mut rng = rand::rng();
    let mut id = [0u8; ID_BYTES];
    rng.fill_bytes(&mut id);
    let mut secret = Zeroizing::new([0u8; SECRET_BYTES]);
    rng.fill_bytes(secret.as_mut_slice());
    let secret_text = Zeroizing::new(URL_SAFE_NO_PAD.encode(secret.as_slice()));
    (hex::encode(id), secret_text)
}

/// Splits `cst_<id>_<secret>` into its parts, checking their shape.
fn split_token(token: &str) -> Option<(&str, &str)> {
    split_prefixed(token, TOKEN_PREFIX)
}

/// Splits `<prefix><id>_<secret>` into its parts, checking their shape.
pub(crate) fn split_prefixed<'t>(token: &'t str, prefix: &str) -> Option<(&'t str, &'t str)> {
    let rest = token.strip_prefix(prefix)?;
    if rest.len() != ID_CHARS + 1 + SECRET_CHARS || !rest.is_char_boundary(ID_CHARS) {
        return None;
    }
    let (id, secret) = rest.split_at(ID_CHARS);
    let secret = secret.strip_prefix('_')?;
    let id_ok = id
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let secret_ok = secret
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (id_ok && secret_ok).then_some((id, secret))
}

/// The stored form of a token's secret part (or of any other bearer value): hex SHA-256.
pub(crate) fn hash_secret(secret: &[u8]) -> String {
    hex::encode(Sha256::digest(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_accepts_only_well_formed_tokens() {
        let secret = "A".repeat(SECRET_CHARS);
        let good = format!("cst_0123456789abcdef_{secret}");
        assert_eq!(
            split_token(&good),
            Some(("0123456789abcdef", secret.as_str()))
        );
        assert_eq!(split_token(&good.replace("cst_", "cs_")), None);
        assert_eq!(split_token(&good[..good.len() - 1]), None);
        assert_eq!(split_token(&good.replace("0123", "XYZW")), None);
        assert_eq!(split_token(&format!("cst_0123456789abcdef-{secret}")), None);
        assert_eq!(split_token(&format!("{good}é")), None);
    }
}
