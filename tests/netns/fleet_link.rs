//! A node whose link drops and returns, without a restart (issue 12, SPEC §5).
//!
//! `keyfleet serve` and three agents live in one network namespace, a fourth
//! agent in another, joined by a veth pair. Applications send all the while.
//! The fourth agent's link goes down, a whole rekey round runs without it (it
//! is marked stale), and the link comes back. The test prints the time from
//! link-up to that node holding the current key, and checks that every
//! message any agent sent after link-up reached every other agent, none
//! undecryptable, none dropped.
//!
//! Skipped, with the reason printed, where namespaces cannot be set up (not
//! root, no `ip`).

use crate::support;
use crate::support::netns;

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use netns::Netns;
use support::fleet::{agent_status, Fleet, Ledger};
use support::wait_for;

const A_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces joined by a veth pair `kfa` (in `a`, 10.77.0.1/24) — `kfb` (in `b`, 10.77.0.2/24).
fn veth_pair() -> Result<(Netns, Netns), String> {
    let a = Netns::create("linka")?;
    let b = Netns::create("linkb")?;
    ip(&[
        "link",
        "add",
        "kfa",
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        "kfb",
        "netns",
        b.name(),
    ])?;
    ip(&["-n", a.name(), "addr", "add", "10.77.0.1/24", "dev", "kfa"])?;
    ip(&["-n", b.name(), "addr", "add", "10.77.0.2/24", "dev", "kfb"])?;
    ip(&["-n", a.name(), "link", "set", "kfa", "up"])?;
    ip(&["-n", b.name(), "link", "set", "kfb", "up"])?;
    Ok((a, b))
}

fn wrap(ns: &Netns) -> Vec<String> {
    ["ip", "netns", "exec", ns.name()]
        .map(String::from)
        .to_vec()
}

#[test]
fn a_node_whose_link_drops_across_a_round_catches_up_at_link_up_and_loses_nothing() {
    let _heavy = support::heavy();
    let (a, b) = match veth_pair() {
        Ok(p) => p,
        Err(reason) => {
            eprintln!("SKIPPED a_node_whose_link_drops_across_a_round: {reason}");
            return;
        }
    };
    // Nodes that do not answer are stale after 3 s, so the round ends without node 3.
    let mut f = Fleet::new(4, "[round]\nstale_after_ms = 3000\n");
    f.wrap = wrap(&a);
    f.set_controller_ip(A_IP);
    for i in 0..3 {
        f.set_node_ip(i, A_IP);
    }
    f.set_node_ip(3, B_IP);
    f.nodes[3].wrap = Some(wrap(&b));
    let away = f.nodes[3].id.clone();
    let (_serve, _agents) = f.up(60_000);
    let e0 = f.wait_converged(30_000);

    let mut ledger = Ledger::start(&f, Duration::from_millis(200));
    std::thread::sleep(Duration::from_millis(1000));

    ip(&["-n", b.name(), "link", "set", "kfb", "down"]).unwrap();
    let down_at = Instant::now();
    // A full round while it is away; `rekey` may report the stale node as a failure.
    let rekey = f.keyfleet(&["rekey", "--json"]).output().unwrap();
    eprintln!(
        "rekey while {away} was away: {} {}",
        rekey.status,
        String::from_utf8_lossy(&rekey.stdout).trim()
    );
    wait_for("the round to finish without the away node", 30_000, || {
        let st = f.status();
        st["epoch"].as_u64() == Some(e0 + 1)
    });
    let st = agent_status(&f.nodes[3].state).expect("the away agent answers");
    assert_eq!(st["epoch"].as_u64(), Some(e0), "it missed the round: {st}");
    std::thread::sleep(Duration::from_millis(1000));

    // Link up.
    let up_at = Instant::now();
    ip(&["-n", b.name(), "link", "set", "kfb", "up"]).unwrap();
    let mut caught_up = None;
    wait_for("the away node to hold the current key", 20_000, || {
        let ok = agent_status(&f.nodes[3].state).is_some_and(|s| {
            s["state"] == "UpdateCompleted"
                && s["epoch"].as_u64() == Some(e0 + 1)
                && s["running"]["synced"] == true
        });
        if ok {
            caught_up = Some(up_at.elapsed());
        }
        ok
    });
    let caught_up = caught_up.unwrap();
    std::thread::sleep(Duration::from_millis(3000));
    ledger.finish();

    // Every message confirmed after link-up reached every other agent; so did
    // what the away node's applications sent while its link was down (held).
    let (mut after, mut missing) = (0u64, Vec::new());
    for s in &f.nodes {
        let book = ledger.book(&s.id);
        let since = if s.id == away { down_at } else { up_at };
        for (k, _) in book.sent.iter().filter(|(_, at)| *at >= since) {
            after += 1;
            for r in f.nodes.iter().filter(|r| r.id != s.id) {
                if !ledger
                    .book(&r.id)
                    .received
                    .contains_key(&(s.id.clone(), *k))
                {
                    missing.push(format!("{} #{k} → {}", s.id, r.id));
                }
            }
        }
    }
    let held_while_away = ledger
        .book(&away)
        .sent
        .iter()
        .filter(|(_, at)| *at >= down_at && *at < up_at)
        .count();
    let undecryptable: u64 = f
        .nodes
        .iter()
        .map(|n| {
            agent_status(&n.state).expect("status")["running"]["undecryptable"]
                .as_u64()
                .unwrap_or(u64::MAX)
        })
        .sum();
    let dropped: u64 = f.nodes.iter().map(|n| ledger.book(&n.id).refused).sum();
    println!(
        "link-up to holding the current key (epoch {}): {} ms; {after} messages sent after link-up (and held while down), {} copies missing, {undecryptable} undecryptable, {dropped} dropped; {held_while_away} messages of the away node held while it was down",
        e0 + 1,
        caught_up.as_millis(),
        missing.len()
    );
    assert!(missing.is_empty(), "not delivered: {missing:?}");
    assert_eq!(undecryptable, 0);
    for n in &f.nodes {
        assert_eq!(f.undecryptable_logged(&n.id), 0, "{}", f.logs(&n.id));
        let b = ledger.book(&n.id);
        assert_eq!(
            (b.refused, b.unconfirmed.len()),
            (0, 0),
            "{}: none dropped",
            n.id
        );
    }
    assert!(after > 0, "traffic after link-up");
    let log = f.logs(&away);
    assert!(
        log.contains("link down") && log.contains("link up"),
        "the agent saw the link go and come through rtnetlink: {log}"
    );
}
