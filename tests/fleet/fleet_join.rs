//! A freshly started `keyfleet serve` announces itself, and enrolled agents
//! that were waiting for a controller join at once (issue 11.4), not at their
//! next join retry (which backs off to 8 s). Real processes on loopback
//! multicast: agents started as a user starts them (no `--controller`), left
//! waiting long enough for their join retries to back off fully, then
//! `serve`; then a `rekey` right away, which must count every enrolled node.
//!
//! `KEYFLEET_JOIN_AGENTS` sets the number of agents (default 20; the issue's
//! figure is for 50).

use crate::support;

use std::time::{Duration, Instant};

use support::fleet::{agent_status, Fleet};
use support::Proc;

fn joined(f: &Fleet, i: usize) -> bool {
    agent_status(&f.nodes[i].state)
        .is_some_and(|s| s["running"]["synced"] == true && s["member"].is_u64())
}

#[test]
fn enrolled_agents_join_a_freshly_started_serve_at_once() {
    let _heavy = support::heavy();
    let n: usize = std::env::var("KEYFLEET_JOIN_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut f = Fleet::new(n + 1, "");
    f.controller_flag = false;
    f.init_and_enroll();
    // The last node is enrolled but never runs.
    let _agents: Vec<Proc> = (0..n).map(|i| f.agent(i)).collect();
    // Join retries: 0.5, 1, 2, 4, then every 8 s (±25 %).
    std::thread::sleep(Duration::from_secs(10));
    assert!(!joined(&f, 0), "no controller runs yet");
    let start = Instant::now();
    let _serve = f.serve();
    let serve_up = start.elapsed();
    let mut times = vec![None; n];
    while times.iter().any(Option::is_none) && start.elapsed() < Duration::from_secs(30) {
        for (i, t) in times.iter_mut().enumerate() {
            if t.is_none() && joined(&f, i) {
                *t = Some(start.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut got: Vec<u128> = times.iter().flatten().map(Duration::as_millis).collect();
    got.sort_unstable();
    let pct = |p: usize| got.get((got.len().max(1) - 1) * p / 100).copied();
    println!(
        "{} of {n} agents joined; from `serve` started: control socket up after {} ms; \
         first joined {:?} ms, median {:?} ms, last {:?} ms",
        got.len(),
        serve_up.as_millis(),
        pct(0),
        pct(50),
        pct(100)
    );
    assert_eq!(got.len(), n, "every running agent joined: {times:?}");
    // Every joined agent took part in the round; the one that never ran is named.
    let (r, _) = f.json_exit(&["rekey", "--json"], 0);
    println!(
        "rekey right after: nodes {} joined {} acked {} not_joined {} {}",
        r["nodes"], r["joined"], r["acked"], r["not_joined"], r["not_joined_nodes"]
    );
    assert_eq!(r["nodes"].as_u64(), Some(n as u64 + 1), "{r}");
    assert_eq!(r["joined"].as_u64(), Some(n as u64), "{r}");
    assert_eq!(r["acked"].as_u64(), Some(n as u64), "{r}");
    assert_eq!(
        r["not_joined_nodes"],
        serde_json::json!([f.nodes[n].id]),
        "{r}"
    );
}
