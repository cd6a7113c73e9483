//! Unix signals as daemon events (`docs/operations.md`): SIGTERM/SIGINT stop, SIGHUP
//! reloads.

use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Shutdown,
    Reload,
}

/// Starts listening; signals arrive on the returned channel. A second
/// shutdown signal while the first is being handled exits the process at
/// once: the state is safe at every point anyway.
pub fn listen() -> std::io::Result<mpsc::UnboundedReceiver<Signal>> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let (tx, rx) = mpsc::unbounded_channel();
    // Lives as long as the process: signals are read until it exits.
    #[allow(clippy::disallowed_methods)]
    tokio::spawn(async move {
        let mut shutting_down = false;
        while let Some(sig) = signals.next().await {
            let event = if sig == SIGHUP {
                Signal::Reload
            } else {
                Signal::Shutdown
            };
            if event == Signal::Shutdown {
                if shutting_down {
                    tracing::warn!("second shutdown signal: exiting now");
                    // The operator asked twice: the drain is given up on
                    // purpose. What was flushed is safe; a trigger in flight
                    // is settled as in doubt at the next start.
                    #[allow(clippy::disallowed_methods)]
                    std::process::exit(crate::exit::signalled(sig));
                }
                shutting_down = true;
            }
            if tx.send(event).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}
