//! Issue 16 with real processes: two `keyfleet serve` on one PostgreSQL
//! management table (a real server the test starts). The second is refused
//! while the first holds the leader lease; the first frozen (SIGSTOP) past
//! its lease, the second takes it under term 2; the first, thawed, sends
//! nothing to its group and stops with an error naming the lost lease.
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
fn a_second_serve_is_refused_then_takes_over_and_the_thawed_leader_sends_nothing() {
    let _heavy = support::heavy();
    let Some(pg) = testpg::shared() else { return };
    let url = pg.create_db();
    let config = format!(
        "[beacon]\ninterval_ms = 200\n[store]\nurl = \"{url}\"\nlease_ms = 1500\nlease_margin_ms = 500\n"
    );
    let a = Ctl::new(&config);
    let b = Ctl::new(&config);
    a.run(&["init"]);
    b.run(&["init"]);
    let tap = wiretap::Tap::port(a.group.port());
    let mut pa = a.serve();
    wait_for("a's beacons", 5_000, || {
        tap.heard()
            .iter()
            .any(|h| h.to == a.group && term(&h.payload) == Some(1))
    });

    // b while a's lease runs: refused, with a message that says why.
    let t0 = Instant::now();
    let out = b.cmd(&["serve"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("leader lease is held by"), "{err}");
    println!(
        "second serve refused in {} ms: {}",
        t0.elapsed().as_millis(),
        err.lines().last().unwrap_or("")
    );

    // a frozen past its lease: b takes it under term 2.
    pa.freeze();
    let frozen = Instant::now();
    std::thread::sleep(Duration::from_millis(1_600));
    let mut pb = b.serve();
    let taken = frozen.elapsed();
    let st = b.json(&["status", "--json"]);
    assert_eq!(st["leader"]["term"], 2, "{st}");
    println!(
        "b leads under term 2, {} ms after a froze",
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
