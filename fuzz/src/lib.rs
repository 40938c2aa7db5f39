//! What keyfleet's fuzz targets share: the fixture descriptors, and checks
//! that hold for every input.
//!
//! A target is one file in `fuzz_targets/`: it hands the bytes to the parser
//! exactly as a device, a recording or a file would, then asserts what a user
//! relies on (no panic, bounded output, the same answer on every path).
#![forbid(unsafe_code)]

use keyfleet_drivers::hid::recording;

/// `hidreport` asserts on some malformed descriptors, and
/// `hid::layout::parse_descriptor` catches that panic and refuses the
/// descriptor with an error. libFuzzer's panic hook aborts on every panic,
/// caught or not; this hook (installed from a target's `init`) lets a panic
/// raised inside `hidreport` unwind instead. If `parse_descriptor` catches it,
/// the input was refused as it is in keyfleet; if nothing does (a `hidreport`
/// call outside the parse), libfuzzer-sys's own `catch_unwind` aborts and the
/// fuzzer records the crash as usual. Any other panic aborts here at once.
/// `FUZZ_SHOW_HIDREPORT_PANICS=1` prints the ones let through.
pub fn let_caught_hidreport_panics_unwind() {
    let abort_hook = std::panic::take_hook();
    let show = std::env::var_os("FUZZ_SHOW_HIDREPORT_PANICS").is_some();
    std::panic::set_hook(Box::new(move |info| {
        let in_hidreport = info
            .location()
            .is_some_and(|l| l.file().contains("/hidreport-"));
        if !in_hidreport {
            abort_hook(info);
        } else if show {
            eprintln!("hidreport panicked (unwinding to a catch_unwind): {info}");
        }
    }));
}

/// The report descriptors of the hid-recorder fixtures (fixtures/hid), read
/// from the recordings themselves so the fuzzer drives real layouts.
pub fn fixture_descriptors() -> Vec<Vec<u8>> {
    [
        include_str!("../../fixtures/hid/boot_keyboard.hid"),
        include_str!("../../fixtures/hid/report_id_keyboard.hid"),
        include_str!("../../fixtures/hid/pos_scanner.hid"),
        include_str!("../../fixtures/hid/keypad_digits.hid"),
        include_str!("../../fixtures/hid/alt_keypad.hid"),
    ]
    .iter()
    .map(|text| {
        let rec = recording::parse(text).expect("fixture recording parses");
        rec.devices
            .into_iter()
            .next()
            .expect("fixture has a device")
            .descriptor
    })
    .collect()
}

/// A scan handed to the label parser is never longer than the decoders allow.
pub fn assert_scan_bounded(text: &str, max_chars: usize) {
    let n = text.chars().count();
    assert!(n <= max_chars, "scan of {n} characters, limit {max_chars}");
}
