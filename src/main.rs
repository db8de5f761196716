//! `gateway`: see `cli` for the commands.

fn main() -> std::process::ExitCode {
    cognigy_gateway::cli::run()
}
