//! Reading what is not yours: another run's files, command line, environment and memory while it
//! runs, and the runner's own key, certificate, CA and configuration.

use super::{Reaper, World, assert_none, carries, controls, evidence, host_processes_with};
use crate::processes::RunAs;

as_root_and_unprivileged!(
    another_runs_files_and_processes_are_out_of_reach,
    the_runners_key_certificate_and_config_are_out_of_reach,
);

/// `$1`: the runner's work root on the host; `$2`: the memory scanner ([`READ_MEMORY`]). The sweep
/// of `/` skips what holds only installed software, to stay within seconds on a developer machine.
const SNOOP: &str = r#"printf '%s\n' "$0" > ./own.txt
printf '%s\n' "$0" > "${TMPDIR:-/tmp}/own-tmpdir.txt"
grep -r -a -o -E "$P" . .. "$HOME" "${TMPDIR:-/tmp}" /tmp /var/tmp /dev/shm /run "$1" 2>/dev/null | sort -u | out files
timeout 20 grep -r -a -o -E "$P" / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev --exclude-dir=usr \
  --exclude-dir=opt --exclude-dir=lib --exclude-dir=target --exclude-dir=.git --exclude-dir=node_modules \
  --exclude-dir=.cargo --exclude-dir=.rustup --exclude-dir=.pyenv --exclude-dir=.npm --exclude-dir=.cache \
  2>/dev/null | sort -u | out everywhere
grep -a -o -E "$P" /proc/[0-9]*/cmdline 2>/dev/null | sort -u | out cmdline
grep -a -o -E "$P" /proc/[0-9]*/environ 2>/dev/null | sort -u | out environ
python3 -c "$2" 2>&1 | out memory
"#;

/// Reads the writable memory of every visible shell, `sleep`, Python and Custodian process through
/// `/proc/PID/mem` and prints `PID COMM CANARY` for each canary-shaped string. Its own memory (its
/// environment holds `ATTACKER_TOKEN`) is the control.
const READ_MEMORY: &str = r#"
import os, re
P = re.compile(rb"cnry[0-9a-f]{32}")
NAMES = {b"sh", b"dash", b"bash", b"sleep", b"python3", b"custodian", b"custodian-runne"}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        comm = open(f"/proc/{pid}/comm", "rb").read().strip()
        if comm not in NAMES:
            continue
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        mem = open(f"/proc/{pid}/mem", "rb", 0)
    except OSError:
        continue
    budget, found = 256 << 20, set()
    for line in maps:
        span, perms = line.split()[:2]
        start, end = (int(x, 16) for x in span.split("-"))
        if not perms.startswith("rw") or end - start > min(64 << 20, budget):
            continue
        budget -= end - start
        try:
            mem.seek(start)
            found.update(P.findall(mem.read(end - start)))
        except (OSError, OverflowError, ValueError):
            pass
    for hit in found:
        print(pid, comm.decode(), hit.decode())
"#;

async fn another_runs_files_and_processes_are_out_of_reach(user: RunAs) {
    let Some(w) = World::start(user).await else {
        return;
    };
    let mut reaper = Reaper::default();
    let holder = w.victim_holds(&mut reaper).await;
    w.assert_victim_holds_its_secret();
    let work_root = w.runner.work_root().display().to_string();
    let attack = w.attack(SNOOP, &[&work_root, READ_MEMORY], None).await;
    let still_holding = !host_processes_with("cmdline", &holder.marker).is_empty();
    let argv_canary = holder.argv_canary.clone();
    let victim = holder.release().await.expect("the victim's run");
    assert!(
        still_holding,
        "the victim's run ended before the attack did; make the attack faster"
    );
    assert_eq!(victim["exit_code"], 0, "{victim}");
    assert_eq!(victim["stdout"], "[REDACTED:VICTIM_TOKEN]\n", "{victim}");

    let mut violations = controls(
        &attack,
        &[
            ("files", &attack.control),
            ("cmdline", &attack.control),
            ("environ", &w.attacker_secret),
            ("memory", &w.attacker_secret),
        ],
    );
    for (name, text) in &attack.routes {
        for (value, label) in [
            (&w.secret, "VICTIM_TOKEN"),
            (&argv_canary, "victim argv canary"),
        ] {
            if carries(text, value) {
                violations.push(format!(
                    "route {name} found the {label}: {}",
                    evidence(text, value, label)
                ));
            }
        }
    }
    if carries(&attack.result.to_string(), &w.secret) {
        violations.push("the attacker's raw output carries VICTIM_TOKEN".to_owned());
    }
    assert_none(
        "another run's secrets reached the attacker",
        user,
        &violations,
    );
    w.stop().await;
}

/// `$1`..`$4`: the runner's configuration, key, certificate and CA on the host.
const MATERIAL: &str = r#"printf '%s\n' "$0" > ./own.pem
cat ./own.pem | out own
cat "$1" 2>/dev/null | out config
cat "$2" 2>/dev/null | out key
cat "$3" 2>/dev/null | out cert
cat "$4" 2>/dev/null | out ca
for p in /proc/[0-9]*; do cat "$p/root$2"; done 2>/dev/null | sort -u | out key-through-proc
"#;

async fn the_runners_key_certificate_and_config_are_out_of_reach(user: RunAs) {
    let Some(w) = World::start(user).await else {
        return;
    };
    let files = &w.runner.files;
    let paths: Vec<String> = [&files.config, &files.key, &files.cert, &files.ca]
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let args: Vec<&str> = paths.iter().map(String::as_str).collect();
    let attack = w.attack(MATERIAL, &args, None).await;
    let mut violations = controls(&attack, &[("own", &attack.control)]);
    let everything = attack.everything();
    for (what, path) in [
        ("private key", &files.key),
        ("certificate", &files.cert),
        ("CA", &files.ca),
    ] {
        let pem = std::fs::read_to_string(path).unwrap();
        let body: Vec<&str> = pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .collect();
        assert!(
            !body.is_empty(),
            "{what}: no PEM body in {}",
            path.display()
        );
        let seen = body.iter().filter(|l| everything.contains(*l)).count();
        if seen > 0 {
            violations.push(format!(
                "the runner's {what} ({}): {seen} of {} PEM lines read",
                path.display(),
                body.len()
            ));
        }
    }
    let config = std::fs::read_to_string(&files.config).unwrap();
    let identity = config
        .lines()
        .filter(|l| l.starts_with("trust_domain") || l.starts_with("tenant"))
        .collect::<Vec<_>>()
        .join("\n");
    if everything.contains(&identity) {
        violations.push(format!(
            "the runner's configuration ({}) was read",
            files.config.display()
        ));
    }
    assert_none("the runner's material reached a run", user, &violations);
    w.stop().await;
}
