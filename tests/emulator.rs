//! The emulator answers as brightdata.md says the real API does. These
//! checks use plain HTTP, not harvestd's client, so the two stay independent.
#![allow(clippy::unwrap_used)]

use harvestd::emulator::{Emulator, Scenario, DEMO_BRIGHTDATA_TOKEN};
use serde_json::{json, Value};

async fn emulator(scenario: &str) -> Emulator {
    let scenario: Scenario = toml::from_str(scenario).unwrap();
    Emulator::start(([127, 0, 0, 1], 0).into(), scenario)
        .await
        .unwrap()
}

struct Answer {
    status: u16,
    text: String,
}

async fn call(
    method: reqwest::Method,
    url: String,
    auth: Option<&str>,
    body: Option<Value>,
) -> Answer {
    let mut r = reqwest::Client::new().request(method, url);
    if let Some(a) = auth {
        r = r.header("Authorization", a);
    }
    if let Some(b) = body {
        r = r
            .header("Content-Type", "application/json")
            .body(b.to_string());
    }
    let resp = r.send().await.unwrap();
    Answer {
        status: resp.status().as_u16(),
        text: resp.text().await.unwrap(),
    }
}

/// An authorised GET of `path` on the emulator.
async fn get(e: &Emulator, path: &str) -> Answer {
    call(
        reqwest::Method::GET,
        format!("{}{path}", e.url()),
        Some(&bearer()),
        None,
    )
    .await
}

fn bearer() -> String {
    format!("Bearer {DEMO_BRIGHTDATA_TOKEN}")
}

#[tokio::test]
async fn the_three_401_texts() {
    let e = emulator("").await;
    let url = format!("{}/dca/log/j_x", e.url());
    let none = call(reqwest::Method::GET, url.clone(), None, None).await;
    let basic = call(reqwest::Method::GET, url.clone(), Some("Basic abc"), None).await;
    let wrong = call(reqwest::Method::GET, url, Some("Bearer nope"), None).await;
    assert_eq!(
        (none.status, none.text.as_str()),
        (401, "Credentials are missing")
    );
    assert_eq!(
        (basic.status, basic.text.as_str()),
        (401, "Auth method is not supported")
    );
    assert_eq!(
        (wrong.status, wrong.text.as_str()),
        (401, "Invalid credentials")
    );
}

#[tokio::test]
async fn trigger_checks_collector_and_body() {
    let e = emulator(
        "unknown_collectors = \"reject\"\n[collectors.c_known0001]\ninput_fields = [\"url\"]\n\
         [collectors.c_realtime01]\nrealtime = true\n",
    )
    .await;
    let a = bearer();
    let post = |collector: &str, body: Value| {
        call(
            reqwest::Method::POST,
            format!("{}/dca/trigger?collector={collector}&name=t1", e.url()),
            Some(&a),
            Some(body),
        )
    };
    let unknown = post("c_other00001", json!([{"url": "https://a"}])).await;
    assert_eq!(
        (unknown.status, unknown.text.as_str()),
        (404, "Collector not found")
    );
    let realtime = post("c_realtime01", json!([{"url": "https://a"}])).await;
    assert_eq!(realtime.status, 400);
    assert!(realtime
        .text
        .starts_with("Cannot trigger a batch job with a real-time scraper"));
    let empty = post("c_known0001", json!([])).await;
    assert_eq!(
        (empty.status, empty.text.as_str()),
        (400, "No data to trigger")
    );
    let invalid = post("c_known0001", json!([{"keyword": "x"}])).await;
    assert_eq!(invalid.status, 422);
    assert_eq!(
        serde_json::from_str::<Value>(&invalid.text).unwrap()["code"],
        "validation_error"
    );
    let ok = post(
        "c_known0001",
        json!({"input": [{"url": "https://a"}], "deliver": {"type": "webhook"}}),
    )
    .await;
    assert_eq!(ok.status, 200);
    let body: Value = serde_json::from_str(&ok.text).unwrap();
    assert!(body["collection_id"].as_str().unwrap().starts_with("j_"));
    assert!(body["start_eta"].is_string());
    assert_eq!(e.ledger().len(), 1, "only the accepted trigger is billed");
}

#[tokio::test]
async fn job_lifecycle_on_the_emulator_clock() {
    let e = emulator(
        "[defaults]\nbuild_time = \"1h\"\nlog_keys = \"lower\"\nbuilding_reply = \"200_object\"\nretention = \"16days\"\n",
    )
    .await;
    let a = bearer();
    let t = call(
        reqwest::Method::POST,
        format!("{}/dca/trigger?collector=c_life000001&name=life", e.url()),
        Some(&a),
        Some(json!([{"url": "https://a"}, {"url": "https://b"}])),
    )
    .await;
    let id = serde_json::from_str::<Value>(&t.text).unwrap()["collection_id"]
        .as_str()
        .unwrap()
        .to_string();
    let log = || {
        call(
            reqwest::Method::GET,
            format!("{}/dca/log/{id}", e.url()),
            Some(&a),
            None,
        )
    };
    let dataset = || {
        call(
            reqwest::Method::GET,
            format!("{}/dca/dataset?id={id}&format=json", e.url()),
            Some(&a),
            None,
        )
    };

    let running: Value = serde_json::from_str(&log().await.text).unwrap();
    assert_eq!(running["status"], "building", "lowercase keys: {running}");
    let building = dataset().await;
    assert_eq!(building.status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&building.text).unwrap()["status"],
        "building"
    );

    e.advance(std::time::Duration::from_secs(3600));
    let done: Value = serde_json::from_str(&log().await.text).unwrap();
    assert_eq!(
        (done["status"].as_str(), done["lines"].as_u64()),
        (Some("done"), Some(2))
    );
    let rows: Value = serde_json::from_str(&dataset().await.text).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    assert_eq!(rows[0]["input"]["url"], "https://a");

    let listing = get(
        &e,
        "/dca/collector/jobs?collector=c_life000001&from_date=2000-01-01&to_date=2999-01-01",
    )
    .await;
    let jobs: Value = serde_json::from_str(&listing.text).unwrap();
    assert_eq!(jobs[0]["name"], "life");
    let no_dates = get(&e, "/dca/collector/jobs").await;
    assert_eq!(no_dates.status, 400);
    let too_many = get(
        &e,
        "/dca/collector/jobs?from_date=2000-01-01&to_date=2999-01-01&limit=501",
    )
    .await;
    assert_eq!(too_many.status, 400);

    let cancel = call(
        reqwest::Method::POST,
        format!("{}/dca/jobs/{id}/cancel", e.url()),
        Some(&a),
        None,
    )
    .await;
    assert_eq!(cancel.status, 400, "a finished job cannot be cancelled");

    e.advance(std::time::Duration::from_secs(17 * 24 * 3600));
    assert_eq!(dataset().await.status, 404, "gone after retention");
    assert_eq!(log().await.status, 404);
}

#[tokio::test]
async fn cancel_answers_plain_ok() {
    let e = emulator("[defaults]\nbuild_time = \"1h\"\n").await;
    let a = bearer();
    let t = call(
        reqwest::Method::POST,
        format!("{}/dca/trigger?collector=c_cancel0001", e.url()),
        Some(&a),
        Some(json!([{"url": "https://a"}])),
    )
    .await;
    let id = serde_json::from_str::<Value>(&t.text).unwrap()["collection_id"]
        .as_str()
        .unwrap()
        .to_string();
    let cancel = call(
        reqwest::Method::POST,
        format!("{}/dca/jobs/{id}/cancel", e.url()),
        Some(&a),
        None,
    )
    .await;
    assert_eq!((cancel.status, cancel.text.as_str()), (200, "OK"));
    let log: Value = serde_json::from_str(&get(&e, &format!("/dca/log/{id}")).await.text).unwrap();
    assert_eq!(log["Status"], "canceled");
}

#[tokio::test]
async fn a_dataset_of_many_rows_per_input_streams_whole_and_in_order() {
    // 3 inputs × 700 rows of ~1 KB: over 2 MB, several of the emulator's
    // frames, one input's rows crossing frame boundaries; every 3rd input
    // is one error row instead.
    let e = emulator(
        "[defaults]\nbuild_time = \"0s\"\nrows_per_input = 700\nrow_bytes = 1000\nerror_every = 3\n",
    )
    .await;
    let t = call(
        reqwest::Method::POST,
        format!("{}/dca/trigger?collector=c_many00001", e.url()),
        Some(&bearer()),
        Some(json!([{"url": "https://a"}, {"url": "https://b"}, {"url": "https://c"}])),
    )
    .await;
    let id = serde_json::from_str::<Value>(&t.text).unwrap()["collection_id"]
        .as_str()
        .unwrap()
        .to_string();
    let body = get(&e, &format!("/dca/dataset?id={id}&format=json")).await;
    assert_eq!(body.status, 200);
    let rows: Vec<Value> = serde_json::from_str(&body.text).unwrap();
    assert_eq!(rows.len(), 700 + 700 + 1);
    let titles: Vec<&str> = rows[..1400]
        .iter()
        .map(|r| r["title"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..2)
        .flat_map(|i| (0..700).map(move |r| format!("Result {i}.{r}")))
        .collect();
    assert_eq!(titles, want);
    assert_eq!(rows[700]["input"]["url"], "https://b");
    assert!(rows[..1400]
        .iter()
        .all(|r| (990..=1010).contains(&r.to_string().len())));
    assert_eq!(rows[1400]["error_code"], "dead_page");
    assert_eq!(rows[1400]["input"]["url"], "https://c");
}

async fn batch(e: &Emulator, version: u8, key: Option<&str>, body: Value) -> Answer {
    let mut r = reqwest::Client::new()
        .post(format!("{}/v{version}/batch/scrape", e.url()))
        .header(
            "Authorization",
            format!("Bearer {}", harvestd::emulator::DEMO_FIRECRAWL_TOKEN),
        )
        .header("Content-Type", "application/json")
        .body(body.to_string());
    if let Some(k) = key {
        r = r.header("x-idempotency-key", k);
    }
    let resp = r.send().await.unwrap();
    Answer {
        status: resp.status().as_u16(),
        text: resp.text().await.unwrap(),
    }
}

/// v2 takes the scrape options firecrawl-py sends with any option
/// (`fastMode: false` among them); v1's schema does not know them.
#[tokio::test]
async fn firecrawl_v2_takes_the_official_clients_scrape_options() {
    let e = emulator("").await;
    let sdk_body = json!({
        "urls": ["https://docs.example.com/a"],
        "formats": ["markdown"],
        "onlyMainContent": true, "mobile": false, "removeBase64Images": true,
        "blockAds": true, "maxAge": 172800000, "storeInCache": true,
        "fastMode": false, "origin": "python-sdk@4.55.0", "useMock": "none",
        "minAge": 0, "lockdown": false, "onlyCleanContent": false,
        "integration": "harvestd",
    });
    let a = batch(&e, 2, None, sdk_body).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = batch(
        &e,
        1,
        None,
        json!({"urls": ["https://docs.example.com/a"], "fastMode": false}),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.text.contains("unrecognized_keys") && a.text.contains("fastMode"));
}

/// A v1 idempotency key is spent before the body is validated: a request
/// refused with 400 spends it, and any reuse is 409, valid body or not.
#[tokio::test]
async fn firecrawl_v1_spends_an_idempotency_key_before_validating_the_body() {
    let e = emulator("").await;
    let key = "0f8fad5b-d9cb-469f-a165-70867728950e";
    let invalid = json!({"urls": ["https://docs.example.com/a"], "bogus": 1});
    let valid = json!({"urls": ["https://docs.example.com/a"]});
    let a = batch(&e, 1, Some(key), invalid.clone()).await;
    assert_eq!(a.status, 400, "{}", a.text);
    let a = batch(&e, 1, Some(key), valid).await;
    assert_eq!(a.status, 409, "the key was spent by the 400: {}", a.text);
    let a = batch(&e, 1, Some(key), invalid).await;
    assert_eq!(a.status, 409, "reuse is 409 whatever the body: {}", a.text);
    assert!(e.ledger().is_empty(), "nothing was created");
}
