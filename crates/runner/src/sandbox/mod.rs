//! The world each command runs in. Every run is started by bubblewrap (`bwrap`, the sandbox
//! Flatpak and others rely on) in namespaces of its own, then restricted further by the helper in
//! [`inner`] before the command's first instruction:
//!
//! - user namespace with one unprivileged uid inside (65534) and, when the runner is root, a host
//!   uid of the run's own; no capabilities (effective, permitted, bounding); further user
//!   namespaces disabled;
//! - pid namespace (required): a fresh `/proc` shows only the run's processes, and when the
//!   command exits, or the runner dies (`PR_SET_PDEATHSIG` on bubblewrap, `--die-with-parent` on
//!   the namespace's init), everything the run started is killed by the kernel;
//! - mount namespace on a fresh tmpfs root: system directories and a short allowlist of `/etc`
//!   read-only, a private size-capped work dir (`/work`, the command's cwd and HOME) and `/tmp`
//!   (0700, tmpfs: nothing reaches the runner's disk), a minimal `/dev`; the root and `/dev`
//!   themselves are read-only, so the size-capped mounts are all a run can fill. Other runs, the
//!   runner's config, key, certificate and CA, and any data directory are simply not there;
//! - IPC, UTS and (where possible) cgroup namespaces, a new session (no terminal injection);
//! - then [`inner`]: rlimits (per-run process limit), `no_new_privs`, Landlock, seccomp.
//!
//! - a network namespace of its own with only loopback: no route out. What the run's egress rules
//!   allow appears on 127.0.0.1 inside it: the helper binds those listeners and hands them to the
//!   runner over an inherited Unix socket ([`fdpass`]), and the runner serves them from outside
//!   ([`crate::egress`]).
//!
//! The runner keeps one sandbox set up ahead of the next run (see [`Sandbox::start`]): the slow
//! part, bubblewrap's namespaces and mounts, is then done before the request comes, and the run's
//! command line and environment reach the helper over its standard input.
//!
//! [`check`] runs a probe through the same path and reports what it sees from inside.
#![expect(
    unsafe_code,
    reason = "prctl and kill are plain libc calls in pre_exec; each block states why it is sound"
)]

mod etc;
pub mod fdpass;
pub mod files;
pub mod filter;
pub mod inner;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::SandboxConfig;
pub use inner::helper_main;
use inner::{Inside, Layers, NetSetup};

/// First argument of the helper invocation.
pub const HELPER_ARG: &str = "__custodian-sandbox-exec";
/// The helper's argument for a sandbox started ahead of its run (see [`Sandbox::start`]).
const SPARE_ARG: &str = "--spare";
/// Where the helper binary appears inside a run.
const HELPER_INSIDE: &str = "/run/custodian/sandbox-helper";
/// The run's working directory and HOME.
pub const WORK_DIR: &str = "/work";
const TMP_DIR: &str = "/tmp";
/// The uid and gid of every command inside its user namespace.
const INSIDE_ID: &str = "65534";
/// Host directories bound read-only (or recreated as the same symlink) in every run.
const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];
/// The parts of `/etc` a command may need; the rest of `/etc` is not there.
const ETC_ALLOWLIST: &[&str] = &[
    "alternatives",
    "ca-certificates",
    "ca-certificates.conf",
    "crypto-policies",
    "debian_version",
    "gai.conf",
    "group",
    "host.conf",
    "hostname",
    "hosts",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "magic",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "passwd",
    "perl",
    "pki",
    "postgresql-common",
    "protocols",
    "python3",
    "resolv.conf",
    "services",
    "ssl/certs",
    "ssl/openssl.cnf",
    "terminfo",
    "timezone",
];
const PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Largest file a command may write.
const FILE_BYTES: u64 = 256 << 20;

/// Whether runs are isolated. The only alternative is a development mode with a loud name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Namespaces, private root, no privilege (the only production mode).
    Full,
    /// `--dangerously-run-without-isolation`: rlimits, Landlock and seccomp only; runs share the
    /// runner's view of the host. For machines that cannot create namespaces, in development.
    DangerouslyNone,
}

/// Starts commands in their sandbox. Cheap to clone: clones share one spare sandbox.
#[derive(Clone)]
pub struct Sandbox(std::sync::Arc<Parts>);

impl std::ops::Deref for Sandbox {
    type Target = Parts;
    fn deref(&self) -> &Parts {
        &self.0
    }
}

/// What a [`Sandbox`] is made of.
pub struct Parts {
    helper: PathBuf,
    config: SandboxConfig,
    isolation: Isolation,
    /// The runner is root: each run gets its own host uid from `config.uid_base`.
    per_run_uids: bool,
    /// Where per-run uids are locked (root only): one lock file per uid, held while a run uses it,
    /// so that runners sharing a host never hand the same uid to two runs.
    uid_locks: Option<PathBuf>,
    next_slot: std::sync::atomic::AtomicU32,
    bwrap_args: Vec<OsString>,
    /// The sandbox the next run takes, already set up (see [`Sandbox::start`]).
    spare: std::sync::Mutex<Option<Spare>>,
    /// Asks the thread that sets up spares for one (started with the first).
    refills: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
    /// The copy of `/etc` runs see, removed with the sandbox.
    _etc: Option<tempfile::TempDir>,
}

/// A fresh sandbox started before its run is known: bubblewrap has built its namespaces and
/// mounts, and the helper inside waits on its standard input for the run ([`inner::SpecRef`]).
/// It holds no secret and no part of any request until then, and serves exactly one run.
struct Spare {
    child: tokio::process::Child,
    lease: Lease,
    /// The runner's end of the egress socket, and the descriptor of the helper's end.
    socket: std::os::fd::OwnedFd,
    their_fd: i32,
    born: std::time::Instant,
    /// Until a run takes it: killing bubblewrap alone could leave its namespace's init behind
    /// (it gets its death signal only once set up), so the whole group goes.
    unused: KillGroupOnDrop,
}

/// How old a spare may get: bind mounts (`/etc/resolv.conf`, `read_only_paths`) show the files
/// they were made with, so a host's changes reach runs within this time. The thread that sets up
/// spares replaces one at half this age.
const SPARE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Kills a process group when dropped, unless it was disarmed (`.0` taken).
pub struct KillGroupOnDrop(pub Option<i32>);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            kill_group(group);
        }
    }
}

/// A run's sandbox, started: bubblewrap's process (its process group is the run's), what must
/// live until the run is over, and with egress the socket its listeners arrive on.
pub struct Started {
    pub child: tokio::process::Child,
    pub lease: Lease,
    pub socket: Option<std::os::fd::OwnedFd>,
}

/// A per-run host uid, held (through its lock) until the run is over.
struct UidSlot {
    uid: u32,
    _lock: std::fs::File,
}

/// What a started command holds until it is over: its uid, its credential files and (unisolated)
/// its work dir.
pub struct Lease {
    _slot: Option<UidSlot>,
    _work: Option<tempfile::TempDir>,
    _files: files::Placed,
    /// The run's end of the listener socket.
    _net: Option<std::os::fd::OwnedFd>,
}

/// What a run's network namespace holds for the runner: loopback listeners, and the CA its proxy
/// signs with (certificate only).
#[derive(Debug, Clone)]
pub struct NetPlan {
    pub ports: Vec<u16>,
    pub ca_pem: Option<String>,
}

/// Where the helper writes the run's egress CA, and the bundle of system roots plus that CA.
pub const EGRESS_CA_FILE: &str = "/tmp/custodian-egress-ca.pem";
pub const EGRESS_BUNDLE_FILE: &str = "/tmp/custodian-egress-ca-bundle.pem";

/// How many host uids a root runner uses, one per concurrent run.
const UID_SLOTS: u32 = 65_536;

impl Sandbox {
    /// `helper` is the binary that answers to [`HELPER_ARG`]: `custodian-sandbox` or the runner
    /// itself (see [`helper_beside`]).
    pub fn new(helper: PathBuf, config: SandboxConfig, isolation: Isolation) -> Self {
        // SAFETY: geteuid only reads the process's credentials.
        let root = unsafe { libc::geteuid() } == 0;
        let etc = match etc::copy(ETC_ALLOWLIST) {
            Ok(dir) => Some(dir),
            Err(e) => {
                tracing::warn!(error = %e, "cannot copy /etc for runs; binding each entry instead (slower starts)");
                None
            }
        };
        let bwrap_args = bwrap_args(&helper, &config, etc.as_ref().map(tempfile::TempDir::path));
        Self(std::sync::Arc::new(Parts {
            helper,
            config,
            isolation,
            per_run_uids: root,
            uid_locks: root.then(uid_lock_dir).flatten(),
            next_slot: std::sync::atomic::AtomicU32::new(0),
            bwrap_args,
            spare: std::sync::Mutex::new(None),
            refills: std::sync::Mutex::new(None),
            _etc: etc,
        }))
    }

    /// Starts `argv` in a fresh sandbox with `env` (and nothing else of the runner's environment)
    /// and `credentials` ([`files`]); its standard input is a pipe when `stdin`, else empty, and
    /// its output is piped.
    ///
    /// Isolated runs without credential files take the spare sandbox when one is ready: its
    /// namespaces and mounts were set up before the request came, so only the helper's own
    /// restrictions and the exec remain. The run's command line and environment reach the helper
    /// through its standard input, not bubblewrap's command line or environment. A new spare is
    /// started for the next run at once. Each sandbox serves one run, spare or not.
    pub async fn start(
        &self,
        argv: &[String],
        env: &[(&str, &str)],
        credentials: &[files::CredentialFile],
        cpu_seconds: u64,
        net: Option<NetPlan>,
        stdin: bool,
    ) -> Result<Started, String> {
        use std::process::Stdio;
        if credentials.is_empty()
            && let Some(started) = self
                .start_spare(argv, env, cpu_seconds, net.clone(), stdin)
                .await
        {
            return Ok(started);
        }
        // A sandbox of its own: the command line and environment go on bubblewrap's, and the
        // credential files are mounted.
        let (mut command, lease, socket) = self.prepare(
            cpu_seconds,
            None,
            net,
            credentials,
            |command, layers, lease| {
                command
                    .arg(HELPER_ARG)
                    .arg(layers)
                    .arg("--")
                    .args(argv)
                    .envs(env.iter().copied());
                lease
            },
        )?;
        let child = command
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        drop(command);
        self.refill();
        Ok(Started {
            child,
            lease,
            socket,
        })
    }

    /// Runs `argv` in the spare sandbox, if one is ready and still alive; `None` leaves the run
    /// to a sandbox of its own (nothing of it ran).
    async fn start_spare(
        &self,
        argv: &[String],
        env: &[(&str, &str)],
        cpu_seconds: u64,
        net: Option<NetPlan>,
        stdin: bool,
    ) -> Option<Started> {
        use tokio::io::AsyncWriteExt;
        // What cannot be exec'ed is refused by the spawn of a sandbox of its own, before the run.
        let nul = |s: &str| s.contains('\0');
        if argv.iter().any(|a| nul(a)) || env.iter().any(|(n, v)| nul(n) || nul(v)) {
            return None;
        }
        let taken = self
            .spare
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let mut spare = taken?;
        // A spare that ended while it waited, or too old (it is dropped, killed with its group).
        if !matches!(spare.child.try_wait(), Ok(None)) || spare.born.elapsed() > SPARE_MAX_AGE {
            return None;
        }
        let mut layers = self.layers(cpu_seconds, None, None);
        let socket = net.map(|plan| {
            layers.egress = Some(NetSetup {
                fd: spare.their_fd,
                ports: plan.ports,
                ca_pem: plan.ca_pem,
                ca_file: EGRESS_CA_FILE.into(),
                bundle_file: EGRESS_BUNDLE_FILE.into(),
            });
            spare.socket
        });
        let spec = inner::SpecRef {
            layers: &layers,
            argv,
            env,
        };
        let framed = inner::frame(&spec)?;
        let mut pipe = spare.child.stdin.take()?;
        // The helper execs only once it has read all of this: a failed write means nothing ran.
        pipe.write_all(&framed).await.ok()?;
        drop(framed);
        if stdin {
            spare.child.stdin = Some(pipe);
        } else {
            // End of input for the command.
            drop(pipe);
        }
        spare.unused.0 = None;
        self.refill();
        Some(Started {
            child: spare.child,
            lease: spare.lease,
            socket,
        })
    }

    /// Starts the spare sandbox for the next run unless there is one (isolated runs only), on
    /// the sandbox's own thread: forking the runner is not the current run's to wait for, and
    /// bubblewrap's death signal follows the thread that started it, so that thread must live as
    /// long as the sandbox (a thread of the blocking pool ends after 10 s idle, and would take
    /// the spare with it).
    fn refill(&self) {
        if !self.config.spare || self.isolation != Isolation::Full {
            return;
        }
        let mut refills = self
            .refills
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if refills.is_none() {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let (requests, received) = std::sync::mpsc::channel::<()>();
            let parts = std::sync::Arc::downgrade(&self.0);
            let started = std::thread::Builder::new()
                .name("sandbox-spare".to_owned())
                .spawn(move || {
                    let _runtime = runtime.enter();
                    // Ends when the sandbox is dropped (and with it the sender).
                    use std::sync::mpsc::RecvTimeoutError;
                    while let Ok(()) | Err(RecvTimeoutError::Timeout) =
                        received.recv_timeout(SPARE_MAX_AGE / 2)
                    {
                        let Some(parts) = parts.upgrade() else { break };
                        Sandbox(parts).refill_now();
                    }
                });
            if let Err(e) = started {
                tracing::warn!(error = %e, "cannot start the thread that sets up spare sandboxes; runs start their own");
                return;
            }
            *refills = Some(requests);
        }
        if let Some(requests) = refills.as_ref() {
            let _ = requests.send(());
        }
    }

    /// Sets up a spare unless one younger than half [`SPARE_MAX_AGE`] is waiting (an older one
    /// is replaced). Called only from the sandbox's own thread, so spares are set up one at a time.
    fn refill_now(&self) {
        let slot = || {
            self.spare
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let stale = {
            let mut slot = slot();
            match slot.as_ref() {
                Some(spare) if spare.born.elapsed() < SPARE_MAX_AGE / 2 => return,
                Some(_) => slot.take(),
                None => None,
            }
        };
        drop(stale);
        match self.spawn_spare() {
            Ok(spare) => {
                let mut slot = slot();
                if slot.is_none() {
                    *slot = Some(spare);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a spare sandbox; the next run starts its own")
            }
        }
    }

    fn spawn_spare(&self) -> Result<Spare, String> {
        use std::os::fd::AsRawFd;
        use std::process::Stdio;
        let listeners = NetPlan {
            ports: Vec::new(),
            ca_pem: None,
        };
        let (mut command, lease, socket) =
            self.prepare(1, None, Some(listeners), &[], |command, _, lease| {
                let fd = lease._net.as_ref().map_or(-1, AsRawFd::as_raw_fd);
                command.arg(HELPER_ARG).arg(SPARE_ARG).arg(fd.to_string());
                lease
            })?;
        let their_fd = lease._net.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        let socket = socket.ok_or("no egress socket for the spare sandbox")?;
        let child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.config.bwrap.display()))?;
        let group = child.id().and_then(|pid| i32::try_from(pid).ok());
        Ok(Spare {
            child,
            lease,
            socket,
            their_fd,
            born: std::time::Instant::now(),
            unused: KillGroupOnDrop(group),
        })
    }

    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// Kills whatever still runs under a per-run uid that no live run holds (left by a runner that
    /// was killed between fork and its death signal): run at start. Returns
    /// how many processes it killed. Nothing of a run lives on disk, so processes are all there is
    /// to sweep.
    pub fn sweep(&self) -> usize {
        if !self.per_run_uids || self.isolation != Isolation::Full {
            return 0;
        }
        let Some(dir) = self.uid_locks.as_deref() else {
            return 0;
        };
        let range = self.config.uid_base..self.config.uid_base.saturating_add(UID_SLOTS);
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return 0;
        };
        let mut killed = 0;
        // Uids whose lock is free belong to no live run (of this runner or another on this host).
        let mut orphaned: std::collections::BTreeMap<u32, Option<std::fs::File>> =
            std::collections::BTreeMap::new();
        for entry in entries.filter_map(Result::ok) {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            let uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u32>().ok());
            let Some(uid) = uid.filter(|uid| range.contains(uid)) else {
                continue;
            };
            let lock = orphaned.entry(uid).or_insert_with(|| lock_uid(dir, uid));
            if lock.is_some() {
                // SAFETY: kill takes plain integers.
                if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                    killed += 1;
                }
            }
        }
        killed
    }

    fn layers(&self, cpu_seconds: u64, hidden: Option<PathBuf>, work: Option<&Path>) -> Layers {
        let (readable, writable) = match (self.isolation, work) {
            (Isolation::Full, _) => {
                let mut readable: Vec<PathBuf> = SYSTEM_DIRS
                    .iter()
                    .chain(&[
                        "/etc",
                        "/proc",
                        "/run/custodian",
                        custodian_protocol::CREDENTIALS_DIR,
                    ])
                    .map(PathBuf::from)
                    .collect();
                readable.extend(self.config.read_only_paths.iter().cloned());
                (
                    readable,
                    vec![WORK_DIR.into(), TMP_DIR.into(), "/dev".into()],
                )
            }
            (Isolation::DangerouslyNone, work) => (
                vec!["/".into()],
                work.map(Path::to_path_buf)
                    .into_iter()
                    .chain([PathBuf::from("/dev/null")])
                    .collect(),
            ),
        };
        Layers {
            cpu_seconds,
            processes: self.config.processes,
            memory_bytes: self.config.memory_bytes,
            file_bytes: FILE_BYTES.min(self.config.tmpfs_bytes),
            readable,
            writable,
            hidden,
            egress: None,
        }
    }

    fn take_slot(&self) -> Result<Option<UidSlot>, String> {
        if !self.per_run_uids || self.isolation != Isolation::Full {
            return Ok(None);
        }
        let dir = self
            .uid_locks
            .as_deref()
            .ok_or("no directory to lock per-run uids in")?;
        let start = self
            .next_slot
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for offset in 0..UID_SLOTS {
            let uid = self.config.uid_base + (start.wrapping_add(offset) % UID_SLOTS);
            if let Some(lock) = lock_uid(dir, uid) {
                return Ok(Some(UidSlot { uid, _lock: lock }));
            }
        }
        Err("every per-run uid is in use".to_owned())
    }

    /// A sandbox's command, with nothing of the runner's environment, and `credentials`
    /// ([`files`]) in place; `finish` adds what the helper runs. The [`Lease`] must live until the
    /// command is over. With `net` (isolated runs only), the returned socket receives the run's
    /// listeners once it starts ([`fdpass::recv`]). `hidden` is for the self-check
    /// ([`Sandbox::check`]): a runner path its probe must not see.
    fn prepare(
        &self,
        cpu_seconds: u64,
        hidden: Option<PathBuf>,
        net: Option<NetPlan>,
        credentials: &[files::CredentialFile],
        finish: impl FnOnce(&mut tokio::process::Command, String, Lease) -> Lease,
    ) -> Result<(tokio::process::Command, Lease, Option<std::os::fd::OwnedFd>), String> {
        use std::os::fd::AsRawFd;
        let slot = self.take_slot()?;
        let (mut command, work, mut layers, placed) = match self.isolation {
            Isolation::Full => {
                let (file_args, placed) = files::for_bwrap(credentials)?;
                let mut command = tokio::process::Command::new(&self.config.bwrap);
                command
                    // Before the fixed arguments, which end by making the root read-only.
                    .args(file_args)
                    .args(&self.bwrap_args)
                    .arg("--")
                    .arg(HELPER_INSIDE)
                    .current_dir("/");
                let layers = self.layers(cpu_seconds, hidden, None);
                (command, None, layers, placed)
            }
            Isolation::DangerouslyNone => {
                // 0700: other users of the host cannot look in (tempfile's default is 0777 & umask).
                let work = tempfile::Builder::new()
                    .prefix("custodian-run-")
                    .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
                    .tempdir()
                    .map_err(|e| format!("cannot create a work directory: {e}"))?;
                let mut command = tokio::process::Command::new(&self.helper);
                command.current_dir(work.path());
                let layers = self.layers(cpu_seconds, hidden, Some(work.path()));
                let placed = files::in_temp_dir(credentials)?;
                (command, Some(work), layers, placed)
            }
        };
        // The run's HOME and TMPDIR: its work dir and /tmp, or without isolation its work dir.
        let (home, tmp) = match &work {
            Some(work) => (work.path().as_os_str(), work.path().as_os_str()),
            None => (WORK_DIR.as_ref(), TMP_DIR.as_ref()),
        };
        command
            .env_clear()
            .env("PATH", PATH)
            .env("LANG", "C.UTF-8")
            .env("HOME", home)
            .env("TMPDIR", tmp)
            .envs(placed.env.iter().map(|(n, v)| (n, v)))
            .process_group(0)
            .kill_on_drop(true);
        // Without isolation there is no network namespace to listen in: no egress is set up.
        let (ours, theirs) = match net.filter(|_| self.isolation == Isolation::Full) {
            Some(plan) => {
                let (ours, theirs) =
                    fdpass::pair().map_err(|e| format!("cannot create the egress socket: {e}"))?;
                fdpass::set_recv_timeout(ours.as_raw_fd(), 20)
                    .map_err(|e| format!("cannot set up the egress socket: {e}"))?;
                layers.egress = Some(NetSetup {
                    fd: theirs.as_raw_fd(),
                    ports: plan.ports,
                    ca_pem: plan.ca_pem,
                    ca_file: EGRESS_CA_FILE.into(),
                    bundle_file: EGRESS_BUNDLE_FILE.into(),
                });
                (Some(ours), Some(theirs))
            }
            None => (None, None),
        };
        let inherited = theirs.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        // Bubblewrap reads each credential file from its descriptor.
        let file_fds: Vec<i32> = placed.memfds.iter().map(AsRawFd::as_raw_fd).collect();
        let parent = std::process::id() as libc::pid_t;
        let host_id = slot.as_ref().map(|slot| slot.uid);
        // SAFETY: the closure runs in the forked child before exec and calls only fcntl, open,
        // write, close, setgroups, setgid, setuid, prctl, getppid and _exit, which are
        // async-signal-safe; it allocates nothing (the path is a static C string).
        unsafe {
            command.pre_exec(move || {
                // The run's end of the egress socket survives exec (bubblewrap passes it on).
                if inherited >= 0 && libc::fcntl(inherited, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for fd in &file_fds {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // First in line for the OOM killer, before the runner: a run that exhausts the
                // host's (or the pod's) memory is what gets killed. Written while still root
                // (after the uid change `/proc/self` belongs to root: the child is not dumpable);
                // a runner that is not root cannot, and the helper raises the command's own.
                let fd = libc::open(
                    c"/proc/self/oom_score_adj".as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                );
                if fd >= 0 {
                    libc::write(fd, b"1000".as_ptr().cast(), 4);
                    libc::close(fd);
                }
                if let Some(id) = host_id {
                    // The run's own host uid, with no supplementary groups (root's would stay).
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(id) != 0
                        || libc::setuid(id) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Dies with the runner; set after the uid change (which clears it).
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                if libc::getppid() != parent {
                    libc::_exit(126);
                }
                Ok(())
            });
        }
        let layers = serde_json::to_string(&layers).map_err(|e| e.to_string())?;
        let lease = Lease {
            _slot: slot,
            _work: work,
            _files: placed,
            _net: theirs,
        };
        let lease = finish(&mut command, layers, lease);
        Ok((command, lease, ours))
    }

    /// Runs the probe through the same path as a command and reports what it saw.
    pub async fn check(&self, hidden: &Path) -> Report {
        let probed = self.prepare(
            1,
            Some(hidden.to_path_buf()),
            None,
            &[],
            |command, layers, lease| {
                command
                    .arg(HELPER_ARG)
                    .arg("--probe")
                    .arg(layers)
                    .stdin(std::process::Stdio::null());
                lease
            },
        );
        let inside = match probed {
            Ok((mut command, _lease, _)) => match command.output().await {
                Ok(out) if out.status.success() => serde_json::from_slice::<Inside>(&out.stdout)
                    .map_err(|e| format!("unreadable probe report: {e}")),
                Ok(out) => Err(format!(
                    "the sandbox could not start ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
                Err(e) => Err(format!("cannot start {}: {e}", self.config.bwrap.display())),
            },
            Err(e) => Err(e),
        };
        Report::new(self, inside)
    }
}

/// The directory of per-run uid locks: root's own, not writable by anyone else.
fn uid_lock_dir() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = if Path::new("/run").is_dir() {
        PathBuf::from("/run/custodian-runner-uids")
    } else {
        std::env::temp_dir().join("custodian-runner-uids")
    };
    std::fs::create_dir_all(&dir).ok()?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).ok()?;
    Some(dir)
}

/// Takes the lock of `uid` if no one (in this or another process) holds it.
fn lock_uid(dir: &Path, uid: u32) -> Option<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(uid.to_string()))
        .ok()?;
    // SAFETY: flock takes the descriptor of a file we own and integer flags.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    locked.then_some(file)
}

/// The helper to bind into runs: `custodian-sandbox` beside `exe` when it is there (a 1 MB binary
/// starts in a fraction of the time a re-exec of the whole runner takes), else `exe` itself.
pub fn helper_beside(exe: &Path) -> PathBuf {
    let small = exe.with_file_name("custodian-sandbox");
    if small.is_file() {
        small
    } else {
        exe.to_path_buf()
    }
}

/// Builds bubblewrap's arguments once: they are the same for every run.
fn bwrap_args(helper: &Path, config: &SandboxConfig, etc_copy: Option<&Path>) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "--unshare-user",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--uid",
        INSIDE_ID,
        "--gid",
        INSIDE_ID,
        "--hostname",
        "custodian-run",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let mut push = |parts: &[&std::ffi::OsStr]| args.extend(parts.iter().map(|p| p.to_os_string()));
    for dir in SYSTEM_DIRS {
        let path = Path::new(dir);
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(path) {
                    push(&["--symlink".as_ref(), target.as_os_str(), path.as_os_str()]);
                }
            }
            Ok(meta) if meta.is_dir() => {
                push(&["--ro-bind".as_ref(), path.as_os_str(), path.as_os_str()]);
            }
            _ => {}
        }
    }
    let bound_one_by_one: &[&str] = match etc_copy {
        Some(copy) => {
            push(&["--ro-bind".as_ref(), copy.as_os_str(), "/etc".as_ref()]);
            etc::LIVE
        }
        None => ETC_ALLOWLIST,
    };
    for entry in bound_one_by_one {
        let path = Path::new("/etc").join(entry);
        push(&["--ro-bind-try".as_ref(), path.as_os_str(), path.as_os_str()]);
    }
    for path in &config.read_only_paths {
        push(&["--ro-bind-try".as_ref(), path.as_os_str(), path.as_os_str()]);
    }
    let size = config.tmpfs_bytes.to_string();
    push(&[
        "--proc".as_ref(),
        "/proc".as_ref(),
        "--dev".as_ref(),
        "/dev".as_ref(),
    ]);
    for dir in [WORK_DIR, TMP_DIR, "/dev/shm"] {
        push(&[
            "--perms".as_ref(),
            "0700".as_ref(),
            "--size".as_ref(),
            size.as_ref(),
            "--tmpfs".as_ref(),
            dir.as_ref(),
        ]);
    }
    // The root and `/dev` are tmpfs mounts without a size, owned by the run's uid: read-only once
    // everything is in place, so the three capped mounts are all a run can fill. The device nodes,
    // `/dev/pts` and `/dev/shm` are mounts of their own and stay writable.
    push(&[
        "--ro-bind".as_ref(),
        helper.as_os_str(),
        HELPER_INSIDE.as_ref(),
        "--remount-ro".as_ref(),
        "/dev".as_ref(),
        "--remount-ro".as_ref(),
        "/".as_ref(),
        "--chdir".as_ref(),
        WORK_DIR.as_ref(),
    ]);
    args
}

/// What the sandbox enforces on this machine, as seen from inside a probe run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// `bubblewrap namespaces` or `NONE (--dangerously-run-without-isolation)`.
    pub isolation: String,
    /// What the probe saw inside, or why it could not run.
    pub inside: Result<Inside, String>,
    /// Each concurrent run has its own unprivileged host uid (runner is root), or all runs use
    /// the runner's uid, each in its own user namespace.
    pub host_uid: String,
    /// The runner itself is not dumpable (no ptrace, no /proc/PID/mem or environ by its uid).
    pub runner_not_dumpable: bool,
    /// The kernel makes every exec'ed program dumpable again, so this says how a command's memory
    /// and environment are kept from other runs instead.
    pub command_dumpable: String,
    /// Per-run limits and how they are enforced.
    pub limits: String,
}

impl Report {
    fn new(sandbox: &Sandbox, inside: Result<Inside, String>) -> Self {
        let full = sandbox.isolation == Isolation::Full;
        let oom = if inside.as_ref().is_ok_and(|i| i.oom_first) {
            "runs are first for the OOM killer (oom_score_adj 1000)"
        } else {
            "runs are NOT first for the OOM killer (oom_score_adj not raised)"
        };
        Self {
            isolation: if full {
                "bubblewrap: user, pid, network, mount, IPC, UTS namespaces".to_owned()
            } else {
                "NONE (--dangerously-run-without-isolation): runs share the host's view".to_owned()
            },
            inside,
            host_uid: match (full, sandbox.per_run_uids) {
                (true, true) => format!(
                    "one per run from {} (runner is root)",
                    sandbox.config.uid_base
                ),
                _ => "the runner's uid".to_owned(),
            },
            runner_not_dumpable: runner_not_dumpable(),
            command_dumpable: if full {
                "yes after exec (kernel rule); other runs cannot reach it: separate pid namespace, ptrace denied by seccomp".to_owned()
            } else {
                "yes after exec, and visible to other runs of this runner's uid".to_owned()
            },
            limits: format!(
                "per run: {} processes (rlimit in the run's own user namespace), {} bytes each for /work, /tmp and /dev/shm (tmpfs; the rest of the tree is read-only); per process: {} bytes of address space, CPU time = timeout; {}; cgroups not used",
                sandbox.config.processes,
                sandbox.config.tmpfs_bytes,
                sandbox.config.memory_bytes,
                oom
            ),
        }
    }

    /// What is missing for full isolation, if anything.
    pub fn missing(&self) -> Vec<String> {
        let inside = match &self.inside {
            Ok(inside) => inside,
            Err(e) => return vec![e.clone()],
        };
        let mut missing = Vec::new();
        for (ok, layer) in [
            (inside.rlimits, "resource limits"),
            (inside.no_new_privs, "no_new_privs"),
            (inside.seccomp, "seccomp"),
            (inside.no_capabilities, "empty capability sets"),
            (
                inside.user_namespace,
                "user namespace with an unprivileged mapping",
            ),
            (inside.pid_namespace, "pid namespace"),
            (inside.private_proc, "private /proc"),
            (inside.private_root, "private root"),
            (inside.runner_files_hidden, "runner files hidden"),
            (self.runner_not_dumpable, "runner not dumpable"),
        ] {
            if !ok {
                missing.push(layer.to_owned());
            }
        }
        missing
    }
}

/// Makes the current process undumpable: its memory and `/proc/self/environ` are then closed to
/// other processes of the same user (the runner calls this at start).
pub fn make_undumpable() -> bool {
    // SAFETY: PR_SET_DUMPABLE takes one integer argument and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) == 0 }
}

/// Raises the runner's soft limit of open files to its hard limit (systemd and container
/// runtimes start services at 1024): every connection, run and pipe holds some, and any process on
/// the runner's network, a run included, can open connections to its port. Commands get their own
/// limit from the helper. Returns the new limit.
pub fn raise_open_files() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only write and read `limit`, which outlives both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        limit.rlim_cur = limit.rlim_max;
        (libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0).then_some(limit.rlim_cur)
    }
}

fn runner_not_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointer arguments.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 0 }
}

/// Kills every process in the process group `group` (bubblewrap, and with it the whole run).
pub fn kill_group(group: i32) {
    if group > 1 {
        // SAFETY: kill takes plain integers; a negative pid addresses the process group.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
    }
}
