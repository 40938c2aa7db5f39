//! Typed bytes (a `script --log-in` file or anything else) through the
//! keyboard's line editor and the parser: no panic on any input.
#![no_main]
use keyfleet_drivers::{keyboard, label};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = keyboard::strip_script_log(data);
    if let Ok(line) = keyboard::line_from_edits(keyboard::edits_from_bytes(bytes)) {
        let _ = label::parse(&line);
    }
});
