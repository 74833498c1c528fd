//! Live MCP sessions: which agent token opened each, how many each token and tenant hold, and when
//! they end.
//!
//! Guarantees:
//! - A session is bound to the token that opened it (see [`super::auth`]); every lookup is by
//!   session id, in constant time. Nothing on the request path scans all sessions.
//! - One agent token holds at most `server.max_sessions_per_token` sessions and one tenant at most
//!   `server.max_sessions_per_tenant`; a session over either cap is closed as soon as it is made and
//!   the client gets `429` naming the cap.
//! - A session ends on `DELETE`, or after `server.session_idle_timeout_seconds` without a request;
//!   either way its binding and rmcp's session (worker, channels, handle) are released. Sessions
//!   rmcp made that were never bound (a failed `initialize`) are released after a short grace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::transport::streamable_http_server::SessionId;
use rmcp::transport::streamable_http_server::session::SessionManager;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agent_tokens::AgentIdentity;
use crate::config::ServerConfig;
use crate::tenants::TenantId;

/// How long a session rmcp made may stay unbound before it is closed. Binding happens when the
/// `initialize` answer leaves, so this only needs to outlast one `initialize`.
const UNBOUND_GRACE: Duration = Duration::from_secs(10);

/// The live sessions of this replica.
#[derive(Debug)]
pub struct Sessions {
    manager: Arc<LocalSessionManager>,
    idle_timeout: Duration,
    max_per_token: usize,
    max_per_tenant: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    bindings: HashMap<String, Binding>,
    per_token: HashMap<(TenantId, String), usize>,
    per_tenant: HashMap<TenantId, usize>,
    /// Sessions rmcp holds that have no binding, with when the sweeper first saw them.
    unbound: HashMap<String, Instant>,
}

#[derive(Debug)]
struct Binding {
    tenant: TenantId,
    token_id: String,
    last_seen: Instant,
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

impl State {
    /// Removes `session`'s binding and its counts; whether there was one.
    fn unbind(&mut self, session: &str) -> bool {
        let Some(binding) = self.bindings.remove(session) else {
            return false;
        };
        let key = (binding.tenant, binding.token_id);
        decrement(&mut self.per_token, key.clone());
        decrement(&mut self.per_tenant, key.0);
        true
    }
}

fn decrement<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: K) {
    if let std::collections::hash_map::Entry::Occupied(mut entry) = counts.entry(key) {
        *entry.get_mut() -= 1;
        if *entry.get() == 0 {
            entry.remove();
        }
    }
}

impl Sessions {
    pub fn new(config: &ServerConfig) -> Self {
        let mut manager = LocalSessionManager::default();
        manager.session_config.keep_alive = Some(config.session_idle_timeout);
        Self {
            manager: Arc::new(manager),
            idle_timeout: config.session_idle_timeout,
            max_per_token: config.max_sessions_per_token,
            max_per_tenant: config.max_sessions_per_tenant,
            state: Mutex::new(State::default()),
        }
    }

    /// rmcp's session store, which this type keeps in step with the bindings.
    pub fn manager(&self) -> Arc<LocalSessionManager> {
        self.manager.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Looks `session` up for `who` and marks it used. An expired binding is dropped here; rmcp's
    /// side of it is released by the sweeper.
    pub fn check(&self, session: Option<&str>, who: &AgentIdentity) -> SessionCheck {
        let Some(session) = session else {
            return SessionCheck::None;
        };
        let mut state = self.state();
        let now = Instant::now();
        match state.bindings.get_mut(session) {
            Some(b) if now.duration_since(b.last_seen) >= self.idle_timeout => {
                state.unbind(session);
                SessionCheck::Foreign
            }
            Some(b) if b.tenant == who.tenant && b.token_id == who.token_id => {
                b.last_seen = now;
                SessionCheck::Known
            }
            _ => SessionCheck::Foreign,
        }
    }

    /// Binds a session rmcp just made to `who`, unless that takes the token or tenant over its cap.
    pub fn bind(&self, session: &str, who: &AgentIdentity) -> Result<(), SessionLimit> {
        let mut state = self.state();
        let token_key = (who.tenant.clone(), who.token_id.clone());
        if state.per_token.get(&token_key).copied().unwrap_or(0) >= self.max_per_token {
            return Err(SessionLimit::Token(self.max_per_token));
        }
        if state.per_tenant.get(&who.tenant).copied().unwrap_or(0) >= self.max_per_tenant {
            return Err(SessionLimit::Tenant(self.max_per_tenant));
        }
        let previous = state.bindings.insert(
            session.to_owned(),
            Binding {
                tenant: who.tenant.clone(),
                token_id: who.token_id.clone(),
                last_seen: Instant::now(),
            },
        );
        debug_assert!(previous.is_none(), "rmcp reused a session id");
        *state.per_token.entry(token_key).or_default() += 1;
        *state.per_tenant.entry(who.tenant.clone()).or_default() += 1;
        state.unbound.remove(session);
        Ok(())
    }

    /// Ends a session: its binding and rmcp's session.
    pub async fn close(&self, session: &str) {
        self.state().unbind(session);
        self.close_transport(session).await;
    }

    /// Forgets the binding of a session rmcp already closed (an answered `DELETE`).
    pub fn forget(&self, session: &str) {
        self.state().unbind(session);
    }

    async fn close_transport(&self, session: &str) {
        let id: SessionId = session.into();
        if let Err(e) = self.manager.close_session(&id).await {
            tracing::debug!(error = %e, "closing an MCP session failed");
        }
    }

    /// Bound sessions.
    pub fn len(&self) -> usize {
        self.state().bindings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions rmcp holds (bound or not).
    pub async fn transport_len(&self) -> usize {
        self.manager.sessions.read().await.len()
    }

    /// Releases expired sessions and sessions rmcp made that were never bound.
    pub async fn sweep(&self) {
        let held: Vec<String> = self
            .manager
            .sessions
            .read()
            .await
            .keys()
            .map(|id| id.to_string())
            .collect();
        let now = Instant::now();
        let mut to_close = Vec::new();
        {
            let mut state = self.state();
            let expired: Vec<String> = state
                .bindings
                .iter()
                .filter(|(_, b)| now.duration_since(b.last_seen) >= self.idle_timeout)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &expired {
                state.unbind(id);
            }
            let mut unbound = HashMap::new();
            for id in held {
                if state.bindings.contains_key(&id) {
                    continue;
                }
                let first_seen = state.unbound.get(&id).copied().unwrap_or(now);
                if now.duration_since(first_seen) >= UNBOUND_GRACE || expired.contains(&id) {
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

    fn config(per_token: usize, per_tenant: usize) -> ServerConfig {
        let mut config = crate::config::Config::from_toml("", std::iter::empty())
            .expect("defaults are valid")
            .server;
        config.max_sessions_per_token = per_token;
        config.max_sessions_per_tenant = per_tenant;
        config
    }

    fn who(tenant: &str, token: &str) -> AgentIdentity {
        AgentIdentity {
            tenant: TenantId::parse(tenant).expect("valid tenant"),
            token_id: token.to_owned(),
            token_name: token.to_owned(),
        }
    }

    #[test]
    fn caps_count_per_token_and_per_tenant_and_free_up_on_unbind() {
        let sessions = Sessions::new(&config(2, 3));
        let (a1, a2, b1) = (who("acme", "a1"), who("acme", "a2"), who("beta", "b1"));
        sessions.bind("s1", &a1).unwrap();
        sessions.bind("s2", &a1).unwrap();
        assert_eq!(sessions.bind("s3", &a1), Err(SessionLimit::Token(2)));
        sessions.bind("s3", &a2).unwrap();
        assert_eq!(sessions.bind("s4", &a2), Err(SessionLimit::Tenant(3)));
        sessions.bind("s4", &b1).unwrap();
        assert_eq!(sessions.check(Some("s1"), &a1), SessionCheck::Known);
        assert_eq!(sessions.check(Some("s1"), &a2), SessionCheck::Foreign);
        assert_eq!(sessions.check(Some("s1"), &b1), SessionCheck::Foreign);
        sessions.forget("s1");
        assert_eq!(sessions.check(Some("s1"), &a1), SessionCheck::Foreign);
        sessions.bind("s5", &a1).unwrap();
        assert_eq!(sessions.len(), 4);
        for id in ["s2", "s3", "s4", "s5"] {
            sessions.forget(id);
        }
        let state = sessions.state();
        assert!(state.bindings.is_empty() && state.per_token.is_empty());
        assert!(state.per_tenant.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sessions_expire() {
        let mut config = config(8, 8);
        config.session_idle_timeout = Duration::from_secs(60);
        let sessions = Sessions::new(&config);
        let a = who("acme", "a");
        sessions.bind("old", &a).unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        sessions.bind("new", &a).unwrap();
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(sessions.check(Some("new"), &a), SessionCheck::Known);
        sessions.sweep().await;
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions.check(Some("old"), &a), SessionCheck::Foreign);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(sessions.check(Some("new"), &a), SessionCheck::Foreign);
        assert!(sessions.state().per_token.is_empty());
    }
}
