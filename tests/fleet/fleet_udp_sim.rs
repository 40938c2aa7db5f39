//! `keyfleet sim --transport udp`: the simulator's fleet scenario over real UDP
//! sockets on loopback multicast, run as a user runs it (the binary, `--json`).
//!
//! Each run takes its own group port (the default: a port free on this host),
//! and every datagram carries the run's id, so parallel runs do not mix.

use std::process::Command;
use std::time::Instant;

use crate::support;

fn sim(args: &[&str]) -> serde_json::Value {
    // One simulation at a time, and none beside another heavy test: each runs
    // thousands of sockets in one process on the wall clock, and two at once
    // on a 2-core machine starve each other (the 2,000-agent round took 61 s
    // instead of 33 s beside the others, and a node went stale once in CI's
    // rehearsal).
    let _heavy = support::heavy();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_keyfleet"))
        .args(["sim", "--transport", "udp", "--json"])
        .args(args)
        .output()
        .expect("run keyfleet sim");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "keyfleet sim {args:?} printed no JSON ({e}); exit {:?}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!(
        "keyfleet sim --transport udp {args:?}: {:?}\n{report}",
        started.elapsed()
    );
    // Exit 0 exactly when the run converged with no undecryptable message and no
    // invariant violation (a node moving back is one, except at a restart
    // that lost a checkpoint to a power loss).
    let clean = report["converged"] == true
        && report["data_undecryptable"] == 0
        && report["s1_violations"] == 0
        && report["s2_violations"] == 0
        && n(&report, "backward_transitions") <= n(&report, "checkpoints_lost");
    assert_eq!(out.status.success(), clean, "exit status {:?}", out.status);
    report
}

fn n(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing or not a count in {v}"))
}

fn assert_lossless_rotation(r: &serde_json::Value, agents: u64, rounds: u64) {
    assert_eq!(r["transport"], "udp");
    assert_eq!(n(r, "agents"), agents);
    assert_eq!(
        r["converged"], true,
        "every node in UpdateCompleted under the controller's epoch"
    );
    assert_eq!(n(r, "rounds_completed"), rounds);
    assert_eq!(
        n(r, "data_undecryptable"),
        0,
        "no message between live nodes became unreadable"
    );
    assert_eq!(n(r, "s1_violations"), 0);
    assert_eq!(n(r, "s2_violations"), 0);
    // Only a restart that lost a checkpoint (a power loss) moves a node back.
    assert!(
        n(r, "backward_transitions") <= n(r, "checkpoints_lost"),
        "{r}"
    );
    assert_eq!(
        n(r, "stale"),
        0,
        "every node answers within the stale timeout on loopback"
    );
    // Real sockets: two per node and the controller, datagrams read from the kernel.
    assert_eq!(n(r, "sockets"), 2 * (agents + 1));
    assert!(n(r, "received") > 0);
    assert!(
        n(r, "data_sent") > 0 && n(r, "data_delivered") > 0,
        "data flowed while rotating"
    );
    // Rounds are timed by the wall clock.
    let p50 = n(&r["real_ms_per_round"], "p50");
    assert!(p50 > 0 && p50 <= n(r, "wall_ms"), "round p50 {p50} ms");
}

#[test]
fn fifty_agents_at_20_percent_loss_rotate_with_nothing_undecryptable() {
    let r = sim(&[
        "--agents", "50", "--loss", "0.2", "--seed", "7", "--rounds", "2",
    ]);
    assert_lossless_rotation(&r, 50, 2);
    // The loss was really injected on receive, near the setting, and the
    // controller had to retry.
    let lost = n(&r, "injected_losses") as f64;
    let read = n(&r, "received") as f64;
    assert!(
        lost / read > 0.1 && lost / read < 0.3,
        "{lost} of {read} dropped"
    );
    assert!(n(&r, "retransmissions") > 0);
    assert!(n(&r, "data_lost_in_network") > 0);
}

/// Issue 5's load case: 2,000 agents over real sockets at 30 % loss. It prints
/// rounds per second and memory per agent (the figures SECURITY.md states); the
/// assertions are the user's: the round finished, nothing became unreadable.
#[test]
fn two_thousand_agents_at_30_percent_loss_rotate_and_report_load_figures() {
    // The stale timeout is wall-clock time here: on a 2-core machine one
    // process carrying 2,000 agents takes 10-20 s a phase (a round of 33 s on
    // a quiet machine). Until the controller numbered each unicast retry of a
    // transition request afresh, a node whose replay window had moved past the
    // group copy's number refused every retry as a replay and went stale
    // (rounds of 82-144 s, one node stale, in about half the runs); 60 s
    // keeps "no node stale" a check of that, not of the CPU.
    let r = sim(&[
        "--agents",
        "2000",
        "--loss",
        "0.3",
        "--seed",
        "5",
        "--rounds",
        "1",
        "--stale-after-ms",
        "60000",
    ]);
    assert_lossless_rotation(&r, 2000, 1);
    let lost = n(&r, "injected_losses") as f64;
    let read = n(&r, "received") as f64;
    assert!(
        lost / read > 0.25 && lost / read < 0.35,
        "{lost} of {read} dropped"
    );
    assert_eq!(
        n(&r, "kernel_rcvbuf_errors"),
        0,
        "the kernel dropped nothing beyond the injected loss"
    );
    eprintln!(
        "load: 2000 agents at 30 % loss: {:.3} rounds/s (round p50 {} ms), {} KiB RSS per agent, peak {} MiB",
        r["rounds_per_s"].as_f64().unwrap_or(f64::NAN),
        n(&r["real_ms_per_round"], "p50"),
        n(&r, "rss_bytes_per_agent") / 1024,
        n(&r, "peak_rss_bytes") >> 20
    );
}

#[test]
fn crashed_and_offline_agents_rejoin_over_udp() {
    // Per round: 2 nodes crash and restart from their persisted state, 2 go
    // offline for 1.5 s, and the controller crashes and restarts once.
    let r = sim(&[
        "--agents",
        "30",
        "--loss",
        "0.1",
        "--seed",
        "11",
        "--rounds",
        "2",
        "--crash",
        "2",
        "--offline",
        "2",
        "--offline-ms",
        "1500",
        "--controller-crash",
    ]);
    assert_lossless_rotation(&r, 30, 2);
    // The fault plan draws its nodes and times at random: a node drawn twice,
    // or a crash that falls while the process is already down, counts once.
    assert!((2..=4).contains(&n(&r, "node_crashes")), "{r}");
    assert!((1..=4).contains(&n(&r, "offline_episodes")), "{r}");
    assert!((1..=2).contains(&n(&r, "controller_crashes")), "{r}");
    assert_eq!(n(&r, "restore_failures"), 0);
}

#[test]
fn agents_back_from_a_power_loss_rejoin_over_udp() {
    // The crashes are power losses: an agent comes back from its last
    // flushed state, without what it only checkpointed (its key update
    // among them), while the controller crashes and restarts too.
    let r = sim(&[
        "--agents",
        "30",
        "--loss",
        "0.1",
        "--seed",
        "11",
        "--rounds",
        "3",
        "--crash",
        "3",
        "--power-loss",
        "--controller-crash",
    ]);
    assert_lossless_rotation(&r, 30, 3);
    assert!(n(&r, "node_crashes") >= 3, "{r}");
    assert!(n(&r, "checkpoints_lost") >= 1, "a checkpoint was lost: {r}");
    assert_eq!(r["refusals"]["bad_mac"], serde_json::Value::Null, "{r}");
    assert_eq!(n(&r, "restore_failures"), 0);
}

#[test]
fn data_to_every_node_goes_through_the_group() {
    // With the sample covering every other node, each data message is one
    // multicast datagram that the kernel copies to every group socket.
    let r = sim(&[
        "--agents",
        "12",
        "--loss",
        "0.1",
        "--seed",
        "3",
        "--data-sample",
        "11",
        "--data-interval-ms",
        "500",
    ]);
    assert_lossless_rotation(&r, 12, 1);
    assert_eq!(n(&r, "data_copies"), 11 * n(&r, "data_sent"));
    let copies = n(&r, "data_copies");
    let accounted = n(&r, "data_delivered")
        + n(&r, "data_lost_in_network")
        + n(&r, "data_undecryptable_out_of_sync")
        + n(&r, "data_dropped_while_joining");
    // Every copy is accounted for (loopback loses nothing the injection did not drop).
    assert!(
        accounted >= copies * 99 / 100 && accounted <= copies,
        "{accounted} of {copies}"
    );
}

#[test]
fn a_bad_group_is_refused_with_a_hint() {
    let out = Command::new(env!("CARGO_BIN_EXE_keyfleet"))
        .args([
            "sim",
            "--transport",
            "udp",
            "--agents",
            "2",
            "--group",
            "10.1.2.3:9000",
        ])
        .output()
        .expect("run keyfleet sim");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an IPv4 multicast address"), "{err}");
}
