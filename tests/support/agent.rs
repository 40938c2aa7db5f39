//! Test support for the agent's integration tests: real `keyfleet-agent`
//! processes, their initial keys and status. The controller they talk to is
//! usually the in-process one of [`super::inproc::InProcFleet::controller`],
//! so the agent is tested against the protocol core without waiting for
//! `keyfleet serve`.

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use keyfleet_core::crypto::InitialKey;
use rand::RngCore;
use serde_json::Value;

use super::{agent_bin, Proc};

/// A random initial key, its hex form (with CRC) written to an owner-only file.
pub struct TestKey {
    pub key: InitialKey,
    pub file: PathBuf,
}

impl AsRef<InitialKey> for TestKey {
    fn as_ref(&self) -> &InitialKey {
        &self.key
    }
}

impl TestKey {
    pub fn new(dir: &Path, name: &str) -> TestKey {
        use std::os::unix::fs::PermissionsExt;
        let mut bytes = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut bytes);
        let form =
            keyfleet_core::label::hex_form(&keyfleet_core::label::InitialKey::from_bytes(bytes));
        let file = dir.join(format!("{name}.key"));
        std::fs::write(&file, format!("{form}\n")).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        TestKey {
            key: InitialKey(bytes),
            file,
        }
    }
}

/// `keyfleet-agent run` for `node_id` with state in `state`.
pub fn spawn_agent(
    state: &Path,
    node_id: &str,
    key: &TestKey,
    group: SocketAddrV4,
    extra: &[&str],
) -> Proc {
    let log = state.with_extension(format!(
        "{}.log",
        Instant::now().elapsed().as_nanos() ^ u128::from(rand::random::<u32>())
    ));
    let err = std::fs::File::create(&log).unwrap();
    let child = Command::new(agent_bin())
        .args(["run", "--state"])
        .arg(state)
        .args(["--node-id", node_id, "--initial-key-file"])
        .arg(&key.file)
        .args(["--group", &group.to_string(), "--iface", "127.0.0.1"])
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info,keyfleet=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    Proc {
        child,
        log: Some(log),
    }
}

/// `keyfleet-agent <args>` to completion.
pub fn agent_cmd(args: &[&str]) -> Output {
    Command::new(agent_bin()).args(args).output().unwrap()
}

/// `keyfleet-agent status --state DIR --json`, parsed; `None` if it failed.
pub fn status(state: &Path) -> Option<Value> {
    let out = Command::new(agent_bin())
        .args(["status", "--json", "--state"])
        .arg(state)
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Polls `status` until `pred` holds; panics with the last status and the agent's log.
pub fn wait_status(
    state: &Path,
    agent: &Proc,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(s) = status(state) {
            if pred(&s) {
                return s;
            }
            last = Some(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "status never matched; last: {last:#?}\nagent log:\n{}",
        agent.log_text()
    );
}

/// Whether a status JSON is a live, synced agent in `state` at `epoch`.
pub fn synced_at(s: &Value, state: &str, epoch: u64) -> bool {
    s["source"] == "running_agent"
        && s["state"] == state
        && s["epoch"] == epoch
        && s["running"]["synced"] == true
}
