//! `custodian-runner`: will execute one command per request in a sandbox, with secrets received from
//! the gateway over mTLS. Until that lands it only says so, and refuses to pretend otherwise.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "custodian-runner {}: the runner is not implemented yet; the gateway does not dispatch commands",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
