//! A round that reaches too few nodes: paused, never completed short, resumed.

use super::*;

/// Drops everything the controller sends and everything sent to it: the
/// controller's own link is down.
fn isolated() -> Filter {
    Box::new(|d, from, _| from == CTL || d == Dest::Controller || d == Dest::Group)
}

fn paused(f: &TestFleet) -> Vec<(u32, u32, Vec<String>)> {
    f.records
        .iter()
        .filter_map(|r| match r {
            Record::RoundPaused {
                confirmed,
                needed,
                silent,
                ..
            } => Some((
                *confirmed,
                *needed,
                silent.iter().map(|n| n.to_string()).collect(),
            )),
            _ => None,
        })
        .collect()
}

fn key_sends(f: &TestFleet) -> usize {
    f.count(|r| matches!(r, Record::KeySent { .. }))
}

#[test]
fn a_controller_that_hears_no_node_marks_none_stale_pauses_and_completes_when_they_answer() {
    let mut f = TestFleet::new(3, test_cfg());
    f.drop = isolated();
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(5_000);
    assert_eq!(
        paused(&f),
        vec![(
            0,
            2,
            vec!["node-0".into(), "node-1".into(), "node-2".into()]
        )]
    );
    // Long after the stale deadline: nobody stale, the old key current, still retrying.
    let sends = key_sends(&f);
    f.advance(120_000);
    assert_eq!(f.count(|r| matches!(r, Record::NodeStale { .. })), 0);
    assert_eq!(f.count(|r| matches!(r, Record::RoundFinished { .. })), 0);
    assert_eq!(f.c.current_epoch(), Epoch(1));
    assert_eq!(f.phase(), Some(RoundPhase::Distributing));
    assert!(f.c.paused_since().is_some());
    assert!(
        key_sends(&f) >= sends + 3 * 100,
        "retries go on while paused"
    );
    assert_eq!(paused(&f).len(), 1, "one pause, not one per deadline");
    assert!(f.c.members().all(|m| m.2 == MemberStatus::Active));
    // The link returns: the next retries reach the nodes, the round completes.
    f.drop = Box::new(|_, _, _| false);
    f.advance(2_000);
    f.pump();
    assert_eq!(f.phase(), None);
    assert_eq!(f.finished(), vec![(Epoch(2), 3, 3, 0)]);
    assert_eq!(f.c.current_epoch(), Epoch(2));
    assert_eq!(f.states(), vec![UC2; 3]);
    assert_eq!(
        f.count(|r| matches!(
            r,
            Record::RoundResumed {
                cause: ResumeCause::Answer { .. },
                ..
            }
        )),
        1
    );
    assert!(f.records.iter().any(|r| matches!(
        r,
        Record::RoundFinished {
            pauses: 1,
            stale_nodes,
            not_joined,
            enrolled: 3,
            ..
        } if stale_nodes.is_empty() && not_joined.is_empty()
    )));
}

#[test]
fn fewer_than_a_majority_pauses_the_round_instead_of_leaving_the_rest_stale() {
    let mut f = TestFleet::new(5, test_cfg());
    // Three of five (members 1-3, node-0..node-2) hear nothing.
    f.drop =
        Box::new(|d, from, _| matches!(d, Dest::Node(i) if i < 3) || (from < 3 && from != CTL));
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(10_000);
    assert_eq!(
        paused(&f),
        vec![(
            2,
            3,
            vec!["node-0".into(), "node-1".into(), "node-2".into()]
        )]
    );
    assert_eq!(f.count(|r| matches!(r, Record::NodeStale { .. })), 0);
    assert_eq!(f.c.current_epoch(), Epoch(1));
    // node-0 answers again: three of five, enough; the stale clock restarts.
    f.drop = Box::new(|d, from, _| {
        matches!(d, Dest::Node(i) if (1..3).contains(&i)) || (1..3).contains(&from)
    });
    f.advance(1_500);
    assert!(f.c.paused_since().is_none(), "an answer resumed it");
    assert_eq!(f.count(|r| matches!(r, Record::NodeStale { .. })), 0);
    f.advance(6_000);
    f.pump();
    assert_eq!(f.count(|r| matches!(r, Record::NodeStale { .. })), 2);
    assert_eq!(f.finished(), vec![(Epoch(2), 5, 3, 2)]);
}

#[test]
fn earlier_stale_nodes_count_against_the_majority_and_a_returning_one_completes_it() {
    let mut f = TestFleet::new(3, test_cfg());
    // Round 2 leaves node-0 stale (two of three answered).
    f.drop = Box::new(|d, from, _| d == Dest::Node(0) || from == 0);
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(6_000);
    f.pump();
    assert_eq!(f.finished(), vec![(Epoch(2), 3, 2, 1)]);
    // Round 3: node-1 is silent too. Only node-2 confirms: 1 of 3, 2 needed.
    f.drop = Box::new(|d, from, _| matches!(d, Dest::Node(0 | 1)) || from == 0 || from == 1);
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(6_000);
    assert_eq!(paused(&f).len(), 1, "{:?}", paused(&f));
    assert_eq!(paused(&f)[0].0, 1);
    assert_eq!(f.finished().len(), 1);
    // node-1 answers: two of three; done.
    f.drop = Box::new(|d, from, _| d == Dest::Node(0) || from == 0);
    f.advance(3_000);
    f.pump();
    assert_eq!(f.finished().last(), Some(&(Epoch(3), 3, 2, 1)));
}

#[test]
fn the_minimum_is_configurable_and_majority_can_be_switched_off() {
    let cfg = ControllerConfig {
        min_acked_majority: false,
        ..test_cfg()
    };
    let mut f = TestFleet::new(3, cfg);
    f.drop = Box::new(|d, from, _| matches!(d, Dest::Node(0 | 1)) || from == 0 || from == 1);
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(6_000);
    f.pump();
    assert_eq!(f.finished(), vec![(Epoch(2), 3, 1, 2)], "one is enough");
    assert!(paused(&f).is_empty());

    let cfg = ControllerConfig {
        min_acked: 3,
        ..test_cfg()
    };
    let mut f = TestFleet::new(3, cfg);
    f.drop = Box::new(|d, from, _| d == Dest::Node(0) || from == 0);
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(6_000);
    assert_eq!(paused(&f), vec![(2, 3, vec!["node-0".into()])]);
    // min_acked above the fleet counts as every joined node.
    let cfg = ControllerConfig {
        min_acked: 10,
        ..test_cfg()
    };
    let mut f = TestFleet::new(2, cfg);
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(200);
    f.pump();
    assert_eq!(f.finished(), vec![(Epoch(2), 2, 2, 0)]);
}

#[test]
fn a_rekey_during_a_pause_retries_at_once_and_a_restart_resumes_it() {
    let mut f = TestFleet::new(3, test_cfg());
    f.drop = isolated();
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(5_500);
    assert!(f.c.paused_since().is_some());
    let batches = f.count(|r| matches!(r, Record::KeyBatchSent { .. }));
    f.ctl(ControllerInput::Rekey).unwrap();
    assert!(f.c.paused_since().is_none());
    assert_eq!(
        f.count(|r| matches!(r, Record::KeyBatchSent { .. })),
        batches + 1,
        "a fresh group wave at once"
    );
    assert_eq!(
        f.count(|r| matches!(
            r,
            Record::RoundResumed {
                cause: ResumeCause::Rekey,
                ..
            }
        )),
        1
    );
    assert_eq!(
        f.count(|r| matches!(
            r,
            Record::TriggerFired {
                outcome: TriggerOutcome::Queued,
                ..
            }
        )),
        1
    );
    // Still nobody: paused again after another stale period, nobody stale.
    f.advance(5_500);
    assert_eq!(paused(&f).len(), 2);
    // A restart keeps the pause in the snapshot and resumes it on Start.
    let persist = f.persisted();
    let json = serde_json::to_string(&persist).unwrap();
    let persist: ControllerPersist = serde_json::from_str(&json).unwrap();
    assert!(persist.core.round.as_ref().unwrap().paused_at.is_some());
    f.c = ControllerMachine::restore(&persist, f.cfg.clone(), f.now).unwrap();
    assert!(f.c.paused_since().is_some());
    f.queue.clear();
    f.drop = Box::new(|_, _, _| false);
    f.ctl(ControllerInput::Start).unwrap();
    assert_eq!(
        f.count(|r| matches!(
            r,
            Record::RoundResumed {
                cause: ResumeCause::Restart,
                ..
            }
        )),
        1
    );
    f.pump();
    f.advance(500);
    f.pump();
    // Round 2 completes, then the queued round 3.
    assert_eq!(f.finished(), vec![(Epoch(2), 3, 3, 0), (Epoch(3), 3, 3, 0)]);
    assert_eq!(f.count(|r| matches!(r, Record::NodeStale { .. })), 0);
}

#[test]
fn a_revision_1_round_snapshot_loads_without_the_pause_fields() {
    let mut f = TestFleet::new(2, test_cfg());
    f.drop = isolated();
    f.ctl(ControllerInput::Rekey).unwrap();
    let mut v = serde_json::to_value((**f.core.as_ref().unwrap()).clone()).unwrap();
    let round = v["round"].as_object_mut().unwrap();
    assert!(round.remove("paused_at").is_some() && round.remove("pauses").is_some());
    let core: ControllerCore = serde_json::from_value(v).unwrap();
    let r = core.round.as_ref().unwrap();
    assert_eq!((r.paused_at, r.pauses), (None, 0));
}

mod quorum_props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
            ..ProptestConfig::default()
        })]

        /// Whatever the fleet size, the silent nodes, the minimum and the
        /// majority switch: no round completes with fewer confirmations than
        /// needed, a controller that hears nobody marks nobody stale, a
        /// paused round keeps the old key current, and once the network
        /// heals the round completes.
        #[test]
        fn no_round_completes_without_the_confirmations_it_needs(
            n in 1usize..7,
            silent_mask in any::<u8>(),
            isolated_ctl in any::<bool>(),
            min_acked in 0u32..5,
            majority in any::<bool>(),
            cut_phase in 0u8..3,
        ) {
            let cfg = ControllerConfig { min_acked, min_acked_majority: majority, ..test_cfg() };
            let mut f = TestFleet::new(n, cfg);
            let joined = n as u32;
            let needed = {
                let mut k = min_acked;
                if majority { k = k.max(joined / 2 + 1); }
                k.min(joined)
            };
            f.ctl(ControllerInput::Rekey).unwrap();
            // The cut comes at the start of the round, in its first transition
            // or in its second (the acknowledgements of that step held back).
            let held = match cut_phase {
                0 => None,
                1 => Some(Step::FirstTransition),
                _ => Some(Step::SecondTransition),
            };
            if let Some(step) = held {
                f.drop = Box::new(move |_, _, b| {
                    matches!(wire::decode(b), Ok(Message::Ack(a)) if a.step == step)
                });
                f.pump();
                f.advance(200);
            }
            let silent = move |i: usize| isolated_ctl || silent_mask & (1 << i) != 0;
            f.drop = Box::new(move |d, from, _| {
                (isolated_ctl && (from == CTL || d == Dest::Controller || d == Dest::Group))
                    || matches!(d, Dest::Node(i) if silent(i))
                    || (from != CTL && silent(from))
            });
            f.pump();
            for _ in 0..40 {
                f.advance(1_000);
                if f.c.paused_since().is_some() {
                    prop_assert_eq!(f.c.current_epoch(), Epoch(1), "paused yet the new key is current");
                }
            }
            let silent_all = (0..n).all(silent);
            if silent_all && f.finished().is_empty() {
                prop_assert_eq!(f.count(|r| matches!(r, Record::NodeStale { .. })), 0,
                    "nobody answered, yet nodes were marked stale");
            }
            // Heal.
            f.drop = Box::new(|_, _, _| false);
            for i in 0..n { f.node(i, NodeInput::LinkUp); }
            f.pump();
            f.advance(30_000);
            f.pump();
            for r in &f.records {
                if let Record::RoundFinished { acked, nodes, .. } = r {
                    prop_assert!(*acked >= needed.min(*nodes), "completed with {} of {} needed", acked, needed);
                }
            }
            prop_assert_eq!(f.phase(), None, "the round completes once the network heals");
            prop_assert_eq!(f.c.current_epoch(), Epoch(2));
        }
    }
}

#[test]
fn removing_the_silent_nodes_of_a_paused_round_lets_it_complete() {
    let cfg = ControllerConfig {
        triggers: TriggerConfig {
            on_node_removed: false,
            ..TriggerConfig::manual_only()
        },
        ..test_cfg()
    };
    let mut f = TestFleet::new(3, cfg);
    // node-0 and node-1 are gone for good: 1 of 3 confirmed, 2 needed.
    f.drop = Box::new(|d, from, _| matches!(d, Dest::Node(0 | 1)) || from == 0 || from == 1);
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(6_000);
    assert_eq!(paused(&f).len(), 1);
    f.ctl(ControllerInput::Remove {
        node_id: NodeId::parse("node-0").unwrap(),
    })
    .unwrap();
    // Judged again: node-1 gets a fresh stale deadline, and 1 of 2 is still too few.
    assert!(f.c.paused_since().is_none());
    f.advance(6_000);
    assert_eq!(paused(&f).len(), 2);
    assert_eq!(f.count(|r| matches!(r, Record::NodeStale { .. })), 0);
    f.ctl(ControllerInput::Remove {
        node_id: NodeId::parse("node-1").unwrap(),
    })
    .unwrap();
    f.pump();
    f.advance(500);
    f.pump();
    assert_eq!(f.finished(), vec![(Epoch(2), 1, 1, 0)]);
    assert_eq!(f.count(|r| matches!(r, Record::NodeStale { .. })), 0);
}
