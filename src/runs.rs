//! `run`: one command under a grant, on a runner of the environment's pool.
//!
//! Order, each step refusing before the next: arguments → one use of the caller's active grant
//! (atomic) → a runner of the pool → secrets opened into zeroizing memory → one exec over mTLS →
//! the output redacted again here (defence in depth) → an event on the grant's timeline.

use std::collections::BTreeMap;
use std::time::Duration;

use custodian_protocol::{ExecRequest, SecretEnv};
use custodian_redact::Redactor;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use zeroize::Zeroize;

use crate::agent_tokens::AgentIdentity;
use crate::app::App;
use crate::environments;
use crate::grants::{self, GrantError};
use crate::runners::{self, DispatchError};
use crate::secrets::{self, SecretError};

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
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    #[error("the environment's secrets cannot be opened")]
    Secrets(#[source] SecretError),
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
pub async fn run(app: &App, caller: &AgentIdentity, args: RunArgs) -> Result<RunResult, RunError> {
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
    // Where it would run, before a use is spent.
    let seen = grants::status(app, caller, &args.grant_id).await?;
    let env = environments::get(&app.db, &caller.tenant, &seen.environment)
        .await
        .map_err(GrantError::from)?
        .ok_or_else(|| GrantError::UnknownEnvironment(seen.environment.clone()))?;
    let pool = runners::in_pool(&app.db, &caller.tenant, &env.policy.runner_pool)
        .await
        .map_err(GrantError::from)?;
    if pool.is_empty() {
        return Err(RunError::NoRunner(env.policy.runner_pool));
    }
    // Written with the use, in one transaction, before anything is decrypted or sent.
    let runner =
        pool[usize::try_from(seen.max_uses - seen.uses_left).unwrap_or(0) % pool.len()].clone();
    let shown: String = argv.join(" ").chars().take(2000).collect();
    let audited = serde_json::json!({
        "runner": runner.name,
        "agent": caller.token_name,
        "argv": shown,
        "timeout_seconds": timeout,
    });
    let grant = grants::consume(app, caller, &args.grant_id, &audited).await?;
    let opened = secrets::load_for_run(&app.db, &app.master_key, &caller.tenant, &env.name)
        .await
        .map_err(RunError::Secrets)?;
    let redactor = Redactor::new(opened.iter().map(|s| (s.name.as_str(), s.value.as_slice())))
        .map_err(|e| RunError::Secrets(SecretError::InvalidName(e.to_string())))?;
    let span = crate::grants::grant_span!(
        "grant.exec",
        &grant,
        custodian.runner = %app.dispatcher.identity_of(&runner),
        custodian.argv = %shown,
        custodian.exit_code = tracing::field::Empty,
        custodian.duration_ms = tracing::field::Empty,
        custodian.redactions = tracing::field::Empty,
    );
    let mut request = ExecRequest {
        grant_id: grant.id.clone(),
        tenant: caller.tenant.as_str().to_owned(),
        argv,
        stdin: args.stdin,
        timeout_ms: timeout * 1000,
        max_output_bytes: app.config.runners.max_output_bytes,
        secrets: opened
            .iter()
            .map(|s| SecretEnv {
                name: s.name.clone(),
                value: String::from_utf8_lossy(&s.value).into_owned(),
            })
            .collect(),
        traceparent: crate::telemetry::traceparent(&span),
    };
    drop(opened);
    let sent = app
        .dispatcher
        .exec(&runner, &request, Duration::from_secs(timeout + 10))
        .instrument(span.clone())
        .await;
    for secret in &mut request.secrets {
        secret.value.zeroize();
    }
    if sent.is_err() {
        app.metrics
            .runner_error(caller.tenant.as_str(), &runner.name);
    }
    let response = sent?;

    // Defence in depth: redact again with the same secrets.
    let (stdout, out_counts) = redactor.redact(response.stdout.as_bytes());
    let (stderr, err_counts) = redactor.redact(response.stderr.as_bytes());
    let mut redactions = response.redactions;
    for (name, n) in out_counts.into_iter().chain(err_counts) {
        *redactions.entry(name).or_default() += n;
    }
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
    span.record(
        "custodian.redactions",
        tracing::field::display(serde_json::to_string(&redactions).unwrap_or_default()),
    );
    drop(span);
    let detail = serde_json::json!({
        "runner": runner.name,
        "exit_code": response.exit_code,
        "signal": response.signal,
        "timed_out": response.timed_out,
        "duration_ms": response.duration_ms,
        "redactions": redactions,
    });
    if let Err(e) = grants::store::record(
        &app.db,
        &app.audit_key,
        &caller.tenant,
        &grant.id,
        "exec.finished",
        &detail,
        app.clock.now_ms(),
    )
    .await
    {
        // The exec itself was recorded before it ran; losing its outcome is logged, not hidden.
        tracing::error!(error = %e, "recording the outcome of an exec failed");
    }
    tracing::info!(runner.id = %runner.name, exit_code = ?response.exit_code, duration_ms = response.duration_ms, "run finished");
    Ok(RunResult {
        exit_code: response.exit_code,
        signal: response.signal,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        redactions,
        truncated: response.truncated,
        timed_out: response.timed_out,
        duration_ms: response.duration_ms,
        uses_left: (grant.max_uses - grant.uses).max(0),
    })
}
