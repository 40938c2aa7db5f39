//! Transition requests checked by their reveal (wire revision 3): a node that
//! took the round's key update from a verified request holds the round's
//! commitment and checks the transition requests with a hash, not a
//! signature; everything else about them is as before.

use super::*;

/// Synced at epoch 1, then the round of epoch 2's key update from a
/// verified request: the node holds the round's commitment.
fn dc12_by_key_update() -> Rig {
    let mut r = Rig::uc1();
    let ku = r.ctl.key_update(&key(2));
    let out = r.feed(&ku);
    assert_eq!(refusal(&out), None);
    assert_eq!(r.node.state(), DC12);
    r
}

#[test]
fn after_a_verified_key_update_the_transitions_are_taken_by_their_reveal_not_a_signature() {
    let mut r = dc12_by_key_update();
    let signatures = r.node.signature_checks();
    let t = r.ctl.transition(Step::FirstTransition, 2);
    let out = r.feed(&t);
    assert_eq!(r.node.state(), IT12);
    assert!(persisted(&out));
    assert_eq!(acks(&out), vec![(Step::FirstTransition, Epoch(2))]);
    let t = r.ctl.transition(Step::SecondTransition, 2);
    let out = r.feed(&t);
    assert_eq!(r.node.state(), UC2);
    assert_eq!(acks(&out), vec![(Step::SecondTransition, Epoch(2))]);
    assert_eq!(r.node.reveal_checks(), 2);
    assert_eq!(
        r.node.signature_checks(),
        signatures,
        "no signature checked for either transition"
    );
}

#[test]
fn a_transition_request_whose_reveal_does_not_hold_moves_nothing_and_goes_to_the_signature() {
    let r0 = dc12_by_key_update();
    let (term, chain) = (r0.ctl.term, r0.ctl.transition_chain(Epoch(2)));
    let (r1, r2) = (
        chain.reveal(Step::FirstTransition),
        chain.reveal(Step::SecondTransition),
    );
    let next_round = r0.ctl.transition_chain(Epoch(3));
    let other_term =
        crate::crypto::TransitionChain::derive(&r0.ctl.sk.to_bytes(), term + 1, Epoch(2));
    let mut off = r1;
    off[0] ^= 0x80;
    let forged: Vec<(&str, Vec<u8>)> = vec![
        (
            "a reveal off by one bit",
            unsigned_transition(term, Step::FirstTransition, 2, 50, &off),
        ),
        (
            "zero reveal",
            unsigned_transition(term, Step::FirstTransition, 2, 51, &[0; 32]),
        ),
        (
            "the commitment itself",
            unsigned_transition(term, Step::FirstTransition, 2, 52, &chain.commitment()),
        ),
        (
            "the first reveal as the second's",
            unsigned_transition(term, Step::SecondTransition, 2, 53, &r1),
        ),
        (
            "the next round's first reveal",
            unsigned_transition(
                term,
                Step::FirstTransition,
                2,
                54,
                &next_round.reveal(Step::FirstTransition),
            ),
        ),
        (
            "another term's chain",
            unsigned_transition(
                term,
                Step::FirstTransition,
                2,
                55,
                &other_term.reveal(Step::FirstTransition),
            ),
        ),
        (
            "the right reveal under a higher term",
            unsigned_transition(term + 1, Step::FirstTransition, 2, 56, &r1),
        ),
        (
            "the right reveal for the next epoch",
            unsigned_transition(term, Step::FirstTransition, 3, 57, &r1),
        ),
        (
            "the second reveal for the next epoch",
            unsigned_transition(term, Step::SecondTransition, 3, 58, &r2),
        ),
    ];
    for (what, bytes) in forged {
        let mut r = dc12_by_key_update();
        let signatures = r.node.signature_checks();
        let out = r.feed(&bytes);
        assert!(refusal(&out).is_some(), "{what}: {out:?}");
        assert!(!persisted(&out), "{what}");
        assert!(acks(&out).is_empty(), "{what}");
        assert_eq!(r.node.state(), DC12, "{what}");
        assert_eq!(r.node.reveal_checks(), 0, "{what}");
        assert!(
            r.node.signature_checks() <= signatures + 1,
            "{what}: at most the one signature check of any request"
        );
        // The genuine request still moves it: nothing was spent or marked.
        let t = r.ctl.transition(Step::FirstTransition, 2);
        assert_eq!(refusal(&r.feed(&t)), None, "{what}");
        assert_eq!(r.node.state(), IT12, "{what}");
    }
}

#[test]
fn a_request_taken_by_its_reveal_moves_no_replay_window() {
    let mut r = dc12_by_key_update();
    let term = r.ctl.term;
    let r1 = r
        .ctl
        .transition_chain(Epoch(2))
        .reveal(Step::FirstTransition);
    // The genuine reveal, copied by someone else with the highest sequence
    // number: the step is the controller's (the reveal says so), the number
    // is not (where it came from: `route.rs`).
    let copy = unsigned_transition(term, Step::FirstTransition, 2, u64::MAX - 1, &r1);
    let out = r.feed(&copy);
    assert_eq!(refusal(&out), None);
    assert_eq!(r.node.state(), IT12);
    // The controller's next request, under its own next number, is fresh.
    let t = r.ctl.transition(Step::SecondTransition, 2);
    let out = r.feed(&t);
    assert_eq!(refusal(&out), None);
    assert_eq!(r.node.state(), UC2);
    // And so is its next signed message (a key update of the next round).
    let ku = r.ctl.key_update(&key(3));
    assert_eq!(refusal(&r.feed(&ku)), None);
}

#[test]
fn a_node_without_the_commitment_checks_the_signature() {
    // Back in the round by a key response: no key update, no commitment.
    let mut r = Rig::dc12();
    let term = r.ctl.term;
    let r1 = r
        .ctl
        .transition_chain(Epoch(2))
        .reveal(Step::FirstTransition);
    let out = r.feed(&unsigned_transition(
        term,
        Step::FirstTransition,
        2,
        90,
        &r1,
    ));
    assert!(
        matches!(refusal(&out), Some(Refusal::BadSignature { .. })),
        "{out:?}"
    );
    assert_eq!(r.node.state(), DC12);
    let signatures = r.node.signature_checks();
    let t = r.ctl.transition(Step::FirstTransition, 2);
    assert_eq!(refusal(&r.feed(&t)), None);
    assert_eq!(r.node.state(), IT12);
    assert_eq!(r.node.signature_checks(), signatures + 1);
    assert_eq!(r.node.reveal_checks(), 0);
}
