//! `custodian-runner`: receives one command with its secrets from the gateway over mutual TLS, runs
//! it in a sandbox of its own, and returns its output with every secret redacted. It links no
//! database, no MCP and no OIDC code.

pub mod config;
pub mod egress;
pub mod exec;
pub mod sandbox;
pub mod server;
pub mod tls;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use sandbox::Isolation;

/// Checks the certificate and the sandbox, then serves on `listener` with `helper` (the binary
/// that answers to [`sandbox::HELPER_ARG`]) until `shutdown` is cancelled; every run in flight is
/// killed then.
pub async fn run(
    config: config::RunnerConfig,
    listener: tokio::net::TcpListener,
    helper: std::path::PathBuf,
    isolation: Isolation,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let runner = prepare(config, helper, isolation, shutdown.clone()).await?;
    server::serve(runner, listener, shutdown).await
}

/// Everything [`run`] checks before it listens: the certificate carries the configured identity,
/// and runs can be isolated (refused otherwise, unless `isolation` is
/// [`Isolation::DangerouslyNone`]). `shutdown` kills every run in flight.
pub async fn prepare(
    config: config::RunnerConfig,
    helper: std::path::PathBuf,
    isolation: Isolation,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<server::Runner>> {
    sandbox::make_undumpable();
    if sandbox::raise_open_files().is_none() {
        tracing::warn!("cannot raise the limit of open files to its hard limit");
    }
    tls::check_identity(&config.cert_file, &config.identity().to_string())?;
    let helper = sandbox::helper_beside(&helper);
    let sandbox = sandbox::Sandbox::new(helper, config.sandbox.clone(), isolation);
    let swept = sandbox.sweep();
    if swept > 0 {
        tracing::warn!(
            processes = swept,
            "killed processes left by an earlier runner's runs"
        );
    }
    let report = sandbox.check(&config.key_file).await;
    let missing = report.missing();
    match isolation {
        Isolation::Full if !missing.is_empty() => anyhow::bail!(
            "runs cannot be isolated on this machine (missing: {}); `custodian-runner check` shows what the sandbox sees. \
             Install bubblewrap and allow user namespaces; for development only, --dangerously-run-without-isolation",
            missing.join(", ")
        ),
        Isolation::Full => {
            tracing::info!(sandbox = ?report, "every run is isolated");
        }
        Isolation::DangerouslyNone => tracing::warn!(
            "RUNS ARE NOT ISOLATED (--dangerously-run-without-isolation): a command can see other runs and this runner's files; development only"
        ),
    }
    Ok(Arc::new(server::Runner::new(config, sandbox, shutdown)?))
}
