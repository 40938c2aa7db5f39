//! The fleet as an installer runs it: `keyfleet init`, `enroll`, `serve`,
//! `rekey`, `status`, `history` and real `keyfleet-agent run` processes on
//! loopback multicast, with applications sending group messages through the
//! agents' sockets all along. Processes are killed with SIGKILL in the middle
//! of a round and started again; the round must complete, the management
//! table must keep every node and key, and no message may become undecryptable.

use crate::support;

use std::process::Stdio;
use std::time::Duration;
use support::fleet::{agent_status, Chatter, Fleet};
use support::{wait_for, Proc};

/// A drain grace long enough to kill a process while the round is in flight.
const SLOW_ROUND: &str = "[round]\ndrain_grace_ms = 3000\n";

fn assert_table_complete(f: &Fleet, epoch: u64) {
    let st = f.json(&["status", "--json"]);
    assert_eq!(st["epoch"].as_u64(), Some(epoch), "{st}");
    assert!(st["round"].is_null(), "no round left unfinished: {st}");
    let nodes = st["nodes"].as_array().expect("nodes");
    assert_eq!(
        nodes.len(),
        f.nodes.len(),
        "every enrolled node is in the table: {st}"
    );
    for n in &f.nodes {
        let row = nodes
            .iter()
            .find(|r| r["node_id"] == n.id.as_str())
            .unwrap_or_else(|| panic!("{} missing from the table: {st}", n.id));
        assert_eq!(row["stale"], false, "{row}");
        assert_eq!(row["epoch"].as_u64(), Some(epoch), "{row}");
        assert_eq!(row["address"], n.listen.to_string().as_str(), "{row}");
    }
    // Every key since the first is in the history, and the current one went
    // to every node.
    let h = f.json(&["history", "--json"]);
    let keys = h["keys"].as_array().expect("keys in the history");
    for e in 1..=epoch {
        assert!(
            keys.iter().any(|k| k["epoch"].as_u64() == Some(e)),
            "epoch {e} missing from the history: {h}"
        );
    }
    let current = keys
        .iter()
        .find(|k| k["epoch"].as_u64() == Some(epoch))
        .expect("current key");
    let deliveries = current["deliveries"].as_array().expect("deliveries");
    for n in &f.nodes {
        assert!(
            deliveries
                .iter()
                .any(|d| d["node_id"] == n.id.as_str() && !d["acked_at_ms"].is_null()),
            "the key of epoch {epoch} was not acknowledged by {} in the history: {current}",
            n.id
        );
    }
}

/// No agent (in any of its runs) refused data as undecryptable.
fn assert_nothing_undecryptable(f: &Fleet) {
    for n in &f.nodes {
        let logged = f.undecryptable_logged(&n.id);
        let counted = agent_status(&n.state)
            .and_then(|s| s["running"]["undecryptable"].as_u64())
            .expect("the agent answers its status");
        assert_eq!(
            (logged, counted),
            (0, 0),
            "{} could not open group messages:\n{}",
            n.id,
            f.logs(&n.id)
        );
    }
}

#[test]
fn rotate_across_six_agents_while_they_exchange_messages() {
    let _heavy = support::heavy();
    let f = Fleet::new(6, "");
    f.init_and_enroll();
    let _serve = f.serve();
    let _agents = f.agents();
    let e0 = f.wait_converged(30_000);
    let chatter = Chatter::start(&f, Duration::from_millis(100));
    std::thread::sleep(Duration::from_millis(500));
    for r in 1..=3 {
        let round = f.json(&["rekey", "--json"]);
        assert_eq!(round["epoch"].as_u64(), Some(e0 + r), "{round}");
        assert_eq!(round["nodes"], 6, "{round}");
        assert_eq!(round["acked"], 6, "{round}");
        assert_eq!(round["stale"], 0, "{round}");
    }
    let epoch = f.wait_converged(20_000);
    assert_eq!(epoch, e0 + 3);
    let t = chatter.finish();
    let sent = t.sent.load(std::sync::atomic::Ordering::Relaxed);
    let received = t.received.load(std::sync::atomic::Ordering::Relaxed);
    assert!(sent > 50, "sent {sent}");
    // Loopback loses nothing: each message reaches the five other agents.
    assert!(
        received * 100 >= sent * 5 * 95,
        "received {received} of {} copies",
        sent * 5
    );
    assert_nothing_undecryptable(&f);
    assert_table_complete(&f, epoch);
}

#[test]
fn kill9_agents_mid_round_and_restart_them() {
    let _heavy = support::heavy();
    let f = Fleet::new(5, SLOW_ROUND);
    f.init_and_enroll();
    let _serve = f.serve();
    let mut agents = f.agents();
    let e0 = f.wait_converged(30_000);
    let chatter = Chatter::start(&f, Duration::from_millis(100));
    let rekey = f
        .keyfleet(&["rekey", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill node-02 once it holds the new key (DistributionCompleted or InTransit).
    let victim = &f.nodes[2];
    let mut state_at_kill = String::new();
    wait_for("node-02 to receive the new key", 20_000, || {
        agent_status(&victim.state).is_some_and(|s| {
            state_at_kill = s["state"].as_str().unwrap_or_default().to_owned();
            s["epoch"].as_u64() == Some(e0 + 1)
        })
    });
    agents[2].kill9();
    assert!(!agents[2].alive());
    eprintln!("killed node-02 in {state_at_kill}");
    std::thread::sleep(Duration::from_millis(700));
    agents[2] = f.agent(2);
    // In the same round, kill node-03 once it seals with the new key (InTransit).
    let second = &f.nodes[3];
    wait_for("node-03 to reach InTransit", 20_000, || {
        agent_status(&second.state).is_some_and(|s| s["state"] == "InTransit")
    });
    agents[3].kill9();
    std::thread::sleep(Duration::from_millis(700));
    agents[3] = f.agent(3);
    let out = rekey.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "keyfleet rekey: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let round: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(round["epoch"].as_u64(), Some(e0 + 1), "{round}");
    assert_eq!(
        round["acked"], 5,
        "the restarted node acknowledged: {round}"
    );
    assert_eq!(round["stale"], 0, "{round}");
    let epoch = f.wait_converged(20_000);
    assert_eq!(epoch, e0 + 1);
    let t = chatter.finish();
    assert!(t.received.load(std::sync::atomic::Ordering::Relaxed) > 0);
    assert_nothing_undecryptable(&f);
    assert_table_complete(&f, epoch);
    // The restarted agents resumed from their state files, not from scratch.
    for id in ["node-02", "node-03"] {
        assert_eq!(
            f.logs(id).matches("first start").count(),
            1,
            "{}",
            f.logs(id)
        );
    }
}

#[test]
fn kill9_the_controller_mid_round_and_restart_it() {
    let _heavy = support::heavy();
    let f = Fleet::new(5, SLOW_ROUND);
    f.init_and_enroll();
    let mut serve = f.serve();
    let _agents = f.agents();
    let e0 = f.wait_converged(30_000);
    let chatter = Chatter::start(&f, Duration::from_millis(100));
    let rekey = Proc::from(
        f.keyfleet(&["rekey", "--json"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Kill serve once some node holds the new key: the round is in flight.
    wait_for("a node to receive the new key", 20_000, || {
        f.nodes
            .iter()
            .any(|n| agent_status(&n.state).is_some_and(|s| s["epoch"].as_u64() == Some(e0 + 1)))
    });
    serve.kill9();
    let st = f.json(&["status", "--json"]);
    assert_eq!(
        st["round"]["epoch"].as_u64(),
        Some(e0 + 1),
        "the table shows the round in flight: {st}"
    );
    drop(rekey);
    std::thread::sleep(Duration::from_millis(1000));
    let _serve = f.serve();
    // The restarted controller resumes the round from its table and finishes it.
    wait_for("the resumed round to finish", 30_000, || {
        let st = f.json(&["status", "--json"]);
        st["round"].is_null() && st["epoch"].as_u64() == Some(e0 + 1)
    });
    let epoch = f.wait_converged(20_000);
    assert_eq!(epoch, e0 + 1);
    // And the next round runs as usual.
    let round = f.json(&["rekey", "--json"]);
    assert_eq!(
        (round["acked"].as_u64(), round["stale"].as_u64()),
        (Some(5), Some(0)),
        "{round}"
    );
    let epoch = f.wait_converged(20_000);
    let t = chatter.finish();
    assert!(t.received.load(std::sync::atomic::Ordering::Relaxed) > 0);
    assert_nothing_undecryptable(&f);
    assert_table_complete(&f, epoch);
}
