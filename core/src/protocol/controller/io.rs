//! The controller's vocabulary: what a shell feeds it ([`ControllerInput`]),
//! what it asks back ([`ControllerAction`]), the management-table events it
//! records ([`Record`]) and the errors of its commands. Its deadlines are its
//! own: the shell asks for the next one with
//! [`super::ControllerMachine::poll_timeout`].

use super::super::triggers::TriggerReason;
use super::super::{Refusal, Time};
use super::{ControllerCore, MemberPersist};
use crate::crypto::{CheckValue, Epoch, InitialKey};
use crate::wire::{NodeId, RoundPhase, Step};
use core::net::SocketAddr;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What a shell feeds the controller.
#[derive(Clone, Debug)]
pub enum ControllerInput<'a> {
    /// After `new` or `restore`: sets the machine's deadlines; a restored
    /// round resends its current request.
    Start,
    /// A datagram (node messages, and group data for the unknown-sender
    /// trigger), handled as it arrived.
    Datagram { from: SocketAddr, bytes: &'a [u8] },
    /// A datagram that waited `waited_us` µs between its arrival (its
    /// socket's receive timestamp) and this call, queued behind the
    /// controller's own work: the drain's round trips leave it out.
    /// `arrived_us` is that arrival on the shell's µs clock, the clock of
    /// [`super::ControllerMachine::requests_sent`]: a round trip is then
    /// measured to the µs, from the request's send to the reply's arrival.
    DatagramWaited {
        from: SocketAddr,
        bytes: &'a [u8],
        waited_us: u32,
        arrived_us: u64,
    },
    /// The deadline [`super::ControllerMachine::poll_timeout`] gave has
    /// passed (or any time after): every deadline due by `now` is handled
    /// (retries, the stale deadline and the end of the drain; the key-age
    /// trigger; the beacon), in that order. Early, it does nothing.
    Timeout,
    /// Enroll a node under its id, initial key and address.
    Enroll {
        node_id: NodeId,
        initial_key: InitialKey,
        addr: SocketAddr,
    },
    /// Remove a node; with `on_node_removed` a round leaves it out of the new key.
    Remove { node_id: NodeId },
    /// Rekey by hand.
    Rekey,
    /// Let a node whose enrollment is pinned run the enrollment handshake once
    /// more (its state was lost) within [`super::REJOIN_WINDOW_MS`]; audited.
    AllowRejoin { node_id: NodeId },
}

/// A command the controller cannot carry out.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CommandError {
    #[error("node id {0} is already enrolled; remove it first to enroll it again")]
    AlreadyEnrolled(NodeId),
    #[error("node id {0} is not enrolled (see `keyfleet status`)")]
    NotEnrolled(NodeId),
    #[error(
        "rekey by hand is switched off in the trigger configuration (triggers.manual = false)"
    )]
    ManualRekeyOff,
}

/// Why a persisted controller cannot be restored.
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("member {0} appears twice in the stored management table")]
    DuplicateMember(u32),
}

/// How a request went out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    Group,
    Unicast,
}

/// What a command came to: the machine's answer to the shell that gave it
/// (from the command line, the control socket or a one-shot run alike).
/// Every other input answers [`Outcome::Done`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not a command (a datagram, a timer, `Start`).
    Done,
    /// `Enroll`: the node's member number and its initial key's fingerprint.
    Enrolled { member: u32, fingerprint: String },
    /// `Rekey` or `Remove`: the epoch whose round, once finished, answers the
    /// command (the round it started, or the one queued behind the round in
    /// progress, which it may have joined); `None` when no round follows (a
    /// removal with `triggers.on_node_removed` off).
    Round { answered_by: Option<Epoch> },
    /// `AllowRejoin`: the re-join window's end.
    RejoinAllowed { until: Time },
}

/// What became of a trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerOutcome {
    /// A round started.
    Started,
    /// A round is in progress; another follows it.
    Queued,
    /// Another round was already queued; this trigger is folded into it.
    AlreadyQueued,
}

/// Milliseconds spent in each phase of a round (`rekey --json`'s and
/// `history --json`'s `phases_ms`; the management table's duration columns).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseDurations {
    pub distributing: u64,
    pub first_transition: u64,
    pub draining: u64,
    pub second_transition: u64,
}

impl PhaseDurations {
    /// The milliseconds spent in `phase`.
    pub fn get(&self, phase: RoundPhase) -> u64 {
        match phase {
            RoundPhase::Distributing => self.distributing,
            RoundPhase::FirstTransition => self.first_transition,
            RoundPhase::Draining => self.draining,
            RoundPhase::SecondTransition => self.second_transition,
        }
    }

    /// The slot of `phase`.
    pub fn get_mut(&mut self, phase: RoundPhase) -> &mut u64 {
        match phase {
            RoundPhase::Distributing => &mut self.distributing,
            RoundPhase::FirstTransition => &mut self.first_transition,
            RoundPhase::Draining => &mut self.draining,
            RoundPhase::SecondTransition => &mut self.second_transition,
        }
    }

    pub(super) fn add(&mut self, phase: RoundPhase, ms: u64) {
        let slot = self.get_mut(phase);
        *slot = slot.saturating_add(ms);
    }
}

/// A member's standing in the management table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberStatus {
    /// Enrolled, never confirmed a key yet: not waited for.
    Enrolled,
    /// Takes part in rounds.
    Active,
    /// Did not answer in time: left out of rounds until it catches up.
    Stale,
}

/// A management-table event, complete enough to be written as a row as is.
/// Times are the controller's `now`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record {
    KeyCreated {
        epoch: Epoch,
        check: CheckValue,
        reason: TriggerReason,
        at: Time,
    },
    TriggerFired {
        reason: TriggerReason,
        outcome: TriggerOutcome,
        at: Time,
    },
    NodeEnrolled {
        member: u32,
        node_id: NodeId,
        addr: SocketAddr,
        fingerprint: String,
        at: Time,
    },
    NodeRemoved {
        member: u32,
        node_id: NodeId,
        at: Time,
    },
    /// A node completed the enrollment handshake (its first message under the
    /// new chain arrived); `rejoin` when an earlier chain was replaced.
    HandshakeCompleted {
        member: u32,
        node_id: NodeId,
        rejoin: bool,
        at: Time,
    },
    /// The operator allowed a pinned node to run the enrollment handshake again.
    RejoinAllowed {
        member: u32,
        node_id: NodeId,
        until: Time,
        at: Time,
    },
    /// A handshake was answered with the member number and key state: the current
    /// key (`epoch`) and, during a round, the round's key (`round_epoch`).
    JoinAnswered {
        member: u32,
        node_id: NodeId,
        addr: SocketAddr,
        epoch: Epoch,
        round_epoch: Option<Epoch>,
        at: Time,
    },
    /// A key request (SPEC §5) was answered; `held` is the newest epoch the
    /// node had; the answer carried the key of `epoch` and, during a round,
    /// the round's key (`round_epoch`).
    KeyRequestAnswered {
        member: u32,
        node_id: NodeId,
        held: Epoch,
        epoch: Epoch,
        round: Option<RoundPhase>,
        round_epoch: Option<Epoch>,
        at: Time,
    },
    /// A member's status changed (joined → active, active → stale, stale → active).
    StatusChanged {
        member: u32,
        node_id: NodeId,
        from: MemberStatus,
        to: MemberStatus,
        epoch: Epoch,
        at: Time,
    },
    /// A node's authenticated message (`message`, its sequence number `seq`)
    /// came from a new address.
    NodeAddressChanged {
        member: u32,
        node_id: NodeId,
        from: SocketAddr,
        to: SocketAddr,
        message: &'static str,
        seq: u64,
        at: Time,
    },
    /// The new key went to one node (in a group batch or by unicast); `attempt` counts from 1 per phase.
    KeySent {
        epoch: Epoch,
        member: u32,
        node_id: NodeId,
        attempt: u32,
        via: Via,
        at: Time,
    },
    /// One key update datagram to the group with `entries` nodes' keys; `attempt` is the group wave.
    KeyBatchSent {
        epoch: Epoch,
        entries: u32,
        attempt: u32,
        at: Time,
    },
    /// A first or second transition request went out (`member` set for unicast).
    TransitionSent {
        epoch: Epoch,
        step: Step,
        attempt: u32,
        via: Via,
        member: Option<u32>,
        at: Time,
    },
    /// A node confirmed a step of the round.
    NodeAcked {
        epoch: Epoch,
        member: u32,
        node_id: NodeId,
        step: Step,
        at: Time,
    },
    /// A node did not answer in time and is left out of the round.
    NodeStale {
        epoch: Epoch,
        member: u32,
        node_id: NodeId,
        phase: RoundPhase,
        at: Time,
    },
    PhaseChanged {
        epoch: Epoch,
        phase: RoundPhase,
        waiting: u32,
        at: Time,
    },
    /// The round completed: its key is current. `nodes` are the joined nodes
    /// (active or stale), `enrolled` every enrolled one; `stale_nodes` did not
    /// get the key in the round, `not_joined` never joined (they get it when they do).
    RoundFinished {
        epoch: Epoch,
        check: CheckValue,
        reason: TriggerReason,
        started_at: Time,
        finished_at: Time,
        phases_ms: PhaseDurations,
        nodes: u32,
        acked: u32,
        stale: u32,
        enrolled: u32,
        stale_nodes: Vec<NodeId>,
        not_joined: Vec<NodeId>,
        /// Times the round was paused on its way.
        pauses: u32,
    },
    /// Too few nodes confirmed `phase` by its deadline (`confirmed` of the
    /// `needed`; none at all means the controller is the one cut off): nobody
    /// is marked stale, the old key stays current, and the round waits,
    /// retrying, until nodes answer again.
    RoundPaused {
        epoch: Epoch,
        phase: RoundPhase,
        confirmed: u32,
        needed: u32,
        joined: u32,
        /// Live nodes that have not confirmed the phase.
        silent: Vec<NodeId>,
        /// Pauses of this round so far, this one included.
        pauses: u32,
        at: Time,
    },
    /// A paused round goes on.
    RoundResumed {
        epoch: Epoch,
        phase: RoundPhase,
        cause: ResumeCause,
        at: Time,
    },
    /// A datagram was refused (bad signature/MAC, replay, unknown member, …).
    Refused {
        from: SocketAddr,
        reason: Refusal,
        at: Time,
    },
}

impl Record {
    /// `(epoch, nodes, acked, stale)` of a [`Record::RoundFinished`].
    pub fn round_finished(&self) -> Option<(Epoch, u32, u32, u32)> {
        match self {
            Record::RoundFinished {
                epoch,
                nodes,
                acked,
                stale,
                ..
            } => Some((*epoch, *nodes, *acked, *stale)),
            _ => None,
        }
    }
}

/// Why a paused round goes on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum ResumeCause {
    /// A node confirmed the phase: the controller hears the fleet again.
    Answer { member: u32, node_id: NodeId },
    /// The controller restarted (`serve`, or a `rekey` that found the round).
    Restart,
    /// A rekey by hand during the pause: retry at once.
    Rekey,
    /// A node was removed: the round is judged again without it.
    Removed { node_id: NodeId },
}

/// What the controller asks its shell to do, in order.
#[derive(Clone, Debug)]
pub enum ControllerAction {
    SendGroup(Vec<u8>),
    SendTo {
        to: SocketAddr,
        bytes: Vec<u8>,
    },
    /// Store the controller's own state (keys, round) durably before what follows.
    PersistCore(Box<ControllerCore>),
    /// Store (insert or replace) one member's row durably before what follows.
    PersistMember(Box<MemberPersist>),
    /// Delete one member's row.
    ForgetMember {
        member: u32,
    },
    /// A management-table event for the database and the audit log.
    Record(Record),
}
