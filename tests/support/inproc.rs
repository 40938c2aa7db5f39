//! The in-process fleet: the protocol machines driven on real loopback
//! multicast sockets by `keyfleet::net`, in threads of the test process.
//! A controller shell ([`TestController`], a `ControllerMachine`) tests the
//! real `keyfleet-agent` against the protocol core without waiting for
//! `keyfleet serve`; node shells ([`Shells`], `NodeMachine`s) stand in for
//! `keyfleet-agent` processes in the tests of the real `keyfleet`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyfleet::net::{Clock, NetConfig, Timers, Transport};
use keyfleet_core::crypto::{Epoch, InitialKey};
use keyfleet_core::protocol::{
    ControllerAction, ControllerConfig, ControllerInput, ControllerMachine, ControllerTimer,
    MemberStatus, NodeAction, NodeConfig, NodeInput, NodeMachine, NodeState, Record, Time,
    TriggerConfig,
};
use keyfleet_core::wire::{NodeId, RoundPhase};
use rand::rngs::{OsRng, StdRng};
use rand::SeedableRng;
use tokio::sync::mpsc;

use super::agent::TestKey;
use super::ctl::NodeSpec;

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
                let _ = c.handle(now(), ControllerInput::Start, &mut rng, &mut out);
                let mut timers: Timers<u8> = Timers::new();
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => break,
                        d = transport.recv() => {
                            let d = d.unwrap();
                            if !deaf_flag.load(Ordering::Relaxed) {
                                let _ = c.handle(Time(d.at_ms), ControllerInput::Datagram { from: d.from, bytes: &d.bytes }, &mut rng, &mut out);
                            }
                        }
                        fired = timers.expired(&clock) => {
                            for t in fired {
                                let t = if t == 0 { ControllerTimer::Round } else { ControllerTimer::KeyAge };
                                let _ = c.handle(now(), ControllerInput::Timer(t), &mut rng, &mut out);
                            }
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
                            ControllerAction::ArmTimer { timer, at } => {
                                timers.arm(u8::from(timer != ControllerTimer::Round), at.0);
                            }
                            ControllerAction::Record(r) => v.lock().unwrap().records.push(r),
                            // Kept in memory only: this controller never restarts.
                            ControllerAction::PersistCore(_)
                            | ControllerAction::PersistMember(_)
                            | ControllerAction::ForgetMember { .. } => {}
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
