//! The fleet scenario: one controller and N nodes driven through R rekey
//! rounds over a [`SimNet`], with faults, data traffic, and the exact
//! invariant checks. See the module docs of [`crate::sim`] for what is counted.

use super::net::{Arrival, Peer, SimNet, Traffic};
use super::{SimConfig, SimReport, Spread};
use crate::crypto::{Epoch, InitialKey};
use crate::protocol::{
    apply_persist, ControllerAction, ControllerConfig, ControllerInput, ControllerMachine,
    MemberStatus, MemoryState, NodeAction, NodeConfig, NodeEvent, NodeInput, NodeMachine,
    NodePersist, NodeState, Record, Refusal, StateStore, Time, TriggerConfig, Via,
};
use crate::wire::{NodeId, Step};
use core::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::{ChaCha20Rng, ChaCha8Rng};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

const CONTROLLER_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 168, 0, 1), 47800));

fn node_addr(i: u32) -> SocketAddr {
    let [_, b, c, d] = i.to_be_bytes();
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, b, c, d), 47801))
}

fn peer_of(addr: SocketAddr) -> Option<Peer> {
    if addr == CONTROLLER_ADDR {
        return Some(Peer::Controller);
    }
    match addr {
        SocketAddr::V4(v4) if v4.ip().octets()[0] == 10 => {
            let [_, b, c, d] = v4.ip().octets();
            Some(Peer::Node(u32::from_be_bytes([0, b, c, d])))
        }
        _ => None,
    }
}

fn addr_of(p: Peer) -> SocketAddr {
    match p {
        Peer::Controller => CONTROLLER_ADDR,
        Peer::Node(i) => node_addr(i),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    LinkUp(u32),
    Data(u32),
    /// The node's deadline (`poll_timeout`) as it was when scheduled.
    NodeTimeout(u32, Time),
    /// The controller's deadline (`poll_timeout`) as it was when scheduled.
    ControllerTimeout(Time),
    Rekey,
    Offline(u32),
    Online(u32),
    Crash(u32),
    Restart(u32),
    ControllerCrash,
    ControllerRestart,
    Check,
}

/// What the invariant checks know about one node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct View {
    in_sync: bool,
    held: [Option<Epoch>; 2],
    sealing: Option<Epoch>,
    pos: Option<(Epoch, Step)>,
}

struct Slot {
    machine: NodeMachine,
    cfg_hint: bool,
    up: bool,
    online: bool,
    status: MemberStatus,
    view: View,
    /// Kept only for nodes the plan will crash (to keep memory small).
    keep_persist: bool,
    persisted: Option<Box<NodePersist>>,
    /// The last flushed snapshot (a power loss restarts from it).
    flushed: Option<Box<NodePersist>>,
    /// Whether `persisted` is newer than `flushed` (only checkpointed since).
    checkpointed: bool,
    /// The deadline a `NodeTimeout` event is scheduled for.
    timeout: Option<Time>,
}

#[derive(Default)]
struct Counts {
    in_sync: u32,
    holders: HashMap<Epoch, u32>,
    sealers: HashMap<Epoch, u32>,
    /// Latest moment a datagram sealed with this epoch by an in-sync node can still arrive.
    last_arrival: HashMap<Epoch, Time>,
}

impl Counts {
    fn apply(&mut self, v: &View, sign: i64) {
        if !v.in_sync {
            return;
        }
        let bump = |m: &mut HashMap<Epoch, u32>, e: Epoch| {
            let c = m.entry(e).or_insert(0);
            *c = (i64::from(*c) + sign).max(0) as u32;
        };
        self.in_sync = (i64::from(self.in_sync) + sign).max(0) as u32;
        for e in v.held.iter().flatten() {
            bump(&mut self.holders, *e);
        }
        if let Some(e) = v.sealing {
            bump(&mut self.sealers, e);
        }
    }
}

pub(super) struct Fleet<T: SimNet> {
    cfg: SimConfig,
    ctl_cfg: ControllerConfig,
    net: T,
    now: Time,
    rng: ChaCha20Rng,
    plan: ChaCha8Rng,
    controller: Option<ControllerMachine>,
    /// The deadline a `ControllerTimeout` event is scheduled for.
    ctl_timeout: Option<Time>,
    /// The controller's persisted state: its persist actions applied as
    /// production applies them to the management table.
    ctl_state: MemoryState,
    nodes: Vec<Slot>,
    events: BinaryHeap<Reverse<(Time, u64, Event)>>,
    order: u64,
    counts: Counts,
    node_out: Vec<NodeAction>,
    ctl_out: Vec<ControllerAction>,
    to: Vec<Peer>,
    crash_plan: Vec<Vec<u32>>,
    first_rekey_scheduled: bool,
    rounds_started: u32,
    rounds_finished: u32,
    round_ms: Vec<u64>,
    drain_ms: Vec<u64>,
    stopping: bool,
    pub(super) report: SimReport,
}

impl<T: SimNet> Fleet<T> {
    pub(super) fn new(cfg: SimConfig, net: T) -> Fleet<T> {
        let max_delay = net.max_delay_ms();
        let ctl_cfg = ControllerConfig {
            drain_grace_ms: (!cfg.measured_drain).then_some(max_delay + 20),
            drain_floor_ms: 1,
            max_flight_ms: max_delay + 20,
            retry_initial_ms: 100,
            retry_max_ms: 1000,
            retry_jitter_pct: 25,
            group_attempts: 2,
            stale_after_ms: cfg.stale_after_ms,
            triggers: TriggerConfig::manual_only(),
            beacon_interval_ms: 1000,
            address: CONTROLLER_ADDR,
            ..ControllerConfig::default()
        };
        let mut plan = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x706c_616e);
        let n = cfg.agents;
        // Which nodes crash in which round is fixed up front so that only their
        // persisted snapshots are kept.
        let crash_plan: Vec<Vec<u32>> = (0..cfg.rounds)
            .map(|_| {
                let k = cfg.crash.min(n);
                let mut v: Vec<u32> = Vec::with_capacity(k as usize);
                while v.len() < k as usize {
                    let i = plan.gen_range(0..n);
                    if !v.contains(&i) {
                        v.push(i);
                    }
                }
                v
            })
            .collect();
        let report = SimReport {
            agents: cfg.agents,
            loss: cfg.loss,
            seed: cfg.seed,
            rounds: cfg.rounds,
            ..SimReport::default()
        };
        Fleet {
            ctl_cfg,
            net,
            now: Time(0),
            rng: ChaCha20Rng::seed_from_u64(cfg.seed),
            plan,
            controller: None,
            ctl_timeout: None,
            ctl_state: MemoryState::default(),
            nodes: Vec::with_capacity(n as usize),
            events: BinaryHeap::new(),
            order: 0,
            counts: Counts::default(),
            node_out: Vec::new(),
            ctl_out: Vec::new(),
            to: Vec::new(),
            crash_plan,
            first_rekey_scheduled: false,
            rounds_started: 0,
            rounds_finished: 0,
            round_ms: Vec::new(),
            drain_ms: Vec::new(),
            stopping: false,
            report,
            cfg,
        }
    }

    fn schedule(&mut self, at: Time, e: Event) {
        self.order += 1;
        self.events.push(Reverse((at, self.order, e)));
    }

    fn node_cfg(&self, hint: bool) -> NodeConfig {
        NodeConfig {
            controller: CONTROLLER_ADDR,
            sync_retry_initial_ms: 200,
            sync_retry_max_ms: 2000,
            usage_interval_ms: Some(10_000),
            max_queued: 16,
            // Every member may send: replay windows are kept for each sender
            // (never evicted), and a sender beyond the limit is refused.
            data_replay_senders: self.cfg.agents as usize,
            epoch_hint: hint,
            beacon_silence_ms: NodeConfig::default().beacon_silence_ms,
        }
    }

    pub(super) fn run(&mut self) {
        let n = self.cfg.agents;
        let mut out = std::mem::take(&mut self.ctl_out);
        let mut c = ControllerMachine::new(self.ctl_cfg.clone(), self.now, &mut self.rng, &mut out);
        let crashing: std::collections::HashSet<u32> =
            self.crash_plan.iter().flatten().copied().collect();
        for i in 0..n {
            let mut key = [0u8; 16];
            self.rng.fill_bytes(&mut key);
            let initial = InitialKey(key);
            let node_id = NodeId::parse(&format!("node-{i:05}")).unwrap_or_else(|_| unreachable!());
            let _ = c.handle(
                self.now,
                ControllerInput::Enroll {
                    node_id: node_id.clone(),
                    initial_key: initial.clone(),
                    addr: node_addr(i),
                },
                &mut self.rng,
                &mut out,
            );
            let hint = !self
                .plan
                .gen_bool(self.cfg.no_hint_fraction.clamp(0.0, 1.0));
            let machine = NodeMachine::new(node_id, &initial, self.node_cfg(hint));
            self.nodes.push(Slot {
                machine,
                cfg_hint: hint,
                up: true,
                online: true,
                status: MemberStatus::Enrolled,
                view: View::default(),
                keep_persist: crashing.contains(&i),
                persisted: None,
                flushed: None,
                checkpointed: false,
                timeout: None,
            });
            let t = Time(self.plan.gen_range(0..200));
            self.schedule(t, Event::LinkUp(i));
            let t = Time(self.plan.gen_range(0..self.cfg.data_interval_ms.max(1)));
            self.schedule(t, Event::Data(i));
        }
        let _ = c.handle(self.now, ControllerInput::Start, &mut self.rng, &mut out);
        self.controller = Some(c);
        self.ctl_out = out;
        self.apply_controller();
        self.schedule(Time(500), Event::Check);

        let deadline = Time(self.cfg.max_virtual_ms);
        loop {
            let next_event = self
                .events
                .peek()
                .map_or(Time::MAX, |Reverse((t, _, _))| *t);
            let mut to = std::mem::take(&mut self.to);
            let arrival = self.net.next_arrival(next_event, &mut to);
            if let Some(a) = arrival {
                self.now = self.now.max(a.at);
                for p in to.iter().copied() {
                    self.deliver(p, &a);
                }
                self.to = to;
            } else {
                self.to = to;
                if self.stopping {
                    break; // network drained after convergence
                }
                let Some(Reverse((t, _, e))) = self.events.pop() else {
                    break;
                };
                self.now = self.now.max(t);
                if self.now > deadline {
                    break;
                }
                self.fire(e);
            }
        }
        self.finish();
    }

    fn deliver(&mut self, p: Peer, a: &Arrival) {
        let from = addr_of(a.from);
        match p {
            Peer::Controller => {
                let Some(c) = &mut self.controller else {
                    return;
                };
                let mut out = std::mem::take(&mut self.ctl_out);
                let _ = c.handle(
                    self.now,
                    ControllerInput::Datagram {
                        from,
                        bytes: &a.bytes,
                    },
                    &mut self.rng,
                    &mut out,
                );
                self.ctl_out = out;
                self.apply_controller();
            }
            Peer::Node(i) => {
                let Some(slot) = self.nodes.get_mut(i as usize) else {
                    return;
                };
                if !slot.up {
                    return;
                }
                let receiver_in_sync = slot.view.in_sync;
                let mut out = std::mem::take(&mut self.node_out);
                slot.machine.handle(
                    self.now,
                    NodeInput::Datagram {
                        from,
                        bytes: &a.bytes,
                    },
                    &mut self.rng,
                    &mut out,
                );
                self.node_out = out;
                let data = (a.traffic == Traffic::Data).then_some((receiver_in_sync, a.tag == 1));
                self.apply_node(i, data);
            }
        }
    }

    fn node_input(&mut self, i: u32, input: NodeInput<'_>) {
        let Some(slot) = self.nodes.get_mut(i as usize) else {
            return;
        };
        let mut out = std::mem::take(&mut self.node_out);
        slot.machine
            .handle(self.now, input, &mut self.rng, &mut out);
        self.node_out = out;
        self.apply_node(i, None);
    }

    fn controller_input(&mut self, input: ControllerInput<'_>) {
        let Some(c) = &mut self.controller else {
            return;
        };
        let mut out = std::mem::take(&mut self.ctl_out);
        let _ = c.handle(self.now, input, &mut self.rng, &mut out);
        // Idle between rounds: the next round prepared, its share announced
        // in the next pass (the deadline `apply_controller` arms).
        if self.cfg.prepare_ahead && c.round().is_none() {
            while c.prepare_round(&mut self.rng, 256) {}
        }
        self.ctl_out = out;
        self.apply_controller();
    }

    fn fire(&mut self, e: Event) {
        match e {
            Event::LinkUp(i) => self.node_input(i, NodeInput::LinkUp),
            Event::Data(i) => {
                if self.stopping {
                    return;
                }
                let iv = self.cfg.data_interval_ms.max(2);
                let next = self.now.plus(self.plan.gen_range(iv / 2..=iv + iv / 2));
                self.schedule(next, Event::Data(i));
                if self.nodes.get(i as usize).is_some_and(|s| s.up && s.online) {
                    let mut msg = [0u8; 32];
                    msg[..4].copy_from_slice(&i.to_be_bytes());
                    msg[4..12].copy_from_slice(&self.now.0.to_be_bytes());
                    self.node_input(i, NodeInput::Send(&msg));
                }
            }
            Event::NodeTimeout(i, at) => {
                // Only the event for the deadline the node last gave; others
                // were superseded. (`now` may be past it: real sockets.)
                if let Some(s) = self
                    .nodes
                    .get_mut(i as usize)
                    .filter(|s| s.up && s.timeout == Some(at))
                {
                    s.timeout = None;
                    self.node_input(i, NodeInput::Timeout);
                }
            }
            Event::ControllerTimeout(at) => {
                // As for nodes: only the event for the deadline last given
                // (none survives a crash).
                if self.controller.is_some() && self.ctl_timeout == Some(at) {
                    self.ctl_timeout = None;
                    self.controller_input(ControllerInput::Timeout);
                }
            }
            Event::Rekey => {
                if self.rounds_started >= self.cfg.rounds {
                    return;
                }
                if self.controller.is_none()
                    || self
                        .controller
                        .as_ref()
                        .is_some_and(|c| c.round().is_some())
                {
                    self.schedule(self.now.plus(200), Event::Rekey);
                    return;
                }
                let r = self.rounds_started as usize;
                self.rounds_started += 1;
                self.controller_input(ControllerInput::Rekey);
                self.plan_faults(r);
            }
            Event::Offline(i) => {
                if let Some(s) = self.nodes.get_mut(i as usize) {
                    if s.online {
                        s.online = false;
                        self.net.set_online(Peer::Node(i), false);
                        self.report.offline_episodes += 1;
                        self.refresh(i);
                    }
                }
            }
            Event::Online(i) => {
                if let Some(s) = self.nodes.get_mut(i as usize) {
                    if !s.online {
                        s.online = true;
                        if s.up {
                            self.net.set_online(Peer::Node(i), true);
                            self.node_input(i, NodeInput::LinkUp);
                        }
                    }
                }
            }
            Event::Crash(i) => {
                if let Some(s) = self.nodes.get_mut(i as usize) {
                    if s.up {
                        s.up = false;
                        self.net.set_online(Peer::Node(i), false);
                        self.report.node_crashes += 1;
                        self.refresh(i);
                    }
                }
            }
            Event::Restart(i) => {
                let cfg = self
                    .nodes
                    .get(i as usize)
                    .map(|s| self.node_cfg(s.cfg_hint));
                let (Some(cfg), Some(s)) = (cfg, self.nodes.get_mut(i as usize)) else {
                    return;
                };
                if s.up {
                    return;
                }
                s.timeout = None;
                let from = if self.cfg.power_loss {
                    if s.checkpointed {
                        self.report.checkpoints_lost += 1;
                        s.persisted.clone_from(&s.flushed);
                        s.checkpointed = false;
                    }
                    &s.flushed
                } else {
                    &s.persisted
                };
                if let Some(p) = from {
                    self.report.steps_prepared += s.machine.prepare_stats().used;
                    match NodeMachine::restore(p, cfg) {
                        Ok(m) => s.machine = m,
                        Err(_) => self.report.restore_failures += 1,
                    }
                } else {
                    // Every node persists before its first datagram, so this cannot happen.
                    self.report.restore_failures += 1;
                }
                s.up = true;
                if s.online {
                    self.net.set_online(Peer::Node(i), true);
                    self.node_input(i, NodeInput::LinkUp);
                } else {
                    self.refresh(i);
                }
            }
            Event::ControllerCrash => {
                if self.controller.take().is_some() {
                    self.ctl_timeout = None;
                    self.net.set_online(Peer::Controller, false);
                    self.report.controller_crashes += 1;
                }
            }
            Event::ControllerRestart => {
                if self.controller.is_some() {
                    return;
                }
                let Ok(Some(persist)) = self.ctl_state.load() else {
                    return;
                };
                match ControllerMachine::restore(&persist, self.ctl_cfg.clone(), self.now) {
                    Ok(c) => {
                        self.controller = Some(c);
                        self.net.set_online(Peer::Controller, true);
                        self.controller_input(ControllerInput::Start);
                    }
                    Err(_) => self.report.restore_failures += 1,
                }
            }
            Event::Check => self.check(),
        }
    }

    /// Offline episodes, node crashes and a controller crash during round `r`.
    fn plan_faults(&mut self, r: usize) {
        let n = self.cfg.agents;
        for _ in 0..self.cfg.offline.min(n) {
            let i = self.plan.gen_range(0..n);
            let at = self.now.plus(self.plan.gen_range(0..2000));
            self.schedule(at, Event::Offline(i));
            self.schedule(at.plus(self.cfg.offline_ms), Event::Online(i));
        }
        for i in self.crash_plan.get(r).cloned().unwrap_or_default() {
            let at = self.now.plus(self.plan.gen_range(0..3000));
            self.schedule(at, Event::Crash(i));
            self.schedule(at.plus(300), Event::Restart(i));
        }
        if self.cfg.controller_crash {
            let at = self.now.plus(self.plan.gen_range(0..3000));
            self.schedule(at, Event::ControllerCrash);
            self.schedule(at.plus(400), Event::ControllerRestart);
        }
    }

    fn all_synced_and_live(&self) -> bool {
        self.nodes.iter().all(|s| s.view.in_sync)
    }

    fn check(&mut self) {
        self.schedule(self.now.plus(250), Event::Check);
        if !self.first_rekey_scheduled {
            // The first rekey once every node joined (or after a minute, longer at high loss).
            let patience = 60_000 * self.cfg.loss_factor();
            if self.all_synced_and_live() || self.now >= Time(patience) {
                self.first_rekey_scheduled = true;
                self.report.joined_by_ms = self.now.0;
                self.schedule(self.now, Event::Rekey);
            }
            return;
        }
        if self.rounds_finished < self.cfg.rounds {
            return;
        }
        let Some(c) = &self.controller else { return };
        if c.round().is_some() {
            return;
        }
        let epoch = c.current_epoch();
        let converged = self.nodes.iter().all(|s| {
            s.view.in_sync && s.machine.state() == NodeState::UpdateCompleted { current: epoch }
        });
        if converged {
            self.report.converged = true;
            self.stopping = true;
            self.events.clear();
        }
    }

    fn refresh(&mut self, i: u32) {
        let Some(s) = self.nodes.get_mut(i as usize) else {
            return;
        };
        let m = &s.machine;
        let in_sync = s.up && s.online && m.is_synced() && s.status == MemberStatus::Active;
        let (held, sealing) = match m.keyring() {
            Some(r) => {
                let (a, b) = r.epochs();
                ([Some(a), b], Some(r.sealing_epoch()))
            }
            None => ([None, None], None),
        };
        let new = View {
            in_sync,
            held,
            sealing,
            pos: m.position(),
        };
        let old = s.view;
        if new == old {
            return;
        }
        s.view = new;
        if let (Some(o), Some(n)) = (old.pos, new.pos) {
            if n < o {
                self.report.backward_transitions += 1;
            }
        }
        self.counts.apply(&old, -1);
        self.counts.apply(&new, 1);
        // S2: a live node drops a key only when no live node seals with it and no
        // datagram sealed with it by a live node can still arrive.
        if old.in_sync && new.in_sync {
            for e in old.held.iter().flatten() {
                if !new.held.contains(&Some(*e)) {
                    let sealers = self.counts.sealers.get(e).copied().unwrap_or(0);
                    let last = self.counts.last_arrival.get(e).copied().unwrap_or(Time(0));
                    if sealers > 0 || self.now < last {
                        self.report.s2_violations += 1;
                    }
                }
            }
        }
    }

    /// S1 at every seal by a live node: every live node holds that key.
    fn on_seal(&mut self, i: u32, epoch: Epoch) -> bool {
        self.report.data_sent += 1;
        let in_sync = self.nodes.get(i as usize).is_some_and(|s| s.view.in_sync);
        if in_sync {
            let holders = self.counts.holders.get(&epoch).copied().unwrap_or(0);
            if holders != self.counts.in_sync {
                self.report.s1_violations += 1;
            }
            let until = self.now.plus(self.net.max_delay_ms());
            let last = self.counts.last_arrival.entry(epoch).or_insert(until);
            *last = (*last).max(until);
        }
        in_sync
    }

    /// Schedules the node's next deadline if it is earlier than the one
    /// scheduled (a later one is scheduled when the earlier event finds
    /// nothing due and the node is asked again).
    fn arm_node(&mut self, i: u32) {
        let Some(s) = self.nodes.get_mut(i as usize) else {
            return;
        };
        let Some(at) = s.machine.poll_timeout() else {
            return;
        };
        if s.timeout.is_none_or(|t| at < t) {
            s.timeout = Some(at);
            self.schedule(at.max(self.now), Event::NodeTimeout(i, at));
        }
    }

    fn apply_node(&mut self, i: u32, data: Option<(bool, bool)>) {
        self.arm_node(i);
        if self.node_out.is_empty() {
            return;
        }
        let mut out = std::mem::take(&mut self.node_out);
        // Refresh first so that a seal is checked against the state that made it.
        self.refresh(i);
        for a in out.drain(..) {
            match a {
                NodeAction::SendGroup { bytes, data_epoch } => {
                    let tag = match data_epoch {
                        Some(e) => u32::from(self.on_seal(i, e)),
                        None => 0,
                    };
                    let traffic = if data_epoch.is_some() {
                        Traffic::Data
                    } else {
                        Traffic::Control
                    };
                    self.net
                        .send_group(self.now, Peer::Node(i), bytes, traffic, tag);
                }
                NodeAction::SendTo { to, bytes } => {
                    if let Some(p) = peer_of(to) {
                        self.net.send_to(self.now, Peer::Node(i), p, bytes);
                    }
                }
                // A process crash keeps a checkpoint as a flushed write; a
                // power loss (`SimConfig::power_loss`) keeps the flushed one.
                NodeAction::Persist(p) => {
                    self.report.node_persists += 1;
                    if let Some(s) = self.nodes.get_mut(i as usize) {
                        if s.keep_persist {
                            s.flushed = Some(p.clone());
                            s.persisted = Some(p);
                            s.checkpointed = false;
                        }
                    }
                }
                NodeAction::Checkpoint(p) => {
                    self.report.node_persists += 1;
                    if let Some(s) = self.nodes.get_mut(i as usize) {
                        if s.keep_persist {
                            s.persisted = Some(p);
                            s.checkpointed = true;
                        }
                    }
                }
                NodeAction::Deliver(d) => {
                    self.report.data_delivered += 1;
                    if d.trials > 0 {
                        self.report.trial_decryptions += 1;
                    }
                }
                NodeAction::Event(NodeEvent::Refused { reason, .. }) => {
                    match (self.count_refusal(reason), data) {
                        (Refusal::DuplicateData { .. }, _) => {
                            self.report.data_duplicates_dropped += 1
                        }
                        (Refusal::Undecryptable { .. }, Some((true, true))) => {
                            self.report.data_undecryptable += 1
                        }
                        (Refusal::Undecryptable { .. } | Refusal::NotJoined { .. }, Some(_)) => {
                            self.report.data_undecryptable_out_of_sync += 1
                        }
                        _ => self.report.node_refusals += 1,
                    }
                }
                NodeAction::Event(NodeEvent::QueueFull) => {
                    self.report.data_dropped_while_joining += 1
                }
                NodeAction::Event(
                    NodeEvent::StateChanged { .. }
                    | NodeEvent::Synced { .. }
                    | NodeEvent::SeqJump { .. },
                ) => {}
            }
        }
        self.node_out = out;
        self.refresh(i);
    }

    /// Schedules the controller's next deadline if it is earlier than the
    /// one scheduled (as [`Self::arm_node`] does for a node).
    fn arm_controller(&mut self) {
        let Some(at) = self.controller.as_ref().and_then(|c| c.poll_timeout()) else {
            return;
        };
        if self.ctl_timeout.is_none_or(|t| at < t) {
            self.ctl_timeout = Some(at);
            self.schedule(at.max(self.now), Event::ControllerTimeout(at));
        }
    }

    fn apply_controller(&mut self) {
        self.arm_controller();
        let mut out = std::mem::take(&mut self.ctl_out);
        for a in out.drain(..) {
            match a {
                ControllerAction::SendGroup(bytes) => {
                    self.net
                        .send_group(self.now, Peer::Controller, bytes, Traffic::Control, 0)
                }
                ControllerAction::SendTo { to, bytes } => {
                    if let Some(p) = peer_of(to) {
                        self.net.send_to(self.now, Peer::Controller, p, bytes);
                    }
                }
                a @ (ControllerAction::PersistCore(_)
                | ControllerAction::PersistMember(_)
                | ControllerAction::ForgetMember { .. }) => {
                    let Ok(_) = apply_persist(&mut self.ctl_state, std::slice::from_ref(&a));
                }
                ControllerAction::Record(r) => self.on_record(r),
            }
        }
        self.ctl_out = out;
    }

    fn on_record(&mut self, r: Record) {
        match r {
            Record::StatusChanged { member, to, .. } => {
                let i = member.wrapping_sub(1);
                if let Some(s) = self.nodes.get_mut(i as usize) {
                    s.status = to;
                    self.refresh(i);
                }
            }
            Record::NodeStale { .. } => self.report.stale += 1,
            Record::RoundFinished {
                started_at,
                finished_at,
                phases_ms,
                ..
            } => {
                self.rounds_finished += 1;
                self.round_ms.push(finished_at.since(started_at));
                self.drain_ms.push(phases_ms.draining);
                if self.rounds_started < self.cfg.rounds {
                    self.schedule(self.now.plus(self.cfg.round_gap_ms), Event::Rekey);
                }
            }
            Record::KeySent {
                via: Via::Unicast,
                attempt,
                ..
            } if attempt > 1 => self.report.retransmissions += 1,
            Record::KeyBatchSent { attempt, .. } if attempt > 1 => self.report.retransmissions += 1,
            Record::TransitionSent { attempt, .. } if attempt > 1 => {
                self.report.retransmissions += 1
            }
            Record::Refused { reason, .. } => {
                self.count_refusal(reason);
                self.report.controller_refusals += 1
            }
            _ => {}
        }
    }

    fn count_refusal(&mut self, r: Refusal) -> Refusal {
        *self.report.refusals.entry(r.kind()).or_insert(0) += 1;
        r
    }

    fn finish(&mut self) {
        let n = self.nodes.len().max(1);
        self.report.rounds_completed = self.rounds_finished;
        self.report.virtual_ms_total = self.now.0;
        let spread = |v: &[u64]| {
            let mut ms = v.to_vec();
            ms.sort_unstable();
            Spread {
                p50: ms.get(ms.len().saturating_sub(1) / 2).copied().unwrap_or(0),
                max: ms.last().copied().unwrap_or(0),
            }
        };
        self.report.virtual_ms_per_round = spread(&self.round_ms);
        self.report.drain_ms = spread(&self.drain_ms);
        let st = self.net.stats();
        self.report.datagrams = st.sent;
        self.report.data_lost_in_network = st.data_dropped;
        self.report.data_copies = st.data_copies;
        self.report.network_duplicates = st.duplicated;
        self.report.steps_prepared += self
            .nodes
            .iter()
            .map(|s| s.machine.prepare_stats().used)
            .sum::<u64>();
        let machine: usize = self.nodes.iter().map(|s| s.machine.memory_bytes()).sum();
        let slot_extra = std::mem::size_of::<Slot>() - std::mem::size_of::<NodeMachine>();
        // Each node has a data timer and at most a sync and a usage timer pending.
        let timers = 3 * std::mem::size_of::<Reverse<(Time, u64, Event)>>();
        self.report.node_machine_bytes = (machine / n) as u64;
        self.report.bytes_per_node = ((machine + n * (slot_extra + timers)) / n) as u64;
    }
}
