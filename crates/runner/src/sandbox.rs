//! The sandbox each command runs in. The runner starts a helper — a fresh exec of its own binary
//! with [`HELPER_ARG`] — which restricts itself and then execs the command, so that every
//! restriction is applied in ordinary Rust code before the command's first instruction:
//!
//! - resource limits: CPU seconds, address space, open files, processes, file size, core dumps 0;
//! - `no_new_privs` and not dumpable (no core, no ptrace/`/proc/pid/mem` by same-uid processes);
//! - Landlock: read and execute anywhere, write only below the work directory and to `/dev/null`;
//! - a seccomp deny-list (ptrace, process_vm_readv/writev, mount, bpf, keyctl, perf_event_open,
//!   kexec, module loading, namespaces, …) answering `EPERM`.
//!
//! - new pid, mount, IPC and UTS namespaces (plus a user namespace when the runner is not root),
//!   with the command as process 1 of its pid namespace, so nothing it starts outlives it.
//!
//! The network namespace is shared (commands reach databases and APIs). [`check`] reports what this
//! kernel enforces.
#![expect(
    unsafe_code,
    reason = "prctl and setrlimit are plain libc calls; each block states why it is sound"
)]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use landlock::{
    ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    path_beneath_rules,
};
use serde::{Deserialize, Serialize};

/// First argument of the helper invocation.
pub const HELPER_ARG: &str = "__custodian-sandbox-exec";

/// Memory (address space) per command.
const MEMORY_BYTES: u64 = 2 << 30;
const OPEN_FILES: u64 = 1024;
const PROCESSES: u64 = 512;
const FILE_SIZE_BYTES: u64 = 256 << 20;

/// What the sandbox enforces on this machine.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub rlimits: bool,
    pub no_new_privs: bool,
    pub not_dumpable: bool,
    /// `fully enforced`, `partially enforced` or `not enforced` (kernel without Landlock).
    pub landlock: String,
    pub seccomp: bool,
    pub namespaces: bool,
}

/// Makes the current process undumpable: its memory and `/proc/self/environ` are then closed to
/// other processes of the same user (the runner calls this at start).
pub fn make_undumpable() -> bool {
    // SAFETY: PR_SET_DUMPABLE takes one integer argument and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) == 0 }
}

/// Kills every process in the process group `group` (the command and what it left behind).
pub fn kill_group(group: i32) {
    if group > 1 {
        // SAFETY: kill takes plain integers; a negative pid addresses the process group.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
    }
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> bool {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `limit` is a valid rlimit living across the call; setrlimit only reads it.
    unsafe { libc::setrlimit(resource, &limit) == 0 }
}

fn no_new_privs() -> bool {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 }
}

fn landlock(work_dir: &Path) -> String {
    let abi = ABI::V2;
    let result = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules([work_dir], AccessFs::from_all(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(["/dev/null"], AccessFs::from_all(abi))))
        .and_then(|r| r.restrict_self());
    match result {
        Ok(status) => match status.ruleset {
            RulesetStatus::FullyEnforced => "fully enforced",
            RulesetStatus::PartiallyEnforced => "partially enforced",
            RulesetStatus::NotEnforced => "not enforced",
        }
        .to_owned(),
        Err(e) => format!("not enforced ({e})"),
    }
}

/// System calls a command never needs and an attacker would like.
fn denied_syscalls() -> Vec<i64> {
    vec![
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_bpf,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_perf_event_open,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_userfaultfd,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
    ]
}

fn seccomp() -> bool {
    #[cfg(target_arch = "x86_64")]
    let arch = seccompiler::TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    let arch = seccompiler::TargetArch::aarch64;
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = denied_syscalls()
        .into_iter()
        .map(|n| (n, Vec::new()))
        .collect();
    let Ok(filter) = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        arch,
    ) else {
        return false;
    };
    let Ok(program) = seccompiler::BpfProgram::try_from(filter) else {
        return false;
    };
    seccompiler::apply_filter(&program).is_ok()
}

/// Enters new pid, mount, IPC and UTS namespaces (and a user namespace when not root), then forks:
/// the child — process 1 of the new pid namespace — carries on; the parent waits and exits with
/// the child's status. When process 1 exits, the kernel kills everything left in its namespace, so
/// even a daemon that left the process group does not survive the command. The network namespace
/// is kept: commands need to reach databases and APIs.
fn enter_namespaces() -> bool {
    // SAFETY: geteuid only reads the process's credentials.
    let root = unsafe { libc::geteuid() } == 0;
    let mut flags =
        libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if !root {
        flags |= libc::CLONE_NEWUSER;
    }
    // SAFETY: unshare takes flags only; the helper is single-threaded here (a fresh exec).
    if unsafe { libc::unshare(flags) } != 0 {
        return false;
    }
    // SAFETY: the helper is single-threaded, so fork duplicates only this thread; both sides only
    // call async-signal-safe functions (waitpid, _exit) or carry on as a normal single process.
    match unsafe { libc::fork() } {
        -1 => false,
        0 => true,
        child => {
            let mut status = 0;
            // SAFETY: `status` outlives the call; waitpid writes only there.
            while unsafe { libc::waitpid(child, &mut status, 0) } == -1 {}
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            // SAFETY: ends this process without running destructors or atexit handlers.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Applies every restriction to the current process.
fn restrict(work_dir: &Path, cpu_seconds: u64) -> Report {
    let namespaces = enter_namespaces();
    let rlimits = [
        set_limit(libc::RLIMIT_CORE, 0),
        set_limit(libc::RLIMIT_CPU, cpu_seconds.max(1)),
        set_limit(libc::RLIMIT_AS, MEMORY_BYTES),
        set_limit(libc::RLIMIT_NOFILE, OPEN_FILES),
        set_limit(libc::RLIMIT_NPROC, PROCESSES),
        set_limit(libc::RLIMIT_FSIZE, FILE_SIZE_BYTES),
    ]
    .iter()
    .all(|ok| *ok);
    let not_dumpable = make_undumpable();
    let no_new_privs = no_new_privs();
    let landlock = landlock(work_dir);
    let seccomp = seccomp();
    Report {
        rlimits,
        no_new_privs,
        not_dumpable,
        landlock,
        seccomp,
        namespaces,
    }
}

/// The helper's main: `HELPER_ARG WORK_DIR CPU_SECONDS -- PROGRAM ARGS…`, or
/// `HELPER_ARG --probe WORK_DIR` to print the [`Report`] as JSON.
pub fn helper_main(args: Vec<OsString>) -> ExitCode {
    let mut args = args.into_iter();
    let first = args.next().unwrap_or_default();
    if first == "--probe" {
        let dir = PathBuf::from(args.next().unwrap_or_else(|| ".".into()));
        let report = restrict(&dir, 1);
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    let work_dir = PathBuf::from(first);
    let cpu: u64 = args
        .next()
        .and_then(|a| a.to_str().and_then(|s| s.parse().ok()))
        .unwrap_or(60);
    if args.next().as_deref() != Some(std::ffi::OsStr::new("--")) {
        eprintln!("sandbox: malformed helper invocation");
        return ExitCode::from(126);
    }
    let argv: Vec<OsString> = args.collect();
    let Some((program, rest)) = argv.split_first() else {
        eprintln!("sandbox: no program to run");
        return ExitCode::from(126);
    };
    let report = restrict(&work_dir, cpu);
    if !(report.rlimits && report.no_new_privs && report.seccomp) {
        eprintln!("sandbox: could not apply the required restrictions; refusing to run");
        return ExitCode::from(126);
    }
    let error = std::process::Command::new(program).args(rest).exec();
    eprintln!(
        "sandbox: cannot execute {}: {error}",
        program.to_string_lossy()
    );
    ExitCode::from(127)
}

/// Runs the probe through `helper` (this binary) and returns what is enforced.
pub fn check(helper: &Path) -> anyhow::Result<Report> {
    let dir = tempfile::tempdir()?;
    let output = std::process::Command::new(helper)
        .arg(HELPER_ARG)
        .arg("--probe")
        .arg(dir.path())
        .env_clear()
        .output()?;
    anyhow::ensure!(output.status.success(), "the sandbox probe failed");
    Ok(serde_json::from_slice(&output.stdout)?)
}
