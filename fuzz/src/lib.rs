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

/// A node that has joined and synced: node `node-0` with initial key
/// `01…01`, member 1, current group key of epoch 1, enrolled with a real
/// `ControllerMachine` (everything seeded) through the enrollment handshake
/// and its key response. Also returns the controller's genuine datagrams
/// (handshake answer, key response, then a round's key update, first and
/// second transition request, a beacon of epoch 2 and one of round 2
/// draining), for seeds and to build on.
pub mod node {
    use keyfleet_core::crypto::InitialKey;
    use keyfleet_core::protocol::{
        ControllerAction, ControllerConfig, ControllerInput, ControllerMachine, NodeAction,
        NodeConfig, NodeInput, NodeMachine, Time,
    };
    use keyfleet_core::wire::{self, Message, NodeId, RoundPhase};
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;
    use std::net::SocketAddr;

    pub fn ctl_addr() -> SocketAddr {
        SocketAddr::from(([192, 168, 0, 1], 47800))
    }

    fn node_addr() -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], 47801))
    }

    pub fn rng() -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(42)
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

    fn sends(out: &[NodeAction]) -> Vec<Vec<u8>> {
        out.iter()
            .filter_map(|a| match a {
                NodeAction::SendTo { bytes, .. } | NodeAction::SendGroup { bytes, .. } => {
                    Some(bytes.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// The joined, synced node and the controller's genuine datagrams. The
    /// node's randomness is seeded, so replaying the controller's answers to
    /// a fresh node with the same seed joins it the same way.
    pub fn joined() -> (NodeMachine, Vec<Vec<u8>>) {
        static ROUND: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
        let round = ROUND.get_or_init(build);
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

    /// Runs node and controller until the node is synced, then a round; the
    /// controller's datagrams in the order [`joined`] documents.
    fn build() -> Vec<Vec<u8>> {
        let mut node = fresh();
        let mut nrng = rng();
        let mut crng = ChaCha20Rng::seed_from_u64(7);
        let mut cout = Vec::new();
        let now = Time(1000);
        // A drain (1.5 s) that outlasts the first beacon's deadline (1 s after
        // `Start`): the beacon of the draining round goes out before the
        // second transition request.
        let cfg = ControllerConfig {
            drain_grace_ms: Some(1500),
            ..ControllerConfig::default()
        };
        let mut ctl = ControllerMachine::new(cfg, now, &mut crng, &mut cout);
        ctl.handle(
            now,
            ControllerInput::Enroll {
                node_id: NodeId::parse("node-0").expect("node id"),
                initial_key: InitialKey([1; 16]),
                addr: node_addr(),
            },
            &mut crng,
            &mut cout,
        )
        .expect("enroll");
        ctl.handle(now, ControllerInput::Start, &mut crng, &mut cout)
            .expect("start");
        let mut nout = Vec::new();
        node.handle(now, NodeInput::LinkUp, &mut nrng, &mut nout);
        let mut to_ctl = sends(&nout);
        let mut genuine: Vec<Vec<u8>> = Vec::new();
        let mut synced_at = None;
        let mut rekeyed = false;
        let mut beacons = Vec::new();
        for _ in 0..64 {
            let mut to_node = Vec::new();
            for b in to_ctl.drain(..) {
                cout.clear();
                let _ = ctl.handle(
                    now,
                    ControllerInput::Datagram {
                        from: node_addr(),
                        bytes: &b,
                    },
                    &mut crng,
                    &mut cout,
                );
                to_node.extend(cout.iter().filter_map(|a| match a {
                    ControllerAction::SendTo { bytes, .. } | ControllerAction::SendGroup(bytes) => {
                        Some(bytes.clone())
                    }
                    _ => None,
                }));
            }
            if to_node.is_empty() && synced_at.is_some() && !rekeyed {
                rekeyed = true;
                cout.clear();
                ctl.handle(now, ControllerInput::Rekey, &mut crng, &mut cout)
                    .expect("rekey");
                to_node.extend(cout.iter().filter_map(|a| match a {
                    ControllerAction::SendGroup(bytes) => Some(bytes.clone()),
                    _ => None,
                }));
            }
            for b in to_node {
                let keep = match wire::decode(&b) {
                    Ok(Message::HandshakeAnswer(_)) | Ok(Message::KeyResponse(_)) => {
                        synced_at.is_none()
                    }
                    Ok(Message::KeyUpdate(_)) | Ok(Message::Transition(_)) => true,
                    _ => false,
                };
                if keep && !genuine.contains(&b) {
                    genuine.push(b.clone());
                }
                nout.clear();
                node.handle(
                    now,
                    NodeInput::Datagram {
                        from: ctl_addr(),
                        bytes: &b,
                    },
                    &mut nrng,
                    &mut nout,
                );
                if synced_at.is_none() && node.is_synced() {
                    synced_at = Some(genuine.len());
                }
                to_ctl.extend(sends(&nout));
            }
            if to_ctl.is_empty() && rekeyed && ctl.round().is_some() {
                // The beacon of the round while it drains (its deadline comes
                // before the drain's end; earlier round deadlines find nothing due)…
                while beacons.is_empty() {
                    let at = ctl.poll_timeout().expect("a deadline");
                    beacons.extend(beacon(&mut ctl, at, &mut crng));
                    assert_eq!(
                        ctl.round().map(|r| r.1),
                        Some(RoundPhase::Draining),
                        "the round still drains"
                    );
                }
                // …then the drain grace: let the drain's end pass.
                cout.clear();
                let at = ctl.poll_timeout().expect("the drain's end");
                let _ = ctl.handle(at, ControllerInput::Timeout, &mut crng, &mut cout);
                for a in &cout {
                    if let ControllerAction::SendGroup(bytes) = a {
                        genuine.push(bytes.clone());
                        nout.clear();
                        node.handle(
                            now,
                            NodeInput::Datagram {
                                from: ctl_addr(),
                                bytes,
                            },
                            &mut nrng,
                            &mut nout,
                        );
                        to_ctl.extend(sends(&nout));
                    }
                }
            }
            if rekeyed && ctl.round().is_none() {
                break;
            }
        }
        assert_eq!(synced_at, Some(2), "handshake answer and key response: {genuine:?}");
        // The beacon of epoch 2 (no round), then the draining one.
        let done = beacon(&mut ctl, now.plus(120_000), &mut crng).expect("a beacon");
        genuine.push(done);
        genuine.extend(beacons);
        genuine
    }

    /// The beacon the controller sends at a timeout at `at`, if one is due.
    fn beacon(ctl: &mut ControllerMachine, at: Time, rng: &mut ChaCha20Rng) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        ctl.handle(at, ControllerInput::Timeout, rng, &mut out)
            .expect("timeout");
        out.iter().find_map(|a| match a {
            ControllerAction::SendGroup(bytes)
                if matches!(wire::decode(bytes), Ok(Message::Beacon(_))) =>
            {
                Some(bytes.clone())
            }
            _ => None,
        })
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
        "handshake_answer",
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_node_fixture_joins_by_handshake_and_the_round_is_genuine() {
        let (node, round) = super::node::joined();
        assert!(node.is_synced());
        let names: Vec<_> = round
            .iter()
            .map(|b| keyfleet_core::wire::decode(b).map(|m| m.name()).unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "handshake answer",
                "key response",
                "key update request",
                "first transition request",
                "second transition request",
                "beacon",
                "beacon"
            ]
        );
    }
}
