use super::*;

fn check(name: &str, text: &str) -> Result<JobSpec, Vec<String>> {
    parse(Path::new(name), text.as_bytes())
        .map_err(|ps| ps.iter().map(ToString::to_string).collect())
}

#[test]
fn a_full_toml_job() {
    let spec = check(
        "jobs/speakers.toml",
        r#"
provider = "scraper_studio"
collector = "c_lq7x2mbo1gv6pky9d"
inputs_file = "speakers.csv"
chunk_size = 500
formats = ["csv", "json"]
every = "6h"

[params]
queue_next = 1
deadline = "2h"
"#,
    )
    .expect("valid");
    assert_eq!(spec.name, "speakers");
    assert_eq!(spec.key, "c_lq7x2mbo1gv6pky9d");
    assert_eq!(spec.chunk_size, 500);
    assert_eq!(
        spec.inputs,
        InputSource::File(InputsFile::new("jobs", "speakers.csv"))
    );
    assert_eq!(
        spec.schedule,
        Some(Schedule::Every(Duration::from_secs(6 * 3600)))
    );
    assert!(spec.escape_formulas);
}

#[test]
fn unknown_field_is_named_with_line_and_suggestion() {
    let errs = check(
        "jobs/speakers.toml",
        "provider = \"scraper_studio\"\n\ncolector = \"c_abc\"\ninputs = [{ url = \"https://a.example\" }]\n",
    )
    .unwrap_err();
    assert!(
        errs.contains(
            &"jobs/speakers.toml:3: unknown field 'colector' (did you mean 'collector'?)"
                .to_string()
        ),
        "{errs:?}"
    );
    // The missing collector is reported too: every problem, not the first.
    assert!(
        errs.iter()
            .any(|e| e.contains("field 'collector': is required")),
        "{errs:?}"
    );
}

#[test]
fn every_problem_is_reported() {
    let errs = check(
        "jobs/x.json",
        r#"{
  "provider": "scraper_studio",
  "collector": "gd_wrongprefix",
  "inputs": [{"url": "ftp://nope"}],
  "chunk_size": 0,
  "formats": ["csv", "xlsx"],
  "every": "10s",
  "params": {"name": "mine"}
}"#,
    )
    .unwrap_err();
    let joined = errs.join("\n");
    for needle in [
        "jobs/x.json:3: field 'collector': 'gd_wrongprefix' is not an id of the form c_",
        "jobs/x.json:4: field 'inputs': element 1: field 'url'",
        "jobs/x.json:5: field 'chunk_size': 0 is outside 1..=5000",
        "jobs/x.json:6: field 'formats': \"xlsx\"",
        "jobs/x.json:7: field 'every': '10s' is too frequent",
        "jobs/x.json:8: field 'params': 'name' is set by harvestd",
    ] {
        assert!(joined.contains(needle), "missing {needle:?} in\n{joined}");
    }
}

#[test]
fn syntax_errors_carry_lines() {
    let errs = check(
        "jobs/a.toml",
        "provider = \"scraper_studio\"\ncollector = \n",
    )
    .unwrap_err();
    assert!(
        errs[0].starts_with("jobs/a.toml:2: invalid TOML"),
        "{errs:?}"
    );
    let errs = check("jobs/a.json", "{\n\"provider\": \"firecrawl\",\n}").unwrap_err();
    assert!(
        errs[0].starts_with("jobs/a.json:3: invalid JSON"),
        "{errs:?}"
    );
    let errs = check("jobs/a.json", "[1,2]").unwrap_err();
    assert!(errs[0].contains("must be a JSON object"), "{errs:?}");
    let errs = check("jobs/a.toml", "  \n").unwrap_err();
    assert!(errs[0].ends_with("is empty"), "{errs:?}");
}

#[test]
fn provider_specific_fields() {
    let errs = check(
        "jobs/w.toml",
        "provider = \"web_scraper\"\ncollector = \"c_x\"\ninputs = [{url = \"https://a.example\"}]\n",
    )
    .unwrap_err();
    let joined = errs.join("\n");
    assert!(
        joined.contains("field 'dataset_id': is required for web_scraper jobs"),
        "{joined}"
    );
    assert!(
        joined.contains("jobs/w.toml:2: field 'collector': is only for scraper_studio jobs"),
        "{joined}"
    );
    let spec = check(
        "jobs/f.toml",
        "provider = \"firecrawl\"\ninputs = [{url = \"https://a.example\"}]\n",
    )
    .unwrap();
    assert_eq!(spec.chunk_size, 100);
    assert_eq!(spec.api_version, ApiVersion::V2);
}

#[test]
fn job_names_follow_the_pattern() {
    assert!(is_valid_job_name("speakers-2024.v1_x"));
    for bad in ["", "Speakers", "-x", ".hidden", "a b", &"a".repeat(65)] {
        assert!(!is_valid_job_name(bad), "{bad}");
    }
}

fn write(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn input_files_of_every_kind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "a.csv",
        b"\xEF\xBB\xBFurl,name\nhttps://a.example,A\nhttps://b.example,\"B, b\"\n",
    );
    write(
        d,
        "b.ndjson",
        b"{\"url\":\"https://a.example\"}\n\n{\"url\":\"https://b.example\",\"k\":1}\n",
    );
    write(
        d,
        "c.json",
        b"[\n {\"url\":\"https://a.example\"},\n {\"url\":\"https://b.example\"}\n]\n",
    );
    write(
        d,
        "d.txt",
        b"https://a.example\n# a comment\nhttps://b.example\n",
    );
    for f in ["a.csv", "b.ndjson", "c.json", "d.txt"] {
        let mut urls = Vec::new();
        let n = inputs::for_each(
            &InputsFile::new(d, f),
            |_| {},
            |_, row| {
                urls.push(row["url"].as_str().unwrap().to_string());
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(n, 2, "{f}");
        assert_eq!(urls, ["https://a.example", "https://b.example"], "{f}");
    }
}

#[test]
fn input_file_problems_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: &[(&str, &[u8], usize, &str)] = &[
        (
            "ragged.csv",
            b"url,name\nhttps://a.example,A\nhttps://b.example\n",
            3,
            "row has 1 fields",
        ),
        (
            "bad.ndjson",
            b"{\"url\":\"https://a.example\"}\n{\"url\":\n",
            2,
            "invalid JSON",
        ),
        (
            "scalar.ndjson",
            b"{\"url\":\"https://a.example\"}\n42\n",
            2,
            "expected a JSON object",
        ),
        (
            "notarray.json",
            b"{\"url\":\"https://a.example\"}",
            1,
            "expected a JSON array",
        ),
        (
            "trunc.json",
            b"[{\"url\":\"https://a.example\"},\n{\"url\":",
            2,
            "truncated",
        ),
        (
            "utf8.txt",
            b"https://a.example\nhttps://b\xff.example\n",
            2,
            "not valid UTF-8",
        ),
    ];
    for (name, body, line, needle) in cases {
        write(d, name, body);
        let err = inputs::for_each(&InputsFile::new(d, name), |_| {}, |_, _| Ok(())).unwrap_err();
        assert_eq!(err.line(), Some(*line), "{name}: {err}");
        assert!(err.to_string().contains(needle), "{name}: {err}");
    }
}

#[test]
fn a_line_or_record_over_one_mebibyte_is_refused_by_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let long = "x".repeat(inputs::MAX_RECORD_BYTES + 10);
    let cases: Vec<(&str, String, usize, &str)> = vec![
        (
            "nl.txt",
            format!("https://a.example\nhttps://{long}"),
            2,
            "the line is longer than 1 MiB",
        ),
        (
            "nl.ndjson",
            format!("{{\"url\":\"https://a.example\"}}\n{{\"url\":\"{long}\"}}\n"),
            2,
            "the line is longer than 1 MiB",
        ),
        (
            "quote.csv",
            format!(
                "url\nhttps://a.example\n\"{}",
                "y\n".repeat(inputs::MAX_RECORD_BYTES)
            ),
            3,
            "the row is longer than 1 MiB",
        ),
        (
            "row.csv",
            format!("url,name\nhttps://a.example,A\nhttps://b.example,{long}\n"),
            3,
            "the row is longer than 1 MiB",
        ),
        (
            "el.json",
            format!("[{{\"url\":\"https://a.example\"}},\n{{\"url\":\"{long}\"}}]"),
            2,
            "the element is longer than 1 MiB",
        ),
    ];
    for (name, body, line, needle) in cases {
        write(d, name, body.as_bytes());
        let mut rows = 0;
        let err = inputs::for_each(
            &InputsFile::new(d, name),
            |_| {},
            |_, _| {
                rows += 1;
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(err.line(), Some(line), "{name}: {err}");
        assert!(err.to_string().contains(needle), "{name}: {err}");
        assert_eq!(rows, 1, "{name}: the row before it was read");
    }
    // A minified array on one line is fine: the cap is per element.
    let many: Vec<String> = (0..40_000)
        .map(|i| format!("{{\"url\":\"https://a.example/{i}\"}}"))
        .collect();
    write(d, "one.json", format!("[{}]", many.join(",")).as_bytes());
    let n = inputs::for_each(&InputsFile::new(d, "one.json"), |_| {}, |_, _| Ok(())).unwrap();
    assert_eq!(n, 40_000);
}

#[test]
fn every_byte_read_passes_through_the_hash() {
    let dir = tempfile::tempdir().unwrap();
    let body = b"url\nhttps://a.example\nhttps://b.example\n";
    write(dir.path(), "h.csv", body);
    let mut seen = Vec::new();
    inputs::for_each(
        &InputsFile::new(dir.path(), "h.csv"),
        |b| seen.extend_from_slice(b),
        |_, _| Ok(()),
    )
    .unwrap();
    assert_eq!(seen, body);
}

#[test]
fn a_cron_schedule_runs_in_its_timezone() {
    let job = |extra: &str| {
        check(
            "jobs/nightly.toml",
            &format!(
                "provider = \"scraper_studio\"\ncollector = \"c_abc\"\ninputs = [{{ url = \"https://a.example\" }}]\n{extra}"
            ),
        )
    };
    let spec = job("cron = \"@daily\"\ntimezone = \"Europe/Berlin\"\n").expect("valid");
    assert_eq!(
        spec.schedule,
        Some(Schedule::Cron("CRON_TZ=Europe/Berlin @daily".into()))
    );
    for (extra, needle) in [
        (
            "cron = \"0 2 * * *\"\ntimezone = \"Mars/Olympus\"\n",
            "jobs/nightly.toml:5: field 'timezone': 'Mars/Olympus' is not an IANA time zone",
        ),
        (
            "every = \"6h\"\ntimezone = \"Europe/Berlin\"\n",
            "field 'timezone': only applies to a 'cron' schedule",
        ),
    ] {
        let errs = job(extra).unwrap_err();
        assert!(errs.iter().any(|e| e.contains(needle)), "{extra}: {errs:?}");
    }
}
