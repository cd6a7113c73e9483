//! Benchmark: one big dataset (N rows of ~1 KB, one collection) from the
//! emulator, downloaded, saved as a part file and written as `data.csv` and
//! `data.json` by the release binary's `run --once`. Reports, median of
//! RUNS per size: wall time, MB/s of JSON, CPU time, peak RSS (GNU time),
//! and the yardstick measured in the same run: CPU time of streaming the
//! same bytes (the saved `data.ndjson`) through serde_json alone, and the
//! ratio of harvestd's CPU time to it (target ≤ 3); and the disk's floor:
//! seconds to write and fsync as many bytes as harvestd wrote, in 256 KiB
//! blocks with O_DIRECT (the device's pace, no page cache), on the same
//! filesystem.
//!
//! `cargo bench --bench big_dataset [-- RUNS]` (default 3);
//! `HARVESTD_BENCH_ROWS=100000,1000000` sets the sizes (the default);
//! `HARVESTD_BENCH_FORMATS=parquet` the job's formats (default `csv,json`).
//!
//! `HARVESTD_BENCH_S3=1`: `output_dir` is a bucket on a loopback
//! S3-compatible server (moto's, from the virtualenv `tests/tools/setup`
//! builds), started for each run; reported: the bytes uploaded, MB/s of
//! them over the whole run, harvestd's CPU and peak RSS, and the server's
//! own CPU seconds (its share of the time; the yardstick is not measured,
//! as staging is removed once the run is uploaded).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::time::Instant;

#[path = "support/mod.rs"]
mod support;
use harvestd::emulator::Emulator;
use support::median;

fn sizes() -> Vec<usize> {
    support::sizes_from("HARVESTD_BENCH_ROWS", &[100_000, 1_000_000])
}

struct Sample {
    wall: f64,
    cpu: f64,
    /// User time alone: the kernel's share is mostly copying into the page
    /// cache, which any writer of these bytes pays.
    user: f64,
    rss_mb: f64,
    json_mb: f64,
    yardstick_cpu: f64,
    /// Seconds to write and fsync as many bytes as harvestd wrote (the
    /// part and the final files) on the same disk: the floor this machine sets.
    disk_floor: f64,
    /// Size of `data.parquet`, when the formats include it.
    parquet_mb: f64,
}

/// CPU seconds this process has used (user + system), from /proc.
fn own_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    // utime and stime are fields 14 and 15 (1-based), 12 and 13 after ")".
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// The yardstick: stream the bytes through serde_json, one value per line,
/// as a tool that only parses would; returns CPU seconds. The file is read
/// once before, so the yardstick reads from the page cache (harvestd drops
/// what it wrote from the cache): the cheapest it can be.
fn yardstick(path: &std::path::Path) -> f64 {
    std::io::copy(
        &mut std::fs::File::open(path).unwrap(),
        &mut std::io::sink(),
    )
    .unwrap();
    let start = own_cpu();
    let file = std::io::BufReader::with_capacity(256 * 1024, std::fs::File::open(path).unwrap());
    let mut n = 0usize;
    for line in file.split(b'\n') {
        let line = line.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        n += usize::from(v.is_object());
    }
    assert!(n > 0);
    own_cpu() - start
}

/// The disk's pace: `bytes` (rounded up to 4 KiB) written in 256 KiB
/// blocks with O_DIRECT, then fsynced. Not through the page cache: on this
/// VM, growing the cache by gigabytes costs more than the disk (session 4
/// took that for the disk's floor).
fn disk_floor(dir: &std::path::Path, bytes: u64) -> f64 {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    const BLOCK: usize = 256 * 1024;
    let path = dir.join("disk-floor");
    // O_DIRECT wants buffers, lengths and offsets aligned to the block size.
    let buf = vec![b'x'; BLOCK + 4096];
    let at = buf.as_ptr().align_offset(4096);
    let block = &buf[at..at + BLOCK];
    let start = Instant::now();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(&path)
        .unwrap();
    let mut left = bytes.next_multiple_of(4096);
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        f.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
    let took = start.elapsed().as_secs_f64();
    std::fs::remove_file(path).unwrap();
    took
}

/// The job's `formats`, as a TOML array.
fn formats() -> String {
    let list = std::env::var("HARVESTD_BENCH_FORMATS").unwrap_or_else(|_| "csv,json".into());
    let quoted: Vec<String> = list
        .split(',')
        .map(|f| format!("\"{}\"", f.trim()))
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// The emulator with one collection of `rows` rows of ~1 KB, and a job
/// for it in the job's formats.
fn big_job(rt: &tokio::runtime::Runtime, rows: usize) -> (Emulator, tempfile::TempDir) {
    let (emulator, dir, jobs) = support::setup(
        rt,
        &format!("[defaults]\nbuild_time = \"0s\"\nrows_per_input = {rows}\nrow_bytes = 1000\n"),
    );
    std::fs::write(
        jobs.join("big.toml"),
        format!(
            "provider = \"scraper_studio\"\ncollector = \"c_bigdata001\"\n\
             inputs = [{{url = \"https://big.example/catalog\"}}]\nformats = {}\n",
            formats()
        ),
    )
    .unwrap();
    (emulator, dir)
}

fn one_run(rt: &tokio::runtime::Runtime, rows: usize) -> Sample {
    let (emulator, dir) = big_job(rt, rows);
    std::fs::write(
        dir.path().join("harvestd.toml"),
        "admin_listen = \"off\"\nintake_settle = \"0s\"\n[limits]\npoll_min_interval = \"100ms\"\npoll_max_interval = \"200ms\"\n",
    )
    .unwrap();
    let t = support::run_once_timed(dir.path(), &emulator);
    let run = dir.path().join("out/big/latest");
    let part = run.join("parts/chunk-000000.ndjson");
    let json_bytes = std::fs::metadata(&part).unwrap().len();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["rows"], rows, "every row saved");
    let yardstick_cpu = yardstick(&part);
    let written: u64 = json_bytes
        + manifest["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["bytes"].as_u64().unwrap())
            .sum::<u64>();
    let disk_floor = disk_floor(dir.path(), written);
    let parquet_mb = manifest["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["file"] == "data.parquet")
        .map(|o| o["bytes"].as_u64().unwrap() as f64 / 1e6)
        .sum();
    drop(emulator);
    Sample {
        wall: t.wall,
        cpu: t.cpu(),
        user: t.user,
        rss_mb: t.rss_mb,
        json_mb: json_bytes as f64 / 1e6,
        yardstick_cpu,
        disk_floor,
        parquet_mb,
    }
}

/// moto's S3 server on a free loopback port, with the bucket `bench`.
struct S3Server {
    child: std::process::Child,
    endpoint: String,
}

impl S3Server {
    fn start() -> S3Server {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let out = std::process::Command::new(root.join("tests/tools/setup"))
            .output()
            .unwrap();
        assert!(out.status.success(), "tests/tools/setup");
        let venv = String::from_utf8(out.stdout).unwrap();
        let mut child = std::process::Command::new(format!("{}/bin/moto_server", venv.trim()))
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let endpoint = loop {
            let line = lines.next().expect("moto_server listens").unwrap();
            if let Some(at) = line.find("http://127.0.0.1:") {
                let rest = &line[at..];
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Its log is drained so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        let status = std::process::Command::new("python3")
            .args([
                "-c",
                &format!("import urllib.request as u; u.urlopen(u.Request('{endpoint}/bench', method='PUT'))"),
            ])
            .status()
            .unwrap();
        assert!(status.success(), "bucket made");
        S3Server { child, endpoint }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One run to the S3 server: (wall, harvestd CPU, peak RSS MB, MB
/// uploaded, server CPU seconds).
fn one_s3_run(rt: &tokio::runtime::Runtime, rows: usize) -> (f64, f64, f64, f64, f64) {
    let s3 = S3Server::start();
    let (emulator, dir) = big_job(rt, rows);
    std::fs::write(
        dir.path().join("harvestd.toml"),
        format!(
            "admin_listen = \"off\"\nintake_settle = \"0s\"\n[limits]\npoll_min_interval = \"100ms\"\npoll_max_interval = \"200ms\"\n\
             [storage]\nendpoint = \"{}\"\nallow_http = true\n",
            s3.endpoint
        ),
    )
    .unwrap();
    let server_cpu = support::cpu_seconds(s3.child.id());
    let t = support::run_once_timed_with(
        dir.path(),
        &emulator,
        &[
            ("HARVESTD_OUTPUT_DIR", "s3://bench/harvest".into()),
            ("AWS_ACCESS_KEY_ID", "bench".into()),
            ("AWS_SECRET_ACCESS_KEY", "bench".into()),
        ],
    );
    let server_cpu = support::cpu_seconds(s3.child.id()) - server_cpu;
    // The manifest from the bucket: what was uploaded, and every row.
    let manifest: serde_json::Value = {
        let latest = s3_get(rt, &s3.endpoint, "harvest/big/latest");
        let run_id = String::from_utf8(latest).unwrap();
        let key = format!("harvest/big/{}/manifest.json", run_id.trim());
        serde_json::from_slice(&s3_get(rt, &s3.endpoint, &key)).unwrap()
    };
    assert_eq!(manifest["rows"], rows, "every row uploaded");
    let uploaded: u64 = manifest["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["bytes"].as_u64().unwrap())
        .sum();
    drop(emulator);
    (t.wall, t.cpu(), t.rss_mb, uploaded as f64 / 1e6, server_cpu)
}

/// An object from the server, read as any S3 client would.
fn s3_get(rt: &tokio::runtime::Runtime, endpoint: &str, key: &str) -> Vec<u8> {
    use object_store::ObjectStoreExt;
    let client = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("bench")
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id("bench")
        .with_secret_access_key("bench")
        .build()
        .unwrap();
    rt.block_on(async {
        let got = client
            .get(&object_store::path::Path::from(key))
            .await
            .unwrap();
        got.bytes().await.unwrap().to_vec()
    })
}

fn main() {
    let runs = support::runs_arg(3);
    if std::env::var("HARVESTD_BENCH_S3").is_ok_and(|v| v == "1") {
        let rt = tokio::runtime::Runtime::new().unwrap();
        println!("rows      MB_up  wall_s  MB/s   cpu_s  peak_rss_mb  server_cpu_s  (median of {runs}; to a loopback S3 server)");
        for rows in sizes() {
            let samples: Vec<_> = (0..runs).map(|_| one_s3_run(&rt, rows)).collect();
            let pick =
                |f: fn(&(f64, f64, f64, f64, f64)) -> f64| median(samples.iter().map(f).collect());
            let (wall, cpu, rss, mb, server) = (
                pick(|s| s.0),
                pick(|s| s.1),
                pick(|s| s.2),
                pick(|s| s.3),
                pick(|s| s.4),
            );
            println!(
                "{rows:>8} {mb:>7.0} {wall:>7.2} {:>6.0} {cpu:>7.2} {rss:>12.1} {server:>13.2}",
                mb / wall
            );
        }
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!("rows      MB_json  wall_s  MB/s   cpu_s  user_s  serde_cpu_s  cpu_ratio  user_ratio  peak_rss_mb  disk_floor_s  parquet_mb  (median of {runs})");
    for rows in sizes() {
        let samples: Vec<Sample> = (0..runs).map(|_| one_run(&rt, rows)).collect();
        let wall = median(samples.iter().map(|s| s.wall).collect());
        let cpu = median(samples.iter().map(|s| s.cpu).collect());
        let yard = median(samples.iter().map(|s| s.yardstick_cpu).collect());
        let ratio = median(samples.iter().map(|s| s.cpu / s.yardstick_cpu).collect());
        let user = median(samples.iter().map(|s| s.user).collect());
        let user_ratio = median(samples.iter().map(|s| s.user / s.yardstick_cpu).collect());
        let rss = median(samples.iter().map(|s| s.rss_mb).collect());
        let floor = median(samples.iter().map(|s| s.disk_floor).collect());
        let mb = samples[0].json_mb;
        let parquet = samples[0].parquet_mb.max(0.0);
        println!(
            "{rows:>8} {mb:>8.0} {wall:>7.2} {:>6.0} {cpu:>7.2} {user:>7.2} {yard:>12.2} {ratio:>10.2} {user_ratio:>11.2} {rss:>12.1} {floor:>13.2} {parquet:>11.1}",
            mb / wall
        );
    }
}
