//! Notifications (`docs/notifications.md`): events told to webhooks and
//! commands, at least once.
//!
//! [`Notifier::raise`] stores the event in the outbox once per target that
//! wants it ([`crate::store::OutboxRecord`]) and returns at once: a dead
//! or slow receiver never holds up a run. [`Notifier::run`] sends what is
//! due, a few at a time, flushing the store before an event's first attempt
//! so an event is never sent before it is durable. A 2xx answer (or exit 0)
//! delivers it; anything else is tried again with exponential backoff and
//! full jitter, with the same id, across restarts and `kill -9`, until 24
//! hours have passed; then it is dropped, counted and logged at error
//! level. Event ids are derived from what happened (event, job, run, and
//! when), so an event raised again after a crash is not sent twice.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::chunk::UnixMs;
use crate::config::{ConfigError, NotifyConfig, NotifyFormat};
use crate::store::{OutboxRecord, Store};

/// How long an event is tried before it is dropped.
const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Events waiting at most; past this a new event is dropped (and logged):
/// a receiver down for a day must not grow the store without bound.
const MAX_WAITING: usize = 10_000;
/// Attempts under way at once.
const AT_ONCE: usize = 4;
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(15 * 60);
/// Delivered ids are remembered this long, past any event's retries.
const REMEMBER: Duration = Duration::from_secs(30 * 24 * 3600);
/// Bytes of a failing command's stderr kept for its error message.
const STDERR_KEPT: u64 = 4096;

/// A run's figures, as an event tells them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub inputs: u64,
    pub rows: u64,
    pub error_rows: u64,
    pub malformed_rows: u64,
    pub chunks_failed: u64,
    /// What the provider reported, `null` where it reports nothing.
    pub credits_used: Option<u64>,
}

/// Something that happened, about to be told.
#[derive(Debug, Clone)]
pub struct Event {
    pub event: &'static str,
    pub job: Option<String>,
    pub run_id: Option<String>,
    pub state: Option<String>,
    pub summary: String,
    pub counts: Option<Counts>,
    /// What makes this occurrence another than an earlier one of the same
    /// event for the same run (a run's finish time, a block's start); the
    /// id is derived from it, so raising the same occurrence twice sends it
    /// once.
    pub occurrence: String,
}

impl Event {
    fn id(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            self.event,
            self.job.as_deref().unwrap_or(""),
            self.run_id.as_deref().unwrap_or(""),
            &self.occurrence,
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        hex::encode(&h.finalize()[..16])
    }

    fn body(&self, id: &str, now: UnixMs) -> Value {
        json!({
            "id": id,
            "event": self.event,
            "at": crate::clock::timestamp(now),
            "job": self.job,
            "run_id": self.run_id,
            "state": self.state,
            "summary": self.summary,
            "counts": self.counts,
        })
    }
}

enum Destination {
    Url(reqwest::Url),
    Command(Vec<String>),
}

struct Target {
    /// Stable across restarts and reordering: a digest of the URL or command.
    id: String,
    /// What logs and errors name it by: a URL's host only, as its path may
    /// be the secret (a Slack webhook's is).
    label: String,
    to: Destination,
    events: Option<Vec<String>>,
    format: NotifyFormat,
    secret: Option<Vec<u8>>,
    timeout: Duration,
}

impl Target {
    fn from_config(i: usize, c: &NotifyConfig) -> Result<Target, ConfigError> {
        let (to, digest_of, label) = match (&c.url, &c.command) {
            (Some(url), _) => {
                let parsed = reqwest::Url::parse(url).map_err(|_| {
                    ConfigError::Invalid(format!("notify[{i}].url is not an http(s) URL"))
                })?;
                let label = format!("{} (notify[{i}])", parsed.host_str().unwrap_or("?"));
                (Destination::Url(parsed), url.clone(), label)
            }
            (None, Some(argv)) => (
                Destination::Command(argv.clone()),
                argv.join("\0"),
                format!("{} (notify[{i}])", argv.first().map_or("?", String::as_str)),
            ),
            (None, None) => {
                return Err(ConfigError::Invalid(format!(
                    "notify[{i}] needs exactly one of url or command"
                )))
            }
        };
        let secret = c.secret_file.as_deref().map(read_secret).transpose()?;
        Ok(Target {
            id: hex::encode(&Sha256::digest(digest_of.as_bytes())[..8]),
            label,
            to,
            events: c.events.clone(),
            format: c.format,
            secret,
            timeout: c.timeout,
        })
    }

    fn wants(&self, event: &str) -> bool {
        match &self.events {
            Some(events) => events.iter().any(|e| e == event),
            None => event != "run.complete",
        }
    }
}

fn read_secret(path: &Path) -> Result<Vec<u8>, ConfigError> {
    crate::config::secret_file_mode(path, false)?;
    let text = std::fs::read(path).map_err(|e| ConfigError::File {
        path: path.display().to_string(),
        message: format!("cannot read the notification secret: {e}"),
    })?;
    let secret = text.trim_ascii().to_vec();
    if secret.is_empty() {
        return Err(ConfigError::File {
            path: path.display().to_string(),
            message: "the notification secret is empty".into(),
        });
    }
    Ok(secret)
}

/// Notifications that have failed at least one attempt and are still
/// being retried (`docs/notifications.md`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Undelivered {
    pub count: u64,
    /// When the oldest of them was raised.
    pub oldest_at: String,
    /// The one tried most: its event, target and why it last failed.
    pub event: String,
    pub target: String,
    pub last_error: String,
}

/// `harvestd_notifications_total{event,outcome}` and the waiting gauge.
#[derive(Default)]
struct Stats {
    outcomes: Mutex<BTreeMap<(String, &'static str), u64>>,
    waiting: AtomicU64,
    /// What `status` shows of the failing ones, as of the sender's last look.
    undelivered: Mutex<Option<Undelivered>>,
}

impl Stats {
    fn count(&self, event: &str, outcome: &'static str) {
        let mut o = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        *o.entry((event.to_string(), outcome)).or_default() += 1;
    }
}

/// The daemon's notifications: raise events, send them.
pub struct Notifier {
    targets: Vec<Arc<Target>>,
    store: Store,
    client: reqwest::Client,
    wake: tokio::sync::Notify,
    /// Told after each attempt ends, for [`drain`](Self::drain).
    progress: tokio::sync::Notify,
    stats: Stats,
}

impl Notifier {
    /// Reads the targets (and their secret files) from the configuration.
    pub fn new(config: &[NotifyConfig], store: Store) -> Result<Arc<Notifier>, ConfigError> {
        let targets = config
            .iter()
            .enumerate()
            .map(|(i, c)| Target::from_config(i, c).map(Arc::new))
            .collect::<Result<_, _>>()?;
        // No redirects: a 3xx is not a delivery, and following one would
        // turn the POST into a GET somewhere else.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Ok(Arc::new(Notifier {
            targets,
            store,
            client,
            wake: tokio::sync::Notify::new(),
            progress: tokio::sync::Notify::new(),
            stats: Stats::default(),
        }))
    }

    /// A notifier with no target: raising does nothing.
    pub fn none(store: Store) -> Arc<Notifier> {
        Arc::new(Notifier {
            targets: Vec::new(),
            store,
            client: reqwest::Client::new(),
            wake: tokio::sync::Notify::new(),
            progress: tokio::sync::Notify::new(),
            stats: Stats::default(),
        })
    }

    /// Stores `event` for every target that wants it and wakes the sender.
    /// Never fails its caller: an event that cannot be stored is logged at
    /// error level (the store failing will stop the daemon soon anyway).
    pub fn raise(&self, event: &Event) {
        let wanting: Vec<&Arc<Target>> = self
            .targets
            .iter()
            .filter(|t| t.wants(event.event))
            .collect();
        if wanting.is_empty() {
            return;
        }
        let now = crate::clock::now_ms();
        let id = event.id();
        let body = event.body(&id, now);
        for target in wanting {
            let waiting = self.store.outbox_len().unwrap_or(0);
            if waiting >= MAX_WAITING {
                error!(event = event.event, id, target = %target.label, waiting,
                    "notification dropped: the outbox is full");
                self.stats.count(event.event, "dropped");
                continue;
            }
            let record = OutboxRecord::new(
                id.clone(),
                event.event.to_string(),
                target.id.clone(),
                body.clone(),
                now,
            );
            if let Err(e) = self.store.outbox_add(&record) {
                error!(event = event.event, id, error = %e, "notification lost: cannot store it");
            }
        }
        self.wake.notify_one();
    }

    /// Waits until nothing is waiting, or `grace` has passed (`run --once`
    /// gives its last run's events this long before it exits); returns how
    /// many are still waiting, which the next start sends.
    pub async fn drain(&self, grace: Duration) -> usize {
        if self.targets.is_empty() {
            return 0;
        }
        let left = || self.store.outbox_len().unwrap_or(0);
        let _ = tokio::time::timeout(grace, async {
            loop {
                let told = self.progress.notified();
                tokio::pin!(told);
                told.as_mut().enable();
                if left() == 0 {
                    return;
                }
                told.await;
            }
        })
        .await;
        left()
    }

    /// Sends what is waiting until `stop`. Attempts under way when it comes
    /// are abandoned; they are sent again at the next start.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let now = crate::clock::now_ms();
        let _ = self
            .store
            .notified_prune(now.saturating_sub(crate::clock::millis(REMEMBER)));
        let mut under_way: HashSet<(String, String)> = HashSet::new();
        let mut attempts: JoinSet<(OutboxRecord, Result<(), String>)> = JoinSet::new();
        loop {
            let next = self.start_due(&mut under_way, &mut attempts).await;
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep(crate::clock::until(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => {}
                Some(done) = attempts.join_next(), if !attempts.is_empty() => {
                    if let Ok((record, result)) = done {
                        under_way.remove(&(record.id.clone(), record.target.clone()));
                        self.finished(record, result);
                    }
                    self.progress.notify_waiters();
                }
                _ = sleep => {}
            }
        }
    }

    /// Starts the attempts that are due; returns when the next one is.
    async fn start_due(
        self: &Arc<Self>,
        under_way: &mut HashSet<(String, String)>,
        attempts: &mut JoinSet<(OutboxRecord, Result<(), String>)>,
    ) -> Option<UnixMs> {
        let (waiting, bad) = match self.store.outbox() {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "cannot read the notification outbox");
                return Some(crate::clock::now_ms() + 5_000);
            }
        };
        for e in bad {
            error!(error = %e, "a notification in the outbox cannot be read; it is skipped");
        }
        self.stats
            .waiting
            .store(waiting.len() as u64, Ordering::Relaxed);
        *self
            .stats
            .undelivered
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = self.undelivered_of(&waiting);
        let now = crate::clock::now_ms();
        // An event is durable before its first attempt.
        if waiting.iter().any(|r| r.attempts == 0) {
            if let Err(e) = self.store.flush().await {
                error!(error = %e, "cannot flush the notification outbox");
                return Some(now + 5_000);
            }
        }
        let mut next: Option<UnixMs> = None;
        for record in waiting {
            let key = (record.id.clone(), record.target.clone());
            if under_way.contains(&key) {
                continue;
            }
            let Some(target) = self.targets.iter().find(|t| t.id == record.target).cloned() else {
                warn!(
                    event = record.event,
                    id = record.id,
                    "notification dropped: its target is no longer configured"
                );
                self.stats.count(&record.event, "dropped");
                let _ = self.store.outbox_done(&record, now);
                continue;
            };
            if crate::clock::between(record.first_at, now) > GIVE_UP_AFTER {
                error!(event = record.event, id = record.id, target = %target.label,
                    attempts = record.attempts, last_error = record.last_error.as_deref().unwrap_or(""),
                    "notification dropped: not delivered in 24 hours");
                self.stats.count(&record.event, "dropped");
                let _ = self.store.outbox_done(&record, now);
                continue;
            }
            if record.next_at > now || under_way.len() >= AT_ONCE {
                let at = record.next_at.max(now + 50);
                next = Some(next.map_or(at, |n| n.min(at)));
                continue;
            }
            under_way.insert(key);
            let client = self.client.clone();
            attempts.spawn(async move {
                let result = attempt(&client, &target, &record).await;
                (record, result)
            });
        }
        next
    }

    /// The waiting notifications that have failed an attempt, summed up.
    fn undelivered_of(&self, waiting: &[OutboxRecord]) -> Option<Undelivered> {
        let now = crate::clock::now_ms();
        // Those about to be dropped (past 24 h, or their target gone) are
        // not shown: nothing would take them off again.
        let failing: Vec<&OutboxRecord> = waiting
            .iter()
            .filter(|r| {
                r.attempts > 0
                    && self.targets.iter().any(|t| t.id == r.target)
                    && crate::clock::between(r.first_at, now) <= GIVE_UP_AFTER
            })
            .collect();
        let oldest = failing.iter().map(|r| r.first_at).min()?;
        let last = failing.iter().max_by_key(|r| (r.attempts, r.next_at))?;
        let target = self
            .targets
            .iter()
            .find(|t| t.id == last.target)
            .map_or("?", |t| t.label.as_str());
        Some(Undelivered {
            count: failing.len() as u64,
            oldest_at: crate::clock::timestamp(oldest),
            event: last.event.clone(),
            target: target.to_string(),
            last_error: last.last_error.clone().unwrap_or_default(),
        })
    }

    /// Notifications tried and not delivered yet, for `status`.
    pub fn undelivered(&self) -> Option<Undelivered> {
        self.stats
            .undelivered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn finished(&self, mut record: OutboxRecord, result: Result<(), String>) {
        let now = crate::clock::now_ms();
        let label = self
            .targets
            .iter()
            .find(|t| t.id == record.target)
            .map_or("?", |t| t.label.as_str());
        match result {
            Ok(()) => {
                info!(
                    event = record.event,
                    id = record.id,
                    target = label,
                    "notification delivered"
                );
                self.stats.count(&record.event, "delivered");
                if let Err(e) = self.store.outbox_done(&record, now) {
                    error!(error = %e, "cannot record a delivered notification; it may be sent again");
                }
            }
            Err(why) => {
                let wait = crate::limits::backoff(
                    record.attempts,
                    BACKOFF_BASE,
                    BACKOFF_CAP,
                    crate::limits::jitter(),
                );
                record.attempts += 1;
                record.next_at = now.saturating_add(crate::clock::millis(wait));
                // `status` shows it from now on, before the log says so;
                // the sender's next look recounts them all.
                {
                    let mut shown = self
                        .stats
                        .undelivered
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    let u = shown.get_or_insert_with(|| Undelivered {
                        oldest_at: crate::clock::timestamp(record.first_at),
                        ..Undelivered::default()
                    });
                    if record.attempts == 1 {
                        u.count += 1;
                    }
                    u.event = record.event.clone();
                    u.target = label.to_string();
                    u.last_error = why.clone();
                }
                warn!(event = record.event, id = record.id, target = label,
                    attempt = record.attempts, error = %why, retry_in = ?wait,
                    "notification not delivered; will retry");
                record.last_error = Some(why);
                self.stats.count(&record.event, "failed");
                if let Err(e) = self.store.outbox_update(&record) {
                    error!(error = %e, "cannot record a failed notification attempt");
                }
            }
        }
    }

    /// Appends the notification metrics in the Prometheus text format.
    /// Attempts by (event, outcome), and how many wait to be delivered,
    /// for `/metrics`.
    pub fn figures(&self) -> (BTreeMap<(String, &'static str), u64>, u64) {
        let outcomes = self
            .stats
            .outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (outcomes, self.stats.waiting.load(Ordering::Relaxed))
    }

    /// Raises `provider.blocked` each time `provider` becomes blocked after
    /// start (a block present at start, such as a provider without a
    /// token, is the configuration's and is not an event).
    pub async fn watch_blocks(
        self: Arc<Self>,
        provider: &'static str,
        mut blocked: tokio::sync::watch::Receiver<Option<crate::limits::Block>>,
        stop: CancellationToken,
    ) {
        let mut was = blocked.borrow_and_update().is_some();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = blocked.changed() => if changed.is_err() { return },
            }
            let now = blocked.borrow_and_update().clone();
            if let (false, Some(block)) = (was, &now) {
                self.raise(&Event {
                    event: "provider.blocked",
                    job: None,
                    run_id: None,
                    state: None,
                    summary: format!("{provider} is blocked: {}", block.reason),
                    counts: None,
                    occurrence: format!("{provider}/{}", crate::clock::now_ms()),
                });
            }
            was = now.is_some();
        }
    }
}

/// One attempt to deliver `record` to `target`.
async fn attempt(
    client: &reqwest::Client,
    target: &Target,
    record: &OutboxRecord,
) -> Result<(), String> {
    let body = match target.format {
        NotifyFormat::Json => record.body.to_string(),
        NotifyFormat::Slack => json!({ "text": slack_text(&record.body) }).to_string(),
    };
    match &target.to {
        Destination::Url(url) => {
            let mut request = client
                .post(url.clone())
                .timeout(target.timeout)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("X-Harvestd-Event", &record.event)
                .header("X-Harvestd-Id", &record.id);
            if let Some(secret) = &target.secret {
                request =
                    request.header("X-Harvestd-Signature", signature(secret, body.as_bytes()));
            }
            // reqwest's errors quote the URL, which may be a secret.
            let answer = request
                .body(body)
                .send()
                .await
                .map_err(|e| e.without_url().to_string())?;
            let status = answer.status();
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("answered {status}"))
            }
        }
        Destination::Command(argv) => run_command(argv, target.timeout, record, body).await,
    }
}

/// `sha256=<hex HMAC-SHA256 of the body>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn slack_text(body: &Value) -> String {
    let mut text = format!(
        "harvestd: {} — {}",
        body["event"].as_str().unwrap_or("event"),
        body["summary"].as_str().unwrap_or("")
    );
    if let Some(run) = body["run_id"].as_str() {
        text.push_str(&format!(" (run {run})"));
    }
    text
}

async fn run_command(
    argv: &[String],
    timeout: Duration,
    record: &OutboxRecord,
    body: String,
) -> Result<(), String> {
    let field = |k: &str| record.body[k].as_str().unwrap_or("").to_string();
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .env("HARVESTD_EVENT", &record.event)
        .env("HARVESTD_JOB", field("job"))
        .env("HARVESTD_RUN_ID", field("run_id"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", argv[0]))?;
    let stdin = child.stdin.take();
    let stderr = child.stderr.take();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A command that does not read its input is its own business.
            let _ = stdin.write_all(body.as_bytes()).await;
        }
    };
    let read_err = async move {
        let mut kept = Vec::new();
        if let Some(mut err) = stderr {
            let _ = (&mut err).take(STDERR_KEPT).read_to_end(&mut kept).await;
            let _ = tokio::io::copy(&mut err, &mut tokio::io::sink()).await;
        }
        kept
    };
    let finished = tokio::time::timeout(timeout, async {
        let ((), status, kept) = tokio::join!(feed, child.wait(), read_err);
        (status, kept)
    })
    .await;
    match finished {
        Err(_) => {
            let _ = child.start_kill();
            Err(format!(
                "killed after {}",
                humantime::format_duration(timeout)
            ))
        }
        Ok((Err(e), _)) => Err(format!("cannot wait for {}: {e}", argv[0])),
        Ok((Ok(status), _)) if status.success() => Ok(()),
        Ok((Ok(status), kept)) => {
            let text = String::from_utf8_lossy(&kept);
            let last = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            Err(format!(
                "{status}: {}",
                last.chars().take(300).collect::<String>()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_rfc_4231s_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn an_occurrence_has_one_id_and_another_occurrence_another() {
        let e = Event {
            event: "run.failed",
            job: Some("j".into()),
            run_id: Some("r".into()),
            state: Some("failed".into()),
            summary: "s".into(),
            counts: None,
            occurrence: "1".into(),
        };
        let again = Event {
            summary: "other words".into(),
            ..e.clone()
        };
        assert_eq!(e.id(), again.id());
        let later = Event {
            occurrence: "2".into(),
            ..e.clone()
        };
        assert_ne!(e.id(), later.id());
        assert_eq!(e.id().len(), 32);
    }

    #[test]
    fn targets_want_every_event_but_run_complete_unless_told() {
        let config = |events: Option<Vec<&str>>| NotifyConfig {
            url: Some("https://hooks.example.com/T0/B0/secretpath".into()),
            command: None,
            events: events.map(|e| e.into_iter().map(String::from).collect()),
            format: NotifyFormat::Json,
            secret_file: None,
            timeout: Duration::from_secs(1),
        };
        let all = Target::from_config(0, &config(None)).unwrap();
        assert!(all.wants("run.failed") && all.wants("provider.blocked"));
        assert!(!all.wants("run.complete"));
        assert!(!all.label.contains("secretpath"), "{}", all.label);
        let some = Target::from_config(1, &config(Some(vec!["run.complete"]))).unwrap();
        assert!(some.wants("run.complete") && !some.wants("run.failed"));
    }
}
