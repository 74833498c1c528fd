//! Command line: `serve`, `migrate`, `dev` and `admin …`. Startup and CLI code may use `anyhow`;
//! everything below it returns typed errors.

mod admin;
mod dev;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::app::{App, Server, shutdown_signal};
use crate::config::{Config, LogConfig, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "custodian",
    version,
    about = "MCP gateway that lets AI agents use credentials without holding them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Configuration file (TOML); `CUSTODIAN_<SECTION>__<KEY>` variables override its keys.
    #[arg(long, short, env = "CUSTODIAN_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once per process")]
enum Command {
    /// Run the gateway.
    Serve(ConfigArg),
    /// Apply database migrations (safe to run repeatedly).
    Migrate(ConfigArg),
    /// Run everything on this machine for trying Custodian out (SQLite, loopback only).
    Dev(dev::DevArgs),
    /// Manage tenants, environments and agent tokens in the configured database.
    Admin {
        #[command(flatten)]
        config: ConfigArg,
        #[command(subcommand)]
        command: admin::AdminCommand,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(arg) => {
            let config = load_config(&arg)?;
            let telemetry = init_logging(&config.log);
            let served = serve(config, &telemetry).await;
            telemetry.shutdown();
            served
        }
        Command::Migrate(arg) => {
            let config = load_config(&arg)?;
            let _telemetry = init_logging(&config.log);
            let db = crate::store::Db::connect(&config.database.url, 1).await?;
            db.migrate().await?;
            db.close().await;
            println!("database is up to date");
            Ok(())
        }
        Command::Dev(args) => dev::run(args).await,
        Command::Admin { config, command } => {
            let config = load_config(&config)?;
            admin::run(config, command).await
        }
    }
}

fn load_config(arg: &ConfigArg) -> anyhow::Result<Config> {
    Ok(Config::load(arg.config.as_deref(), std::env::vars())?)
}

/// Installs the log subscriber (and OTLP trace export when configured by the standard variables);
/// `RUST_LOG` overrides the configured filter. Whatever the filter, MCP message contents (tool
/// results among them) are never logged, and rmcp's per-session lines stay at `warn` unless the
/// filter names `rmcp` (see [`crate::mcp::logs`]).
pub(crate) fn init_logging(log: &LogConfig) -> crate::telemetry::Telemetry {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let telemetry = crate::telemetry::Telemetry::from_env(&env, "custodian").unwrap_or_else(|e| {
        eprintln!("warning: trace export is off: {e:#}");
        crate::telemetry::Telemetry::default()
    });
    let configured = env
        .iter()
        .find(|(name, _)| name == "RUST_LOG")
        .map_or(log.filter.as_str(), |(_, value)| value.as_str());
    let filter = tracing_subscriber::EnvFilter::try_new(crate::mcp::logs::directives(configured))
        .unwrap_or_else(|e| {
            eprintln!("warning: log filter `{configured}` is not valid ({e}); using `info`");
            tracing_subscriber::EnvFilter::new(crate::mcp::logs::directives("info"))
        });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let registry = tracing_subscriber::registry()
        .with(crate::mcp::logs::Quiet)
        .with(filter)
        .with(telemetry.layer());
    let _ = match log.format {
        LogFormat::Json => registry.with(fmt.json()).try_init(),
        LogFormat::Text => registry.with(fmt).try_init(),
    };
    telemetry
}

/// Serves until SIGTERM/Ctrl-C, then shuts down gracefully.
async fn serve(config: Config, telemetry: &crate::telemetry::Telemetry) -> anyhow::Result<()> {
    let grace = config.server.shutdown_grace;
    let mut app = App::from_config(config, std::env::vars()).await?;
    app.metrics = crate::metrics::Metrics::new(&telemetry.meter("custodian"));
    let app = Arc::new(app);
    let server = Server::start(app.clone()).await?;
    tracing::info!(
        listen = %server.local_addr,
        public_url = %app.config.server.public_url,
        "custodian gateway listening"
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown(grace).await.context("shutting down")?;
    app.db.close().await;
    Ok(())
}
