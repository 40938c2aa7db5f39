//! The protocol core: [`NodeMachine`] and [`ControllerMachine`], sans-IO.
//!
//! Each machine takes one input and the current [`Time`] (plus a CSPRNG) and
//! appends actions to a caller-supplied `Vec`; it never reads a clock, opens a
//! socket or touches a file. A shell — the simulator, the UDP driver, a test —
//! moves datagrams, timer firings and application data in, and carries the
//! actions out **in order**: a `Persist…` action must be durable before the
//! sends that follow it, because those sends tell peers about the persisted state.
//! A shell with a database should write the `Persist…` and `Record` actions of
//! one `handle` call in one transaction.
//!
//! Authentication and decoding happen inside the machines: every datagram is
//! decoded ([`crate::wire::decode`]), its signature or MAC checked, its
//! sequence number run through a replay window and its epoch compared with
//! the machine's own, so every shell runs the same checks. A bad datagram
//! yields a typed [`Refusal`] (an event on a node, a [`Record::Refused`] on
//! the controller) and never a state change or a panic.
//!
//! Timers: each machine keeps its deadlines inside and tells the next one
//! through `poll_timeout` ([`NodeMachine::poll_timeout`],
//! [`ControllerMachine::poll_timeout`]); the shell arms one timer for it,
//! feeds `NodeInput::Timeout` / `ControllerInput::Timeout` at or after it
//! (early or extra timeouts do nothing) and reads the deadline again after
//! every input.

mod controller;
mod node;
mod triggers;

pub use controller::{
    apply_persist, fold_mark, store_snapshot, AnsweredInit, CommandError, ControllerAction,
    ControllerConfig, ControllerCore, ControllerInput, ControllerMachine, ControllerPersist,
    MemberPersist, MemberRatchet, MemberStatus, MemoryState, Outcome, PhaseDurations, Record,
    RestoreError, ResumeCause, RoundPersist, StateStore, TriggerOutcome, Via, HANDSHAKE_BURST,
    HANDSHAKE_INTERVAL_MS, HANDSHAKE_RESEND_MS, REJOIN_WINDOW_MS, TERM,
};
pub use node::{
    BeaconStats, Delivered, NodeAction, NodeConfig, NodeEvent, NodeInput, NodeMachine, NodePersist,
    NodeRatchet, NodeState, PrepareStats, DUPLICATE_ANSWER_INTERVAL_MS, HANDSHAKE_SENDS,
    NOTICE_VERIFY_BURST, NOTICE_VERIFY_REFILL_MS, VERIFY_BURST, VERIFY_EVERY_MS,
};
pub use triggers::{TriggerConfig, TriggerReason};

use crate::crypto::{Epoch, OpenError};
use crate::wire::WireError;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// Milliseconds, as given by the shell: wall-clock ms since the UNIX epoch in
/// the UDP shell (so key age survives restarts), virtual ms in the simulator.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Time(pub u64);

impl Time {
    pub const MAX: Time = Time(u64::MAX);

    pub fn plus(self, ms: u64) -> Time {
        Time(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self` (0 if `earlier` is later).
    pub fn since(self, earlier: Time) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// A token bucket kept as two plain fields (`tokens`, and `at`: when the
/// last whole token was earned): refills one token per `every` ms up to
/// `burst`, then takes one if any is left. The machines' rate limits (key
/// requests per member, signature checks, beacon checks) all use it.
pub(crate) fn take_token(
    tokens: &mut u32,
    at: &mut Time,
    now: Time,
    burst: u32,
    every: u64,
) -> bool {
    let earned = now.since(*at) / every;
    if earned > 0 {
        let total = u64::from(*tokens).saturating_add(earned);
        if total >= u64::from(burst) {
            *tokens = burst;
            *at = now;
        } else {
            *tokens = total as u32;
            *at = at.plus(earned * every);
        }
    }
    if *tokens == 0 {
        return false;
    }
    *tokens -= 1;
    true
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// Why a machine refused a datagram. Nothing changed in the machine's state.
#[derive(Debug, Error, Clone, PartialEq, Eq, Serialize)]
pub enum Refusal {
    #[error("malformed datagram: {0}")]
    Malformed(WireError),
    #[error("{what} has a bad controller signature; it did not come from the enrolled controller")]
    BadSignature { what: &'static str },
    #[error("{what} from member {member} has a bad MAC; it was not sent with that node's key")]
    BadMac { what: &'static str, member: u32 },
    #[error("{what} names member {member}, which is not in the management table")]
    UnknownMember { what: &'static str, member: u32 },
    #[error("handshake from node id {node_id:?}, which is not enrolled; enroll it with its initial key first")]
    UnknownNodeId { node_id: String },
    #[error("{what} with sequence number {seq} is a replay or too old")]
    Replay { what: &'static str, seq: u64 },
    #[error("{what} for epoch {got} is older than this node's epoch {have}")]
    StaleEpoch {
        what: &'static str,
        got: Epoch,
        have: Epoch,
    },
    #[error("{what} for epoch {got} skips ahead of this node's epoch {have}; asking the controller for the current key")]
    EpochGap {
        what: &'static str,
        got: Epoch,
        have: Epoch,
    },
    #[error("{what} for epoch {epoch} arrived before its key; asking the controller for the current key")]
    MissingKey { what: &'static str, epoch: Epoch },
    #[error("{what} for epoch {epoch} is behind this node's progress; ignored")]
    Outdated { what: &'static str, epoch: Epoch },
    #[error(
        "key update for epoch {epoch} carries another key than the one this node holds for it"
    )]
    KeyMismatch { epoch: Epoch },
    #[error("{what} received before this node has joined")]
    NotJoined { what: &'static str },
    #[error("{what} is not addressed to a {role}")]
    Unexpected {
        what: &'static str,
        role: &'static str,
    },
    #[error("{what} is addressed to member {to}, this node is member {me}")]
    NotForMe {
        what: &'static str,
        to: u32,
        me: u32,
    },
    #[error(
        "the wrapped key for epoch {epoch} does not unwrap with this node's key-encryption key"
    )]
    Unwrap { epoch: Epoch },
    #[error("{what} answers request {in_reply_to}, not one this node has outstanding")]
    Unsolicited {
        what: &'static str,
        in_reply_to: u64,
    },
    #[error("data from member {sender} cannot be opened: {reason}")]
    Undecryptable { sender: u32, reason: OpenError },
    #[error("data from member {sender} with sequence number {seq} was already delivered")]
    DuplicateData { sender: u32, seq: u64 },
    #[error("the controller's public key in the handshake answer is not a valid Ed25519 key, or not the one this node pinned at its first join")]
    BadControllerKey,
    #[error("data claims member {sender} from {from} but no group key opens it; ignored")]
    ForgedData { sender: u32, from: String },
    #[error("handshake from node id {node_id:?}, whose enrollment is pinned by an earlier handshake; if its state was lost, allow a re-join with `keyfleet rejoin --node-id {node_id}`")]
    Pinned { node_id: String },
    #[error("{what} from member {member} was sent under a chain the node has since left (it arrived late); ignored")]
    Late { what: &'static str, member: u32 },
    #[error("data from member {sender} under epoch {epoch}: {max} senders already tracked in that epoch, no more until its key is retired")]
    TooManySenders {
        sender: u32,
        epoch: Epoch,
        max: usize,
    },
    #[error("{what} from member {member} exceeds that member's rate limit; not answered")]
    RateLimited { what: &'static str, member: u32 },
    #[error("data claims member {sender} from {from} and opens only under the retired key of epoch {epoch}: a node left behind (stale or removed) or someone holding that old key")]
    RetiredKey {
        sender: u32,
        epoch: Epoch,
        from: core::net::SocketAddr,
    },
    #[error("{what} not checked: this node already spent its signature checks for now (someone may be flooding forged requests; the controller retries)")]
    VerifyBudget { what: &'static str },
    #[error("{what} of leader term {got} is older than term {have}, which this node already follows: it comes from a controller that lost its lease (or a replay); ignored")]
    StaleTerm {
        what: &'static str,
        got: u32,
        have: u32,
    },
    #[error("{what} (sequence number {seq}) repeats a request already answered within the last {interval_ms} ms; not answered again")]
    DuplicateRequest {
        what: &'static str,
        seq: u64,
        interval_ms: u64,
    },
}

impl Refusal {
    /// A short, stable name of the kind of refusal (for counters and log fields).
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed",
            Refusal::BadSignature { .. } => "bad_signature",
            Refusal::BadMac { .. } => "bad_mac",
            Refusal::UnknownMember { .. } => "unknown_member",
            Refusal::UnknownNodeId { .. } => "unknown_node_id",
            Refusal::Replay { .. } => "replay",
            Refusal::StaleEpoch { .. } => "stale_epoch",
            Refusal::EpochGap { .. } => "epoch_gap",
            Refusal::MissingKey { .. } => "missing_key",
            Refusal::Outdated { .. } => "outdated",
            Refusal::KeyMismatch { .. } => "key_mismatch",
            Refusal::NotJoined { .. } => "not_joined",
            Refusal::Unexpected { .. } => "unexpected",
            Refusal::NotForMe { .. } => "not_for_me",
            Refusal::Unwrap { .. } => "unwrap",
            Refusal::Unsolicited { .. } => "unsolicited",
            Refusal::Undecryptable { .. } => "undecryptable",
            Refusal::DuplicateData { .. } => "duplicate_data",
            Refusal::BadControllerKey => "bad_controller_key",
            Refusal::ForgedData { .. } => "forged_data",
            Refusal::Pinned { .. } => "pinned",
            Refusal::Late { .. } => "late",
            Refusal::TooManySenders { .. } => "too_many_senders",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::DuplicateRequest { .. } => "duplicate_request",
            Refusal::VerifyBudget { .. } => "verify_budget",
            Refusal::RetiredKey { .. } => "retired_key",
            Refusal::StaleTerm { .. } => "stale_term",
        }
    }
}

/// Exponential backoff with ±`jitter_pct`% jitter: `initial · 2^(attempt-1)`, capped at `max`.
pub(crate) fn backoff(
    initial: u64,
    max: u64,
    attempt: u32,
    jitter_pct: u8,
    rng: &mut impl rand::RngCore,
) -> u64 {
    let shift = attempt.saturating_sub(1).min(20);
    let base = initial.saturating_mul(1u64 << shift).min(max).max(1);
    let j = base * u64::from(jitter_pct.min(100)) / 100;
    if j == 0 {
        return base;
    }
    base - j + rng.gen_range(0..=2 * j)
}

#[cfg(test)]
mod tests;
