//! The next round's key agreement prepared while idle
//! (`controller/ahead.rs`, issue 11): a round started with it is the same
//! round to the nodes; a preparation that no longer fits a member is not used.

use super::*;
use crate::crypto::Share;
use std::cell::RefCell;
use std::rc::Rc;

/// What the filter saw: the share of every key update sent, and the members
/// that asked for a key (a node that cannot open its wrap asks).
#[derive(Default)]
struct Seen {
    shares: Vec<Share>,
    key_requests: Vec<usize>,
    /// Notices to the group: (sequence number, epoch, share, commitment).
    notices: Vec<(u64, Epoch, Share, Option<[u8; crate::crypto::REVEAL_LEN]>)>,
    /// The transition commitment of every key update sent.
    commits: Vec<[u8; crate::crypto::REVEAL_LEN]>,
}

fn watch(f: &mut TestFleet) -> Rc<RefCell<Seen>> {
    let seen = Rc::new(RefCell::new(Seen::default()));
    let s = seen.clone();
    f.drop = Box::new(move |dest, from, b| {
        match wire::decode(b) {
            Ok(Message::KeyUpdate(ku)) => {
                s.borrow_mut().shares.push(ku.share);
                s.borrow_mut().commits.push(ku.commit);
            }
            Ok(Message::ShareNotice(n)) if dest == Dest::Group => s
                .borrow_mut()
                .notices
                .push((n.seq, n.epoch, n.share, n.commit)),
            Ok(Message::KeyRequest(_)) if dest == Dest::Controller => {
                s.borrow_mut().key_requests.push(from)
            }
            _ => {}
        }
        false
    });
    seen
}

fn rotate(f: &mut TestFleet) {
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    for _ in 0..200 {
        if f.phase().is_none() {
            break;
        }
        f.advance(20);
    }
    assert_eq!(f.phase(), None, "the round finished");
}

fn prepare_all(f: &mut TestFleet) {
    let mut passes = 0;
    while f.c.prepare_round(&mut f.rng, 2) {
        passes += 1;
        assert!(passes < 10, "prepares a few members a pass and ends");
    }
}

#[test]
fn a_round_prepared_ahead_is_the_same_round_to_the_nodes_and_its_share_serves_once() {
    let mut f = TestFleet::new(5, test_cfg());
    let seen = watch(&mut f);
    let mut shares = Vec::new();
    for round in 0..3u32 {
        // Two members a pass: three passes for five members.
        assert!(f.c.prepare_round(&mut f.rng, 2));
        assert!(f.c.prepare_round(&mut f.rng, 2));
        assert!(!f.c.prepare_round(&mut f.rng, 2));
        assert_eq!(f.c.prepared_steps(), 5);
        rotate(&mut f);
        assert_eq!(f.c.prepared_steps(), 0, "the round took the share");
        let e = Epoch(2 + round);
        assert_eq!(
            f.states(),
            vec![NodeState::UpdateCompleted { current: e }; 5],
            "round {round}"
        );
        let s = seen.borrow();
        assert!(
            s.key_requests.is_empty(),
            "every node opened its wrap: {:?}",
            s.key_requests
        );
        shares.push(*s.shares.last().expect("key updates went out"));
        drop(s);
        seen.borrow_mut().shares.clear();
    }
    shares.sort_by_key(|s| s.0);
    shares.dedup();
    assert_eq!(shares.len(), 3, "a share drawn ahead serves one round");
    // Nothing is prepared during a round.
    f.ctl(ControllerInput::Rekey).unwrap();
    assert!(!f.c.prepare_round(&mut f.rng, 100));
    assert_eq!(f.c.prepared_steps(), 0);
}

/// A member whose chain and share moved after its step was prepared (here a
/// key request answered between the preparation and the round) gets a step
/// made afresh: the prepared one would wrap its key under a chain it no
/// longer holds, and it would have to ask for the key.
#[test]
fn a_step_prepared_before_a_member_moved_its_chain_is_not_used() {
    let mut f = TestFleet::new(3, test_cfg());
    prepare_all(&mut f);
    assert_eq!(f.c.prepared_steps(), 3);
    // Node 1 restarts and asks for the key: the answer moves its ratchet on.
    let snap = f.nodes[1].snapshot();
    f.nodes[1] = NodeMachine::restore(&snap, node_cfg()).unwrap();
    f.node(1, NodeInput::LinkUp);
    f.pump();
    f.advance(1000);
    assert!(f.nodes[1].is_synced());
    let seen = watch(&mut f);
    rotate(&mut f);
    assert_eq!(f.states(), vec![UC2; 3]);
    assert!(
        seen.borrow().key_requests.is_empty(),
        "node 1 opened the wrap made for its new chain: {:?}",
        seen.borrow().key_requests
    );
}

/// The share drawn ahead is announced in the pass after it was drawn and
/// again with each beacon (the same bytes), never during a round; every node
/// makes its X25519 with it while idle, and the round's key update, which
/// carries that share, finds it made on every node.
#[test]
fn the_share_drawn_ahead_is_announced_and_every_node_makes_its_step_ahead() {
    let cfg = ControllerConfig {
        beacon_interval_ms: 1000,
        ..test_cfg()
    };
    let mut f = TestFleet::new(5, cfg);
    f.advance(0);
    let seen = watch(&mut f);
    for round in 0..3u32 {
        let e = Epoch(1 + round);
        assert!(f.c.prepare_round(&mut f.rng, 2), "round {round}");
        assert!(
            f.c.poll_timeout().is_some_and(|t| t <= f.now),
            "the notice is due at once"
        );
        f.advance(0);
        let first = seen.borrow().notices.clone();
        assert_eq!(first.len(), 1, "one notice: {first:?}");
        assert_eq!(first[0].1, e, "for the round after the current epoch");
        prepare_all(&mut f);
        // With the next beacon, the same notice again; the nodes check it once.
        f.advance(1000);
        let again = seen.borrow().notices.clone();
        assert_eq!(again, vec![first[0]; 2]);
        for n in &f.nodes {
            assert_eq!(n.prepare_stats().notices, 1 + u64::from(round));
        }
        rotate(&mut f);
        let ku_share = *seen.borrow().shares.last().expect("key updates went out");
        assert_eq!(
            ku_share, first[0].2,
            "the key update carries the announced share"
        );
        let ku_commit = *seen.borrow().commits.last().expect("key updates went out");
        assert_eq!(
            Some(ku_commit),
            first[0].3,
            "and the commitment the round notice announced"
        );
        for (i, n) in f.nodes.iter().enumerate() {
            assert_eq!(n.prepare_stats().used, 1 + u64::from(round), "node {i}");
            assert_eq!(
                n.prepare_stats().vouched,
                1 + u64::from(round),
                "node {i} took the key update on the notice's word"
            );
        }
        assert_eq!(
            f.states(),
            vec![NodeState::UpdateCompleted { current: e.next() }; 5]
        );
        let mut s = seen.borrow_mut();
        assert!(s.key_requests.is_empty());
        s.notices.clear();
    }
    // None during a round, and none without a share drawn.
    f.ctl(ControllerInput::Rekey).unwrap();
    assert!(!f.c.prepare_round(&mut f.rng, 100));
    f.advance(3000);
    assert!(seen.borrow().notices.is_empty());
}

/// Rotations closer together than the notice budget's refill (a rotation
/// every few hundred ms, as a benchmark or a burst of leaked-key signals
/// makes): each finished round earns the next notice a check of its own, so
/// every key update is still taken on the notice's word. A forger who races
/// every genuine notice with forged ones takes that check and then the
/// budget, and no more: the genuine notice left unchecked sends the key update
/// to its signature check, as without a notice, and every round completes.
#[test]
fn back_to_back_rounds_are_each_vouched_and_a_forger_racing_the_notices_costs_a_bounded_number_of_checks(
) {
    const ROUNDS: u32 = 6;
    let mut f = TestFleet::new(5, test_cfg());
    f.advance(0);
    let seen = watch(&mut f);
    let joined: Vec<u64> = f.nodes.iter().map(|n| n.signature_checks()).collect();
    for round in 0..ROUNDS {
        prepare_all(&mut f);
        f.advance(0);
        rotate(&mut f);
        assert_eq!(
            seen.borrow().notices.len(),
            1,
            "round {round}: no beacon in between"
        );
        seen.borrow_mut().notices.clear();
    }
    let checks: Vec<u64> = f.nodes.iter().map(|n| n.signature_checks()).collect();
    for (i, n) in f.nodes.iter().enumerate() {
        let s = n.prepare_stats();
        assert_eq!(s.skipped, 0, "node {i}");
        assert_eq!(
            s.notices,
            u64::from(ROUNDS),
            "node {i}: every notice checked"
        );
        assert_eq!(
            s.vouched,
            u64::from(ROUNDS),
            "node {i}: every key update vouched"
        );
        assert_eq!(
            checks[i] - joined[i],
            u64::from(ROUNDS),
            "node {i}: one check a round, the notice's"
        );
    }
    assert!(seen.borrow().key_requests.is_empty());

    // A forger on the LAN sends 3 forged round notices to every node as each
    // round finishes, before the controller's own.
    let forger = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let from: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let start = f.now;
    for round in 0..ROUNDS {
        let NodeState::UpdateCompleted { current: e } = f.nodes[0].state() else {
            panic!("level between rounds")
        };
        for k in 0..3u64 {
            let forged = wire::sign(
                wire::round_notice(
                    crate::protocol::TERM,
                    e,
                    1_000_000 + u64::from(round) * 10 + k,
                    &Share([9; 32]),
                    &[9; 32],
                ),
                &forger,
            );
            for i in 0..f.nodes.len() {
                f.node(
                    i,
                    NodeInput::Datagram {
                        from,
                        bytes: &forged,
                    },
                );
            }
        }
        prepare_all(&mut f);
        f.advance(0);
        rotate(&mut f);
    }
    let elapsed_s = (f.now.0 - start.0) / 1000;
    for (i, n) in f.nodes.iter().enumerate() {
        assert_eq!(
            n.state(),
            NodeState::UpdateCompleted {
                current: Epoch(1 + 2 * ROUNDS)
            },
            "node {i}: every round completed"
        );
        // Per round at most: the earned check, the key update's own check
        // when its notice went unchecked; plus the budget over the run.
        let spent = n.signature_checks() - checks[i];
        let bound = 2 * u64::from(ROUNDS)
            + u64::from(crate::protocol::NOTICE_VERIFY_BURST)
            + elapsed_s * 1000 / crate::protocol::NOTICE_VERIFY_REFILL_MS;
        assert!(spent <= bound, "node {i}: {spent} checks, bound {bound}");
        assert!(
            n.prepare_stats().refused >= u64::from(ROUNDS),
            "node {i}: the forgeries took the checks ({:?})",
            n.prepare_stats()
        );
    }
}
