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
