//! ir-keytable TOML keymaps (`--keymap FILE`), as `Keymap::parse` reads them:
//! no panic; a refusal says what is wrong; an accepted keymap answers the
//! questions the IR source asks of it.
#![no_main]

use keyfleet_drivers::ir::keymap::Keymap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Keymap::parse(text, "fuzz.toml") {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(k) => {
            // The decoders to run: the keymap's own, or the defaults.
            assert!(!k.families().is_empty());
            let _ = k.has_decodable_protocol();
            let _ = k.protocol_names();
        }
    }
});
