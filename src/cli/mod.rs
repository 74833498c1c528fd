//! Command line: `serve`, `migrate`, `dev` and `admin …`. Startup and CLI code may use `anyhow`;
//! everything below it returns typed errors.

mod admin;
mod dev;
mod sign_ins;

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
            let applied = db.migrate().await;
            db.close().await;
            println!("{}", migrate_report(&applied?));
            Ok(())
        }
        Command::Dev(args) => dev::run(args).await,
        Command::Admin { config, command } => {
            if let Some(offline) = admin::offline(&command) {
                return offline;
            }
            let path = admin_config_file(config.config)?;
            let config = Config::load(Some(&path), std::env::vars())?;
            admin::run(config, command).await
        }
    }
}

fn load_config(arg: &ConfigArg) -> anyhow::Result<Config> {
    Ok(Config::load(arg.config.as_deref(), std::env::vars())?)
}

/// Where `admin` looks for the deployment's configuration when neither `--config` nor
/// `CUSTODIAN_CONFIG` names it (the path the container image uses).
pub const DEFAULT_CONFIG_FILE: &str = "/etc/custodian/custodian.toml";

/// The config file `admin` works with: `--config`/`CUSTODIAN_CONFIG` (`given`), else
/// [`DEFAULT_CONFIG_FILE`] when it exists. Without either it refuses: built-in defaults would
/// silently open (and create) a database in the current directory instead of the deployment's.
fn admin_config_file(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let default = std::path::Path::new(DEFAULT_CONFIG_FILE);
    if default.is_file() {
        return Ok(default.to_owned());
    }
    let dev = dev::config_file(std::path::Path::new(dev::DEFAULT_DATA_DIR));
    let dev_hint = if dev.is_file() {
        format!(
            "\n`custodian dev` keeps its configuration in {0}: for that instance pass --config {0}",
            dev.display()
        )
    } else {
        String::new()
    };
    anyhow::bail!(
        "no configuration: `custodian admin` works on the deployment's database, so point it at the \
         config file `custodian serve` uses with --config PATH or CUSTODIAN_CONFIG=PATH \
         ({DEFAULT_CONFIG_FILE} is read when it exists){dev_hint}"
    )
}

/// What `migrate` did, in one line.
fn migrate_report(applied: &[crate::store::AppliedMigration]) -> String {
    if applied.is_empty() {
        return "database already up to date (no migration to apply)".to_owned();
    }
    let names: Vec<String> = applied
        .iter()
        .map(|m| format!("{} {}", m.version, m.description))
        .collect();
    format!(
        "applied {} migration{}: {}",
        applied.len(),
        if applied.len() == 1 { "" } else { "s" },
        names.join(", ")
    )
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
