//! ControllerMachine: the round against real nodes on a direct, lossless
//! in-memory link, with a filter to drop chosen datagrams.

use super::*;
use crate::crypto::Epoch;
use crate::wire::RoundPhase;
use std::collections::VecDeque;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    Group,
    Node(usize),
    Controller,
}

type Filter = Box<dyn FnMut(Dest, usize, &[u8]) -> bool>;

struct TestFleet {
    c: ControllerMachine,
    cfg: ControllerConfig,
    nodes: Vec<NodeMachine>,
    now: Time,
    rng: ChaCha20Rng,
    /// (destination, sending node or usize::MAX for the controller, bytes)
    queue: VecDeque<(Dest, usize, Vec<u8>)>,
    records: Vec<Record>,
    timers: Vec<(ControllerTimer, Time)>,
    /// Return true to drop a datagram.
    drop: Filter,
    core: Option<Box<ControllerCore>>,
    rows: std::collections::BTreeMap<u32, MemberPersist>,
}

const CTL: usize = usize::MAX;

fn test_cfg() -> ControllerConfig {
    ControllerConfig {
        drain_grace_ms: Some(100),
        retry_initial_ms: 100,
        retry_max_ms: 1000,
        retry_jitter_pct: 25,
        group_attempts: 2,
        stale_after_ms: 5000,
        triggers: TriggerConfig::manual_only(),
        ..ControllerConfig::default()
    }
}

impl TestFleet {
    fn new(n: usize, cfg: ControllerConfig) -> TestFleet {
        let mut rng = rng();
        let mut out = Vec::new();
        let c = ControllerMachine::new(cfg.clone(), Time(0), &mut rng, &mut out);
        let mut f = TestFleet {
            c,
            cfg,
            nodes: Vec::new(),
            now: Time(0),
            rng,
            queue: VecDeque::new(),
            records: Vec::new(),
            timers: Vec::new(),
            drop: Box::new(|_, _, _| false),
            core: None,
            rows: Default::default(),
        };
        f.apply(out);
        for i in 0..n as u32 {
            let id = NodeId::parse(&format!("node-{i}")).unwrap();
            f.ctl(ControllerInput::Enroll {
                node_id: id.clone(),
                initial_key: initial(i),
                addr: node_addr(i),
            })
            .unwrap();
            f.nodes.push(NodeMachine::new(id, &initial(i), node_cfg()));
        }
        f.ctl(ControllerInput::Start).unwrap();
        for i in 0..n {
            f.node(i, NodeInput::LinkUp);
        }
        f.pump();
        assert!(f.nodes.iter().all(|n| n.is_synced()), "all joined");
        f
    }

    fn ctl(&mut self, input: ControllerInput<'_>) -> Result<(), CommandError> {
        let mut out = Vec::new();
        let r = self.c.handle(self.now, input, &mut self.rng, &mut out);
        self.apply(out);
        r
    }

    fn apply(&mut self, out: Vec<ControllerAction>) {
        for a in out {
            match a {
                ControllerAction::SendGroup(b) => self.queue.push_back((Dest::Group, CTL, b)),
                ControllerAction::SendTo { to, bytes } => {
                    let idx = match to {
                        SocketAddr::V4(v) => v.ip().octets()[3] as usize,
                        SocketAddr::V6(_) => continue,
                    };
                    self.queue.push_back((Dest::Node(idx), CTL, bytes));
                }
                ControllerAction::ArmTimer { timer, at } => self.timers.push((timer, at)),
                ControllerAction::PersistCore(c) => self.core = Some(c),
                ControllerAction::PersistMember(m) => {
                    self.rows.insert(m.member, *m);
                }
                ControllerAction::ForgetMember { member } => {
                    self.rows.remove(&member);
                }
                ControllerAction::Record(r) => self.records.push(r),
            }
        }
    }

    fn node(&mut self, i: usize, input: NodeInput<'_>) -> Vec<NodeAction> {
        let mut out = Vec::new();
        self.nodes[i].handle(self.now, input, &mut self.rng, &mut out);
        for a in &out {
            match a {
                NodeAction::SendTo { bytes, .. } => {
                    self.queue.push_back((Dest::Controller, i, bytes.clone()))
                }
                NodeAction::SendGroup { bytes, .. } => {
                    self.queue.push_back((Dest::Group, i, bytes.clone()))
                }
                _ => {}
            }
        }
        out
    }

    /// Deliver everything queued (and what that causes), in order.
    fn pump(&mut self) {
        while let Some((dest, from, bytes)) = self.queue.pop_front() {
            if (self.drop)(dest, from, &bytes) {
                continue;
            }
            let from_addr = if from == CTL {
                ctl_addr()
            } else {
                node_addr(from as u32)
            };
            match dest {
                Dest::Controller => {
                    let _ = self.ctl(ControllerInput::Datagram {
                        from: from_addr,
                        bytes: &bytes,
                    });
                }
                Dest::Node(i) => {
                    if i < self.nodes.len() {
                        self.node(
                            i,
                            NodeInput::Datagram {
                                from: from_addr,
                                bytes: &bytes,
                            },
                        );
                    }
                }
                Dest::Group => {
                    for i in 0..self.nodes.len() {
                        if i != from && !(self.drop)(Dest::Node(i), from, &bytes) {
                            self.node(
                                i,
                                NodeInput::Datagram {
                                    from: from_addr,
                                    bytes: &bytes,
                                },
                            );
                        }
                    }
                    if from != CTL {
                        let _ = self.ctl(ControllerInput::Datagram {
                            from: from_addr,
                            bytes: &bytes,
                        });
                    }
                }
            }
        }
    }

    /// Advance the clock by `ms`, firing controller timers as they come due.
    fn advance(&mut self, ms: u64) {
        let end = self.now.plus(ms);
        loop {
            self.timers.sort_by_key(|t| t.1);
            let Some(pos) = self.timers.iter().position(|t| t.1 <= end) else {
                break;
            };
            let (timer, at) = self.timers.remove(pos);
            self.now = self.now.max(at);
            let _ = self.ctl(ControllerInput::Timer(timer));
            self.pump();
        }
        self.now = end;
    }

    fn phase(&self) -> Option<RoundPhase> {
        self.c.round().map(|r| r.1)
    }

    fn states(&self) -> Vec<NodeState> {
        self.nodes.iter().map(|n| n.state()).collect()
    }

    fn count(&self, f: impl Fn(&Record) -> bool) -> usize {
        self.records.iter().filter(|r| f(r)).count()
    }

    fn finished(&self) -> Vec<(Epoch, u32, u32, u32)> {
        self.records
            .iter()
            .filter_map(|r| match r {
                Record::RoundFinished {
                    epoch,
                    nodes,
                    acked,
                    stale,
                    ..
                } => Some((*epoch, *nodes, *acked, *stale)),
                _ => None,
            })
            .collect()
    }
}

fn is_ack_from(member: u32, step: Step) -> impl Fn(&[u8]) -> bool {
    move |b| matches!(wire::decode(b), Ok(Message::Ack(a)) if a.member == member && a.step == step)
}

const UC2: NodeState = NodeState::UpdateCompleted { current: Epoch(2) };

#[test]
fn a_round_goes_through_its_phases_in_order() {
    let mut f = TestFleet::new(3, test_cfg());
    assert!(f.c.members().all(|m| m.2 == MemberStatus::Active));
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    assert_eq!(
        f.phase(),
        Some(RoundPhase::Draining),
        "key update and first transition done on a lossless link"
    );
    assert!(f
        .states()
        .iter()
        .all(|s| matches!(s, NodeState::InTransit { .. })));
    f.advance(100);
    f.pump();
    assert_eq!(f.phase(), None);
    assert_eq!(f.states(), vec![UC2; 3]);
    let phases: Vec<RoundPhase> = f
        .records
        .iter()
        .filter_map(|r| match r {
            Record::PhaseChanged { phase, .. } => Some(*phase),
            _ => None,
        })
        .collect();
    use RoundPhase::*;
    assert_eq!(
        phases,
        vec![Distributing, FirstTransition, Draining, SecondTransition]
    );
    assert_eq!(f.finished(), vec![(Epoch(2), 3, 3, 0)]);
    assert_eq!(
        f.count(|r| matches!(
            r,
            Record::KeyCreated {
                epoch: Epoch(2),
                reason: TriggerReason::Manual,
                ..
            }
        )),
        1
    );
    assert_eq!(f.count(|r| matches!(r, Record::NodeAcked { .. })), 9);
    assert_eq!(f.c.current_epoch(), Epoch(2));
}

#[test]
fn s1_the_first_transition_waits_for_every_key_update_reply() {
    let mut f = TestFleet::new(3, test_cfg());
    let blocked = is_ack_from(3, Step::KeyUpdate);
    f.drop = Box::new(move |_, _, b| blocked(b));
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(2000);
    assert_eq!(f.phase(), Some(RoundPhase::Distributing));
    assert_eq!(
        f.count(|r| matches!(r, Record::TransitionSent { .. })),
        0,
        "no first transition yet"
    );
    assert!(f
        .states()
        .iter()
        .all(|s| matches!(s, NodeState::DistributionCompleted { .. })));
    f.drop = Box::new(|_, _, _| false);
    f.advance(1500);
    assert_eq!(
        f.phase(),
        None,
        "the round finished once the reply got through"
    );
    let pos = |f: &TestFleet, p: &dyn Fn(&Record) -> bool| f.records.iter().position(p).unwrap();
    let last_key_reply = pos(&f, &|r| {
        matches!(
            r,
            Record::NodeAcked {
                member: 3,
                step: Step::KeyUpdate,
                ..
            }
        )
    });
    let first_transition = pos(&f, &|r| {
        matches!(
            r,
            Record::TransitionSent {
                step: Step::FirstTransition,
                ..
            }
        )
    });
    assert!(last_key_reply < first_transition);
}

#[test]
fn s2_the_second_transition_waits_for_every_first_reply_and_the_drain() {
    let mut f = TestFleet::new(2, test_cfg());
    let blocked = is_ack_from(1, Step::FirstTransition);
    f.drop = Box::new(move |_, _, b| blocked(b));
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(1500);
    assert_eq!(f.phase(), Some(RoundPhase::FirstTransition));
    f.drop = Box::new(|_, _, _| false);
    // The next retry gets the reply through; the drain starts then.
    let before = f.now;
    for _ in 0..40 {
        f.advance(50);
        if f.phase() == Some(RoundPhase::Draining) {
            break;
        }
    }
    assert_eq!(f.phase(), Some(RoundPhase::Draining));
    let drain_start = f.now;
    assert!(drain_start > before);
    f.advance(40);
    assert_eq!(f.phase(), Some(RoundPhase::Draining), "grace not over");
    assert!(
        f.states()
            .iter()
            .all(|s| matches!(s, NodeState::InTransit { .. })),
        "nobody dropped the old key"
    );
    f.advance(100);
    f.pump();
    assert_eq!(f.phase(), None);
    assert_eq!(f.states(), vec![UC2; 2]);
}

#[test]
fn retries_go_to_the_group_first_then_by_unicast_with_backoff() {
    let mut f = TestFleet::new(3, test_cfg());
    // Member 1 (node 0) hears nothing.
    f.drop = Box::new(|d, _, _| d == Dest::Node(0));
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(3000);
    let sends: Vec<(u32, Via, Time)> = f
        .records
        .iter()
        .filter_map(|r| match r {
            Record::KeySent {
                member: 1,
                attempt,
                via,
                at,
                ..
            } => Some((*attempt, *via, *at)),
            _ => None,
        })
        .collect();
    assert!(sends.len() >= 4, "{sends:?}");
    assert_eq!((sends[0].0, sends[0].1), (1, Via::Group));
    assert_eq!((sends[1].0, sends[1].1), (2, Via::Group));
    assert!(sends[2..].iter().all(|s| s.1 == Via::Unicast));
    let gaps: Vec<u64> = sends.windows(2).map(|w| w[1].2.since(w[0].2)).collect();
    assert!(
        gaps[0] >= 75 && gaps[0] <= 125,
        "first retry after 100 ms ± 25 %: {gaps:?}"
    );
    assert!(gaps.last().unwrap() > &gaps[0], "backoff grows: {gaps:?}");
    // Others were not asked again: the second group wave held only member 1.
    assert_eq!(
        f.count(|r| matches!(r, Record::KeySent { member: 2, .. })),
        1
    );
    assert_eq!(
        f.count(|r| matches!(
            r,
            Record::KeyBatchSent {
                attempt: 2,
                entries: 1,
                ..
            }
        )),
        1
    );
}

#[test]
fn a_silent_node_goes_stale_the_round_finishes_and_the_node_catches_up() {
    let mut f = TestFleet::new(3, test_cfg());
    f.drop = Box::new(|d, from, _| d == Dest::Node(0) || from == 0);
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(5000);
    assert_eq!(
        f.count(|r| matches!(
            r,
            Record::NodeStale {
                member: 1,
                phase: RoundPhase::Distributing,
                ..
            }
        )),
        1
    );
    f.advance(1000);
    f.pump();
    assert_eq!(f.phase(), None, "the fleet did not wait forever");
    assert_eq!(f.finished(), vec![(Epoch(2), 3, 2, 1)]);
    assert_eq!(
        f.nodes[0].state(),
        NodeState::UpdateCompleted { current: Epoch(1) }
    );
    // It comes back (SPEC §5): asks for the key and is live again.
    f.drop = Box::new(|_, _, _| false);
    f.node(0, NodeInput::LinkUp);
    f.pump();
    assert_eq!(f.nodes[0].state(), UC2);
    assert!(f.nodes[0].is_synced());
    assert_eq!(
        f.c.member_status(&NodeId::parse("node-0").unwrap()),
        Some(MemberStatus::Active)
    );
    assert_eq!(
        f.count(|r| matches!(
            r,
            Record::StatusChanged {
                member: 1,
                from: MemberStatus::Stale,
                to: MemberStatus::Active,
                ..
            }
        )),
        1
    );
    // Next round includes it again.
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(200);
    f.pump();
    assert_eq!(f.finished().last(), Some(&(Epoch(3), 3, 3, 0)));
}

#[test]
fn a_stale_node_that_reports_usage_is_told_to_resync_and_catches_up() {
    let mut f = TestFleet::new(3, test_cfg());
    // Node 0 hears nothing during the round: stale, and still at epoch 1.
    f.drop = Box::new(|d, _, _| d == Dest::Node(0));
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(6000);
    f.pump();
    assert_eq!(f.finished(), vec![(Epoch(2), 3, 2, 1)]);
    f.drop = Box::new(|_, _, _| false);
    // No link-up: its periodic usage report is what brings it back.
    f.now = f.now.plus(1000);
    f.node(0, NodeInput::Timeout);
    f.pump();
    assert_eq!(f.nodes[0].state(), UC2);
    assert!(f.nodes[0].is_synced());
    assert_eq!(
        f.c.member_status(&NodeId::parse("node-0").unwrap()),
        Some(MemberStatus::Active)
    );
}

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

#[test]
fn bad_node_messages_are_refused_and_recorded() {
    let mut f = TestFleet::new(1, test_cfg());
    let (keys, share) = f.nodes[0].ratchet_view().unwrap();
    let wrong = crate::crypto::Chain::for_tests(7);
    let mut stranger = wire::handshake_init_header(500, &NodeId::parse("stranger").unwrap());
    stranger.extend_from_slice(&[0u8; 48]);
    let before = f.records.len();
    type Check = fn(&Refusal) -> bool;
    let cases: Vec<(Vec<u8>, Check)> = vec![
        (
            wire::mac(wire::ack(Step::KeyUpdate, Epoch(2), 500, 1, &share), &wrong),
            |r| matches!(r, Refusal::BadMac { member: 1, .. }),
        ),
        (
            wire::mac(wire::ack(Step::KeyUpdate, Epoch(2), 500, 9, &share), &keys),
            |r| matches!(r, Refusal::UnknownMember { member: 9, .. }),
        ),
        (stranger, |r| matches!(r, Refusal::UnknownNodeId { .. })),
        (
            wire::sign(
                wire::transition(1, Step::FirstTransition, Epoch(2), 1),
                &ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
            ),
            |r| {
                matches!(
                    r,
                    Refusal::Unexpected {
                        role: "controller",
                        ..
                    }
                )
            },
        ),
        (vec![1, 0x11, 0, 0], |r| matches!(r, Refusal::Malformed(_))),
    ];
    for (bytes, check) in &cases {
        f.ctl(ControllerInput::Datagram {
            from: node_addr(0),
            bytes,
        })
        .unwrap();
        let Some(Record::Refused { reason, .. }) = f.records.last() else {
            panic!("no refusal recorded")
        };
        assert!(check(reason), "{reason:?}");
    }
    // A good ack accepted once, then its replay refused.
    let ack = wire::mac(
        wire::ack(Step::SecondTransition, Epoch(1), 600, 1, &share),
        &keys,
    );
    f.ctl(ControllerInput::Datagram {
        from: node_addr(0),
        bytes: &ack,
    })
    .unwrap();
    f.ctl(ControllerInput::Datagram {
        from: node_addr(0),
        bytes: &ack,
    })
    .unwrap();
    assert!(matches!(
        f.records.last(),
        Some(Record::Refused {
            reason: Refusal::Replay { seq: 600, .. },
            ..
        })
    ));
    assert_eq!(f.records.len() - before, cases.len() + 1);
    assert_eq!(f.phase(), None);
    assert_eq!(f.c.current_epoch(), Epoch(1));
}

#[test]
fn commands_that_cannot_be_carried_out() {
    let mut f = TestFleet::new(1, test_cfg());
    let id = NodeId::parse("node-0").unwrap();
    assert_eq!(
        f.ctl(ControllerInput::Enroll {
            node_id: id.clone(),
            initial_key: initial(0),
            addr: node_addr(0)
        }),
        Err(CommandError::AlreadyEnrolled(id))
    );
    let ghost = NodeId::parse("ghost").unwrap();
    assert_eq!(
        f.ctl(ControllerInput::Remove {
            node_id: ghost.clone()
        }),
        Err(CommandError::NotEnrolled(ghost))
    );
}

#[test]
fn a_restored_controller_resumes_its_round() {
    for phase_at_crash in [
        RoundPhase::Distributing,
        RoundPhase::FirstTransition,
        RoundPhase::SecondTransition,
    ] {
        let mut f = TestFleet::new(3, test_cfg());
        let hold = match phase_at_crash {
            RoundPhase::Distributing => Step::KeyUpdate,
            RoundPhase::FirstTransition => Step::FirstTransition,
            _ => Step::SecondTransition,
        };
        let blocked = is_ack_from(2, hold);
        f.drop = Box::new(move |_, _, b| blocked(b));
        f.ctl(ControllerInput::Rekey).unwrap();
        f.pump();
        f.advance(300);
        assert_eq!(f.phase(), Some(phase_at_crash));
        // Crash: only what was persisted survives.
        let persist = ControllerPersist {
            core: (**f.core.as_ref().unwrap()).clone(),
            members: f.rows.values().cloned().collect(),
        };
        let json = serde_json::to_string(&persist).unwrap();
        let persist: ControllerPersist = serde_json::from_str(&json).unwrap();
        f.c = ControllerMachine::restore(&persist, f.cfg.clone(), f.now).unwrap();
        f.timers.clear();
        f.queue.clear();
        f.drop = Box::new(|_, _, _| false);
        f.ctl(ControllerInput::Start).unwrap();
        assert_eq!(
            f.phase(),
            Some(phase_at_crash),
            "resumes in the persisted phase"
        );
        f.pump();
        f.advance(500);
        f.pump();
        assert_eq!(f.phase(), None, "{phase_at_crash:?}");
        assert_eq!(f.states(), vec![UC2; 3], "{phase_at_crash:?}");
        assert_eq!(f.finished().len(), 1);
    }
}

#[test]
fn records_serialize_as_self_describing_rows() {
    let mut f = TestFleet::new(2, test_cfg());
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(200);
    f.pump();
    let rows: Vec<serde_json::Value> = f
        .records
        .iter()
        .map(|r| serde_json::to_value(r).unwrap())
        .collect();
    let finished = rows
        .iter()
        .find(|v| v["event"] == "round_finished")
        .expect("round_finished row");
    assert_eq!(finished["epoch"], 2);
    assert_eq!(finished["reason"]["trigger"], "manual");
    assert_eq!(finished["acked"], 2);
    assert!(
        finished["check"].is_array() && finished["phases_ms"]["draining"].as_u64().unwrap() >= 100
    );
    let sent = rows
        .iter()
        .find(|v| v["event"] == "key_sent")
        .expect("key_sent row");
    assert_eq!(sent["node_id"], "node-0");
    assert_eq!(sent["via"], "group");
    let created: Vec<_> = rows
        .iter()
        .filter(|v| v["event"] == "key_created")
        .collect();
    assert_eq!(created.len(), 2, "the initial key and the new one");
    // Never key bytes: a created key row carries only its 4-byte check value.
    assert_eq!(created[1].as_object().unwrap().len(), 5, "{}", created[1]);
}

/// A fleet of two held in `phase` (None: no round) because member 2's
/// replies to that phase are dropped; its keys to forge-free craft replies.
fn held_in(phase: Option<RoundPhase>) -> TestFleet {
    let mut f = TestFleet::new(
        2,
        ControllerConfig {
            stale_after_ms: 1_000_000,
            ..test_cfg()
        },
    );
    let Some(phase) = phase else { return f };
    let step = match phase {
        RoundPhase::Distributing => Step::KeyUpdate,
        RoundPhase::FirstTransition => Step::FirstTransition,
        RoundPhase::Draining => Step::FirstTransition,
        RoundPhase::SecondTransition => Step::SecondTransition,
    };
    let blocked = is_ack_from(2, step);
    if phase != RoundPhase::Draining {
        f.drop = Box::new(move |_, _, b| blocked(b));
    }
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    if phase == RoundPhase::SecondTransition {
        f.advance(100);
        f.pump();
    }
    f.drop = Box::new(|_, _, _| true); // from now on the test talks to the controller alone
    assert_eq!(f.phase(), Some(phase));
    f
}

#[derive(Clone, Copy, Debug)]
enum CIn {
    Rekey,
    Reply(Step, u32),
    KeyRequest,
    EarlyTimer,
    Garbage,
}

#[test]
fn every_phase_against_every_input() {
    use RoundPhase::*;
    let mut seq = 50_000u64;
    // (phase, input, phase after, datagrams the controller sends)
    #[rustfmt::skip]
    let table: Vec<(Option<RoundPhase>, CIn, Option<RoundPhase>, usize)> = vec![
        (None, CIn::Rekey, Some(Distributing), 1),
        (None, CIn::Reply(Step::KeyUpdate, 2), None, 0),
        (None, CIn::KeyRequest, None, 1),
        (None, CIn::EarlyTimer, None, 0),
        (None, CIn::Garbage, None, 0),
        (Some(Distributing), CIn::Rekey, Some(Distributing), 0),
        (Some(Distributing), CIn::Reply(Step::KeyUpdate, 2), Some(FirstTransition), 1),
        (Some(Distributing), CIn::Reply(Step::KeyUpdate, 1), Some(Distributing), 0),
        // A key request carries the node's position: it counts as its reply.
        (Some(Distributing), CIn::KeyRequest, Some(FirstTransition), 2),
        (Some(Distributing), CIn::EarlyTimer, Some(Distributing), 0),
        (Some(Distributing), CIn::Garbage, Some(Distributing), 0),
        (Some(FirstTransition), CIn::Reply(Step::KeyUpdate, 2), Some(FirstTransition), 0),
        (Some(FirstTransition), CIn::Reply(Step::FirstTransition, 2), Some(Draining), 0),
        (Some(FirstTransition), CIn::Reply(Step::SecondTransition, 1), Some(FirstTransition), 0),
        (Some(FirstTransition), CIn::KeyRequest, Some(Draining), 1),
        (Some(FirstTransition), CIn::Rekey, Some(FirstTransition), 0),
        (Some(Draining), CIn::Reply(Step::SecondTransition, 2), Some(Draining), 0),
        (Some(Draining), CIn::EarlyTimer, Some(Draining), 0),
        (Some(Draining), CIn::KeyRequest, Some(Draining), 1),
        (Some(SecondTransition), CIn::Reply(Step::FirstTransition, 2), Some(SecondTransition), 0),
        (Some(SecondTransition), CIn::Reply(Step::SecondTransition, 2), None, 0),
        (Some(SecondTransition), CIn::Garbage, Some(SecondTransition), 0),
    ];
    for (phase, input, after, sends) in table {
        let mut f = held_in(phase);
        let label = format!("{phase:?} + {input:?}");
        let records_before = f.records.len();
        f.queue.clear();
        seq += 1;
        let from = node_addr(1);
        let r = match input {
            CIn::Rekey => f.ctl(ControllerInput::Rekey),
            CIn::Reply(step, e) => {
                let (keys, share) = f.nodes[1].ratchet_view().unwrap();
                let b = wire::mac(wire::ack(step, Epoch(e), seq, 2, &share), &keys);
                f.ctl(ControllerInput::Datagram { from, bytes: &b })
            }
            CIn::KeyRequest => {
                let (e, step) = f.nodes[1].position().unwrap();
                let (keys, share) = f.nodes[1].ratchet_view().unwrap();
                let b = wire::mac(wire::key_request(e, step, seq, 2, &share), &keys);
                f.ctl(ControllerInput::Datagram { from, bytes: &b })
            }
            CIn::EarlyTimer => f.ctl(ControllerInput::Timer(ControllerTimer::Round)),
            CIn::Garbage => f.ctl(ControllerInput::Datagram {
                from,
                bytes: &[1, 0x13, 9],
            }),
        };
        assert_eq!(r, Ok(()), "{label}");
        assert_eq!(f.phase(), after, "{label}");
        let unicast = f.queue.iter().filter(|q| q.0 == Dest::Node(1)).count();
        let group = f.queue.iter().filter(|q| q.0 == Dest::Group).count();
        assert_eq!(
            unicast + group,
            sends,
            "{label}: {:?}",
            f.queue
                .iter()
                .map(|q| wire::decode(&q.2).map(|m| m.name()))
                .collect::<Vec<_>>()
        );
        if matches!(input, CIn::Garbage) {
            assert!(
                matches!(f.records.last(), Some(Record::Refused { .. })),
                "{label}"
            );
            assert_eq!(
                f.records.len(),
                records_before + 1,
                "{label}: a refusal and nothing else"
            );
        }
    }
}

// ------------------------------------------------------- enrollment, ratchet

#[test]
fn a_pinned_node_id_gets_no_second_handshake_until_the_operator_allows_it() {
    let mut f = TestFleet::new(2, test_cfg());
    // node-0 lost its state: a fresh machine with only its label.
    let id = NodeId::parse("node-0").unwrap();
    f.nodes[0] = NodeMachine::new(id.clone(), &initial(0), node_cfg());
    f.node(0, NodeInput::LinkUp);
    f.pump();
    assert!(
        matches!(
            f.records.last(),
            Some(Record::Refused {
                reason: Refusal::Pinned { .. },
                ..
            })
        ),
        "{:?}",
        f.records.last()
    );
    assert_eq!(f.nodes[0].state(), NodeState::Unjoined);
    // The operator allows it: one handshake, audited, and node-0 is back.
    f.ctl(ControllerInput::AllowRejoin {
        node_id: id.clone(),
    })
    .unwrap();
    assert_eq!(f.count(|r| matches!(r, Record::RejoinAllowed { .. })), 1);
    f.now = f.now.plus(10_000);
    f.node(0, NodeInput::Timeout);
    f.pump();
    assert!(f.nodes[0].is_synced(), "{:?}", f.nodes[0].state());
    assert_eq!(
        f.count(|r| matches!(r, Record::HandshakeCompleted { rejoin: true, .. })),
        1
    );
    // The window closed with that handshake: another one is refused again.
    f.nodes[0] = NodeMachine::new(id, &initial(0), node_cfg());
    f.now = f.now.plus(10_000);
    f.node(0, NodeInput::LinkUp);
    f.pump();
    assert!(matches!(
        f.records.last(),
        Some(Record::Refused {
            reason: Refusal::Pinned { .. },
            ..
        })
    ));
    // And the rest of the fleet still gets the next key over its ratchet
    // (whether the round may finish without node-0 is the minimum-reply rule's call).
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    for _ in 0..10 {
        f.advance(2000);
        f.pump();
    }
    assert!(
        f.nodes[1].keyring().and_then(|r| r.key(Epoch(2))).is_some(),
        "{:?}",
        f.nodes[1].state()
    );
}

#[test]
fn every_round_moves_each_nodes_chain_and_a_copied_state_heals() {
    use std::cell::RefCell;
    use std::rc::Rc;
    let mut f = TestFleet::new(3, test_cfg());
    let member = f.nodes[0].member().unwrap();
    // Everything the controller sends, as a listener records it.
    let seen: Rc<RefCell<Vec<Vec<u8>>>> = Rc::default();
    let s2 = seen.clone();
    f.drop = Box::new(move |_, from, b| {
        if from == CTL {
            s2.borrow_mut().push(b.to_vec());
        }
        false
    });
    let (copy_chain, copy_secret) = f.nodes[0].ratchet_copy().unwrap();
    let mut views = vec![f.nodes[0].ratchet_view().unwrap()];
    for e in 2..=4u32 {
        f.ctl(ControllerInput::Rekey).unwrap();
        f.pump();
        f.advance(5000);
        f.pump();
        assert_eq!(
            f.nodes[0].state(),
            NodeState::UpdateCompleted { current: Epoch(e) }
        );
        let v = f.nodes[0].ratchet_view().unwrap();
        assert!(
            views.iter().all(|w| w.0 != v.0 && w.1 != v.1),
            "round {e} moved node 0's chain and share"
        );
        views.push(v);
    }
    // Walk what was sent with the copy taken at epoch 1 (chain + share secret).
    let mut chains = vec![copy_chain];
    let mut opened = Vec::new();
    for b in seen.borrow().iter() {
        let offered: Vec<(Epoch, crate::crypto::Share, crate::crypto::WrappedKey)> =
            match wire::decode(b) {
                Ok(Message::KeyUpdate(ku)) => ku
                    .entry_for(member)
                    .map(|w| vec![(ku.epoch, ku.share, w)])
                    .unwrap_or_default(),
                Ok(Message::KeyResponse(r)) if r.member == member => {
                    let mut v = vec![(r.state.current_epoch, r.share, r.state.current)];
                    v.extend(r.state.round.map(|x| (x.epoch, r.share, x.wrapped)));
                    v
                }
                _ => vec![],
            };
        for (epoch, c, w) in offered {
            let Some(dh) = copy_secret.dh(&c) else {
                continue;
            };
            let mut reached = Vec::new();
            for ch in &chains {
                let step = crate::crypto::Step::derive(ch, &dh, member, &c, &copy_secret.public());
                if step.unwrap(&w, epoch, member).is_some() {
                    opened.push(epoch.0);
                    reached.push(step.chain().clone());
                }
            }
            chains.extend(reached);
        }
    }
    opened.sort_unstable();
    opened.dedup();
    assert_eq!(
        opened,
        vec![2],
        "the copy opens the next round's key and nothing after"
    );
}

// ------------------------------------------------ a round that reaches too few nodes

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
    let persist = ControllerPersist {
        core: (**f.core.as_ref().unwrap()).clone(),
        members: f.rows.values().cloned().collect(),
    };
    let json = serde_json::to_string(&persist).unwrap();
    let persist: ControllerPersist = serde_json::from_str(&json).unwrap();
    assert!(persist.core.round.as_ref().unwrap().paused_at.is_some());
    f.c = ControllerMachine::restore(&persist, f.cfg.clone(), f.now).unwrap();
    assert!(f.c.paused_since().is_some());
    f.timers.clear();
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

/// Node `i`'s ratchet chain and share, to build its messages by hand.
fn chain_of(f: &TestFleet, i: usize) -> (crate::crypto::Chain, crate::crypto::Share) {
    f.nodes[i]
        .ratchet_view()
        .expect("the node ran its handshake")
}

#[test]
fn unauthenticated_data_moves_no_replay_state_and_sequence_0_is_fresh() {
    let cfg = ControllerConfig {
        triggers: TriggerConfig {
            on_unknown_sender: true,
            ..TriggerConfig::manual_only()
        },
        node_trigger_min_interval_ms: 0,
        ..test_cfg()
    };
    let mut f = TestFleet::new(2, cfg);
    let member = f.nodes[1].member().unwrap();
    let seal = |f: &TestFleet, seq: u64| {
        let e = f.c.current_epoch();
        let key = f.nodes[0].keyring().unwrap().key(e).unwrap().clone();
        let nonce = [seq as u8; 12];
        let mut b = wire::data_header(member, seq, Some(e), &nonce);
        let body = key.seal(&nonce, &b, b"x");
        b.extend_from_slice(&body);
        b
    };
    // Garbage from the member's own address with a huge number: refused, moves nothing.
    let mut garbage = wire::data_header(member, 1 << 40, Some(Epoch(1)), &[7; 12]);
    garbage.extend_from_slice(&[0u8; 32]);
    f.ctl(ControllerInput::Datagram {
        from: node_addr(1),
        bytes: &garbage,
    })
    .unwrap();
    let thief = SocketAddr::from(([172, 16, 0, 9], 5000));
    for (seq, what) in [
        (1 << 20, "below the garbage's number"),
        (0, "sequence number 0"),
    ] {
        let before = f.count(|r| matches!(r, Record::TriggerFired { .. }));
        let bytes = seal(&f, seq);
        f.ctl(ControllerInput::Datagram {
            from: thief,
            bytes: &bytes,
        })
        .unwrap();
        assert_eq!(
            f.count(|r| matches!(r, Record::TriggerFired { .. })),
            before + 1,
            "{what}: the forgery sets off the leaked-key trigger"
        );
        f.pump();
        f.advance(2000);
    }
}

#[test]
fn a_restarted_controller_refuses_replays_and_only_round_replies_move_an_address() {
    let mut f = TestFleet::new(2, test_cfg());
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(500);
    assert_eq!(f.finished().len(), 1);
    // A reply node 1 sent before the restart, as an attacker overheard it.
    let seen = f.c.snapshot().members[1]
        .seq_seen
        .expect("a number was accepted");
    let (chain, share) = chain_of(&f, 1);
    let old_ack = wire::mac(
        wire::ack(Step::SecondTransition, Epoch(2), seen, 2, &share),
        &chain,
    );
    // Restore from the snapshot (JSON round trip), as after a restart.
    let json = serde_json::to_string(&f.c.snapshot()).unwrap();
    let p: ControllerPersist = serde_json::from_str(&json).unwrap();
    f.c = ControllerMachine::restore(&p, f.cfg.clone(), f.now).unwrap();
    f.ctl(ControllerInput::Start).unwrap();
    let intruder = SocketAddr::from(([172, 16, 0, 9], 5000));
    f.records.clear();
    f.ctl(ControllerInput::Datagram {
        from: intruder,
        bytes: &old_ack,
    })
    .unwrap();
    assert_eq!(
        f.count(|r| matches!(
            r,
            Record::Refused {
                reason: Refusal::Replay { .. },
                ..
            }
        )),
        1,
        "{:?}",
        f.records
    );
    // A fresh key request from elsewhere is answered there and moves nothing.
    let req = wire::mac(
        wire::key_request(Epoch(2), Step::SecondTransition, seen + 10, 2, &share),
        &chain,
    );
    f.ctl(ControllerInput::Datagram {
        from: intruder,
        bytes: &req,
    })
    .unwrap();
    assert_eq!(
        f.count(|r| matches!(r, Record::NodeAddressChanged { .. })),
        0
    );
    assert_eq!(f.c.snapshot().members[1].addr, node_addr(1));
    // A revision-1 row (no seq_seen) still loads.
    let mut v: serde_json::Value = serde_json::to_value(f.c.snapshot()).unwrap();
    for m in v["members"].as_array_mut().unwrap() {
        m.as_object_mut().unwrap().remove("seq_seen");
    }
    let p: ControllerPersist = serde_json::from_value(v).unwrap();
    assert!(p.members.iter().all(|m| m.seq_seen.is_none()));
    ControllerMachine::restore(&p, f.cfg.clone(), f.now).unwrap();
}

#[test]
fn key_requests_beyond_a_members_budget_are_refused_and_node_rounds_are_spaced() {
    let cfg = ControllerConfig {
        triggers: TriggerConfig {
            max_total: Some(10),
            ..TriggerConfig::manual_only()
        },
        ..test_cfg()
    };
    let burst = cfg.member_request_burst;
    let mut f = TestFleet::new(2, cfg);
    f.records.clear();
    let mut seq = 1 << 30;
    let (chain, share) = chain_of(&f, 0);
    for _ in 0..20 {
        seq += 1;
        let req = wire::mac(
            wire::key_request(Epoch(1), Step::SecondTransition, seq, 1, &share),
            &chain,
        );
        f.ctl(ControllerInput::Datagram {
            from: node_addr(0),
            bytes: &req,
        })
        .unwrap();
    }
    let answered = f.count(|r| matches!(r, Record::KeyRequestAnswered { .. }));
    let limited = f.count(|r| {
        matches!(
            r,
            Record::Refused {
                reason: Refusal::RateLimited { .. },
                ..
            }
        )
    });
    // The join and the first key request of each node spent from the same budget.
    assert!(
        answered <= burst as usize && answered + limited == 20,
        "{answered} {limited}"
    );
    assert!(limited >= 20 - burst as usize);
    // Usage reports over the trigger: one round, then the next waits.
    for k in 1..=3u64 {
        seq += 1;
        let uses = [crate::crypto::KeyUse {
            epoch: f.c.current_epoch(),
            seals: 100 * k,
            opens: 0,
        }];
        let rep = wire::mac(
            wire::usage_report(f.c.current_epoch(), seq, 1, &uses),
            &chain_of(&f, 0).0,
        );
        f.ctl(ControllerInput::Datagram {
            from: node_addr(0),
            bytes: &rep,
        })
        .unwrap();
        f.pump();
        f.advance(1000);
    }
    // (Node 0's own replies now look like replays — the test spoke for it with
    // higher numbers — so the round waits; what counts is how many started.)
    let started = f.count(|r| {
        matches!(
            r,
            Record::TriggerFired {
                outcome: TriggerOutcome::Started,
                ..
            }
        )
    });
    assert_eq!(started, 1, "rounds set off by nodes are spaced");
}

// ---------------------------------------------------------------- beacons

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
        ..test_cfg()
    };
    let mut c = ControllerMachine::new(cfg, Time(0), &mut rng, &mut out);
    let mut out = Vec::new();
    c.handle(Time(0), ControllerInput::Start, &mut rng, &mut out)
        .unwrap();
    let first = beacons(&out);
    assert_eq!(first.len(), 1, "a beacon at start");
    assert!(out.iter().any(|a| matches!(
        a,
        ControllerAction::ArmTimer {
            timer: ControllerTimer::Beacon,
            at: Time(1000)
        }
    )));
    let (seq0, e, round, addr) = beacon_of(&first[0]);
    assert_eq!((e, round, addr), (Epoch(1), None, ctl_addr()));
    assert!(crate::crypto::verify(
        &ed25519_dalek::VerifyingKey::from_bytes(&c.public_key()).unwrap(),
        &first[0][..first[0].len() - 64],
        first[0][first[0].len() - 64..].try_into().unwrap()
    ));
    // Early firing: nothing. Due: the same bytes again.
    let mut out = Vec::new();
    c.handle(
        Time(999),
        ControllerInput::Timer(ControllerTimer::Beacon),
        &mut rng,
        &mut out,
    )
    .unwrap();
    assert!(beacons(&out).is_empty());
    c.handle(
        Time(1000),
        ControllerInput::Timer(ControllerTimer::Beacon),
        &mut rng,
        &mut out,
    )
    .unwrap();
    assert_eq!(beacons(&out), first, "unchanged state, unchanged bytes");
    // A round starts: the next beacon tells it, under a higher sequence number.
    let mut out = Vec::new();
    c.handle(Time(1500), ControllerInput::Rekey, &mut rng, &mut out)
        .unwrap();
    c.handle(
        Time(2000),
        ControllerInput::Timer(ControllerTimer::Beacon),
        &mut rng,
        &mut out,
    )
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
    f.c.handle(
        due,
        ControllerInput::Timer(ControllerTimer::Beacon),
        &mut f.rng,
        &mut out,
    )
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

/// Issue 17 under loss: a node resends the same handshake init until it is
/// answered, and the controller answers a retry of an init it answered with
/// the same bytes (no new key agreement, no new chain), at most once per
/// `HANDSHAKE_RESEND_MS`; after `HANDSHAKE_SENDS` sends of one init the node
/// starts a fresh handshake, which gets a new answer.
#[test]
fn handshake_retries_resend_the_same_init_and_get_the_cached_answer() {
    let mut rng = rng();
    let mut out = Vec::new();
    let cfg = test_cfg();
    let mut now = Time(0);
    let mut c = ControllerMachine::new(cfg, now, &mut rng, &mut out);
    let id = NodeId::parse("node-0").unwrap();
    c.handle(
        now,
        ControllerInput::Enroll {
            node_id: id.clone(),
            initial_key: initial(0),
            addr: node_addr(0),
        },
        &mut rng,
        &mut out,
    )
    .unwrap();
    c.handle(now, ControllerInput::Start, &mut rng, &mut out)
        .unwrap();
    let mut node = NodeMachine::new(id, &initial(0), node_cfg());
    let mut nrng = ChaCha20Rng::seed_from_u64(5);
    let mut n_out = Vec::new();
    node.handle(now, NodeInput::LinkUp, &mut nrng, &mut n_out);
    let first = sent(&n_out);
    assert_eq!(first.len(), 1, "one handshake init");
    let ctl_sends = |out: &[ControllerAction]| -> Vec<Vec<u8>> {
        out.iter()
            .filter_map(|a| match a {
                ControllerAction::SendTo { bytes, .. } => Some(bytes.clone()),
                _ => None,
            })
            .collect()
    };
    let refusals = |out: &[ControllerAction]| -> Vec<Refusal> {
        out.iter()
            .filter_map(|a| match a {
                ControllerAction::Record(Record::Refused { reason, .. }) => Some(reason.clone()),
                _ => None,
            })
            .collect()
    };
    let mut to_ctl = |c: &mut ControllerMachine, now: Time, bytes: &[u8]| {
        let mut out = Vec::new();
        let _ = c.handle(
            now,
            ControllerInput::Datagram {
                from: node_addr(0),
                bytes,
            },
            &mut rng,
            &mut out,
        );
        out
    };
    // The first answer is lost; every retry is the same init and gets the same answer.
    let out = to_ctl(&mut c, now, &first[0]);
    let answers = ctl_sends(&out);
    assert_eq!(answers.len(), 1, "{out:?}");
    let chain = c.snapshot().members[0].ratchet.handshake.clone();
    assert!(chain.is_some());
    let mut resent = Vec::new();
    for _ in 1..HANDSHAKE_SENDS {
        now = now.plus(20_000);
        n_out.clear();
        node.handle(now, NodeInput::Timeout, &mut nrng, &mut n_out);
        let again = sent(&n_out);
        assert_eq!(again, first, "a retry resends the same init");
        let out = to_ctl(&mut c, now, &again[0]);
        assert_eq!(ctl_sends(&out), answers, "the cached answer, byte for byte");
        assert!(
            !out.iter()
                .any(|a| matches!(a, ControllerAction::PersistMember(_))),
            "a resend writes nothing"
        );
        // A copy right after: refused without an answer.
        let out = to_ctl(&mut c, now.plus(1), &again[0]);
        assert!(ctl_sends(&out).is_empty());
        assert!(matches!(
            refusals(&out)[..],
            [Refusal::DuplicateRequest { .. }]
        ));
        resent.push(again);
    }
    assert_eq!(
        c.snapshot().members[0].ratchet.handshake,
        chain,
        "no new chain for a retry"
    );
    // The node has sent its init HANDSHAKE_SENDS times: the next retry is a
    // fresh handshake, which gets a new answer (and a new chain).
    now = now.plus(20_000);
    n_out.clear();
    node.handle(now, NodeInput::Timeout, &mut nrng, &mut n_out);
    let fresh = sent(&n_out);
    assert_eq!(fresh.len(), 1);
    assert_ne!(fresh, first, "a fresh init after HANDSHAKE_SENDS sends");
    let out = to_ctl(&mut c, now, &fresh[0]);
    let fresh_answer = ctl_sends(&out);
    assert_eq!(fresh_answer.len(), 1);
    assert_ne!(fresh_answer, answers);
    // The old answer no longer opens anything at the node; the new one joins it.
    n_out.clear();
    node.handle(
        now,
        NodeInput::Datagram {
            from: ctl_addr(),
            bytes: &answers[0],
        },
        &mut nrng,
        &mut n_out,
    );
    assert!(!node.is_synced());
    // A retransmission of the fresh init, delivered late, gets the fresh
    // answer again; its answer and the first copy's both join the node.
    let out = to_ctl(&mut c, now.plus(HANDSHAKE_RESEND_MS), &fresh[0]);
    assert_eq!(ctl_sends(&out), fresh_answer);
    n_out.clear();
    node.handle(
        now,
        NodeInput::Datagram {
            from: ctl_addr(),
            bytes: &fresh_answer[0],
        },
        &mut nrng,
        &mut n_out,
    );
    // It adopts the key, confirms under the new chain and asks once more: the
    // key response completes its sync. Its first message under the chain
    // completed the handshake: the cache is dropped and the node id pinned.
    let mut to_node = Vec::new();
    for _ in 0..4 {
        for b in sent(&n_out) {
            to_node.extend(ctl_sends(&to_ctl(&mut c, now, &b)));
        }
        n_out.clear();
        for b in to_node.drain(..) {
            node.handle(
                now,
                NodeInput::Datagram {
                    from: ctl_addr(),
                    bytes: &b,
                },
                &mut nrng,
                &mut n_out,
            );
        }
    }
    assert!(node.is_synced(), "{:?}", node.state());
    let row = &c.snapshot().members[0];
    assert!(row.ratchet.committed.is_some());
    assert!(row.ratchet.handshake_answer.is_none());
    let out = to_ctl(&mut c, now.plus(1000), &fresh[0]);
    assert!(ctl_sends(&out).is_empty());
    assert!(matches!(refusals(&out)[..], [Refusal::Pinned { .. }]));
}

/// (distributing, first transition, drain) ms of every finished round.
fn phase_ms(f: &TestFleet) -> Vec<(u64, u64, u64)> {
    f.records
        .iter()
        .filter_map(|r| match r {
            Record::RoundFinished { phases_ms: p, .. } => {
                Some((p.distributing, p.first_transition, p.draining))
            }
            _ => None,
        })
        .collect()
}

fn measured_cfg(max_flight_ms: u64) -> ControllerConfig {
    ControllerConfig {
        drain_grace_ms: None,
        drain_rtt_factor: 2,
        drain_floor_ms: 10,
        max_flight_ms,
        ..test_cfg()
    }
}

/// Runs one round with node 1's first-transition reply held back for
/// `hold_ms` (so that the phase's slowest round trip is about that long).
fn round_with_slow_reply(cfg: ControllerConfig, hold_ms: u64) -> TestFleet {
    let mut f = TestFleet::new(3, cfg);
    let blocked = is_ack_from(1, Step::FirstTransition);
    if hold_ms > 0 {
        f.drop = Box::new(move |_, _, b| blocked(b));
    }
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(hold_ms);
    f.drop = Box::new(|_, _, _| false);
    for _ in 0..400 {
        f.advance(10);
        if f.phase().is_none() {
            break;
        }
    }
    assert_eq!(f.finished().len(), 1, "the round finished");
    assert_eq!(f.states(), vec![UC2; 3]);
    f
}

/// S2 with a measured drain: twice the slowest acknowledgement round trip
/// of the round, at least the floor, at most the ceiling; the second
/// transition request never goes out before it.
#[test]
fn the_drain_is_twice_the_slowest_round_trip_between_floor_and_ceiling() {
    // Instant replies: the floor.
    let f = round_with_slow_reply(measured_cfg(2000), 0);
    assert_eq!(phase_ms(&f), vec![(0, 0, 10)]);
    // A reply that came after retries for 300 ms: the phase took that long.
    let f = round_with_slow_reply(measured_cfg(2000), 300);
    let [(d, first, drain)] = phase_ms(&f)[..] else {
        panic!("{:?}", phase_ms(&f))
    };
    println!("slow reply: distributing {d} ms, first transition {first} ms, drain {drain} ms");
    assert!(first >= 300, "{first}");
    assert!(
        drain >= 2 * first && drain <= 2 * first + 10,
        "drain {drain} after a first transition of {first} ms"
    );
    // The ceiling caps it.
    let f = round_with_slow_reply(measured_cfg(150), 300);
    assert_eq!(phase_ms(&f)[0].2, 150);
    // A fixed grace is used as it is.
    let f = round_with_slow_reply(test_cfg(), 300);
    assert_eq!(phase_ms(&f)[0].2, 100);
}

/// A controller restored in the middle of a round cannot tell which
/// replies answer its own requests: it waits the ceiling.
#[test]
fn a_restored_round_drains_for_the_longest_flight_time() {
    let mut f = TestFleet::new(3, measured_cfg(700));
    let blocked = is_ack_from(2, Step::FirstTransition);
    f.drop = Box::new(move |_, _, b| blocked(b));
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(30);
    assert_eq!(f.phase(), Some(RoundPhase::FirstTransition));
    let persist = ControllerPersist {
        core: (**f.core.as_ref().unwrap()).clone(),
        members: f.rows.values().cloned().collect(),
    };
    f.c = ControllerMachine::restore(&persist, f.cfg.clone(), f.now).unwrap();
    f.timers.clear();
    f.queue.clear();
    f.drop = Box::new(|_, _, _| false);
    f.ctl(ControllerInput::Start).unwrap();
    f.pump();
    f.advance(2000);
    assert_eq!(f.phase(), None);
    assert_eq!(phase_ms(&f)[0].2, 700, "{:?}", phase_ms(&f));
}

/// The leader term of every controller message in `out` that carries one.
fn terms(bytes: &[u8]) -> Option<u32> {
    match wire::decode(bytes).ok()? {
        Message::KeyUpdate(k) => Some(k.term),
        Message::Transition(t) => Some(t.term),
        Message::KeyResponse(k) => Some(k.term),
        Message::Resync(r) => Some(r.term),
        Message::Beacon(b) => Some(b.term),
        _ => None,
    }
}

/// Issue 16: a standby restored from the shared state takes over a round in
/// each phase under term 2 and finishes it; from then on the deposed leader
/// (term 1) moves no node, whatever it sends; a live machine given a higher
/// term mid-phase sends nothing of the old term after it.
#[test]
fn a_leader_of_a_higher_term_finishes_the_round_and_the_deposed_one_moves_nobody() {
    for phase_at_takeover in [
        RoundPhase::Distributing,
        RoundPhase::FirstTransition,
        RoundPhase::SecondTransition,
    ] {
        let mut f = TestFleet::new(3, test_cfg());
        let hold = match phase_at_takeover {
            RoundPhase::Distributing => Step::KeyUpdate,
            RoundPhase::FirstTransition => Step::FirstTransition,
            _ => Step::SecondTransition,
        };
        let blocked = is_ack_from(2, hold);
        f.drop = Box::new(move |_, _, b| blocked(b));
        f.ctl(ControllerInput::Rekey).unwrap();
        f.pump();
        f.advance(300);
        assert_eq!(f.phase(), Some(phase_at_takeover));
        assert_eq!(f.c.term(), TERM);
        let persist = ControllerPersist {
            core: (**f.core.as_ref().unwrap()).clone(),
            members: f.rows.values().cloned().collect(),
        };
        let mut deposed = f.c.clone();
        f.c = ControllerMachine::restore(&persist, f.cfg.clone(), f.now).unwrap();
        let mut out = Vec::new();
        f.c.set_term(2, &mut out);
        f.apply(out);
        f.timers.clear();
        f.queue.clear();
        f.drop = Box::new(|_, _, b| terms(b).is_some_and(|t| t != 2));
        f.ctl(ControllerInput::Start).unwrap();
        let sent_terms: Vec<_> = f.queue.iter().filter_map(|(_, _, b)| terms(b)).collect();
        assert!(
            !sent_terms.is_empty() && sent_terms.iter().all(|t| *t == 2),
            "{phase_at_takeover:?}: {sent_terms:?}"
        );
        f.pump();
        f.advance(2_000);
        f.pump();
        assert_eq!(f.phase(), None, "{phase_at_takeover:?}");
        assert_eq!(f.states(), vec![UC2; 3], "{phase_at_takeover:?}");
        assert!(f.nodes.iter().all(|n| n.term() == 2));

        // The deposed leader wakes up: a rekey, its timers, its beacon. All it
        // sends is refused as stale_term and no node moves.
        let before = f.states();
        let mut out = Vec::new();
        let _ = deposed.handle(f.now, ControllerInput::Rekey, &mut f.rng, &mut out);
        for t in [
            ControllerTimer::Round,
            ControllerTimer::Beacon,
            ControllerTimer::Round,
        ] {
            let _ = deposed.handle(
                f.now.plus(5_000),
                ControllerInput::Timer(t),
                &mut f.rng,
                &mut out,
            );
        }
        let mut refused = 0;
        let mut stale = 0;
        for a in out {
            let bytes = match a {
                ControllerAction::SendGroup(b) | ControllerAction::SendTo { bytes: b, .. } => b,
                _ => continue,
            };
            assert_eq!(terms(&bytes), Some(1));
            for i in 0..f.nodes.len() {
                let got = f.node(
                    i,
                    NodeInput::Datagram {
                        from: ctl_addr(),
                        bytes: &bytes,
                    },
                );
                if let Some(r) = refusal(&got) {
                    refused += 1;
                    stale += usize::from(r.kind() == "stale_term");
                }
                assert!(sent(&got).is_empty(), "{got:?}");
            }
        }
        f.queue.clear();
        assert!(
            refused > 0 && refused == stale,
            "{refused} refused, {stale} stale_term"
        );
        assert_eq!(f.states(), before, "{phase_at_takeover:?}");
    }

    // A live machine given a higher term mid-phase: its resends carry it.
    let mut f = TestFleet::new(3, test_cfg());
    let blocked = is_ack_from(2, Step::FirstTransition);
    f.drop = Box::new(move |_, _, b| blocked(b));
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(300);
    assert_eq!(f.phase(), Some(RoundPhase::FirstTransition));
    let mut out = Vec::new();
    f.c.set_term(5, &mut out);
    f.apply(out);
    f.drop = Box::new(|_, _, b| terms(b).is_some_and(|t| t != 5));
    f.advance(2_000);
    f.pump();
    assert_eq!(f.phase(), None);
    assert_eq!(f.states(), vec![UC2; 3]);
    assert!(f.nodes.iter().all(|n| n.term() == 5));
}
