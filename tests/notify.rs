//! Notifications (`docs/notifications.md`) against receivers on loopback
//! that the tests start: webhooks that fail and then take the event, a
//! receiver that is down across a `kill -9`, the signature, the Slack
//! shape, a command target, and each event raised once per occurrence.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::receiver::Receiver;
use common::Harness;
use serde_json::Value;

fn studio_job(collector: &str) -> String {
    format!(
        "provider = \"scraper_studio\"\ncollector = \"{collector}\"\n\
         inputs = [{{url = \"https://a.example/1\"}}, {{url = \"https://a.example/2\"}}]\n"
    )
}

fn secret_file(h: &Harness) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = h.path("notify.secret");
    std::fs::write(&path, "s3cret\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The signature a receiver computes from the body and the shared secret.
fn expected_signature(body: &[u8]) -> String {
    harvestd::notify::signature(b"s3cret", body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_is_told_signed_through_500s_with_one_id_and_slack_gets_its_shape() {
    let h =
        Harness::new("[defaults]\nbuild_time = \"100ms\"\n[collectors.c_broken001]\nfail = true\n")
            .await;
    let hook = Receiver::start(([127, 0, 0, 1], 0).into(), &[500, 503]).await;
    let slack = Receiver::start(([127, 0, 0, 1], 0).into(), &[]).await;
    h.write_config(&format!(
        "[[notify]]\nurl = \"{}\"\nsecret_file = \"{}\"\n\
         [[notify]]\nurl = \"{}\"\nformat = \"slack\"\nevents = [\"run.complete\"]\n",
        hook.url(),
        secret_file(&h).display(),
        slack.url()
    ));
    h.write_job("broken.toml", &studio_job("c_broken001"));
    h.write_job("fine.toml", &studio_job("c_fine00001"));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 1, "a failed run: {stderr}");

    // Two refusals, then delivered: three attempts, one id, one body.
    let got = hook.wait_for(3).await;
    assert_eq!(got.len(), 3, "{got:?}");
    let first = &got[0].body;
    assert_eq!(first["event"], "run.failed");
    assert_eq!(first["job"], "broken");
    assert_eq!(first["state"], "failed");
    assert_eq!(first["counts"]["inputs"], 2);
    assert_eq!(first["counts"]["chunks_failed"], 1);
    assert!(first["counts"]["credits_used"].is_null());
    assert_eq!(first["id"].as_str().unwrap().len(), 32);
    for g in &got {
        assert_eq!(g.raw, got[0].raw, "every attempt sends the same body");
        assert_eq!(
            g.signature.as_deref(),
            Some(expected_signature(&g.raw).as_str()),
            "X-Harvestd-Signature is the HMAC-SHA256 of the body"
        );
    }
    assert!(
        stderr.contains("notification not delivered; will retry"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("secret-path"),
        "a webhook's path never goes into the log"
    );

    // The Slack target wants run.complete only: the fine job's, once.
    let slack_got = slack.wait_for(1).await;
    assert_eq!(slack_got.len(), 1, "{slack_got:?}");
    let text = slack_got[0].body["text"].as_str().unwrap();
    assert!(
        text.contains("run.complete") && text.contains("'fine'"),
        "{text}"
    );
    assert_eq!(slack_got[0].body.as_object().unwrap().len(), 1, "only text");
    assert!(slack_got[0].signature.is_none(), "no secret, no signature");

    // A second start sends nothing again.
    let (code, _, _) = h.run_once().await;
    assert_eq!(code, 0);
    assert_eq!(hook.got().len(), 3);
    assert_eq!(slack.got().len(), 1);
}

/// The event is stored before its first attempt: with the receiver down,
/// a `kill -9`, and the receiver back, the next start delivers it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_survives_kill_9_while_the_receiver_is_down() {
    let mut h =
        Harness::new("[defaults]\nbuild_time = \"100ms\"\n[collectors.c_broken002]\nfail = true\n")
            .await;
    // A port nobody listens on, until the receiver starts on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    h.write_config(&format!(
        "[[notify]]\nurl = \"http://{port}/hook\"\nevents = [\"run.failed\"]\n"
    ));
    h.write_job("broken.toml", &studio_job("c_broken002"));
    h.env = vec![("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into())];
    let mut d = h.start_daemon().await;
    d.wait_for_line("notification not delivered; will retry")
        .await;
    // `status` says what is not delivered, and why.
    let (code, out, _) = h.run(&["status", "--json"]).await;
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let undelivered = &status["undelivered"];
    assert_eq!(undelivered["count"], 1, "{status}");
    assert_eq!(undelivered["event"], "run.failed");
    assert!(
        !undelivered["last_error"].as_str().unwrap().is_empty(),
        "{status}"
    );
    let (_, table, _) = h.run(&["status"]).await;
    assert!(table.contains("notifications UNDELIVERED: 1"), "{table}");
    assert!(!table.contains("/hook"), "a webhook's path is not shown");
    d.signal(9);
    d.wait().await;

    let hook = Receiver::start(port, &[]).await;
    let d = h.start_daemon().await;
    let got = hook.wait_for(1).await;
    assert_eq!(got[0].body["event"], "run.failed");
    assert_eq!(got[0].body["job"], "broken");
    d.signal(15);
    assert_eq!(d.wait().await, 0);
    assert_eq!(hook.got().len(), 1, "delivered once");
    assert_eq!(h.ledger().len(), 1, "the run was not triggered again");
}

/// A command target gets the body on stdin and the event, job and run in
/// its environment; a failing command is run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_target_runs_with_the_body_and_is_retried_until_it_exits_0() {
    let h =
        Harness::new("[defaults]\nbuild_time = \"100ms\"\n[collectors.c_broken003]\nfail = true\n")
            .await;
    let out = h.path("told");
    std::fs::create_dir_all(&out).unwrap();
    // Fails the first time (and says why on stderr), succeeds the second.
    let script = format!(
        "cd {}; if [ ! -e tried ]; then touch tried; echo 'pager down' >&2; exit 3; fi; \
         cat > body.json; echo \"$HARVESTD_EVENT $HARVESTD_JOB $HARVESTD_RUN_ID\" > env.txt",
        out.display()
    );
    h.write_config(&format!(
        "[[notify]]\ncommand = [\"/bin/sh\", \"-c\", {}]\ntimeout = \"10s\"\n",
        toml::Value::String(script)
    ));
    h.write_job("broken.toml", &studio_job("c_broken003"));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("pager down"),
        "the command's complaint is logged: {stderr}"
    );
    let body: Value =
        serde_json::from_slice(&std::fs::read(out.join("body.json")).unwrap()).unwrap();
    assert_eq!(body["event"], "run.failed");
    let env = std::fs::read_to_string(out.join("env.txt")).unwrap();
    let run_id = body["run_id"].as_str().unwrap();
    assert_eq!(env.trim(), format!("run.failed broken {run_id}"));
}

/// `provider.blocked` once when a provider refuses the token.
/// (`expiry.*` events are checked where the expiry itself is:
/// `tests/crash_safety.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_refusing_the_token_is_told_once() {
    let mut h = Harness::new("[defaults]\nbuild_time = \"100ms\"\n").await;
    let hook = Receiver::start(([127, 0, 0, 1], 0).into(), &[]).await;
    h.write_config(&format!("[[notify]]\nurl = \"{}\"\n", hook.url()));
    h.token = "not-the-token".into();
    h.write_job("blocked.toml", &studio_job("c_blocked01"));
    let (_, _, stderr) = h.run_once().await;
    let got: Vec<Value> = hook.got().iter().map(|g| g.body.clone()).collect();
    let blocked: Vec<&Value> = got
        .iter()
        .filter(|b| b["event"] == "provider.blocked")
        .collect();
    assert_eq!(blocked.len(), 1, "{got:?}\n{stderr}");
    let summary = blocked[0]["summary"].as_str().unwrap();
    assert!(summary.contains("brightdata"), "{summary}");
    assert!(!summary.contains("not-the-token"), "{summary}");
    assert!(blocked[0]["job"].is_null() && blocked[0]["run_id"].is_null());
}
