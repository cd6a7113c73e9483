//! Exit codes, one list for every command (`docs/cli.md`). They follow
//! `sysexits.h` where a meaning exists there, so that systemd's
//! `RestartPreventExitStatus=` and scripts can tell a configuration error
//! (do not restart) from a failure (restart).

/// Done; with `run --once`, every run complete.
pub const OK: u8 = 0;
/// A runtime failure: a run not complete, a damaged store, an I/O error.
pub const FAILURE: u8 = 1;
/// `EX_DATAERR`: a job file is invalid.
pub const INVALID: u8 = 65;
/// `EX_UNAVAILABLE`: the running daemon could not be reached.
pub const UNREACHABLE: u8 = 69;
/// `EX_TEMPFAIL`: another harvestd holds the state directory.
pub const LOCKED: u8 = 75;
/// `EX_CONFIG`: the configuration is invalid.
pub const CONFIG: u8 = 78;
/// A second SIGINT or SIGTERM during shutdown ends the process as the
/// signal would have: the shell's 128 + the signal's number (130 for
/// SIGINT, 143 for SIGTERM), which systemd and shells read as "killed by
/// it".
pub fn signalled(signal: i32) -> i32 {
    128 + signal
}
