//! What `keyfleet rekey` tells its user (issues 11.4 and 15.4), on real
//! processes: `serve`, agents on loopback multicast, `rekey` as a user runs it.
//!
//! - it names the stale nodes and the enrolled nodes that never joined, and
//!   counts enrolled, joined, acknowledged, stale and not joined; a stale
//!   node makes it exit 3;
//! - a second `rekey` during a round says that it is queued, and reports the
//!   round it waited for as well as its own;
//! - Ctrl-C says where the round goes (on in `serve`; finished by the next
//!   `rekey` without one) and exits 130; the next `rekey` reports the round
//!   it finished as well as its own.
use crate::support;

use std::process::Stdio;

use support::fleet::{agent_status, Fleet};
use support::{wait_for, Proc};

const CFG: &str = "[round]\ndrain_grace_ms = 3000\nretry_initial_ms = 100\nretry_max_ms = 800\nstale_after_ms = 2000\n[rekey]\njoin_wait_ms = 3000\nlinger_ms = 200\n";

fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn sigint(p: &Proc) {
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&p.child),
        rustix::process::Signal::INT,
    )
    .unwrap();
}

fn wait_round(f: &Fleet, epoch: u64) {
    wait_for(
        &format!("the round for epoch {epoch} in progress"),
        15_000,
        || f.status()["round"]["epoch"] == epoch,
    );
}

/// Waits for the process to end; its exit code and stderr.
fn finish(mut p: Proc) -> (Option<i32>, String) {
    use std::io::Read;
    let status = p.child.wait().unwrap();
    let mut err = String::new();
    if let Some(mut e) = p.child.stderr.take() {
        e.read_to_string(&mut err).unwrap();
    }
    (status.code(), err)
}

#[test]
fn rekey_names_stale_and_unjoined_nodes_and_fails_on_a_stale_one() {
    let _heavy = support::heavy();
    let f = Fleet::new(4, CFG);
    f.init_and_enroll();
    let _serve = f.serve();
    // node-03 is enrolled but never runs.
    let mut agents: Vec<Proc> = (0..3).map(|i| f.agent(i)).collect();
    wait_for("three agents joined", 20_000, || {
        (0..3).all(|i| {
            agent_status(&f.nodes[i].state).is_some_and(|s| s["running"]["synced"] == true)
        })
    });
    let (r, _) = f.json_exit(&["rekey", "--json"], 0);
    println!("all joined ones answer: {r}");
    assert_eq!(
        (
            r["nodes"].as_u64(),
            r["joined"].as_u64(),
            r["acked"].as_u64(),
            r["not_joined"].as_u64()
        ),
        (Some(4), Some(3), Some(3), Some(1)),
        "{r}"
    );
    assert_eq!(names(&r["not_joined_nodes"]), ["node-03"]);
    assert_eq!(r["outcome"], "completed");

    // node-02 goes away: the next round leaves it stale, names it, and fails.
    agents[2].terminate();
    let (r, err) = f.json_exit(&["rekey", "--json"], 3);
    println!("one stale: {r}\n{err}");
    assert_eq!(
        (
            r["joined"].as_u64(),
            r["acked"].as_u64(),
            r["stale"].as_u64()
        ),
        (Some(3), Some(2), Some(1)),
        "{r}"
    );
    assert_eq!(names(&r["stale_nodes"]), ["node-02"]);
    assert_eq!(names(&r["not_joined_nodes"]), ["node-03"]);
    assert!(err.contains("stale nodes: node-02"), "{err}");

    // The text report names them too.
    let out = f.keyfleet(&["rekey"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        text.contains("4 enrolled: 3 joined, 2 acknowledged, 1 stale, 1 not joined"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("stale") && l.contains("node-02")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("not joined") && l.contains("node-03")),
        "{text}"
    );
    let st = f.keyfleet(&["status"]).output().unwrap();
    let st = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.contains("4 nodes enrolled: 3 joined (1 stale), 1 not joined"),
        "{st}"
    );
    drop(agents);
}

#[test]
fn a_second_rekey_during_a_round_says_it_is_queued_and_reports_both_rounds() {
    let _heavy = support::heavy();
    let f = Fleet::new(3, CFG);
    let (_serve, _agents) = f.up(30_000);
    let first = Proc::from(
        f.keyfleet(&["rekey", "--json"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_round(&f, 2);
    let (r, err) = f.json_exit(&["rekey", "--json"], 0);
    println!("second rekey: {err}{r}");
    assert!(
        err.contains("the round for epoch 2 is in progress")
            && err.contains("this rekey is queued: the round for epoch 3 follows it"),
        "{err}"
    );
    assert_eq!(r["epoch"], 3, "{r}");
    assert_eq!(r["earlier"][0]["epoch"], 2, "{r}");
    assert_eq!(r["earlier"][0]["acked"], 3, "{r}");
    assert_eq!(finish(first).0, Some(0));

    // A third and fourth while a round runs: the fourth joins the third's queue.
    let a = Proc::from(
        f.keyfleet(&["rekey", "--json"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_round(&f, 4);
    let queued = || {
        f.history()["audit"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["kind"] == "Trigger" && a["detail"]["outcome"] == "queued")
            .count()
    };
    let q0 = queued();
    let b = Proc::from(
        f.keyfleet(&["rekey", "--json"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for("the third rekey queued", 10_000, || queued() > q0);
    let (code, err) = {
        let c = Proc::from(
            f.keyfleet(&["rekey", "--json"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        finish(c)
    };
    println!("fourth rekey: {err}");
    assert_eq!(code, Some(0));
    assert!(err.contains("this one joins it (epoch 5)"), "{err}");
    assert_eq!(finish(b).0, Some(0));
    assert_eq!(finish(a).0, Some(0));
    let h = f.history();
    let rounds: Vec<_> = h["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["epoch"].as_u64().unwrap(),
                r["outcome"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    assert_eq!(
        rounds,
        (2..=5)
            .map(|e| (e, "Completed".to_string()))
            .collect::<Vec<_>>()
    );
}

#[test]
fn ctrl_c_says_where_the_round_goes_and_the_next_rekey_reports_both_rounds() {
    let _heavy = support::heavy();
    let f = Fleet::new(3, CFG);
    let (mut serve, _agents) = f.up(30_000);

    // Through serve: the round goes on there.
    let c = Proc::from(
        f.keyfleet(&["rekey"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_round(&f, 2);
    sigint(&c);
    let (code, err) = finish(c);
    println!("Ctrl-C with serve: {err}");
    assert_eq!(code, Some(130));
    assert!(
        err.contains("interrupted: the round for epoch 2 goes on in keyfleet serve"),
        "{err}"
    );
    wait_for("serve to complete the round", 20_000, || {
        let s = f.status();
        s["epoch"] == 2 && s["round"].is_null()
    });

    // Without serve: the round is left to the next command.
    serve.terminate();
    let c = Proc::from(
        f.keyfleet(&["rekey"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_round(&f, 3);
    sigint(&c);
    let (code, err) = finish(c);
    println!("Ctrl-C without serve: {err}");
    assert_eq!(code, Some(130));
    assert!(
        err.contains("interrupted: the round for epoch 3 is left unfinished; the next keyfleet rekey or keyfleet serve finishes it"),
        "{err}"
    );
    assert_eq!(f.status()["epoch"], 2, "the old key stays current");
    let (r, err) = f.json_exit(&["rekey", "--json"], 0);
    println!("the next rekey: {err}{r}");
    assert!(err.contains("a controller that stopped left it"), "{err}");
    assert_eq!(r["epoch"], 4, "{r}");
    assert_eq!(r["earlier"][0]["epoch"], 3, "{r}");
    assert_eq!(r["earlier"][0]["outcome"], "completed", "{r}");
    let out = f.keyfleet(&["history"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().filter(|l| l.contains("Completed")).count() >= 3,
        "{text}"
    );
}

#[test]
fn without_serve_a_round_nobody_answers_is_left_paused_to_the_next_rekey() {
    let _heavy = support::heavy();
    let f = Fleet::new(3, CFG);
    let (mut serve, agents) = f.up(30_000);
    serve.terminate();
    // Every agent frozen: the one-shot rekey reaches nobody.
    for a in &agents {
        a.freeze();
    }
    let (r, err) = f.json_exit(&["rekey", "--json"], 4);
    println!("one-shot rekey, nobody answers: {r}\n{err}");
    assert_eq!(
        (
            r["outcome"].as_str(),
            r["epoch"].as_u64(),
            r["current_epoch"].as_u64()
        ),
        (Some("paused"), Some(2), Some(1)),
        "{r}"
    );
    assert_eq!(r["carried_on_by"], "next_command", "{r}");
    assert_eq!(names(&r["silent_nodes"]), ["node-00", "node-01", "node-02"]);
    assert_eq!(r["stale"], 0, "{r}");
    let h = f.history();
    assert_eq!(
        h["rounds"][0]["outcome"],
        serde_json::Value::Null,
        "{}",
        h["rounds"]
    );
    assert!(h["rounds"][0]["paused_at_ms"].is_u64());
    let text = String::from_utf8_lossy(&f.run(&["status"]).stdout).into_owned();
    assert!(
        text.contains("rotating to 2") && text.contains("paused since"),
        "{text}"
    );
    // They come back; the next rekey finishes that round, then its own.
    for a in &agents {
        a.thaw();
    }
    let (r, err) = f.json_exit(&["rekey", "--json"], 0);
    println!("the next rekey: {err}{r}");
    assert_eq!(r["earlier"][0]["epoch"], 2, "{r}");
    assert_eq!(r["earlier"][0]["acked"], 3, "{r}");
    assert_eq!(
        (r["epoch"].as_u64(), r["acked"].as_u64()),
        (Some(3), Some(3))
    );
    let rounds = f.history()["rounds"].clone();
    assert_eq!(rounds[0]["outcome"], "Completed", "{rounds}");
    assert_eq!(rounds[0]["pauses"], 1, "{rounds}");
    assert_eq!(rounds[1]["outcome"], "Completed", "{rounds}");
}
