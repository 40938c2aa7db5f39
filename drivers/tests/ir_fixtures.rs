//! IR fixtures: every recording in `fixtures/ir/` replays through
//! `ir::open` (the device's decoder path) to the answer beside it; the
//! generated ones are exactly what our encoder writes; every installed
//! ir-keytable keymap loads and, where it is a NEC/RC5/RC6 remote with digits,
//! reads digits typed on it.
//!
//! Regenerate the generated fixtures with
//! `KEYFLEET_WRITE_FIXTURES=1 cargo test -p keyfleet-drivers --test ir_fixtures`.
#![cfg(feature = "ir")]

mod ir_support;

use std::path::{Path, PathBuf};

use ir_support::{Format, Press, Remote};
use keyfleet_drivers::ir::decode::{Frame, Protocol};
use keyfleet_drivers::ir::encode::{Receiver, SplitMix64};
use keyfleet_drivers::ir::{self, keymap::Keymap, IrSource};
use keyfleet_drivers::source::{KeySource, SourceError, SourceOptions};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/ir")
}

fn replay(recording: &Path, keymap: &Path) -> Result<String, SourceError> {
    let mut src = ir::open(&SourceOptions {
        replay: Some(recording.to_path_buf()),
        keymap: Some(keymap.to_path_buf()),
        ..SourceOptions::default()
    })?;
    assert_eq!(src.name(), "ir");
    src.read_raw(None)
}

enum Answer {
    Raw {
        raw: String,
        form: &'static str,
        key_check: String,
    },
    Error(&'static str),
}

struct Scenario {
    file: &'static str,
    keymap: &'static str,
    format: Format,
    remote: Remote,
    answer: Answer,
    presses: Vec<Press>,
    rx: Receiver,
    /// Seed for bursts of 40-300 us glitches in the pauses (a lamp, sunlight).
    glitches: Option<u64>,
    about: &'static str,
}

fn hex_remote(protocol: Protocol, base: u32, finish: u32, erase: u32) -> Remote {
    Remote {
        protocol,
        chars: "0123456789ABCDEF"
            .chars()
            .enumerate()
            .map(|(i, c)| (c, base + i as u32))
            .collect(),
        finish,
        erase: Some(erase),
        noise: None,
        cancel: None,
        toggle: false,
    }
}

fn decimal_remote(protocol: Protocol, base: u32, finish: u32, erase: u32) -> Remote {
    Remote {
        protocol,
        chars: "0123456789"
            .chars()
            .enumerate()
            .map(|(i, c)| (c, base + i as u32))
            .collect(),
        finish,
        erase: Some(erase),
        noise: None,
        cancel: None,
        toggle: false,
    }
}

fn key_answer(seed: u64, decimal: bool) -> (String, Answer) {
    let key = ir_support::key_from_seed(seed);
    let raw = if decimal {
        ir_support::decimal_form(&key)
    } else {
        ir_support::hex_form(&key)
    };
    let answer = Answer::Raw {
        raw: raw.clone(),
        form: if decimal { "decimal" } else { "hex" },
        key_check: ir_support::key_check(&key),
    };
    (raw, answer)
}

/// Every generated fixture: which remote, which key form, which recording
/// format, which receiver model.
fn scenarios() -> Vec<Scenario> {
    let mut v = Vec::new();

    // NEC, hex keypad, LIRC mode2 text; a stray volume button; typos erased.
    let (text, answer) = key_answer(1, false);
    let mut remote = hex_remote(Protocol::Nec, 0x2000, 0x2010, 0x2011);
    remote.noise = Some(0x2012);
    let presses = remote.typing(&text, &mut SplitMix64(11), true);
    v.push(Scenario {
        file: "nec-hex.mode2",
        keymap: "keymaps/keyfleet-nec.toml",
        format: Format::Mode2,
        remote,
        answer,
        presses,
        rx: Receiver::new(101, 60, 80),
        glitches: None,
        about: "NEC remote, hex form, mode2 text with banner; held buttons send repeat codes",
    });

    // NECX, digits only, mode2 -m columns.
    let (text, answer) = key_answer(2, true);
    let remote = decimal_remote(Protocol::NecX, 0x866b00, 0x866b0b, 0x866b0a);
    let presses = remote.typing(&text, &mut SplitMix64(12), true);
    v.push(Scenario {
        file: "necx-decimal.mode2m",
        keymap: "keymaps/keyfleet-necx.toml",
        format: Format::Mode2Columns,
        remote,
        answer,
        presses,
        rx: Receiver::new(102, 90, 100),
        glitches: None,
        about: "extended NEC remote, decimal form, `mode2 -m` columns",
    });

    // NEC32, hex keypad, ir-ctl -r.
    let (text, answer) = key_answer(3, false);
    let remote = hex_remote(Protocol::Nec32, 0x87ee0010, 0x87ee0030, 0x87ee0031);
    let presses = remote.typing(&text, &mut SplitMix64(13), true);
    v.push(Scenario {
        file: "nec32-hex.irctl",
        keymap: "keymaps/keyfleet-nec32.toml",
        format: Format::IrCtl,
        remote,
        answer,
        presses,
        rx: Receiver::new(103, 40, 120),
        glitches: None,
        about: "32-bit NEC remote, hex form, `ir-ctl -r` output",
    });

    // RC5, digits only, ir-ctl --mode2 with timeouts; held buttons repeat the frame.
    let (text, answer) = key_answer(4, true);
    let mut remote = decimal_remote(Protocol::Rc5, 0x1e00, 0x1e25, 0x1e1f);
    remote.noise = Some(0x1e50);
    let presses = remote.typing(&text, &mut SplitMix64(14), true);
    v.push(Scenario {
        file: "rc5-decimal.mode2",
        keymap: "keymaps/keyfleet-rc5.toml",
        format: Format::IrCtlMode2,
        remote,
        answer,
        presses,
        rx: Receiver::new(104, 70, 110),
        glitches: None,
        about: "RC5 remote, decimal form, `ir-ctl -r --mode2` with timeout lines; \
                held buttons repeat frames with the same toggle",
    });

    // RC6 MCE through an IR Toy.
    let (text, answer) = key_answer(5, true);
    let mut remote = decimal_remote(Protocol::Rc6Mce, 0x800f0400, 0x800f040b, 0x800f040a);
    remote.noise = Some(0x800f0410);
    let presses = remote.typing(&text, &mut SplitMix64(15), true);
    v.push(Scenario {
        file: "rc6-mce-decimal.irtoy",
        keymap: "keymaps/keyfleet-rc6-mce.toml",
        format: Format::IrToy,
        remote,
        answer,
        presses,
        rx: Receiver::new(105, 50, 60),
        glitches: None,
        about: "RC6 MCE remote, decimal form, USB IR Toy sample stream (S01, 21.333 us counts, 0xFFFF)",
    });

    // The same MCE remote as mode2 text (also read with the installed rc6_mce.toml).
    let (text, answer) = key_answer(6, true);
    let mut remote = decimal_remote(Protocol::Rc6Mce, 0x800f0400, 0x800f0422, 0x800f040a);
    remote.noise = Some(0x800f0410);
    let presses = remote.typing(&text, &mut SplitMix64(16), true);
    v.push(Scenario {
        file: "rc6-mce-decimal.mode2",
        keymap: "keymaps/keyfleet-rc6-mce.toml",
        format: Format::Mode2,
        remote,
        answer,
        presses,
        rx: Receiver::new(106, 80, 90),
        glitches: None,
        about: "RC6 MCE remote, decimal form, mode2 text, OK button",
    });

    // RC6 mode 0, hex keypad.
    let (text, answer) = key_answer(7, false);
    let remote = hex_remote(Protocol::Rc6Mode0, 0x0c00, 0x0c5c, 0x0c20);
    let presses = remote.typing(&text, &mut SplitMix64(17), true);
    v.push(Scenario {
        file: "rc6-0-hex.mode2",
        keymap: "keymaps/keyfleet-rc6-0.toml",
        format: Format::IrCtlMode2,
        remote,
        answer,
        presses,
        rx: Receiver::new(107, 60, 70),
        glitches: None,
        about: "RC6 mode 0 remote, hex form, `ir-ctl -r --mode2`",
    });

    // RC5 again, with glitches between the presses.
    let (text, answer) = key_answer(8, true);
    let mut remote = decimal_remote(Protocol::Rc5, 0x1e00, 0x1e25, 0x1e1f);
    remote.noise = Some(0x1e50);
    let presses = remote.typing(&text, &mut SplitMix64(20), true);
    v.push(Scenario {
        file: "rc5-decimal-noisy.mode2",
        keymap: "keymaps/keyfleet-rc5.toml",
        format: Format::Mode2,
        remote,
        answer,
        presses,
        rx: Receiver::new(110, 70, 110),
        glitches: Some(21),
        about: "RC5 remote, decimal form, mode2 text with bursts of short glitches in every pause",
    });

    // Refusals: cancelled, and a recording that ends before OK.
    let mut remote = hex_remote(Protocol::Nec, 0x2000, 0x2010, 0x2011);
    remote.cancel = Some(0x2013);
    let mut presses = remote.typing("12AB", &mut SplitMix64(18), false);
    presses.pop();
    presses.push(Press {
        scancode: 0x2013,
        repeats: 0,
        pause_us: 300_000,
    });
    v.push(Scenario {
        file: "nec-cancelled.mode2",
        keymap: "keymaps/keyfleet-nec.toml",
        format: Format::Mode2,
        remote,
        answer: Answer::Error("entry cancelled"),
        presses,
        rx: Receiver::new(108, 60, 80),
        glitches: None,
        about: "NEC remote: four digits, then EXIT: refused as cancelled",
    });
    let remote = decimal_remote(Protocol::Rc5, 0x1e00, 0x1e25, 0x1e1f);
    let mut presses = remote.typing("0123", &mut SplitMix64(19), false);
    presses.pop();
    v.push(Scenario {
        file: "rc5-no-ok.mode2",
        keymap: "keymaps/keyfleet-rc5.toml",
        format: Format::IrCtlMode2,
        remote,
        answer: Answer::Error("4 characters entered, no OK/ENTER/SELECT button"),
        presses,
        rx: Receiver::new(109, 60, 80),
        glitches: None,
        about: "RC5 remote: four digits and no OK before the recording ends",
    });
    v
}

fn generate(s: &mut Scenario) -> (Vec<u8>, String) {
    let signals = s.remote.send(&s.presses);
    let mut received = ir_support::receive(&mut s.rx, signals);
    if let Some(seed) = s.glitches {
        ir_support::add_glitches(&mut received, seed);
    }
    let bytes = ir_support::write(s.format, &received, "/dev/lirc0");
    let mut expected = format!(
        "# What keyfleet reads from {file}: {about}.\n\
         # Generated by drivers/tests/ir_fixtures.rs (our own data, MIT OR Apache-2.0).\n\
         keymap = \"{keymap}\"\n",
        file = s.file,
        about = s.about,
        keymap = s.keymap
    );
    match &s.answer {
        Answer::Raw {
            raw,
            form,
            key_check,
        } => expected.push_str(&format!(
            "raw = \"{raw}\"\nform = \"{form}\"\nkey_check = \"{key_check}\"\n"
        )),
        Answer::Error(e) => expected.push_str(&format!("error = \"{e}\"\n")),
    }
    (bytes, expected)
}

#[test]
fn generated_fixtures_are_what_the_encoder_writes() {
    let write = std::env::var_os("KEYFLEET_WRITE_FIXTURES").is_some();
    for mut s in scenarios() {
        let (bytes, expected) = generate(&mut s);
        let rec = fixtures().join(s.file);
        let exp = fixtures().join(format!("{}.expected", s.file));
        if write {
            std::fs::write(&rec, &bytes).unwrap();
            std::fs::write(&exp, &expected).unwrap();
        }
        assert!(
            std::fs::read(&rec).unwrap() == bytes,
            "{} differs from the generator; run with KEYFLEET_WRITE_FIXTURES=1",
            rec.display()
        );
        assert_eq!(std::fs::read_to_string(&exp).unwrap(), expected);
    }
}

/// Each `X.expected` beside a recording `X` in fixtures/ir (and below it).
fn expected_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            expected_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "expected") {
            out.push(p);
        }
    }
}

#[test]
fn every_fixture_replays_to_its_expected_answer() {
    let mut files = Vec::new();
    expected_files(&fixtures(), &mut files);
    files.sort();
    assert!(files.len() >= 9, "fixtures missing: {files:?}");
    for exp in files {
        let rec = exp.with_extension("");
        let spec: toml::Table = std::fs::read_to_string(&exp).unwrap().parse().unwrap();
        let keymap = fixtures().join(spec["keymap"].as_str().unwrap());
        let got = replay(&rec, &keymap);
        match (spec.get("raw"), spec.get("error")) {
            (Some(raw), _) => {
                let got = got.unwrap_or_else(|e| panic!("{}: {e}", rec.display()));
                assert_eq!(got, raw.as_str().unwrap(), "{}", rec.display());
            }
            (None, Some(err)) => {
                let e = got.expect_err(&rec.display().to_string()).to_string();
                assert!(e.contains(err.as_str().unwrap()), "{}: {e}", rec.display());
            }
            _ => panic!("{}: neither raw nor error", exp.display()),
        }
    }
}

#[test]
fn fixture_answers_are_valid_key_forms() {
    // The generator's key forms check out: CRC-16/X-25 ("123456789" -> 0x906E)
    // and ISO 7064 MOD 97-10 (a number with its check digits is 1 mod 97).
    assert_eq!(ir_support::crc16_x25(b"123456789"), 0x906e);
    let d = ir_support::decimal_form(&ir_support::key_from_seed(2));
    assert_eq!(d.len(), 41);
    let r = d
        .bytes()
        .fold(0u32, |a, c| (a * 10 + u32::from(c - b'0')) % 97);
    assert_eq!(r, 1);
    assert_eq!(
        ir_support::hex_form(&ir_support::key_from_seed(1)).len(),
        36
    );
}

#[test]
fn installed_rc6_mce_keymap_reads_the_mce_fixtures() {
    let installed = Path::new("/lib/udev/rc_keymaps/rc6_mce.toml");
    if !installed.exists() {
        eprintln!(
            "skipped: {} not installed (Debian package ir-keytable)",
            installed.display()
        );
        return;
    }
    for file in ["rc6-mce-decimal.mode2", "rc6-mce-decimal.irtoy"] {
        let exp: toml::Table = std::fs::read_to_string(fixtures().join(format!("{file}.expected")))
            .unwrap()
            .parse()
            .unwrap();
        let got = replay(&fixtures().join(file), installed).unwrap();
        assert_eq!(got, exp["raw"].as_str().unwrap(), "{file}");
    }
    // By bare name, as ir-keytable takes it.
    let got = replay(
        &fixtures().join("rc6-mce-decimal.mode2"),
        Path::new("rc6_mce"),
    )
    .unwrap();
    assert_eq!(got.len(), 41);
}

/// The protocol a keymap's scancode is sent with, as the kernel's encoders would.
fn protocol_for(family: &str, variant: Option<&str>, code: u32) -> Option<Protocol> {
    match family {
        "nec" => Some(match variant {
            Some("necx") => Protocol::NecX,
            Some("nec32") => Protocol::Nec32,
            Some("nec") => Protocol::Nec,
            _ if code <= 0xffff => Protocol::Nec,
            _ if code <= 0xff_ffff => Protocol::NecX,
            _ => Protocol::Nec32,
        }),
        "rc5" => Some(if code <= 0x1f7f {
            Protocol::Rc5
        } else {
            Protocol::Rc5x20
        }),
        "rc6" => Some(match variant {
            Some("rc6_0") => Protocol::Rc6Mode0,
            _ => Protocol::Rc6Mce,
        }),
        _ => None,
    }
}

#[test]
fn every_installed_keymap_loads_and_digit_remotes_enter_digits() {
    let dir = Path::new("/lib/udev/rc_keymaps");
    let Ok(entries) = std::fs::read_dir(dir) else {
        eprintln!(
            "skipped: {} absent (Debian package ir-keytable)",
            dir.display()
        );
        return;
    };
    let recording = fixtures().join("nec-hex.mode2");
    let (mut loaded, mut typed) = (0, 0);
    for e in entries {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        // Any keymap opens the source.
        ir::open(&SourceOptions {
            replay: Some(recording.clone()),
            keymap: Some(path.clone()),
            ..SourceOptions::default()
        })
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        loaded += 1;

        // Type a decimal form on every NEC/RC5/RC6 remote that has digits and a finish button.
        let text = std::fs::read_to_string(&path).unwrap();
        let raw: toml::Table = text.parse().unwrap();
        let keymap = Keymap::parse(&text, &path.display().to_string()).unwrap();
        for p in raw["protocols"].as_array().unwrap() {
            let family = p["protocol"].as_str().unwrap();
            let variant = p.get("variant").and_then(|v| v.as_str());
            let Some(codes) = p.get("scancodes").and_then(|s| s.as_table()) else {
                continue;
            };
            // The first scancode for one of `names` that a remote of this
            // protocol can send (some keymaps also list codes other drivers
            // produce, e.g. imon's 0x0200xxxx in imon_mce).
            let find = |names: &[String]| {
                let mut found: Vec<(u32, Protocol)> = codes
                    .iter()
                    .filter(|(_, v)| names.iter().any(|n| v.as_str() == Some(n)))
                    .filter_map(|(k, _)| u32::from_str_radix(k.trim_start_matches("0x"), 16).ok())
                    .filter_map(|c| Some((c, protocol_for(family, variant, c)?)))
                    .filter(|&(c, protocol)| {
                        let f = Frame {
                            protocol,
                            scancode: c,
                            toggle: false,
                        };
                        keyfleet_drivers::ir::encode::frame(f).is_some()
                    })
                    .collect();
                found.sort_by_key(|x| x.0);
                found.first().copied()
            };
            let digits: Vec<Option<(u32, Protocol)>> = (0..10)
                .map(|d| find(&[format!("KEY_{d}"), format!("KEY_NUMERIC_{d}")]))
                .collect();
            let finish = find(&["KEY_OK".into(), "KEY_ENTER".into(), "KEY_SELECT".into()]);
            let (Some((finish, protocol)), true) = (finish, digits.iter().all(Option::is_some))
            else {
                continue;
            };
            // One remote sends one variant (a keymap may mix NEC and NECX codes).
            if digits.iter().flatten().any(|d| d.1 != protocol) {
                continue;
            }
            let digits: Vec<u32> = digits.into_iter().flatten().map(|d| d.0).collect();
            let mut remote = Remote {
                protocol,
                chars: ('0'..='9').zip(digits).collect(),
                finish,
                erase: None,
                noise: None,
                cancel: None,
                toggle: false,
            };
            let (text, _) = key_answer(loaded as u64, true);
            let presses = remote.typing(&text, &mut SplitMix64(loaded as u64), false);
            let signals = ir_support::receive(&mut Receiver::new(7, 60, 60), remote.send(&presses));
            let bytes = ir_support::write(Format::Mode2, &signals, "/dev/lirc0");
            let got = IrSource::from_bytes(bytes, &path.display().to_string(), keymap.clone())
                .read_raw(None)
                .unwrap_or_else(|e| panic!("{} ({protocol:?}): {e}", path.display()));
            assert_eq!(got, text, "{} ({protocol:?})", path.display());
            typed += 1;
        }
    }
    eprintln!("{loaded} installed keymaps loaded; digits typed and read back on {typed} of them");
    assert!(loaded > 0);
}
