//! Schedules through the real daemon. Downtime is simulated by moving the
//! stored due time into the past between two daemon processes, so nothing
//! waits for the clock.
#![allow(clippy::unwrap_used)]

mod common;

use common::Harness;
use harvestd::store::Store;

const SIGTERM: i32 = 15;

fn scheduled_job(collector: &str) -> String {
    format!(
        "provider = \"scraper_studio\"\ncollector = \"{collector}\"\ninputs_file = \"in.csv\"\n\
         chunk_size = 5\nevery = \"1h\"\n"
    )
}

/// Moves the job's stored due time `by_ms` into the past.
fn backdate(h: &Harness, job: &str, by_ms: i64) -> i64 {
    let store = Store::open(&h.path("state")).unwrap();
    let mut record = store
        .schedules()
        .unwrap()
        .into_iter()
        .find(|r| r.job == job)
        .expect("a stored schedule");
    let now = harvestd::clock::now_ms();
    record.next_due = now - by_ms;
    store.put_schedule(&record).unwrap();
    store.flush_blocking().unwrap();
    now
}

fn run_dirs(h: &Harness, job: &str) -> usize {
    std::fs::read_dir(h.path("out").join(job))
        .map(|d| {
            d.filter(|e| e.as_ref().unwrap().file_name() != "latest")
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downtime_over_several_due_times_catches_up_exactly_once() {
    let h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    h.write_inputs("in.csv", 10);
    h.write_job("hourly.toml", &scheduled_job("c_hourly0001"));

    let mut d = h.start_daemon().await;
    d.wait_for_line("schedule set").await;
    d.wait_for_line("run complete").await;
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);
    assert_eq!(h.ledger().len(), 2);

    // Down for three and a half hours: three due times missed.
    let before = backdate(&h, "hourly", 3 * 3600 * 1000 + 1800 * 1000);
    let mut d = h.start_daemon().await;
    d.wait_for_line("scheduled run planned").await;
    d.wait_for_line("run complete").await;
    assert!(
        !d.seen.iter().any(|l| l.contains("schedule set")),
        "the stored schedule stood"
    );
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);
    assert_eq!(h.ledger().len(), 4, "one catch-up run, not three");
    assert_eq!(run_dirs(&h, "hourly"), 2);

    // The next due time is in the future, on the hourly grid.
    let store = Store::open(&h.path("state")).unwrap();
    let next = store.schedules().unwrap()[0].next_due;
    assert!(
        next > before && next <= before + 3600 * 1000,
        "next due {next}, now {before}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_time_during_a_run_is_skipped_and_an_edit_takes_effect() {
    let h = Harness::new("[defaults]\nbuild_time = \"2h\"\n").await;
    h.write_inputs("in.csv", 5);
    h.write_job("slow.toml", &scheduled_job("c_slowrun001"));

    let mut d = h.start_daemon().await;
    h.emulator.wait_for_ledger(1, common::WAIT).await.unwrap();
    d.wait_for_line("schedule set").await;
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);

    // Due while the first run is still building: skipped, not overlapped.
    backdate(&h, "slow", 1000);
    let mut d = h.start_daemon().await;
    d.wait_for_line("due time skipped").await;
    assert_eq!(h.ledger().len(), 1);

    // Editing the schedule takes effect at once; deleting the file stops it.
    h.write_job(
        "slow.toml",
        &scheduled_job("c_slowrun001").replace("every = \"1h\"", "cron = \"0 3 * * *\""),
    );
    d.wait_for_line("schedule set").await;
    std::fs::remove_file(h.path("jobs/slow.toml")).unwrap();
    d.wait_for_line("schedule stopped").await;
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);
    let store = Store::open(&h.path("state")).unwrap();
    assert!(store.schedules().unwrap().is_empty());
}

fn write_urls(h: &Harness, ids: impl Iterator<Item = u32>) {
    let mut s = String::from("url\n");
    for i in ids {
        s.push_str(&format!("https://shop.example/p/{i}\n"));
    }
    std::fs::write(h.path("jobs/in.csv"), s).unwrap();
}

fn new_urls(h: &Harness) -> Vec<String> {
    let latest = h.path("out/inc/latest");
    let mut urls: Vec<String> = common::lines(&latest.join("new.ndjson"))
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["url"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    urls.sort();
    let csv = common::lines(&latest.join("new.csv"));
    assert_eq!(
        csv.len(),
        urls.len() + 1,
        "new.csv has the same rows plus a header"
    );
    urls
}

fn urls(ids: impl Iterator<Item = u32>) -> Vec<String> {
    let mut v: Vec<String> = ids.map(|i| format!("https://shop.example/p/{i}")).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_output_across_three_overlapping_runs() {
    let h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    h.write_job(
        "inc.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_incr000001\"\ninputs_file = \"in.csv\"\n\
         chunk_size = 4\nformats = [\"csv\", \"json\"]\ndedup_key = \"url\"\n",
    );
    write_urls(&h, 1..=10);
    assert_eq!(h.run_once().await.0, 0);
    assert_eq!(
        new_urls(&h),
        urls(1..=10),
        "the first run: everything is new"
    );

    write_urls(&h, 6..=15);
    assert_eq!(h.run_once().await.0, 0);
    assert_eq!(new_urls(&h), urls(11..=15));

    write_urls(&h, (1..=5).chain(16..=20));
    assert_eq!(h.run_once().await.0, 0);
    assert_eq!(
        new_urls(&h),
        urls(16..=20),
        "keys of every earlier complete run count"
    );

    let manifest = common::read_json(&h.path("out/inc/latest/manifest.json"));
    let outputs = manifest["outputs"].as_array().unwrap();
    assert!(
        outputs
            .iter()
            .any(|o| o["file"] == "new.ndjson" && o["rows"] == 5),
        "{outputs:?}"
    );
}
