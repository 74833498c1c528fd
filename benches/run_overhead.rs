//! Load benchmark: what a `run` costs beyond the child's own time. Measured in the same run, on
//! loopback with a warm mTLS connection:
//!
//! 1. baseline: spawning `true` directly (tokio::process);
//! 2. sandbox: the runner's exec path for `true` with isolation fully on (bubblewrap namespaces,
//!    private tmpfs root, the `custodian-sandbox` helper's rlimits, Landlock and seccomp,
//!    redaction);
//! 3. full: `tools/call run {argv: ["true"]}` through the gateway (MCP, auth, grant use, secrets,
//!    mTLS dispatch to a runner, redaction twice, timeline event), with rmcp's client and again
//!    with a plain HTTP client (one POST, the answer read whole), so that the client's own tasks
//!    can be told apart from the gateway's share.
//!
//! and, for the audit log and tracing, the grant-use transaction with and without its audit record,
//! and the full run again with OTLP trace export on.
//!
//! `cargo build --release --workspace --bins && cargo bench --bench run_overhead [-- --calls N]`
//! prints p50/p99 and the extra milliseconds over the baselines (the first command builds the
//! small `custodian-sandbox` helper the runner uses; without it the bench falls back to
//! re-executing the `custodian` binary and says so). Budgets: sandbox spawn ≤ 5 ms p50 over
//! fork/exec; the gateway's share (full run minus the runner's sandbox exec) ≤ 1 ms p50 and ≤ 5 ms
//! p99. Differences are between percentiles of runs measured in this process; the runner's exec and
//! the full run are measured in turn, call by call, so that load that changes during the bench
//! moves both alike.

mod common;
use common::arg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use custodian::app::{App, Server};
use custodian::clock::SystemClock;
use custodian::config::Config;
use custodian::environments::{self, Policy};
use custodian::keys::MasterKey;
use custodian::store::Db;
use custodian::tenants::{self, TenantId};
use custodian_protocol::{ExecRequest, Identity, SecretEnv};
use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use secrecy::ExposeSecret;

const HELPER: &str = env!("CARGO_BIN_EXE_custodian");
/// Between calls measured in turn: longer than a spare sandbox takes to set up here.
const PAUSE: Duration = Duration::from_millis(25);

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() * 99 / 100]),
    )
}

async fn time<F, Fut>(calls: usize, mut f: F) -> (f64, f64)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..20 {
        f().await;
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        f().await;
        samples.push(start.elapsed());
    }
    percentiles(samples)
}

/// Times `a` and `b` in turn, call by call, so that a change in the machine's load moves both
/// alike: the difference of their percentiles is then what `b` costs beyond `a`. Each call is
/// followed by `pause` (not timed), as an agent's runs are spaced by at least its own turn.
async fn time_in_turn<A, FA, B, FB>(
    calls: usize,
    pause: Duration,
    mut a: A,
    mut b: B,
) -> ((f64, f64), (f64, f64))
where
    A: FnMut() -> FA,
    FA: std::future::Future<Output = ()>,
    B: FnMut() -> FB,
    FB: std::future::Future<Output = ()>,
{
    for _ in 0..20 {
        a().await;
        b().await;
    }
    let (mut first, mut second) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
    for _ in 0..calls {
        let start = Instant::now();
        a().await;
        first.push(start.elapsed());
        tokio::time::sleep(pause).await;
        let start = Instant::now();
        b().await;
        second.push(start.elapsed());
        tokio::time::sleep(pause).await;
    }
    (percentiles(first), percentiles(second))
}

fn main() {
    let calls = arg("--calls", 300);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let dir = tempfile::tempdir().expect("temp dir");
        let td = "custodian.local";
        custodian::pki::init(dir.path(), td).expect("ca");
        let gateway = Identity::Gateway { trust_domain: td.into() };
        let runner_id = Identity::Runner { trust_domain: td.into(), tenant: "bench".into(), name: "r1".into() };
        let (gw_cert, gw_key) = custodian::pki::issue(dir.path(), &gateway, &[], 1, &dir.path().join("gw")).expect("gw");
        let (r_cert, r_key) =
            custodian::pki::issue(dir.path(), &runner_id, &["127.0.0.1".into()], 1, &dir.path().join("r1")).expect("runner");

        // The runner, in this process, with this workspace's `custodian` binary as sandbox helper.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let runner_addr = listener.local_addr().expect("addr");
        let runner_config = custodian_runner::config::RunnerConfig {
            listen: runner_addr,
            trust_domain: td.into(),
            tenant: "bench".into(),
            name: "r1".into(),
            cert_file: r_cert,
            key_file: r_key,
            ca_file: dir.path().join("ca.pem"),
            max_body_bytes: 1 << 20,
            sandbox: custodian_runner::config::SandboxConfig::default(),
            egress: custodian_runner::config::EgressConfig::default(),
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let sandbox = custodian_runner::sandbox::Sandbox::new(
            custodian_runner::sandbox::helper_beside(HELPER.as_ref()),
            runner_config.sandbox.clone(),
            custodian_runner::Isolation::Full,
        );
        // The same sandbox without a spare: every run waits for bubblewrap to set up.
        let cold_sandbox = custodian_runner::sandbox::Sandbox::new(
            custodian_runner::sandbox::helper_beside(HELPER.as_ref()),
            custodian_runner::config::SandboxConfig { spare: false, ..runner_config.sandbox.clone() },
            custodian_runner::Isolation::Full,
        );
        let upstream = custodian_runner::egress::upstream_tls(None).expect("upstream TLS");
        tokio::spawn(custodian_runner::run(runner_config, listener, HELPER.into(), custodian_runner::Isolation::Full, stop.clone()));

        // The gateway on SQLite with one environment, one secret, one runner, one active grant.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let toml = format!(
            "[server]\nlisten = \"{addr}\"\npublic_url = \"http://{addr}\"\n[database]\nurl = \"sqlite://{}/bench.db\"\n[runners]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            dir.path().display(),
            dir.path().join("ca.pem").display(),
            gw_cert.display(),
            gw_key.display()
        );
        let config = Config::from_toml(&toml, std::iter::empty()).expect("config");
        let db = Db::connect(&config.database.url, 10).await.expect("db");
        db.migrate().await.expect("migrate");
        let key = MasterKey::generate();
        let tenant = TenantId::parse("bench").expect("id");
        tenants::create(&db, &tenant, "Bench", None, 0).await.expect("tenant");
        environments::create(&db, &tenant, "staging", "bench", &[], &Policy { max_uses: 100_000, ..Policy::default() }, 0)
            .await
            .expect("env");
        custodian::secrets::set(&db, &key, &tenant, "staging", "API_KEY", b"bench-secret-value-123", 0).await.expect("secret");
        custodian::runners::add(&db, &tenant, "r1", "default", &format!("https://{runner_addr}"), 0).await.expect("runner");
        let (token, secret) = custodian::agent_tokens::create(&db, &tenant, "bench", 0).await.expect("token");
        let app = Arc::new(App::new(config, db, Arc::new(SystemClock), key));
        let grant = custodian::grants::GrantId::generate();
        let now_ms = app.clock.now_ms();
        custodian::grants::store::insert(
            &app.db,
            &app.audit_key,
            &custodian::grants::store::NewGrant {
                tenant: &tenant,
                id: &grant,
                environment: "staging",
                agent_token_id: &token.id,
                agent_name: "bench",
                purpose: "bench",
                ttl_seconds: 3600,
                max_uses: 100_000,
                expires_at: app.clock.now() + 3600,
                user_code: "BENCH",
                verification_uri: "https://idp.example/device",
                verification_uri_complete: None,
                device_code_sealed: "unused",
                poll_interval_ms: 3_600_000,
                trace_context: None,
                requester: None,
            },
            now_ms,
        )
        .await
        .expect("grant");
        let approver = custodian::oidc::Approver {
            subject: "bench".into(),
            name: None,
            email: None,
            groups: vec![],
            auth_time: Some(app.clock.now()),
            acr: None,
            amr: vec![],
        };
        custodian::grants::store::approve(&app.db, &app.audit_key, &tenant, grant.as_str(), &approver, now_ms).await.expect("approve");
        let server = Server::start_on(app.clone(), listener).expect("serve");
        let transport = StreamableHttpClientTransport::with_client(
            reqwest::Client::new(),
            StreamableHttpClientTransportConfig::with_uri(format!("http://{addr}/t/bench/mcp"))
                .auth_header(secret.expose_secret().to_owned()),
        );
        let client = ClientConfig::new(ClientCapabilities::default(), Implementation::new("bench", "1"))
            .serve(transport)
            .await
            .expect("connect");

        let baseline = time(calls, || async {
            tokio::process::Command::new("true").status().await.expect("true");
        })
        .await;
        // A cheap tool call through the same client and server (answered without rmcp's session
        // worker, see `http::direct`; `run` goes through it).
        let listing = time(calls, || async {
            let result = client
                .call_tool(CallToolRequestParams::new("list_environments"))
                .await
                .expect("list_environments");
            assert_eq!(result.is_error, Some(false));
        })
        .await;
        let cold = time(calls, || exec_true(&cold_sandbox, &upstream)).await;
        let args = serde_json::json!({"grant_id": grant.as_str(), "argv": ["true"]});
        // The gateway's share: the runner's exec alone and the whole run through the gateway, in
        // turn, each followed by a pause in which the spare sandbox it used is replaced.
        let (spared, full) = time_in_turn(calls, PAUSE, || exec_true(&sandbox, &upstream), || run_true(&client, &args)).await;
        // The same share with a plain HTTP client (one POST, the answer read whole) in place of
        // rmcp's client and its tasks: what the gateway itself adds.
        let plain = PlainSession::open(&format!("http://{addr}/t/bench/mcp"), secret.expose_secret()).await;
        let (plain_spared, plain_full) =
            time_in_turn(calls, PAUSE, || exec_true(&sandbox, &upstream), || plain.run_true(&args)).await;
        // Back to back, the spare is still being set up when the next run comes.
        let (_, back_to_back) = time_in_turn(calls / 3, Duration::ZERO, || exec_true(&sandbox, &upstream), || run_true(&client, &args)).await;

        // The audit record's share: the grant-use transaction with its audit record, against the
        // same UPDATE in a transaction of its own.
        let exec_detail = serde_json::json!({"runner": "r1", "argv": "true"});
        let with_audit = time(calls, || async {
            let taken = custodian::grants::store::consume_use(&app.db, &app.audit_key, &tenant, grant.as_str(), &token.id, &exec_detail, app.clock.now_ms())
                .await
                .expect("use");
            assert!(taken.is_some());
        })
        .await;
        let without_audit = time(calls, || async {
            let mut tx = app.db.pool().begin().await.expect("tx");
            sqlx::query("UPDATE grants SET uses = uses + 1 WHERE tenant_id = $1 AND id = $2 AND state = 'active' AND uses < max_uses")
                .bind(tenant.as_str())
                .bind(grant.as_str())
                .execute(&mut *tx)
                .await
                .expect("update");
            tx.commit().await.expect("commit");
        })
        .await;

        // Tracing's share: the same run with spans exported over OTLP/HTTP to a local endpoint.
        let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let sink_addr = sink.local_addr().expect("addr");
        let router = axum::Router::new().route("/v1/traces", axum::routing::post(|| async { "" }));
        tokio::spawn(async move { axum::serve(sink, router).await });
        let telemetry = custodian::telemetry::Telemetry::from_env(
            &[("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), format!("http://{sink_addr}"))],
            "custodian-bench",
        )
        .expect("telemetry");
        {
            use tracing_subscriber::layer::SubscriberExt;
            let subscriber = tracing_subscriber::registry()
                .with(tracing_subscriber::EnvFilter::new("info"))
                .with(telemetry.layer());
            tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
        }
        let traced = time(calls, || async {
            run_true(&client, &args).await;
        })
        .await;
        telemetry.shutdown();

        println!(
            "`true` over loopback, {calls} calls each (p50 / p99, ms); sandbox helper {}",
            custodian_runner::sandbox::helper_beside(HELPER.as_ref()).display()
        );
        for (name, (p50, p99)) in [
            ("spawn `true` directly", baseline),
            ("runner sandbox exec", spared),
            ("  … without a spare sandbox", cold),
            ("tools/call list_environments", listing),
            ("gateway tools/call run", full),
            ("  … plain HTTP client", plain_full),
            ("  … its runner exec", plain_spared),
            ("  … back to back", back_to_back),
            ("  … with OTLP trace export", traced),
            ("grant use + audit record", with_audit),
            ("grant use alone", without_audit),
        ] {
            println!("{name:<28} {p50:>8.2} {p99:>8.2}");
        }
        println!(
            "gateway share (gateway run − runner sandbox exec): p50 {:+.2} ms, p99 {:+.2} ms (budget ≤ 1 ms p50, ≤ 5 ms p99)",
            full.0 - spared.0,
            full.1 - spared.1,
        );
        println!(
            "  … with a plain HTTP client in place of rmcp's: p50 {:+.2} ms, p99 {:+.2} ms",
            plain_full.0 - plain_spared.0,
            plain_full.1 - plain_spared.1,
        );
        println!(
            "sandbox share (runner sandbox exec − direct spawn): p50 {:+.2} ms, p99 {:+.2} ms (budget ≤ 5 ms p50); without a spare: p50 {:+.2} ms, p99 {:+.2} ms",
            spared.0 - baseline.0,
            spared.1 - baseline.1,
            cold.0 - baseline.0,
            cold.1 - baseline.1,
        );
        println!(
            "gateway run − direct spawn: p50 {:+.2} ms, p99 {:+.2} ms (×{:.1} at p50)",
            full.0 - baseline.0,
            full.1 - baseline.1,
            full.0 / baseline.0
        );
        println!(
            "audit record per run: p50 {:+.2} ms ({:.2}x the bare use); trace export per run: p50 {:+.2} ms ({:.2}x the untraced run)",
            with_audit.0 - without_audit.0,
            with_audit.0 / without_audit.0,
            traced.0 - full.0,
            traced.0 / full.0
        );
        client.cancel().await.ok();
        stop.cancel();
        server.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    });
}

/// The runner's exec path for `true`, in process, with one secret.
async fn exec_true(
    sandbox: &custodian_runner::sandbox::Sandbox,
    upstream: &Arc<rustls::ClientConfig>,
) {
    let request = ExecRequest {
        exec_id: "bench".into(),
        grant_id: "bench".into(),
        tenant: "bench".into(),
        argv: vec!["true".into()],
        stdin: None,
        timeout_ms: 10_000,
        max_output_bytes: 1 << 20,
        secrets: vec![SecretEnv {
            name: "API_KEY".into(),
            value: "bench-secret-value-123".into(),
        }],
        traceparent: None,
        egress: vec![],
        files: vec![],
        env: Vec::new(),
    };
    custodian_runner::exec::run(sandbox, upstream, request, Default::default())
        .await
        .expect("exec");
}

/// One `tools/call run` that must succeed.
async fn run_true(
    client: &rmcp::service::RunningService<rmcp::RoleClient, ClientConfig>,
    args: &serde_json::Value,
) {
    let result = client
        .call_tool(
            CallToolRequestParams::new("run")
                .with_arguments(args.as_object().expect("object").clone()),
        )
        .await
        .expect("run");
    assert_eq!(result.is_error, Some(false));
}

/// An MCP session driven with plain HTTP requests: `initialize`, `notifications/initialized`, then
/// one POST per call with the answer read whole (an SSE event or JSON).
struct PlainSession {
    http: reqwest::Client,
    url: String,
    token: String,
    session: String,
}

impl PlainSession {
    const VERSION: &str = "2025-06-18";

    async fn open(url: &str, token: &str) -> Self {
        let http = reqwest::Client::new();
        let initialize = serde_json::json!({
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": Self::VERSION, "capabilities": {}, "clientInfo": {"name": "bench-plain", "version": "1"}}
        });
        let answer = http
            .post(url)
            .bearer_auth(token)
            .header("accept", "application/json, text/event-stream")
            .json(&initialize)
            .send()
            .await
            .expect("initialize");
        let session = answer
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .expect("a session id")
            .to_owned();
        answer.bytes().await.expect("initialize answer");
        let plain = Self {
            http,
            url: url.to_owned(),
            token: token.to_owned(),
            session,
        };
        let status = plain
            .post(&serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .send()
            .await
            .expect("initialized")
            .status();
        assert!(status.is_success(), "notifications/initialized: {status}");
        plain
    }

    fn post(&self, body: &serde_json::Value) -> reqwest::RequestBuilder {
        self.http
            .post(&self.url)
            .bearer_auth(&self.token)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-session-id", &self.session)
            .header("mcp-protocol-version", Self::VERSION)
            .json(body)
    }

    /// One `tools/call run` that must succeed.
    async fn run_true(&self, args: &serde_json::Value) {
        let call = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "run", "arguments": args}});
        let text = self
            .post(&call)
            .send()
            .await
            .expect("run")
            .text()
            .await
            .expect("run answer");
        let message = text
            .lines()
            .find_map(|line| {
                line.strip_prefix("data: ")
                    .filter(|data| data.starts_with('{'))
            })
            .unwrap_or(&text);
        let answer: serde_json::Value = serde_json::from_str(message).expect("a JSON-RPC answer");
        assert_eq!(
            answer["result"]["isError"],
            serde_json::json!(false),
            "{answer}"
        );
    }
}
