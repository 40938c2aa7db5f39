//! Properties of the IR path: no panic on any timing sequence, byte stream or
//! text; scancodes survive encode → receiver distortion → decode for every
//! variant; how bytes are split across reads does not matter; typed digits
//! come back.
#![cfg(feature = "ir")]

mod ir_support;

use std::path::Path;

use keyfleet_drivers::ir::decode::{Decoded, Frame, MultiDecoder, Output, Protocol};
use keyfleet_drivers::ir::encode::{self, Receiver, SplitMix64};
use keyfleet_drivers::ir::entry::Pipeline;
use keyfleet_drivers::ir::keymap::Keymap;
use keyfleet_drivers::ir::mode2;
use keyfleet_drivers::ir::timing::Timing;
use keyfleet_drivers::ir::{Format, IrSource, Stream};
use keyfleet_drivers::source::KeySource;
use proptest::prelude::*;

fn keymap() -> Keymap {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/ir/keymaps/keyfleet-nec.toml");
    Keymap::load(&p).unwrap()
}

fn timing() -> impl Strategy<Value = Timing> {
    // Mostly plausible durations, some extreme ones.
    let d = prop_oneof![0u32..20_000, any::<u32>()];
    prop_oneof![
        d.clone().prop_map(Timing::Pulse),
        d.clone().prop_map(Timing::Space),
        d.prop_map(Timing::Timeout),
        Just(Timing::Reset),
    ]
}

fn valid_frame() -> impl Strategy<Value = Frame> {
    let mce = (0usize..3, 0u32..0x8000)
        .prop_map(|(i, low)| keyfleet_drivers::ir::rc6::MCE_CUSTOMER_CODES[i] | low);
    prop_oneof![
        (0u32..=0xffff).prop_map(|s| (Protocol::Nec, s, false)),
        (0u32..=0xff_ffff)
            .prop_filter("NECX address is not inverted", |s| ((s >> 16) ^ (s >> 8))
                & 0xff
                != 0xff)
            .prop_map(|s| (Protocol::NecX, s, false)),
        any::<u32>()
            .prop_filter("NEC32 command is not inverted", |s| ((s >> 8) ^ s) & 0xff
                != 0xff)
            .prop_map(|s| (Protocol::Nec32, s, false)),
        (0u32..32, 0u32..128, any::<bool>()).prop_map(|(sys, cmd, t)| (
            Protocol::Rc5,
            sys << 8 | cmd,
            t
        )),
        (0u32..32, 0u32..128, 0u32..64, any::<bool>()).prop_map(|(sys, cmd, x, t)| (
            Protocol::Rc5x20,
            sys << 16 | cmd << 8 | x,
            t
        )),
        (0u32..=0xffff, any::<bool>()).prop_map(|(s, t)| (Protocol::Rc6Mode0, s, t)),
        (0u32..=0xf_ffff).prop_map(|s| (Protocol::Rc6_6a20, s, false)),
        (0u32..=0xff_ffff).prop_map(|s| (Protocol::Rc6_6a24, s, false)),
        any::<u32>()
            .prop_filter("not an MCE customer code", |s| {
                !keyfleet_drivers::ir::rc6::MCE_CUSTOMER_CODES.contains(&(s & 0xffff_0000))
            })
            .prop_map(|s| (Protocol::Rc6_6a32, s, false)),
        (mce, any::<bool>()).prop_map(|(s, t)| (Protocol::Rc6Mce, s, t)),
    ]
    .prop_map(|(protocol, scancode, toggle)| Frame {
        protocol,
        scancode,
        toggle,
    })
}

fn decode_all(t: &[Timing]) -> Vec<Decoded> {
    let mut d = MultiDecoder::default();
    let mut out = Vec::new();
    for &x in t.iter().chain(&[Timing::Timeout(125_000)]) {
        for o in d.feed(x) {
            if let Output::Decoded { what, .. } = o {
                out.push(what);
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn pipeline_never_panics(ts in prop::collection::vec(timing(), 0..600)) {
        let mut p = Pipeline::new(keymap());
        for t in ts {
            let _ = p.feed(t);
        }
        let _ = p.summary();
    }

    #[test]
    fn any_bytes_replay_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..3000)) {
        let mut src = IrSource::from_bytes(bytes, "prop", keymap());
        // Every outcome is fine except a panic; an error must say something.
        for _ in 0..3 {
            match src.read_raw(None) {
                Ok(_) => {}
                Err(e) => { prop_assert!(!e.to_string().is_empty()); break; }
            }
        }
    }

    #[test]
    fn any_text_is_parsed_or_refused_by_line(lines in prop::collection::vec("[ -~]{0,40}", 0..40)) {
        let mut p = mode2::Mode2Parser::default();
        for (i, line) in lines.iter().enumerate() {
            if let Err(e) = p.parse_line(line) {
                prop_assert_eq!(e.line, i + 1);
                let named = format!("line {}", i + 1);
                prop_assert!(e.to_string().contains(&named), "{}", e);
            }
        }
    }

    #[test]
    fn mode2_keyword_lines_always_parse(d in any::<u32>(), kind in 0usize..3) {
        let word = ["pulse", "space", "timeout"][kind];
        let got = mode2::parse_str(&format!("{word} {d}\n")).unwrap();
        let want = [Timing::Pulse(d), Timing::Space(d), Timing::Timeout(d)][kind];
        prop_assert_eq!(got, vec![want]);
    }

    #[test]
    fn frames_survive_a_receiver(f in valid_frame(), bias in 0i32..=100, jitter in 0u32..=100, seed in any::<u64>()) {
        let sent = encode::frame(f).unwrap();
        let got = Receiver::new(seed, bias, jitter).receive(&sent);
        prop_assert_eq!(decode_all(&got), vec![Decoded::Key(f)]);
    }

    #[test]
    fn split_points_do_not_matter(cuts in prop::collection::vec(1usize..700, 1..40), irtoy in any::<bool>()) {
        let name = if irtoy { "rc6-mce-decimal.irtoy" } else { "nec-hex.mode2" };
        let bytes = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/ir").join(name)).unwrap();
        let format = if irtoy { Format::IrToy } else { Format::Mode2Text };
        let mut whole = Stream::new(format, true);
        let want = whole.push(&bytes).unwrap();
        let mut split = Stream::new(format, true);
        let mut got = Vec::new();
        let mut rest: &[u8] = &bytes;
        for c in cuts.iter().cycle() {
            if rest.is_empty() { break; }
            let (a, b) = rest.split_at((*c).min(rest.len()));
            got.extend(split.push(a).unwrap());
            rest = b;
        }
        prop_assert_eq!(got, want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn typed_hex_comes_back(text in "[0-9A-F]{1,40}", seed in any::<u64>(), protocol in 0usize..3) {
        let (protocol, base, finish, erase) = [
            (Protocol::Nec, 0x2000, 0x2010, 0x2011),
            (Protocol::Rc5, 0x1e00, 0x1e25, 0x1e1f),
            (Protocol::Rc6Mce, 0x800f0400, 0x800f0422, 0x800f0423),
        ][protocol];
        let chars: Vec<(char, u32)> = "0123456789ABCDEF".chars().enumerate().map(|(i, c)| (c, base + i as u32)).collect();
        let map: String = chars.iter().map(|(c, s)| format!("0x{s:x} = \"KEY_{c}\"\n")).collect();
        let family = match protocol { Protocol::Nec => "nec", Protocol::Rc5 => "rc5", _ => "rc6" };
        let keymap = Keymap::parse(&format!(
            "[[protocols]]\nprotocol = \"{family}\"\n[protocols.scancodes]\n{map}0x{finish:x} = \"KEY_OK\"\n0x{erase:x} = \"KEY_BACK\"\n"
        ), "prop").unwrap();
        let mut remote = ir_support::Remote { protocol, chars, finish, erase: Some(erase), noise: None, cancel: None, toggle: false };
        let mut rng = SplitMix64(seed);
        let presses = remote.typing(&text, &mut rng, true);
        let signals = ir_support::receive(&mut Receiver::new(seed, 70, 90), remote.send(&presses));
        for format in [ir_support::Format::Mode2, ir_support::Format::IrToy, ir_support::Format::IrCtl] {
            let bytes = ir_support::write(format, &signals, "/dev/ttyACM0");
            let got = IrSource::from_bytes(bytes, "prop", keymap.clone()).read_raw(None).unwrap();
            prop_assert_eq!(&got, &text, "{:?}", format);
        }
    }
}
