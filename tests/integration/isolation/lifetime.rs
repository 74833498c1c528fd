//! Outliving your run: a daemon planted to harvest the next run of another grant, and what is left
//! when the runner or the gateway is SIGKILLed while a run holds its secret.

use std::time::Duration;

use super::{Gateway, Reaper, World, assert_none, carries, controls, digits, evidence, wait_until};
use crate::processes::{self, RunAs};

as_root_and_unprivileged!(
    a_planted_daemon_dies_with_its_run_and_harvests_nothing,
    killing_the_runner_mid_run_leaves_nothing_behind,
    killing_the_gateway_mid_run_leaves_nothing_behind,
);

/// `python3 -c DAEMON MARKER PORT`: collects every canary-shaped string from every visible
/// process's environment and command line, writes them to `loot-PORT` in `/tmp`, `/dev/shm` and
/// `/var/tmp`, and serves them on 127.0.0.1:PORT.
const DAEMON: &str = r#"
import os, re, socket, sys, threading, time
P = re.compile(rb"cnry[0-9a-f]{32}")
port = int(sys.argv[2])
loot = set()
def harvest():
    while True:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            for name in ("environ", "cmdline"):
                try:
                    with open(f"/proc/{pid}/{name}", "rb") as f:
                        loot.update(P.findall(f.read()))
                except OSError:
                    pass
        for d in ("/tmp", "/dev/shm", "/var/tmp"):
            try:
                with open(f"{d}/loot-{port}", "wb") as f:
                    f.write(b"\n".join(sorted(loot)))
            except OSError:
                pass
        time.sleep(0.1)
threading.Thread(target=harvest, daemon=True).start()
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", port))
server.listen()
while True:
    conn, _ = server.accept()
    conn.sendall(b"\n".join(sorted(loot)) + b"\n")
    conn.close()
"#;

/// `python3 -c FETCH PORT`: prints what the daemon on PORT serves, if one answers.
const FETCH: &str = r#"
import socket, sys
try:
    print(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).makefile("rb").read().decode())
except OSError:
    pass
"#;

/// `$1` the daemon, `$2`/`$3` marker and port of the `setsid` one, `$4`/`$5` of the double-forked
/// one, `$6` the fetcher. Both daemons must be alive and harvesting before the run ends (control),
/// as seen through their port or their loot file.
const PLANT: &str = r#"setsid python3 -c "$1" "$2" "$3" </dev/null >/dev/null 2>&1 &
( ( python3 -c "$1" "$4" "$5" </dev/null >/dev/null 2>&1 & ) & )
sleep 1
for port in "$3" "$5"; do
  { python3 -c "$6" "$port"; cat "/tmp/loot-$port" "/dev/shm/loot-$port" "/var/tmp/loot-$port" 2>/dev/null; } | out "live-$port"
done
"#;

/// `$1`/`$2` the daemons' ports, `$3` the fetcher: a later run collects what they harvested.
const COLLECT: &str = r#"for port in "$1" "$2"; do
  python3 -c "$3" "$port" | out "served-$port"
  cat "/tmp/loot-$port" "/dev/shm/loot-$port" "/var/tmp/loot-$port" 2>/dev/null | out "files-$port"
done
"#;

async fn a_planted_daemon_dies_with_its_run_and_harvests_nothing(user: RunAs) {
    let Some(w) = World::start(user).await else {
        return;
    };
    let mut reaper = Reaper::default();
    let (setsid, double_fork) = (
        format!("daemon-{}", digits()),
        format!("daemon-{}", digits()),
    );
    reaper.watch(&setsid);
    reaper.watch(&double_fork);
    let ports = [processes::free_port(), processes::free_port()].map(|p| p.to_string());
    let plant = w
        .attack(
            PLANT,
            &[DAEMON, &setsid, &ports[0], &double_fork, &ports[1], FETCH],
            None,
        )
        .await;
    let mut violations = controls(
        &plant,
        &[
            (&format!("live-{}", ports[0]), &w.attacker_secret),
            (&format!("live-{}", ports[1]), &w.attacker_secret),
        ],
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    violations.extend(reaper.outlived("the attacker's run"));

    let victim = w
        .victim_runs(
            "sleep 1.5; printf '%s\\n' \"$VICTIM_TOKEN\" > ./v; cat ./v",
            30,
        )
        .await
        .expect("the victim's run");
    assert_eq!(victim["stdout"], "[REDACTED:VICTIM_TOKEN]\n", "{victim}");

    let collect = w
        .attack(COLLECT, &[&ports[0], &ports[1], FETCH], None)
        .await;
    for (name, text) in &collect.routes {
        if carries(text, &w.secret) {
            violations.push(format!(
                "route {name}: the planted daemon harvested VICTIM_TOKEN from the victim's later run: {}",
                evidence(text, &w.secret, "VICTIM_TOKEN")
            ));
        }
    }
    violations.extend(reaper.outlived("the victim's later run"));
    assert_none("a daemon outlived its run", user, &violations);
    w.stop().await;
}

async fn killing_the_runner_mid_run_leaves_nothing_behind(user: RunAs) {
    let Some(mut w) = World::start(user).await else {
        return;
    };
    let mut reaper = Reaper::default();
    let holder = w.victim_holds(&mut reaper).await;
    w.assert_victim_holds_its_secret();
    w.runner.kill();
    let violations = left_behind(&w, &reaper, "the runner was SIGKILLed").await;
    holder.task.abort();
    assert_none(
        "the victim's run survived its runner's death",
        user,
        &violations,
    );
    w.stop().await;
}

async fn killing_the_gateway_mid_run_leaves_nothing_behind(user: RunAs) {
    let Some(mut w) = World::start_with(user, Gateway::Process).await else {
        return;
    };
    let mut reaper = Reaper::default();
    let holder = w.victim_holds(&mut reaper).await;
    w.assert_victim_holds_its_secret();
    let mut gateway = w.gateway.take().expect("a gateway process");
    let _ = gateway.0.kill();
    let _ = gateway.0.wait();
    let violations = left_behind(&w, &reaper, "the gateway was SIGKILLed").await;
    holder.task.abort();
    assert_none(
        "the victim's run survived its gateway's death",
        user,
        &violations,
    );
    w.stop().await;
}

/// How long the run may take to disappear after its runner or gateway died.
const GONE_WITHIN: Duration = Duration::from_secs(4);

/// Waits up to [`GONE_WITHIN`] for the victim's run to vanish from the host after `what`, and
/// returns what remains: processes holding the secret or still running, files holding it.
async fn left_behind(w: &World, reaper: &Reaper, what: &str) -> Vec<String> {
    let remaining = || {
        let mut found = w.leftovers();
        found.extend(reaper.outlived(what));
        found
    };
    let _ = wait_until(GONE_WITHIN, || remaining().is_empty()).await;
    remaining()
        .into_iter()
        .map(|f| format!("{f} ({GONE_WITHIN:?} later)"))
        .collect()
}
