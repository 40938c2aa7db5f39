//! A datagram from anyone on the LAN reaching a node that has joined and
//! synced (the agent's socket hands `NodeMachine::handle` the bytes as they
//! came): no panic, and input the node refuses changes nothing: not its
//! state, not its stored snapshot (keys, member, sequence), and it asks for
//! no write to disk.
//!
//! Seeds: the genuine datagrams of a round (`FUZZ_WRITE_SEEDS`).
#![no_main]

use keyfleet::protocol::{NodeAction, NodeEvent, NodeInput, Time};
use keyfleet_fuzz::node::{ctl_addr, joined, rng};
use keyfleet_fuzz::{genuine_seeds, write_seeds};
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: write_seeds(genuine_seeds), |data: &[u8]| {
    let (mut node, _) = joined();
    let state = node.state();
    let snapshot = serde_json::to_string(&node.snapshot()).expect("snapshot serializes");
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
            serde_json::to_string(&node.snapshot()).expect("snapshot serializes"),
            snapshot,
            "a refused datagram changed the snapshot"
        );
        assert!(
            !out.iter().any(|a| matches!(a, NodeAction::Persist(_))),
            "a refused datagram asked for a write"
        );
    }
});
