//! Routes the rest of the suite does not take: memory outside the run's size caps, abstract unix
//! sockets (they belong to the network namespace, which runs share), system calls through the
//! kernel's other ABIs, and the runner's own port, which every run can reach.

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use serde_json::json;

use super::privilege::compile_probe;
use super::{Reaper, World, assert_none, carries, controls, digits, evidence, wait_until};
use crate::processes::{RunAs, host_processes_with};
use crate::runners::run;

as_root_and_unprivileged!(
    a_run_writes_only_to_its_capped_mounts,
    another_runs_abstract_socket_is_out_of_reach,
    system_calls_of_other_abis_are_refused,
    flooding_the_runners_port_ends_no_other_run,
);

/// The lines of `stdout` that end in `-TOKEN`: every `control-…` in `expected` must be there (or
/// the attack did not run as written), and every `PWNED-…` line is an attempt that worked.
fn sentinels(
    stdout: &str,
    token: &str,
    expected: &[&str],
    result: &serde_json::Value,
) -> Vec<String> {
    let mut violations: Vec<String> = expected
        .iter()
        .filter(|c| !stdout.contains(&format!("control-{c}-{token}")))
        .map(|c| {
            format!(
                "control failed: no control-{c} line, the attack did not run as written: {result}"
            )
        })
        .collect();
    violations.extend(
        stdout
            .lines()
            .filter(|l| l.starts_with("PWNED-") && l.ends_with(token))
            .map(|l| format!("the run could: {l}")),
    );
    violations
}

/// `$1`: a token the sentinels carry. A run's writable memory is its three size-capped tmpfs
/// mounts; anything else it can fill (the root, `/dev`: both tmpfs without a size) is memory
/// taken from every other run. Each place gets a file of 1 MiB and a directory; the file counts
/// only when it is there with its size. The run's OOM score must be 1000 (first for the OOM
/// killer), and lowering it would make another run or the runner the OOM killer's first choice.
const FILL: &str = r#"for d in /work /tmp /dev/shm; do
  head -c 1048576 /dev/zero > "$d/fill" 2>/dev/null && [ "$(wc -c < "$d/fill")" = 1048576 ] && echo "control-write$d-$1"
done
for d in / /dev /dev/pts /run /run/custodian /etc /usr /proc /proc/self; do
  name=$(echo "$d" | tr / _)
  head -c 1048576 /dev/zero > "$d/fill" 2>/dev/null
  [ -f "$d/fill" ] && [ "$(wc -c < "$d/fill")" = 1048576 ] && echo "PWNED-write$name-$1"
  mkdir "$d/dir" 2>/dev/null && [ -d "$d/dir" ] && echo "PWNED-mkdir$name-$1"
done
read -r before < /proc/self/oom_score_adj
echo "oom-score-adj $before"
echo 0 > /proc/self/oom_score_adj 2>/dev/null
read -r after < /proc/self/oom_score_adj
[ "$after" -lt "$before" ] && echo "PWNED-oom-score-lowered-to-$after-$1"
true
"#;

async fn a_run_writes_only_to_its_capped_mounts(user: RunAs) {
    let Some(w) = World::start(user).await else {
        return;
    };
    let token = digits();
    let attack = w.attack(FILL, &[&token], None).await;
    let stdout = attack.result["stdout"].as_str().unwrap_or_default();
    let mut violations = sentinels(
        stdout,
        &token,
        &["write/work", "write/tmp", "write/dev/shm"],
        &attack.result,
    );
    let score = stdout
        .lines()
        .find_map(|l| l.strip_prefix("oom-score-adj "));
    if score != Some("1000") {
        violations.push(format!(
            "the run's OOM score adjustment is {score:?}, not 1000: another run or the runner \
             would be killed before it"
        ));
    }
    assert_none("a run wrote outside its size caps", user, &violations);
    w.stop().await;
}

/// `python3 -c SERVE NAME`, as the victim: serves its secret for 20 s to whoever connects to the
/// abstract unix socket `@NAME`, as an agent, a language server or a test display of its own
/// would. It first checks its own socket answers (the positive control: `self-check ok`).
const SERVE: &str = r#"
import os, socket, sys, threading, time
server = socket.socket(socket.AF_UNIX)
server.bind("\0" + sys.argv[1])
server.listen(16)
def serve():
    while True:
        conn, _ = server.accept()
        conn.sendall(os.environ["VICTIM_TOKEN"].encode() + b"\n")
        conn.close()
threading.Thread(target=serve, daemon=True).start()
probe = socket.socket(socket.AF_UNIX)
probe.connect("\0" + sys.argv[1])
if probe.recv(256).decode().strip() == os.environ["VICTIM_TOKEN"]:
    print("self-check ok", flush=True)
time.sleep(20)
"#;

/// `python3 -c HARVEST CONTROL`: serves CONTROL on an abstract socket of its own (the control),
/// then connects to every abstract socket `/proc/net/unix` lists and prints what each says.
const HARVEST: &str = r#"
import os, socket, sys
own = socket.socket(socket.AF_UNIX)
own.bind("\0custodian-attacker-%d" % os.getpid())
own.listen(4)
child = os.fork()
if child == 0:
    while True:
        conn, _ = own.accept()
        conn.sendall(sys.argv[1].encode() + b"\n")
        conn.close()
names = set()
with open("/proc/net/unix") as table:
    for line in table.read().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7].startswith("@"):
            names.add(fields[7][1:])
for name in sorted(names):
    try:
        conn = socket.socket(socket.AF_UNIX)
        conn.settimeout(2)
        conn.connect("\0" + name)
        print(name, conn.recv(256).decode(errors="replace").strip())
    except OSError as e:
        print(name, "refused", e.errno)
os.kill(child, 9)
"#;

async fn another_runs_abstract_socket_is_out_of_reach(user: RunAs) {
    let Some(w) = World::start(user).await else {
        return;
    };
    let mut reaper = Reaper::default();
    let name = format!("custodian-victim-{}", digits());
    reaper.watch(&name);
    let peer = w.victim.client.peer().clone();
    let call = json!({
        "grant_id": w.victim.grant,
        "argv": ["python3", "-c", SERVE, name],
        "timeout_seconds": 60,
    });
    let victim = tokio::spawn(async move { run(&peer, call).await });
    // The attack starts once the victim runs (seen from the host), and the victim still runs
    // when the attack has ended: the attack ran while the victim served.
    let started = wait_until(Duration::from_secs(30), || !reaper.survivors().is_empty()).await;
    assert!(started.is_ok(), "the victim's run never started");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let attack = w
        .attack("python3 -c \"$1\" \"$0\" | out sockets", &[HARVEST], None)
        .await;
    assert!(
        !reaper.survivors().is_empty(),
        "the victim had stopped serving before the attack ended; the test would prove nothing"
    );
    drop(reaper);
    let served = tokio::time::timeout(Duration::from_secs(60), victim)
        .await
        .expect("the victim's run ends")
        .unwrap()
        .expect("the victim's run succeeds");
    // Positive control: the victim's socket did serve its secret (to the victim itself), during
    // the attack.
    assert!(
        served["stdout"]
            .as_str()
            .unwrap_or_default()
            .contains("self-check ok"),
        "the victim's socket never served its secret; the test would prove nothing: {served}"
    );
    let mut violations = controls(&attack, &[("sockets", &attack.control)]);
    let everything = attack.everything();
    if carries(&everything, &w.secret) {
        violations.push(format!(
            "another run's abstract socket gave the attacker VICTIM_TOKEN: {}",
            evidence(&everything, &w.secret, "VICTIM_TOKEN")
        ));
    }
    assert_none(
        "another run's abstract socket was reachable",
        user,
        &violations,
    );
    w.stop().await;
}

/// stdin: the probe, base64-encoded; `$1`: its token.
const FOREIGN_ABIS: &str = r#"base64 -d > ./probe && chmod 700 ./probe && ./probe "$1"
"#;

async fn system_calls_of_other_abis_are_refused(user: RunAs) {
    if !cfg!(target_arch = "x86_64") {
        eprintln!("skipping: x32 and i386 are x86_64's other ABIs");
        return;
    }
    let build = tempfile::tempdir().unwrap();
    let Some(probe) = compile_probe(build.path(), include_str!("redteam_probe.c")) else {
        return;
    };
    let Some(w) = World::start(user).await else {
        return;
    };
    let token = digits();
    let shipped = base64::engine::general_purpose::STANDARD.encode(std::fs::read(probe).unwrap());
    let attack = w.attack(FOREIGN_ABIS, &[&token], Some(shipped)).await;
    let stdout = attack.result["stdout"].as_str().unwrap_or_default();
    let violations = sentinels(
        stdout,
        &token,
        &["ran", "native-call", "done"],
        &attack.result,
    );
    assert_none("a system call got past the filter", user, &violations);
    w.stop().await;
}

/// `python3 -c FLOOD PORT SECONDS`: four processes open as many TCP connections to PORT as they
/// can (up to 150 each), never start TLS on them, hold them SECONDS and print how many they got.
const FLOOD: &str = r#"
import os, socket, sys, time
kids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        held, err = [], None
        for _ in range(150):
            try:
                held.append(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2))
            except OSError as e:
                err = e
                break
        print("held", len(held), err, flush=True)
        time.sleep(float(sys.argv[2]))
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
"#;

/// Open files the runner may have, as under systemd's default soft limit (1024, which container
/// runtimes now follow too), quartered to keep the flood short.
const RUNNER_OPEN_FILES: usize = 256;

async fn flooding_the_runners_port_ends_no_other_run(user: RunAs) {
    let Some(w) = World::start(user).await else {
        return;
    };
    let config = w.runner.files.config.display().to_string();
    let runner = host_processes_with("cmdline", &config);
    assert_eq!(runner.len(), 1, "the runner process: {runner:?}");
    // As the runner's own user: lowering a soft limit needs no privilege.
    let limited = user
        .apply(&mut Command::new("prlimit"))
        .arg("--pid")
        .arg(runner[0].pid.to_string())
        .arg(format!("--nofile={RUNNER_OPEN_FILES}:"))
        .status()
        .expect("prlimit (util-linux)");
    assert!(limited.success(), "prlimit failed");
    let port = w.runner.url.rsplit(':').next().unwrap().to_owned();
    let mut reaper = Reaper::default();
    let holder = w.victim_holds(&mut reaper).await;
    // Not `w.attack`: the attacker's own run may be lost with the runner, which the victim's
    // result shows.
    let flood = run(
        &w.attacker.client,
        json!({
            "grant_id": w.attacker.grant,
            "argv": ["python3", "-c", FLOOD, port, "1"],
            "timeout_seconds": 30,
        }),
    )
    .await;
    let victim = holder.release().await;
    let after = w.victim_runs("echo still-served", 20).await;
    let mut violations = vec![];
    match &flood {
        Ok(flood) => {
            let held: usize = flood["stdout"]
                .as_str()
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("held ")?
                        .split(' ')
                        .next()?
                        .parse::<usize>()
                        .ok()
                })
                .sum();
            // Runs have a network namespace of their own: the runner's port is not even there.
            if held > 0 {
                violations.push(format!(
                    "a run opened {held} connections to the runner's port: {flood}"
                ));
            }
        }
        Err(e) => violations.push(format!(
            "the attacker's own run was lost with the runner during its flood: {e}"
        )),
    }
    match victim {
        Ok(v) if v["exit_code"] == 0 && v["stdout"] == "[REDACTED:VICTIM_TOKEN]\n" => {}
        other => violations.push(format!(
            "the victim's run, in flight during another grant's flood, did not finish: {other:?}"
        )),
    }
    match after {
        Ok(v) if v["stdout"] == "still-served\n" => {}
        other => violations.push(format!(
            "the runner no longer serves after another grant's flood: {other:?}"
        )),
    }
    assert_none(
        "a run's connections to the runner's port hurt another run",
        user,
        &violations,
    );
    w.stop().await;
}
