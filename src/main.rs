//! `gateway`: see `cli` for the commands.

// glibc's allocator was a third of the request path's instructions (callgrind);
// mimalloc is the usual choice for allocation-heavy servers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cognigy_gateway::cli::run()
}
