//! The live progress bars, on a real terminal: `script` runs harvestd on a
//! pseudo-terminal and records what a person would see.
#![allow(clippy::unwrap_used)]

mod common;

use common::Harness;

/// The screen text without colours and cursor movements.
fn plain(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params letter
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(if c == '\r' { '\n' } else { c });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_on_a_terminal_shows_a_bar_per_run() {
    let h = Harness::new("[defaults]\nbuild_time = \"200ms\"\n").await;
    h.write_inputs("a.csv", 6);
    h.write_inputs("b.csv", 9);
    for (job, file) in [("alpha", "a.csv"), ("beta", "b.csv")] {
        h.write_job(
            &format!("{job}.toml"),
            &format!("provider = \"scraper_studio\"\ncollector = \"c_{job}000001\"\ninputs_file = \"{file}\"\nchunk_size = 3\n"),
        );
    }
    let command = format!("{} run --once", env!("CARGO_BIN_EXE_harvestd"));
    let out = tokio::time::timeout(
        common::WAIT,
        tokio::process::Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .env("HARVESTD_CONFIG", h.path("harvestd.toml"))
            .env("HARVESTD_BRIGHTDATA_URL", h.emulator.url())
            .env("BRIGHT_DATA_API_TOKEN", &h.token)
            .current_dir(h.dir.path())
            .output(),
    )
    .await
    .expect("finished in time")
    .expect("script(1) from util-linux runs the command on a pseudo-terminal");
    let screen = plain(&out.stdout);
    assert!(out.status.success(), "{screen}");
    // A job's bar as last drawn: from its name to the end of the line or
    // the next bar. A terminal whose width `script` leaves unknown gets
    // the bars padded into one line that it wraps.
    let last = |job: &str| {
        let Some(at) = screen.rfind(&format!("{job} [")) else {
            return String::new();
        };
        let rest = &screen[at..];
        let end = ["\n", "alpha [", "beta ["]
            .iter()
            .filter_map(|stop| rest[1..].find(stop).map(|i| i + 1))
            .min()
            .unwrap_or(rest.len());
        rest[..end].to_string()
    };
    let alpha = last("alpha");
    assert!(
        alpha.contains("2/2 chunks saved")
            && alpha.contains("rows 6")
            && alpha.contains("complete"),
        "{alpha}"
    );
    let beta = last("beta");
    assert!(
        beta.contains("3/3 chunks saved") && beta.contains("rows 9") && beta.contains("complete"),
        "{beta}"
    );
    // On a terminal the log is text, not JSON, and it does not tear the bars.
    assert!(!screen.contains("{\"timestamp\""), "{screen}");
    assert!(screen.contains("harvestd: 2 run(s) complete"), "{screen}");
}
