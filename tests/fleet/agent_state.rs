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
    // The state file's two slots: the agent wrote at its start and at its
    // clean stop, one slot each.
    let file = state.join("state.json");
    let slots = [file.clone(), state.join("state.json.b")];
    let good: Vec<Vec<u8>> = slots.iter().map(|p| std::fs::read(p).unwrap()).collect();

    // Every slot damaged: a flipped byte in the body, a truncation, and
    // foreign JSON with a valid header.
    let flipped = |g: &[u8]| {
        let mut b = g.to_vec();
        let last = b.len() - 2;
        b[last] ^= 0x20;
        b
    };
    let truncated = |g: &[u8]| g[..g.len() / 2].to_vec();
    let foreign = |_: &[u8]| {
        let body = b"{\"format\":1}";
        let mut f = format!(
            "keyfleet-state v1 len={} sha256={}\n",
            body.len(),
            sha256_hex(body)
        )
        .into_bytes();
        f.extend_from_slice(body);
        f
    };
    type Damage = fn(&[u8]) -> Vec<u8>;
    for (what, damage, reason) in [
        ("flipped byte", flipped as Damage, "checksum mismatch"),
        ("truncated", truncated as Damage, "truncated"),
        (
            "foreign content",
            foreign as Damage,
            "not what keyfleet expects",
        ),
    ] {
        let damaged: Vec<Vec<u8>> = good.iter().map(|g| damage(g)).collect();
        for (p, bytes) in slots.iter().zip(&damaged) {
            std::fs::write(p, bytes).unwrap();
        }
        let out = run_once(&state, "dmg", &key);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(
            err.contains(&file.display().to_string()),
            "{what}: names the file: {err}"
        );
        assert!(err.contains(reason), "{what}: says what is wrong: {err}");
        assert!(err.contains("remove"), "{what}: says what to do: {err}");
        for (p, bytes) in slots.iter().zip(&damaged) {
            assert_eq!(&std::fs::read(p).unwrap(), bytes, "{what}: left as it was");
        }

        let st = agent_cmd(&["status", "--state", state.to_str().unwrap()]);
        assert_eq!(st.status.code(), Some(1), "{what}: status fails too");
        assert!(String::from_utf8_lossy(&st.stderr).contains(reason));
    }

    // The good slots back: the agent starts again.
    for (p, g) in slots.iter().zip(&good) {
        std::fs::write(p, g).unwrap();
    }
    assert_eq!(status(&state).unwrap()["node_id"], "dmg");

    // Only the newest slot damaged (a write cut short by a power loss): the
    // agent starts from the other, the state before that write, and says
    // which slot it passed over and why.
    let newest = keyfleet::statefile::read_slots(&file)
        .unwrap()
        .unwrap()
        .from;
    let i = slots.iter().position(|p| *p == newest).unwrap();
    std::fs::write(&newest, truncated(&good[i])).unwrap();
    let mut agent = spawn_agent(&state, "dmg", &key, fresh_group(), &[]);
    wait_status(&state, &agent, T, |s| s["source"] == "running_agent");
    let log = agent.log_text();
    assert!(
        log.contains(&newest.display().to_string()) && log.contains("truncated"),
        "the damaged slot is named: {log}"
    );
    assert!(agent.interrupt().success());
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

/// kill -9 while the agent writes its state file as fast as it can (a
/// persist every 1024 sealed messages): every time, the state left is whole
/// (the newest intact slot), and the agent restarts from it. (A kill cannot
/// tear a write the way a power loss can: the kernel finishes the write
/// call. What it can leave is a slot rewritten but not yet cut to its new
/// length, which the reader passes over; the statefile unit tests tear
/// slots in every way directly.)
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
    let (mut written, mut passed_over) = (0, 0);
    let mut seals_before = 0u64;
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
        // answers), and kill -9 after a random time.
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
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..600)));
        agent.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = flood.join().unwrap();
        let slots = keyfleet::statefile::read_slots(&state.join("state.json"))
            .unwrap_or_else(|e| panic!("round {round}: no intact slot after kill -9: {e}"))
            .expect("a state file");
        passed_over += usize::from(slots.damaged.is_some());
        let stored = status(&state).unwrap_or_else(|| {
            panic!("round {round}: unreadable state after kill -9 (sent {sent})")
        });
        assert_eq!(stored["state"], "UpdateCompleted");
        assert_eq!(stored["epoch"], 1);
        let seals = stored["keys"][0]["seals"].as_u64().unwrap_or(0);
        assert!(
            seals >= seals_before,
            "round {round}: the seal counter went back"
        );
        written += usize::from(seals > seals_before);
        seals_before = seals;
        let _ = std::io::stderr().flush();
    }
    eprintln!(
        "{ROUNDS} kill -9 during floods in {:?}: {written} floods were written to the state \
         file before their kill, {passed_over} restarts passed over a slot cut short; \
         seal counter on disk at the end {seals_before}",
        started.elapsed()
    );
    assert!(
        written > 0,
        "no flood made the agent write its state: the kills did not land among writes"
    );
    // The last restart cleans up what an older agent's interrupted write left behind.
    std::fs::write(
        state.join(".state.json.x1y2.tmp"),
        b"left by an older agent",
    )
    .unwrap();
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
