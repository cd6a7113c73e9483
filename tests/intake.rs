//! Job intake on mistaken and hostile paths (`docs/job-files.md`): a file written in
//! place is paid for once, runs of one job never overlap, a job file can
//! never read (or quote) a file outside the jobs directory, a big inputs
//! file holds up no other job, odd file names are reported, and a plan
//! that fails on a full disk leaves nothing behind.

// Test helpers panic on purpose: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use common::Harness;

/// Sets `intake_settle` in the harness's config (it is 100 ms otherwise).
fn set_settle(h: &Harness, settle: &str) {
    let path = h.path("harvestd.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace(
        "intake_settle = \"100ms\"",
        &format!("intake_settle = \"{settle}\""),
    );
    std::fs::write(path, text).unwrap();
}

/// Triggers and inputs per run of `job`, from the chunk names in the
/// ledger (`harvestd:<job>:<run_id>:<index>`).
fn triggers_by_run(h: &Harness, job: &str) -> BTreeMap<String, (usize, u64)> {
    let mut runs = BTreeMap::new();
    for e in h.ledger() {
        let name = e.name.unwrap_or_default();
        if !name.contains(&format!(":{job}:")) {
            continue;
        }
        let run = name
            .rsplit_once(':')
            .map_or(name.clone(), |(r, _)| r.to_string());
        let entry = runs.entry(run).or_insert((0, 0));
        entry.0 += 1;
        entry.1 += e.inputs;
    }
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inputs_file_written_in_place_is_paid_for_once() {
    let h = Harness::new("[defaults]\nbuild_time = \"500ms\"\n").await;
    set_settle(&h, "2s");
    let mut d = h.start_daemon().await;
    h.write_job(
        "inplace.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_inplace01\"\ninputs_file = \"urls.txt\"\nchunk_size = 50\n",
    );
    // A producer that writes the file where it lies, flushing every ten
    // lines, 0.3 s apart: the daemon sees every partial version.
    let mut file = std::fs::File::create(h.path("jobs/urls.txt")).unwrap();
    for batch in 0..20 {
        for i in 0..10 {
            writeln!(file, "https://inplace.example/{}", batch * 10 + i).unwrap();
        }
        file.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(file);
    // A job dropped after the last write settles after it too, so by the
    // time both runs are complete any run of a later version would exist.
    h.write_job(
        "sentinel.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_sentinel1\"\ninputs = [{url = \"https://s.example\"}]\n",
    );
    d.wait_for_line("run complete").await;
    d.wait_for_line("run complete").await;
    d.signal(15);
    let (code, log) = d.wait_all().await;
    assert_eq!(code, 0);
    let planned = log
        .iter()
        .filter(|l| l.contains("run planned") && l.contains("\"job\":\"inplace\""))
        .count();
    assert_eq!(
        planned,
        1,
        "one run for the finished file:\n{}",
        log.join("\n")
    );
    let runs = triggers_by_run(&h, "inplace");
    assert_eq!(runs.len(), 1, "{runs:?}");
    let (triggers, inputs) = runs.values().next().copied().unwrap();
    assert_eq!(
        (triggers, inputs),
        (4, 200),
        "4 chunks of 50, all 200 inputs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_one_job_never_overlap_and_only_the_newest_content_waits() {
    let h = Harness::new("[defaults]\nbuild_time = \"2s\"\n").await;
    let urls = |n: usize| -> String {
        (0..n)
            .map(|i| format!("https://grow.example/{i}\n"))
            .collect()
    };
    h.write_job("grow.txt", &urls(3));
    h.write_job(
        "grow.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_grow00001\"\ninputs_file = \"grow.txt\"\nchunk_size = 1\n",
    );
    let mut d = h.start_daemon().await;
    d.wait_for_line("run planned").await;
    // Two new versions while the first run builds: only the last may run,
    // and only once the first run is over.
    h.write_job("grow.txt", &urls(4));
    h.write_job("grow.txt", &urls(5));
    d.wait_for_line("run complete").await;
    d.wait_for_line("run complete").await;
    d.signal(15);
    assert_eq!(d.wait().await, 0);

    let runs = triggers_by_run(&h, "grow");
    let sizes: Vec<(usize, u64)> = runs.values().copied().collect();
    assert_eq!(sizes, [(3, 3), (5, 5)], "{runs:?}");
    // Every trigger of the second run came after the first run finished.
    let out = h.path("out/grow");
    let mut dirs: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "latest")
        .collect();
    dirs.sort();
    let first = common::read_json(&dirs[0].join("manifest.json"));
    let finished = time::OffsetDateTime::parse(
        first["finished_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let finished_ms = (finished.unix_timestamp_nanos() / 1_000_000) as i64;
    let second_run = runs.keys().nth(1).unwrap().clone();
    for e in h.ledger() {
        if e.name
            .as_deref()
            .is_some_and(|n| n.starts_with(&second_run))
        {
            assert!(
                e.time >= finished_ms - 1000,
                "a trigger of the second run at {} before the first ended at {finished_ms}",
                e.time
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outside_the_jobs_directory_is_read_quoted_or_served() {
    let mut h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    h.env
        .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    let mut d = h.start_daemon().await;
    let token = std::fs::read_to_string(h.path("state/admin.token")).unwrap();
    let token = token.trim().to_string();
    assert!(token.len() >= 16);
    // Secrets beside the jobs directory, in every shape a job could name.
    std::fs::write(h.path("secret.txt"), "https://SECRET-5f3a.example/\n").unwrap();
    std::fs::write(
        h.path("secret.toml"),
        "provider = \"SECRET-5f3a\"\ncollector = \"c_x\"\n",
    )
    .unwrap();
    let jobs = h.path("jobs");
    std::os::unix::fs::symlink(h.path("state/admin.token"), jobs.join("adm.txt")).unwrap();
    std::os::unix::fs::symlink(h.dir.path(), jobs.join("up")).unwrap();
    std::os::unix::fs::symlink(h.path("secret.toml"), jobs.join("linked.toml")).unwrap();
    let job = |name: &str, inputs_file: &str| {
        h.write_job(
            &format!("{name}.toml"),
            &format!("provider = \"scraper_studio\"\ncollector = \"c_leak00001\"\ninputs_file = \"{inputs_file}\"\n"),
        );
    };
    job("viatoken", "adm.txt");
    job("viadir", "up/secret.txt");
    job("viadots", "../secret.txt");
    job("viaabs", &h.path("secret.txt").display().to_string());
    for name in ["viatoken", "viadir", "viadots", "viaabs", "linked"] {
        let reported = |l: &String| {
            l.contains("invalid job file") && l.contains(&format!("\"job\":\"{name}\""))
        };
        while !d.seen.iter().any(reported) {
            d.wait_for_line("invalid job file").await;
        }
    }
    let (code, status, status_err) = h.run(&["status", "--json"]).await;
    assert_eq!(code, 0, "{status_err}");
    let mut outputs = vec![status, status_err];
    for name in ["viatoken", "viadir", "viadots", "viaabs", "linked"] {
        let path = jobs.join(format!("{name}.toml"));
        let (code, out, err) = h.run(&["validate", path.to_str().unwrap()]).await;
        assert_eq!(code, 65, "{name}: {err}");
        outputs.push(out);
        outputs.push(err);
    }
    d.signal(15);
    let (code, log) = d.wait_all().await;
    assert_eq!(code, 0);
    outputs.extend(log);
    let all = outputs.join("\n");
    for secret in [token.as_str(), "SECRET-5f3a"] {
        assert!(!all.contains(secret), "{secret} leaked:\n{all}");
    }
    for want in [
        "leads outside the jobs directory",
        "goes up with '..'",
        "is an absolute path",
    ] {
        assert!(all.contains(want), "{want}:\n{all}");
    }
    assert!(h.ledger().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_inputs_file_holds_up_no_other_job() {
    let h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    // Sorted first, so a scan that reads job by job reads it first.
    let mut big = String::with_capacity(400_000 * 40);
    for i in 0..400_000 {
        big.push_str(&format!("https://big.example/item/{i}\n"));
    }
    h.write_job("a-big.txt", &big);
    h.write_job(
        "a-big.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_big000001\"\ninputs_file = \"a-big.txt\"\nchunk_size = 5000\n",
    );
    h.write_job(
        "b-small.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_small0001\"\ninputs = [{url = \"https://small.example\"}]\n",
    );
    let mut d = h.start_daemon().await;
    let first = d.wait_for_line("run planned").await;
    assert!(
        first.contains("\"job\":\"b-small\""),
        "the small job waited for the big one: {first}"
    );
    d.wait_for_line("run planned").await;
    d.signal(15);
    assert_eq!(d.wait().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_file_name_that_is_not_utf8_is_reported() {
    use std::os::unix::ffi::OsStrExt;
    let h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9.toml");
    let path = h.path("jobs").join(name);
    std::fs::write(
        &path,
        "provider = \"scraper_studio\"\ncollector = \"c_cafe00001\"\ninputs = [{url = \"https://a.example\"}]\n",
    )
    .unwrap();
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 65, "an invalid job file is reported: {stderr}");
    assert!(
        stderr.contains("caf\\\\xe9.toml") && stderr.contains("is not valid UTF-8"),
        "{stderr}"
    );
    assert!(h.ledger().is_empty());

    let mut c = h.command(&["validate"]);
    c.arg(&path);
    let out = c.output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("job name 'caf\\xe9'"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_that_fails_on_a_full_disk_leaves_no_files_behind() {
    let mut h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    h.write_inputs("many.csv", 10);
    h.write_job(
        "many.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_many00001\"\ninputs_file = \"many.csv\"\nchunk_size = 2\n",
    );
    // The third chunk's inputs cannot be written, as on a full disk.
    h.env
        .push(("FAILPOINTS".into(), "plan-write=2*off->return".into()));
    let mut d = h.start_daemon().await;
    let line = d.wait_for_line("cannot plan the job").await;
    assert!(line.contains("no space left on device"), "{line}");
    let left: Vec<_> = walk(&h.path("state/inputs"));
    assert!(left.is_empty(), "abandoned plan files: {left:?}");
    d.signal(15);
    assert_eq!(d.wait().await, 0);
    assert!(h.ledger().is_empty());
}

/// Every file under `dir` (none if it does not exist).
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
