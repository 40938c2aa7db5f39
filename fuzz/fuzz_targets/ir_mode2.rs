//! LIRC `mode2` text (a receiver's output or a `--replay` file): the line
//! parser gives the same timings however the bytes are split across reads,
//! and the whole replay (decoders, keymap, entry) ends without a panic.
#![no_main]

use keyfleet_drivers::ir::{Format, Stream};
use keyfleet_fuzz::{decode_ir, replay_ir};
use libfuzzer_sys::fuzz_target;

fn timings(pieces: &[&[u8]]) -> Option<Vec<keyfleet_drivers::ir::timing::Timing>> {
    let mut s = Stream::new(Format::Mode2Text, true);
    let mut out = Vec::new();
    for p in pieces {
        out.extend(s.push(p).ok()?);
    }
    out.extend(s.finish().ok()?);
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let whole = timings(&[data]);
    let cut = data
        .first()
        .map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let (a, b) = data.split_at(cut);
    let split = timings(&[a, b]);
    if let (Some(w), Some(s)) = (&whole, &split) {
        assert_eq!(w, s, "split at {cut}");
    }
    assert_eq!(whole.is_some(), split.is_some(), "split at {cut}");
    if let Some(t) = &whole {
        decode_ir(t);
    }
    if keyfleet_drivers::ir::sniff(data) == Format::Mode2Text {
        replay_ir(data);
    }
});
