//! `run` end to end with a real `custodian-runner` process, real certificates and real mTLS:
//! exfiltration attempts, grant checks, identity checks, and the sandbox.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};

use crate::harness::{Backend, TestApp};
use crate::mcp_clients::connect;
use crate::on_both_backends;
use crate::processes::{CUSTODIAN, Proc, RunAs};
use custodian::tenants::TenantId;
use custodian_protocol::Identity;

on_both_backends!(
    exfiltration_attempts_never_return_the_canary,
    grants_that_cannot_run_are_refused_before_any_secret_leaves,
    changes_made_elsewhere_reach_runs_within_a_second,
    runners_and_gateways_must_prove_their_identities,
    timeouts_kill_the_whole_tree_and_leave_nothing_behind,
    spare_sandboxes_serve_one_run_each_with_only_its_own_input,
);

pub(crate) const TD: &str = "custodian.local";
/// Contains characters that base64, percent-encoding and hex all change.
const CANARY: &str = "cAnArY-7f3a/9+Qx=zz~k";

pub(crate) type Client = rmcp::service::RunningService<rmcp::RoleClient, rmcp::model::ClientConfig>;

/// A CA and certificates in a temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        custodian::pki::init(dir.path(), TD).unwrap();
        Self { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn issue(&self, identity: Identity, days: i64, file: &str) -> (PathBuf, PathBuf) {
        custodian::pki::issue(
            self.dir.path(),
            &identity,
            &["127.0.0.1".to_owned()],
            days,
            &self.dir.path().join(file),
        )
        .unwrap()
    }

    pub fn gateway(&self) -> (PathBuf, PathBuf) {
        self.issue(
            Identity::Gateway {
                trust_domain: TD.into(),
            },
            30,
            "gateway",
        )
    }

    pub fn runner(&self, tenant: &str, name: &str) -> (PathBuf, PathBuf) {
        self.issue(
            Identity::Runner {
                trust_domain: TD.into(),
                tenant: tenant.into(),
                name: name.into(),
            },
            30,
            &format!("runner-{tenant}-{name}"),
        )
    }
}

/// A `custodian-runner` process.
pub struct TestRunner {
    pub url: String,
    /// Where its configuration and TLS material live on this host.
    pub files: RunnerFiles,
    log: PathBuf,
    work_root: tempfile::TempDir,
    process: Proc,
    _dir: tempfile::TempDir,
}

/// A runner's configuration file and its copies of the TLS material, owned by the runner's user.
pub struct RunnerFiles {
    pub config: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

pub(crate) fn runner_binary() -> Option<PathBuf> {
    let path = Path::new(CUSTODIAN).with_file_name("custodian-runner");
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "custodian-runner must be built in CI (cargo nextest run --workspace builds it)"
    );
    eprintln!(
        "skipping: {} is not built (cargo build --workspace)",
        path.display()
    );
    None
}

impl TestRunner {
    pub async fn start(
        ca: &Path,
        cert: &(PathBuf, PathBuf),
        tenant: &str,
        name: &str,
    ) -> Option<Self> {
        Self::start_with_env(ca, cert, tenant, name, &[]).await
    }

    /// Like [`TestRunner::start`], with extra environment (e.g. an OTLP endpoint).
    pub async fn start_with_env(
        ca: &Path,
        cert: &(PathBuf, PathBuf),
        tenant: &str,
        name: &str,
        env: &[(&str, &str)],
    ) -> Option<Self> {
        Self::spawn(ca, cert, tenant, name, env, RunAs::Root, "").await
    }

    /// Like [`TestRunner::start_with_env`], with `extra` appended to its configuration file.
    pub async fn start_with_config(
        ca: &Path,
        cert: &(PathBuf, PathBuf),
        tenant: &str,
        name: &str,
        env: &[(&str, &str)],
        extra: &str,
    ) -> Option<Self> {
        Self::spawn(ca, cert, tenant, name, env, RunAs::Root, extra).await
    }

    /// Like [`TestRunner::start`], running as `user`.
    pub async fn start_as(
        ca: &Path,
        cert: &(PathBuf, PathBuf),
        tenant: &str,
        name: &str,
        user: RunAs,
    ) -> Option<Self> {
        Self::spawn(ca, cert, tenant, name, &[], user, "").await
    }

    async fn spawn(
        ca: &Path,
        cert: &(PathBuf, PathBuf),
        tenant: &str,
        name: &str,
        env: &[(&str, &str)],
        user: RunAs,
        extra: &str,
    ) -> Option<Self> {
        let binary = runner_binary()?;
        let dir = tempfile::tempdir().unwrap();
        let work_root = tempfile::tempdir().unwrap();
        let port = crate::processes::free_port();
        let files = RunnerFiles {
            config: dir.path().join("runner.toml"),
            cert: dir.path().join("runner.pem"),
            key: dir.path().join("runner.key"),
            ca: dir.path().join("ca.pem"),
        };
        for (from, to) in [(&cert.0, &files.cert), (&cert.1, &files.key)] {
            std::fs::copy(from, to).unwrap();
        }
        std::fs::copy(ca, &files.ca).unwrap();
        std::fs::write(
            &files.config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ntrust_domain = \"{TD}\"\ntenant = \"{tenant}\"\nname = \"{name}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n{extra}",
                files.cert.display(),
                files.key.display(),
                files.ca.display(),
            ),
        )
        .unwrap();
        let log = dir.path().join("runner.log");
        let stderr = std::fs::File::create(&log).unwrap();
        user.own(dir.path());
        user.own(work_root.path());
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(&files.config)
            .env("RUST_LOG", "debug")
            // Anything the runner wrote to disk for a run would land here.
            .env("TMPDIR", work_root.path())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(stderr);
        let process = Proc(user.apply(&mut command).spawn().unwrap());
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Some(Self {
                    url: format!("https://127.0.0.1:{port}"),
                    files,
                    log,
                    work_root,
                    process,
                    _dir: dir,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the runner did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops the runner with SIGTERM (it flushes its telemetry) and waits for it.
    pub fn stop(self, within: Duration) -> std::process::ExitStatus {
        self.process.terminate(within)
    }

    /// Kills the runner with SIGKILL (no clean-up of its own) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.process.0.kill();
        let _ = self.process.0.wait();
    }

    /// The directory the runner's work directories are made in, where the runner has one.
    pub fn work_root(&self) -> &Path {
        self.work_root.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Exec requests the runner accepted.
    /// The spare sandboxes this runner holds: the bubblewrap processes it started with the
    /// helper's `--spare` argument, waiting for a run.
    fn spares(&self) -> Vec<u32> {
        let runner = self.process.0.id();
        crate::processes::host_processes_with("cmdline", "--spare")
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{}/status", p.pid)).is_ok_and(|status| {
                    status.lines().any(|l| {
                        l.strip_prefix("PPid:").map(str::trim) == Some(&runner.to_string())
                    })
                })
            })
            .map(|p| p.pid)
            .collect()
    }

    fn execs(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains(" exec ") || l.ends_with(" exec"))
            .filter(|l| l.contains("secrets="))
            .count()
    }

    /// What runs left in the runner's temp dir (its own read-only copy of /etc excepted).
    fn leftover_files(&self) -> Vec<String> {
        std::fs::read_dir(self.work_root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| !name.starts_with("custodian-runner-etc-"))
            .collect()
    }
}

struct Setup {
    t: TestApp,
    pki: Pki,
    runner: TestRunner,
    client: Client,
    token_id: String,
    acme: TenantId,
}

async fn setup(backend: Backend) -> Option<Setup> {
    runner_binary()?;
    let pki = Pki::new();
    let (cert, key) = pki.gateway();
    let t = TestApp::builder(backend)
        .runner_tls(&pki.ca(), &cert, &key)
        .start()
        .await?;
    let acme = t.tenant("acme").await;
    t.environment(&acme, "staging", &[]).await;
    custodian::secrets::set(
        t.db(),
        &t.app.master_key,
        &acme,
        "staging",
        "CANARY",
        CANARY.as_bytes(),
        1,
    )
    .await
    .unwrap();
    let runner = TestRunner::start(&pki.ca(), &pki.runner("acme", "r1"), "acme", "r1").await?;
    custodian::runners::add(t.db(), &acme, "r1", "default", &runner.url, 1)
        .await
        .unwrap();
    let (token_id, token) = t.token_with_id(&acme, "codex").await;
    let client = connect(&t.mcp_url("acme"), &token).await;
    Some(Setup {
        t,
        pki,
        runner,
        client,
        token_id,
        acme,
    })
}

/// A dispatcher presenting `identity` (certificate and key files) and acme's runner `r1` as
/// registered: the runner reached without the gateway.
fn dispatcher_to_r1(
    s: &Setup,
    (cert, key): (PathBuf, PathBuf),
) -> (custodian::runners::Dispatcher, custodian::runners::Runner) {
    let material = custodian::runners::tls::ClientMaterial::load(&s.pki.ca(), &cert, &key).unwrap();
    let registered = custodian::runners::Runner {
        tenant_id: "acme".into(),
        name: "r1".into(),
        pool: "default".into(),
        url: s.runner.url.clone(),
        created_at: 0,
    };
    (
        custodian::runners::Dispatcher::new(TD.into(), Some(material)),
        registered,
    )
}

/// An exec of `argv` for acme with no secrets, input, egress or files.
fn bare_exec(
    exec_id: &str,
    grant_id: &str,
    argv: Vec<String>,
    timeout_ms: u64,
) -> custodian_protocol::ExecRequest {
    custodian_protocol::ExecRequest {
        exec_id: exec_id.into(),
        grant_id: grant_id.into(),
        tenant: "acme".into(),
        argv,
        stdin: None,
        timeout_ms,
        max_output_bytes: 100,
        secrets: vec![],
        traceparent: None,
        egress: vec![],
        files: vec![],
        env: Vec::new(),
    }
}

/// Calls `run`; an error result or a failed call (gateway gone) is `Err` with its text.
pub(crate) async fn run(
    client: &rmcp::Peer<rmcp::RoleClient>,
    args: Value,
) -> Result<Value, String> {
    let result = client
        .call_tool(
            CallToolRequestParams::new("run").with_arguments(args.as_object().unwrap().clone()),
        )
        .await
        .map_err(|e| format!("the call failed: {e}"))?;
    if result.is_error == Some(true) {
        return Err(serde_json::to_value(&result.content).unwrap()[0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_owned());
    }
    Ok(result.structured_content.unwrap())
}

async fn exfiltration_attempts_never_return_the_canary(backend: Backend) {
    let logs = crate::harness::capture_logs();
    let Some(s) = setup(backend).await else {
        return;
    };
    let grant =
        s.t.active_grant(&s.acme, &s.token_id, "staging", 100, 600)
            .await;
    let attempts = [
        "echo \"$CANARY\"",
        "printf %s \"$CANARY\" | base64",
        "printf 'xx%s' \"$CANARY\" | base64 -w0",
        "printf 'x%s' \"$CANARY\" | base64 | tr '+/' '-_'",
        "printf %s \"$CANARY\" | od -An -tx1 | tr -d ' \\n'",
        "printf %s \"$CANARY\" | od -An -tx1 | tr -d ' \\n' | tr a-f A-F",
        "python3 -c 'import urllib.parse,os;print(urllib.parse.quote(os.environ[\"CANARY\"], safe=\"\"))'",
        "python3 -c 'import json,os;print(json.dumps({\"k\": os.environ[\"CANARY\"]}))'",
        "env",
        "printenv CANARY",
        "cat /proc/self/environ | tr '\\0' '\\n'",
        "printf %s \"$CANARY\" | head -c 6; sleep 0.2; printf %s \"$CANARY\" | tail -c +7",
        "echo \"$CANARY\" >&2",
        "printf %s \"$CANARY\" > stash.txt; cat stash.txt",
        "(sleep 0.3; echo \"late: $CANARY\") & echo parent-done",
    ];
    let mut seen = String::new();
    for command in attempts {
        let result = run(&s.client, json!({"grant_id": grant, "command": command}))
            .await
            .unwrap();
        let text = result.to_string();
        assert!(!text.contains(CANARY), "{command} leaked: {text}");
        seen.push_str(&text);
        if !command.starts_with("(sleep") {
            assert!(text.contains("[REDACTED:CANARY]"), "{command}: {text}");
        }
    }
    // A file written by one run is gone by the next.
    let later = run(
        &s.client,
        json!({"grant_id": grant, "command": "cat stash.txt ../*/stash.txt 2>&1; ls -a"}),
    )
    .await
    .unwrap();
    assert!(
        later["stdout"].as_str().unwrap().contains("No such file"),
        "{later}"
    );
    // The background child was killed with its group: its line never came.
    assert!(!seen.contains("late:"), "{seen}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Nothing is left in the runner's work root, and no log holds the canary.
    assert_eq!(s.runner.leftover_files(), Vec::<String>::new());
    assert!(!s.runner.log().contains(CANARY), "runner log");
    let gateway_logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(gateway_logs.contains("run finished"));
    assert!(!gateway_logs.contains(CANARY), "gateway log");
    // The timeline records each exec with redacted argv and no output.
    let events = custodian::grants::store::events(s.t.db(), &s.acme, &grant)
        .await
        .unwrap();
    assert_eq!(
        events.iter().filter(|e| e.kind == "exec").count(),
        attempts.len() + 1
    );
    assert!(events.iter().all(|e| !e.detail.contains(CANARY)));
    s.t.stop().await;
}

async fn grants_that_cannot_run_are_refused_before_any_secret_leaves(backend: Backend) {
    let Some(s) = setup(backend).await else {
        return;
    };
    let one_use =
        s.t.active_grant(&s.acme, &s.token_id, "staging", 1, 600)
            .await;
    assert_eq!(
        run(&s.client, json!({"grant_id": one_use, "argv": ["true"]}))
            .await
            .unwrap()["uses_left"],
        0
    );
    let sent = s.runner.execs();
    assert_eq!(sent, 1);
    let refusals: Vec<(String, &str)> = {
        let short =
            s.t.active_grant(&s.acme, &s.token_id, "staging", 5, 60)
                .await;
        s.t.clock.advance(120);
        let revoked =
            s.t.active_grant(&s.acme, &s.token_id, "staging", 5, 600)
                .await;
        custodian::grants::revoke_as_admin(&s.t.app, &s.acme, &revoked)
            .await
            .unwrap();
        let (other_id, _) = s.t.token_with_id(&s.acme, "other-agent").await;
        let others =
            s.t.active_grant(&s.acme, &other_id, "staging", 5, 600)
                .await;
        let globex = s.t.tenant("globex").await;
        s.t.environment(&globex, "staging", &[]).await;
        let (foreign_id, _) = s.t.token_with_id(&globex, "codex").await;
        let foreign =
            s.t.active_grant(&globex, &foreign_id, "staging", 5, 600)
                .await;
        vec![
            (one_use.clone(), "is exhausted"),
            (short, "is expired"),
            (revoked, "is revoked"),
            (others.clone(), "no grant"),
            (foreign.clone(), "no grant"),
            ("gr_nonsense".to_owned(), "no grant"),
        ]
    };
    for (grant, expected) in refusals {
        let message = run(
            &s.client,
            json!({"grant_id": grant, "command": "echo $CANARY"}),
        )
        .await
        .unwrap_err();
        assert!(message.contains(expected), "{grant}: {message}");
    }
    // Bad arguments are refused before a use is spent.
    let fresh =
        s.t.active_grant(&s.acme, &s.token_id, "staging", 5, 600)
            .await;
    for (args, expected) in [
        (
            json!({"grant_id": fresh, "argv": ["true"], "command": "true"}),
            "argv: give either argv or command",
        ),
        (json!({"grant_id": fresh}), "argv: give argv"),
        (
            json!({"grant_id": fresh, "argv": []}),
            "argv: must name a program",
        ),
        (
            json!({"grant_id": fresh, "command": "true", "timeout_seconds": 100000}),
            "timeout_seconds: must be between 1 and 600",
        ),
    ] {
        assert!(
            run(&s.client, args).await.unwrap_err().contains(expected),
            "{expected}"
        );
    }
    assert_eq!(s.runner.execs(), sent, "no refused run reached the runner");
    let status = custodian::grants::store::get(s.t.db(), &s.acme, &fresh)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.uses, 0);
    s.t.stop().await;
}

/// What a replica keeps between runs (a grant's environment, the environment's runners and
/// egress rules) never outlives a change: a grant revoked after it ran is refused at once, and a
/// runner removed by another process's admin gets no run a second later.
async fn changes_made_elsewhere_reach_runs_within_a_second(backend: Backend) {
    let Some(s) = setup(backend).await else {
        return;
    };
    let grant =
        s.t.active_grant(&s.acme, &s.token_id, "staging", 100, 600)
            .await;
    let echo = json!({"grant_id": grant, "command": "echo ran"});
    for _ in 0..3 {
        assert_eq!(
            run(&s.client, echo.clone()).await.unwrap()["stdout"],
            "ran\n"
        );
    }
    let database = s.t.database();
    database.admin(&["grants", "revoke", "acme", &grant]);
    let sent = s.runner.execs();
    let refused = run(&s.client, echo.clone()).await.unwrap_err();
    assert!(refused.contains("is revoked"), "{refused}");
    assert_eq!(
        s.runner.execs(),
        sent,
        "a revoked grant's run reached the runner"
    );

    let grant =
        s.t.active_grant(&s.acme, &s.token_id, "staging", 100, 600)
            .await;
    let echo = json!({"grant_id": grant, "command": "echo ran"});
    assert_eq!(
        run(&s.client, echo.clone()).await.unwrap()["stdout"],
        "ran\n"
    );
    database.admin(&["runner", "remove", "acme", "r1"]);
    let removed = std::time::Instant::now();
    let refused = loop {
        match run(&s.client, echo.clone()).await {
            Err(refused) => break refused,
            Ok(_) => assert!(
                removed.elapsed() < Duration::from_secs(1),
                "a removed runner still gets runs a second after its removal"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(refused.contains("no runner is registered"), "{refused}");
    let sent = s.runner.execs();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(run(&s.client, echo).await.is_err());
    assert_eq!(s.runner.execs(), sent, "a removed runner got a run");
    s.t.stop().await;
}

async fn runners_and_gateways_must_prove_their_identities(backend: Backend) {
    let Some(s) = setup(backend).await else {
        return;
    };
    let grant =
        s.t.active_grant(&s.acme, &s.token_id, "staging", 100, 600)
            .await;
    assert_eq!(
        run(&s.client, json!({"grant_id": grant, "argv": ["true"]}))
            .await
            .unwrap()["exit_code"],
        0
    );

    // A runner whose certificate names another runner, or another tenant's runner, registered here:
    // the gateway ends the handshake before sending anything.
    for (tenant, name) in [("acme", "impostor"), ("globex", "r1")] {
        let wrong = TestRunner::start(&s.pki.ca(), &s.pki.runner(tenant, name), tenant, name)
            .await
            .unwrap();
        custodian::runners::remove(s.t.db(), &s.acme, "r1")
            .await
            .ok();
        custodian::runners::remove(s.t.db(), &s.acme, "r2")
            .await
            .ok();
        custodian::runners::add(s.t.db(), &s.acme, "r2", "default", &wrong.url, 1)
            .await
            .unwrap();
        let uses_before = custodian::grants::store::get(s.t.db(), &s.acme, &grant)
            .await
            .unwrap()
            .unwrap()
            .uses;
        let message = run(
            &s.client,
            json!({"grant_id": grant, "command": "echo $CANARY"}),
        )
        .await
        .unwrap_err();
        // The agent gets a correlation id; the reason is in the audit log, and the use is back.
        let failed = custodian::audit::for_grant(s.t.db(), &s.acme, &grant)
            .await
            .unwrap()
            .into_iter()
            .rfind(|e| e.kind == "exec.failed")
            .expect("an exec.failed record");
        let detail: Value = serde_json::from_str(&failed.detail).unwrap();
        assert!(
            message.contains(detail["exec_id"].as_str().unwrap()),
            "{message}"
        );
        assert!(
            detail["reason"]
                .as_str()
                .unwrap()
                .contains("cannot reach runner r2"),
            "{detail}"
        );
        assert!(
            !message.contains("r2"),
            "details stay out of the agent's view: {message}"
        );
        assert_eq!(detail["use_given_back"], true);
        let uses_after = custodian::grants::store::get(s.t.db(), &s.acme, &grant)
            .await
            .unwrap()
            .unwrap()
            .uses;
        assert_eq!(uses_after, uses_before, "no use spent when nothing ran");
        assert_eq!(
            wrong.execs(),
            0,
            "no request reached a runner with the wrong identity"
        );
    }

    // Gateways with a certificate from another CA, with a runner's identity, or expired: the
    // runner refuses them.
    let other_ca = Pki::new();
    let cases = [
        ("other CA", other_ca.gateway()),
        ("not the gateway identity", s.pki.runner("acme", "r9")),
        (
            "expired",
            s.pki.issue(
                Identity::Gateway {
                    trust_domain: TD.into(),
                },
                -1,
                "expired-gateway",
            ),
        ),
    ];
    for (what, identity) in cases {
        let (dispatcher, registered) = dispatcher_to_r1(&s, identity);
        let request = bare_exec("ex_test", "gr_test", vec!["true".into()], 1000);
        let before = s.runner.execs();
        let outcome = dispatcher
            .exec(&registered, &request, Duration::from_secs(5))
            .await;
        assert!(outcome.is_err(), "{what}: the runner served it");
        assert_eq!(s.runner.execs(), before, "{what}");
    }
    // No client certificate at all.
    let bare = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .build()
        .unwrap()
        .post(format!("{}/v1/exec", s.runner.url))
        .body("{}")
        .send()
        .await;
    assert!(
        bare.is_err(),
        "a client without a certificate got an answer"
    );
    s.t.stop().await;
}

async fn timeouts_kill_the_whole_tree_and_leave_nothing_behind(backend: Backend) {
    let Some(s) = setup(backend).await else {
        return;
    };
    let grant =
        s.t.active_grant(&s.acme, &s.token_id, "staging", 100, 600)
            .await;
    let marker = format!("31.{}", std::process::id());
    let result = run(
        &s.client,
        json!({"grant_id": grant, "command": format!("sleep {marker} & sleep {marker}; echo never"), "timeout_seconds": 1}),
    )
    .await
    .unwrap();
    assert_eq!(result["timed_out"], true, "{result}");
    assert_eq!(result["exit_code"], Value::Null);
    assert!(!result["stdout"].as_str().unwrap().contains("never"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = Command::new("pgrep")
        .args(["-f", &format!("sleep {marker}")])
        .output()
        .unwrap();
    assert!(left.stdout.is_empty(), "processes survived the timeout");
    // A daemon that leaves the process group (setsid) still dies with the command's pid namespace.
    let daemon = format!("41.{}", std::process::id());
    let started = run(
        &s.client,
        json!({"grant_id": grant, "command": format!("setsid sleep {daemon} > /dev/null 2>&1 < /dev/null & echo pid=$$")}),
    )
    .await
    .unwrap();
    assert_eq!(
        started["stdout"], "pid=2\n",
        "the command runs in a pid namespace of its own (bubblewrap's init is process 1)"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let escaped = Command::new("pgrep")
        .args(["-f", &format!("sleep {daemon}")])
        .output()
        .unwrap();
    assert!(
        escaped.stdout.is_empty(),
        "a setsid daemon outlived the command"
    );
    // A gateway that goes away while its run is running (the connection closes, no cancel is
    // sent): the runner stops the run at its next heartbeat, long before its timeout.
    let (dispatcher, registered) = dispatcher_to_r1(&s, s.pki.gateway());
    let abandoned = format!("51.{}", std::process::id());
    let request = bare_exec(
        "ex_abandoned",
        &grant,
        vec!["sleep".into(), abandoned.clone()],
        60_000,
    );
    let running = || {
        let found = Command::new("pgrep")
            .args(["-f", &format!("sleep {abandoned}")])
            .output()
            .unwrap();
        !found.stdout.is_empty()
    };
    let mut exec = Box::pin(dispatcher.exec(&registered, &request, Duration::from_secs(70)));
    tokio::select! {
        sent = &mut exec => panic!("the run ended by itself: {sent:?}"),
        () = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
    assert!(running(), "the abandoned run never started");
    drop(exec);
    let mut left = true;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = running();
        if !left {
            break;
        }
    }
    assert!(!left, "a run outlived its gateway's connection by 3 s");
    // Core dumps are off, privileges cannot be regained, system directories are read-only, and
    // the run's /tmp is its own (nothing reaches the host's).
    let limits = run(
        &s.client,
        json!({"grant_id": grant, "command": "ulimit -c; grep NoNewPrivs /proc/self/status; touch /usr/custodian-escape 2>&1; echo rc=$?; touch /tmp/custodian-escape && echo tmp=ok"}),
    )
    .await
    .unwrap();
    let out = limits["stdout"].as_str().unwrap();
    assert!(out.starts_with("0\n"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(
        out.contains("rc=1")
            && out.contains("tmp=ok")
            && !Path::new("/tmp/custodian-escape").exists(),
        "{out}"
    );
    // Output is capped after redaction.
    let big = run(
        &s.client,
        json!({"grant_id": grant, "command": "yes $CANARY | head -c 100000"}),
    )
    .await
    .unwrap();
    assert_eq!(big["truncated"], true);
    assert_eq!(big["stdout"].as_str().unwrap().len(), 4096);
    assert!(!big.to_string().contains(CANARY));
    assert_eq!(s.runner.leftover_files(), Vec::<String>::new());
    s.t.stop().await;
}

/// A run takes the sandbox the runner set up ahead of it: that sandbox serves exactly that run,
/// a new one replaces it, and the command sees only its own standard input, the same environment
/// as in a sandbox started for it alone, and none of the previous run's files.
async fn spare_sandboxes_serve_one_run_each_with_only_its_own_input(backend: Backend) {
    let Some(s) = setup(backend).await else {
        return;
    };
    let grant =
        s.t.active_grant(&s.acme, &s.token_id, "staging", 100, 600)
            .await;
    let script = |n: u32| {
        format!(
            "cat; echo; echo ---; env | cut -d= -f1 | sort; echo ---; ls -A /tmp /work; touch /tmp/left-{n} /work/left-{n}"
        )
    };
    let sections = |result: &Value| -> Vec<String> {
        result["stdout"]
            .as_str()
            .unwrap()
            .split("---\n")
            .map(str::to_owned)
            .collect()
    };
    let wait_for_spare = |except: Option<u32>| {
        let runner = &s.runner;
        async move {
            for _ in 0..100 {
                if let Some(pid) = runner.spares().into_iter().find(|p| Some(*p) != except) {
                    return pid;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the runner set up no spare sandbox");
        }
    };
    // A fresh runner has no spare yet: the first run starts a sandbox of its own.
    assert_eq!(s.runner.spares(), Vec::<u32>::new());
    let first = run(
        &s.client,
        json!({"grant_id": grant, "command": script(1), "stdin": "input-1"}),
    )
    .await
    .unwrap();
    let spare = wait_for_spare(None).await;
    let second = run(
        &s.client,
        json!({"grant_id": grant, "command": script(2), "stdin": "input-2"}),
    )
    .await
    .unwrap();
    assert!(
        !Path::new(&format!("/proc/{spare}")).exists(),
        "the spare sandbox did not serve the run that came after it"
    );
    let next = wait_for_spare(Some(spare)).await;
    let (first, second) = (sections(&first), sections(&second));
    assert_eq!(first[0], "input-1\n", "{first:?}");
    assert_eq!(second[0], "input-2\n", "{second:?}");
    assert_eq!(
        first[1], second[1],
        "a spare sandbox gives the command another environment than a sandbox of its own"
    );
    for name in ["CANARY", "HOME", "LANG", "PATH", "TMPDIR"] {
        assert!(
            first[1].lines().any(|l| l == name),
            "{name} missing: {first:?}"
        );
    }
    assert_eq!(first[2], "/tmp:\n\n/work:\n", "{first:?}");
    assert_eq!(second[2], "/tmp:\n\n/work:\n", "{second:?}");
    // Without input, the command reads an empty one: what the helper was sent stays with it.
    let empty = run(
        &s.client,
        json!({"grant_id": grant, "command": "cat; ls /proc/self/fd; echo end"}),
    )
    .await
    .unwrap();
    // Only its standard streams (and the descriptor `ls` opens to list them) are open.
    assert_eq!(empty["stdout"], "0\n1\n2\n3\nend\n", "{empty}");
    assert_eq!(empty["redactions"], json!({}), "{empty}");
    assert!(!s.runner.spares().contains(&next));
    // A spare waits as long as it takes: still there, and still the one that serves the next run,
    // after the runtime's idle threads have ended (their keep-alive is 10 s).
    let waiting = wait_for_spare(Some(next)).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(
        s.runner.spares().contains(&waiting),
        "the spare sandbox died while it waited"
    );
    let late = run(
        &s.client,
        json!({"grant_id": grant, "command": "echo late"}),
    )
    .await
    .unwrap();
    assert_eq!(late["stdout"], "late\n");
    assert!(!s.runner.spares().contains(&waiting));
    // A spare that died while it waited is not used: the run gets a sandbox of its own, and a
    // new spare follows.
    let doomed = wait_for_spare(Some(waiting)).await;
    crate::processes::sigkill(doomed);
    let after = run(
        &s.client,
        json!({"grant_id": grant, "command": "echo after"}),
    )
    .await
    .unwrap();
    assert_eq!(after["stdout"], "after\n", "{after}");
    wait_for_spare(Some(doomed)).await;
    s.t.stop().await;
}
