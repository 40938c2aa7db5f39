//! kill -9 of `keyfleet serve` in the middle of a round, and a restart: the
//! round resumes and completes, and nothing in the management table is lost.
use crate::support;

use support::ctl::*;
use support::inproc::*;
use support::{wait_for, Proc};

const CFG: &str = "[round]\ndrain_grace_ms = 500\nretry_initial_ms = 100\nretry_max_ms = 800\nstale_after_ms = 5000\n[rekey]\njoin_wait_ms = 8000\nlinger_ms = 200\n";

fn status(ctl: &Ctl) -> serde_json::Value {
    ctl.json(&["status", "--json"])
}

#[test]
fn kill_9_mid_round_and_restart_completes_the_round_and_keeps_the_table() {
    let _heavy = support::heavy();
    let ctl = Ctl::new(CFG);
    ctl.run(&["init"]);
    let specs = node_specs(5);
    let (live, dead) = specs.split_at(4);
    let shells = InProcFleet::nodes(live, ctl.group, ctl.addr());
    let doomed = InProcFleet::nodes(dead, ctl.group, ctl.addr());
    ctl.enroll_all(&specs);
    let r = ctl.json(&["rekey", "--json"]);
    assert_eq!(
        (r["epoch"].as_u64(), r["acked"].as_u64()),
        (Some(2), Some(5)),
        "{r}"
    );

    // One node goes silent: the next round waits for it in its first phase.
    drop(doomed);
    let mut serve = ctl.serve();
    let mut client = Proc::from(
        ctl.cmd(&["rekey", "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the round for epoch 3 to distribute", 10_000, || {
        let s = status(&ctl);
        s["round"]["epoch"] == 3 && s["round"]["phase"] == "distributing"
    });
    // Let the key updates and the live nodes' replies reach the table.
    wait_for("four key update replies recorded", 5000, || {
        let h = ctl.json(&["history", "--json", "--audit", "0"]);
        h["keys"][2]["deliveries"]
            .as_array()
            .is_some_and(|d| d.iter().filter(|d| d["acked_at_ms"].is_u64()).count() == 4)
    });
    let before = ctl.json(&["history", "--json", "--audit", "0"]);
    serve.kill9();
    let _ = client.child.wait();

    // Restarted, it resumes the round: the silent node goes stale, the rest finish.
    let _serve = ctl.serve();
    wait_for("the resumed round to finish", 20_000, || {
        let s = status(&ctl);
        s["epoch"] == 3 && s["round"].is_null()
    });
    wait_for("the live nodes at epoch 3", 5000, || {
        shells.completed_at(3) == 4
    });

    let after = ctl.json(&["history", "--json", "--audit", "1000"]);
    // Nothing lost: every key and delivery recorded before the kill is still there, unchanged
    // where it was final (first send, acknowledgement).
    let (k_before, k_after) = (
        before["keys"].as_array().unwrap(),
        after["keys"].as_array().unwrap(),
    );
    assert_eq!(k_after.len(), 3);
    for (b, a) in k_before.iter().zip(k_after) {
        assert_eq!(
            (b["epoch"].clone(), b["check_value"].clone()),
            (a["epoch"].clone(), a["check_value"].clone())
        );
        for d in b["deliveries"].as_array().unwrap() {
            let same = a["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["node_id"] == d["node_id"])
                .unwrap_or_else(|| panic!("delivery lost: {d}"));
            assert_eq!(same["first_sent_at_ms"], d["first_sent_at_ms"]);
            if d["acked_at_ms"].is_u64() {
                assert_eq!(same["acked_at_ms"], d["acked_at_ms"]);
            }
        }
    }
    let rounds = after["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{rounds:?}");
    let r3 = &rounds[1];
    assert_eq!(
        (r3["epoch"].as_u64(), r3["outcome"].as_str()),
        (Some(3), Some("Completed")),
        "{r3}"
    );
    assert_eq!(
        (r3["acked"].as_u64(), r3["stale"].as_u64()),
        (Some(4), Some(1)),
        "{r3}"
    );
    let audit = after["audit"].as_array().unwrap();
    assert!(
        audit
            .iter()
            .any(|a| a["kind"] == "Restart" && a["detail"]["resumed_epoch"] == 3),
        "the restart is audited"
    );
    assert!(audit
        .iter()
        .any(|a| a["kind"] == "Stale" && a["node_id"] == dead[0].id.as_str()));
    let st = status(&ctl);
    let nodes = st["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 5);
    let silent = nodes
        .iter()
        .find(|n| n["node_id"] == dead[0].id.as_str())
        .unwrap();
    assert_eq!(silent["stale"], true);

    // The silent node comes back without its state (these shells keep none):
    // its enrollment is pinned, so the operator allows the re-join (audited);
    // it runs the handshake, gets the current key, is no longer stale.
    ctl.run(&["rejoin", "--node-id", dead[0].id.as_str()]);
    let back = InProcFleet::nodes(dead, ctl.group, ctl.addr());
    wait_for("the returning node at epoch 3", 10_000, || {
        back.completed_at(3) == 1
    });
    wait_for("the returning node no longer stale", 5000, || {
        status(&ctl)["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node_id"] == dead[0].id.as_str() && n["stale"] == false)
    });
}

#[test]
fn kill_9_of_a_rekey_without_serve_and_rekey_again_finishes_that_round_then_its_own() {
    let _heavy = support::heavy();
    let ctl = Ctl::new("[round]\ndrain_grace_ms = 4000\nretry_initial_ms = 100\n[rekey]\njoin_wait_ms = 8000\nlinger_ms = 200\n");
    ctl.run(&["init"]);
    let specs = node_specs(3);
    let shells = InProcFleet::nodes(&specs, ctl.group, ctl.addr());
    ctl.enroll_all(&specs);
    let mut first = Proc::from(
        ctl.cmd(&["rekey", "--json"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Killed during the drain: every node already seals with the new key.
    wait_for("the drain of the round for epoch 2", 15_000, || {
        let s = status(&ctl);
        s["round"]["epoch"] == 2
            && (s["round"]["phase"] == "draining" || s["round"]["phase"] == "second_transition")
    });
    wait_for("the nodes in transit", 5000, || {
        specs.iter().all(|s| {
            matches!(
                shells.state(&s.id),
                Some(keyfleet_core::protocol::NodeState::InTransit { .. })
            )
        })
    });
    first.kill9();
    // The next rekey finishes that round first, then runs its own, and reports both.
    let r = ctl.json(&["rekey", "--json"]);
    let old = &r["earlier"][0];
    assert_eq!(
        (
            old["epoch"].as_u64(),
            old["acked"].as_u64(),
            old["stale"].as_u64()
        ),
        (Some(2), Some(3), Some(0)),
        "{r}"
    );
    assert_eq!(
        (
            r["epoch"].as_u64(),
            r["acked"].as_u64(),
            r["stale"].as_u64()
        ),
        (Some(3), Some(3), Some(0)),
        "{r}"
    );
    wait_for("the nodes at epoch 3", 5000, || shells.completed_at(3) == 3);
    let h = ctl.json(&["history", "--json", "--audit", "100"]);
    let rounds: Vec<_> = h["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["epoch"].as_u64(), r["outcome"].as_str()))
        .collect();
    assert_eq!(
        rounds,
        [(Some(2), Some("Completed")), (Some(3), Some("Completed"))],
        "the resumed round, then this command's own"
    );
    assert!(h["audit"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["kind"] == "Restart"));
}

// kill -9 of `serve` with real `keyfleet-agent` processes and application data
// flowing, at every phase of a round: tests/fleet/fault_matrix.rs.
