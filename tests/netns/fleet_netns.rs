//! The fleet on a lossy network: `keyfleet serve` and five `keyfleet-agent`
//! processes inside a fresh network namespace whose nftables drop 20% of the
//! UDP datagrams (control and data alike), rotated twice while applications
//! exchange messages.
//!
//! Skipped, with the reason printed, where the namespace or the rule cannot be
//! set up (not root, no `ip`/`nft`, no nf_tables); CI installs nftables and
//! runs it as root.

use crate::support;
use crate::support::netns;

use netns::Netns;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::fleet::{agent_status, Chatter, Fleet};

#[test]
fn fleet_rotates_with_20_percent_of_udp_dropped_by_nftables() {
    let _heavy = support::heavy();
    let ns = match Netns::create("fleet") {
        Ok(ns) => ns,
        Err(reason) => {
            eprintln!("SKIPPED fleet_rotates_with_20_percent_of_udp_dropped_by_nftables: {reason}");
            return;
        }
    };
    if let Err(reason) = ns.drop_udp_percent(20) {
        eprintln!("SKIPPED fleet_rotates_with_20_percent_of_udp_dropped_by_nftables: {reason}");
        return;
    }
    let mut f = Fleet::new(5, "");
    f.wrap = ["ip", "netns", "exec", ns.name()]
        .map(String::from)
        .to_vec();
    f.init_and_enroll();
    let _serve = f.serve();
    let _agents = f.agents();
    let e0 = f.wait_converged(60_000);
    let chatter = Chatter::start(&f, Duration::from_millis(150));
    std::thread::sleep(Duration::from_millis(500));
    for r in 1..=2 {
        let round = f.json(&["rekey", "--json"]);
        assert_eq!(round["epoch"].as_u64(), Some(e0 + r), "{round}");
        assert_eq!(
            round["acked"], 5,
            "every node acknowledged despite the loss: {round}"
        );
        assert_eq!(round["stale"], 0, "{round}");
    }
    let epoch = f.wait_converged(30_000);
    assert_eq!(epoch, e0 + 2);
    let t = chatter.finish();
    let sent = t.sent.load(Ordering::Relaxed);
    let received = t.received.load(Ordering::Relaxed);
    let possible = sent * 4;
    eprintln!(
        "{sent} messages sent, {received} of {possible} copies received, {} datagrams dropped by nftables",
        ns.dropped_packets().unwrap_or(0)
    );
    assert!(ns.dropped_packets().expect("the rule's counter") > 0);
    // About 80% arrive: the rule drops a datagram for all its receivers at once.
    assert!(
        received * 100 >= possible * 60 && received < possible,
        "received {received} of {possible}"
    );
    for n in &f.nodes {
        assert_eq!(f.undecryptable_logged(&n.id), 0, "{}", f.logs(&n.id));
        let s = agent_status(&n.state).expect("status");
        assert_eq!(s["running"]["undecryptable"], 0, "{s}");
    }
    let st = f.json(&["status", "--json"]);
    let nodes = st["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 5, "{st}");
    assert!(
        nodes
            .iter()
            .all(|n| n["stale"] == false && n["epoch"].as_u64() == Some(epoch)),
        "{st}"
    );
}
