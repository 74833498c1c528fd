//! MCP sessions: which agent token opened each, how many each token and tenant hold, and when
//! they end — shared by every replica through the database, so that any replica serves any
//! session and a replica's loss ends none.
//!
//! A session is a row of `mcp_sessions` (SHA-256 of its id, tenant, owning token, the client's
//! `initialize` params, last use). A replica that gets a request for a session it does not hold in
//! memory re-creates it from that row: rmcp's session store replays the stored `initialize` into a
//! fresh local worker, sending nothing to the client. Server→client streams belong to the replica
//! that serves them; see [`manager`] for how resuming one elsewhere behaves.
//!
//! Guarantees:
//! - A session is bound to the token that opened it (see [`super::auth`]), on every replica: a
//!   session id presented with another token or in another tenant is an unknown session, and
//!   touches nothing of the session.
//! - One agent token holds at most `server.max_sessions_per_token` live sessions and one tenant at
//!   most `server.max_sessions_per_tenant`, counted in the database across replicas; a session over
//!   either cap is closed as soon as it is made and the client gets `429` naming the cap.
//! - A session ends on `DELETE` (at once on the replica that answers it, and within
//!   [`CONFIRM_INTERVAL_MS`] on the others), or after `server.session_idle_timeout_seconds`
//!   without a request on any replica; its row, binding and rmcp's workers are released. Sessions
//!   rmcp made that were never bound (a failed `initialize`) are released after a short grace.
//! - The database keeps no session id, only its hash; the `initialize` params hold no secret.
//!
//! A replica trusts its own record of a session for [`CONFIRM_INTERVAL_MS`] after the database last
//! confirmed it (and refreshed its last use), so a busy session costs one write a second, not one
//! per request.

pub mod manager;
mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::transport::streamable_http_server::SessionId;
use rmcp::transport::streamable_http_server::session::SessionManager;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::{
    SessionState, SessionStore, SessionStoreError,
};
use tokio_util::sync::CancellationToken;

use crate::agent_tokens::AgentIdentity;
use crate::clock::{Clock, UnixMillis};
use crate::config::ServerConfig;
use crate::store::{Db, StoreError};
use crate::tenants::TenantId;
use manager::ReplicaSessionManager;

/// How long a session rmcp made may stay unbound before it is closed. Binding happens when the
/// `initialize` answer leaves, so this only needs to outlast one `initialize`.
const UNBOUND_GRACE_MS: UnixMillis = 10_000;

/// How long a replica serves a session on its own record before asking the database again.
pub const CONFIRM_INTERVAL_MS: UnixMillis = 1_000;

/// The sessions this replica serves, over the sessions of all replicas in the database.
#[derive(Debug)]
pub struct Sessions {
    manager: Arc<ReplicaSessionManager>,
    db: Db,
    clock: Arc<dyn Clock>,
    idle_timeout: Duration,
    max_per_token: usize,
    max_per_tenant: usize,
    state: Mutex<State>,
    /// Serializes this replica's inserts (the database serializes those of several replicas).
    bind_lock: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct State {
    bindings: HashMap<String, Binding>,
    /// Sessions rmcp holds that have no binding, with when the sweeper first saw them.
    unbound: HashMap<String, UnixMillis>,
    /// `initialize` params rmcp handed over for a session not bound yet, with when.
    handshakes: HashMap<String, (SessionState, UnixMillis)>,
}

#[derive(Debug)]
struct Binding {
    tenant: TenantId,
    token_id: String,
    /// When the database last confirmed the session live (and recorded its use).
    confirmed_at: UnixMillis,
}

impl Binding {
    fn owned_by(&self, who: &AgentIdentity) -> bool {
        self.tenant == who.tenant && self.token_id == who.token_id
    }
}

/// What a request's session id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionCheck {
    /// No session id: an `initialize` or a stateless (2026-07-28) request.
    None,
    /// A live session of this caller.
    Known,
    /// Unknown, expired, or another caller's.
    Foreign,
}

/// A session refused because its token or tenant holds too many.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionLimit {
    #[error(
        "this agent token already holds {0} open MCP sessions (the limit); end unused ones with \
         HTTP DELETE or let idle ones expire"
    )]
    Token(usize),
    #[error(
        "this tenant already holds {0} open MCP sessions (the limit); end unused ones with HTTP \
         DELETE or let idle ones expire"
    )]
    Tenant(usize),
}

/// Why a new session was not bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(transparent)]
    Limit(#[from] SessionLimit),
    #[error("rmcp handed over no initialize params for the new session")]
    NoHandshake,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Sessions {
    pub fn new(config: &ServerConfig, db: Db, clock: Arc<dyn Clock>) -> Self {
        let mut local = LocalSessionManager::default();
        local.session_config.keep_alive = Some(config.session_idle_timeout);
        Self {
            manager: Arc::new(ReplicaSessionManager::new(local)),
            db,
            clock,
            idle_timeout: config.session_idle_timeout,
            max_per_token: config.max_sessions_per_token,
            max_per_tenant: config.max_sessions_per_tenant,
            state: Mutex::new(State::default()),
            bind_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// rmcp's session manager for this replica, which this type keeps in step with the bindings.
    pub fn manager(&self) -> Arc<ReplicaSessionManager> {
        self.manager.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rows last seen at or before this instant have expired.
    fn expired_at(&self, now: UnixMillis) -> UnixMillis {
        now - i64::try_from(self.idle_timeout.as_millis()).unwrap_or(i64::MAX / 2)
    }

    /// Looks `session` up for `who` and records its use. A session this replica does not know is
    /// looked up in the database (another replica made it); one the database no longer has (ended
    /// elsewhere, or expired) is released here.
    pub async fn check(
        &self,
        session: Option<&str>,
        who: &AgentIdentity,
    ) -> Result<SessionCheck, StoreError> {
        let Some(session) = session else {
            return Ok(SessionCheck::None);
        };
        let now = self.clock.now_ms();
        if let Some(binding) = self.state().bindings.get(session) {
            if !binding.owned_by(who) {
                return Ok(SessionCheck::Foreign);
            }
            if now - binding.confirmed_at < CONFIRM_INTERVAL_MS {
                return Ok(SessionCheck::Known);
            }
        }
        let live = store::touch(
            &self.db,
            &store::id_hash(session),
            who,
            now,
            self.expired_at(now),
        )
        .await?;
        if live {
            self.state().bindings.insert(
                session.to_owned(),
                Binding {
                    tenant: who.tenant.clone(),
                    token_id: who.token_id.clone(),
                    confirmed_at: now,
                },
            );
            return Ok(SessionCheck::Known);
        }
        // Only the owner's own binding is released: another caller cannot end a session.
        let released = {
            let mut state = self.state();
            let owned = state.bindings.get(session).is_some_and(|b| b.owned_by(who));
            owned && state.bindings.remove(session).is_some()
        };
        if released {
            self.close_transport(session).await;
        }
        Ok(SessionCheck::Foreign)
    }

    /// Binds a session rmcp just made to `who`, unless that takes the token or tenant over its cap.
    pub async fn bind(&self, session: &str, who: &AgentIdentity) -> Result<(), BindError> {
        let handshake = self.state().handshakes.remove(session);
        let (handshake, _) = handshake.ok_or(BindError::NoHandshake)?;
        let initialize = serde_json::to_string(&handshake.initialize_params)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let now = self.clock.now_ms();
        let hash = store::id_hash(session);
        let row = store::NewSession {
            id_hash: &hash,
            owner: who,
            initialize: &initialize,
            now,
            expired_at: self.expired_at(now),
            max_per_token: self.max_per_token,
            max_per_tenant: self.max_per_tenant,
        };
        {
            let _serial = self.bind_lock.lock().await;
            store::insert_within_caps(&self.db, &row).await??;
        }
        let mut state = self.state();
        state.bindings.insert(
            session.to_owned(),
            Binding {
                tenant: who.tenant.clone(),
                token_id: who.token_id.clone(),
                confirmed_at: now,
            },
        );
        state.unbound.remove(session);
        Ok(())
    }

    /// Closes a session this replica just made and did not bind.
    pub async fn close(&self, session: &str) {
        {
            let mut state = self.state();
            state.bindings.remove(session);
            state.handshakes.remove(session);
        }
        self.close_transport(session).await;
    }

    /// Forgets this replica's binding of a session rmcp already ended (an answered `DELETE`,
    /// which also deleted its row).
    pub fn forget(&self, session: &str) {
        self.state().bindings.remove(session);
    }

    async fn close_transport(&self, session: &str) {
        let id: SessionId = session.into();
        if let Err(e) = self.manager.close_session(&id).await {
            tracing::debug!(error = %e, "closing an MCP session failed");
        }
    }

    /// Sessions bound on this replica.
    pub fn len(&self) -> usize {
        self.state().bindings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions rmcp holds on this replica (bound or not).
    pub async fn transport_len(&self) -> usize {
        self.manager.local().sessions.read().await.len()
    }

    /// Deletes expired sessions from the database, and releases this replica's workers of
    /// sessions it has not served for the idle timeout and of sessions rmcp made that were never
    /// bound.
    pub async fn sweep(&self) {
        let now = self.clock.now_ms();
        let expired_at = self.expired_at(now);
        match store::delete_expired(&self.db, expired_at).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(sessions.expired = n, "deleted expired MCP sessions"),
            Err(e) => tracing::warn!(error = %e, "deleting expired MCP sessions failed"),
        }
        let held: Vec<String> = self
            .manager
            .local()
            .sessions
            .read()
            .await
            .keys()
            .map(|id| id.to_string())
            .collect();
        let mut to_close = Vec::new();
        {
            let mut state = self.state();
            state.bindings.retain(|id, b| {
                let idle = b.confirmed_at <= expired_at;
                if idle {
                    to_close.push(id.clone());
                }
                !idle
            });
            state
                .handshakes
                .retain(|_, (_, at)| now - *at < UNBOUND_GRACE_MS);
            let mut unbound = HashMap::new();
            for id in held {
                if state.bindings.contains_key(&id) || to_close.contains(&id) {
                    continue;
                }
                let first_seen = state.unbound.get(&id).copied().unwrap_or(now);
                if now - first_seen >= UNBOUND_GRACE_MS {
                    to_close.push(id);
                } else {
                    unbound.insert(id, first_seen);
                }
            }
            state.unbound = unbound;
        }
        for id in &to_close {
            self.close_transport(id).await;
        }
        if !to_close.is_empty() {
            tracing::debug!(
                sessions.closed = to_close.len(),
                "released idle MCP sessions"
            );
        }
    }

    /// How often the sweeper runs: a quarter of the idle timeout, between 250 ms and a minute.
    fn sweep_interval(&self) -> Duration {
        (self.idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(60))
    }
}

/// rmcp's session store: what a replica needs to re-create a session it does not hold. rmcp asks
/// only after [`super::auth`] has checked the session against the caller ([`Sessions::check`]).
#[async_trait::async_trait]
impl SessionStore for Sessions {
    async fn load(&self, session_id: &str) -> Result<Option<SessionState>, SessionStoreError> {
        let expired_at = self.expired_at(self.clock.now_ms());
        let Some(json) =
            store::initialize_params(&self.db, &store::id_hash(session_id), expired_at).await?
        else {
            return Ok(None);
        };
        Ok(Some(SessionState::new(serde_json::from_str(&json)?)))
    }

    /// Called once a new session's `initialize` succeeded; the row is written by
    /// [`Sessions::bind`], which knows the owner and enforces the caps.
    async fn store(&self, session_id: &str, state: &SessionState) -> Result<(), SessionStoreError> {
        let now = self.clock.now_ms();
        self.state()
            .handshakes
            .insert(session_id.to_owned(), (state.clone(), now));
        Ok(())
    }

    /// An answered `DELETE`: the session ends on every replica.
    async fn delete(&self, session_id: &str) -> Result<(), SessionStoreError> {
        store::delete(&self.db, &store::id_hash(session_id)).await?;
        Ok(())
    }
}

/// Runs [`Sessions::sweep`] until `shutdown`.
pub fn spawn_sweeper(
    app: Arc<crate::app::App>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(app.sessions.sweep_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => app.sessions.sweep().await,
                () = shutdown.cancelled() => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::OffsetClock;
    use rmcp::model::{ClientCapabilities, Implementation, InitializeRequestParams};

    fn config(per_token: usize, per_tenant: usize) -> ServerConfig {
        let mut config = crate::config::Config::from_toml("", std::iter::empty())
            .expect("defaults are valid")
            .server;
        config.max_sessions_per_token = per_token;
        config.max_sessions_per_tenant = per_tenant;
        config.session_idle_timeout = Duration::from_secs(60);
        config
    }

    fn who(tenant: &str, token: &str) -> AgentIdentity {
        AgentIdentity {
            tenant: TenantId::parse(tenant).expect("valid tenant"),
            token_id: token.to_owned(),
            token_name: token.to_owned(),
        }
    }

    /// A database with tenants `acme` and `beta`.
    async fn db(dir: &tempfile::TempDir) -> Db {
        let db = Db::connect(
            &format!("sqlite://{}", dir.path().join("s.db").display()),
            4,
        )
        .await
        .unwrap();
        db.migrate().await.unwrap();
        for tenant in ["acme", "beta"] {
            let id = TenantId::parse(tenant).unwrap();
            crate::tenants::create(&db, &id, tenant, None, 0)
                .await
                .unwrap();
        }
        db
    }

    /// What rmcp does for a new session, then what the auth middleware does.
    async fn open(sessions: &Sessions, id: &str, owner: &AgentIdentity) -> Result<(), BindError> {
        let params = InitializeRequestParams::new(
            ClientCapabilities::default(),
            Implementation::new("test", "1"),
        );
        SessionStore::store(sessions, id, &SessionState::new(params))
            .await
            .unwrap();
        sessions.bind(id, owner).await
    }

    fn limit(result: Result<(), BindError>) -> Option<SessionLimit> {
        match result {
            Err(BindError::Limit(limit)) => Some(limit),
            _ => None,
        }
    }

    #[tokio::test]
    async fn caps_count_per_token_and_per_tenant_across_replicas() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(&dir).await;
        let clock = OffsetClock::new();
        let one = Sessions::new(&config(2, 3), db.clone(), clock.clone());
        let two = Sessions::new(&config(2, 3), db.clone(), clock.clone());
        let (a1, a2, b1) = (who("acme", "a1"), who("acme", "a2"), who("beta", "b1"));
        open(&one, "s1", &a1).await.unwrap();
        open(&two, "s2", &a1).await.unwrap();
        assert_eq!(
            limit(open(&one, "s3", &a1).await),
            Some(SessionLimit::Token(2))
        );
        open(&two, "s3", &a2).await.unwrap();
        assert_eq!(
            limit(open(&one, "s4", &a2).await),
            Some(SessionLimit::Tenant(3))
        );
        open(&one, "s4", &b1).await.unwrap();
        // Each replica serves each session to its owner, and to no one else.
        for replica in [&one, &two] {
            for (id, owner) in [("s1", &a1), ("s2", &a1), ("s3", &a2), ("s4", &b1)] {
                assert_eq!(
                    replica.check(Some(id), owner).await.unwrap(),
                    SessionCheck::Known
                );
                for other in [&a1, &a2, &b1].into_iter().filter(|o| *o != owner) {
                    let seen = replica.check(Some(id), other).await.unwrap();
                    assert_eq!(seen, SessionCheck::Foreign, "{id} for {other:?}");
                }
            }
        }
        // Ending a session (rmcp's DELETE) frees its place everywhere.
        SessionStore::delete(&two, "s1").await.unwrap();
        two.forget("s1");
        open(&one, "s5", &a1).await.unwrap();
        assert_eq!(
            two.check(Some("s1"), &a1).await.unwrap(),
            SessionCheck::Foreign
        );
        // The other replica trusts its record for the confirm interval, then lets it go.
        clock.advance(CONFIRM_INTERVAL_MS / 1000);
        assert_eq!(
            one.check(Some("s1"), &a1).await.unwrap(),
            SessionCheck::Foreign
        );
        assert!(!one.state().bindings.contains_key("s1"));
    }

    #[tokio::test]
    async fn idle_sessions_expire_unless_another_replica_used_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(&dir).await;
        let clock = OffsetClock::new();
        let one = Sessions::new(&config(8, 8), db.clone(), clock.clone());
        let two = Sessions::new(&config(8, 8), db.clone(), clock.clone());
        let a = who("acme", "a");
        open(&one, "old", &a).await.unwrap();
        open(&one, "busy", &a).await.unwrap();
        clock.advance(45);
        // `busy` is used on the other replica only.
        assert_eq!(
            two.check(Some("busy"), &a).await.unwrap(),
            SessionCheck::Known
        );
        clock.advance(20);
        one.sweep().await;
        assert_eq!(
            one.len(),
            0,
            "this replica has not served either for the idle timeout"
        );
        assert_eq!(
            one.check(Some("old"), &a).await.unwrap(),
            SessionCheck::Foreign
        );
        assert_eq!(
            one.check(Some("busy"), &a).await.unwrap(),
            SessionCheck::Known
        );
        assert!(SessionStore::load(&one, "old").await.unwrap().is_none());
        assert!(SessionStore::load(&one, "busy").await.unwrap().is_some());
        clock.advance(61);
        two.sweep().await;
        assert_eq!(
            two.check(Some("busy"), &a).await.unwrap(),
            SessionCheck::Foreign
        );
        let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM mcp_sessions")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(rows, 0);
    }
}
