//! `custodian-runner`: receives one command with its secrets from the gateway over mutual TLS, runs
//! it in a sandbox, and returns its output with every secret redacted. It links no database, no MCP
//! and no OIDC code.

pub mod config;
pub mod exec;
pub mod sandbox;
pub mod server;
pub mod tls;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// Starts a runner on `listener` with `helper` as its sandbox helper binary; serves until
/// `shutdown` is cancelled.
pub async fn run(
    config: config::RunnerConfig,
    listener: tokio::net::TcpListener,
    helper: std::path::PathBuf,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    sandbox::make_undumpable();
    let runner = Arc::new(server::Runner { config, helper });
    server::serve(runner, listener, shutdown).await
}
