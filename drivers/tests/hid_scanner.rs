//! hid-scanner from the recordings in fixtures/hid/: each `NAME.hid` (hid-recorder
//! format) replays through the same decoder the hidraw reader uses and must give
//! the scans in `NAME.expected`, one per line.
#![cfg(feature = "hid-scanner")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use keyfleet_drivers::hid;
use keyfleet_drivers::source::{SourceError, SourceOptions};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/hid")
}

fn replay(path: &Path) -> Result<Box<dyn keyfleet_drivers::source::KeySource>, SourceError> {
    hid::open(&SourceOptions {
        replay: Some(path.to_path_buf()),
        ..SourceOptions::default()
    })
}

#[test]
fn every_fixture_decodes_to_its_expected_scans() {
    let mut seen = 0;
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("hid") {
            continue;
        }
        seen += 1;
        let expected = std::fs::read_to_string(path.with_extension("expected"))
            .unwrap_or_else(|e| panic!("{}: no .expected: {e}", path.display()));
        let mut src = replay(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(src.name(), "hid-scanner");
        for want in expected.lines() {
            let got = src
                .read_raw(Some(Duration::from_secs(10)))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(got, want, "{}", path.display());
        }
        match src.read_raw(Some(Duration::from_secs(10))) {
            Err(SourceError::Ended(why)) => assert!(why.contains("with no scan"), "{why}"),
            other => panic!("{}: expected the end, got {other:?}", path.display()),
        }
    }
    assert!(seen >= 4, "only {seen} recordings in fixtures/hid");
}

fn edited(name: &str, edit: impl Fn(&str) -> String) -> tempfile_path::TempPath {
    let text = std::fs::read_to_string(fixtures().join(name)).unwrap();
    tempfile_path::write(&edit(&text))
}

/// A tiny temp-file helper (std only).
mod tempfile_path {
    use std::path::PathBuf;
    pub struct TempPath(pub PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    pub fn write(text: &str) -> TempPath {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "keyfleet-hid-{}-{}.hid",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&p, text).unwrap();
        TempPath(p)
    }
}

#[test]
fn a_cut_event_line_is_refused_with_its_line_number() {
    // Drop the last byte of the first 8-byte event.
    let tmp = edited("boot_keyboard.hid", |t| {
        t.replacen(
            "E: 000000.000000 8 00 00 00 00 00 00 00 00",
            "E: 000000.000000 8 00 00 00 00 00 00 00",
            1,
        )
    });
    let text = std::fs::read_to_string(&tmp.0).unwrap();
    let line = text
        .lines()
        .position(|l| l == "E: 000000.000000 8 00 00 00 00 00 00 00")
        .unwrap()
        + 1;
    let e = replay(&tmp.0).err().expect("refused").to_string();
    assert!(
        e.contains(&format!(
            "recording line {line}: event length 8 but 7 bytes"
        )),
        "{e}"
    );
}

#[test]
fn a_scan_cut_short_is_not_returned() {
    // Keep the header and the first 20 events: no Enter ever comes.
    let tmp = edited("boot_keyboard.hid", |t| {
        let mut n = 0;
        t.lines()
            .take_while(|l| {
                if l.starts_with("E:") {
                    n += 1;
                }
                n <= 20
            })
            .map(|l| format!("{l}\n"))
            .collect()
    });
    let mut src = replay(&tmp.0).unwrap();
    let e = src.read_raw(None).unwrap_err().to_string();
    assert!(e.contains("the recording ended, in a scan of"), "{e}");
    assert!(e.contains("no end"), "{e}");
}

#[test]
fn a_recording_of_a_mouse_is_refused() {
    let tmp = tempfile_path::write(
        "# a mouse\nR: 45 05 01 09 02 a1 01 05 09 19 01 29 03 15 00 25 01 95 03 75 01 81 02 95 01 75 05 81 01 05 01 09 30 09 31 15 81 25 7f 75 08 95 02 81 06 c0\nN: Mouse\nI: 3 046d c077\nE: 000000.000000 3 00 01 ff\n",
    );
    let e = replay(&tmp.0).err().expect("refused").to_string();
    assert!(
        e.contains("no keyboard (usage page 0x07) and no bar code scanner"),
        "{e}"
    );
}

#[test]
fn a_missing_recording_names_the_path() {
    let e = replay(Path::new("/nonexistent/scan.hid"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/nonexistent/scan.hid"), "{e}");
}

#[test]
fn a_missing_device_names_the_path() {
    let e = hid::open(&SourceOptions {
        device: Some(PathBuf::from("/dev/hidraw-keyfleet-none")),
        ..SourceOptions::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("/dev/hidraw-keyfleet-none"), "{e}");
}

#[test]
fn list_does_not_fail_without_devices() {
    // This machine may have no hidraw at all; listing must still return (possibly empty).
    for d in hid::list() {
        assert_eq!(d.kind, "hid-scanner");
        assert!(d.path.starts_with("/dev/"), "{}", d.path);
    }
}
