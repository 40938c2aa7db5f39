//! serial-scanner through a real pseudo-terminal pair and from the fixtures in
//! fixtures/serial/: the bytes a scanner sends go in at the master, and the
//! scanner source reads them from the slave by its path, exactly as it opens
//! /dev/ttyACM0.
#![cfg(feature = "serial-scanner")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keyfleet_drivers::serial;
use keyfleet_drivers::source::{KeySource, SerialSettings, SourceError, SourceOptions};
use serialport::{SerialPort, TTYPort};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/serial")
}

/// A pty pair: the master to write as the scanner would, and the source opened on the slave path.
fn pty_source() -> (TTYPort, TTYPort, Box<dyn KeySource>) {
    let (master, slave) = TTYPort::pair().expect("openpty");
    let path = slave.name().expect("slave has a name");
    let opts = SourceOptions {
        device: Some(PathBuf::from(path)),
        serial: SerialSettings {
            baud: 115_200,
            ..SerialSettings::default()
        },
        ..SourceOptions::default()
    };
    let src = serial::open(&opts).expect("open the pty slave as a serial scanner");
    (master, slave, src)
}

/// Every fixture: `NAME.bin` holds the raw bytes, `NAME.expected` one scan per line.
fn fixture_pairs() -> Vec<(PathBuf, Vec<String>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(fixtures()).expect("fixtures/serial") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("bin") {
            continue;
        }
        let expected = std::fs::read_to_string(path.with_extension("expected"))
            .unwrap_or_else(|e| panic!("{}: no .expected beside it: {e}", path.display()));
        out.push((path, expected.lines().map(str::to_string).collect()));
    }
    out.sort();
    assert!(
        out.len() >= 4,
        "fixtures/serial has too few recordings: {out:?}"
    );
    out
}

#[test]
fn fixtures_replay_to_their_expected_scans() {
    for (path, expected) in fixture_pairs() {
        let opts = SourceOptions {
            replay: Some(path.clone()),
            ..SourceOptions::default()
        };
        let mut src = serial::open(&opts).unwrap();
        for want in &expected {
            let got = src.read_raw(Some(Duration::from_secs(1)));
            assert_eq!(
                got.as_deref().ok(),
                Some(want.as_str()),
                "{}",
                path.display()
            );
        }
        // Nothing more: the capture ends without another scan.
        match src.read_raw(Some(Duration::from_secs(1))) {
            Err(SourceError::Ended(_)) => {}
            other => panic!("{}: expected the end, got {other:?}", path.display()),
        }
    }
}

#[test]
fn fixtures_through_a_pseudo_terminal_match_the_replay() {
    for (path, expected) in fixture_pairs() {
        let bytes = std::fs::read(&path).unwrap();
        let (mut master, _slave, mut src) = pty_source();
        master.write_all(&bytes).unwrap();
        master.flush().unwrap();
        for want in &expected {
            let got = src.read_raw(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(&got, want, "{} through the pty", path.display());
        }
    }
}

#[test]
fn a_scan_split_over_several_writes_is_one_scan() {
    let (mut master, _slave, mut src) = pty_source();
    let writer = std::thread::spawn(move || {
        for part in [
            &b"\x02]Q1KF1:gate-"[..],
            b"12:00112233",
            b"4455667788",
            b"99aabbccddeeff",
            b"0000\x03",
        ] {
            master.write_all(part).unwrap();
            master.flush().unwrap();
            std::thread::sleep(Duration::from_millis(30));
        }
        master
    });
    let got = src.read_raw(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(got, "KF1:gate-12:00112233445566778899aabbccddeeff0000");
    drop(writer.join().unwrap());
}

#[test]
fn silence_times_out_when_asked() {
    let (_master, _slave, mut src) = pty_source();
    let t0 = Instant::now();
    let e = src.read_raw(Some(Duration::from_millis(300))).unwrap_err();
    let took = t0.elapsed();
    assert!(
        matches!(e, SourceError::Timeout(d) if d == Duration::from_millis(300)),
        "{e:?}"
    );
    assert!(
        took >= Duration::from_millis(290),
        "returned after {took:?}"
    );
    assert!(took < Duration::from_secs(3), "returned after {took:?}");
    assert!(e.to_string().contains("raise --timeout"), "{e}");
}

#[test]
fn an_unfinished_scan_is_not_returned_on_timeout() {
    let (mut master, _slave, mut src) = pty_source();
    master.write_all(b"KF1:half-a-label").unwrap();
    master.flush().unwrap();
    let e = src.read_raw(Some(Duration::from_millis(300))).unwrap_err();
    assert!(matches!(e, SourceError::Timeout(_)), "{e:?}");
    // The rest arrives: the scan completes whole.
    master.write_all(b"-rest\r\n").unwrap();
    master.flush().unwrap();
    assert_eq!(
        src.read_raw(Some(Duration::from_secs(5))).unwrap(),
        "KF1:half-a-label-rest"
    );
}

#[test]
fn bad_line_settings_are_refused_by_name() {
    let (_master, slave) = TTYPort::pair().unwrap();
    let opts = SourceOptions {
        device: Some(PathBuf::from(slave.name().unwrap())),
        serial: SerialSettings {
            parity: 'M',
            ..SerialSettings::default()
        },
        ..SourceOptions::default()
    };
    let e = serial::open(&opts)
        .err()
        .expect("parity M refused")
        .to_string();
    assert!(e.contains("parity 'M'; use N, E or O"), "{e}");
}

#[test]
fn a_missing_device_says_which() {
    let opts = SourceOptions {
        device: Some(PathBuf::from("/dev/ttyACM-keyfleet-none")),
        ..SourceOptions::default()
    };
    let e = serial::open(&opts)
        .err()
        .expect("no such device")
        .to_string();
    assert!(e.contains("/dev/ttyACM-keyfleet-none"), "{e}");
}

#[test]
fn an_unplugged_scanner_ends_the_read_with_the_reason() {
    let (master, slave, mut src) = pty_source();
    // The pty master closing is what the tty layer shows when a USB serial adapter goes away.
    drop(master);
    drop(slave);
    let e = src.read_raw(Some(Duration::from_secs(5))).unwrap_err();
    match e {
        SourceError::Ended(why) => assert!(
            why.contains("unplugged") || why.contains("hung up"),
            "{why}"
        ),
        other => panic!("expected Ended, got {other:?}"),
    }
}
