//! Fifty `keyfleet-agent` processes on loopback multicast, rotated by a
//! controller: every one acknowledges, none goes stale. Heavy (50 processes),
//! so it runs on request: `cargo test --test fleet agent_fleet:: -- --ignored`.

use crate::support;

use std::time::{Duration, Instant};

use keyfleet_core::protocol::MemberStatus;
use support::agent::*;
use support::fresh_group;
use support::inproc::*;

const N: usize = 50;

#[test]
#[ignore = "starts 50 agent processes; run with --ignored"]
fn fifty_agents_rotate_with_every_ack_and_none_stale() {
    let _heavy = support::heavy();
    let dir = tempfile::tempdir().unwrap();
    let group = fresh_group();
    let ctl = InProcFleet::controller(group);
    let mut agents = Vec::new();
    // KEYFLEET_TEST_UNICAST=1: control messages to the controller's unicast
    // address instead of the group (the default), to compare.
    let ctl_addr = ctl.addr().to_string();
    let extra: Vec<&str> = if std::env::var_os("KEYFLEET_TEST_UNICAST").is_some() {
        vec!["--controller", &ctl_addr]
    } else {
        vec![]
    };
    let start = Instant::now();
    for i in 0..N {
        let name = format!("fleet-{i:02}");
        let key = TestKey::new(dir.path(), &name);
        ctl.enroll(&name, &key);
        agents.push(spawn_agent(
            &dir.path().join(&name),
            &name,
            &key,
            group,
            &extra,
        ));
    }
    ctl.wait(Duration::from_secs(60), "all 50 joined", |v| {
        v.members.len() == N && v.members.iter().all(|m| m.2 == MemberStatus::Active)
    });
    let joined = start.elapsed();
    let round = Instant::now();
    ctl.rekey();
    ctl.wait(Duration::from_secs(60), "round 2 finished", |v| {
        v.epoch == 2 && v.round.is_none()
    });
    let rotated = round.elapsed();
    assert_eq!(ctl.finished_rounds(), vec![(2, N as u32, N as u32, 0)]);
    for i in [0, N / 2, N - 1] {
        let s = status(&dir.path().join(format!("fleet-{i:02}"))).unwrap();
        assert_eq!(s["state"], "UpdateCompleted");
        assert_eq!(s["epoch"], 2);
    }
    let phases = ctl.view().records.iter().find_map(|r| match r {
        keyfleet_core::protocol::Record::RoundFinished { phases_ms, .. } => Some(*phases_ms),
        _ => None,
    });
    eprintln!(
        "{N} agents: all joined in {joined:?}, one rotation in {rotated:?}, phases {phases:?}"
    );
}
