//! `label::parse` on any text: it must refuse or accept, never panic, and
//! what it accepts must re-encode to a form it accepts again with the same key.
#![no_main]
use keyfleet_core::label;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = label::parse(text) {
        let again = label::parse(&label::hex_form(&p.key)).expect("hex form of an accepted key");
        assert_eq!(again.key, p.key);
        let again = label::parse(&label::decimal_form(&p.key)).expect("decimal form");
        assert_eq!(again.key, p.key);
        if let Some(id) = &p.node_id {
            let again = label::parse(&label::label(id, &p.key)).expect("label");
            assert_eq!(again.node_id.as_ref(), Some(id));
        }
    }
});
