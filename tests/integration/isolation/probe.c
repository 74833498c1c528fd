/*
 * What an attacker ships into a run to leave it: each attempt prints PWNED-<what>-<token> only when
 * the kernel let it happen (a child running in new namespaces, a device node that exists, memory
 * read through ptrace), never on the strength of an error code. Each attempt runs in a child of its
 * own, so that a sandbox that kills the offender (SIGSYS) stops that attempt only. The control lines
 * (control-<what>-<token>) show that the program and its children ran at all.
 *
 * Usage: probe TOKEN
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/keyctl.h>
#include <linux/perf_event.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *token;
static volatile uint64_t word = 0x5ec7e75ec7e7c0deULL;

static void say(const char *kind, const char *what) { printf("%s-%s-%s\n", kind, what, token); }

static void reap(long pid) {
    if (pid > 0) waitpid((pid_t)pid, NULL, 0);
}

/* Runs fn(arg) in a child and waits for it, whatever becomes of it. */
static void attempt(void (*fn)(const void *), const void *arg) {
    pid_t pid = fork();
    if (pid == 0) {
        fn(arg);
        _exit(0);
    }
    reap(pid);
}

struct ns_flag {
    const char *name;
    unsigned long flag;
};

static const struct ns_flag flags[] = {
    {"user", CLONE_NEWUSER},     {"mnt", CLONE_NEWNS},  {"pid", CLONE_NEWPID},
    {"net", CLONE_NEWNET},       {"uts", CLONE_NEWUTS}, {"ipc", CLONE_NEWIPC},
    {"cgroup", CLONE_NEWCGROUP}, {"user-mnt", CLONE_NEWUSER | CLONE_NEWNS},
};

/* The child of a clone that succeeded runs in the new namespaces: it says so and leaves. */
static void clone3_into(const void *arg) {
    const struct ns_flag *f = arg;
    char what[64];
    snprintf(what, sizeof what, "clone3-%s", f->name);
    struct clone_args args;
    memset(&args, 0, sizeof args);
    args.flags = f->flag;
    args.exit_signal = SIGCHLD;
    long pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid == 0) {
        say("PWNED", what);
        _exit(0);
    }
    reap(pid);
}

static void clone_into(const void *arg) {
    const struct ns_flag *f = arg;
    char what[64];
    snprintf(what, sizeof what, "clone-%s", f->name);
    long pid = syscall(SYS_clone, f->flag | SIGCHLD, NULL, NULL, NULL, NULL);
    if (pid == 0) {
        say("PWNED", what);
        _exit(0);
    }
    reap(pid);
}

static void unshare_into(const void *arg) {
    const struct ns_flag *f = arg;
    char what[64];
    snprintf(what, sizeof what, "unshare-%s", f->name);
    if (unshare((int)f->flag) == 0) say("PWNED", what);
}

static pid_t idle_child(void) {
    pid_t pid = fork();
    if (pid == 0) {
        for (;;) pause();
    }
    return pid;
}

static void end_child(pid_t pid) {
    if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    }
}

static int peek_matches(pid_t pid) {
    errno = 0;
    long got = ptrace(PTRACE_PEEKDATA, pid, (void *)&word, NULL);
    return errno == 0 && (uint64_t)got == word;
}

static void ptrace_traceme(const void *unused) {
    (void)unused;
    int status;
    pid_t pid = fork();
    if (pid == 0) {
        if (ptrace(PTRACE_TRACEME, 0, NULL, NULL) == 0) raise(SIGSTOP);
        _exit(0);
    }
    if (waitpid(pid, &status, 0) == pid && WIFSTOPPED(status) && peek_matches(pid))
        say("PWNED", "ptrace-traceme");
    end_child(pid);
}

static void ptrace_attach(const void *unused) {
    (void)unused;
    int status;
    pid_t pid = idle_child();
    if (ptrace(PTRACE_ATTACH, pid, NULL, NULL) == 0 && waitpid(pid, &status, 0) == pid &&
        peek_matches(pid))
        say("PWNED", "ptrace-attach");
    end_child(pid);
}

static void vm_readv(const void *unused) {
    (void)unused;
    pid_t pid = idle_child();
    uint64_t got = 0;
    struct iovec local = {&got, sizeof got};
    struct iovec remote = {(void *)&word, sizeof word};
    if (process_vm_readv(pid, &local, 1, &remote, 1, 0) == (ssize_t)sizeof got && got == word)
        say("PWNED", "process-vm-readv");
    end_child(pid);
}

static void mknod_char(const void *unused) {
    (void)unused;
    struct stat st;
    mknod("./probe-mem", S_IFCHR | 0600, makedev(1, 1));
    if (stat("./probe-mem", &st) == 0 && S_ISCHR(st.st_mode)) say("PWNED", "mknod-char");
}

static void mknod_block(const void *unused) {
    (void)unused;
    struct stat st, root;
    if (stat("/", &root) != 0) return;
    mknod("./probe-disk", S_IFBLK | 0600, root.st_dev);
    if (stat("./probe-disk", &st) == 0 && S_ISBLK(st.st_mode)) say("PWNED", "mknod-block");
    char sector[512];
    int fd = open("./probe-disk", O_RDONLY);
    if (fd >= 0 && read(fd, sector, sizeof sector) == (ssize_t)sizeof sector)
        say("PWNED", "read-root-disk");
}

static void do_mount(const void *unused) {
    (void)unused;
    mkdir("./probe-mnt", 0700);
    if (mount("none", "./probe-mnt", "tmpfs", 0, NULL) == 0) say("PWNED", "mount");
}

static void add_key(const void *unused) {
    (void)unused;
    if (syscall(SYS_add_key, "user", "probe", "x", 1, KEY_SPEC_PROCESS_KEYRING) >= 0)
        say("PWNED", "add-key");
}

static void keyctl(const void *unused) {
    (void)unused;
    if (syscall(SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, "probe") >= 0) say("PWNED", "keyctl");
}

static void bpf_map(const void *unused) {
    (void)unused;
    union bpf_attr map;
    memset(&map, 0, sizeof map);
    map.map_type = BPF_MAP_TYPE_ARRAY;
    map.key_size = 4;
    map.value_size = 4;
    map.max_entries = 1;
    if (syscall(SYS_bpf, BPF_MAP_CREATE, &map, sizeof map) >= 0) say("PWNED", "bpf");
}

static void perf_event(const void *unused) {
    (void)unused;
    struct perf_event_attr perf;
    memset(&perf, 0, sizeof perf);
    perf.type = PERF_TYPE_SOFTWARE;
    perf.size = sizeof perf;
    perf.config = PERF_COUNT_SW_CPU_CLOCK;
    if (syscall(SYS_perf_event_open, &perf, 0, -1, -1, 0) >= 0) say("PWNED", "perf-event-open");
}

static void control_fork(const void *unused) {
    (void)unused;
    say("control", "fork");
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    token = argv[1];
    setvbuf(stdout, NULL, _IONBF, 0);
    say("control", "ran");
    attempt(control_fork, NULL);
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++) {
        attempt(clone3_into, &flags[i]);
        attempt(clone_into, &flags[i]);
        attempt(unshare_into, &flags[i]);
    }
    void (*const others[])(const void *) = {
        ptrace_traceme, ptrace_attach, vm_readv, mknod_char, mknod_block,
        do_mount,       add_key,       keyctl,   bpf_map,    perf_event,
    };
    for (size_t i = 0; i < sizeof others / sizeof others[0]; i++) attempt(others[i], NULL);
    say("control", "done");
    return 0;
}
