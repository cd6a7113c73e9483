//! What every run of one provider key shares: the store, the provider
//! client, its gate and limits, the stop token, counters and the notifier.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::clock::{self, UnixMs};
use crate::config::LimitsConfig;
use crate::limits::ProviderGate;
use crate::provider::Provider;
use crate::store::Store;

/// Counters for metrics and the closing report.
#[derive(Default)]
pub struct Counters {
    pub triggers_sent: AtomicU64,
    pub in_doubt: AtomicU64,
    pub in_doubt_found: AtomicU64,
    pub in_doubt_not_created: AtomicU64,
    /// Found to exist, but the provider gives no way to reach it (Firecrawl
    /// v1's 409): the chunk failed instead of paying twice.
    pub in_doubt_unreachable: AtomicU64,
    pub rows_written: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Credits the provider reported for collections that became ready
    /// (Firecrawl's `creditsUsed`; Bright Data reports none).
    pub credits_used: AtomicU64,
    /// Bytes and objects sent to the object store, and upload attempts that
    /// failed.
    pub upload_bytes: AtomicU64,
    pub upload_objects: AtomicU64,
    pub upload_failures: AtomicU64,
    /// Unix ms of the last successful status poll.
    pub last_poll_ok: std::sync::atomic::AtomicI64,
    /// Seconds from trigger to ready, by provider.
    pub build_seconds: BuildSeconds,
}

/// `harvestd_build_duration_seconds{provider}`: how long collections take
/// to build, from trigger to ready as the daemon saw it.
#[derive(Clone)]
pub struct BuildSeconds(pub prometheus::HistogramVec);

impl Default for BuildSeconds {
    fn default() -> Self {
        let opts = prometheus::HistogramOpts::new(
            "harvestd_build_duration_seconds",
            "Collections: seconds from trigger to ready, by provider.",
        )
        .buckets(vec![
            1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
            86400.0,
        ]);
        // The name, label and buckets are constants: this cannot fail.
        BuildSeconds(
            prometheus::HistogramVec::new(opts, &["provider"])
                .unwrap_or_else(|e| unreachable!("{e}")),
        )
    }
}

/// The limits in force, shared by every context: a reload swaps them whole,
/// once, and a reader takes a snapshot that no reload changes under it.
#[derive(Clone)]
pub struct CurrentLimits(Arc<std::sync::RwLock<Arc<LimitsConfig>>>);

impl CurrentLimits {
    pub fn new(limits: LimitsConfig) -> CurrentLimits {
        CurrentLimits(Arc::new(std::sync::RwLock::new(Arc::new(limits))))
    }

    pub fn now(&self) -> Arc<LimitsConfig> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, limits: LimitsConfig) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(limits);
    }
}

/// What every chunk of every run of one provider key shares.
pub struct Context {
    pub store: Store,
    pub provider: Arc<dyn Provider>,
    pub gate: Arc<ProviderGate>,
    /// The limits in force: one handle for every context.
    pub limits: CurrentLimits,
    /// Where runs' files are written on this machine: `output_dir`, or
    /// the staging directory of an object store.
    pub output_dir: PathBuf,
    /// The object store runs are uploaded to, when `output_dir` names one.
    pub bucket: Option<Arc<crate::bucket::Target>>,
    /// The state directory: its filesystem must keep `min_free_space` too.
    pub state_dir: PathBuf,
    pub stop: CancellationToken,
    /// With `run --once`, a blocked provider parks its runs instead of
    /// waiting for the block to lift.
    pub park_on_block: bool,
    pub counters: Arc<Counters>,
    pub notify: Arc<crate::notify::Notifier>,
}

impl Context {
    /// The limits in force now.
    pub fn limits(&self) -> Arc<LimitsConfig> {
        self.limits.now()
    }

    /// Time left (ms) before the provider deletes a dataset that expires at
    /// `expires_at` on its clock, and how alarming that is.
    pub fn expiry(&self, expires_at: UnixMs) -> (i64, ExpiryLevel) {
        let left = expires_at - self.provider.now_ms();
        let l = self.limits();
        let (warn_at, error_at) = match self.provider.kind() {
            crate::spec::ProviderKind::Firecrawl => {
                (l.firecrawl_expiry_warn, l.firecrawl_expiry_error)
            }
            _ => (l.expiry_warn, l.expiry_error),
        };
        let level = if left <= 0 {
            ExpiryLevel::Expired
        } else if left <= clock::millis(error_at) {
            ExpiryLevel::Error
        } else if left <= clock::millis(warn_at) {
            ExpiryLevel::Warning
        } else {
            ExpiryLevel::Fine
        };
        (left, level)
    }
}

/// How near an unsaved ready dataset is to deletion at the provider
/// (`docs/limits.md`: warn with 3 days left, error at 1 day; Firecrawl 6 h and 1 h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryLevel {
    Fine,
    Warning,
    Error,
    Expired,
}

impl ExpiryLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            ExpiryLevel::Fine => "fine",
            ExpiryLevel::Warning => "warning",
            ExpiryLevel::Error => "error",
            ExpiryLevel::Expired => "expired",
        }
    }
}
