//! Where a node sends what it has for the controller (issue 11.2): the group
//! until it learns the controller's unicast address from an authenticated
//! controller message, then that address, the group as a fallback; nothing
//! an outsider or a replayer sends moves it.

use super::*;

fn group() -> SocketAddr {
    SocketAddr::from(([239, 255, 77, 77], 7777))
}

fn attacker() -> SocketAddr {
    SocketAddr::from(([10, 9, 9, 9], 47800))
}

/// Where each node message in `out` goes: (kind, destination).
fn dests(out: &[NodeAction]) -> Vec<(&'static str, SocketAddr)> {
    out.iter()
        .filter_map(|a| match a {
            NodeAction::SendTo { to, bytes } => wire::decode(bytes).ok().map(|m| match m {
                Message::Ack(_) => ("ack", *to),
                m => (m.name(), *to),
            }),
            _ => None,
        })
        .collect()
}

/// A node configured as the agent is by default (`controller` = the group).
fn on_group() -> Rig {
    let cfg = NodeConfig {
        controller: group(),
        ..node_cfg()
    };
    Rig {
        node: NodeMachine::new(NodeId::parse("node-0").unwrap(), &initial(0), cfg),
        ctl: FakeController::new(0),
        rng: rng(),
        now: Time(1000),
    }
}

impl Rig {
    fn feed_from(&mut self, from: SocketAddr, bytes: &[u8]) -> Vec<NodeAction> {
        self.input(NodeInput::Datagram { from, bytes })
    }

    /// Joined and synced at epoch 1, every answer coming from `from`.
    fn join_from(&mut self, from: SocketAddr) {
        let out = self.input(NodeInput::LinkUp);
        assert_eq!(
            dests(&out),
            vec![("handshake init", group())],
            "nothing known yet"
        );
        let st = self.ctl.state(&key(1), None);
        let ja = self.ctl.join_accept(request_seq(&out), &st);
        let out = self.feed_from(from, &ja);
        assert_eq!(refusal(&out), None);
        let st = self.ctl.state(&key(1), None);
        let kr = self.ctl.key_response(request_seq(&out), &st);
        let out = self.feed_from(from, &kr);
        assert_eq!(refusal(&out), None);
        assert!(self.node.is_synced());
    }
}

#[test]
fn answers_go_to_the_controller_learned_from_the_join_not_the_group() {
    let mut r = on_group();
    r.join_from(ctl_addr());
    assert_eq!(r.node.controller_addr(), ctl_addr());
    let ku = r.ctl.key_update(&key(2));
    let out = r.feed_from(ctl_addr(), &ku);
    assert_eq!(dests(&out), vec![("ack", ctl_addr())]);
    let t = r.ctl.transition(Step::FirstTransition, 2);
    assert_eq!(
        dests(&r.feed_from(ctl_addr(), &t)),
        vec![("ack", ctl_addr())]
    );
    r.now = r.now.plus(60_000);
    let out = r.input(NodeInput::Timeout);
    assert_eq!(dests(&out), vec![("usage report", ctl_addr())]);
}

#[test]
fn a_transition_request_taken_by_its_reveal_teaches_no_address() {
    // Its reveal authenticates the step, not the source nor the number: the
    // genuine first transition copied from elsewhere (before the controller's
    // own copy arrives) with a fresh number is taken, and answered to the
    // controller learned before.
    let mut r = on_group();
    r.join_from(ctl_addr());
    let ku = r.ctl.key_update(&key(2));
    r.feed_from(ctl_addr(), &ku);
    let reveal = r
        .ctl
        .transition_chain(Epoch(2))
        .reveal(Step::FirstTransition);
    let copy = unsigned_transition(r.ctl.term, Step::FirstTransition, 2, 9999, &reveal);
    let out = r.feed_from(attacker(), &copy);
    assert_eq!(refusal(&out), None);
    assert_eq!(dests(&out), vec![("ack", ctl_addr())]);
    assert_eq!(r.node.controller_addr(), ctl_addr());
    assert_eq!(r.node.reveal_checks(), 1);
}

#[test]
fn a_controller_configured_by_unicast_is_kept() {
    let mut r = Rig::uc1();
    let elsewhere = SocketAddr::from(([192, 168, 0, 7], 47801));
    let ku = r.ctl.key_update(&key(2));
    let out = r.feed_from(elsewhere, &ku);
    assert_eq!(dests(&out), vec![("ack", ctl_addr())]);
    assert_eq!(r.node.controller_addr(), ctl_addr());
}

#[test]
fn replays_forgeries_and_copies_from_elsewhere_teach_nothing() {
    let mut r = on_group();
    r.join_from(ctl_addr());
    let ku = r.ctl.key_update(&key(2));
    r.feed_from(ctl_addr(), &ku);
    // A byte-identical copy (the controller's retransmission, or an
    // attacker's replay) from another address: answered, not followed.
    r.now = r.now.plus(DUPLICATE_ANSWER_INTERVAL_MS);
    let out = r.feed_from(attacker(), &ku);
    assert_eq!(dests(&out), vec![("ack", ctl_addr())]);
    // Forged requests of every kind from the attacker's address.
    let mut forger = FakeController::forger(1000);
    forger.keys = NodeKeys::derive(&initial(5));
    let fst = forger.state(&key(2), None);
    // With a key request outstanding, so that forged answers get checked.
    let asked = request_seq(&r.input(NodeInput::LinkDown));
    for bytes in [
        forger.transition(Step::FirstTransition, 2),
        forger.key_update(&key(3)),
        forger.key_response(asked, &fst),
        // A handshake answer (a Noise message only the node's ephemeral opens).
        wire::handshake_answer(asked, &[0x42; 32 + 81 + 16]),
        wire::sign(
            wire::beacon(crate::protocol::TERM, Epoch(2), 5000, None, attacker()),
            &forger.sk,
        ),
    ] {
        r.now = r.now.plus(DUPLICATE_ANSWER_INTERVAL_MS);
        let out = r.feed_from(attacker(), &bytes);
        assert!(refusal(&out).is_some(), "{out:?}");
        assert_eq!(r.node.controller_addr(), ctl_addr());
    }
    // An older genuine request replayed from elsewhere: refused, not followed.
    r.now = r.now.plus(DUPLICATE_ANSWER_INTERVAL_MS);
    let t = r.ctl.transition(Step::FirstTransition, 2);
    r.feed_from(ctl_addr(), &t);
    let out = r.feed_from(attacker(), &ku);
    assert!(refusal(&out).is_some(), "{out:?}");
    assert_eq!(r.node.controller_addr(), ctl_addr());
}

#[test]
fn a_controller_that_moves_is_followed_through_its_signed_beacon() {
    let mut r = on_group();
    r.join_from(ctl_addr());
    let moved = SocketAddr::from(([192, 168, 0, 2], 47802));
    // The beacon announces the address (level: verified only because it moved).
    let b = wire::sign(
        wire::beacon(crate::protocol::TERM, Epoch(1), 10, None, moved),
        &r.ctl.sk,
    );
    let out = r.feed_from(ctl_addr(), &b);
    assert_eq!(refusal(&out), None);
    assert_eq!(r.node.beacon_stats().verified, 1);
    assert_eq!(r.node.controller_addr(), moved);
    // The same beacon again costs a digest, not a check.
    r.feed_from(moved, &b);
    assert_eq!(r.node.beacon_stats().verified, 1);
    // An unspecified IP means the beacon's source.
    let b = wire::sign(
        wire::beacon(
            crate::protocol::TERM,
            Epoch(1),
            11,
            None,
            SocketAddr::from(([0, 0, 0, 0], 47803)),
        ),
        &r.ctl.sk,
    );
    let source = SocketAddr::from(([192, 168, 0, 3], 47803));
    r.feed_from(source, &b);
    assert_eq!(r.node.controller_addr(), source);
    // A level beacon naming the address already known is not checked.
    let b = wire::sign(
        wire::beacon(crate::protocol::TERM, Epoch(1), 12, None, source),
        &r.ctl.sk,
    );
    r.feed_from(source, &b);
    assert_eq!(r.node.beacon_stats().verified, 2);
}

#[test]
fn unanswered_answers_fall_back_to_the_group_every_second_time() {
    let mut r = on_group();
    r.join_from(ctl_addr());
    let ku = r.ctl.key_update(&key(2));
    let mut to = vec![dests(&r.feed_from(ctl_addr(), &ku))];
    for _ in 0..4 {
        r.now = r.now.plus(DUPLICATE_ANSWER_INTERVAL_MS);
        to.push(dests(&r.feed_from(ctl_addr(), &ku)));
    }
    let c = ctl_addr();
    let g = group();
    assert_eq!(
        to,
        vec![
            vec![("ack", c)],
            vec![("ack", c)],
            vec![("ack", g)],
            vec![("ack", c)],
            vec![("ack", g)],
        ]
    );
    // A new step starts afresh by unicast.
    let t = r.ctl.transition(Step::FirstTransition, 2);
    assert_eq!(dests(&r.feed_from(ctl_addr(), &t)), vec![("ack", c)]);
    // Key request retries alternate too.
    let out = r.input(NodeInput::LinkDown);
    let mut to = vec![dests(&out)];
    for _ in 0..3 {
        r.now = r.now.plus(20_000);
        // (The usage reports that fall due meanwhile go too, always by unicast.)
        let out = r.input(NodeInput::Timeout);
        to.push(
            dests(&out)
                .into_iter()
                .filter(|(n, _)| *n == "key request")
                .collect(),
        );
    }
    assert_eq!(
        to,
        vec![
            vec![("key request", c)],
            vec![("key request", g)],
            vec![("key request", c)],
            vec![("key request", g)],
        ]
    );
}
