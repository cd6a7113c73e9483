//! `data.parquet` (`docs/outputs.md`): read back with the Arrow project's
//! own reader and compared with `data.json` row by row, for rows of odd
//! shapes through the writer, and for each provider through the daemon.
#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_agree, read_json, Harness};
use harvestd::sink::parquet::{read_rows, ParquetOut, Schema};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn round_trip(rows: &[Value]) -> Vec<Value> {
    let mut schema = Schema::default();
    rows.iter().for_each(|r| schema.learn(r));
    let mut out = ParquetOut::create(Vec::new(), schema).unwrap();
    for row in rows {
        out.row(row.clone(), row.to_string().len()).unwrap();
    }
    assert_eq!(out.rows, rows.len() as u64);
    read_rows(out.finish().unwrap().into()).unwrap()
}

#[test]
fn rows_of_every_shape_read_back_as_their_json() {
    let mut rows = vec![
        json!({"url": "a", "n": 1, "x": 1, "tags": ["a", "b"], "about": {"k": 1, "deep": {"z": [1, 2]}}}),
        json!({"url": "b", "n": 2.5, "x": "one", "tags": [], "about": {"k": 2, "extra": true}}),
        json!({"url": "c", "x": {"o": [1, {"p": null}]}, "about": null, "big": 18446744073709551615u64}),
        json!({"url": "ü ✓ \"q\"", "n": -3, "empty": {}, "mixed": [1, "a", null], "": "blank key"}),
        json!("a bare string"),
        json!([1, 2]),
    ];
    // More rows than one record batch holds, so batches join up.
    rows.extend((0..10_000).map(|i| json!({"url": format!("u{i}"), "n": i})));
    let back = round_trip(&rows);
    assert_agree(&back, &rows);
    // As the file has them: widened, or JSON text where types disagree.
    assert_eq!(back[0]["n"], json!(1.0));
    assert_eq!(back[1]["x"], json!("\"one\""));
    assert_eq!(back[2]["x"], json!(r#"{"o":[1,{"p":null}]}"#));
    assert_eq!(back[3]["empty"], json!("{}"));
    assert_eq!(back[4]["value"], json!("\"a bare string\""));
}

#[test]
fn no_rows_and_rows_without_fields_make_a_readable_file() {
    assert!(round_trip(&[]).is_empty());
    assert_eq!(round_trip(&[json!({}), json!({})]), [json!({}), json!({})]);
}

/// Each provider's rows through the daemon: `data.parquet` holds what
/// `data.json` holds, row by row, never an error row, and the manifest
/// names it with its rows and the sha256 of its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_providers_rows_land_in_parquet_as_in_json() {
    let h = Harness::new(
        "[defaults]\nbuild_time = \"100ms\"\nerror_every = 9\n\
         [firecrawl]\nbuild_time = \"100ms\"\nfail_every = 7\n",
    )
    .await;
    let urls = |n: usize, host: &str| -> String {
        (0..n)
            .map(|i| format!("https://{host}/p/{i:04}\n"))
            .collect()
    };
    let jobs = [
        (
            "studio",
            120,
            "provider = \"scraper_studio\"\ncollector = \"c_parquet001\"\nchunk_size = 50",
        ),
        (
            "web",
            120,
            "provider = \"web_scraper\"\ndataset_id = \"gd_parquet001\"\nchunk_size = 50",
        ),
        ("docs", 60, "provider = \"firecrawl\"\nchunk_size = 25"),
    ];
    for (job, n, head) in jobs {
        std::fs::write(
            h.path(&format!("jobs/{job}.txt")),
            urls(n, &format!("{job}.example.com")),
        )
        .unwrap();
        h.write_job(
            &format!("{job}.toml"),
            &format!("{head}\ninputs_file = \"{job}.txt\"\nformats = [\"json\", \"parquet\"]\n"),
        );
    }

    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    for job in ["studio", "web", "docs"] {
        let run = h.run_dir(job);
        let json = read_json(&run.join("data.json"));
        let json = json.as_array().unwrap();
        assert!(!json.is_empty(), "{job}: rows");
        let bytes = std::fs::read(run.join("data.parquet")).unwrap();
        let back = read_rows(bytes.clone().into()).unwrap();
        assert_agree(&back, json);
        assert!(
            back.iter().all(|r| r.get("error").is_none()),
            "{job}: no error row in data.parquet"
        );
        let manifest = h.manifest(job);
        let entry = manifest["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["file"] == "data.parquet")
            .unwrap_or_else(|| panic!("{job}: data.parquet in {manifest}"))
            .clone();
        assert_eq!(entry["rows"], json.len(), "{job}");
        assert_eq!(entry["bytes"], bytes.len(), "{job}");
        assert_eq!(
            entry["sha256"],
            hex::encode(Sha256::digest(&bytes)),
            "{job}"
        );
    }
}
