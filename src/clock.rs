//! The one clock: wall time as milliseconds since the Unix epoch, and the
//! ways it is written.
//!
//! Chunks, runs and schedules record instants as [`UnixMs`] because they
//! outlive the process (a monotonic instant means nothing after a restart)
//! and because providers speak wall time. Everything that turns two such
//! instants into a wait goes through [`until`] or [`since`], so a time in
//! the past or a skewed clock gives zero, never an underflow.

use std::time::Duration;

/// Milliseconds since the Unix epoch (UTC).
pub type UnixMs = i64;

/// Now, on this machine's clock. A clock before 1970 reads as the epoch.
pub fn now_ms() -> UnixMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as UnixMs
}

/// How long from now until `at`; zero once it has passed.
pub fn until(at: UnixMs) -> Duration {
    between(now_ms(), at)
}

/// How long since `then`; zero if it lies in the future.
pub fn since(then: UnixMs) -> Duration {
    between(then, now_ms())
}

/// The time from `from` to `to`; zero if `to` comes first.
pub fn between(from: UnixMs, to: UnixMs) -> Duration {
    Duration::from_millis(u64::try_from(to.saturating_sub(from)).unwrap_or(0))
}

/// A duration as milliseconds, saturating.
pub fn millis(d: Duration) -> UnixMs {
    UnixMs::try_from(d.as_millis()).unwrap_or(UnixMs::MAX)
}

/// Sleeps until a wall-clock time; forever for `None`.
pub async fn sleep_until(at: Option<UnixMs>) {
    match at {
        Some(at) => tokio::time::sleep(until(at)).await,
        None => std::future::pending().await,
    }
}

/// RFC 3339 UTC, with milliseconds when there are any: the manifest's,
/// `status`'s and the notifications' form.
pub fn timestamp(ms: UnixMs) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The UTC day of a time, `YYYY-MM-DD`, as providers' listing filters take it.
pub fn utc_date(ms: UnixMs) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

/// `ms` as "2days 23h 59m", to the minute, for people reading how long is
/// left.
pub fn left_text(ms: i64) -> String {
    let minutes = u64::try_from(ms).unwrap_or(0) / 60_000;
    if minutes == 0 {
        return "under a minute".into();
    }
    humantime::format_duration(Duration::from_secs(minutes * 60)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(timestamp(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn utc_dates_are_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(24 * 3600 * 1000 * 365 + 5), "1971-01-01");
        assert_eq!(utc_date(-1), "1969-12-31");
    }

    #[test]
    fn waits_never_underflow() {
        assert_eq!(between(10, 3), Duration::ZERO);
        assert_eq!(
            between(i64::MIN, i64::MAX),
            Duration::from_millis(i64::MAX as u64)
        );
        assert_eq!(between(3, 10), Duration::from_millis(7));
        assert_eq!(millis(Duration::MAX), i64::MAX);
    }

    #[test]
    fn time_left_reads_to_the_minute() {
        assert_eq!(left_text(-5), "under a minute");
        assert_eq!(left_text(59_999), "under a minute");
        assert_eq!(left_text(3 * 86_400_000 - 1), "2days 23h 59m");
    }
}
