//! The gateway's shared state and its server loop.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::audit::AuditKey;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::grants::Limits;
use crate::http::sessions::Sessions;
use crate::keys::MasterKey;
use crate::oidc::Oidc;
use crate::runners::Dispatcher;
use crate::runners::tls::ClientMaterial;
use crate::store::Db;

/// Everything a request handler may need, shared as `Arc<App>`.
#[derive(Debug)]
pub struct App {
    /// Validated configuration.
    pub config: Config,
    /// The database (SQLite or PostgreSQL).
    pub db: Db,
    /// The one source of time.
    pub clock: Arc<dyn Clock>,
    /// The MCP sessions this replica serves (all replicas' are in the database).
    pub sessions: Arc<Sessions>,
    /// Protects secrets at rest (device codes now, secret values later).
    pub master_key: MasterKey,
    /// The device-flow client for every tenant's IdP.
    pub oidc: Oidc,
    /// Per-token rate limits of grant requests and waits.
    pub limits: Limits,
    /// Signalled whenever this replica changes a grant's state (wakes `grant_status` waits).
    pub grant_changed: tokio::sync::Notify,
    /// Signalled when new pending work exists (wakes the poller).
    pub poller_wake: tokio::sync::Notify,
    /// This replica's name in polling leases.
    pub instance_id: String,
    /// Sends execs to runners over mTLS.
    pub dispatcher: Dispatcher,
    /// MACs the audit chain (a dedicated key, or one derived from the master key).
    pub audit_key: AuditKey,
    /// OTLP metrics (recording into nothing unless export is configured).
    pub metrics: crate::metrics::Metrics,
    /// OAuth access tokens minted for runs, cached per grant, and the client that mints them.
    pub oauth_tokens: crate::credentials::oauth::Tokens,
    /// Verified tokens and environment listings, kept in step with every replica's changes.
    pub caches: crate::cache::Caches,
    /// Writes finished after their answer was sent (a run's outcome record); shutdown waits for them.
    pub background: Background,
}

impl App {
    pub fn new(config: Config, db: Db, clock: Arc<dyn Clock>, master_key: MasterKey) -> Self {
        let sessions = Arc::new(Sessions::new(&config.server, db.clone(), clock.clone()));
        let runners = &config.runners;
        let material = match (&runners.ca_file, &runners.cert_file, &runners.key_file) {
            (Some(ca), Some(cert), Some(key)) => match ClientMaterial::load(ca, cert, key) {
                Ok(material) => Some(material),
                Err(e) => {
                    tracing::error!(error = %e, "runner TLS material unusable; `run` will be refused");
                    None
                }
            },
            _ => None,
        };
        let dispatcher = Dispatcher::new(runners.trust_domain.clone(), material);
        // The key derived from the master key; `from_config` replaces it with a dedicated one when
        // `secrets.audit_key_file` is set.
        let audit_key = AuditKey::derived_from(&master_key);
        Self {
            audit_key,
            metrics: crate::metrics::Metrics::default(),
            oauth_tokens: crate::credentials::oauth::Tokens::new(),
            caches: crate::cache::Caches::default(),
            background: Background::default(),
            dispatcher,
            config,
            db,
            clock,
            sessions,
            master_key,
            oidc: Oidc::new(),
            limits: Limits::default(),
            grant_changed: tokio::sync::Notify::new(),
            poller_wake: tokio::sync::Notify::new(),
            instance_id: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// Connects to and migrates the configured database, with the wall clock. The master key is
    /// read from the configured file or from `env`.
    pub async fn from_config(
        config: Config,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let master_key = MasterKey::load(
            config.secrets.master_key_file.as_deref(),
            &config.secrets.master_key_env,
            env,
        )?;
        let audit_key = match &config.secrets.audit_key_file {
            Some(file) => Some(AuditKey::load(file).context("loading the audit key")?),
            None => None,
        };
        let db = Db::connect(&config.database.url, config.database.max_connections)
            .await
            .context("connecting to the database")?;
        db.migrate().await.context("migrating the database")?;
        let mut app = Self::new(config, db, Arc::new(SystemClock), master_key);
        if let Some(key) = audit_key {
            app.audit_key = key;
        }
        Ok(app)
    }

    /// Wakes the poller for new pending work.
    pub fn poke_poller(&self) {
        self.poller_wake.notify_one();
    }
}

/// Tasks that finish work after its answer was sent. Each holds a read lock until it ends; draining
/// takes the write lock, which waits for all of them (tokio's lock is fair: no task starts after).
#[derive(Debug, Default, Clone)]
pub struct Background(Arc<tokio::sync::RwLock<()>>);

impl Background {
    /// Runs `work` in a task of its own that shutdown waits for (once draining has begun, the
    /// task still runs, unwaited).
    pub fn spawn(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        let held = Arc::clone(&self.0).try_read_owned().ok();
        tokio::spawn(async move {
            let _held = held;
            work.await;
        });
    }

    /// Waits until every task spawned so far has ended.
    pub async fn drain(&self) {
        let _all = self.0.write().await;
    }
}

/// A bound, running gateway.
pub struct Server {
    pub local_addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds the configured address and starts serving in the background.
    pub async fn start(app: Arc<App>) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(app.config.server.listen)
            .await
            .with_context(|| format!("binding {}", app.config.server.listen))?;
        Self::start_on(app, listener)
    }

    /// Serves on an already bound listener (tests bind port 0).
    pub fn start_on(app: Arc<App>, listener: tokio::net::TcpListener) -> anyhow::Result<Self> {
        let local_addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let poller = crate::grants::poller::spawn(app.clone(), shutdown.child_token());
        let router = crate::http::router(app.clone(), shutdown.child_token())
            .layer(tower_http::trace::TraceLayer::new_for_http());
        let sweeper = crate::http::sessions::spawn_sweeper(app.clone(), shutdown.child_token());
        let reaper = crate::credentials::lease::spawn(app.clone(), shutdown.child_token());
        let limits = crate::http::serve::Limits::from_config(&app.config.server);
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            crate::http::serve::serve(listener, router, limits, stop).await;
            let _ = poller.await;
            let _ = sweeper.await;
            let _ = reaper.await;
            app.background.drain().await;
        });
        Ok(Self {
            local_addr,
            shutdown,
            task,
        })
    }

    /// Stops accepting connections, ends open MCP streams, and waits up to `grace` for requests in
    /// flight.
    pub async fn shutdown(self, grace: std::time::Duration) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match tokio::time::timeout(grace, self.task).await {
            Ok(joined) => joined.context("server task panicked"),
            Err(_) => {
                tracing::warn!(
                    "requests still running after the shutdown grace period; dropping them"
                );
                Ok(())
            }
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
