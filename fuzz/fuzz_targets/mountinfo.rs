//! `/proc/self/mountinfo` parsing (octal escapes included): no panic on any text.
#![no_main]
use keyfleet_drivers::media;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = media::parse_mountinfo(text);
    }
});
