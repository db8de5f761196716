//! `gateway`: see `cli` for the commands.

// glibc's allocator was a third of the request path's instructions (callgrind);
// mimalloc is the usual choice for allocation-heavy servers. Built with `no_thp`:
// with transparent huge pages its eagerly committed arena made ~10 MiB of the
// idle process resident (2 MiB pages for a heap of a few MiB).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cognigy_gateway::cli::run()
}
