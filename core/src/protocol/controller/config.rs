//! The controller's settings, [`ControllerConfig`]: every default in one place.

use super::super::backoff;
use super::super::triggers::TriggerConfig;
use core::net::SocketAddr;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Controller settings. Defaults are documented on each field.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerConfig {
    /// A fixed wait after every node confirmed the first transition before
    /// the second, instead of the measured one (default: none, measured; see
    /// `Round::drain_grace` in `controller/round.rs`). It must exceed the
    /// longest time a datagram spends in flight.
    pub drain_grace_ms: Option<u64>,
    /// The measured drain grace is this many times the first transition's
    /// longest time in flight: each reply's round trip from its request's
    /// send (as the shell reports it, `ControllerMachine::requests_sent`;
    /// else the phase from its start to its last reply) less what the reply
    /// waited at the controller and the request at the node, when their
    /// receive timestamps say (default 2)…
    pub drain_rtt_factor: u32,
    /// …at least this many ms (default 2)…
    pub drain_floor_ms: u64,
    /// …and at most this many ms: the longest any datagram is assumed to stay
    /// in flight (default 2000), the grace of a round whose round trips were
    /// not all measured by this controller (restored after a restart).
    pub max_flight_ms: u64,
    /// First retry after this many ms (default 250), doubling…
    pub retry_initial_ms: u64,
    /// …up to this many ms (default 4000).
    pub retry_max_ms: u64,
    /// ± jitter on every retry delay, in percent (default 25).
    pub retry_jitter_pct: u8,
    /// Sends of each request to the whole group before per-node unicast (default 2, minimum 1).
    pub group_attempts: u32,
    /// A node that has not answered this long after a phase began is stale (default 60000 ms).
    pub stale_after_ms: u64,
    /// A phase ends (leaving the silent nodes stale) only once at least this
    /// many nodes confirmed it (default 1; never more than the joined nodes)…
    pub min_acked: u32,
    /// …and, when true (default), more than half of the joined nodes. Below
    /// that the round is paused and retried, not completed.
    pub min_acked_majority: bool,
    /// Key requests and joins a member may send in a burst (default 4)…
    pub member_request_burst: u32,
    /// …and then one per this many ms (default 500); more are refused
    /// (`rate_limited`, rate-counted in the audit log): each answer costs two
    /// key wraps, a signature and an audit row.
    pub member_request_interval_ms: u64,
    /// A rekey round set off by what nodes report (usage counts) starts at
    /// most once per this many ms (default 30000): a node's keys alone cannot
    /// make the fleet rotate back to back.
    pub node_trigger_min_interval_ms: u64,
    pub triggers: TriggerConfig,
    /// Send a signed beacon to the group this often (default 1000 ms); 0 = never.
    pub beacon_interval_ms: u64,
    /// The controller's unicast address, announced in the beacon (the shell
    /// sets it to its socket's; an unspecified IP means "the beacon's source").
    pub address: SocketAddr,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            drain_grace_ms: None,
            drain_rtt_factor: 2,
            drain_floor_ms: 2,
            max_flight_ms: 2000,
            retry_initial_ms: 250,
            retry_max_ms: 4000,
            retry_jitter_pct: 25,
            group_attempts: 2,
            stale_after_ms: 60_000,
            min_acked: 1,
            min_acked_majority: true,
            member_request_burst: 4,
            member_request_interval_ms: 500,
            node_trigger_min_interval_ms: 30_000,
            triggers: TriggerConfig::default(),
            beacon_interval_ms: 1000,
            address: SocketAddr::from(([0, 0, 0, 0], 47800)),
        }
    }
}

impl ControllerConfig {
    /// The delay before retry number `attempt` (backoff with jitter).
    pub(super) fn retry_delay(&self, attempt: u32, rng: &mut impl RngCore) -> u64 {
        backoff(
            self.retry_initial_ms,
            self.retry_max_ms,
            attempt,
            self.retry_jitter_pct,
            rng,
        )
    }

    /// Confirmations a phase needs before it may end, with `joined` nodes
    /// (see [`super::ControllerMachine::needed`]).
    pub(super) fn needed(&self, joined: u32) -> u32 {
        if joined == 0 {
            return 0;
        }
        let mut n = self.min_acked;
        if self.min_acked_majority {
            n = n.max(joined / 2 + 1);
        }
        n.min(joined)
    }

    /// A member's key request / join budget: (burst, one more per this many ms).
    pub(super) fn request_budget(&self) -> (u32, u64) {
        (
            self.member_request_burst.max(1),
            self.member_request_interval_ms.max(1),
        )
    }
}
