//! Privilege inside a run: capabilities, device nodes, new namespaces, tracing, kernel interfaces,
//! tried by a program the attacker compiles elsewhere and ships in; and a fork loop that must not
//! starve another grant's run.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;

use super::{Reaper, World, assert_none, digits};
use crate::processes::{RunAs, host_processes_with};
use crate::runners::run;

as_root_and_unprivileged!(
    a_run_holds_no_privilege,
    a_fork_loop_does_not_starve_another_grants_run,
);

/// The escape kit, compiled on the host at test time.
const PROBE: &str = include_str!("probe.c");

/// Compiles the C program `code` with the machine's C compiler; `None` (a skip) outside CI when
/// there is none.
pub(super) fn compile_probe(dir: &std::path::Path, code: &str) -> Option<PathBuf> {
    let source = dir.join("probe.c");
    let binary = dir.join("probe");
    std::fs::write(&source, code).unwrap();
    match Command::new("gcc")
        .args(["-O1", "-s", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
    {
        Ok(out) if out.status.success() => Some(binary),
        Ok(out) => panic!(
            "the probe does not compile: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "gcc is required in CI: {e}"
            );
            eprintln!("skipping: no gcc ({e})");
            None
        }
    }
}

/// stdin: the probe, base64-encoded; `$1`: a token the sentinels carry. Every `PWNED-…` line is an
/// attempt that worked; every `control-…` line shows that the machinery ran. The probe runs from the
/// first writable directory that lets it execute.
const ESCALATE: &str = r#"cat > ./probe.b64
grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs):' /proc/self/status
sh -c 'echo "control-nested-shell-$1"' sh "$1"
for opts in "-U -r" "-m" "-p -f" "-n" "-U -r -m" "-U -r -p -f"; do
  unshare $opts sh -c 'echo "PWNED-unshare-cli-$1 $(readlink /proc/self/ns/user) $(readlink /proc/self/ns/mnt)"' sh "$1" 2>/dev/null
done
mkfifo ./fifo && [ -p ./fifo ] && echo "control-mkfifo-$1"
mknod ./null-dev c 1 3 2>/dev/null; [ -c ./null-dev ] && echo "PWNED-mknod-cli-$1"
for d in "$PWD" "${TMPDIR:-/tmp}" /tmp /dev/shm; do
  base64 -d < ./probe.b64 > "$d/probe" 2>/dev/null && chmod 700 "$d/probe" && "$d/probe" "$1" 2>/dev/null && break
done
"#;

async fn a_run_holds_no_privilege(user: RunAs) {
    let build = tempfile::tempdir().unwrap();
    let Some(probe) = compile_probe(build.path(), PROBE) else {
        return;
    };
    let Some(w) = World::start(user).await else {
        return;
    };
    let token = digits();
    let shipped = base64::engine::general_purpose::STANDARD.encode(std::fs::read(probe).unwrap());
    let attack = w.attack(ESCALATE, &[&token], Some(shipped)).await;
    let stdout = attack.result["stdout"].as_str().unwrap_or_default();
    let mut violations: Vec<String> = [
        "control-ran",
        "control-fork",
        "control-done",
        "control-nested-shell",
        "control-mkfifo",
    ]
    .iter()
    .filter(|c| !stdout.contains(&format!("{c}-{token}")))
    .map(|c| {
        format!(
            "control failed: no {c} line, the attack did not run as written: {}",
            attack.result
        )
    })
    .collect();
    violations.extend(
        stdout
            .lines()
            .filter(|l| l.starts_with("PWNED-"))
            .map(|l| format!("the run could: {l}")),
    );
    for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let value = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .map(str::trim);
        match value {
            None => violations.push(format!(
                "control failed: no {field} in /proc/self/status: {}",
                attack.result
            )),
            Some(set) if set.chars().any(|c| c != '0') => {
                violations.push(format!("{field} is {set}, not empty"));
            }
            Some(_) => {}
        }
    }
    if !stdout.contains("NoNewPrivs:\t1") {
        violations.push("no_new_privs is not set".to_owned());
    }
    assert_none("a run holds privilege", user, &violations);
    w.stop().await;
}

/// `$1` processes, each a `sleep $2`; the loop runs in a subshell so that a refused fork ends
/// only the loop, and the run's first process becomes a `sleep` too, holding everything.
const FORK_LOOP: &str = r#"( i=0; while [ "$i" -lt "$1" ]; do sleep "$2" & i=$((i+1)); done ) 2>/dev/null
exec sleep "$2""#;

/// The victim needs a few processes of its own while the fork loop holds everything it can.
const VICTIM_FORKS: &str =
    r#"for i in 1 2 3 4 5 6 7 8; do printf %s "$VICTIM_TOKEN" | wc -c; done; echo victim-done"#;

async fn a_fork_loop_does_not_starve_another_grants_run(user: RunAs) {
    let Some(w) = World::start(user).await else {
        return;
    };
    let mut reaper = Reaper::default();
    // Bounded, so that a runner without limits does not take the whole host down with it.
    let marker = format!("10.{}", digits());
    reaper.watch(&marker);
    let peer = w.attacker.client.peer().clone();
    let call = json!({
        "grant_id": w.attacker.grant,
        "argv": ["/bin/sh", "-c", FORK_LOOP, "fork-loop", "1000", marker],
        "timeout_seconds": 30,
    });
    let bomb = tokio::spawn(async move { run(&peer, call).await });
    // Wait until the loop holds all it can get: its process count stops growing.
    let (mut peak, mut grew, started) = (0, Instant::now(), Instant::now());
    while started.elapsed() < Duration::from_secs(6)
        && (peak == 0 || grew.elapsed() < Duration::from_millis(700))
    {
        let count = host_processes_with("cmdline", &marker).len();
        if count > peak {
            (peak, grew) = (count, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        peak >= 20,
        "control failed: the fork loop never got going ({peak} processes)"
    );
    let victim = w.victim_runs(VICTIM_FORKS, 20).await;
    let held = host_processes_with("cmdline", &marker).len();
    // The loop's processes end with the reaper; its run's result does not matter.
    bomb.abort();
    drop(reaper);
    let mut violations = vec![];
    match victim {
        Ok(victim)
            if victim["exit_code"] == 0
                && victim["stdout"] == format!("{}victim-done\n", "36\n".repeat(8)) => {}
        Ok(victim) => violations.push(format!(
            "the victim's run failed while another grant's fork loop held {peak} processes: {victim}"
        )),
        Err(e) => violations.push(format!(
            "the victim's run was refused while another grant's fork loop held {peak} processes: {e}"
        )),
    }
    assert!(
        held > 0,
        "control failed: the fork loop ended before the victim ran"
    );
    assert_none("a fork loop starved another run", user, &violations);
    w.stop().await;
}
