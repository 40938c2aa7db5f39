//! Acknowledgements go to the controller, not to the whole group (issue
//! 11.2): agents started as a user starts them (no `--controller`: the group
//! until they learn the controller's unicast address from an authenticated
//! controller message) answer a round by unicast, so no agent hears another
//! agent's replies. Counted with real `keyfleet serve`, `keyfleet rekey` and
//! `keyfleet-agent run` processes on loopback multicast, at two fleet sizes.

use crate::support;

use support::fleet::{agent_status, Fleet};

/// (datagrams received, node messages heard on the group, signatures
/// checked, transition requests taken by their reveal, key update steps
/// whose X25519 was made ahead from a share notice) of every agent.
fn counters(f: &Fleet) -> Vec<(u64, u64, u64, u64, u64, u64)> {
    f.nodes
        .iter()
        .map(|n| {
            let s = agent_status(&n.state).expect("the agent answers its status");
            let r = &s["running"];
            (
                r["datagrams_in"].as_u64().expect("datagrams_in"),
                r["node_messages_ignored"]
                    .as_u64()
                    .expect("node_messages_ignored"),
                r["signature_checks"].as_u64().expect("signature_checks"),
                r["reveal_checks"].as_u64().expect("reveal_checks"),
                r["steps_prepared"].as_u64().expect("steps_prepared"),
                r["keys_vouched"].as_u64().expect("keys_vouched"),
            )
        })
        .collect()
}

fn one_fleet(n: usize) {
    let mut f = Fleet::new(n, "[round]\ndrain_grace_ms = 500\n");
    f.controller_flag = false;
    let (_serve, _agents) = f.up(60_000);
    let controller = format!("127.0.0.1:{}", f.ctl_port);
    for node in &f.nodes {
        let s = agent_status(&node.state).unwrap();
        assert_eq!(
            s["running"]["controller"],
            controller.as_str(),
            "{} answers the controller's unicast address: {s}",
            node.id
        );
    }
    // The controller announces the next round's share once it drew it, and
    // again with each beacon (every second): every agent has it within a
    // beacon or two of joining.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let notices = |f: &Fleet| -> Vec<u64> {
        f.nodes
            .iter()
            .map(|n| {
                let s = agent_status(&n.state).expect("the agent answers its status");
                s["running"]["share_notices"]
                    .as_u64()
                    .expect("share_notices")
            })
            .collect()
    };
    while notices(&f).contains(&0) {
        assert!(
            std::time::Instant::now() < deadline,
            "agents without the share notice 10 s after joining: {:?}",
            notices(&f)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // An agent that checked a notice just before its key response moved its
    // share makes the X25519 again from the copy with the next beacon: wait
    // for one.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let before = counters(&f);
    let r = f.json(&["rekey", "--json"]);
    let after = counters(&f);
    assert_eq!(r["outcome"], "completed", "{r}");
    assert_eq!(r["acked"].as_u64(), Some(n as u64), "{r}");
    let heard: Vec<u64> = before.iter().zip(&after).map(|(b, a)| a.1 - b.1).collect();
    let received: Vec<u64> = before.iter().zip(&after).map(|(b, a)| a.0 - b.0).collect();
    let signatures: Vec<u64> = before.iter().zip(&after).map(|(b, a)| a.2 - b.2).collect();
    let reveals: Vec<u64> = before.iter().zip(&after).map(|(b, a)| a.3 - b.3).collect();
    let prepared: Vec<u64> = before.iter().zip(&after).map(|(b, a)| a.4 - b.4).collect();
    let vouched: Vec<u64> = before.iter().zip(&after).map(|(b, a)| a.5 - b.5).collect();
    let total: u64 = received.iter().sum();
    let batches = n.div_ceil(17) as u64;
    println!(
        "N = {n}: round {} ms; datagrams received by the agents during it: {total} \
         ({:.1} per agent, max {}); node messages heard on the group: {}; \
         replies to the group would add {} ({} per agent); key update batches per agent: {batches}",
        r["elapsed_ms"],
        total as f64 / n as f64,
        received.iter().max().unwrap(),
        heard.iter().sum::<u64>(),
        3 * n * n,
        3 * n,
    );
    println!(
        "N = {n}: signature checks per agent in the round: {signatures:?}; transition \
         requests taken by their reveal: {reveals:?}"
    );
    // Wire revision 3: both transition requests by their reveal against the
    // verified key update's commitment, no signature check for them.
    assert!(
        reveals.iter().all(|r| *r >= 2),
        "every agent took both transitions by their reveal: {reveals:?}"
    );
    // The key update's X25519 was made ahead, while the agents were idle.
    assert!(
        prepared.iter().all(|p| *p == 1),
        "every agent's key update step found its X25519 made ahead: {prepared:?}"
    );
    // And the round notice vouched for its header: no signature check in
    // the round at all (at most one after it: the next round's notice).
    assert!(
        vouched.iter().all(|v| *v == 1),
        "every agent took the key update on the round notice's word: {vouched:?}"
    );
    assert!(
        signatures.iter().all(|s| *s <= 1),
        "signature checks in the round: {signatures:?}"
    );
    assert!(
        heard.iter().all(|h| *h == 0),
        "agents heard other agents' replies on the group: {heard:?}"
    );
    // What a round sends every node: its key update batches (of which the
    // kernel lets through only the one that can hold its entry), two
    // transition requests and the beacons; never one datagram per other agent.
    for (node, got) in f.nodes.iter().zip(&received) {
        assert!(
            *got < n as u64 + batches + 2,
            "{} received {got} datagrams in one round of {n} agents: {received:?}",
            node.id
        );
    }
}

#[test]
fn a_round_costs_each_agent_a_few_datagrams_not_one_per_other_agent() {
    let _heavy = support::heavy();
    one_fleet(8);
    one_fleet(32);
}
