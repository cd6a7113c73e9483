//! What a run keeps of chunks that have no task: the building collections
//! waiting for their next poll (a heap of small entries, not timers), the
//! one planned chunk waiting for its trigger slot, and what a chunk's task
//! is given when the run starts one.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Context;
use crate::clock::{self, UnixMs};
use crate::config::LimitsConfig;
use crate::limits::{jitter, poll_interval, InFlightPermit, KeyLimits};
use crate::provider::{CallError, PollOutcome};

/// A collection between two status polls. Thousands of collections spend
/// nearly all their time here, so a waiting chunk is 56 bytes in a queue
/// and its remote id (its record stays in the store) instead of a task with
/// a timer (~1.5 KB, and a wake-up per chunk at shutdown): issue #7,
/// `cargo bench --bench many_collections`.
pub(super) struct Waiting {
    pub(super) due: tokio::time::Instant,
    pub(super) index: u32,
    pub(super) permit: Option<InFlightPermit>,
    /// Consecutive failed attempts, carried over for backoff.
    pub(super) attempt: u32,
    /// What a status poll needs: the poll that finds the collection still
    /// building (nearly all of them) then reads and decodes nothing from
    /// the store, which was a tenth of the daemon's CPU per poll. ~40
    /// bytes more per collection.
    pub(super) polled: Polled,
}

/// The collection a waiting chunk polls.
#[derive(Clone)]
pub(super) struct Polled {
    pub(super) remote_id: Box<str>,
    pub(super) triggered_at: UnixMs,
}

/// What the run gives a chunk's task when it starts one.
pub(super) struct Start {
    pub(super) index: u32,
    /// Its place under `max_in_flight`, if it holds one.
    pub(super) permit: Option<InFlightPermit>,
    pub(super) attempt: u32,
    /// A call slot for its first trigger or poll.
    pub(super) call: Option<CallSlot>,
    /// Its trigger slot (the collector's pacing of triggers) has come:
    /// trigger at once.
    pub(super) trigger_slot_came: bool,
    /// Taken from the waiting queue: its poll is due.
    pub(super) polled: Option<Polled>,
}

impl Start {
    /// A chunk found mid-way at start-up (in doubt, ready): it takes its
    /// place at once, whatever the cap, and calls when its turn comes.
    pub(super) fn resumed(index: u32, permit: InFlightPermit) -> Start {
        Start {
            index,
            permit: Some(permit),
            attempt: 0,
            call: None,
            trigger_slot_came: false,
            polled: None,
        }
    }

    /// A planned chunk whose trigger slot has come.
    pub(super) fn trigger(s: Starting) -> Start {
        Start {
            index: s.index,
            permit: Some(s.permit),
            attempt: 0,
            call: Some(s.call),
            trigger_slot_came: true,
            polled: None,
        }
    }

    /// A building collection whose poll is due.
    pub(super) fn poll(w: Waiting, call: CallSlot) -> Start {
        Start {
            index: w.index,
            permit: w.permit,
            attempt: w.attempt,
            call: Some(call),
            trigger_slot_came: false,
            polled: Some(w.polled),
        }
    }
}

/// The one planned chunk that holds a place under `max_in_flight` and a
/// call slot, and waits for its trigger slot at `at`.
pub(super) struct Starting {
    pub(super) index: u32,
    pub(super) permit: InFlightPermit,
    pub(super) at: tokio::time::Instant,
    pub(super) call: CallSlot,
}

/// One status poll, holding `call` while it is under way; notes a
/// successful one for `/healthz`.
pub(super) async fn status_poll(
    ctx: &Context,
    key: &str,
    remote_id: &str,
    call: Option<CallSlot>,
) -> Result<PollOutcome, CallError> {
    // A poll is a read: at shutdown it is given up rather than waited for
    // (an endless answer would otherwise hold SIGTERM for the whole
    // request_timeout). The caller sees `stop` and ends the chunk.
    let outcome = tokio::select! {
        outcome = ctx.provider.poll(key, remote_id) => outcome,
        _ = ctx.stop.cancelled() => Err(CallError::Transient {
            detail: "shutting down".into(),
            sent: true,
        }),
    };
    drop(call);
    if outcome.is_ok() {
        ctx.counters
            .last_poll_ok
            .store(clock::now_ms(), Ordering::Relaxed);
    }
    outcome
}

impl Waiting {
    /// Waits for the collection's next poll, due after [`poll_wait`].
    pub(super) fn next_poll(
        ctx: &Context,
        key: &KeyLimits,
        index: u32,
        permit: Option<InFlightPermit>,
        attempt: u32,
        polled: Polled,
    ) -> Waiting {
        Waiting {
            due: tokio::time::Instant::now() + poll_wait(&ctx.limits(), key, polled.triggered_at),
            index,
            permit,
            attempt,
            polled,
        }
    }

    fn order(&self) -> (tokio::time::Instant, u32) {
        (self.due, self.index)
    }
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        self.order() == other.order()
    }
}

impl Eq for Waiting {}

impl PartialOrd for Waiting {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiting {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest due.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.order().cmp(&self.order())
    }
}

/// A place among the calls (triggers and status polls) one run has under
/// way at once.
pub(super) type CallSlot = tokio::sync::OwnedSemaphorePermit;

/// How long to wait before polling a collection triggered at `triggered_at`.
fn poll_wait(limits: &LimitsConfig, key: &KeyLimits, triggered_at: UnixMs) -> Duration {
    poll_interval(
        clock::since(triggered_at),
        limits.poll_min_interval,
        limits.poll_max_interval,
        key.expected_build(),
        jitter(),
    )
}
