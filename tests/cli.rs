//! The command line as a shell sees it: completions and global options.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn harvestd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_harvestd"))
        .args(args)
        .env_remove("HARVESTD_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// `harvestd completions SHELL` prints a script the shell accepts, naming
/// every subcommand.
#[test]
fn completions_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, script, err) = harvestd(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        // Whole words: "run" must not pass on "rerun" alone.
        let words: std::collections::BTreeSet<&str> =
            script.split(|c: char| !c.is_ascii_alphanumeric()).collect();
        for sub in [
            "run",
            "validate",
            "status",
            "rerun",
            "retry",
            "cancel",
            "emulator",
            "completions",
        ] {
            assert!(words.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let (_, script, _) = harvestd(&["completions", "bash"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("harvestd.bash");
    std::fs::write(&path, script).unwrap();
    let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(
        check.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let (code, _, err) = harvestd(&["completions", "tcsh"]);
    assert_eq!(code, 2, "an unknown shell is a usage error: {err}");
}

/// `--config` is one option, documented, accepted before or after the
/// subcommand.
#[test]
fn config_is_a_global_option_with_help() {
    let (code, help, _) = harvestd(&["--help"]);
    assert_eq!(code, 0);
    let line = help.lines().find(|l| l.contains("--config")).unwrap();
    assert!(line.contains("configuration file"), "{help}");
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.toml");
    let missing = missing.to_str().unwrap();
    for args in [
        ["--config", missing, "status"],
        ["status", "--config", missing],
    ] {
        let (code, _, err) = harvestd(&args);
        assert_eq!(code, 78, "a configuration file that is not there: {err}");
        assert!(err.contains("none.toml"), "{err}");
    }
}
