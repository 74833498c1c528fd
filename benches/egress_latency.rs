//! Egress benchmark: what the runner's proxy adds to an HTTPS request, measured inside one run on
//! loopback after the first connection (keep-alive), against a direct request in the same run.
//!
//! A local HTTPS API (its own CA, trusted by the runner's upstream TLS) is listed twice for the run:
//! as `https://127.0.0.2:PORT` with an injected credential (the proxy terminates the run's TLS with
//! the run's CA, adds the header and forwards over a verified TLS connection), and as a
//! `tcp:127.0.0.2:PORT` forward, which is the run's only direct path (TLS end to end, bytes
//! relayed). A Python `http.client` in the run times each request on one connection per path.
//!
//! `cargo bench --bench egress_latency [-- --calls N]` (as root or with user namespaces, with
//! bubblewrap and python3) prints p50/p90/p99 per path and the proxy's added milliseconds.
//! Goal: ≤ 1 ms p50 added.

mod common;
#[path = "../tests/integration/https_api.rs"]
mod https_api;

use common::arg;
use custodian_protocol::{EgressRule, ExecRequest, InjectHeader};

const HELPER: &str = env!("CARGO_BIN_EXE_custodian");

const SCRIPT: &str = r#"
import http.client, json, os, ssl, sys, time
port, calls = int(sys.argv[1]), int(sys.argv[2])
with open('/tmp/api-ca.pem', 'w') as f:
    f.write(sys.argv[3])
def timed(conn):
    out = []
    for _ in range(calls + 1):
        start = time.perf_counter()
        conn.request('GET', '/ping')
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
        out.append((time.perf_counter() - start) * 1e3)
    return out[1:]
direct = http.client.HTTPSConnection('127.0.0.1', port, context=ssl.create_default_context(cafile='/tmp/api-ca.pem'))
proxied = http.client.HTTPSConnection('127.0.0.1', 3128, context=ssl.create_default_context(cafile=os.environ['SSL_CERT_FILE']))
proxied.set_tunnel('127.0.0.2', port)
print(json.dumps({'direct': timed(direct), 'proxied': timed(proxied)}))
"#;

fn percentiles(samples: &mut [f64]) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    (at(50), at(90), at(99))
}

fn main() {
    let calls = arg("--calls", 500);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let dir = tempfile::tempdir().expect("temp dir");
        let (api, seen) = https_api::serve("127.0.0.2", &["127.0.0.1", "127.0.0.2"], dir.path()).await;
        let sandbox = custodian_runner::sandbox::Sandbox::new(
            custodian_runner::sandbox::helper_beside(HELPER.as_ref()),
            custodian_runner::config::SandboxConfig::default(),
            custodian_runner::Isolation::Full,
        );
        let upstream = custodian_runner::egress::upstream_tls(Some(&dir.path().join("ca.pem")))
            .expect("upstream TLS");
        let rule = |scheme: &str, inject| EgressRule {
            scheme: scheme.into(),
            host: "127.0.0.2".into(),
            port: api.port(),
            allow_private: true,
            inject,
        };
        let request = ExecRequest {
            exec_id: "bench".into(),
            grant_id: "bench".into(),
            tenant: "bench".into(),
            argv: vec![
                "/usr/bin/python3".into(),
                "-c".into(),
                SCRIPT.into(),
                api.port().to_string(),
                calls.to_string(),
                std::fs::read_to_string(dir.path().join("ca.pem")).expect("CA"),
            ],
            stdin: None,
            timeout_ms: 300_000,
            max_output_bytes: 8 << 20,
            secrets: vec![],
            traceparent: None,
            egress: vec![
                rule(
                    "https",
                    Some(InjectHeader {
                        secret: "BENCH_TOKEN".into(),
                        value: "bench-token-value-123".into(),
                        header: "Authorization".into(),
                        template: "Bearer {value}".into(),
                        basic_user: None,
                    }),
                ),
                rule("tcp", None),
            ],
            files: vec![],
            env: Vec::new(),
        };
        let response = custodian_runner::exec::run(&sandbox, &upstream, request, Default::default())
            .await
            .expect("exec");
        assert_eq!(response.exit_code, Some(0), "the run failed: {}", response.stderr);
        let times: serde_json::Value = serde_json::from_str(response.stdout.trim()).expect("timings");
        let seen = seen.lock().expect("lock").clone();
        assert!(seen.iter().all(|s| s.path == "/ping"), "unexpected requests");
        let injected = seen
            .iter()
            .filter(|s| s.authorization.as_deref() == Some("Bearer bench-token-value-123"))
            .count();
        assert_eq!(injected, calls + 1, "every proxied request carries the credential");
        let series = |name: &str| -> Vec<f64> {
            times[name]
                .as_array()
                .expect("series")
                .iter()
                .map(|v| v.as_f64().expect("ms"))
                .collect()
        };
        let (mut direct, mut proxied) = (series("direct"), series("proxied"));
        let (d50, d90, d99) = percentiles(&mut direct);
        let (p50, p90, p99) = percentiles(&mut proxied);
        println!("HTTPS GET on one keep-alive connection, {calls} requests each, inside one run:");
        println!("  direct (tcp forward, TLS end to end)  p50 {d50:.3} ms  p90 {d90:.3} ms  p99 {d99:.3} ms");
        println!("  proxied (TLS terminated, header added) p50 {p50:.3} ms  p90 {p90:.3} ms  p99 {p99:.3} ms");
        println!("  added by the proxy: p50 {:.3} ms, p90 {:.3} ms (goal: ≤ 1 ms p50)", p50 - d50, p90 - d90);
    });
}
