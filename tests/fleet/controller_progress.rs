//! `keyfleet rekey` on a terminal (a real pseudo-terminal): a progress bar
//! with the phase and the acknowledgements N/M, then the summary.
use crate::support;

use portable_pty::{native_pty_system, CommandBuilder, PtySize};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::ctl::*;
use support::inproc::*;
use support::run_in_pty;
use support::{wait_for, KEYFLEET};

#[test]
fn rekey_on_a_terminal_draws_the_phase_and_acknowledgements() {
    let _heavy = support::heavy();
    let ctl = Ctl::new("[round]\ndrain_grace_ms = 1500\nretry_initial_ms = 100\n[rekey]\njoin_wait_ms = 8000\nlinger_ms = 100\n");
    ctl.run(&["init"]);
    let specs = node_specs(3);
    let shells = InProcFleet::nodes(&specs, ctl.group, ctl.addr());
    ctl.enroll_all(&specs);
    let mut cmd = CommandBuilder::new(KEYFLEET);
    for a in [
        "--state",
        ctl.state().to_str().unwrap(),
        "--config",
        ctl.dir.path().join("keyfleet.toml").to_str().unwrap(),
        "rekey",
    ] {
        cmd.arg(a);
    }
    cmd.env("RUST_LOG", "error");
    let (status, raw) = run_in_pty(cmd, 24, 120);
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(status.success(), "{text}");
    assert!(
        text.contains("epoch 2 draining"),
        "the bar shows the phase: {text:?}"
    );
    assert!(
        text.contains("3/3 acknowledged"),
        "the bar shows N/M: {text:?}"
    );
    assert!(
        text.contains("epoch 2 (check ") && text.contains("): completed in "),
        "the summary: {text:?}"
    );
    assert!(
        text.contains("3 enrolled: 3 joined, 3 acknowledged, 0 stale, 0 not joined"),
        "the counts: {text:?}"
    );
    wait_for("the nodes at epoch 2", 5000, || shells.completed_at(2) == 3);
}

/// Runs keyfleet in a pseudo-terminal, answering each prompt in turn.
fn in_terminal(ctl: &Ctl, args: &[&str], answers: &[(&str, &str)]) -> (bool, String) {
    let pty = native_pty_system()
        .openpty(PtySize {
            rows: 24,
            cols: 120,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    let mut cmd = CommandBuilder::new(KEYFLEET);
    cmd.arg("--state");
    cmd.arg(ctl.state());
    cmd.arg("--config");
    cmd.arg(ctl.dir.path().join("keyfleet.toml"));
    for a in args {
        cmd.arg(a);
    }
    cmd.env_remove("KEYFLEET_PASSPHRASE");
    cmd.env("RUST_BACKTRACE", "0");
    let mut child = pty.slave.spawn_command(cmd).unwrap();
    drop(pty.slave);
    let mut reader = pty.master.try_clone_reader().unwrap();
    let mut writer = pty.master.take_writer().unwrap();
    let raw = Arc::new(Mutex::new(Vec::new()));
    let r2 = raw.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            r2.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let text = || String::from_utf8_lossy(&raw.lock().unwrap()).into_owned();
    let mut seen = 0;
    for (prompt, answer) in answers {
        wait_for(&format!("the prompt {prompt:?}"), 10_000, || {
            text()[seen..].contains(prompt)
        });
        seen = text().len();
        std::io::Write::write_all(&mut writer, format!("{answer}\r").as_bytes()).unwrap();
    }
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < end,
            "keyfleet {args:?} did not finish: {}",
            text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(100));
    let t = text();
    (status.success(), t)
}

#[test]
fn init_seal_asks_twice_and_later_commands_ask_for_the_passphrase() {
    let _heavy = support::heavy();
    let ctl = Ctl::new("");
    let (ok, text) = in_terminal(
        &ctl,
        &["init", "--seal"],
        &[
            ("new passphrase", "tea for two"),
            ("same passphrase again", "tea for two"),
        ],
    );
    assert!(ok, "{text}");
    assert!(
        !text.contains("tea for two"),
        "the passphrase is not echoed: {text:?}"
    );
    let raw = std::fs::read_to_string(in_state(&ctl, "controller.secrets")).unwrap();
    assert!(raw.contains("argon2id"), "sealed");
    let spec = &node_specs(1)[0];
    let addr = spec.listen.to_string();
    let enroll = [
        "enroll",
        "--node-id",
        spec.id.as_str(),
        "--addr",
        addr.as_str(),
        "--key",
        spec.form.as_str(),
    ];
    let (ok, text) = in_terminal(&ctl, &enroll, &[("passphrase of the controller", "wrong")]);
    assert!(!ok && text.contains("passphrase does not open"), "{text}");
    let (ok, text) = in_terminal(
        &ctl,
        &enroll,
        &[("passphrase of the controller", "tea for two")],
    );
    assert!(ok && text.contains("enrolled"), "{text}");
    // Two different answers create nothing.
    let other = Ctl::new("");
    let (ok, text) = in_terminal(
        &other,
        &["init", "--seal"],
        &[("new passphrase", "a"), ("again", "b")],
    );
    assert!(!ok && text.contains("differ"), "{text}");
    assert!(!in_state(&other, "controller.secrets").exists());
}
