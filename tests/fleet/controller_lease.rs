//! Issue 16 with real processes: two `keyfleet serve` of one fleet on one
//! PostgreSQL management table (a real server the test starts). The second
//! (a standby: a copy of the first's `controller.secrets`) waits, silent,
//! while the first holds the leader lease; the first frozen (SIGSTOP) past
//! its lease, the second takes it under term 2 and continues the fleet from
//! the table; the first, thawed, sends nothing to its group and stops with an
//! error naming the lost lease.
use crate::support;
#[allow(dead_code)]
use crate::support::testpg;
use crate::support::wiretap;

use keyfleet_core::wire::{self, Message};
use std::time::{Duration, Instant};
use support::ctl::*;
use support::wait_for;

/// The leader term of a controller message.
fn term(payload: &[u8]) -> Option<u32> {
    match wire::decode(payload).ok()? {
        Message::Beacon(b) => Some(b.term),
        Message::KeyUpdate(k) => Some(k.term),
        Message::Transition(t) => Some(t.term),
        Message::KeyResponse(k) => Some(k.term),
        Message::Resync(r) => Some(r.term),
        _ => None,
    }
}

#[test]
fn a_standby_serve_waits_then_takes_over_and_the_thawed_leader_sends_nothing() {
    let _heavy = support::heavy();
    let Some(pg) = testpg::shared() else { return };
    let url = pg.create_db();
    let config = format!(
        "[beacon]\ninterval_ms = 200\n[store]\nurl = \"{url}\"\nlease_ms = 1500\nlease_margin_ms = 500\n"
    );
    let a = Ctl::new(&config);
    let init: serde_json::Value =
        serde_json::from_slice(&a.run(&["init", "--json"]).stdout).unwrap();
    let public: [u8; 32] = hex::decode(init["public_key"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let fleet_key = ed25519_dalek::VerifyingKey::from_bytes(&public).unwrap();
    // Its own `init` on the same table is refused: the table has a fleet.
    let other = Ctl::new(&config);
    let out = other.cmd(&["init"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("already holds a controller's state"), "{err}");
    let b = Ctl::standby_of(&a, &config);
    let tap = wiretap::Tap::port(a.group.port());
    let mut pa = a.serve();
    wait_for("a's beacons", 5_000, || {
        tap.heard()
            .iter()
            .any(|h| h.to == a.group && term(&h.payload) == Some(1))
    });

    // b while a's lease runs: a silent standby that says whom it waits for.
    let mut pb = b.serve_waiting();
    wait_for("b's standby line", 5_000, || {
        b.serve_logs().contains("standby")
    });
    std::thread::sleep(Duration::from_millis(600));
    let from_b = tap
        .heard()
        .iter()
        .filter(|h| h.from.port() == b.ctl_port)
        .count();
    assert_eq!(from_b, 0, "the standby sent {from_b} datagrams");
    assert!(pb.alive(), "the standby waits: {}", b.serve_logs());
    println!(
        "standby: {}",
        b.serve_logs()
            .lines()
            .find(|l| l.contains("standby"))
            .unwrap_or("")
    );

    // a frozen past its lease: b takes it under term 2, on its own, with
    // a's identity (the fleet's state from the table).
    pa.freeze();
    let frozen = Instant::now();
    wait_for("b's beacons under term 2", 10_000, || {
        tap.heard()
            .iter()
            .any(|h| h.from.port() == b.ctl_port && term(&h.payload) == Some(2))
    });
    let taken = frozen.elapsed();
    let st = b.json(&["status", "--json"]);
    assert_eq!(st["leader"]["term"], 2, "{st}");
    let signed_by_the_fleet = |h: &wiretap::Heard| match wire::decode(&h.payload) {
        Ok(Message::Beacon(bc)) => {
            keyfleet_core::crypto::verify(&fleet_key, bc.auth.body, &bc.auth.signature)
        }
        _ => false,
    };
    assert!(
        tap.heard()
            .iter()
            .filter(|h| h.from.port() == b.ctl_port && term(&h.payload) == Some(2))
            .all(signed_by_the_fleet),
        "b's beacons are signed with the fleet's key"
    );
    println!(
        "b leads under term 2, its first beacon {} ms after a froze (lease 1500 ms)",
        taken.as_millis()
    );

    // a thawed: nothing more on its group, and it stops with an error.
    let before = tap.heard().len();
    pa.thaw();
    let thawed = Instant::now();
    while pa.alive() && thawed.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!pa.alive(), "a still runs 10 s after it was thawed");
    let status = pa.child.wait().unwrap();
    assert!(!status.success(), "a exits non-zero");
    std::thread::sleep(Duration::from_millis(300));
    let after: Vec<_> = tap.heard()[before..]
        .iter()
        .filter(|h| h.to == a.group)
        .filter_map(|h| term(&h.payload))
        .collect();
    assert!(
        after.is_empty(),
        "a sent after it was thawed: terms {after:?}"
    );
    let logs = a.serve_logs();
    assert!(logs.contains("lost the leader lease"), "{logs}");
    println!(
        "a stopped {} ms after the thaw, having sent nothing",
        thawed.elapsed().as_millis()
    );
    assert!(pb.alive());
    pb.terminate();
}
