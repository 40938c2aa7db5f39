//! The fleet model: a controller and [`NODES`] nodes, all real machines.
//!
//! # What a state is
//!
//! [`Fleet`] holds, per process, the live machine (`None` while crashed),
//! its "disk" (the last snapshot its `Persist…` actions asked to store), its
//! link (up or down), and the deadline of each timer it armed; the datagrams
//! in flight (each with its destination and send time); the virtual clock;
//! what is left of each fault budget; and what the property checks noted.
//!
//! States are told apart by `Hash`: live machines by the library's `Hash`
//! impls (every field of the machine except what is fixed for its life, see
//! `core/src/protocol/node/state_hash.rs`), disks by a digest of the snapshot's
//! serialization, datagrams by their bytes. Two states with equal hashes
//! therefore hold machines that react alike to every later input, so merging
//! them loses no behaviour (up to 64-bit hash collisions).
//!
//! # Randomness and time
//!
//! Each `handle` call gets a ChaCha8 stream seeded from the machine's own
//! hash and the input: the same machine state fed the same input makes the
//! same keys, nonces and jitter, so the checker's replays are exact and
//! equal states hash equally. Time is virtual: it moves only when the checker
//! fires a timer (to that timer's deadline, or later when timers fire late).
//! A datagram is delivered, duplicated or lost while `now` is within
//! `max_flight_ms` of its sending; after that it is gone (the drain grace
//! covers exactly that flight time, as in the real configuration).
//!
//! # Bounds
//!
//! Everything unbounded is bounded by [`Scope`]: rekey rounds (and so
//! epochs), timer firings before the network heals (and so retries, sequence
//! numbers and the clock), crashes, restarts, link losses, duplicates and
//! application messages.
//!
//! # Properties
//!
//! - **S1/S2**, in every state: every key a live node seals with is held by
//!   every live node (S1 when it is the new key, S2 when it is the old one),
//!   and no data sealed by a live node reaches a live node that cannot open
//!   it. A node is live when it runs, its link is up, it is synced and the
//!   controller counts it active (as in `core/src/sim/scenario.rs`).
//! - **no node moves backwards**: a node's position `(epoch, progress)`
//!   never decreases, across restarts too.
//! - **acknowledgements**: when the controller enters the first transition
//!   every node it counts active holds the new key; when it starts draining
//!   every such node seals with it; when it finishes, every such node has
//!   dropped the old key. **quorum**: a round completes only if at least
//!   `max(1, majority of joined nodes)` acknowledged it (SPEC §2).
//! - **heal**: from any state, once the network heals (every link up, every
//!   process back, no more loss) and runs in order, every node holds the
//!   current key and is synced within [`Scope::heal_deliveries`] deliveries.

use keyfleet_core::crypto::{Epoch, InitialKey};
use keyfleet_core::protocol::{
    ControllerAction, ControllerConfig, ControllerCore, ControllerInput, ControllerMachine,
    ControllerPersist, MemberPersist, MemberStatus, NodeAction, NodeConfig, NodeEvent, NodeInput,
    NodeMachine, NodePersist, NodeState, Record, Refusal, Time, TriggerConfig,
};
use keyfleet_core::wire::{self, NodeId, RoundPhase};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use stateright::{Checker, Model, Property};
use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

pub const NODES: usize = 3;
const CONTROLLER_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 168, 0, 1), 47800));
const START: Time = Time(1_000);
const MODEL_SEED: u64 = 0x6b65_7966_6c65_6574; // "keyfleet"

fn node_addr(i: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(10, 0, 0, 1 + i as u8),
        47801,
    ))
}

fn node_id(i: usize) -> NodeId {
    NodeId::parse(&format!("node-{i}")).expect("valid node id")
}

fn initial_key(i: usize) -> InitialKey {
    InitialKey([0x40 + i as u8; 16])
}

fn digest(value: &impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// The bounds of one check. Every field bounds something that would
/// otherwise grow without end.
#[derive(Clone, Debug)]
pub struct Scope {
    pub name: &'static str,
    /// Rekey rounds the operator starts (so epochs reach 1 + rounds).
    pub rounds: u8,
    /// The first of them starts in the initial state (faults before it add little).
    pub rekey_at_start: bool,
    /// Timer firings before the network heals (retries, stale deadlines, the drain).
    pub timer_firings: u8,
    /// Timers may fire late, in any order (else only the earliest deadline fires).
    pub late_timers: bool,
    pub node_crashes: u8,
    pub controller_restarts: u8,
    /// Times a node's link goes down (and may come back).
    pub link_losses: u8,
    /// Times the controller's link goes down (an isolated controller).
    pub controller_isolations: u8,
    pub duplicates: u8,
    /// Application messages the nodes send (data sealed with a group key).
    pub data_sends: u8,
    /// Heal only from states with nothing in flight (else from every state).
    pub heal_when_quiet: bool,
    /// Node faults may hit any node (else only the last one; the nodes are alike).
    pub faults_anywhere: bool,
    /// Deliveries within which a healed fleet must have converged.
    pub heal_deliveries: u32,
    /// Events explored on every path from the initial state (every
    /// interleaving of up to this many events; a heal then runs the round to
    /// its end). `None`: until the bounds above exhaust the state space.
    pub max_depth: Option<usize>,
}

impl Scope {
    fn base(name: &'static str) -> Scope {
        Scope {
            name,
            rounds: 1,
            rekey_at_start: true,
            timer_firings: 1,
            late_timers: false,
            node_crashes: 0,
            controller_restarts: 0,
            link_losses: 0,
            controller_isolations: 0,
            duplicates: 0,
            data_sends: 0,
            heal_when_quiet: true,
            faults_anywhere: false,
            heal_deliveries: 200,
            max_depth: Some(6),
        }
    }

    /// The checks CI runs: one round under each kind of fault on its own,
    /// always with loss (a datagram not delivered in time is lost) and
    /// reordering. Each is exhaustive within its bounds.
    pub fn ci() -> Vec<Scope> {
        vec![
            Scope {
                timer_firings: 2,
                duplicates: 1,
                max_depth: Some(5),
                ..Scope::base("loss, duplication, reordering")
            },
            Scope {
                data_sends: 1,
                ..Scope::base("application data across the round")
            },
            Scope {
                node_crashes: 1,
                ..Scope::base("node crash and restart")
            },
            Scope {
                link_losses: 1,
                timer_firings: 2,
                ..Scope::base("node link loss")
            },
            Scope {
                controller_restarts: 1,
                ..Scope::base("controller restart")
            },
            Scope {
                controller_isolations: 1,
                timer_firings: 2,
                ..Scope::base("isolated controller")
            },
        ]
    }

    /// A fault-free base with the fields `MODEL_SCOPE` names changed.
    pub fn from_env() -> Scope {
        Scope::base("from MODEL_SCOPE")
    }

    /// The longer run: every fault together, two timer firings, a duplicate
    /// and data, healing from any state; once with the rekey at any moment
    /// and once with the round under way from the start (which leaves the
    /// events to the faults: a node marked stale takes seven events when the
    /// rekey is one of them). Depth 6: at depth 7 the checker's state set
    /// outgrew 23 GiB of memory (killed after about 8 minutes).
    pub fn long() -> Vec<Scope> {
        let all = Scope {
            timer_firings: 2,
            node_crashes: 1,
            controller_restarts: 1,
            link_losses: 1,
            controller_isolations: 1,
            duplicates: 1,
            data_sends: 1,
            max_depth: Some(6),
            ..Scope::base("every fault together, the rekey at any moment")
        };
        vec![
            Scope {
                rekey_at_start: false,
                ..all.clone()
            },
            Scope {
                name: "every fault together, a round under way",
                rekey_at_start: true,
                ..all
            },
        ]
    }
}

fn controller_config() -> ControllerConfig {
    ControllerConfig {
        drain_grace_ms: Some(300),
        retry_initial_ms: 200,
        retry_max_ms: 200,
        retry_jitter_pct: 0,
        group_attempts: 1,
        stale_after_ms: 400,
        triggers: TriggerConfig {
            max_encryptions: None,
            max_decryptions: None,
            max_total: None,
            max_key_age_ms: None,
            on_unknown_sender: true,
            on_node_removed: true,
            manual: true,
        },
        // The beacon is a timer the checker fires like the others.
        beacon_interval_ms: 1000,
        address: CONTROLLER_ADDR,
        ..ControllerConfig::default()
    }
}

fn node_config() -> NodeConfig {
    NodeConfig {
        controller: CONTROLLER_ADDR,
        sync_retry_initial_ms: 300,
        sync_retry_max_ms: 600,
        usage_interval_ms: Some(5_000),
        ..NodeConfig::default()
    }
}

/// The longest a datagram is in flight; the drain grace covers it.
fn max_flight_ms() -> u64 {
    controller_config()
        .drain_grace_ms
        .expect("the model fixes the drain grace")
}

// ------------------------------------------------------------------ state

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    Controller,
    Node(u8),
}

fn peer_of(addr: SocketAddr) -> Option<Peer> {
    if addr == CONTROLLER_ADDR {
        return Some(Peer::Controller);
    }
    (0..NODES)
        .find(|i| node_addr(*i) == addr)
        .map(|i| Peer::Node(i as u8))
}

fn addr_of(p: Peer) -> SocketAddr {
    match p {
        Peer::Controller => CONTROLLER_ADDR,
        Peer::Node(i) => node_addr(i as usize),
    }
}

/// One datagram in flight to one receiver (a group send is one per receiver,
/// each lost or duplicated on its own).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Datagram {
    sent: Time,
    to: Peer,
    from: Peer,
    /// What it is (`wire::Message::name`), for traces.
    what: &'static str,
    /// Group data: the epoch it was sealed with, and whether its sender was live.
    data: Option<(Epoch, bool)>,
    bytes: Vec<u8>,
}

/// A snapshot as stored, hashed by a digest of its serialization.
#[derive(Clone)]
struct Disk<T> {
    value: T,
    digest: u64,
}

impl<T: Serialize> Disk<T> {
    fn new(value: T) -> Disk<T> {
        let bytes = serde_json::to_vec(&value).expect("snapshots serialize");
        Disk {
            digest: digest(&bytes),
            value,
        }
    }
}

impl<T> Hash for Disk<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.digest.hash(state);
    }
}

#[derive(Clone, Hash)]
struct NodeSlot {
    machine: Option<NodeMachine>,
    disk: Option<Disk<NodePersist>>,
    link: bool,
    /// The node machine's one deadline (`poll_timeout`).
    timers: [Option<Time>; 1],
    /// The highest position this node ever had (for "never backwards").
    high: Option<(Epoch, u8)>,
}

#[derive(Clone, Hash)]
struct ControllerSlot {
    machine: Option<ControllerMachine>,
    core: Option<Disk<ControllerCore>>,
    rows: BTreeMap<u32, Disk<MemberPersist>>,
    link: bool,
    /// The controller machine's one deadline (`poll_timeout`).
    timers: [Option<Time>; 1],
}

#[derive(Clone, Debug, Hash)]
struct Left {
    rounds: u8,
    timer_firings: u8,
    node_crashes: u8,
    controller_restarts: u8,
    link_losses: u8,
    controller_isolations: u8,
    duplicates: u8,
    data_sends: u8,
}

/// What the heal run found.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Healed {
    pub converged: bool,
    pub deliveries: u32,
    pub why: String,
}

/// One state of the fleet.
// Equality is equality of the hash (what the checker identifies states by),
// so `Hash` and `PartialEq` agree by construction.
#[allow(clippy::derived_hash_with_manual_eq)]
#[derive(Clone, Hash)]
pub struct Fleet {
    now: Time,
    controller: ControllerSlot,
    nodes: [NodeSlot; NODES],
    /// Sorted, so that equal multisets hash equally.
    net: Vec<Datagram>,
    left: Left,
    healed: Option<Healed>,
    /// Violations of the properties checked on transitions: (property, what happened).
    broken: Vec<(&'static str, String)>,
}

impl PartialEq for Fleet {
    fn eq(&self, other: &Self) -> bool {
        digest(self) == digest(other)
    }
}

impl fmt::Debug for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t={} ", self.now)?;
        match &self.controller.machine {
            Some(c) => write!(
                f,
                "controller[epoch {}, round {:?}, waiting {}{}] ",
                c.current_epoch().0,
                c.round().map(|(e, p)| (e.0, p)),
                c.waiting(),
                if self.controller.link {
                    ""
                } else {
                    ", link down"
                }
            )?,
            None => write!(f, "controller[down] ")?,
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let status = self.status(i).map_or("-".to_string(), |s| format!("{s:?}"));
            match &n.machine {
                Some(m) => write!(
                    f,
                    "node-{i}[{:?} {}{}{}] ",
                    m.state(),
                    status,
                    if m.is_synced() { "" } else { " syncing" },
                    if n.link { "" } else { " link down" }
                )?,
                None => write!(f, "node-{i}[down {status}] ")?,
            }
        }
        write!(f, "in flight {}", self.net.len())?;
        if let Some(h) = &self.healed {
            write!(f, " healed {h:?}")?;
        }
        if !self.broken.is_empty() {
            write!(f, " BROKEN {:?}", self.broken)?;
        }
        Ok(())
    }
}

/// A seeded stream for one `handle` call: a function of who handles what in which state.
fn rng_for(who: Peer, input: &str, machine: &impl Hash) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(digest(&(MODEL_SEED, who, input, digest(machine))))
}

fn position_of(state: NodeState) -> Option<(Epoch, u8)> {
    match state {
        NodeState::Unjoined => None,
        NodeState::UpdateCompleted { current } => Some((current, 3)),
        NodeState::DistributionCompleted { new, .. } => Some((new, 1)),
        NodeState::InTransit { new, .. } => Some((new, 2)),
    }
}

impl Fleet {
    // -------------------------------------------------------------- views

    /// The controller's status for node `i`: from the live machine, or its stored rows.
    fn status(&self, i: usize) -> Option<MemberStatus> {
        let id = node_id(i);
        match &self.controller.machine {
            Some(c) => c.member_status(&id),
            None => self
                .controller
                .rows
                .values()
                .find(|r| r.value.node_id == id)
                .map(|r| r.value.status),
        }
    }

    /// The node's key state: live, or as it would restart from its disk.
    fn node_state(&self, i: usize) -> NodeState {
        let n = &self.nodes[i];
        match (&n.machine, &n.disk) {
            (Some(m), _) => m.state(),
            (None, Some(d)) => NodeMachine::restore(&d.value, node_config())
                .map_or(NodeState::Unjoined, |m| m.state()),
            (None, None) => NodeState::Unjoined,
        }
    }

    /// Runs, link up, synced, counted active by the controller.
    pub fn live(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        n.link
            && n.machine.as_ref().is_some_and(|m| m.is_synced())
            && self.status(i) == Some(MemberStatus::Active)
    }

    fn sealing_epoch(&self, i: usize) -> Option<Epoch> {
        self.nodes[i]
            .machine
            .as_ref()
            .and_then(|m| m.keyring())
            .map(|r| r.sealing_epoch())
    }

    fn held(&self, i: usize) -> Vec<Epoch> {
        let Some(r) = self.nodes[i].machine.as_ref().and_then(|m| m.keyring()) else {
            return Vec::new();
        };
        let (a, b) = r.epochs();
        std::iter::once(a).chain(b).collect()
    }

    /// S1 and S2 in this state: every key a live node seals with is held by every live node.
    pub fn keys_agree(&self) -> Result<(), String> {
        for a in (0..NODES).filter(|a| self.live(*a)) {
            let Some(e) = self.sealing_epoch(a) else {
                continue;
            };
            for b in (0..NODES).filter(|b| self.live(*b)) {
                if !self.held(b).contains(&e) {
                    return Err(format!(
                        "node-{a} seals with epoch {} but live node-{b} holds only {:?}",
                        e.0,
                        self.held(b)
                    ));
                }
            }
        }
        Ok(())
    }

    fn current_epoch(&self) -> Option<Epoch> {
        match &self.controller.machine {
            Some(c) => Some(c.current_epoch()),
            None => self
                .controller
                .core
                .as_ref()
                .map(|c| c.value.current.epoch()),
        }
    }

    /// Every node runs, is synced, active, and holds only the current key.
    pub fn converged(&self) -> Result<(), String> {
        let Some(c) = &self.controller.machine else {
            return Err("the controller is down".into());
        };
        if let Some((e, p)) = c.round() {
            return Err(format!("the round for epoch {} is still in {p:?}", e.0));
        }
        let current = c.current_epoch();
        for i in 0..NODES {
            let n = &self.nodes[i];
            let Some(m) = &n.machine else {
                return Err(format!("node-{i} is down"));
            };
            if !m.is_synced() || !n.link {
                return Err(format!("node-{i} is not synced"));
            }
            if m.state() != (NodeState::UpdateCompleted { current }) {
                return Err(format!(
                    "node-{i} is in {:?}, the current key is epoch {}",
                    m.state(),
                    current.0
                ));
            }
            if self.status(i) != Some(MemberStatus::Active) {
                return Err(format!(
                    "node-{i} is {:?} for the controller",
                    self.status(i)
                ));
            }
        }
        Ok(())
    }

    fn note(&mut self, property: &'static str, what: String) {
        if !self.broken.iter().any(|(p, _)| *p == property) {
            self.broken.push((property, what));
        }
    }

    // -------------------------------------------------------------- network

    fn reachable(&self, p: Peer) -> bool {
        match p {
            Peer::Controller => self.controller.machine.is_some() && self.controller.link,
            Peer::Node(i) => {
                let n = &self.nodes[i as usize];
                n.machine.is_some() && n.link
            }
        }
    }

    fn post(&mut self, from: Peer, to: Peer, bytes: &[u8], data: Option<(Epoch, bool)>) {
        if from == to || !self.reachable(from) || !self.reachable(to) {
            return; // lost on a link that is down, or nobody listening
        }
        let what = wire::decode(bytes).map_or("malformed", |m| m.name());
        self.net.push(Datagram {
            sent: self.now,
            to,
            from,
            what,
            data,
            bytes: bytes.to_vec(),
        });
    }

    /// Datagrams to `p` are lost (it crashed or its link went down).
    fn cut(&mut self, p: Peer) {
        self.net.retain(|d| d.to != p);
    }

    fn advance(&mut self, to: Time) {
        if to > self.now {
            self.now = to;
            let now = self.now;
            self.net.retain(|d| now.since(d.sent) <= max_flight_ms());
        }
    }

    // -------------------------------------------------------------- nodes

    fn feed_node(&mut self, i: usize, input: NodeInput<'_>, label: &str) -> Vec<Refusal> {
        let now = self.now;
        let Some(m) = self.nodes[i].machine.as_mut() else {
            return Vec::new();
        };
        let mut rng = rng_for(Peer::Node(i as u8), label, m);
        let mut out = Vec::new();
        m.handle(now, input, &mut rng, &mut out);
        let live = self.live(i);
        let mut refused = Vec::new();
        for a in out {
            match a {
                NodeAction::SendGroup { bytes, data_epoch } => {
                    let data = data_epoch.map(|e| (e, live));
                    for j in 0..NODES {
                        self.post(Peer::Node(i as u8), Peer::Node(j as u8), &bytes, data);
                    }
                    // Group data also reaches the controller, which only notes a
                    // member's sequence number (the leak trigger wants data from
                    // an address not in the table, which no node here sends).
                    if data.is_none() {
                        self.post(Peer::Node(i as u8), Peer::Controller, &bytes, data);
                    }
                }
                NodeAction::SendTo { to, bytes } => {
                    if let Some(p) = peer_of(to) {
                        self.post(Peer::Node(i as u8), p, &bytes, None);
                    }
                }
                // A crash in the model is a process crash: a checkpoint
                // survives it as a flushed write does.
                NodeAction::Persist(p) | NodeAction::Checkpoint(p) => {
                    self.nodes[i].disk = Some(Disk::new(*p))
                }
                NodeAction::Deliver(_) => {}
                NodeAction::Event(NodeEvent::Refused { reason, .. }) => refused.push(reason),
                NodeAction::Event(_) => {}
            }
        }
        // The machine keeps its deadlines: the shell asks for the next one after every input.
        self.nodes[i].timers = [self.nodes[i]
            .machine
            .as_ref()
            .and_then(NodeMachine::poll_timeout)];
        self.check_forward(i);
        refused
    }

    /// "No node moves backwards": its position (live or as stored) never decreases.
    fn check_forward(&mut self, i: usize) {
        let pos = position_of(self.node_state(i));
        let high = self.nodes[i].high;
        match (high, pos) {
            (Some(h), Some(p)) if p < h => self.note(
                "no node moves backwards",
                format!("node-{i} went from {h:?} back to {p:?}"),
            ),
            (Some(h), None) => self.note(
                "no node moves backwards",
                format!("node-{i} lost its keys (was at {h:?})"),
            ),
            (_, Some(p)) => self.nodes[i].high = Some(p),
            _ => {}
        }
    }

    fn restart_node(&mut self, i: usize) {
        let Some(d) = &self.nodes[i].disk else {
            return;
        };
        let m = NodeMachine::restore(&d.value, node_config()).expect("node snapshot restores");
        self.nodes[i].machine = Some(m);
        self.nodes[i].timers = [None; 1];
        self.check_forward(i);
        self.feed_node(i, NodeInput::LinkUp, "restart");
    }

    // -------------------------------------------------------------- controller

    fn feed_controller(&mut self, input: ControllerInput<'_>, label: &str) {
        let now = self.now;
        let Some(c) = self.controller.machine.as_mut() else {
            return;
        };
        let mut rng = rng_for(Peer::Controller, label, c);
        let mut out = Vec::new();
        c.handle(now, input, &mut rng, &mut out)
            .expect("the model only gives commands the controller accepts");
        self.carry_controller(out);
    }

    fn carry_controller(&mut self, out: Vec<ControllerAction>) {
        let mut records = Vec::new();
        for a in out {
            match a {
                ControllerAction::SendGroup(bytes) => {
                    for j in 0..NODES {
                        self.post(Peer::Controller, Peer::Node(j as u8), &bytes, None);
                    }
                }
                ControllerAction::SendTo { to, bytes } => {
                    if let Some(p) = peer_of(to) {
                        self.post(Peer::Controller, p, &bytes, None);
                    }
                }
                ControllerAction::PersistCore(c) => self.controller.core = Some(Disk::new(*c)),
                ControllerAction::PersistMember(m) => {
                    self.controller.rows.insert(m.member, Disk::new(*m));
                }
                ControllerAction::ForgetMember { member } => {
                    self.controller.rows.remove(&member);
                }
                ControllerAction::Record(r) => records.push(r),
            }
        }
        // The machine keeps its deadlines: the shell asks for the next one after every input.
        self.controller.timers = [self
            .controller
            .machine
            .as_ref()
            .and_then(ControllerMachine::poll_timeout)];
        for r in records {
            self.check_record(&r);
        }
    }

    /// "No round moves on without the acknowledgements it needs", against
    /// what the nodes really hold (live, or on their disks).
    fn check_record(&mut self, r: &Record) {
        let (epoch, need, when) = match r {
            Record::PhaseChanged {
                epoch,
                phase: RoundPhase::FirstTransition,
                ..
            } => (*epoch, 1, "the first transition"),
            Record::PhaseChanged {
                epoch,
                phase: RoundPhase::Draining,
                ..
            } => (*epoch, 2, "the drain"),
            Record::RoundFinished {
                epoch,
                nodes,
                acked,
                ..
            } => {
                let joined = *nodes;
                let quorum = (joined / 2 + 1).max(1);
                if *acked < quorum {
                    self.note(
                        "a round completes only with a quorum of acknowledgements",
                        format!(
                            "epoch {} completed with {acked} of {joined} nodes acknowledged (quorum {quorum})",
                            epoch.0
                        ),
                    );
                }
                (*epoch, 3, "the end of the round")
            }
            _ => return,
        };
        for i in 0..NODES {
            if self.status(i) != Some(MemberStatus::Active) {
                continue;
            }
            let pos = position_of(self.node_state(i));
            if pos.is_none_or(|p| p < (epoch, need)) {
                self.note(
                    "no round moves on without the acknowledgements it needs",
                    format!(
                        "{when} of epoch {} with active node-{i} at {pos:?}",
                        epoch.0
                    ),
                );
            }
        }
    }

    fn restart_controller(&mut self) {
        let Some(core) = &self.controller.core else {
            return;
        };
        let persist = ControllerPersist {
            core: core.value.clone(),
            members: self
                .controller
                .rows
                .values()
                .map(|r| r.value.clone())
                .collect(),
        };
        let c = ControllerMachine::restore(&persist, controller_config(), self.now)
            .expect("controller snapshot restores");
        self.controller.machine = Some(c);
        self.controller.timers = [None; 1];
        self.feed_controller(ControllerInput::Start, "start");
    }

    // -------------------------------------------------------------- steps

    fn deliver(&mut self, d: &Datagram) {
        let from = addr_of(d.from);
        match d.to {
            Peer::Controller => {
                self.feed_controller(
                    ControllerInput::Datagram {
                        from,
                        bytes: &d.bytes,
                    },
                    "datagram",
                );
            }
            Peer::Node(j) => {
                let j = j as usize;
                let receiver_live = self.live(j);
                let refused = self.feed_node(
                    j,
                    NodeInput::Datagram {
                        from,
                        bytes: &d.bytes,
                    },
                    "datagram",
                );
                if let Some((epoch, sender_live)) = d.data {
                    for r in refused {
                        if let Refusal::Undecryptable { .. } = r {
                            if sender_live && receiver_live {
                                self.note(
                                    "S1/S2: no data from a live node is undecryptable at a live node",
                                    format!(
                                        "data sealed with epoch {} by {:?} refused by live node-{j}: {r}",
                                        epoch.0, d.from
                                    ),
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    fn fire(&mut self, who: Peer, slot: usize, late_to: Option<Time>) {
        let at = match who {
            Peer::Controller => self.controller.timers[slot].take(),
            Peer::Node(i) => self.nodes[i as usize].timers[slot].take(),
        };
        let Some(at) = at else { return };
        self.advance(late_to.unwrap_or(at).max(at));
        match who {
            Peer::Controller => self.feed_controller(ControllerInput::Timeout, "timer"),
            Peer::Node(i) => {
                self.feed_node(i as usize, NodeInput::Timeout, "timer");
            }
        }
    }

    /// Every armed timer of a running process: (deadline, whose, slot).
    fn armed(&self) -> Vec<(Time, Peer, usize)> {
        let mut v = Vec::new();
        if self.controller.machine.is_some() {
            for (s, t) in self.controller.timers.iter().enumerate() {
                if let Some(at) = t {
                    v.push((*at, Peer::Controller, s));
                }
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if n.machine.is_some() {
                for (s, t) in n.timers.iter().enumerate() {
                    if let Some(at) = t {
                        v.push((*at, Peer::Node(i as u8), s));
                    }
                }
            }
        }
        v.sort();
        v
    }

    /// Everything back (processes, links) and then, with no more loss,
    /// datagrams delivered in the order sent and timers fired in deadline
    /// order, until the fleet has converged with nothing in flight.
    fn settle(&mut self, max_deliveries: u32) -> Healed {
        if self.controller.machine.is_none() {
            self.restart_controller();
        }
        self.controller.link = true;
        for i in 0..NODES {
            if self.nodes[i].machine.is_none() {
                self.nodes[i].link = true;
                self.restart_node(i);
            } else if !self.nodes[i].link {
                self.nodes[i].link = true;
                self.feed_node(i, NodeInput::LinkUp, "link up");
            }
        }
        let mut deliveries = 0;
        loop {
            self.net.sort();
            if self.net.is_empty() && self.converged().is_ok() {
                return Healed {
                    converged: true,
                    deliveries,
                    why: String::new(),
                };
            }
            if deliveries >= max_deliveries {
                return Healed {
                    converged: false,
                    deliveries,
                    why: self.converged().err().unwrap_or_default(),
                };
            }
            if !self.net.is_empty() {
                let d = self.net.remove(0);
                deliveries += 1;
                self.deliver(&d);
                continue;
            }
            let Some(&(_, who, slot)) = self.armed().first() else {
                return Healed {
                    converged: false,
                    deliveries,
                    why: format!(
                        "nothing left to do and not converged: {}",
                        self.converged().err().unwrap_or_default()
                    ),
                };
            };
            self.fire(who, slot, None);
        }
    }
}

// ------------------------------------------------------------------ the model

/// What the checker may do next.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Deliver the datagram (and forget it).
    Deliver(Datagram),
    /// Deliver a copy and keep the datagram in flight.
    Duplicate(Datagram),
    /// Fire a timer at its deadline, or (late timers) at the latest armed deadline.
    Fire {
        who: Peer,
        timer: usize,
        late: bool,
    },
    Rekey,
    Send(u8),
    CrashNode(u8),
    RestartNode(u8),
    LinkDown(u8),
    LinkUp(u8),
    CrashController,
    RestartController,
    IsolateController,
    ReconnectController,
    Heal,
}

pub struct FleetModel {
    scope: Scope,
    init: Fleet,
}

impl FleetModel {
    pub fn new(scope: Scope) -> FleetModel {
        let init = FleetModel::initial(&scope);
        FleetModel { scope, init }
    }

    /// A controller with every node enrolled and joined at epoch 1, nothing in flight.
    fn initial(scope: &Scope) -> Fleet {
        let mut rng = ChaCha8Rng::seed_from_u64(MODEL_SEED);
        let mut out = Vec::new();
        let controller = ControllerMachine::new(controller_config(), START, &mut rng, &mut out);
        let mut f = Fleet {
            now: START,
            controller: ControllerSlot {
                machine: Some(controller),
                core: None,
                rows: BTreeMap::new(),
                link: true,
                timers: [None; 1],
            },
            nodes: std::array::from_fn(|i| NodeSlot {
                machine: Some(NodeMachine::new(node_id(i), &initial_key(i), node_config())),
                disk: None,
                link: true,
                timers: [None; 1],
                high: None,
            }),
            net: Vec::new(),
            left: Left {
                rounds: scope.rounds,
                timer_firings: scope.timer_firings,
                node_crashes: scope.node_crashes,
                controller_restarts: scope.controller_restarts,
                link_losses: scope.link_losses,
                controller_isolations: scope.controller_isolations,
                duplicates: scope.duplicates,
                data_sends: scope.data_sends,
            },
            healed: None,
            broken: Vec::new(),
        };
        f.carry_controller(out);
        for i in 0..NODES {
            f.feed_controller(
                ControllerInput::Enroll {
                    node_id: node_id(i),
                    initial_key: initial_key(i),
                    addr: node_addr(i),
                },
                "enroll",
            );
        }
        f.feed_controller(ControllerInput::Start, "start");
        for i in 0..NODES {
            f.feed_node(i, NodeInput::LinkUp, "start");
        }
        let joined = f.settle(1_000);
        assert!(joined.converged, "the fleet does not join: {joined:?}");
        assert!(f.broken.is_empty(), "{:?}", f.broken);
        f.net.clear();
        if scope.rekey_at_start && f.left.rounds > 0 {
            f.left.rounds -= 1;
            f.feed_controller(ControllerInput::Rekey, "rekey");
            f.net.sort();
        }
        f
    }
}

impl Model for FleetModel {
    type State = Fleet;
    type Action = Action;

    fn init_states(&self) -> Vec<Fleet> {
        vec![self.init.clone()]
    }

    fn actions(&self, s: &Fleet, actions: &mut Vec<Action>) {
        if s.healed.is_some() {
            return;
        }
        for d in &s.net {
            actions.push(Action::Deliver(d.clone()));
            if s.left.duplicates > 0 {
                actions.push(Action::Duplicate(d.clone()));
            }
        }
        if s.left.timer_firings > 0 {
            let armed = s.armed();
            if let Some(&(first, ..)) = armed.first() {
                let last = armed.last().map_or(first, |a| a.0);
                for &(at, who, timer) in &armed {
                    if self.scope.late_timers || at == first {
                        actions.push(Action::Fire {
                            who,
                            timer,
                            late: false,
                        });
                    }
                    if self.scope.late_timers && at < last {
                        actions.push(Action::Fire {
                            who,
                            timer,
                            late: true,
                        });
                    }
                }
            }
        }
        let ctl_up = s.controller.machine.is_some();
        if ctl_up && s.left.rounds > 0 {
            actions.push(Action::Rekey);
        }
        for i in 0..NODES {
            let n = &s.nodes[i];
            let i8 = i as u8;
            // The nodes differ only in their member numbers and ids: one
            // sends the application data and another takes the faults,
            // which covers a sender and a receiver on either side of a fault.
            let (sender, faulty) = (i == 0, i == NODES - 1 || self.scope.faults_anywhere);
            match &n.machine {
                Some(_) => {
                    if sender && s.left.data_sends > 0 {
                        actions.push(Action::Send(i8));
                    }
                    if faulty && s.left.node_crashes > 0 {
                        actions.push(Action::CrashNode(i8));
                    }
                }
                None => actions.push(Action::RestartNode(i8)),
            }
            if faulty && n.link && s.left.link_losses > 0 {
                actions.push(Action::LinkDown(i8));
            }
            if !n.link {
                actions.push(Action::LinkUp(i8));
            }
        }
        if ctl_up && s.left.controller_restarts > 0 {
            actions.push(Action::CrashController);
        }
        if !ctl_up {
            actions.push(Action::RestartController);
        }
        if s.controller.link && s.left.controller_isolations > 0 {
            actions.push(Action::IsolateController);
        }
        if !s.controller.link {
            actions.push(Action::ReconnectController);
        }
        if !self.scope.heal_when_quiet || s.net.is_empty() || s.left.timer_firings == 0 {
            actions.push(Action::Heal);
        }
    }

    fn next_state(&self, s: &Fleet, action: Action) -> Option<Fleet> {
        let mut f = s.clone();
        match action {
            Action::Deliver(d) => {
                let k = f.net.iter().position(|x| *x == d)?;
                f.net.remove(k);
                f.deliver(&d);
            }
            Action::Duplicate(d) => {
                f.net.iter().position(|x| *x == d)?;
                f.left.duplicates -= 1;
                f.deliver(&d);
            }
            Action::Fire { who, timer, late } => {
                let last = late.then(|| f.armed().last().map(|a| a.0)).flatten();
                let machines = |f: &Fleet| {
                    let nodes: Vec<_> = f.nodes.iter().map(|n| digest(&n.machine)).collect();
                    digest(&(digest(&f.controller.machine), nodes, f.net.len()))
                };
                let before = machines(&f);
                f.fire(who, timer, last);
                // A firing the machine ignores (its deadline was replaced or
                // its work is done) is not a retry: it costs no budget.
                if before != machines(&f) {
                    f.left.timer_firings -= 1;
                }
            }
            Action::Rekey => {
                f.left.rounds -= 1;
                f.feed_controller(ControllerInput::Rekey, "rekey");
            }
            Action::Send(i) => {
                f.left.data_sends -= 1;
                f.feed_node(i as usize, NodeInput::Send(b"application message"), "send");
            }
            Action::CrashNode(i) => {
                f.left.node_crashes -= 1;
                let n = &mut f.nodes[i as usize];
                n.machine = None;
                n.timers = [None; 1];
                f.cut(Peer::Node(i));
            }
            Action::RestartNode(i) => f.restart_node(i as usize),
            Action::LinkDown(i) => {
                f.left.link_losses -= 1;
                f.nodes[i as usize].link = false;
                f.cut(Peer::Node(i));
            }
            Action::LinkUp(i) => {
                f.nodes[i as usize].link = true;
                f.feed_node(i as usize, NodeInput::LinkUp, "link up");
            }
            Action::CrashController => {
                f.left.controller_restarts -= 1;
                f.controller.machine = None;
                f.controller.timers = [None; 1];
                f.cut(Peer::Controller);
            }
            Action::RestartController => f.restart_controller(),
            Action::IsolateController => {
                f.left.controller_isolations -= 1;
                f.controller.link = false;
                f.cut(Peer::Controller);
            }
            Action::ReconnectController => f.controller.link = true,
            Action::Heal => {
                // What is still in flight is lost (delivering some of it first
                // is the same as healing after those deliveries).
                f.net.clear();
                let healed = f.settle(self.scope.heal_deliveries);
                f.healed = Some(healed);
            }
        }
        f.net.sort();
        Some(f)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(
                "S1/S2: every key a live node seals with is held by every live node",
                |_: &FleetModel, s: &Fleet| s.keys_agree().is_ok(),
            ),
            Property::always(
                "S1/S2: no data from a live node is undecryptable at a live node",
                |_: &FleetModel, s: &Fleet| {
                    !broken(
                        s,
                        "S1/S2: no data from a live node is undecryptable at a live node",
                    )
                },
            ),
            Property::always("no node moves backwards", |_: &FleetModel, s: &Fleet| {
                !broken(s, "no node moves backwards")
            }),
            Property::always(
                "no round moves on without the acknowledgements it needs",
                |_: &FleetModel, s: &Fleet| {
                    !broken(s, "no round moves on without the acknowledgements it needs")
                },
            ),
            Property::always(
                "a round completes only with a quorum of acknowledgements",
                |_: &FleetModel, s: &Fleet| {
                    !broken(
                        s,
                        "a round completes only with a quorum of acknowledgements",
                    )
                },
            ),
            Property::always(
                "once healed, every node reaches the current key",
                |_: &FleetModel, s: &Fleet| s.healed.as_ref().is_none_or(|h| h.converged),
            ),
            // Coverage: the model reaches what it is meant to explore.
            Property::sometimes(
                "coverage: a round completes",
                |_: &FleetModel, s: &Fleet| s.current_epoch().is_some_and(|e| e.0 > 1),
            ),
            Property::sometimes(
                "coverage: a node is marked stale",
                |_: &FleetModel, s: &Fleet| {
                    (0..NODES).any(|i| s.status(i) == Some(MemberStatus::Stale))
                },
            ),
            Property::sometimes(
                "coverage: a node restarts from its disk inside a round",
                |m: &FleetModel, s: &Fleet| {
                    s.left.node_crashes < m.scope.node_crashes
                        && s.nodes.iter().all(|n| n.machine.is_some())
                        && s.controller
                            .machine
                            .as_ref()
                            .is_some_and(|c| c.round().is_some())
                },
            ),
            Property::sometimes(
                "coverage: the controller restarts from its disk inside a round",
                |m: &FleetModel, s: &Fleet| {
                    s.left.controller_restarts < m.scope.controller_restarts
                        && s.controller
                            .machine
                            .as_ref()
                            .is_some_and(|c| c.round().is_some())
                },
            ),
            Property::sometimes(
                "coverage: data crosses a round",
                |m: &FleetModel, s: &Fleet| {
                    s.left.data_sends < m.scope.data_sends
                        && s.controller
                            .machine
                            .as_ref()
                            .is_some_and(|c| c.round().is_some())
                },
            ),
            Property::sometimes(
                "coverage: a healed fleet converges after a round",
                |_: &FleetModel, s: &Fleet| {
                    s.healed.as_ref().is_some_and(|h| h.converged)
                        && s.current_epoch().is_some_and(|e| e.0 > 1)
                },
            ),
        ]
    }
}

fn broken(s: &Fleet, property: &str) -> bool {
    s.broken.iter().any(|(p, _)| *p == property)
}

// ------------------------------------------------------------------ running it

/// Properties the machines on main are known to break, printed with their
/// trace but not failing the test. The quorum rule of SPEC §2 ("a round that
/// reaches too few nodes is not completed") is issue 12, deliverable 2: an
/// isolated controller marks every node stale and completes the round with
/// no acknowledgement at all. Remove it from here when that lands.
const KNOWN_OPEN: &[&str] = &[];

pub struct Report {
    pub scope: Scope,
    pub states: usize,
    pub unique_states: usize,
    pub max_depth: usize,
    pub elapsed: Duration,
    /// Property name → a path to a violation (always) or to an example (sometimes).
    pub discoveries: Vec<(&'static str, bool, String)>,
}

/// `MODEL_SCOPE="timer_firings=2,duplicates=0"` overrides fields (for exploring the cost).
fn overridden(mut s: Scope) -> Scope {
    let Ok(spec) = std::env::var("MODEL_SCOPE") else {
        return s;
    };
    for kv in spec.split(',').filter(|x| !x.is_empty()) {
        let (k, v) = kv.split_once('=').expect("MODEL_SCOPE is key=value,...");
        let n: u32 = v.parse().expect("MODEL_SCOPE values are numbers");
        match k {
            "rounds" => s.rounds = n as u8,
            "timer_firings" => s.timer_firings = n as u8,
            "node_crashes" => s.node_crashes = n as u8,
            "controller_restarts" => s.controller_restarts = n as u8,
            "link_losses" => s.link_losses = n as u8,
            "controller_isolations" => s.controller_isolations = n as u8,
            "duplicates" => s.duplicates = n as u8,
            "data_sends" => s.data_sends = n as u8,
            "late_timers" => s.late_timers = n != 0,
            "rekey_at_start" => s.rekey_at_start = n != 0,
            "heal_when_quiet" => s.heal_when_quiet = n != 0,
            "faults_anywhere" => s.faults_anywhere = n != 0,
            "max_depth" => s.max_depth = (n > 0).then_some(n as usize),
            other => panic!("MODEL_SCOPE: unknown field {other}"),
        }
    }
    s
}

pub fn check(scope: Scope) -> Report {
    let scope = overridden(scope);
    let model = FleetModel::new(scope.clone());
    if std::env::var_os("MODEL_DEBUG").is_some() {
        println!(
            "initial state: {:?}\narmed: {:?}",
            model.init,
            model.init.armed()
        );
    }
    let properties: Vec<_> = model
        .properties()
        .into_iter()
        .map(|p| (p.name, p.expectation))
        .collect();
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = model.checker().threads(threads);
    if let Some(events) = scope.max_depth {
        // stateright counts the initial state as depth 1 and drops states at
        // the target depth unchecked: states after `events` events are checked.
        builder = builder.target_max_depth(events + 2);
    }
    if let Some(n) = std::env::var("MODEL_MAX_STATES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        builder = builder.target_state_count(n);
    }
    let checker = builder.spawn_bfs().join();
    let elapsed = started.elapsed();
    let mut discoveries = Vec::new();
    for (name, expectation) in properties {
        let is_example = matches!(expectation, stateright::Expectation::Sometimes);
        match checker.discovery(name) {
            Some(path) => {
                let mut trace = String::new();
                let states = path.into_vec();
                for (i, (state, action)) in states.iter().enumerate() {
                    trace.push_str(&format!("  {i:>2}. {state:?}\n"));
                    if let Some(a) = action {
                        trace.push_str(&format!("      --> {}\n", describe(a)));
                    }
                }
                discoveries.push((name, is_example, trace));
            }
            None => discoveries.push((name, is_example, String::new())),
        }
    }
    Report {
        scope,
        states: checker.state_count(),
        unique_states: checker.unique_state_count(),
        max_depth: checker.max_depth(),
        elapsed,
        discoveries,
    }
}

fn describe(a: &Action) -> String {
    match a {
        Action::Deliver(d) | Action::Duplicate(d) => {
            let verb = match a {
                Action::Deliver(_) => "deliver",
                _ => "deliver a copy of",
            };
            format!(
                "{verb} {} {:?} -> {:?} (sent {})",
                d.what, d.from, d.to, d.sent
            )
        }
        other => format!("{other:?}"),
    }
}

impl Report {
    pub fn print(&self) {
        println!(
            "model check, {}: {} states ({} unique), depth {}, {:.1} s, scope {:?}",
            self.scope.name,
            self.states,
            self.unique_states,
            self.max_depth,
            self.elapsed.as_secs_f64(),
            self.scope
        );
        for (p, example, trace) in &self.discoveries {
            let verdict = match (example, trace.is_empty()) {
                (false, true) => "holds",
                (false, false) if KNOWN_OPEN.contains(p) => "KNOWN OPEN",
                (false, false) => "VIOLATED",
                (true, false) => "reached",
                (true, true) => "NOT REACHED",
            };
            println!("  {verdict:>11}: {p}");
            if !example && !trace.is_empty() {
                println!("{trace}");
            }
        }
    }

    /// Whether this scope is meant to reach an example of a coverage property.
    fn expected(&self, property: &str) -> bool {
        let s = &self.scope;
        match property {
            "coverage: a node restarts from its disk inside a round" => s.node_crashes > 0,
            "coverage: the controller restarts from its disk inside a round" => {
                s.controller_restarts > 0
            }
            "coverage: data crosses a round" => s.data_sends > 0,
            // The rekey, the cut, two timer firings and the other nodes'
            // key updates and replies: seven events unless the round is
            // under way from the start.
            "coverage: a node is marked stale" => {
                s.timer_firings >= 2
                    && (s.controller_isolations > 0 || s.link_losses > 0)
                    && (s.rekey_at_start || s.max_depth.is_none_or(|d| d >= 7))
            }
            _ => true,
        }
    }

    pub fn assert_holds(&self) {
        let bad: Vec<_> = self
            .discoveries
            .iter()
            .filter(|(p, example, trace)| {
                *example == trace.is_empty() && self.expected(p) && !KNOWN_OPEN.contains(p)
            })
            .map(|(p, ..)| *p)
            .collect();
        assert!(bad.is_empty(), "model check failed: {bad:?} (traces above)");
    }
}
