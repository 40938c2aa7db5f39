//! Triggers: a rekey queued behind a round, usage counts, key age, removal,
//! data from an unknown sender.

use super::*;

#[test]
fn a_rekey_during_a_round_is_queued_and_runs_next() {
    let mut f = TestFleet::new(2, test_cfg());
    f.ctl(ControllerInput::Rekey).unwrap();
    f.ctl(ControllerInput::Rekey).unwrap();
    f.ctl(ControllerInput::Rekey).unwrap();
    let outcomes: Vec<TriggerOutcome> = f
        .records
        .iter()
        .filter_map(|r| match r {
            Record::TriggerFired { outcome, .. } => Some(*outcome),
            _ => None,
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![
            TriggerOutcome::Started,
            TriggerOutcome::Queued,
            TriggerOutcome::AlreadyQueued
        ]
    );
    f.pump();
    f.advance(200);
    f.pump();
    f.advance(200);
    f.pump();
    assert_eq!(f.finished().len(), 2);
    assert_eq!(
        f.states(),
        vec![NodeState::UpdateCompleted { current: Epoch(3) }; 2]
    );
}

#[test]
fn usage_reports_fire_the_count_trigger() {
    let cfg = ControllerConfig {
        triggers: TriggerConfig {
            max_encryptions: Some(3),
            ..TriggerConfig::manual_only()
        },
        ..test_cfg()
    };
    let mut f = TestFleet::new(2, cfg);
    for _ in 0..2 {
        f.node(0, NodeInput::Send(b"a"));
        f.node(1, NodeInput::Send(b"b"));
    }
    f.pump();
    f.now = f.now.plus(1000);
    f.node(0, NodeInput::Timeout);
    f.pump();
    assert_eq!(f.phase(), None, "2 encryptions are not more than 3");
    f.node(1, NodeInput::Timeout);
    // A duplicate report must not count twice.
    f.pump();
    let fired: Vec<_> = f
        .records
        .iter()
        .filter_map(|r| match r {
            Record::TriggerFired { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        fired,
        vec![TriggerReason::Encryptions { count: 4, limit: 3 }]
    );
    assert!(f.phase().is_some());
}

#[test]
fn key_age_trigger_and_switches() {
    let cfg = ControllerConfig {
        triggers: TriggerConfig {
            max_key_age_ms: Some(10_000),
            manual: false,
            ..TriggerConfig::manual_only()
        },
        ..test_cfg()
    };
    let mut f = TestFleet::new(1, cfg);
    assert_eq!(
        f.ctl(ControllerInput::Rekey),
        Err(CommandError::ManualRekeyOff)
    );
    f.advance(9_000);
    assert_eq!(f.phase(), None);
    f.advance(2_000);
    assert!(
        f.count(|r| matches!(
            r,
            Record::TriggerFired {
                reason: TriggerReason::KeyAge { .. },
                ..
            }
        )) == 1
    );
}

#[test]
fn removing_a_node_rekeys_without_it() {
    let cfg = ControllerConfig {
        triggers: TriggerConfig {
            on_node_removed: true,
            ..TriggerConfig::manual_only()
        },
        ..test_cfg()
    };
    let mut f = TestFleet::new(3, cfg);
    f.ctl(ControllerInput::Remove {
        node_id: NodeId::parse("node-2").unwrap(),
    })
    .unwrap();
    assert!(
        f.count(|r| matches!(
            r,
            Record::TriggerFired {
                reason: TriggerReason::NodeRemoved { .. },
                ..
            }
        )) == 1
    );
    // No key update entry is addressed to the removed member 3.
    let entries: Vec<u32> = f
        .queue
        .iter()
        .filter_map(|(_, _, b)| match wire::decode(b) {
            Ok(Message::KeyUpdate(k)) => Some(k.entries().map(|e| e.0).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(entries, vec![1, 2]);
    f.pump();
    f.advance(200);
    f.pump();
    assert_eq!(f.states()[..2], [UC2, UC2]);
    assert_eq!(
        f.states()[2],
        NodeState::UpdateCompleted { current: Epoch(1) },
        "it never got epoch 2"
    );
    assert_eq!(
        f.ctl(ControllerInput::Remove {
            node_id: NodeId::parse("node-2").unwrap()
        }),
        Err(CommandError::NotEnrolled(NodeId::parse("node-2").unwrap()))
    );
    assert_eq!(f.rows.len(), 2, "its row was deleted");
}

#[test]
fn data_from_an_unknown_sender_means_the_key_leaked() {
    let cfg = ControllerConfig {
        triggers: TriggerConfig {
            on_unknown_sender: true,
            ..TriggerConfig::manual_only()
        },
        ..test_cfg()
    };
    let mut f = TestFleet::new(2, cfg);
    let out = f.node(0, NodeInput::Send(b"hello"));
    f.queue.clear();
    let NodeAction::SendGroup { bytes, .. } = out
        .into_iter()
        .find(|a| matches!(a, NodeAction::SendGroup { .. }))
        .unwrap()
    else {
        unreachable!()
    };
    // From its enrolled address: fine.
    f.ctl(ControllerInput::Datagram {
        from: node_addr(0),
        bytes: &bytes,
    })
    .unwrap();
    assert_eq!(f.phase(), None);
    // The same message replayed from another address is a replay, not a leak.
    let intruder = SocketAddr::from(([172, 16, 0, 9], 5000));
    f.ctl(ControllerInput::Datagram {
        from: intruder,
        bytes: &bytes,
    })
    .unwrap();
    assert_eq!(f.phase(), None, "a replayed message is no leak");
    // The same group key used from another address for a new message: presumed leaked.
    let out = f.node(0, NodeInput::Send(b"hello again"));
    f.queue.clear();
    let Some(NodeAction::SendGroup { bytes: leaked, .. }) = out
        .into_iter()
        .find(|a| matches!(a, NodeAction::SendGroup { .. }))
    else {
        unreachable!()
    };
    f.ctl(ControllerInput::Datagram {
        from: intruder,
        bytes: &leaked,
    })
    .unwrap();
    assert!(
        f.count(|r| matches!(
            r,
            Record::TriggerFired {
                reason: TriggerReason::UnknownSender { member: 1, .. },
                outcome: TriggerOutcome::Started,
                ..
            }
        )) == 1
    );
    // Noise that no key opens is only refused.
    let mut forged = bytes.clone();
    let n = forged.len();
    forged[n - 1] ^= 1;
    f.ctl(ControllerInput::Datagram {
        from: intruder,
        bytes: &forged,
    })
    .unwrap();
    assert_eq!(
        f.count(|r| matches!(
            r,
            Record::Refused {
                reason: Refusal::ForgedData { .. },
                ..
            }
        )),
        1
    );
}
