//! A USB IR Toy's sample-mode byte stream (from the device or a `--replay`
//! capture): the same timings however the bytes are split across reads, and
//! the decoders and the whole replay take them without a panic.
#![no_main]

use keyfleet_drivers::ir::{Format, Stream};
use keyfleet_fuzz::{decode_ir, replay_ir, write_seeds};
use libfuzzer_sys::fuzz_target;

fn timings(pieces: &[&[u8]]) -> (Vec<keyfleet_drivers::ir::timing::Timing>, bool) {
    let mut s = Stream::new(Format::IrToy, true);
    let mut out = Vec::new();
    for p in pieces {
        out.extend(s.push(p).expect("IR Toy bytes never fail a push"));
    }
    let finished = match s.finish() {
        Ok(t) => {
            out.extend(t);
            true
        }
        Err(_) => false,
    };
    (out, finished)
}

/// The mode2 fixtures as an IR Toy would have sent them.
fn seeds() -> Vec<(String, Vec<u8>)> {
    use keyfleet_drivers::ir::{irtoy, mode2};
    [
        ("nec-hex", include_str!("../../fixtures/ir/nec-hex.mode2")),
        (
            "rc5-decimal",
            include_str!("../../fixtures/ir/rc5-decimal.mode2"),
        ),
        (
            "rc6-0-hex",
            include_str!("../../fixtures/ir/rc6-0-hex.mode2"),
        ),
        (
            "necx-decimal",
            include_str!("../../fixtures/ir/necx-decimal.mode2m"),
        ),
    ]
    .into_iter()
    .map(|(name, text)| {
        let t = mode2::parse_str(text).expect("fixture parses");
        (format!("{name}.irtoy"), irtoy::encode(&t))
    })
    .collect()
}

fuzz_target!(init: write_seeds(seeds), |data: &[u8]| {
    let whole = timings(&[data]);
    let cut = data
        .first()
        .map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let (a, b) = data.split_at(cut);
    assert_eq!(whole, timings(&[a, b]), "split at {cut}");
    decode_ir(&whole.0);
    if keyfleet_drivers::ir::sniff(data) == Format::IrToy {
        replay_ir(data);
    }
});
