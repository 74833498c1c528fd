//! The background poller: polls the IdP's token endpoint for every pending grant, honouring the
//! announced interval and `slow_down`, and expires active grants whose time is up.
//!
//! Guarantees:
//! - Exactly one poller works on a grant at a time across all replicas: it must win a lease in the
//!   database (conditional UPDATE) first. A crashed replica's lease lapses and another takes over,
//!   so polling resumes after restarts.
//! - An unreachable or confused IdP leaves the grant pending (it is polled again later); only an
//!   answer that ends the authorization ends the grant.
//! - The device code is opened only for the request and dropped after it.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use super::{
    Grant, GrantId, GrantState, check_approver, check_requester, device_code_aad, grant_span, store,
};
use crate::app::App;
use crate::clock::UnixMillis;
use crate::environments;
use crate::keys::Purpose;
use crate::oidc::PollOutcome;
use crate::tenants::{self, TenantId};

/// How often the poller looks for due work when nothing wakes it.
const TICK: Duration = Duration::from_millis(200);
/// How long a lease lasts; longer than one IdP request with its timeout.
const LEASE_MS: i64 = 30_000;
/// RFC 8628 §3.5: add 5 seconds on `slow_down`.
const SLOW_DOWN_MS: i64 = 5_000;
/// Back-off when the IdP is unavailable.
const UNAVAILABLE_RETRY_MS: i64 = 5_000;
const BATCH: i64 = 32;

/// Starts the poller; it stops when `shutdown` is cancelled.
pub fn spawn(app: Arc<App>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(TICK) => {},
                () = app.poller_wake.notified() => {},
            }
            if let Err(e) = run_once(&app).await {
                tracing::warn!(error = %e, "grant poller pass failed; retrying");
            }
        }
    })
}

/// One pass: poll every due pending grant whose lease this replica wins, and expire active grants
/// whose time is up.
pub async fn run_once(app: &Arc<App>) -> Result<(), crate::store::StoreError> {
    let now_ms = app.clock.now_ms();
    let due = store::due(&app.db, now_ms, BATCH).await?;
    let mut work = Vec::new();
    for (tenant, id) in due {
        if store::claim(&app.db, &tenant, &id, &app.instance_id, now_ms, LEASE_MS).await? {
            let app = app.clone();
            work.push(tokio::spawn(async move {
                if let Err(e) = poll_one(&app, &tenant, &id).await {
                    // The lease lapses and the grant is tried again; it expires if this persists.
                    tracing::error!(tenant.id = %tenant, grant.id = %id, error = %e, "polling a grant failed");
                }
            }));
        }
    }
    for (tenant, id) in store::expired_active(&app.db, now_ms.div_euclid(1000), BATCH).await? {
        let tenant = TenantId::parse(&tenant)
            .map_err(|_| crate::store::StoreError::Corrupt("tenant id".into()))?;
        if let Some(grant) = store::get(&app.db, &tenant, &id).await? {
            super::expire(app, &grant).await?;
        }
    }
    for task in work {
        let _ = task.await;
    }
    Ok(())
}

async fn poll_one(app: &App, tenant: &str, id: &str) -> Result<(), super::InternalError> {
    let corrupt = |what: &str| crate::store::StoreError::Corrupt(format!("grant {id}: {what}"));
    let tenant_id = TenantId::parse(tenant).map_err(|_| corrupt("tenant id"))?;
    let grant_id = GrantId::parse(id).ok_or_else(|| corrupt("id"))?;
    let Some(grant) = store::get(&app.db, &tenant_id, id).await? else {
        return Ok(());
    };
    let now_ms = app.clock.now_ms();
    if grant.expires_at <= now_ms.div_euclid(1000) {
        return finish(
            app,
            &grant,
            GrantState::Expired,
            "nobody approved before the request expired".to_owned(),
        )
        .await;
    }
    let idp = tenants::get(&app.db, tenant).await?.and_then(|t| t.idp());
    let Some(idp) = idp else {
        return finish(
            app,
            &grant,
            GrantState::Denied,
            "the tenant's identity provider was removed".to_owned(),
        )
        .await;
    };
    let Some(sealed) = store::device_code_sealed(&app.db, &tenant_id, id).await? else {
        return Ok(());
    };
    let opened = app.master_key.open(
        Purpose::DeviceCode,
        &device_code_aad(&tenant_id, &grant_id),
        &sealed,
    )?;
    let device_code = SecretString::from(String::from_utf8_lossy(&opened).into_owned());
    drop(opened);
    let outcome = app
        .oidc
        .poll(&idp, &device_code, now_ms.div_euclid(1000))
        .await;
    drop(device_code);

    match outcome {
        PollOutcome::Pending => reschedule(app, &tenant_id, id, grant.poll_interval_ms).await?,
        PollOutcome::SlowDown => {
            tracing::info!(tenant.id = %tenant, grant.id = %id, "IdP asked to slow down");
            reschedule(app, &tenant_id, id, grant.poll_interval_ms + SLOW_DOWN_MS).await?;
        }
        PollOutcome::Unavailable(reason) => {
            tracing::warn!(tenant.id = %tenant, grant.id = %id, reason = %reason, "IdP unavailable; grant stays pending");
            reschedule(
                app,
                &tenant_id,
                id,
                grant.poll_interval_ms.max(UNAVAILABLE_RETRY_MS),
            )
            .await?;
        }
        PollOutcome::Denied => {
            finish(
                app,
                &grant,
                GrantState::Denied,
                "the approver declined at the identity provider".to_owned(),
            )
            .await?
        }
        PollOutcome::Expired => {
            finish(
                app,
                &grant,
                GrantState::Expired,
                "the device code expired before approval".to_owned(),
            )
            .await?
        }
        PollOutcome::Rejected(reason) => finish(app, &grant, GrantState::Denied, reason).await?,
        PollOutcome::Approved(approver) => {
            let env = environments::get(&app.db, &tenant_id, &grant.environment).await?;
            let Some(env) = env else {
                return finish(
                    app,
                    &grant,
                    GrantState::Denied,
                    "the environment no longer exists".to_owned(),
                )
                .await;
            };
            let allowed = check_approver(&env.policy, &approver, app.clock.now()).and_then(|()| {
                check_requester(
                    env.policy.approver_vs_requester,
                    grant.requester_sub.as_deref(),
                    &approver,
                )
            });
            match allowed {
                Ok(()) => {
                    if store::approve(
                        &app.db,
                        &app.audit_key,
                        &tenant_id,
                        id,
                        &approver,
                        app.clock.now_ms(),
                    )
                    .await?
                    {
                        let who = approver.name.as_deref().unwrap_or(&approver.subject);
                        app.metrics.grant(tenant, "approved");
                        app.metrics
                            .approved_after(tenant, (app.clock.now() - grant.created_at) as f64);
                        drop(grant_span!(
                            "grant.approved",
                            &grant,
                            enduser.id = %who,
                            custodian.approver.subject = %approver.subject,
                            custodian.approver.email = approver.email.as_deref().unwrap_or(""),
                            custodian.approver.groups = %approver.groups.join(","),
                            custodian.approver.auth_age_seconds = approver.auth_time.map(|t| app.clock.now() - t),
                        ));
                        tracing::info!(
                            tenant.id = %tenant, grant.id = %id,
                            enduser.id = %approver.name.as_deref().unwrap_or(&approver.subject),
                            "grant approved"
                        );
                        app.grant_changed.notify_waiters();
                    }
                }
                Err(reason) => finish(app, &grant, GrantState::Denied, reason).await?,
            }
        }
    }
    Ok(())
}

/// Ends a pending grant (first writer wins) and wakes waiters.
async fn finish(
    app: &App,
    grant: &Grant,
    to: GrantState,
    reason: String,
) -> Result<(), super::InternalError> {
    let now_ms = app.clock.now_ms();
    let tenant = TenantId::parse(&grant.tenant_id)
        .map_err(|_| crate::store::StoreError::Corrupt("tenant id".into()))?;
    let id = grant.id.as_str();
    let ended = store::end(
        &app.db,
        &app.audit_key,
        &tenant,
        id,
        &[GrantState::Pending],
        to,
        &reason,
        now_ms,
    )
    .await?;
    if ended {
        tracing::info!(tenant.id = %tenant, grant.id = %id, state = to.as_str(), reason = %reason, "grant ended while pending");
        app.grant_changed.notify_waiters();
        app.metrics.grant(&grant.tenant_id, to.as_str());
        let span = match to {
            GrantState::Denied => grant_span!("grant.denied", grant, custodian.reason = %reason),
            _ => grant_span!("grant.expired", grant, custodian.reason = %reason),
        };
        drop(span);
    }
    Ok(())
}

/// Schedules the next poll `interval_ms` from now and releases this replica's lease.
async fn reschedule(
    app: &App,
    tenant: &TenantId,
    id: &str,
    interval_ms: i64,
) -> Result<(), crate::store::StoreError> {
    let next: UnixMillis = app.clock.now_ms() + interval_ms;
    store::reschedule(&app.db, tenant, id, &app.instance_id, interval_ms, next).await
}
