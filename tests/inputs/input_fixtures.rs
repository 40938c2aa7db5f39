//! The keyboard and key-file fixtures replayed through `keyfleet read-key`,
//! the same command and code path an installer uses, each checked against the
//! answer beside it (`NAME.expected.json`): the exact JSON on success, or the
//! exit code and the reason on stderr on refusal.
#![cfg(all(feature = "keyboard", feature = "file"))]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures(dir: &str, ext: &str) -> Vec<(PathBuf, serde_json::Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(dir);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|x| x.to_str()) == Some(ext))
        .map(|p| {
            let exp = std::fs::read_to_string(p.with_extension("expected.json"))
                .expect("expected.json beside the fixture");
            (p, serde_json::from_str(&exp).unwrap())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Runs keyfleet and checks the outcome against `exp`.
fn check(name: &str, args: &[&str], exp: &serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_keyfleet"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match exp.get("refused").and_then(|r| r.as_str()) {
        None => {
            assert_eq!(out.status.code(), Some(0), "{name}: {stderr}");
            let got: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
            assert_eq!(&got, exp, "{name}");
        }
        Some(reason) => {
            assert_eq!(
                out.status.code().map(i64::from),
                exp["exit"].as_i64(),
                "{name}: {stderr}"
            );
            assert!(
                stderr.contains(reason),
                "{name}: stderr {stderr:?} lacks {reason:?}"
            );
            assert!(stdout.is_empty(), "{name}: printed {stdout:?} on refusal");
        }
    }
}

#[test]
fn keyboard_recordings_replay_to_their_answers() {
    let all = fixtures("keyboard", "log");
    assert!(all.len() >= 5);
    for (path, exp) in all {
        let p = path.to_str().unwrap();
        check(
            p,
            &["read-key", "--from", "keyboard", "--replay", p, "--json"],
            &exp,
        );
    }
}

#[test]
fn key_files_read_to_their_answers() {
    let all = fixtures("file", "key");
    assert!(all.len() >= 5);
    let dir = tempfile::tempdir().unwrap();
    for (path, exp) in all {
        // git keeps no permission bits: give each copy the mode its expected
        // answer names (0600, the mode a key file should have, by default).
        let mode = exp
            .get("mode")
            .and_then(|m| m.as_str())
            .map(|m| u32::from_str_radix(m, 8).unwrap())
            .unwrap_or(0o600);
        let copy = dir.path().join(path.file_name().unwrap());
        std::fs::copy(&path, &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut exp = exp.clone();
        if let Some(o) = exp.as_object_mut() {
            o.remove("mode");
        }
        let c = copy.to_str().unwrap();
        check(
            path.to_str().unwrap(),
            &["read-key", "--from", "file", "--path", c, "--json"],
            &exp,
        );
    }
}

#[test]
fn key_file_through_a_symlink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.key");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/file/label.key"),
        &real,
    )
    .unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = dir.path().join("link.key");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let exp = serde_json::json!({"exit": 3, "refused": "symbolic link"});
    check(
        "symlink",
        &[
            "read-key",
            "--from",
            "file",
            "--path",
            link.to_str().unwrap(),
        ],
        &exp,
    );
}

#[test]
fn raw_flag_shows_what_the_source_decoded() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/keyboard/typed-label.log");
    let out = Command::new(env!("CARGO_BIN_EXE_keyfleet"))
        .args(["read-key", "--from", "keyboard", "--raw", "--replay"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The typed slip was erased by Backspace before the line was taken.
    assert!(stderr.starts_with("raw: \"KF1:boiler-3:0C"), "{stderr}");
    assert!(!stderr.contains('x'), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("node id:   boiler-3"), "{stdout}");
    assert!(stdout.contains("key check: 9c83f5c0"), "{stdout}");
}

#[test]
fn devices_json_is_an_array_of_candidates() {
    let out = Command::new(env!("CARGO_BIN_EXE_keyfleet"))
        .args(["devices", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for d in v.as_array().expect("an array") {
        for k in ["kind", "path", "vendor", "product", "note"] {
            assert!(d.get(k).is_some(), "{k} missing in {d}");
        }
    }
}

#[test]
fn help_documents_exit_codes() {
    let out = Command::new(env!("CARGO_BIN_EXE_keyfleet"))
        .args(["read-key", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Exit codes: 0 a valid key"), "{help}");
    assert!(help.contains("4 --timeout passed"), "{help}");
}
