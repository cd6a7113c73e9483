//! Bad job files: each a clear error with file, line and field, zero API
//! calls for it, and no effect on the good job beside it.

// Test helpers panic on purpose: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use common::Harness;

/// An inputs file written beside a job file: (name, contents).
type Beside = Option<(&'static str, &'static str)>;

/// (job file, its text, an inputs file beside it, what the error must say)
const BAD: &[(&str, &str, Beside, &str)] = &[
    (
        "typo.toml",
        "provider = \"scraper_studio\"\ncolector = \"c_abc\"\ninputs = [{url = \"https://a.example\"}]\n",
        None,
        "typo.toml:2: unknown field 'colector' (did you mean 'collector'?)",
    ),
    ("noprovider.toml", "collector = \"c_abc\"\ninputs = [{url = \"https://a.example\"}]\n", None, "field 'provider': is required"),
    (
        "wrongprovider.toml",
        "provider = \"brightdata\"\ncollector = \"c_abc\"\ninputs = [{url = \"https://a.example\"}]\n",
        None,
        "wrongprovider.toml:1: field 'provider': 'brightdata' is not one of",
    ),
    (
        "prefix.toml",
        "provider = \"scraper_studio\"\ncollector = \"gd_abc\"\ninputs = [{url = \"https://a.example\"}]\n",
        None,
        "prefix.toml:2: field 'collector': 'gd_abc' is not an id of the form c_",
    ),
    (
        "both.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_abc\"\ninputs = [{url = \"https://a.example\"}]\ninputs_file = \"x.csv\"\n",
        None,
        "both.toml:4: field 'inputs_file': use either",
    ),
    (
        "missingfile.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_abc\"\ninputs_file = \"nope.csv\"\n",
        None,
        "field 'inputs_file': cannot read inputs file",
    ),
    (
        "emptyinputs.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_abc\"\ninputs_file = \"emptyinputs.csv\"\n",
        Some(("emptyinputs.csv", "url\n")),
        "emptyinputs.csv: the inputs file holds no inputs",
    ),
    (
        "chunk.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_abc\"\ninputs = [{url = \"https://a.example\"}]\nchunk_size = 6000\n",
        None,
        "chunk.toml:4: field 'chunk_size': 6000 is outside 1..=5000",
    ),
    (
        "formats.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_abc\"\ninputs = [{url = \"https://a.example\"}]\nformats = [\"xlsx\"]\n",
        None,
        "formats.toml:4: field 'formats': \"xlsx\" is not one of",
    ),
    ("syntax.toml", "provider = \"scraper_studio\nx = 1\n", None, "syntax.toml:1: invalid TOML"),
    ("syntax.json", "{\"provider\": \"scraper_studio\",\n \"collector\": }\n", None, "syntax.json:2: invalid JSON"),
    (
        "ragged.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_abc\"\ninputs_file = \"ragged.csv\"\n",
        Some(("ragged.csv", "url,name\nhttps://a.example,A\nhttps://b.example\n")),
        "ragged.csv:3: row has 1 fields; the header has 2",
    ),
    (
        "badline.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_abc\"\ninputs_file = \"badline.ndjson\"\n",
        Some(("badline.ndjson", "{\"url\":\"https://a.example\"}\n{\"url\": \"https://b.example\"\n")),
        "badline.ndjson:2: invalid JSON",
    ),
    (
        "badurl.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_abc\"\ninputs_file = \"badurl.txt\"\n",
        Some(("badurl.txt", "https://a.example\njavascript:alert(1)\n")),
        "badurl.txt:2: field 'url': 'javascript:alert(1)' is not an http(s) URL",
    ),
    (
        "twoschedules.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_abc\"\ninputs = [{url = \"https://a.example\"}]\nevery = \"1h\"\ncron = \"0 2 * * *\"\n",
        None,
        "twoschedules.toml:5: field 'cron': 'every' and 'cron' cannot both be set",
    ),
    (
        "Bad_Name.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_abc\"\ninputs = [{url = \"https://a.example\"}]\n",
        None,
        "job name 'Bad_Name' (the file name) must match",
    ),
    ("empty.toml", "", None, "empty.toml: is empty"),
    (
        "nested.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_abc\"\ninputs = [{url = \"https://a.example\"}]\n[params]\ndeliver = { type = \"s3\" }\n",
        None,
        "field 'params': 'deliver' must be a string, number or boolean",
    ),
    (
        "notobject.json",
        "[{\"provider\": \"scraper_studio\"}]",
        None,
        "notobject.json:1: must be a JSON object of fields",
    ),
    (
        "latin1.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_\u{e9}\"\n",
        None,
        "latin1.toml:2: field 'collector': 'c_\u{e9}' is not an id",
    ),
];

const GOOD: &str = "provider = \"scraper_studio\"\ncollector = \"c_good00001\"\ninputs = [{url = \"https://a.example/1\"}, {url = \"https://a.example/2\"}]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_job_gets_a_clear_error_and_changes_nothing_else() {
    let h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    for (name, text, inputs, _) in BAD {
        h.write_job(name, text);
        if let Some((file, body)) = inputs {
            h.write_job(file, body);
        }
    }
    // Validation alone: every file named, exit 65, no API call.
    for (name, _, _, want) in BAD {
        let path = h.path("jobs").join(name);
        let (code, _, stderr) = h.run(&["validate", path.to_str().unwrap()]).await;
        assert_eq!(code, 65, "{name}: {stderr}");
        assert!(stderr.contains(want), "{name}: want {want:?} in:\n{stderr}");
    }
    assert!(h.emulator.stats().requests.is_empty());

    // The daemon: the good job runs, the bad ones are reported, nothing else.
    h.write_job("good.toml", GOOD);
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(
        code, 65,
        "all runs complete, but job files were invalid: {stderr}"
    );
    assert_eq!(h.manifest("good")["state"], "complete");
    let ledger = h.ledger();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].key, "c_good00001");
    for (name, _, _, want) in BAD {
        assert!(
            stderr.contains(&want.replace('"', "\\\"")),
            "{name}: the log names the problem {want:?}"
        );
    }
    assert!(
        stderr.contains(&format!("{} invalid job file(s)", BAD.len())),
        "{stderr}"
    );

    // A half-written file becomes a run once it is complete.
    h.write_job("late.toml", "provider = \"scraper_studio\"\ncollector = \"c_late0001\"\ninputs = [{url = \"https://a.example/");
    let (code, _, _) = h.run_once().await;
    assert_eq!(code, 65);
    h.write_job("late.toml", "provider = \"scraper_studio\"\ncollector = \"c_late0001\"\ninputs = [{url = \"https://a.example/9\"}]\n");
    let (code, _, _) = h.run_once().await;
    assert_eq!(code, 65, "still 65: the other bad files are still there");
    assert_eq!(h.manifest("late")["state"], "complete");
    assert_eq!(h.ledger().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_and_hidden_files_are_not_jobs() {
    let h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    for name in [
        "a.toml.tmp",
        "b.toml.part",
        ".c.toml",
        "d.toml~",
        "e.toml.swp",
        "f.toml.filepart",
    ] {
        h.write_job(name, GOOD);
    }
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    assert!(h.emulator.stats().requests.is_empty());
    assert!(!h.path("out").join("a").exists());
}

/// A job file and what `validate` and the daemon must say about it.
struct Hostile {
    name: &'static str,
    /// `None`: made on disk by `make` (directories, FIFOs, symlinks).
    bytes: Option<Vec<u8>>,
    /// An inputs file beside it.
    beside: Option<(&'static str, Vec<u8>)>,
    want: &'static str,
}

fn sc(rest: &str) -> Vec<u8> {
    format!("provider = \"scraper_studio\"\ncollector = \"c_abc\"\n{rest}").into_bytes()
}

fn hostile_corpus() -> Vec<Hostile> {
    let h = |name, bytes: Vec<u8>, want| Hostile {
        name,
        bytes: Some(bytes),
        beside: None,
        want,
    };
    let with = |name, file, inputs: Vec<u8>, want| Hostile {
        name,
        bytes: Some(sc(&format!("inputs_file = \"{file}\"\n"))),
        beside: Some((file, inputs)),
        want,
    };
    let on_disk = |name, want| Hostile {
        name,
        bytes: None,
        beside: None,
        want,
    };
    let one = "inputs = [{url = \"https://a.example\"}]\n";
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend(sc(&format!("chunk_size = \"x\"\n{one}")));
    vec![
        h("truncated.json", b"{\"provider\": \"scraper_studio\", \"collector\": \"c_abc\", \"inputs\": [{\"url\": \"https://a.ex".to_vec(), "truncated.json:1: invalid JSON: EOF while parsing"),
        h("types.toml", sc(&format!("{one}chunk_size = \"500\"\n")), "types.toml:4: field 'chunk_size': must be an integer, found a string"),
        h("bom.toml", bom, "bom.toml:3: field 'chunk_size': must be an integer"),
        h("hugeint.toml", sc(&format!("{one}chunk_size = 99999999999999999999999\n")), "hugeint.toml:4: invalid TOML"),
        h("negative.toml", sc(&format!("{one}chunk_size = -5\n")), "negative.toml:4: field 'chunk_size': -5 is outside 1..=5000"),
        h("deep.toml", sc(&format!("inputs = {}{}\n", "[".repeat(100_000), "]".repeat(100_000))), "deep.toml:3: invalid TOML: cannot recurse further"),
        h("deep.json", format!("{{\"provider\": \"scraper_studio\", \"inputs\": {}{}}}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(), "deep.json:1: invalid JSON: recursion limit exceeded"),
        h("dupkey.json", b"{\"provider\": \"scraper_studio\", \"provider\": \"firecrawl\", \"collector\": \"c_abc\"}".to_vec(), "dupkey.json:1: invalid JSON: the key 'provider' is given twice"),
        h("cron61.toml", sc(&format!("{one}cron = \"61 * * * *\"\n")), "cron61.toml:4: field 'cron': '61 * * * *': minute field '61': 61 is outside 0-59"),
        h("every0.toml", sc(&format!("{one}every = \"0s\"\n")), "every0.toml:4: field 'every': '0s' is too frequent"),
        h("params.toml", sc(&format!("{one}params = 5\n")), "params.toml:4: field 'params': must be a table/object"),
        h("nul.toml", b"provider = \"scraper_studio\"\x00\ncollector = \"c_abc\"\n".to_vec(), "nul.toml:1: invalid TOML"),
        h("utf8.toml", b"provider = \"scraper_studio\"\ncollector = \"c_\xff\xfe\"\n".to_vec(), "utf8.toml:2: is not valid UTF-8"),
        h("ten-mb.toml", sc(&format!("# {}\n{one}", "x".repeat(10 * 1024 * 1024))), "ten-mb.toml: is 10485"),
        h("dupinline.toml", sc("inputs = [{url = \"https://a.example\"}, {url = \"https://a.example\"}]\n"), "field 'inputs': element 2: the same input as element 1"),
        h("fcnourl.toml", b"provider = \"firecrawl\"\ninputs = [{name = \"x\"}]\n".to_vec(), "fcnourl.toml:2: field 'inputs': element 1: field 'url': is required for firecrawl inputs"),
        with("dups.toml", "dups.txt", "https://a.example/same\n".repeat(1_000_000).into_bytes(), "dups.txt:2: the same input as line 1"),
        with("longurl.toml", "longurl.ndjson", format!("{{\"url\": \"https://a.example/{}\"}}\n", "x".repeat(20_000)).into_bytes(), "longurl.ndjson:1: field 'url': is 20018 bytes long"),
        with("dupfield.toml", "dupfield.ndjson", b"{\"url\": \"https://a.example\", \"url\": \"https://b.example\"}\n".to_vec(), "dupfield.ndjson:1: invalid JSON: the key 'url' is given twice"),
        with("notarray.toml", "notarray.json", b"{\"url\": \"https://a.example\"}".to_vec(), "notarray.json:1: expected a JSON array"),
        with("truncarray.toml", "truncarray.json", b"[{\"url\": \"https://a.example\"}, {\"url\": \"https://b.ex".to_vec(), "truncarray.json:1: the JSON array ends early"),
        with("csvutf8.toml", "csvutf8.csv", b"url\nhttps://a.example\nhttps://b.example/\xff\xfe\n".to_vec(), "csvutf8.csv:3: is not valid UTF-8"),
        with("csvempty.toml", "csvempty.csv", Vec::new(), "csvempty.csv:1: the header row is empty"),
        with("xlsx.toml", "in.xlsx", b"PK".to_vec(), "xlsx.toml:3: field 'inputs_file': 'in.xlsx' must end in .csv"),
        Hostile {
            name: "dirinputs.toml",
            bytes: Some(sc("inputs_file = \"adir.csv\"\n")),
            beside: None,
            want: "adir.csv: not a regular file",
        },
        Hostile {
            name: "fifoinputs.toml",
            bytes: Some(sc("inputs_file = \"afifo.csv\"\n")),
            beside: None,
            want: "afifo.csv: not a regular file",
        },
        Hostile {
            name: "loopinputs.toml",
            bytes: Some(sc("inputs_file = \"aloop.csv\"\n")),
            beside: None,
            want: "aloop.csv: Too many levels of symbolic links",
        },
        on_disk("loop.toml", "loop.toml: cannot read: Too many levels of symbolic links"),
        on_disk("dir.toml", "dir.toml: not a regular file"),
        on_disk("fifo.toml", "fifo.toml: not a regular file"),
        on_disk("dangling.toml", "dangling.toml: cannot read: No such file or directory"),
    ]
}

/// Directories, FIFOs and symlinks the corpus names.
fn make_special_files(jobs: &std::path::Path) {
    use std::os::unix::fs::symlink;
    for dir in ["dir.toml", "adir.csv"] {
        std::fs::create_dir(jobs.join(dir)).unwrap();
    }
    for fifo in ["fifo.toml", "afifo.csv"] {
        let made = std::process::Command::new("mkfifo")
            .arg(jobs.join(fifo))
            .status()
            .unwrap();
        assert!(made.success());
    }
    symlink("loop.toml", jobs.join("loop.toml")).unwrap();
    symlink("aloop.csv", jobs.join("aloop.csv")).unwrap();
    symlink("nowhere.toml", jobs.join("dangling.toml")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corpus_of_hostile_files_each_gets_a_clear_error_and_the_daemon_runs_on() {
    let h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    let jobs = h.path("jobs");
    let corpus = hostile_corpus();
    for case in &corpus {
        if let Some(bytes) = &case.bytes {
            std::fs::write(jobs.join(case.name), bytes).unwrap();
        }
        if let Some((file, bytes)) = &case.beside {
            std::fs::write(jobs.join(file), bytes).unwrap();
        }
    }
    make_special_files(&jobs);
    // Not for root, who reads anything: the kernel would not refuse.
    let unreadable = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout != b"0\n");
    if unreadable {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(jobs.join("noperm.toml"), GOOD).unwrap();
        std::fs::set_permissions(
            jobs.join("noperm.toml"),
            std::fs::Permissions::from_mode(0o000),
        )
        .unwrap();
    }
    assert!(corpus.len() + BAD.len() >= 30);

    for case in &corpus {
        let path = jobs.join(case.name);
        let (code, _, stderr) = h.run(&["validate", path.to_str().unwrap()]).await;
        assert_eq!(code, 65, "{}: {stderr}", case.name);
        assert!(
            stderr.contains(case.want),
            "{}: want {:?} in:\n{stderr}",
            case.name,
            case.want
        );
    }
    assert!(h.emulator.stats().requests.is_empty());

    // The daemon, with every hostile file present: the good job runs, each
    // bad one is reported, and nothing hangs on the FIFOs.
    h.write_job("good.toml", GOOD);
    let mut d = h.start_daemon().await;
    d.wait_for_line("run complete").await;
    // Each job is read on its own, so the big ones are reported after the
    // good job ran: wait for every name (wait_for_line fails on a timeout).
    for case in &corpus {
        let stem = case.name.rsplit_once('.').unwrap().0;
        let named = |l: &String| {
            l.contains("invalid job file") && l.contains(&format!("\"job\":\"{stem}\""))
        };
        while !d.seen.iter().any(named) {
            d.wait_for_line("invalid job file").await;
        }
    }
    if unreadable {
        assert!(d
            .seen
            .iter()
            .any(|l| l.contains("noperm.toml: cannot read: Permission denied")));
    }
    // Still running and still taking work beside them.
    h.write_job("later.toml", &GOOD.replace("c_good00001", "c_later0001"));
    d.wait_for_line("run complete").await;
    d.signal(15);
    assert_eq!(d.wait().await, 0);
    let keys: Vec<String> = h.ledger().into_iter().map(|e| e.key).collect();
    assert_eq!(keys, ["c_good00001", "c_later0001"]);
}
