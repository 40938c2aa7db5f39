//! Share notices (the node's `prepare.rs`): the next key update's X25519
//! made while idle, from the share the controller announced ahead. The round
//! is the same round with or without it; a notice that does not fit is not
//! used; forged, replayed and flooded notices cost a bounded number of
//! signature checks, taken from a budget of their own.

use super::*;
use crate::protocol::{NOTICE_VERIFY_BURST, NOTICE_VERIFY_REFILL_MS};

/// Takes the round of epoch `e` through both transitions.
fn finish_round(r: &mut Rig, e: u32) {
    for step in [Step::FirstTransition, Step::SecondTransition] {
        let t = r.ctl.transition(step, e);
        let out = r.feed(&t);
        assert_eq!(refusal(&out), None);
    }
    assert_eq!(
        r.node.state(),
        NodeState::UpdateCompleted { current: Epoch(e) }
    );
}

#[test]
fn a_share_notice_makes_the_key_updates_x25519_ahead_and_the_round_is_the_same() {
    let mut r = Rig::uc1();
    let checks = r.node.signature_checks();
    let n = r.ctl.share_notice(1);
    let out = r.feed(&n);
    assert_eq!(refusal(&out), None);
    assert!(sent(&out).is_empty(), "a notice is never answered");
    assert!(
        !persisted(&out),
        "nothing of a share notice is written (a round notice's share is)"
    );
    assert_eq!(r.node.prepare_stats().notices, 1);
    assert_eq!(r.node.signature_checks(), checks + 1);
    // The copy that goes with each beacon costs no signature check, and no write.
    for _ in 0..3 {
        let out = r.feed(&n);
        assert_eq!(refusal(&out), None);
        assert!(!persisted(&out));
    }
    assert_eq!(r.node.signature_checks(), checks + 1);
    assert_eq!(r.node.prepare_stats().notices, 1);

    let ku = r.ctl.key_update(&key(2));
    let out = r.feed(&ku);
    assert_eq!(refusal(&out), None);
    assert_eq!(r.node.state(), DC12);
    assert!(
        flushed(&out),
        "after a share notice (a session-12 controller) the key update is flushed"
    );
    assert_eq!(acks(&out), vec![(Step::KeyUpdate, Epoch(2))]);
    assert_eq!(
        r.node.prepare_stats().used,
        1,
        "the step found its X25519 made"
    );
    finish_round(&mut r, 2);
    // The next round, without a notice, takes its step as before, under the
    // chain the prepared step gave: the controller's view of it holds.
    let ku = r.ctl.key_update(&key(3));
    let out = r.feed(&ku);
    assert_eq!(refusal(&out), None);
    assert!(flushed(&out), "without a notice the key update is flushed");
    assert_eq!(acks(&out), vec![(Step::KeyUpdate, Epoch(3))]);
    assert_eq!(r.node.prepare_stats().used, 1);
    finish_round(&mut r, 3);
}

#[test]
fn a_notice_whose_share_the_key_update_does_not_carry_is_not_used() {
    let mut r = Rig::uc1();
    let n = r.ctl.share_notice(1);
    assert_eq!(refusal(&r.feed(&n)), None);
    // The controller restarted between the notice and the round: its round
    // has a share drawn afresh.
    r.ctl.ahead = None;
    let ku = r.ctl.key_update(&key(2));
    let out = r.feed(&ku);
    assert_eq!(refusal(&out), None);
    assert!(flushed(&out), "a step the disk cannot derive is flushed");
    assert_eq!(acks(&out), vec![(Step::KeyUpdate, Epoch(2))]);
    assert_eq!(r.node.prepare_stats().used, 0);
    finish_round(&mut r, 2);
}

/// A key response between the notice and the round moves the node's share:
/// the X25519 made with the old share does not fit any more. The notice's
/// next copy (with the next beacon) makes it again for the new share,
/// without another signature check.
#[test]
fn a_node_whose_share_moved_after_the_notice_makes_its_x25519_again() {
    for copy_again in [false, true] {
        let mut r = Rig::uc1();
        let n = r.ctl.round_notice(1);
        assert!(flushed(&r.feed(&n)), "the announced share is flushed");
        // The node asks for the key (its link blinked); the answer moves its ratchet.
        let out = r.input(NodeInput::LinkUp);
        let ahead = r.ctl.ahead.take();
        let st = r.ctl.state(&key(1), None);
        let kr = r.ctl.key_response(request_seq(&out), &st);
        r.ctl.ahead = ahead;
        assert_eq!(refusal(&r.feed(&kr)), None);
        assert!(r.node.is_synced());
        let checks = r.node.signature_checks();
        if copy_again {
            let out = r.feed(&n);
            assert_eq!(refusal(&out), None);
            assert_eq!(r.node.signature_checks(), checks, "a known copy");
            assert!(flushed(&out), "announced again, for the new share");
        }
        let ku = r.ctl.key_update(&key(2));
        let out = r.feed(&ku);
        assert_eq!(refusal(&out), None, "copy again: {copy_again}");
        assert_eq!(
            flushed(&out),
            !copy_again,
            "flushed only when the disk holds no announcement for the share the step is made with"
        );
        assert_eq!(acks(&out), vec![(Step::KeyUpdate, Epoch(2))]);
        assert_eq!(r.node.prepare_stats().used, u64::from(copy_again));
        finish_round(&mut r, 2);
    }
}

/// Forged notices cost at most the notice budget's signature checks, and
/// take nothing from the budget of key updates: the round right after a
/// flood is verified at once.
#[test]
fn a_flood_of_forged_notices_costs_its_own_budget_and_moves_nothing() {
    let mut r = Rig::uc1();
    let mut forger = FakeController::forger(100);
    let checks = r.node.signature_checks();
    for _ in 0..20 {
        forger.ahead = None;
        let n = forger.share_notice(1);
        let out = r.feed(&n);
        assert!(sent(&out).is_empty() && !persisted(&out));
    }
    let s = r.node.prepare_stats();
    assert_eq!(
        r.node.signature_checks(),
        checks + u64::from(NOTICE_VERIFY_BURST)
    );
    assert_eq!(s.refused, u64::from(NOTICE_VERIFY_BURST));
    assert_eq!(s.skipped, 20 - u64::from(NOTICE_VERIFY_BURST));
    assert_eq!(s.notices, 0);
    // A genuine notice waits for the budget: one more check a refill period on.
    let n = r.ctl.share_notice(1);
    assert_eq!(refusal(&r.feed(&n)), None);
    assert_eq!(r.node.prepare_stats().notices, 0, "out of budget");
    r.now = r.now.plus(NOTICE_VERIFY_REFILL_MS);
    assert_eq!(refusal(&r.feed(&n)), None);
    assert_eq!(r.node.prepare_stats().notices, 1);
    let ku = r.ctl.key_update(&key(2));
    let out = r.feed(&ku);
    assert_eq!(refusal(&out), None);
    assert_eq!(r.node.state(), DC12);
    assert_eq!(r.node.prepare_stats().used, 1);
}

/// A notice is taken only by a node level with it, in its own term, under a
/// sequence number the controller has not used: an old notice replayed after
/// its round, one that reuses a request's number, one heard mid-round and one
/// of another term cost no X25519 (and the first three no signature check).
#[test]
fn replayed_mid_round_and_other_term_notices_are_not_taken() {
    let mut r = Rig::uc1();
    let old = r.ctl.share_notice(1);
    assert_eq!(refusal(&r.feed(&old)), None);
    let ku = r.ctl.key_update(&key(2));
    let ku_seq = r.ctl.seq;
    assert_eq!(refusal(&r.feed(&ku)), None);
    assert_eq!(r.node.prepare_stats().used, 1);
    // Mid-round: not level with any notice.
    let checks = r.node.signature_checks();
    let mid = r.ctl.share_notice(2);
    r.ctl.ahead = None;
    assert_eq!(refusal(&r.feed(&mid)), None);
    assert_eq!(r.node.signature_checks(), checks);
    finish_round(&mut r, 2);
    // After the round: the old notice is for an epoch the node left.
    let checks = r.node.signature_checks();
    let before = r.node.prepare_stats();
    assert_eq!(refusal(&r.feed(&old)), None);
    assert_eq!(r.node.signature_checks(), checks);
    assert_eq!(r.node.prepare_stats().skipped, before.skipped + 1);
    // A notice under the key update's sequence number: a replay.
    let share = ShareSecret::generate(&mut r.rng).public();
    let reused = wire::sign(
        wire::share_notice(r.ctl.term, Epoch(2), ku_seq, &share),
        &r.ctl.sk,
    );
    assert!(matches!(
        refusal(&r.feed(&reused)),
        Some(Refusal::Replay { .. })
    ));
    assert_eq!(r.node.signature_checks(), checks);
    // Another term: a new leader's first key update brings it, not a notice.
    r.ctl.term += 1;
    let other = r.ctl.share_notice(2);
    r.ctl.term -= 1;
    assert_eq!(refusal(&r.feed(&other)), None);
    assert_eq!(r.node.signature_checks(), checks);
    assert_eq!(r.node.prepare_stats().notices, 1, "only the first one");
    // None of them is used: the next key update makes its X25519.
    let ku = r.ctl.key_update(&key(3));
    assert_eq!(refusal(&r.feed(&ku)), None);
    assert_eq!(r.node.prepare_stats().used, 1, "the first round's only");
}

/// Where a key update request's fields sit (`wire::key_update`).
const KU_SEQ_AT: usize = 2 + 4 + 4;
const KU_COMMIT_AT: usize = 2 + 4 + 4 + 8 + 32 + 4 + 4 + 2;
const KU_ENTRY_WRAP_AT: usize = KU_COMMIT_AT + 32 + 4;

/// A round notice (share and transition commitment) vouches for the key
/// update request that repeats them: taken when its entry opens under the
/// step made ahead, without a signature check; with the transitions taken
/// by their reveals, the round costs the node no signature check at all. A
/// byte-identical copy is answered again without one too.
#[test]
fn a_round_notice_vouches_for_the_key_update_and_the_round_needs_no_signature_check() {
    let mut r = Rig::uc1();
    let n = r.ctl.round_notice(1);
    let out = r.feed(&n);
    assert_eq!(refusal(&out), None);
    assert!(flushed(&out), "the announced share is flushed, while idle");
    let out = r.feed(&n);
    assert!(!persisted(&out), "once");
    let checks = r.node.signature_checks();
    let ku = r.ctl.key_update(&key(2));
    let out = r.feed(&ku);
    assert_eq!(refusal(&out), None);
    assert_eq!(r.node.state(), DC12);
    assert!(
        persisted(&out) && !flushed(&out),
        "the step is re-derivable from the disk: checkpointed, not flushed"
    );
    assert_eq!(acks(&out), vec![(Step::KeyUpdate, Epoch(2))]);
    assert_eq!(r.node.prepare_stats().vouched, 1);
    assert_eq!(r.node.signature_checks(), checks, "no signature check");
    // The controller resends it (a reply lost): answered again, unchecked.
    r.now = r.now.plus(1000);
    let out = r.feed(&ku);
    assert_eq!(refusal(&out), None);
    assert_eq!(acks(&out), vec![(Step::KeyUpdate, Epoch(2))]);
    assert_eq!(r.node.signature_checks(), checks);
    finish_round(&mut r, 2);
    assert_eq!(r.node.signature_checks(), checks, "a round without one");
    assert_eq!(r.node.prepare_stats().vouched, 1);
}

/// What a round notice does not vouch for goes to the signature check, as
/// without one: a request whose entry does not open (a forgery that copied
/// the notice's share and commitment), one with another commitment, a
/// request after a share notice (no commitment), and one of a newer term. A
/// forgery refused leaves the genuine request to be taken on the notice's
/// word.
#[test]
fn what_a_round_notice_does_not_vouch_for_goes_to_the_signature_check() {
    type Tamper = fn(&mut Vec<u8>);
    let cases: [(&str, Tamper, bool); 4] = [
        ("entry", |b| b[KU_ENTRY_WRAP_AT + 5] ^= 1, false),
        ("commitment", |b| b[KU_COMMIT_AT] ^= 1, false),
        ("share notice", |_| {}, true),
        ("newer term", |_| {}, true),
    ];
    for (what, tamper, genuine) in cases {
        let mut r = Rig::uc1();
        let n = if what == "share notice" {
            r.ctl.share_notice(1)
        } else {
            r.ctl.round_notice(1)
        };
        assert_eq!(refusal(&r.feed(&n)), None);
        if what == "newer term" {
            // A standby took over: its request is of its own term.
            r.ctl.term += 1;
        }
        let checks = r.node.signature_checks();
        let ku = r.ctl.key_update(&key(2));
        let mut sent = ku.clone();
        tamper(&mut sent);
        let out = r.feed(&sent);
        assert_eq!(r.node.signature_checks(), checks + 1, "{what}: checked");
        assert_eq!(r.node.prepare_stats().vouched, 0, "{what}");
        if genuine {
            assert_eq!(refusal(&out), None, "{what}");
            assert_eq!(r.node.state(), DC12, "{what}");
            continue;
        }
        assert!(
            matches!(refusal(&out), Some(Refusal::BadSignature { .. })),
            "{what}: {:?}",
            refusal(&out)
        );
        assert_eq!(r.node.state(), UC1, "{what}: nothing taken");
        let out = r.feed(&ku);
        assert_eq!(refusal(&out), None, "{what}: the genuine request");
        assert_eq!(r.node.state(), DC12, "{what}");
        assert_eq!(r.node.prepare_stats().vouched, 1, "{what}");
        assert_eq!(r.node.signature_checks(), checks + 1, "{what}");
    }
}

/// A request taken on a round notice's word was not authenticated in its
/// sequence number or source: a copy with another number, from another
/// address, is the genuine step (its entry opens), but it moves no replay
/// window and teaches no controller address; the genuine request, later,
/// is still fresh.
#[test]
fn a_key_update_taken_on_a_notices_word_moves_no_replay_window_and_teaches_no_address() {
    let mut r = Rig::uc1();
    let n = r.ctl.round_notice(1);
    assert_eq!(refusal(&r.feed(&n)), None);
    let before = r.node.controller_addr();
    let ku = r.ctl.key_update(&key(2));
    let mut copy = ku.clone();
    copy[KU_SEQ_AT..KU_SEQ_AT + 8].copy_from_slice(&(u64::MAX - 5).to_be_bytes());
    let elsewhere: SocketAddr = "192.0.2.66:4000".parse().unwrap();
    let out = r.input(NodeInput::Datagram {
        from: elsewhere,
        bytes: &copy,
    });
    assert_eq!(refusal(&out), None);
    assert_eq!(r.node.state(), DC12);
    assert_eq!(r.node.prepare_stats().vouched, 1);
    assert_eq!(r.node.controller_addr(), before, "no address learned");
    // The genuine request under its own number: fresh, verified, answered.
    r.now = r.now.plus(1000);
    let checks = r.node.signature_checks();
    let out = r.feed(&ku);
    assert_eq!(refusal(&out), None, "not a replay");
    assert_eq!(r.node.signature_checks(), checks + 1);
    assert_eq!(acks(&out), vec![(Step::KeyUpdate, Epoch(2))]);
}

/// A node still joining hears the group's notices too: skipped, not refused
/// (a healthy fleet counts no refusals), no write, no reply, no check.
#[test]
fn a_node_not_joined_yet_skips_a_notice_without_a_refusal() {
    let mut ctl = FakeController::new(0);
    let mut node = NodeMachine::new(NodeId::parse("node-0").unwrap(), &initial(0), node_cfg());
    let mut rng = rng();
    for n in [ctl.round_notice(1), ctl.share_notice(1)] {
        let mut out = Vec::new();
        node.handle(
            Time(0),
            NodeInput::Datagram {
                from: ctl_addr(),
                bytes: &n,
            },
            &mut rng,
            &mut out,
        );
        assert_eq!(refusal(&out), None);
        assert!(out.is_empty(), "{out:?}");
    }
    assert_eq!(node.prepare_stats().skipped, 2);
    assert_eq!(node.signature_checks(), 0);
}

/// The first transition reply's held time (issue 11.1): a node that checked
/// a timed round notice for the round answers its first transition request
/// with a timed reply (0x18) that says how long the request waited on the
/// node (its socket's receive timestamp, as the shell gives it), a copy's
/// own wait when it answers a copy again; after a plain round notice (an
/// older controller, which would refuse the unknown kind) or with no notice
/// checked, the reply is untimed (0x12); a key update or second transition
/// reply never carries it. The controller's side: `controller/round.rs`
/// tests, `the_drain_leaves_out_what_requests_and_replies_waited_at_either_end`.
#[test]
fn a_timed_round_notice_makes_the_first_transition_reply_say_how_long_the_request_waited() {
    let replies = |out: &[NodeAction]| -> Vec<(u8, Step, Option<u32>)> {
        sent(out)
            .iter()
            .filter_map(|b| match wire::decode(b) {
                Ok(Message::Ack(a)) => Some((b[1], a.step, a.held_us)),
                _ => None,
            })
            .collect()
    };
    for notice in [Some(true), Some(false), None] {
        let mut r = Rig::uc1();
        if let Some(timed) = notice {
            let n = if timed {
                r.ctl.timed_round_notice(1)
            } else {
                r.ctl.round_notice(1)
            };
            assert_eq!(refusal(&r.feed(&n)), None);
        }
        let ku = r.ctl.key_update(&key(2));
        let out = r.feed_waited(&ku, 500);
        assert_eq!(refusal(&out), None);
        assert_eq!(replies(&out), vec![(0x11, Step::KeyUpdate, None)]);
        let ft = r.ctl.transition(Step::FirstTransition, 2);
        let timed = notice == Some(true);
        for waited in [7_345, 12] {
            let out = r.feed_waited(&ft, waited);
            assert_eq!(refusal(&out), None);
            let want = if timed {
                (0x18, Step::FirstTransition, Some(waited))
            } else {
                (0x12, Step::FirstTransition, None)
            };
            assert_eq!(replies(&out), vec![want], "notice {notice:?}");
        }
        let st = r.ctl.transition(Step::SecondTransition, 2);
        let out = r.feed_waited(&st, 900);
        assert_eq!(replies(&out), vec![(0x13, Step::SecondTransition, None)]);
        assert_eq!(
            r.node.state(),
            NodeState::UpdateCompleted { current: Epoch(2) }
        );
    }
}
