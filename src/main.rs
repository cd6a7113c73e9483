//! Arguments → the library → exit code, on jemalloc. Nothing else lives here.

use clap::Parser;

// jemalloc: see Cargo.toml (memory per tracked collection).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    harvestd::failpoint::setup();
    let cli = harvestd::cli::Cli::parse();
    std::process::ExitCode::from(harvestd::cli::execute(cli))
}
