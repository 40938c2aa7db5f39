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
