//! Test harness: a gateway on a fresh database (SQLite file or a new PostgreSQL database), served on
//! a loopback port, with helpers to seed tenants and talk HTTP.

use std::sync::Arc;

use custodian::agent_tokens;
use custodian::app::{App, Server};
use custodian::clock::{Clock, OffsetClock};
use custodian::config::Config;
use custodian::environments::{self, Policy};
use custodian::keys::MasterKey;
use custodian::store::Db;
use custodian::tenants::{self, TenantId};
use secrecy::{ExposeSecret, SecretString};

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Base URL of the PostgreSQL server for tests (trust auth).
fn pg_base() -> String {
    std::env::var("CUSTODIAN_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A fresh, empty database; dropped (PostgreSQL) or deleted (SQLite) with this value.
pub struct TestDb {
    pub url: String,
    /// The master key every gateway on this database uses (base64).
    pub master_key: String,
    pg_name: Option<String>,
    _dir: tempfile::TempDir,
}

impl TestDb {
    /// Runs `custodian admin ARGS` on this database as another process would (another replica's
    /// admin), and fails the test if it fails.
    pub fn admin(&self, args: &[&str]) {
        let config = self._dir.path().join("admin.toml");
        std::fs::write(&config, format!("[database]\nurl = \"{}\"\n", self.url)).expect("config");
        let mut all = vec!["admin", "--config", config.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        let done = crate::processes::custodian(&all, &[("CUSTODIAN_MASTER_KEY", &self.master_key)]);
        assert!(
            done.status.success(),
            "custodian admin {args:?}: {}",
            String::from_utf8_lossy(&done.stderr)
        );
    }

    /// Creates a fresh database, or `None` when PostgreSQL is unreachable outside CI (in CI, where
    /// `CI=true`, a missing PostgreSQL fails the test).
    pub async fn new(backend: Backend) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        match backend {
            Backend::Sqlite => Some(Self {
                url: format!("sqlite://{}", dir.path().join("custodian.db").display()),
                master_key: MasterKey::generate().to_base64().to_string(),
                pg_name: None,
                _dir: dir,
            }),
            Backend::Postgres => {
                let name = format!("custodian_test_{}", uuid::Uuid::new_v4().simple());
                let admin = match Db::connect(&format!("{}/postgres", pg_base()), 1).await {
                    Ok(db) => db,
                    Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                        eprintln!("skipping PostgreSQL half of the test: {e}");
                        return None;
                    }
                    Err(e) => panic!("PostgreSQL is required in CI: {e}"),
                };
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(admin.pool())
                    .await
                    .expect("create test database");
                admin.close().await;
                Some(Self {
                    url: format!("{}/{name}", pg_base()),
                    master_key: MasterKey::generate().to_base64().to_string(),
                    pg_name: Some(name),
                    _dir: dir,
                })
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        // Drop runs inside a runtime; do the async clean-up on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(admin) = Db::connect(&format!("{}/postgres", pg_base()), 1).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(admin.pool())
                    .await;
                    admin.close().await;
                }
            });
        })
        .join();
    }
}

/// A running gateway on a fresh database.
pub struct TestApp {
    pub app: Arc<App>,
    pub clock: Arc<OffsetClock>,
    pub base_url: String,
    server: Option<Server>,
    database: Arc<TestDb>,
}

/// Builder for [`TestApp`].
pub struct TestAppBuilder {
    backend: Backend,
    database: Option<Arc<TestDb>>,
    extra_toml: String,
    max_output_bytes: usize,
    server_toml: String,
    metrics: Option<custodian::metrics::Metrics>,
}

impl TestApp {
    pub fn builder(backend: Backend) -> TestAppBuilder {
        TestAppBuilder {
            backend,
            database: None,
            extra_toml: String::new(),
            max_output_bytes: 4096,
            server_toml: String::new(),
            metrics: None,
        }
    }

    pub fn db(&self) -> &Db {
        &self.app.db
    }

    /// The database this gateway runs on, to start another gateway on it.
    pub fn database(&self) -> Arc<TestDb> {
        self.database.clone()
    }

    /// Creates a tenant that approves grants at `issuer` as client `custodian`.
    pub async fn tenant_with_idp(&self, id: &str, issuer: &str) -> TenantId {
        let tenant = self.tenant(id).await;
        tenants::set_idp(
            self.db(),
            &tenant,
            &tenants::IdpSettings {
                issuer: issuer.to_owned(),
                client_id: "custodian".to_owned(),
                client_secret: None,
                scopes: "openid email groups".to_owned(),
                approver_claim: "email".to_owned(),
                groups_claim: "groups".to_owned(),
            },
            self.clock.now(),
        )
        .await
        .expect("set idp");
        tenant
    }

    /// Creates an environment with the given policy.
    pub async fn environment_with(&self, tenant: &TenantId, name: &str, policy: &Policy) {
        environments::create(
            self.db(),
            tenant,
            name,
            &format!("{name} environment"),
            &["API_KEY".to_owned()],
            policy,
            self.clock.now(),
        )
        .await
        .expect("create environment");
    }

    pub fn mcp_url(&self, tenant: &str) -> String {
        format!("{}/t/{tenant}/mcp", self.base_url)
    }

    /// Creates a tenant with an issuer.
    pub async fn tenant(&self, id: &str) -> TenantId {
        let tenant = TenantId::parse(id).expect("valid tenant id");
        tenants::create(
            self.db(),
            &tenant,
            &format!("Tenant {id}"),
            Some(&format!("https://idp.{id}.example.com")),
            self.clock.now(),
        )
        .await
        .expect("create tenant");
        tenant
    }

    /// Creates an environment with default policy and the given secret names.
    pub async fn environment(&self, tenant: &TenantId, name: &str, secrets: &[&str]) {
        let secrets: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
        environments::create(
            self.db(),
            tenant,
            name,
            &format!("{name} environment"),
            &secrets,
            &Policy::default(),
            self.clock.now(),
        )
        .await
        .expect("create environment");
    }

    /// Creates an agent token and returns its id and value.
    pub async fn token_with_id(&self, tenant: &TenantId, name: &str) -> (String, String) {
        let (token, secret) = agent_tokens::create(self.db(), tenant, name, self.clock.now())
            .await
            .expect("create token");
        (token.id, secret.expose_secret().to_owned())
    }

    /// Stores an already approved grant for `token_id` (tests of what happens after approval).
    pub async fn active_grant(
        &self,
        tenant: &TenantId,
        token_id: &str,
        env: &str,
        max_uses: i64,
        ttl: i64,
    ) -> String {
        use custodian::grants::{GrantId, store};
        let id = GrantId::generate();
        let now_ms = self.clock.now_ms();
        store::insert(
            self.db(),
            &self.app.audit_key,
            &store::NewGrant {
                tenant,
                id: &id,
                environment: env,
                agent_token_id: token_id,
                agent_name: "codex",
                purpose: "test",
                ttl_seconds: ttl,
                max_uses,
                expires_at: self.clock.now() + 600,
                user_code: "TEST-CODE",
                verification_uri: "https://idp.example/device",
                verification_uri_complete: None,
                device_code_sealed: "not-used",
                poll_interval_ms: 3_600_000,
                trace_context: None,
                requester: None,
            },
            now_ms,
        )
        .await
        .expect("insert grant");
        let approver = custodian::oidc::Approver {
            subject: "alice".into(),
            name: Some("alice@example.com".into()),
            email: Some("alice@example.com".into()),
            groups: vec![],
            auth_time: Some(self.clock.now()),
            acr: None,
            amr: vec![],
        };
        assert!(
            store::approve(
                self.db(),
                &self.app.audit_key,
                tenant,
                id.as_str(),
                &approver,
                now_ms
            )
            .await
            .expect("approve")
        );
        id.as_str().to_owned()
    }

    /// Creates an agent token and returns its value.
    pub async fn token(&self, tenant: &TenantId, name: &str) -> String {
        let (_, secret) = agent_tokens::create(self.db(), tenant, name, self.clock.now())
            .await
            .expect("create token");
        secret.expose_secret().to_owned()
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server
                .shutdown(std::time::Duration::from_secs(5))
                .await
                .expect("clean shutdown");
        }
    }
}

impl TestAppBuilder {
    /// Records metrics with these instruments.
    pub fn metrics(mut self, metrics: custodian::metrics::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Configures mTLS towards runners.
    pub fn runner_tls(
        mut self,
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Self {
        self.extra_toml = format!(
            "\n[runners]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nmax_output_bytes = {}\n",
            ca.display(),
            cert.display(),
            key.display(),
            self.max_output_bytes
        );
        self
    }

    /// Output kept per stream of a run (default 4096); call before [`Self::runner_tls`].
    pub fn max_output_bytes(mut self, bytes: usize) -> Self {
        self.max_output_bytes = bytes;
        self
    }

    /// Adds keys to the `[server]` section.
    pub fn server_toml(mut self, toml: &str) -> Self {
        self.server_toml.push_str(toml);
        self.server_toml.push('\n');
        self
    }

    /// Shares the database of another test gateway (restarts, several replicas).
    pub fn on_database(mut self, database: Arc<TestDb>) -> Self {
        self.database = Some(database);
        self
    }

    pub async fn start(self) -> Option<TestApp> {
        let db = match self.database {
            Some(db) => db,
            None => Arc::new(TestDb::new(self.backend).await?),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let toml = format!(
            "[server]\nlisten = \"{addr}\"\npublic_url = \"http://{addr}\"\n{}\n[database]\nurl = \"{}\"\nmax_connections = 5\n{}",
            self.server_toml, db.url, self.extra_toml
        );
        let config = Config::from_toml(&toml, std::iter::empty()).expect("valid test config");
        let clock = OffsetClock::new();
        let database = Db::connect(&config.database.url, 5).await.expect("connect");
        // Several gateways may share one database; migrating is idempotent.
        database.migrate().await.expect("migrate");
        let mut app = App::new(
            config,
            database,
            clock.clone(),
            MasterKey::from_base64(&db.master_key).expect("test key"),
        );
        if let Some(metrics) = self.metrics {
            app.metrics = metrics;
        }
        let app = Arc::new(app);
        let server = Server::start_on(app.clone(), listener).expect("start server");
        Some(TestApp {
            app,
            clock,
            base_url: format!("http://{addr}"),
            server: Some(server),
            database: db,
        })
    }
}

/// The agent token header value.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Secret wrapper for token values passed to library calls.
pub fn secret(token: &str) -> SecretString {
    SecretString::from(token.to_owned())
}

/// Declares, for each named `async fn(Backend)`, a test on SQLite and one on PostgreSQL.
#[macro_export]
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => { $(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$test($crate::harness::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$test($crate::harness::Backend::Postgres).await
            }
        }
    )* };
}

/// A raw HTTP speaker of MCP for tests that need to see status codes and headers.
pub struct RawMcp {
    pub http: reqwest::Client,
    pub url: String,
    pub token: Option<String>,
    pub session: Option<String>,
    /// The `MCP-Protocol-Version` sent with session requests.
    pub protocol: String,
}

pub const PROTOCOL: &str = "2025-11-25";

impl RawMcp {
    pub fn new(url: String, token: Option<&str>) -> Self {
        Self {
            http: reqwest::Client::new(),
            url,
            token: token.map(str::to_owned),
            session: None,
            protocol: PROTOCOL.to_owned(),
        }
    }

    /// A POST with the usual MCP headers (and the session, once there is one).
    pub fn post(&self) -> reqwest::RequestBuilder {
        self.post_accepting("application/json, text/event-stream")
    }

    /// Like [`RawMcp::post`], with `accept` as the only `Accept` header.
    pub fn post_accepting(&self, accept: &str) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", accept);
        if let Some(token) = &self.token {
            request = request.header("authorization", bearer(token));
        }
        if let Some(session) = &self.session {
            request = request
                .header("mcp-session-id", session)
                .header("mcp-protocol-version", &self.protocol);
        }
        request
    }

    /// Runs `initialize` + `notifications/initialized` and keeps the session id.
    pub async fn initialize(&mut self) {
        let response = self
            .post()
            .body(format!(
                r#"{{"jsonrpc":"2.0","id":0,"method":"initialize","params":{{"protocolVersion":"{PROTOCOL}","capabilities":{{}},"clientInfo":{{"name":"raw","version":"1"}}}}}}"#
            ))
            .send()
            .await
            .expect("initialize");
        assert_eq!(response.status(), 200, "initialize should succeed");
        self.session = Some(
            response.headers()["mcp-session-id"]
                .to_str()
                .expect("ascii")
                .to_owned(),
        );
        let _ = response.text().await;
        let ack = self
            .post()
            .body(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .send()
            .await
            .expect("initialized");
        assert_eq!(ack.status(), 202);
    }

    /// Sends one JSON-RPC body and returns the status and the JSON-RPC message in the answer (from
    /// a JSON body or the last SSE `data:` line), if any.
    pub async fn send(&self, body: &str) -> (u16, Option<serde_json::Value>) {
        let response = self
            .post()
            .body(body.to_owned())
            .send()
            .await
            .expect("send");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, parse_mcp_body(&text))
    }
}

/// Finds the JSON-RPC message in a JSON or SSE body.
pub fn parse_mcp_body(text: &str) -> Option<serde_json::Value> {
    if let Ok(value) = serde_json::from_str(text) {
        return Some(value);
    }
    text.lines()
        .rev()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(str::trim)
        .filter(|data| !data.is_empty())
        .find_map(|data| serde_json::from_str(data).ok())
}

/// Every row of the tables the gateway owns, to prove a request changed nothing.
pub async fn snapshot(db: &Db) -> Vec<String> {
    let mut rows = vec![];
    for query in [
        "SELECT id || '|' || display_name || '|' || COALESCE(idp_issuer, '') FROM tenants ORDER BY id",
        "SELECT tenant_id || '|' || name || '|' || secret_names || '|' || approvers FROM environments ORDER BY tenant_id, name",
        "SELECT tenant_id || '|' || id || '|' || name || '|' || COALESCE(CAST(revoked_at AS TEXT), '') FROM agent_tokens ORDER BY tenant_id, id",
    ] {
        let found: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(query))
            .fetch_all(db.pool())
            .await
            .expect("snapshot query");
        rows.extend(found.into_iter().map(|(r,)| r));
    }
    rows
}

/// Every text column the gateway stores, concatenated, to look for values that must not be there.
pub async fn dump_all_text(db: &Db) -> String {
    let mut out = snapshot(db).await.join("\n");
    for query in [
        "SELECT id || '|' || environment || '|' || purpose || '|' || state || '|' || \
         COALESCE(user_code, '') || '|' || COALESCE(verification_uri, '') || '|' || \
         COALESCE(verification_uri_complete, '') || '|' || COALESCE(device_code_sealed, '') || '|' || \
         COALESCE(lease_owner, '') || '|' || COALESCE(approver_sub, '') || '|' || \
         COALESCE(approver_name, '') || '|' || COALESCE(approver_email, '') || '|' || \
         COALESCE(approver_groups, '') || '|' || COALESCE(end_reason, '') || '|' || \
         COALESCE(trace_context, '') FROM grants",
        "SELECT grant_id || '|' || kind || '|' || detail FROM audit_log",
        "SELECT id || '|' || COALESCE(idp_client_id, '') || '|' || COALESCE(idp_client_secret_ref, '') FROM tenants",
        "SELECT id || '|' || secret_hash FROM agent_tokens",
        "SELECT id || '|' || redirect_uris FROM oauth_clients",
        "SELECT state_hash || '|' || code_challenge || '|' || upstream_sealed FROM oauth_signins",
        "SELECT id || '|' || subject || '|' || scope || '|' || resource FROM oauth_families",
        "SELECT code_hash || '|' || redirect_uri || '|' || code_challenge FROM oauth_codes",
        "SELECT id || '|' || family_id || '|' || secret_hash FROM oauth_tokens",
    ] {
        let rows: Vec<(String,)> = sqlx::query_as(query)
            .fetch_all(db.pool())
            .await
            .expect("dump query");
        for (row,) in rows {
            out.push('\n');
            out.push_str(&row);
        }
    }
    out
}

/// Captures every log line of this test process (debug level and up, all crates).
pub fn capture_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = buffer.clone();
        tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_ansi(false)
            .with_writer(move || LogWriter(sink.clone()))
            .try_init()
            .expect("no other subscriber in this process");
        buffer
    })
    .clone()
}

struct LogWriter(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
