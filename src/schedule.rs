//! Recurring jobs without cron (`docs/job-files.md`), as pure functions of the time:
//! parsing `cron = "m h dom mon dow"` (UTC, or the job's `timezone`, carried
//! as cronie's `CRON_TZ=<zone>` prefix), the next due time of `every` and
//! `cron` schedules, a per-job jitter, and what to do when a due time comes.
//! The daemon stores the next due time and asks [`on_due`] when it passes.

use std::fmt;
use std::time::Duration;

use crate::chunk::UnixMs;
use serde::{Deserialize, Serialize};

/// A parsed 5-field cron expression. Each field is a bit set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// Vixie cron's rule: a day field that starts with `*` (`*`, `*/2`)
    /// is "unrestricted", and then a day must match both fields; when
    /// both are restricted, a day matching either runs.
    days_star: bool,
    weekdays_star: bool,
    /// The zone the fields are read in (UTC unless `CRON_TZ=` names one).
    zone: jiff::tz::TimeZone,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} field '{text}': {message}")]
pub struct CronError {
    pub field: &'static str,
    pub text: String,
    pub message: String,
}

const FIELDS: [(&str, u32, u32); 5] = [
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 7),
];

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl std::str::FromStr for Cron {
    type Err = CronError;

    fn from_str(expr: &str) -> Result<Cron, CronError> {
        let (zone, expr) = match expr.trim().strip_prefix("CRON_TZ=") {
            Some(rest) => {
                let (name, fields) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                (zone(name)?, fields.trim())
            }
            None => (jiff::tz::TimeZone::UTC, expr.trim()),
        };
        let expr = match alias(expr)? {
            Some(expanded) => expanded,
            None => expr,
        };
        let parts: Vec<&str> = expr.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(CronError {
                field: "expression",
                text: expr.to_string(),
                message: format!(
                    "has {} fields; cron needs 5: minute hour day-of-month month day-of-week",
                    parts.len()
                ),
            });
        }
        let mut sets = [0u64; 5];
        for (i, (part, (name, lo, hi))) in parts.iter().zip(FIELDS).enumerate() {
            sets[i] = parse_field(part, name, lo, hi)?;
        }
        // Sunday is 0 or 7.
        let weekdays = ((sets[4] | (sets[4] >> 7)) & 0x7f) as u8;
        Ok(Cron {
            minutes: sets[0],
            hours: sets[1] as u32,
            days: sets[2] as u32,
            months: sets[3] as u16,
            weekdays,
            days_star: parts[2].starts_with('*'),
            weekdays_star: parts[4].starts_with('*'),
            zone,
        })
    }
}

/// An IANA time zone by name (`Europe/Berlin`), from the system's database
/// or the copy bundled in the binary.
pub fn zone(name: &str) -> Result<jiff::tz::TimeZone, CronError> {
    jiff::tz::TimeZone::get(name).map_err(|e| CronError {
        field: "timezone",
        text: name.to_string(),
        message: format!("is not an IANA time zone such as \"Europe/Berlin\" ({e})"),
    })
}

/// The usual `@` aliases, as Vixie cron expands them; `None` for an
/// expression without `@`.
fn alias(expr: &str) -> Result<Option<&'static str>, CronError> {
    if !expr.starts_with('@') {
        return Ok(None);
    }
    let expanded = match expr.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        _ => {
            return Err(CronError {
                field: "expression",
                text: expr.to_string(),
                message: "is not one of @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly (@reboot has no meaning for a daemon's schedule)".into(),
            })
        }
    };
    Ok(Some(expanded))
}

fn parse_field(text: &str, field: &'static str, lo: u32, hi: u32) -> Result<u64, CronError> {
    let err = |message: String| CronError {
        field,
        text: text.to_string(),
        message,
    };
    let value = |s: &str| -> Result<u32, CronError> {
        let lower = s.to_ascii_lowercase();
        let named = match field {
            "month" => MONTHS
                .iter()
                .position(|m| *m == lower)
                .map(|i| i as u32 + 1),
            "day-of-week" => WEEKDAYS.iter().position(|d| *d == lower).map(|i| i as u32),
            _ => None,
        };
        let n = match named {
            Some(n) => n,
            None => s
                .parse::<u32>()
                .map_err(|_| err(format!("'{s}' is not a number")))?,
        };
        if n < lo || n > hi {
            return Err(err(format!("{n} is outside {lo}-{hi}")));
        }
        Ok(n)
    };
    let mut set = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| err(format!("step '{s}' is not a number")))?;
                if step == 0 {
                    return Err(err("a step of 0 never matches".into()));
                }
                (r, step)
            }
            None => (item, 1),
        };
        let (start, end) = match range {
            "*" => (lo, hi),
            r => match r.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (value(a)?, value(b)?);
                    if a > b {
                        return Err(err(format!("range {a}-{b} runs backwards")));
                    }
                    (a, b)
                }
                // `5/15` is from 5 to the end, every 15. Vixie cron refuses
                // it, but job files written for earlier harvestd releases
                // use it, and refusing it now would stop their schedules at
                // the upgrade (an unchanged job file is not checked again).
                None if item.contains('/') => (value(r)?, hi),
                None => {
                    let v = value(r)?;
                    (v, v)
                }
            },
        };
        let mut v = start;
        while v <= end {
            set |= 1 << v;
            v += step;
        }
    }
    if set == 0 {
        return Err(err("matches nothing".into()));
    }
    Ok(set)
}

impl Cron {
    fn day_matches(&self, t: &jiff::civil::DateTime) -> bool {
        let dom = self.days & (1 << t.day()) != 0;
        let dow = self.weekdays & (1 << t.weekday().to_sunday_zero_offset()) != 0;
        match self.days_star || self.weekdays_star {
            true => dom && dow,
            false => dom || dow,
        }
    }

    /// The first minute strictly after `after` that the expression matches
    /// on the zone's clock. A local time that a daylight-saving change
    /// skips runs at the first minute after the gap; a local time that it
    /// repeats runs once, at its first occurrence.
    pub fn next_after(&self, after: UnixMs) -> UnixMs {
        use jiff::ToSpan;
        let Ok(after_ts) = jiff::Timestamp::from_millisecond(after) else {
            return UnixMs::MAX;
        };
        let local = after_ts.to_zoned(self.zone.clone()).datetime();
        // The next whole local minute; candidates before `after` (a fold
        // replays local minutes) are passed over below.
        let Ok(mut t) = local
            .with()
            .second(0)
            .subsec_nanosecond(0)
            .build()
            .and_then(|t| t.checked_add(1.minute()))
        else {
            return UnixMs::MAX;
        };
        // Five years cover every valid expression (29 February included).
        let Ok(limit) = t.checked_add(5.years().days(5)) else {
            return UnixMs::MAX;
        };
        while t < limit {
            let step = if self.months & (1 << t.month()) == 0 || !self.day_matches(&t) {
                t.date()
                    .tomorrow()
                    .map(|d| d.to_datetime(jiff::civil::Time::midnight()))
            } else if self.hours & (1 << t.hour()) == 0 {
                t.with()
                    .minute(0)
                    .build()
                    .and_then(|h| h.checked_add(1.hour()))
            } else if self.minutes & (1 << t.minute()) == 0 {
                t.checked_add(1.minute())
            } else {
                match self.instant(t) {
                    Some(at) if at > after => return at,
                    _ => t.checked_add(1.minute()),
                }
            };
            match step {
                Ok(next) => t = next,
                Err(_) => break,
            }
        }
        // Only for expressions that never match (e.g. 30 February).
        UnixMs::MAX
    }

    /// When the local time `t` happens in the zone: its only instant, the
    /// first of two (a fold), or the end of the gap that skips it.
    fn instant(&self, t: jiff::civil::DateTime) -> Option<UnixMs> {
        use jiff::tz::AmbiguousOffset;
        let ambiguous = self.zone.to_ambiguous_timestamp(t);
        let at = match ambiguous.offset() {
            AmbiguousOffset::Gap { .. } => {
                let before = ambiguous.earlier().ok()?;
                self.zone.following(before).next()?.timestamp()
            }
            _ => ambiguous.earlier().ok()?,
        };
        Some(at.as_millisecond())
    }

    /// Whether the expression can ever match (`0 0 30 2 *` cannot).
    pub fn ever_matches(&self) -> bool {
        self.next_after(0) != UnixMs::MAX
    }
}

/// A job's recurrence, as the job file gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recurrence {
    #[serde(with = "humantime_serde")]
    Every(Duration),
    Cron(String),
}

impl fmt::Display for Recurrence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recurrence::Every(d) => write!(f, "every {}", humantime::format_duration(*d)),
            Recurrence::Cron(c) => write!(f, "cron '{c}'"),
        }
    }
}

/// The next due time after `now` for a schedule whose last run started at
/// `last_start` (for `every`), plus the job's fixed jitter offset.
pub fn next_due(
    recurrence: &Recurrence,
    last_start: UnixMs,
    now: UnixMs,
    jitter: Duration,
) -> UnixMs {
    let base = match recurrence {
        Recurrence::Every(every) => {
            let every = every.as_millis().max(1) as i64;
            let mut due = last_start + every;
            if due <= now {
                // Missed due times collapse: the next is the first one after now.
                due += ((now - due) / every + 1) * every;
            }
            due
        }
        Recurrence::Cron(expr) => match expr.parse::<Cron>() {
            Ok(cron) => cron.next_after(now),
            Err(_) => UnixMs::MAX,
        },
    };
    base.saturating_add(crate::clock::millis(jitter))
}

/// A fixed offset in `[0, jitter)` for a job, from its name: spreads jobs
/// sharing a schedule, and stays the same across restarts.
pub fn jitter_offset(job: &str, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return Duration::ZERO;
    }
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let hash = job.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    Duration::from_millis(hash % (jitter.as_millis().max(1) as u64))
}

/// What to do when a job's due time has passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// Start a run now; the next due time is `next`.
    Start { next: UnixMs },
    /// The previous run is still going: skip this due time; next is `next`.
    Skip { next: UnixMs },
    /// Not due yet.
    Wait,
}

/// Decides at `now` for a job due at `due` (jitter included). However many
/// due times passed (downtime), at most one run starts: the next due time
/// is the first one after `now` on the schedule's own grid.
pub fn on_due(
    recurrence: &Recurrence,
    due: UnixMs,
    now: UnixMs,
    run_in_progress: bool,
    jitter: Duration,
) -> Due {
    if now < due {
        return Due::Wait;
    }
    // `every` keeps its rhythm: the grid runs from the unjittered due time,
    // so neither a late wake-up nor the jitter makes it drift.
    let base = due.saturating_sub(crate::clock::millis(jitter));
    let next = next_due(recurrence, base, now, jitter);
    if run_in_progress {
        Due::Skip { next }
    } else {
        Due::Start { next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;
    use time::OffsetDateTime;

    fn ms(t: OffsetDateTime) -> UnixMs {
        (t.unix_timestamp_nanos() / 1_000_000) as i64
    }

    fn cron(s: &str) -> Cron {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn next(expr: &str, after: OffsetDateTime) -> OffsetDateTime {
        let at = cron(expr).next_after(ms(after));
        OffsetDateTime::from_unix_timestamp(at / 1000).unwrap()
    }

    #[test]
    fn cron_next_times() {
        // (expression, after, next)
        let table = [
            (
                "* * * * *",
                datetime!(2026-01-31 23:59:30 UTC),
                datetime!(2026-02-01 00:00 UTC),
            ),
            (
                "*/15 * * * *",
                datetime!(2026-03-01 10:07 UTC),
                datetime!(2026-03-01 10:15 UTC),
            ),
            (
                "*/15 * * * *",
                datetime!(2026-03-01 10:45 UTC),
                datetime!(2026-03-01 11:00 UTC),
            ),
            (
                "0 2 * * *",
                datetime!(2026-03-01 02:00 UTC),
                datetime!(2026-03-02 02:00 UTC),
            ),
            (
                "5,35 9-10 * * *",
                datetime!(2026-03-01 09:40 UTC),
                datetime!(2026-03-01 10:05 UTC),
            ),
            (
                "0 0 * * mon-fri",
                datetime!(2026-11-21 12:00 UTC),
                datetime!(2026-11-23 00:00 UTC),
            ),
            (
                "0 0 * * 7",
                datetime!(2026-11-23 12:00 UTC),
                datetime!(2026-11-29 00:00 UTC),
            ),
            (
                "0 12 1 jan,jul *",
                datetime!(2026-02-10 00:00 UTC),
                datetime!(2026-07-01 12:00 UTC),
            ),
            (
                "10-59/20 * * * *",
                datetime!(2026-03-01 10:31 UTC),
                datetime!(2026-03-01 10:50 UTC),
            ),
            (
                "10/20 * * * *",
                datetime!(2026-03-01 10:31 UTC),
                datetime!(2026-03-01 10:50 UTC),
            ),
            // Vixie cron: a day field starting with `*` makes the two
            // day fields both required. 2026-12-07 is a Monday on an odd day.
            (
                "0 0 */2 * mon",
                datetime!(2026-11-24 00:00 UTC),
                datetime!(2026-12-07 00:00 UTC),
            ),
            (
                "0 0 1-31/2 * mon",
                datetime!(2026-11-24 00:00 UTC),
                datetime!(2026-11-25 00:00 UTC),
            ),
            (
                "@daily",
                datetime!(2026-03-01 10:31 UTC),
                datetime!(2026-03-02 00:00 UTC),
            ),
            (
                "@midnight",
                datetime!(2026-03-01 10:31 UTC),
                datetime!(2026-03-02 00:00 UTC),
            ),
            (
                "@hourly",
                datetime!(2026-03-01 10:31 UTC),
                datetime!(2026-03-01 11:00 UTC),
            ),
            (
                "@weekly",
                datetime!(2026-11-24 10:31 UTC),
                datetime!(2026-11-29 00:00 UTC),
            ),
            (
                "@monthly",
                datetime!(2026-11-24 10:31 UTC),
                datetime!(2026-12-01 00:00 UTC),
            ),
            (
                "@yearly",
                datetime!(2026-11-24 10:31 UTC),
                datetime!(2027-01-01 00:00 UTC),
            ),
            (
                "@Annually",
                datetime!(2026-11-24 10:31 UTC),
                datetime!(2027-01-01 00:00 UTC),
            ),
        ];
        for (expr, after, want) in table {
            assert_eq!(next(expr, after), want, "{expr} after {after}");
        }
    }

    #[test]
    fn cron_end_of_month_and_leap_days() {
        // The 31st skips the months that have none.
        assert_eq!(
            next("0 0 31 * *", datetime!(2026-04-01 00:00 UTC)),
            datetime!(2026-05-31 00:00 UTC)
        );
        assert_eq!(
            next("0 0 29 2 *", datetime!(2026-03-01 00:00 UTC)),
            datetime!(2028-02-29 00:00 UTC)
        );
        // Both day fields restricted: either one matches (POSIX).
        assert_eq!(
            next("0 0 13 * fri", datetime!(2026-11-01 00:00 UTC)),
            datetime!(2026-11-06 00:00 UTC)
        );
        assert!(!cron("0 0 30 2 *").ever_matches());
    }

    /// The zone's clock, across daylight-saving changes: Berlin springs
    /// forward on 2026-03-29 (02:00-03:00 CET skipped) and falls back on
    /// 2026-10-25 (02:00-03:00 happens twice), New York springs forward on
    /// 2026-03-08.
    #[test]
    fn cron_in_a_time_zone_across_daylight_saving() {
        let berlin = "CRON_TZ=Europe/Berlin";
        let table = [
            // 02:00 in Berlin is 01:00 UTC in winter, 00:00 in summer.
            (
                "0 2 * * *",
                datetime!(2026-01-10 12:00 UTC),
                datetime!(2026-01-11 01:00 UTC),
            ),
            (
                "0 2 * * *",
                datetime!(2026-07-10 12:00 UTC),
                datetime!(2026-07-11 00:00 UTC),
            ),
            // Skipped: 02:30 runs at the first minute after the gap, 03:00
            // CEST, then as usual the next day.
            (
                "30 2 * * *",
                datetime!(2026-03-28 12:00 UTC),
                datetime!(2026-03-29 01:00 UTC),
            ),
            (
                "30 2 * * *",
                datetime!(2026-03-29 01:00 UTC),
                datetime!(2026-03-30 00:30 UTC),
            ),
            // Every 15 minutes: the skipped hour is one run at 03:00.
            (
                "*/15 * * * *",
                datetime!(2026-03-29 00:45 UTC),
                datetime!(2026-03-29 01:00 UTC),
            ),
            (
                "*/15 * * * *",
                datetime!(2026-03-29 01:00 UTC),
                datetime!(2026-03-29 01:15 UTC),
            ),
            // Repeated: 02:30 runs at its first occurrence (CEST) only.
            (
                "30 2 * * *",
                datetime!(2026-10-24 12:00 UTC),
                datetime!(2026-10-25 00:30 UTC),
            ),
            (
                "30 2 * * *",
                datetime!(2026-10-25 00:30 UTC),
                datetime!(2026-10-26 01:30 UTC),
            ),
            // Asked during the second 02:xx: the first was the run.
            (
                "30 2 * * *",
                datetime!(2026-10-25 01:10 UTC),
                datetime!(2026-10-26 01:30 UTC),
            ),
        ];
        for (fields, after, want) in table {
            let expr = format!("{berlin} {fields}");
            assert_eq!(next(&expr, after), want, "{expr} after {after}");
        }
        assert_eq!(
            next(
                "CRON_TZ=America/New_York 30 2 * * *",
                datetime!(2026-03-07 12:00 UTC)
            ),
            datetime!(2026-03-08 07:00 UTC)
        );
        assert_eq!(
            next(
                "CRON_TZ=America/New_York @daily",
                datetime!(2026-07-01 12:00 UTC)
            ),
            datetime!(2026-07-02 04:00 UTC)
        );
        let e = "CRON_TZ=Mars/Olympus 0 0 * * *"
            .parse::<Cron>()
            .unwrap_err();
        assert_eq!(e.field, "timezone", "{e}");
    }

    #[test]
    fn cron_errors_name_the_field() {
        for (expr, field, needle) in [
            ("60 * * * *", "minute", "60 is outside 0-59"),
            ("* 24 * * *", "hour", "outside 0-23"),
            ("* * 0 * *", "day-of-month", "outside 1-31"),
            ("* * * 13 *", "month", "outside 1-12"),
            ("* * * * 8", "day-of-week", "outside 0-7"),
            ("*/0 * * * *", "minute", "step of 0"),
            ("5-1 * * * *", "minute", "backwards"),
            ("* * * foo *", "month", "'foo' is not a number"),
            ("* * * *", "expression", "has 4 fields"),
            ("* * * * * *", "expression", "has 6 fields"),
            ("@reboot", "expression", "@reboot has no meaning"),
            ("@often", "expression", "is not one of"),
        ] {
            let e = expr.parse::<Cron>().unwrap_err();
            assert_eq!(e.field, field, "{expr}: {e}");
            assert!(e.to_string().contains(needle), "{expr}: {e}");
        }
    }

    #[test]
    fn every_keeps_its_rhythm_across_restarts() {
        let hour = Duration::from_secs(3600);
        let every = Recurrence::Every(6 * hour);
        let start = ms(datetime!(2026-11-23 00:00 UTC));
        let due = next_due(&every, start, start, Duration::ZERO);
        assert_eq!(due, start + 6 * 3600 * 1000);
        // A restart at 03:00 recomputes nothing: the stored due time stands,
        // and asking again before it gives Wait, not a run.
        let restart = start + 3 * 3600 * 1000;
        assert_eq!(
            on_due(&every, due, restart, false, Duration::ZERO),
            Due::Wait
        );
        assert_eq!(
            next_due(&every, start, restart, Duration::ZERO),
            due,
            "no skip, no repeat"
        );
    }

    #[test]
    fn downtime_over_three_due_times_catches_up_once() {
        let every = Recurrence::Every(Duration::from_secs(3600));
        let due = ms(datetime!(2026-11-23 01:00 UTC));
        // Down from 00:30 to 03:30: 01:00, 02:00 and 03:00 were missed.
        let back = ms(datetime!(2026-11-23 03:30 UTC));
        let Due::Start { next } = on_due(&every, due, back, false, Duration::ZERO) else {
            panic!("one catch-up run");
        };
        assert_eq!(
            next,
            ms(datetime!(2026-11-23 04:00 UTC)),
            "the hourly rhythm holds"
        );
        // Right after the catch-up started, nothing else is due.
        assert_eq!(
            on_due(&every, next, back + 1000, false, Duration::ZERO),
            Due::Wait
        );

        let nightly = Recurrence::Cron("0 2 * * *".into());
        let due = ms(datetime!(2026-11-20 02:00 UTC));
        let back = ms(datetime!(2026-11-23 09:00 UTC));
        assert_eq!(
            on_due(&nightly, due, back, false, Duration::ZERO),
            Due::Start {
                next: ms(datetime!(2026-11-24 02:00 UTC))
            }
        );
    }

    #[test]
    fn a_due_time_during_a_run_is_skipped() {
        let every = Recurrence::Every(Duration::from_secs(600));
        let due = 1_000_000;
        assert_eq!(
            on_due(&every, due, due + 5, true, Duration::ZERO),
            Due::Skip {
                next: due + 600_000
            }
        );
    }

    #[test]
    fn jitter_is_fixed_per_job_and_bounded() {
        let j = Duration::from_secs(300);
        let a = jitter_offset("speakers", j);
        assert_eq!(a, jitter_offset("speakers", j));
        assert!(a < j);
        let spread: std::collections::HashSet<_> = (0..50)
            .map(|i| jitter_offset(&format!("job{i}"), j))
            .collect();
        assert!(spread.len() > 40, "jobs spread out: {}", spread.len());
        assert_eq!(jitter_offset("x", Duration::ZERO), Duration::ZERO);
        let every = Recurrence::Every(Duration::from_secs(60));
        let j = Duration::from_millis(1234);
        let first = next_due(&every, 0, 0, j);
        assert_eq!(first, 60_000 + 1234);
        // Firing late and with jitter does not drift the grid.
        assert_eq!(
            on_due(&every, first, first + 700, false, j),
            Due::Start {
                next: 120_000 + 1234
            }
        );
    }
}
