//! The emulator held to the providers' official SDKs (`tests/sdk/`):
//! firecrawl-py and brightdata-sdk, pinned, drive `harvestd emulator`
//! through their public calls, and every check must pass. A divergence
//! here means a client bug could hide behind the same bug in the emulator.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdks_find_the_emulator_as_they_find_the_providers() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut emulator = Command::new(env!("CARGO_BIN_EXE_harvestd"))
        .args(["emulator", "--listen", "127.0.0.1:0", "--scenario"])
        .arg(format!("{root}/tests/sdk/scenario.toml"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The emulator prints the URL it serves on stdout.
    let mut lines = BufReader::new(emulator.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(common::WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(at) = line.find("http://127.0.0.1:") {
                return line[at..].split_whitespace().next().unwrap().to_string();
            }
        }
        panic!("the emulator ended before it served");
    })
    .await
    .expect("the emulator serves");
    let out = tokio::time::timeout(
        common::WAIT,
        Command::new(common::s3::venv().join("bin/python"))
            .arg(format!("{root}/tests/sdk/run.py"))
            .arg(&url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the SDK checks finish in time")
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    let checks = said.lines().filter(|l| l.starts_with("ok ")).count();
    assert!(
        out.status.success() && checks >= 20,
        "SDK checks:\n{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
