//! systemd integration for real: the notify protocol over a unix datagram
//! socket the test binds, and the unit file checked by systemd-analyze.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Harness;

const SIGHUP: i32 = 1;
const SIGTERM: i32 = 15;

/// Reads notify messages until one contains `needle`; returns (message, when).
fn wait_for(sock: &UnixDatagram, needle: &str, seen: &mut Vec<(String, Instant)>) -> Instant {
    let deadline = Instant::now() + common::WAIT;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let at = Instant::now();
            seen.push((msg.clone(), at));
            if msg.lines().any(|l| l == needle) {
                return at;
            }
        }
    }
    panic!(
        "no {needle} in {:?}",
        seen.iter().map(|(m, _)| m).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_protocol_ready_watchdog_stopping() {
    let mut h = Harness::new("[defaults]\nbuild_time = \"1h\"\n").await;
    let sock_path = h.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    h.env
        .push(("NOTIFY_SOCKET".into(), sock_path.display().to_string()));
    h.env.push(("WATCHDOG_USEC".into(), "1000000".into()));
    // A run in progress, so READY has something to resume.
    h.write_inputs("in.csv", 4);
    h.write_job(
        "w.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_notify0001\"\ninputs_file = \"in.csv\"\nchunk_size = 2\n",
    );
    let d = h.start_daemon().await;
    h.emulator.wait_for_ledger(2, common::WAIT).await.unwrap();
    d.signal(SIGTERM);
    let _ = d.wait().await;
    // The first daemon's own messages are not what this test is about.
    let mut buf = [0u8; 4096];
    while sock.recv(&mut buf).is_ok() {}

    let d = h.start_daemon().await;
    let mut seen = Vec::new();
    let ready = tokio::task::block_in_place(|| wait_for(&sock, "READY=1", &mut seen));
    assert!(
        seen.last().unwrap().0.contains("STATUS=resumed 1 run(s)"),
        "READY comes after the resume: {seen:?}"
    );
    // Watchdog at half of WATCHDOG_USEC (1 s): pings about every 500 ms.
    let mut pings = vec![ready];
    for _ in 0..3 {
        pings.push(tokio::task::block_in_place(|| {
            wait_for(&sock, "WATCHDOG=1", &mut seen)
        }));
    }
    for gap in pings.windows(2).skip(1).map(|w| w[1] - w[0]) {
        assert!(
            gap > Duration::from_millis(250) && gap < Duration::from_millis(1000),
            "gap {gap:?}"
        );
    }
    // A reload is told: RELOADING=1 with the monotonic time, then READY=1
    // saying whether the configuration was applied or refused.
    for (config, status) in [
        ("", "STATUS=configuration reloaded"),
        ("bogus_key = 1\n", "STATUS=reload refused"),
    ] {
        h.write_config(config);
        d.signal(SIGHUP);
        tokio::task::block_in_place(|| wait_for(&sock, "RELOADING=1", &mut seen));
        let reloading = &seen.last().unwrap().0;
        let usec = reloading
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
        assert!(usec.parse::<u64>().unwrap() > 0);
        tokio::task::block_in_place(|| wait_for(&sock, "READY=1", &mut seen));
        let ready = &seen.last().unwrap().0;
        assert!(ready.contains(status), "{ready:?}");
    }
    d.signal(SIGTERM);
    tokio::task::block_in_place(|| wait_for(&sock, "STOPPING=1", &mut seen));
    assert_eq!(d.wait().await, 0);
    assert_eq!(h.ledger().len(), 2, "the restart triggered nothing");
}

fn analyze(args: &[&str]) -> (bool, String) {
    let out = Command::new("systemd-analyze").args(args).output().unwrap_or_else(|e| {
        panic!("systemd-analyze is needed for this test ({e}); .ci/run installs it: apt-get install systemd")
    });
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_unit_verifies_and_is_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/harvestd.service"
    ))
    .unwrap();
    // verify checks that ExecStart exists: point it at the built binary.
    let unit = unit.replace("/usr/local/bin/harvestd", env!("CARGO_BIN_EXE_harvestd"));
    let path = dir.path().join("harvestd.service");
    std::fs::write(&path, &unit).unwrap();
    let path = path.to_str().unwrap();

    let (ok, out) = analyze(&["verify", path]);
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );

    // A broken configuration (exit 78) is not restarted in a loop, and a
    // daemon that keeps failing trips the start limit.
    let directive = |name: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name}= in the unit"))
    };
    assert_eq!(directive("RestartPreventExitStatus"), "78");
    assert_eq!(directive("StartLimitBurst"), "5");
    // A static user and group, so the group can read the outputs (a
    // dynamic user's state is under /var/lib/private, 0700), and no
    // directory of its own: $STATE_DIRECTORY says where.
    assert_eq!(directive("User"), "harvestd");
    assert_eq!(directive("Group"), "harvestd");
    assert_eq!(directive("UMask"), "0027");
    assert!(!unit.contains("DynamicUser="), "no dynamic user");
    assert!(
        !unit.contains("HARVESTD_STATE_DIR") && !unit.contains("/var/lib/harvestd/"),
        "no paths of its own"
    );
    let sysusers = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/harvestd.sysusers"
    ))
    .unwrap();
    assert!(
        sysusers.lines().any(|l| l.starts_with("u harvestd ")),
        "the user is declared for systemd-sysusers"
    );
    let (ok, show) = analyze(&["security", "--offline=yes", path]);
    assert!(ok, "{show}");
    assert!(
        show.lines()
            .any(|l| l.contains("PrivateMounts=") && l.trim_start().starts_with('✓')),
        "PrivateMounts= is set:\n{show}"
    );
    let (_, out) = analyze(&["security", "--offline=yes", path]);
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("{out}"));
    let level: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(level <= 2.0, "exposure {level} > 2.0:\n{out}");
}

/// Under journald each line starts with its syslog priority, so
/// `journalctl -p err` finds the errors; a process whose stderr is not the
/// stream `JOURNAL_STREAM` names (a redirected child) writes plain lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_journald_each_line_carries_its_priority() {
    use std::os::unix::fs::MetadataExt;
    for journal in [true, false] {
        let h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
        h.write_inputs("in.csv", 2);
        h.write_job(
            "fine.toml",
            "provider = \"scraper_studio\"\ncollector = \"c_journal01\"\ninputs_file = \"in.csv\"\n",
        );
        h.write_job(
            "bad.toml",
            "provider = \"scraper_studio\"\ncolector = \"c_x\"\n",
        );
        let (reader, writer) = std::io::pipe().unwrap();
        let pipe = std::fs::File::from(std::os::fd::OwnedFd::from(writer.try_clone().unwrap()));
        let meta = pipe.metadata().unwrap();
        drop(pipe);
        // Another stream's inode: the variable inherited, the stream not.
        let ino = if journal { meta.ino() } else { meta.ino() + 1 };
        let mut command = h.command(&["run", "--once"]);
        command
            .env("JOURNAL_STREAM", format!("{}:{ino}", meta.dev()))
            .stderr(std::process::Stdio::from(writer));
        let mut child = command.spawn().unwrap();
        // The command keeps its copy of the pipe's write end until dropped.
        drop(command);
        let read = tokio::task::spawn_blocking(move || std::io::read_to_string(reader).unwrap());
        let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .unwrap()
            .unwrap();
        let log = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.code(), Some(65), "an invalid job file: {log}");
        let mut levels = std::collections::BTreeSet::new();
        for line in log.lines().filter(|l| !l.is_empty()) {
            // The command line's own last words carry a priority too.
            if let Some(at) = line.find("harvestd: ") {
                let want = if journal { "<6>" } else { "" };
                assert_eq!(&line[..at], want, "{line}");
                continue;
            }
            let (prefix, json) = match line.find('{') {
                Some(at) => line.split_at(at),
                None => panic!("not a log line: {line}"),
            };
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            let level = v["level"].as_str().unwrap().to_string();
            let want = match (journal, level.as_str()) {
                (false, _) => "",
                (true, "ERROR") => "<3>",
                (true, "WARN") => "<4>",
                (true, "INFO") => "<6>",
                (true, _) => "<7>",
            };
            assert_eq!(prefix, want, "{line}");
            levels.insert(level);
        }
        assert!(
            levels.contains("ERROR") && levels.contains("INFO"),
            "{levels:?}: {log}"
        );
    }
}

/// As the unit runs it: `$STATE_DIRECTORY` set, no directory in the
/// configuration, `UMask=0027`. State, jobs and outputs are found under
/// the state directory, and what the daemon writes is readable by its
/// group and by no one else (the unit's static user and group make that
/// group `harvestd`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_unit_outputs_are_group_readable_in_the_state_directory() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    // The configuration names no directory: the unit's way.
    std::fs::write(h.path("harvestd.toml"), common::FAST_LIMITS).unwrap();
    h.write_inputs("in.csv", 4);
    h.write_job(
        "grp.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_group00001\"\ninputs_file = \"in.csv\"\nchunk_size = 2\n",
    );
    let mut cmd = h.command_of(
        "bash",
        &[
            "-c",
            "umask 0027 && exec \"$0\" run --once",
            env!("CARGO_BIN_EXE_harvestd"),
        ],
    );
    cmd.env("STATE_DIRECTORY", h.dir.path()).current_dir("/");
    let out = tokio::time::timeout(common::WAIT, cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = h.run_dir("grp");
    assert!(h.path("state").is_dir(), "state under $STATE_DIRECTORY");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for file in ["data.csv", "data.json", "manifest.json", "_SUCCESS"] {
        assert_eq!(
            mode(&run.join(file)),
            0o640,
            "{file}: group reads, others nothing"
        );
    }
    for dir in [run.as_path(), run.parent().unwrap(), &h.path("out")] {
        assert_eq!(mode(dir), 0o750, "{}: group enters", dir.display());
    }
}
