//! The fsyncs of one rekey round on both sides (issue 11.3, first step: count
//! them): `strace -f -c` attached to a real `keyfleet serve` and to one real
//! agent while `keyfleet rekey` runs a round across 10 agents, and until the
//! agent took the next round's share notice. Prints the counts and checks the
//! agent's: one flush a round, the notice's, while idle (issue 11.3); skipped
//! (with a line saying so) where strace is not installed.

use crate::support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::fleet::{agent_status, Fleet};
use support::Proc;

/// `strace -c` attached to `pid`, counting the sync calls into `out`.
fn strace(pid: u32, out: &std::path::Path) -> Proc {
    Proc::from(
        Command::new("strace")
            .args(["-f", "-c", "-e", "trace=fsync,fdatasync,sync_file_range"])
            .arg("-o")
            .arg(out)
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Calls per syscall from a `strace -c` summary.
fn calls(summary: &str) -> Vec<(String, u64)> {
    summary
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // % time, seconds, usecs/call, calls, [errors,] syscall
            let name = *f.last()?;
            if !name.chars().all(|c| c.is_ascii_lowercase() || c == '_') || name == "total" {
                return None;
            }
            Some((name.to_string(), f.get(3)?.parse().ok()?))
        })
        .collect()
}

#[test]
fn fsyncs_of_one_round_on_both_sides() {
    let _heavy = support::heavy();
    if Command::new("strace").arg("-V").output().is_err() {
        println!("strace is not installed: nothing counted (apt-get install -y strace)");
        return;
    }
    let f = Fleet::new(10, "");
    let (serve, agents) = f.up(60_000);
    // The share notices agent 0 took (each flushed its announced share).
    let notices = || -> u64 {
        agent_status(&f.nodes[0].state)
            .and_then(|s| s["running"]["share_notices"].as_u64())
            .unwrap_or(0)
    };
    // The notice before the round is taken (and flushed) before counting; a
    // beacon's copy made after a key response moved the share is too.
    support::wait_for("agent 0's first share notice", 10_000, || notices() >= 1);
    std::thread::sleep(Duration::from_millis(1200));
    let before = notices();
    let (s_out, a_out) = (
        f.dir.path().join("serve.strace"),
        f.dir.path().join("agent.strace"),
    );
    let mut s = strace(serve.child.id(), &s_out);
    let mut a = strace(agents[0].child.id(), &a_out);
    std::thread::sleep(Duration::from_millis(500));
    let r = f.json(&["rekey", "--json"]);
    assert_eq!(r["outcome"], "completed", "{r}");
    // The next round's share, announced once the round is over.
    support::wait_for("agent 0's next share notice", 10_000, || notices() > before);
    std::thread::sleep(Duration::from_millis(100));
    for p in [&mut s, &mut a] {
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&p.child),
            rustix::process::Signal::INT,
        )
        .unwrap();
        p.child.wait().unwrap();
    }
    let serve_calls = calls(&std::fs::read_to_string(&s_out).unwrap_or_default());
    let agent_calls = calls(&std::fs::read_to_string(&a_out).unwrap_or_default());
    println!(
        "one round across 10 agents ({} ms, phases {}): keyfleet serve {serve_calls:?}; one agent {agent_calls:?}",
        r["elapsed_ms"], r["phases_ms"]
    );
    let total = |v: &[(String, u64)]| v.iter().map(|(_, n)| n).sum::<u64>();
    // One flush a round, while idle: the next round's announced share. The
    // key update (whose step the disk then derives) and the two transitions
    // are written without a flush (ARCHITECTURE.md, "What is durable before
    // a reply"; `core/src/protocol/tests/controller/power.rs`). A fresh
    // agent is far from the end of its block of sequence numbers.
    assert_eq!(
        total(&agent_calls),
        1,
        "the agent flushes its state once a round, for the share notice after it: {agent_calls:?}"
    );
}
