//! Helpers for tests that run the real binaries and the Python MCP client.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const CUSTODIAN: &str = env!("CARGO_BIN_EXE_custodian");

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Runs `custodian ARGS` to completion.
pub fn custodian(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(CUSTODIAN)
        .args(args)
        .envs(envs.iter().copied())
        .env_remove("CUSTODIAN_CONFIG")
        .output()
        .expect("run custodian")
}

/// Reads stdout lines of `child` until one contains `marker`; returns everything read.
pub fn read_until(child: &mut Child, marker: &str) -> String {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let marker_copy = marker.to_owned();
    let marker = marker.to_owned();
    std::thread::spawn(move || {
        let mut seen = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(&marker) {
                let _ = tx.send(seen.clone());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = child.kill();
                let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
            }
            panic!("the process did not print `{marker_copy}`; stderr:\n{stderr}")
        })
}

/// Spawns `custodian ARGS` with piped stdout/stderr.
pub fn spawn(args: &[&str]) -> Proc {
    spawn_as(args, RunAs::Root)
}

/// Spawns `custodian ARGS` as `user`, with piped stdout/stderr.
pub fn spawn_as(args: &[&str], user: RunAs) -> Proc {
    let mut command = Command::new(CUSTODIAN);
    command
        .args(args)
        .env_remove("CUSTODIAN_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Proc(user.apply(&mut command).spawn().expect("spawn custodian"))
}

/// Waits until `url` answers 200.
pub async fn wait_healthy(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(url).await
            && r.status() == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "{url} never became healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The Python interpreter that has the `mcp` package (set up by `.ci/run`), or `None` outside CI
/// when it is missing.
pub fn python() -> Option<PathBuf> {
    let candidate = std::env::var_os("CUSTODIAN_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python")
        });
    if candidate.exists() {
        return Some(candidate);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "the Python MCP client is required in CI; run .ci/run (it creates target/test-venv)"
    );
    eprintln!("skipping: no Python MCP client at {}", candidate.display());
    None
}

/// Runs the Python SDK client against `url` with `token` and returns its JSON report.
pub fn python_client(python: &Path, url: &str, token: &str) -> serde_json::Value {
    python_client_approving(python, url, token, &[])
}

/// Like [`python_client`], and also requests a grant approved by running `approve` + user code.
pub fn python_client_approving(
    python: &Path,
    url: &str,
    token: &str,
    approve: &[&str],
) -> serde_json::Value {
    let mut args = vec![url];
    args.extend_from_slice(approve);
    python_client_args(python, token, &args)
}

/// Runs `tests/clients/python_client.py ARGS` (options, then the URL) with `token`.
pub fn python_client_args(python: &Path, token: &str, args: &[&str]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/python_client.py");
    let output = Command::new(python)
        .arg(script)
        .args(args)
        .env("CUSTODIAN_TOKEN", token)
        .output()
        .expect("run python client");
    assert!(
        output.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("client prints JSON")
}

/// The value after `label` on its line of a startup banner (`MCP URL:`, `Agent token:`).
pub fn banner_field(banner: &str, label: &str) -> String {
    banner
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label} in:\n{banner}"))
        .trim()
        .to_owned()
}

/// The TypeScript MCP SDK client script (`tests/clients/ts`, installed by `.ci/run`), or `None`
/// outside CI when its npm packages are missing.
pub fn typescript_client() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/ts");
    if dir.join("node_modules/@modelcontextprotocol/sdk").exists() {
        return Some(dir.join("client.mjs"));
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "the TypeScript MCP client is required in CI; run .ci/run (npm ci in tests/clients/ts)"
    );
    eprintln!(
        "skipping: tests/clients/ts has no node_modules (run `npm ci --prefix tests/clients/ts`)"
    );
    None
}

/// Runs the TypeScript SDK client `script` against `url` with `token` (approving its grant with
/// `approve` + user code) and returns its JSON report and what it wrote to stderr.
pub fn typescript_client_approving(
    script: &Path,
    url: &str,
    token: &str,
    approve: &[&str],
) -> (serde_json::Value, String) {
    let output = Command::new("node")
        .arg(script)
        .arg(url)
        .args(approve)
        .env("CUSTODIAN_TOKEN", token)
        .output()
        .expect("run node");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "TypeScript client failed: {stderr}"
    );
    let seen = serde_json::from_slice(&output.stdout).expect("client prints JSON");
    (seen, stderr)
}

/// The user a spawned server (runner, `custodian dev`) runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAs {
    /// The test's own user, root (see [`require_root`]).
    Root,
    /// `nobody` (uid and gid 65534), with no supplementary groups.
    Unprivileged,
}

impl RunAs {
    pub const UNPRIVILEGED_ID: u32 = 65534;

    /// Makes `command` run as this user (std drops root's supplementary groups with the uid).
    pub fn apply(self, command: &mut Command) -> &mut Command {
        use std::os::unix::process::CommandExt;
        if self == Self::Unprivileged {
            command
                .uid(Self::UNPRIVILEGED_ID)
                .gid(Self::UNPRIVILEGED_ID);
        }
        command
    }

    /// Hands `path` and everything below it to this user.
    pub fn own(self, path: &Path) {
        if self == Self::Root {
            return;
        }
        let id = Some(Self::UNPRIVILEGED_ID);
        std::os::unix::fs::lchown(path, id, id).expect("chown");
        if path.is_dir() && !path.is_symlink() {
            for entry in std::fs::read_dir(path).expect("read dir") {
                self.own(&entry.expect("dir entry").path());
            }
        }
    }
}

/// Whether this test process is root, which tests that start servers as root and as `nobody`
/// and look into every process of the host need. Outside CI a non-root run skips them.
pub fn require_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0");
    if !root {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "this test must run as root in CI (it starts runners as root and as uid 65534)"
        );
        eprintln!("skipping: not root");
    }
    root
}

/// A process of this host, as seen from the test (root sees every pid).
#[derive(Debug, Clone)]
pub struct HostProcess {
    pub pid: u32,
    /// The command line, NULs shown as spaces.
    pub cmdline: String,
}

fn host_processes() -> impl Iterator<Item = (u32, std::path::PathBuf)> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path())))
        .filter(move |(pid, _)| *pid != me)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn describe(pid: u32, dir: &Path) -> HostProcess {
    let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
    HostProcess {
        pid,
        cmdline: String::from_utf8_lossy(&cmdline).replace('\0', " "),
    }
}

/// Processes of the host whose `/proc/PID/FILE` (`cmdline`, `environ`) contains `needle`.
pub fn host_processes_with(file: &str, needle: &str) -> Vec<HostProcess> {
    host_processes()
        .filter(|(_, dir)| {
            std::fs::read(dir.join(file)).is_ok_and(|bytes| contains(&bytes, needle.as_bytes()))
        })
        .map(|(pid, dir)| describe(pid, &dir))
        .collect()
}

/// Sends SIGKILL to `pid` (a process this test started).
pub fn sigkill(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Regular files below `root` (symbolic links not followed) whose content contains `needle`.
pub fn files_containing(root: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = vec![];
    let Ok(entries) = std::fs::read_dir(root) else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        if kind.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if kind.is_file()
            && entry.metadata().is_ok_and(|m| m.len() < 64 << 20)
            && std::fs::read(&path).is_ok_and(|bytes| contains(&bytes, needle.as_bytes()))
        {
            found.push(path);
        }
    }
    found
}
