//! Test support for the agent's integration tests: real `keyfleet-agent`
//! processes, and a controller shell — a `ControllerMachine` driven on a real
//! socket by `keyfleet::net` in a thread of the test process — so the agent
//! is tested against the protocol core without waiting for `keyfleet serve`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyfleet::net::{Clock, NetConfig, Timers, Transport};
use keyfleet_core::crypto::{Epoch, InitialKey};
use keyfleet_core::protocol::{
    ControllerAction, ControllerConfig, ControllerInput, ControllerMachine, MemberStatus, Record,
    Time, TriggerConfig,
};
use keyfleet_core::wire::{NodeId, RoundPhase};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{agent_bin, Proc};

/// A random initial key, its hex form (with CRC) written to an owner-only file.
pub struct TestKey {
    pub key: InitialKey,
    pub file: PathBuf,
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

/// What the controller shell shows the test.
#[derive(Default)]
pub struct View {
    pub epoch: u32,
    pub round: Option<(Epoch, RoundPhase)>,
    pub records: Vec<Record>,
    pub members: Vec<(u32, String, MemberStatus)>,
}

enum Cmd {
    Enroll(NodeId, InitialKey, SocketAddr),
    Rekey,
}

/// A `ControllerMachine` on a real socket (group + unicast), in its own thread.
pub struct TestController {
    pub addr: SocketAddr,
    pub view: Arc<Mutex<View>>,
    /// While set, the controller drops every datagram it receives.
    pub deaf: Arc<AtomicBool>,
    cmd: mpsc::UnboundedSender<Cmd>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestController {
    pub fn start(group: SocketAddrV4) -> TestController {
        Self::start_with(group, TriggerConfig::manual_only())
    }

    /// With these triggers (e.g. a count trigger fed by usage reports).
    pub fn start_with(group: SocketAddrV4, triggers: TriggerConfig) -> TestController {
        let view = Arc::new(Mutex::new(View::default()));
        let deaf = Arc::new(AtomicBool::new(false));
        let (cmd, mut cmd_rx) = mpsc::unbounded_channel();
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (v, deaf_flag) = (view.clone(), deaf.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let clock = Clock::wall();
                let net = NetConfig {
                    group,
                    iface: Ipv4Addr::LOCALHOST,
                    listen: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
                    ..NetConfig::default()
                };
                let mut transport = Transport::bind(&net, clock.clone()).unwrap();
                addr_tx.send(transport.local_addr()).unwrap();
                let cfg = ControllerConfig {
                    drain_grace_ms: Some(300),
                    retry_initial_ms: 100,
                    retry_max_ms: 1000,
                    stale_after_ms: 30_000,
                    triggers,
                    ..ControllerConfig::default()
                };
                let mut rng = StdRng::from_entropy();
                let mut out = Vec::new();
                let now = || Time(clock.now_ms());
                let mut c = ControllerMachine::new(cfg, now(), &mut rng, &mut out);
                // As the real shell: the beacon announces this socket, and
                // the controller's own looped-back datagrams are not fed back.
                let local = transport.local_addr();
                c.set_address(local);
                let _ = c.handle(now(), ControllerInput::Start, &mut rng, &mut out);
                let mut timers: Timers<u8> = Timers::new();
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => break,
                        d = transport.recv() => {
                            let d = d.unwrap();
                            if !deaf_flag.load(Ordering::Relaxed) && d.from != local {
                                let _ = c.handle(Time(d.at_ms), ControllerInput::Datagram { from: d.from, bytes: &d.bytes }, &mut rng, &mut out);
                            }
                        }
                        _ = timers.expired(&clock) => {
                            let _ = c.handle(now(), ControllerInput::Timeout, &mut rng, &mut out);
                        }
                        Some(cmd) = cmd_rx.recv() => {
                            let input = match cmd {
                                Cmd::Enroll(node_id, initial_key, addr) => ControllerInput::Enroll { node_id, initial_key, addr },
                                Cmd::Rekey => ControllerInput::Rekey,
                            };
                            c.handle(now(), input, &mut rng, &mut out).unwrap();
                        }
                    }
                    for a in out.drain(..) {
                        match a {
                            ControllerAction::SendGroup(b) => { let _ = transport.send_group(&b).await; }
                            ControllerAction::SendTo { to, bytes } => { let _ = transport.send_to(&bytes, to).await; }
                            ControllerAction::Record(r) => v.lock().unwrap().records.push(r),
                            // Kept in memory only: this controller never restarts.
                            ControllerAction::PersistCore(_)
                            | ControllerAction::PersistMember(_)
                            | ControllerAction::ForgetMember { .. } => {}
                        }
                    }
                    match c.poll_timeout() {
                        Some(at) => timers.arm(0, at.0),
                        None => {
                            timers.cancel(&0);
                        }
                    }
                    let mut view = v.lock().unwrap();
                    view.epoch = c.current_epoch().0;
                    view.round = c.round();
                    view.members = c.members().map(|(m, id, s)| (m, id.to_string(), s)).collect();
                }
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        TestController {
            addr,
            view,
            deaf,
            cmd,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl TestController {
    pub fn enroll(&self, node_id: &str, key: &TestKey) {
        self.cmd
            .send(Cmd::Enroll(
                NodeId::parse(node_id).unwrap(),
                key.key.clone(),
                // Where the agent will be is not known yet: the controller
                // learns the address from the agent's authenticated join.
                SocketAddr::from(([127, 0, 0, 1], 9)),
            ))
            .unwrap();
    }

    pub fn rekey(&self) {
        self.cmd.send(Cmd::Rekey).unwrap();
    }

    /// Waits until `pred` holds on the controller's view.
    pub fn wait(&self, timeout: Duration, what: &str, pred: impl Fn(&View) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if pred(&self.view.lock().unwrap()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let v = self.view.lock().unwrap();
        panic!(
            "controller never reached: {what}; epoch {}, round {:?}, members {:?}, last records {:#?}",
            v.epoch,
            v.round,
            v.members,
            &v.records[v.records.len().saturating_sub(15)..]
        );
    }

    /// The `RoundFinished` records so far: (epoch, nodes, acked, stale).
    pub fn finished_rounds(&self) -> Vec<(u32, u32, u32, u32)> {
        self.view
            .lock()
            .unwrap()
            .records
            .iter()
            .filter_map(|r| match r {
                Record::RoundFinished {
                    epoch,
                    nodes,
                    acked,
                    stale,
                    ..
                } => Some((epoch.0, *nodes, *acked, *stale)),
                _ => None,
            })
            .collect()
    }

    /// How many key requests (SPEC §5) of `member` were answered.
    pub fn key_requests_answered(&self, member: u32) -> usize {
        self.view.lock().unwrap().key_requests_answered(member)
    }
}

impl View {
    /// The reasons of the triggers that fired.
    pub fn triggers(&self) -> Vec<keyfleet_core::protocol::TriggerReason> {
        self.records
            .iter()
            .filter_map(|r| match r {
                Record::TriggerFired { reason, .. } => Some(reason.clone()),
                _ => None,
            })
            .collect()
    }

    /// How many key requests (SPEC §5) of `member` were answered.
    pub fn key_requests_answered(&self, member: u32) -> usize {
        self.records
            .iter()
            .filter(|r| matches!(r, Record::KeyRequestAnswered { member: m, .. } if *m == member))
            .count()
    }
}

impl Drop for TestController {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
