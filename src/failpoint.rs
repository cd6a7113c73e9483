//! Named fail points at the durable boundaries, for the crash-safety tests.
//!
//! They exist only in a build with `--features failpoints` (the test
//! command's build); a release build compiles every one of them to nothing.
//! `FAILPOINTS` (the `fail` crate's syntax, read once at start) arms them:
//!
//! - a crash point armed with `return` kills the process on the spot with
//!   SIGKILL, exactly as `kill -9` would: no destructor, no flush;
//! - an error point armed with `return` makes that one operation fail, as a
//!   full disk or a failing store would (`3*off->return` fails the fourth).
//!
//! | point | where |
//! |---|---|
//! | `after-intent` | the trigger intent is flushed; nothing sent yet |
//! | `after-send` | a trigger request went out; its answer is unread |
//! | `after-answer` | the trigger's answer is parsed; the id is not stored |
//! | `after-id` | the remote id is flushed |
//! | `after-poll` | a status poll's outcome (ready, failed…) is flushed |
//! | `part-written` | a part page's bytes are written, not yet fsynced |
//! | `part-synced` | the page is fsynced, not yet renamed |
//! | `part-renamed` | the page has its name; the chunk record does not know |
//! | `after-page` | the chunk record holds the page and the next cursor |
//! | `after-downloaded` | the chunk is flushed as downloaded |
//! | `after-manifest` | `manifest.json` is written; `_SUCCESS` is not |
//! | `after-success` | `_SUCCESS` is written; the run is not recorded finished |
//! | `after-multipart-begun` | a multipart upload's id is flushed; no part sent |
//! | `after-upload-object` | an object is uploaded and recorded |
//! | `part-write` (error) | writing a row to a part page fails with ENOSPC |
//! | `output-write` (error) | a write to a final file fails with ENOSPC |
//! | `store-flush` (error) | a sled flush fails |
//! | `plan-write` (error) | writing a planned chunk's inputs fails with ENOSPC |

/// Reads `FAILPOINTS`; call once at start. The guard is kept for the
/// process's life.
pub fn setup() {
    #[cfg(feature = "failpoints")]
    std::mem::forget(fail::FailScenario::setup());
}

/// Whether the point is armed now (and counts the hit).
#[cfg(feature = "failpoints")]
fn armed(name: &str) -> bool {
    fail::eval(name, |_| ()).is_some()
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
fn armed(_: &str) -> bool {
    false
}

/// Dies here, as `kill -9` would, when the point is armed.
#[inline(always)]
pub fn crash(name: &str) {
    if armed(name) {
        eprintln!("fail point {name}: killing the process");
        let _ = signal_hook::low_level::raise(signal_hook::consts::SIGKILL);
        std::process::abort();
    }
}

/// An injected "no space left on device", when the point is armed.
#[inline(always)]
pub fn io_error(name: &str) -> std::io::Result<()> {
    if armed(name) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!("no space left on device (fail point {name})"),
        ));
    }
    Ok(())
}
