//! Progress for people (`run --once`): on a terminal, one live bar per run
//! (chunks saved of total, triggered, ready, rows); elsewhere a `progress`
//! log line per run every few seconds. Numbers come from the store, the same
//! ones `harvestd status` shows.

use std::collections::HashMap;
use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::chunk::ChunkState;
use crate::store::{RunRecord, Store};

/// Set while bars are drawn: log lines are printed through it, above them.
static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Where log lines go: through the bars when there are some.
pub fn write_log(bytes: &[u8]) {
    use std::io::Write;
    match BARS.get() {
        Some(bars) => bars.suspend(|| {
            let _ = std::io::stderr().write_all(bytes);
        }),
        None => {
            let _ = std::io::stderr().write_all(bytes);
        }
    }
}

/// A run's chunk counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    pub triggered: u64,
    pub ready: u64,
    pub saved: u64,
    pub failed: u64,
    pub rows: u64,
}

pub fn counts(store: &Store, run: &RunRecord) -> Counts {
    let mut c = Counts {
        total: u64::from(run.chunks),
        ..Counts::default()
    };
    for chunk in store
        .chunk_iter(&run.job, &run.run_id)
        .map_while(Result::ok)
    {
        match chunk.state {
            ChunkState::Planned | ChunkState::Triggering { .. } => {}
            ChunkState::Triggered { .. } => c.triggered += 1,
            ChunkState::Ready { .. } => {
                c.triggered += 1;
                c.ready += 1;
            }
            ChunkState::Downloaded { rows, .. } => {
                c.triggered += 1;
                c.ready += 1;
                c.saved += 1;
                c.rows += rows;
            }
            ChunkState::Failed { .. }
            | ChunkState::Expired { .. }
            | ChunkState::Cancelled { .. } => c.failed += 1,
        }
    }
    c
}

/// The bars of a `run --once` on a terminal.
pub struct Bars {
    multi: MultiProgress,
    bars: HashMap<(String, String), ProgressBar>,
    style: ProgressStyle,
}

impl Bars {
    pub fn new() -> Bars {
        let multi = BARS
            .get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
            .clone();
        let style = ProgressStyle::with_template(
            "{prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} chunks saved  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        Bars {
            multi,
            bars: HashMap::new(),
            style,
        }
    }

    /// Redraws the bar of each run.
    pub fn update(&mut self, store: &Store, runs: &[RunRecord]) {
        for run in runs {
            let c = counts(store, run);
            let bar = self
                .bars
                .entry((run.job.clone(), run.run_id.clone()))
                .or_insert_with(|| {
                    let bar = self.multi.add(ProgressBar::new(c.total));
                    bar.set_style(self.style.clone());
                    bar.set_prefix(run.job.clone());
                    bar
                });
            bar.set_length(c.total);
            bar.set_position(c.saved);
            let failed = if c.failed > 0 {
                format!(" · {} failed", c.failed)
            } else {
                String::new()
            };
            bar.set_message(format!(
                "triggered {} · ready {} · rows {}{failed}",
                c.triggered, c.ready, c.rows
            ));
        }
    }

    /// Leaves a run's bar on screen with its final word.
    pub fn finish(&mut self, store: &Store, run: &RunRecord, state: &str) {
        self.update(store, std::slice::from_ref(run));
        if let Some(bar) = self.bars.get(&(run.job.clone(), run.run_id.clone())) {
            bar.finish_with_message(format!("{} · {state}", bar.message()));
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        // The last bar line has no newline of its own.
        if !self.bars.is_empty() {
            self.multi.suspend(|| eprintln!());
        }
    }
}

impl Default for Bars {
    fn default() -> Self {
        Bars::new()
    }
}
