//! Issue 17, deliverable 4: proof on captured traffic.
//!
//! A real fleet (`keyfleet serve` and three `keyfleet-agent run` on loopback
//! multicast, unicast on loopback) rotates its key four times while an
//! AF_PACKET socket on the host records every UDP datagram of the fleet
//! (multicast and unicast alike). Then a listener
//!
//! 1. given node-00's **initial key** (its printed label) runs the project's
//!    own derivations on it (`NodeKeys::derive`, the enrollment PSK) and tries
//!    to open every wrapped key and handshake answer in the capture, and to
//!    forge node-00's replies, key requests and a handshake;
//! 2. given a **copy of node-00's state file** taken at epoch 2, walks the
//!    capture as the node would (every controller share against the copied
//!    chain and share secret, and against any chain it opens on the way).
//!
//! Nothing opens under the label; no forgery is accepted (the controller
//! audits each refusal and the fleet keeps rotating); the copied state opens
//! at most the next step's key (epoch 3), nothing earlier than it holds and
//! nothing two rounds later.

use crate::support;

use std::collections::HashSet;
use std::mem::MaybeUninit;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyfleet_core::crypto::ratchet::Initiator;
use keyfleet_core::crypto::{Chain, Epoch, InitialKey, NodeKeys, Share, ShareSecret, Step};
use keyfleet_core::wire::{self, Message};
use support::fleet::*;

/// Every UDP payload on the host to or from `ports`, deduplicated (loopback
/// shows each frame twice: outgoing and incoming), in capture order.
struct Capture {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Capture {
    fn start(ports: Vec<u16>) -> Capture {
        // AF_PACKET, SOCK_RAW, ETH_P_ALL (0x0003 in network byte order).
        let sock = socket2::Socket::new(
            socket2::Domain::PACKET,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(0x0300)),
        )
        .expect("an AF_PACKET socket (the test runs as root)");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let mut dedup = HashSet::new();
            let mut buf = [MaybeUninit::<u8>::uninit(); 65_536];
            while !s2.load(Ordering::Relaxed) {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                // SAFETY-free copy: recv initialised the first n bytes.
                let frame: Vec<u8> = buf[..n]
                    .iter()
                    .map(|b| unsafe { b.assume_init() })
                    .collect();
                if let Some(p) = udp_payload(&frame, &ports) {
                    if dedup.insert(p.clone()) {
                        seen2.lock().unwrap().push(p);
                    }
                }
            }
        });
        Capture {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// The UDP payload of an Ethernet/IPv4 frame whose source or destination port is in `ports`.
fn udp_payload(f: &[u8], ports: &[u16]) -> Option<Vec<u8>> {
    if f.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = f.get(14..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if *ip.get(9)? != 17 {
        return None;
    }
    let udp = ip.get(ihl..)?;
    let src = u16::from_be_bytes([*udp.first()?, *udp.get(1)?]);
    let dst = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    let len = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    if !ports.contains(&src) && !ports.contains(&dst) {
        return None;
    }
    Some(udp.get(8..len)?.to_vec())
}

/// The hex form of a label as the key file holds it, back to the 16 key bytes.
fn initial_key(form: &str) -> InitialKey {
    let b = hex::decode(form.trim()).unwrap();
    InitialKey(b[..16].try_into().unwrap())
}

/// Every key wrapped for `member` in the capture: (epoch, controller share, wrapped key).
fn wrapped_for(
    capture: &[Vec<u8>],
    member: u32,
) -> Vec<(Epoch, Share, keyfleet_core::crypto::WrappedKey)> {
    let mut out = Vec::new();
    for d in capture {
        match wire::decode(d) {
            Ok(Message::KeyUpdate(ku)) => {
                if let Some(w) = ku.entry_for(member) {
                    out.push((ku.epoch, ku.share, w));
                }
            }
            Ok(Message::KeyResponse(r)) if r.member == member => {
                out.push((r.state.current_epoch, r.share, r.state.current));
                if let Some(x) = r.state.round {
                    out.push((x.epoch, r.share, x.wrapped));
                }
            }
            _ => {}
        }
    }
    out
}

#[test]
fn a_capture_opens_nothing_under_the_label_and_a_stolen_state_heals() {
    let _heavy = support::heavy();
    let fleet = Fleet::new(3, "[round]\ndrain_grace_ms = 200\n");
    let mut ports: Vec<u16> = vec![fleet.group.port(), fleet.ctl_port];
    ports.extend(fleet.nodes.iter().map(|n| n.listen.port()));
    let capture = Capture::start(ports);
    let (_serve, _agents) = fleet.up(30_000);
    let member: u32 = fleet.status()["nodes"][0]["member_no"].as_u64().unwrap() as u32;
    assert_eq!(fleet.status()["nodes"][0]["node_id"], "node-00");

    fleet.run(&["rekey"]);
    assert_eq!(fleet.wait_converged(20_000), 2);
    // The copy of node-00's state at epoch 2.
    let snapshot: serde_json::Value =
        keyfleet::statefile::read_json(&fleet.nodes[0].state.join("state.json"))
            .unwrap()
            .unwrap();
    for e in 3..=5 {
        fleet.run(&["rekey"]);
        assert_eq!(fleet.wait_converged(20_000), e);
    }

    // ---- forgeries with the label, sent while the fleet runs
    let label = initial_key(&std::fs::read_to_string(&fleet.nodes[0].key_file).unwrap());
    let keys = NodeKeys::derive(&label);
    let ctl: SocketAddr = format!("127.0.0.1:{}", fleet.ctl_port).parse().unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let node_id = wire::NodeId::parse("node-00").unwrap();
    let mut rng = rand::rngs::OsRng;
    // (a) MAC'd as revision 1 did, with the label's MAC key; (b) under the
    // chain a responder gets from replaying node-00's captured handshake init
    // with the label's PSK (what the label alone yields).
    let mut forged = 0;
    let captured_now = capture_snapshot(&capture);
    let replay_chain = captured_now.iter().find_map(|d| match wire::decode(d) {
        Ok(Message::HandshakeInit(h)) if h.node_id == node_id => {
            keyfleet_core::crypto::ratchet::respond(
                &keys, h.prologue, &h.noise, b"", member, &mut rng,
            )
            .ok()
            .map(|(_, c)| c)
        }
        _ => None,
    });
    let replay_chain = replay_chain.expect("node-00's handshake init is in the capture");
    let share = ShareSecret::generate(&mut rng).public();
    let bodies = |seq: u64| {
        [
            wire::ack(wire::Step::KeyUpdate, Epoch(5), seq, member, &share),
            wire::key_request(
                Epoch(5),
                wire::Step::SecondTransition,
                seq + 1,
                member,
                &share,
            ),
        ]
    };
    // Sequence numbers above any the node used (a node numbers its messages
    // from the clock), so that only the MAC can refuse them.
    let base = 1u64 << 62;
    for mut b in bodies(base) {
        let tag = keys.mac(&b);
        b.extend_from_slice(&tag);
        sock.send_to(&b, ctl).unwrap();
        forged += 1;
    }
    for b in bodies(base + 10) {
        sock.send_to(&wire::mac(b, &replay_chain), ctl).unwrap();
        forged += 1;
    }
    // (c) an active impersonation: a fresh handshake under the label.
    let mut init = wire::handshake_init_header(base + 20, &node_id);
    let (_, msg) = Initiator::start(&keys, &init, &mut rng).unwrap();
    init.extend_from_slice(&msg);
    sock.send_to(&init, ctl).unwrap();
    forged += 1;
    std::thread::sleep(Duration::from_millis(500));

    // The fleet keeps rotating with node-00 in it, at its own address.
    fleet.run(&["rekey"]);
    assert_eq!(fleet.wait_converged(20_000), 6);
    let st = fleet.status();
    assert_eq!(
        st["nodes"][0]["address"],
        fleet.nodes[0].listen.to_string(),
        "no forgery moved node-00"
    );
    let capture = capture.finish();
    let history = fleet.history();
    let refused: Vec<String> = history["audit"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| {
            a["kind"]
                .as_str()
                .is_some_and(|k| k.eq_ignore_ascii_case("refusal"))
        })
        .map(|a| a["detail"].to_string())
        .collect();
    let pinned = refused.iter().filter(|d| d.contains("\"Pinned\"")).count();
    let bad_mac = refused.iter().filter(|d| d.contains("\"BadMac\"")).count();
    println!(
        "forged {forged} datagrams as node-00: {bad_mac} refused as bad MAC, {pinned} as pinned; audit: {refused:?}"
    );
    assert!(pinned >= 1, "the label's handshake is refused: {refused:?}");
    assert!(bad_mac >= 1, "the label's MACs are refused: {refused:?}");

    // ---- 1. the label opens nothing in the capture
    let entries = wrapped_for(&capture, member);
    let answers: Vec<&Vec<u8>> = capture
        .iter()
        .filter(|d| matches!(wire::decode(d), Ok(Message::HandshakeAnswer(_))))
        .collect();
    let epochs: HashSet<u32> = entries.iter().map(|e| e.0 .0).collect();
    println!(
        "capture: {} datagrams, {} keys wrapped for node-00 (epochs {:?}), {} handshake answers",
        capture.len(),
        entries.len(),
        {
            let mut v: Vec<_> = epochs.iter().collect();
            v.sort();
            v
        },
        answers.len()
    );
    assert!(epochs.contains(&2) && epochs.contains(&5), "{epochs:?}");
    let mut opened_by_label = 0;
    for (epoch, c, w) in &entries {
        // Revision 1: the label's key-encryption key.
        opened_by_label += usize::from(keys.unwrap(w, *epoch, member).is_some());
        // The chain the label yields (a replayed handshake), stepped with a
        // share secret of the listener's own.
        let mine = ShareSecret::generate(&mut rng);
        if let Some(dh) = mine.dh(c) {
            let step = Step::derive(&replay_chain, &dh, member, c, &mine.public());
            opened_by_label += usize::from(step.unwrap(w, *epoch, member).is_some());
        }
    }
    for a in &answers {
        let Ok(Message::HandshakeAnswer(x)) = wire::decode(a) else {
            continue;
        };
        let (ini, _) = Initiator::start(&keys, b"", &mut rng).unwrap();
        opened_by_label += usize::from(ini.finish(x.noise).is_ok());
    }
    assert_eq!(opened_by_label, 0, "the label opened a captured key");

    // ---- 2. the copy of the state at epoch 2
    let r = &snapshot["node"]["ratchet"];
    let bytes32 = |v: &serde_json::Value| -> [u8; 32] {
        let b: Vec<u8> = serde_json::from_value(v.clone()).unwrap();
        b.try_into().unwrap()
    };
    let own = ShareSecret::from_bytes(bytes32(&r["secret"]));
    let mut chains = vec![Chain::from_bytes(
        bytes32(&r["chain"]["chain"]),
        bytes32(&r["chain"]["mac"]),
    )];
    let mut opened: Vec<u32> = Vec::new();
    // Walk the capture in order as the node would; every chain reached is
    // tried again on what follows (with the only share secret the copy holds).
    for (epoch, c, w) in &entries {
        let Some(dh) = own.dh(c) else { continue };
        let mut reached = Vec::new();
        for chain in &chains {
            let step = Step::derive(chain, &dh, member, c, &own.public());
            if step.unwrap(w, *epoch, member).is_some() {
                opened.push(epoch.0);
                reached.push(step.chain().clone());
            }
        }
        chains.extend(reached);
    }
    opened.sort();
    opened.dedup();
    println!("the copy of node-00's state at epoch 2 opened the keys of epochs {opened:?}");
    assert!(
        opened.iter().all(|e| *e == 3),
        "the copy opened {opened:?}: only the next step's key (epoch 3) may open"
    );
}

fn capture_snapshot(c: &Capture) -> Vec<Vec<u8>> {
    c.seen.lock().unwrap().clone()
}
