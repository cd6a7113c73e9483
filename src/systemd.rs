//! The systemd notify protocol (`docs/operations.md`): READY=1 once state is resumed,
//! STATUS= a one-line summary, WATCHDOG=1 at half of `WatchdogSec=`, and
//! STOPPING=1. Without `NOTIFY_SOCKET` every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// A reload begins: `RELOADING=1` with the monotonic time, which systemd
/// (`Type=notify-reload`, or `systemctl reload` of a `Type=notify` unit)
/// requires to tell this reload from an earlier one.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => tracing::warn!(error = %e, "cannot read the monotonic clock for systemd"),
    }
}

/// A reload has ended, applied or refused (`status` says which): systemd
/// waits for this `READY=1` before `systemctl reload` returns.
pub fn reloaded(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC`, if set for us
/// (sd_watchdog_enabled(3): for this process when `WATCHDOG_PID` is unset
/// or names it).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}
