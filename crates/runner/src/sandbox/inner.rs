//! The last step inside the sandbox: the helper (this binary, started by bubblewrap inside the
//! run's namespaces, or directly in the unisolated development mode) restricts itself, then execs
//! the command. Everything here happens in the helper's own single thread before the command's
//! first instruction:
//!
//! - resource limits: CPU seconds, address space, open files, file size, no core dumps, and the
//!   process limit, which counts per user namespace, so it bounds this run alone;
//! - `no_new_privs`;
//! - the run's OOM score: 1000, first in line for the OOM killer (a process of the run may raise
//!   its own score without privilege, and Landlock then keeps `/proc` read-only);
//! - Landlock: read only the run's system directories, write only its work dir, `/tmp` and `/dev`;
//!   where the kernel has it (6.12+), connect only to abstract unix sockets the run created itself
//!   and signal only its own processes (abstract sockets belong to the network namespace, which
//!   runs share);
//! - the seccomp filters of [`super::filter`].
//!
//! With `--probe` it reports instead what it sees from inside, which is how `custodian-runner
//! check` knows what is enforced rather than what was asked for.
#![expect(
    unsafe_code,
    reason = "prctl and setrlimit are plain libc calls; each block states why it is sound"
)]

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use landlock::{
    ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
    path_beneath_rules,
};
use serde::{Deserialize, Serialize};

/// What the helper applies before it execs the command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Layers {
    pub cpu_seconds: u64,
    pub processes: u64,
    pub memory_bytes: u64,
    pub file_bytes: u64,
    /// Landlock: readable (and executable) trees.
    pub readable: Vec<PathBuf>,
    /// Landlock: writable trees.
    pub writable: Vec<PathBuf>,
    /// `--probe`: a path that must NOT be visible (e.g. the runner's key), for the report.
    #[serde(default)]
    pub hidden: Option<PathBuf>,
    /// The run's egress: listeners to open inside its network namespace and hand to the runner.
    #[serde(default)]
    pub egress: Option<NetSetup>,
}

/// What the helper opens for the runner inside the run's network namespace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetSetup {
    /// The inherited Unix socket the listeners are sent over.
    pub fd: i32,
    /// Loopback ports to listen on, in the order the runner expects them.
    pub ports: Vec<u16>,
    /// The run's egress CA certificate (PEM), written to `ca_file` and appended to the system
    /// roots in `bundle_file`.
    pub ca_pem: Option<String>,
    pub ca_file: PathBuf,
    pub bundle_file: PathBuf,
}

/// System CA bundles, the first that exists is copied into the run's bundle.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Binds the listeners, sends them to the runner, closes every copy here and writes the CA files.
fn open_egress(net: &NetSetup) -> Result<(), String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: the runner left exactly this descriptor open for the helper; nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(net.fd) };
    let listeners = net
        .ports
        .iter()
        .map(|port| {
            std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, *port))
                .map_err(|e| format!("cannot listen on 127.0.0.1:{port}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let fds: Vec<i32> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
    super::fdpass::send(socket.as_raw_fd(), &fds)
        .map_err(|e| format!("cannot hand the listeners to the runner: {e}"))?;
    drop(listeners);
    drop(socket);
    if let Some(ca) = &net.ca_pem {
        let mut bundle = SYSTEM_BUNDLES
            .iter()
            .find_map(|path| std::fs::read_to_string(path).ok())
            .unwrap_or_default();
        if !bundle.is_empty() && !bundle.ends_with('\n') {
            bundle.push('\n');
        }
        bundle.push_str(ca);
        std::fs::write(&net.ca_file, ca)
            .and_then(|()| std::fs::write(&net.bundle_file, bundle))
            .map_err(|e| format!("cannot write the egress CA: {e}"))?;
    }
    Ok(())
}

const OPEN_FILES: u64 = 1024;

/// What the probe sees from inside a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Inside {
    pub rlimits: bool,
    pub no_new_privs: bool,
    pub seccomp: bool,
    /// `fully enforced (…)`, `partially enforced (…)` or `not enforced (…)`.
    pub landlock: String,
    /// Effective and bounding capability sets are empty.
    pub no_capabilities: bool,
    /// The uid inside is not 0 and the user namespace maps exactly one uid (the host side is the
    /// run's own uid, or the runner's: see [`super::Report::host_uid`]).
    pub user_namespace: bool,
    /// The probe is not the first process of the host: its pid is small in a fresh pid namespace.
    pub pid_namespace: bool,
    /// `/` is a fresh tmpfs (not the host's root).
    pub private_root: bool,
    /// The path given in `hidden` cannot be seen.
    pub runner_files_hidden: bool,
    /// `/proc` lists only this run's processes.
    pub private_proc: bool,
    /// The run's OOM score is 1000: the OOM killer takes it before the runner.
    #[serde(default)]
    pub oom_first: bool,
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> bool {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `limit` is a valid rlimit living across the call; setrlimit only reads it.
    unsafe { libc::setrlimit(resource, &limit) == 0 }
}

/// The OOM score every process of the run inherits. Raising one's own score needs no privilege;
/// the runner cannot do it for the command when it is not root (its children are not dumpable, so
/// their `/proc/self` files belong to root), so the helper does, before Landlock.
const OOM_SCORE_ADJ: &str = "1000";

fn oom_first() -> bool {
    std::fs::write("/proc/self/oom_score_adj", OOM_SCORE_ADJ).is_ok()
}

fn no_new_privs() -> bool {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 }
}

fn landlock(readable: &[PathBuf], writable: &[PathBuf]) -> String {
    let abi = ABI::V2;
    let existing = |paths: &[PathBuf]| -> Vec<PathBuf> {
        paths.iter().filter(|p| p.exists()).cloned().collect()
    };
    let result = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.scope(Scope::AbstractUnixSocket | Scope::Signal))
        .and_then(|r| r.create())
        .and_then(|r| {
            r.add_rules(path_beneath_rules(
                existing(readable),
                AccessFs::from_read(abi),
            ))
        })
        .and_then(|r| {
            r.add_rules(path_beneath_rules(
                existing(writable),
                AccessFs::from_all(abi),
            ))
        })
        .and_then(|r| r.restrict_self());
    match result {
        Ok(status) => match status.ruleset {
            RulesetStatus::FullyEnforced => {
                "fully enforced (files, abstract unix sockets, signals)".to_owned()
            }
            RulesetStatus::PartiallyEnforced => format!(
                "partially enforced (kernel: {:?}; abstract unix sockets and signals need ABI V6, Linux 6.12)",
                status.landlock
            ),
            RulesetStatus::NotEnforced => "not enforced".to_owned(),
        },
        Err(e) => format!("not enforced ({e})"),
    }
}

struct Applied {
    oom_first: bool,
    rlimits: bool,
    no_new_privs: bool,
    landlock: String,
    seccomp: bool,
}

fn restrict(layers: &Layers) -> Applied {
    let oom_first = oom_first();
    let rlimits = [
        set_limit(libc::RLIMIT_CORE, 0),
        set_limit(libc::RLIMIT_CPU, layers.cpu_seconds.max(1)),
        set_limit(libc::RLIMIT_AS, layers.memory_bytes),
        set_limit(libc::RLIMIT_NOFILE, OPEN_FILES),
        set_limit(libc::RLIMIT_NPROC, layers.processes),
        set_limit(libc::RLIMIT_FSIZE, layers.file_bytes),
    ]
    .iter()
    .all(|ok| *ok);
    let no_new_privs = no_new_privs();
    let landlock = landlock(&layers.readable, &layers.writable);
    let seccomp = super::filter::apply();
    Applied {
        oom_first,
        rlimits,
        no_new_privs,
        landlock,
        seccomp,
    }
}

/// Marks every descriptor above standard error close-on-exec, so the command starts with only
/// its three standard streams: nothing the runner's own parent left open reaches a run.
fn close_inherited() -> bool {
    // SAFETY: close_range takes integers; with CLOSE_RANGE_CLOEXEC it only sets a flag on
    // descriptors this process holds, and no Rust object here uses one after exec.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) == 0
    }
}

fn status_field(status: &str, name: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
}

fn probe(layers: &Layers, applied: Applied) -> Inside {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let zero = |name| status_field(&status, name).is_some_and(|v| v.bytes().all(|b| b == b'0'));
    let uid_map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let mapped: Vec<&str> = uid_map.split_whitespace().collect();
    // SAFETY: getuid/getpid only read the process's own credentials and id.
    let (uid, pid) = unsafe { (libc::getuid(), libc::getpid()) };
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `stat` outlives the call, which only writes into it; the path is a C string.
    let statted = unsafe { libc::statfs(c"/".as_ptr(), &mut stat) } == 0;
    let root_is_tmpfs = statted && stat.f_type == libc::TMPFS_MAGIC;
    let pids = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                .count()
        })
        .unwrap_or(usize::MAX);
    Inside {
        rlimits: applied.rlimits,
        no_new_privs: status_field(&status, "NoNewPrivs:").as_deref() == Some("1"),
        seccomp: applied.seccomp && status_field(&status, "Seccomp:").as_deref() == Some("2"),
        landlock: applied.landlock,
        no_capabilities: zero("CapEff:") && zero("CapBnd:") && zero("CapPrm:"),
        user_namespace: uid != 0 && mapped.len() == 3 && mapped[2] == "1",
        pid_namespace: pid <= 4,
        private_root: root_is_tmpfs,
        runner_files_hidden: layers
            .hidden
            .as_deref()
            .is_none_or(|p| std::fs::symlink_metadata(p).is_err()),
        private_proc: pids <= 4,
        oom_first: applied.oom_first
            && std::fs::read_to_string("/proc/self/oom_score_adj")
                .is_ok_and(|v| v.trim() == OOM_SCORE_ADJ),
    }
}

/// What a sandbox started ahead of its run (see `super::Sandbox::start`) reads first on its
/// standard input: the run's layers, command line and environment (secrets included), as a 4-byte
/// big-endian length and that many bytes of JSON. It is read unbuffered, so what follows in the
/// pipe is the command's own input.
#[derive(Deserialize)]
struct Spec {
    layers: Layers,
    argv: Vec<String>,
    env: Vec<(String, String)>,
}

/// The runner's side of [`Spec`], borrowed from the request.
#[derive(Serialize)]
pub struct SpecRef<'a> {
    pub layers: &'a Layers,
    pub argv: &'a [String],
    pub env: &'a [(&'a str, &'a str)],
}

/// Largest [`Spec`] a helper reads: well above any request body a runner accepts.
pub const MAX_SPEC_BYTES: u32 = 64 << 20;

/// `spec` as the helper reads it: its length, then its JSON, in one buffer that is wiped when
/// dropped and sized before it is written (a growing buffer would leave copies of the secrets
/// behind in freed memory). `None` if it cannot be serialized or is over [`MAX_SPEC_BYTES`].
pub fn frame(spec: &SpecRef<'_>) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, spec).ok()?;
    let length = u32::try_from(count.0)
        .ok()
        .filter(|n| *n <= MAX_SPEC_BYTES)?;
    let mut framed = zeroize::Zeroizing::new(Vec::with_capacity(4 + count.0));
    framed.extend_from_slice(&length.to_be_bytes());
    serde_json::to_writer(&mut *framed, spec).ok()?;
    (framed.len() == 4 + count.0).then_some(framed)
}

/// Reads one [`Spec`] from standard input, unbuffered. `None` when the runner closed the pipe
/// without one (it dropped the sandbox) or sent something malformed.
fn read_spec() -> Option<zeroize::Zeroizing<Vec<u8>>> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    // SAFETY: descriptor 0 is this process's standard input, open for its whole life; the
    // ManuallyDrop keeps this File from closing it, so nothing else's ownership is disturbed.
    let mut input = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(0) });
    let mut length = [0u8; 4];
    input.read_exact(&mut length).ok()?;
    let length = u32::from_be_bytes(length);
    if length > MAX_SPEC_BYTES {
        return None;
    }
    let mut spec = zeroize::Zeroizing::new(vec![0u8; length as usize]);
    input.read_exact(&mut spec).ok()?;
    Some(spec)
}

/// The helper's main: `HELPER_ARG LAYERS_JSON -- PROGRAM ARGS…`, `HELPER_ARG --spare FD` (the
/// run arrives on standard input as a [`Spec`]; `FD` is the runner's egress socket, closed unless
/// the run has egress), or `HELPER_ARG --probe LAYERS_JSON` to print an [`Inside`] report as JSON.
pub fn helper_main(args: Vec<OsString>) -> ExitCode {
    let mut args = args.into_iter();
    let mut first = args.next().unwrap_or_default();
    if first == super::SPARE_ARG {
        return spare(args.next());
    }
    let probing = first == "--probe";
    if probing {
        first = args.next().unwrap_or_default();
    }
    let Some(layers) = first
        .to_str()
        .and_then(|s| serde_json::from_str::<Layers>(s).ok())
    else {
        eprintln!("sandbox: malformed helper invocation");
        return ExitCode::from(126);
    };
    if probing {
        let applied = restrict(&layers);
        println!(
            "{}",
            serde_json::to_string(&probe(&layers, applied)).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    if args.next().as_deref() != Some(std::ffi::OsStr::new("--")) {
        eprintln!("sandbox: malformed helper invocation");
        return ExitCode::from(126);
    }
    let argv: Vec<OsString> = args.collect();
    exec(&layers, &argv, Vec::new())
}

/// A sandbox started ahead of its run: waits for the run's [`Spec`], then runs it as
/// [`helper_main`] would have.
fn spare(socket: Option<OsString>) -> ExitCode {
    let Some(socket) = socket
        .and_then(|fd| fd.to_str().and_then(|fd| fd.parse::<i32>().ok()))
        .filter(|fd| *fd > 2)
    else {
        eprintln!("sandbox: malformed helper invocation");
        return ExitCode::from(126);
    };
    let Some(spec) = read_spec() else {
        // The runner dropped this sandbox unused (it is shutting down): nothing to run.
        return ExitCode::from(126);
    };
    let Ok(Spec { layers, argv, env }) = serde_json::from_slice::<Spec>(&spec) else {
        eprintln!("sandbox: malformed run specification");
        return ExitCode::from(126);
    };
    drop(spec);
    let argv: Vec<OsString> = argv.into_iter().map(OsString::from).collect();
    match &layers.egress {
        Some(net) if net.fd == socket => {}
        Some(_) => {
            eprintln!("sandbox: the run's egress socket is not the one this sandbox holds");
            return ExitCode::from(126);
        }
        None => {
            // SAFETY: the runner left exactly this descriptor open for the helper and nothing here
            // uses it: closed now, the command never holds a line to the runner.
            unsafe {
                libc::close(socket);
            }
        }
    }
    exec(&layers, &argv, env)
}

/// Opens the run's egress, restricts this process, then execs `argv` with `env` added to the
/// environment bubblewrap gave the helper.
fn exec(layers: &Layers, argv: &[OsString], env: Vec<(String, String)>) -> ExitCode {
    let Some((program, rest)) = argv.split_first() else {
        eprintln!("sandbox: no program to run");
        return ExitCode::from(126);
    };
    if let Some(Err(e)) = layers.egress.as_ref().map(open_egress) {
        eprintln!("sandbox: {e}; refusing to run");
        return ExitCode::from(126);
    }
    if !close_inherited() {
        eprintln!("sandbox: cannot close inherited descriptors; refusing to run");
        return ExitCode::from(126);
    }
    let applied = restrict(layers);
    if !(applied.rlimits && applied.no_new_privs && applied.seccomp) {
        eprintln!("sandbox: could not apply the required restrictions; refusing to run");
        return ExitCode::from(126);
    }
    let error = std::process::Command::new(program)
        .args(rest)
        .envs(env)
        .exec();
    eprintln!(
        "sandbox: cannot execute {}: {error}",
        Path::new(program).display()
    );
    ExitCode::from(127)
}
