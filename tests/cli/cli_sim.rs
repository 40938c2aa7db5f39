//! `keyfleet sim` as a user runs it: a real process, its JSON and exit code.

use crate::support;
use std::process::Command;

fn keyfleet(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keyfleet"))
        .args(args)
        .output()
        .expect("keyfleet runs")
}

#[test]
fn sim_json_reports_a_converged_lossless_rotation() {
    let _heavy = support::heavy();
    let out = keyfleet(&[
        "sim", "--agents", "25", "--loss", "0.2", "--seed", "3", "--rounds", "2", "--json",
    ]);
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "one JSON object on one line");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["agents"], 25);
    assert_eq!(v["seed"], 3);
    assert_eq!(v["rounds"], 2);
    assert_eq!(v["converged"], true);
    assert_eq!(v["data_undecryptable"], 0);
    assert!(v["data_sent"].as_u64().unwrap() > 0);
    assert!(
        v["data_lost_in_network"].as_u64().unwrap() > 0,
        "20% loss loses something"
    );
    assert!(
        v["virtual_ms_per_round"]["max"].as_u64().unwrap()
            >= v["virtual_ms_per_round"]["p50"].as_u64().unwrap()
    );
    assert!(v["wall_ms"].is_u64());
}

#[test]
fn sim_is_reproducible_by_seed_from_the_command_line() {
    let _heavy = support::heavy();
    let args = [
        "sim", "--agents", "10", "--loss", "0.3", "--seed", "11", "--json",
    ];
    let strip = |o: std::process::Output| {
        let mut v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v.as_object_mut().unwrap().remove("wall_ms");
        v
    };
    assert_eq!(strip(keyfleet(&args)), strip(keyfleet(&args)));
}

#[test]
fn sim_refuses_total_loss_with_a_reason() {
    let _heavy = support::heavy();
    let out = keyfleet(&["sim", "--loss", "1.0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--loss must be"), "{err}");
}
