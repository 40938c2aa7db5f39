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

/// Timings through every IR decoder and the press filter, as the IR source
/// runs them: no panic, whatever the timings.
pub fn decode_ir(timings: &[keyfleet_drivers::ir::timing::Timing]) -> usize {
    use keyfleet_drivers::ir::decode::{Family, MultiDecoder, Presses};
    let mut dec = MultiDecoder::new(&[Family::Nec, Family::Rc5, Family::Rc5Sz, Family::Rc6]);
    let mut presses = Presses::default();
    let mut n = 0;
    for &t in timings {
        for o in dec.feed(t) {
            n += usize::from(presses.on_output(o).is_some());
        }
    }
    n
}

/// Replays `data` as `keyfleet read-key --from ir --replay FILE` does, with
/// the NEC fixture keymap: every read ends, and the replay ends.
pub fn replay_ir(data: &[u8]) {
    use keyfleet_drivers::ir::{keymap::Keymap, IrSource};
    use keyfleet_drivers::source::{KeySource, SourceError};
    let keymap = Keymap::parse(
        include_str!("../../fixtures/ir/keymaps/keyfleet-nec.toml"),
        "keyfleet-nec.toml",
    )
    .expect("fixture keymap parses");
    let mut src = IrSource::from_bytes(data.to_vec(), "fuzz", keymap);
    // Each read consumes at least a 4 KiB chunk or ends an entry.
    for _ in 0..data.len() + 8 {
        match src.read_raw(None) {
            Ok(_) | Err(SourceError::Malformed { .. }) | Err(SourceError::Cancelled) => {}
            Err(SourceError::Ended(_)) => return,
            Err(e) => panic!("a replay failed with {e}"),
        }
    }
    panic!("a replay of {} bytes did not end", data.len());
}

/// A node that has joined and synced, as the protocol tests build one
/// (`src/protocol/tests`): node `node-0` with initial key `01…01`, member 1,
/// current group key of epoch 1, a controller whose Ed25519 key comes from a
/// fixed seed. Also returns the genuine datagrams of a round from that
/// controller (key update for epoch 2, first and second transition request,
/// a key response, a join accept, a beacon of epoch 2 and one of round 2
/// draining), for seeds and to build on.
pub mod node {
    use keyfleet::crypto::{Epoch, GroupKey, InitialKey, NodeKeys};
    use keyfleet::protocol::{NodeAction, NodeConfig, NodeInput, NodeMachine, Time, TERM};
    use keyfleet::wire::{self, KeyState, Message, NodeId, RoundPhase, Step};
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;
    use std::net::SocketAddr;

    pub fn ctl_addr() -> SocketAddr {
        SocketAddr::from(([192, 168, 0, 1], 47800))
    }

    pub fn rng() -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(42)
    }

    fn key(e: u32) -> GroupKey {
        GroupKey::from_bytes(Epoch(e), [e as u8 * 3 + 1; 32])
    }

    fn request_seq(out: &[NodeAction]) -> u64 {
        out.iter()
            .find_map(|a| match a {
                NodeAction::SendTo { bytes, .. } | NodeAction::SendGroup { bytes, .. } => {
                    match wire::decode(bytes) {
                        Ok(Message::Join(j)) => Some(j.seq),
                        Ok(Message::KeyRequest(k)) => Some(k.seq),
                        _ => None,
                    }
                }
                _ => None,
            })
            .expect("the node sent a join or key request")
    }

    /// The joined, synced node and the controller's genuine datagrams. The
    /// datagrams are made once (everything is seeded, so they are the same
    /// each time); each call replays the join accept and key response to a
    /// fresh node.
    pub fn joined() -> (NodeMachine, Vec<Vec<u8>>) {
        static ROUND: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
        let round = ROUND.get_or_init(|| build().1);
        let mut node = fresh();
        let mut rng = rng();
        let mut out = Vec::new();
        node.handle(Time(1000), NodeInput::LinkUp, &mut rng, &mut out);
        for bytes in &round[..2] {
            out.clear();
            node.handle(
                Time(1000),
                NodeInput::Datagram {
                    from: ctl_addr(),
                    bytes,
                },
                &mut rng,
                &mut out,
            );
        }
        assert!(node.is_synced(), "the node synced");
        (node, round.clone())
    }

    fn fresh() -> NodeMachine {
        let cfg = NodeConfig {
            controller: ctl_addr(),
            usage_interval_ms: Some(1000),
            data_replay_senders: 8,
            ..NodeConfig::default()
        };
        NodeMachine::new(
            NodeId::parse("node-0").expect("node id"),
            &InitialKey([1; 16]),
            cfg,
        )
    }

    fn build() -> (NodeMachine, Vec<Vec<u8>>) {
        let initial = InitialKey([1; 16]);
        let mut node = fresh();
        let mut rng = rng();
        let sk = ed25519_dalek::SigningKey::generate(&mut rng);
        let keys = NodeKeys::derive(&initial);
        let member = 1;
        let mut seq = 0;
        let mut next = || {
            seq += 1;
            seq
        };
        let mut out = Vec::new();
        node.handle(Time(1000), NodeInput::LinkUp, &mut rng, &mut out);
        let state = |rng: &mut ChaCha20Rng| KeyState {
            current_epoch: Epoch(1),
            current: keys.wrap(&key(1), member, rng),
            round: None,
        };
        let st = state(&mut rng);
        let ja = wire::mac(
            wire::join_accept(
                TERM,
                next(),
                member,
                request_seq(&out),
                &sk.verifying_key().to_bytes(),
                &st,
            ),
            &keys,
        );
        out.clear();
        node.handle(
            Time(1000),
            NodeInput::Datagram {
                from: ctl_addr(),
                bytes: &ja,
            },
            &mut rng,
            &mut out,
        );
        let st = state(&mut rng);
        let kr = wire::sign(
            wire::key_response(TERM, next(), member, request_seq(&out), &st),
            &sk,
        );
        out.clear();
        node.handle(
            Time(1000),
            NodeInput::Datagram {
                from: ctl_addr(),
                bytes: &kr,
            },
            &mut rng,
            &mut out,
        );
        assert!(node.is_synced(), "the node synced");
        let w = keys.wrap(&key(2), member, &mut rng);
        let ku = wire::sign(wire::key_update(TERM, Epoch(2), next(), &[(member, w)]), &sk);
        let t1 = wire::sign(
            wire::transition(TERM, Step::FirstTransition, Epoch(2), next()),
            &sk,
        );
        let t2 = wire::sign(
            wire::transition(TERM, Step::SecondTransition, Epoch(2), next()),
            &sk,
        );
        let b1 = wire::sign(
            wire::beacon(TERM, Epoch(2), next(), None, ctl_addr()),
            &sk,
        );
        let b2 = wire::sign(
            wire::beacon(
                TERM,
                Epoch(1),
                next(),
                Some((Epoch(2), RoundPhase::Draining)),
                ctl_addr(),
            ),
            &sk,
        );
        (node, vec![ja, kr, ku, t1, t2, b1, b2])
    }
}

/// With `FUZZ_WRITE_SEEDS=DIR` (set by `scripts/fuzz.sh seed`), a target's
/// `init` writes the inputs `make` builds into DIR: seeds that only Rust code
/// can make (signed datagrams, the default configuration).
pub fn write_seeds(make: impl FnOnce() -> Vec<(String, Vec<u8>)>) {
    let Some(dir) = std::env::var_os("FUZZ_WRITE_SEEDS") else {
        return;
    };
    let dir = std::path::Path::new(&dir);
    std::fs::create_dir_all(dir).expect("seed directory");
    for (name, bytes) in make() {
        std::fs::write(dir.join(name), bytes).expect("write a seed");
    }
}

/// The genuine datagrams of [`node::joined`], named for seeds.
pub fn genuine_seeds() -> Vec<(String, Vec<u8>)> {
    let names = [
        "join_accept",
        "key_response",
        "key_update",
        "first_transition",
        "second_transition",
        "beacon",
        "beacon_round",
    ];
    names
        .iter()
        .map(|n| n.to_string())
        .zip(node::joined().1)
        .collect()
}
