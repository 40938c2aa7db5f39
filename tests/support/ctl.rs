//! Test support for the controller's integration tests: the real `keyfleet`
//! binary in a temporary state directory, and a fleet of node shells — real
//! `NodeMachine`s over real loopback multicast sockets (`keyfleet::net`), one
//! tokio task each — standing in for `keyfleet-agent` processes.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use keyfleet::net::{Clock, NetConfig, Timers, Transport};
use keyfleet_core::crypto::InitialKey;
use keyfleet_core::protocol::{NodeAction, NodeConfig, NodeInput, NodeMachine, NodeState, Time};
use keyfleet_core::wire::NodeId;
use rand::rngs::OsRng;
use rand::RngCore;

use super::{free_port, fresh_group, wait_for, Proc, KEYFLEET};

/// One controller: its state directory, config file and network.
pub struct Ctl {
    pub dir: tempfile::TempDir,
    pub group: SocketAddrV4,
    pub port: u16,
}

impl Ctl {
    /// A controller in a fresh state directory with `config` (TOML) as its config file.
    pub fn new(config: &str) -> Ctl {
        Ctl::in_group(fresh_group(), config)
    }

    /// A controller on `group` (its own port), `config` in its config file.
    fn in_group(group: SocketAddrV4, config: &str) -> Ctl {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::write(
            dir.path().join("keyfleet.toml"),
            format!(
                "[network]\ngroup = \"{group}\"\niface = \"127.0.0.1\"\nlisten_port = {port}\n{config}"
            ),
        )
        .unwrap();
        Ctl { dir, group, port }
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(KEYFLEET);
        c.arg("--state")
            .arg(self.state())
            .arg("--config")
            .arg(self.dir.path().join("keyfleet.toml"))
            .args(args)
            .env_remove("KEYFLEET_PASSPHRASE")
            .env("RUST_LOG", "keyfleet=info")
            .env("RUST_BACKTRACE", "0");
        c
    }

    /// Runs a command to its end; panics with its stderr when it fails.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "keyfleet {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `keyfleet enroll` of each node under its id, address and key form.
    pub fn enroll_all(&self, specs: &[NodeSpec]) {
        for s in specs {
            self.run(&[
                "enroll",
                "--node-id",
                &s.id,
                "--addr",
                &s.listen.to_string(),
                "--key",
                &s.form,
            ]);
        }
    }

    /// Runs `keyfleet ARGS`, which must exit with `code`; its JSON output.
    pub fn json_exit(&self, args: &[&str], code: i32) -> serde_json::Value {
        let out = self.cmd(args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(code),
            "keyfleet {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.run(args);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "keyfleet {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// A standby controller of `leader`'s fleet: a state directory of its
    /// own with a copy of the leader's `controller.secrets` (its state key),
    /// the same group and config, its own unicast port.
    pub fn standby_of(leader: &Ctl, config: &str) -> Ctl {
        let c = Ctl::in_group(leader.group, config);
        keyfleet::statefile::ensure_private_dir(&c.state()).unwrap();
        let to = c.state().join("controller.secrets");
        std::fs::copy(leader.state().join("controller.secrets"), &to).unwrap();
        c
    }

    /// `keyfleet serve` in the background; waits until its control socket exists.
    pub fn serve(&self) -> Proc {
        let p = self.serve_waiting();
        wait_for("keyfleet serve's control socket", 10_000, || {
            std::os::unix::net::UnixStream::connect(self.state().join("control.sock")).is_ok()
        });
        p
    }

    /// `keyfleet serve` in the background, not waiting for anything (a standby).
    pub fn serve_waiting(&self) -> Proc {
        let log = std::fs::File::create(self.dir.path().join(format!(
            "serve-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        )))
        .unwrap();
        let child = self
            .cmd(&["serve"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc::from(child)
    }

    pub fn serve_logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("serve-") {
                out += &std::fs::read_to_string(e.path()).unwrap_or_default();
            }
        }
        out
    }
}

/// A node's id, initial key and the hex form printed on its label.
pub struct NodeSpec {
    pub id: String,
    pub key: [u8; 16],
    pub form: String,
    pub listen: SocketAddrV4,
}

pub fn node_specs(n: usize) -> Vec<NodeSpec> {
    (0..n)
        .map(|i| {
            let mut key = [0u8; 16];
            OsRng.fill_bytes(&mut key);
            let form =
                keyfleet_core::label::hex_form(&keyfleet_core::label::InitialKey::from_bytes(key));
            NodeSpec {
                id: format!("node-{i:03}"),
                key,
                form,
                listen: SocketAddrV4::new(Ipv4Addr::LOCALHOST, free_port()),
            }
        })
        .collect()
}

/// What a node shell shows the test.
#[derive(Debug, Clone, Default)]
pub struct Shown {
    pub state: Option<NodeState>,
    pub synced: bool,
}

/// A fleet of node shells on a background runtime; stopped when dropped.
pub struct Shells {
    pub shown: Arc<Mutex<HashMap<String, Shown>>>,
    /// Application messages to send, by node id.
    apps: HashMap<String, tokio::sync::mpsc::UnboundedSender<Vec<u8>>>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Shells {
    /// Starts one node shell per spec, asking `controller` to join.
    pub fn start(specs: &[NodeSpec], group: SocketAddrV4, controller: SocketAddr) -> Shells {
        let shown: Arc<Mutex<HashMap<String, Shown>>> = Arc::default();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let specs: Vec<(String, [u8; 16], SocketAddrV4)> = specs
            .iter()
            .map(|s| (s.id.clone(), s.key, s.listen))
            .collect();
        let sh = shown.clone();
        let mut apps = HashMap::new();
        let mut app_rx = HashMap::new();
        for (id, _, _) in &specs {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            apps.insert(id.clone(), tx);
            app_rx.insert(id.clone(), rx);
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for (id, key, listen) in specs {
                    let cfg = NetConfig {
                        group,
                        iface: Ipv4Addr::LOCALHOST,
                        listen,
                        ..NetConfig::default()
                    };
                    let t = Transport::bind(&cfg, Clock::wall()).unwrap();
                    let app = app_rx.remove(&id).unwrap();
                    tasks.push(tokio::spawn(node_shell(
                        id,
                        key,
                        t,
                        controller,
                        sh.clone(),
                        stop_rx.clone(),
                        app,
                    )));
                }
                let _ = ready_tx.send(());
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
        ready_rx.recv().unwrap();
        Shells {
            shown,
            apps,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Has node `id` send `text` to the group (sealed with its current key).
    pub fn send(&self, id: &str, text: &[u8]) {
        self.apps[id].send(text.to_vec()).unwrap();
    }

    pub fn state(&self, id: &str) -> Option<NodeState> {
        self.shown.lock().unwrap().get(id).and_then(|s| s.state)
    }

    /// How many nodes are in `UpdateCompleted` at `epoch`.
    pub fn completed_at(&self, epoch: u32) -> usize {
        self.shown
            .lock()
            .unwrap()
            .values()
            .filter(|s| {
                matches!(s.state, Some(NodeState::UpdateCompleted { current }) if current.0 == epoch)
            })
            .count()
    }
}

impl Drop for Shells {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn node_shell(
    id: String,
    key: [u8; 16],
    mut t: Transport,
    controller: SocketAddr,
    shown: Arc<Mutex<HashMap<String, Shown>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut app: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let clock = t.clock().clone();
    let cfg = NodeConfig {
        controller,
        sync_retry_initial_ms: 200,
        sync_retry_max_ms: 2000,
        usage_interval_ms: None,
        ..NodeConfig::default()
    };
    let node_id = NodeId::parse(&id).unwrap();
    let mut m = NodeMachine::new(node_id, &InitialKey(key), cfg);
    let mut timers: Timers<u8> = Timers::new();
    let mut out = Vec::new();
    m.handle(
        Time(clock.now_ms()),
        NodeInput::LinkUp,
        &mut OsRng,
        &mut out,
    );
    loop {
        for a in out.drain(..) {
            match a {
                NodeAction::SendGroup { bytes, .. } => {
                    let _ = t.send_group(&bytes).await;
                }
                NodeAction::SendTo { to, bytes } => {
                    let _ = t.send_to(&bytes, to).await;
                }
                _ => {}
            }
        }
        match m.poll_timeout() {
            Some(at) => timers.arm(0, at.0),
            None => {
                timers.cancel(&0);
            }
        }
        shown.lock().unwrap().insert(
            id.clone(),
            Shown {
                state: Some(m.state()),
                synced: m.is_synced(),
            },
        );
        tokio::select! {
            _ = stop.changed() => return,
            Some(text) = app.recv() => {
                m.handle(Time(clock.now_ms()), NodeInput::Send(&text), &mut OsRng, &mut out);
            }
            d = t.recv() => {
                let Ok(d) = d else { return };
                m.handle(Time(d.at_ms), NodeInput::Datagram { from: d.from, bytes: &d.bytes }, &mut OsRng, &mut out);
            }
            _ = timers.expired(&clock) => {
                m.handle(Time(clock.now_ms()), NodeInput::Timeout, &mut OsRng, &mut out);
            }
        }
    }
}

/// The path of a file in the state directory.
pub fn in_state(ctl: &Ctl, name: &str) -> PathBuf {
    ctl.state().join(name)
}
