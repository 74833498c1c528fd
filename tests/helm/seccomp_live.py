"""Runs bubblewrap under the chart's runner seccomp profile on this machine's real kernel.

The profile (helm/custodian/files/runner-seccomp.json) is loaded with libseccomp the way an OCI
runtime loads a pod's `Localhost` profile (no_new_privs, then the filter, then exec), in a child
that has switched to the chart's runner uid. bubblewrap then builds the same sandbox the runner
builds for every run: user, pid, IPC, UTS, network and cgroup namespaces, a fresh tmpfs root with
read-only system directories, a fresh /proc, a minimal /dev, size-capped tmpfs work dir and /tmp,
no further user namespaces. Only the seccomp part of a pod is reproduced here: `hostUsers: false`
and `procMount: Unmasked` need a cluster.
"""

import ctypes
import ctypes.util
import os
import pathlib
import shutil
import subprocess

RUNNER_UID = 10001
MARKER = "custodian-sandbox-built"

# What bubblewrap needs beyond the runtime's default profile, and how the default profile treats
# each of these syscalls for a container without capabilities: `clone` only without namespace
# flags, the others not at all.
NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
ADDITIONS = ["clone", "mount", "pivot_root", "sethostname", "umount2", "unshare"]

_ACTIONS = {
    "SCMP_ACT_KILL": 0x00000000,
    "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000,
    "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": 0x00050000,
    "SCMP_ACT_LOG": 0x7FFC0000,
    "SCMP_ACT_ALLOW": 0x7FFF0000,
}
_OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}
_ARCHES = {"SCMP_ARCH_X86_64": b"x86_64", "SCMP_ARCH_AARCH64": b"aarch64", "SCMP_ARCH_X86": b"x86"}


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _action(name, errno=None):
    base = _ACTIONS[name]
    if name == "SCMP_ACT_ERRNO":
        return base | ((1 if errno is None else errno) & 0xFFFF)
    return base


def _loader(profile):
    """A function that installs `profile` in the calling process (for preexec_fn)."""
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]

    # Everything is prepared before the fork; the child only loads the filter.
    ctx = lib.seccomp_init(_action(profile["defaultAction"], profile.get("defaultErrnoRet")))
    if not ctx:
        raise RuntimeError("seccomp_init failed")
    for arch in profile.get("architectures", []):
        token = lib.seccomp_arch_resolve_name(_ARCHES[arch])
        rc = lib.seccomp_arch_add(ctx, token)
        if rc not in (0, -17):  # -EEXIST: the native architecture is already there
            raise RuntimeError(f"seccomp_arch_add({arch}) = {rc}")
    for rule in profile["syscalls"]:
        action = _action(rule["action"], rule.get("errnoRet"))
        conditions = [
            _ArgCmp(a["index"], _OPS[a["op"]], a["value"], a.get("valueTwo", 0)) for a in rule.get("args", [])
        ]
        array = (_ArgCmp * max(1, len(conditions)))(*conditions)
        for name in rule["names"]:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                continue  # not a syscall of this architecture; runtimes skip these too
            rc = lib.seccomp_rule_add_array(ctx, action, number, len(conditions), array)
            if rc != 0:
                raise RuntimeError(f"seccomp_rule_add({name}) = {rc}")

    def load():
        rc = lib.seccomp_load(ctx)  # sets no_new_privs first, as runtimes do
        if rc != 0:
            os._exit(125)

    return load


def runtime_default_for(profile, syscall):
    """`profile` with one of ADDITIONS treated as the runtime's default profile treats it."""
    rules = []
    for rule in profile["syscalls"]:
        names = [n for n in rule["names"] if not (n == syscall and rule.get("action") == "SCMP_ACT_ALLOW" and not rule.get("args"))]
        if names:
            rules.append({**rule, "names": names})
    if syscall == "clone":
        rules.append(
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
            }
        )
    return {**profile, "syscalls": rules}


def bwrap_argv(bwrap, tmpfs_bytes=1 << 20):
    """The sandbox the runner builds for each run (crates/runner/src/sandbox), plus the network
    namespace the runner is getting next."""
    argv = [
        bwrap,
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-net",
        "--unshare-cgroup-try",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop", "ALL",
        "--uid", "65534",
        "--gid", "65534",
        "--hostname", "custodian-run",
    ]
    for directory in ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]:
        path = pathlib.Path(directory)
        if path.is_symlink():
            argv += ["--symlink", os.readlink(path), directory]
        elif path.is_dir():
            argv += ["--ro-bind", directory, directory]
    for entry in ["passwd", "group", "hosts", "nsswitch.conf", "ssl", "ld.so.cache"]:
        argv += ["--ro-bind-try", f"/etc/{entry}", f"/etc/{entry}"]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    for directory in ["/work", "/tmp", "/dev/shm"]:
        argv += ["--perms", "0700", "--size", str(tmpfs_bytes), "--tmpfs", directory]
    argv += ["--chdir", "/work", "--"]
    # Inside: its own pid 1, its own hostname, a private writable work dir, and no way to make
    # another user namespace.
    script = (
        'test "$(hostname)" = custodian-run && test "$(cat /proc/1/comm)" = bwrap'
        " && echo x > /work/probe && ! unshare -U true 2>/dev/null && echo " + MARKER
    )
    return argv + ["/bin/sh", "-c", script]


def prerequisites():
    """Why the live check cannot run here, or None."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    if ctypes.util.find_library("seccomp") is None and not pathlib.Path("/usr/lib/x86_64-linux-gnu/libseccomp.so.2").exists():
        return "libseccomp is not installed"
    if os.geteuid() != 0:
        return "switching to the runner uid needs root"
    return None


def run(profile):
    """Runs the runner's bubblewrap sandbox under `profile` as the runner uid; (ok, output)."""
    load = _loader(profile)
    result = subprocess.run(
        bwrap_argv(shutil.which("bwrap")),
        user=RUNNER_UID,
        group=RUNNER_UID,
        extra_groups=[],
        preexec_fn=load,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    output = (result.stdout + result.stderr).strip()
    return result.returncode == 0 and MARKER in result.stdout, output


def runner_supports_bubblewrap(runner):
    """Whether `runner` is a custodian-runner that isolates runs with bubblewrap."""
    if not runner.is_file():
        return False
    result = subprocess.run([str(runner), "--help"], capture_output=True, text=True, timeout=30)
    return "--dangerously-run-without-isolation" in result.stdout + result.stderr


def runner_check(runner, profile, config=None):
    """`custodian-runner check [--config config]` as the runner uid, under `profile` (None: no
    filter): (exit code, the lines naming what is missing or wrong, if any)."""
    result = subprocess.run(
        [str(runner), "check", *(["--config", str(config)] if config else [])],
        user=RUNNER_UID,
        group=RUNNER_UID,
        extra_groups=[],
        preexec_fn=_loader(profile) if profile else None,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    missing = [line for line in result.stdout.splitlines() if line.startswith("MISSING")]
    if result.returncode != 0 and not missing:
        missing = [result.stderr.strip()]
    return result.returncode, missing
