//! Two agents exchange application messages through their Unix sockets
//! (`keyfleet-agent send` / `recv`), before and during a rekey round, and no
//! message becomes undecryptable (real processes, loopback multicast).

use crate::support;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::agent::*;
use support::inproc::*;
use support::{agent_bin, fresh_group};

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
    let _heavy = support::heavy();
    let dir = tempfile::tempdir().unwrap();
    let group = fresh_group();
    let ctl = InProcFleet::controller(group);
    let (ka, kb) = (
        TestKey::new(dir.path(), "app-a"),
        TestKey::new(dir.path(), "app-b"),
    );
    ctl.enroll("app-a", &ka);
    ctl.enroll("app-b", &kb);
    let (sa, sb) = (dir.path().join("a"), dir.path().join("b"));
    let ctl_addr = ctl.addr().to_string();
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
    let _heavy = support::heavy();
    let dir = tempfile::tempdir().unwrap();
    let group = fresh_group();
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
    let _heavy = support::heavy();
    use keyfleet_core::protocol::{TriggerConfig, TriggerReason};
    let dir = tempfile::tempdir().unwrap();
    let group = fresh_group();
    let triggers = TriggerConfig {
        max_encryptions: Some(20),
        ..TriggerConfig::manual_only()
    };
    let ctl = InProcFleet::controller_with(group, triggers);
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
    let fired = ctl.view().triggers();
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

/// A burst of 20 000 group messages of 1 000 bytes, sent as fast as the
/// sending agent takes them: the receiving agent's client that reads as fast
/// as it can gets every one, in order; a second client that stops reading
/// costs it nothing, and that client's own messages are all accounted for
/// (read later, in order, or counted in `app_dropped`).
#[test]
fn a_client_that_reads_loses_nothing_of_a_burst_and_a_stopped_one_costs_it_nothing() {
    let _heavy = support::heavy();
    use keyfleet::agent::app::{decode_reply, Reply};
    use std::os::unix::net::UnixDatagram;
    const BURST: u32 = 20_000;
    const SIZE: usize = 1000;

    let dir = tempfile::tempdir().unwrap();
    let group = fresh_group();
    let ctl = InProcFleet::controller(group);
    let (ka, kb) = (
        TestKey::new(dir.path(), "burst-a"),
        TestKey::new(dir.path(), "burst-b"),
    );
    ctl.enroll("burst-a", &ka);
    ctl.enroll("burst-b", &kb);
    let (sa, sb) = (dir.path().join("a"), dir.path().join("b"));
    let ctl_addr = ctl.addr().to_string();
    let a = spawn_agent(&sa, "burst-a", &ka, group, &["--controller", &ctl_addr]);
    let b = spawn_agent(&sb, "burst-b", &kb, group, &[]);
    wait_status(&sa, &a, T, |s| synced_at(s, "UpdateCompleted", 1));
    wait_status(&sb, &b, T, |s| synced_at(s, "UpdateCompleted", 1));

    // Two clients of agent B: one reads as fast as it can, one never reads (yet).
    let register = |name: &str| {
        let s = UnixDatagram::bind(dir.path().join(name)).unwrap();
        s.send_to(b"R", sb.join("app.sock")).unwrap();
        let mut buf = [0u8; 16];
        s.set_read_timeout(Some(T)).unwrap();
        let n = s.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"R", "registered");
        s
    };
    let fast = register("fast.sock");
    let stopped = register("stopped.sock");
    // Each reader counts what it got in `progress`.
    let read_all = |s: UnixDatagram, progress: Arc<AtomicU32>| {
        std::thread::spawn(move || {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = vec![0u8; 2048];
            let mut got = Vec::new();
            while got.len() < BURST as usize {
                let Ok(n) = s.recv(&mut buf) else { break };
                match decode_reply(&buf[..n]) {
                    Ok(Reply::Message(m)) => {
                        assert_eq!(m.plaintext.len(), SIZE);
                        got.push(u32::from_be_bytes(m.plaintext[..4].try_into().unwrap()));
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("unexpected datagram from the agent: {other:?}"),
                }
            }
            got
        })
    };
    let fast_read = Arc::new(AtomicU32::new(0));
    let fast_reader = read_all(fast, fast_read.clone());

    // The burst into agent A, each message as soon as A answered the last and
    // at most `AHEAD` messages ahead of what the reading client got: what is
    // measured is the receiving agent's delivery, not UDP loss at B's socket
    // when A outruns B (in a debug build on a loaded machine A seals faster
    // than B opens and delivers to two clients, and B's socket buffer, about
    // 1,800 of these datagrams, overflowed in about one run in five).
    const AHEAD: u32 = 500;
    let sender = UnixDatagram::bind(dir.path().join("sender.sock")).unwrap();
    sender.set_read_timeout(Some(T)).unwrap();
    let start = Instant::now();
    let mut answer = [0u8; 64];
    for i in 0..BURST {
        let paced = Instant::now();
        while i.saturating_sub(fast_read.load(Ordering::Relaxed)) > AHEAD {
            assert!(
                paced.elapsed() < T,
                "the reading client stopped at {}",
                fast_read.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut msg = vec![b'S'];
        msg.extend_from_slice(&i.to_be_bytes());
        msg.resize(1 + SIZE, b'x');
        sender.send_to(&msg, sa.join("app.sock")).unwrap();
        let n = sender.recv(&mut answer).unwrap();
        assert_eq!(&answer[..n], b"A\0", "message {i} sealed and sent");
    }
    let fast_got = fast_reader.join().unwrap();
    let took = start.elapsed();
    eprintln!(
        "burst of {BURST} x {SIZE} B through two agents: {:?}, {:.0} messages/s to the reading client",
        took,
        f64::from(BURST) / took.as_secs_f64()
    );

    let sa_live = wait_status(&sa, &a, T, |s| s["running"]["data_sent"] == BURST);
    let sb_live = wait_status(&sb, &b, T, |s| s["running"]["delivered"] == BURST);
    assert_eq!(sa_live["running"]["data_sent"], BURST);
    // A's own messages, looped back by the network, were dropped by the
    // kernel's filter on its group socket: A did not receive them.
    let a_in = sa_live["running"]["datagrams_in"].as_u64().unwrap();
    assert!(
        a_in < u64::from(BURST) / 10,
        "agent A received {a_in} datagrams while it sent {BURST}: its own came back"
    );
    assert_eq!(sb_live["running"]["undecryptable"], 0);
    assert_eq!(
        fast_got,
        (0..BURST).collect::<Vec<_>>(),
        "the reading client got every message, in order, although the other client stopped reading"
    );

    // The stopped client now reads: what it gets is the start of the burst, in
    // order, and everything else was counted as dropped for it.
    let stopped_got = read_all(stopped, Arc::default()).join().unwrap();
    let dropped = status(&sb).unwrap()["running"]["app_dropped"]
        .as_u64()
        .unwrap();
    eprintln!(
        "the stopped client: {} read late, {dropped} dropped",
        stopped_got.len()
    );
    assert_eq!(
        stopped_got,
        (0..stopped_got.len() as u32).collect::<Vec<_>>(),
        "late, in order, from the start"
    );
    assert_eq!(
        stopped_got.len() as u64 + dropped,
        u64::from(BURST),
        "every message read late or counted dropped"
    );
    assert!(
        dropped > 0,
        "a client that never reads cannot hold a burst this size"
    );
    // The status says how near a client came: the stopped one had its whole
    // backlog waiting, what it read late less what its socket queue held
    // (`net.unix.max_dgram_qlen`, 10 here, 512 under systemd).
    let sb_after = status(&sb).unwrap();
    let peak = sb_after["running"]["app_backlog_peak"].as_u64().unwrap();
    let late = stopped_got.len() as u64;
    assert!(
        peak > 0 && peak <= late && late - peak <= 513,
        "app_backlog_peak {peak} of {late} read late: {sb_after}"
    );
    // The human status says so too.
    let human = agent_cmd(&["status", "--state", sb.to_str().unwrap()]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains(&format!(
            "for slow clients {dropped}  (most waiting for one client {peak})"
        )),
        "{human}"
    );
    // Nothing was lost on the sending side.
    let sa_after = status(&sa).unwrap();
    assert_eq!(sa_after["running"]["send_errors"], 0, "{sa_after}");
    assert_eq!(sa_after["running"]["send_dropped"], 0, "{sa_after}");
}

/// A burst of requests queued before the agent reads any is read in one
/// batch and each answered, in order, to its own sender: a plaintext one
/// byte too long gets the exact error, a datagram longer than the agent
/// reads of one request gets an error too (not a cut message sealed and
/// sent), a bad kind its error, and the valid ones their answers. Requests
/// from unbound sockets (no address to answer) are taken among them.
#[test]
fn a_burst_of_requests_is_answered_in_order_and_an_overlong_one_gets_an_error() {
    use keyfleet::agent::app::MAX_PLAINTEXT;
    use std::os::unix::net::UnixDatagram;
    let _heavy = support::heavy();
    let dir = tempfile::tempdir().unwrap();
    let group = fresh_group();
    let key = TestKey::new(dir.path(), "burst");
    let state = dir.path().join("s");
    // No controller: the agent cannot sync, so a message is held.
    let agent = spawn_agent(&state, "burst", &key, group, &[]);
    wait_status(&state, &agent, T, |s| s["source"] == "running_agent");
    let me = UnixDatagram::bind(dir.path().join("me.sock")).unwrap();
    me.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let other = UnixDatagram::bind(dir.path().join("other.sock")).unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let to = state.join("app.sock");
    let mut long = vec![b'S'];
    long.resize(1 + MAX_PLAINTEXT + 1, b'x');
    let mut huge = vec![b'S'];
    huge.resize(5000, b'y');
    let anon = UnixDatagram::unbound().unwrap();
    let burst: Vec<(&UnixDatagram, Vec<u8>)> = vec![
        (&me, b"Sfirst".to_vec()),
        (&anon, b"Sfrom nowhere".to_vec()),
        (&me, long),
        (&other, huge.clone()),
        (&anon, huge),
        (&me, b"Zwhat".to_vec()),
        (&other, b"Ssecond".to_vec()),
        (&me, b"?".to_vec()),
    ];
    for (from, msg) in &burst {
        from.send_to(msg, &to).unwrap();
    }
    let answer = |s: &UnixDatagram| {
        let mut b = vec![0u8; 65_536];
        let n = s.recv(&mut b).expect("an answer within 10 s");
        b.truncate(n);
        b
    };
    let held = keyfleet::agent::app::encode_outcome(keyfleet::agent::app::SendOutcome::Held);
    assert_eq!(answer(&me), held, "first: held (no controller yet)");
    let e = answer(&me);
    assert_eq!(
        String::from_utf8_lossy(&e),
        format!(
            "Eplaintext of {} bytes is too long; at most {MAX_PLAINTEXT} bytes fit in one group message",
            MAX_PLAINTEXT + 1
        )
    );
    let e = String::from_utf8_lossy(&answer(&other)).into_owned();
    assert!(
        e.starts_with("Edatagram of more than 4096 bytes is too long"),
        "{e}"
    );
    let e = String::from_utf8_lossy(&answer(&me)).into_owned();
    assert!(e.starts_with("Eunknown message kind 'Z'"), "{e}");
    assert_eq!(answer(&other), held, "second: held");
    let status = answer(&me);
    assert_eq!(status.first(), Some(&b'?'));
    let v: serde_json::Value = serde_json::from_slice(&status[1..]).unwrap();
    assert_eq!(v["node_id"], "burst");
    drop(agent);
}
