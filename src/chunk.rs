//! A chunk's life as a pure state machine: no IO, no clock, no tokio.
//!
//! Every state carries exactly the data that exists at that point: a remote id
//! exists only from `Triggered` on, a download's progress (cursor, pages,
//! rows so far) only while `Ready`, final row counts and columns only once
//! `Downloaded`. Every change, a saved page included, is a transition of
//! [`next`]. A chunk's task persists each new state before it acts on it, so
//! the state found in the store after a crash always says what to do next.

use indexmap::IndexSet;
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, UTC.
pub use crate::clock::UnixMs;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ChunkState {
    /// Inputs stored, nothing sent yet.
    Planned,
    /// The intent to trigger is durable; the answer is not. Found like this
    /// after a crash, or after a call that ended without a readable answer,
    /// the chunk is *in doubt*: the provider is asked before any new trigger.
    Triggering { intent_at: UnixMs },
    /// The provider accepted the trigger; the collection is being built.
    Triggered {
        remote_id: String,
        triggered_at: UnixMs,
    },
    /// The provider says the dataset is ready; it is not saved yet, or
    /// only some of its pages are.
    Ready {
        remote_id: String,
        triggered_at: UnixMs,
        ready_at: UnixMs,
        expires_at: UnixMs,
        #[serde(default)]
        progress: Progress,
    },
    /// The part file is durable. Terminal.
    Downloaded {
        remote_id: String,
        triggered_at: UnixMs,
        ready_at: UnixMs,
        expires_at: UnixMs,
        downloaded_at: UnixMs,
        rows: u64,
        error_rows: u64,
        /// The CSV columns of its data rows, in first-seen order; `None`
        /// when a page was saved without them (by an older harvestd), and
        /// the final files then walk the part for them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        columns: Option<Vec<String>>,
    },
    /// The provider refused the chunk or its collection failed. Terminal.
    Failed {
        remote_id: Option<String>,
        triggered_at: Option<UnixMs>,
        error: String,
    },
    /// The dataset was deleted by the provider before it was saved. Terminal.
    Expired {
        remote_id: String,
        triggered_at: UnixMs,
        expires_at: Option<UnixMs>,
        error: String,
    },
    /// Cancelled by the user or the provider. Terminal.
    Cancelled { remote_id: Option<String> },
}

/// How far a ready collection's download has come. A download comes in
/// pages (Web Scraper API parts, Firecrawl result pages, or one page for
/// the rest): each saved page is a durable file and is counted here before
/// the next is fetched, so a restart or a failed fetch resumes at the next
/// page and never fetches a saved one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The provider's cursor for the next page; `None`: the start.
    pub cursor: Option<serde_json::Value>,
    /// Pages saved so far.
    pub pages: u32,
    pub rows: u64,
    pub error_rows: u64,
    /// Every page is saved; only joining them into the part file remains.
    pub fetched: bool,
    /// The CSV columns of the saved pages' data rows, in first-seen order;
    /// `None` when a page was saved without them (by an older harvestd).
    #[serde(default)]
    pub columns: Option<Vec<String>>,
}

impl Progress {
    /// Counts one more saved page, with its columns.
    pub fn add_page(
        &mut self,
        next: Option<serde_json::Value>,
        rows: u64,
        error_rows: u64,
        columns: IndexSet<String>,
    ) {
        self.columns = match (self.pages, self.columns.take()) {
            (0, _) => Some(columns.into_iter().collect()),
            (_, Some(known)) => {
                let mut all: IndexSet<String> = known.into_iter().collect();
                all.extend(columns);
                Some(all.into_iter().collect())
            }
            (_, None) => None,
        };
        self.pages = self.pages.saturating_add(1);
        self.rows = self.rows.saturating_add(rows);
        self.error_rows = self.error_rows.saturating_add(error_rows);
        self.fetched = next.is_none();
        self.cursor = next;
    }
}

/// What happened to a chunk; input to [`next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkEvent {
    /// About to send the trigger call.
    Intent {
        at: UnixMs,
    },
    /// The provider answered with a collection id.
    Accepted {
        remote_id: String,
        at: UnixMs,
    },
    /// The provider refused the chunk for good (400/404/422).
    Rejected {
        error: String,
    },
    /// The trigger provably created nothing (refused before it was accepted,
    /// or an in-doubt chunk the provider shows no trace of): plan again.
    NotCreated,
    /// The collection finished building; its download starts at `start`
    /// (the provider's first cursor, if it names one).
    Ready {
        at: UnixMs,
        expires_at: UnixMs,
        start: Option<serde_json::Value>,
    },
    /// A page of the download is durable; `next` is the cursor of the
    /// following page, `None` after the last.
    PageSaved {
        next: Option<serde_json::Value>,
        rows: u64,
        error_rows: u64,
        columns: IndexSet<String>,
    },
    /// The provider sent the download elsewhere (a cursor to follow)
    /// before any row.
    Redirected {
        cursor: serde_json::Value,
    },
    /// The part file, every page joined, is durable.
    Saved {
        at: UnixMs,
    },
    /// The collection failed at the provider.
    Failed {
        error: String,
    },
    /// The provider no longer has the data.
    Expired {
        error: String,
    },
    Cancelled,
    /// The user asked to try a failed or expired chunk again.
    Retry,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chunk in state '{from}' cannot take event {event}")]
pub struct TransitionError {
    pub from: &'static str,
    pub event: String,
}

impl ChunkState {
    /// The name used in manifests, status and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            ChunkState::Planned => "planned",
            ChunkState::Triggering { .. } => "triggering",
            ChunkState::Triggered { .. } => "triggered",
            ChunkState::Ready { .. } => "ready",
            ChunkState::Downloaded { .. } => "downloaded",
            ChunkState::Failed { .. } => "failed",
            ChunkState::Expired { .. } => "expired",
            ChunkState::Cancelled { .. } => "cancelled",
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            ChunkState::Downloaded { .. }
                | ChunkState::Failed { .. }
                | ChunkState::Expired { .. }
                | ChunkState::Cancelled { .. }
        )
    }

    /// Whether the chunk holds a collection at the provider that is not yet
    /// saved: it counts against `max_in_flight`.
    pub fn is_in_flight(&self) -> bool {
        matches!(
            self,
            ChunkState::Triggering { .. } | ChunkState::Triggered { .. } | ChunkState::Ready { .. }
        )
    }

    pub fn remote_id(&self) -> Option<&str> {
        match self {
            ChunkState::Triggered { remote_id, .. }
            | ChunkState::Ready { remote_id, .. }
            | ChunkState::Downloaded { remote_id, .. }
            | ChunkState::Expired { remote_id, .. } => Some(remote_id),
            ChunkState::Failed { remote_id, .. } | ChunkState::Cancelled { remote_id } => {
                remote_id.as_deref()
            }
            ChunkState::Planned | ChunkState::Triggering { .. } => None,
        }
    }
}

/// The one place that decides which transitions exist.
pub fn next(state: &ChunkState, event: ChunkEvent) -> Result<ChunkState, TransitionError> {
    use ChunkEvent as E;
    use ChunkState as S;
    let new = match (state, event) {
        (S::Planned, E::Intent { at }) => S::Triggering { intent_at: at },
        (S::Triggering { .. }, E::Accepted { remote_id, at }) => S::Triggered {
            remote_id,
            triggered_at: at,
        },
        (S::Triggering { .. }, E::Rejected { error }) => S::Failed {
            remote_id: None,
            triggered_at: None,
            error,
        },
        (S::Triggering { .. }, E::NotCreated) => S::Planned,
        (
            S::Triggered {
                remote_id,
                triggered_at,
            },
            E::Ready {
                at,
                expires_at,
                start,
            },
        ) => S::Ready {
            remote_id: remote_id.clone(),
            triggered_at: *triggered_at,
            ready_at: at,
            expires_at,
            progress: Progress {
                cursor: start,
                ..Progress::default()
            },
        },
        (
            S::Ready { progress, .. },
            E::PageSaved {
                next,
                rows,
                error_rows,
                columns,
            },
        ) if !progress.fetched => {
            let mut new = state.clone();
            if let S::Ready { progress, .. } = &mut new {
                progress.add_page(next, rows, error_rows, columns);
            }
            new
        }
        (S::Ready { progress, .. }, E::Redirected { cursor }) if !progress.fetched => {
            let mut new = state.clone();
            if let S::Ready { progress, .. } = &mut new {
                progress.cursor = Some(cursor);
            }
            new
        }
        (
            S::Ready {
                remote_id,
                triggered_at,
                ready_at,
                expires_at,
                progress,
            },
            E::Saved { at },
        ) if progress.fetched => S::Downloaded {
            remote_id: remote_id.clone(),
            triggered_at: *triggered_at,
            ready_at: *ready_at,
            expires_at: *expires_at,
            downloaded_at: at,
            rows: progress.rows,
            error_rows: progress.error_rows,
            columns: progress.columns.clone(),
        },
        (
            S::Triggered {
                remote_id,
                triggered_at,
            }
            | S::Ready {
                remote_id,
                triggered_at,
                ..
            },
            E::Failed { error },
        ) => S::Failed {
            remote_id: Some(remote_id.clone()),
            triggered_at: Some(*triggered_at),
            error,
        },
        (
            S::Triggered {
                remote_id,
                triggered_at,
            },
            E::Expired { error },
        ) => S::Expired {
            remote_id: remote_id.clone(),
            triggered_at: *triggered_at,
            expires_at: None,
            error,
        },
        (
            S::Ready {
                remote_id,
                triggered_at,
                expires_at,
                ..
            },
            E::Expired { error },
        ) => S::Expired {
            remote_id: remote_id.clone(),
            triggered_at: *triggered_at,
            expires_at: Some(*expires_at),
            error,
        },
        (S::Planned, E::Cancelled) => S::Cancelled { remote_id: None },
        (S::Failed { .. } | S::Expired { .. }, E::Retry) => S::Planned,
        (S::Triggered { remote_id, .. } | S::Ready { remote_id, .. }, E::Cancelled) => {
            S::Cancelled {
                remote_id: Some(remote_id.clone()),
            }
        }
        (state, event) => {
            return Err(TransitionError {
                from: state.name(),
                event: format!("{event:?}"),
            })
        }
    };
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn triggered() -> ChunkState {
        ChunkState::Triggered {
            remote_id: "j_1".into(),
            triggered_at: 10,
        }
    }
    fn ready() -> ChunkState {
        ChunkState::Ready {
            remote_id: "j_1".into(),
            triggered_at: 10,
            ready_at: 20,
            expires_at: 30,
            progress: Progress::default(),
        }
    }
    /// Every page saved: 3 rows, 1 of them an error row.
    fn fetched() -> ChunkState {
        let page = |next: Option<serde_json::Value>, rows, error_rows, columns: &[&str]| {
            ChunkEvent::PageSaved {
                next,
                rows,
                error_rows,
                columns: columns.iter().map(|c| c.to_string()).collect(),
            }
        };
        let s = next(
            &ready(),
            page(Some(serde_json::json!("p2")), 2, 0, &["a", "b"]),
        )
        .unwrap();
        next(&s, page(None, 1, 1, &["b", "c"])).unwrap()
    }
    fn page() -> ChunkEvent {
        ChunkEvent::PageSaved {
            next: None,
            rows: 1,
            error_rows: 0,
            columns: IndexSet::new(),
        }
    }

    #[test]
    fn transition_table() {
        let accepted = || ChunkEvent::Accepted {
            remote_id: "j_1".into(),
            at: 10,
        };
        let saved = || ChunkEvent::Saved { at: 25 };
        // (from, event, expected state name or None for a refused transition)
        let table: Vec<(ChunkState, ChunkEvent, Option<&str>)> = vec![
            (
                ChunkState::Planned,
                ChunkEvent::Intent { at: 1 },
                Some("triggering"),
            ),
            (ChunkState::Planned, accepted(), None),
            (
                ChunkState::Planned,
                ChunkEvent::Cancelled,
                Some("cancelled"),
            ),
            (
                ChunkState::Triggering { intent_at: 1 },
                accepted(),
                Some("triggered"),
            ),
            (
                ChunkState::Triggering { intent_at: 1 },
                ChunkEvent::NotCreated,
                Some("planned"),
            ),
            (
                ChunkState::Triggering { intent_at: 1 },
                ChunkEvent::Rejected {
                    error: "bad".into(),
                },
                Some("failed"),
            ),
            // A trigger whose outcome is unknown must be settled, never cancelled blind.
            (
                ChunkState::Triggering { intent_at: 1 },
                ChunkEvent::Cancelled,
                None,
            ),
            (
                ChunkState::Triggering { intent_at: 1 },
                ChunkEvent::Intent { at: 2 },
                None,
            ),
            (
                triggered(),
                ChunkEvent::Ready {
                    at: 20,
                    expires_at: 30,
                    start: None,
                },
                Some("ready"),
            ),
            (triggered(), page(), None),
            (triggered(), saved(), None),
            (
                triggered(),
                ChunkEvent::Failed { error: "x".into() },
                Some("failed"),
            ),
            (
                triggered(),
                ChunkEvent::Expired { error: "x".into() },
                Some("expired"),
            ),
            (triggered(), ChunkEvent::Cancelled, Some("cancelled")),
            // Downloaded only once every page is saved; no page after the last.
            (ready(), saved(), None),
            (ready(), page(), Some("ready")),
            (
                ready(),
                ChunkEvent::Redirected {
                    cursor: serde_json::json!("part-1"),
                },
                Some("ready"),
            ),
            (fetched(), saved(), Some("downloaded")),
            (fetched(), page(), None),
            (
                fetched(),
                ChunkEvent::Expired { error: "x".into() },
                Some("expired"),
            ),
            (
                ready(),
                ChunkEvent::Expired { error: "x".into() },
                Some("expired"),
            ),
            (ready(), ChunkEvent::Intent { at: 1 }, None),
            (
                ChunkState::Failed {
                    remote_id: None,
                    triggered_at: None,
                    error: "x".into(),
                },
                ChunkEvent::Retry,
                Some("planned"),
            ),
            (triggered(), ChunkEvent::Retry, None),
        ];
        for (from, event, want) in table {
            let got = next(&from, event.clone());
            match (want, got) {
                (Some(name), Ok(state)) => assert_eq!(state.name(), name, "{from:?} + {event:?}"),
                (None, Err(_)) => {}
                (want, got) => panic!("{from:?} + {event:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn terminal_states_take_no_events() {
        let downloaded = next(&fetched(), ChunkEvent::Saved { at: 25 }).expect("fetched + saved");
        assert!(downloaded.is_terminal());
        for event in [
            ChunkEvent::Intent { at: 1 },
            ChunkEvent::Cancelled,
            ChunkEvent::Failed { error: "x".into() },
            ChunkEvent::Expired { error: "x".into() },
        ] {
            assert!(next(&downloaded, event).is_err());
        }
    }

    #[test]
    fn data_carried_forward() {
        let s = next(&fetched(), ChunkEvent::Saved { at: 25 }).unwrap();
        assert_eq!(
            s,
            ChunkState::Downloaded {
                remote_id: "j_1".into(),
                triggered_at: 10,
                ready_at: 20,
                expires_at: 30,
                downloaded_at: 25,
                rows: 3,
                error_rows: 1,
                columns: Some(vec!["a".into(), "b".into(), "c".into()]),
            }
        );
        assert_eq!(s.remote_id(), Some("j_1"));
    }

    #[test]
    fn pages_move_the_cursor_and_count() {
        let s = next(
            &triggered(),
            ChunkEvent::Ready {
                at: 20,
                expires_at: 30,
                start: Some(serde_json::json!("first")),
            },
        )
        .unwrap();
        let ChunkState::Ready { progress, .. } = &s else {
            panic!("{s:?}")
        };
        assert_eq!(progress.cursor, Some(serde_json::json!("first")));
        let s = next(
            &s,
            ChunkEvent::Redirected {
                cursor: serde_json::json!("part-1"),
            },
        )
        .unwrap();
        let s = next(
            &s,
            ChunkEvent::PageSaved {
                next: Some(serde_json::json!("part-2")),
                rows: 5,
                error_rows: 1,
                columns: IndexSet::new(),
            },
        )
        .unwrap();
        let ChunkState::Ready { progress, .. } = &s else {
            panic!("{s:?}")
        };
        assert_eq!(
            (
                progress.pages,
                progress.rows,
                progress.error_rows,
                progress.fetched
            ),
            (1, 5, 1, false)
        );
        assert_eq!(progress.cursor, Some(serde_json::json!("part-2")));
        // Out of the state machine, progress is gone: a retried chunk starts over.
        let failed = next(&s, ChunkEvent::Failed { error: "x".into() }).unwrap();
        let again = next(&failed, ChunkEvent::Retry).unwrap();
        assert_eq!(again, ChunkState::Planned);
    }
}
