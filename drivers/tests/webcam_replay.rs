//! The webcam source replayed from fixtures/webcam through the same code path
//! as the camera: `webcam::open` with `--replay`, then `read_raw`, which runs
//! `decode_frame` on each frame until a payload looks like a key label.
#![cfg(feature = "webcam")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use keyfleet_drivers::source::{SourceError, SourceOptions};
use keyfleet_drivers::webcam::{self, measure, WebcamSource};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/webcam")
}

/// The generated photos of both frame sizes.
fn generated_cases() -> Vec<measure::Case> {
    let mut cases = Vec::new();
    for size in ["1280x720", "640x480"] {
        cases.extend(measure::load_cases(&fixtures().join("generated").join(size)).unwrap());
    }
    cases
}

fn replay(path: &Path) -> SourceOptions {
    SourceOptions {
        replay: Some(path.to_path_buf()),
        ..SourceOptions::default()
    }
}

/// Our decoder must read at least this share of the generated photos
/// (it reads 24 of 26 when this was written; see fixtures/webcam/README.md).
const MIN_SHARE: f64 = 0.85;

#[test]
fn generated_photos_decode_through_the_replay_path_at_least_as_well_as_zbarimg() {
    let cases = generated_cases();
    assert!(
        cases.len() >= 20,
        "expected the committed set, found {} cases",
        cases.len()
    );
    let mut right = 0;
    let mut missed = Vec::new();
    for c in &cases {
        let mut src = webcam::open(&replay(&c.image)).unwrap();
        match src.read_raw(Some(Duration::from_secs(60))) {
            Ok(p) if measure::same_payload(&p, &c.expected) => right += 1,
            Ok(p) => panic!("{}: decoded a wrong payload {p:?}", c.image.display()),
            Err(SourceError::NoEntry(_)) => {
                missed.push(c.image.file_name().unwrap().to_string_lossy().into_owned())
            }
            Err(e) => panic!("{}: {e}", c.image.display()),
        }
    }
    let share = right as f64 / cases.len() as f64;
    eprintln!("ours: {right}/{} (missed {missed:?})", cases.len());
    assert!(
        share >= MIN_SHARE,
        "ours read {right}/{} ({share:.2}), below {MIN_SHARE}; missed {missed:?}",
        cases.len()
    );
    match measure::measure_zbarimg(&cases) {
        Ok(z) => {
            eprintln!("zbarimg: {}/{}", z.right, z.total);
            assert!(
                right >= z.right,
                "ours {right} < zbarimg {} of {}",
                z.right,
                z.total
            );
        }
        Err(e) => eprintln!("comparison with zbarimg skipped: {e}"),
    }
}

#[test]
fn a_folder_of_frames_is_scanned_until_a_key_label() {
    // frame-001: no code; frame-002: a URL QR code (not a label); frame-003: the label.
    let dir = fixtures().join("replay-scan");
    let expected = std::fs::read_to_string(dir.join("expected-label.txt")).unwrap();
    let mut src = webcam::open(&replay(&dir)).unwrap();
    assert_eq!(src.name(), "webcam");
    let got = src.read_raw(Some(Duration::from_secs(60))).unwrap();
    assert_eq!(got, expected.trim_end());
    // Nothing after the label: the replay has ended.
    assert!(matches!(src.read_raw(None), Err(SourceError::NoEntry(_))));
}

#[test]
fn the_callers_test_decides_which_payload_ends_the_scan() {
    let dir = fixtures().join("replay-scan");
    // A caller that wants the URL (any payload starting with https) gets it from frame 2.
    let mut src =
        WebcamSource::open(&replay(&dir), Box::new(|p| p.starts_with("https://"))).unwrap();
    use keyfleet_drivers::source::KeySource;
    assert!(src
        .read_raw(None)
        .unwrap()
        .starts_with("https://example.com/"));
    // A caller that refuses everything: the replay ends and says codes were seen.
    let mut src = WebcamSource::open(&replay(&dir), Box::new(|_| false)).unwrap();
    let err = src.read_raw(None).unwrap_err().to_string();
    assert!(
        err.contains("held 2 QR code(s), none of them a key label"),
        "{err}"
    );
}

#[test]
fn a_frame_without_a_code_ends_with_a_hint() {
    let frame = fixtures().join("replay-scan/frame-001.jpg");
    let err = webcam::open(&replay(&frame))
        .unwrap()
        .read_raw(None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no readable QR code in the 1 frame(s)"),
        "{err}"
    );
    assert!(err.contains("frame-001.jpg"), "{err}");
}

#[test]
fn a_zero_timeout_times_out() {
    let dir = fixtures().join("replay-scan");
    let err = webcam::open(&replay(&dir))
        .unwrap()
        .read_raw(Some(Duration::ZERO))
        .unwrap_err();
    assert!(matches!(err, SourceError::Timeout(_)), "{err}");
    assert!(err.to_string().contains("raise --timeout"));
}

#[test]
fn an_endless_timeout_is_no_deadline() {
    let dir = fixtures().join("replay-scan");
    let got = webcam::open(&replay(&dir))
        .unwrap()
        .read_raw(Some(Duration::MAX))
        .unwrap();
    assert!(got.starts_with("KF1:"), "{got}");
}

#[test]
fn bad_replay_paths_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    // Missing path.
    let missing = tmp.path().join("nope.jpg");
    let err = webcam::open(&replay(&missing)).err().unwrap().to_string();
    assert!(
        err.contains("nope.jpg") && err.contains("No such file"),
        "{err}"
    );
    // A folder with no frames (a text file only).
    std::fs::write(tmp.path().join("notes.txt"), "x").unwrap();
    let err = webcam::open(&replay(tmp.path())).err().unwrap().to_string();
    assert!(err.contains("holds no frames"), "{err}");
    // A file named .png that is not an image: the error names the file and the fault.
    let bad = tmp.path().join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    let err = webcam::open(&replay(&bad))
        .unwrap()
        .read_raw(None)
        .unwrap_err();
    assert!(matches!(err, SourceError::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("broken.png"), "{err}");
    // In a folder, the broken frame stops the replay with the same error.
    let err = webcam::open(&replay(tmp.path()))
        .unwrap()
        .read_raw(None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.png"), "{err}");
}

#[test]
fn a_video_device_that_is_not_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("ttyACM0");
    std::fs::write(&f, "").unwrap();
    let opts = SourceOptions {
        device: Some(f),
        ..SourceOptions::default()
    };
    let err = webcam::open(&opts).err().unwrap().to_string();
    assert!(err.contains("not a V4L2 video node"), "{err}");
}

#[test]
fn every_expected_answer_is_a_well_formed_label_and_listed_in_the_manifest() {
    const X25: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_IBM_SDLC);
    // CRC-16/X-25's catalogue check value: this is the Zigbee install-code CRC.
    assert_eq!(X25.checksum(b"123456789"), 0x906E);
    let dir = fixtures().join("generated");
    let manifest = std::fs::read_to_string(dir.join("MANIFEST.tsv")).unwrap();
    let mut labels: Vec<(String, String)> = generated_cases()
        .into_iter()
        .map(|c| {
            (
                c.image.file_stem().unwrap().to_string_lossy().into_owned(),
                c.expected,
            )
        })
        .collect();
    let replay = fixtures().join("replay-scan/expected-label.txt");
    labels.push((
        "replay-scan".into(),
        std::fs::read_to_string(replay).unwrap(),
    ));
    for (name, label) in labels {
        let parts: Vec<&str> = label.split(':').collect();
        assert_eq!(parts.len(), 3, "{name}: {label}");
        assert_eq!(parts[0], "KF1");
        assert!(
            (1..=64).contains(&parts[1].len()),
            "{name}: node id {}",
            parts[1]
        );
        assert!(parts[1]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)));
        let hex = parts[2];
        assert_eq!(hex.len(), 36, "{name}: {hex}");
        let bytes: Vec<u8> = (0..18)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let crc = u16::from_le_bytes([bytes[16], bytes[17]]);
        assert_eq!(
            X25.checksum(&bytes[..16]),
            crc,
            "{name}: CRC-16/X-25 of the key"
        );
        if name != "replay-scan" {
            assert!(
                manifest
                    .lines()
                    .any(|l| l.starts_with(&format!("{name}\t")) && l.ends_with(&label)),
                "{name} not in MANIFEST.tsv"
            );
        }
    }
}

#[test]
fn without_replay_or_device_the_first_camera_is_used_or_the_lack_of_one_is_said() {
    let cams = webcam::list();
    if !cams.is_empty() {
        eprintln!("skipped: this machine has video devices ({cams:?}); the test needs none");
        return;
    }
    let err = webcam::open(&SourceOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no video capture device found"), "{err}");
    assert!(err.contains("--device"), "{err}");
}
