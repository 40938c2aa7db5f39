//! A deterministic fleet simulator: the real
//! [`ControllerMachine`](crate::protocol::ControllerMachine) and
//! [`NodeMachine`](crate::protocol::NodeMachine)s on a virtual clock and a
//! seeded lossy network.
//!
//! Two parts, kept apart so that the scenario can later run over real sockets:
//!
//! - [`net`]: the [`SimNet`] trait and [`VirtualNet`], which drops
//!   (`loss`), duplicates (1 %), delays (1–20 ms, uniform) and thereby
//!   reorders datagrams, and takes offline or crashed peers off the wire.
//! - `scenario`: one controller and `agents` nodes, every node joining with
//!   its enrolled id and initial key, then `rounds` manual rekey rounds, each
//!   started 500 ms after the previous one finished. While rounds run every
//!   node sends a data message to the group every `data_interval_ms`
//!   (±50 %). Per round, `offline` random nodes go offline for `offline_ms`
//!   and come back with a link-up (SPEC §5); `crash` nodes crash and restart
//!   300 ms later from their last persisted snapshot; with `controller_crash`
//!   the controller crashes once per round and restarts 400 ms later from its
//!   persisted core and member rows. After the last round the run goes on
//!   until every node is live and in `UpdateCompleted` under the controller's
//!   epoch (`converged`), then drains the network and stops; it gives up at
//!   `max_virtual_ms` (by default a bound that grows with 1/(1 - loss)²).
//!
//! Everything random comes from the seed: the machines' CSPRNG is a
//! `ChaCha20Rng` seeded with it, the network and the fault plan have their
//! own seeded streams. The same seed gives the same run, byte for byte.
//!
//! # What is counted
//!
//! A node is **live** when it is up, online, synced with the controller (its
//! last key request was answered with its own position) and `Active` in the
//! controller's management table (not stale, not merely enrolled).
//!
//! Data: a data message is sealed once and sent to the group, but to keep 10 000
//! nodes fast it is delivered through the real open path to `data_sample`
//! receivers drawn at random (plus the controller, which watches for unknown
//! senders). So `data_sent` counts seals, `data_copies` = sampled copies,
//! each of which ends as `data_lost_in_network` (lost or receiver offline),
//! `data_delivered` (opened; network duplicates that slip past a node's small
//! replay filter are delivered again), `data_duplicates_dropped`,
//! `data_undecryptable` (a live sender's message that a live receiver could
//! not open — must be 0), or `data_undecryptable_out_of_sync` (sender or
//! receiver not live: still joining, stale, or catching up after being offline).
//!
//! S1 and S2 are checked for **all** nodes exactly, with counters rather than
//! deliveries: per epoch the number of live nodes holding it and sealing with
//! it, and the latest time a datagram sealed with it by a live node can still
//! arrive (send time + the network's maximum delay, duplicates included).
//! - `s1_violations`: a live node sealed with an epoch that not every live node holds.
//! - `s2_violations`: a live node dropped an epoch while a live node still sealed
//!   with it or a datagram sealed with it could still arrive.
//! - `backward_transitions`: a node's position (epoch, progress) went down,
//!   including across a crash and restore.
//!
//! `retransmissions` counts controller datagrams that repeated a request: group
//! waves after the first, and unicast requests to a node already asked.
//! `stale` counts nodes marked stale. `bytes_per_node` is the node machine
//! (struct and heap) plus the simulator's per-node bookkeeping and timers;
//! `node_machine_bytes` the machine alone. `steps_prepared` counts the key
//! update steps whose X25519 a node had made ahead from the controller's
//! share notice (the controller prepares the next round while idle, as
//! `serve` does, unless `prepare_ahead` is off).

pub mod net;
mod scenario;

pub use net::{Arrival, NetStats, Peer, SimNet, Traffic, VirtualNet, VirtualNetConfig};

use serde::Serialize;

/// A simulation run's settings (the `keyfleet sim` flags).
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub agents: u32,
    pub loss: f64,
    pub seed: u64,
    pub rounds: u32,
    /// Nodes taken offline per round.
    pub offline: u32,
    pub offline_ms: u64,
    /// Nodes crashed and restarted from their persisted state per round.
    pub crash: u32,
    /// A node crash is a power loss: the node restarts from its last flushed
    /// snapshot (`NodeAction::Persist`), what it only checkpointed is gone.
    /// Otherwise a process crash, which a checkpoint survives.
    pub power_loss: bool,
    /// Crash and restore the controller once per round.
    pub controller_crash: bool,
    pub duplicate: f64,
    pub delay_min_ms: u64,
    pub delay_max_ms: u64,
    /// Group data is delayed up to this long instead (from `delay_min_ms`):
    /// data held in flight longer than control messages. `None`: as control.
    pub data_delay_max_ms: Option<u64>,
    /// The controller measures its drain grace from the round's round trips,
    /// as deployed (`ControllerConfig::drain_grace_ms` unset, floor 1 ms,
    /// ceiling the network's maximum delay + 20 ms); otherwise it waits that
    /// maximum + 20 ms, a bound only a simulator knows.
    pub measured_drain: bool,
    pub data_interval_ms: u64,
    pub data_sample: u32,
    /// Fraction of nodes that leave the epoch hint out of their data (claims 14–16).
    pub no_hint_fraction: f64,
    pub stale_after_ms: u64,
    pub round_gap_ms: u64,
    pub max_virtual_ms: u64,
    /// The controller prepares the next round's key agreement and announces
    /// its share while idle, as `serve` does (`ControllerMachine::prepare_round`,
    /// the share notice): the nodes make their side of the step ahead.
    pub prepare_ahead: bool,
}

impl SimConfig {
    /// Defaults for everything but the four main flags.
    pub fn new(agents: u32, loss: f64, seed: u64, rounds: u32) -> SimConfig {
        SimConfig {
            agents,
            loss,
            seed,
            rounds,
            offline: 0,
            offline_ms: 3000,
            crash: 0,
            power_loss: false,
            controller_crash: false,
            duplicate: 0.01,
            delay_min_ms: 1,
            delay_max_ms: 20,
            data_delay_max_ms: None,
            measured_drain: false,
            data_interval_ms: 2000,
            data_sample: 4,
            no_hint_fraction: 0.1,
            stale_after_ms: 30_000,
            round_gap_ms: 500,
            max_virtual_ms: 0,
            prepare_ahead: true,
        }
    }

    /// How much longer than on a clean network an exchange takes at this loss:
    /// a request and its reply both get through with probability (1 - loss)².
    pub fn loss_factor(&self) -> u64 {
        let through = (1.0 - self.loss.clamp(0.0, 0.99)).powi(2);
        (1.0 / through).ceil().clamp(1.0, 10_000.0) as u64
    }

    pub fn deadline(&self) -> u64 {
        if self.max_virtual_ms > 0 {
            return self.max_virtual_ms;
        }
        let per_round = 4 * self.stale_after_ms + self.offline_ms + 10_000;
        (120_000 + u64::from(self.rounds) * per_round).saturating_mul(self.loss_factor())
    }
}

/// p50 and maximum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Spread {
    pub p50: u64,
    pub max: u64,
}

/// The result of a run (the `--json` object). See the module docs for each count.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SimReport {
    pub agents: u32,
    pub loss: f64,
    pub seed: u64,
    pub rounds: u32,
    pub rounds_completed: u32,
    pub converged: bool,
    pub data_sent: u64,
    pub data_copies: u64,
    pub data_delivered: u64,
    pub data_lost_in_network: u64,
    pub data_undecryptable: u64,
    pub data_undecryptable_out_of_sync: u64,
    pub data_duplicates_dropped: u64,
    pub data_dropped_while_joining: u64,
    pub trial_decryptions: u64,
    pub retransmissions: u64,
    pub stale: u64,
    pub s1_violations: u64,
    pub s2_violations: u64,
    pub backward_transitions: u64,
    pub node_refusals: u64,
    pub controller_refusals: u64,
    /// Refusals by kind ([`crate::protocol::Refusal::kind`]), nodes and controller together.
    pub refusals: std::collections::BTreeMap<&'static str, u64>,
    pub offline_episodes: u64,
    pub node_crashes: u64,
    pub controller_crashes: u64,
    pub restore_failures: u64,
    /// Restarts (power losses) that came back from an older snapshot than the
    /// node's last one: a checkpoint was lost.
    pub checkpoints_lost: u64,
    /// Snapshots the nodes stored (flushed `Persist` and `Checkpoint` both).
    pub node_persists: u64,
    pub datagrams: u64,
    pub network_duplicates: u64,
    pub joined_by_ms: u64,
    pub virtual_ms_per_round: Spread,
    /// The drain grace of the completed rounds (`phases_ms.draining`).
    pub drain_ms: Spread,
    pub virtual_ms_total: u64,
    pub bytes_per_node: u64,
    pub node_machine_bytes: u64,
    /// Key update steps whose X25519 a node made ahead from a share notice.
    pub steps_prepared: u64,
    /// Filled in by the caller (the simulator itself never reads a clock).
    pub wall_ms: Option<u64>,
}

/// Run the scenario on the virtual network.
pub fn run(cfg: &SimConfig) -> SimReport {
    let mut cfg = cfg.clone();
    cfg.max_virtual_ms = cfg.deadline();
    let net = VirtualNet::new(VirtualNetConfig {
        nodes: cfg.agents,
        loss: cfg.loss,
        duplicate: cfg.duplicate,
        delay_min_ms: cfg.delay_min_ms,
        delay_max_ms: cfg.delay_max_ms,
        data_delay_max_ms: cfg.data_delay_max_ms,
        data_sample: cfg.data_sample,
        seed: cfg.seed,
    });
    run_on(cfg, net)
}

/// Run the scenario on any transport.
pub fn run_on<T: SimNet>(cfg: SimConfig, net: T) -> SimReport {
    let mut fleet = scenario::Fleet::new(cfg, net);
    fleet.run();
    fleet.report
}

#[cfg(test)]
mod tests;
