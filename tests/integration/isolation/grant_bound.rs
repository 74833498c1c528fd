//! A run lasts no longer than its grant: revoking the grant cancels it, and it ends when the grant
//! expires, with the command and everything it started gone from the host.

use std::time::{Duration, Instant};

use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};

use super::{Reaper, World, assert_none, digits, wait_until};
use crate::processes::RunAs;
use crate::runners::run;

as_root_and_unprivileged!(
    revoking_the_grant_cancels_its_run,
    a_run_ends_when_its_grant_expires,
);

/// How long the test waits for a run that should have been cut short.
const PATIENCE: Duration = Duration::from_secs(8);

async fn revoking_the_grant_cancels_its_run(user: RunAs) {
    let Some(w) = World::start(user).await else {
        return;
    };
    let mut reaper = Reaper::default();
    let marker = format!("30.{}", digits());
    reaper.watch(&marker);
    let started = Instant::now();
    let running = tokio::time::timeout(
        PATIENCE,
        run(
            &w.victim.client,
            json!({"grant_id": w.victim.grant, "argv": ["sleep", marker], "timeout_seconds": 60}),
        ),
    );
    let revoke = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let revoked = w
            .victim
            .client
            .call_tool(
                CallToolRequestParams::new("revoke_grant").with_arguments(
                    json!({"grant_id": w.victim.grant})
                        .as_object()
                        .unwrap()
                        .clone(),
                ),
            )
            .await
            .unwrap();
        assert_ne!(revoked.is_error, Some(true), "revoke_grant: {revoked:?}");
        started.elapsed()
    };
    let (outcome, revoked_after) = tokio::join!(running, revoke);
    // Within 2 s of the revocation.
    let mut violations = cut_short(
        outcome,
        started,
        revoked_after + Duration::from_secs(2),
        &format!("its grant was revoked after {revoked_after:?}"),
        |result| result["cancelled"] == true,
    );
    let _ = wait_until(Duration::from_secs(1), || reaper.survivors().is_empty()).await;
    violations.extend(reaper.outlived("its run ended"));
    assert_none("a revoked grant's run went on", user, &violations);
    w.stop().await;
}

/// The grant's time to live in [`a_run_ends_when_its_grant_expires`].
const TTL_SECONDS: i64 = 3;

async fn a_run_ends_when_its_grant_expires(user: RunAs) {
    let Some(w) = World::start(user).await else {
        return;
    };
    let mut reaper = Reaper::default();
    let marker = format!("30.{}", digits());
    reaper.watch(&marker);
    let grant =
        w.t.active_grant(&w.acme, &w.victim.token_id, "victim", 10, TTL_SECONDS)
            .await;
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        PATIENCE,
        run(
            &w.victim.client,
            json!({"grant_id": grant, "argv": ["sleep", marker], "timeout_seconds": 60}),
        ),
    )
    .await;
    // Ended at expiry (by the gateway's cancel, or by the timeout it capped at the grant's
    // remaining time): the result says cancelled, not a plain timeout.
    let mut violations = cut_short(
        outcome,
        started,
        Duration::from_secs(5),
        &format!("its grant expired after at most {TTL_SECONDS} s"),
        |result| result["cancelled"] == true && result["timed_out"] == false,
    );
    let _ = wait_until(Duration::from_secs(1), || reaper.survivors().is_empty()).await;
    violations.extend(reaper.outlived("its run ended"));
    assert_none("a run outlived its grant", user, &violations);
    w.stop().await;
}

/// The run must have come back within `deadline` of its start, killed, with a result that `says`
/// so.
fn cut_short(
    outcome: Result<Result<Value, String>, tokio::time::error::Elapsed>,
    started: Instant,
    deadline: Duration,
    why: &str,
    says: impl Fn(&Value) -> bool,
) -> Vec<String> {
    let elapsed = started.elapsed();
    let mut violations = vec![];
    match outcome {
        Err(_) => violations.push(format!(
            "`sleep 30` was still running {PATIENCE:?} after it started; {why}"
        )),
        Ok(Err(e)) => violations.push(format!(
            "the run answered an error instead of a result saying it was cut short: {e}"
        )),
        Ok(Ok(result)) => {
            if elapsed > deadline {
                violations.push(format!("the run came back after {elapsed:?}; {why}"));
            }
            if !says(&result) {
                violations.push(format!(
                    "the result does not say it was cut short: {result}"
                ));
            }
            if result["exit_code"] != Value::Null {
                violations.push(format!("the command was not killed: {result}"));
            }
        }
    }
    violations
}
