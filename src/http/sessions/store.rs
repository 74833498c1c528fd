//! The `mcp_sessions` table: every replica's view of which sessions exist, who owns each, and
//! what its client sent in `initialize`. Rows are keyed by the SHA-256 of the session id.

use sha2::{Digest, Sha256};

use super::SessionLimit;
use crate::agent_tokens::AgentIdentity;
use crate::clock::UnixMillis;
use crate::store::{Backend, Db, StoreError};

/// The key a session id is stored under.
pub fn id_hash(session: &str) -> String {
    hex::encode(Sha256::digest(session.as_bytes()))
}

/// A new session's row.
pub struct NewSession<'a> {
    pub id_hash: &'a str,
    pub owner: &'a AgentIdentity,
    pub initialize: &'a str,
    pub now: UnixMillis,
    /// Rows last seen at or before this have expired and do not count.
    pub expired_at: UnixMillis,
    pub max_per_token: usize,
    pub max_per_tenant: usize,
}

fn cap(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Inserts `session` unless its token or tenant already holds its cap of live sessions.
/// Concurrent inserts of one tenant are serialized (a row lock on the tenant in PostgreSQL, one that does not block inserts referencing it; SQLite
/// takes its write lock at the statement's start), so the caps hold across replicas.
pub async fn insert_within_caps(
    db: &Db,
    session: &NewSession<'_>,
) -> Result<Result<(), SessionLimit>, StoreError> {
    let tenant = session.owner.tenant.as_str();
    let mut tx = db.pool().begin().await?;
    if db.backend() == Backend::Postgres {
        sqlx::query("SELECT id FROM tenants WHERE id = $1 FOR NO KEY UPDATE")
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
    }
    let inserted = sqlx::query(
        "INSERT INTO mcp_sessions (id_hash, tenant_id, token_id, initialize, created_at, last_seen_at) \
         SELECT $1, $2, $3, $4, $5, $5 \
         WHERE (SELECT COUNT(*) FROM mcp_sessions \
                WHERE tenant_id = $2 AND token_id = $3 AND last_seen_at > $6) < $7 \
           AND (SELECT COUNT(*) FROM mcp_sessions \
                WHERE tenant_id = $2 AND last_seen_at > $6) < $8",
    )
    .bind(session.id_hash)
    .bind(tenant)
    .bind(&session.owner.token_id)
    .bind(session.initialize)
    .bind(session.now)
    .bind(session.expired_at)
    .bind(cap(session.max_per_token))
    .bind(cap(session.max_per_tenant))
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 1 {
        tx.commit().await?;
        return Ok(Ok(()));
    }
    let (per_token,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM mcp_sessions \
         WHERE tenant_id = $1 AND token_id = $2 AND last_seen_at > $3",
    )
    .bind(tenant)
    .bind(&session.owner.token_id)
    .bind(session.expired_at)
    .fetch_one(&mut *tx)
    .await?;
    Ok(Err(if per_token >= cap(session.max_per_token) {
        SessionLimit::Token(session.max_per_token)
    } else {
        SessionLimit::Tenant(session.max_per_tenant)
    }))
}

/// Marks the session used at `now` if it is live and `owner`'s; whether it was.
pub async fn touch(
    db: &Db,
    id_hash: &str,
    owner: &AgentIdentity,
    now: UnixMillis,
    expired_at: UnixMillis,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE mcp_sessions SET last_seen_at = $1 \
         WHERE id_hash = $2 AND tenant_id = $3 AND token_id = $4 AND last_seen_at > $5",
    )
    .bind(now)
    .bind(id_hash)
    .bind(owner.tenant.as_str())
    .bind(&owner.token_id)
    .bind(expired_at)
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The `initialize` params of a live session.
pub async fn initialize_params(
    db: &Db,
    id_hash: &str,
    expired_at: UnixMillis,
) -> Result<Option<String>, StoreError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT initialize FROM mcp_sessions WHERE id_hash = $1 AND last_seen_at > $2",
    )
    .bind(id_hash)
    .bind(expired_at)
    .fetch_optional(db.pool())
    .await?;
    Ok(row.map(|(json,)| json))
}

pub async fn delete(db: &Db, id_hash: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM mcp_sessions WHERE id_hash = $1")
        .bind(id_hash)
        .execute(db.pool())
        .await?;
    Ok(())
}

/// Deletes expired sessions; how many.
pub async fn delete_expired(db: &Db, expired_at: UnixMillis) -> Result<u64, StoreError> {
    let done = sqlx::query("DELETE FROM mcp_sessions WHERE last_seen_at <= $1")
        .bind(expired_at)
        .execute(db.pool())
        .await?;
    Ok(done.rows_affected())
}
