//! Leases: credentials made for one grant (a PostgreSQL role today), tracked in
//! `credential_leases` from before they exist until after they are gone, and the reaper that
//! removes them when their grant ends.
//!
//! Guarantees:
//! - The row is written (state `creating`) before the resource is created, so a gateway killed at
//!   any point leaves a row behind and the resource is finished or removed by whoever comes next.
//! - One replica works on a lease at a time: it must win the row's lease (owner and deadline,
//!   taken by a conditional UPDATE) first; a crashed replica's lease lapses.
//! - Every run of a grant gets the same resource and secret, so a second run works while the
//!   first one's session is still open. The secret is sealed under the tenant's data key with the
//!   lease's place as associated data, and cleared when the resource is dropped.
//! - When the grant ends (revoked, expired, denied, gone, or exhausted once its last run has
//!   finished) the reaper drops the resource: woken by grant changes on this replica, at least
//!   every [`TICK`] otherwise, and at startup (the sweep after a restart). A failed drop is retried
//!   with backoff until it succeeds; the row keeps the attempts and the last error (never a secret).
//! - `credential.issued` and `credential.revoked` go on the grant's audit chain with the resource's
//!   name, never its secret.
//!
//! Another engine (MySQL, a cloud IAM token) adds an [`Engine`] variant with its `create` and
//! `drop` (both idempotent) and a `for_run` that calls [`issue`]; the table, the leases, the
//! reaper and the audit records are shared.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::app::App;
use crate::clock::UnixMillis;
use crate::grants::{Grant, GrantState, grant_span};
use crate::secrets;
use crate::store::StoreError;
use crate::tenants::TenantId;

/// How often the reaper looks for ended grants when nothing wakes it.
pub const TICK: Duration = Duration::from_secs(1);
/// How long a replica may take to create a resource before another may take over.
const ISSUE_LEASE_MS: i64 = 30_000;
/// How long a replica may take to drop a resource.
const DROP_LEASE_MS: i64 = 60_000;
/// How long a run waits for another replica (or run) that is creating the same resource.
const ISSUE_WAIT: Duration = Duration::from_secs(20);
/// Longest wait between two attempts to drop.
const MAX_BACKOFF_MS: i64 = 300_000;
const BATCH: i64 = 32;

/// What makes and removes a lease's resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Postgres,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
        }
    }

    fn parse(text: &str) -> Option<Engine> {
        (text == "postgres").then_some(Engine::Postgres)
    }

    fn resource_name(self, grant_id: &str, credential: &str) -> String {
        match self {
            Engine::Postgres => super::postgres::role_name(grant_id, credential),
        }
    }

    fn new_secret(self) -> Zeroizing<String> {
        match self {
            Engine::Postgres => super::postgres::new_password(),
        }
    }

    async fn create(
        self,
        settings: &Value,
        admin: &[u8],
        resource: &str,
        secret: &str,
        expires_at: i64,
    ) -> Result<(), String> {
        match self {
            Engine::Postgres => {
                super::postgres::create_role(settings, admin, resource, secret, expires_at).await
            }
        }
    }

    async fn drop(self, settings: &Value, admin: &[u8], resource: &str) -> Result<(), String> {
        match self {
            Engine::Postgres => super::postgres::drop_role(settings, admin, resource).await,
        }
    }
}

/// What a run receives from a lease.
pub struct Issued {
    /// The resource's name (a role), not secret.
    pub resource: String,
    pub secret: Zeroizing<String>,
}

fn aad(tenant: &str, grant: &str, credential: &str, resource: &str) -> String {
    format!("credential-lease/{tenant}/{grant}/{credential}/{resource}")
}

#[derive(sqlx::FromRow)]
struct Row {
    environment: String,
    engine: String,
    resource: String,
    settings: String,
    state: String,
    key_version: Option<i64>,
    secret_sealed: Option<String>,
    lease_until_ms: Option<i64>,
    attempts: i64,
}

async fn read(
    app: &App,
    tenant: &str,
    grant: &str,
    credential: &str,
) -> Result<Option<Row>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT environment, engine, resource, settings, state, key_version, secret_sealed, \
         lease_until_ms, attempts FROM credential_leases \
         WHERE tenant_id = $1 AND grant_id = $2 AND credential = $3",
    )
    .bind(tenant)
    .bind(grant)
    .bind(credential)
    .fetch_optional(app.db.pool())
    .await?)
}

/// The grant's resource for the credential `name`: the existing one, or one made now (this run is
/// the grant's first to need it). `settings` and `admin` are the credential's.
#[tracing::instrument(skip_all, fields(tenant.id = %grant.tenant_id, grant.id = %grant.id, credential = %name))]
pub async fn issue(
    app: &App,
    grant: &Grant,
    name: &str,
    engine: Engine,
    settings: &Value,
    admin: &[u8],
) -> Result<Issued, String> {
    let internal = |e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "credential lease storage failed");
        "the gateway could not record the credential".to_owned()
    };
    let tenant = TenantId::parse(&grant.tenant_id).map_err(|e| internal(&e))?;
    let resource = engine.resource_name(&grant.id, name);
    let place = aad(&grant.tenant_id, &grant.id, name, &resource);
    let now_ms = app.clock.now_ms();
    let secret = engine.new_secret();
    let (key_version, sealed) = secrets::seal_for_tenant(
        &app.db,
        &app.master_key,
        &tenant,
        &place,
        secret.as_bytes(),
        now_ms.div_euclid(1000),
    )
    .await
    .map_err(|e| internal(&e))?;
    let inserted = sqlx::query(
        "INSERT INTO credential_leases (tenant_id, grant_id, credential, environment, engine, \
         resource, settings, state, key_version, secret_sealed, created_at, expires_at, \
         lease_owner, lease_until_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'creating', $8, $9, $10, $11, $12, $13)",
    )
    .bind(&grant.tenant_id)
    .bind(&grant.id)
    .bind(name)
    .bind(&grant.environment)
    .bind(engine.as_str())
    .bind(&resource)
    .bind(settings.to_string())
    .bind(key_version)
    .bind(&sealed)
    .bind(now_ms.div_euclid(1000))
    .bind(grant.expires_at)
    .bind(&app.instance_id)
    .bind(now_ms + ISSUE_LEASE_MS)
    .execute(app.db.pool())
    .await
    .map_err(StoreError::from);
    match inserted {
        Ok(_) => {
            create(
                app, grant, name, engine, settings, admin, &resource, &secret,
            )
            .await?;
            return Ok(Issued { resource, secret });
        }
        Err(e) if e.is_unique_violation() => {}
        Err(e) => return Err(internal(&e)),
    }
    drop(secret);
    // Made (or being made) by an earlier run of this grant.
    let started = std::time::Instant::now();
    loop {
        let row = read(app, &grant.tenant_id, &grant.id, name)
            .await
            .map_err(|e| internal(&e))?
            .ok_or_else(|| "the credential's lease disappeared".to_owned())?;
        let open = || async {
            let (Some(version), Some(sealed)) = (row.key_version, row.secret_sealed.as_deref())
            else {
                return Err("the credential's secret is gone".to_owned());
            };
            let opened = secrets::open_for_tenant(
                &app.db,
                &app.master_key,
                &tenant,
                version,
                &place,
                sealed,
            )
            .await
            .map_err(|e| internal(&e))?;
            Ok(Zeroizing::new(
                String::from_utf8_lossy(&opened).into_owned(),
            ))
        };
        let now_ms = app.clock.now_ms();
        match row.state.as_str() {
            "live" => {
                let secret = open().await?;
                return Ok(Issued {
                    resource: row.resource,
                    secret,
                });
            }
            "creating" if row.lease_until_ms.is_none_or(|until| until < now_ms) => {
                // Its creator failed or died: this run finishes the job with the same secret.
                if claim_row(
                    app,
                    &grant.tenant_id,
                    &grant.id,
                    name,
                    "creating",
                    ISSUE_LEASE_MS,
                    now_ms,
                )
                .await
                .map_err(|e| internal(&e))?
                {
                    let secret = open().await?;
                    let stored: Value =
                        serde_json::from_str(&row.settings).map_err(|e| internal(&e))?;
                    create(
                        app,
                        grant,
                        name,
                        engine,
                        &stored,
                        admin,
                        &row.resource,
                        &secret,
                    )
                    .await?;
                    return Ok(Issued {
                        resource: row.resource,
                        secret,
                    });
                }
            }
            "creating" if started.elapsed() < ISSUE_WAIT => {}
            "creating" => return Err("another run is still creating the credential".to_owned()),
            _ => return Err("the grant's credential was already removed".to_owned()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Takes the row's lease if it is in `state` (or, for a drop, any state but `dropped`) and its
/// lease lapsed. A drop counts an attempt and moves the row to `dropping`.
async fn claim_row(
    app: &App,
    tenant: &str,
    grant: &str,
    name: &str,
    state: &str,
    lease_ms: i64,
    now_ms: UnixMillis,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE credential_leases SET lease_owner = $1, lease_until_ms = $2, \
         state = CASE WHEN $3 = 'dropping' THEN 'dropping' ELSE state END, \
         attempts = CASE WHEN $3 = 'dropping' THEN attempts + 1 ELSE attempts END \
         WHERE tenant_id = $4 AND grant_id = $5 AND credential = $6 \
         AND (state = $3 OR ($3 = 'dropping' AND state <> 'dropped')) \
         AND (lease_until_ms IS NULL OR lease_until_ms < $7)",
    )
    .bind(&app.instance_id)
    .bind(now_ms + lease_ms)
    .bind(state)
    .bind(tenant)
    .bind(grant)
    .bind(name)
    .bind(now_ms)
    .execute(app.db.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Creates the resource under this replica's lease and marks the row live with its audit record;
/// on failure records the error and releases the lease so that the next run tries again.
#[expect(
    clippy::too_many_arguments,
    reason = "the grant, the credential, its engine and settings, the admin and the resource"
)]
async fn create(
    app: &App,
    grant: &Grant,
    name: &str,
    engine: Engine,
    settings: &Value,
    admin: &[u8],
    resource: &str,
    secret: &str,
) -> Result<(), String> {
    let created = engine
        .create(settings, admin, resource, secret, grant.expires_at)
        .await;
    let tenant = TenantId::parse(&grant.tenant_id).map_err(|e| e.to_string())?;
    let result = async {
        let mut tx = app.db.begin_write().await?;
        let (state, error) = match &created {
            Ok(()) => ("live", None),
            Err(e) => ("creating", Some(e.as_str())),
        };
        let done = sqlx::query(
            "UPDATE credential_leases SET state = $1, last_error = $2, lease_owner = NULL, \
             lease_until_ms = NULL WHERE tenant_id = $3 AND grant_id = $4 AND credential = $5 \
             AND state = 'creating' AND lease_owner = $6",
        )
        .bind(state)
        .bind(error)
        .bind(&grant.tenant_id)
        .bind(&grant.id)
        .bind(name)
        .bind(&app.instance_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 1 && created.is_ok() {
            let detail = serde_json::json!({
                "credential": name,
                "engine": engine.as_str(),
                "resource": resource,
                "expires_at": grant.expires_at,
                "settings": settings,
            });
            crate::audit::append(
                &mut tx,
                &app.audit_key,
                tenant.as_str(),
                &grant.id,
                "credential.issued",
                &detail,
                app.clock.now_ms(),
            )
            .await?;
        }
        tx.commit().await?;
        Ok::<_, StoreError>(done.rows_affected() == 1)
    }
    .await;
    match (created, result) {
        (Err(e), _) => {
            tracing::warn!(resource, error = %e, "creating a credential for a grant failed");
            Err(e)
        }
        (Ok(()), Ok(true)) => {
            tracing::info!(resource, engine = engine.as_str(), "credential issued");
            drop(grant_span!(
                "credential.issued",
                grant,
                custodian.credential = %name,
                custodian.resource = %resource,
            ));
            Ok(())
        }
        // Our lease lapsed and the reaper or another run took the row: it owns the resource now.
        (Ok(()), Ok(false)) => Err("the credential was taken over while being created".to_owned()),
        (Ok(()), Err(e)) => {
            tracing::error!(resource, error = %e, "recording an issued credential failed; the reaper removes it when the grant ends");
            Err("the gateway could not record the credential".to_owned())
        }
    }
}

/// Starts the reaper: a pass at once (the sweep after a restart), then on every grant change on
/// this replica and every [`TICK`]; it stops when `shutdown` is cancelled.
pub fn spawn(app: Arc<App>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(e) = reap_once(&app).await {
                tracing::warn!(error = %e, "credential reaper pass failed; retrying");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(TICK) => {},
                () = app.grant_changed.notified() => {},
            }
        }
    })
}

/// Why a lease's resource goes, from its grant's state.
fn reason(state: Option<&str>) -> &'static str {
    match state.and_then(GrantState::parse) {
        None => "its grant no longer exists",
        Some(GrantState::Revoked) => "its grant was revoked",
        Some(GrantState::Exhausted) => "its grant's last run ended",
        Some(GrantState::Denied) => "its grant was denied",
        Some(_) => "its grant's time ran out",
    }
}

/// One pass: drops the resource of every lease whose grant ended and whose lease this replica
/// wins. Returns how many were dropped.
pub async fn reap_once(app: &App) -> Result<usize, StoreError> {
    let now_ms = app.clock.now_ms();
    // A grant used up by its last run ends when that run has finished: every `exec` record has
    // its `exec.finished` or `exec.failed`.
    let due: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT l.tenant_id, l.grant_id, l.credential, g.state FROM credential_leases l \
         LEFT JOIN grants g ON g.tenant_id = l.tenant_id AND g.id = l.grant_id \
         WHERE l.state IN ('creating', 'live', 'dropping') AND l.next_attempt_at_ms <= $1 \
         AND (l.lease_until_ms IS NULL OR l.lease_until_ms < $1) \
         AND (g.id IS NULL OR g.state IN ('revoked', 'expired', 'denied') OR g.expires_at <= $2 \
           OR (g.state = 'exhausted' AND \
             (SELECT COUNT(*) FROM audit_log a WHERE a.tenant_id = l.tenant_id \
              AND a.grant_id = l.grant_id AND a.kind = 'exec') <= \
             (SELECT COUNT(*) FROM audit_log a WHERE a.tenant_id = l.tenant_id \
              AND a.grant_id = l.grant_id AND a.kind IN ('exec.finished', 'exec.failed')))) \
         ORDER BY l.next_attempt_at_ms LIMIT $3",
    )
    .bind(now_ms)
    .bind(now_ms.div_euclid(1000))
    .bind(BATCH)
    .fetch_all(app.db.pool())
    .await?;
    let mut dropped = 0;
    for (tenant, grant, credential, state) in due {
        if !claim_row(
            app,
            &tenant,
            &grant,
            &credential,
            "dropping",
            DROP_LEASE_MS,
            now_ms,
        )
        .await?
        {
            continue;
        }
        if drop_one(app, &tenant, &grant, &credential, reason(state.as_deref())).await? {
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// Drops one claimed lease's resource; records success (and its audit record) or the error and
/// when to try again. Returns whether it was dropped.
#[tracing::instrument(skip_all, fields(tenant.id = %tenant, grant.id = %grant, credential = %credential))]
async fn drop_one(
    app: &App,
    tenant: &str,
    grant: &str,
    credential: &str,
    why: &str,
) -> Result<bool, StoreError> {
    let Some(row) = read(app, tenant, grant, credential).await? else {
        return Ok(false);
    };
    let tenant_id =
        TenantId::parse(tenant).map_err(|_| StoreError::Corrupt("lease tenant id".into()))?;
    let outcome = async {
        let engine = Engine::parse(&row.engine)
            .ok_or_else(|| format!("unknown credential engine `{}`", row.engine))?;
        let settings: Value = serde_json::from_str(&row.settings)
            .map_err(|_| "the lease's settings are not JSON".to_owned())?;
        // The newest admin URL of the credential (it may have been rotated since).
        let opened = secrets::load_for_run(&app.db, &app.master_key, &tenant_id, &row.environment)
            .await
            .map_err(|e| format!("opening the environment's credentials failed: {e}"))?;
        let admin = opened
            .iter()
            .find(|s| s.name == credential)
            .ok_or_else(|| {
                format!(
                    "the credential `{credential}` is no longer in environment `{}`; drop {} by hand",
                    row.environment, row.resource
                )
            })?;
        engine.drop(&settings, &admin.value, &row.resource).await
    }
    .await;
    let now_ms = app.clock.now_ms();
    match outcome {
        Ok(()) => {
            let mut tx = app.db.begin_write().await?;
            let done = sqlx::query(
                "UPDATE credential_leases SET state = 'dropped', secret_sealed = NULL, \
                 key_version = NULL, dropped_at = $1, last_error = NULL, lease_owner = NULL, \
                 lease_until_ms = NULL WHERE tenant_id = $2 AND grant_id = $3 AND credential = $4 \
                 AND lease_owner = $5",
            )
            .bind(now_ms.div_euclid(1000))
            .bind(tenant)
            .bind(grant)
            .bind(credential)
            .bind(&app.instance_id)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                return Ok(false);
            }
            let detail = serde_json::json!({
                "credential": credential,
                "engine": row.engine,
                "resource": row.resource,
                "reason": why,
                "attempts": row.attempts,
            });
            crate::audit::append(
                &mut tx,
                &app.audit_key,
                tenant,
                grant,
                "credential.revoked",
                &detail,
                now_ms,
            )
            .await?;
            tx.commit().await?;
            tracing::info!(resource = %row.resource, reason = why, "credential revoked");
            if let Some(g) = crate::grants::store::get(&app.db, &tenant_id, grant).await? {
                drop(grant_span!(
                    "credential.revoked",
                    &g,
                    custodian.credential = %credential,
                    custodian.resource = %row.resource,
                    custodian.reason = why,
                ));
            }
            Ok(true)
        }
        Err(error) => {
            let backoff = (1000_i64 << row.attempts.clamp(0, 16)).min(MAX_BACKOFF_MS);
            tracing::warn!(resource = %row.resource, attempts = row.attempts, error = %error, "dropping a credential failed; retrying");
            sqlx::query(
                "UPDATE credential_leases SET last_error = $1, next_attempt_at_ms = $2, \
                 lease_owner = NULL, lease_until_ms = NULL WHERE tenant_id = $3 AND grant_id = $4 \
                 AND credential = $5 AND lease_owner = $6",
            )
            .bind(&error)
            .bind(now_ms + backoff)
            .bind(tenant)
            .bind(grant)
            .bind(credential)
            .bind(&app.instance_id)
            .execute(app.db.pool())
            .await?;
            Ok(false)
        }
    }
}

/// A lease as an admin sees it (never its secret).
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct LeaseInfo {
    pub grant_id: String,
    pub credential: String,
    pub engine: String,
    pub resource: String,
    pub state: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub dropped_at: Option<i64>,
    pub attempts: i64,
    pub last_error: Option<String>,
}

/// The tenant's leases, newest first (for admins and tests).
pub async fn list(db: &crate::store::Db, tenant: &TenantId) -> Result<Vec<LeaseInfo>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT grant_id, credential, engine, resource, state, created_at, expires_at, dropped_at, \
         attempts, last_error FROM credential_leases WHERE tenant_id = $1 \
         ORDER BY created_at DESC, grant_id, credential",
    )
    .bind(tenant.as_str())
    .fetch_all(db.pool())
    .await?)
}
