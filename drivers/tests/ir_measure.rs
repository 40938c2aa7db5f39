//! Measure the decoders on recordings from elsewhere (not committed when
//! their licence does not allow): every `*.mode2` file (any text format
//! `ir::mode2` accepts) or `*.irtoy` file in `$KEYFLEET_IR_MEASURE_DIR` is
//! decoded and its frames printed as `file<TAB>protocol<TAB>scancode<TAB>toggle`
//! (`repeat` for repeat codes, `none` when nothing decoded).
//!
//! `KEYFLEET_IR_MEASURE_DIR=/tmp/captures cargo test -p keyfleet-drivers --test ir_measure -- --ignored --nocapture`
#![cfg(feature = "ir")]

use keyfleet_drivers::ir::decode::{Decoded, MultiDecoder, Output};
use keyfleet_drivers::ir::timing::Timing;
use keyfleet_drivers::ir::{sniff, Stream};

#[test]
#[ignore = "needs KEYFLEET_IR_MEASURE_DIR"]
fn decode_a_directory_of_recordings() {
    let dir = std::env::var("KEYFLEET_IR_MEASURE_DIR").expect("KEYFLEET_IR_MEASURE_DIR");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "mode2" || x == "irtoy"))
        .collect();
    files.sort();
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut stream = Stream::new(sniff(&bytes), true);
        let mut timings = match stream.push(&bytes) {
            Ok(t) => t,
            Err(e) => {
                println!("{name}\terror\t{e}");
                continue;
            }
        };
        timings.extend(stream.finish().unwrap_or_default());
        timings.push(Timing::Timeout(125_000));
        let mut d = MultiDecoder::default();
        let mut any = false;
        for t in timings {
            for o in d.feed(t) {
                match o {
                    Output::Decoded {
                        what: Decoded::Key(f),
                        ..
                    } => {
                        any = true;
                        println!(
                            "{name}\t{}\t0x{:x}\t{}",
                            f.protocol.name(),
                            f.scancode,
                            u8::from(f.toggle)
                        );
                    }
                    Output::Decoded {
                        what: Decoded::Repeat,
                        ..
                    } => {
                        any = true;
                        println!("{name}\trepeat");
                    }
                    Output::SignalEnd { .. } => {}
                }
            }
        }
        if !any {
            println!("{name}\tnone");
        }
    }
}

/// Every `X.session` (mode2 text or IR Toy bytes) in `$KEYFLEET_IR_MEASURE_DIR`
/// with an `X.session.toml` beside it (`keymap = "..."`, `raw = "..."`) is
/// replayed through `ir::open` and the answer compared; prints
/// `file<TAB>right|WRONG|error`.
#[test]
#[ignore = "needs KEYFLEET_IR_MEASURE_DIR"]
fn replay_a_directory_of_sessions() {
    use keyfleet_drivers::source::SourceOptions;
    let dir = std::path::PathBuf::from(
        std::env::var("KEYFLEET_IR_MEASURE_DIR").expect("KEYFLEET_IR_MEASURE_DIR"),
    );
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "session"))
        .collect();
    files.sort();
    let (mut right, mut total) = (0, 0);
    for path in files {
        let spec_path = path.with_extension("session.toml");
        let Ok(spec) = std::fs::read_to_string(&spec_path) else {
            continue;
        };
        let spec: toml::Table = spec.parse().unwrap();
        let keymap = dir.join(spec["keymap"].as_str().unwrap());
        let want = spec["raw"].as_str().unwrap();
        total += 1;
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let got = keyfleet_drivers::ir::open(&SourceOptions {
            replay: Some(path.clone()),
            keymap: Some(keymap),
            ..SourceOptions::default()
        })
        .and_then(|mut s| s.read_raw(None));
        match got {
            Ok(g) if g == want => {
                right += 1;
                println!("{name}\tright");
            }
            Ok(g) => println!("{name}\tWRONG\t{} chars, {} expected", g.len(), want.len()),
            Err(e) => println!("{name}\terror\t{e}"),
        }
    }
    println!("{right} of {total} sessions right");
}
