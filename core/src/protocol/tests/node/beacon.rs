//! The node's reaction to beacons (SPEC §5) and to link changes: it asks at
//! once when a beacon shows it behind by more than one step, waits when one
//! step behind, and no forged, replayed or repeated beacon costs more than a
//! digest or moves it.

use super::*;
use crate::protocol::node::{
    behind_beacon, BEACON_JOIN_SPREAD_MS, BEACON_VERIFY_BURST, BEACON_VERIFY_REFILL_MS,
};
use proptest::prelude::*;

impl FakeController {
    pub(super) fn beacon_seq(
        &self,
        seq: u64,
        epoch: u32,
        round: Option<(RoundPhase, u32)>,
    ) -> Vec<u8> {
        wire::sign(
            wire::beacon(
                self.term,
                Epoch(epoch),
                seq,
                round.map(|(p, e)| (Epoch(e), p)),
                ctl_addr(),
            ),
            &self.sk,
        )
    }

    pub(super) fn beacon(&mut self, epoch: u32, round: Option<(RoundPhase, u32)>) -> Vec<u8> {
        let seq = self.seq();
        self.beacon_seq(seq, epoch, round)
    }
}

/// Signs with a key of its own, not the enrolled controller's.
fn forger() -> FakeController {
    let mut f = FakeController::new(0);
    f.sk = ed25519_dalek::SigningKey::generate(&mut ChaCha20Rng::seed_from_u64(7));
    f
}

fn holds(r: &mut Rig) -> bool {
    let out = r.input(NodeInput::Send(b"probe"));
    !names(&out).contains(&"data")
}

/// The silence nudge: at most once a minute, not at every beacon after a gap.
#[test]
fn a_silence_nudge_is_jittered_and_rate_limited() {
    let mut r = Rig::uc1();
    let level = r.ctl.beacon(1, None);
    r.feed(&level);
    let start = r.now;
    let mut asked = 0u64;
    let silence = NodeConfig::default().beacon_silence_ms;
    // A controller heard only after more than the silence each time, 100 times.
    for _ in 0..100 {
        r.now = r.now.plus(silence + 3000);
        let before = r.node.sync_due();
        let out = r.feed(&level);
        assert_eq!(key_requests(&out), 0, "never at once");
        let due = r.node.sync_due().filter(|d| Some(*d) != before);
        if let Some(due) = due {
            asked += 1;
            assert!(due < r.now.plus(silence), "within one silence period");
            r.now = due;
            let out = r.input(NodeInput::Timeout);
            assert_eq!(key_requests(&out), 1);
            let st = r.ctl.state(&key(1), None);
            let kr = r.ctl.key_response(request_seq(&out), &st);
            r.feed(&kr);
            assert!(r.node.is_synced());
        }
    }
    let minutes = r.now.since(start) / 60_000;
    println!("100 silences over {minutes} min: {asked} key requests");
    assert!(
        asked >= 5 && asked <= minutes + 1,
        "{asked} in {minutes} min"
    );
}

fn key_requests(out: &[NodeAction]) -> usize {
    names(out).iter().filter(|n| **n == "key request").count()
}

const POS: [(u32, u8); 7] = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1)];

/// The rule of [`behind_beacon`], position by position.
#[test]
fn behind_means_more_than_one_step_behind() {
    use RoundPhase::*;
    let b = |pos: (u32, u8), epoch: u32, round: Option<(u32, RoundPhase)>| {
        behind_beacon(
            Some((Epoch(pos.0), Step::from_progress(pos.1).unwrap())),
            Epoch(epoch),
            round.map(|(e, p)| (Epoch(e), p)),
        )
    };
    // No round at epoch 2: only UpdateCompleted(2) or later is level.
    let want: Vec<bool> = POS.iter().map(|p| b(*p, 2, None)).collect();
    assert_eq!(want, [true, true, true, true, true, false, false]);
    // Round 2 distributing: UpdateCompleted(1) waits for the retried key update.
    let want: Vec<bool> = POS
        .iter()
        .map(|p| b(*p, 1, Some((2, Distributing))))
        .collect();
    assert_eq!(want, [true, true, false, false, false, false, false]);
    // First transition and draining: the new key must be held.
    for ph in [FirstTransition, Draining] {
        let want: Vec<bool> = POS.iter().map(|p| b(*p, 1, Some((2, ph)))).collect();
        assert_eq!(
            want,
            [true, true, true, false, false, false, false],
            "{ph:?}"
        );
    }
    // Second transition: DistributionCompleted(1→2) is two steps behind.
    let want: Vec<bool> = POS
        .iter()
        .map(|p| b(*p, 1, Some((2, SecondTransition))))
        .collect();
    assert_eq!(want, [true, true, true, true, false, false, false]);
    assert!(
        !behind_beacon(None, Epoch(9), None),
        "an unjoined node joins instead"
    );
}

#[test]
fn a_beacon_that_changes_nothing_is_not_verified() {
    let mut r = Rig::uc1();
    for _ in 0..5 {
        let b = r.ctl.beacon(1, None);
        let out = r.feed(&b);
        assert!(sent(&out).is_empty() && refusal(&out).is_none(), "{out:?}");
    }
    // One step behind: a round distributing that this node has not heard of yet.
    let b = r.ctl.beacon(1, Some((RoundPhase::Distributing, 2)));
    assert!(sent(&r.feed(&b)).is_empty());
    let s = r.node.beacon_stats();
    assert_eq!((s.received, s.skipped, s.verified), (6, 6, 0));
    assert!(r.node.is_synced() && !holds(&mut r));
}

#[test]
fn an_epoch_the_node_does_not_hold_makes_it_ask_at_once_and_hold_until_answered() {
    let mut r = Rig::uc1();
    let b = r.ctl.beacon(2, None);
    let out = r.feed(&b);
    assert_eq!(key_requests(&out), 1, "{:?}", names(&out));
    assert_eq!(r.node.beacon_stats().verified, 1);
    assert!(holds(&mut r), "holds its data until answered");
    // The answer brings the key; the held data goes out under epoch 2.
    let st = r.ctl.state(&key(2), None);
    let kr = r.ctl.key_response(request_seq(&out), &st);
    let out = r.feed(&kr);
    assert_eq!(refusal(&out), None);
    assert_eq!(r.node.state(), UC2);
    let st = r.ctl.state(&key(2), None);
    let kr = r.ctl.key_response(request_seq(&out), &st);
    let out = r.feed(&kr);
    assert!(r.node.is_synced());
    let data: Vec<_> = out
        .iter()
        .filter_map(|a| match a {
            NodeAction::SendGroup { data_epoch, .. } => *data_epoch,
            _ => None,
        })
        .collect();
    assert_eq!(
        data,
        vec![Epoch(2)],
        "the held message, under the current key"
    );
    // The same beacon again: level now, and only a digest compared.
    let out = r.feed(&b);
    assert!(sent(&out).is_empty());
    let s = r.node.beacon_stats();
    assert_eq!((s.verified, s.digest_hits), (1, 1));
}

#[test]
fn a_round_the_node_is_not_in_makes_it_ask_one_step_behind_waits() {
    use RoundPhase::*;
    // Not in the round at all: the first transition is out and it lacks the key.
    let mut r = Rig::uc1();
    let b = r.ctl.beacon(1, Some((FirstTransition, 2)));
    assert_eq!(key_requests(&r.feed(&b)), 1);
    assert!(holds(&mut r));
    // In the round, one step behind (draining, it has the key but did not
    // switch): the retried first transition request will come.
    let mut r = Rig::dc12();
    let b = r.ctl.beacon(1, Some((Draining, 2)));
    assert!(sent(&r.feed(&b)).is_empty());
    assert!(!holds(&mut r));
    // Two steps behind (second transition, still sealing with the old key).
    let b = r.ctl.beacon(1, Some((SecondTransition, 2)));
    assert_eq!(key_requests(&r.feed(&b)), 1);
    assert!(holds(&mut r));
    // A round that ended without it.
    let mut r = Rig::it12();
    let b = r.ctl.beacon(2, None);
    assert_eq!(key_requests(&r.feed(&b)), 1);
}

#[test]
fn identical_beacon_bytes_are_verified_once_and_start_one_request() {
    let mut r = Rig::uc1();
    let b = r.ctl.beacon(2, None);
    let mut requests = 0;
    for _ in 0..100 {
        requests += key_requests(&r.feed(&b));
    }
    let s = r.node.beacon_stats();
    assert_eq!((s.verified, s.digest_hits, s.syncs), (1, 99, 1), "{s:?}");
    assert_eq!(
        requests, 1,
        "the request is retried by its own timer, not per beacon"
    );
}

#[test]
fn replayed_and_forged_beacons_move_no_one() {
    let mut r = Rig::uc1();
    let old = r.ctl.beacon(2, None); // captured earlier, say
    let level = r.ctl.beacon(1, None);
    // The node verifies a newer beacon (after silence it checks one).
    let silence = NodeConfig::default().beacon_silence_ms;
    r.now = r.now.plus(silence + 1000);
    r.feed(&level);
    r.now = r.now.plus(silence + 1000);
    assert_eq!(r.node.sync_due(), None);
    let out = r.feed(&level);
    // Heard after silence: asks within one silence period (jittered), without holding.
    assert_eq!(key_requests(&out), 0);
    let due = r.node.sync_due().expect("a key request scheduled");
    assert!(due >= r.now && due < r.now.plus(silence), "{due} {}", r.now);
    assert!(!holds(&mut r));
    r.now = due;
    assert_eq!(key_requests(&r.input(NodeInput::Timeout)), 1);
    assert_eq!(r.node.beacon_stats().verified, 1);
    let before = r.node.beacon_stats();
    // A replay of an older beacon: refused before any signature check.
    let out = r.feed(&old);
    assert!(
        matches!(refusal(&out), Some(Refusal::Replay { .. })),
        "{out:?}"
    );
    assert_eq!(key_requests(&out), 0);
    // Another beacon under the sequence number already accepted: it cannot be
    // the controller's, and is refused without a signature check.
    let Ok(Message::Beacon(accepted)) = wire::decode(&level) else {
        panic!()
    };
    let twin = r.ctl.beacon_seq(accepted.seq, 3, None);
    let out = r.feed(&twin);
    assert!(matches!(refusal(&out), Some(Refusal::BadSignature { .. })));
    assert_eq!(r.node.beacon_stats().verified, before.verified);
    assert_eq!(r.node.beacon_stats().forged, before.forged, "no check");
    assert_eq!(r.node.beacon_stats().reused, before.reused + 1);
    let mut forger = forger();
    forger.seq = 100;
    let forged = forger.beacon(9, None);
    let out = r.feed(&forged);
    assert!(matches!(refusal(&out), Some(Refusal::BadSignature { .. })));
    assert_eq!(key_requests(&out), 0);
    assert_eq!(r.node.state(), UC1);
    assert_eq!(r.node.beacon_stats().verified, before.verified);
}

#[test]
fn a_flood_of_forged_beacons_costs_a_bounded_number_of_signature_checks() {
    let mut r = Rig::uc1();
    let mut forger = forger();
    let mut bad = 0;
    // 10 000 distinct forged beacons, each claiming a newer epoch, over 2 s.
    for i in 0..10_000u64 {
        r.now = Time(1000 + i / 5);
        let b = forger.beacon(2 + (i % 7) as u32, None);
        let out = r.feed(&b);
        bad += usize::from(refusal(&out).is_some());
        assert_eq!(key_requests(&out), 0);
    }
    let s = r.node.beacon_stats();
    let elapsed = r.now.since(Time(1000));
    let budget = u64::from(BEACON_VERIFY_BURST) + elapsed / BEACON_VERIFY_REFILL_MS;
    println!(
        "10000 forged beacons over {elapsed} ms: {} signature checks (budget {budget}), {} ignored over budget",
        s.forged, s.over_budget
    );
    assert!(s.forged <= budget, "{s:?}");
    assert_eq!(s.forged + s.over_budget, 10_000);
    assert_eq!(bad as u64, s.forged);
    assert_eq!(r.node.state(), UC1);
    // A genuine beacon still gets through once the budget refills.
    r.now = r.now.plus(BEACON_VERIFY_REFILL_MS);
    let b = r.ctl.beacon(2, None);
    assert_eq!(key_requests(&r.feed(&b)), 1);
}

#[test]
fn link_down_and_up_hold_data_and_ask_at_once() {
    let mut r = Rig::uc1();
    let out = r.input(NodeInput::LinkDown);
    assert_eq!(key_requests(&out), 1);
    assert!(
        holds(&mut r),
        "what it sends while down waits for the answer"
    );
    let out = r.input(NodeInput::LinkUp);
    assert_eq!(key_requests(&out), 1, "asks again at once on link-up");
    let st = r.ctl.state(&key(1), None);
    let kr = r.ctl.key_response(request_seq(&out), &st);
    let out = r.feed(&kr);
    assert!(r.node.is_synced());
    assert_eq!(names(&out).iter().filter(|n| **n == "data").count(), 1);
}

#[test]
fn data_without_a_hint_that_no_held_key_opens_is_kept_while_syncing() {
    // A node back from a link-down gets data sealed under a key it does not
    // hold yet, without an epoch hint: kept, and opened once the answer
    // brings the key.
    let mut sender = other_node(1, Some((RoundPhase::Draining, 2)), false);
    let mut r = Rig::uc1();
    r.input(NodeInput::LinkUp);
    let (bytes, e) = data_from(&mut sender, b"while you were away");
    assert_eq!(e, Epoch(2));
    let out = r.input(NodeInput::Datagram {
        from: node_addr(1),
        bytes: &bytes,
    });
    assert!(refusal(&out).is_none(), "kept, not refused: {out:?}");
    let req = r.input(NodeInput::LinkUp);
    let st = r.ctl.state(&key(1), Some((RoundPhase::Draining, &key(2))));
    let kr = r.ctl.key_response(request_seq(&req), &st);
    let out = r.feed(&kr);
    let got: Vec<_> = out
        .iter()
        .filter_map(|a| match a {
            NodeAction::Deliver(d) => Some((d.plaintext.clone(), d.epoch, d.trials)),
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![(b"while you were away".to_vec(), Epoch(2), 1)]);
}

#[derive(Clone, Debug)]
enum Beam {
    /// A genuine beacon of the state at this index (re-signed each time it changes).
    Genuine(usize),
    /// A replay of the n-th genuine beacon sent so far.
    Replay(usize),
    /// A beacon signed with another key.
    Forged(u32, Option<(u8, u32)>),
    /// Time passes.
    Wait(u64),
}

fn beam() -> impl Strategy<Value = Beam> {
    prop_oneof![
        (0usize..4).prop_map(Beam::Genuine),
        (0usize..50).prop_map(Beam::Replay),
        (any::<u32>(), proptest::option::of((1u8..=4, any::<u32>())))
            .prop_map(|(e, r)| Beam::Forged(e, r)),
        (0u64..5000).prop_map(Beam::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever mix of genuine, replayed and forged beacons arrives, a node's
    /// key state never moves (only the controller's answer moves it), a
    /// forged beacon never starts a key request, a replay of a beacon older
    /// than one verified is refused without a signature check, and the
    /// signature checks stay within the budget.
    #[test]
    fn beacons_never_move_a_node_and_stay_cheap(beams in proptest::collection::vec(beam(), 1..80)) {
        let mut r = Rig::uc1();
        let start = r.now;
        // The controller's states: level, a round distributing, a round it is not in, a newer epoch.
        let states: [(u32, Option<(RoundPhase, u32)>); 4] = [
            (1, None),
            (1, Some((RoundPhase::Distributing, 2))),
            (1, Some((RoundPhase::FirstTransition, 2))),
            (2, None),
        ];
        let mut sent_so_far: Vec<Vec<u8>> = Vec::new();
        let mut last: Option<(usize, Vec<u8>)> = None;
        let mut forger = forger();
        for b in beams {
            let before = r.node.beacon_stats();
            let out = match b {
                Beam::Genuine(i) => {
                    let bytes = match &last {
                        Some((j, bytes)) if *j == i => bytes.clone(),
                        _ => {
                            let (e, round) = states[i];
                            let bytes = r.ctl.beacon(e, round);
                            last = Some((i, bytes.clone()));
                            bytes
                        }
                    };
                    sent_so_far.push(bytes.clone());
                    r.feed(&bytes)
                }
                Beam::Replay(n) => {
                    let Some(bytes) = sent_so_far.get(n % sent_so_far.len().max(1)).cloned() else { continue };
                    r.feed(&bytes)
                }
                Beam::Forged(e, round) => {
                    let round = round.and_then(|(p, _)| e.checked_add(1).map(|re| (RoundPhase::from_u8(p).unwrap(), re)));
                    let bytes = forger.beacon(e, round);
                    let out = r.feed(&bytes);
                    prop_assert_eq!(key_requests(&out), 0, "a forged beacon started a request");
                    out
                }
                Beam::Wait(ms) => { r.now = r.now.plus(ms); Vec::new() }
            };
            prop_assert_eq!(r.node.state(), UC1, "a beacon moved the node: {:?}", out);
            let after = r.node.beacon_stats();
            if after.replays > before.replays {
                prop_assert_eq!(after.verified + after.forged, before.verified + before.forged, "a replay cost a signature check");
            }
        }
        let s = r.node.beacon_stats();
        let budget = u64::from(BEACON_VERIFY_BURST) + r.now.since(start) / BEACON_VERIFY_REFILL_MS;
        prop_assert!(s.verified + s.forged <= budget, "{:?} over budget {}", s, budget);
        prop_assert_eq!(s.received, s.digest_hits + s.skipped + s.verified + s.forged + s.replays + s.reused + s.over_budget);
    }
}

/// A node waiting for a controller (its join retries backed off) joins
/// within a quarter second of the first beacon, and no flood of beacons
/// (which it cannot check before it joins) makes it join much more often
/// than its own retries would (one every 8 s).
#[test]
fn an_unjoined_node_joins_soon_after_a_beacon_and_a_beacon_flood_costs_few_joins() {
    let mut r = Rig::unjoined();
    r.input(NodeInput::LinkUp);
    let mut due = r.node.sync_due().expect("join retry armed");
    // No controller answers: the retries back off to the maximum.
    for _ in 0..6 {
        r.now = due;
        let out = r.input(NodeInput::Timeout);
        assert_eq!(names(&out), vec!["handshake init"]);
        due = r.node.sync_due().unwrap();
    }
    assert!(due.since(r.now) >= 6000, "backed off: {}", due.since(r.now));
    // A beacon from anyone (forged ones too: the node has no key to check).
    let mut joins = 0;
    let start = r.now;
    let mut pulled = Vec::new();
    for i in 0..3000u64 {
        r.now = start.plus(i * 10);
        let b = forger().beacon(1, None);
        let before = r.node.sync_due();
        let out = r.feed(&b);
        assert!(sent(&out).is_empty(), "a beacon itself sends nothing");
        if let Some(at) = r.node.sync_due().filter(|at| Some(*at) != before) {
            assert!(at.since(r.now) < BEACON_JOIN_SPREAD_MS);
            pulled.push(at.since(r.now));
            due = at;
        }
        if r.now >= due {
            let out = r.input(NodeInput::Timeout);
            joins += names(&out)
                .iter()
                .filter(|n| **n == "handshake init")
                .count();
            due = r.node.sync_due().unwrap_or(Time::MAX);
        }
    }
    println!("30 s of beacons every 10 ms: {joins} joins, pulled forward by {pulled:?} ms");
    assert!(!pulled.is_empty(), "the first beacon pulls the join in");
    assert_eq!(pulled.len(), 3, "once every 10 s");
    assert!(joins <= 15, "{joins} joins in 30 s");
}
