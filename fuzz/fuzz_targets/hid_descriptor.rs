//! HID report descriptors, as hidraw hands them over (or a recording's `R:`
//! line holds them): the layout of keyboard and point-of-sale fields, then one
//! all-zero and one all-ones report of each declared input report through the
//! decoder, so every field the descriptor declares is read at its extremes.
#![no_main]

use keyfleet_drivers::hid::decode::{ScanDecoder, Step, MAX_SCAN};
use keyfleet_drivers::hid::layout::Layout;
use keyfleet_fuzz::{assert_scan_bounded, let_caught_hidreport_panics_unwind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: let_caught_hidreport_panics_unwind(), |data: &[u8]| {
    let Ok(layout) = Layout::from_descriptor(data) else {
        return;
    };
    assert!(!layout.reports.is_empty(), "a layout with no report of use");
    let mut decoder = ScanDecoder::new(data).expect("the same descriptor parses twice");
    assert_eq!(decoder.layout(), &layout, "the layout is not deterministic");
    for fill in [0x00u8, 0xFF, 0x00] {
        for r in &layout.reports {
            // hidraw delivers at most HID_MAX_BUFFER_SIZE (16 KiB) per report.
            if r.len > 16 * 1024 {
                continue;
            }
            let mut report = vec![fill; r.len.max(1)];
            if let (Some(id), Some(first)) = (r.report_id, report.first_mut()) {
                *first = id;
            }
            if let Step::Scan(text) = decoder.feed(&report) {
                assert_scan_bounded(&text, MAX_SCAN);
            }
        }
    }
});
