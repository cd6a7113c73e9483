//! Whatever a provider sends cannot panic the clients (`docs/limits.md`): a raw
//! HTTP server answers every call of the three clients with generated
//! status codes, header values (`Retry-After`, `Date`, `Content-Length`,
//! `Content-Type`) and bodies, and every call must return, within its
//! timeout, with a value or an error. The limits arithmetic those values
//! reach (the 429 pause, backoff, poll intervals) is covered by the
//! property tests in `src/limits.rs`.

// Test helpers panic on purpose: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use harvestd::config::{LimitsConfig, Token};
use harvestd::limits::ProviderGate;
use harvestd::provider::firecrawl::Firecrawl;
use harvestd::provider::http::Http;
use harvestd::provider::scraper_studio::ScraperStudio;
use harvestd::provider::web_scraper::WebScraper;
use harvestd::provider::{Provider, RowSink, TriggerCall};
use harvestd::spec::ApiVersion;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One generated answer.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

/// Header values a provider might send, hostile ones included.
fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("18446744073709551615".to_string()),
        1 => Just("99999999999".to_string()),
        1 => Just("-1".to_string()),
        1 => Just("1e9".to_string()),
        1 => Just("Fri, 31 Dec 9999 23:59:59 GMT".to_string()),
        1 => Just("Thu, 01 Jan 1970 00:00:00 GMT".to_string()),
        1 => (0u64..u64::MAX).prop_map(|n| n.to_string()),
        1 => "[ -~]{0,40}",
    ]
}

/// Bodies: arbitrary bytes, or JSON-shaped text the clients look into,
/// cut or filled with hostile values.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let shapes = prop_oneof![
        Just(r#"{"status":"done"}"#.to_string()),
        Just(r#"{"status":"ready","records":18446744073709551615}"#.to_string()),
        Just(r#"{"collection_id":"../../../admin/x"}"#.to_string()),
        Just(r#"{"snapshot_id":"sd_\u0000"}"#.to_string()),
        Just(r#"{"success":true,"id":"..","invalidURLs":[1,{}]}"#.to_string()),
        Just(r#"{"status":"completed","completed":18446744073709551615,"next":"http://x/?skip=18446744073709551615","data":[{"a":1},"x",[[[]]]],"completedAt":"9999-12-31T23:59:59Z"}"#.to_string()),
        Just(r#"{"parts":18446744073709551615}"#.to_string()),
        Just(r#"{"success":true,"status":"completed","creditsUsed":-1e400,"data":[]}"#.to_string()),
        Just(r#"[{"a":1},{"b":"\xff"},1,"s",null,[[[[[[[]]]]]]]]"#.to_string()),
        Just("{\"a\":1}\n{\"b\":\n\n[1,2]\n\"x\"".to_string()),
        Just(format!("[{}", "[".repeat(5000))),
        Just("Rate limit exceeded. please retry after 99999999999999999999s".to_string()),
        Just("<html>oops</html>".to_string()),
    ];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        (shapes, 0usize..400).prop_map(|(s, cut)| {
            let mut b = s.into_bytes();
            b.truncate(b.len().saturating_sub(cut % 7));
            b
        }),
    ]
}

fn answer() -> impl Strategy<Value = Answer> {
    // 429 and 200 often: they are where header values and bodies are read.
    let status = prop_oneof![
        4 => Just(429u16),
        3 => Just(200u16),
        1 => Just(202),
        1 => Just(204),
        1 => Just(400),
        1 => Just(404),
        1 => Just(409),
        1 => Just(422),
        1 => Just(429),
        1 => Just(500),
        1 => Just(503),
        1 => 100u16..600,
    ];
    let names = prop_oneof![
        3 => Just("Retry-After"),
        1 => Just("Date"),
        1 => Just("Content-Length"),
        1 => Just("Content-Type"),
    ];
    (
        status,
        proptest::collection::vec((names, header_value()), 0..4),
        body(),
    )
        .prop_map(|(status, headers, body)| Answer {
            status,
            headers,
            body,
        })
}

/// Serves `answer` to every connection, then closes it.
async fn serve(answer: Answer) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Serves until the test's runtime ends.
    #[allow(clippy::disallowed_methods)]
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let answer = answer.clone();
            #[allow(clippy::disallowed_methods)]
            tokio::spawn(async move {
                // Read the request head (the body, if any, is ignored).
                let mut buf = vec![0u8; 64 * 1024];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let mut head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", answer.status);
                let mut has_length = false;
                for (name, value) in &answer.headers {
                    has_length |= *name == "Content-Length";
                    head.push_str(&format!("{name}: {value}\r\n"));
                }
                if !has_length {
                    head.push_str(&format!("Content-Length: {}\r\n", answer.body.len()));
                }
                head.push_str("\r\n");
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&answer.body).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

/// Takes every row it is given.
struct Rows(usize);

impl RowSink for Rows {
    fn row(&mut self, _raw: &[u8]) -> std::io::Result<()> {
        self.0 += 1;
        Ok(())
    }
}

/// A client of each API on a gate of its own (a 429 pauses only it).
fn clients(base: &str) -> Vec<Box<dyn Provider>> {
    let limits = LimitsConfig {
        request_timeout: Duration::from_secs(2),
        ..LimitsConfig::default()
    };
    let http = || {
        Http::new(
            "fuzz",
            base,
            Some(Token::new("t0k")),
            ProviderGate::new(&limits),
            Duration::from_secs(2),
        )
    };
    vec![
        Box::new(ScraperStudio::new(http())),
        Box::new(WebScraper::new(http(), 1000)),
        Box::new(Firecrawl::new(http(), ApiVersion::V1)),
        Box::new(Firecrawl::new(http(), ApiVersion::V2)),
    ]
}

/// Every call of every client, each on a fresh client (a 429 pauses the
/// gate of the client that got it for up to an hour).
async fn every_call(base: &str) {
    let params = serde_json::Map::new();
    let inputs = b"{\"url\":\"https://a.example/\"}\n";
    let call = TriggerCall {
        key: "c_fuzz",
        name: "harvestd:fuzz:run:0",
        inputs_ndjson: inputs,
        count: 1,
        params: &params,
        attempt: 0,
    };
    let cursors = [
        None,
        Some(serde_json::json!({"batch_size": 1000})),
        Some(serde_json::json!({"batch_size": 1000, "part": 2, "parts": 3})),
        Some(serde_json::json!({"skip": 18446744073709551615u64})),
        Some(serde_json::json!({"errors": true})),
    ];
    for step in 0..4 + cursors.len() {
        for client in clients(base) {
            let done = tokio::time::timeout(Duration::from_secs(10), async {
                match step {
                    0 => drop(client.trigger(&call).await),
                    1 => drop(client.find(&call, 0).await),
                    2 => drop(client.poll("c_fuzz", "j_1").await),
                    3 => drop(client.cancel("c_fuzz", "j_1").await),
                    n => {
                        let mut rows = Rows(0);
                        let cursor = cursors[n - 4].as_ref();
                        drop(client.download("c_fuzz", "j_1", cursor, &mut rows).await)
                    }
                }
                // The provider's clock, as the answer's Date set it.
                let _ = client.now_ms();
            })
            .await;
            assert!(done.is_ok(), "call {step} did not return within 10 s");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// No answer panics or hangs a client call.
    #[test]
    fn no_answer_panics_or_hangs_a_client(answer in answer()) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let base = serve(answer).await;
            every_call(&base).await;
        });
    }
}

/// The shape of a failure the property would find: u64::MAX seconds in
/// `Retry-After` on a status poll once panicked the chunk task.
#[tokio::test]
async fn retry_after_of_u64_max_on_a_poll_is_an_error_not_a_panic() {
    let base = serve(Answer {
        status: 429,
        headers: vec![("Retry-After", u64::MAX.to_string())],
        body: Vec::new(),
    })
    .await;
    let client = &clients(&base)[0];
    let err = client.poll("c_x", "j_1").await.unwrap_err();
    assert!(err.to_string().contains("429"), "{err}");
    let pause = client.http().gate.paused().unwrap();
    assert!(pause.left <= Duration::from_secs(3600), "{pause:?}");
    assert!(pause.reason.contains("18446744073709551615"), "{pause:?}");
}

/// Firecrawl's `creditsUsed` is recorded as sent when it is a count, and
/// as "not reported" otherwise (`-1` when billing is unreadable, or a
/// value of the wrong type): never a failed poll.
#[tokio::test]
async fn firecrawl_credits_used_is_read_leniently() {
    for (sent, want) in [
        ("12", Some(12)),
        ("0", Some(0)),
        ("-1", None),
        ("1.5", None),
        ("\"12\"", None),
        ("null", None),
    ] {
        let body = format!(
            r#"{{"success":true,"status":"completed","completed":1,"total":1,"creditsUsed":{sent},"data":[]}}"#
        );
        let base = serve(Answer {
            status: 200,
            headers: Vec::new(),
            body: body.into_bytes(),
        })
        .await;
        let client = clients(&base).pop().unwrap();
        match client.poll("account", "j_1").await {
            Ok(harvestd::provider::PollOutcome::Ready { credits_used, .. }) => {
                assert_eq!(credits_used, want, "creditsUsed {sent}");
            }
            other => panic!("creditsUsed {sent}: {other:?}"),
        }
    }
}
