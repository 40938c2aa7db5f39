//! Bytes from a serial scanner (or a `--replay` capture of one): the framer
//! byte by byte, and the whole `SerialScanner` over a replay of the same
//! bytes, which must yield the same scans.
#![no_main]

use keyfleet_drivers::serial::{Framed, ReplayStream, ScanFramer, SerialScanner, MAX_SCAN};
use keyfleet_drivers::source::{KeySource, SourceError};
use keyfleet_fuzz::assert_scan_bounded;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut framer = ScanFramer::default();
    let mut framed = Vec::new();
    for &b in data {
        if let Some(f) = framer.push(b) {
            if let Framed::Scan(text) = &f {
                assert_scan_bounded(text, MAX_SCAN);
                // Framing bytes end or start a scan; none is ever inside one.
                assert!(
                    !text.contains(['\u{2}', '\u{3}', '\r', '\n']),
                    "framing byte in scan {text:?}"
                );
            }
            framed.push(f);
        }
        assert!(framer.pending_len() <= MAX_SCAN);
    }

    let mut scanner = SerialScanner::new(ReplayStream::new(data.to_vec(), "fuzz.bin"));
    let mut read = Vec::new();
    for _ in 0..=framed.len() {
        match scanner.read_raw(None) {
            Ok(text) => read.push(Framed::Scan(text)),
            Err(SourceError::Malformed { .. }) => read.push(Framed::Overflow),
            Err(SourceError::Ended(_)) => break,
            Err(e) => panic!("a replay failed with {e}"),
        }
    }
    assert_eq!(read, framed, "the replay and the framer disagree");
});
