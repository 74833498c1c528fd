//! The `custodian` binary: every subcommand lives in [`custodian::cli`]. It is also the sandbox
//! helper of the runner that `custodian dev` embeds.

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    if args
        .next()
        .is_some_and(|a| a == custodian_runner::sandbox::HELPER_ARG)
    {
        return custodian_runner::sandbox::helper_main(args.collect());
    }
    custodian::cli::main()
}
