//! `GET /metrics` (`docs/admin-api.md`): the daemon's figures in the
//! Prometheus text format (0.0.4), built with the `prometheus` crate's data
//! model and encoder. Labels are bounded: provider, API, endpoint, status
//! class, key, state, level, event, outcome — never a remote id.
//!
//! Most figures are read when asked for (from the view, the counters, the
//! gates), so each answer is a fresh registry filled with them; the two
//! histograms are kept where they are observed (each provider API's
//! client, the counters) and only added.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use prometheus::core::Collector;
use prometheus::{Encoder, GaugeVec, IntCounterVec, Opts, Registry, TextEncoder};

use super::{context_of, AdminState};

/// The content type of the answer.
pub(super) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One answer's registry.
struct Exposition {
    registry: Registry,
}

impl Exposition {
    fn gauges<'a>(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        rows: impl IntoIterator<Item = (Vec<&'a str>, f64)>,
    ) -> Result<(), String> {
        let vec = GaugeVec::new(Opts::new(name, help), labels).map_err(err)?;
        for (values, v) in rows {
            vec.get_metric_with_label_values(&values)
                .map_err(err)?
                .set(v);
        }
        self.add(vec)
    }

    fn gauge(&self, name: &str, help: &str, value: f64) -> Result<(), String> {
        self.gauges(name, help, &[], [(vec![], value)])
    }

    fn counters<'a>(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        rows: impl IntoIterator<Item = (Vec<&'a str>, u64)>,
    ) -> Result<(), String> {
        let vec = IntCounterVec::new(Opts::new(name, help), labels).map_err(err)?;
        for (values, v) in rows {
            vec.get_metric_with_label_values(&values)
                .map_err(err)?
                .inc_by(v);
        }
        self.add(vec)
    }

    fn counter(&self, name: &str, help: &str, value: u64) -> Result<(), String> {
        self.counters(name, help, &[], [(vec![], value)])
    }

    fn add(&self, collector: impl Collector + 'static) -> Result<(), String> {
        self.registry.register(Box::new(collector)).map_err(err)
    }
}

fn err(e: prometheus::Error) -> String {
    format!("metrics: {e}")
}

pub(super) async fn metrics(state: &AdminState) -> Result<String, String> {
    let _building = state.answers.building.lock().await;
    let figures = state.view.metrics(&state.store).await?;
    let m = Exposition {
        registry: Registry::new(),
    };
    m.gauges(
        "harvestd_build_info",
        "The running build: always 1, its version in the labels.",
        &["version"],
        [(vec![env!("CARGO_PKG_VERSION")], 1.0)],
    )?;
    let rows = |map: &BTreeMap<&'static str, u64>| -> Vec<(Vec<&'static str>, f64)> {
        map.iter().map(|(s, n)| (vec![*s], *n as f64)).collect()
    };
    m.gauges(
        "harvestd_runs",
        "Runs by state.",
        &["state"],
        rows(&figures.runs_by_state),
    )?;
    m.gauges(
        "harvestd_chunks",
        "Chunks of unfinished runs by state.",
        &["state"],
        rows(&figures.chunks_by_state),
    )?;

    let apis: Vec<_> = state.accounts.apis().collect();
    let stats: Vec<_> = apis
        .iter()
        .map(|c| (c.provider.kind().as_str(), c.provider.call_stats()))
        .collect();
    m.counters(
        "harvestd_requests_total",
        "Provider calls by endpoint and status class (or timeout, network).",
        &["provider", "endpoint", "class"],
        stats.iter().flat_map(|(provider, calls)| {
            calls
                .iter()
                .map(move |(endpoint, class, n)| (vec![*provider, *endpoint, class.as_str()], *n))
        }),
    )?;
    // One histogram per provider API, told apart by its `api` label.
    for c in &apis {
        m.add(c.provider.latency())?;
    }
    m.add(state.accounts.counters.build_seconds.0.clone())?;

    let per_kind = state.accounts.per_kind();
    m.counters(
        "harvestd_rate_limited_total",
        "Answers 429 by provider.",
        &["provider"],
        per_kind
            .iter()
            .map(|c| (vec![c.provider.kind().as_str()], c.gate.total_429())),
    )?;
    m.gauges(
        "harvestd_provider_blocked",
        "Whether a provider is blocked (401/402/403, no token).",
        &["provider"],
        per_kind.iter().map(|c| {
            (
                vec![c.provider.kind().as_str()],
                f64::from(u8::from(c.gate.blocked().is_some())),
            )
        }),
    )?;
    let in_flight = (state.in_flight)();
    m.gauges(
        "harvestd_in_flight",
        "Collections triggered and not yet downloaded, per key.",
        &["key"],
        in_flight
            .iter()
            .map(|(key, n)| (vec![key.as_str()], f64::from(*n))),
    )?;

    let k = &state.accounts.counters;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    m.counter(
        "harvestd_triggers_total",
        "Trigger calls sent.",
        load(&k.triggers_sent),
    )?;
    m.counters(
        "harvestd_in_doubt_total",
        "Triggers whose outcome was unknown, by how they were settled (sum them for all).",
        &["settled"],
        [
            (vec!["found"], load(&k.in_doubt_found)),
            (vec!["not_created"], load(&k.in_doubt_not_created)),
            (vec!["unreachable"], load(&k.in_doubt_unreachable)),
        ],
    )?;
    m.counter(
        "harvestd_rows_written_total",
        "Data rows written to final files.",
        load(&k.rows_written),
    )?;
    m.counter(
        "harvestd_written_bytes_total",
        "Bytes of final files written.",
        load(&k.bytes_written),
    )?;
    // Only Firecrawl reports what a collection cost.
    m.counters(
        "harvestd_credits_used_total",
        "Credits the provider reported for collections that became ready.",
        &["provider"],
        [(vec!["firecrawl"], load(&k.credits_used))],
    )?;

    // Seconds left on each dataset's provider clock.
    let mut earliest_expiry: Option<i64> = None;
    let mut expiring = BTreeMap::<&str, u64>::new();
    for (provider, ready) in &figures.ready {
        let Some(ctx) = context_of(&per_kind, *provider) else {
            continue;
        };
        for &expires_at in ready {
            let (left, level) = ctx.expiry(expires_at);
            earliest_expiry = Some(earliest_expiry.map_or(left, |e| e.min(left)));
            *expiring.entry(level.as_str()).or_default() += 1;
        }
    }
    if let Some(left) = earliest_expiry {
        m.gauge(
            "harvestd_earliest_expiry_seconds",
            "Seconds until the first unsaved ready dataset expires (absent when none).",
            (left / 1000) as f64,
        )?;
    }
    m.gauges(
        "harvestd_unsaved_datasets",
        "Ready datasets not yet saved, by expiry level (warning: 3 days left, Firecrawl 6 h; error: 1 day, 1 h).",
        &["level"],
        ["fine", "warning", "error", "expired"]
            .into_iter()
            .map(|level| (vec![level], expiring.get(level).copied().unwrap_or(0) as f64)),
    )?;
    let last_poll = k.last_poll_ok.load(Ordering::Relaxed);
    if last_poll > 0 {
        // Absent before the first poll: 0 would read as "50 years ago".
        m.gauge(
            "harvestd_last_successful_poll_timestamp_seconds",
            "Unix time of the last successful status poll (absent before the first).",
            last_poll as f64 / 1000.0,
        )?;
    }

    m.gauges(
        "harvestd_uploads",
        "Finished runs whose files are not yet all in the object store (pending), and those whose last attempt failed (failing).",
        &["state"],
        [
            (vec!["pending"], figures.uploads_pending as f64),
            (vec!["failing"], figures.uploads_failing as f64),
        ],
    )?;
    m.counter(
        "harvestd_upload_bytes_total",
        "Bytes uploaded to the object store.",
        load(&k.upload_bytes),
    )?;
    m.counter(
        "harvestd_upload_objects_total",
        "Objects uploaded to the object store.",
        load(&k.upload_objects),
    )?;
    m.counter(
        "harvestd_upload_failures_total",
        "Upload attempts that failed (each is tried again).",
        load(&k.upload_failures),
    )?;

    let (outcomes, pending) = state.accounts.notify.figures();
    m.counters(
        "harvestd_notifications_total",
        "Notification attempts by event and outcome (delivered, failed: will be retried, dropped: given up).",
        &["event", "outcome"],
        outcomes
            .iter()
            .map(|((event, outcome), n)| (vec![event.as_str(), *outcome], *n)),
    )?;
    m.gauge(
        "harvestd_notifications_pending",
        "Notifications waiting to be delivered.",
        pending as f64,
    )?;

    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&m.registry.gather(), &mut out)
        .map_err(err)?;
    String::from_utf8(out).map_err(|e| format!("metrics: {e}"))
}
