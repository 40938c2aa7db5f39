//! The one in-process fleet: the real protocol machines — a
//! `ControllerMachine`, `NodeMachine`s — each on real loopback multicast
//! sockets (`keyfleet::net::Transport`), as tasks of one background tokio
//! runtime, beside real processes:
//!
//! - [`InProcFleet::controller`]: an in-process controller against real
//!   `keyfleet-agent` processes (the agent is tested against the protocol
//!   core without waiting for `keyfleet serve`; the test reads the
//!   controller's records and can make it deaf);
//! - [`InProcFleet::nodes`]: in-process nodes against the real `keyfleet
//!   serve` (many nodes at the cost of tasks, not processes; the test reads
//!   each node's state and has it send application data).
//!
//! Every member runs through the same host loop ([`host`]): datagrams, the
//! machine's one deadline (`poll_timeout`) and the test's commands in, the
//! machine's sends out, in order. Dropping the fleet stops its runtime.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use keyfleet::net::{Clock, NetConfig, Timers, Transport};
use keyfleet_core::crypto::{Epoch, InitialKey};
use keyfleet_core::protocol::{
    ControllerAction, ControllerConfig, ControllerInput, ControllerMachine, MemberStatus,
    NodeAction, NodeConfig, NodeInput, NodeMachine, NodeState, Record, Time, TriggerConfig,
};
use keyfleet_core::wire::{NodeId, RoundPhase};
use rand::rngs::{OsRng, StdRng};
use rand::SeedableRng;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::ctl::NodeSpec;

/// A datagram a member sends.
enum Outgoing {
    Group(Vec<u8>),
    To(SocketAddr, Vec<u8>),
}

/// One machine as the host loop drives it.
trait Member: Send + 'static {
    /// What the test sends it.
    type Cmd: Send + 'static;
    fn start(&mut self, now: Time);
    fn datagram(&mut self, now: Time, from: SocketAddr, bytes: &[u8]);
    fn command(&mut self, now: Time, cmd: Self::Cmd);
    fn timeout(&mut self, now: Time);
    fn poll_timeout(&self) -> Option<Time>;
    /// Carries out the pending actions but the sends, updates what the test
    /// sees, and returns the sends in the machine's order.
    fn take_sends(&mut self) -> Vec<Outgoing>;
}

/// The host loop of every member: the same for the controller and the nodes.
async fn host<M: Member>(mut m: M, mut t: Transport, mut cmds: UnboundedReceiver<M::Cmd>) {
    let clock = t.clock().clone();
    let now = |c: &Clock| Time(c.now_ms());
    let mut timers: Timers<u8> = Timers::new();
    m.start(now(&clock));
    loop {
        for s in m.take_sends() {
            // A failed send is what a lossy network does: the protocol retries.
            let _ = match s {
                Outgoing::Group(b) => t.send_group(&b).await,
                Outgoing::To(to, b) => t.send_to(&b, to).await,
            };
        }
        match m.poll_timeout() {
            Some(at) => timers.arm(0, at.0),
            None => {
                timers.cancel(&0);
            }
        }
        tokio::select! {
            Some(cmd) = cmds.recv() => m.command(now(&clock), cmd),
            d = t.recv() => {
                let Ok(d) = d else { return };
                m.datagram(Time(d.at_ms), d.from, &d.bytes);
            }
            _ = timers.expired(&clock) => m.timeout(now(&clock)),
        }
    }
}

/// What the in-process controller shows the test.
#[derive(Default)]
pub struct View {
    pub epoch: u32,
    pub round: Option<(Epoch, RoundPhase)>,
    pub records: Vec<Record>,
    pub members: Vec<(u32, String, MemberStatus)>,
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

/// What the test tells the in-process controller.
pub enum CtlCmd {
    Enroll(NodeId, InitialKey, SocketAddr),
    Rekey,
}

struct CtlMember {
    machine: ControllerMachine,
    rng: StdRng,
    out: Vec<ControllerAction>,
    view: Arc<Mutex<View>>,
    deaf: Arc<AtomicBool>,
    local: SocketAddr,
}

impl Member for CtlMember {
    type Cmd = CtlCmd;

    fn start(&mut self, now: Time) {
        // As the real shell: the beacon announces this socket.
        self.machine.set_address(self.local);
        let _ = self
            .machine
            .handle(now, ControllerInput::Start, &mut self.rng, &mut self.out);
    }

    fn datagram(&mut self, now: Time, from: SocketAddr, bytes: &[u8]) {
        // As the real shell, its own looped-back datagrams are not fed back.
        if !self.deaf.load(Ordering::Relaxed) && from != self.local {
            let input = ControllerInput::Datagram { from, bytes };
            let _ = self
                .machine
                .handle(now, input, &mut self.rng, &mut self.out);
        }
    }

    fn command(&mut self, now: Time, cmd: CtlCmd) {
        let input = match cmd {
            CtlCmd::Enroll(node_id, initial_key, addr) => ControllerInput::Enroll {
                node_id,
                initial_key,
                addr,
            },
            CtlCmd::Rekey => ControllerInput::Rekey,
        };
        self.machine
            .handle(now, input, &mut self.rng, &mut self.out)
            .expect("the in-process controller takes the test's command");
    }

    fn timeout(&mut self, now: Time) {
        let _ = self
            .machine
            .handle(now, ControllerInput::Timeout, &mut self.rng, &mut self.out);
    }

    fn poll_timeout(&self) -> Option<Time> {
        self.machine.poll_timeout()
    }

    fn take_sends(&mut self) -> Vec<Outgoing> {
        let mut sends = Vec::new();
        let mut view = self.view.lock().unwrap();
        for a in self.out.drain(..) {
            match a {
                ControllerAction::SendGroup(b) => sends.push(Outgoing::Group(b)),
                ControllerAction::SendTo { to, bytes } => sends.push(Outgoing::To(to, bytes)),
                ControllerAction::Record(r) => view.records.push(r),
                // Kept in memory only: this controller never restarts.
                ControllerAction::PersistCore(_)
                | ControllerAction::PersistMember(_)
                | ControllerAction::ForgetMember { .. } => {}
            }
        }
        view.epoch = self.machine.current_epoch().0;
        view.round = self.machine.round();
        view.members = self
            .machine
            .members()
            .map(|(m, id, s)| (m, id.to_string(), s))
            .collect();
        sends
    }
}

/// What an in-process node shows the test.
#[derive(Debug, Clone, Default)]
pub struct Shown {
    pub state: Option<NodeState>,
    pub synced: bool,
}

struct NodeMember {
    id: String,
    machine: NodeMachine,
    out: Vec<NodeAction>,
    shown: Arc<Mutex<HashMap<String, Shown>>>,
}

impl Member for NodeMember {
    /// Application data to seal and send to the group.
    type Cmd = Vec<u8>;

    fn start(&mut self, now: Time) {
        self.machine
            .handle(now, NodeInput::LinkUp, &mut OsRng, &mut self.out);
    }

    fn datagram(&mut self, now: Time, from: SocketAddr, bytes: &[u8]) {
        let input = NodeInput::Datagram { from, bytes };
        self.machine.handle(now, input, &mut OsRng, &mut self.out);
    }

    fn command(&mut self, now: Time, text: Vec<u8>) {
        self.machine
            .handle(now, NodeInput::Send(&text), &mut OsRng, &mut self.out);
    }

    fn timeout(&mut self, now: Time) {
        self.machine
            .handle(now, NodeInput::Timeout, &mut OsRng, &mut self.out);
    }

    fn poll_timeout(&self) -> Option<Time> {
        self.machine.poll_timeout()
    }

    fn take_sends(&mut self) -> Vec<Outgoing> {
        let sends = self
            .out
            .drain(..)
            .filter_map(|a| match a {
                NodeAction::SendGroup { bytes, .. } => Some(Outgoing::Group(bytes)),
                NodeAction::SendTo { to, bytes } => Some(Outgoing::To(to, bytes)),
                // In memory only: these nodes never restart.
                _ => None,
            })
            .collect();
        self.shown.lock().unwrap().insert(
            self.id.clone(),
            Shown {
                state: Some(self.machine.state()),
                synced: self.machine.is_synced(),
            },
        );
        sends
    }
}

/// The in-process controller of a fleet.
struct Controller {
    addr: SocketAddr,
    view: Arc<Mutex<View>>,
    deaf: Arc<AtomicBool>,
    cmd: UnboundedSender<CtlCmd>,
}

/// Machines on real sockets in the test process, on one runtime of their
/// own; stopped when dropped.
pub struct InProcFleet {
    runtime: tokio::runtime::Handle,
    controller: Option<Controller>,
    shown: Arc<Mutex<HashMap<String, Shown>>>,
    /// Application messages to send, by node id.
    apps: HashMap<String, UnboundedSender<Vec<u8>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A transport on `group` over loopback, on `listen`.
fn bind(group: SocketAddrV4, listen: SocketAddrV4) -> Transport {
    let net = NetConfig {
        group,
        iface: Ipv4Addr::LOCALHOST,
        listen,
        ..NetConfig::default()
    };
    Transport::bind(&net, Clock::wall()).unwrap()
}

impl InProcFleet {
    /// An empty fleet: its runtime (two worker threads) and nothing on it.
    pub fn new() -> InProcFleet {
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            handle_tx.send(rt.handle().clone()).unwrap();
            // Until the fleet is dropped; dropping the runtime ends every member.
            let _ = rt.block_on(stop_rx);
        });
        InProcFleet {
            runtime: handle_rx.recv().unwrap(),
            controller: None,
            shown: Arc::default(),
            apps: HashMap::new(),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// An in-process controller on `group` that rotates only when told.
    pub fn controller(group: SocketAddrV4) -> InProcFleet {
        Self::controller_with(group, TriggerConfig::manual_only())
    }

    /// An in-process controller with these triggers (e.g. a count trigger fed
    /// by usage reports): short retries and drain, so a test's rounds are quick.
    pub fn controller_with(group: SocketAddrV4, triggers: TriggerConfig) -> InProcFleet {
        let mut f = InProcFleet::new();
        let _rt = f.runtime.enter();
        let transport = bind(group, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        let cfg = ControllerConfig {
            drain_grace_ms: Some(300),
            retry_initial_ms: 100,
            retry_max_ms: 1000,
            stale_after_ms: 30_000,
            triggers,
            ..ControllerConfig::default()
        };
        let clock = transport.clock().clone();
        let mut rng = StdRng::from_entropy();
        let mut out = Vec::new();
        let machine = ControllerMachine::new(cfg, Time(clock.now_ms()), &mut rng, &mut out);
        let (cmd, cmds) = unbounded_channel();
        let c = Controller {
            addr: transport.local_addr(),
            view: Arc::default(),
            deaf: Arc::default(),
            cmd,
        };
        let member = CtlMember {
            machine,
            rng,
            out,
            view: c.view.clone(),
            deaf: c.deaf.clone(),
            local: c.addr,
        };
        f.runtime.spawn(host(member, transport, cmds));
        drop(_rt);
        f.controller = Some(c);
        f
    }

    /// One in-process node per spec on `group`, each asking `controller` to join.
    pub fn nodes(specs: &[NodeSpec], group: SocketAddrV4, controller: SocketAddr) -> InProcFleet {
        let mut f = InProcFleet::new();
        let _rt = f.runtime.enter();
        for s in specs {
            let cfg = NodeConfig {
                controller,
                sync_retry_initial_ms: 200,
                sync_retry_max_ms: 2000,
                usage_interval_ms: None,
                ..NodeConfig::default()
            };
            let machine = NodeMachine::new(NodeId::parse(&s.id).unwrap(), &InitialKey(s.key), cfg);
            let (app, apps) = unbounded_channel();
            f.apps.insert(s.id.clone(), app);
            let member = NodeMember {
                id: s.id.clone(),
                machine,
                out: Vec::new(),
                shown: f.shown.clone(),
            };
            f.runtime.spawn(host(member, bind(group, s.listen), apps));
        }
        drop(_rt);
        f
    }

    fn ctl(&self) -> &Controller {
        self.controller
            .as_ref()
            .expect("this in-process fleet has no controller")
    }

    /// The in-process controller's unicast address.
    pub fn addr(&self) -> SocketAddr {
        self.ctl().addr
    }

    /// What the in-process controller shows now.
    pub fn view(&self) -> MutexGuard<'_, View> {
        self.ctl().view.lock().unwrap()
    }

    /// While deaf, the in-process controller drops every datagram it receives.
    pub fn set_deaf(&self, deaf: bool) {
        self.ctl().deaf.store(deaf, Ordering::Relaxed);
    }

    /// Enrolls `node_id` with `key` on the in-process controller.
    pub fn enroll(&self, node_id: &str, key: &impl AsRef<InitialKey>) {
        self.ctl()
            .cmd
            .send(CtlCmd::Enroll(
                NodeId::parse(node_id).unwrap(),
                key.as_ref().clone(),
                // Where the agent will be is not known yet: the controller
                // learns the address from the agent's authenticated join.
                SocketAddr::from(([127, 0, 0, 1], 9)),
            ))
            .unwrap();
    }

    /// Starts a rekey round on the in-process controller.
    pub fn rekey(&self) {
        self.ctl().cmd.send(CtlCmd::Rekey).unwrap();
    }

    /// Waits until `pred` holds on the in-process controller's view.
    pub fn wait(&self, timeout: Duration, what: &str, pred: impl Fn(&View) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if pred(&self.view()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let v = self.view();
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
        self.view()
            .records
            .iter()
            .filter_map(Record::round_finished)
            .map(|(epoch, nodes, acked, stale)| (epoch.0, nodes, acked, stale))
            .collect()
    }

    /// How many key requests (SPEC §5) of `member` the in-process controller answered.
    pub fn key_requests_answered(&self, member: u32) -> usize {
        self.view().key_requests_answered(member)
    }

    /// Has in-process node `id` send `text` to the group (sealed with its current key).
    pub fn send(&self, id: &str, text: &[u8]) {
        self.apps[id].send(text.to_vec()).unwrap();
    }

    /// The state of in-process node `id`, once it ran.
    pub fn state(&self, id: &str) -> Option<NodeState> {
        self.shown.lock().unwrap().get(id).and_then(|s| s.state)
    }

    /// How many in-process nodes are in `UpdateCompleted` at `epoch`.
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

impl Default for InProcFleet {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for InProcFleet {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
