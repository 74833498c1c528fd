//! SQL of the authorization server. Single use (codes, sign-in states, refresh tokens) is one
//! conditional statement each, so two replicas cannot both redeem the same value.

use serde::Serialize;

use crate::clock::UnixSeconds;
use crate::store::{Db, StoreError};
use crate::tenants::TenantId;

/// A registered client.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(super) struct Client {
    pub id: String,
    pub client_name: Option<String>,
    pub redirect_uris: String,
}

/// A sign-in in progress: awaiting the engineer's consent, then at the IdP.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct SignIn {
    pub client_id: String,
    pub redirect_uri: String,
    pub code_challenge: String,
    pub client_state: Option<String>,
    pub scope: String,
    pub upstream_sealed: String,
    /// SHA-256 of the cookie binding the browser that allowed it; `None` while awaiting consent.
    pub browser_hash: Option<String>,
    pub expires_at: i64,
}

/// An authorization code, once claimed.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct Code {
    pub family_id: String,
    pub client_id: String,
    pub redirect_uri: String,
    pub code_challenge: String,
    pub expires_at: i64,
}

/// A sign-in that completed: who, with which client, and whether it still holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Family {
    pub id: String,
    pub client_id: String,
    pub client_name: Option<String>,
    pub subject: String,
    pub name: Option<String>,
    pub email: Option<String>,
    pub scope: String,
    pub resource: String,
    pub created_at: UnixSeconds,
    pub expires_at: UnixSeconds,
    pub last_used_at: UnixSeconds,
    pub revoked_at: Option<UnixSeconds>,
    pub revoke_reason: Option<String>,
}

/// A stored token of a family, as the bearer check and refresh need it.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct StoredToken {
    pub family_id: String,
    pub secret_hash: String,
    pub subject: String,
    pub email: Option<String>,
    pub resource: String,
}

pub(super) async fn client(
    db: &Db,
    tenant: &TenantId,
    id: &str,
) -> Result<Option<Client>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, client_name, redirect_uris FROM oauth_clients WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant.as_str())
    .bind(id)
    .fetch_optional(db.pool())
    .await?)
}

/// Registers `client`, first dropping the tenant's pending clients (those without a completed
/// sign-in) registered before `stale_before`, and, beyond `max_pending - 1`, the oldest pending
/// ones, with their sign-ins in progress: open registration can push out only other pending
/// registrations, never a client someone signed in with. Returns how many were dropped.
pub(super) async fn insert_client(
    db: &Db,
    tenant: &TenantId,
    client: &Client,
    now: UnixSeconds,
    stale_before: UnixSeconds,
    max_pending: i64,
) -> Result<u64, StoreError> {
    let mut tx = db.begin_write().await?;
    let dropped = sqlx::query(concat!(
        "DELETE FROM oauth_clients WHERE tenant_id = $1 AND NOT EXISTS ",
        "(SELECT 1 FROM oauth_families f WHERE f.tenant_id = oauth_clients.tenant_id AND f.client_id = oauth_clients.id) ",
        "AND (created_at < $2 OR id NOT IN (SELECT c.id FROM oauth_clients c WHERE c.tenant_id = $1 AND NOT EXISTS ",
        "(SELECT 1 FROM oauth_families f WHERE f.tenant_id = c.tenant_id AND f.client_id = c.id) ",
        "ORDER BY c.created_at DESC, c.id DESC LIMIT $3))"
    ))
    .bind(tenant.as_str())
    .bind(stale_before)
    .bind(max_pending - 1)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if dropped > 0 {
        sqlx::query(
            "DELETE FROM oauth_signins WHERE tenant_id = $1 AND NOT EXISTS (SELECT 1 FROM oauth_clients c \
             WHERE c.tenant_id = oauth_signins.tenant_id AND c.id = oauth_signins.client_id)",
        )
        .bind(tenant.as_str())
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "INSERT INTO oauth_clients (tenant_id, id, client_name, redirect_uris, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(tenant.as_str())
    .bind(&client.id)
    .bind(&client.client_name)
    .bind(&client.redirect_uris)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(dropped)
}

/// Stores a sign-in awaiting the engineer's consent under `consent_hash`. First drops the tenant's
/// expired sign-ins and, beyond `per_client - 1`, the client's oldest; stores nothing (false) when
/// the tenant already has `per_tenant` in progress.
pub(super) async fn insert_sign_in(
    db: &Db,
    tenant: &TenantId,
    consent_hash: &str,
    sign_in: &SignIn,
    now: UnixSeconds,
    (per_client, per_tenant): (i64, i64),
) -> Result<bool, StoreError> {
    let mut tx = db.begin_write().await?;
    sqlx::query("DELETE FROM oauth_signins WHERE tenant_id = $1 AND expires_at < $2")
        .bind(tenant.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "DELETE FROM oauth_signins WHERE tenant_id = $1 AND client_id = $2 AND state_hash NOT IN \
         (SELECT s.state_hash FROM oauth_signins s WHERE s.tenant_id = $1 AND s.client_id = $2 \
         ORDER BY s.expires_at DESC, s.state_hash LIMIT $3)",
    )
    .bind(tenant.as_str())
    .bind(&sign_in.client_id)
    .bind(per_client - 1)
    .execute(&mut *tx)
    .await?;
    let stored = sqlx::query(
        "INSERT INTO oauth_signins (state_hash, tenant_id, client_id, redirect_uri, code_challenge, \
         client_state, scope, upstream_sealed, expires_at) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 \
         WHERE (SELECT COUNT(*) FROM oauth_signins WHERE tenant_id = $2) < $10",
    )
    .bind(consent_hash)
    .bind(tenant.as_str())
    .bind(&sign_in.client_id)
    .bind(&sign_in.redirect_uri)
    .bind(&sign_in.code_challenge)
    .bind(&sign_in.client_state)
    .bind(&sign_in.scope)
    .bind(&sign_in.upstream_sealed)
    .bind(sign_in.expires_at)
    .bind(per_tenant)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    tx.commit().await?;
    Ok(stored)
}

/// The columns of [`SignIn`].
macro_rules! sign_in_columns {
    () => {
        "client_id, redirect_uri, code_challenge, client_state, scope, upstream_sealed, browser_hash, expires_at"
    };
}

/// The engineer allowed the sign-in awaiting consent under `consent_hash` (once, while it has not
/// expired): it is re-keyed by the hash of the state sent to the IdP, with the sealed PKCE
/// verifier and nonce and the hash of the cookie binding the browser.
pub(super) async fn allow_sign_in(
    db: &Db,
    tenant: &TenantId,
    consent_hash: &str,
    (state_hash, upstream_sealed, browser_hash): (&str, &str, &str),
    now: UnixSeconds,
) -> Result<Option<SignIn>, StoreError> {
    Ok(sqlx::query_as(concat!(
        "UPDATE oauth_signins SET state_hash = $1, upstream_sealed = $2, browser_hash = $3 ",
        "WHERE state_hash = $4 AND tenant_id = $5 AND browser_hash IS NULL AND expires_at >= $6 RETURNING ",
        sign_in_columns!()
    ))
    .bind(state_hash)
    .bind(upstream_sealed)
    .bind(browser_hash)
    .bind(consent_hash)
    .bind(tenant.as_str())
    .bind(now)
    .fetch_optional(db.pool())
    .await?)
}

/// The engineer denied the sign-in awaiting consent under `consent_hash`: it is dropped.
pub(super) async fn deny_sign_in(
    db: &Db,
    tenant: &TenantId,
    consent_hash: &str,
    now: UnixSeconds,
) -> Result<Option<SignIn>, StoreError> {
    Ok(sqlx::query_as(concat!(
        "DELETE FROM oauth_signins WHERE state_hash = $1 AND tenant_id = $2 AND browser_hash IS NULL ",
        "AND expires_at >= $3 RETURNING ",
        sign_in_columns!()
    ))
    .bind(consent_hash)
    .bind(tenant.as_str())
    .bind(now)
    .fetch_optional(db.pool())
    .await?)
}

/// Claims (deletes and returns) the allowed sign-in with this state: a state works once.
pub(super) async fn take_sign_in(
    db: &Db,
    tenant: &TenantId,
    state_hash: &str,
) -> Result<Option<SignIn>, StoreError> {
    Ok(sqlx::query_as(concat!(
        "DELETE FROM oauth_signins WHERE state_hash = $1 AND tenant_id = $2 AND browser_hash IS NOT NULL ",
        "RETURNING ",
        sign_in_columns!()
    ))
    .bind(state_hash)
    .bind(tenant.as_str())
    .fetch_optional(db.pool())
    .await?)
}

/// Stores a completed sign-in and its authorization code.
pub(super) async fn insert_family_and_code(
    db: &Db,
    tenant: &TenantId,
    family: &Family,
    code_hash: &str,
    code: &Code,
) -> Result<(), StoreError> {
    let mut tx = db.begin_write().await?;
    // Spent and expired codes are kept a day (a replay within it still revokes its sign-in).
    sqlx::query("DELETE FROM oauth_codes WHERE expires_at < $1")
        .bind(family.created_at - 24 * 3600)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO oauth_families (tenant_id, id, client_id, client_name, subject, name, email, \
         scope, resource, created_at, expires_at, last_used_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(tenant.as_str())
    .bind(&family.id)
    .bind(&family.client_id)
    .bind(&family.client_name)
    .bind(&family.subject)
    .bind(&family.name)
    .bind(&family.email)
    .bind(&family.scope)
    .bind(&family.resource)
    .bind(family.created_at)
    .bind(family.expires_at)
    .bind(family.last_used_at)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO oauth_codes (code_hash, tenant_id, family_id, client_id, redirect_uri, \
         code_challenge, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(code_hash)
    .bind(tenant.as_str())
    .bind(&code.family_id)
    .bind(&code.client_id)
    .bind(&code.redirect_uri)
    .bind(&code.code_challenge)
    .bind(code.expires_at)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// What claiming a code found.
pub(super) enum Claimed {
    /// First use: the code's details.
    First(Code),
    /// Used before: the family it belongs to (to be revoked).
    Replayed(String),
    Unknown,
}

/// Marks the code used; only the first caller gets its details.
pub(super) async fn claim_code(
    db: &Db,
    tenant: &TenantId,
    code_hash: &str,
    now: UnixSeconds,
) -> Result<Claimed, StoreError> {
    let first: Option<Code> = sqlx::query_as(
        "UPDATE oauth_codes SET used_at = $1 WHERE code_hash = $2 AND tenant_id = $3 AND used_at IS NULL \
         RETURNING family_id, client_id, redirect_uri, code_challenge, expires_at",
    )
    .bind(now)
    .bind(code_hash)
    .bind(tenant.as_str())
    .fetch_optional(db.pool())
    .await?;
    if let Some(code) = first {
        return Ok(Claimed::First(code));
    }
    let used: Option<(String,)> =
        sqlx::query_as("SELECT family_id FROM oauth_codes WHERE code_hash = $1 AND tenant_id = $2")
            .bind(code_hash)
            .bind(tenant.as_str())
            .fetch_optional(db.pool())
            .await?;
    Ok(used.map_or(Claimed::Unknown, |(family,)| Claimed::Replayed(family)))
}

pub(super) async fn family(
    db: &Db,
    tenant: &TenantId,
    id: &str,
) -> Result<Option<Family>, StoreError> {
    Ok(sqlx::query_as(concat!(
        "SELECT id, client_id, client_name, subject, name, email, scope, resource, created_at, ",
        "expires_at, last_used_at, revoked_at, revoke_reason FROM oauth_families WHERE tenant_id = $1 AND id = $2"
    ))
    .bind(tenant.as_str())
    .bind(id)
    .fetch_optional(db.pool())
    .await?)
}

/// Stores a new access and refresh token of a live family; false if the family was revoked.
pub(super) async fn insert_tokens(
    db: &Db,
    tenant: &TenantId,
    family_id: &str,
    tokens: [(&str, &str, &str, UnixSeconds); 2],
    now: UnixSeconds,
) -> Result<bool, StoreError> {
    let mut tx = db.begin_write().await?;
    let live = sqlx::query(
        "UPDATE oauth_families SET last_used_at = $1 WHERE tenant_id = $2 AND id = $3 AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(tenant.as_str())
    .bind(family_id)
    .execute(&mut *tx)
    .await?;
    if live.rows_affected() == 0 {
        return Ok(false);
    }
    // The family's expired tokens are useless (a rotated refresh token past its expiry can no
    // longer be replayed either).
    sqlx::query(
        "DELETE FROM oauth_tokens WHERE tenant_id = $1 AND family_id = $2 AND expires_at < $3",
    )
    .bind(tenant.as_str())
    .bind(family_id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    for (kind, id, hash, expires_at) in tokens {
        sqlx::query(
            "INSERT INTO oauth_tokens (tenant_id, id, family_id, kind, secret_hash, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(tenant.as_str())
        .bind(id)
        .bind(family_id)
        .bind(kind)
        .bind(hash)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// The unexpired access token `id` of a live family, with its family's details. `None`: no such
/// tenant; `Some(None)`: no such usable token.
pub(super) async fn access_token(
    db: &Db,
    tenant: &TenantId,
    id: &str,
    now: UnixSeconds,
) -> Result<Option<Option<StoredToken>>, StoreError> {
    type Row = (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let row: Option<Row> = sqlx::query_as(
        "SELECT k.family_id, k.secret_hash, f.subject, f.email, f.resource FROM tenants t \
         LEFT JOIN oauth_tokens k ON k.tenant_id = t.id AND k.id = $2 AND k.kind = 'access' AND k.expires_at > $3 \
         LEFT JOIN oauth_families f ON f.tenant_id = t.id AND f.id = k.family_id AND f.revoked_at IS NULL \
         WHERE t.id = $1",
    )
    .bind(tenant.as_str())
    .bind(id)
    .bind(now)
    .fetch_optional(db.pool())
    .await?;
    Ok(
        row.map(|(family_id, secret_hash, subject, email, resource)| {
            Some(StoredToken {
                family_id: family_id?,
                secret_hash: secret_hash?,
                subject: subject?,
                email,
                resource: resource?,
            })
        }),
    )
}

/// A refresh token by id, with its family (revoked or not) and whether it was used or expired.
pub(super) async fn refresh_token(
    db: &Db,
    tenant: &TenantId,
    id: &str,
) -> Result<Option<(String, String, i64, Option<i64>)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT family_id, secret_hash, expires_at, used_at FROM oauth_tokens \
         WHERE tenant_id = $1 AND id = $2 AND kind = 'refresh'",
    )
    .bind(tenant.as_str())
    .bind(id)
    .fetch_optional(db.pool())
    .await?)
}

/// Marks a refresh token rotated; false if it already was (a reuse).
pub(super) async fn rotate(
    db: &Db,
    tenant: &TenantId,
    id: &str,
    now: UnixSeconds,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE oauth_tokens SET used_at = $1 WHERE tenant_id = $2 AND id = $3 AND used_at IS NULL",
    )
    .bind(now)
    .bind(tenant.as_str())
    .bind(id)
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The tenant's sign-ins, newest first.
pub async fn list_families(db: &Db, tenant: &TenantId) -> Result<Vec<Family>, StoreError> {
    Ok(sqlx::query_as(concat!(
        "SELECT id, client_id, client_name, subject, name, email, scope, resource, created_at, ",
        "expires_at, last_used_at, revoked_at, revoke_reason FROM oauth_families WHERE tenant_id = $1 ",
        "ORDER BY created_at DESC, id"
    ))
    .bind(tenant.as_str())
    .fetch_all(db.pool())
    .await?)
}

/// Revokes the tenant's live sign-ins whose id is `who`, or whose engineer (subject or email) is
/// `who`; every token of theirs stops working at once. Returns how many were revoked.
pub async fn revoke_families(
    db: &Db,
    tenant: &TenantId,
    who: &str,
    reason: &str,
    now: UnixSeconds,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "UPDATE oauth_families SET revoked_at = $1, revoke_reason = $2 \
         WHERE tenant_id = $3 AND (id = $4 OR subject = $4 OR email = $4) AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(reason)
    .bind(tenant.as_str())
    .bind(who)
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected())
}
