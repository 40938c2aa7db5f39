//! hid-scanner on real hid-recorder captures of real devices.
//!
//! The captures are the keyboard recordings of the GitHub repository
//! bentiss/hid-devices (hid-recorder files of real devices, kept by the
//! kernel's HID maintainer). That repository carries no licence, so they are
//! not copied into keyfleet: `fixtures/hid/real/NAME.json` names each one
//! (path, commit, SHA-256) with what the decoder must read from it, worked out
//! independently by `fixtures/hid/real/expected.py`. Point
//! `KEYFLEET_HID_DEVICES` at a checkout of that repository at the named
//! commit to run this test; without it the test says so and checks only the
//! expected answers' own consistency.
//!
//! The fixtures built on these devices' real descriptors
//! (`fixtures/hid/nkro_bitmap.hid`, `enter_held_at_start.hid`,
//! `alt_codes_real_descriptor.hid`) are committed and run in
//! `hid_scanner.rs` always.
#![cfg(feature = "hid-scanner")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use keyfleet_drivers::hid;
use keyfleet_drivers::source::{KeySource, SourceError, SourceOptions};
use sha2::{Digest, Sha256};

fn expected_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/hid/real")
}

struct Expected {
    name: String,
    capture: String,
    sha256: String,
    scans: Vec<String>,
    unfinished: Option<String>,
    then: Vec<String>,
    refused: Option<String>,
}

fn expectations() -> Vec<Expected> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(expected_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let strings = |k: &str| -> Vec<String> {
            v[k].as_array()
                .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
                .unwrap_or_default()
        };
        out.push(Expected {
            name: path.file_stem().unwrap().to_string_lossy().into_owned(),
            capture: v["capture"].as_str().unwrap().to_string(),
            sha256: v["sha256"].as_str().unwrap().to_string(),
            scans: strings("scans"),
            unfinished: v["unfinished"].as_str().map(str::to_string),
            then: strings("then"),
            refused: v["refused"].as_str().map(str::to_string),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn replay(path: &Path) -> Result<Box<dyn KeySource>, SourceError> {
    hid::open(&SourceOptions {
        replay: Some(path.to_path_buf()),
        ..SourceOptions::default()
    })
}

fn read_all(src: &mut Box<dyn KeySource>) -> (Vec<String>, SourceError) {
    let mut scans = Vec::new();
    loop {
        match src.read_raw(Some(Duration::from_secs(100_000))) {
            Ok(s) => scans.push(s),
            Err(e) => return (scans, e),
        }
    }
}

#[test]
fn expected_answers_are_consistent() {
    let all = expectations();
    assert!(all.len() >= 4, "only {} expectations", all.len());
    for e in &all {
        assert_eq!(e.sha256.len(), 64, "{}", e.name);
        assert!(
            e.capture.ends_with(&format!("{}.hid", e.name)),
            "{}",
            e.name
        );
        // An unfinished entry needs the reports that end it; a refusal reads nothing.
        assert_eq!(e.unfinished.is_some(), !e.then.is_empty(), "{}", e.name);
        assert!(e.refused.is_none() || e.scans.is_empty(), "{}", e.name);
    }
}

#[test]
fn every_real_capture_decodes_to_its_expected_text() {
    let Some(root) = std::env::var_os("KEYFLEET_HID_DEVICES").map(PathBuf::from) else {
        println!(
            "KEYFLEET_HID_DEVICES is not set: the real captures (bentiss/hid-devices, see \
             fixtures/hid/real/README.md) were not replayed"
        );
        return;
    };
    let (mut tried, mut decoded) = (0, 0);
    for e in expectations() {
        let path = root.join(&e.capture);
        let bytes = std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        let digest: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            digest, e.sha256,
            "{}: another version of the capture",
            e.name
        );
        tried += 1;
        if let Some(why) = &e.refused {
            let err = replay(&path).err().expect("refused").to_string();
            assert!(err.contains(why), "{}: {err}", e.name);
            println!("{}: refused as expected: {err}", e.name);
            decoded += 1;
            continue;
        }
        let mut src = replay(&path).unwrap_or_else(|err| panic!("{}: {err}", e.name));
        let (scans, end) = read_all(&mut src);
        assert_eq!(scans, e.scans, "{}", e.name);
        let SourceError::Ended(why) = &end else {
            panic!("{}: expected the end of the recording, got {end}", e.name)
        };
        match &e.unfinished {
            None => assert!(why.contains("with no scan"), "{}: {why}", e.name),
            Some(text) => {
                let n = text.chars().count();
                assert!(
                    why.contains(&format!("in a scan of {n} characters")),
                    "{}: {why}",
                    e.name
                );
                // The capture with the reports that end its last entry appended.
                let mut whole = String::from_utf8(bytes.clone()).unwrap();
                for report in &e.then {
                    let len = report.split_whitespace().count();
                    whole.push_str(&format!("E: 100000.000000 {len} {report}\n"));
                }
                let tmp = tempfile::NamedTempFile::new().unwrap();
                std::fs::write(tmp.path(), whole).unwrap();
                let mut src = replay(tmp.path()).unwrap();
                let (scans, _) = read_all(&mut src);
                let mut want = e.scans.clone();
                want.push(text.clone());
                assert_eq!(scans, want, "{} with its end appended", e.name);
            }
        }
        println!("{}: {} entries as expected", e.name, scans.len());
        decoded += 1;
    }
    println!("real captures: {decoded} of {tried} decode to their expected text");
    assert_eq!(decoded, tried);
}
