//! `keyfleet demo` as a newcomer runs it: a controller and five
//! `keyfleet-agent` processes on loopback, two rotations while they exchange
//! messages, the fleet table at the end.

use crate::support;
use std::process::Command;

#[test]
fn the_demo_rotates_twice_with_nothing_undecryptable() {
    let _heavy = support::heavy();
    let out = Command::new(env!("CARGO_BIN_EXE_keyfleet"))
        .args(["demo", "--json"])
        .env_remove("KEYFLEET_PASSPHRASE")
        .output()
        .expect("run keyfleet demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "keyfleet demo --json printed no JSON ({e}); exit {:?}\nstdout: {}\nstderr: {stderr}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert!(out.status.success(), "exit {:?}: {r}\n{stderr}", out.status);
    assert_eq!(r["ok"], true, "{r}");
    let rounds = r["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2, "{r}");
    let first = rounds[0]["epoch"].as_u64().expect("epoch");
    for (i, round) in rounds.iter().enumerate() {
        assert_eq!(round["epoch"].as_u64(), Some(first + i as u64), "{round}");
        assert_eq!(
            (round["nodes"].as_u64(), round["acked"].as_u64()),
            (Some(5), Some(5)),
            "{round}"
        );
        assert_eq!(round["stale"], 0, "{round}");
    }
    assert_eq!(r["undecryptable"], 0, "{r}");
    let sent = r["messages"]["sent"].as_u64().expect("sent");
    let received = r["messages"]["received"].as_u64().expect("received");
    assert!(sent > 20, "{r}");
    // Loopback loses nothing: each message reaches the four other agents.
    assert!(
        received * 100 >= sent * 4 * 95,
        "{received} of {} copies",
        sent * 4
    );
    // The fleet table: five nodes, all at the last epoch, none stale.
    let nodes = r["fleet"]["nodes"].as_array().expect("fleet table");
    assert_eq!(nodes.len(), 5, "{r}");
    let last = first + 1;
    assert_eq!(r["fleet"]["epoch"].as_u64(), Some(last), "{r}");
    for n in nodes {
        assert_eq!(n["stale"], false, "{n}");
        assert_eq!(n["epoch"].as_u64(), Some(last), "{n}");
    }
    // The temporary directory is gone (no --keep).
    let dir = r["dir"].as_str().expect("dir");
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
}
