//! The `custodian` binary: every subcommand lives in [`custodian::cli`].

fn main() -> std::process::ExitCode {
    custodian::cli::main()
}
