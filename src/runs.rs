//! `run`: one command under a grant, on a runner of the environment's pool.
//!
//! Order, each step refusing before the next: arguments → the caller's grant is active (a grant
//! this replica already ran skips this read: the use below checks it again) → a runner of the pool
//! (the environment, pool and egress rules come from `crate::cache` while unchanged) → one use of
//! the grant (atomic, with its audit record; the secrets are read meanwhile, still sealed) →
//! secrets opened into zeroizing memory → one exec over mTLS → the output redacted again here
//! (defence in depth) → the outcome on the grant's timeline.
//!
//! Guarantees:
//! - A run never outlives its grant: its timeout is at most the grant's remaining time, and while
//!   it runs this replica watches the grant; a revocation (on any replica: it is read from the
//!   database) or the expiry cancels it on the runner, and the result says `cancelled`.
//! - A dispatch that fails writes `exec.failed` with its reason; when the command certainly never
//!   started, the use is given back. The agent gets a generic message with the exec id as a
//!   correlation id; the details go to the audit log, the span and the log.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::UnixSeconds;
use crate::grants::GrantState;
use crate::tenants::TenantId;

use custodian_protocol::ExecRequest;
use custodian_redact::Redactor;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use zeroize::Zeroize;

use crate::agent_tokens::AgentIdentity;
use crate::app::App;
use crate::cache::RunTarget;
use crate::credentials;
use crate::environments;
use crate::grants::{self, GrantError};
use crate::runners::{self, DispatchError};
use crate::secrets::{self, SecretError};

/// Turns of the runners of a pool, in this process (runs are spread over the pool in turn).
static NEXT_RUNNER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Default and bounds of `timeout_seconds`.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 60;

/// Arguments of `run`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunArgs {
    /// An active grant from request_grant.
    pub grant_id: String,
    /// The program and its arguments, e.g. ["psql", "-c", "select 1"]. Give argv or command.
    pub argv: Option<Vec<String>>,
    /// A shell command line, run with /bin/sh -c. Give argv or command.
    pub command: Option<String>,
    /// Text written to the command's standard input.
    pub stdin: Option<String>,
    /// Seconds before the command (and everything it started) is killed; default 60.
    pub timeout_seconds: Option<u64>,
}

/// What `run` answers. Secret values never appear: the runner and the gateway both replace them.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct RunResult {
    /// Exit code; null when the command was killed by a signal (see `signal`).
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// How many times each secret was found in the output and replaced by [REDACTED:NAME].
    pub redactions: BTreeMap<String, u64>,
    /// Whether output over the limit was dropped.
    pub truncated: bool,
    /// Whether the command was killed for running past its timeout.
    pub timed_out: bool,
    /// Whether the command was stopped because its grant was revoked or ran out of time.
    pub cancelled: bool,
    pub duration_ms: u64,
    /// Runs left on the grant.
    pub uses_left: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    Grant(#[from] GrantError),
    #[error("no runner is registered for pool `{0}` of this environment; ask a Custodian admin")]
    NoRunner(String),
    #[error(
        "the command could not be run (exec {exec_id}); {}; a Custodian admin can look the exec id up in the audit log",
        if *.given_back { "no use of the grant was spent" } else { "it may have started, so its use is spent" }
    )]
    RunnerFailed { exec_id: String, given_back: bool },
    #[error("the environment's secrets cannot be opened")]
    Secrets(#[source] SecretError),
    #[error("the environment's egress rules cannot be applied: {0}; ask a Custodian admin")]
    Egress(String),
    #[error("{0}; ask a Custodian admin")]
    Credential(#[source] crate::credentials::CredentialError),
}

fn invalid(field: &'static str, message: impl Into<String>) -> RunError {
    RunError::InvalidArgument {
        field,
        message: message.into(),
    }
}

fn command_line(args: &RunArgs) -> Result<Vec<String>, RunError> {
    match (&args.argv, &args.command) {
        (Some(_), Some(_)) => Err(invalid("argv", "give either argv or command, not both")),
        (None, None) => Err(invalid(
            "argv",
            "give argv (a list) or command (a shell line)",
        )),
        (Some(argv), None) if argv.is_empty() || argv[0].is_empty() => {
            Err(invalid("argv", "must name a program"))
        }
        (Some(argv), None) => Ok(argv.clone()),
        (None, Some(command)) if command.trim().is_empty() => Err(invalid("command", "is empty")),
        (None, Some(command)) => Ok(vec!["/bin/sh".to_owned(), "-c".to_owned(), command.clone()]),
    }
}

/// Runs one command under the caller's grant.
#[tracing::instrument(skip_all, fields(tenant.id = %caller.tenant, grant.id = %args.grant_id))]
pub async fn run(
    app: &Arc<App>,
    caller: &AgentIdentity,
    args: RunArgs,
) -> Result<RunResult, RunError> {
    let argv = command_line(&args)?;
    let max = app.config.runners.max_timeout_seconds;
    let timeout = args
        .timeout_seconds
        .unwrap_or(DEFAULT_TIMEOUT_SECONDS.min(max));
    if timeout == 0 || timeout > max {
        return Err(invalid(
            "timeout_seconds",
            format!("must be between 1 and {max}, got {timeout}"),
        ));
    }
    // A grant that cannot run is refused for what it is, before any runner is looked up. A grant
    // this replica used before skips that read: its use below checks it all again.
    let environment = match app.caches.grant_environment(&caller.tenant, &args.grant_id) {
        Some(environment) => environment,
        None => {
            grants::usable(app, caller, &args.grant_id)
                .await?
                .environment
        }
    };
    let target = run_target(app, &caller.tenant, &environment).await?;
    let (env, egress) = (&target.environment, &target.egress);
    // Before the use is spent: a rule that would send a non-plain credential runs nothing.
    for inject in egress.iter().filter_map(|r| r.inject.as_ref()) {
        crate::egress::injectable(env, &inject.secret)
            .map_err(|e| RunError::Egress(e.to_string()))?;
    }
    if target.runners.is_empty() {
        // Still the grant's own state first, if that is what stops it.
        grants::usable(app, caller, &args.grant_id).await?;
        return Err(RunError::NoRunner(env.policy.runner_pool.clone()));
    }
    // Written with the use, in one transaction, before anything is decrypted or sent.
    let turn = NEXT_RUNNER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let runner = target.runners[turn % target.runners.len()].clone();
    let exec_id = uuid::Uuid::new_v4().to_string();
    let shown: String = argv.join(" ").chars().take(2000).collect();
    let audited = serde_json::json!({
        "exec_id": exec_id,
        "runner": runner.name,
        "agent": caller.token_name,
        "argv": shown,
        "timeout_seconds": timeout,
        "egress": egress.iter().map(|r| r.destination.to_string()).collect::<Vec<_>>(),
    });
    // The secrets are read while the use is written, still sealed: nothing is opened before the
    // use (and its audit record) has committed.
    let (used, sealed) = tokio::join!(
        grants::consume(app, caller, &args.grant_id, &audited),
        secrets::sealed_for_run(&app.db, &caller.tenant, &env.name)
    );
    let grant = used?;
    if grant.environment != env.name {
        // Cannot happen (a grant's environment never changes); never run with another's settings.
        return Err(GrantError::from(crate::store::StoreError::Corrupt(
            "a grant's environment differs from the one it was run for".to_owned(),
        ))
        .into());
    }
    app.caches
        .keep_grant_environment(&caller.tenant, &grant.id, &grant.environment);
    // Never past the grant's end.
    let left_ms = grant.expires_at * 1000 - app.clock.now_ms();
    let timeout_ms = (timeout * 1000).min(u64::try_from(left_ms).unwrap_or(0).max(1));
    let bounded_by_grant = timeout_ms < timeout * 1000;
    let opened = sealed
        .and_then(|sealed| {
            secrets::open_for_run(&app.master_key, &caller.tenant, &env.name, sealed)
        })
        .map_err(RunError::Secrets)?;
    let span = crate::grants::grant_span!(
        "grant.exec",
        &grant,
        custodian.exec.id = %exec_id,
        custodian.runner = %app.dispatcher.identity_of(&runner),
        custodian.argv = %shown,
        custodian.exit_code = tracing::field::Empty,
        custodian.duration_ms = tracing::field::Empty,
        custodian.redactions = tracing::field::Empty,
        custodian.cancelled = tracing::field::Empty,
        custodian.error = tracing::field::Empty,
    );
    // Injected credentials go to the runner's proxy inside their rules, never into the run.
    let injected: std::collections::BTreeSet<&str> = egress
        .iter()
        .filter_map(|r| r.inject.as_ref().map(|i| i.secret.as_str()))
        .collect();
    let rules = crate::egress::for_runner(egress, |name| {
        opened
            .iter()
            .find(|s| s.name == name)
            .map(|s| String::from_utf8_lossy(&s.value).into_owned())
    })
    .map_err(RunError::Egress)?;
    let mut handed = match credentials::for_run(app, &grant, &env.credentials, &opened, &injected)
        .await
    {
        Ok(handed) => handed,
        Err(error) => {
            // Nothing was sent: the use is given back, as for a dispatch that never started.
            span.record("custodian.error", tracing::field::display(&error));
            tracing::warn!(exec.id = %exec_id, error = %error, "issuing a credential for a run failed");
            record_failure(
                app,
                &caller.tenant,
                &grant.id,
                &exec_id,
                &runner.name,
                &error.to_string(),
                true,
            )
            .await;
            return Err(RunError::Credential(error));
        }
    };
    drop(opened);
    let redactor = Redactor::new(
        handed
            .redact
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_slice())),
    )
    .map_err(|e| RunError::Secrets(SecretError::InvalidName(e.to_string())))?;
    let mut request = ExecRequest {
        exec_id: exec_id.clone(),
        grant_id: grant.id.clone(),
        tenant: caller.tenant.as_str().to_owned(),
        argv,
        stdin: args.stdin,
        timeout_ms,
        max_output_bytes: app.config.runners.max_output_bytes,
        secrets: std::mem::take(&mut handed.env),
        traceparent: crate::telemetry::traceparent(&span),
        egress: rules,
        files: std::mem::take(&mut handed.files),
        env: std::mem::take(&mut handed.plain),
    };
    drop(handed);
    let tenant = caller.tenant.clone();
    let sent = {
        let exec = app
            .dispatcher
            .exec(
                &runner,
                &request,
                Duration::from_millis(timeout_ms + 10_000),
            )
            .instrument(span.clone());
        tokio::pin!(exec);
        let watch = grant_ends(app, &tenant, &grant.id, grant.expires_at);
        tokio::pin!(watch);
        tokio::select! {
            sent = &mut exec => sent,
            reason = &mut watch => {
                tracing::info!(exec.id = %exec_id, reason, "cancelling a run: its grant ended");
                if let Err(e) = app.dispatcher.cancel(&runner, &exec_id).await {
                    tracing::warn!(exec.id = %exec_id, error = %e, "cancelling a run failed; it ends at its timeout");
                }
                exec.await
            }
        }
    };
    for secret in &mut request.secrets {
        secret.value.zeroize();
    }
    for inject in request.egress.iter_mut().filter_map(|r| r.inject.as_mut()) {
        inject.value.zeroize();
    }
    for file in &mut request.files {
        file.content.zeroize();
    }
    let response = match sent {
        Ok(response) => response,
        Err(error) => {
            app.metrics
                .runner_error(caller.tenant.as_str(), &runner.name);
            span.record("custodian.error", tracing::field::display(&error));
            drop(span);
            return Err(
                dispatch_failed(app, &tenant, &grant.id, &exec_id, &runner.name, &error).await,
            );
        }
    };

    // Defence in depth: redact again with the same secrets.
    let (stdout, out_counts) = redactor.redact(response.stdout.as_bytes());
    let (stderr, err_counts) = redactor.redact(response.stderr.as_bytes());
    let mut redactions = response.redactions;
    for (name, n) in out_counts.into_iter().chain(err_counts) {
        *redactions.entry(name).or_default() += n;
    }
    // A run stopped at its grant's end is cancelled, not merely timed out.
    let cancelled = response.cancelled || (bounded_by_grant && response.timed_out);
    let timed_out = response.timed_out && !cancelled;
    app.metrics.exec(
        caller.tenant.as_str(),
        &env.name,
        response.duration_ms as f64,
        response.exit_code,
    );
    for (name, count) in &redactions {
        app.metrics.redacted(caller.tenant.as_str(), name, *count);
    }
    span.record("custodian.exit_code", response.exit_code.unwrap_or(-1));
    span.record("custodian.duration_ms", response.duration_ms);
    span.record("custodian.cancelled", cancelled);
    span.record(
        "custodian.redactions",
        tracing::field::display(serde_json::to_string(&redactions).unwrap_or_default()),
    );
    drop(span);
    let detail = serde_json::json!({
        "exec_id": exec_id,
        "runner": runner.name,
        "exit_code": response.exit_code,
        "signal": response.signal,
        "timed_out": timed_out,
        "cancelled": cancelled,
        "duration_ms": response.duration_ms,
        "redactions": redactions,
        "egress": redacted_egress(&redactor, response.egress),
    });
    // Written while the answer goes out (the exec itself was recorded before it ran); shutdown
    // waits for it, and a failure is logged, not hidden.
    let (writer, tenant, grant_id, now_ms) = (
        Arc::clone(app),
        caller.tenant.clone(),
        grant.id.clone(),
        app.clock.now_ms(),
    );
    let exhausted = grant.state == GrantState::Exhausted;
    app.background.spawn(async move {
        let (db, key) = (&writer.db, &writer.audit_key);
        let recorded = grants::store::record(db, key, &tenant, &grant_id, "exec.finished", &detail, now_ms);
        if let Err(e) = recorded.await {
            tracing::error!(exec.id = %detail["exec_id"], error = %e, "recording the outcome of an exec failed");
        }
        if exhausted {
            // Its last run ended: the reaper removes what was made for the grant.
            writer.grant_changed.notify_waiters();
        }
    });
    tracing::info!(exec.id = %exec_id, runner.id = %runner.name, exit_code = ?response.exit_code, duration_ms = response.duration_ms, cancelled, "run finished");
    Ok(RunResult {
        exit_code: response.exit_code,
        signal: response.signal,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        redactions,
        truncated: response.truncated,
        timed_out,
        cancelled,
        duration_ms: response.duration_ms,
        uses_left: (grant.max_uses - grant.uses).max(0),
    })
}

/// The runner's egress counts with any secret in a destination replaced (defence in depth: the
/// runner already replaced them); destinations that become one are counted together.
fn redacted_egress(
    redactor: &Redactor,
    egress: BTreeMap<String, custodian_protocol::EgressCount>,
) -> BTreeMap<String, custodian_protocol::EgressCount> {
    let mut shown: BTreeMap<String, custodian_protocol::EgressCount> = BTreeMap::new();
    for (destination, count) in egress {
        let (text, _) = redactor.redact(destination.as_bytes());
        let entry = shown
            .entry(String::from_utf8_lossy(&text).into_owned())
            .or_default();
        entry.allowed += count.allowed;
        entry.refused += count.refused;
    }
    shown
}

/// What a run in `environment` needs to know: from this replica's cache while no change was made
/// (see `crate::cache`), otherwise from the database.
async fn run_target(
    app: &App,
    tenant: &TenantId,
    environment: &str,
) -> Result<Arc<RunTarget>, GrantError> {
    let ticket = app.caches.fresh(&app.db).await?;
    if let Some(target) = app.caches.run_target(tenant, environment) {
        return Ok(target);
    }
    let environment = environments::get(&app.db, tenant, environment)
        .await?
        .ok_or_else(|| GrantError::UnknownEnvironment(environment.to_owned()))?;
    let runners = runners::in_pool(&app.db, tenant, &environment.policy.runner_pool).await?;
    let egress = crate::egress::list(&app.db, tenant, &environment.name).await?;
    let target = Arc::new(RunTarget {
        environment,
        runners,
        egress,
    });
    app.caches
        .keep_run_target(ticket, tenant, Arc::clone(&target));
    Ok(target)
}

/// Resolves when the grant is revoked or expires (the reason), as seen from the database, so a
/// revocation on any replica is noticed within half a second. Exhaustion does not end runs that
/// already took their use.
async fn grant_ends(
    app: &App,
    tenant: &TenantId,
    id: &str,
    expires_at: UnixSeconds,
) -> &'static str {
    loop {
        let left = Duration::from_millis(
            u64::try_from(expires_at * 1000 - app.clock.now_ms()).unwrap_or(0),
        );
        if left.is_zero() {
            return "expired";
        }
        tokio::select! {
            () = tokio::time::sleep(left.min(Duration::from_millis(500))) => {},
            () = app.grant_changed.notified() => {},
        }
        match grants::store::get(&app.db, tenant, id).await {
            Ok(Some(grant)) if grant.state == GrantState::Revoked => return "revoked",
            Ok(Some(grant)) if grant.state == GrantState::Expired => return "expired",
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading a grant to watch its run failed"),
        }
    }
}

/// Records a failed dispatch (`exec.failed`, giving the use back when nothing ran) and turns it
/// into what the agent sees: a generic message and the exec id.
async fn dispatch_failed(
    app: &App,
    tenant: &TenantId,
    grant_id: &str,
    exec_id: &str,
    runner: &str,
    error: &DispatchError,
) -> RunError {
    tracing::warn!(exec.id = %exec_id, runner.id = %runner, error = %error, "dispatch to a runner failed");
    let given_back = record_failure(
        app,
        tenant,
        grant_id,
        exec_id,
        runner,
        &error.to_string(),
        error.nothing_ran(),
    )
    .await;
    RunError::RunnerFailed {
        exec_id: exec_id.to_owned(),
        given_back,
    }
}

/// Writes `exec.failed` for an exec that did not finish, giving its use back when `nothing_ran`
/// (see [`grants::store::exec_failed`]); returns whether it was given back. Waiters and the
/// credential reaper are woken either way (an exhausted grant's last run just ended).
async fn record_failure(
    app: &App,
    tenant: &TenantId,
    grant_id: &str,
    exec_id: &str,
    runner: &str,
    reason: &str,
    nothing_ran: bool,
) -> bool {
    let detail = serde_json::json!({
        "exec_id": exec_id,
        "runner": runner,
        "reason": reason,
    });
    let given_back = match grants::store::exec_failed(
        &app.db,
        &app.audit_key,
        tenant,
        grant_id,
        &detail,
        nothing_ran,
        app.clock.now_ms(),
    )
    .await
    {
        Ok(given_back) => given_back,
        Err(e) => {
            tracing::error!(exec.id = %exec_id, error = %e, "recording a failed exec failed");
            false
        }
    };
    app.grant_changed.notify_waiters();
    given_back
}
