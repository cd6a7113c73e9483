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
        let result = spec::inputs::for_each(&path, |_, row| {
            rows += 1;
            spec::inputs::check_row(row, None).ok();
            Ok(())
        });
        if let Ok(n) = result {
            prop_assert_eq!(n, rows);
        }
    }
}
