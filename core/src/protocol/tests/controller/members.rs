//! The member table: commands, the records they write, re-joins and each
//! member's ratchet.

use super::*;

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

/// Every command answers what it came to (issue 14.4): the shell reports
/// it without looking through the actions.
#[test]
fn each_command_answers_its_outcome() {
    let mut f = TestFleet::new(2, test_cfg());
    let e0 = f.c.current_epoch();
    let id = NodeId::parse("late").unwrap();
    assert_eq!(
        f.ctl(ControllerInput::Enroll {
            node_id: id.clone(),
            initial_key: initial(9),
            addr: node_addr(9)
        }),
        Ok(Outcome::Enrolled {
            member: 3,
            fingerprint: initial(9).fingerprint()
        })
    );
    // A rekey starts the round of the next epoch; a second one while it runs
    // is answered by the round queued behind it, and so is a third, folded
    // into that one.
    assert_eq!(
        f.ctl(ControllerInput::Rekey),
        Ok(Outcome::Round {
            answered_by: Some(Epoch(e0.0 + 1))
        })
    );
    assert_eq!(
        f.ctl(ControllerInput::Rekey),
        Ok(Outcome::Round {
            answered_by: Some(Epoch(e0.0 + 2))
        })
    );
    assert_eq!(
        f.ctl(ControllerInput::Rekey),
        Ok(Outcome::Round {
            answered_by: Some(Epoch(e0.0 + 2))
        })
    );
    // A removal with `triggers.on_node_removed` off starts no round.
    let mut cfg = test_cfg();
    cfg.triggers.on_node_removed = false;
    let mut g = TestFleet::new(2, cfg);
    assert_eq!(
        g.ctl(ControllerInput::Remove {
            node_id: NodeId::parse("node-1").unwrap()
        }),
        Ok(Outcome::Round { answered_by: None })
    );
    assert_eq!(
        f.ctl(ControllerInput::AllowRejoin {
            node_id: id.clone()
        }),
        Ok(Outcome::RejoinAllowed {
            until: f.now.plus(REJOIN_WINDOW_MS)
        })
    );
    // Not commands: datagrams and timers are done.
    assert_eq!(
        f.ctl(ControllerInput::Datagram {
            from: node_addr(0),
            bytes: &[1, 0x13, 9]
        }),
        Ok(Outcome::Done)
    );
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
