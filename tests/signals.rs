//! Real signals to the daemon: SIGTERM drains without leaving doubt, a
//! second signal exits at once, SIGHUP reloads tokens and limits and keeps
//! the old configuration when the new one is invalid.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use std::time::{Duration, Instant};

use common::Harness;
use harvestd::chunk::ChunkState;
use harvestd::store::Store;

const SIGTERM: i32 = 15;
const SIGHUP: i32 = 1;

fn job(collector: &str) -> String {
    format!("provider = \"scraper_studio\"\ncollector = \"{collector}\"\ninputs_file = \"in.csv\"\nchunk_size = 5\n")
}

/// A daemon whose first trigger is on the wire: every trigger answer takes
/// `delay` to come.
async fn with_a_slow_trigger_in_flight(delay: &str, inputs: usize) -> (Harness, common::Daemon) {
    let h = Harness::new(&format!(
        "[defaults]\nbuild_time = \"1h\"\n[[faults]]\nendpoint = \"trigger\"\nkind = \"slow\"\ndelay = \"{delay}\"\nprobability = 1.0\n"
    ))
    .await;
    h.write_inputs("in.csv", inputs);
    h.write_job("t.toml", &job("c_slowtrig01"));
    let d = h.start_daemon().await;
    h.emulator
        .wait_until(common::WAIT, |s| {
            s.requests.get("trigger").copied().unwrap_or(0) >= 1
        })
        .await
        .unwrap();
    (h, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_a_trigger_on_the_wire_and_leaves_no_doubt() {
    let (h, d) = with_a_slow_trigger_in_flight("1s", 10).await;
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);
    let store = Store::open(&h.path("state")).unwrap();
    let run = &store.runs().unwrap()[0];
    let chunks = store.chunks(&run.job, &run.run_id).unwrap();
    assert!(
        chunks
            .iter()
            .all(|c| !matches!(c.state, ChunkState::Triggering { .. })),
        "no chunk in doubt: {:?}",
        chunks.iter().map(|c| c.state.name()).collect::<Vec<_>>()
    );
    assert!(
        chunks
            .iter()
            .any(|c| matches!(c.state, ChunkState::Triggered { .. })),
        "the answer was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let (_h, mut d) = with_a_slow_trigger_in_flight("30s", 5).await;
    d.signal(SIGTERM);
    d.wait_for_line("shutdown requested").await;
    let start = Instant::now();
    d.signal(SIGTERM);
    let code = d.wait().await;
    assert_eq!(
        code,
        128 + SIGTERM,
        "the second signal does not wait for the drain, and exits as shells expect of it"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "exited in {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_token_and_refuses_a_bad_config() {
    let mut h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    // The token comes from a file, which SIGHUP reads again.
    h.token = String::new();
    let token_file = h.path("bd-token");
    std::fs::write(&token_file, "not-the-token\n").unwrap();
    // A token file others can read is refused (`docs/configuration.md`).
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let with_token = format!(
        "[providers.brightdata]\ntoken_file = \"{}\"\n",
        token_file.display()
    );
    h.write_config(&with_token);
    h.write_inputs("in.csv", 10);
    h.write_job("t.toml", &job("c_sighup0001"));

    let mut d = h.start_daemon().await;
    d.wait_for_line("provider blocked").await;
    assert!(h.ledger().is_empty());

    // A broken config on reload: refused, the daemon carries on.
    std::fs::write(h.path("harvestd.toml"), "jobs_dir = [\n").unwrap();
    d.signal(SIGHUP);
    d.wait_for_line("configuration not reloaded").await;

    // The right token and a valid config: the blocked run finishes.
    h.write_config(&with_token);
    std::fs::write(
        &token_file,
        format!("{}\n", harvestd::emulator::DEMO_BRIGHTDATA_TOKEN),
    )
    .unwrap();
    d.signal(SIGHUP);
    d.wait_for_line("configuration reloaded").await;
    d.wait_for_line("run complete").await;
    assert_eq!(h.ledger().len(), 2);
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);
    let run = h.run_dir("t");
    assert!(
        run.join("_SUCCESS").exists(),
        "nothing failed while blocked"
    );
}

/// A planned chunk waiting for its trigger slot (one trigger a minute)
/// does not hold up a shutdown, and stays planned for the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_a_chunk_waits_for_its_trigger_slot_exits_at_once() {
    let h = Harness::new("[defaults]\nbuild_time = \"1h\"\n").await;
    h.write_config("[limits.keys.\"c_slot0001\"]\ntriggers_per_minute = 1\n");
    h.write_inputs("in.csv", 10);
    h.write_job("t.toml", &job("c_slot0001"));
    let mut d = h.start_daemon().await;
    h.emulator.wait_for_ledger(1, common::WAIT).await.unwrap();
    d.wait_for_line("\"message\":\"triggered\"").await;
    let start = Instant::now();
    d.signal(SIGTERM);
    let code = d.wait().await;
    assert_eq!(code, 0);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "exited {:?} after SIGTERM (shutdown_grace is 10 s)",
        start.elapsed()
    );
    let store = Store::open(&h.path("state")).unwrap();
    let run = &store.runs().unwrap()[0];
    let states: Vec<&str> = store
        .chunks(&run.job, &run.run_id)
        .unwrap()
        .iter()
        .map(|c| c.state.name())
        .collect();
    assert_eq!(states, ["triggered", "planned"]);
    assert_eq!(h.ledger().len(), 1);
}

/// A reload lifts blocks (a refused token may be fixed now), but not the
/// one for having no token at all: without a token, calls would only be
/// refused with 401s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_an_account_without_a_token_blocked() {
    let mut h = Harness::new("[firecrawl]\nbuild_time = \"50ms\"\n").await;
    h.env
        .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    std::fs::write(h.path("jobs/urls.txt"), "https://docs.example.com/a\n").unwrap();
    h.write_job(
        "fc.toml",
        "provider = \"firecrawl\"\ninputs_file = \"urls.txt\"\n",
    );
    let mut command = h.command(&["run"]);
    command.env_remove("FIRECRAWL_API_KEY");
    let mut d = h.start_command(command).await;
    let firecrawl_block = || async {
        let (code, out, err) = h.run(&["status", "--json"]).await;
        assert_eq!(code, 0, "{err}");
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        status["providers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["provider"] == "firecrawl")
            .map(|p| p["blocked"].clone())
            .unwrap()
    };
    let before = firecrawl_block().await;
    assert!(
        before.as_str().unwrap().contains("no Firecrawl API key"),
        "{before}"
    );
    d.signal(SIGHUP);
    d.wait_for_line("configuration reloaded").await;
    assert_eq!(
        firecrawl_block().await,
        before,
        "still blocked for the same reason"
    );
    assert!(h.ledger().is_empty(), "nothing was sent without a token");
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);
}
