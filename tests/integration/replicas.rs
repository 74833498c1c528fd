//! Two `custodian serve` replicas on one PostgreSQL database behind a plain round-robin HTTP proxy
//! (no stickiness, a different replica for each request): one Python SDK session alternates
//! between them, keeps going after one is SIGKILLed in the middle of a `grant_status` wait, and its
//! pending grant completes on the survivor. A session id is useless with another token or tenant.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use serde_json::{Value, json};

use crate::harness::{Backend, TestApp, dump_all_text};
use crate::idp::{Login, TestIdp};
use crate::processes::{CUSTODIAN, Proc, free_port, python, wait_healthy};

/// An environment name that only tenant `acme`'s sessions may see.
const CANARY: &str = "staging-canary-7f3a";

/// One request the proxy forwarded.
#[derive(Debug, Clone)]
struct Forwarded {
    /// The proxy's request counter: request `n` went to replica `n % 2` unless that one was down.
    n: usize,
    replica: usize,
    method: String,
    /// The JSON-RPC method, and the tool for `tools/call`.
    rpc: Option<String>,
    session: Option<String>,
    /// The replica's status, or why the proxy got none (it then answers 502).
    answer: String,
}

/// A round-robin reverse proxy: each request goes to the next replica in turn (skipping one that
/// refuses connections, as nginx's `proxy_next_upstream error` does), with no notion of sessions.
struct Proxy {
    replicas: Vec<String>,
    next: AtomicUsize,
    seen: Mutex<Vec<Forwarded>>,
    client: reqwest::Client,
}

impl Proxy {
    async fn start(replicas: Vec<String>, port: u16) -> Arc<Self> {
        let proxy = Arc::new(Self {
            replicas,
            next: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        });
        let router = axum::Router::new()
            .fallback(forward)
            .with_state(proxy.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        proxy
    }

    fn seen(&self) -> Vec<Forwarded> {
        self.seen.lock().unwrap().clone()
    }
}

fn rpc_name(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let method = value["method"].as_str()?;
    Some(match value["params"]["name"].as_str() {
        Some(tool) if method == "tools/call" => format!("tools/call {tool}"),
        _ => method.to_owned(),
    })
}

async fn forward(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 16 << 20).await.unwrap();
    let first = proxy.next.fetch_add(1, Ordering::SeqCst);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    for attempt in 0..proxy.replicas.len() {
        let replica = (first + attempt) % proxy.replicas.len();
        let mut upstream = proxy
            .client
            .request(
                parts.method.clone(),
                format!("{}{path}", proxy.replicas[replica]),
            )
            .body(body.clone());
        for (name, value) in &parts.headers {
            if !matches!(name.as_str(), "content-length" | "connection") {
                upstream = upstream.header(name, value);
            }
        }
        let sent = upstream.send().await;
        if matches!(&sent, Err(e) if e.is_connect()) {
            continue;
        }
        proxy.seen.lock().unwrap().push(Forwarded {
            n: first,
            replica,
            method: parts.method.to_string(),
            rpc: rpc_name(&body),
            session: parts
                .headers
                .get("mcp-session-id")
                .map(|v| v.to_str().unwrap().to_owned()),
            answer: match &sent {
                Ok(answer) => answer.status().to_string(),
                Err(e) => format!("no answer: {e:?}"),
            },
        });
        let Ok(answer) = sent else { break };
        let mut response = Response::builder().status(answer.status());
        for (name, value) in answer.headers() {
            if !matches!(
                name.as_str(),
                "content-length" | "connection" | "transfer-encoding"
            ) {
                response = response.header(name, value);
            }
        }
        let chunks = futures::stream::unfold(answer, |mut answer| async move {
            match answer.chunk().await {
                Ok(Some(chunk)) => Some((Ok::<_, std::io::Error>(chunk), answer)),
                Ok(None) => None,
                Err(e) => Some((Err(std::io::Error::other(e)), answer)),
            }
        });
        return response.body(Body::from_stream(chunks)).unwrap();
    }
    Response::builder().status(502).body(Body::empty()).unwrap()
}

/// The Python SDK session driver (`tests/clients/python_session.py`).
struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Session {
    fn start(python: &Path, url: &str, token: &str, protocol: &str) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/python_session.py");
        let mut child = Command::new(python)
            .arg(script)
            .args(["--protocol", protocol, url])
            .env("CUSTODIAN_TOKEN", token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout: ChildStdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            lines,
        }
    }

    async fn read(&self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(line) = self.lines.try_recv() {
                return serde_json::from_str(&line).unwrap();
            }
            assert!(Instant::now() < deadline, "the Python session said nothing");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn send(&mut self, tool: &str, args: Value, timeout: u64) {
        let command = json!({"tool": tool, "args": args, "timeout": timeout});
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
    }

    async fn call(&mut self, tool: &str, args: Value) -> Value {
        self.send(tool, args, 60);
        let answer = self.read(Duration::from_secs(90)).await;
        assert_eq!(answer["is_error"], false, "{tool}: {answer}");
        answer
    }

    /// Ends the session (the SDK sends DELETE) and waits for the driver to exit.
    async fn close(mut self) {
        drop(self.stdin.take());
        assert_eq!(self.read(Duration::from_secs(30)).await["closed"], true);
        assert!(self.child.wait().unwrap().success());
    }
}

/// What the proxy forwarded and what the replicas logged, for a failure's message.
fn explain(proxy: &Proxy, dir: &Path) -> String {
    let mut text = String::from("forwarded:");
    for f in proxy.seen() {
        let rpc = f.rpc.as_deref().unwrap_or("-");
        let line = format!(
            "\n  #{} to replica {}: {} {rpc} → {}",
            f.n, f.replica, f.method, f.answer
        );
        text.push_str(&line);
    }
    for n in 0..2 {
        let log = std::fs::read_to_string(dir.join(format!("replica{n}.log"))).unwrap_or_default();
        text.push_str(&format!("\nreplica {n} log:\n{log}"));
    }
    text
}

/// A `custodian serve` replica on `database`, public at `public_url` (the proxy).
fn replica(
    database: &crate::harness::TestDb,
    public_url: &str,
    dir: &Path,
    n: usize,
) -> (Proc, String) {
    let port = free_port();
    let config = dir.join(format!("replica{n}.toml"));
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"{public_url}\"\n\n[database]\nurl = \"{}\"\n",
            database.url
        ),
    )
    .unwrap();
    let process = Proc(
        Command::new(CUSTODIAN)
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("CUSTODIAN_CONFIG")
            .env_remove("RUST_LOG")
            .env("CUSTODIAN_MASTER_KEY", &database.master_key)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("replica{n}.log"))).unwrap())
            .spawn()
            .unwrap(),
    );
    (process, format!("http://127.0.0.1:{port}"))
}

/// A raw MCP POST of `tools/call list_environments` in `session`, straight to the replica at
/// `base` with `host` (the public one) as `Host`.
async fn list_in_session(
    (base, host): (&str, &str),
    tenant: &str,
    token: &str,
    session: &str,
) -> (u16, String) {
    let answer = reqwest::Client::new()
        .post(format!("{base}/t/{tenant}/mcp"))
        .header("host", host)
        .bearer_auth(token)
        .header("mcp-session-id", session)
        .header("mcp-protocol-version", "2025-11-25")
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .body(
            json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                   "params": {"name": "list_environments", "arguments": {}}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    (status, answer.text().await.unwrap())
}

async fn session_rows(t: &TestApp) -> i64 {
    let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM mcp_sessions")
        .fetch_one(t.db().pool())
        .await
        .unwrap();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_alternates_replicas_and_survives_one_being_killed() {
    let Some(python) = python() else {
        return;
    };
    let Some(idp) = TestIdp::start(600) else {
        return;
    };
    let Some(seed) = TestApp::builder(Backend::Postgres).start().await else {
        return;
    };
    let acme = seed.tenant_with_idp("acme", &idp.issuer).await;
    seed.environment(&acme, CANARY, &["API_KEY"]).await;
    let token = seed.token(&acme, "codex").await;
    let other_token = seed.token(&acme, "other-agent").await;
    let beta = seed.tenant("beta").await;
    let beta_token = seed.token(&beta, "codex").await;

    let dir = tempfile::tempdir().unwrap();
    let proxy_port = free_port();
    let host = format!("127.0.0.1:{proxy_port}");
    let public = format!("http://{host}");
    let database = seed.database();
    let (r0, url0) = replica(&database, &public, dir.path(), 0);
    let (r1, url1) = replica(&database, &public, dir.path(), 1);
    let mut replicas = [Some(r0), Some(r1)];
    let urls = [url0.clone(), url1.clone()];
    for url in &urls {
        wait_healthy(&format!("{url}/healthz")).await;
    }
    let proxy = Proxy::start(urls.to_vec(), proxy_port).await;

    let mut session = Session::start(
        &python,
        &format!("{public}/t/acme/mcp"),
        &token,
        "2025-11-25",
    );
    assert_eq!(
        session.read(Duration::from_secs(30)).await["protocol"],
        "2025-11-25"
    );
    for _ in 0..2 {
        session.send("list_environments", json!({}), 60);
        let listed = session.read(Duration::from_secs(90)).await;
        assert!(
            listed["is_error"] == false,
            "list_environments: {listed}\n{}",
            explain(&proxy, dir.path())
        );
        assert_eq!(listed["structured"]["environments"][0]["name"], CANARY);
    }
    let requested = session
        .call(
            "request_grant",
            json!({"environment": CANARY, "purpose": "check failover"}),
        )
        .await;
    let grant = requested["structured"].clone();
    assert_eq!(grant["state"], "pending");

    // One session, each request on the other replica, both serving tool calls.
    let seen = proxy.seen();
    let sid = seen
        .iter()
        .find_map(|f| f.session.clone())
        .expect("requests carry the session id");
    let posts: Vec<&Forwarded> = seen
        .iter()
        .filter(|f| f.method == "POST" && f.session.is_some())
        .collect();
    assert!(
        posts
            .iter()
            .all(|f| f.session.as_deref() == Some(sid.as_str()))
    );
    let calls = |replica: usize| {
        posts
            .iter()
            .filter(|f| {
                f.replica == replica
                    && f.rpc
                        .as_deref()
                        .is_some_and(|r| r.starts_with("tools/call"))
            })
            .count()
    };
    assert!(calls(0) >= 1 && calls(1) >= 1, "{seen:?}");
    assert!(seen.iter().all(|f| f.replica == f.n % 2), "{seen:?}");

    // The session id is nothing without its token: not with another token of the tenant, not in
    // another tenant, on either replica; and the attempts leave the session alone.
    for url in &urls {
        for (tenant, bearer) in [("acme", &other_token), ("beta", &beta_token)] {
            let (status, body) = list_in_session((url, &host), tenant, bearer, &sid).await;
            assert_eq!(status, 404, "{tenant}: {body}");
            assert!(
                !body.contains(CANARY) && !body.contains("API_KEY"),
                "{body}"
            );
        }
        let (status, body) = list_in_session((url, &host), "acme", &beta_token, &sid).await;
        assert_eq!(status, 401);
        assert!(!body.contains(CANARY));
    }
    // The database keeps the session's hash, never its id.
    assert_eq!(session_rows(&seed).await, 1);
    assert!(!dump_all_text(seed.db()).await.contains(&sid));

    // A long wait in flight on one replica; that replica is killed.
    let before = proxy.seen().len();
    session.send(
        "grant_status",
        json!({"grant_id": grant["grant_id"], "wait_seconds": 120}),
        150,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let found = proxy.seen()[before..]
            .iter()
            .find(|f| f.rpc.as_deref() == Some("tools/call grant_status"))
            .map(|f| f.replica);
        if let Some(replica) = found {
            break replica;
        }
        assert!(
            Instant::now() < deadline,
            "grant_status never reached a replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = replicas[waiting].take().unwrap();
    crate::processes::sigkill(killed.0.id());
    drop(killed);
    let survivor = 1 - waiting;

    // The client learns that the answer was lost (it does not hang reconnecting), and the same
    // session goes on at the survivor.
    let lost = session.read(Duration::from_secs(60)).await;
    assert!(
        lost.to_string().contains("stopped before it answered"),
        "{lost}"
    );
    let after_kill = proxy.seen().len();
    idp.approve(grant["user_code"].as_str().unwrap(), Login::as_("alice"))
        .await;
    let status = session
        .call(
            "grant_status",
            json!({"grant_id": grant["grant_id"], "wait_seconds": 60}),
        )
        .await;
    assert_eq!(status["structured"]["state"], "active", "{status}");
    assert_eq!(status["structured"]["approver"], "alice@example.com");
    let listed = session.call("list_environments", json!({})).await;
    assert_eq!(listed["structured"]["environments"][0]["name"], CANARY);
    let seen = proxy.seen();
    assert!(seen[after_kill..].iter().all(|f| f.replica == survivor));
    assert!(
        seen[after_kill..]
            .iter()
            .all(|f| f.session.is_none() || f.session.as_deref() == Some(sid.as_str())),
        "{seen:?}"
    );

    // Ending the session ends it everywhere.
    session.close().await;
    assert_eq!(session_rows(&seed).await, 0);
    let (status, _) = list_in_session((&urls[survivor], &host), "acme", &token, &sid).await;
    assert_eq!(status, 404);
    drop(replicas);
    seed.stop().await;
}
