//! Arguments → the library → exit code. Nothing else lives here.

use clap::Parser;

fn main() -> std::process::ExitCode {
    harvestd::failpoint::setup();
    let cli = harvestd::cli::Cli::parse();
    std::process::ExitCode::from(harvestd::cli::execute(cli))
}
