//! The controller side: [`ControllerMachine`], the rekey round of SPEC §2, the
//! triggers of SPEC §3 and the answers to joins and key requests (SPEC §5).
//!
//! A round for epoch `n` goes through four phases:
//!
//! 1. **Distributing** — the new key comes from the CSPRNG, is recorded
//!    (`Record::KeyCreated`) and persisted; key update requests go out. The
//!    key travels only wrapped per node under that node's ratchet step, so
//!    the request is a *batch*: the round's X25519 share and at most 16
//!    `(member, wrapped key)` entries sorted by member number in one
//!    ≤1200-byte signed multicast datagram. 10 000 nodes take 625 datagrams; a node reads the batch's member range
//!    from the header and verifies a signature only for the one batch holding
//!    its entry. The first `group_attempts` waves go to the group (a retry wave
//!    batches only the nodes still missing), then each missing node gets its
//!    own signed one-entry request by unicast, with exponential backoff and jitter.
//! 2. **FirstTransition** — once every live node replied. One signed request
//!    to the group, retransmitted byte-for-byte (to the group, then by unicast
//!    to each missing node, with backoff and jitter), so a node that already
//!    verified it only compares a digest before replying again.
//! 3. **Draining** — once every live node confirmed: wait for data sealed
//!    with the old key still in flight, `drain_rtt_factor` times the round's
//!    slowest acknowledgement round trip (between `drain_floor_ms` and
//!    `max_flight_ms`; [`ControllerMachine::drain_grace`]), or a fixed
//!    `drain_grace_ms`.
//! 4. **SecondTransition** — as the first; once every live node confirmed,
//!    the round is finished and the new key is current.
//!
//! **S1** (no node seals with the new key before every live node can open it)
//! holds because the first transition request is only signed once every live
//! node has acknowledged the key update, and a node that rejoins during a
//! round is only counted live again once its acknowledgement shows it holds
//! the keys the phase needs ([`required_progress`]). **S2** (no node drops
//! the old key while a node may still seal with it or old data may be in
//! flight) holds because the second transition request is only signed once
//! every live node confirmed the first one *and* the drain grace has passed.
//! Both rules are checked next to the round logic in `progress_round`.
//!
//! A node that does not answer within `stale_after_ms` of the phase start is
//! marked *stale* (`Record::NodeStale`), left out of the round, and counted
//! live again when it catches up through a key request (SPEC §5) — but only
//! when enough others confirmed the phase ([`ControllerMachine::needed`]:
//! `min_acked` and a majority of the joined nodes). With fewer (none at all:
//! the controller is the one cut off) the round is *paused*
//! (`Record::RoundPaused`): nobody is marked stale, the old key stays
//! current, retries go on, and the first confirmation, a restart, a rekey by
//! hand or a removal resumes it (`Record::RoundResumed`) with a fresh stale
//! deadline. A phase never ends with fewer confirmations than needed. When a stale
//! node shows it is alive (a usage report, a reply out of step) the controller
//! sends it a resync request, so it asks even without a link-up.
//!
//! Enrollment and the ratchet (issue 17, [`crate::crypto::ratchet`]): a node
//! joins by a Noise `NNpsk0` handshake (its enrollment is pinned after the
//! first, [`ControllerInput::AllowRejoin`] opens one more); every key sent to a
//! node afterwards is wrapped under the one step prepared for it from its
//! confirmed chain and announced share ([`MemberRatchet`]), with the round's
//! share in key update batches or a fresh one in a key response. The step is
//! persisted before anything wrapped under it is sent, reused for every resend,
//! and confirmed when the node's MAC shows it took it.
//!
//! Node messages and group data (SECURITY.md §2a): a node message counts only
//! if its MAC holds and its sequence number is fresh for the member's window,
//! whose top is persisted (`MemberPersist::seq_seen`) so a restart does not
//! reopen replays; a member's recorded address moves only on a reply that
//! moved it forward in the round in progress; key requests and joins are
//! budgeted per member (`member_request_burst`, `member_request_interval_ms`).
//! Group data must open under a key before it moves any replay state, and is
//! checked by the nodes' own rule ([`DataReplay`]): fresh data that opens is a
//! member's own or sets off the leaked-key trigger. Rounds set off by what
//! nodes send are spaced by `node_trigger_min_interval_ms`.
//!
//! **Beacon.** Every `beacon_interval_ms` (default 1 s) the controller sends
//! the group a signed beacon: its term, current epoch, the round's epoch and
//! phase, and its unicast address (SPEC §5). While none of these change it
//! resends the same bytes (same sequence number, same signature), so nodes
//! compare a digest; a change takes a fresh sequence number and one signature.
//!
//! Persistence is incremental: `PersistCore` (keys, round, counters) at every
//! phase change and `PersistMember` at every change of a member's row. Per-node
//! acknowledgements are not persisted: a restored controller resends the
//! current phase's request and the nodes, which never move backwards, answer again.

use super::triggers::{TriggerConfig, TriggerReason};
use super::{backoff, Refusal, Time};
use crate::crypto::{
    digest16, ratchet, Chain, CheckValue, Epoch, GroupKey, InitialKey, NodeKeys, Share, ShareSecret,
};
use crate::wire::{
    self, AnswerPayload, DataReplay, DataSeen, KeyState, Maced, Message, NodeId, ReplayWindow,
    RoundPhase, RoundState, Seen, Step, MAX_BATCH_ENTRIES,
};
use core::net::SocketAddr;
use ed25519_dalek::SigningKey;
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use thiserror::Error;
use zeroize::Zeroize;

const SEQ_BLOCK: u64 = 4096;
/// New handshakes (each costs two X25519 operations) a member may have
/// answered at once…
pub const HANDSHAKE_BURST: u32 = 2;
/// …and one more per this many ms.
pub const HANDSHAKE_INTERVAL_MS: u64 = 250;
/// A retry of an answered handshake init gets the cached answer again at most
/// once per this many ms (a hash and a send: no key agreement).
pub const HANDSHAKE_RESEND_MS: u64 = 100;
/// How long a re-join allowed by the operator stays open.
pub const REJOIN_WINDOW_MS: u64 = 10 * 60 * 1000;

/// The leader term of a sole controller (an embedded management table, or
/// the first leader of a shared one). Every controller message carries the
/// machine's term ([`ControllerMachine::set_term`]); nodes refuse a lower one.
pub const TERM: u32 = 1;

/// Controller settings. Defaults are documented on each field.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerConfig {
    /// A fixed wait after every node confirmed the first transition before
    /// the second, instead of the measured one (default: none, measured; see
    /// [`ControllerMachine::drain_grace`]). It must exceed the longest time a
    /// datagram spends in flight.
    pub drain_grace_ms: Option<u64>,
    /// The measured drain grace is this many times the round's slowest
    /// acknowledgement round trip (default 2)…
    pub drain_rtt_factor: u32,
    /// …at least this many ms (default 10)…
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
            drain_floor_ms: 10,
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

/// The controller's timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ControllerTimer {
    /// Retries, stale deadline, end of the drain grace.
    Round,
    /// The key-age trigger.
    KeyAge,
    /// The next beacon.
    Beacon,
}

/// What a shell feeds the controller.
#[derive(Clone, Debug)]
pub enum ControllerInput<'a> {
    /// After `new` or `restore`: arm timers; a restored round resends its current request.
    Start,
    /// A datagram (node messages, and group data for the unknown-sender trigger).
    Datagram {
        from: SocketAddr,
        bytes: &'a [u8],
    },
    Timer(ControllerTimer),
    /// Enroll a node under its id, initial key and address.
    Enroll {
        node_id: NodeId,
        initial_key: InitialKey,
        addr: SocketAddr,
    },
    /// Remove a node; with `on_node_removed` a round leaves it out of the new key.
    Remove {
        node_id: NodeId,
    },
    /// Rekey by hand.
    Rekey,
    /// Let a node whose enrollment is pinned run the enrollment handshake once
    /// more (its state was lost) within [`REJOIN_WINDOW_MS`]; audited.
    AllowRejoin {
        node_id: NodeId,
    },
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

/// Milliseconds spent in each phase of a round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTimes {
    pub distributing: u64,
    pub first_transition: u64,
    pub draining: u64,
    pub second_transition: u64,
}

impl PhaseTimes {
    fn add(&mut self, phase: RoundPhase, ms: u64) {
        let slot = match phase {
            RoundPhase::Distributing => &mut self.distributing,
            RoundPhase::FirstTransition => &mut self.first_transition,
            RoundPhase::Draining => &mut self.draining,
            RoundPhase::SecondTransition => &mut self.second_transition,
        };
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
        phases_ms: PhaseTimes,
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
    ArmTimer {
        timer: ControllerTimer,
        at: Time,
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

/// The controller's own persisted state. The signing key is zeroized on drop.
#[derive(Clone, Serialize, Deserialize)]
pub struct ControllerCore {
    signing_key: [u8; 32],
    pub current: GroupKey,
    pub activated_at: Time,
    pub round: Option<RoundPersist>,
    pub seq_reserved: u64,
    pub next_member: u32,
    pub pending: Option<TriggerReason>,
}

impl Drop for ControllerCore {
    fn drop(&mut self) {
        self.signing_key.zeroize();
    }
}

impl std::fmt::Debug for ControllerCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerCore")
            .field("current", &self.current)
            .field("round", &self.round)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl ControllerCore {
    /// The controller's Ed25519 public key (what nodes verify against).
    pub fn public_key(&self) -> [u8; 32] {
        SigningKey::from_bytes(&self.signing_key)
            .verifying_key()
            .to_bytes()
    }
}

/// A round in progress, as persisted.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundPersist {
    pub epoch: Epoch,
    pub key: GroupKey,
    /// The controller's X25519 secret of this round's ratchet step (one share
    /// per round, in every key update request); absent in revision 1.
    #[serde(default)]
    pub share: Option<ShareSecret>,
    pub phase: RoundPhase,
    pub reason: TriggerReason,
    pub started_at: Time,
    pub drain_until: Option<Time>,
    pub activated_at: Option<Time>,
    pub phases_ms: PhaseTimes,
    /// Paused since (too few nodes answered); absent in revision-1 files.
    #[serde(default)]
    pub paused_at: Option<Time>,
    /// Times paused so far.
    #[serde(default)]
    pub pauses: u32,
}

/// One row of the management table's node list. Key bytes zeroized on drop.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberPersist {
    pub member: u32,
    pub node_id: NodeId,
    pub addr: SocketAddr,
    keys: NodeKeys,
    pub fingerprint: String,
    pub status: MemberStatus,
    pub enrolled_at: Time,
    /// The member's ratchet (absent in a revision-1 file: the node runs the
    /// enrollment handshake at its next join).
    #[serde(default)]
    pub ratchet: MemberRatchet,
    /// A re-join the operator allowed (`keyfleet rejoin`), open until then.
    #[serde(default)]
    pub rejoin_until: Option<Time>,
    /// Highest sequence number accepted from this node, so that a restarted
    /// controller refuses replays of what it accepted before (absent in
    /// revision-1 files: nothing known). Saved with every snapshot, at most a
    /// second after it moved while messages flow, and at a clean stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_seen: Option<u64>,
}

/// The controller's side of one node's ratchet. Key bytes zeroized on drop.
#[derive(Clone, Debug, Default, Hash, Serialize, Deserialize)]
pub struct MemberRatchet {
    /// The chain the node confirmed last, and the share it announced under it.
    /// Set once the node completed the enrollment handshake: from then on its
    /// enrollment is pinned (another handshake needs [`ControllerInput::AllowRejoin`]).
    pub committed: Option<Committed>,
    /// The one step prepared from `committed`: every wrap for the node uses it
    /// until the node shows (by its MAC) that it took it.
    pub next: Option<Pending>,
    /// The chain of an answered handshake, until the node's first message under it.
    pub handshake: Option<Chain>,
    /// The sequence number of the handshake init `handshake` answers: only a
    /// later init replaces it (the node holds only its latest handshake).
    #[serde(default)]
    pub handshake_seq: u64,
    /// The answer sent to that init, by the init's digest: a retry of the same
    /// init (a node resends it until answered) gets the same bytes again, with
    /// no new key agreement and no new chain, until the node's first message
    /// under the chain completes the handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_answer: Option<AnsweredInit>,
}

/// A handshake init answered: its digest and the answer's Noise message.
#[derive(Clone, Debug, Hash, Serialize, Deserialize)]
pub struct AnsweredInit {
    pub init: [u8; 16],
    #[serde(with = "hex::serde")]
    pub answer: Vec<u8>,
}

#[derive(Clone, Debug, Hash, Serialize, Deserialize)]
pub struct Committed {
    pub chain: Chain,
    pub share: Share,
}

#[derive(Clone, Debug, Hash, Serialize, Deserialize)]
pub struct Pending {
    /// The controller's share of the step (sent with every wrap under it).
    pub share: Share,
    pub step: ratchet::Step,
}

/// A node message to authenticate: what it is, who claims to send it, and the
/// share it carries (replies and key requests do).
struct Auth<'a, 'b> {
    what: &'static str,
    member: u32,
    seq: u64,
    auth: &'a Maced<'b>,
    share: Option<Share>,
}

impl<'a, 'b> Auth<'a, 'b> {
    fn new(
        what: &'static str,
        member: u32,
        seq: u64,
        auth: &'a Maced<'b>,
        share: Option<Share>,
    ) -> Self {
        Auth {
            what,
            member,
            seq,
            auth,
            share,
        }
    }
}

/// Which of a member's chains authenticated a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Under {
    Committed,
    Next,
    Handshake,
}

impl MemberRatchet {
    fn chain(&self, under: Under) -> Option<&Chain> {
        match under {
            Under::Committed => self.committed.as_ref().map(|c| &c.chain),
            Under::Next => self.next.as_ref().map(|p| p.step.chain()),
            Under::Handshake => self.handshake.as_ref(),
        }
    }

    fn verify(&self, auth: &Maced<'_>) -> Option<Under> {
        [Under::Committed, Under::Next, Under::Handshake]
            .into_iter()
            .find(|u| self.chain(*u).is_some_and(|c| auth.verify(c)))
    }
}

/// Everything needed to restore a controller: its core and the member rows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControllerPersist {
    pub core: ControllerCore,
    pub members: Vec<MemberPersist>,
}

#[derive(Clone)]
struct Member {
    row: MemberPersist,
    /// New-handshake budget ([`HANDSHAKE_BURST`], [`HANDSHAKE_INTERVAL_MS`]).
    hs_tokens: u32,
    hs_at: Time,
    /// When the cached handshake answer was last resent.
    hs_resent: Option<Time>,
    /// The chain this member left at its last confirmed step (memory only):
    /// a message still in flight under it is late, not forged.
    previous: Option<Chain>,
    /// Progress in the current round: 0 none, 1 has the key, 2 in transit, 3 done.
    progress: u8,
    /// Requests sent to this member in the current phase.
    attempts: u32,
    replay: ReplayWindow,
    /// The source of this member's latest fresh authenticated message (in
    /// memory): its data from there is its own, as from its recorded address.
    last_from: Option<SocketAddr>,
    /// Key request / join budget: tokens left and when they were counted.
    tokens: u32,
    tokens_at: Time,
    /// Cumulative counts reported for the current key.
    seals: u64,
    opens: u64,
}

#[derive(Clone)]
struct Round {
    epoch: Epoch,
    key: GroupKey,
    /// The controller's secret of this round's ratchet share.
    share: Option<ShareSecret>,
    phase: RoundPhase,
    reason: TriggerReason,
    started_at: Time,
    phase_started: Time,
    /// The stale deadline counts from here: the phase start, or the moment a
    /// pause ended (the controller, not the nodes, was away).
    stale_from: Time,
    /// Paused since: too few nodes confirmed the phase by its deadline.
    paused: Option<Time>,
    pauses: u32,
    drain_until: Option<Time>,
    activated_at: Option<Time>,
    phases_ms: PhaseTimes,
    /// Live members still to confirm the current phase.
    waiting: u32,
    group_sent: u32,
    /// Next group wave, or the moment per-node unicast begins.
    next_wave: Option<Time>,
    /// Signed first / second transition request (resent byte for byte).
    first_msg: Option<Vec<u8>>,
    second_msg: Option<Vec<u8>>,
    /// Per-member unicast retries: (due, member).
    retries: BinaryHeap<Reverse<(Time, u32)>>,
    /// Restored from a snapshot: acknowledgements that crossed the restart
    /// answer requests of the previous run, so the phase times are no round
    /// trips (the drain grace is then `max_flight_ms`).
    restored: bool,
}

/// The progress a phase waits for, if any.
fn target_progress(phase: RoundPhase) -> Option<u8> {
    match phase {
        RoundPhase::Distributing => Some(1),
        RoundPhase::FirstTransition => Some(2),
        RoundPhase::Draining => None,
        RoundPhase::SecondTransition => Some(3),
    }
}

/// The least progress a node must show to be counted live again during a
/// phase: from the first transition on it must hold the new key (S1), and from
/// the drain on it must already seal with the new key (S2).
pub(crate) fn required_progress(phase: RoundPhase) -> u8 {
    match phase {
        RoundPhase::Distributing | RoundPhase::FirstTransition => 1,
        RoundPhase::Draining | RoundPhase::SecondTransition => 2,
    }
}

type Out = Vec<ControllerAction>;

mod state_hash;

/// The controller's protocol state. See the module docs.
///
/// `Clone` and `Hash` (in `controller/state_hash.rs`) let a model checker keep
/// machine states and tell them apart (tests/model_check.rs).
#[derive(Clone)]
pub struct ControllerMachine {
    cfg: ControllerConfig,
    signing: SigningKey,
    current: GroupKey,
    activated_at: Time,
    round: Option<Round>,
    /// Indexed by member number; 0 is never used.
    members: Vec<Option<Member>>,
    by_id: HashMap<NodeId, u32>,
    seq: u64,
    seq_reserved: u64,
    pending: Option<TriggerReason>,
    total_seals: u64,
    total_opens: u64,
    round_timer: Option<Time>,
    age_timer: Option<Time>,
    /// The key the last round retired: nodes that have not taken the second
    /// transition request yet still open data under it, so the controller
    /// still checks such data for a leak.
    previous: Option<GroupKey>,
    /// Group data replay state, by the rule the nodes use.
    data_replay: DataReplay,
    /// A sequence number accepted since the last snapshot was written.
    marks_unsaved: bool,
    /// When the last round set off by node reports started.
    node_trigger_at: Option<Time>,
    beacon_due: Option<Time>,
    /// The last beacon: what it said and its signed bytes (resent while nothing changes).
    beacon: Option<(BeaconState, Vec<u8>)>,
    /// The leader term every message carries ([`TERM`] unless the shell set
    /// the term of its lease).
    term: u32,
}

/// What a beacon says; a change of it takes a new sequence number.
type BeaconState = (Epoch, Option<(Epoch, RoundPhase)>, SocketAddr);

impl ControllerMachine {
    /// A new controller with a fresh signing key and the fleet's first group key (epoch 1).
    pub fn new(
        cfg: ControllerConfig,
        now: Time,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Self {
        let signing = SigningKey::generate(rng);
        let current = GroupKey::generate(Epoch(1), rng);
        out.push(ControllerAction::Record(Record::KeyCreated {
            epoch: current.epoch(),
            check: current.check_value(),
            reason: TriggerReason::Initial,
            at: now,
        }));
        let c = ControllerMachine {
            cfg,
            signing,
            current,
            activated_at: now,
            round: None,
            members: vec![None],
            by_id: HashMap::new(),
            seq: 0,
            seq_reserved: 0,
            pending: None,
            total_seals: 0,
            total_opens: 0,
            round_timer: None,
            age_timer: None,
            previous: None,
            data_replay: DataReplay::new(super::NodeConfig::default().data_replay_senders),
            marks_unsaved: false,
            node_trigger_at: None,
            beacon_due: None,
            beacon: None,
            term: TERM,
        };
        c.persist_core(out);
        c
    }

    /// Resume from persisted state; feed [`ControllerInput::Start`] next.
    pub fn restore(
        p: &ControllerPersist,
        cfg: ControllerConfig,
        now: Time,
    ) -> Result<Self, RestoreError> {
        let core = &p.core;
        let mut members: Vec<Option<Member>> = vec![None];
        let mut by_id = HashMap::new();
        for row in &p.members {
            let i = row.member as usize;
            if members.len() <= i {
                members.resize_with(i + 1, || None);
            }
            if i == 0 || members[i].is_some() {
                return Err(RestoreError::DuplicateMember(row.member));
            }
            by_id.insert(row.node_id.clone(), row.member);
            members[i] = Some(Member::new(row.clone()));
        }
        let round = core.round.as_ref().map(|r| Round {
            epoch: r.epoch,
            key: r.key.clone(),
            share: r.share.clone(),
            phase: r.phase,
            reason: r.reason.clone(),
            started_at: r.started_at,
            // The stale clock restarts: the controller, not the nodes, was away.
            phase_started: now,
            stale_from: now,
            paused: r.paused_at,
            pauses: r.pauses,
            drain_until: r.drain_until,
            activated_at: r.activated_at,
            phases_ms: r.phases_ms,
            restored: true,
            waiting: 0,
            group_sent: 0,
            next_wave: None,
            first_msg: None,
            second_msg: None,
            retries: BinaryHeap::new(),
        });
        let mut c = ControllerMachine {
            cfg,
            signing: SigningKey::from_bytes(&core.signing_key),
            current: core.current.clone(),
            activated_at: core.activated_at,
            round,
            members,
            by_id,
            seq: core.seq_reserved,
            seq_reserved: core.seq_reserved,
            pending: core.pending.clone(),
            total_seals: 0,
            total_opens: 0,
            round_timer: None,
            age_timer: None,
            previous: None,
            data_replay: DataReplay::new(super::NodeConfig::default().data_replay_senders),
            marks_unsaved: false,
            node_trigger_at: None,
            beacon_due: None,
            beacon: None,
            term: TERM,
        };
        c.next_member_floor(core.next_member);
        Ok(c)
    }

    fn next_member_floor(&mut self, next: u32) {
        let want = next.max(1) as usize;
        if self.members.len() < want {
            self.members.resize_with(want, || None);
        }
    }

    /// The snapshot of the controller's own state.
    pub fn core(&self) -> ControllerCore {
        ControllerCore {
            signing_key: self.signing.to_bytes(),
            current: self.current.clone(),
            activated_at: self.activated_at,
            round: self.round.as_ref().map(|r| RoundPersist {
                epoch: r.epoch,
                key: r.key.clone(),
                share: r.share.clone(),
                phase: r.phase,
                reason: r.reason.clone(),
                started_at: r.started_at,
                drain_until: r.drain_until,
                activated_at: r.activated_at,
                phases_ms: r.phases_ms,
                paused_at: r.paused,
                pauses: r.pauses,
            }),
            seq_reserved: self.seq_reserved,
            next_member: self.members.len() as u32,
            pending: self.pending.clone(),
        }
    }

    /// Whether a node's sequence number was accepted since the last snapshot
    /// was taken with [`Self::snapshot_saved`]: the shell writes one at most
    /// every second or so while this holds, and at a clean stop, so a restarted
    /// controller still refuses replays (no write per message).
    pub fn replay_marks_unsaved(&self) -> bool {
        self.marks_unsaved
    }

    /// The shell wrote [`Self::snapshot`] durably.
    pub fn snapshot_saved(&mut self) {
        self.marks_unsaved = false;
    }

    /// The full snapshot (core and every member row).
    pub fn snapshot(&self) -> ControllerPersist {
        ControllerPersist {
            core: self.core(),
            members: self
                .members
                .iter()
                .flatten()
                .map(|m| m.row.clone())
                .collect(),
        }
    }

    /// The leader term every message of this controller carries.
    pub fn term(&self) -> u32 {
        self.term
    }

    /// Takes the leader term of the lease the shell holds (only ever
    /// raised). What was signed under the old term (the beacon, a round's
    /// transition request) is signed again under the new one, so nothing of
    /// the old term goes out after this.
    pub fn set_term(&mut self, term: u32, out: &mut Out) {
        if term <= self.term {
            return;
        }
        self.term = term;
        self.beacon = None;
        let Some(r) = &self.round else { return };
        let epoch = r.epoch;
        let (first, second) = (r.first_msg.is_some(), r.second_msg.is_some());
        for (had, step) in [
            (first, Step::FirstTransition),
            (second, Step::SecondTransition),
        ] {
            if had {
                let seq = self.next_seq(out);
                let msg = wire::sign(wire::transition(term, step, epoch, seq), &self.signing);
                if let Some(r) = &mut self.round {
                    match step {
                        Step::FirstTransition => r.first_msg = Some(msg),
                        _ => r.second_msg = Some(msg),
                    }
                }
            }
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// Sets the unicast address the beacon announces (the shell's socket).
    pub fn set_address(&mut self, addr: SocketAddr) {
        self.cfg.address = addr;
    }

    pub fn current_epoch(&self) -> Epoch {
        self.current.epoch()
    }

    /// The round in progress: its epoch and phase.
    pub fn round(&self) -> Option<(Epoch, RoundPhase)> {
        self.round.as_ref().map(|r| (r.epoch, r.phase))
    }

    /// The round in progress: when it started and its key's check value.
    pub fn round_started(&self) -> Option<(Time, CheckValue)> {
        self.round
            .as_ref()
            .map(|r| (r.started_at, r.key.check_value()))
    }

    /// Live members still to confirm the current phase.
    pub fn waiting(&self) -> u32 {
        self.round.as_ref().map_or(0, |r| r.waiting)
    }

    /// Member number and status of every enrolled node.
    pub fn members(&self) -> impl Iterator<Item = (u32, &NodeId, MemberStatus)> + '_ {
        self.members
            .iter()
            .flatten()
            .map(|m| (m.row.member, &m.row.node_id, m.row.status))
    }

    /// Enrolled nodes that an enrollment of `initial_key` at `addr` would
    /// duplicate: the node already enrolled with the same initial key (each
    /// appliance has its own: a second one is a mislabelled or cloned
    /// appliance), and the node already at the same address (an unspecified
    /// address, not yet known, matches none).
    pub fn enrolled_alike(
        &self,
        initial_key: &InitialKey,
        addr: SocketAddr,
    ) -> (Option<&NodeId>, Option<&NodeId>) {
        let keys = NodeKeys::derive(initial_key);
        let rows = || self.members.iter().flatten().map(|m| &m.row);
        let same_key = rows().find(|r| r.keys.same_as(&keys)).map(|r| &r.node_id);
        let known = !addr.ip().is_unspecified() && addr.port() != 0;
        let same_addr = rows().find(|r| known && r.addr == addr).map(|r| &r.node_id);
        (same_key, same_addr)
    }

    pub fn member_status(&self, node_id: &NodeId) -> Option<MemberStatus> {
        let i = *self.by_id.get(node_id)?;
        self.member(i).map(|m| m.row.status)
    }

    fn member(&self, i: u32) -> Option<&Member> {
        self.members.get(i as usize).and_then(Option::as_ref)
    }

    /// Feed one input; actions are appended to `out`. Only commands can fail;
    /// a bad datagram becomes a [`Record::Refused`].
    pub fn handle(
        &mut self,
        now: Time,
        input: ControllerInput<'_>,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), CommandError> {
        match input {
            ControllerInput::Start => self.start(now, rng, out),
            ControllerInput::Datagram { from, bytes } => {
                if let Err(reason) = self.on_datagram(now, from, bytes, rng, out) {
                    out.push(ControllerAction::Record(Record::Refused {
                        from,
                        reason,
                        at: now,
                    }));
                }
            }
            ControllerInput::Timer(ControllerTimer::Round) => {
                self.round_timer = None;
                self.tick(now, rng, out);
            }
            ControllerInput::Timer(ControllerTimer::KeyAge) => {
                self.age_timer = None;
                self.check_age(now, rng, out);
            }
            ControllerInput::Timer(ControllerTimer::Beacon) => {
                if self.beacon_due.is_some_and(|t| now >= t) {
                    self.send_beacon(now, out);
                }
            }
            ControllerInput::Enroll {
                node_id,
                initial_key,
                addr,
            } => {
                if self.by_id.contains_key(&node_id) {
                    return Err(CommandError::AlreadyEnrolled(node_id));
                }
                let member = self.members.len() as u32;
                let row = MemberPersist {
                    member,
                    node_id: node_id.clone(),
                    addr,
                    keys: NodeKeys::derive(&initial_key),
                    fingerprint: initial_key.fingerprint(),
                    status: MemberStatus::Enrolled,
                    enrolled_at: now,
                    ratchet: MemberRatchet::default(),
                    rejoin_until: None,
                    seq_seen: None,
                };
                out.push(ControllerAction::PersistMember(Box::new(row.clone())));
                out.push(ControllerAction::Record(Record::NodeEnrolled {
                    member,
                    node_id: node_id.clone(),
                    addr,
                    fingerprint: row.fingerprint.clone(),
                    at: now,
                }));
                self.members.push(Some(Member::new(row)));
                self.by_id.insert(node_id, member);
                self.persist_core(out);
            }
            ControllerInput::Remove { node_id } => {
                let member = self
                    .by_id
                    .remove(&node_id)
                    .ok_or_else(|| CommandError::NotEnrolled(node_id.clone()))?;
                let was_waiting = self.is_waiting(member);
                if let Some(slot) = self.members.get_mut(member as usize) {
                    *slot = None;
                }
                if was_waiting {
                    if let Some(r) = &mut self.round {
                        r.waiting = r.waiting.saturating_sub(1);
                    }
                }
                out.push(ControllerAction::ForgetMember { member });
                out.push(ControllerAction::Record(Record::NodeRemoved {
                    member,
                    node_id: node_id.clone(),
                    at: now,
                }));
                // A round paused for want of the removed node's answer is judged
                // again without it (and pauses again if still too few answered).
                self.resume(
                    now,
                    ResumeCause::Removed {
                        node_id: node_id.clone(),
                    },
                    out,
                );
                if self.cfg.triggers.on_node_removed {
                    self.fire(now, TriggerReason::NodeRemoved { node_id }, rng, out);
                }
                self.progress_round(now, rng, out);
            }
            ControllerInput::Rekey => {
                if !self.cfg.triggers.manual {
                    return Err(CommandError::ManualRekeyOff);
                }
                self.fire(now, TriggerReason::Manual, rng, out);
            }
            ControllerInput::AllowRejoin { node_id } => {
                let member = *self
                    .by_id
                    .get(&node_id)
                    .ok_or_else(|| CommandError::NotEnrolled(node_id.clone()))?;
                let until = now.plus(REJOIN_WINDOW_MS);
                if let Some(Some(m)) = self.members.get_mut(member as usize) {
                    m.row.rejoin_until = Some(until);
                    // A node that lost its state counts its sequence numbers from 1 again.
                    m.replay = ReplayWindow::default();
                    m.row.ratchet.handshake = None;
                    m.row.ratchet.handshake_seq = 0;
                    m.row.ratchet.handshake_answer = None;
                    out.push(ControllerAction::PersistMember(Box::new(m.row.clone())));
                }
                Self::record(
                    out,
                    Record::RejoinAllowed {
                        member,
                        node_id,
                        until,
                        at: now,
                    },
                );
            }
        }
        Ok(())
    }

    fn start(&mut self, now: Time, rng: &mut (impl RngCore + CryptoRng), out: &mut Out) {
        // Members of a revision-1 table have no ratchet yet: they take part in
        // rounds again once they ran the enrollment handshake.
        for m in self.members.iter_mut().flatten() {
            if m.row.ratchet.committed.is_none() && m.row.status != MemberStatus::Enrolled {
                let from = m.row.status;
                m.row.status = MemberStatus::Enrolled;
                out.push(ControllerAction::PersistMember(Box::new(m.row.clone())));
                out.push(ControllerAction::Record(Record::StatusChanged {
                    member: m.row.member,
                    node_id: m.row.node_id.clone(),
                    from,
                    to: MemberStatus::Enrolled,
                    epoch: self.current.epoch(),
                    at: now,
                }));
            }
        }
        self.resume(now, ResumeCause::Restart, out);
        if let Some(phase) = self.round.as_ref().map(|r| r.phase) {
            // Acknowledgements were not persisted: ask again; nodes answer idempotently.
            self.enter_phase(now, phase, rng, out);
        }
        self.arm_age(out);
        self.progress_round(now, rng, out);
        self.start_pending(now, rng, out);
        self.check_age(now, rng, out);
        self.send_beacon(now, out);
    }

    /// The beacon to the group, and the next one armed. The same bytes as the
    /// last one while the state it tells is unchanged.
    fn send_beacon(&mut self, now: Time, out: &mut Out) {
        let every = self.cfg.beacon_interval_ms;
        if every == 0 {
            return;
        }
        let state: BeaconState = (self.current.epoch(), self.round(), self.cfg.address);
        let bytes = match &self.beacon {
            Some((s, bytes)) if *s == state => bytes.clone(),
            _ => {
                let seq = self.next_seq(out);
                let bytes = wire::sign(
                    wire::beacon(self.term, state.0, seq, state.1, state.2),
                    &self.signing,
                );
                self.beacon = Some((state, bytes.clone()));
                bytes
            }
        };
        out.push(ControllerAction::SendGroup(bytes));
        let at = now.plus(every);
        self.beacon_due = Some(at);
        out.push(ControllerAction::ArmTimer {
            timer: ControllerTimer::Beacon,
            at,
        });
    }

    fn next_seq(&mut self, out: &mut Out) -> u64 {
        self.seq += 1;
        if self.seq >= self.seq_reserved {
            self.seq_reserved = self.seq + SEQ_BLOCK;
            self.persist_core(out);
        }
        self.seq
    }

    fn persist_core(&self, out: &mut Out) {
        out.push(ControllerAction::PersistCore(Box::new(self.core())));
    }

    fn record(out: &mut Out, r: Record) {
        out.push(ControllerAction::Record(r));
    }

    fn is_waiting(&self, member: u32) -> bool {
        let (Some(r), Some(m)) = (&self.round, self.member(member)) else {
            return false;
        };
        m.row.status == MemberStatus::Active
            && target_progress(r.phase).is_some_and(|t| m.progress < t)
    }

    /// The key state for `member`, wrapped under its next ratchet step, and the
    /// controller's share of that step.
    fn key_state_for(
        &mut self,
        member: u32,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Option<(Share, KeyState)> {
        let (share, step) = self.step_for(member, rng, out)?;
        Some((
            share,
            KeyState {
                current_epoch: self.current.epoch(),
                current: step.wrap(&self.current, member, rng),
                round: self.round.as_ref().map(|r| RoundState {
                    epoch: r.epoch,
                    phase: r.phase,
                    wrapped: step.wrap(&r.key, member, rng),
                }),
            },
        ))
    }

    /// The step every wrap for `member` goes under: the one prepared earlier
    /// (the node may have taken it), else a new one from its confirmed chain
    /// and share with the round's share (outside a round, a fresh one).
    /// `None` for a node without a confirmed chain (not joined by handshake).
    fn step_for(
        &mut self,
        member: u32,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Option<(Share, ratchet::Step)> {
        let round_secret = self.round.as_ref().and_then(|r| r.share.clone());
        let m = self.members.get_mut(member as usize)?.as_mut()?;
        if let Some(p) = &m.row.ratchet.next {
            return Some((p.share, p.step.clone()));
        }
        let c = m.row.ratchet.committed.as_ref()?;
        let secret = round_secret.unwrap_or_else(|| ShareSecret::generate(rng));
        let ours = secret.public();
        let dh = secret.dh(&c.share)?;
        let step = ratchet::Step::derive(&c.chain, &dh, member, &ours, &c.share);
        m.row.ratchet.next = Some(Pending {
            share: ours,
            step: step.clone(),
        });
        out.push(ControllerAction::PersistMember(Box::new(m.row.clone())));
        Some((ours, step))
    }

    /// The round's share, as sent in its key update batches.
    fn round_share(&self) -> Option<Share> {
        self.round
            .as_ref()
            .and_then(|r| r.share.as_ref())
            .map(ShareSecret::public)
    }

    // ------------------------------------------------------------ triggers

    fn fire(
        &mut self,
        now: Time,
        reason: TriggerReason,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) {
        if reason == TriggerReason::Manual && self.resume(now, ResumeCause::Rekey, out) {
            // Someone asks by hand while the round waits: retry at once.
            if let Some(phase) = self.round.as_ref().map(|r| r.phase) {
                self.enter_phase(now, phase, rng, out);
                self.arm_round_timer(out);
            }
        }
        let hold = node_caused(&reason)
            && self
                .node_trigger_at
                .is_some_and(|t| now < t.plus(self.cfg.node_trigger_min_interval_ms));
        if self.round.is_none() && !hold {
            Self::record(
                out,
                Record::TriggerFired {
                    reason: reason.clone(),
                    outcome: TriggerOutcome::Started,
                    at: now,
                },
            );
            if node_caused(&reason) {
                self.node_trigger_at = Some(now);
            }
            self.start_round(now, reason, rng, out);
        } else if self.pending.is_none() {
            Self::record(
                out,
                Record::TriggerFired {
                    reason: reason.clone(),
                    outcome: TriggerOutcome::Queued,
                    at: now,
                },
            );
            self.pending = Some(reason);
            self.persist_core(out);
            self.arm_round_timer(out);
        } else {
            Self::record(
                out,
                Record::TriggerFired {
                    reason,
                    outcome: TriggerOutcome::AlreadyQueued,
                    at: now,
                },
            );
        }
    }

    /// When the queued trigger may start its round (once no round runs): at
    /// once, or, for one set off by nodes, `node_trigger_min_interval_ms`
    /// after the last such round started.
    fn pending_due(&self) -> Option<Time> {
        let p = self.pending.as_ref()?;
        match self.node_trigger_at {
            Some(t) if node_caused(p) => Some(t.plus(self.cfg.node_trigger_min_interval_ms)),
            _ => Some(Time(0)),
        }
    }

    /// Starts the queued round if no round runs and it is due.
    fn start_pending(&mut self, now: Time, rng: &mut (impl RngCore + CryptoRng), out: &mut Out) {
        if self.round.is_some() || self.pending_due().is_none_or(|t| now < t) {
            return;
        }
        if let Some(reason) = self.pending.take() {
            if node_caused(&reason) {
                self.node_trigger_at = Some(now);
            }
            self.start_round(now, reason, rng, out);
        }
    }

    fn arm_age(&mut self, out: &mut Out) {
        if let Some(at) = self.cfg.triggers.key_age_deadline(self.activated_at) {
            if self.age_timer != Some(at) {
                self.age_timer = Some(at);
                out.push(ControllerAction::ArmTimer {
                    timer: ControllerTimer::KeyAge,
                    at,
                });
            }
        }
    }

    fn check_age(&mut self, now: Time, rng: &mut (impl RngCore + CryptoRng), out: &mut Out) {
        let Some(limit_ms) = self.cfg.triggers.max_key_age_ms else {
            return;
        };
        let age_ms = now.since(self.activated_at);
        if age_ms >= limit_ms && self.round.is_none() && self.pending.is_none() {
            self.fire(now, TriggerReason::KeyAge { age_ms, limit_ms }, rng, out);
        } else if self.round.is_none() {
            self.arm_age(out);
        }
    }

    // ------------------------------------------------------------ the round

    fn start_round(
        &mut self,
        now: Time,
        reason: TriggerReason,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) {
        let epoch = self.current.epoch().next();
        let key = GroupKey::generate(epoch, rng);
        Self::record(
            out,
            Record::KeyCreated {
                epoch,
                check: key.check_value(),
                reason: reason.clone(),
                at: now,
            },
        );
        for m in self.members.iter_mut().flatten() {
            m.progress = 0;
        }
        self.round = Some(Round {
            epoch,
            key,
            share: Some(ShareSecret::generate(rng)),
            phase: RoundPhase::Distributing,
            reason,
            started_at: now,
            phase_started: now,
            stale_from: now,
            paused: None,
            pauses: 0,
            drain_until: None,
            activated_at: None,
            phases_ms: PhaseTimes::default(),
            waiting: 0,
            group_sent: 0,
            next_wave: None,
            first_msg: None,
            second_msg: None,
            retries: BinaryHeap::new(),
            restored: false,
        });
        self.enter_phase(now, RoundPhase::Distributing, rng, out);
        self.progress_round(now, rng, out);
    }

    /// Enter `phase`: persist, then send its request to the group.
    fn enter_phase(
        &mut self,
        now: Time,
        phase: RoundPhase,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) {
        let Some(r) = &mut self.round else { return };
        if r.phase != phase {
            r.phases_ms.add(r.phase, now.since(r.phase_started));
        }
        r.phase = phase;
        r.phase_started = now;
        r.stale_from = now;
        r.group_sent = 0;
        r.next_wave = None;
        r.retries.clear();
        if phase == RoundPhase::FirstTransition && r.activated_at.is_none() {
            r.activated_at = Some(now);
        }
        if phase == RoundPhase::Draining && r.drain_until.is_none() {
            r.drain_until = Some(now.plus(Self::drain_grace(&self.cfg, r)));
        }
        let target = target_progress(phase);
        let mut waiting = 0;
        for m in self.members.iter_mut().flatten() {
            m.attempts = 0;
            if m.row.status == MemberStatus::Active && target.is_some_and(|t| m.progress < t) {
                waiting += 1;
            }
        }
        let epoch = r.epoch;
        r.waiting = waiting;
        Self::record(
            out,
            Record::PhaseChanged {
                epoch,
                phase,
                waiting,
                at: now,
            },
        );
        self.persist_core(out);
        match phase {
            RoundPhase::Distributing => self.send_key_wave(now, rng, out),
            RoundPhase::FirstTransition | RoundPhase::SecondTransition => {
                let step = if phase == RoundPhase::FirstTransition {
                    Step::FirstTransition
                } else {
                    Step::SecondTransition
                };
                let seq = self.next_seq(out);
                let msg = wire::sign(wire::transition(self.term, step, epoch, seq), &self.signing);
                if let Some(r) = &mut self.round {
                    match step {
                        Step::FirstTransition => r.first_msg = Some(msg),
                        _ => r.second_msg = Some(msg),
                    }
                }
                self.send_transition_wave(now, step, rng, out);
            }
            RoundPhase::Draining => {}
        }
    }

    /// How long the drain waits (S2): `drain_grace_ms` when fixed; else
    /// `drain_rtt_factor` times the round's slowest acknowledgement round
    /// trip, at least `drain_floor_ms` and at most `max_flight_ms`.
    ///
    /// The slowest round trip is the longer of the first two phases: each
    /// ends with the last acknowledgement it needed, which answers a request
    /// sent at or after the phase began (retries, node processing and the
    /// node's state write included, so it errs long). Old-key data was sealed
    /// before its sender acknowledged the first transition request, so it is
    /// lost only if it stays in flight longer than this grace (plus the
    /// second transition request's own way to the receiver). A round
    /// restored after a restart may count acknowledgements of requests sent
    /// before the restart, which measure nothing: it waits `max_flight_ms`.
    fn drain_grace(cfg: &ControllerConfig, r: &Round) -> u64 {
        if let Some(fixed) = cfg.drain_grace_ms {
            return fixed;
        }
        if r.restored {
            return cfg.max_flight_ms;
        }
        let rtt = r.phases_ms.distributing.max(r.phases_ms.first_transition);
        rtt.saturating_mul(u64::from(cfg.drain_rtt_factor))
            .max(cfg.drain_floor_ms)
            .min(cfg.max_flight_ms)
    }

    /// The delay before retry number `attempt` (backoff with jitter).
    fn retry_delay(&self, attempt: u32, rng: &mut impl RngCore) -> u64 {
        let c = &self.cfg;
        backoff(
            c.retry_initial_ms,
            c.retry_max_ms,
            attempt,
            c.retry_jitter_pct,
            rng,
        )
    }

    /// Count a group wave and schedule the next one; returns its number.
    fn start_wave(&mut self, now: Time, rng: &mut impl RngCore) -> Option<u32> {
        let wave = self.round.as_ref()?.group_sent + 1;
        let next = now.plus(self.retry_delay(wave, rng));
        let r = self.round.as_mut()?;
        r.group_sent = wave;
        r.next_wave = Some(next);
        Some(wave)
    }

    /// One group wave of key update batches to every waiting member.
    fn send_key_wave(&mut self, now: Time, rng: &mut (impl RngCore + CryptoRng), out: &mut Out) {
        let Some(wave) = self.start_wave(now, rng) else {
            return;
        };
        let (Some(epoch), Some(share)) = (self.round.as_ref().map(|r| r.epoch), self.round_share())
        else {
            return;
        };
        let mut batch: Vec<(u32, crate::crypto::WrappedKey)> =
            Vec::with_capacity(MAX_BATCH_ENTRIES);
        for i in 0..self.members.len() as u32 {
            if !self.is_waiting(i) {
                continue;
            }
            let Some((step_share, step)) = self.step_for(i, rng, out) else {
                continue;
            };
            if step_share != share {
                // A step prepared before this round (an unconfirmed key
                // response): its share is not the batch's, so it goes by unicast.
                if let Some(r) = &mut self.round {
                    r.retries.push(Reverse((now, i)));
                }
                continue;
            }
            let (Some(r), Some(Some(m))) = (&self.round, self.members.get_mut(i as usize)) else {
                continue;
            };
            m.attempts += 1;
            batch.push((i, step.wrap(&r.key, i, rng)));
            out.push(ControllerAction::Record(Record::KeySent {
                epoch,
                member: i,
                node_id: m.row.node_id.clone(),
                attempt: m.attempts,
                via: Via::Group,
                at: now,
            }));
            if batch.len() == MAX_BATCH_ENTRIES {
                self.send_batch(now, epoch, &share, wave, &mut batch, out);
            }
        }
        if !batch.is_empty() {
            self.send_batch(now, epoch, &share, wave, &mut batch, out);
        }
    }

    fn send_batch(
        &mut self,
        now: Time,
        epoch: Epoch,
        share: &Share,
        wave: u32,
        batch: &mut Vec<(u32, crate::crypto::WrappedKey)>,
        out: &mut Out,
    ) {
        let seq = self.next_seq(out);
        let msg = wire::sign(
            wire::key_update(self.term, epoch, seq, share, batch),
            &self.signing,
        );
        out.push(ControllerAction::SendGroup(msg));
        Self::record(
            out,
            Record::KeyBatchSent {
                epoch,
                entries: batch.len() as u32,
                attempt: wave,
                at: now,
            },
        );
        batch.clear();
    }

    fn send_transition_wave(
        &mut self,
        now: Time,
        step: Step,
        rng: &mut impl RngCore,
        out: &mut Out,
    ) {
        let Some(wave) = self.start_wave(now, rng) else {
            return;
        };
        let Some(r) = &self.round else { return };
        let msg = match step {
            Step::FirstTransition => r.first_msg.clone(),
            _ => r.second_msg.clone(),
        };
        if let Some(msg) = msg {
            out.push(ControllerAction::SendGroup(msg));
            Self::record(
                out,
                Record::TransitionSent {
                    epoch: r.epoch,
                    step,
                    attempt: wave,
                    via: Via::Group,
                    member: None,
                    at: now,
                },
            );
        }
        for m in self.members.iter_mut().flatten() {
            m.attempts += u32::from(m.row.status == MemberStatus::Active);
        }
    }

    /// The current phase's request to one member by unicast.
    fn send_unicast(
        &mut self,
        now: Time,
        member: u32,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) {
        let Some(phase) = self.round.as_ref().map(|r| r.phase) else {
            return;
        };
        match phase {
            RoundPhase::Distributing => {
                let Some((share, step)) = self.step_for(member, rng, out) else {
                    return;
                };
                let seq = self.next_seq(out);
                let (Some(r), Some(Some(m))) = (&self.round, self.members.get_mut(member as usize))
                else {
                    return;
                };
                m.attempts += 1;
                let entry = [(member, step.wrap(&r.key, member, rng))];
                let msg = wire::sign(
                    wire::key_update(self.term, r.epoch, seq, &share, &entry),
                    &self.signing,
                );
                out.push(ControllerAction::SendTo {
                    to: m.row.addr,
                    bytes: msg,
                });
                out.push(ControllerAction::Record(Record::KeySent {
                    epoch: r.epoch,
                    member,
                    node_id: m.row.node_id.clone(),
                    attempt: m.attempts,
                    via: Via::Unicast,
                    at: now,
                }));
            }
            RoundPhase::FirstTransition | RoundPhase::SecondTransition => {
                let (Some(r), Some(Some(m))) = (&self.round, self.members.get_mut(member as usize))
                else {
                    return;
                };
                let (step, msg) = if phase == RoundPhase::FirstTransition {
                    (Step::FirstTransition, &r.first_msg)
                } else {
                    (Step::SecondTransition, &r.second_msg)
                };
                let Some(msg) = msg else { return };
                m.attempts += 1;
                out.push(ControllerAction::SendTo {
                    to: m.row.addr,
                    bytes: msg.clone(),
                });
                out.push(ControllerAction::Record(Record::TransitionSent {
                    epoch: r.epoch,
                    step,
                    attempt: m.attempts,
                    via: Via::Unicast,
                    member: Some(member),
                    at: now,
                }));
            }
            RoundPhase::Draining => {}
        }
    }

    /// Timer work: group waves, unicast retries, the stale deadline, the drain.
    fn tick(&mut self, now: Time, rng: &mut (impl RngCore + CryptoRng), out: &mut Out) {
        let Some(r) = &self.round else {
            self.start_pending(now, rng, out);
            self.arm_round_timer(out);
            return;
        };
        let phase = r.phase;
        if r.waiting > 0 && r.paused.is_none() && now >= r.stale_from.plus(self.cfg.stale_after_ms)
        {
            // Silent nodes are left out only if enough others confirmed the
            // phase; otherwise (nobody answered: the controller is the one cut
            // off; or too few did) nobody is marked stale and the round waits.
            if self.confirmed() >= self.needed() {
                self.mark_stale(now, out);
            } else {
                self.pause(now, out);
            }
        }
        let Some(r) = &mut self.round else { return };
        if r.waiting > 0 && r.next_wave.is_some_and(|t| now >= t) {
            if r.group_sent < self.cfg.group_attempts.max(1) {
                match phase {
                    RoundPhase::Distributing => self.send_key_wave(now, rng, out),
                    RoundPhase::FirstTransition => {
                        self.send_transition_wave(now, Step::FirstTransition, rng, out)
                    }
                    RoundPhase::SecondTransition => {
                        self.send_transition_wave(now, Step::SecondTransition, rng, out)
                    }
                    RoundPhase::Draining => {}
                }
            } else {
                // Group waves are spent: every member still missing gets unicast now.
                r.next_wave = None;
                let due: Vec<u32> = (0..self.members.len() as u32)
                    .filter(|i| self.is_waiting(*i))
                    .collect();
                if let Some(r) = &mut self.round {
                    r.retries.extend(due.into_iter().map(|i| Reverse((now, i))));
                }
            }
        }
        while let Some(&Reverse((due, member))) = self.round.as_ref().and_then(|r| r.retries.peek())
        {
            if due > now {
                break;
            }
            if let Some(r) = &mut self.round {
                r.retries.pop();
            }
            if !self.is_waiting(member) {
                continue;
            }
            self.send_unicast(now, member, rng, out);
            let attempts = self.member(member).map_or(1, |m| m.attempts);
            let wait = self.retry_delay(attempts, rng);
            if let Some(r) = &mut self.round {
                r.retries.push(Reverse((now.plus(wait), member)));
            }
        }
        self.progress_round(now, rng, out);
    }

    fn mark_stale(&mut self, now: Time, out: &mut Out) {
        let Some(r) = &self.round else { return };
        let (epoch, phase) = (r.epoch, r.phase);
        for i in 0..self.members.len() as u32 {
            if !self.is_waiting(i) {
                continue;
            }
            if let Some(Some(m)) = self.members.get_mut(i as usize) {
                m.row.status = MemberStatus::Stale;
                out.push(ControllerAction::PersistMember(Box::new(m.row.clone())));
                out.push(ControllerAction::Record(Record::NodeStale {
                    epoch,
                    member: i,
                    node_id: m.row.node_id.clone(),
                    phase,
                    at: now,
                }));
                out.push(ControllerAction::Record(Record::StatusChanged {
                    member: i,
                    node_id: m.row.node_id.clone(),
                    from: MemberStatus::Active,
                    to: MemberStatus::Stale,
                    epoch,
                    at: now,
                }));
            }
        }
        if let Some(r) = &mut self.round {
            r.waiting = 0;
        }
    }

    /// Nodes that joined (active or stale): the base of the majority.
    fn joined(&self) -> u32 {
        self.members
            .iter()
            .flatten()
            .filter(|m| m.row.status != MemberStatus::Enrolled)
            .count() as u32
    }

    /// Confirmations a phase needs before it may end (SPEC §2: a round that
    /// reaches too few nodes is not completed): `min_acked` and, with
    /// `min_acked_majority`, more than half the joined nodes; never more
    /// than the joined nodes, and none when no node has joined yet.
    pub fn needed(&self) -> u32 {
        let joined = self.joined();
        if joined == 0 {
            return 0;
        }
        let mut n = self.cfg.min_acked;
        if self.cfg.min_acked_majority {
            n = n.max(joined / 2 + 1);
        }
        n.min(joined)
    }

    /// Live nodes that confirmed the current phase (in the drain: the first transition).
    pub fn confirmed(&self) -> u32 {
        let Some(r) = &self.round else { return 0 };
        let target = target_progress(r.phase).unwrap_or(2);
        self.members
            .iter()
            .flatten()
            .filter(|m| m.row.status == MemberStatus::Active && m.progress >= target)
            .count() as u32
    }

    /// Since when the round in progress is paused, if it is.
    pub fn paused_since(&self) -> Option<Time> {
        self.round.as_ref().and_then(|r| r.paused)
    }

    /// Pause the round: nobody is marked stale, the old key stays current,
    /// retries go on; an answer, a restart or a rekey by hand resumes it.
    fn pause(&mut self, now: Time, out: &mut Out) {
        let (confirmed, needed, joined) = (self.confirmed(), self.needed(), self.joined());
        let silent: Vec<NodeId> = (0..self.members.len() as u32)
            .filter(|i| self.is_waiting(*i))
            .filter_map(|i| self.member(i).map(|m| m.row.node_id.clone()))
            .collect();
        let Some(r) = &mut self.round else { return };
        if r.paused.is_some() {
            return;
        }
        r.paused = Some(now);
        r.pauses += 1;
        let (epoch, phase, pauses) = (r.epoch, r.phase, r.pauses);
        Self::record(
            out,
            Record::RoundPaused {
                epoch,
                phase,
                confirmed,
                needed,
                joined,
                silent,
                pauses,
                at: now,
            },
        );
        self.persist_core(out);
        self.arm_round_timer(out);
    }

    /// End a pause; the stale deadline counts again from now. Returns whether
    /// the round was paused.
    fn resume(&mut self, now: Time, cause: ResumeCause, out: &mut Out) -> bool {
        let Some(r) = &mut self.round else {
            return false;
        };
        if r.paused.take().is_none() {
            return false;
        }
        r.stale_from = now;
        let (epoch, phase) = (r.epoch, r.phase);
        Self::record(
            out,
            Record::RoundResumed {
                epoch,
                phase,
                cause,
                at: now,
            },
        );
        self.persist_core(out);
        true
    }

    /// Move the round on while its conditions hold. The checks of S1 and S2 live here:
    /// the first transition only once every live node holds the new key (`waiting == 0`
    /// in Distributing), the second only once every live node seals with it and the
    /// drain grace for old-key data in flight has passed.
    fn progress_round(&mut self, now: Time, rng: &mut (impl RngCore + CryptoRng), out: &mut Out) {
        while let Some(r) = &self.round {
            // A phase that waits for confirmations ends only with enough of
            // them (`needed`): too few (live nodes left out earlier, say) and
            // the round pauses until nodes answer again.
            let waited_out =
                r.waiting == 0 && target_progress(r.phase).is_some() && r.paused.is_none();
            if waited_out && self.confirmed() < self.needed() {
                self.pause(now, out);
                break;
            }
            let Some(r) = &self.round else { break };
            let next = match r.phase {
                // S1: every live node acknowledged the new key.
                RoundPhase::Distributing if waited_out => RoundPhase::FirstTransition,
                // Every live node seals with the new key: start the drain.
                RoundPhase::FirstTransition if waited_out => RoundPhase::Draining,
                // S2: nobody seals with the old key and the drain grace is over.
                RoundPhase::Draining if r.drain_until.is_some_and(|t| now >= t) => {
                    RoundPhase::SecondTransition
                }
                RoundPhase::SecondTransition if waited_out => {
                    self.finish_round(now, rng, out);
                    continue;
                }
                _ => break,
            };
            self.enter_phase(now, next, rng, out);
        }
        self.arm_round_timer(out);
    }

    fn finish_round(&mut self, now: Time, rng: &mut (impl RngCore + CryptoRng), out: &mut Out) {
        let Some(mut r) = self.round.take() else {
            return;
        };
        r.phases_ms.add(r.phase, now.since(r.phase_started));
        let (mut nodes, mut acked, mut enrolled) = (0, 0, 0);
        let (mut stale_nodes, mut not_joined) = (Vec::new(), Vec::new());
        for m in self.members.iter_mut().flatten() {
            enrolled += 1;
            match m.row.status {
                MemberStatus::Active => {
                    nodes += 1;
                    acked += u32::from(m.progress >= 3);
                }
                MemberStatus::Stale => {
                    nodes += 1;
                    stale_nodes.push(m.row.node_id.clone());
                }
                MemberStatus::Enrolled => not_joined.push(m.row.node_id.clone()),
            }
            m.seals = 0;
            m.opens = 0;
        }
        Self::record(
            out,
            Record::RoundFinished {
                epoch: r.epoch,
                check: r.key.check_value(),
                reason: r.reason.clone(),
                started_at: r.started_at,
                finished_at: now,
                phases_ms: r.phases_ms,
                nodes,
                acked,
                stale: stale_nodes.len() as u32,
                enrolled,
                stale_nodes,
                not_joined,
                pauses: r.pauses,
            },
        );
        self.previous = Some(std::mem::replace(&mut self.current, r.key.clone()));
        // The round's deadlines are void; the next one armed replaces them.
        self.round_timer = None;
        self.activated_at = r.activated_at.unwrap_or(now);
        self.total_seals = 0;
        self.total_opens = 0;
        self.persist_core(out);
        self.arm_age(out);
        self.start_pending(now, rng, out);
    }

    fn arm_round_timer(&mut self, out: &mut Out) {
        let pending = if self.round.is_none() {
            self.pending_due()
        } else {
            None
        };
        let due = pending.or_else(|| {
            self.round.as_ref().and_then(|r| {
                let mut due: Option<Time> = None;
                let mut take = |t: Option<Time>| {
                    if let Some(t) = t {
                        due = Some(due.map_or(t, |d: Time| d.min(t)));
                    }
                };
                if r.waiting > 0 {
                    take(r.next_wave);
                    take(r.retries.peek().map(|Reverse((t, _))| *t));
                    if r.paused.is_none() {
                        take(Some(r.stale_from.plus(self.cfg.stale_after_ms)));
                    }
                }
                if r.phase == RoundPhase::Draining {
                    take(r.drain_until);
                }
                due
            })
        });
        if let Some(at) = due {
            if self.round_timer.is_none_or(|t| at < t) {
                self.round_timer = Some(at);
                out.push(ControllerAction::ArmTimer {
                    timer: ControllerTimer::Round,
                    at,
                });
            }
        }
    }

    // ------------------------------------------------------------ datagrams

    /// Check a node message's MAC under one of the member's chains (its
    /// confirmed chain, the step prepared for it, an answered handshake), with
    /// the replay window. A message carrying the node's share (a reply, a key
    /// request) under a newer chain confirms that chain: the older one is
    /// dropped and the share recorded for the next step.
    /// The window's top is persisted (`MemberPersist::seq_seen`, restored after a
    /// restart) and the source noted; it moves no address (see [`Self::move_address`]).
    fn authenticate(
        &mut self,
        a: Auth<'_, '_>,
        from: SocketAddr,
        now: Time,
        out: &mut Out,
    ) -> Result<Under, Refusal> {
        let (what, member) = (a.what, a.member);
        let m = self
            .members
            .get_mut(member as usize)
            .and_then(Option::as_mut)
            .ok_or(Refusal::UnknownMember { what, member })?;
        if m.replay.check(a.seq) != Seen::Fresh {
            return Err(Refusal::Replay { what, seq: a.seq });
        }
        let Some(under) = m.row.ratchet.verify(a.auth) else {
            if m.previous.as_ref().is_some_and(|c| a.auth.verify(c)) {
                return Err(Refusal::Late { what, member });
            }
            return Err(Refusal::BadMac { what, member });
        };
        m.replay.mark(a.seq);
        if let Some(share) = a.share {
            let rt = &mut m.row.ratchet;
            let mut changed = false;
            match under {
                Under::Committed => {
                    if rt.committed.as_ref().is_some_and(|c| c.share != share) {
                        // The prepared step used a share the node no longer holds.
                        if let Some(c) = &mut rt.committed {
                            c.share = share;
                        }
                        rt.next = None;
                        changed = true;
                    }
                }
                Under::Next | Under::Handshake => {
                    let chain = rt.chain(under).cloned();
                    if let Some(chain) = chain {
                        let rejoin = rt.committed.is_some();
                        if let Some(old) = rt.committed.replace(Committed { chain, share }) {
                            m.previous = Some(old.chain.clone());
                        }
                        rt.next = None;
                        if under == Under::Handshake {
                            rt.handshake = None;
                            rt.handshake_answer = None;
                            m.row.rejoin_until = None;
                            out.push(ControllerAction::Record(Record::HandshakeCompleted {
                                member,
                                node_id: m.row.node_id.clone(),
                                rejoin,
                                at: now,
                            }));
                        }
                        changed = true;
                    }
                }
            }
            // A confirmed step needs no write of its own: the prepared step it
            // came from is durable, and after a restart the node's next message
            // under it confirms it again. (A pass that persists anything writes
            // the whole snapshot, this included.) A completed handshake is rare
            // and written at once.
            if changed && under == Under::Handshake {
                out.push(ControllerAction::PersistMember(Box::new(m.row.clone())));
            }
        }
        m.row.seq_seen = m.replay.top();
        m.last_from = Some(from);
        self.marks_unsaved = true;
        Ok(under)
    }

    /// A member's recorded address moves only on a reply that moved it
    /// forward in the round in progress: an answer to this controller's own
    /// request that the node had not given yet, so not a copy of anything
    /// sent before (a replay after a restart, or a message captured while the
    /// controller was down). Key requests, joins and usage reports are
    /// answered where they came from and move nothing.
    fn move_address(
        &mut self,
        member: u32,
        from: SocketAddr,
        (message, seq): (&'static str, u64),
        now: Time,
        out: &mut Out,
    ) {
        let Some(Some(m)) = self.members.get_mut(member as usize) else {
            return;
        };
        if m.row.addr == from {
            return;
        }
        out.push(ControllerAction::Record(Record::NodeAddressChanged {
            member,
            node_id: m.row.node_id.clone(),
            from: m.row.addr,
            to: from,
            message,
            seq,
            at: now,
        }));
        m.row.addr = from;
        out.push(ControllerAction::PersistMember(Box::new(m.row.clone())));
    }

    /// Takes one token of `member`'s key request / join budget, or refuses.
    fn spend_request(&mut self, what: &'static str, member: u32, now: Time) -> Result<(), Refusal> {
        let (burst, every) = (
            self.cfg.member_request_burst.max(1),
            self.cfg.member_request_interval_ms.max(1),
        );
        let Some(Some(m)) = self.members.get_mut(member as usize) else {
            return Err(Refusal::UnknownMember { what, member });
        };
        // A new member's budget starts full (`u32::MAX` until first spent).
        m.tokens = m.tokens.min(burst);
        if !super::take_token(&mut m.tokens, &mut m.tokens_at, now, burst, every) {
            return Err(Refusal::RateLimited { what, member });
        }
        Ok(())
    }

    fn on_datagram(
        &mut self,
        now: Time,
        from: SocketAddr,
        bytes: &[u8],
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), Refusal> {
        let msg = wire::decode(bytes).map_err(Refusal::Malformed)?;
        let what = msg.name();
        match msg {
            Message::Data(d) => self.on_data(now, from, &d, rng, out),
            Message::Ack(a) => {
                let auth = Auth::new(what, a.member, a.seq, &a.auth, Some(a.share));
                let under = self.authenticate(auth, from, now, out)?;
                let before = self.member(a.member).map(|m| (m.progress, m.row.status));
                if !self.on_ack(now, a.member, a.step, a.epoch, rng, out) {
                    self.send_resync(a.member, under, from, out);
                }
                let after = self.member(a.member).map(|m| (m.progress, m.row.status));
                if let (Some((p0, s0)), Some((p1, s1))) = (before, after) {
                    if p1 > p0 || (s1 == MemberStatus::Active && s0 != s1 && p1 > 0) {
                        self.move_address(a.member, from, (what, a.seq), now, out);
                    }
                }
                Ok(())
            }
            Message::KeyRequest(k) => {
                let auth = Auth::new(what, k.member, k.seq, &k.auth, Some(k.share));
                self.authenticate(auth, from, now, out)?;
                self.spend_request(what, k.member, now)?;
                // The request carries the node's position: it counts as a reply to
                // that step, and may make a stale or new member live again.
                let _ = self.on_ack(now, k.member, k.step, k.epoch, rng, out);
                let Some((share, state)) = self.key_state_for(k.member, rng, out) else {
                    return Ok(());
                };
                let seq = self.next_seq(out);
                let msg = wire::sign(
                    wire::key_response(self.term, seq, k.member, k.seq, &share, &state),
                    &self.signing,
                );
                out.push(ControllerAction::SendTo {
                    to: from,
                    bytes: msg,
                });
                if let Some(m) = self.member(k.member) {
                    Self::record(
                        out,
                        Record::KeyRequestAnswered {
                            member: k.member,
                            node_id: m.row.node_id.clone(),
                            held: k.epoch,
                            epoch: self.current.epoch(),
                            round: self.round.as_ref().map(|r| r.phase),
                            round_epoch: self.round.as_ref().map(|r| r.epoch),
                            at: now,
                        },
                    );
                }
                Ok(())
            }
            Message::HandshakeInit(h) => {
                let member = *self
                    .by_id
                    .get(&h.node_id)
                    .ok_or_else(|| Refusal::UnknownNodeId {
                        node_id: h.node_id.to_string(),
                    })?;
                let Some(Some(m)) = self.members.get_mut(member as usize) else {
                    return Err(Refusal::UnknownMember { what, member });
                };
                // Pinned: after its first completed handshake a node's enrollment
                // is not run again unless the operator allowed it (`keyfleet rejoin`).
                if m.row.ratchet.committed.is_some() && m.row.rejoin_until.is_none_or(|t| now > t) {
                    return Err(Refusal::Pinned {
                        node_id: h.node_id.to_string(),
                    });
                }
                // A retry of the init already answered: the same answer again,
                // without a key agreement (a hash and a send, at most once per
                // HANDSHAKE_RESEND_MS). Its bytes are PSK-authenticated and
                // answered before; a copy replayed by someone else gets bytes
                // only the node's ephemeral secret opens.
                let digest = digest16(bytes);
                if let Some(c) = m
                    .row
                    .ratchet
                    .handshake_answer
                    .as_ref()
                    .filter(|c| c.init == digest && m.row.ratchet.handshake_seq == h.seq)
                {
                    if m.hs_resent
                        .is_some_and(|t| now >= t && now.since(t) < HANDSHAKE_RESEND_MS)
                    {
                        return Err(Refusal::DuplicateRequest {
                            what,
                            seq: h.seq,
                            interval_ms: HANDSHAKE_RESEND_MS,
                        });
                    }
                    let answer = wire::handshake_answer(h.seq, &c.answer);
                    m.hs_resent = Some(now);
                    out.push(ControllerAction::SendTo {
                        to: from,
                        bytes: answer,
                    });
                    return Ok(());
                }
                if m.replay.check(h.seq) != Seen::Fresh
                    || (m.row.ratchet.handshake.is_some() && h.seq <= m.row.ratchet.handshake_seq)
                {
                    return Err(Refusal::Replay { what, seq: h.seq });
                }
                if !super::take_token(
                    &mut m.hs_tokens,
                    &mut m.hs_at,
                    now,
                    HANDSHAKE_BURST,
                    HANDSHAKE_INTERVAL_MS,
                ) {
                    return Err(Refusal::RateLimited { what, member });
                }
                let seq = self.next_seq(out);
                let payload = wire::answer_payload(&AnswerPayload {
                    term: self.term,
                    seq,
                    member,
                    controller_key: self.public_key(),
                    current: self.current.clone(),
                    round: self.round.as_ref().map(|r| (r.phase, r.key.clone())),
                });
                let Some(Some(m)) = self.members.get_mut(member as usize) else {
                    return Err(Refusal::UnknownMember { what, member });
                };
                let (noise, chain) =
                    ratchet::respond(&m.row.keys, h.prologue, &h.noise, &payload, member, rng)
                        .map_err(|_| Refusal::BadMac { what, member })?;
                m.replay.mark(h.seq);
                m.hs_resent = Some(now);
                m.row.ratchet.handshake = Some(chain);
                m.row.ratchet.handshake_seq = h.seq;
                m.row.ratchet.handshake_answer = Some(AnsweredInit {
                    init: digest,
                    answer: noise.clone(),
                });
                out.push(ControllerAction::PersistMember(Box::new(m.row.clone())));
                let node_id = m.row.node_id.clone();
                out.push(ControllerAction::SendTo {
                    to: from,
                    bytes: wire::handshake_answer(h.seq, &noise),
                });
                Self::record(
                    out,
                    Record::JoinAnswered {
                        member,
                        node_id,
                        addr: from,
                        epoch: self.current.epoch(),
                        round_epoch: self.round.as_ref().map(|r| r.epoch),
                        at: now,
                    },
                );
                Ok(())
            }
            Message::UsageReport(u) => {
                let auth = Auth::new(what, u.member, u.seq, &u.auth, None);
                let under = self.authenticate(auth, from, now, out)?;
                let cur = self.current.epoch();
                if let Some(Some(m)) = self.members.get_mut(u.member as usize) {
                    for use_ in u.uses.iter().filter(|x| x.epoch == cur) {
                        // Reports are cumulative: add only what grew (duplicates add nothing).
                        self.total_seals = self
                            .total_seals
                            .saturating_add(use_.seals.saturating_sub(m.seals));
                        self.total_opens = self
                            .total_opens
                            .saturating_add(use_.opens.saturating_sub(m.opens));
                        m.seals = m.seals.max(use_.seals);
                        m.opens = m.opens.max(use_.opens);
                    }
                }
                if self.round.is_none() && self.pending.is_none() {
                    if let Some(reason) = self
                        .cfg
                        .triggers
                        .check_usage(self.total_seals, self.total_opens)
                    {
                        self.fire(now, reason, rng, out);
                    }
                }
                // A stale or never-confirmed node is alive: tell it to catch up.
                if self
                    .member(u.member)
                    .is_some_and(|m| m.row.status != MemberStatus::Active)
                {
                    self.send_resync(u.member, under, from, out);
                }
                Ok(())
            }
            Message::KeyUpdate(_)
            | Message::Transition(_)
            | Message::KeyResponse(_)
            | Message::HandshakeAnswer(_)
            | Message::Resync(_)
            | Message::Beacon(_) => Err(Refusal::Unexpected {
                what,
                role: "controller",
            }),
        }
    }

    /// Group data, by the nodes' rule ([`DataReplay`]): it must open under a
    /// key some node may still hold (the current key, the round's, the one
    /// the last round retired) and be fresh for its (epoch, sender); only
    /// then does it move replay state. Fresh data from a member at its
    /// recorded address (or where its latest fresh message came from) is its
    /// own; any other fresh data that opens means the key leaked (claim 7).
    /// So every message a node would deliver is either a member's own or sets
    /// off the leak rekey: nothing the nodes deliver is refused here.
    fn on_data(
        &mut self,
        now: Time,
        from: SocketAddr,
        d: &wire::Data<'_>,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), Refusal> {
        let keys = [
            Some(&self.current),
            self.round.as_ref().map(|r| &r.key),
            self.previous.as_ref(),
        ];
        let held: Vec<Epoch> = keys.iter().flatten().map(|k| k.epoch()).collect();
        let opened = keys
            .into_iter()
            .flatten()
            .filter(|k| d.epoch_hint.is_none_or(|e| e == k.epoch()))
            .find(|k| k.open(&d.nonce, d.header, d.sealed).is_some())
            .map(GroupKey::epoch);
        let Some(epoch) = opened else {
            return Err(Refusal::ForgedData {
                sender: d.sender,
                from: from.to_string(),
            });
        };
        self.data_replay.retain(|e| held.contains(&e));
        // Under the key the last round retired only nodes left behind (stale,
        // or a removed node) still open data: recorded, no round (a new key
        // would not reach those nodes either).
        if self.previous.as_ref().is_some_and(|k| k.epoch() == epoch) {
            let own = self.member(d.sender).is_some_and(|m| m.row.addr == from);
            if !own {
                return Err(Refusal::RetiredKey {
                    sender: d.sender,
                    epoch,
                    from: from.to_string(),
                });
            }
            return Ok(());
        }
        // A member's own message heard again (from anywhere) is a replay
        // (the sequence number is authenticated as associated data), not a
        // leak: otherwise any host could make the fleet rekey at will.
        if self.data_replay.check(epoch, d.sender, d.seq) == DataSeen::Replay {
            return Err(Refusal::Replay {
                what: "data",
                seq: d.seq,
            });
        }
        self.data_replay.mark(epoch, d.sender, d.seq);
        let own = self
            .member(d.sender)
            .is_some_and(|m| m.row.addr == from || m.last_from == Some(from));
        if own {
            return Ok(());
        }
        if self.cfg.triggers.on_unknown_sender {
            self.fire(
                now,
                TriggerReason::UnknownSender {
                    member: d.sender,
                    from: from.to_string(),
                },
                rng,
                out,
            );
        }
        Ok(())
    }

    /// A reply (or a key request's position) from `member`. Returns false when
    /// a member left out of the round replied with a position that does not let
    /// it back in (it should ask for the current key).
    fn on_ack(
        &mut self,
        now: Time,
        member: u32,
        step: Step,
        epoch: Epoch,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> bool {
        let q = step.progress();
        let current = self.current.epoch();
        let round = self.round.as_ref().map(|r| (r.epoch, r.phase));
        let Some(m) = self.member(member) else {
            return true;
        };
        let status = m.row.status;
        if status == MemberStatus::Active {
            let Some((re, _)) = round else { return true };
            if epoch != re {
                return true;
            }
            let was = self.is_waiting(member);
            let Some(Some(m)) = self.members.get_mut(member as usize) else {
                return true;
            };
            if q > m.progress {
                m.progress = q;
                let node_id = m.row.node_id.clone();
                out.push(ControllerAction::Record(Record::NodeAcked {
                    epoch,
                    member,
                    node_id: node_id.clone(),
                    step,
                    at: now,
                }));
                self.resume(now, ResumeCause::Answer { member, node_id }, out);
            }
            if was && !self.is_waiting(member) {
                if let Some(r) = &mut self.round {
                    r.waiting = r.waiting.saturating_sub(1);
                }
                self.progress_round(now, rng, out);
            }
            return true;
        }
        // Enrolled or stale: counted live once the reply shows the keys the phase needs.
        let progress = match round {
            Some((re, phase)) if epoch == re && q >= required_progress(phase) => q,
            Some((_, RoundPhase::Distributing)) if epoch == current && q == 3 => 0,
            None if epoch == current && q == 3 => 0,
            _ => return false,
        };
        let Some(Some(m)) = self.members.get_mut(member as usize) else {
            return true;
        };
        m.row.status = MemberStatus::Active;
        m.progress = progress;
        m.attempts = 0;
        let node_id = m.row.node_id.clone();
        out.push(ControllerAction::PersistMember(Box::new(m.row.clone())));
        out.push(ControllerAction::Record(Record::StatusChanged {
            member,
            node_id: node_id.clone(),
            from: status,
            to: MemberStatus::Active,
            epoch,
            at: now,
        }));
        if round.is_some() {
            self.resume(now, ResumeCause::Answer { member, node_id }, out);
        }
        if self.is_waiting(member) {
            if let Some(r) = &mut self.round {
                r.waiting += 1;
                r.retries.push(Reverse((now, member)));
            }
        }
        self.arm_round_timer(out);
        true
    }

    /// Ask a member that is out of step (its message came from `to`) to send a
    /// key request (MAC'd under the chain its last message was MAC'd with).
    fn send_resync(&mut self, member: u32, under: Under, to: SocketAddr, out: &mut Out) {
        let seq = self.next_seq(out);
        let epoch = self.current.epoch();
        let Some(m) = self.member(member) else { return };
        let Some(chain) = m.row.ratchet.chain(under) else {
            return;
        };
        let bytes = wire::mac(wire::resync(self.term, epoch, seq, member), chain);
        out.push(ControllerAction::SendTo { to, bytes });
    }
}

impl Member {
    fn new(row: MemberPersist) -> Member {
        Member {
            hs_tokens: HANDSHAKE_BURST,
            hs_at: Time(0),
            hs_resent: None,
            previous: None,
            progress: 0,
            attempts: 0,
            replay: row
                .seq_seen
                .map_or_else(ReplayWindow::default, ReplayWindow::above),
            row,
            last_from: None,
            tokens: u32::MAX,
            tokens_at: Time(0),
            seals: 0,
            opens: 0,
        }
    }
}

/// Triggers that what nodes send can set off (usage counts, data from an
/// unknown sender): their rounds are spaced by `node_trigger_min_interval_ms`.
fn node_caused(r: &TriggerReason) -> bool {
    matches!(
        r,
        TriggerReason::Encryptions { .. }
            | TriggerReason::Decryptions { .. }
            | TriggerReason::Total { .. }
            | TriggerReason::UnknownSender { .. }
    )
}
