//! `custodian-runner --config FILE` serves; `custodian-runner check [--config FILE]` prints what
//! the sandbox enforces on this machine, seen from inside a probe run.

use std::path::PathBuf;
use std::process::ExitCode;

use custodian_runner::Isolation;
use custodian_runner::config::{RunnerConfig, SandboxConfig};
use custodian_runner::sandbox::{self, HELPER_ARG, Sandbox};

const USAGE: &str = "\
custodian-runner: runs the gateway's commands, each in a sandbox of its own

Usage:
  custodian-runner --config FILE [--dangerously-run-without-isolation]
      Serve the gateway over mutual TLS (the configuration format is documented in
      config/runner.toml). Refuses to start when runs cannot be isolated.
  custodian-runner check [--config FILE]
      Print what the sandbox enforces here, seen from inside a probe run; exits 1 if
      anything required for isolation is missing.
  custodian-runner --help

--dangerously-run-without-isolation runs commands without namespaces (rlimits, Landlock and
seccomp only): a command can then see other runs and the runner's files. Development only.
";

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == HELPER_ARG) {
        return sandbox::helper_main(args.into_iter().skip(1).collect());
    }
    let args: Vec<String> = args
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn cli(args: Vec<String>) -> anyhow::Result<ExitCode> {
    let helper = std::env::current_exe()?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["check"] => check(helper, SandboxConfig::default(), None).await,
        ["check", "--config", path] => {
            let config = read_config(path)?;
            check(helper, config.sandbox, Some(config.key_file)).await
        }
        ["--config", path] => serve(helper, path, Isolation::Full).await,
        ["--config", path, "--dangerously-run-without-isolation"]
        | ["--dangerously-run-without-isolation", "--config", path] => {
            serve(helper, path, Isolation::DangerouslyNone).await
        }
        _ => {
            eprint!("{USAGE}");
            anyhow::bail!("unrecognised arguments: {}", args.join(" "))
        }
    }
}

fn read_config(path: &str) -> anyhow::Result<RunnerConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading the configuration {path}: {e}"))?;
    RunnerConfig::from_toml(&text)
}

async fn check(
    helper: PathBuf,
    config: SandboxConfig,
    key: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    sandbox::make_undumpable();
    let sandbox = Sandbox::new(sandbox::helper_beside(&helper), config, Isolation::Full);
    let report = sandbox.check(&key.unwrap_or(helper)).await;
    println!("{}", serde_json::to_string_pretty(&report)?);
    let missing = report.missing();
    if missing.is_empty() {
        println!("every run is isolated");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("MISSING: {}", missing.join(", "));
        Ok(ExitCode::FAILURE)
    }
}

async fn serve(helper: PathBuf, path: &str, isolation: Isolation) -> anyhow::Result<ExitCode> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let telemetry = custodian_telemetry::Telemetry::from_env(&env, "custodian-runner")
        .unwrap_or_else(|e| {
            eprintln!("warning: trace export is off: {e:#}");
            custodian_telemetry::Telemetry::default()
        });
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with(telemetry.layer())
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    let config = read_config(path)?;
    tracing::info!(identity = %config.identity(), listen = %config.listen, "custodian-runner starting");
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    let stop = shutdown.clone();
    tokio::spawn(async move {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
            stop.cancel();
        }
    });
    let served = custodian_runner::run(config, listener, helper, isolation, shutdown).await;
    telemetry.shutdown();
    served.map(|()| ExitCode::SUCCESS)
}
