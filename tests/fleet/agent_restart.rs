//! An agent persists its state and restarts into it: after a clean stop, and
//! after kill -9 in the middle of a rekey round (real processes, loopback multicast).

use crate::support;

use std::time::Duration;

use keyfleet_core::wire::RoundPhase;
use support::agent::*;
use support::fresh_group;
use support::inproc::*;

const T: Duration = Duration::from_secs(20);

#[test]
fn restart_resumes_the_same_state_and_asks_for_the_current_key() {
    let _heavy = support::heavy();
    let dir = tempfile::tempdir().unwrap();
    let group = fresh_group();
    let ctl = InProcFleet::controller(group);
    let key = TestKey::new(dir.path(), "node-a");
    ctl.enroll("node-a", &key);
    let state = dir.path().join("a");

    // No --controller: joins and key requests go to the group, where the controller listens.
    let mut agent = spawn_agent(&state, "node-a", &key, group, &[]);
    let live = wait_status(&state, &agent, T, |s| synced_at(s, "UpdateCompleted", 1));
    assert_eq!(live["member"], 1);
    assert_eq!(live["node_id"], "node-a");
    let check1 = live["keys"][0]["check"].as_str().unwrap().to_owned();
    assert_eq!(check1.len(), 8, "a 4-byte check value in hex: {live}");

    // One rotation, so the state differs from what a fresh join would give.
    ctl.rekey();
    ctl.wait(T, "round 2 finished", |v| v.epoch == 2 && v.round.is_none());
    let live = wait_status(&state, &agent, T, |s| synced_at(s, "UpdateCompleted", 2));
    let check2 = live["keys"][0]["check"].as_str().unwrap().to_owned();
    assert_ne!(check1, check2, "a new key after the rotation");

    // Clean stop: exit 0, and the state file says what the agent said.
    let exit = agent.terminate();
    assert!(
        exit.success(),
        "SIGTERM must stop the agent cleanly: {exit:?}"
    );
    assert!(
        !state.join("app.sock").exists(),
        "socket removed on clean stop"
    );
    let stored = status(&state).expect("status from the state file");
    assert_eq!(stored["source"], "state_file");
    assert_eq!(stored["state"], "UpdateCompleted");
    assert_eq!(stored["epoch"], 2);
    assert_eq!(stored["member"], 1);
    assert_eq!(stored["keys"][0]["check"], check2.as_str());
    assert!(stored["last_sync_ms"].as_u64().is_some());

    // Restart: the same state, and the key request of SPEC §5 is answered.
    let before = ctl.key_requests_answered(1);
    let agent = spawn_agent(&state, "node-a", &key, group, &[]);
    let live = wait_status(&state, &agent, T, |s| synced_at(s, "UpdateCompleted", 2));
    assert_eq!(live["member"], 1, "no new join: the same member");
    assert_eq!(live["keys"][0]["check"], check2.as_str());
    ctl.wait(T, "key request answered after restart", |v| {
        v.key_requests_answered(1) > before
    });
    drop(agent);
}

#[test]
fn kill_9_in_the_middle_of_a_round_resumes_in_distribution_completed_and_finishes() {
    let _heavy = support::heavy();
    let dir = tempfile::tempdir().unwrap();
    let group = fresh_group();
    let ctl = InProcFleet::controller(group);
    let key = TestKey::new(dir.path(), "node-b");
    ctl.enroll("node-b", &key);
    let state = dir.path().join("b");

    let mut agent = spawn_agent(
        &state,
        "node-b",
        &key,
        group,
        &["--controller", &ctl.addr().to_string()],
    );
    wait_status(&state, &agent, T, |s| synced_at(s, "UpdateCompleted", 1));

    // The controller stops hearing the node: the node gets the new key
    // (DistributionCompleted) but the round cannot go on.
    ctl.set_deaf(true);
    ctl.rekey();
    let mid = wait_status(&state, &agent, T, |s| {
        s["source"] == "running_agent" && s["state"] == "DistributionCompleted"
    });
    assert_eq!(mid["epoch"], 2);
    assert_eq!(mid["sealing_epoch"], 1, "seals with the old key until told");
    assert_eq!(mid["keys"].as_array().unwrap().len(), 2, "old + new: {mid}");

    agent.kill9();
    let stored = status(&state).expect("a readable state file after kill -9");
    assert_eq!(stored["source"], "state_file");
    assert_eq!(stored["state"], "DistributionCompleted");
    assert_eq!(stored["epoch"], 2);
    let keys = |s: &serde_json::Value| -> Vec<(u64, String, String)> {
        s["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["epoch"].as_u64().unwrap(),
                    k["role"].to_string(),
                    k["check"].to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        keys(&stored),
        keys(&mid),
        "the same old and new keys on disk"
    );
    assert_eq!(
        ctl.view().round.map(|r| r.1),
        Some(RoundPhase::Distributing),
        "the round waits for the node"
    );

    // Back: the node resumes DistributionCompleted, asks for the current key,
    // and the round completes with it (acked 1, stale 0).
    ctl.set_deaf(false);
    let agent = spawn_agent(
        &state,
        "node-b",
        &key,
        group,
        &["--controller", &ctl.addr().to_string()],
    );
    ctl.wait(T, "round 2 finished", |v| v.epoch == 2 && v.round.is_none());
    assert_eq!(ctl.finished_rounds(), vec![(2, 1, 1, 0)]);
    let live = wait_status(&state, &agent, T, |s| synced_at(s, "UpdateCompleted", 2));
    assert_eq!(
        live["keys"][0]["check"], mid["keys"][1]["check"],
        "the new key of the round is now the current key"
    );
    assert!(
        agent.log_text().contains("resumed from the state file"),
        "{}",
        agent.log_text()
    );
}
