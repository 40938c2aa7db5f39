//! The beacon.

use super::*;

/// The beacons the controller sent in `out`.
fn beacons(out: &[ControllerAction]) -> Vec<Vec<u8>> {
    out.iter()
        .filter_map(|a| match a {
            ControllerAction::SendGroup(b) if matches!(wire::decode(b), Ok(Message::Beacon(_))) => {
                Some(b.clone())
            }
            _ => None,
        })
        .collect()
}

fn beacon_of(b: &[u8]) -> (u64, Epoch, Option<(Epoch, RoundPhase)>, SocketAddr) {
    let Ok(Message::Beacon(x)) = wire::decode(b) else {
        panic!("not a beacon")
    };
    assert_eq!(x.term, TERM);
    (x.seq, x.epoch, x.round, x.controller)
}

#[test]
fn the_beacon_goes_out_every_interval_same_bytes_until_the_state_changes() {
    let mut rng = rng();
    let mut out = Vec::new();
    let cfg = ControllerConfig {
        address: ctl_addr(),
        // The round below is still in its drain when the beacon is next due.
        drain_grace_ms: Some(5_000),
        ..test_cfg()
    };
    let mut c = ControllerMachine::new(cfg, Time(0), &mut rng, &mut out);
    let mut out = Vec::new();
    c.handle(Time(0), ControllerInput::Start, &mut rng, &mut out)
        .unwrap();
    let first = beacons(&out);
    assert_eq!(first.len(), 1, "a beacon at start");
    assert_eq!(
        c.poll_timeout(),
        Some(Time(1000)),
        "the next beacon's deadline"
    );
    let (seq0, e, round, addr) = beacon_of(&first[0]);
    assert_eq!((e, round, addr), (Epoch(1), None, ctl_addr()));
    assert!(crate::crypto::verify(
        &ed25519_dalek::VerifyingKey::from_bytes(&c.public_key()).unwrap(),
        &first[0][..first[0].len() - 64],
        first[0][first[0].len() - 64..].try_into().unwrap()
    ));
    // Early firing: nothing. Due: the same bytes again.
    let mut out = Vec::new();
    c.handle(Time(999), ControllerInput::Timeout, &mut rng, &mut out)
        .unwrap();
    assert!(beacons(&out).is_empty());
    c.handle(Time(1000), ControllerInput::Timeout, &mut rng, &mut out)
        .unwrap();
    assert_eq!(beacons(&out), first, "unchanged state, unchanged bytes");
    // A round starts: the next beacon tells it, under a higher sequence number.
    let mut out = Vec::new();
    c.handle(Time(1500), ControllerInput::Rekey, &mut rng, &mut out)
        .unwrap();
    c.handle(Time(2000), ControllerInput::Timeout, &mut rng, &mut out)
        .unwrap();
    let b = beacons(&out);
    assert_eq!(b.len(), 1);
    let (seq1, e, round, _) = beacon_of(&b[0]);
    assert!(seq1 > seq0);
    // No enrolled node to wait for: the round is already in its drain.
    assert_eq!(
        (e, round),
        (Epoch(1), Some((Epoch(2), RoundPhase::Draining)))
    );
}

#[test]
fn beacons_tell_the_round_and_can_be_switched_off() {
    let mut f = TestFleet::new(2, test_cfg());
    f.drop = Box::new(|dest, _, _| dest == Dest::Node(1));
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    let mut out = Vec::new();
    let due = f.now.plus(1000);
    f.c.handle(due, ControllerInput::Timeout, &mut f.rng, &mut out)
        .unwrap();
    let b = beacons(&out);
    let (_, e, round, _) = beacon_of(&b[0]);
    assert_eq!(
        (e, round),
        (Epoch(1), Some((Epoch(2), RoundPhase::Distributing)))
    );

    let cfg = ControllerConfig {
        beacon_interval_ms: 0,
        ..test_cfg()
    };
    let mut rng = rng();
    let mut c = ControllerMachine::new(cfg, Time(0), &mut rng, &mut Vec::new());
    let mut out = Vec::new();
    c.handle(Time(0), ControllerInput::Start, &mut rng, &mut out)
        .unwrap();
    assert!(beacons(&out).is_empty());
}

/// A node cut off across a whole round (marked stale, the round finished
/// without it) comes back and hears one beacon: it asks at once and is
/// level with the fleet after that one exchange, without waiting for a
/// usage report or the next round.
#[test]
fn a_node_back_after_a_round_catches_up_from_the_first_beacon() {
    let mut f = TestFleet::new(3, test_cfg());
    f.drop = Box::new(|dest, from, _| dest == Dest::Node(2) || from == 2);
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(20_000);
    assert_eq!(f.c.round(), None, "the round finished without node 2");
    assert_eq!(f.c.current_epoch(), Epoch(2));
    assert_eq!(
        f.nodes[2].state(),
        NodeState::UpdateCompleted { current: Epoch(1) }
    );
    // Back: the next beacon reaches it.
    f.drop = Box::new(|_, _, _| false);
    f.advance(1000);
    assert_eq!(
        f.nodes[2].state(),
        NodeState::UpdateCompleted { current: Epoch(2) }
    );
    assert!(f.nodes[2].is_synced());
    assert!(f.nodes[2].beacon_stats().syncs >= 1);
}
