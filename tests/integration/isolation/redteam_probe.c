/*
 * System calls through the other ABIs an x86_64 kernel may answer: x32 (the syscall number with
 * __X32_SYSCALL_BIT set, same architecture word as x86_64) and i386 (int 0x80). A filter that
 * compares syscall numbers only against the x86_64 table lets x32 numbers straight past it; on a
 * kernel built with x32 support they then reach io_uring, bpf, keyctl, mount... Each attempt runs
 * in a child of its own: PWNED-<what>-<token> when the call came back to the program instead of
 * the process being stopped at the filter, or when it produced a kernel object. The control lines
 * show the program and a native call ran.
 *
 * Usage: redteam_probe TOKEN
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define X32_BIT 0x40000000L
#define NR_IO_URING_SETUP 425L

static const char *token;

static void say(const char *kind, const char *what) { printf("%s-%s-%s\n", kind, what, token); }

/* Runs fn() in a child; 1 when the child returned from it and exited normally. */
static int returns(void (*fn)(void)) {
    int status = 0;
    pid_t pid = fork();
    if (pid == 0) {
        fn();
        _exit(0);
    }
    if (pid < 0 || waitpid(pid, &status, 0) != pid) return 0;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

static void native_getpid(void) { syscall(SYS_getpid); }

static void x32_getpid(void) { syscall(X32_BIT | SYS_getpid); }

static void x32_io_uring(void) {
    unsigned char params[120];
    memset(params, 0, sizeof params);
    if (syscall(X32_BIT | NR_IO_URING_SETUP, 4, params) >= 0) say("PWNED", "x32-io-uring-setup");
}

static void i386_getpid(void) {
    long ret = 20; /* getpid in the i386 table */
    __asm__ volatile("int $0x80" : "+a"(ret) : : "memory");
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    token = argv[1];
    setvbuf(stdout, NULL, _IONBF, 0);
    say("control", "ran");
    if (returns(native_getpid)) say("control", "native-call");
    if (returns(x32_getpid)) say("PWNED", "x32-call-passed-the-filter");
    returns(x32_io_uring);
    if (returns(i386_getpid)) say("PWNED", "i386-call-passed-the-filter");
    say("control", "done");
    return 0;
}
