//! The agent's state directory: damaged files are refused with a clear message,
//! kill -9 during writes never leaves a broken state file, key files must be
//! owner-only, one agent per directory (real processes, loopback multicast).

use crate::support;

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::Rng;
use support::agent::*;
use support::inproc::*;
use support::{agent_bin, fresh_group};

const T: Duration = Duration::from_secs(20);
const ROUNDS: usize = 20;

/// Runs an agent once without a controller, so `state.json` exists, and stops it.
fn make_state(dir: &Path, name: &str) -> (std::path::PathBuf, TestKey) {
    let key = TestKey::new(dir, name);
    let state = dir.join(name);
    let mut agent = spawn_agent(&state, name, &key, fresh_group(), &[]);
    wait_status(&state, &agent, T, |s| s["source"] == "running_agent");
    let exit = agent.interrupt();
    assert!(exit.success(), "SIGINT stops the agent cleanly: {exit:?}");
    assert!(agent.log_text().contains("SIGINT: stopping"));
    assert!(!state.join("app.sock").exists(), "socket removed");
    (state, key)
}

fn run_once(state: &Path, name: &str, key: &TestKey) -> std::process::Output {
    std::process::Command::new(agent_bin())
        .args(["run", "--state"])
        .arg(state)
        .args(["--node-id", name, "--initial-key-file"])
        .arg(&key.file)
        .args([
            "--group",
            &fresh_group().to_string(),
            "--iface",
            "127.0.0.1",
        ])
        .output()
        .unwrap()
}

#[test]
fn a_damaged_state_file_stops_the_agent_with_a_message_naming_it() {
    let _heavy = support::heavy();
    let dir = tempfile::tempdir().unwrap();
    let (state, key) = make_state(dir.path(), "dmg");
    let file = state.join("state.json");
    let good = std::fs::read(&file).unwrap();

    // A flipped byte in the body, a truncation, and foreign JSON with a valid header.
    let mut flipped = good.clone();
    let last = flipped.len() - 2;
    flipped[last] ^= 0x20;
    let truncated = good[..good.len() / 2].to_vec();
    let body = b"{\"format\":1}";
    let mut foreign = format!(
        "keyfleet-state v1 len={} sha256={}\n",
        body.len(),
        sha256_hex(body)
    )
    .into_bytes();
    foreign.extend_from_slice(body);

    for (what, bytes, reason) in [
        ("flipped byte", flipped, "checksum mismatch"),
        ("truncated", truncated, "truncated"),
        ("foreign content", foreign, "not what keyfleet expects"),
    ] {
        std::fs::write(&file, &bytes).unwrap();
        let out = run_once(&state, "dmg", &key);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(
            err.contains(&file.display().to_string()),
            "{what}: names the file: {err}"
        );
        assert!(err.contains(reason), "{what}: says what is wrong: {err}");
        assert!(err.contains("remove"), "{what}: says what to do: {err}");
        assert_eq!(
            std::fs::read(&file).unwrap(),
            bytes,
            "{what}: left as it was"
        );

        let st = agent_cmd(&["status", "--state", state.to_str().unwrap()]);
        assert_eq!(st.status.code(), Some(1), "{what}: status fails too");
        assert!(String::from_utf8_lossy(&st.stderr).contains(reason));
    }

    // The good file back: the agent starts again.
    std::fs::write(&file, &good).unwrap();
    assert_eq!(status(&state).unwrap()["node_id"], "dmg");
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[test]
fn key_files_readable_by_others_wrong_keys_and_a_second_agent_are_refused() {
    let _heavy = support::heavy();
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = TestKey::new(dir.path(), "perm");
    let state = dir.path().join("perm");

    std::fs::set_permissions(&key.file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run_once(&state, "perm", &key);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key.file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A key with a bad CRC is refused by the label parser, without digits in the message.
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "000102030405060708090a0b0c0d0e0f0000\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = agent_cmd(&[
        "run",
        "--state",
        state.to_str().unwrap(),
        "--node-id",
        "perm",
        "--initial-key-file",
        bad.to_str().unwrap(),
        "--iface",
        "127.0.0.1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("CRC-16/X-25 check failed"), "{err}");
    assert!(!err.contains("0a0b0c"), "no key digits in errors: {err}");

    // First start, then a second agent on the same directory.
    let first = spawn_agent(&state, "perm", &key, fresh_group(), &[]);
    wait_status(&state, &first, T, |s| s["source"] == "running_agent");
    let out = run_once(&state, "perm", &key);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("another keyfleet-agent is running"), "{err}");
    drop(first);

    // Another initial key, or another node id, on the same state: refused.
    let other = TestKey::new(dir.path(), "other");
    let out = run_once(&state, "perm", &other);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("is not the one node perm was started with"),
        "{err}"
    );
    let out = run_once(&state, "someone-else", &key);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds the state of node \"perm\""), "{err}");
}

fn has_tmp(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        })
        .unwrap_or(false)
}

/// kill -9 while the agent writes its state file as fast as it can (a
/// persist every 1024 sealed messages): every time, the file left is whole,
/// and the agent restarts from it.
#[test]
fn kill_9_during_writes_never_leaves_a_broken_state_file() {
    let _heavy = support::heavy();
    let dir = tempfile::tempdir().unwrap();
    let group = fresh_group();
    let ctl = InProcFleet::controller(group);
    let key = TestKey::new(dir.path(), "crash");
    ctl.enroll("crash", &key);
    let state = dir.path().join("crash");
    let mut rng = rand::thread_rng();
    let mut torn_writes = 0;
    let mut persisted = 0u64;
    let started = Instant::now();
    for round in 0..ROUNDS {
        let mut agent = spawn_agent(
            &state,
            "crash",
            &key,
            group,
            &["--controller", &ctl.addr().to_string()],
        );
        let live = wait_status(&state, &agent, T, |s| synced_at(s, "UpdateCompleted", 1));
        assert_eq!(
            live["member"], 1,
            "round {round}: resumed as the same member"
        );
        // Flood the application socket from another thread (unbound: no
        // answers), and kill -9 the moment a temporary file shows that a write
        // is under way (or after a random time if none is seen).
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flood = {
            let (stop, sock_path) = (stop.clone(), state.join("app.sock"));
            std::thread::spawn(move || {
                let sock = UnixDatagram::unbound().unwrap();
                let mut sent = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if sock.send_to(b"Sflood", &sock_path).is_ok() {
                        sent += 1;
                    }
                }
                sent
            })
        };
        let until = Instant::now() + Duration::from_millis(rng.gen_range(100..600));
        while Instant::now() < until && !has_tmp(&state) {}
        agent.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = flood.join().unwrap();
        if has_tmp(&state) {
            torn_writes += 1; // the kill landed inside a write
        }
        let stored = status(&state).unwrap_or_else(|| {
            panic!("round {round}: unreadable state after kill -9 (sent {sent})")
        });
        assert_eq!(stored["state"], "UpdateCompleted");
        assert_eq!(stored["epoch"], 1);
        persisted += stored["keys"][0]["seals"].as_u64().unwrap_or(0);
        let _ = std::io::stderr().flush();
    }
    eprintln!(
        "{ROUNDS} kill -9 during floods in {:?}: {torn_writes} landed inside a write, \
         seal counters on disk summed to {persisted}",
        started.elapsed()
    );
    assert!(
        torn_writes > 0,
        "no kill landed inside a write: the test did not exercise what it claims"
    );
    // The last restart cleans up what an interrupted write left behind.
    let agent = spawn_agent(
        &state,
        "crash",
        &key,
        group,
        &["--controller", &ctl.addr().to_string()],
    );
    wait_status(&state, &agent, T, |s| synced_at(s, "UpdateCompleted", 1));
    let left = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .count();
    assert_eq!(
        left, 0,
        "temporary files of interrupted writes are removed on start"
    );
}
