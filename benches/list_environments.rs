//! Load benchmark: `tools/call list_environments` through the full gateway (Host/Origin guard,
//! token verification against the database, JSON-RPC checks, a store query) against a bare rmcp
//! server with one trivial tool, both measured in this run on loopback with the same rmcp client.
//!
//! `cargo bench --bench list_environments [-- --calls N --clients C]` prints p50/p99 latency of
//! sequential calls, throughput with C concurrent sessions, and the ratios gateway / bare.

mod common;
use common::arg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::serve::ListenerExt;
use custodian::app::{App, Server};
use custodian::clock::SystemClock;
use custodian::config::Config;
use custodian::environments::{self, Policy};
use custodian::store::Db;
use custodian::tenants::{self, TenantId};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation};
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{Json, RoleClient, ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use secrecy::ExposeSecret;

/// The baseline: rmcp with one tool that returns a constant.
#[derive(Clone)]
struct Bare {
    tool_router: ToolRouter<Self>,
}

#[derive(serde::Serialize, schemars::JsonSchema)]
struct Pong {
    ok: bool,
}

#[tool_router]
impl Bare {
    #[tool(description = "Answers at once.")]
    async fn ping(&self) -> Json<Pong> {
        Json(Pong { ok: true })
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Bare {}

type Client = RunningService<RoleClient, ClientConfig>;

async fn connect(url: &str, token: Option<&str>) -> Client {
    let mut config = StreamableHttpClientTransportConfig::with_uri(url.to_owned());
    if let Some(token) = token {
        config = config.auth_header(token.to_owned());
    }
    let transport = StreamableHttpClientTransport::with_client(reqwest::Client::new(), config);
    ClientConfig::new(
        ClientCapabilities::default(),
        Implementation::new("bench", "1"),
    )
    .serve(transport)
    .await
    .expect("connect")
}

struct Target {
    name: &'static str,
    url: String,
    token: Option<String>,
    tool: &'static str,
}

struct Figures {
    p50: Duration,
    p99: Duration,
    per_second: f64,
}

async fn measure(target: &Target, calls: usize, clients: usize) -> Figures {
    let client = connect(&target.url, target.token.as_deref()).await;
    let call = || CallToolRequestParams::new(target.tool);
    for _ in 0..200 {
        client.call_tool(call()).await.expect("warm-up call");
    }
    let mut latencies = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        let result = client.call_tool(call()).await.expect("call");
        latencies.push(start.elapsed());
        assert_eq!(result.is_error, Some(false));
    }
    client.cancel().await.ok();
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];

    let mut sessions = Vec::new();
    for _ in 0..clients {
        sessions.push(connect(&target.url, target.token.as_deref()).await);
    }
    let per_client = calls / clients;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for session in sessions {
        let tool = target.tool;
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_client {
                session
                    .call_tool(CallToolRequestParams::new(tool))
                    .await
                    .expect("call");
            }
            session.cancel().await.ok();
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    let per_second = (per_client * clients) as f64 / start.elapsed().as_secs_f64();
    Figures {
        p50,
        p99,
        per_second,
    }
}

async fn start_bare() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = StreamableHttpService::new(
        || {
            Ok(Bare {
                tool_router: Bare::tool_router(),
            })
        },
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let router = axum::Router::new().route_service("/mcp", service);
    // Same socket options as the gateway, so the comparison is fair.
    let listener = listener.tap_io(|tcp| tcp.set_nodelay(true).expect("nodelay"));
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}/mcp")
}

async fn start_gateway(dir: &std::path::Path) -> (Server, String, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let toml = format!(
        "[server]\nlisten = \"{addr}\"\npublic_url = \"http://{addr}\"\n[database]\nurl = \"sqlite://{}/bench.db\"\n",
        dir.display()
    );
    let config = Config::from_toml(&toml, std::iter::empty()).expect("config");
    let db = Db::connect(&config.database.url, 10).await.expect("db");
    db.migrate().await.expect("migrate");
    let tenant = TenantId::parse("bench").expect("id");
    tenants::create(&db, &tenant, "Bench", None, 0)
        .await
        .expect("tenant");
    for name in ["staging", "production", "analytics"] {
        environments::create(
            &db,
            &tenant,
            name,
            "bench",
            &["API_KEY".into(), "DB_URL".into()],
            &Policy::default(),
            0,
        )
        .await
        .expect("env");
    }
    let (_, token) = custodian::agent_tokens::create(&db, &tenant, "bench", 0)
        .await
        .expect("token");
    let app = Arc::new(App::new(
        config,
        db,
        Arc::new(SystemClock),
        custodian::keys::MasterKey::generate(),
    ));
    let server = Server::start_on(app, listener).expect("serve");
    (
        server,
        format!("http://{addr}/t/bench/mcp"),
        token.expose_secret().to_owned(),
    )
}

fn main() {
    let calls = arg("--calls", 3000);
    let clients = arg("--clients", 8);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let bare = Target {
            name: "bare rmcp (1 trivial tool)",
            url: start_bare().await,
            token: None,
            tool: "ping",
        };
        let (server, url, token) = start_gateway(dir.path()).await;
        let gateway = Target {
            name: "custodian list_environments (SQLite)",
            url,
            token: Some(token),
            tool: "list_environments",
        };
        println!(
            "tools/call over loopback, {calls} sequential calls, then {clients} concurrent sessions"
        );
        let base = measure(&bare, calls, clients).await;
        let ours = measure(&gateway, calls, clients).await;
        for (target, f) in [(&bare, &base), (&gateway, &ours)] {
            println!(
                "{:<40} p50 {:>8.3} ms  p99 {:>8.3} ms  {:>8.0} calls/s",
                target.name,
                f.p50.as_secs_f64() * 1e3,
                f.p99.as_secs_f64() * 1e3,
                f.per_second
            );
        }
        println!(
            "ratio gateway/bare: p50 {:.2}x  p99 {:.2}x  throughput {:.0}%",
            ours.p50.as_secs_f64() / base.p50.as_secs_f64(),
            ours.p99.as_secs_f64() / base.p99.as_secs_f64(),
            100.0 * ours.per_second / base.per_second
        );
        server
            .shutdown(Duration::from_secs(5))
            .await
            .expect("shutdown");
    });
}
