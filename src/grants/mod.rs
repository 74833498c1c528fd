//! Task grants: an agent asks for one environment for one task; a human approves at the tenant's
//! IdP (device flow); only then does a short-lived, bounded grant exist.
//!
//! Guarantees:
//! - States `pending → active → {exhausted | expired | revoked}`, `pending → {denied | expired |
//!   revoked}`; every transition is a conditional UPDATE plus an event (see [`store`]).
//! - A grant is visible and usable only to the agent token that requested it, inside its tenant;
//!   any other caller gets the same "not found" as for an id that does not exist.
//! - TTL and uses are capped by the environment's policy; the approver must satisfy the policy
//!   (who, how recently, how) or the grant is denied with the reason.
//! - The device code is sealed at rest and dropped when the grant leaves `pending`; IdP tokens are
//!   never stored.

mod policy;
pub mod poller;
mod purpose;
pub mod store;

pub use policy::{check_approver, check_requester};

/// A span of a grant's trace: a child of its `grant.request` span, whenever and wherever it is made.
macro_rules! grant_span {
    ($name:literal, $grant:expr $(, $($field:tt)*)?) => {{
        let grant: &$crate::grants::Grant = $grant;
        let span = tracing::info_span!(
            parent: None,
            $name,
            custodian.tenant = %grant.tenant_id,
            custodian.grant.id = %grant.id,
            custodian.environment = %grant.environment,
            custodian.agent.name = %grant.agent_name
            $(, $($field)*)?
        );
        $crate::telemetry::attach(&span, grant.trace_context.as_deref());
        span
    }};
}
pub(crate) use grant_span;

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;
use schemars::JsonSchema;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::agent_tokens::AgentIdentity;
use crate::app::App;
use crate::clock::UnixSeconds;
use crate::environments::{self, LoginFreshness, RequesterRule};
use crate::keys::Purpose;
use crate::oauth::Engineer;
use crate::store::StoreError;
use crate::tenants::TenantId;

/// Default lifetime asked for when the agent names none (capped by policy).
pub const DEFAULT_TTL_SECONDS: i64 = 900;
/// Default number of runs when the agent names none (capped by policy).
pub const DEFAULT_MAX_USES: i64 = 10;
/// Longest `grant_status` wait, under Codex's 300 s tool timeout.
pub const MAX_WAIT_SECONDS: u64 = 240;

/// A grant id: `gr_` + 128 random bits in hex. It is also the approval page's id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GrantId(String);

impl GrantId {
    pub fn generate() -> Self {
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        Self(format!("gr_{}", hex::encode(bytes)))
    }

    /// Accepts only the shape of a grant id (so junk never reaches a query).
    pub fn parse(text: &str) -> Option<Self> {
        let hex_part = text.strip_prefix("gr_")?;
        (hex_part.len() == 32
            && hex_part
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GrantState {
    /// Waiting for a human to approve at the identity provider.
    Pending,
    /// Approved and usable until `expires_at` or until its uses run out.
    Active,
    /// All uses spent.
    Exhausted,
    /// Its time ran out (or the approval was never given in time).
    Expired,
    /// Revoked by the agent or an admin.
    Revoked,
    /// Declined at the IdP, or the approver did not satisfy the policy.
    Denied,
}

impl GrantState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Exhausted => "exhausted",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Denied => "denied",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => Self::Pending,
            "active" => Self::Active,
            "exhausted" => Self::Exhausted,
            "expired" => Self::Expired,
            "revoked" => Self::Revoked,
            "denied" => Self::Denied,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Pending | Self::Active)
    }
}

/// A grant as stored (without its sealed device code).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Grant {
    pub tenant_id: String,
    pub id: String,
    pub environment: String,
    pub agent_token_id: String,
    pub agent_name: String,
    pub purpose: String,
    pub ttl_seconds: i64,
    pub max_uses: i64,
    pub uses: i64,
    pub state: GrantState,
    pub created_at: UnixSeconds,
    pub expires_at: UnixSeconds,
    pub user_code: Option<String>,
    pub verification_uri: Option<String>,
    pub verification_uri_complete: Option<String>,
    pub poll_interval_ms: i64,
    pub approved_at: Option<UnixSeconds>,
    pub approver_sub: Option<String>,
    pub approver_name: Option<String>,
    pub approver_email: Option<String>,
    pub approver_groups: Vec<String>,
    pub auth_time: Option<UnixSeconds>,
    pub end_reason: Option<String>,
    pub ended_at: Option<UnixSeconds>,
    /// W3C traceparent of the grant's root span (one trace per grant).
    pub trace_context: Option<String>,
    /// The engineer who asked (IdP subject and name), when they signed in with OAuth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requester_sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requester_name: Option<String>,
}

#[derive(sqlx::FromRow)]
struct Row {
    tenant_id: String,
    id: String,
    environment: String,
    agent_token_id: String,
    agent_name: String,
    purpose: String,
    ttl_seconds: i64,
    max_uses: i64,
    uses: i64,
    state: String,
    created_at: i64,
    expires_at: i64,
    user_code: Option<String>,
    verification_uri: Option<String>,
    verification_uri_complete: Option<String>,
    poll_interval_ms: i64,
    approved_at: Option<i64>,
    approver_sub: Option<String>,
    approver_name: Option<String>,
    approver_email: Option<String>,
    approver_groups: Option<String>,
    auth_time: Option<i64>,
    end_reason: Option<String>,
    ended_at: Option<i64>,
    trace_context: Option<String>,
    requester_sub: Option<String>,
    requester_name: Option<String>,
}

impl TryFrom<Row> for Grant {
    type Error = StoreError;

    fn try_from(row: Row) -> Result<Self, StoreError> {
        let state = GrantState::parse(&row.state)
            .ok_or_else(|| StoreError::Corrupt(format!("grant {}: state", row.id)))?;
        let approver_groups = match row.approver_groups {
            Some(json) => serde_json::from_str(&json)
                .map_err(|_| StoreError::Corrupt(format!("grant {}: approver_groups", row.id)))?,
            None => Vec::new(),
        };
        Ok(Grant {
            tenant_id: row.tenant_id,
            id: row.id,
            environment: row.environment,
            agent_token_id: row.agent_token_id,
            agent_name: row.agent_name,
            purpose: row.purpose,
            ttl_seconds: row.ttl_seconds,
            max_uses: row.max_uses,
            uses: row.uses,
            state,
            created_at: row.created_at,
            expires_at: row.expires_at,
            user_code: row.user_code,
            verification_uri: row.verification_uri,
            verification_uri_complete: row.verification_uri_complete,
            poll_interval_ms: row.poll_interval_ms,
            approved_at: row.approved_at,
            approver_sub: row.approver_sub,
            approver_name: row.approver_name,
            approver_email: row.approver_email,
            approver_groups,
            auth_time: row.auth_time,
            end_reason: row.end_reason,
            ended_at: row.ended_at,
            trace_context: row.trace_context,
            requester_sub: row.requester_sub,
            requester_name: row.requester_name,
        })
    }
}

/// Why a grant operation was refused. Messages are written for the agent and never contain
/// secret material; the same `NotFound` covers "no such grant" and "not yours".
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("no grant `{0}` for this agent")]
    NotFound(String),
    #[error("no environment `{0}` in this tenant; call list_environments to see the names")]
    UnknownEnvironment(String),
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("too many grant requests from this agent token; try again in {retry_after_seconds} s")]
    RateLimited { retry_after_seconds: u64 },
    #[error(
        "this agent token already has {0} grant_status waits open; wait for one to return before starting another"
    )]
    TooManyWaits(u32),
    #[error(
        "this tenant has no identity provider configured, so no one can approve grants; ask a Custodian admin to run `custodian admin tenant set-idp`"
    )]
    NoIdentityProvider,
    /// A transient failure (network, 5xx): trying again can work.
    #[error("{0}; the grant was not created, try again shortly")]
    IdentityProviderUnavailable(String),
    /// The provider or the tenant's IdP settings are wrong: trying again will not help.
    #[error(
        "{0}. The grant was not created; this is a configuration problem that retrying will not fix: ask a Custodian admin to correct the tenant's identity provider (`custodian admin tenant set-idp` checks it)"
    )]
    IdentityProviderMisconfigured(String),
    #[error("grant `{id}` is already {state}")]
    AlreadyEnded { id: String, state: &'static str },
    #[error("grant `{id}` is {state}: {hint}")]
    NotUsable {
        id: String,
        state: &'static str,
        hint: String,
    },
    #[error("internal error")]
    Internal(#[from] InternalError),
}

/// A failure of ours; its text is logged, never shown.
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
}

impl From<StoreError> for GrantError {
    fn from(e: StoreError) -> Self {
        GrantError::Internal(e.into())
    }
}

/// What `request_grant` answers.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct RequestedGrant {
    /// Pass this to grant_status, run and revoke_grant.
    pub grant_id: String,
    pub state: GrantState,
    /// Page for the human approver: shows what is being asked and links to the sign-in.
    pub approval_url: String,
    /// Code the approver confirms at the identity provider.
    pub user_code: String,
    /// The identity provider's own verification page.
    pub verification_uri: String,
    /// Unix time (seconds) after which the request can no longer be approved.
    pub expires_at: i64,
    /// One line to relay to your human verbatim.
    pub message: String,
}

/// What `grant_status` answers.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct GrantStatus {
    pub grant_id: String,
    pub state: GrantState,
    pub environment: String,
    pub purpose: String,
    /// Who approved (their email or subject at the identity provider), once approved.
    pub approver: Option<String>,
    /// Unix time (seconds): for pending grants the approval deadline, for active ones the end of
    /// the grant.
    pub expires_at: i64,
    /// Runs left (0 once the grant is no longer active).
    pub uses_left: i64,
    pub max_uses: i64,
    /// Why the grant ended or was denied, when it did.
    pub reason: Option<String>,
}

impl GrantStatus {
    fn of(grant: &Grant) -> Self {
        let uses_left = if grant.state == GrantState::Active {
            (grant.max_uses - grant.uses).max(0)
        } else {
            0
        };
        Self {
            grant_id: grant.id.clone(),
            state: grant.state,
            environment: grant.environment.clone(),
            purpose: grant.purpose.clone(),
            approver: grant.approver_name.clone().or(grant.approver_sub.clone()),
            expires_at: grant.expires_at,
            uses_left,
            max_uses: grant.max_uses,
            reason: grant.end_reason.clone(),
        }
    }
}

/// Arguments of `request_grant`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestArgs {
    /// Environment name from list_environments.
    pub environment: String,
    /// What the task needs the credentials for, in a sentence the approver will read.
    pub purpose: String,
    /// How long the grant should last once approved (seconds); capped by the environment.
    pub ttl_seconds: Option<i64>,
    /// How many commands the grant may run; capped by the environment.
    pub max_uses: Option<i64>,
}

/// Per-token limits kept in memory on each replica.
#[derive(Debug, Default)]
pub struct Limits {
    requests: Mutex<HashMap<String, VecDeque<Instant>>>,
    waits: Mutex<HashMap<String, u32>>,
}

/// An open `grant_status` wait; released on drop.
pub struct WaitSlot<'a> {
    limits: &'a Limits,
    token: String,
}

impl Drop for WaitSlot<'_> {
    fn drop(&mut self) {
        let mut waits = self.limits.waits.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = waits.get_mut(&self.token) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                waits.remove(&self.token);
            }
        }
    }
}

impl Limits {
    fn admit_request(&self, token: &str, per_minute: u32) -> Result<(), GrantError> {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let window = Duration::from_secs(60);
        let seen = requests.entry(token.to_owned()).or_default();
        while seen.front().is_some_and(|t| t.elapsed() >= window) {
            seen.pop_front();
        }
        if seen.len() >= per_minute as usize {
            let oldest = seen.front().map(Instant::elapsed).unwrap_or_default();
            return Err(GrantError::RateLimited {
                retry_after_seconds: window.saturating_sub(oldest).as_secs().max(1),
            });
        }
        seen.push_back(Instant::now());
        Ok(())
    }

    fn open_wait(&self, token: &str, max: u32) -> Result<WaitSlot<'_>, GrantError> {
        let mut waits = self.waits.lock().unwrap_or_else(|e| e.into_inner());
        let open = waits.entry(token.to_owned()).or_default();
        if *open >= max {
            return Err(GrantError::TooManyWaits(max));
        }
        *open += 1;
        Ok(WaitSlot {
            limits: self,
            token: token.to_owned(),
        })
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> GrantError {
    GrantError::InvalidArgument {
        field,
        message: message.into(),
    }
}

fn capped(
    field: &'static str,
    asked: Option<i64>,
    default: i64,
    cap: i64,
) -> Result<i64, GrantError> {
    match asked {
        None => Ok(default.min(cap)),
        Some(v) if v < 1 => Err(invalid(field, format!("must be at least 1, got {v}"))),
        Some(v) if v > cap => Err(invalid(
            field,
            format!("{v} is over this environment's limit of {cap}"),
        )),
        Some(v) => Ok(v),
    }
}

/// `request_grant`: validates against policy, starts the device flow, stores a pending grant.
#[tracing::instrument(skip_all, fields(tenant.id = %caller.tenant, agent = %caller.token_name))]
pub async fn request(
    app: &App,
    caller: &AgentIdentity,
    requester: Option<&Engineer>,
    args: RequestArgs,
) -> Result<RequestedGrant, GrantError> {
    let purpose = purpose::validate(&args.purpose)?;
    let Some(env) = environments::get(&app.db, &caller.tenant, &args.environment).await? else {
        return Err(GrantError::UnknownEnvironment(
            args.environment.chars().take(64).collect(),
        ));
    };
    // Own approval and four eyes both compare with the engineer who asked; an agent token names
    // none (anyone holding it could otherwise request and approve their own grant).
    let rule = env.policy.approver_vs_requester;
    if rule != RequesterRule::Any && requester.is_none() {
        let who = if rule == RequesterRule::Requester {
            "by the engineer who asks"
        } else {
            "by someone other than the engineer who asks (four eyes)"
        };
        return Err(GrantError::InvalidArgument {
            field: "environment",
            message: format!(
                "`{}` must be approved {who}, and an agent token names no engineer: sign in with `codex mcp login` to request it",
                env.name
            ),
        });
    }
    let ttl_seconds = capped(
        "ttl_seconds",
        args.ttl_seconds,
        DEFAULT_TTL_SECONDS,
        env.policy.max_ttl_seconds,
    )?;
    let max_uses = capped(
        "max_uses",
        args.max_uses,
        DEFAULT_MAX_USES,
        env.policy.max_uses,
    )?;
    let tenant = crate::tenants::get(&app.db, caller.tenant.as_str())
        .await?
        .ok_or_else(|| GrantError::NotFound(String::new()))?;
    let idp = tenant.idp().ok_or(GrantError::NoIdentityProvider)?;
    app.limits
        .admit_request(&caller.token_id, app.config.grants.requests_per_minute)?;

    let id = GrantId::generate();
    // The root of this grant's trace; every later step of the grant is a span under it.
    let root = tracing::info_span!(
        parent: None,
        "grant.request",
        custodian.tenant = %caller.tenant,
        custodian.grant.id = %id.as_str(),
        custodian.environment = %env.name,
        custodian.agent.name = %caller.token_name,
        custodian.grant.ttl_seconds = ttl_seconds,
        custodian.grant.max_uses = max_uses,
    );
    let trace_context = crate::telemetry::traceparent(&root);
    // Ask the IdP for a sign-in as fresh as the policy requires, so that it re-authenticates a
    // stale session and states `auth_time` (OIDC `max_age`).
    let max_age = (env.policy.freshness == LoginFreshness::Required)
        .then_some(env.policy.max_auth_age_seconds);
    let authorization = app
        .oidc
        .start(&idp, max_age)
        .instrument(
            tracing::info_span!(parent: &root, "grant.device_authorization",
            custodian.grant.id = %id.as_str(),
            idp.issuer = %idp.issuer),
        )
        .await
        .map_err(|e| {
            tracing::warn!(tenant.id = %caller.tenant, error = %e, "device authorization failed");
            if e.is_transient() {
                GrantError::IdentityProviderUnavailable(e.to_string())
            } else {
                GrantError::IdentityProviderMisconfigured(e.to_string())
            }
        })?;
    let now_ms = app.clock.now_ms();
    let expires_at = now_ms.div_euclid(1000)
        + i64::try_from(authorization.expires_in.as_secs()).unwrap_or(i64::MAX / 4);
    let sealed = app.master_key.seal(
        Purpose::DeviceCode,
        &device_code_aad(&caller.tenant, &id),
        authorization.device_code.expose_secret().as_bytes(),
    );
    drop(authorization.device_code);
    let interval_ms = i64::try_from(authorization.interval.as_millis())
        .unwrap_or(5000)
        .max(1000);
    store::insert(
        &app.db,
        &app.audit_key,
        &store::NewGrant {
            tenant: &caller.tenant,
            id: &id,
            environment: &env.name,
            agent_token_id: &caller.token_id,
            agent_name: &caller.token_name,
            purpose,
            ttl_seconds,
            max_uses,
            expires_at,
            user_code: &authorization.user_code,
            verification_uri: &authorization.verification_uri,
            verification_uri_complete: authorization.verification_uri_complete.as_deref(),
            device_code_sealed: &sealed,
            poll_interval_ms: interval_ms,
            trace_context: trace_context.as_deref(),
            requester,
        },
        now_ms,
    )
    .await?;
    app.poke_poller();
    app.metrics.grant(caller.tenant.as_str(), "requested");
    tracing::info!(grant.id = id.as_str(), environment = %env.name, "grant requested");
    let approval_url = approval_url(app, &id);
    let message = format!(
        "Approval needed: open {approval_url} and approve code {} to let me use `{}` for: {purpose}",
        authorization.user_code, env.name
    );
    Ok(RequestedGrant {
        grant_id: id.0,
        state: GrantState::Pending,
        approval_url,
        user_code: authorization.user_code,
        verification_uri: authorization.verification_uri,
        expires_at,
        message,
    })
}

/// The approval page's URL for a grant.
pub fn approval_url(app: &App, id: &GrantId) -> String {
    let base = app.config.server.public_url.as_str().trim_end_matches('/');
    format!("{base}/approve/{}", id.as_str())
}

/// Associated data binding a sealed device code to its grant.
pub fn device_code_aad(tenant: &TenantId, id: &GrantId) -> String {
    format!("device-code/{}/{}", tenant.as_str(), id.as_str())
}

/// The caller's own grant, or `NotFound`.
async fn own_grant(app: &App, caller: &AgentIdentity, id: &str) -> Result<Grant, GrantError> {
    let not_found = || GrantError::NotFound(id.chars().take(40).collect());
    let id = GrantId::parse(id).ok_or_else(not_found)?;
    let grant = store::get(&app.db, &caller.tenant, id.as_str())
        .await?
        .filter(|g| g.agent_token_id == caller.token_id)
        .ok_or_else(not_found)?;
    expire_if_due(app, grant).await
}

/// Ends an active grant whose time is up before anyone reads it as active.
async fn expire_if_due(app: &App, grant: Grant) -> Result<Grant, GrantError> {
    if grant.state == GrantState::Active && grant.expires_at <= app.clock.now() {
        expire(app, &grant).await?;
        let tenant = TenantId::parse(&grant.tenant_id)
            .map_err(|_| StoreError::Corrupt("tenant id".into()))?;
        return Ok(store::get(&app.db, &tenant, &grant.id)
            .await?
            .unwrap_or(grant));
    }
    Ok(grant)
}

/// Ends an active grant whose time ran out (first writer wins): audit record, waiters woken, span
/// in the grant's trace. Used by reads that find it due and by the poller's sweep.
pub(crate) async fn expire(app: &App, grant: &Grant) -> Result<bool, StoreError> {
    let tenant =
        TenantId::parse(&grant.tenant_id).map_err(|_| StoreError::Corrupt("tenant id".into()))?;
    let reason = "the grant's time ran out";
    let ended = store::end(
        &app.db,
        &app.audit_key,
        &tenant,
        &grant.id,
        &[GrantState::Active],
        GrantState::Expired,
        reason,
        app.clock.now_ms(),
    )
    .await?;
    if ended {
        tracing::info!(tenant.id = %tenant, grant.id = %grant.id, "grant expired");
        app.grant_changed.notify_waiters();
        drop(grant_span!(
            "grant.expired",
            grant,
            custodian.reason = reason
        ));
    }
    Ok(ended)
}

/// `grant_status` without waiting.
pub async fn status(
    app: &App,
    caller: &AgentIdentity,
    id: &str,
) -> Result<GrantStatus, GrantError> {
    Ok(GrantStatus::of(&own_grant(app, caller, id).await?))
}

/// Reports `(elapsed, total)` seconds of a wait.
pub type Progress = dyn Fn(u64, u64) -> futures::future::BoxFuture<'static, ()> + Send + Sync;

/// `grant_status` with a wait: returns as soon as the state differs from the one first seen, or
/// when `wait` is over. `progress(elapsed, total)` is called about once a second while waiting.
pub async fn wait(
    app: &App,
    caller: &AgentIdentity,
    id: &str,
    wait: Duration,
    progress: &Progress,
) -> Result<GrantStatus, GrantError> {
    let first = own_grant(app, caller, id).await?;
    if first.state.is_terminal() || wait.is_zero() {
        return Ok(GrantStatus::of(&first));
    }
    let _slot = app.limits.open_wait(
        &caller.token_id,
        app.config.grants.concurrent_waits_per_token,
    )?;
    let started = Instant::now();
    let total = wait.as_secs();
    loop {
        let left = wait.saturating_sub(started.elapsed());
        if left.is_zero() {
            return status(app, caller, id).await;
        }
        // Woken at once by a change on this replica; other replicas' changes show within 1 s.
        let _ = tokio::time::timeout(
            left.min(Duration::from_secs(1)),
            app.grant_changed.notified(),
        )
        .await;
        let now = own_grant(app, caller, id).await?;
        if now.state != first.state {
            return Ok(GrantStatus::of(&now));
        }
        progress(started.elapsed().as_secs().min(total), total).await;
    }
}

/// Takes one run of the caller's active grant, atomically; refuses (before anything else happens)
/// if the grant is not the caller's, not active, expired or used up.
pub async fn consume(
    app: &App,
    caller: &AgentIdentity,
    id: &str,
    exec: &serde_json::Value,
) -> Result<Grant, GrantError> {
    // The UPDATE checks ownership, state, expiry and uses itself; only a refusal reads the grant.
    let taken = store::consume_use(
        &app.db,
        &app.audit_key,
        &caller.tenant,
        id,
        &caller.token_id,
        exec,
        app.clock.now_ms(),
    )
    .await?;
    if let Some(now) = taken {
        if now.state == GrantState::Exhausted {
            app.grant_changed.notify_waiters();
            drop(grant_span!("grant.exhausted", &now));
            app.metrics.grant(&now.tenant_id, "exhausted");
        }
        return Ok(now);
    }
    // Not taken: say why, from the state as it is now.
    Err(not_usable(own_grant(app, caller, id).await?))
}

/// Why `grant` cannot be used for a run, for the agent.
pub fn not_usable(grant: Grant) -> GrantError {
    let hint = match grant.state {
        GrantState::Pending => "wait until grant_status says active".to_owned(),
        GrantState::Active => "it has no runs left or just expired; request a new grant".to_owned(),
        GrantState::Exhausted => "all of its runs were used; request a new grant".to_owned(),
        GrantState::Expired => "its time ran out; request a new grant".to_owned(),
        GrantState::Revoked => "it was revoked; request a new grant".to_owned(),
        // The stored reason: a decline at the IdP, or the policy check that failed.
        GrantState::Denied => format!(
            "{}; request a new grant",
            grant
                .end_reason
                .as_deref()
                .unwrap_or("the approval was refused")
        ),
    };
    GrantError::NotUsable {
        id: grant.id,
        state: grant.state.as_str(),
        hint,
    }
}

/// The caller's grant if it can take a run now, or why not (nothing is spent either way).
pub async fn usable(app: &App, caller: &AgentIdentity, id: &str) -> Result<Grant, GrantError> {
    let grant = own_grant(app, caller, id).await?;
    if grant.state == GrantState::Active && grant.uses < grant.max_uses {
        Ok(grant)
    } else {
        Err(not_usable(grant))
    }
}

/// `revoke_grant` by the agent that requested it.
pub async fn revoke(
    app: &App,
    caller: &AgentIdentity,
    id: &str,
) -> Result<GrantStatus, GrantError> {
    let grant = own_grant(app, caller, id).await?;
    end_by(app, grant, "revoked by the agent").await
}

/// Revocation by an admin (any grant of the tenant).
pub async fn revoke_as_admin(
    app: &App,
    tenant: &TenantId,
    id: &str,
) -> Result<GrantStatus, GrantError> {
    let grant = store::get(&app.db, tenant, id)
        .await?
        .ok_or_else(|| GrantError::NotFound(id.chars().take(40).collect()))?;
    end_by(app, grant, "revoked by an admin").await
}

async fn end_by(app: &App, grant: Grant, reason: &str) -> Result<GrantStatus, GrantError> {
    let tenant =
        TenantId::parse(&grant.tenant_id).map_err(|_| StoreError::Corrupt("tenant id".into()))?;
    let ended = store::end(
        &app.db,
        &app.audit_key,
        &tenant,
        &grant.id,
        &[GrantState::Pending, GrantState::Active],
        GrantState::Revoked,
        reason,
        app.clock.now_ms(),
    )
    .await?;
    let now = store::get(&app.db, &tenant, &grant.id)
        .await?
        .unwrap_or(grant);
    if !ended {
        return Err(GrantError::AlreadyEnded {
            id: now.id,
            state: now.state.as_str(),
        });
    }
    app.grant_changed.notify_waiters();
    drop(grant_span!("grant.revoked", &now, custodian.reason = %reason));
    app.metrics.grant(&now.tenant_id, "revoked");
    tracing::info!(tenant.id = %tenant, grant.id = %now.id, "grant revoked");
    Ok(GrantStatus::of(&now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_ids_are_128_bit_and_parsed_strictly() {
        let id = GrantId::generate();
        assert_eq!(id.as_str().len(), 3 + 32);
        assert_eq!(GrantId::parse(id.as_str()), Some(id.clone()));
        assert_ne!(GrantId::generate(), id);
        for bad in [
            "gr_",
            "gr_XYZ",
            "xx_0123456789abcdef0123456789abcdef",
            "gr_0123456789ABCDEF0123456789abcdef",
        ] {
            assert_eq!(GrantId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn caps_name_the_field_and_the_limit() {
        assert_eq!(capped("ttl_seconds", None, 900, 300).unwrap(), 300);
        let over = capped("ttl_seconds", Some(7200), 900, 3600)
            .unwrap_err()
            .to_string();
        assert_eq!(
            over,
            "ttl_seconds: 7200 is over this environment's limit of 3600"
        );
        assert!(
            capped("max_uses", Some(0), 10, 5)
                .unwrap_err()
                .to_string()
                .starts_with("max_uses: must be at least 1")
        );
    }
}
