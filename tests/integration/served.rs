//! The `custodian serve` binary with a real runner, as an operator runs it: a `run` whose output
//! hits the cap reaches the official Python SDK whole with default settings, and at `trace` level
//! no tool result, secret or token reaches the logs or the exported spans.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};

use crate::harness::{Backend, TestApp};
use crate::mcp_clients::connect;
use crate::processes::{CUSTODIAN, Proc, free_port, python, python_client_args, wait_healthy};
use crate::runners::{Pki, TestRunner};

/// The environment's secret; characters that encodings change.
const SECRET: &str = "sEcReT-91b2/+q=Zz~x";

/// A `custodian serve` process on a database seeded through an in-process gateway.
struct Served {
    seed: TestApp,
    _pki: Pki,
    runner: TestRunner,
    gateway: Option<Proc>,
    log: PathBuf,
    url: String,
    token: String,
    grant: String,
    _dir: tempfile::TempDir,
}

impl Served {
    /// Starts the runner and the gateway; `log` is the gateway's `[log] filter` (default when
    /// `None`), `env` extra environment for both processes.
    async fn start(log: Option<&str>, env: &[(&str, &str)]) -> Option<Self> {
        let pki = Pki::new();
        let seed = TestApp::builder(Backend::Sqlite).start().await?;
        let acme = seed.tenant("acme").await;
        seed.environment(&acme, "staging", &[]).await;
        custodian::secrets::set(
            seed.db(),
            &seed.app.master_key,
            &acme,
            "staging",
            "SECRET",
            SECRET.as_bytes(),
            1,
        )
        .await
        .unwrap();
        let mut runner_env = vec![("RUST_LOG", log.unwrap_or("info"))];
        runner_env.extend_from_slice(env);
        let runner = TestRunner::start_with_env(
            &pki.ca(),
            &pki.runner("acme", "r1"),
            "acme",
            "r1",
            &runner_env,
        )
        .await?;
        custodian::runners::add(seed.db(), &acme, "r1", "default", &runner.url, 1)
            .await
            .unwrap();
        let (token_id, token) = seed.token_with_id(&acme, "codex").await;
        let grant = seed
            .active_grant(&acme, &token_id, "staging", 20, 600)
            .await;

        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pki.gateway();
        let port = free_port();
        let log_section = log.map_or(String::new(), |f| format!("[log]\nfilter = \"{f}\"\n"));
        let config = dir.path().join("custodian.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[database]\nurl = \"{}\"\n\n[runners]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n{log_section}",
                seed.database().url,
                pki.ca().display(),
                cert.display(),
                key.display(),
            ),
        )
        .unwrap();
        let log = dir.path().join("gateway.log");
        let gateway = Proc(
            Command::new(CUSTODIAN)
                .args(["serve", "--config"])
                .arg(&config)
                .env_remove("CUSTODIAN_CONFIG")
                .env_remove("RUST_LOG")
                .env("CUSTODIAN_MASTER_KEY", &seed.database().master_key)
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        wait_healthy(&format!("http://127.0.0.1:{port}/healthz")).await;
        Some(Self {
            seed,
            _pki: pki,
            runner,
            gateway: Some(gateway),
            log,
            url: format!("http://127.0.0.1:{port}/t/acme/mcp"),
            token,
            grant,
            _dir: dir,
        })
    }

    /// Stops both processes (SIGTERM: they flush their telemetry) and returns the gateway's and
    /// the runner's logs.
    async fn stop(mut self) -> (String, String) {
        if let Some(gateway) = self.gateway.take() {
            assert!(gateway.terminate(Duration::from_secs(15)).success());
        }
        let runner_log = self.runner.log();
        self.runner.stop(Duration::from_secs(10));
        self.seed.stop().await;
        (std::fs::read_to_string(&self.log).unwrap(), runner_log)
    }
}

/// What a command printed, as the agent should get it back.
fn redacted(text: &str) -> String {
    text.replace(SECRET, "[REDACTED:SECRET]")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_at_the_output_cap_reaches_the_python_sdk_whole() {
    let Some(python) = python() else {
        return;
    };
    let Some(served) = Served::start(None, &[]).await else {
        return;
    };
    // Far beyond the default cap on both streams: stdout a line with the secret, quoted, 30,000
    // times; stderr control characters, the costliest output to encode in JSON.
    let line = format!("\"{SECRET}\"\n");
    let command = "for i in $(seq 30000); do printf '\"%s\"\\n' \"$SECRET\"; done; \
                   head -c 400000 /dev/zero | tr '\\0' '\\001' >&2";
    let full_stdout = redacted(&line.repeat(30_000));
    for protocol in [None, Some("2025-03-26")] {
        let mut args = vec![];
        if let Some(protocol) = protocol {
            args.extend(["--protocol", protocol]);
        }
        args.extend(["--grant", &served.grant, "--command", command, &served.url]);
        let seen = python_client_args(&python, &served.token, &args);
        let run = &seen["run"];
        assert_eq!(run["is_error"], false, "{protocol:?}");
        let result = &run["structured"];
        assert_eq!(result["exit_code"], 0);
        assert_eq!(result["truncated"], true, "{protocol:?}");
        let stdout = result["stdout"].as_str().unwrap();
        let stderr = result["stderr"].as_str().unwrap();
        assert!(
            full_stdout.starts_with(stdout),
            "{protocol:?}: stdout is not intact"
        );
        assert!(stdout.len() > 150_000, "{protocol:?}: {}", stdout.len());
        assert!(!stderr.is_empty() && stderr.chars().all(|c| c == '\u{1}'));
        // The counts describe the output returned.
        let labels = stdout.matches("[REDACTED:SECRET]").count();
        assert_eq!(
            result["redactions"],
            json!({"SECRET": labels}),
            "{protocol:?}"
        );
        // The output travels once (twice only for 2025-03-26, whose clients read text only).
        let text = run["text"][0].as_str().unwrap();
        match protocol {
            None => assert!(text.len() < 1000, "{text}"),
            Some(_) => assert_eq!(&serde_json::from_str::<Value>(text).unwrap(), result),
        }
        assert!(!seen.to_string().contains(SECRET));
    }
    // At the default filter the gateway logs its own lines, not rmcp's per-session ones.
    let (gateway_log, _) = served.stop().await;
    assert!(gateway_log.contains("run finished"), "{gateway_log}");
    assert!(!gateway_log.contains("rmcp"), "{gateway_log}");
}

/// An OTLP/HTTP endpoint keeping every request body it receives.
async fn otlp_sink() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let sink = bodies.clone();
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let sink = sink.clone();
        async move {
            sink.lock().unwrap().push(body.to_vec());
            (
                [("content-type", "application/x-protobuf")],
                Vec::<u8>::new(),
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), bodies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_tool_result_or_secret_reaches_logs_or_spans_at_trace() {
    let (endpoint, exported) = otlp_sink().await;
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())];
    // Everything at trace, rmcp included (by default rmcp is held at warn).
    let Some(served) = Served::start(Some("trace,rmcp=trace"), &env).await else {
        return;
    };
    // Output the agent sees but that appears in no argument: the halves are joined by the shell.
    let result_canary = "toolresult-6e1f-canary";
    let command =
        "printf '%s-%s\\n' toolresult 6e1f-canary; echo \"$SECRET\"; echo \"$SECRET\" >&2";
    let client = connect(&served.url, &served.token).await;
    let listed = client
        .call_tool(CallToolRequestParams::new("list_environments"))
        .await
        .unwrap();
    assert_eq!(listed.is_error, Some(false));
    let ran = client
        .call_tool(
            CallToolRequestParams::new("run").with_arguments(
                json!({"grant_id": served.grant, "command": command})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        )
        .await
        .unwrap();
    let result = ran.structured_content.unwrap();
    assert_eq!(
        result["stdout"],
        format!("{result_canary}\n[REDACTED:SECRET]\n"),
        "the canary is a real tool result"
    );
    client.cancel().await.unwrap();
    let token = served.token.clone();
    let (gateway_log, runner_log) = served.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The logs really are at trace, and cover the run.
    assert!(gateway_log.contains("TRACE"), "gateway log is not at trace");
    assert!(gateway_log.contains("DEBUG rmcp"), "rmcp is quiet");
    assert!(gateway_log.contains("run finished"));
    let exported = exported.lock().unwrap().clone();
    assert!(!exported.is_empty(), "no spans were exported");
    let exported: Vec<u8> = exported.concat();
    let token_secret = &token[token.len() - 43..];
    for (what, text) in [
        ("gateway log", gateway_log.as_bytes()),
        ("runner log", runner_log.as_bytes()),
        ("exported spans", exported.as_slice()),
    ] {
        for (canary, name) in [
            (result_canary, "tool result"),
            (SECRET, "secret"),
            (token_secret, "agent token"),
        ] {
            assert!(
                !text.windows(canary.len()).any(|w| w == canary.as_bytes()),
                "the {name} reached the {what}"
            );
        }
    }
}
