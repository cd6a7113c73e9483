//! Tells the daemon when to rescan the jobs directory: on file events
//! (notify), coalesced, and on a timer in case events are lost.

use std::path::Path;
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// Keeps the OS watch alive; drop it to stop watching.
pub struct Watcher {
    _inner: Option<notify::RecommendedWatcher>,
    rx: mpsc::Receiver<()>,
    interval: tokio::time::Interval,
}

impl Watcher {
    pub fn new(dir: &Path, rescan: Duration) -> Watcher {
        let (tx, rx) = mpsc::channel(1);
        let inner = notify::recommended_watcher(move |_event| {
            // A full channel already holds a pending rescan.
            let _ = tx.try_send(());
        })
        .and_then(|mut w| w.watch(dir, RecursiveMode::NonRecursive).map(|()| w));
        let inner = match inner {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the jobs directory; rescanning on a timer only");
                None
            }
        };
        let mut interval = tokio::time::interval(rescan);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Watcher {
            _inner: inner,
            rx,
            interval,
        }
    }

    /// Waits until a rescan is due.
    pub async fn changed(&mut self) {
        tokio::select! {
            _ = self.rx.recv() => {
                // Let a burst of events (a copy in progress) settle.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while self.rx.try_recv().is_ok() {}
            }
            _ = self.interval.tick() => {}
        }
    }
}
