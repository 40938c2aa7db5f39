//! Two agents exchange application messages through their Unix sockets
//! (`keyfleet-agent send` / `recv`), before and during a rekey round, and no
//! message becomes undecryptable (real processes, loopback multicast).

mod agent_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_support::*;

const T: Duration = Duration::from_secs(20);

fn send(state: &std::path::Path, text: &str) -> String {
    let out = agent_cmd(&["send", "--json", "--state", state.to_str().unwrap(), text]);
    assert!(
        out.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["outcome"].as_str().unwrap().to_owned()
}

#[test]
fn send_and_recv_between_two_agents_through_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let group = unique_group();
    let ctl = TestController::start(group);
    let (ka, kb) = (
        TestKey::new(dir.path(), "app-a"),
        TestKey::new(dir.path(), "app-b"),
    );
    ctl.enroll("app-a", &ka);
    ctl.enroll("app-b", &kb);
    let (sa, sb) = (dir.path().join("a"), dir.path().join("b"));
    let ctl_addr = ctl.addr.to_string();
    let a = spawn_agent(&sa, "app-a", &ka, group, &["--controller", &ctl_addr]);
    let b = spawn_agent(&sb, "app-b", &kb, group, &[]);
    let member_a = wait_status(&sa, &a, T, |s| synced_at(s, "UpdateCompleted", 1))["member"]
        .as_u64()
        .unwrap();
    wait_status(&sb, &b, T, |s| synced_at(s, "UpdateCompleted", 1));

    // The socket is owner-only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(sb.join("app.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "app.sock mode {mode:o}");

    // B listens; A sends 3 messages, then 30 more while a rotation runs.
    let recv = Command::new(agent_bin())
        .args([
            "recv",
            "--json",
            "--count",
            "33",
            "--timeout",
            "40",
            "--state",
        ])
        .arg(&sb)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_status(&sb, &b, T, |s| s["running"]["app_clients"] == 1);
    for i in 0..3 {
        assert_eq!(send(&sa, &format!("hello {i}")), "sent");
    }
    ctl.rekey();
    let start = Instant::now();
    let mut i = 3;
    while i < 33 {
        assert_eq!(send(&sa, &format!("hello {i}")), "sent");
        i += 1;
        std::thread::sleep(Duration::from_millis(40));
    }
    ctl.wait(T, "round 2 finished", |v| v.epoch == 2 && v.round.is_none());
    assert_eq!(ctl.finished_rounds(), vec![(2, 2, 2, 0)]);
    eprintln!("30 messages and a rotation in {:?}", start.elapsed());

    let out = recv.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "recv: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["count"], 33, "{got:#}");
    let msgs = got["messages"].as_array().unwrap();
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m["text"], format!("hello {i}"), "in order, none lost");
        assert_eq!(m["sender"].as_u64(), Some(member_a));
    }
    let epochs: Vec<u64> = msgs.iter().map(|m| m["epoch"].as_u64().unwrap()).collect();
    assert_eq!(epochs.first(), Some(&1));
    assert!(
        epochs.windows(2).all(|w| w[0] <= w[1]),
        "sealed with the old key, then the new one: {epochs:?}"
    );

    // After the round both seal with epoch 2, and nothing was undecryptable.
    let sa_live = wait_status(&sa, &a, T, |s| synced_at(s, "UpdateCompleted", 2));
    let sb_live = wait_status(&sb, &b, T, |s| synced_at(s, "UpdateCompleted", 2));
    assert_eq!(sa_live["running"]["undecryptable"], 0);
    assert_eq!(sb_live["running"]["undecryptable"], 0);
    assert_eq!(sb_live["running"]["delivered"], 33);
    assert_eq!(sb_live["running"]["app_clients"], 0, "recv unregistered");
    assert_eq!(sa_live["running"]["data_sent"], 33);
    assert_eq!(
        sa_live["keys"][0]["check"], sb_live["keys"][0]["check"],
        "the same group key"
    );

    // A message after the round arrives sealed with epoch 2.
    let recv = Command::new(agent_bin())
        .args(["recv", "--count", "1", "--timeout", "10", "--state"])
        .arg(&sb)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_status(&sb, &b, T, |s| s["running"]["app_clients"] == 1);
    assert_eq!(send(&sa, "after the rotation"), "sent");
    let out = recv.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "after the rotation\n");
}

#[test]
fn recv_times_out_with_exit_3_and_send_without_agent_fails() {
    let dir = tempfile::tempdir().unwrap();
    let group = unique_group();
    let key = TestKey::new(dir.path(), "lonely");
    let state = dir.path().join("s");
    // No controller: the agent cannot sync, so a message is held.
    let agent = spawn_agent(&state, "lonely", &key, group, &[]);
    wait_status(&state, &agent, T, |s| s["source"] == "running_agent");
    assert_eq!(send(&state, "held for later"), "held");
    let out = agent_cmd(&[
        "recv",
        "--count",
        "1",
        "--timeout",
        "0.5",
        "--state",
        state.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "timeout before --count");
    assert!(String::from_utf8_lossy(&out.stderr).contains("received 0 of 1"));
    drop(agent);

    let out = agent_cmd(&["send", "--state", state.to_str().unwrap(), "x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("app.sock"), "names the socket: {err}");
}

/// The agent's usage reports reach the controller and feed its count trigger
/// (SPEC §3): more than 20 encryptions under the key start a round.
#[test]
fn usage_reports_drive_the_encryption_count_trigger() {
    use keyfleet::protocol::{TriggerConfig, TriggerReason};
    let dir = tempfile::tempdir().unwrap();
    let group = unique_group();
    let triggers = TriggerConfig {
        max_encryptions: Some(20),
        ..TriggerConfig::manual_only()
    };
    let ctl = TestController::start_with(group, triggers);
    let key = TestKey::new(dir.path(), "counter");
    ctl.enroll("counter", &key);
    let state = dir.path().join("c");
    let agent = spawn_agent(&state, "counter", &key, group, &["--usage-interval", "1"]);
    wait_status(&state, &agent, T, |s| synced_at(s, "UpdateCompleted", 1));
    for i in 0..25 {
        assert_eq!(send(&state, &format!("tick {i}")), "sent");
    }
    let s = wait_status(&state, &agent, T, |s| s["keys"][0]["seals"] == 25);
    assert_eq!(s["keys"][0]["epoch"], 1);
    ctl.wait(T, "a round for the count trigger finished", |v| {
        v.epoch == 2 && v.round.is_none()
    });
    let fired = ctl.view.lock().unwrap().triggers();
    // A report may land while the 25 are still being sent: any count above 20.
    assert!(
        matches!(
            fired.as_slice(),
            [
                TriggerReason::Encryptions {
                    count: 21..=25,
                    limit: 20
                },
                ..
            ]
        ),
        "{fired:?}"
    );
    let s = wait_status(&state, &agent, T, |s| synced_at(s, "UpdateCompleted", 2));
    assert!(s["running"]["usage_reports"].as_u64().unwrap() >= 1);
}
