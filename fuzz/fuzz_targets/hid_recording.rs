//! hid-recorder files, as `keyfleet read-key --from hid-scanner --replay FILE`
//! reads them: UTF-8 check, `recording::parse`, then the whole replay through
//! the decoders (descriptor layout, keyboard and POS reports, the recorded
//! clock), once without a timeout and once with a short one.
#![no_main]

use std::time::Duration;

use keyfleet_drivers::hid::{decode::MAX_SCAN, from_recording, recording};
use keyfleet_drivers::source::{KeySource, SourceError};
use keyfleet_fuzz::{assert_scan_bounded, let_caught_hidreport_panics_unwind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: let_caught_hidreport_panics_unwind(), |data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().count();
    let rec = match recording::parse(text) {
        Ok(rec) => rec,
        Err(e) => {
            // Every refusal names a line of the file.
            assert!(e.line >= 1 && e.line <= lines.max(1), "{e} ({lines} lines)");
            return;
        }
    };
    let events = rec.events.len();
    for timeout in [None, Some(Duration::from_millis(250))] {
        let Ok(mut scanner) = from_recording(rec.clone(), "fuzz.hid") else {
            return;
        };
        let mut scans = 0;
        // Each call consumes at least one event or moves the recorded clock
        // past a timeout, so a replay ends; the bound catches a loop that does not.
        for _ in 0..2 * events + 4 {
            match scanner.read_raw(timeout) {
                Ok(text) => {
                    assert_scan_bounded(&text, MAX_SCAN);
                    scans += 1;
                    assert!(scans <= events, "{scans} scans from {events} events");
                }
                Err(SourceError::Ended(_)) => break,
                Err(SourceError::Timeout(_)) | Err(SourceError::Malformed { .. }) => {}
                Err(e) => panic!("a replay failed with {e}"),
            }
        }
    }
});
