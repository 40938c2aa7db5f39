//! One rekey round in one process, for instruction counts (valgrind
//! callgrind): the real `ControllerMachine` and N real `NodeMachine`s
//! joined, then one round delivered through memory with no loss, every
//! datagram handed over at once and virtual time jumping to the drain's end.
//! Instruction counts do not move with the machine's load, so a regression
//! in the protocol's work shows on a noisy machine where wall times do not.
//!
//! Between the joins and the round the controller prepares the next round
//! ahead and its share notice reaches the nodes, as `serve` does while idle
//! (`prepared_ahead`): the round is counted as a fleet runs it, with each
//! side's X25519 made before it.
//!
//! `keyfleet-bench round --nodes N` runs it; `callgrind` runs that under
//! `valgrind --tool=callgrind --toggle-collect=*measured_round*`, so only
//! the round is counted (not the joins nor the preparation before it).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use keyfleet_core::crypto::InitialKey;
use keyfleet_core::protocol::{
    ControllerAction, ControllerConfig, ControllerInput, ControllerMachine, NodeAction, NodeConfig,
    NodeInput, NodeMachine, NodeState, Time,
};
use keyfleet_core::wire::NodeId;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

const CONTROLLER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::new(10, 0, 0, 1),
    47800,
));

fn node_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 1, (i >> 8) as u8, (i & 0xff) as u8], 47801))
}

enum To {
    Controller,
    Group,
    Node(usize),
}

/// A controller and `n` joined nodes on a lossless in-memory link.
pub struct InProcess {
    c: ControllerMachine,
    nodes: Vec<NodeMachine>,
    by_addr: HashMap<SocketAddr, usize>,
    rng: ChaCha20Rng,
    now: Time,
    queue: VecDeque<(To, SocketAddr, Vec<u8>)>,
    /// Datagrams delivered (a group datagram once per receiver).
    pub delivered: u64,
}

impl InProcess {
    pub fn joined(n: usize) -> anyhow::Result<InProcess> {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let cfg = ControllerConfig {
            address: CONTROLLER,
            ..ControllerConfig::default()
        };
        let mut out = Vec::new();
        let c = ControllerMachine::new(cfg, Time(1), &mut rng, &mut out);
        let mut f = InProcess {
            c,
            nodes: Vec::with_capacity(n),
            by_addr: HashMap::new(),
            rng,
            now: Time(1),
            queue: VecDeque::new(),
            delivered: 0,
        };
        f.controller_out(out);
        for i in 0..n {
            let id = NodeId::parse(&format!("n{i:05}")).context("node id")?;
            let key = InitialKey([(i % 251) as u8 + 1; 16]);
            f.controller(ControllerInput::Enroll {
                node_id: id.clone(),
                initial_key: key.clone(),
                addr: node_addr(i),
            });
            let cfg = NodeConfig {
                controller: CONTROLLER,
                usage_interval_ms: None,
                ..NodeConfig::default()
            };
            f.nodes.push(NodeMachine::new(id, &key, cfg));
            f.by_addr.insert(node_addr(i), i);
        }
        f.controller(ControllerInput::Start);
        for i in 0..n {
            f.node(i, NodeInput::LinkUp);
        }
        f.pump();
        if !f.nodes.iter().all(NodeMachine::is_synced) {
            bail!("not every node joined");
        }
        Ok(f)
    }

    fn controller(&mut self, input: ControllerInput<'_>) {
        let mut out = Vec::new();
        let _ = self.c.handle(self.now, input, &mut self.rng, &mut out);
        self.controller_out(out);
    }

    fn controller_out(&mut self, out: Vec<ControllerAction>) {
        for a in out {
            match a {
                ControllerAction::SendGroup(b) => self.queue.push_back((To::Group, CONTROLLER, b)),
                ControllerAction::SendTo { to, bytes } => {
                    if let Some(i) = self.by_addr.get(&to) {
                        self.queue.push_back((To::Node(*i), CONTROLLER, bytes));
                    }
                }
                _ => {}
            }
        }
    }

    fn node(&mut self, i: usize, input: NodeInput<'_>) {
        let mut out = Vec::new();
        self.nodes[i].handle(self.now, input, &mut self.rng, &mut out);
        let from = node_addr(i);
        for a in out {
            match a {
                NodeAction::SendTo { bytes, .. } => {
                    self.queue.push_back((To::Controller, from, bytes))
                }
                NodeAction::SendGroup { bytes, .. } => {
                    self.queue.push_back((To::Group, from, bytes))
                }
                _ => {}
            }
        }
    }

    fn pump(&mut self) {
        while let Some((to, from, bytes)) = self.queue.pop_front() {
            match to {
                To::Controller => {
                    self.delivered += 1;
                    self.controller(ControllerInput::Datagram {
                        from,
                        bytes: &bytes,
                    });
                }
                To::Node(i) => {
                    self.delivered += 1;
                    self.node(
                        i,
                        NodeInput::Datagram {
                            from,
                            bytes: &bytes,
                        },
                    );
                }
                To::Group => {
                    for i in 0..self.nodes.len() {
                        if node_addr(i) != from {
                            self.delivered += 1;
                            self.node(
                                i,
                                NodeInput::Datagram {
                                    from,
                                    bytes: &bytes,
                                },
                            );
                        }
                    }
                }
            }
        }
    }
}

/// What `serve` does between rounds: the controller prepares the next
/// round's key agreement, a few members a pass, and announces its share;
/// every node makes its side of the step from the notice.
pub fn prepared_ahead(f: &mut InProcess) -> anyhow::Result<()> {
    while f.c.prepare_round(&mut f.rng, 16) {}
    let due = f.c.poll_timeout().context("no share notice due")?;
    f.now = f.now.max(due);
    f.controller(ControllerInput::Timeout);
    f.pump();
    let ready = f
        .nodes
        .iter()
        .filter(|n| n.prepare_stats().notices > 0)
        .count();
    if ready != f.nodes.len() {
        bail!("{} of {} nodes took the share notice", ready, f.nodes.len());
    }
    Ok(())
}

/// The round whose instructions callgrind counts (`--toggle-collect`).
#[inline(never)]
pub fn measured_round(f: &mut InProcess) -> anyhow::Result<()> {
    f.controller(ControllerInput::Rekey);
    f.pump();
    for _ in 0..100 {
        if f.c.round().is_none() {
            break;
        }
        let at = f.c.poll_timeout().context("a round without a deadline")?;
        f.now = f.now.max(at);
        f.controller(ControllerInput::Timeout);
        f.pump();
    }
    if f.c.round().is_some() {
        bail!("the round did not finish");
    }
    let epoch = f.c.current_epoch();
    if !f
        .nodes
        .iter()
        .all(|n| n.state() == NodeState::UpdateCompleted { current: epoch })
    {
        bail!("not every node finished the round");
    }
    if !f.nodes.iter().all(|n| n.prepare_stats().used == 1) {
        bail!("not every node's step was made ahead");
    }
    Ok(())
}

/// `keyfleet-bench round --nodes N`: join N nodes, then one measured round.
pub fn run_one(n: usize) -> anyhow::Result<()> {
    let mut f = InProcess::joined(n)?;
    prepared_ahead(&mut f)?;
    let before = f.delivered;
    let t = std::time::Instant::now();
    measured_round(&mut f)?;
    let cpu_us = t.elapsed().as_micros();
    println!(
        "{{\"nodes\":{n},\"datagrams\":{},\"epoch\":{},\"wall_us\":{cpu_us}}}",
        f.delivered - before,
        f.c.current_epoch().0
    );
    Ok(())
}

/// Instruction counts of one in-process round.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Callgrind {
    pub nodes: usize,
    /// Instructions executed inside the round (callgrind's `Ir`).
    pub instructions: Option<u64>,
    /// Datagrams the round delivered.
    pub datagrams: Option<u64>,
    pub error: Option<String>,
}

/// Runs `bench round --nodes n` under callgrind and reads the total.
pub fn callgrind(bench: &Path, n: usize, out_dir: &Path) -> Callgrind {
    let mut r = Callgrind {
        nodes: n,
        ..Callgrind::default()
    };
    let file = out_dir.join(format!("callgrind.round-{n}.out"));
    let res = (|| -> anyhow::Result<()> {
        let out = Command::new("valgrind")
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", file.display()))
            .arg("--toggle-collect=*measured_round*")
            .arg(bench)
            .args(["round", "--nodes", &n.to_string()])
            .output()
            .context("running valgrind (install it: apt-get install -y valgrind)")?;
        if !out.status.success() {
            bail!(
                "valgrind exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).context("round output")?;
        r.datagrams = v["datagrams"].as_u64();
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let total = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("summary:")
                    .or_else(|| l.strip_prefix("totals:"))
            })
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no instruction total in the callgrind output")?;
        r.instructions = Some(total);
        Ok(())
    })();
    r.error = res.err().map(|e| format!("{e:#}"));
    eprintln!(
        "callgrind, one round at N={n}: {:?} instructions, {:?} datagrams{}",
        r.instructions,
        r.datagrams,
        r.error
            .as_deref()
            .map(|e| format!("; error: {e}"))
            .unwrap_or_default()
    );
    r
}
