//! A datagram from anyone on the LAN reaching a node that has joined and
//! synced (the agent's socket hands `NodeMachine::handle` the bytes as they
//! came): no panic, and input the node refuses changes nothing: not its
//! state, not its stored snapshot (keys, member, sequence), and it asks for
//! no write to disk. One count may move: `trial_opens`, the data messages the
//! node tried to open with its key (a failed AES-GCM open is a use of the key,
//! counted for the key-usage limits of SPEC §3).
//!
//! Seeds: the genuine datagrams of a round (`FUZZ_WRITE_SEEDS`).
#![no_main]

use keyfleet_core::protocol::{NodeAction, NodeEvent, NodeInput, NodeMachine, Time};
use keyfleet_fuzz::node::{ctl_addr, joined, rng};
use keyfleet_fuzz::{genuine_seeds, write_seeds};
use libfuzzer_sys::fuzz_target;

/// The snapshot without the count of trial opens.
fn stored(node: &NodeMachine) -> serde_json::Value {
    let mut v = serde_json::to_value(node.snapshot()).expect("snapshot serializes");
    if let Some(k) = v.get_mut("keyring").and_then(|k| k.as_object_mut()) {
        k.remove("trial_opens");
    }
    v
}

fuzz_target!(init: write_seeds(genuine_seeds), |data: &[u8]| {
    let (mut node, _) = joined();
    let state = node.state();
    let snapshot = stored(&node);
    let mut out = Vec::new();
    node.handle(
        Time(2000),
        NodeInput::Datagram {
            from: ctl_addr(),
            bytes: data,
        },
        &mut rng(),
        &mut out,
    );
    let refused = out
        .iter()
        .any(|a| matches!(a, NodeAction::Event(NodeEvent::Refused { .. })));
    if refused {
        assert_eq!(node.state(), state, "a refused datagram changed the state");
        assert_eq!(
            stored(&node),
            snapshot,
            "a refused datagram changed the snapshot"
        );
        assert!(
            !out.iter().any(|a| matches!(
                a,
                NodeAction::Persist(_) | NodeAction::Checkpoint(_)
            )),
            "a refused datagram asked for a write"
        );
    }
});
