//! keyfleet's keyboard layout on 73 real keyboard report descriptors
//! (fixtures/hid/descriptors/, from hidreport's test data, MIT): every
//! descriptor is read, and every keyboard field gets the place and usage that
//! hidreport gives it. keyfleet lists each Input item's usages itself, from
//! every Usage Minimum..Maximum pair (hidreport keeps only the last pair);
//! none of these 73 declares two pairs in one item, so both must agree on all
//! of them, which checks keyfleet's walk over the items against hidreport's.
#![cfg(feature = "hid-scanner")]

use std::path::Path;

use hidreport::{Field, Report, ReportDescriptor};
use keyfleet_drivers::hid::layout::{Layout, LayoutError, ReportKind};

/// (report id, first bit, usage) of every one-bit keyboard variable, and
/// (report id, first bit, usages) of every keyboard array.
type Keys = (Vec<(u8, usize, u16)>, Vec<(u8, usize, Vec<Option<u16>>)>);

fn ours(l: &Layout) -> Keys {
    let (mut bits, mut arrays) = (Vec::new(), Vec::new());
    for r in &l.reports {
        let id = r.report_id.unwrap_or(0);
        if let ReportKind::Keyboard(k) = &r.kind {
            bits.extend(k.bit_keys.iter().map(|(b, u)| (id, b.start, *u)));
            arrays.extend(k.arrays.iter().map(|a| (id, a.start, a.usages.clone())));
        }
    }
    (bits, arrays)
}

fn hidreports(d: &[u8]) -> Keys {
    let r = ReportDescriptor::try_from(d).expect("hidreport parses it");
    let (mut bits, mut arrays) = (Vec::new(), Vec::new());
    for rep in r.input_reports() {
        let id = rep.report_id().map(u8::from).unwrap_or(0);
        let mut kbits = Vec::new();
        let mut karrays = Vec::new();
        for f in rep.fields() {
            match f {
                Field::Variable(v)
                    if u16::from(v.usage.usage_page) == 0x07 && v.bits.len() == 1 =>
                {
                    kbits.push((id, v.bits.start, u16::from(v.usage.usage_id)));
                }
                Field::Array(a) => {
                    let usages: Vec<Option<u16>> = a
                        .usages()
                        .iter()
                        .map(|u| (u16::from(u.usage_page) == 0x07).then(|| u16::from(u.usage_id)))
                        .collect();
                    if usages.iter().any(Option::is_some) {
                        karrays.push((id, a.bits.start, usages));
                    }
                }
                _ => {}
            }
        }
        // keyfleet keeps the keyboard fields of reports that have a key array
        // or a non-modifier key bit (a report of modifier bits alone types nothing).
        if !karrays.is_empty() || kbits.iter().any(|&(_, _, u)| u < 0xE0) {
            bits.extend(kbits);
            arrays.extend(karrays);
        }
    }
    (bits, arrays)
}

#[test]
fn keyboard_fields_agree_with_hidreport_on_73_real_keyboards() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/hid/descriptors");
    let (mut read, mut keyboards, mut fields) = (0, 0, 0);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.to_string_lossy();
        if !(name.ends_with(".bin") || name.ends_with(".rdesc")) {
            continue;
        }
        let d = std::fs::read(&path).unwrap();
        read += 1;
        let got = match Layout::from_descriptor(&d) {
            Ok(l) => {
                assert_eq!(l.unplaced_fields, 0, "{}", path.display());
                ours(&l)
            }
            // Keyboard-page bits that type nothing (modifiers alone): no keys for hidreport either.
            Err(LayoutError::NoScannerFields) => (Vec::new(), Vec::new()),
            Err(e) => panic!("{}: {e}", path.display()),
        };
        assert_eq!(got, hidreports(&d), "{}", path.display());
        if got.0.is_empty() && got.1.is_empty() {
            continue;
        }
        keyboards += 1;
        fields += got.0.len() + got.1.len();
    }
    println!("{read} real descriptors read, {keyboards} with keyboard reports, {fields} keyboard fields agree with hidreport");
    assert_eq!(read, 73);
}
