//! Issue 15: what a new user tripped on, each reproduced with the real
//! programs (real processes, loopback multicast, a pseudo-terminal, another
//! user) and checked the way the user would see it. Each test fails on the
//! keyfleet of 2bc0f6e.

use crate::support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::fleet::{agent_status, Fleet};
use support::run_in_pty;
use support::{wait_for, Proc, AGENT, KEYFLEET};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `keyfleet ARGS` with no configuration but what the test sets: no
/// `--config`, an empty XDG_CONFIG_HOME, HOME in `home`.
fn bare(home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(KEYFLEET);
    c.args(args)
        .stdin(Stdio::null())
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .env_remove("KEYFLEET_CONFIG")
        .env_remove("KEYFLEET_STATE")
        .env_remove("KEYFLEET_GROUP")
        .env_remove("KEYFLEET_IFACE")
        .env_remove("KEYFLEET_LISTEN_PORT")
        .env_remove("KEYFLEET_PASSPHRASE")
        .env("RUST_BACKTRACE", "0");
    c
}

fn hex_form(byte: u8) -> String {
    keyfleet_core::label::hex_form(&keyfleet_core::label::InitialKey::from_bytes([byte; 16]))
}

// ----- item 2: configuration discovery -----

#[test]
fn the_users_config_file_is_found_named_and_overridden_by_the_environment() {
    let d = tempfile::tempdir().unwrap();
    let home = d.path();
    let cfg_dir = home.join(".config/keyfleet");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    let state = home.join("fleet-state");
    std::fs::write(
        cfg_dir.join("config.toml"),
        format!(
            "state_dir = \"{}\"\n[network]\ngroup = \"239.255.201.1:7001\"\niface = \"127.0.0.1\"\n",
            state.display()
        ),
    )
    .unwrap();
    // No --config, no --state: the user's file gives both.
    let out = bare(home, &["config"]).output().unwrap();
    let shown = text(&out.stdout);
    println!("{shown}");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        shown.contains(&format!(
            "# configuration: {}",
            cfg_dir.join("config.toml").display()
        )),
        "names the file: {shown}"
    );
    assert!(shown.contains("group = \"239.255.201.1:7001\""), "{shown}");
    assert!(
        shown.contains(&format!("state_dir = \"{}\"", state.display())),
        "{shown}"
    );
    let out = bare(home, &["init"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        state.join("controller.secrets").exists(),
        "init used state_dir"
    );
    // The environment overrides the file; a flag overrides both.
    let out = bare(home, &["config"])
        .env("KEYFLEET_GROUP", "239.255.201.2:7002")
        .output()
        .unwrap();
    let shown = text(&out.stdout);
    assert!(shown.contains("group = \"239.255.201.2:7002\""), "{shown}");
    assert!(shown.contains("$KEYFLEET_GROUP"), "{shown}");
    let out = bare(home, &["config", "--state", "/srv/elsewhere"])
        .env("KEYFLEET_STATE", "/srv/from-env")
        .output()
        .unwrap();
    assert!(
        text(&out.stdout).contains("state_dir = \"/srv/elsewhere\""),
        "{}",
        text(&out.stdout)
    );
    // The system file, when the user has none, is /etc/keyfleet/config.toml:
    // not written here (the machine's own); $KEYFLEET_CONFIG comes first.
    let other = home.join("other.toml");
    std::fs::write(&other, "[network]\ngroup = \"239.255.201.3:7003\"\n").unwrap();
    let out = bare(home, &["config"])
        .env("KEYFLEET_CONFIG", &other)
        .output()
        .unwrap();
    let shown = text(&out.stdout);
    assert!(shown.contains("239.255.201.3:7003"), "{shown}");
    assert!(shown.contains("($KEYFLEET_CONFIG)"), "{shown}");
}

#[test]
fn a_config_file_that_does_not_exist_is_an_error_for_every_controller_command() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("typo.toml");
    for cmd in [
        &["status"][..],
        &["history"],
        &["config"],
        &["rekey"],
        &["init"],
    ] {
        let mut args = vec!["--config", missing.to_str().unwrap()];
        args.extend_from_slice(cmd);
        let out = bare(d.path(), &args).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {err}");
        assert!(
            err.contains("typo.toml") && err.contains("does not exist"),
            "{cmd:?}: {err}"
        );
    }
    let out = bare(d.path(), &["status"])
        .env("KEYFLEET_CONFIG", &missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("$KEYFLEET_CONFIG"));
}

// ----- item 3: one initial key, one address, per node -----

#[test]
fn the_same_initial_key_or_address_for_a_second_node_is_refused_unless_forced() {
    let _heavy = support::heavy();
    let f = Fleet::new(0, "");
    f.run(&["init"]);
    let enroll = |id: &str, addr: Option<&str>, key: &str, force: bool| -> Output {
        let mut args = vec!["enroll", "--node-id", id, "--key", key];
        if let Some(a) = addr {
            args.extend(["--addr", a]);
        }
        if force {
            args.push("--force");
        }
        f.keyfleet(&args).output().unwrap()
    };
    let (k1, k2, k3) = (hex_form(1), hex_form(2), hex_form(3));
    assert!(enroll("a", Some("127.0.0.1:7101"), &k1, false)
        .status
        .success());
    // Same key, here (no serve).
    let out = enroll("b", Some("127.0.0.1:7102"), &k1, false);
    let err = text(&out.stderr);
    println!("{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("node a is already enrolled with the same initial key")
            && err.contains("--force"),
        "{err}"
    );
    // Same address.
    let out = enroll("c", Some("127.0.0.1:7101"), &k2, false);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("node a is already enrolled at 127.0.0.1:7101"),
        "{err}"
    );
    // Through a running serve, the same.
    let _serve = f.serve();
    let out = enroll("d", None, &k1, false);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("same initial key"), "{err}");
    let out = enroll("e", Some("127.0.0.1:7101"), &k3, false);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    // --force enrolls, with a warning.
    let out = enroll("b", Some("127.0.0.1:7102"), &k1, true);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let ids: Vec<String> = f.status()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    assert!(
        f.logs("serve")
            .contains("enrolled with --force although node a"),
        "serve warns"
    );
}

// ----- item 5: a state directory of another user -----

#[test]
fn a_state_directory_the_user_may_not_read_is_reported_as_permission_denied() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("root-state");
    let out = bare(d.path(), &["--state", state.to_str().unwrap(), "init"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The test directory itself must be searchable by the other user.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    if !rustix::process::geteuid().is_root() {
        println!("skipped: needs root to run a command as nobody");
        return;
    }
    // The binary must be reachable by nobody too.
    let bin = d.path().join("keyfleet");
    std::fs::copy(KEYFLEET, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    for cmd in ["status", "history", "rekey"] {
        let out = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(&bin)
            .args(["--state", state.to_str().unwrap(), cmd])
            .env("HOME", d.path())
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = text(&out.stderr);
        println!("{cmd}: {err}");
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(
            err.contains("permission denied") && err.contains(state.to_str().unwrap()),
            "{cmd}: {err}"
        );
        assert!(!err.contains("keyfleet init"), "not 'no controller': {err}");
    }
}

// ----- item 6: enroll's help, and a node enrolled without an address -----

#[test]
fn enroll_help_shows_key_or_from_and_the_address_is_optional() {
    let out = Command::new(KEYFLEET)
        .args(["enroll", "--help"])
        .output()
        .unwrap();
    let help = text(&out.stdout);
    let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap();
    println!("{usage}");
    assert!(usage.contains("<--key <FORM>|--from <SOURCE>>"), "{usage}");
    assert!(!usage.contains("--addr"), "--addr is not required: {usage}");
    assert!(help.contains("--force"), "{help}");
}

#[test]
fn a_node_enrolled_without_an_address_joins_and_is_rotated() {
    let _heavy = support::heavy();
    let f = Fleet::new(2, "[rekey]\njoin_wait_ms = 0\n");
    f.run(&["init"]);
    for n in &f.nodes {
        let out = f.run(&["enroll", "--node-id", &n.id, "--key", &n.form]);
        assert!(
            text(&out.stdout).contains("no address yet"),
            "{}",
            text(&out.stdout)
        );
    }
    let before = f.status();
    assert!(before["nodes"][0]["address"].is_null(), "{before}");
    let _serve = f.serve();
    let _agents = f.agents();
    assert_eq!(f.wait_converged(30_000), 1);
    let r = f.json(&["rekey", "--json"]);
    assert_eq!(
        (r["acked"].as_u64(), r["stale"].as_u64()),
        (Some(2), Some(0)),
        "{r}"
    );
    assert_eq!(f.wait_converged(30_000), 2);
    let st = f.status();
    for (i, n) in f.nodes.iter().enumerate() {
        assert_eq!(
            st["nodes"][i]["address"].as_str(),
            Some(n.listen.to_string().as_str()),
            "learned from its join: {st}"
        );
    }
}

// ----- item 7: terminal and logs -----

#[test]
fn a_user_error_prints_its_causes_and_no_backtrace() {
    let d = tempfile::tempdir().unwrap();
    let out = bare(d.path(), &["enroll", "--node-id", "x", "--key", "12345"])
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    println!("{err}");
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("the initial key (--key) was refused"), "{err}");
    assert!(err.contains("caused by:"), "the chain: {err}");
    assert!(
        !err.contains("backtrace") && !err.contains("  0: "),
        "{err}"
    );
    assert!(err.lines().count() <= 4, "{err}");
}

#[test]
fn stdout_to_a_reader_that_went_away_does_not_panic() {
    let _heavy = support::heavy();
    let f = Fleet::new(0, "");
    f.run(&["init"]);
    for cmd in [
        &["status"][..],
        &["history"],
        &["config", "--print-default"],
    ] {
        for _ in 0..5 {
            let mut child = f
                .keyfleet(cmd)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // The reader goes away before keyfleet writes (as `| head -0` would).
            drop(child.stdout.take());
            let out = child.wait_with_output().unwrap();
            let err = text(&out.stderr);
            assert!(!err.contains("panicked"), "{cmd:?}: {err}");
            assert_eq!(out.status.code(), Some(0), "{cmd:?}: {err}");
        }
    }
    // And through a shell pipe, as a user types it.
    let sh = format!(
        "{} --state {} status | head -1",
        KEYFLEET,
        f.state().display()
    );
    let out = Command::new("sh").args(["-c", &sh]).output().unwrap();
    assert!(text(&out.stdout).starts_with("group key epoch 1"));
    assert!(!text(&out.stderr).contains("panicked"));
}

#[test]
fn log_lines_off_a_terminal_have_no_colour_codes() {
    let _heavy = support::heavy();
    let f = Fleet::new(0, "");
    f.run(&["init"]);
    let out = f
        .keyfleet(&[
            "enroll",
            "--node-id",
            "a",
            "--key",
            &hex_form(4),
            "--addr",
            "127.0.0.1:7201",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = f
        .keyfleet(&["enroll", "--node-id", "b", "--key", &hex_form(4), "--force"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(err.contains("WARN"), "a log line to look at: {err}");
    assert!(
        !err.contains('\u{1b}'),
        "no escape codes in a log file: {err:?}"
    );
}

#[test]
fn the_status_table_keeps_long_node_ids_in_line() {
    let _heavy = support::heavy();
    let f = Fleet::new(0, "");
    f.run(&["init"]);
    let long = "a-very-long-node-id.building-7.floor-3.boiler-room-".to_string() + "x";
    for (i, id) in ["short", long.as_str(), "mid-sized-id-01"]
        .iter()
        .enumerate()
    {
        f.run(&["enroll", "--node-id", id, "--key", &hex_form(10 + i as u8)]);
    }
    let out = f.run(&["status"]);
    let table = text(&out.stdout);
    println!("{table}");
    let lines: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.starts_with("NODE"))
        .take(4)
        .collect();
    // Every column starts where its header does.
    let header = lines[0];
    let col = |name: &str| header.find(name).unwrap();
    for l in &lines[1..] {
        let state_at = l.find("Enrolled").unwrap();
        assert_eq!(state_at, col("STATE"), "{l}");
        let check_at = l.trim_end().rfind(' ').unwrap() + 1;
        assert_eq!(check_at, col("KEY CHECK"), "{l}");
    }
}

#[test]
fn serve_and_the_agent_log_json_lines_when_asked() {
    let _heavy = support::heavy();
    let f = Fleet::new(1, "");
    f.run(&["init"]);
    let n = &f.nodes[0];
    f.run(&["enroll", "--node-id", &n.id, "--key", &n.form]);
    let serve = Proc::from(
        f.keyfleet(&["serve", "--log-format", "json"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(f.dir.path().join("serve.json")).unwrap())
            .spawn()
            .unwrap(),
    );
    let agent = Proc::from(
        Command::new(AGENT)
            .arg("run")
            .arg("--state")
            .arg(&n.state)
            .args(["--node-id", &n.id])
            .arg("--initial-key-file")
            .arg(&n.key_file)
            .args(["--group", &f.group.to_string(), "--iface", "127.0.0.1"])
            .args(["--controller", &format!("127.0.0.1:{}", f.ctl_port)])
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(f.dir.path().join("agent.json")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("the agent synced", 30_000, || {
        agent_status(&n.state).is_some_and(|s| s["running"]["synced"] == true)
    });
    drop((serve, agent));
    for name in ["serve.json", "agent.json"] {
        let log = std::fs::read_to_string(f.dir.path().join(name)).unwrap();
        let mut lines = 0;
        for l in log.lines() {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: {e}: {l}"));
            assert!(
                v["level"].is_string() && v["fields"]["message"].is_string(),
                "{l}"
            );
            lines += 1;
        }
        println!("{name}: {lines} JSON lines");
        assert!(lines >= 2, "{name}: {log}");
    }
}

#[test]
fn recv_json_prints_what_it_received_when_stopped_by_a_signal() {
    let _heavy = support::heavy();
    let f = Fleet::new(2, "");
    let (_serve, _agents) = f.up(30_000);
    for sig in [rustix::process::Signal::TERM, rustix::process::Signal::INT] {
        let child = Command::new(AGENT)
            .args(["recv", "--json", "--timeout", "120", "--state"])
            .arg(&f.nodes[1].state)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let sent = Command::new(AGENT)
            .args(["send", "--state"])
            .arg(&f.nodes[0].state)
            .arg("hello before the signal")
            .output()
            .unwrap();
        assert!(sent.status.success());
        std::thread::sleep(Duration::from_millis(500));
        let pid = rustix::process::Pid::from_child(&child);
        rustix::process::kill_process(pid, sig).unwrap();
        let out = child.wait_with_output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{sig:?}: {e}: {:?}", text(&out.stdout)));
        println!("{sig:?}: {v}");
        assert_eq!(v["count"], 1, "{v}");
        assert_eq!(v["messages"][0]["text"], "hello before the signal");
        assert_eq!(out.status.code(), Some(0));
    }
}

#[test]
fn a_warning_during_a_round_is_written_above_the_progress_bar() {
    let _heavy = support::heavy();
    use portable_pty::CommandBuilder;
    // Two enrolled nodes that never join: rekey waits for them under its
    // bar, then warns that they did not join in time.
    let f = Fleet::new(
        2,
        "[rekey]\njoin_wait_ms = 1500\n[round]\ndrain_grace_ms = 1000\n",
    );
    f.run(&["init"]);
    for n in &f.nodes {
        f.run(&["enroll", "--node-id", &n.id, "--key", &n.form]);
    }
    let (rows, cols) = (40, 250);
    let mut cmd = CommandBuilder::new(KEYFLEET);
    for a in ["--state", f.state().to_str().unwrap()] {
        cmd.arg(a);
    }
    cmd.arg("--config");
    cmd.arg(f.dir.path().join("keyfleet.toml"));
    cmd.arg("rekey");
    cmd.env("RUST_LOG", "warn");
    cmd.env("RUST_BACKTRACE", "0");
    let (status, bytes) = run_in_pty(cmd, rows, cols);
    let mut term = vt100::Parser::new(rows, cols, 0);
    term.process(&bytes);
    let screen = term.screen().contents();
    println!("{screen}");
    assert!(status.success(), "{screen}");
    let warn: Vec<&str> = screen
        .lines()
        .filter(|l| l.contains("did not join in time"))
        .collect();
    assert_eq!(warn.len(), 1, "the warning, once: {screen}");
    assert!(
        warn[0].contains("WARN") && warn[0].contains("they are left out of this round"),
        "whole: {screen}"
    );
    assert!(
        !warn[0].contains("acknowledged") && !warn[0].contains("epoch 2 "),
        "not mixed with the bar: {screen}"
    );
    assert!(screen.contains("0 joined, 0 acknowledged"), "{screen}");
}

// ----- item 8: flags accepted and then ignored -----

#[test]
fn controller_flags_on_commands_they_do_not_apply_to_are_refused() {
    let d = tempfile::tempdir().unwrap();
    for args in [
        &["--state", "/tmp/x", "sim", "--agents", "2"][..],
        &["sim", "--state", "/tmp/x", "--agents", "2"],
        &["--config", "/tmp/x.toml", "devices"],
        &["devices", "--passphrase-file", "/tmp/p"],
        &[
            "--passphrase-file",
            "/tmp/p",
            "read-key",
            "--from",
            "keyboard",
        ],
        &["read-key", "--from", "keyboard", "--state", "/tmp/x"],
        &["demo", "--config", "/tmp/x.toml"],
    ] {
        let out = bare(d.path(), args).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("does not apply") || err.contains("unexpected argument"),
            "{args:?}: {err}"
        );
    }
    let out = Command::new(KEYFLEET)
        .args(["sim", "--help"])
        .output()
        .unwrap();
    assert!(!text(&out.stdout).contains("--state"));
}

#[test]
fn rekey_on_another_group_than_the_running_serve_is_refused() {
    let _heavy = support::heavy();
    let f = Fleet::new(0, "");
    f.run(&["init"]);
    let _serve = f.serve();
    let other = "239.255.199.9:9999";
    let out = f.keyfleet(&["rekey", "--group", other]).output().unwrap();
    let err = text(&out.stderr);
    println!("{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(other) && err.contains(&f.group.to_string()),
        "names both groups: {err}"
    );
    // The same group as serve's is fine.
    let out = f
        .keyfleet(&["rekey", "--json", "--group", &f.group.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

// ----- item 9: an agent that cannot join says so; echoes are not refusals -----

#[test]
fn an_agent_that_cannot_join_warns_what_it_waits_for() {
    let _heavy = support::heavy();
    // Enrolled with one key, started with another: the controller refuses
    // its joins and never answers.
    let f = Fleet::new(1, "");
    f.run(&["init"]);
    let n = &f.nodes[0];
    f.run(&["enroll", "--node-id", &n.id, "--key", &hex_form(99)]);
    let _serve = f.serve();
    let _agent = f.agent(0);
    wait_for("the agent's waiting warning", 30_000, || {
        f.logs(&n.id).contains("not synced with the controller")
    });
    let log = f.logs(&n.id);
    let line = log
        .lines()
        .find(|l| l.contains("not synced with the controller"))
        .unwrap();
    println!("{line}");
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("initial key") && line.contains("--group"),
        "{line}"
    );
    let serve_log = f.logs("serve");
    assert!(serve_log.contains("bad_mac"), "{serve_log}");
}

#[test]
fn a_healthy_fleet_counts_no_refusals() {
    let _heavy = support::heavy();
    let f = Fleet::new(3, "[round]\ndrain_grace_ms = 500\n");
    let (_serve, _agents) = f.up(30_000);
    f.json(&["rekey", "--json"]);
    assert_eq!(f.wait_converged(30_000), 2);
    std::thread::sleep(Duration::from_secs(3));
    for n in &f.nodes {
        let s = agent_status(&n.state).unwrap();
        println!("{}: refused {}", n.id, s["running"]["refused"]);
        assert_eq!(s["running"]["refused"], 0, "{}: {s}", n.id);
    }
}

// ----- item 11: read-key --from webcam --raw and its exit codes -----

#[test]
fn webcam_raw_shows_every_code_and_no_code_differs_from_no_device() {
    let fx = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/webcam/replay-scan");
    let d = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| bare(d.path(), args).output().unwrap();
    // A QR code that is not a key label: its text is shown.
    let out = run(&[
        "read-key",
        "--from",
        "webcam",
        "--raw",
        "--replay",
        &format!("{fx}/frame-002.jpg"),
    ]);
    let err = text(&out.stderr);
    println!("{err}");
    assert!(
        err.contains("https://example.com/manual/appliance-7"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(6), "{err}");
    // No code at all.
    let out = run(&[
        "read-key",
        "--from",
        "webcam",
        "--replay",
        &format!("{fx}/frame-001.jpg"),
    ]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    // No device.
    let out = run(&[
        "read-key",
        "--from",
        "webcam",
        "--device",
        "/dev/video-none",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    // The whole scan: the URL, then the label.
    let out = run(&["read-key", "--from", "webcam", "--raw", "--replay", fx]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(err.matches("raw: ").count(), 2, "{err}");
    let help = text(&run(&["read-key", "--help"]).stdout);
    assert!(help.contains("6 the input held no key"), "{help}");
}
