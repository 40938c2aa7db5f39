//! A power loss takes a node back to its last flushed snapshot: what it only
//! checkpointed is gone. A key update whose step the disk can derive (its
//! chain, its share secret and the share announced ahead, flushed while idle)
//! is only checkpointed (issue 11), so a node can come back from before a key
//! update it already confirmed. It asks under the chain it holds; the
//! controller answers a key request one step late under the chain it holds,
//! and the node opens the answer under the step it derives from its disk.
//! Tried at every moment of a round, with real machines on both sides.

use super::*;

/// The node that loses its power.
const VICTIM: usize = 2;

fn fleet() -> TestFleet {
    TestFleet::new(
        5,
        ControllerConfig {
            beacon_interval_ms: 1000,
            ..test_cfg()
        },
    )
}

/// The next round's share drawn, every step prepared, and the share
/// announced: every node flushes the announcement.
fn announce(f: &mut TestFleet) {
    while f.c.prepare_round(&mut f.rng, 100) {}
    f.advance(0);
    let e = f.c.current_epoch();
    for (i, n) in f.nodes.iter().enumerate() {
        assert_eq!(
            f.flushed[i].as_ref().and_then(NodePersist::announced_epoch),
            Some(e),
            "node {i} flushed the announcement ({:?})",
            n.state()
        );
    }
}

/// Runs the fleet until the controller's round is over (at most 10 s).
fn finish(f: &mut TestFleet) {
    f.run_until(|f| f.phase().is_none() && f.nodes.iter().all(NodeMachine::is_synced));
    assert_eq!(f.phase(), None, "the round finished");
}

/// What the controller refused that a healthy fleet never sends it.
fn alarms(f: &TestFleet) -> Vec<String> {
    f.records
        .iter()
        .filter_map(|r| match r {
            Record::Refused { reason, .. }
                if matches!(reason, Refusal::BadMac { .. } | Refusal::Late { .. }) =>
            {
                Some(reason.to_string())
            }
            _ => None,
        })
        .collect()
}

/// The kinds of the controller's refusals recorded from `from` on.
fn refused(f: &TestFleet, from: usize) -> Vec<&'static str> {
    f.records[from..]
        .iter()
        .filter_map(|r| match r {
            Record::Refused { reason, .. } => Some(reason.kind()),
            _ => None,
        })
        .collect()
}

/// A copy of the node's disk `copy` asks the controller for the key (under
/// sequence numbers above the node's own: not a replay): the refusals it
/// got, and whether it was answered.
fn a_copy_asks(f: &mut TestFleet, copy: &NodePersist) -> (Vec<&'static str>, bool) {
    let mut older = copy.clone();
    older.seq_reserved += 1 << 20;
    let mut n = NodeMachine::restore(&older, node_cfg()).unwrap();
    let mut out = Vec::new();
    n.handle(f.now, NodeInput::LinkUp, &mut f.rng, &mut out);
    let request = sent(&out).into_iter().next().expect("a key request");
    let records = f.records.len();
    let _ = f.ctl(ControllerInput::Datagram {
        from: node_addr(VICTIM as u32),
        bytes: &request,
    });
    let answered = f.records[records..]
        .iter()
        .any(|r| matches!(r, Record::KeyRequestAnswered { .. }));
    (refused(f, records), answered)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum At {
    /// In the round's first phase, before the node's key update.
    Distributing,
    /// Its key update reply was lost: the controller still waits for it.
    ReplyLost,
    /// The controller has every key update reply (the node's among them).
    FirstTransition,
    Draining,
    SecondTransition,
    /// The round is over; the next share is not announced yet.
    AfterRound,
}

#[test]
fn a_node_back_from_before_a_confirmed_key_update_is_answered_and_in_step() {
    let moments = [
        At::Distributing,
        At::ReplyLost,
        At::FirstTransition,
        At::Draining,
        At::SecondTransition,
        At::AfterRound,
    ];
    for at in moments {
        let mut f = fleet();
        f.power_loss = true;
        announce(&mut f);
        let before = f.flushed[VICTIM].clone().expect("flushed");
        let e = f.c.current_epoch();
        let new = e.next();
        match at {
            At::Distributing => f.restart_in.push_back((RoundPhase::Distributing, VICTIM)),
            At::FirstTransition => f
                .restart_in
                .push_back((RoundPhase::FirstTransition, VICTIM)),
            At::Draining => f.restart_in.push_back((RoundPhase::Draining, VICTIM)),
            At::SecondTransition => f
                .restart_in
                .push_back((RoundPhase::SecondTransition, VICTIM)),
            At::ReplyLost => {
                f.drop = Box::new(|dest, from, b| {
                    from == VICTIM
                        && dest == Dest::Controller
                        && matches!(wire::decode(b), Ok(Message::Ack(a)) if a.step == Step::KeyUpdate)
                })
            }
            At::AfterRound => {}
        }
        f.ctl(ControllerInput::Rekey).unwrap();
        f.pump();
        match at {
            At::ReplyLost => {
                assert_eq!(f.phase(), Some(RoundPhase::Distributing), "{at:?}");
                assert!(
                    matches!(
                        f.nodes[VICTIM].state(),
                        NodeState::DistributionCompleted { .. }
                    ),
                    "{at:?}: the node took the key update"
                );
                f.drop = Box::new(|_, _, _| false);
                f.restart_node(VICTIM);
            }
            At::AfterRound => {
                finish(&mut f);
                assert_eq!(
                    f.nodes[VICTIM].state(),
                    NodeState::UpdateCompleted { current: new }
                );
                f.restart_node(VICTIM);
            }
            _ => {}
        }
        finish(&mut f);
        // The key update was checkpointed, not flushed: the node came back
        // at its epoch, from the snapshot that announced the round's share.
        assert_eq!(
            f.restarts,
            vec![(VICTIM, NodeState::UpdateCompleted { current: e })],
            "{at:?}: one power loss, back from before the key update"
        );
        assert_eq!(
            f.flushed[VICTIM].as_ref().map(NodePersist::announced_epoch),
            Some(None),
            "{at:?}: the answer was flushed ({:?})",
            before.announced_epoch()
        );
        assert_eq!(
            f.states(),
            vec![NodeState::UpdateCompleted { current: new }; 5],
            "{at:?}"
        );
        assert_eq!(
            f.finished().last().map(|r| (r.0, r.2, r.3)),
            Some((new, 5, 0)),
            "{at:?}: acked by all, none stale"
        );
        assert_eq!(alarms(&f), Vec::<String>::new(), "{at:?}");
        // The node's data flows under the fleet's key, and the next round,
        // announced and checkpointed again, reaches every node.
        let out = f.node(VICTIM, NodeInput::Send(b"after the power loss"));
        assert!(
            out.iter().any(
                |a| matches!(a, NodeAction::SendGroup { data_epoch: Some(x), .. } if *x == new)
            ),
            "{at:?}: sealed under the new key"
        );
        f.pump();
        announce(&mut f);
        f.ctl(ControllerInput::Rekey).unwrap();
        f.pump();
        finish(&mut f);
        assert_eq!(
            f.states(),
            vec![
                NodeState::UpdateCompleted {
                    current: new.next()
                };
                5
            ],
            "{at:?}: the next round"
        );
        assert_eq!(alarms(&f), Vec::<String>::new(), "{at:?}");
    }
}

/// Only a key request one step late is answered. Whoever holds a copy of
/// the node's disk from before the round (its chain and share secret) can
/// derive the confirmed step anyway, so that answer opens nothing more; a
/// reply one step late is still refused (`late`), and a key request two
/// steps late is under a chain the controller does not know (`bad_mac`).
#[test]
fn only_a_key_request_one_step_late_is_answered() {
    let mut f = fleet();
    announce(&mut f);
    let old = f.flushed[VICTIM].clone().expect("flushed");
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    finish(&mut f);
    // A reply under the chain the round replaced: refused as late. (Its
    // sequence number is far above the node's; a refused one marks nothing.)
    let (chain, secret) = NodeMachine::restore(&old, node_cfg())
        .unwrap()
        .ratchet_copy()
        .expect("a ratchet");
    let member = VICTIM as u32 + 1;
    let reply = wire::mac(
        wire::ack(
            Step::SecondTransition,
            f.c.current_epoch(),
            1 << 40,
            member,
            &secret.public(),
        ),
        &chain,
    );
    let records = f.records.len();
    let _ = f.ctl(ControllerInput::Datagram {
        from: node_addr(VICTIM as u32),
        bytes: &reply,
    });
    assert_eq!(refused(&f, records), vec!["late"], "a reply one step late");
    // Another round: that chain is two steps back now.
    announce(&mut f);
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    finish(&mut f);
    assert_eq!(f.finished().last().map(|r| (r.2, r.3)), Some((5, 0)));
    let (refusals, answered) = a_copy_asks(&mut f, &old);
    assert_eq!(refusals, vec!["bad_mac"], "two steps back");
    assert!(!answered);
}

/// The chain the node confirmed its step from is written with the member's
/// row: a controller restarted after the round (a site's power cut takes
/// both down) still answers the node's key request one step late.
#[test]
fn a_controller_restarted_after_the_round_still_answers_a_node_one_step_late() {
    let mut f = fleet();
    f.power_loss = true;
    announce(&mut f);
    let e = f.c.current_epoch();
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    finish(&mut f);
    f.restart_controller();
    f.restart_node(VICTIM);
    assert_eq!(
        f.restarts,
        vec![(VICTIM, NodeState::UpdateCompleted { current: e })],
        "back from before the key update"
    );
    finish(&mut f);
    assert_eq!(
        f.states(),
        vec![NodeState::UpdateCompleted { current: e.next() }; 5]
    );
    assert_eq!(alarms(&f), Vec::<String>::new());
    announce(&mut f);
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    finish(&mut f);
    assert_eq!(f.finished().last().map(|r| (r.2, r.3)), Some((5, 0)));
}

/// After a re-join (a new enrollment handshake the operator allowed) the
/// chain before is not answered one step late: whoever still holds it (the
/// node's old state file) is not the node. Its key request is `bad_mac`.
#[test]
fn after_a_rejoin_the_chain_before_is_not_answered() {
    let mut f = fleet();
    let old = f.nodes[VICTIM].snapshot();
    let id = NodeId::parse(&format!("node-{VICTIM}")).unwrap();
    f.ctl(ControllerInput::AllowRejoin {
        node_id: id.clone(),
    })
    .unwrap();
    f.nodes[VICTIM] = NodeMachine::new(id, &initial(VICTIM as u32), node_cfg());
    f.node(VICTIM, NodeInput::LinkUp);
    f.pump();
    f.run_until(|f| f.nodes[VICTIM].is_synced());
    assert_eq!(
        f.count(|r| matches!(r, Record::HandshakeCompleted { rejoin: true, .. })),
        1
    );
    let (refusals, answered) = a_copy_asks(&mut f, &old);
    assert_eq!(refusals, vec!["bad_mac"]);
    assert!(!answered);
}
