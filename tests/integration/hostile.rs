//! Hostile traffic: slowloris, header floods, trickled bodies, clients that stop reading, and
//! session floods. Health must keep answering, offenders must be cut off, and sessions must be
//! capped and released.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Backend, TestApp, parse_mcp_body};
use crate::mcp_clients::connect;

/// A gateway on SQLite with these `[server]` keys.
async fn gateway(server: &str) -> Option<TestApp> {
    TestApp::builder(Backend::Sqlite)
        .server_toml(server)
        .start()
        .await
}

fn addr(t: &TestApp) -> SocketAddr {
    t.base_url.trim_start_matches("http://").parse().unwrap()
}

/// `GET /healthz` on a fresh connection; how long the answer took, if it was `200`.
async fn health(t: &TestApp, within: Duration) -> Result<Duration, String> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(within)
        .build()
        .unwrap();
    let started = Instant::now();
    match http.get(format!("{}/healthz", t.base_url)).send().await {
        Ok(r) if r.status() == 200 => Ok(started.elapsed()),
        Ok(r) => Err(format!("status {}", r.status())),
        Err(e) => Err(format!("after {:?}: {e}", started.elapsed())),
    }
}

/// Probes health `times` times, `every` apart, each allowed `within`.
async fn health_keeps_answering(t: &TestApp, times: usize, every: Duration, within: Duration) {
    let mut slowest = Duration::ZERO;
    for i in 0..times {
        let took = health(t, within)
            .await
            .unwrap_or_else(|e| panic!("health probe {i} failed: {e}"));
        slowest = slowest.max(took);
        tokio::time::sleep(every).await;
    }
    eprintln!("slowest health probe: {slowest:?}");
}

/// A slowloris client: starts a request and sends one more header byte every `every`. Returns how
/// long after connecting the server closed the connection (`None`: still open after `give_up`).
async fn slowloris(addr: SocketAddr, every: Duration, give_up: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.ok()?;
    if tcp
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .is_err()
    {
        return Some(started.elapsed());
    }
    let mut buf = [0u8; 256];
    while started.elapsed() < give_up {
        tokio::time::sleep(every).await;
        if tcp.write_all(b"a").await.is_err() {
            return Some(started.elapsed());
        }
        match tokio::time::timeout(Duration::from_millis(1), tcp.read(&mut buf)).await {
            Err(_) => continue,
            // Closed, reset, or answered with an error: either way the server is done with it.
            Ok(_) => return Some(started.elapsed()),
        }
    }
    None
}

/// Starts `count` slowloris clients, checks that health answers within `within` meanwhile, and
/// returns when each was cut off.
async fn slowloris_swarm(t: &TestApp, count: usize, within: Duration) -> Vec<Option<Duration>> {
    let target = addr(t);
    let attackers: Vec<_> = (0..count)
        .map(|_| {
            tokio::spawn(slowloris(
                target,
                Duration::from_millis(200),
                Duration::from_secs(20),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    health_keeps_answering(t, 8, Duration::from_millis(300), within).await;
    let mut closed = vec![];
    for attacker in attackers {
        closed.push(attacker.await.unwrap());
    }
    closed
}

fn all_cut_off_within(closed: &[Option<Duration>], limit: Duration) {
    assert!(
        closed.iter().all(|c| c.is_some_and(|d| d < limit)),
        "slowloris connections were kept: {closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_below_the_connection_cap_never_delays_health() {
    let Some(t) = gateway("header_read_timeout_seconds = 2").await else {
        return;
    };
    // 400 half-open connections hold no slot anyone else needs: health answers at once.
    let closed = slowloris_swarm(&t, 400, Duration::from_secs(2)).await;
    all_cut_off_within(&closed, Duration::from_secs(6));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_over_the_connection_cap_is_rotated_out() {
    let Some(t) = gateway("header_read_timeout_seconds = 1\nmax_connections = 100").await else {
        return;
    };
    // Three times the cap: the excess waits for a slot, every slot is freed within the header
    // timeout, and health gets one within a few timeouts.
    let closed = slowloris_swarm(&t, 300, Duration::from_secs(6)).await;
    all_cut_off_within(&closed, Duration::from_secs(10));
    t.stop().await;
}

/// Sends `request` on a new connection and returns the status of the answer (`None`: the
/// connection was closed or reset without one).
async fn status_of(addr: SocketAddr, request: Vec<u8>) -> Option<u16> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let (mut read, mut write) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&request).await;
        write
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !answer.windows(2).any(|w| w == b"\r\n") && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), read.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    drop(writer);
    let line = String::from_utf8_lossy(&answer);
    line.split(' ').nth(1)?.parse().ok()
}

fn request_with_headers(count: usize, size: usize) -> Vec<u8> {
    let mut request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
    let value = "v".repeat(size);
    for i in 0..count {
        request.extend_from_slice(format!("X-Fill-{i}: {value}\r\n").as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_floods_are_refused_and_health_keeps_answering() {
    let Some(t) = gateway("").await else {
        return;
    };
    let target = addr(&t);
    // A normal request passes; a header block just over 64 KiB, or over 100 headers, gets 431.
    assert_eq!(
        status_of(target, request_with_headers(10, 100)).await,
        Some(200)
    );
    assert_eq!(
        status_of(target, request_with_headers(20, 3400)).await,
        Some(431)
    );
    assert_eq!(
        status_of(target, request_with_headers(150, 10)).await,
        Some(431)
    );
    // Many floods at once (200 KB each, in 50 headers): none is served, health answers.
    let floods: Vec<_> = (0..100)
        .map(|_| tokio::spawn(status_of(target, request_with_headers(50, 4000))))
        .collect();
    health_keeps_answering(&t, 5, Duration::from_millis(100), Duration::from_secs(3)).await;
    for flood in floods {
        let status = flood.await.unwrap();
        assert!(
            status.is_none() || status == Some(431),
            "a 200 KB header block was served: {status:?}"
        );
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_answered_408() {
    let Some(t) = gateway("body_read_timeout_seconds = 1").await else {
        return;
    };
    let acme = t.tenant("acme").await;
    let token = t.token(&acme, "codex").await;
    let mut tcp = TcpStream::connect(addr(&t)).await.unwrap();
    let head = format!(
        "POST /t/acme/mcp HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: 1000\r\n\r\n{{\"jsonrpc\":",
        addr(&t)
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut answer))
        .await
        .expect("the gateway must not wait for the body forever")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "the unread body must end the connection: {answer}"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected() {
    let Some(t) = gateway("idle_timeout_seconds = 1").await else {
        return;
    };
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(addr(&t)).await.unwrap();
    let (read, mut write) = tcp.into_split();
    // Pipelined requests sent until the connection breaks, none of whose answers is ever read: the
    // gateway blocks writing answers, stops reading requests, and then the client's writes block
    // too. Only the gateway closing the connection ends them (with a reset or a broken pipe); a
    // gateway that waited on this client forever would leave them blocked forever. The deadline is
    // generous so that a loaded machine does not fail the test; the idle timeout is 1 s.
    let broken = tokio::time::timeout(Duration::from_secs(60), async move {
        let requests = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
        loop {
            if write.write_all(&requests).await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(broken.is_ok(), "the gateway kept a stalled connection open");
    drop(read);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_answers_outlive_the_idle_timeout() {
    let Some(t) = gateway("idle_timeout_seconds = 2").await else {
        return;
    };
    let acme = t.tenant("acme").await;
    t.environment(&acme, "staging", &[]).await;
    let (token_id, token) = t.token_with_id(&acme, "codex").await;
    let grant = t.active_grant(&acme, &token_id, "staging", 5, 600).await;
    let client = connect(&t.mcp_url("acme"), &token).await;
    // Five seconds without a state change and without progress notifications: only the SSE
    // keep-alives move on the connection.
    let started = Instant::now();
    let waited = client
        .call_tool(
            CallToolRequestParams::new("grant_status").with_arguments(
                json!({"grant_id": grant, "wait_seconds": 5})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        )
        .await
        .expect("a long answer is not cut off");
    assert!(started.elapsed() >= Duration::from_secs(5));
    assert_eq!(waited.structured_content.unwrap()["state"], "active");
    client.cancel().await.unwrap();
    t.stop().await;
}

/// `initialize` with `token`: the status, the session id, and the JSON-RPC message answered.
async fn open_session(t: &TestApp, tenant: &str, token: &str) -> (u16, Option<String>, Value) {
    let response = reqwest::Client::new()
        .post(t.mcp_url(tenant))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"flood","version":"1"}}}"#)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let session = response
        .headers()
        .get("mcp-session-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = parse_mcp_body(&response.text().await.unwrap()).unwrap_or(Value::Null);
    (status, session, body)
}

async fn close_session(t: &TestApp, tenant: &str, token: &str, session: &str) -> u16 {
    reqwest::Client::new()
        .delete(t.mcp_url(tenant))
        .header("authorization", format!("Bearer {token}"))
        .header("mcp-session-id", session)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn assert_session_refused(opened: &(u16, Option<String>, Value), what: &str) {
    let (status, session, body) = opened;
    assert_eq!(*status, 429, "{what}: {body}");
    assert!(session.is_none(), "{what}: a refused session has no id");
    assert_eq!(body["error"]["code"], -32000, "{what}: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("sessions"), "{what}: {message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_caps_refuse_with_a_clear_error() {
    let Some(t) = gateway("max_sessions_per_token = 5\nmax_sessions_per_tenant = 8").await else {
        return;
    };
    let acme = t.tenant("acme").await;
    let beta = t.tenant("beta").await;
    let a = t.token(&acme, "a").await;
    let b = t.token(&acme, "b").await;
    let other = t.token(&beta, "other").await;
    let mut a_sessions = vec![];
    for _ in 0..5 {
        let (status, session, _) = open_session(&t, "acme", &a).await;
        assert_eq!(status, 200);
        a_sessions.push(session.unwrap());
    }
    assert_session_refused(&open_session(&t, "acme", &a).await, "token cap");
    for _ in 0..3 {
        assert_eq!(open_session(&t, "acme", &b).await.0, 200);
    }
    assert_session_refused(&open_session(&t, "acme", &b).await, "tenant cap");
    // Refused sessions were closed at once: rmcp holds only the 8 bound ones.
    assert_eq!(t.app.sessions.len(), 8);
    assert_eq!(t.app.sessions.transport_len().await, 8);
    // Another tenant is not affected.
    assert_eq!(open_session(&t, "beta", &other).await.0, 200);
    // Ending a session frees its place.
    assert_eq!(close_session(&t, "acme", &a, &a_sessions[0]).await, 204);
    assert_eq!(open_session(&t, "acme", &a).await.0, 200);
    // The official Python SDK reports the refusal as an error naming the cause.
    if let Some(python) = crate::processes::python() {
        let output = std::process::Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/clients/python_client.py"
            ))
            .args(["--protocol", "2025-11-25", &t.mcp_url("acme")])
            .env("CUSTODIAN_TOKEN", &a)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("open MCP sessions"), "{stderr}");
    }
    t.stop().await;
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Opens `count` sessions for `token`, 25 at a time.
async fn open_sessions(t: &TestApp, token: &str, count: usize) -> Vec<String> {
    let mut sessions = vec![];
    while sessions.len() < count {
        let batch = (count - sessions.len()).min(25);
        let opened =
            futures::future::join_all((0..batch).map(|_| open_session(t, "acme", token))).await;
        for (status, session, _) in opened {
            assert_eq!(status, 200);
            sessions.push(session.unwrap());
        }
    }
    sessions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_sessions_are_released() {
    let Some(t) = gateway("max_sessions_per_token = 1000").await else {
        return;
    };
    let acme = t.tenant("acme").await;
    let token = t.token(&acme, "codex").await;
    let before = rss_kib();
    let sessions = open_sessions(&t, &token, 200).await;
    assert_eq!(t.app.sessions.len(), 200);
    assert_eq!(t.app.sessions.transport_len().await, 200);
    let peak = rss_kib();
    for batch in sessions.chunks(25) {
        let closed = futures::future::join_all(
            batch
                .iter()
                .map(|session| close_session(&t, "acme", &token, session)),
        )
        .await;
        assert!(closed.iter().all(|status| *status == 204), "{closed:?}");
    }
    assert_eq!(t.app.sessions.len(), 0);
    assert_eq!(t.app.sessions.transport_len().await, 0);
    eprintln!(
        "RSS (KiB): before {before:?}, with 200 sessions {peak:?}, after closing them {:?}",
        rss_kib()
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_expire_and_are_released() {
    let Some(t) = gateway("max_sessions_per_token = 1000\nsession_idle_timeout_seconds = 2").await
    else {
        return;
    };
    let acme = t.tenant("acme").await;
    let token = t.token(&acme, "codex").await;
    let sessions = open_sessions(&t, &token, 50).await;
    assert!(t.app.sessions.transport_len().await > 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while (t.app.sessions.transport_len().await > 0 || !t.app.sessions.is_empty())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(t.app.sessions.len(), 0);
    assert_eq!(t.app.sessions.transport_len().await, 0);
    // An expired session is unknown; the token opens new ones.
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let stale = reqwest::Client::new()
        .post(t.mcp_url("acme"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &sessions[0])
        .body(list)
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 404);
    assert_eq!(open_session(&t, "acme", &token).await.0, 200);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_file_limit_caps_connections_instead_of_exhausting_them() {
    use crate::processes::{CUSTODIAN, Proc, free_port, wait_healthy};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("custodian.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nheader_read_timeout_seconds = 2\n\n[database]\nurl = \"sqlite://{}/custodian.db\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let key = custodian::keys::MasterKey::generate()
        .to_base64()
        .to_string();
    let log = dir.path().join("gateway.log");
    // The gateway as a service manager might start it: 300 open files at most.
    let _gateway = Proc(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n 300 && exec {CUSTODIAN} serve --config {}",
                config.display()
            ))
            .env_remove("CUSTODIAN_CONFIG")
            .env("CUSTODIAN_MASTER_KEY", key)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&format!("{base}/healthz")).await;
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // More slowloris connections than the process can hold files.
    let attackers: Vec<_> = (0..400)
        .map(|_| {
            tokio::spawn(slowloris(
                target,
                Duration::from_millis(200),
                Duration::from_secs(30),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for probe in 0..6 {
        let started = Instant::now();
        let answer = http.get(format!("{base}/readyz")).send().await;
        assert!(
            answer.as_ref().is_ok_and(|r| r.status() == 200),
            "probe {probe} after {:?}: {answer:?}\n{}",
            started.elapsed(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut closed = vec![];
    for attacker in attackers {
        closed.push(attacker.await.unwrap());
    }
    all_cut_off_within(&closed, Duration::from_secs(20));
}
