//! Issue 3's acceptance: fifty nodes started, enrolled with `keyfleet enroll`,
//! rotated by `keyfleet rekey --json` with `acked` 50 and `stale` 0.
//!
//! - `fifty_nodes_...`: fifty in-process nodes (real `NodeMachine`s on real loopback
//!   multicast sockets, in this test process) against the real `keyfleet`.
//! - `fifty_keyfleet_agent_processes_...`: fifty real `keyfleet-agent run`
//!   processes. `KEYFLEET_AGENT=PATH` runs another build of the agent.
use crate::support;

use std::process::{Command, Stdio};
use std::time::Instant;

use support::ctl::*;
use support::inproc::*;
use support::{agent_bin, wait_for, Proc};

/// Default round timing, as a user gets it; only the group and ports are the test's own.
const DEFAULTS: &str = "";

fn check(r: &serde_json::Value, n: u64) {
    assert_eq!(r["epoch"].as_u64(), Some(2), "{r}");
    assert_eq!(r["nodes"].as_u64(), Some(n), "{r}");
    assert_eq!(r["acked"].as_u64(), Some(n), "{r}");
    assert_eq!(r["stale"].as_u64(), Some(0), "{r}");
    assert!(r["elapsed_ms"].is_u64(), "{r}");
    for p in [
        "distributing",
        "first_transition",
        "draining",
        "second_transition",
    ] {
        assert!(r["phases_ms"][p].is_u64(), "{p} missing in {r}");
    }
}

#[test]
fn fifty_nodes_enrolled_and_rotated_by_rekey_json() {
    let _heavy = support::heavy();
    let ctl = Ctl::new(DEFAULTS);
    ctl.run(&["init"]);
    let specs = node_specs(50);
    let shells = InProcFleet::nodes(&specs, ctl.group, ctl.addr());
    ctl.enroll_all(&specs);
    let t = Instant::now();
    let r = ctl.json(&["rekey", "--json"]);
    eprintln!(
        "50 in-process nodes: keyfleet rekey --json took {} ms: {r}",
        t.elapsed().as_millis()
    );
    check(&r, 50);
    wait_for("all fifty at epoch 2", 5000, || {
        shells.completed_at(2) == 50
    });
    let h = ctl.json(&["history", "--json", "--audit", "100000"]);
    let refused: Vec<_> = h["audit"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "Refusal")
        // A retry that crossed the answer to its request on a loaded machine
        // is refused as a duplicate: the node has its answer already.
        .filter(|a| a["detail"]["refusal"].get("DuplicateRequest").is_none())
        .collect();
    assert!(
        refused.is_empty(),
        "nothing refused on a clean network but retries already answered: {refused:?}"
    );
    let acked = h["keys"][1]["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["acked_at_ms"].is_u64())
        .count();
    assert_eq!(acked, 50);
}

#[test]
fn fifty_keyfleet_agent_processes_enrolled_and_rotated_by_rekey_json() {
    let _heavy = support::heavy();
    // KEYFLEET_AGENT may name another build of the agent (e.g. a release build).
    let agent = agent_bin();
    let ctl = Ctl::new(DEFAULTS);
    ctl.run(&["init"]);
    let specs = node_specs(50);
    let mut agents = Vec::new();
    for s in &specs {
        let dir = ctl.dir.path().join(format!("agent-{}", s.id));
        let child = Command::new(&agent)
            .args(["run", "--state"])
            .arg(&dir)
            .args(["--node-id", &s.id, "--initial-key", &s.form])
            .args(["--group", &ctl.group.to_string(), "--iface", "127.0.0.1"])
            .args(["--listen", &s.listen.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        agents.push(Proc::from(child));
    }
    ctl.enroll_all(&specs);
    let t = Instant::now();
    let r = ctl.json(&["rekey", "--json"]);
    eprintln!(
        "50 keyfleet-agent processes: keyfleet rekey --json took {} ms: {r}",
        t.elapsed().as_millis()
    );
    check(&r, 50);
    let st = ctl.json(&["status", "--json"]);
    let nodes = st["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 50);
    assert!(
        nodes
            .iter()
            .all(|n| n["state"] == "UpdateCompleted" && n["epoch"] == 2),
        "{st}"
    );
    // Each agent says the same.
    for s in specs.iter().take(5) {
        let out = Command::new(&agent)
            .args(["status", "--json", "--state"])
            .arg(ctl.dir.path().join(format!("agent-{}", s.id)))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["epoch"], 2, "{v}");
    }
}
