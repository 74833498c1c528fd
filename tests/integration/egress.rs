//! Egress under a grant, with real clients inside real runs: `curl` and Python `requests` reach a
//! local HTTPS API (its own test CA, trusted by the runner through `[egress] ca_file`) through the
//! runner's proxy, which adds the environment's credential; the run's environment, `environ` and
//! files hold no trace of it. Everything not listed is unreachable: an unlisted host, a raw IP, the
//! metadata address, the gateway's port and PostgreSQL, which `psql` reaches only through a listed
//! TCP forward. The runner's spans (decoded OTLP) and the audit log show allowed and refused egress.
//! Refusals are asserted by what did not arrive (a listener that saw no connection) or by the
//! proxy's status, each with a positive control.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::harness::{Backend, TestApp};
use crate::https_api;
use crate::mcp_clients::connect;
use crate::runners::{Pki, TestRunner, run};

/// The test API listens here: a loopback address that is not in the run's `NO_PROXY`.
const API_IP: &str = "127.0.0.2";

/// A listener that must never see a connection from a run; returns its address and a counter.
async fn tripwire(ip: &str) -> (SocketAddr, Arc<Mutex<usize>>) {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(Mutex::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while listener.accept().await.is_ok() {
            *counter.lock().unwrap() += 1;
        }
    });
    (addr, hits)
}

/// Decodes `base64 of gzip` printed by a run.
pub(crate) fn gunzip_base64(text: &str) -> String {
    let bytes = STANDARD.decode(text.trim()).expect("base64 from the run");
    let mut gzip = Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip on the host");
    gzip.stdin.take().unwrap().write_all(&bytes).unwrap();
    let output = gzip.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stdout(result: &Value) -> &str {
    result["stdout"].as_str().unwrap_or_default()
}

/// Every run's output was clean: nothing had to be redacted (a redaction would mean the value
/// reached the run).
fn assert_nothing_redacted(result: &Value) {
    assert_eq!(result["redactions"], json!({}), "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_reach_only_what_their_environment_lists_with_credentials_they_never_hold() {
    if !crate::processes::require_root() {
        return;
    }
    let Some(_) = crate::runners::runner_binary() else {
        return;
    };
    let python_requests = Command::new("/usr/bin/python3")
        .args(["-c", "import requests"])
        .status()
        .is_ok_and(|s| s.success());
    if !python_requests {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the system python3 needs the requests package (apt install python3-requests)"
        );
        eprintln!("skipping: /usr/bin/python3 has no requests package");
        return;
    }
    let (endpoint, spans, _) = crate::telemetry::receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let (api, seen) = https_api::serve(API_IP, &[API_IP], dir.path()).await;
    let (unlisted, unlisted_hits) = tripwire(API_IP).await;
    let pki = Pki::new();
    let (cert, key) = pki.gateway();
    let Some(t) = TestApp::builder(Backend::Sqlite)
        .max_output_bytes(256 << 10)
        .runner_tls(&pki.ca(), &cert, &key)
        .start()
        .await
    else {
        return;
    };
    let acme = t.tenant("acme").await;
    let canary = format!("cnry{}", hex::encode(rand::random::<[u8; 16]>()));
    t.environment(&acme, "api", &["API_TOKEN"]).await;
    t.environment(&acme, "closed", &[]).await;
    custodian::secrets::set(
        t.db(),
        &t.app.master_key,
        &acme,
        "api",
        "API_TOKEN",
        canary.as_bytes(),
        1,
    )
    .await
    .unwrap();
    let rule = |destination: &str, inject| custodian::egress::Rule {
        destination: custodian::egress::parse_destination(destination).unwrap(),
        allow_private: true,
        inject,
    };
    let bearer = custodian::egress::injection(
        Some("API_TOKEN".into()),
        Some("Authorization: Bearer {value}"),
        None,
    )
    .unwrap();
    for rule in [
        rule(&format!("https://{api}"), bearer),
        rule("tcp:127.0.0.1:5432", None),
    ] {
        custodian::egress::add(t.db(), &acme, "api", &rule, 1)
            .await
            .unwrap();
    }
    let runner = TestRunner::start_with_config(
        &pki.ca(),
        &pki.runner("acme", "r1"),
        "acme",
        "r1",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        &format!(
            "[egress]\nca_file = \"{}\"\n",
            dir.path().join("ca.pem").display()
        ),
    )
    .await
    .unwrap();
    custodian::runners::add(t.db(), &acme, "r1", "default", &runner.url, 1)
        .await
        .unwrap();
    let (token_id, token) = t.token_with_id(&acme, "codex").await;
    let client = connect(&t.mcp_url("acme"), &token).await;
    let grant = t.active_grant(&acme, &token_id, "api", 100, 600).await;
    let closed = t.active_grant(&acme, &token_id, "closed", 100, 600).await;
    let run_in = |grant: &str, command: String| {
        let call = json!({"grant_id": grant, "command": command, "timeout_seconds": 60});
        let peer = client.peer().clone();
        async move { run(&peer, call).await.expect("run") }
    };

    // list_environments shows the credential by name and how it is used, not as a variable.
    let listed = client
        .call_tool(rmcp::model::CallToolRequestParams::new("list_environments"))
        .await
        .unwrap()
        .structured_content
        .unwrap();
    let api_env = listed["environments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "api")
        .unwrap()
        .clone();
    assert_eq!(api_env["secret_names"], json!([]), "{api_env}");
    assert_eq!(
        api_env["egress"][0]["credential"],
        json!("Authorization: Bearer <API_TOKEN>"),
        "{api_env}"
    );
    assert!(!listed.to_string().contains(&canary));

    // A run with egress still gets its stdin (the runner waits for its listeners first).
    let piped = run(
        client.peer(),
        json!({"grant_id": grant, "argv": ["cat"], "stdin": "stdin reaches the run"}),
    )
    .await
    .expect("run");
    assert_eq!(stdout(&piped), "stdin reaches the run", "{piped}");

    // curl and Python requests reach the API through the proxy; a forged header is replaced.
    let url = format!("https://{api}/v1/items?token=query-secret");
    let curl = run_in(
        &grant,
        format!("curl -sS --fail -H 'Authorization: Bearer forged' '{url}'"),
    )
    .await;
    assert_eq!(stdout(&curl), "the API says hello", "{curl}");
    assert_nothing_redacted(&curl);
    let python = run_in(
        &grant,
        format!(
            "/usr/bin/python3 -c \"import requests; r = requests.get('https://{api}/v1/python'); print(r.status_code, r.text)\""
        ),
    )
    .await;
    assert_eq!(stdout(&python).trim(), "200 the API says hello", "{python}");
    assert_nothing_redacted(&python);
    let received = seen.lock().unwrap().clone();
    assert_eq!(received.len(), 2, "{received:?}");
    for request in &received {
        assert_eq!(
            request.authorization.as_deref(),
            Some(format!("Bearer {canary}").as_str()),
            "{request:?}"
        );
    }
    assert_eq!(received[0].path, "/v1/items?token=query-secret");

    // The run holds no trace of the value: environment, environ, its files (also base64); the
    // bundle of system roots is searched where the run's CA was appended.
    let search = run_in(
        &grant,
        "printenv | gzip -c | base64 -w0; echo; cat /proc/self/environ | gzip -c | base64 -w0; echo; \
         { find /work /tmp /dev/shm -type f ! -name custodian-egress-ca-bundle.pem -exec cat {} +; \
           tail -c 8192 /tmp/custodian-egress-ca-bundle.pem; } | gzip -c | base64 -w0; echo"
            .to_owned(),
    )
    .await;
    assert_nothing_redacted(&search);
    assert_eq!(search["truncated"], json!(false), "{search}");
    let parts: Vec<String> = stdout(&search).lines().map(gunzip_base64).collect();
    assert_eq!(parts.len(), 3, "{search}");
    // Positive controls: the proxy variables and the CA bundle are what was searched.
    assert!(
        parts[0].contains("HTTPS_PROXY=http://127.0.0.1:3128"),
        "{}",
        parts[0]
    );
    assert!(parts[1].contains("SSL_CERT_FILE="), "{}", parts[1]);
    assert!(
        parts[2].contains("BEGIN CERTIFICATE"),
        "the CA files were not searched"
    );
    let encoded = STANDARD.encode(&canary);
    for (what, text) in ["printenv", "environ", "files"].iter().zip(&parts) {
        assert!(!text.contains(&canary), "{what} holds the credential");
        assert!(
            !text.contains(&encoded),
            "{what} holds the credential in base64"
        );
    }

    // Unreachable: an unlisted name, a raw IP, the metadata address, the gateway, PostgreSQL.
    let gateway_port = t.base_url.rsplit(':').next().unwrap().to_owned();
    let probes = run_in(
        &grant,
        format!(
            "c() {{ curl -sS -o /dev/null --max-time 5 -w '%{{http_code}}/%{{http_connect}}' \"$@\" 2>/dev/null; echo \" $?\"; }}; \
             c https://unlisted.example/; \
             c https://{unlisted}/; c --noproxy '*' https://{unlisted}/; \
             c http://169.254.169.254/latest/meta-data/; c --noproxy '*' http://169.254.169.254/latest/meta-data/; \
             c --noproxy '' http://127.0.0.1:{gateway_port}/health; c --noproxy '*' http://127.0.0.1:{gateway_port}/health; \
             c --noproxy '' https://127.0.0.1:5432/"
        ),
    )
    .await;
    let lines: Vec<&str> = stdout(&probes).lines().collect();
    assert_eq!(
        lines,
        [
            "000/403 56", // CONNECT refused by the proxy: not listed
            "000/403 56", // a raw IP that is not listed
            "000/000 7",  // ... and directly: no route out of the run
            "403/000 0",  // the metadata address through the proxy: refused
            "000/000 7",  // ... and directly: no route
            "403/000 0",  // the gateway through the proxy: refused
            "000/000 7",  // ... and directly: nothing listens on the run's own loopback
            "000/403 56", // PostgreSQL through the proxy: refused
        ],
        "{probes}"
    );
    assert_eq!(
        *unlisted_hits.lock().unwrap(),
        0,
        "a run reached an unlisted port"
    );
    // Positive control: the host itself reaches the gateway.
    assert!(
        reqwest::get(format!("{}/health", t.base_url)).await.is_ok(),
        "the gateway is not reachable from the host; the probe would prove nothing"
    );

    // psql reaches the listed PostgreSQL through the forward, and only there.
    let psql =
        "psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -tAc 'select 40 + 2' 2>&1; echo \" $?\"";
    let forwarded = run_in(&grant, psql.to_owned()).await;
    assert_eq!(stdout(&forwarded).trim(), "42\n 0", "{forwarded}");
    let refused = run_in(&closed, psql.to_owned()).await;
    assert!(!stdout(&refused).contains("42"), "{refused}");
    assert!(stdout(&refused).trim().ends_with(" 2"), "{refused}");

    // The audit log counts allowed and refused egress per destination (each outcome is written
    // just after its answer: wait until every exec has one).
    let mut records = Vec::new();
    for _ in 0..100 {
        records = custodian::audit::for_grant(t.db(), &acme, &grant)
            .await
            .unwrap();
        let count = |kind: &str| records.iter().filter(|r| r.kind == kind).count();
        if count("exec.finished") == count("exec") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut allowed = std::collections::BTreeMap::<String, u64>::new();
    let mut refused_n = std::collections::BTreeMap::<String, u64>::new();
    for record in records.iter().filter(|r| r.kind == "exec.finished") {
        let detail: Value = serde_json::from_str(&record.detail).unwrap();
        for (host, count) in detail["egress"].as_object().unwrap() {
            *allowed.entry(host.clone()).or_default() += count["allowed"].as_u64().unwrap();
            *refused_n.entry(host.clone()).or_default() += count["refused"].as_u64().unwrap();
        }
    }
    assert!(allowed[&api.to_string()] >= 2, "{allowed:?}");
    assert_eq!(allowed["127.0.0.1:5432"], 1, "{allowed:?}");
    assert_eq!(refused_n["169.254.169.254:80"], 1, "{refused_n:?}");
    assert_eq!(refused_n["unlisted.example:443"], 1, "{refused_n:?}");
    assert_eq!(refused_n[&unlisted.to_string()], 1, "{refused_n:?}");
    assert!(!records.iter().any(|r| r.detail.contains(&canary)));

    // Spans: one per request or connection under the run's span, allowed and refused, with the
    // path but not the query, never a header.
    runner.stop(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = spans.lock().unwrap().clone();
    let egress: Vec<_> = spans.iter().filter(|s| s.name == "runner.egress").collect();
    let exec_ids: Vec<&str> = spans
        .iter()
        .filter(|s| s.name == "runner.exec")
        .map(|s| s.span_id.as_str())
        .collect();
    let attr = |s: &crate::telemetry::ReceivedSpan, k: &str| {
        s.attributes.get(k).cloned().unwrap_or_default()
    };
    let api_host = API_IP.to_owned();
    let items = egress
        .iter()
        .find(|s| attr(s, "custodian.egress.path") == "/v1/items")
        .unwrap_or_else(|| panic!("no span for the API request: {egress:?}"));
    assert_eq!(attr(items, "custodian.egress.host"), api_host);
    assert_eq!(attr(items, "custodian.egress.method"), "GET");
    assert_eq!(attr(items, "custodian.egress.status"), "200");
    assert_eq!(attr(items, "custodian.egress.allowed"), "true");
    assert_eq!(attr(items, "custodian.egress.bytes"), "18");
    assert!(
        exec_ids.contains(&items.parent_span_id.as_str()),
        "{items:?}"
    );
    let metadata = egress
        .iter()
        .find(|s| attr(s, "custodian.egress.host") == "169.254.169.254")
        .unwrap_or_else(|| panic!("no span for the refused metadata request: {egress:?}"));
    assert_eq!(attr(metadata, "custodian.egress.allowed"), "false");
    assert_eq!(attr(metadata, "custodian.egress.refused"), "not listed");
    assert!(
        egress
            .iter()
            .any(|s| attr(s, "custodian.egress.method") == "TCP"
                && attr(s, "custodian.egress.allowed") == "true"),
        "{egress:?}"
    );
    for span in &spans {
        for value in span.attributes.values() {
            assert!(!value.contains(&canary), "{span:?}");
            assert!(!value.contains("query-secret"), "{span:?}");
            assert!(!value.contains("forged"), "{span:?}");
        }
    }
    t.stop().await;
}
