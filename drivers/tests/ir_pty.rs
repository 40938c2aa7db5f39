//! The IR source on a real serial device: a pseudo-terminal whose master
//! side plays the receiver (a board printing mode2 text, or a USB IR Toy
//! answering its commands and streaming samples), read through `ir::open`
//! on the slave path.
#![cfg(feature = "ir")]

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use keyfleet_drivers::ir;
use keyfleet_drivers::source::{SourceError, SourceOptions};
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt, PtyMaster};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/ir")
}

fn expected_raw(file: &str) -> String {
    let spec: toml::Table = std::fs::read_to_string(fixtures().join(format!("{file}.expected")))
        .unwrap()
        .parse()
        .unwrap();
    spec["raw"].as_str().unwrap().to_string()
}

fn pty() -> (PtyMaster, PathBuf) {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY).expect("posix_openpt");
    grantpt(&master).expect("grantpt");
    unlockpt(&master).expect("unlockpt");
    let slave = ptsname_r(&master).expect("ptsname_r");
    (master, PathBuf::from(slave))
}

/// Read what the host wrote, for up to `wait`; EIO (no slave open yet) is retried.
fn read_some(master: &mut PtyMaster, wait: Duration) -> Vec<u8> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        let ready = {
            let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, 20u16).unwrap_or(0) > 0
                && fds[0]
                    .revents()
                    .is_some_and(|r| r.contains(PollFlags::POLLIN))
        };
        if !ready {
            thread::sleep(Duration::from_millis(5));
            continue;
        }
        let mut buf = [0u8; 256];
        match master.read(&mut buf) {
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                return out;
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
    out
}

/// Write in uneven chunks with pauses, as a slow board or a USB endpoint would.
fn trickle(master: &mut PtyMaster, bytes: &[u8]) {
    let mut i = 0;
    let mut n = 1;
    while i < bytes.len() {
        let end = (i + n).min(bytes.len());
        master.write_all(&bytes[i..end]).unwrap();
        i = end;
        n = n % 97 + 13;
        if i % 5 == 0 {
            thread::sleep(Duration::from_millis(1));
        }
    }
    master.flush().unwrap();
}

fn opts(device: &Path, keymap: &str) -> SourceOptions {
    SourceOptions {
        device: Some(device.to_path_buf()),
        keymap: Some(fixtures().join(keymap)),
        ..SourceOptions::default()
    }
}

#[test]
fn mode2_text_board_on_a_pseudo_terminal() {
    let (mut master, slave) = pty();
    // The recording without its last line: the board prints nothing after
    // the OK frame's final pulse, so only the idle timeout can complete it.
    let text = std::fs::read_to_string(fixtures().join("nec-hex.mode2")).unwrap();
    let last = text.trim_end().rfind('\n').unwrap();
    assert!(text[last..].trim().starts_with("space"));
    let body = text[..=last].to_string();

    let (tx, rx) = mpsc::channel();
    let board = thread::spawn(move || {
        // Wait for the host's probe (an IR Toy version query), ignore it, then print.
        let mut seen = Vec::new();
        while !seen.contains(&b'v') {
            let got = read_some(&mut master, Duration::from_secs(5));
            assert!(!got.is_empty(), "no probe from the host");
            seen.extend(got);
        }
        trickle(&mut master, body.as_bytes());
        tx.send(seen).unwrap();
        // Keep the master open until the host is done.
        thread::sleep(Duration::from_secs(3));
    });

    let start = Instant::now();
    let mut src = ir::open(&opts(&slave, "keymaps/keyfleet-nec.toml")).expect("open the pty slave");
    let got = src
        .read_raw(Some(Duration::from_secs(20)))
        .expect("an entry");
    assert_eq!(got, expected_raw("nec-hex.mode2"));
    let probe = rx.recv().unwrap();
    assert!(
        probe.starts_with(&[0xff, 0xff, 0, 0, 0, 0, 0]),
        "{probe:02x?}"
    );
    eprintln!("mode2 text over a pty: {} ms", start.elapsed().as_millis());
    drop(src);
    board.join().unwrap();
}

#[test]
fn ir_toy_on_a_pseudo_terminal() {
    let (mut master, slave) = pty();
    let recording = std::fs::read(fixtures().join("rc6-mce-decimal.irtoy")).unwrap();
    assert_eq!(&recording[..3], b"S01");
    let samples = recording[3..].to_vec();

    let (tx, rx) = mpsc::channel();
    let toy = thread::spawn(move || {
        // Firmware v22 on hardware 2: answer `v` and `s` as the Toy does.
        let mut commands = Vec::new();
        let mut in_sample_mode = false;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !in_sample_mode && Instant::now() < deadline {
            for b in read_some(&mut master, Duration::from_millis(200)) {
                commands.push(b);
                match b {
                    b'v' => master.write_all(b"V222").unwrap(),
                    b's' => {
                        master.write_all(b"S01").unwrap();
                        in_sample_mode = true;
                    }
                    _ => {}
                }
            }
        }
        assert!(
            in_sample_mode,
            "host never asked for sample mode: {commands:02x?}"
        );
        trickle(&mut master, &samples);
        // After the entry the host puts the Toy back in IRman mode (0x00).
        let tail = read_some(&mut master, Duration::from_secs(10));
        tx.send((commands, tail)).unwrap();
    });

    let mut src =
        ir::open(&opts(&slave, "keymaps/keyfleet-rc6-mce.toml")).expect("open the pty slave");
    let got = src
        .read_raw(Some(Duration::from_secs(20)))
        .expect("an entry");
    assert_eq!(got, expected_raw("rc6-mce-decimal.irtoy"));
    drop(src);
    let (commands, tail) = rx.recv().unwrap();
    assert_eq!(commands, [0xff, 0xff, 0, 0, 0, 0, 0, b'v', b's']);
    assert_eq!(tail, [0]);
    toy.join().unwrap();
}

#[test]
fn silent_receiver_times_out() {
    let (master, slave) = pty();
    let mut src = ir::open(&opts(&slave, "keymaps/keyfleet-nec.toml")).expect("open");
    let start = Instant::now();
    let e = src.read_raw(Some(Duration::from_millis(300))).unwrap_err();
    assert!(matches!(e, SourceError::Timeout(_)), "{e}");
    assert!(start.elapsed() >= Duration::from_millis(300));
    drop(master);
}

#[test]
fn malformed_text_from_a_board_names_the_line() {
    let (mut master, slave) = pty();
    let board = thread::spawn(move || {
        while !read_some(&mut master, Duration::from_secs(5)).contains(&b'v') {}
        master
            .write_all(b"pulse 9000\nspace 4500\npulse oops\n")
            .unwrap();
        thread::sleep(Duration::from_secs(2));
    });
    let mut src = ir::open(&opts(&slave, "keymaps/keyfleet-nec.toml")).expect("open");
    let e = src
        .read_raw(Some(Duration::from_secs(5)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 3") && e.contains("pulse oops"), "{e}");
    board.join().unwrap();
}

#[test]
fn refusals_at_open_say_what_to_do() {
    let e = ir::open(&opts(
        Path::new("/dev/does-not-exist-ir"),
        "keymaps/keyfleet-nec.toml",
    ))
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("/dev/does-not-exist-ir"), "{e}");
    let e = ir::open(&SourceOptions {
        device: Some("/dev/null".into()),
        ..SourceOptions::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("--keymap"), "{e}");
    let e = ir::open(&SourceOptions {
        keymap: Some(fixtures().join("keymaps/keyfleet-nec.toml")),
        ..SourceOptions::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("--device") && e.contains("--replay"), "{e}");
    let e = ir::open(&SourceOptions {
        replay: Some(fixtures().join("nec-hex.mode2")),
        keymap: Some("/nonexistent/keymap.toml".into()),
        ..SourceOptions::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("/nonexistent/keymap.toml"), "{e}");
}
