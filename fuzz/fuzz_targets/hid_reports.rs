//! HID input reports through the scan decoder, as a scanner (or a device that
//! claims to be one) sends them: a descriptor, either one of the fixtures'
//! real ones or any bytes, then a sequence of reports of any length.
//! Structured with `arbitrary` so the fuzzer spends its time on report
//! sequences (key edges, shift, Alt+keypad codes, POS continuation).
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use keyfleet_drivers::hid::decode::{ScanDecoder, Step, MAX_SCAN};
use keyfleet_fuzz::{assert_scan_bounded, fixture_descriptors, let_caught_hidreport_panics_unwind};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Descriptor {
    /// One of the fixture recordings' descriptors (index taken modulo their number).
    Fixture(u8),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Session {
    descriptor: Descriptor,
    reports: Vec<Vec<u8>>,
}

static FIXTURES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();

fuzz_target!(init: let_caught_hidreport_panics_unwind(), |s: Session| {
    let fixtures = FIXTURES.get_or_init(fixture_descriptors);
    let desc: &[u8] = match &s.descriptor {
        Descriptor::Fixture(i) => &fixtures[usize::from(*i) % fixtures.len()],
        Descriptor::Raw(bytes) => bytes,
    };
    let Ok(mut decoder) = ScanDecoder::new(desc) else {
        return;
    };
    for report in &s.reports {
        match decoder.feed(report) {
            Step::Scan(text) => assert_scan_bounded(&text, MAX_SCAN),
            Step::Overflow | Step::Pending => {}
        }
        // An unfinished scan never holds more than the limit (per report kind).
        let pending = decoder.pending_len();
        assert!(pending <= 2 * MAX_SCAN, "{pending} pending");
    }
});
