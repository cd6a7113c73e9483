//! Provider etiquette (`docs/limits.md`): per-key in-flight caps and trigger pacing,
//! per-provider request rate, the provider-wide 429 brake and blocks, and the
//! pure timing functions (backoff, poll interval).

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::RngExt;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::clock::UnixMs;
use crate::config::LimitsConfig;

/// Exponential backoff with full jitter: uniform in `[0, min(cap, base·2^attempt)]`.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let exp = base.saturating_mul(2u32.saturating_pow(attempt.min(30)));
    exp.min(cap).mul_f64(unit.clamp(0.0, 1.0))
}

/// How long to wait before the next status poll of a collection that has
/// been building for `waited`: a tenth of it, within `[min, max]`, with
/// ±10 % jitter (`unit` in `[0, 1]`), never below `min` (`docs/limits.md`).
///
/// `expected`: the key's shortest recent build, when known. Until 90 % of
/// it has passed the answer is almost surely "building", so the wait runs
/// to that point (still never past `max`) instead of a tenth at a time;
/// after it the tenth rule holds. A 5-minute build then takes ~7 polls
/// instead of ~29, and a shorter build than expected is noticed at most
/// `max` late (issue #7, `cargo bench --bench polling`).
pub fn poll_interval(
    waited: Duration,
    min: Duration,
    max: Duration,
    expected: Option<Duration>,
    unit: f64,
) -> Duration {
    let mut base = (waited / 10).clamp(min, max);
    if let Some(expected) = expected {
        let until_likely = expected.mul_f64(0.9).saturating_sub(waited);
        base = base.max(until_likely.min(max));
    }
    base.mul_f64(0.9 + 0.2 * unit.clamp(0.0, 1.0)).max(min)
}

/// A random number in `[0, 1)` for the functions above.
pub fn jitter() -> f64 {
    rand::rng().random()
}

/// Counts collections in flight for one key. Unlike a semaphore it can be
/// entered past its cap, for collections already in flight when the daemon
/// starts: they are polled whatever the (possibly lowered) cap says, and new
/// triggers wait until the count is back under it.
pub struct InFlight {
    state: Mutex<(u32, u32)>, // (in flight, cap)
    changed: Notify,
}

/// Releases its place in [`InFlight`] when dropped.
pub struct InFlightPermit {
    owner: Arc<InFlight>,
}

impl Drop for InFlightPermit {
    fn drop(&mut self) {
        if let Ok(mut s) = self.owner.state.lock() {
            s.0 = s.0.saturating_sub(1);
        }
        self.owner.changed.notify_waiters();
    }
}

impl InFlight {
    pub fn new(cap: u32) -> Arc<InFlight> {
        Arc::new(InFlight {
            state: Mutex::new((0, cap.max(1))),
            changed: Notify::new(),
        })
    }

    pub fn count(&self) -> u32 {
        self.state.lock().map(|s| s.0).unwrap_or(0)
    }

    pub fn set_cap(&self, cap: u32) {
        if let Ok(mut s) = self.state.lock() {
            s.1 = cap.max(1);
        }
        self.changed.notify_waiters();
    }

    /// Waits for a place under the cap.
    pub async fn acquire(self: &Arc<Self>) -> InFlightPermit {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Ok(mut s) = self.state.lock() {
                if s.0 < s.1 {
                    s.0 += 1;
                    return InFlightPermit {
                        owner: self.clone(),
                    };
                }
            }
            notified.await;
        }
    }

    /// Takes a place even over the cap (a collection already in flight).
    pub fn enter(self: &Arc<Self>) -> InFlightPermit {
        if let Ok(mut s) = self.state.lock() {
            s.0 += 1;
        }
        InFlightPermit {
            owner: self.clone(),
        }
    }
}

/// Limits of one key (collector, dataset, account).
pub struct KeyLimits {
    pub in_flight: Arc<InFlight>,
    /// Triggers are spaced evenly, `period` apart (a cell rate with burst 1),
    /// so no 60-second window ever holds more than `triggers_per_minute`,
    /// whatever the window's start. This is kept on tokio's clock rather than
    /// governor's so it can be seeded from the store after a restart and
    /// tested with a paused clock.
    period: Mutex<Duration>,
    next_slot: Mutex<Instant>,
    /// The shortest recent build for this key (trigger → seen ready), from
    /// the store: see [`poll_interval`].
    expected_build: Mutex<Option<Duration>>,
}

impl KeyLimits {
    pub fn expected_build(&self) -> Option<Duration> {
        *self
            .expected_build
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// `samples`: the key's recent build times in ms (the store keeps them).
    pub fn learn_builds(&self, samples: &[u64]) {
        *self
            .expected_build
            .lock()
            .unwrap_or_else(|e| e.into_inner()) =
            samples.iter().min().map(|&ms| Duration::from_millis(ms));
    }

    /// Waits until a trigger may be sent; the slot is taken on return.
    pub async fn trigger_slot(&self) {
        tokio::time::sleep_until(self.reserve_trigger_slot()).await;
    }

    /// Takes the next trigger slot now and says when it comes.
    pub fn reserve_trigger_slot(&self) -> Instant {
        let mut next = self.next_slot.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (*next).max(Instant::now());
        *next = slot + *self.period.lock().unwrap_or_else(|e| e.into_inner());
        slot
    }
}

/// Per-key limits, created on first use, shared by every job using the key.
pub struct KeyedLimits {
    config: Mutex<LimitsConfig>,
    keys: Mutex<HashMap<String, Arc<KeyLimits>>>,
}

impl KeyedLimits {
    pub fn new(config: LimitsConfig) -> Self {
        KeyedLimits {
            config: Mutex::new(config),
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// `last_trigger_ago`: how long ago the last trigger for this key was
    /// sent (from the store), so pacing holds across a restart.
    pub fn key(&self, key: &str, last_trigger_ago: Option<Duration>) -> Arc<KeyLimits> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = keys.get(key) {
            return k.clone();
        }
        let config = self.config.lock().unwrap_or_else(|e| e.into_inner());
        let per_minute = config.triggers_per_minute(key);
        let period = Duration::from_secs(60) / per_minute.max(1);
        let not_before = match last_trigger_ago {
            Some(ago) if ago < period => Instant::now() + (period - ago),
            _ => Instant::now(),
        };
        let limits = Arc::new(KeyLimits {
            in_flight: InFlight::new(config.max_in_flight(key)),
            period: Mutex::new(period),
            next_slot: Mutex::new(not_before),
            expected_build: Mutex::new(None),
        });
        keys.insert(key.to_string(), limits.clone());
        limits
    }

    /// New caps and trigger rates for every key (SIGHUP); collections in
    /// flight keep their places, new triggers follow the new limits.
    pub fn reconfigure(&self, config: LimitsConfig) {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        for (key, limits) in keys.iter() {
            limits.in_flight.set_cap(config.max_in_flight(key));
            *limits.period.lock().unwrap_or_else(|e| e.into_inner()) =
                Duration::from_secs(60) / config.triggers_per_minute(key).max(1);
        }
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
    }

    /// In-flight counts per key, for metrics and status.
    pub fn in_flight(&self) -> Vec<(String, u32)> {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = keys
            .iter()
            .map(|(k, l)| (k.clone(), l.in_flight.count()))
            .collect();
        v.sort();
        v
    }
}

/// Why a provider takes no calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub reason: String,
}

/// Why a provider's calls wait, until when (see [`ProviderGate::paused`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    pub left: Duration,
    pub reason: String,
}

struct GateState {
    pause_until: Instant,
    /// Why calls wait until `pause_until`.
    pause_reason: String,
    recent_429: VecDeque<Instant>,
    brake_level: u32,
    total_429: u64,
}

/// How much of the request rate may go out at once; the worker starts
/// polls due within this long of each other together, so that they fit
/// in one burst.
pub const BURST_WINDOW: Duration = Duration::from_millis(50);

/// Calls that may go out at once: `BURST_WINDOW` of requests, at least 1.
fn request_burst(rps: u32) -> u32 {
    let window_ms = BURST_WINDOW.as_millis() as u64;
    (u64::from(rps) * window_ms / 1000).max(1) as u32
}

/// The request rate: bursts of [`request_burst`], refilled at
/// `rps - burst + 1` a second, so that no second, wherever it starts,
/// holds more than `rps` calls (the burst, then one call every `1 / rate`
/// for the rest of the second). Polls that come due close together then
/// go out in one wake-up of the worker instead of one each, 5 ms apart: a
/// wake-up is most of what a poll costs.
fn request_quota(rps: u32) -> Quota {
    let burst = request_burst(rps.max(1));
    Quota::with_period(request_period(rps))
        .unwrap_or_else(|| Quota::per_second(request_rate(rps)))
        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
}

/// The request rate's refill rate: `rps - burst + 1` a second (see
/// [`request_quota`]).
fn request_rate(rps: u32) -> NonZeroU32 {
    let rps = rps.max(1);
    NonZeroU32::new(rps - request_burst(rps) + 1).unwrap_or(NonZeroU32::MIN)
}

/// One call's worth of refill, rounded up: `Quota::per_second(19)` rounds
/// 1/19 s down, and 19 periods then fit in less than a second, which lets a
/// 20th call in.
fn request_period(rps: u32) -> Duration {
    Duration::from_nanos(1_000_000_000u64.div_ceil(u64::from(request_rate(rps).get())))
}

/// How much longer than the next free slot a caller waits for the rate:
/// until half a burst has refilled, so that the callers queued behind it go
/// out in the same wake-up of the worker. Waiting for each slot alone let a
/// backlog out 5 ms apart at 200 requests a second, a timer wake-up per
/// call; the rate is the same either way, since the refill accumulates
/// while they wait.
fn group_wait(rps: u32) -> Duration {
    let group = (request_burst(rps.max(1)) / 2).max(1);
    request_period(rps) * (group - 1)
}

/// Every call to one provider passes here: the request rate, pauses after
/// 429, the brake, and blocks (401/402/403, no token).
pub struct ProviderGate {
    rate: DefaultDirectRateLimiter,
    /// See [`group_wait`].
    group_wait: Duration,
    /// Callers wait for the rate one at a time, in arrival order. governor's
    /// own wait wakes every waiter at each free slot: with 10,000 polls
    /// queued at 5 per second that is 50,000 wake-ups a second for 5 calls.
    turn: tokio::sync::Mutex<()>,
    clock: governor::clock::DefaultClock,
    state: Mutex<GateState>,
    blocked: watch::Sender<Option<Block>>,
    config: Mutex<LimitsConfig>,
    /// The provider's clock minus ours (ms), from the `Date` header of its
    /// latest answer to any API of the account: deletion happens on the
    /// provider's clock, so expiry is judged on it.
    clock_offset: AtomicI64,
}

impl ProviderGate {
    pub fn new(config: &LimitsConfig) -> Arc<ProviderGate> {
        Arc::new(ProviderGate {
            rate: RateLimiter::direct(request_quota(config.requests_per_second)),
            group_wait: group_wait(config.requests_per_second),
            turn: tokio::sync::Mutex::new(()),
            clock: governor::clock::DefaultClock::default(),
            state: Mutex::new(GateState {
                pause_until: Instant::now(),
                pause_reason: String::new(),
                recent_429: VecDeque::new(),
                brake_level: 0,
                total_429: 0,
            }),
            blocked: watch::channel(None).0,
            config: Mutex::new(config.clone()),
            clock_offset: AtomicI64::new(0),
        })
    }

    /// Now on the provider's clock, as its latest answer told it (ours
    /// until it has answered).
    pub fn provider_now(&self) -> UnixMs {
        crate::clock::now_ms().saturating_add(self.clock_offset.load(Ordering::Relaxed))
    }

    /// Notes the provider's clock (`theirs`, from an answer's `Date`).
    pub fn note_provider_clock(&self, theirs: UnixMs) {
        let offset = theirs.saturating_sub(crate::clock::now_ms());
        self.clock_offset.store(offset, Ordering::Relaxed);
    }

    /// The limits in force (SIGHUP replaces them).
    pub fn config(&self) -> LimitsConfig {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// New brake and block settings (SIGHUP). The request rate is fixed at
    /// start: changing `requests_per_second` needs a restart.
    pub fn reconfigure(&self, config: &LimitsConfig) {
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = config.clone();
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until a call may be sent: after any pause, within the rate,
    /// first come first served (tokio's mutex is fair).
    pub async fn admit(&self) {
        let _turn = self.turn.lock().await;
        loop {
            let until = self.state().pause_until;
            if until > Instant::now() {
                tokio::time::sleep_until(until).await;
                continue;
            }
            // governor's own `until_ready` sleeps on the futures-timer
            // crate's thread: a cross-thread wake-up per call, 17 % of the
            // daemon's CPU polling 10,000 collections. tokio's timer instead.
            while let Err(not_until) = self.rate.check() {
                // Same source as the limiter's clock (quanta's calibrated
                // counter); any difference is re-checked by `check`.
                let now = governor::clock::Clock::now(&self.clock);
                tokio::time::sleep(not_until.wait_time_from(now) + self.group_wait).await;
            }
            // A 429 may have arrived while this call waited for the rate.
            if self.state().pause_until <= Instant::now() {
                return;
            }
        }
    }

    /// Records a 429. `wait` is what the provider asked for, if anything:
    /// never more than `retry_after_cap` is waited (a provider's value must
    /// not pause the daemon for years, nor overflow a clock). Returns the
    /// pause now in force.
    pub fn rate_limited(&self, wait: Option<Duration>) -> Duration {
        let now = Instant::now();
        let config = self.config();
        let asked = wait;
        let wait = wait.map(|w| w.min(config.retry_after_cap));
        let mut s = self.state();
        s.total_429 += 1;
        s.recent_429.push_back(now);
        let window = config.brake_window;
        while s
            .recent_429
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            s.recent_429.pop_front();
        }
        let mut pause = wait.unwrap_or(config.rate_limit_pause);
        let mut reason = match asked {
            Some(a) if a > config.retry_after_cap => format!(
                "429: the provider asked to wait {}s; waiting limits.retry_after_cap ({}) instead",
                a.as_secs(),
                humantime::format_duration(config.retry_after_cap)
            ),
            Some(a) => format!("429: the provider asked to wait {}s", a.as_secs()),
            None => "429 naming no wait".to_string(),
        };
        if s.recent_429.len() as u32 >= config.brake_after_429 {
            let brake = config
                .brake_pause
                .saturating_mul(2u32.saturating_pow(s.brake_level.min(16)))
                .min(config.brake_pause_max);
            s.brake_level += 1;
            s.recent_429.clear();
            tracing::warn!(pause = ?brake, "provider brake: repeated 429 answers, pausing every call");
            if brake > pause {
                pause = brake;
                reason = format!(
                    "429 brake: {} answers 429 within {}",
                    config.brake_after_429,
                    humantime::format_duration(config.brake_window)
                );
            }
        }
        // `Instant + Duration` panics on overflow; the cap keeps the pause
        // small, and even a clock near its end cannot panic here.
        let until = now.checked_add(pause).unwrap_or(now);
        if until > s.pause_until {
            s.pause_until = until;
            s.pause_reason = reason;
        }
        s.pause_until.saturating_duration_since(now)
    }

    /// The pause in force, if any, and why (shown by `status`).
    pub fn paused(&self) -> Option<Pause> {
        let s = self.state();
        let left = s.pause_until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then(|| Pause {
            left,
            reason: s.pause_reason.clone(),
        })
    }

    /// A successful call lowers the brake again.
    pub fn succeeded(&self) {
        let mut s = self.state();
        if s.brake_level > 0 && s.recent_429.is_empty() {
            s.brake_level -= 1;
        }
    }

    pub fn total_429(&self) -> u64 {
        self.state().total_429
    }

    pub fn block(&self, reason: String) {
        self.blocked.send_replace(Some(Block { reason }));
    }

    pub fn unblock(&self) {
        self.blocked.send_replace(None);
    }

    /// Told each time the provider is blocked or unblocked.
    pub fn watch_blocked(&self) -> watch::Receiver<Option<Block>> {
        self.blocked.subscribe()
    }

    pub fn blocked(&self) -> Option<Block> {
        self.blocked.borrow().clone()
    }

    /// Waits until the provider is unblocked, or `blocked_retry` has passed
    /// (then one call may probe whether the block still holds).
    pub async fn wait_unblocked(&self) {
        let mut rx = self.blocked.subscribe();
        let probe = tokio::time::sleep(self.config().blocked_retry);
        tokio::pin!(probe);
        loop {
            if rx.borrow_and_update().is_none() {
                return;
            }
            tokio::select! {
                _ = &mut probe => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls due together go out at once (a twentieth of the rate), a
    /// backlog goes out in groups (half of that) rather than one call per
    /// wake-up, and a caller that sends as fast as the gate lets it never
    /// gets more than `requests_per_second` calls into any second, wherever
    /// it starts.
    #[test]
    fn request_rate_bursts_but_no_second_holds_more_than_the_limit() {
        use governor::clock::{Clock, FakeRelativeClock};
        for rps in [1, 5, 19, 20, 100, 200, 2000] {
            let clock = FakeRelativeClock::default();
            let limiter = RateLimiter::direct_with_clock(request_quota(rps), clock.clone());
            let burst = request_burst(rps) as usize;
            let mut sent = Vec::new();
            while sent.len() < 3 * rps as usize + burst {
                match limiter.check() {
                    Ok(()) => sent.push(Duration::from(clock.now())),
                    // What `ProviderGate::admit` waits.
                    Err(not_until) => {
                        clock.advance(not_until.wait_time_from(clock.now()) + group_wait(rps))
                    }
                }
            }
            assert!(
                sent[burst - 1] == sent[0],
                "rps {rps}: the first {burst} calls go out at once: {:?}",
                &sent[..burst]
            );
            let group = (burst / 2).max(1);
            let mut wake_ups = sent[burst..].to_vec();
            wake_ups.dedup();
            assert!(
                wake_ups.len() <= (sent.len() - burst).div_ceil(group),
                "rps {rps}: the backlog goes out {group} at a time: {:?}",
                &sent[burst..burst + 3 * group]
            );
            for (i, start) in sent.iter().enumerate() {
                let in_second = sent[i..]
                    .iter()
                    .take_while(|t| **t < *start + Duration::from_secs(1))
                    .count();
                assert!(
                    in_second <= rps as usize,
                    "rps {rps}: {in_second} calls in the second from {start:?}"
                );
            }
            // The limit is not wasted: sustained, at least 95 % of it.
            let sustained = sent
                .iter()
                .filter(|t| (Duration::from_secs(1)..Duration::from_secs(3)).contains(*t))
                .count();
            assert!(
                sustained as f64 >= 0.95 * 2.0 * f64::from(rps),
                "rps {rps}: {sustained} calls in 2 s"
            );
        }
    }

    proptest::proptest! {
        /// No wait a provider asks for, however large, panics the gate or
        /// pauses it past `retry_after_cap` (or the brake); and backoff and
        /// poll intervals stay within their bounds for any input.
        #[test]
        fn provider_waits_never_overflow_and_stay_capped(
            secs in proptest::prelude::any::<u64>(),
            nanos in 0u32..1_000_000_000,
            attempt in proptest::prelude::any::<u32>(),
            waited in proptest::prelude::any::<u64>(),
            unit in proptest::prelude::any::<f64>(),
        ) {
            let config = LimitsConfig::default();
            let gate = ProviderGate::new(&config);
            let asked = Duration::new(secs, nanos);
            let pause = gate.rate_limited(Some(asked));
            let most = config.retry_after_cap.max(config.brake_pause_max);
            proptest::prop_assert!(pause <= most, "{pause:?}");
            let shown = gate.paused().map(|p| p.left).unwrap_or_default();
            proptest::prop_assert!(shown <= most);
            let b = backoff(attempt, config.backoff_base, config.backoff_cap, unit);
            proptest::prop_assert!(b <= config.backoff_cap);
            let p = poll_interval(
                Duration::from_millis(waited),
                config.poll_min_interval,
                config.poll_max_interval,
                Some(Duration::from_millis(waited)),
                unit,
            );
            proptest::prop_assert!(p >= config.poll_min_interval);
            proptest::prop_assert!(p <= config.poll_max_interval.mul_f64(1.1));
        }
    }

    #[test]
    fn backoff_is_bounded_full_jitter() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(60);
        assert_eq!(backoff(0, base, cap, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(3, base, cap, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(10, base, cap, 1.0), cap);
        assert_eq!(backoff(u32::MAX, base, cap, 0.5), Duration::from_secs(30));
        assert_eq!(backoff(5, base, cap, 0.0), Duration::ZERO);
    }

    #[test]
    fn poll_interval_grows_with_waiting_within_bounds() {
        let min = Duration::from_secs(5);
        let max = Duration::from_secs(60);
        let secs = Duration::from_secs;
        assert_eq!(poll_interval(Duration::ZERO, min, max, None, 0.5), min);
        assert_eq!(poll_interval(secs(300), min, max, None, 0.5), secs(30));
        assert_eq!(poll_interval(secs(3600), min, max, None, 0.5), max);
        // Jitter never goes below the floor.
        assert_eq!(poll_interval(Duration::ZERO, min, max, None, 0.0), min);
        assert!(poll_interval(secs(3600), min, max, None, 1.0) <= max.mul_f64(1.1));
    }

    #[test]
    fn a_known_build_time_skips_polls_before_it_but_never_past_the_cap() {
        let (min, max) = (Duration::from_secs(5), Duration::from_secs(60));
        let secs = Duration::from_secs;
        let expected = Some(secs(300));
        // Long before 90 % of 300 s: the cap, not 5 s.
        assert_eq!(poll_interval(secs(0), min, max, expected, 0.5), max);
        // 240 s in: wait until 270 s.
        assert_eq!(poll_interval(secs(240), min, max, expected, 0.5), secs(30));
        // Past 270 s, the tenth rule again: 27 s at 270 s, 35 s at 350 s.
        assert_eq!(poll_interval(secs(270), min, max, expected, 0.5), secs(27));
        assert_eq!(poll_interval(secs(350), min, max, expected, 0.5), secs(35));
        // A short expected build changes nothing: the floor and tenth rule hold.
        assert_eq!(poll_interval(secs(0), min, max, Some(secs(3)), 0.5), min);
        // A polled 5-minute build: 7 polls, against 29 without the estimate.
        let polls = |expected| {
            let (mut t, mut n) = (Duration::ZERO, 0);
            while t < secs(300) {
                t += poll_interval(t, min, max, expected, 0.5);
                n += 1;
            }
            (n, t - secs(300))
        };
        let (learned, late) = polls(expected);
        assert_eq!((polls(None).0, learned), (29, 7));
        assert!(late <= secs(30), "seen {late:?} after it was ready");
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_cap_holds_and_resumed_collections_enter_over_it() {
        let f = InFlight::new(2);
        let a = f.acquire().await;
        let _b = f.acquire().await;
        let _resumed = f.enter();
        assert_eq!(f.count(), 3);
        let waiter = {
            let f = f.clone();
            #[allow(clippy::disallowed_methods)]
            let waiter = tokio::spawn(async move { f.acquire().await });
            waiter
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::task::yield_now().await;
        // Still 2 in flight (b, resumed) = cap: the waiter must keep waiting.
        assert!(!waiter.is_finished());
        drop(_resumed);
        let _c = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f.count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn brake_engages_after_repeated_429s_and_doubles() {
        let config = LimitsConfig {
            brake_after_429: 3,
            brake_pause: Duration::from_secs(60),
            brake_pause_max: Duration::from_secs(600),
            ..LimitsConfig::default()
        };
        let gate = ProviderGate::new(&config);
        assert_eq!(
            gate.rate_limited(Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        gate.rate_limited(None);
        assert_eq!(
            gate.rate_limited(Some(Duration::from_secs(2))),
            Duration::from_secs(60)
        );
        for _ in 0..2 {
            gate.rate_limited(None);
        }
        assert_eq!(gate.rate_limited(None), Duration::from_secs(120));
        let start = Instant::now();
        gate.admit().await;
        assert!(start.elapsed() >= Duration::from_secs(120));
    }

    /// Thousands of polls queue here after a restart: each gets its turn in
    /// arrival order, none is starved by later arrivals.
    #[tokio::test]
    async fn admission_is_first_come_first_served() {
        let gate = ProviderGate::new(&LimitsConfig {
            requests_per_second: 200,
            ..LimitsConfig::default()
        });
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut callers = Vec::new();
        for i in 0..30 {
            let (gate, order) = (gate.clone(), order.clone());
            #[allow(clippy::disallowed_methods)]
            callers.push(tokio::spawn(async move {
                gate.admit().await;
                order.lock().unwrap().push(i);
            }));
            // Let caller `i` arrive (and start waiting) before `i + 1`.
            tokio::task::yield_now().await;
        }
        for c in callers {
            c.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..30).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn reconfigure_changes_live_caps_and_spacing() {
        let limits = KeyedLimits::new(LimitsConfig {
            max_in_flight: 1,
            triggers_per_minute: 1,
            ..LimitsConfig::default()
        });
        let key = limits.key("c_x", None);
        let _held = key.in_flight.acquire().await;
        key.trigger_slot().await;
        // SIGHUP: 2 in flight, 60 triggers a minute.
        limits.reconfigure(LimitsConfig {
            max_in_flight: 2,
            triggers_per_minute: 60,
            ..LimitsConfig::default()
        });
        let second = tokio::time::timeout(Duration::from_millis(10), key.in_flight.acquire()).await;
        assert!(
            second.is_ok(),
            "the raised cap admits a second collection at once"
        );
        // The slot already reserved under the old rate stands (60 s), the
        // ones after it follow the new spacing (1 s).
        let start = Instant::now();
        key.trigger_slot().await;
        key.trigger_slot().await;
        assert_eq!(start.elapsed(), Duration::from_secs(61));
    }

    #[tokio::test(start_paused = true)]
    async fn triggers_are_spaced_even_across_a_restart() {
        let limits = KeyedLimits::new(LimitsConfig {
            triggers_per_minute: 30,
            ..LimitsConfig::default()
        });
        // The previous process triggered 0.5 s ago: the next waits 1.5 s more.
        let key = limits.key("c_x", Some(Duration::from_millis(500)));
        let start = Instant::now();
        key.trigger_slot().await;
        key.trigger_slot().await;
        key.trigger_slot().await;
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(5500), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(6000), "{elapsed:?}");
    }
}
