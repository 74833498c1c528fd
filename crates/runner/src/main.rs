//! `custodian-runner --config FILE` serves; `custodian-runner check` prints what the sandbox
//! enforces on this machine.

use std::process::ExitCode;

use custodian_runner::sandbox::{self, HELPER_ARG};

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == HELPER_ARG) {
        return sandbox::helper_main(args.into_iter().skip(1).collect());
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn cli(args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    let helper = std::env::current_exe()?;
    let args: Vec<String> = args
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["check"] => {
            let report = sandbox::check(&helper)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        ["--config", path] => {
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
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with(telemetry.layer())
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
                )
                .init();
            let config =
                custodian_runner::config::RunnerConfig::from_toml(&std::fs::read_to_string(path)?)?;
            let report = sandbox::check(&helper)?;
            tracing::info!(identity = %config.identity(), listen = %config.listen, sandbox = ?report, "custodian-runner starting");
            let listener = tokio::net::TcpListener::bind(config.listen).await?;
            let shutdown = tokio_util::sync::CancellationToken::new();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                stop.cancel();
            });
            #[cfg(unix)]
            {
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    if let Ok(mut term) =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        term.recv().await;
                        stop.cancel();
                    }
                });
            }
            let served = custodian_runner::run(config, listener, helper, shutdown).await;
            telemetry.shutdown();
            served
        }
        _ => anyhow::bail!("usage: custodian-runner --config FILE | custodian-runner check"),
    }
}
