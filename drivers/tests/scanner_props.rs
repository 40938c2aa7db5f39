//! No bytes from a scanner or a recording make the scanner sources panic, and
//! what the decoders accept round-trips.
use proptest::prelude::*;

#[cfg(feature = "hid-scanner")]
mod hid_props {
    use super::*;
    use keyfleet_drivers::hid::decode::{ScanDecoder, Step};
    use keyfleet_drivers::hid::recording;
    use std::path::Path;

    fn descriptor_of(fixture: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/hid")
            .join(fixture);
        let rec = recording::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        rec.devices[0].descriptor.clone()
    }

    /// US-layout usages for the characters of a label, and whether shift is needed.
    fn usage(c: char) -> (u8, bool) {
        match c {
            'a'..='z' => (0x04 + (c as u8 - b'a'), false),
            'A'..='Z' => (0x04 + (c as u8 - b'A'), true),
            '1'..='9' => (0x1E + (c as u8 - b'1'), false),
            '0' => (0x27, false),
            ':' => (0x33, true),
            '-' => (0x2D, false),
            '_' => (0x2D, true),
            '.' => (0x37, false),
            _ => unreachable!(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_descriptor_bytes_are_refused_or_accepted_without_panic(
            desc in proptest::collection::vec(any::<u8>(), 0..200),
            reports in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..20),
        ) {
            if let Ok(mut d) = ScanDecoder::new(&desc) {
                for r in &reports {
                    let _ = d.feed(r);
                }
            }
        }

        #[test]
        fn any_reports_through_real_layouts_never_panic(
            reports in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..60),
        ) {
            for f in ["boot_keyboard.hid", "report_id_keyboard.hid", "pos_scanner.hid"] {
                let mut d = ScanDecoder::new(&descriptor_of(f)).unwrap();
                for r in &reports {
                    let _ = d.feed(r);
                }
            }
        }

        #[test]
        fn any_recording_text_is_parsed_or_refused_with_a_line(text in "\\PC{0,400}") {
            if let Err(e) = recording::parse(&text) {
                prop_assert!(e.line >= 1);
            }
        }

        #[test]
        fn recording_like_lines_never_panic(
            lines in proptest::collection::vec(
                ("[RNIPDE#x]", "[: ]{0,2}", "[0-9a-fA-F .]{0,40}"), 0..20),
        ) {
            let text: String = lines.iter().map(|(a, b, c)| format!("{a}{b}{c}\n")).collect();
            let _ = recording::parse(&text);
        }

        #[test]
        fn whole_replays_with_any_timeouts_never_panic(
            events in proptest::collection::vec(
                (0u64..100_000_000, proptest::collection::vec(any::<u8>(), 0..70)), 0..40),
            timeouts in proptest::collection::vec(proptest::option::of(0u64..u64::MAX), 1..8),
            fixture in 0usize..3,
        ) {
            use keyfleet_drivers::source::KeySource;
            let f = ["boot_keyboard.hid", "report_id_keyboard.hid", "pos_scanner.hid"][fixture];
            let mut t = 0;
            let rec = recording::Recording {
                devices: vec![recording::RecordedDevice {
                    descriptor: descriptor_of(f),
                    ..Default::default()
                }],
                events: events
                    .into_iter()
                    .enumerate()
                    .map(|(i, (dt, bytes))| {
                        t += dt;
                        recording::RecordedEvent {
                            device: 0,
                            time: std::time::Duration::from_micros(t),
                            bytes,
                            line: i + 1,
                        }
                    })
                    .collect(),
            };
            let mut s = keyfleet_drivers::hid::from_recording(rec, "prop").unwrap();
            for to in timeouts {
                let _ = s.read_raw(to.map(std::time::Duration::from_nanos));
            }
        }

        #[test]
        fn typed_labels_come_back_whole(node in "[A-Za-z0-9._-]{1,64}", hex in "[0-9A-F]{36}") {
            let label = format!("KF1:{node}:{hex}");
            let mut d = ScanDecoder::new(&descriptor_of("boot_keyboard.hid")).unwrap();
            let mut out = None;
            for c in label.chars() {
                let (u, shift) = usage(c);
                prop_assert_eq!(d.feed(&[if shift { 2 } else { 0 }, 0, u, 0, 0, 0, 0, 0]), Step::Pending);
                prop_assert_eq!(d.feed(&[0; 8]), Step::Pending);
            }
            if let Step::Scan(s) = d.feed(&[0, 0, 0x28, 0, 0, 0, 0, 0]) {
                out = Some(s);
            }
            prop_assert_eq!(out, Some(label));
        }

        #[test]
        fn pos_data_of_any_length_comes_back_whole(text in "[ -~]{1,300}") {
            // Split into 56-byte Scanned Data Reports as the fixture's descriptor lays them out.
            prop_assume!(!text.starts_with(']') && !text.ends_with([' ']));
            let mut d = ScanDecoder::new(&descriptor_of("pos_scanner.hid")).unwrap();
            let bytes = text.as_bytes();
            let chunks: Vec<&[u8]> = bytes.chunks(56).collect();
            let mut got = None;
            for (i, c) in chunks.iter().enumerate() {
                let mut r = vec![0x02, c.len() as u8, b']', b'Q', b'1'];
                r.extend_from_slice(c);
                r.resize(5 + 56, 0);
                r.extend_from_slice(&[0, 0, u8::from(i + 1 < chunks.len())]);
                match d.feed(&r) {
                    Step::Scan(s) => got = Some(s),
                    Step::Pending => prop_assert!(i + 1 < chunks.len()),
                    Step::Overflow => prop_assert!(false, "300 bytes overflowed"),
                }
            }
            prop_assert_eq!(got.as_deref(), Some(text.as_str()));
        }
    }
}

#[cfg(feature = "serial-scanner")]
mod serial_props {
    use super::*;
    use keyfleet_drivers::serial::{ReplayStream, ScanFramer, SerialScanner};
    use keyfleet_drivers::source::KeySource;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_byte_stream_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..10_000)) {
            let mut s = SerialScanner::new(ReplayStream::new(bytes, "prop"));
            for _ in 0..10_000 {
                if s.read_raw(None).is_err() {
                    break;
                }
            }
        }

        #[test]
        fn framed_scans_come_back_whole(
            scans in proptest::collection::vec("[!-~]{1,80}", 1..5),
            style in 0usize..4,
        ) {
            let mut stream = Vec::new();
            for s in &scans {
                match style {
                    0 => { stream.extend_from_slice(s.as_bytes()); stream.extend_from_slice(b"\r\n"); }
                    1 => { stream.push(2); stream.extend_from_slice(s.as_bytes()); stream.push(3); }
                    2 => { stream.extend_from_slice(b"]Q1"); stream.extend_from_slice(s.as_bytes()); stream.push(b'\r'); }
                    _ => { stream.extend_from_slice(s.as_bytes()); stream.push(b'\n'); }
                }
            }
            let mut f = ScanFramer::default();
            let got: Vec<_> = stream.iter().filter_map(|b| f.push(*b)).collect();
            let want: Vec<_> = scans
                .iter()
                .map(|s| keyfleet_drivers::serial::Framed::Scan(
                    if style == 2 { s.clone() } else { keyfleet_drivers::serial::strip_aim(s).to_string() }))
                .collect();
            prop_assert_eq!(got, want);
        }
    }
}
