//! `custodian-sandbox`: the sandbox helper alone, a small binary the runner prefers to re-executing
//! itself inside every run (an exec of the whole runner costs milliseconds per run).

use std::process::ExitCode;

use custodian_runner::sandbox::{self, HELPER_ARG};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == HELPER_ARG) {
        return sandbox::helper_main(args.collect());
    }
    eprintln!(
        "custodian-sandbox is started by custodian-runner inside each run; it is not a command"
    );
    ExitCode::from(2)
}
