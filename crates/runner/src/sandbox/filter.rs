//! The seccomp filters every command runs under: a deny-list of system calls a command never needs
//! and an attacker would like (answering `EPERM`), conditions on `clone` (no namespace flags) and
//! `mknod` (no device nodes), and `clone3` answered with `ENOSYS` (its flags sit in memory a filter
//! cannot read, so libc falls back to `clone`, which is filtered). System calls of the kernel's
//! other ABIs kill the process: i386 (another architecture word) and, on x86_64, x32 (the same
//! word, numbers with `__X32_SYSCALL_BIT`), which would otherwise slip past the deny-list.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, sock_filter,
};

/// System calls refused outright.
fn denied() -> Vec<i64> {
    vec![
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_getfd,
        libc::SYS_kcmp,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
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
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_syslog,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_vhangup,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_iopl,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_ioperm,
    ]
}

/// Every `CLONE_NEW*` flag.
const NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

fn arch() -> seccompiler::TargetArch {
    #[cfg(target_arch = "x86_64")]
    return seccompiler::TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    return seccompiler::TargetArch::aarch64;
}

/// One rule per bit: the argument has that bit set (rules of a syscall are or-ed).
fn any_bit(arg: u8, bits: &[u64]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    bits.iter()
        .map(|bit| {
            SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(*bit),
                *bit,
            )?])
        })
        .collect()
}

/// The argument's file type (`S_IFMT` bits) is a character or block device.
fn device_node(arg: u8) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    [libc::S_IFCHR, libc::S_IFBLK]
        .iter()
        .map(|kind| {
            SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(u64::from(libc::S_IFMT)),
                u64::from(*kind),
            )?])
        })
        .collect()
}

/// x86_64 kernels built with x32 support also answer x32 system calls: the same architecture word
/// as x86_64 (so the architecture check lets them through) and numbers with bit 30 set, which the
/// deny-list, written against the x86_64 table, never matches (x32 `mount` is not x86_64
/// `mount`). This filter kills the process on any such number; x86_64 programs never issue one.
fn no_x32() -> BpfProgram {
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let op = |code: u32, k: u32, jt: u8, jf: u8| sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    vec![
        // A = seccomp_data.nr, at offset 0.
        op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
        op(
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            X32_SYSCALL_BIT,
            0,
            1,
        ),
        op(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_KILL_PROCESS,
            0,
            0,
        ),
        op(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW, 0, 0),
    ]
}

/// The filters, in the order they are installed.
pub fn programs() -> Result<Vec<BpfProgram>, String> {
    let build = || -> Result<Vec<BpfProgram>, seccompiler::Error> {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            denied().into_iter().map(|n| (n, Vec::new())).collect();
        // clone(flags, …) on x86_64 and aarch64 alike: flags is the first argument.
        rules.insert(libc::SYS_clone, any_bit(0, &NAMESPACE_FLAGS)?);
        #[cfg(target_arch = "x86_64")]
        rules.insert(libc::SYS_mknod, device_node(1)?);
        rules.insert(libc::SYS_mknodat, device_node(2)?);
        let deny = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            arch(),
        )?;
        let clone3 = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch(),
        )?;
        let mut programs = vec![deny.try_into()?, clone3.try_into()?];
        if cfg!(target_arch = "x86_64") {
            programs.push(no_x32());
        }
        Ok(programs)
    };
    build().map_err(|e| format!("cannot build the seccomp filter: {e}"))
}

/// Installs the filters on the calling thread (the single-threaded helper).
pub fn apply() -> bool {
    match programs() {
        Ok(programs) => programs
            .iter()
            .all(|p| seccompiler::apply_filter(p).is_ok()),
        Err(_) => false,
    }
}
