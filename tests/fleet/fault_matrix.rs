//! The fault matrix of issue 5 (item 3), with real processes on loopback
//! multicast: `keyfleet serve` and four `keyfleet-agent run`.
//!
//! Rows: the phase of a rekey round at which the fault hits — (a) key update
//! sent, no reply in yet; (b) some replies in, not all; (c) first transition
//! request sent; (d) second transition request sent. Columns: who is killed
//! with SIGKILL — the controller (`keyfleet serve`), or one node
//! (`keyfleet-agent`). Each cell starts its own fleet, drives a round to
//! exactly that phase, kills, restarts the killed process, and checks that
//! the round completes (every node at the new epoch, `status` shows no round),
//! that nothing the management table held before the kill is lost or changed,
//! and that no message became undecryptable — application messages flow
//! through every agent's application socket during the whole cell and each
//! one is accounted for at every other agent.
//!
//! How a round is stopped at a phase: nodes are *frozen* (SIGSTOP — they read
//! nothing and answer nothing; what is sent to them waits in their socket
//! buffers) and thawed (SIGCONT). The controller waits for every live node, so
//! a frozen node holds the round in its phase; `stale_after_ms` is far longer
//! than any hold. The phase is observed from outside only: `keyfleet status
//! --json` (round phase), `keyfleet history --json` (each node's key delivery:
//! first send, attempts, acknowledgement) and the agents' own status
//! (state and epoch):
//!
//! | row | held by | observed |
//! |---|---|---|
//! | (a) | every node frozen before `keyfleet rekey` | phase `distributing`; every node's delivery sent at least twice (so the first group wave is out), none acknowledged |
//! | (b) | node-02 frozen | phase `distributing`; 3 of 4 deliveries acknowledged |
//! | (c) | node-02 frozen until node-01 has replied; node-01 frozen, node-02 thawed | phase `first_transition`; the other three agents `InTransit` |
//! | (d) | node-01 frozen once every agent is `InTransit` (the drain grace leaves a second for it) | the other three agents `UpdateCompleted` at the new epoch while the round is still open |
//!
//! The node killed is node-01: in (a) it has not replied, in (b) its reply is
//! in, in (c) and (d) it is the node the phase waits for. Cells run in
//! parallel (`FAULT_MATRIX_JOBS`, default 4), each with its own group and ports.
//!
//! A second test takes a node offline across two rounds and brings it back.
use crate::support;

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::fleet::*;
use support::{wait_for, Proc, AGENT};

const N: usize = 4;
/// The node killed, or the one the phase waits for.
const X: usize = 1;
/// The node that holds the round in its first phase, in (b) and (c).
const Y: usize = 2;
const CFG: &str = "[round]\ndrain_grace_ms = 1000\nretry_initial_ms = 100\nretry_max_ms = 800\nstale_after_ms = 30000\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    KeyUpdateSent,
    SomeReplies,
    FirstSent,
    SecondSent,
}

impl At {
    const ALL: [At; 4] = [
        At::KeyUpdateSent,
        At::SomeReplies,
        At::FirstSent,
        At::SecondSent,
    ];

    fn name(self) -> &'static str {
        match self {
            At::KeyUpdateSent => "(a) key update sent, no reply",
            At::SomeReplies => "(b) some replies in",
            At::FirstSent => "(c) first transition sent",
            At::SecondSent => "(d) second transition sent",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    Controller,
    Node,
}

impl Kill {
    fn name(self) -> &'static str {
        match self {
            Kill::Controller => "keyfleet serve",
            Kill::Node => "node-01",
        }
    }
}

fn agent_in(f: &Fleet, i: usize, state: &str, epoch: u64) -> bool {
    agent_status(&f.nodes[i].state)
        .is_some_and(|s| s["state"] == state && s["epoch"].as_u64() == Some(epoch))
}

fn synced_in(f: &Fleet, i: usize, state: &str, epoch: u64) -> bool {
    agent_status(&f.nodes[i].state).is_some_and(|s| {
        s["state"] == state && s["epoch"].as_u64() == Some(epoch) && s["running"]["synced"] == true
    })
}

fn registered(f: &Fleet, i: usize) -> bool {
    agent_status(&f.nodes[i].state).is_some_and(|s| s["running"]["app_clients"].as_u64() >= Some(1))
}

/// The deliveries of the key of `epoch` in `history --json`.
fn deliveries(h: &Value, epoch: u64) -> Vec<Value> {
    h["keys"]
        .as_array()
        .and_then(|ks| ks.iter().find(|k| k["epoch"].as_u64() == Some(epoch)))
        .and_then(|k| k["deliveries"].as_array().cloned())
        .unwrap_or_default()
}

fn acked(d: &[Value]) -> usize {
    d.iter().filter(|d| d["acked_at_ms"].is_u64()).count()
}

fn quick_history(f: &Fleet) -> Value {
    f.json(&["history", "--json", "--audit", "0"])
}

/// Nothing the table held in `before` is lost or changed in `after`: every
/// key (epoch, check value, creation, trigger) and every delivery's first send
/// and acknowledgement; every round's start; the audit log as a prefix.
fn assert_kept(before: &Value, after: &Value, before_nodes: &Value, after_nodes: &Value) {
    let ka = after["keys"].as_array().unwrap();
    for kb in before["keys"].as_array().unwrap() {
        let a = ka
            .iter()
            .find(|a| a["epoch"] == kb["epoch"])
            .unwrap_or_else(|| panic!("key lost: {kb}"));
        for f in ["check_value", "created_at_ms", "trigger", "trigger_detail"] {
            assert_eq!(a[f], kb[f], "key {} changed its {f}", kb["epoch"]);
        }
        for d in kb["deliveries"].as_array().unwrap() {
            let same = a["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["node_id"] == d["node_id"])
                .unwrap_or_else(|| panic!("delivery lost: {d}"));
            assert_eq!(
                same["first_sent_at_ms"], d["first_sent_at_ms"],
                "first send changed: {d} → {same}"
            );
            if d["acked_at_ms"].is_u64() {
                assert_eq!(
                    same["acked_at_ms"], d["acked_at_ms"],
                    "acknowledgement changed: {d} → {same}"
                );
            }
            assert!(
                same["attempts"].as_u64() >= d["attempts"].as_u64(),
                "attempts went back: {d} → {same}"
            );
        }
    }
    let ra = after["rounds"].as_array().unwrap();
    for rb in before["rounds"].as_array().unwrap() {
        let a = ra
            .iter()
            .find(|a| a["id"] == rb["id"])
            .unwrap_or_else(|| panic!("round lost: {rb}"));
        for f in ["epoch", "started_at_ms", "nodes"] {
            assert_eq!(a[f], rb[f], "round {} changed its {f}", rb["id"]);
        }
        if rb["outcome"].is_string() {
            assert_eq!(a, rb, "a finished round changed");
        }
    }
    let (ab, aa) = (
        before["audit"].as_array().unwrap(),
        after["audit"].as_array().unwrap(),
    );
    assert!(aa.len() >= ab.len(), "audit entries lost");
    assert_eq!(
        &aa[..ab.len()],
        &ab[..],
        "the audit log before the kill changed"
    );
    let na = after_nodes.as_array().unwrap();
    for nb in before_nodes.as_array().unwrap() {
        let a = na
            .iter()
            .find(|a| a["node_id"] == nb["node_id"])
            .unwrap_or_else(|| panic!("node lost: {nb}"));
        for f in [
            "member_no",
            "address",
            "key_check",
            "enrolled_at_ms",
            "removed_at_ms",
        ] {
            assert_eq!(a[f], nb[f], "node {} changed its {f}", nb["node_id"]);
        }
    }
}

/// What the application traffic showed.
struct Tally {
    sent: usize,
    deliveries: usize,
    by_epoch: BTreeMap<u32, usize>,
    /// Required deliveries a client did not get (must stay 0: a client's full
    /// socket queue is worked off from the agent's backlog).
    not_handed_over: u64,
    /// Messages whose agent's answer never came (killed, or the answer lost).
    unconfirmed: usize,
    undecryptable: u64,
}

/// Every message an agent confirmed is delivered to every other agent's
/// client — to an agent restarted at `back[id]` (once its new process had
/// registered the client again) only the messages confirmed after that; a
/// living agent confirms every message (a killed one may leave the one it
/// held unconfirmed). No message may be missing at a client, and no agent
/// may count one in `app_dropped`; no client gets a message nobody sent; no agent saw
/// undecryptable data (its counter now, and its log lines over all its runs).
fn tally(f: &Fleet, ledger: &Ledger, back: &HashMap<String, Instant>) -> Tally {
    let ids: Vec<String> = f.nodes.iter().map(|n| n.id.clone()).collect();
    let mut t = Tally {
        sent: 0,
        deliveries: 0,
        by_epoch: BTreeMap::new(),
        not_handed_over: 0,
        unconfirmed: 0,
        undecryptable: 0,
    };
    // Per sender: (confirmed messages with the moment, unconfirmed messages).
    type Sent = (Vec<(u64, Instant)>, Vec<u64>);
    let mut sent: HashMap<String, Sent> = HashMap::new();
    for id in &ids {
        let b = ledger.book(id);
        t.sent += b.sent.len();
        t.unconfirmed += b.unconfirmed.len();
        // Only a killed agent can leave a message unanswered (the one it held
        // when it died); a living agent answers every one, even with another
        // client's socket full.
        let allowed = usize::from(back.contains_key(id));
        assert!(
            b.unconfirmed.len() <= allowed,
            "{id}'s agent left messages unanswered: {:?}",
            b.unconfirmed
        );
        sent.insert(id.clone(), (b.sent.clone(), b.unconfirmed.clone()));
    }
    for (i, r) in ids.iter().enumerate() {
        let st = agent_status(&f.nodes[i].state).expect("every agent answers at the end");
        let dropped = st["running"]["app_dropped"].as_u64().unwrap_or(0);
        let undecryptable = st["running"]["undecryptable"].as_u64().unwrap();
        let logged = f.undecryptable_logged(r) as u64;
        assert_eq!(
            (undecryptable, logged),
            (0, 0),
            "{r}: undecryptable data (counter, log lines over all runs)"
        );
        t.undecryptable += undecryptable + logged;
        let book = ledger.book(r);
        let mut missing = Vec::new();
        let mut required = 0;
        for (s, (ok, _)) in &sent {
            if s == r {
                continue;
            }
            for (n, at) in ok {
                if back.get(r).is_none_or(|b| at > b) {
                    required += 1;
                    if !book.received.contains_key(&(s.clone(), *n)) {
                        missing.push(format!("{s} #{n}"));
                    }
                }
            }
        }
        if !back.contains_key(r) {
            // Its agent ran all along: it decrypted at least every message it had to.
            let decrypted = st["running"]["delivered"].as_u64().unwrap();
            assert!(
                decrypted >= required,
                "{r}'s agent decrypted {decrypted} messages of the {required} sent to it"
            );
        }
        for ((s, n), epoch) in &book.received {
            let (ok, unconfirmed) = &sent[s];
            assert!(
                ok.iter().any(|(k, _)| k == n) || unconfirmed.contains(n),
                "{r} was handed {s} #{n}, which {s}'s agent never took"
            );
            assert_ne!(s, r, "{r} was handed its own message");
            *t.by_epoch.entry(*epoch).or_default() += 1;
        }
        // A burst (a frozen node released) may fill the client's socket queue;
        // the agent keeps those deliveries and hands them over later.
        assert!(
            missing.is_empty() && dropped == 0,
            "{r} misses {} messages (its agent dropped {dropped} for a full client socket): {missing:?}",
            missing.len()
        );
        t.not_handed_over += missing.len() as u64;
        t.deliveries += book.received.len();
    }
    t
}

/// One cell: returns its line for the table.
/// The last `n` lines of `log`, for a failure's message.
fn last_lines(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn cell(at: At, kill: Kill) -> String {
    let f = Fleet::new(N, CFG);
    // FAULT_MATRIX_KEEP=1: a failed cell's directory is copied for a look
    // (with FLEET_AGENT_LOG=keyfleet=debug the agents log every refusal).
    struct Keep(std::path::PathBuf);
    impl Drop for Keep {
        fn drop(&mut self) {
            if std::thread::panicking() && std::env::var_os("FAULT_MATRIX_KEEP").is_some() {
                let name = self.0.file_name().unwrap_or_default().to_string_lossy();
                let to = std::env::temp_dir().join(format!("fault-matrix{name}"));
                let _ = std::process::Command::new("cp")
                    .arg("-r")
                    .arg(&self.0)
                    .arg(&to)
                    .status();
                eprintln!(
                    "kept the failed cell's directory (logs, state) in {}",
                    to.display()
                );
            }
        }
    }
    let _keep = Keep(f.dir.path().to_path_buf());
    let (mut serve, mut agents) = f.up(60_000);
    let mut ledger = Ledger::start(&f, Duration::from_millis(100));
    std::thread::sleep(Duration::from_millis(300));

    // Hold the round at its phase.
    let mut frozen: Vec<usize> = match at {
        At::KeyUpdateSent => (0..N).collect(),
        At::SomeReplies | At::FirstSent => vec![Y],
        At::SecondSent => vec![],
    };
    for &i in &frozen {
        agents[i].freeze();
    }
    let _rekey = Proc::from(
        f.keyfleet(&["rekey"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let observed = match at {
        At::KeyUpdateSent => {
            wait_for("the key update sent twice to every node", 20_000, || {
                let d = deliveries(&quick_history(&f), 2);
                d.len() == N && d.iter().all(|d| d["attempts"].as_u64() >= Some(2))
            });
            let d = deliveries(&quick_history(&f), 2);
            assert_eq!(acked(&d), 0, "no node can have replied: {d:?}");
            let st = f.status();
            assert_eq!(st["round"]["phase"], "distributing", "{st}");
            format!("distributing, key sent {}x, 0/{N} replies", {
                d.iter()
                    .filter_map(|d| d["attempts"].as_u64())
                    .min()
                    .unwrap_or(0)
            })
        }
        At::SomeReplies | At::FirstSent => {
            wait_for("every reply but node-02's", 20_000, || {
                acked(&deliveries(&quick_history(&f), 2)) == N - 1
            });
            let d = deliveries(&quick_history(&f), 2);
            assert!(
                d.iter()
                    .all(|d| d["acked_at_ms"].is_u64() != (d["node_id"] == f.nodes[Y].id.as_str())),
                "node-02 is frozen, every other node replied: {d:?}"
            );
            if at == At::SomeReplies {
                let st = f.status();
                assert_eq!(st["round"]["phase"], "distributing", "{st}");
                format!("distributing, {}/{N} replies", N - 1)
            } else {
                // node-01 has replied: freeze it, let node-02 reply, and the
                // first transition goes out, unanswered by node-01.
                agents[X].freeze();
                frozen.push(X);
                agents[Y].thaw();
                frozen.retain(|&i| i != Y);
                wait_for(
                    "the first transition at every node but node-01",
                    20_000,
                    || {
                        f.status()["round"]["phase"] == "first_transition"
                            && (0..N).all(|i| i == X || agent_in(&f, i, "InTransit", 2))
                    },
                );
                let st = f.status();
                let x = st["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|n| n["node_id"] == f.nodes[X].id.as_str())
                    .unwrap();
                assert_eq!(x["state"], "DistributionCompleted", "{x}");
                format!("first_transition, {}/{N} in transit", N - 1)
            }
        }
        At::SecondSent => {
            // Every agent in transit: the drain grace (1 s) runs; freeze node-01 in it.
            let end = Instant::now() + Duration::from_secs(20);
            while !(0..N).all(|i| agent_in(&f, i, "InTransit", 2)) {
                assert!(Instant::now() < end, "the agents never all went in transit");
                std::thread::sleep(Duration::from_millis(10));
            }
            agents[X].freeze();
            frozen.push(X);
            wait_for(
                "the second transition at every node but node-01",
                20_000,
                || (0..N).all(|i| i == X || agent_in(&f, i, "UpdateCompleted", 2)),
            );
            let st = f.status();
            assert!(
                st["round"]["epoch"] == 2 && st["round"]["phase"] == "second_transition",
                "the round must wait for node-01's answer to the second transition: {st}"
            );
            format!("second_transition, {}/{N} completed", N - 1)
        }
    };

    let before = f.history();
    let before_nodes = f.status()["nodes"].clone();
    let mut back = HashMap::new();
    match kill {
        Kill::Controller => serve.kill9(),
        Kill::Node => {
            agents[X].kill9();
            ledger.killed(&f.nodes[X].id);
            frozen.retain(|&i| i != X);
        }
    }
    let t0 = Instant::now();
    match kill {
        Kill::Controller => serve = f.serve(),
        Kill::Node => agents[X] = f.agent(X),
    }
    let up_ms = t0.elapsed().as_millis();
    for i in frozen.drain(..) {
        agents[i].thaw();
    }
    let mut done_ms = None;
    let end = Instant::now() + Duration::from_secs(40);
    loop {
        if kill == Kill::Node && !back.contains_key(&f.nodes[X].id) && registered(&f, X) {
            back.insert(f.nodes[X].id.clone(), Instant::now());
        }
        if done_ms.is_none() {
            let st = f.status();
            if st["epoch"] == 2
                && st["round"].is_null()
                && (0..N).all(|i| synced_in(&f, i, "UpdateCompleted", 2))
            {
                done_ms = Some(t0.elapsed().as_millis());
            }
        }
        if done_ms.is_some() && (kill == Kill::Controller || !back.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < end,
            "{} / {}: the round did not complete after the restart: {}\n{}",
            at.name(),
            kill.name(),
            f.status(),
            f.logs("serve")
        );
        std::thread::sleep(Duration::from_millis(30));
    }
    let done_ms = done_ms.unwrap_or_default();
    // Traffic under the new key, then the account.
    std::thread::sleep(Duration::from_millis(800));
    ledger.finish();

    let after = f.history();
    let after_nodes = f.status()["nodes"].clone();
    assert_kept(&before, &after, &before_nodes, &after_nodes);
    let round = after["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["epoch"] == 2)
        .unwrap();
    assert_eq!(
        (
            round["outcome"].as_str(),
            round["acked"].as_u64(),
            round["stale"].as_u64()
        ),
        (Some("Completed"), Some(N as u64), Some(0)),
        "{round}"
    );
    assert!(
        after_nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["stale"] == false && n["epoch"] == 2),
        "{after_nodes}"
    );
    let new_audit =
        &after["audit"].as_array().unwrap()[before["audit"].as_array().unwrap().len()..];
    match kill {
        Kill::Controller => assert!(
            new_audit
                .iter()
                .any(|a| a["kind"] == "Restart" && a["detail"]["resumed_epoch"] == 2),
            "the restart is audited: {new_audit:?}"
        ),
        Kill::Node => assert!(
            new_audit.iter().any(|a| a["kind"] == "Rejoin"
                && a["node_id"] == f.nodes[X].id.as_str()
                && a["detail"]["event"] == "key_request"),
            "the restarted node's key request is audited: {new_audit:?}\n--- serve\n{}\n--- {}\n{}",
            last_lines(&f.logs("serve"), 80),
            f.nodes[X].id,
            last_lines(&f.logs(&f.nodes[X].id), 60)
        ),
    }
    let t = tally(&f, &ledger, &back);
    assert!(
        t.sent > 20,
        "too little traffic to tell: {} messages",
        t.sent
    );
    drop(agents);
    drop(serve);
    format!(
        "{:<31} | {:<14} | {:<32} | up {:>5} ms | round done {:>5} ms | {:>4} msgs, {:>5} deliveries (epoch 1: {}, epoch 2: {}), {} undecryptable, {} not handed to a slow client, {} unconfirmed",
        at.name(),
        kill.name(),
        observed,
        up_ms,
        done_ms,
        t.sent,
        t.deliveries,
        t.by_epoch.get(&1).unwrap_or(&0),
        t.by_epoch.get(&2).unwrap_or(&0),
        t.undecryptable,
        t.not_handed_over,
        t.unconfirmed,
    )
}

#[test]
fn kill_9_of_the_controller_or_a_node_at_each_phase_of_a_round() {
    let _heavy = support::heavy();
    let t0 = Instant::now();
    let jobs: usize = std::env::var("FAULT_MATRIX_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
        .max(1);
    let cells: Vec<(At, Kill)> = At::ALL
        .iter()
        .flat_map(|&at| [Kill::Controller, Kill::Node].map(|k| (at, k)))
        .collect();
    let mut results: Vec<(At, Kill, Result<String, String>)> = Vec::new();
    for chunk in cells.chunks(jobs) {
        let handles: Vec<_> = chunk
            .iter()
            .map(|&(at, k)| (at, k, std::thread::spawn(move || cell(at, k))))
            .collect();
        for (at, k, h) in handles {
            let r = h.join().map_err(|e| {
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into())
            });
            match &r {
                Ok(line) => println!("{line}"),
                Err(e) => println!("{} | {} | FAILED: {e}", at.name(), k.name()),
            }
            results.push((at, k, r));
        }
    }
    println!(
        "fault matrix: {} cells in {:.1} s ({jobs} at a time)",
        results.len(),
        t0.elapsed().as_secs_f64()
    );
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(at, k, r)| {
            r.as_ref()
                .err()
                .map(|e| format!("{} / {}: {e}", at.name(), k.name()))
        })
        .collect();
    assert!(failed.is_empty(), "failed cells:\n{}", failed.join("\n"));
}

const CFG_STALE: &str = "[round]\ndrain_grace_ms = 300\nretry_initial_ms = 100\nretry_max_ms = 800\nstale_after_ms = 1500\n";

#[test]
fn a_node_offline_across_two_rounds_rejoins_through_its_key_request() {
    let _heavy = support::heavy();
    let f = Fleet::new(N, CFG_STALE);
    let (serve, mut agents) = f.up(60_000);
    let mut ledger = Ledger::start(&f, Duration::from_millis(100));
    std::thread::sleep(Duration::from_millis(300));
    let off = N - 1;
    let id = f.nodes[off].id.clone();

    // Offline: a clean stop. Two rounds go by without it.
    let exit = agents[off].terminate();
    assert!(exit.success(), "{exit:?}");
    ledger.killed(&id);
    // Exit 3: the round completed but left a stale node out, named.
    let (r2, _) = f.json_exit(&["rekey", "--json"], 3);
    assert_eq!(r2["stale_nodes"][0], id.as_str(), "{r2}");
    assert_eq!(
        (
            r2["epoch"].as_u64(),
            r2["acked"].as_u64(),
            r2["stale"].as_u64()
        ),
        (Some(2), Some(N as u64 - 1), Some(1)),
        "{r2}"
    );
    let node = |st: &Value| {
        st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node_id"] == id.as_str())
            .cloned()
            .unwrap()
    };
    assert_eq!(node(&f.status())["stale"], true);
    let (r3, _) = f.json_exit(&["rekey", "--json"], 3);
    assert_eq!(
        (
            r3["epoch"].as_u64(),
            r3["acked"].as_u64(),
            r3["stale"].as_u64()
        ),
        (Some(3), Some(N as u64 - 1), Some(1)),
        "{r3}"
    );
    wait_for("the others at epoch 3", 10_000, || {
        (0..N).all(|i| i == off || synced_in(&f, i, "UpdateCompleted", 3))
    });
    let stored = f.nodes[off].state.clone();
    let out = std::process::Command::new(AGENT)
        .args(["status", "--json", "--state"])
        .arg(&stored)
        .output()
        .unwrap();
    let file: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            file["source"].as_str(),
            file["state"].as_str(),
            file["epoch"].as_u64()
        ),
        (Some("state_file"), Some("UpdateCompleted"), Some(1)),
        "{file}"
    );
    let audit_before = f.history()["audit"].as_array().unwrap().len();

    // Back: its key request gets it the current key (epoch 1 + 2). The
    // controller is frozen for a moment first, so that the others' data under
    // epoch 3 reaches the node before the answer does: it must not be lost.
    serve.freeze();
    agents[off] = f.agent(off);
    let mut back = HashMap::new();
    wait_for("the returning node's application client", 5_000, || {
        registered(&f, off)
    });
    back.insert(id.clone(), Instant::now());
    std::thread::sleep(Duration::from_millis(500));
    let waiting = agent_status(&f.nodes[off].state).unwrap();
    assert_eq!(
        (
            waiting["state"].as_str(),
            waiting["epoch"].as_u64(),
            waiting["running"]["synced"].as_bool()
        ),
        (Some("UpdateCompleted"), Some(1), Some(false)),
        "waiting for the controller's answer: {waiting}"
    );
    let t0 = Instant::now();
    serve.thaw();
    let answered = Instant::now();
    let (mut at_epoch_ms, mut unstale_ms) = (None, None);
    let end = Instant::now() + Duration::from_secs(30);
    while at_epoch_ms.is_none() || unstale_ms.is_none() {
        if at_epoch_ms.is_none() && synced_in(&f, off, "UpdateCompleted", 3) {
            at_epoch_ms = Some(t0.elapsed().as_millis());
        }
        if unstale_ms.is_none() && node(&f.status())["stale"] == false {
            unstale_ms = Some(t0.elapsed().as_millis());
        }
        assert!(
            Instant::now() < end,
            "{id} did not rejoin: {}\n{}",
            f.status(),
            f.logs(&id)
        );
        std::thread::sleep(Duration::from_millis(30));
    }
    let h = f.history();
    let k3 = h["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["epoch"] == 3)
        .unwrap();
    let live = agent_status(&f.nodes[off].state).unwrap();
    assert_eq!(
        live["keys"][0]["check"], k3["check_value"],
        "the rejoined node holds the current group key"
    );
    let row = node(&f.status());
    assert_eq!(
        (row["stale"].clone(), row["epoch"].clone()),
        (false.into(), 3.into()),
        "{row}"
    );
    let audit = &h["audit"].as_array().unwrap()[audit_before..];
    let rejoin: Vec<&Value> = audit
        .iter()
        .filter(|a| a["kind"] == "Rejoin" && a["node_id"] == id.as_str())
        .collect();
    assert!(
        rejoin.iter().any(|a| a["detail"]["event"] == "key_request"
            && a["detail"]["held"] == 1
            && a["detail"]["epoch"] == 3),
        "the key request is audited: {rejoin:?}"
    );
    assert!(
        rejoin
            .iter()
            .any(|a| a["detail"]["epoch"] == 3 && a["detail"]["reason"].is_string()),
        "the end of its staleness is audited: {rejoin:?}"
    );

    // Data after the rejoin, both ways.
    std::thread::sleep(Duration::from_millis(1000));
    ledger.finish();
    let t = tally(&f, &ledger, &back);
    let back_at = back[&id];
    let from_it = ledger
        .book(&id)
        .sent
        .iter()
        .filter(|(_, at)| *at > back_at)
        .count();
    let to_it = ledger
        .book(&id)
        .received
        .values()
        .filter(|&&e| e == 3)
        .count();
    assert!(
        from_it > 3 && to_it > 3,
        "{from_it} sent by {id} after rejoining, {to_it} received"
    );
    // Sealed under epoch 3 and sent to it while it still held epoch 1 only
    // (the tally above has checked that it got every one).
    let early: usize = f
        .nodes
        .iter()
        .filter(|n| n.id != id)
        .map(|n| {
            ledger
                .book(&n.id)
                .sent
                .iter()
                .filter(|(_, at)| *at > back_at && *at < answered)
                .count()
        })
        .sum();
    assert!(
        early >= 5,
        "only {early} messages reached {id} before the answer"
    );
    println!(
        "offline across two rounds: {id} at epoch 3 {} ms after the controller answered (held 500 ms), no longer stale after {} ms; {} messages, {} deliveries ({:?} by epoch), {from_it} sent by it after the rejoin and {to_it} received ({early} of them before it held the key), {} undecryptable",
        at_epoch_ms.unwrap_or_default(),
        unstale_ms.unwrap_or_default(),
        t.sent,
        t.deliveries,
        t.by_epoch,
        t.undecryptable
    );
}
