//! Leader terms (issue 16): a node refuses every controller message of a
//! lower term than the highest it has accepted, follows a higher one only
//! once that message authenticates, stores the new term before it acts on
//! the message, and keeps it across a restart.

use super::*;

/// Every kind of controller message `c` can send, for epoch 2 and the
/// node's member number (a key response answers `irt`). The handshake
/// answer's term is inside its Noise payload: only a node with a handshake
/// in flight reads it.
fn every_message(c: &mut FakeController, irt: u64) -> Vec<(&'static str, Vec<u8>)> {
    let st = c.state(&key(1), None);
    let seq = c.seq();
    vec![
        ("key update request", c.key_update(&key(2))),
        (
            "first transition request",
            c.transition(Step::FirstTransition, 2),
        ),
        (
            "second transition request",
            c.transition(Step::SecondTransition, 2),
        ),
        ("key response", c.key_response(irt, &st)),
        (
            "resync request",
            wire::mac(wire::resync(c.term, Epoch(1), seq, c.member), &c.chain()),
        ),
        (
            "beacon",
            c.beacon(1, Some((RoundPhase::SecondTransition, 2))),
        ),
    ]
}

/// The position of the persisted snapshot carrying `term` in `out`, and of
/// the first datagram sent.
fn persist_then_send(out: &[NodeAction], term: u32) -> (Option<usize>, Option<usize>) {
    let p = out
        .iter()
        .position(|a| matches!(a, NodeAction::Persist(p) if p.term == term));
    let s = out
        .iter()
        .position(|a| matches!(a, NodeAction::SendTo { .. } | NodeAction::SendGroup { .. }));
    (p, s)
}

#[test]
fn a_new_term_is_followed_stored_first_and_counts_its_own_sequence_numbers() {
    let mut r = Rig::uc1();
    assert_eq!(r.node.term(), 1);
    // The new leader starts its sequence numbers afresh (lower than the old
    // leader's): its own term's window, not the old one's.
    r.ctl.seq = 0;
    r.ctl.term = 4;
    let ku = r.ctl.key_update(&key(2));
    let out = r.feed(&ku);
    assert_eq!(refusal(&out), None, "{out:?}");
    assert_eq!(r.node.state(), DC12);
    assert_eq!(r.node.term(), 4);
    let (p, s) = persist_then_send(&out, 4);
    assert!(
        p.is_some() && s.is_some() && p < s,
        "the term is stored before the reply goes out: {out:?}"
    );
    // After a restart the node still holds term 4.
    let snap = r.node.snapshot();
    assert_eq!(snap.term, 4);
    let restored = NodeMachine::restore(&snap, node_cfg()).unwrap();
    assert_eq!(restored.term(), 4);
}

/// The class of problem: whatever a deposed leader (term 1) sends, with
/// whatever sequence number, a node on term 2 refuses it as `stale_term`
/// and nothing changes; the same messages of term 2 are accepted.
#[test]
fn every_controller_message_of_a_lower_term_is_refused() {
    let mut r = Rig::uc1();
    r.ctl.term = 2;
    let ku = r.ctl.key_update(&key(2));
    assert_eq!(refusal(&r.feed(&ku)), None);
    assert_eq!((r.node.term(), r.node.state()), (2, DC12));
    // A key request outstanding, so that answers to it are solicited.
    let out = r.input(NodeInput::LinkUp);
    let irt = request_seq(&out);
    let mut old = FakeController::new(0);
    old.sk = r.ctl.sk.clone();
    old.term = 1;
    for seq_start in [0, r.ctl.seq, r.ctl.seq + 10_000, u64::MAX / 2] {
        old.seq = seq_start;
        for (what, bytes) in every_message(&mut old, irt) {
            let before = (r.node.state(), r.node.term());
            let out = r.feed(&bytes);
            assert_eq!(
                refusal(&out),
                Some(Refusal::StaleTerm {
                    what,
                    got: 1,
                    have: 2
                }),
                "{what} of term 1 (seq from {seq_start}): {out:?}"
            );
            assert!(sent(&out).is_empty() && !persisted(&out), "{what}: {out:?}");
            assert_eq!((r.node.state(), r.node.term()), before, "{what}");
        }
    }
    assert_eq!(
        Refusal::StaleTerm {
            what: "x",
            got: 1,
            have: 2
        }
        .kind(),
        "stale_term"
    );
}

/// A forged message of a higher term (the attacker's signature, or a MAC
/// under another node's key) is refused and does not raise the node's term:
/// otherwise one datagram of term `u32::MAX` would lock the real leader out.
#[test]
fn a_forged_higher_term_is_not_followed() {
    let mut r = Rig::uc1();
    let out = r.input(NodeInput::LinkUp);
    let irt = request_seq(&out);
    let mut forger = FakeController::forger(0);
    forger.keys = NodeKeys::derive(&initial(9));
    forger.term = u32::MAX;
    r.now = r.now.plus(NodeConfig::default().beacon_silence_ms + 1);
    for (what, bytes) in every_message(&mut forger, irt) {
        let out = r.feed(&bytes);
        assert!(
            refusal(&out).is_some_and(|r| r.kind() != "stale_term"),
            "{what}: {out:?}"
        );
        assert_eq!(r.node.term(), 1, "{what}");
        assert!(!persisted(&out), "{what}");
    }
    // The real leader, still on term 1, is followed as before.
    let t = r.ctl.key_update(&key(2));
    assert_eq!(refusal(&r.feed(&t)), None);
    assert_eq!(r.node.state(), DC12);
}

/// A state file written before terms (no `term` field) loads with term 0:
/// the first leader's messages (term 1) are accepted.
#[test]
fn a_state_without_a_term_loads_and_follows_term_1() {
    let r = Rig::uc1();
    let mut v = serde_json::to_value(r.node.snapshot()).unwrap();
    v.as_object_mut().unwrap().remove("term").unwrap();
    let p: NodePersist = serde_json::from_value(v).unwrap();
    assert_eq!(p.term, 0);
    let mut n = Rig::uc1();
    n.node = NodeMachine::restore(&p, node_cfg()).unwrap();
    assert_eq!(n.node.term(), 0);
    n.input(NodeInput::LinkUp);
    let t = n.ctl.key_update(&key(2));
    assert_eq!(refusal(&n.feed(&t)), None);
    assert_eq!(n.node.term(), 1);
}

/// A resync request of a new leader is numbered in its own term: a low
/// sequence number there is not "before the answer that synced the node"
/// (that answer was the old leader's, numbered in its term).
#[test]
fn a_new_terms_resync_is_not_taken_for_an_obsolete_one() {
    let mut r = Rig::uc1();
    let out = r.input(NodeInput::LinkUp);
    let irt = request_seq(&out);
    r.ctl.seq = 10_000;
    let st = r.ctl.state(&key(1), None);
    let kr = r.ctl.key_response(irt, &st);
    assert_eq!(refusal(&r.feed(&kr)), None);
    assert!(r.node.is_synced());
    r.ctl.term = 2;
    r.ctl.seq = 0;
    let seq = r.ctl.seq();
    let x = wire::mac(
        wire::resync(r.ctl.term, Epoch(1), seq, r.ctl.member),
        &r.ctl.chain(),
    );
    let out = r.feed(&x);
    assert_eq!(refusal(&out), None, "{out:?}");
    assert!(
        !r.node.is_synced(),
        "the new leader's resync makes the node ask: {out:?}"
    );
    assert_eq!(r.node.term(), 2);
}
