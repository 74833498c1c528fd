//! SQL for grants. Every transition is one conditional UPDATE (first writer wins) plus an event row
//! in the same transaction; a transition that finds the grant in another state changes nothing.

use serde_json::Value;

use super::{Grant, GrantId, GrantState};
use crate::audit::AuditKey;
use crate::clock::{UnixMillis, UnixSeconds};
use crate::oidc::Approver;
use crate::store::{Db, StoreError};
use crate::tenants::TenantId;

/// A grant about to be stored.
pub struct NewGrant<'a> {
    pub tenant: &'a TenantId,
    pub id: &'a GrantId,
    pub environment: &'a str,
    pub agent_token_id: &'a str,
    pub agent_name: &'a str,
    pub purpose: &'a str,
    pub ttl_seconds: i64,
    pub max_uses: i64,
    pub expires_at: UnixSeconds,
    pub user_code: &'a str,
    pub verification_uri: &'a str,
    pub verification_uri_complete: Option<&'a str>,
    pub device_code_sealed: &'a str,
    pub poll_interval_ms: i64,
    /// W3C traceparent of the grant's root span.
    pub trace_context: Option<&'a str>,
    /// The engineer who asked, when they signed in with OAuth.
    pub requester: Option<&'a crate::oauth::Engineer>,
}

macro_rules! grant_columns {
    () => {
        concat!(
            "tenant_id, id, environment, agent_token_id, agent_name, purpose, ttl_seconds, ",
            "max_uses, uses, state, created_at, expires_at, user_code, verification_uri, ",
            "verification_uri_complete, poll_interval_ms, approved_at, approver_sub, approver_name, ",
            "approver_email, approver_groups, auth_time, end_reason, ended_at, trace_context, ",
            "requester_sub, requester_name"
        )
    };
}

macro_rules! select_grants {
    ($clause:literal) => {
        concat!("SELECT ", grant_columns!(), " FROM grants ", $clause)
    };
}

/// Stores a new pending grant and its `requested` event.
pub async fn insert(
    db: &Db,
    audit: &AuditKey,
    new: &NewGrant<'_>,
    now_ms: UnixMillis,
) -> Result<(), StoreError> {
    let mut tx = db.pool().begin().await?;
    sqlx::query(
        "INSERT INTO grants (tenant_id, id, environment, agent_token_id, agent_name, purpose, \
         ttl_seconds, max_uses, uses, state, created_at, expires_at, user_code, verification_uri, \
         verification_uri_complete, device_code_sealed, poll_interval_ms, next_poll_at_ms, trace_context, \
         requester_sub, requester_name) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, 'pending', $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)",
    )
    .bind(new.tenant.as_str())
    .bind(new.id.as_str())
    .bind(new.environment)
    .bind(new.agent_token_id)
    .bind(new.agent_name)
    .bind(new.purpose)
    .bind(new.ttl_seconds)
    .bind(new.max_uses)
    .bind(now_ms.div_euclid(1000))
    .bind(new.expires_at)
    .bind(new.user_code)
    .bind(new.verification_uri)
    .bind(new.verification_uri_complete)
    .bind(new.device_code_sealed)
    .bind(new.poll_interval_ms)
    .bind(now_ms + new.poll_interval_ms)
    .bind(new.trace_context)
    .bind(new.requester.map(|r| r.subject.as_str()))
    .bind(new.requester.map(|r| r.name.as_str()))
    .execute(&mut *tx)
    .await?;
    let mut detail = serde_json::json!({
        "environment": new.environment,
        "agent": new.agent_name,
        "purpose": new.purpose,
        "ttl_seconds": new.ttl_seconds,
        "max_uses": new.max_uses,
    });
    if let Some(requester) = new.requester {
        detail["requester"] =
            serde_json::json!({"subject": requester.subject, "name": requester.name});
    }
    crate::audit::append(
        &mut tx,
        audit,
        new.tenant.as_str(),
        new.id.as_str(),
        "grant.requested",
        &detail,
        now_ms,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// A grant of the tenant.
pub async fn get(db: &Db, tenant: &TenantId, id: &str) -> Result<Option<Grant>, StoreError> {
    let row = sqlx::query_as::<_, super::Row>(select_grants!("WHERE tenant_id = $1 AND id = $2"))
        .bind(tenant.as_str())
        .bind(id)
        .fetch_optional(db.pool())
        .await?;
    row.map(Grant::try_from).transpose()
}

/// A grant by its id alone (the approval page, which has no tenant context).
pub async fn get_by_id(db: &Db, id: &str) -> Result<Option<Grant>, StoreError> {
    let row = sqlx::query_as::<_, super::Row>(select_grants!("WHERE id = $1"))
        .bind(id)
        .fetch_optional(db.pool())
        .await?;
    row.map(Grant::try_from).transpose()
}

/// The tenant's grants, newest first, optionally in one state.
pub async fn list(
    db: &Db,
    tenant: &TenantId,
    state: Option<GrantState>,
    limit: i64,
) -> Result<Vec<Grant>, StoreError> {
    let rows = sqlx::query_as::<_, super::Row>(select_grants!(
        "WHERE tenant_id = $1 AND ($2 = '' OR state = $2) ORDER BY created_at DESC, id LIMIT $3"
    ))
    .bind(tenant.as_str())
    .bind(state.map(GrantState::as_str).unwrap_or(""))
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.into_iter().map(Grant::try_from).collect()
}

/// The grant's timeline (its audit records), oldest first.
pub async fn events(
    db: &Db,
    tenant: &TenantId,
    id: &str,
) -> Result<Vec<crate::audit::Entry>, StoreError> {
    crate::audit::for_grant(db, tenant, id).await
}

/// pending → active, recording the approver. Returns whether this call made the transition.
pub async fn approve(
    db: &Db,
    audit: &AuditKey,
    tenant: &TenantId,
    id: &str,
    approver: &Approver,
    now_ms: UnixMillis,
) -> Result<bool, StoreError> {
    let now = now_ms.div_euclid(1000);
    let mut tx = db.pool().begin().await?;
    let done = sqlx::query(
        "UPDATE grants SET state = 'active', approved_at = $1, expires_at = $1 + ttl_seconds, \
         approver_sub = $2, approver_name = $3, approver_email = $4, approver_groups = $5, \
         auth_time = $6, device_code_sealed = NULL, lease_owner = NULL, lease_until_ms = NULL \
         WHERE tenant_id = $7 AND id = $8 AND state = 'pending'",
    )
    .bind(now)
    .bind(&approver.subject)
    .bind(&approver.name)
    .bind(&approver.email)
    .bind(serde_json::to_string(&approver.groups).expect("strings serialize"))
    .bind(approver.auth_time)
    .bind(tenant.as_str())
    .bind(id)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() != 1 {
        return Ok(false);
    }
    let detail = serde_json::json!({
        "approver": approver.name.as_deref().unwrap_or(&approver.subject),
        "subject": approver.subject,
        "email": approver.email,
        "groups": approver.groups,
        "auth_time": approver.auth_time,
        "acr": approver.acr,
        "amr": approver.amr,
    });
    crate::audit::append(
        &mut tx,
        audit,
        tenant.as_str(),
        id,
        "grant.approved",
        &detail,
        now_ms,
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Ends a grant that is in `from` (one or two states) with `to` and a reason. Returns whether this
/// call made the transition.
#[expect(
    clippy::too_many_arguments,
    reason = "a transition names its grant, its states and its reason"
)]
pub async fn end(
    db: &Db,
    audit: &AuditKey,
    tenant: &TenantId,
    id: &str,
    from: &[GrantState],
    to: GrantState,
    reason: &str,
    now_ms: UnixMillis,
) -> Result<bool, StoreError> {
    let (first, second) = match from {
        [one] => (*one, *one),
        [one, two] => (*one, *two),
        _ => unreachable!("end() takes one or two source states"),
    };
    let mut tx = db.pool().begin().await?;
    let done = sqlx::query(
        "UPDATE grants SET state = $1, end_reason = $2, ended_at = $3, device_code_sealed = NULL, \
         lease_owner = NULL, lease_until_ms = NULL \
         WHERE tenant_id = $4 AND id = $5 AND (state = $6 OR state = $7)",
    )
    .bind(to.as_str())
    .bind(reason)
    .bind(now_ms.div_euclid(1000))
    .bind(tenant.as_str())
    .bind(id)
    .bind(first.as_str())
    .bind(second.as_str())
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() != 1 {
        return Ok(false);
    }
    let detail = serde_json::json!({ "reason": reason });
    crate::audit::append(
        &mut tx,
        audit,
        tenant.as_str(),
        id,
        &format!("grant.{}", to.as_str()),
        &detail,
        now_ms,
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Pending grants whose next poll is due and whose lease is free, oldest first.
pub async fn due(
    db: &Db,
    now_ms: UnixMillis,
    limit: i64,
) -> Result<Vec<(String, String)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT tenant_id, id FROM grants WHERE state = 'pending' AND next_poll_at_ms <= $1 \
         AND (lease_until_ms IS NULL OR lease_until_ms < $1) ORDER BY next_poll_at_ms LIMIT $2",
    )
    .bind(now_ms)
    .bind(limit)
    .fetch_all(db.pool())
    .await?)
}

/// Takes the polling lease of a pending grant; only one poller across all replicas gets it.
pub async fn claim(
    db: &Db,
    tenant: &str,
    id: &str,
    owner: &str,
    now_ms: UnixMillis,
    lease_ms: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE grants SET lease_owner = $1, lease_until_ms = $2 \
         WHERE tenant_id = $3 AND id = $4 AND state = 'pending' \
         AND (lease_until_ms IS NULL OR lease_until_ms < $5)",
    )
    .bind(owner)
    .bind(now_ms + lease_ms)
    .bind(tenant)
    .bind(id)
    .bind(now_ms)
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Sets the next poll time (and interval) and releases the lease held by `owner`.
pub async fn reschedule(
    db: &Db,
    tenant: &TenantId,
    id: &str,
    owner: &str,
    interval_ms: i64,
    next_poll_at_ms: UnixMillis,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE grants SET poll_interval_ms = $1, next_poll_at_ms = $2, lease_owner = NULL, \
         lease_until_ms = NULL WHERE tenant_id = $3 AND id = $4 AND lease_owner = $5",
    )
    .bind(interval_ms)
    .bind(next_poll_at_ms)
    .bind(tenant.as_str())
    .bind(id)
    .bind(owner)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// The sealed device code of a pending grant.
pub async fn device_code_sealed(
    db: &Db,
    tenant: &TenantId,
    id: &str,
) -> Result<Option<String>, StoreError> {
    let row: Option<(Option<String>,)> = sqlx::query_as(
        "SELECT device_code_sealed FROM grants WHERE tenant_id = $1 AND id = $2 AND state = 'pending'",
    )
    .bind(tenant.as_str())
    .bind(id)
    .fetch_optional(db.pool())
    .await?;
    Ok(row.and_then(|(sealed,)| sealed))
}

/// Active grants whose time is up, for the expiry sweep.
pub async fn expired_active(
    db: &Db,
    now: UnixSeconds,
    limit: i64,
) -> Result<Vec<(String, String)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT tenant_id, id FROM grants WHERE state = 'active' AND expires_at <= $1 LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(db.pool())
    .await?)
}

/// Uses one run of an active, unexpired grant of `agent_token_id` (atomically) and records the exec
/// in the audit log in the same transaction; the use that spends the last one also ends the grant
/// as exhausted. Returns the grant as this use left it, or `None` when no use was taken.
pub async fn consume_use(
    db: &Db,
    audit: &AuditKey,
    tenant: &TenantId,
    id: &str,
    agent_token_id: &str,
    exec: &Value,
    now_ms: UnixMillis,
) -> Result<Option<Grant>, StoreError> {
    let now = now_ms.div_euclid(1000);
    let mut tx = db.pool().begin().await?;
    let row = sqlx::query_as::<_, super::Row>(concat!(
        "UPDATE grants SET uses = uses + 1, \
         state = CASE WHEN uses + 1 >= max_uses THEN 'exhausted' ELSE state END, \
         end_reason = CASE WHEN uses + 1 >= max_uses THEN 'all of its runs were used' ELSE end_reason END, \
         ended_at = CASE WHEN uses + 1 >= max_uses THEN $1 ELSE ended_at END \
         WHERE tenant_id = $2 AND id = $3 AND agent_token_id = $4 AND state = 'active' \
         AND expires_at > $1 AND uses < max_uses RETURNING ",
        grant_columns!()
    ))
    .bind(now)
    .bind(tenant.as_str())
    .bind(id)
    .bind(agent_token_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let grant = Grant::try_from(row)?;
    // No record, no exec: the caller dispatches only after this transaction commits.
    crate::audit::append(&mut tx, audit, tenant.as_str(), id, "exec", exec, now_ms).await?;
    if grant.state == GrantState::Exhausted {
        let detail = serde_json::json!({ "reason": "all of its runs were used" });
        crate::audit::append(
            &mut tx,
            audit,
            tenant.as_str(),
            id,
            "grant.exhausted",
            &detail,
            now_ms,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Some(grant))
}

/// Records a step that is not a transition (e.g. an exec) on the grant's timeline.
pub async fn record(
    db: &Db,
    audit: &AuditKey,
    tenant: &TenantId,
    id: &str,
    kind: &str,
    detail: &Value,
    now_ms: UnixMillis,
) -> Result<(), StoreError> {
    let mut tx = db.pool().begin().await?;
    crate::audit::append(&mut tx, audit, tenant.as_str(), id, kind, detail, now_ms).await?;
    tx.commit().await?;
    Ok(())
}

/// Records that the exec named in `detail` failed on its way to or on the runner, in one
/// transaction with giving its use back when `nothing_ran` and the grant is still active (a use
/// that exhausted the grant stays spent: ended grants never reopen). Returns whether the use was
/// given back.
pub async fn exec_failed(
    db: &Db,
    audit: &AuditKey,
    tenant: &TenantId,
    id: &str,
    detail: &Value,
    nothing_ran: bool,
    now_ms: UnixMillis,
) -> Result<bool, StoreError> {
    let mut tx = db.pool().begin().await?;
    let given_back = nothing_ran
        && sqlx::query(
            "UPDATE grants SET uses = uses - 1 \
             WHERE tenant_id = $1 AND id = $2 AND state = 'active' AND uses > 0",
        )
        .bind(tenant.as_str())
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
    let mut detail = detail.clone();
    detail["use_given_back"] = Value::Bool(given_back);
    crate::audit::append(
        &mut tx,
        audit,
        tenant.as_str(),
        id,
        "exec.failed",
        &detail,
        now_ms,
    )
    .await?;
    tx.commit().await?;
    Ok(given_back)
}
