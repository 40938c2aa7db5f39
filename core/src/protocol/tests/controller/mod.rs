//! ControllerMachine: the round against real nodes on a direct, lossless
//! in-memory link, with a filter to drop chosen datagrams. The harness
//! (`TestFleet`) is here; the tests follow the machine's seams, one file each.

use super::*;
use crate::crypto::Epoch;
use crate::wire::RoundPhase;
use std::collections::VecDeque;

mod ahead;
mod auth;
mod beacon;
mod members;
mod pause;
mod power;
mod round;
mod term;
mod triggers;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    Group,
    Node(usize),
    Controller,
}

type Filter = Box<dyn FnMut(Dest, usize, &[u8]) -> bool>;

struct TestFleet {
    c: ControllerMachine,
    cfg: ControllerConfig,
    nodes: Vec<NodeMachine>,
    now: Time,
    rng: ChaCha20Rng,
    /// (destination, sending node or usize::MAX for the controller, bytes)
    queue: VecDeque<(Dest, usize, Vec<u8>)>,
    records: Vec<Record>,
    /// Return true to drop a datagram.
    drop: Filter,
    core: Option<Box<ControllerCore>>,
    rows: std::collections::BTreeMap<u32, MemberPersist>,
    /// Controller passes handled so far (each `handle` call).
    passes: usize,
    /// Crash the controller after this pass and restart it from what was
    /// persisted: with the pass's sends out (`true`), or lost (`false`: it
    /// died between the pass's write and its sends).
    crash_after: Option<(usize, bool)>,
    /// Node restarts to make as the controller's round is first seen in a
    /// phase: (phase, node), taken in order by `pump`.
    restart_in: VecDeque<(RoundPhase, usize)>,
    /// Each node's last flushed snapshot (`NodeAction::Persist`): what a
    /// power loss takes it back to.
    flushed: Vec<Option<NodePersist>>,
    /// Whether [`TestFleet::restart_node`] is a power loss (the node comes
    /// back from its last flushed snapshot) rather than a process crash.
    power_loss: bool,
    /// Each restart made: the node and the state it came back in.
    restarts: Vec<(usize, NodeState)>,
}

const CTL: usize = usize::MAX;

fn test_cfg() -> ControllerConfig {
    ControllerConfig {
        drain_grace_ms: Some(100),
        retry_initial_ms: 100,
        retry_max_ms: 1000,
        retry_jitter_pct: 25,
        group_attempts: 2,
        stale_after_ms: 5000,
        triggers: TriggerConfig::manual_only(),
        ..ControllerConfig::default()
    }
}

impl TestFleet {
    fn new(n: usize, cfg: ControllerConfig) -> TestFleet {
        let mut rng = rng();
        let mut out = Vec::new();
        let c = ControllerMachine::new(cfg.clone(), Time(0), &mut rng, &mut out);
        let mut f = TestFleet {
            c,
            cfg,
            nodes: Vec::new(),
            now: Time(0),
            rng,
            queue: VecDeque::new(),
            records: Vec::new(),
            drop: Box::new(|_, _, _| false),
            core: None,
            rows: Default::default(),
            passes: 0,
            crash_after: None,
            restart_in: VecDeque::new(),
            flushed: Vec::new(),
            power_loss: false,
            restarts: Vec::new(),
        };
        f.apply(out);
        for i in 0..n as u32 {
            let id = NodeId::parse(&format!("node-{i}")).unwrap();
            f.ctl(ControllerInput::Enroll {
                node_id: id.clone(),
                initial_key: initial(i),
                addr: node_addr(i),
            })
            .unwrap();
            f.nodes.push(NodeMachine::new(id, &initial(i), node_cfg()));
            f.flushed.push(None);
        }
        f.ctl(ControllerInput::Start).unwrap();
        for i in 0..n {
            f.node(i, NodeInput::LinkUp);
        }
        f.pump();
        assert!(f.nodes.iter().all(|n| n.is_synced()), "all joined");
        f
    }

    fn ctl(&mut self, input: ControllerInput<'_>) -> Result<Outcome, CommandError> {
        let mut out = Vec::new();
        let r = self.c.handle(self.now, input, &mut self.rng, &mut out);
        self.passes += 1;
        match self.crash_after {
            Some((pass, sent)) if pass == self.passes => {
                self.crash_after = None;
                if !sent {
                    out.retain(|a| {
                        !matches!(
                            a,
                            ControllerAction::SendGroup(_) | ControllerAction::SendTo { .. }
                        )
                    });
                }
                self.apply(out);
                self.restart_controller();
            }
            _ => self.apply(out),
        }
        r
    }

    /// Crash: a controller restored from what was persisted (through its
    /// JSON form), not started yet.
    fn restore_controller(&mut self) {
        let json = serde_json::to_string(&self.persisted()).unwrap();
        let persist: ControllerPersist = serde_json::from_str(&json).unwrap();
        self.c = ControllerMachine::restore(&persist, self.cfg.clone(), self.now).unwrap();
    }

    /// [`TestFleet::restore_controller`], started. Datagrams in flight stay queued.
    fn restart_controller(&mut self) {
        self.restore_controller();
        self.ctl(ControllerInput::Start).unwrap();
    }

    /// Node `i` restarts from its state (every node writes it before it
    /// sends) and comes up: it asks the controller for the keys.
    fn restart_node(&mut self, i: usize) {
        let snap = match &self.flushed[i] {
            Some(p) if self.power_loss => p.clone(),
            _ => self.nodes[i].snapshot(),
        };
        let back = NodeMachine::restore(&snap, node_cfg()).unwrap().state();
        self.restarts.push((i, back));
        self.nodes[i] = NodeMachine::restore(&snap, node_cfg()).unwrap();
        self.node(i, NodeInput::LinkUp);
    }

    fn apply(&mut self, out: Vec<ControllerAction>) {
        for a in out {
            match a {
                ControllerAction::SendGroup(b) => self.queue.push_back((Dest::Group, CTL, b)),
                ControllerAction::SendTo { to, bytes } => {
                    let idx = match to {
                        SocketAddr::V4(v) => v.ip().octets()[3] as usize,
                        SocketAddr::V6(_) => continue,
                    };
                    self.queue.push_back((Dest::Node(idx), CTL, bytes));
                }
                ControllerAction::PersistCore(c) => self.core = Some(c),
                ControllerAction::PersistMember(m) => {
                    self.rows.insert(m.member, *m);
                }
                ControllerAction::ForgetMember { member } => {
                    self.rows.remove(&member);
                }
                ControllerAction::Record(r) => self.records.push(r),
            }
        }
    }

    fn node(&mut self, i: usize, input: NodeInput<'_>) -> Vec<NodeAction> {
        let mut out = Vec::new();
        self.nodes[i].handle(self.now, input, &mut self.rng, &mut out);
        for a in &out {
            match a {
                NodeAction::Persist(p) => self.flushed[i] = Some((**p).clone()),
                NodeAction::SendTo { bytes, .. } => {
                    self.queue.push_back((Dest::Controller, i, bytes.clone()))
                }
                NodeAction::SendGroup { bytes, .. } => {
                    self.queue.push_back((Dest::Group, i, bytes.clone()))
                }
                _ => {}
            }
        }
        out
    }

    /// Deliver everything queued (and what that causes), in order.
    fn pump(&mut self) {
        loop {
            if let Some(&(phase, i)) = self.restart_in.front() {
                if self.phase() == Some(phase) {
                    self.restart_in.pop_front();
                    self.restart_node(i);
                }
            }
            let Some((dest, from, bytes)) = self.queue.pop_front() else {
                break;
            };
            if (self.drop)(dest, from, &bytes) {
                continue;
            }
            let from_addr = if from == CTL {
                ctl_addr()
            } else {
                node_addr(from as u32)
            };
            match dest {
                Dest::Controller => {
                    let _ = self.ctl(ControllerInput::Datagram {
                        from: from_addr,
                        bytes: &bytes,
                    });
                }
                Dest::Node(i) => {
                    if i < self.nodes.len() {
                        self.node(
                            i,
                            NodeInput::Datagram {
                                from: from_addr,
                                bytes: &bytes,
                            },
                        );
                    }
                }
                Dest::Group => {
                    for i in 0..self.nodes.len() {
                        if i != from && !(self.drop)(Dest::Node(i), from, &bytes) {
                            self.node(
                                i,
                                NodeInput::Datagram {
                                    from: from_addr,
                                    bytes: &bytes,
                                },
                            );
                        }
                    }
                    if from != CTL {
                        let _ = self.ctl(ControllerInput::Datagram {
                            from: from_addr,
                            bytes: &bytes,
                        });
                    }
                }
            }
        }
    }

    /// Advance the clock by `ms`, feeding the controller a timeout at each
    /// deadline it gives on the way.
    fn advance(&mut self, ms: u64) {
        let end = self.now.plus(ms);
        while let Some(at) = self.c.poll_timeout().filter(|at| *at <= end) {
            self.now = self.now.max(at);
            let _ = self.ctl(ControllerInput::Timeout);
            self.pump();
        }
        self.now = end;
    }

    /// [`TestFleet::advance`] with the nodes' deadlines too (their retries),
    /// each input at its time.
    fn advance_all(&mut self, ms: u64) {
        let end = self.now.plus(ms);
        loop {
            let nodes = self.nodes.iter().enumerate();
            let node = nodes
                .filter_map(|(i, n)| Some((n.poll_timeout()?, i)))
                .min();
            let ctl = self.c.poll_timeout().map(|at| (at, CTL));
            let Some((at, who)) = node.into_iter().chain(ctl).min().filter(|d| d.0 <= end) else {
                break;
            };
            self.now = self.now.max(at);
            if who == CTL {
                let _ = self.ctl(ControllerInput::Timeout);
            } else {
                self.node(who, NodeInput::Timeout);
            }
            self.pump();
        }
        self.now = end;
    }

    /// Delivers what is queued, then lets 100 ms pass with every deadline
    /// ([`TestFleet::advance_all`]), until `done` holds: at most 10 s.
    fn run_until(&mut self, done: impl Fn(&TestFleet) -> bool) {
        for _ in 0..100 {
            self.pump();
            if done(self) {
                return;
            }
            self.advance_all(100);
        }
    }

    fn phase(&self) -> Option<RoundPhase> {
        self.c.round().map(|r| r.1)
    }

    /// What a restarted controller finds: the last persisted core and member rows.
    fn persisted(&self) -> ControllerPersist {
        ControllerPersist {
            core: (**self.core.as_ref().unwrap()).clone(),
            members: self.rows.values().cloned().collect(),
        }
    }

    /// Three nodes in a round held in `phase`: node 2's reply to the step
    /// that ends it is dropped.
    fn held_in(phase: RoundPhase) -> TestFleet {
        let mut f = TestFleet::new(3, test_cfg());
        let blocked = is_ack_from(2, reply_ending(phase));
        f.drop = Box::new(move |_, _, b| blocked(b));
        f.ctl(ControllerInput::Rekey).unwrap();
        f.pump();
        f.advance(300);
        assert_eq!(f.phase(), Some(phase));
        f
    }

    fn states(&self) -> Vec<NodeState> {
        self.nodes.iter().map(|n| n.state()).collect()
    }

    fn count(&self, f: impl Fn(&Record) -> bool) -> usize {
        self.records.iter().filter(|r| f(r)).count()
    }

    fn finished(&self) -> Vec<(Epoch, u32, u32, u32)> {
        self.records
            .iter()
            .filter_map(Record::round_finished)
            .collect()
    }
}

/// The reply whose arrival ends `phase` (the drain waits for none: the
/// second transition's).
fn reply_ending(phase: RoundPhase) -> Step {
    match phase {
        RoundPhase::Distributing => Step::KeyUpdate,
        RoundPhase::FirstTransition => Step::FirstTransition,
        _ => Step::SecondTransition,
    }
}

fn is_ack_from(member: u32, step: Step) -> impl Fn(&[u8]) -> bool {
    move |b| matches!(wire::decode(b), Ok(Message::Ack(a)) if a.member == member && a.step == step)
}

const UC2: NodeState = NodeState::UpdateCompleted { current: Epoch(2) };
