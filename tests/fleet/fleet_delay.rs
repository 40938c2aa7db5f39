//! The drain grace from measurement (issue 11.1, SPEC S2) on real
//! processes: `keyfleet serve` with the default configuration (the drain is
//! twice the round's slowest acknowledgement round trip), agents that hold
//! every received control message 15-25 ms and every received data message
//! 30-40 ms (`--delay-ms 20 --data-delay-ms 35 --delay-jitter-ms 5`: data in
//! flight longer than control, reordered), applications sending every 20 ms
//! through every rotation. Every message must reach every other
//! application, none undecryptable. The same fleet with a fixed 1 ms drain,
//! its data held 95-105 ms (well past the second transition request, so the
//! loss does not hang on one unlucky timing), loses messages: the wait is
//! what keeps them.

use crate::support;

use std::time::Duration;

use support::fleet::{Fleet, Ledger};

const ROUNDS: usize = 3;

/// Runs `ROUNDS` rekeys under traffic, received data held `data_delay_ms`
/// (± 5); (undecryptable in the agents, messages not delivered to some
/// application, drain ms of each round, sent).
fn rotate_with_delays(cfg: &str, data_delay_ms: u32) -> (u64, usize, Vec<u64>, usize) {
    let mut f = Fleet::new(6, cfg);
    for n in &mut f.nodes {
        n.args = [
            "--delay-ms".to_owned(),
            "20".to_owned(),
            "--data-delay-ms".to_owned(),
            data_delay_ms.to_string(),
            "--delay-jitter-ms".to_owned(),
            "5".to_owned(),
        ]
        .to_vec();
    }
    let (_serve, _agents) = f.up(60_000);
    let mut ledger = Ledger::start(&f, Duration::from_millis(20));
    std::thread::sleep(Duration::from_millis(300));
    let mut drains = Vec::new();
    for _ in 0..ROUNDS {
        let r = f.json(&["rekey", "--json"]);
        assert_eq!(r["outcome"], "completed", "{r}");
        assert_eq!(r["acked"].as_u64(), Some(6), "{r}");
        drains.push(r["phases_ms"]["draining"].as_u64().unwrap());
        std::thread::sleep(Duration::from_millis(200));
    }
    ledger.finish();
    let undecryptable = f.undecryptable();
    let (sent, missing) = ledger.missing(&f);
    (undecryptable, missing, drains, sent)
}

#[test]
fn data_delayed_more_than_control_stays_readable_with_the_measured_drain() {
    let _heavy = support::heavy();
    let (undecryptable, missing, drains, sent) = rotate_with_delays("", 35);
    println!(
        "measured drain: {ROUNDS} rounds, drains {drains:?} ms, {sent} messages sent, \
         {missing} deliveries missing, {undecryptable} undecryptable"
    );
    assert_eq!((undecryptable, missing), (0, 0));
    // The drain covers data held 40 ms: at least twice the slowest round trip
    // (every request waited at least 15 ms in its receiver).
    assert!(drains.iter().all(|d| *d >= 30), "{drains:?}");

    let (undecryptable, missing, drains, sent) =
        rotate_with_delays("[round]\ndrain_grace_ms = 1\n", 100);
    println!(
        "fixed 1 ms drain: {ROUNDS} rounds, drains {drains:?} ms, {sent} messages sent, \
         {missing} deliveries missing, {undecryptable} undecryptable"
    );
    assert!(
        undecryptable > 0,
        "with no drain some old-key data arrives after its receiver dropped the key"
    );
}
