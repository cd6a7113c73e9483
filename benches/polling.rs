//! Benchmark: polling efficiency (issue #7). For builds of 30 s, 5 min and
//! 1 h, counts the status requests per collection and the delay from ready
//! to fetched, for harvestd and for a fixed 5-second poller (what the
//! official starters do) running at the same time against the same emulator.
//!
//! Time is compressed by `HARVESTD_BENCH_SCALE` (default 120): build times,
//! the fixed poller's 5 s and the default `poll_min_interval` (5 s) and
//! `poll_max_interval` (60 s) are all divided by it, so request counts and
//! delays as a share of the build are what they would be in real time.
//!
//! harvestd gets 12 collections per build, 4 in flight at a time: the first
//! 4 have no build time to go by (the tenth rule alone), the other 8 have
//! learned it. The fixed poller gets 4.
//!
//! `cargo bench --bench polling [-- RUNS]` (default 3).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use harvestd::emulator::{Collection, DEMO_BRIGHTDATA_TOKEN};

#[path = "support/mod.rs"]
mod support;
use support::{median, micros};

/// (label, real build time in seconds).
const BUILDS: [(&str, u64); 3] = [("30 s", 30), ("5 min", 300), ("1 h", 3600)];
const HARVESTD_COLLECTIONS: usize = 12;
const IN_FLIGHT: usize = 4;
const FIXED_COLLECTIONS: usize = 4;

fn scale() -> f64 {
    support::scale(120.0)
}

fn scaled(secs: f64) -> Duration {
    support::scaled(secs, scale())
}

/// The fixed poller: triggers, asks `/dca/log` every 5 s (scaled) until
/// done, then fetches the dataset.
async fn fixed_poller(url: String, collector: String) {
    let client = reqwest::Client::new();
    let auth = format!("Bearer {DEMO_BRIGHTDATA_TOKEN}");
    let answer = client
        .post(format!(
            "{url}/dca/trigger?collector={collector}&queue_next=1"
        ))
        .header("Authorization", &auth)
        .header("Content-Type", "application/json")
        .body(r#"[{"url": "https://fixed.example/1"}]"#)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    let id = answer["collection_id"].as_str().unwrap().to_string();
    loop {
        tokio::time::sleep(scaled(5.0)).await;
        let log = get(&client, &format!("{url}/dca/log/{id}")).await;
        if !log.status().is_success() {
            continue;
        }
        let log: serde_json::Value = serde_json::from_slice(&log.bytes().await.unwrap()).unwrap();
        let status = log["Status"].as_str().or(log["status"].as_str());
        if status == Some("done") {
            break;
        }
    }
    let data = get(&client, &format!("{url}/dca/dataset?id={id}")).await;
    assert!(data.status().is_success());
    data.bytes().await.unwrap();
}

async fn get(client: &reqwest::Client, url: &str) -> reqwest::Response {
    client
        .get(url)
        .header("Authorization", format!("Bearer {DEMO_BRIGHTDATA_TOKEN}"))
        .send()
        .await
        .unwrap()
}

/// One build's collections: (harvestd's in trigger order, the fixed poller's).
type Build = (Vec<Collection>, Vec<Collection>);
/// One run: every build.
type Sample = Vec<Build>;

fn one_run(rt: &tokio::runtime::Runtime) -> Sample {
    let mut scenario = String::new();
    for (i, (_, secs)) in BUILDS.iter().enumerate() {
        for who in ["h", "f"] {
            scenario.push_str(&format!(
                "[collectors.c_{who}{i}]\nbuild_time = \"{}\"\n",
                micros(scaled(*secs as f64))
            ));
        }
    }
    let (emulator, dir, jobs) = support::setup(rt, &scenario);
    let mut keys = String::new();
    for i in 0..BUILDS.len() {
        let inputs: String = (0..HARVESTD_COLLECTIONS)
            .map(|n| format!("https://polling.example/{i}/{n}\n"))
            .collect();
        std::fs::write(jobs.join(format!("b{i}.txt")), inputs).unwrap();
        std::fs::write(
            jobs.join(format!("b{i}.toml")),
            format!(
                "provider = \"scraper_studio\"\ncollector = \"c_h{i}\"\ninputs_file = \"b{i}.txt\"\nchunk_size = 1\n"
            ),
        )
        .unwrap();
        keys.push_str(&format!(
            "[limits.keys.\"c_h{i}\"]\nmax_in_flight = {IN_FLIGHT}\n"
        ));
    }
    std::fs::write(
        dir.path().join("harvestd.toml"),
        format!(
            "jobs_dir = \"{0}/jobs\"\nstate_dir = \"{0}/state\"\noutput_dir = \"{0}/out\"\nadmin_listen = \"off\"\nintake_settle = \"0s\"\n\
             [limits]\ntriggers_per_minute = 60000\nrequests_per_second = 1000\n\
             poll_min_interval = \"{1}\"\npoll_max_interval = \"{2}\"\n{keys}",
            dir.path().display(),
            micros(scaled(5.0)),
            micros(scaled(60.0)),
        ),
    )
    .unwrap();
    let fixed: Vec<_> = (0..BUILDS.len())
        .flat_map(|i| (0..FIXED_COLLECTIONS).map(move |_| i))
        .map(|i| rt.spawn(fixed_poller(emulator.url(), format!("c_f{i}"))))
        .collect();
    support::run_once_timed(dir.path(), &emulator);
    for f in fixed {
        rt.block_on(f).unwrap();
    }
    let all = emulator.collections();
    (0..BUILDS.len())
        .map(|i| {
            let of = |who: &str| {
                let mut v: Vec<Collection> = all
                    .iter()
                    .filter(|c| c.key == format!("c_{who}{i}"))
                    .cloned()
                    .collect();
                v.sort_by_key(|c| c.triggered_ms);
                v
            };
            (of("h"), of("f"))
        })
        .collect()
}

fn polls(c: &[Collection]) -> f64 {
    median(c.iter().map(|c| f64::from(c.status_polls)).collect())
}

/// Median delay from ready to fetched, as a share of the build time.
fn delay(c: &[Collection], build: f64) -> f64 {
    median(
        c.iter()
            .map(|c| (c.fetched_ms.expect("fetched") - c.ready_ms) as f64 / 1000.0 / build)
            .collect(),
    )
}

fn main() {
    let runs = support::runs_arg(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let samples: Vec<Sample> = (0..runs).map(|_| one_run(&rt)).collect();
    println!(
        "polling, time compressed {}× (median over {runs} runs of the per-collection medians)\n\
         build  | status requests per collection: harvestd all / first {IN_FLIGHT} / learned, fixed 5 s, ratio | ready → fetched, % of build: harvestd all / learned, fixed",
        scale()
    );
    for (i, (label, secs)) in BUILDS.iter().enumerate() {
        let build = *secs as f64 / scale();
        let m = |f: &dyn Fn(&Build) -> f64| median(samples.iter().map(|s| f(&s[i])).collect());
        let all = m(&|(h, _)| polls(h));
        let first = m(&|(h, _)| polls(&h[..IN_FLIGHT]));
        let learned = m(&|(h, _)| polls(&h[IN_FLIGHT..]));
        let fixed = m(&|(_, f)| polls(f));
        println!(
            "{label:>6} | {all:5.1} / {first:5.1} / {learned:5.1}, {fixed:5.1}, {:.2} | {:5.1} % / {:5.1} %, {:5.1} %",
            all / fixed,
            100.0 * m(&|(h, _)| delay(h, build)),
            100.0 * m(&|(h, _)| delay(&h[IN_FLIGHT..], build)),
            100.0 * m(&|(_, f)| delay(f, build)),
        );
    }
}
