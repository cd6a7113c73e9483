//! Hostile job and input files: whatever the bytes, the parser and the
//! input readers answer with problems, never a panic (issue: crash safety,
//! hostile job files). Cases are many and cheap, so CI runs 100,000+.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use harvestd::jsonstream::ArraySplitter;
use harvestd::spec;
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Bytes that look like job files: fragments of real ones, mixed with noise.
fn job_like() -> impl Strategy<Value = Vec<u8>> {
    let fragments = prop::sample::select(vec![
        "provider = \"scraper_studio\"\n",
        "collector = \"c_abc\"\n",
        "inputs = [{url = \"https://a\"}]\n",
        "inputs_file = \"x.csv\"\n",
        "chunk_size = 0\n",
        "formats = [\"csv\"]\n",
        "every = \"1h\"\n",
        "cron = \"*/5 * * * *\"\n",
        "[params]\n",
        "[csv]\nescape_formulas = 1\n",
        "\"",
        "{",
        "}",
        "[",
        "]",
        "=",
        ",",
        "\n",
        "\u{feff}",
        "é",
        "\u{0}",
        "colector = 3\n",
        "{\"provider\": ",
        "\"inputs\": [",
        "dedup_key = \"..\"\n",
        "jitter = \"99days\"\n",
        "cron = \"61 25 32 13 8\"\n",
    ]);
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        prop::collection::vec(fragments, 0..20).prop_map(|v| v.concat().into_bytes()),
    ]
}

proptest! {
    #![proptest_config(config(50_000))]

    #[test]
    fn job_files_never_panic(bytes in job_like(), json in any::<bool>()) {
        let name = if json { "jobs/x.json" } else { "jobs/x.toml" };
        match spec::parse(Path::new(name), &bytes) {
            Ok(_) => {}
            Err(problems) => {
                prop_assert!(!problems.is_empty());
                for p in problems {
                    prop_assert!(p.to_string().starts_with(name));
                }
            }
        }
    }

    #[test]
    fn the_array_splitter_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400), piece in 1usize..17) {
        let mut s = ArraySplitter::new();
        for part in bytes.chunks(piece) {
            if s.feed(part, |_| Ok::<(), ()>(())).is_err() {
                break;
            }
        }
        let _ = s.finish();
    }

}

proptest! {
    #![proptest_config(config(2_000))]

    #[test]
    fn the_splitter_agrees_with_serde(values in prop::collection::vec(any::<(u8, String, bool)>(), 0..20), piece in 1usize..9) {
        let rows: Vec<serde_json::Value> = values
            .iter()
            .map(|(n, s, b)| serde_json::json!({"n": n, "s": s, "b": b, "nested": {"a": [n, s]}}))
            .collect();
        let text = serde_json::to_string_pretty(&rows).unwrap();
        let mut s = ArraySplitter::new();
        let mut got = Vec::new();
        for part in text.as_bytes().chunks(piece) {
            s.feed(part, |e| {
                got.push(serde_json::from_slice::<serde_json::Value>(e).unwrap());
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        prop_assert!(s.finish().is_ok());
        prop_assert_eq!(got, rows);
    }
}

proptest! {
    #![proptest_config(config(5_000))]

    #[test]
    fn input_files_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), kind in 0usize..4) {
        let dir = tempfile::tempdir().unwrap();
        let name = ["in.csv", "in.ndjson", "in.json", "in.txt"][kind];
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let mut rows = 0u64;
        let file = spec::InputsFile::new(dir.path(), name);
        let result = spec::inputs::for_each(&file, |_| {}, |_, row| {
            rows += 1;
            spec::inputs::check_row(row, None).ok();
            Ok(())
        });
        if let Ok(n) = result {
            prop_assert_eq!(n, rows);
        }
    }
}

/// One thing in a random directory layout: where it is and what it is.
#[derive(Debug, Clone)]
enum Node {
    Dir(usize),
    File(usize),
    Link(usize, usize),
}

/// Places, by index: inside the jobs directory or beside it.
const PLACES: &[&str] = &[
    "jobs/a",
    "jobs/b",
    "jobs/a/c",
    "jobs/d.txt",
    "jobs/a/e.txt",
    "out/f.txt",
    "out",
    "out/g",
    "jobs/b/h.txt",
    "jobs/i",
];

/// Link targets, by index: inside, outside, relative, absolute, loops.
const TARGETS: &[&str] = &[
    "d.txt",
    "../d.txt",
    "../out/f.txt",
    "../../out/f.txt",
    "ABS/out/f.txt",
    "ABS/jobs/d.txt",
    "..",
    ".",
    "c",
    "a/e.txt",
    "ABS/out",
    "i",
];

/// Names a job file could give as `inputs_file`.
const NAMES: &[&str] = &[
    "d.txt",
    "a/e.txt",
    "a/c/e.txt",
    "b/h.txt",
    "i",
    "i/f.txt",
    "a/c",
    "b/f.txt",
    "a/c/f.txt",
    "i/d.txt",
    "b/d.txt",
    "a/c/c/d.txt",
];

proptest! {
    #![proptest_config(config(400))]

    /// Whatever the links, `inputs_file` reads only files inside the jobs
    /// directory, and no problem text quotes a byte of one outside it.
    #[test]
    fn inputs_files_never_read_outside_the_jobs_directory(
        nodes in prop::collection::vec(
            prop_oneof![
                (0..PLACES.len()).prop_map(Node::Dir),
                (0..PLACES.len()).prop_map(Node::File),
                (0..PLACES.len(), 0..TARGETS.len()).prop_map(|(p, t)| Node::Link(p, t)),
            ],
            1..12,
        ),
        name in 0..NAMES.len(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("jobs")).unwrap();
        std::fs::create_dir_all(root.join("out")).unwrap();
        for node in &nodes {
            let (place, inside) = match node {
                Node::Dir(p) | Node::File(p) | Node::Link(p, _) => {
                    (root.join(PLACES[*p]), PLACES[*p].starts_with("jobs/"))
                }
            };
            if place.symlink_metadata().is_ok() {
                continue;
            }
            if let Some(parent) = place.parent() {
                if std::fs::create_dir_all(parent).is_err() {
                    continue;
                }
            }
            match node {
                Node::Dir(_) => {
                    let _ = std::fs::create_dir(&place);
                }
                Node::File(_) => {
                    // Outside: a line the URL check would quote back if it were read.
                    let text = if inside { "https://inside.example/\n" } else { "SECRET-not-a-url\n" };
                    let _ = std::fs::write(&place, text);
                }
                Node::Link(_, t) => {
                    let target = TARGETS[*t].replace("ABS", &root.display().to_string());
                    let _ = std::os::unix::fs::symlink(target, &place);
                }
            }
        }
        let jobs = root.join("jobs");
        let file = spec::InputsFile::new(&jobs, NAMES[name]);
        if let Ok(mut f) = file.open() {
            let mut text = String::new();
            use std::io::Read;
            let _ = f.read_to_string(&mut text);
            prop_assert!(!text.contains("SECRET"), "read outside: {nodes:?} {}", NAMES[name]);
        }
        let job = jobs.join("j.toml");
        std::fs::write(
            &job,
            format!("provider = \"scraper_studio\"\ncollector = \"c_x\"\ninputs_file = \"{}\"\n", NAMES[name]),
        )
        .unwrap();
        if let Err(problems) = spec::load(&job) {
            for p in problems {
                prop_assert!(!p.to_string().contains("SECRET"), "{p}");
            }
        }
    }
}
