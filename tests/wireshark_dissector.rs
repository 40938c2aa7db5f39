//! The Wireshark dissector `contrib/wireshark/keyfleet.lua`, run by the real
//! `tshark`:
//!
//! - on a capture (`dumpcap -i lo`) of a real fleet run — `keyfleet serve`
//!   and three `keyfleet-agent run` processes joining, sending group data,
//!   two rekey rounds (one with a frozen node left stale, that catches up when
//!   thawed), an agent killed and restarted — every datagram must decode as
//!   keyfleet with no expert info, and the decoded fields (epochs, member
//!   numbers, sequence numbers, round phases, node ids) must agree with what
//!   the run's own JSON says: `keyfleet rekey --json`, `status --json`,
//!   `history --json`, the agents' `status` and `recv --json`;
//! - on thousands of mutated datagrams (every truncation, random bytes, other
//!   type codes, trailing bytes) built from the library's own encoders: no Lua
//!   error, and the dissector's verdict and message agree with
//!   `keyfleet::wire::decode` on every one, for the port and the heuristic
//!   dissector alike.
//!
//! Skipped, saying so, when tshark is not installed, unless
//! `KEYFLEET_REQUIRE_TSHARK` is set (CI sets it).

mod fleet_support;
#[path = "support/tshark.rs"]
mod tshark;

use keyfleet::crypto::{Epoch, KeyUse, WrappedKey, WRAPPED_LEN};
use keyfleet::wire::{self, KeyState, NodeId, RoundPhase, RoundState, Step, WireError};
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------- mutated datagrams

/// One datagram of every message type, built by the library's encoders with
/// random authenticators (the dissector checks no signature), each accepted by
/// `wire::decode`.
fn main_seeds(rng: &mut impl Rng) -> Vec<Vec<u8>> {
    let mut bytes = |n: usize| -> Vec<u8> { (0..n).map(|_| rng.gen()).collect() };
    let wrapped = |b: Vec<u8>| WrappedKey(b.try_into().unwrap());
    let sig = bytes(64);
    let mac = bytes(16);
    let signed = |b: Vec<u8>| [b, sig.clone()].concat();
    let maced = |b: Vec<u8>| [b, mac.clone()].concat();
    let nonce: [u8; 12] = bytes(12).try_into().unwrap();
    let no_round = KeyState {
        current_epoch: Epoch(6),
        current: wrapped(bytes(WRAPPED_LEN)),
        round: None,
    };
    let in_round = KeyState {
        round: Some(RoundState {
            epoch: Epoch(7),
            phase: RoundPhase::Draining,
            wrapped: wrapped(bytes(WRAPPED_LEN)),
        }),
        ..no_round
    };
    let entries: Vec<(u32, WrappedKey)> = [2u32, 3, 9]
        .iter()
        .map(|&m| (m, wrapped(bytes(WRAPPED_LEN))))
        .collect();
    let controller_key: [u8; 32] = bytes(32).try_into().unwrap();
    let seeds = vec![
        [
            wire::data_header(3, 1 << 40, Some(Epoch(6)), &nonce),
            bytes(40),
        ]
        .concat(),
        [wire::data_header(4, 17, None, &nonce), bytes(16)].concat(),
        signed(wire::key_update(Epoch(7), 21, &entries)),
        signed(wire::key_update(Epoch(7), 22, &entries[1..2])),
        signed(wire::transition(Step::FirstTransition, Epoch(7), 23)),
        signed(wire::transition(Step::SecondTransition, Epoch(7), 24)),
        signed(wire::key_response(25, 3, 99, &no_round)),
        signed(wire::key_response(26, 3, 100, &in_round)),
        maced(wire::join_accept(27, 9, 5, &controller_key, &no_round)),
        maced(wire::join_accept(28, 9, 6, &controller_key, &in_round)),
        maced(wire::resync(Epoch(6), 29, 3)),
        signed(wire::beacon(
            1,
            Epoch(6),
            30,
            None,
            "127.0.0.1:47800".parse().unwrap(),
        )),
        signed(wire::beacon(
            1,
            Epoch(6),
            31,
            Some((Epoch(7), RoundPhase::FirstTransition)),
            "[fe80::1]:47800".parse().unwrap(),
        )),
        maced(wire::ack(Step::KeyUpdate, Epoch(7), 5, 3)),
        maced(wire::ack(Step::FirstTransition, Epoch(7), 6, 3)),
        maced(wire::ack(Step::SecondTransition, Epoch(7), 7, 3)),
        maced(wire::key_request(Epoch(6), Step::SecondTransition, 8, 3)),
        maced(wire::join(9, &NodeId::parse("pump-1.hall_B").unwrap())),
        maced(wire::usage_report(Epoch(7), 10, 3, &[])),
        maced(wire::usage_report(
            Epoch(7),
            11,
            3,
            &[
                KeyUse {
                    epoch: Epoch(6),
                    seals: 1 << 33,
                    opens: 5,
                },
                KeyUse {
                    epoch: Epoch(7),
                    seals: 2,
                    opens: u64::MAX,
                },
            ],
        )),
    ];
    for s in &seeds {
        wire::decode(s).unwrap_or_else(|e| panic!("seed {s:02x?} does not decode: {e}"));
    }
    seeds
}

/// The layouts of branch fs (issue 17) for the same messages, built by hand
/// from its table: X25519 shares in 0x02, 0x05, 0x11-0x14, the Noise
/// handshake 0x17 / 0x09.
fn fs_seeds(main: &[Vec<u8>], rng: &mut impl Rng) -> Vec<Vec<u8>> {
    let share: Vec<u8> = (0..32).map(|_| rng.gen()).collect();
    let insert = |d: &Vec<u8>, at: usize| [&d[..at], &share[..], &d[at..]].concat();
    let mut out = Vec::new();
    for d in main {
        match d[1] {
            0x02 => out.push(insert(d, 14)),
            0x05 => out.push(insert(d, 26)),
            0x11..=0x13 => out.push(insert(d, 18)),
            0x14 => out.push(insert(d, 19)),
            _ => {}
        }
    }
    let id = b"pump-1";
    let mut init = vec![2, 0x17];
    init.extend_from_slice(&77u64.to_be_bytes());
    init.push(id.len() as u8);
    init.extend_from_slice(id);
    init.extend((0..48).map(|_| rng.gen::<u8>()));
    out.push(init);
    for noise in [129, 166] {
        let mut answer = vec![2, 0x09];
        answer.extend_from_slice(&77u64.to_be_bytes());
        answer.extend((0..noise).map(|_| rng.gen::<u8>()));
        out.push(answer);
    }
    out
}

/// Every truncation of each seed, random byte changes, trailing bytes, every
/// other type code on each body, edge values, and random bodies.
fn mutations(seeds: &[Vec<u8>], rng: &mut impl Rng) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for s in seeds {
        out.push(s.clone());
        for n in 1..s.len() {
            out.push(s[..n].to_vec());
        }
        for _ in 0..30 {
            let mut d = s.clone();
            for _ in 0..rng.gen_range(1..=3) {
                let i = rng.gen_range(2..d.len());
                d[i] = match rng.gen_range(0..4) {
                    0 => 0,
                    1 => 0xff,
                    2 => d[i].wrapping_add(1),
                    _ => rng.gen(),
                };
            }
            out.push(d);
        }
        let mut longer = s.clone();
        longer.extend((0..rng.gen_range(1..=40)).map(|_| rng.gen::<u8>()));
        out.push(longer);
        for ty in 0u8..=0x20 {
            let mut d = s.clone();
            d[1] = ty;
            out.push(d);
        }
        for v in [0u8, 1, 3, 0xff] {
            let mut d = s.clone();
            d[0] = v;
            out.push(d);
        }
    }
    // Edge values: the last epoch, a round epoch that is not the next one.
    let beacon = |epoch: u32, phase: u8, round: u32| {
        let mut b = vec![2, 0x08, 0, 0, 0, 1];
        b.extend_from_slice(&epoch.to_be_bytes());
        b.extend_from_slice(&5u64.to_be_bytes());
        b.push(phase);
        b.extend_from_slice(&round.to_be_bytes());
        b.extend_from_slice(&[4, 127, 0, 0, 1, 0x1e, 0x61]);
        b.extend_from_slice(&[0xab; 64]);
        b
    };
    out.push(beacon(u32::MAX, 1, u32::MAX));
    out.push(beacon(u32::MAX, 1, 0));
    out.push(beacon(7, 4, 8));
    out.push(beacon(7, 5, 8));
    out.push(beacon(7, 2, 7));
    // Each rule on a field, broken in a datagram otherwise whole.
    let mac = [0x5a; 16];
    let usage = |count: u8, entries: usize| {
        let mut b = vec![
            2, 0x16, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 3, count,
        ];
        for e in 0..entries {
            b.extend_from_slice(&(e as u32 + 1).to_be_bytes());
            b.extend_from_slice(&[0; 16]);
        }
        [b, mac.to_vec()].concat()
    };
    out.push(usage(4, 4));
    out.push(usage(5, 5));
    out.push(usage(255, 5));
    let key_update = |first: u32, last: u32, members: &[u32]| {
        let mut b = vec![2, 0x02, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 9];
        b.extend_from_slice(&first.to_be_bytes());
        b.extend_from_slice(&last.to_be_bytes());
        b.extend_from_slice(&(members.len() as u16).to_be_bytes());
        for m in members {
            b.extend_from_slice(&m.to_be_bytes());
            b.extend_from_slice(&[0x11; WRAPPED_LEN]);
        }
        [b, vec![0xab; 64]].concat()
    };
    out.push(key_update(0, 0, &[]));
    out.push(key_update(1, 3, &[1, 2, 3]));
    out.push(key_update(1, 4, &[1, 2, 3]));
    out.push(key_update(2, 3, &[1, 2, 3]));
    let join = |epoch: u32, id: &[u8]| {
        let mut b = vec![2, 0x15];
        b.extend_from_slice(&epoch.to_be_bytes());
        b.extend_from_slice(&3u64.to_be_bytes());
        b.push(id.len() as u8);
        b.extend_from_slice(id);
        [b, mac.to_vec()].concat()
    };
    out.push(join(0, b"a"));
    out.push(join(1, b"a"));
    out.push(join(0, b""));
    out.push(join(0, &[b'x'; 64]));
    out.push(join(0, &[b'x'; 65]));
    for bad in [
        &b"pump 1"[..],
        b"pump/1",
        "pümp".as_bytes(),
        &[0xff, 0xfe],
        b"a\0b",
    ] {
        out.push(join(0, bad));
    }
    let key_response = |flag: u8, phase: u8| {
        let mut b = vec![2, 0x05, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 3];
        b.extend_from_slice(&8u64.to_be_bytes());
        b.extend_from_slice(&[0x22; WRAPPED_LEN]);
        b.push(flag);
        if flag != 0 {
            b.extend_from_slice(&8u32.to_be_bytes());
            b.push(phase);
            b.extend_from_slice(&[0x33; WRAPPED_LEN]);
        }
        [b, vec![0xab; 64]].concat()
    };
    for (flag, phase) in [(0, 0), (1, 1), (1, 4), (1, 0), (1, 5), (2, 1)] {
        out.push(key_response(flag, phase));
    }
    for flags in [0u8, 1, 2, 0x81] {
        let mut d = wire::data_header(3, 9, None, &[7; 12]);
        d[2] = flags;
        d.extend_from_slice(&[0; 4]); // the epoch when flags say there is one
        d.extend_from_slice(&[0x44; 16]);
        out.push(d);
    }
    for (step, extra) in [(0u8, 0usize), (1, 0), (3, 0), (4, 0), (3, 1)] {
        let mut d = wire::key_request(Epoch(7), Step::KeyUpdate, 9, 3);
        d[18] = step;
        d.extend(std::iter::repeat_n(0, extra));
        out.push([d, mac.to_vec()].concat());
    }
    for _ in 0..400 {
        let len = rng.gen_range(0..400);
        let mut d = vec![
            2,
            *[
                1u8, 2, 3, 4, 5, 6, 7, 8, 9, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17,
            ]
            .get(rng.gen_range(0..16))
            .unwrap(),
        ];
        d.extend((0..len).map(|_| rng.gen::<u8>()));
        out.push(d);
    }
    out
}

/// What the dissector said about one frame (`tshark -T json -e ...`).
#[derive(Debug, Default)]
struct Verdict {
    keyfleet: bool,
    experts: Vec<String>,
}

fn verdicts(pcap: &std::path::Path, prefs: &[&str]) -> Vec<Verdict> {
    let mut args: Vec<&str> = Vec::new();
    for p in prefs {
        args.extend(["-o", p]);
    }
    args.extend([
        "-T",
        "json",
        "-e",
        "frame.number",
        "-e",
        "keyfleet.version",
        "-e",
        "_ws.expert.message",
    ]);
    let out = tshark::run(pcap, &args);
    let v: serde_json::Value = serde_json::from_str(&out).expect("tshark -T json");
    v.as_array()
        .expect("an array of packets")
        .iter()
        .map(|p| {
            let l = &p["_source"]["layers"];
            let strings = |k: &str| -> Vec<String> {
                l[k].as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            Verdict {
                keyfleet: !strings("keyfleet.version").is_empty(),
                experts: strings("_ws.expert.message"),
            }
        })
        .collect()
}

/// Whether the dissector's error message says what `wire::decode` said.
fn same_error(lua: &str, rust: &WireError) -> bool {
    match rust {
        WireError::Version(v) => lua.starts_with(&format!("wire version {v} is not supported")),
        WireError::UnknownType(t) => lua.starts_with(&format!("unknown message type 0x{t:02x}")),
        // The library checks UTF-8, then the length in characters, then each
        // character; the dissector checks bytes: both say "node id".
        WireError::NodeId(_)
        | WireError::Invalid {
            field: "node id utf-8",
            ..
        } => lua.starts_with("node id invalid"),
        other => lua == other.to_string(),
    }
}

#[test]
fn dissector_agrees_with_the_library_on_mutated_datagrams_and_raises_no_lua_error() {
    if !tshark::available("wireshark_dissector mutated datagrams") {
        return;
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(15);
    let main = main_seeds(&mut rng);
    let fs = fs_seeds(&main, &mut rng);
    let seeds: Vec<Vec<u8>> = main.iter().chain(&fs).cloned().collect();
    // An empty UDP payload reaches no dissector; the library refuses it (Empty).
    let datagrams: Vec<Vec<u8>> = mutations(&seeds, &mut rng)
        .into_iter()
        .filter(|d| !d.is_empty())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("mutated.pcap");
    tshark::write_pcap(&datagrams, 7777, &pcap);
    let refused = datagrams
        .iter()
        .filter(|d| wire::decode(d).is_err())
        .count();
    println!(
        "{} datagrams from {} seeds ({} main, {} fs); wire::decode refuses {refused}",
        datagrams.len(),
        seeds.len(),
        main.len(),
        fs.len()
    );

    let no_lua_error = |v: &[Verdict], run: &str| {
        for (i, f) in v.iter().enumerate() {
            for e in &f.experts {
                assert!(
                    !e.contains("Lua Error") && !e.contains("Malformed Packet"),
                    "{run}: frame {} ({:02x?}): {e}",
                    i + 1,
                    datagrams[i]
                );
            }
        }
    };

    // On the port, in main's layout: the same verdict and message as the library.
    let on_port = verdicts(&pcap, &["keyfleet.layout:main"]);
    assert_eq!(on_port.len(), datagrams.len(), "one frame per datagram");
    no_lua_error(&on_port, "port, main layout");
    let mut disagree = Vec::new();
    for (i, (d, v)) in datagrams.iter().zip(&on_port).enumerate() {
        assert!(
            v.keyfleet,
            "frame {} not decoded as keyfleet: {d:02x?}",
            i + 1
        );
        let ours: Vec<&String> = v.experts.iter().collect();
        match wire::decode(d) {
            Ok(m) if !ours.is_empty() => disagree.push(format!(
                "frame {}: the library decodes a {} but the dissector says {ours:?}: {d:02x?}",
                i + 1,
                m.name()
            )),
            Err(e) if ours.len() != 1 || !same_error(ours[0], &e) => disagree.push(format!(
                "frame {}: the library says {e:?} ({e}), the dissector {ours:?}: {d:02x?}",
                i + 1
            )),
            _ => {}
        }
    }
    assert!(
        disagree.is_empty(),
        "{} of {} datagrams judged differently:\n{}",
        disagree.len(),
        datagrams.len(),
        disagree[..disagree.len().min(20)].join("\n")
    );

    // The heuristic alone (no port), in main's layout: it claims exactly the
    // datagrams the library decodes.
    let heuristic = verdicts(
        &pcap,
        &[
            "keyfleet.layout:main",
            "keyfleet.ports:",
            "udp.try_heuristic_first:TRUE",
        ],
    );
    no_lua_error(&heuristic, "heuristic, main layout");
    let claimed = heuristic.iter().filter(|v| v.keyfleet).count();
    for (i, (d, v)) in datagrams.iter().zip(&heuristic).enumerate() {
        assert_eq!(
            v.keyfleet,
            wire::decode(d).is_ok(),
            "frame {}: heuristic claimed {} a datagram the library {}: {d:02x?}",
            i + 1,
            if v.keyfleet { "" } else { "not" },
            if v.keyfleet { "refuses" } else { "decodes" }
        );
        if v.keyfleet {
            assert!(v.experts.is_empty(), "frame {}: {:?}", i + 1, v.experts);
        }
    }

    // Both layouts (the default): no Lua error; every seed of either decodes clean.
    let auto = verdicts(&pcap, &[]);
    no_lua_error(&auto, "auto layout");
    let mut clean_seeds = 0;
    for (d, v) in datagrams.iter().zip(&auto) {
        if seeds.contains(d) {
            assert!(v.keyfleet && v.experts.is_empty(), "seed {d:02x?}: {v:?}");
            clean_seeds += 1;
        }
    }
    assert!(clean_seeds >= seeds.len());
    // fs's layout alone: its seeds decode, join and join accept are unknown there.
    let fs_only = verdicts(&pcap, &["keyfleet.layout:fs"]);
    no_lua_error(&fs_only, "fs layout");
    for (d, v) in datagrams.iter().zip(&fs_only) {
        if fs.contains(d) {
            assert!(v.experts.is_empty(), "fs seed {d:02x?}: {v:?}");
        }
        if main.contains(d) && matches!(d[1], 0x06 | 0x15 | 0x02 | 0x05 | 0x11..=0x14) {
            assert!(
                !v.experts.is_empty(),
                "main seed in fs layout {d:02x?}: {v:?}"
            );
        }
    }
    println!(
        "port: {} frames, every verdict and message as wire::decode's; heuristic claimed {claimed} (= the {} the library decodes); no Lua error in 4 runs",
        on_port.len(),
        datagrams.len() - refused
    );
}
