//! The command line (SPEC §2): parsing with clap, then one library call per
//! subcommand, each returning the process exit code.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat, ProcessEnv};
use crate::daemon::{self, RunOptions};
use crate::emulator::{Emulator, Scenario};

#[derive(Debug, Parser)]
#[command(
    name = "harvestd",
    version,
    about = "Durable batch ingestion from Bright Data and Firecrawl"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: watch the jobs directory until SIGTERM/SIGINT.
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Run the job files present at start once, wait for every run, exit.
        #[arg(long)]
        once: bool,
        /// Serve the built-in emulator in-process and use it for every provider.
        #[arg(long)]
        emulator: bool,
    },
    /// Check job files and their inputs without calling any API.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Serve the built-in emulator of the provider APIs.
    Emulator {
        #[arg(long, default_value = "127.0.0.1:8990")]
        listen: SocketAddr,
        /// A TOML scenario: per-collector behaviour, faults, seed.
        #[arg(long)]
        scenario: Option<PathBuf>,
    },
}

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_INVALID: u8 = 65;
pub const EXIT_CONFIG: u8 = 78;

/// Runs a parsed command; returns the exit code.
pub fn execute(cli: Cli) -> u8 {
    match cli.command {
        Command::Validate { files } => {
            init_logging(None);
            validate(&files)
        }
        Command::Emulator { listen, scenario } => {
            init_logging(None);
            let scenario = match scenario.map(|p| Scenario::from_file(&p)).transpose() {
                Ok(s) => s.unwrap_or_default(),
                Err(e) => {
                    eprintln!("harvestd: scenario: {e}");
                    return EXIT_CONFIG;
                }
            };
            runtime().map_or(EXIT_FAILURE, |rt| {
                rt.block_on(serve_emulator(listen, scenario))
            })
        }
        Command::Run {
            config,
            once,
            emulator,
        } => {
            let config = match Config::load(config.as_deref(), &ProcessEnv) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("harvestd: configuration: {e}");
                    return EXIT_CONFIG;
                }
            };
            init_logging(config.log_format);
            let Some(rt) = runtime() else {
                return EXIT_FAILURE;
            };
            rt.block_on(async {
                let signals = match crate::signals::listen() {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("harvestd: cannot listen for signals: {e}");
                        return EXIT_FAILURE;
                    }
                };
                match daemon::run(config, RunOptions { once, emulator }, &ProcessEnv, signals).await {
                    Ok(summary) => {
                        if once && summary.complete + summary.incomplete + summary.stopped == 0 && summary.parked.is_empty() {
                            eprintln!(
                                "harvestd: nothing to do: no new job content and no unfinished run ({} invalid job file(s))",
                                summary.invalid_jobs
                            );
                            summary.exit_code()
                        } else if once {
                            eprintln!(
                                "harvestd: {} run(s) complete, {} incomplete, {} waiting on a blocked provider, {} invalid job file(s)",
                                summary.complete,
                                summary.incomplete,
                                summary.parked.len(),
                                summary.invalid_jobs
                            );
                            for p in &summary.parked {
                                eprintln!("harvestd: blocked: {p}");
                            }
                            summary.exit_code()
                        } else {
                            EXIT_OK
                        }
                    }
                    Err(e) => {
                        eprintln!("harvestd: {e}");
                        e.exit_code()
                    }
                }
            })
        }
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| eprintln!("harvestd: cannot start the runtime: {e}"))
        .ok()
}

/// Text on a TTY, JSON lines otherwise, unless the config says which.
/// `RUST_LOG` sets the levels (default `info`).
pub fn init_logging(format: Option<LogFormat>) {
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

fn validate(files: &[PathBuf]) -> u8 {
    let mut invalid = 0;
    for file in files {
        match crate::spec::load(file) {
            Ok((spec, inputs)) => {
                let chunks = inputs.div_ceil(u64::from(spec.chunk_size));
                println!(
                    "{}: ok ({} {}, {inputs} inputs in {chunks} chunk(s))",
                    file.display(),
                    spec.provider,
                    spec.key
                );
            }
            Err(problems) => {
                invalid += 1;
                for p in problems {
                    eprintln!("{p}");
                }
            }
        }
    }
    if invalid == 0 {
        EXIT_OK
    } else {
        EXIT_INVALID
    }
}

async fn serve_emulator(listen: SocketAddr, scenario: Scenario) -> u8 {
    let emulator = match Emulator::start(listen, scenario).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("harvestd: emulator: cannot listen on {listen}: {e}");
            return EXIT_FAILURE;
        }
    };
    // The address goes to stdout so scripts (and tests) can read it.
    println!("{}", emulator.url());
    let Ok(mut signals) = crate::signals::listen() else {
        return EXIT_FAILURE;
    };
    while let Some(signal) = signals.recv().await {
        if signal == crate::signals::Signal::Shutdown {
            break;
        }
    }
    emulator.stop().await;
    EXIT_OK
}
