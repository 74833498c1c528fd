//! The runner's isolation, tried the way an attacker would: an agent holding a grant for a
//! low-value environment, on the same runner (same pool) as a victim grant for another environment,
//! goes through `run` after the victim's secrets. The victim's secrets are random canaries made per
//! test; every assertion is about a canary being absent from what the attacker got, or about
//! processes and files being gone, never about an error's wording. Each attack carries a positive
//! control (the attacker finds its own planted value by the same route, the victim sees its own
//! secret, the host sees the victim holding it), so a broken attack cannot pass for a defence.
//!
//! Every scenario runs twice: with the runner as root and as uid 65534. The test process itself
//! must be root: it starts both, and it looks into every process of the host to find what a run
//! left behind. The gateway's database does not take part in isolation, so the suite runs on SQLite
//! only. The attacker's scripts look for the canaries' shape (`cnry` and 32 hex digits), as a real
//! attacker looks for `ghp_` or `AKIA`, and print what they find gzipped and base64-encoded, which
//! the test decodes.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use serde_json::{Value, json};

use crate::harness::{Backend, TestApp};
use crate::mcp_clients::connect;
use crate::processes::{self, HostProcess, Proc, RunAs, host_processes_with};
use crate::runners::{Client, Pki, TestRunner, run, runner_binary};
use custodian::tenants::TenantId;

/// Declares, for each named `async fn(RunAs)`, a test with the runner as root and one with the
/// runner as uid 65534.
macro_rules! as_root_and_unprivileged {
    ($($test:ident),* $(,)?) => { $(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn runner_as_root() {
                super::$test($crate::processes::RunAs::Root).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn runner_unprivileged() {
                super::$test($crate::processes::RunAs::Unprivileged).await
            }
        }
    )* };
}

mod dev;
mod grant_bound;
mod lifetime;
mod privilege;
mod redteam;
mod snooping;

/// What the attacker's scripts share: `P`, the shape of every canary (see [`canary`]) as an
/// extended regular expression, and `out NAME`, which prints stdin as one line
/// `ROUTE NAME <base64 of gzip>`.
const SHELL_PRELUDE: &str = r#"P='cnry[0-9a-f]{32}'
out() { printf 'ROUTE %s ' "$1"; gzip -c | base64 -w0; echo; }
"#;

/// A fresh canary: `cnry` and 32 random hex digits.
fn canary() -> String {
    format!("cnry{}", hex::encode(rand::random::<[u8; 16]>()))
}

/// Nine random digits, to make a command line no other process on the host has (`sleep 20.NNN`).
fn digits() -> String {
    rand::random_range(100_000_000..1_000_000_000u32).to_string()
}

/// Both grants, both environments, one runner of one pool.
struct World {
    t: TestApp,
    runner: TestRunner,
    acme: TenantId,
    victim: Party,
    attacker: Party,
    /// The victim environment's secret `VICTIM_TOKEN`.
    secret: String,
    /// The attacker environment's own secret `ATTACKER_TOKEN`, its positive control.
    attacker_secret: String,
    /// `custodian serve`, when the gateway runs as a process of its own.
    gateway: Option<Proc>,
    _pki: Pki,
    _dir: tempfile::TempDir,
}

/// An agent: its token, its MCP session and its active grant.
struct Party {
    client: Client,
    token_id: String,
    grant: String,
}

/// Where the gateway runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gateway {
    /// In the test process.
    InProcess,
    /// As `custodian serve`, a process the test can SIGKILL.
    Process,
}

impl World {
    async fn start(user: RunAs) -> Option<Self> {
        Self::start_with(user, Gateway::InProcess).await
    }

    async fn start_with(user: RunAs, gateway: Gateway) -> Option<Self> {
        if !processes::require_root() {
            return None;
        }
        runner_binary()?;
        let pki = Pki::new();
        let (cert, key) = pki.gateway();
        let t = TestApp::builder(Backend::Sqlite)
            .max_output_bytes(256 << 10)
            .runner_tls(&pki.ca(), &cert, &key)
            .start()
            .await?;
        let acme = t.tenant("acme").await;
        let secret = canary();
        let attacker_secret = canary();
        for (env, name, value) in [
            ("victim", "VICTIM_TOKEN", &secret),
            ("attacker", "ATTACKER_TOKEN", &attacker_secret),
        ] {
            t.environment(&acme, env, &[name]).await;
            custodian::secrets::set(
                t.db(),
                &t.app.master_key,
                &acme,
                env,
                name,
                value.as_bytes(),
                1,
            )
            .await
            .unwrap();
        }
        let runner =
            TestRunner::start_as(&pki.ca(), &pki.runner("acme", "r1"), "acme", "r1", user).await?;
        custodian::runners::add(t.db(), &acme, "r1", "default", &runner.url, 1)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (gateway, mcp_url) = match gateway {
            Gateway::InProcess => (None, t.mcp_url("acme")),
            Gateway::Process => {
                let (process, base) = serve(&t, (&pki.ca(), &cert, &key), dir.path()).await;
                (Some(process), format!("{base}/t/acme/mcp"))
            }
        };
        let victim = Party::new(&t, &acme, "victim", &mcp_url).await;
        let attacker = Party::new(&t, &acme, "attacker", &mcp_url).await;
        Some(Self {
            t,
            runner,
            acme,
            victim,
            attacker,
            secret,
            attacker_secret,
            gateway,
            _pki: pki,
            _dir: dir,
        })
    }

    /// Runs `script` as the attacker (see [`attack`]).
    async fn attack(&self, script: &str, args: &[&str], stdin: Option<String>) -> Attack {
        attack(
            &self.attacker.client,
            &self.attacker.grant,
            script,
            args,
            stdin,
        )
        .await
    }

    /// Starts the victim's run holding its secret (see [`VICTIM_HOLDS`]) and returns once the
    /// host sees it sleeping, i.e. with its files written.
    async fn victim_holds(&self, reaper: &mut Reaper) -> Holder {
        let argv_canary = canary();
        let tag = digits();
        // The shell joins the two; only `sleep` has `20.<tag>` on its command line.
        let marker = format!("{HOLD_SECONDS}.{tag}");
        reaper.watch(&argv_canary);
        reaper.watch(&marker);
        let call = json!({
            "grant_id": self.victim.grant,
            "argv": ["/bin/sh", "-c", VICTIM_HOLDS, argv_canary, HOLD_SECONDS.to_string(), tag],
            "timeout_seconds": 60,
        });
        let peer = self.victim.client.peer().clone();
        let task = tokio::spawn(async move { run(&peer, call).await });
        wait_until(Duration::from_secs(15), || {
            !host_processes_with("cmdline", &marker).is_empty()
        })
        .await
        .unwrap_or_else(|()| panic!("the victim's run never reached its sleep"));
        Holder {
            argv_canary,
            marker,
            task,
        }
    }

    /// Positive control: the host sees a process of the victim's run with the secret in its
    /// environment, so that its absence elsewhere means something.
    fn assert_victim_holds_its_secret(&self) {
        assert!(
            !host_processes_with("environ", &self.secret).is_empty(),
            "no process of the victim's run holds its secret; the test would prove nothing"
        );
    }

    /// Runs one command as the victim.
    async fn victim_runs(&self, command: &str, timeout_seconds: u64) -> Result<Value, String> {
        run(
            &self.victim.client,
            json!({"grant_id": self.victim.grant, "command": command, "timeout_seconds": timeout_seconds}),
        )
        .await
    }

    /// What still holds the victim's secret on the host: processes with it in their environment,
    /// files with it below the runner's work root, the system temp dir, `/dev/shm` and `/var/tmp`.
    fn leftovers(&self) -> Vec<String> {
        let mut found: Vec<String> = host_processes_with("environ", &self.secret)
            .into_iter()
            .map(|p| {
                format!(
                    "process {} `{}` has it in its environment",
                    p.pid, p.cmdline
                )
            })
            .collect();
        let temp = std::env::temp_dir();
        let mut roots = vec![temp.as_path(), Path::new("/dev/shm"), Path::new("/var/tmp")];
        if !self.runner.work_root().starts_with(&temp) {
            roots.push(self.runner.work_root());
        }
        for root in roots {
            found.extend(
                processes::files_containing(root, &self.secret)
                    .into_iter()
                    .map(|f| format!("file {} holds it", f.display())),
            );
        }
        found
    }

    /// Stops the runner first, so that no run in flight holds up the gateway's shutdown.
    async fn stop(self) {
        drop(self.runner);
        drop(self.gateway);
        self.t.stop().await;
    }
}

impl Party {
    async fn new(t: &TestApp, acme: &TenantId, env: &str, mcp_url: &str) -> Self {
        let (token_id, token) = t.token_with_id(acme, env).await;
        let grant = t.active_grant(acme, &token_id, env, 100, 600).await;
        Self {
            client: connect(mcp_url, &token).await,
            token_id,
            grant,
        }
    }
}

/// Runs `script` under `grant` as `sh -c script control args…`, `$0` being a fresh canary of the
/// attacker's own on its command line, and returns the result with the routes it reported.
async fn attack(
    client: &Client,
    grant: &str,
    script: &str,
    args: &[&str],
    stdin: Option<String>,
) -> Attack {
    let control = canary();
    let mut argv = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        format!("{SHELL_PRELUDE}{script}"),
        control.clone(),
    ];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    let mut call = json!({"grant_id": grant, "argv": argv, "timeout_seconds": 60});
    if let Some(stdin) = stdin {
        call["stdin"] = Value::String(stdin);
    }
    let result = run(client, call)
        .await
        .unwrap_or_else(|e| panic!("the attacker's run was refused: {e}"));
    Attack::new(result, control)
}

/// Starts `custodian serve` with the runner TLS material `(ca, cert, key)` on the test gateway's
/// database, and returns it with its base URL.
async fn serve(t: &TestApp, tls: (&Path, &Path, &Path), dir: &Path) -> (Proc, String) {
    let database = t.database();
    let master_key = dir.join("master.key");
    std::fs::write(&master_key, &database.master_key).unwrap();
    let port = processes::free_port();
    let config = dir.join("custodian.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"http://127.0.0.1:{port}\"\n\n\
             [database]\nurl = \"{}\"\n\n[secrets]\nmaster_key_file = \"{}\"\n\n\
             [runners]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nmax_output_bytes = 262144\n",
            database.url,
            master_key.display(),
            tls.0.display(),
            tls.1.display(),
            tls.2.display()
        ),
    )
    .unwrap();
    let process = Proc(
        Command::new(processes::CUSTODIAN)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env_remove("CUSTODIAN_CONFIG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("serve.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    processes::wait_healthy(&format!("{base}/readyz")).await;
    (process, base)
}

/// How long the victim's run would hold its secret if nothing ended it first.
const HOLD_SECONDS: u32 = 20;

/// The victim: its secret in files in its work dir, `$HOME`, `$TMPDIR`, `/tmp` and `/dev/shm`
/// (wherever it may write), in its environment, a canary on its command line (`$0`); it sleeps
/// `$1.$2` seconds, then prints its file back (redacted, its own positive control).
const VICTIM_HOLDS: &str = r#"for f in ./victim.txt "$HOME/victim-home.txt" "$TMPDIR/victim-tmpdir.txt" "/tmp/victim-$2.txt" "/dev/shm/victim-$2.txt"; do
  printf '%s\n' "$VICTIM_TOKEN" > "$f" 2>/dev/null
done
sleep "$1.$2"
cat ./victim.txt"#;

/// The victim's run while it holds its secret.
struct Holder {
    argv_canary: String,
    /// On the command line of the victim's `sleep` only.
    marker: String,
    task: tokio::task::JoinHandle<Result<Value, String>>,
}

impl Holder {
    /// Ends the victim's sleep from the host and returns its run's result.
    async fn release(self) -> Result<Value, String> {
        for process in host_processes_with("cmdline", &self.marker) {
            processes::sigkill(process.pid);
        }
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("the victim's run ends once its sleep is killed")
            .unwrap()
    }
}

/// Kills, when dropped (also when the test fails), every host process whose command line carries
/// one of its markers: what a test started and the isolation failed to end.
#[derive(Default)]
struct Reaper(Vec<String>);

impl Reaper {
    fn watch(&mut self, marker: &str) {
        self.0.push(marker.to_owned());
    }

    /// Processes still alive with one of the markers on their command line.
    fn survivors(&self) -> Vec<HostProcess> {
        self.0
            .iter()
            .flat_map(|m| host_processes_with("cmdline", m))
            .collect()
    }

    /// The survivors, described as still alive after `moment`.
    fn outlived(&self, moment: &str) -> Vec<String> {
        self.survivors()
            .into_iter()
            .map(|p| {
                let shown: String = p.cmdline.chars().take(120).collect();
                format!("process {} `{shown}…` was alive after {moment}", p.pid)
            })
            .collect()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for process in self.survivors() {
            processes::sigkill(process.pid);
        }
    }
}

/// Polls `done` every 100 ms until it holds or `within` passes.
async fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> Result<(), ()> {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An attacker's run: its result and the routes its script reported, decoded.
struct Attack {
    result: Value,
    /// The canary on the attacker's own command line (`$0`).
    control: String,
    routes: Vec<(String, String)>,
}

impl Attack {
    fn new(result: Value, control: String) -> Self {
        let stdout = result["stdout"].as_str().unwrap_or_default();
        let routes = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("ROUTE "))
            .map(|l| {
                let (name, data) = l.split_once(' ').unwrap_or((l, ""));
                (name.to_owned(), gunzip_base64(data))
            })
            .collect();
        Self {
            result,
            control,
            routes,
        }
    }

    /// What the script reported for `name` (it must have reported it).
    fn route(&self, name: &str) -> &str {
        self.routes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, text)| text.as_str())
            .unwrap_or_else(|| panic!("the attack printed no route {name}: {}", self.result))
    }

    /// Everything the attacker got back: the raw result and every decoded route.
    fn everything(&self) -> String {
        let mut all = self.result.to_string();
        for (name, text) in &self.routes {
            all.push_str(&format!("\n[{name}]\n{text}"));
        }
        all
    }
}

fn gunzip_base64(data: &str) -> String {
    let Ok(bytes) = STANDARD.decode(data.trim()) else {
        return format!("(not base64: {data})");
    };
    if bytes.is_empty() {
        return String::new();
    }
    let mut gzip = Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("gzip on the host");
    gzip.stdin.take().unwrap().write_all(&bytes).unwrap();
    let output = gzip.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The forms `value` may take in an attacker's output: itself, hex, and base64 (standard and
/// URL-safe) at each of the three alignments, keeping only the characters the neighbours cannot
/// change.
fn forms(value: &str) -> Vec<String> {
    let bytes = value.as_bytes();
    let mut forms = vec![
        value.to_owned(),
        hex::encode(bytes),
        hex::encode_upper(bytes),
    ];
    for offset in 0..3 {
        let mut shifted = vec![0u8; offset];
        shifted.extend_from_slice(bytes);
        let encoded = STANDARD.encode(&shifted);
        let first = (offset * 8).div_ceil(6);
        let last = (offset + bytes.len()) * 8 / 6;
        let stable = &encoded[first..last];
        forms.push(stable.to_owned());
        forms.push(URL_SAFE.encode(&shifted)[first..last].to_owned());
    }
    forms
}

/// Whether `text` carries `value` in any of its [`forms`].
fn carries(text: &str, value: &str) -> bool {
    forms(value).iter().any(|form| text.contains(form.as_str()))
}

/// The lines of `text` that carry `value`, with the value itself masked as `<name>`, for a failure
/// message that shows where it was found without repeating it.
fn evidence(text: &str, value: &str, name: &str) -> String {
    let lines: Vec<String> = text
        .lines()
        .filter(|l| carries(l, value))
        .take(8)
        .map(|l| {
            forms(value).iter().fold(l.to_owned(), |l, form| {
                l.replace(form.as_str(), &format!("<{name}>"))
            })
        })
        .map(|l| l.chars().take(300).collect())
        .collect();
    if lines.is_empty() {
        "(in an encoded form)".to_owned()
    } else {
        lines.join(" | ")
    }
}

/// Positive controls: each `(route, value)` must have found the attacker's own value, or the
/// route's silence proves nothing.
fn controls(attack: &Attack, expected: &[(&str, &String)]) -> Vec<String> {
    expected
        .iter()
        .filter(|(route, value)| !attack.route(route).contains(value.as_str()))
        .map(|(route, _)| {
            format!(
                "control failed: route {route} did not find the attacker's own value, so the \
                 attack did not work as written: {}",
                attack.result
            )
        })
        .collect()
}

/// Fails with every violation at once, so one run shows every route that worked.
fn assert_none(what: &str, user: RunAs, violations: &[String]) {
    assert!(
        violations.is_empty(),
        "{what} (runner {user:?}): {} violation(s):\n  - {}",
        violations.len(),
        violations.join("\n  - ")
    );
}
