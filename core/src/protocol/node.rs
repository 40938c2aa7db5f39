//! The node side: [`NodeMachine`], the three node states of SPEC §1 and the
//! key request of SPEC §5.
//!
//! | state | seals with | opens with |
//! |---|---|---|
//! | `UpdateCompleted` | current | current |
//! | `DistributionCompleted` | **old** | old or new |
//! | `InTransit` | **new** | old or new |
//!
//! A node's *position* is `(epoch, step)`, the last step of that epoch's
//! round it took: `UpdateCompleted(c)` is `(c, SecondTransition)`,
//! `DistributionCompleted(o, n)` is `(n, KeyUpdate)`, `InTransit(o, n)` is
//! `(n, FirstTransition)` (the steps' progress numbers 3, 1, 2 below). A
//! controller request for step `m` of epoch `E` moves the node only forward:
//!
//! - `E` older than the node's epoch → refused (`StaleEpoch`);
//! - `E` = the node's epoch: `m` below its progress → `Outdated` (ignored);
//!   `m` equal → a duplicate: the reply is sent again (the first may have been
//!   lost); `m` above → the node moves forward and replies. A second transition
//!   request reaching a node still in `DistributionCompleted` (possible only for
//!   a node the controller had left out as stale) takes it through `InTransit` to
//!   `UpdateCompleted`: every live node already seals with the new key and the
//!   drain grace has passed, so holding on to the old key protects nothing.
//! - `E` = the node's epoch + 1 while `UpdateCompleted`: a key update installs
//!   the new key (`DistributionCompleted`); a transition request means the node
//!   missed the key, so it refuses (`MissingKey`) and asks for the current key;
//! - anything further ahead → `EpochGap`: it asks for the current key.
//!
//! Signatures are checked last (SECURITY.md §2a): a request that could not
//! move the node (older epoch or step), a duplicate of the step already taken
//! within [`DUPLICATE_ANSWER_INTERVAL_MS`] of the last answer, a gap while the
//! node already asks for the key, and a datagram whose signature failed
//! recently are refused without one; the rest spend a budget
//! ([`VERIFY_BURST`], [`VERIFY_EVERY_MS`]). Group data is checked against a
//! replay window per (epoch, sender) ([`DataReplay`]), dropped with the key.
//!
//! A *resync request* (MAC'd by the controller with the node's key, sent when
//! a stale node reports usage or replies out of step) makes it ask too.
//!
//! A node joins by the enrollment handshake (Noise `NNpsk0` under the PSK
//! from its initial key, [`crate::crypto::ratchet`]); every key it receives
//! afterwards comes under a ratchet step it takes (and persists) before it
//! answers: a key update entry for the epoch after its own, or a key
//! response. It announces its share in every reply and key request, and MACs
//! its messages under its chain. A duplicate request takes no step.
//!
//! **Beacons.** The controller's signed beacon (every second by default) tells
//! where the fleet is. A node that finds itself behind it by more than the one
//! step a round's retries cover ([`behind_beacon`]: an epoch it does not hold,
//! a round it is not taking part in, a round that went on or ended without it)
//! sends its key request at once and holds its data until answered. One that
//! hears a beacon after `beacon_silence_ms` without any asks too, without
//! holding (a replayed beacon must not silence a node while the controller is
//! away), at a random moment within that period and at most once a minute
//! (a controller back from an outage is not met by the whole fleet at once). Beacons are cheap: a byte-identical copy of the last verified one is
//! recognised by its digest; one that would change nothing (neither the node's
//! position nor the controller address it answers to) is not verified at
//! all; one ordered below the last verified `(term, seq)` is a replay; and at
//! most [`BEACON_VERIFY_BURST`] signature checks, refilled one per
//! [`BEACON_VERIFY_REFILL_MS`], go to beacons that need one.
//!
//! **Answers by unicast.** Replies, key requests and usage reports go to the
//! controller's unicast address once the node learned it from an
//! authenticated controller message (a verified beacon's address, a fresh
//! request's source), not to the whole group (`route.rs`).
//!
//! An enrolled node that has not joined yet cannot check a beacon (the join
//! accept brings the controller's key), but one tells it a controller is
//! there: its join goes out within [`BEACON_JOIN_SPREAD_MS`] instead of at
//! its next backed-off retry (at most once per [`BEACON_JOIN_MIN_GAP_MS`]).
//!
//! A link that goes down or up (the agent watches rtnetlink) is fed as
//! [`NodeInput::LinkDown`] / [`NodeInput::LinkUp`]: either way the node holds
//! its data and asks for the current key.
//!
//! The controller's answer to a key request (or a handshake) puts the node in the
//! state of the round as the controller sees it, but never behind its position.
//! After a link-up or a restart the node *holds* application data (bounded
//! queue) until that answer arrives, so it never seals with a key the fleet
//! has already dropped. While it waits, group data sealed under a key newer
//! than any it holds (a node back after missing rounds) is kept too (bounded,
//! the same limit) and opened once the answer brings the key, so that data
//! does not become undecryptable for it.

use super::{backoff, Refusal, Time};
use crate::crypto::ratchet::{Initiator, HANDSHAKE_INIT_LEN};
use crate::crypto::{
    self, digest16, verify, Chain, Epoch, GroupKey, InitialKey, KeyPhase, Keyring, NodeKeys,
    OpenError, Share, ShareSecret, REVEAL_LEN,
};
use crate::wire::{
    self, DataReplay, DataSeen, Message, NodeId, ReplayVerdict, ReplayWindow, RoundPhase, Signed,
    Step,
};
use core::net::SocketAddr;
use ed25519_dalek::VerifyingKey;
use rand::SeedableRng;
use rand::{CryptoRng, RngCore};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use thiserror::Error;

/// Sequence numbers are reserved in blocks so that a restart never reuses one
/// without persisting on every message.
const SEQ_BLOCK: u64 = 1024;

/// A request for the step a node has already taken (a retransmission, or a
/// replayed copy) is answered at most once in this many ms: a flood of copies
/// costs the fleet a few replies, not one per copy (and no state write).
pub const DUPLICATE_ANSWER_INTERVAL_MS: u64 = 100;

/// Signature checks a node spends on unsolicited controller requests: a
/// burst of this many…
pub const VERIFY_BURST: u32 = 64;
/// …then one per this many ms (200 a second, about 1 % of a core): a flood of
/// forged requests that pass every cheap check is refused unchecked beyond
/// that (`verify_budget`); the controller's retries, and the key request
/// (whose solicited answer is always checked), get a node through it.
pub const VERIFY_EVERY_MS: u64 = 5;

/// Data kept while syncing may name an epoch at most this far ahead.
const AHEAD_EPOCHS: u32 = 16;

/// Digests of datagrams whose controller signature failed, remembered so that
/// the same forged datagram again costs a hash, not a signature check.
const FAILED_SIGNATURES_KEPT: usize = 64;
/// Digests of datagrams whose signature verified (retransmissions skip the check).
const VERIFIED_KEPT: usize = 8;

/// A node asks after a silence at most this often (ms), so that a controller
/// that comes back, or one slowed by load, is not met by every node at once.
pub const SILENCE_NUDGE_MIN_GAP_MS: u64 = 60_000;

/// An unjoined node that hears a beacon sends its join within this many ms…
pub const BEACON_JOIN_SPREAD_MS: u64 = 250;
/// …at most once per this many ms (then its retries start again at
/// `sync_retry_initial_ms`): a flood of beacons, which an unjoined node
/// cannot check, makes it send about 5 joins in 10 s instead of 1 in 8 s.
pub const BEACON_JOIN_MIN_GAP_MS: u64 = 10_000;

/// Beacon signature checks a node may spend at once…
pub const BEACON_VERIFY_BURST: u32 = 8;
/// …and one more each this many ms (10 a second): a flood of forged beacons
/// costs a node at most that many Ed25519 checks.
pub const BEACON_VERIFY_REFILL_MS: u64 = 100;

/// Node settings. Defaults are documented on each field.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Where joins, key requests, replies and usage reports go. A multicast
    /// address (the agent's default: the group) means "the group until the
    /// controller's unicast address is learned from an authenticated
    /// controller message, then that address, the group as a fallback"
    /// (`route.rs`); a unicast address is used as it is.
    pub controller: SocketAddr,
    /// First key-request retry after this many ms (default 500), doubling…;
    /// also the least time between two requests (joins and key requests),
    /// whatever asks for them, but a link change: keep it at or above the
    /// controller's `member_request_interval_ms` (default 500).
    pub sync_retry_initial_ms: u64,
    /// …up to this many ms (default 8000), with ±25 % jitter.
    pub sync_retry_max_ms: u64,
    /// Send a usage report this often (default every 60 s); `None` = never.
    pub usage_interval_ms: Option<u64>,
    /// Application messages held while (re)joining (default 64); more are dropped.
    pub max_queued: usize,
    /// Senders whose data sequence numbers are remembered per epoch to drop
    /// replays (default 16384; 16 bytes each, forgotten with the epoch's key).
    /// Data from further senders in an epoch is refused (`too_many_senders`)
    /// until the next key: no window is ever evicted, so no replay becomes fresh.
    pub data_replay_senders: usize,
    /// Put the epoch in the data header (default true); without it receivers
    /// try their keys in turn (claims 14–16).
    pub epoch_hint: bool,
    /// A beacon heard after this many ms without one makes the node ask for
    /// the current key (default 10000, ten beacon intervals: at 30 % loss
    /// three missed beacons in a row happen to one node in forty every three
    /// seconds, and a 2,000-node simulation at 30 % loss then never settled;
    /// ten in a row happen once in 170,000); 0 = never.
    pub beacon_silence_ms: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            controller: SocketAddr::from(([127, 0, 0, 1], 47800)),
            sync_retry_initial_ms: 500,
            sync_retry_max_ms: 8000,
            usage_interval_ms: Some(60_000),
            max_queued: 64,
            data_replay_senders: 16_384,
            epoch_hint: true,
            beacon_silence_ms: 10_000,
        }
    }
}

/// What a shell feeds a node.
#[derive(Clone, Copy, Debug)]
pub enum NodeInput<'a> {
    /// A datagram and its source address as the shell saw it, handled as it
    /// arrived.
    Datagram { from: SocketAddr, bytes: &'a [u8] },
    /// A datagram that waited `waited_us` µs between its arrival (its
    /// socket's receive timestamp) and this call: queued behind other work
    /// on the node, not in flight. A timed first transition reply says so
    /// (the controller's drain measures only the network's part of the
    /// round trip).
    DatagramWaited {
        from: SocketAddr,
        bytes: &'a [u8],
        waited_us: u32,
    },
    /// The deadline [`NodeMachine::poll_timeout`] gave has passed (or any
    /// later moment): the machine does what is due (a retried join or key
    /// request, a usage report) and has a new deadline.
    Timeout,
    /// Application plaintext to send to the group.
    Send(&'a [u8]),
    /// The node went from unable to able to communicate (link up, controller
    /// reachable again, process (re)started): ask for the current key (SPEC §5).
    LinkUp,
    /// A link the node uses went down (or lost its address): hold outgoing
    /// data (it could not go out) and ask for the current key; the request may
    /// not get out, and [`NodeInput::LinkUp`] asks again at once.
    LinkDown,
}

/// What a node did with the beacons it received (counts since start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BeaconStats {
    pub received: u64,
    /// Byte-identical to the last verified beacon: accepted on its digest.
    pub digest_hits: u64,
    /// Would change nothing for this node: not verified.
    pub skipped: u64,
    /// Signatures checked and found good.
    pub verified: u64,
    /// Signatures checked and found bad.
    pub forged: u64,
    /// Ordered below the last verified beacon: a replay.
    pub replays: u64,
    /// Another beacon under the last verified beacon's sequence number:
    /// bytes that cannot be the controller's, refused without a signature
    /// check.
    pub reused: u64,
    /// Needed a signature check when none was left in the budget: ignored.
    pub over_budget: u64,
    /// Key requests the beacons started.
    pub syncs: u64,
}

/// Whether a node at `pos` is behind what a beacon says by more than the one
/// step a round's own retries cover, so that it must ask for the current key.
///
/// | beacon | the node must be at least at |
/// |---|---|
/// | epoch `c`, no round | `(c, 3)`: `UpdateCompleted(c)` |
/// | round `r` distributing | `(c, 3)` (the key update is retried to it) |
/// | round `r` first transition, draining | `(r, 1)`: holds the new key |
/// | round `r` second transition | `(r, 2)`: seals with the new key |
pub fn behind_beacon(
    pos: Option<(Epoch, Step)>,
    epoch: Epoch,
    round: Option<(Epoch, RoundPhase)>,
) -> bool {
    let Some(pos) = pos else { return false };
    let least = match round {
        None | Some((_, RoundPhase::Distributing)) => (epoch, Step::SecondTransition),
        Some((r, RoundPhase::FirstTransition | RoundPhase::Draining)) => (r, Step::KeyUpdate),
        Some((r, RoundPhase::SecondTransition)) => (r, Step::FirstTransition),
    };
    pos < least
}

/// A decrypted group message for the application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    pub sender: u32,
    pub seq: u64,
    pub epoch: Epoch,
    /// Keys tried because the sender left out the epoch hint (0 with a hint).
    pub trials: u8,
    pub plaintext: Vec<u8>,
}

/// Something the shell may log; no action needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeEvent {
    StateChanged {
        from: NodeState,
        to: NodeState,
    },
    Refused {
        from: SocketAddr,
        reason: Refusal,
    },
    /// The controller's key state was adopted; held data is sent now.
    Synced {
        state: NodeState,
    },
    /// Application data dropped because the hold queue was full.
    QueueFull,
    /// Authentic data whose sequence number jumps far past the sender's
    /// highest in the epoch: someone holding the group key may be trying to
    /// silence that member (it is delivered; the window moved; the next
    /// epoch starts afresh).
    SeqJump {
        from: SocketAddr,
        sender: u32,
        epoch: Epoch,
        last: u64,
        seq: u64,
    },
}

/// What a node asks its shell to do, in order.
#[derive(Clone, Debug)]
pub enum NodeAction {
    /// Send to the group. `data_epoch` names the key a data message was sealed with.
    SendGroup {
        bytes: Vec<u8>,
        data_epoch: Option<Epoch>,
    },
    /// Send to one peer (the controller).
    SendTo {
        to: SocketAddr,
        bytes: Vec<u8>,
    },
    /// Store this snapshot durably (owner-only, flushed to the disk) before
    /// carrying out what follows.
    Persist(Box<NodePersist>),
    /// Store this snapshot before carrying out what follows, so that a
    /// restarted process finds it, without waiting for the disk: a power
    /// loss may take it back to the last [`NodeAction::Persist`]. Used for
    /// the two transitions, and for a key update whose ratchet step the
    /// disk can derive (the share announced ahead was flushed with the
    /// chain and share secret it steps: [`Announced`]). S1/S2 do not need
    /// them on disk before the reply: a node that comes back behind what it
    /// confirmed holds its application data and asks for the key state (as
    /// after any restart); the controller answers a key request one step
    /// late under the chain it holds, the node opens the answer under the
    /// step it derives, and the answer brings it to the round's position
    /// (ARCHITECTURE.md, "What is durable before a reply").
    Checkpoint(Box<NodePersist>),
    Deliver(Delivered),
    Event(NodeEvent),
}

/// A node's key state as SPEC §1 names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeState {
    /// Enrolled but not yet joined: no group key.
    Unjoined,
    UpdateCompleted {
        current: Epoch,
    },
    DistributionCompleted {
        old: Epoch,
        new: Epoch,
    },
    InTransit {
        old: Epoch,
        new: Epoch,
    },
}

/// Everything a node needs to resume after a restart. Key bytes are zeroized on drop.
#[derive(Clone, Serialize, Deserialize)]
pub struct NodePersist {
    pub node_id: NodeId,
    keys: NodeKeys,
    joined: Option<JoinedPersist>,
    keyring: Option<Keyring>,
    /// Sequence numbers below this may have been used; a restored node starts above it.
    pub seq_reserved: u64,
    /// The highest leader term this node has accepted a controller message
    /// of (0: none yet, as in a state file written before terms).
    #[serde(default)]
    pub term: u32,
    /// The ratchet (wire revision 2); absent in a revision-1 file, whose node
    /// runs the enrollment handshake at its next join.
    #[serde(default)]
    ratchet: Option<NodeRatchet>,
    /// The share a verified round notice announced for the next round, with
    /// the ratchet it steps (see [`Announced`]); absent before session 13.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    announced: Option<Announced>,
}

/// What a verified round notice announced: the controller's share (public)
/// for the round after `epoch` under leader `term`, and the node's own share
/// it was checked against. Flushed with the ratchet it steps, it makes the
/// round's key update step re-derivable from the disk alone (the chain and
/// share secret on it, the announced share), so the key update is only
/// checkpointed before its reply: after a power loss the node derives the
/// step again and asks the controller under it (ARCHITECTURE.md, "What is
/// durable before a reply"). It holds no secret: a copy of the state file
/// opens the same next step with or without it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct Announced {
    term: u32,
    epoch: Epoch,
    share: Share,
    own: Share,
}

/// A node's ratchet: its chain (whose MAC key authenticates its messages)
/// and the secret of the share it announces for its next step.
#[derive(Clone, Serialize, Deserialize)]
pub struct NodeRatchet {
    chain: Chain,
    secret: ShareSecret,
}

impl NodeRatchet {
    fn share(&self) -> Share {
        self.secret.public()
    }

    /// The step the controller's `share` makes with this node's share.
    fn step(&self, member: u32, share: &Share) -> Option<crate::crypto::Step> {
        let dh = self.secret.dh(share)?;
        self.step_from(member, share, &dh)
    }

    /// The same step from the X25519 of this node's share secret with
    /// `share`, made ahead (`prepare.rs`).
    fn step_from(&self, member: u32, share: &Share, dh: &[u8; 32]) -> Option<crate::crypto::Step> {
        Some(crate::crypto::Step::derive(
            &self.chain,
            dh,
            member,
            share,
            &self.share(),
        ))
    }
}

impl NodePersist {
    /// The epoch after which the announced share's round comes (tests only).
    #[cfg(test)]
    pub(crate) fn announced_epoch(&self) -> Option<Epoch> {
        self.announced.map(|a| a.epoch)
    }
}

impl std::fmt::Debug for NodePersist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodePersist")
            .field("node_id", &self.node_id)
            .field("joined", &self.joined.as_ref().map(|j| j.member))
            .field("keyring", &self.keyring)
            .finish()
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct JoinedPersist {
    member: u32,
    controller_key: [u8; 32],
}

/// Why a persisted snapshot cannot be restored.
#[derive(Debug, Error)]
pub enum NodeRestoreError {
    #[error("the stored controller public key is not a valid Ed25519 key; re-enroll the node")]
    ControllerKey,
}

#[derive(Clone, Debug)]
struct Joined {
    member: u32,
    controller: VerifyingKey,
}

/// Why a node asks the controller for the current key, which decides how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ask {
    /// Its link changed (or it started): hold outgoing data and ask at once,
    /// even if a request went out just before.
    LinkChanged,
    /// A beacon shows it behind: hold outgoing data until answered.
    Behind,
    /// Out of step with a controller message (a gap, a missing key, a resync
    /// request): ask; its data keeps flowing.
    OutOfStep,
}

#[derive(Clone, Copy, Debug, Hash)]
struct Sync {
    /// Answers must reply to a request with at least this sequence number.
    since: u64,
    attempt: u32,
    due: Time,
    /// Hold application data until the answer (after link-up / restart / join).
    hold: bool,
}

/// Sends of one handshake init before the node starts a fresh one.
pub const HANDSHAKE_SENDS: u32 = 8;

/// The enrollment handshake in flight (memory only: a restarted node starts a
/// new one). Every retry resends the same bytes; the seed rebuilds the Noise
/// initiator (its ephemeral key) when the answer comes, so nothing but a seed
/// and the datagram is kept.
#[derive(Clone)]
struct Handshake {
    seq: u64,
    seed: zeroize::Zeroizing<[u8; 32]>,
    bytes: Vec<u8>,
    sent: u32,
}

impl Handshake {
    fn start(
        keys: &NodeKeys,
        node_id: &NodeId,
        seq: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Handshake, crate::crypto::ratchet::HandshakeError> {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        let mut bytes = wire::handshake_init_header(seq, node_id);
        let (_, msg) = Initiator::start(keys, &bytes, &mut ChaCha20Rng::from_seed(*seed))?;
        bytes.extend_from_slice(&msg);
        Ok(Handshake {
            seq,
            seed,
            bytes,
            sent: 0,
        })
    }

    /// The initiator that sent `bytes`, rebuilt from its seed.
    fn initiator(
        &self,
        keys: &NodeKeys,
    ) -> Result<Initiator, crate::crypto::ratchet::HandshakeError> {
        let prologue = &self.bytes[..self.bytes.len() - HANDSHAKE_INIT_LEN];
        Initiator::start(keys, prologue, &mut ChaCha20Rng::from_seed(*self.seed))
            .map(|(ini, _)| ini)
    }
}

/// The node agent's protocol state. See the module docs for its rules.
///
/// `Clone` and `Hash` (in `node/state_hash.rs`) let a model checker keep
/// machine states and tell them apart (tests/protocol/model_check.rs).
#[derive(Clone)]
pub struct NodeMachine {
    cfg: NodeConfig,
    node_id: NodeId,
    keys: NodeKeys,
    joined: Option<Joined>,
    keyring: Option<Keyring>,
    seq: u64,
    seq_reserved: u64,
    /// The highest leader term accepted (persisted); controller messages of
    /// a lower term are refused (`stale_term`).
    term: u32,
    /// Controller sequence numbers seen in `term` (each term counts its own).
    ctl_replay: ReplayWindow,
    ratchet: Option<NodeRatchet>,
    /// The enrollment handshake in flight (memory only).
    handshake: Option<Handshake>,
    /// Digests of recently verified controller messages (retransmissions).
    verified: VecDeque<[u8; 16]>,
    /// Digests of recent datagrams whose signature failed.
    failed: VecDeque<[u8; 16]>,
    /// When a request for a step already taken was last answered.
    last_reanswer: Option<Time>,
    /// When a request skipping ahead was last let through to a signature check.
    last_gap: Option<Time>,
    /// Signature budget: checks left and when they were counted.
    verify_tokens: u32,
    verify_at: Time,
    signature_checks: u64,
    /// The round's transition chain commitment from the last verified key
    /// update request: (term, epoch, commitment), memory only. The round's
    /// transition requests are checked by their reveals against it
    /// ([`crate::crypto::reveal_holds`]); without it, by their signatures.
    commit: Option<(u32, Epoch, [u8; REVEAL_LEN])>,
    /// Transition requests taken by their reveal (not persisted).
    reveal_checks: u64,
    /// Usage reports sent since the machine was made (not persisted).
    usage_reports: u64,
    sync: Option<Sync>,
    /// When the last join or key request went out: the next one waits at
    /// least `sync_retry_initial_ms` after it (a link change excepted), so a
    /// node stays within the controller's per-member budget (by default a
    /// burst of 4, then one per 500 ms) however many triggers arrive.
    last_request: Option<Time>,
    queued: Vec<Vec<u8>>,
    /// Group data for an epoch ahead of this node's, received while it asks
    /// the controller for the current key: (sender address, datagram).
    ahead: Vec<(SocketAddr, Vec<u8>)>,
    data_replay: DataReplay,
    usage_due: Option<Time>,
    /// `(term, seq)` of the last verified beacon, and the digest of its bytes.
    beacon_best: (u32, u64),
    beacon_digest: [u8; 16],
    /// When the last beacon (verified or not) arrived, for the silence rule.
    beacon_arrival: Option<Time>,
    /// Signature checks left for beacons, and when the next one is added.
    beacon_tokens: u32,
    beacon_refill: Time,
    beacon_stats: BeaconStats,
    /// When a beacon after a silence last made the node ask.
    last_nudge: Option<Time>,
    /// The controller's unicast address, once learned ([`route`]).
    route: Route,
    /// When a beacon last brought an unjoined node's join forward.
    beacon_join: Option<Time>,
    /// The controller's (leader term, sequence number) on the answer that
    /// last synced this node ((0, 0): none since start). A resync request
    /// ordered below it was sent before that answer, while the controller
    /// still counted the node out of step: the answer settled it, so the
    /// request is obsolete. (Each term numbers its own messages.)
    synced_by: (u32, u64),
    /// The next step's X25519 made ahead from a share notice, and the next
    /// share secret drawn ahead (`prepare.rs`; memory only).
    prepared: prepare::Prepared,
    /// The last round notice taken, for the ratchet in place (cleared when
    /// the ratchet moves); written into every snapshot.
    announced: Option<Announced>,
    /// What the last flushed snapshot (`Persist`) holds of it: what a power
    /// loss comes back to. A key update that steps from exactly that is
    /// checkpointed, not flushed.
    durable_announced: Option<Announced>,
    /// Restored from a snapshot holding an announced share for this very
    /// position: the node may have taken (and confirmed) that round's key
    /// update before a power loss took its checkpoint. It asks under its
    /// chain as ever; a controller that holds the step already answers under
    /// it (a key request one step late), so a key response is opened under
    /// either.
    maybe_stepped: bool,
}

/// A key update request's key for [`NodeMachine::on_step`], and whether
/// taking it must be flushed before the reply: not when its ratchet step is
/// re-derivable from what is on the disk ([`Announced`]).
struct Install {
    key: GroupKey,
    flush: bool,
}

type Out = Vec<NodeAction>;

mod prepare;
mod route;
mod state_hash;

pub use prepare::{PrepareStats, NOTICE_VERIFY_BURST, NOTICE_VERIFY_REFILL_MS};

use route::Route;

impl NodeMachine {
    /// A freshly enrolled node that has not joined yet.
    pub fn new(node_id: NodeId, initial_key: &InitialKey, cfg: NodeConfig) -> NodeMachine {
        NodeMachine::build(cfg, node_id, NodeKeys::derive(initial_key), None, None, 0)
    }

    /// Resume from a snapshot; feed [`NodeInput::LinkUp`] next (it asks for the
    /// current key; application data is held until the answer).
    pub fn restore(p: &NodePersist, cfg: NodeConfig) -> Result<NodeMachine, NodeRestoreError> {
        let joined = match &p.joined {
            None => None,
            Some(j) => Some(Joined {
                member: j.member,
                controller: VerifyingKey::from_bytes(&j.controller_key)
                    .map_err(|_| NodeRestoreError::ControllerKey)?,
            }),
        };
        let mut n = NodeMachine::build(
            cfg,
            p.node_id.clone(),
            p.keys.clone(),
            joined,
            p.keyring.clone(),
            p.seq_reserved,
        );
        n.term = p.term;
        n.ratchet = p.ratchet.clone();
        // What a snapshot holds was on the disk (or as good as: a restarted
        // process reads a checkpoint the page cache kept).
        n.announced = p.announced;
        n.durable_announced = p.announced;
        n.maybe_stepped = p.announced.is_some_and(|a| n.lost_step_of(&a).is_some());
        // After a restart the node holds data until the controller confirms its state.
        n.sync = Some(Sync {
            since: n.seq + 1,
            attempt: 0,
            due: Time::MAX,
            hold: true,
        });
        Ok(n)
    }

    fn build(
        cfg: NodeConfig,
        node_id: NodeId,
        keys: NodeKeys,
        joined: Option<Joined>,
        keyring: Option<Keyring>,
        seq: u64,
    ) -> NodeMachine {
        NodeMachine {
            node_id,
            keys,
            joined,
            keyring,
            seq,
            seq_reserved: seq,
            term: 0,
            ctl_replay: ReplayWindow::default(),
            ratchet: None,
            handshake: None,
            verified: VecDeque::new(),
            failed: VecDeque::new(),
            last_reanswer: None,
            last_gap: None,
            verify_tokens: VERIFY_BURST,
            verify_at: Time(0),
            signature_checks: 0,
            commit: None,
            reveal_checks: 0,
            usage_reports: 0,
            sync: None,
            last_request: None,
            queued: Vec::new(),
            ahead: Vec::new(),
            data_replay: DataReplay::new(cfg.data_replay_senders),
            usage_due: None,
            beacon_best: (0, 0),
            beacon_digest: [0; 16],
            beacon_arrival: None,
            beacon_tokens: BEACON_VERIFY_BURST,
            beacon_refill: Time(0),
            beacon_stats: BeaconStats::default(),
            last_nudge: None,
            route: Route::default(),
            beacon_join: None,
            synced_by: (0, 0),
            prepared: prepare::Prepared::new(),
            announced: None,
            durable_announced: None,
            maybe_stepped: false,
            cfg,
        }
    }

    /// What this node did with the beacons it received.
    pub fn beacon_stats(&self) -> BeaconStats {
        self.beacon_stats
    }

    /// The snapshot a `Persist` action carries.
    pub fn snapshot(&self) -> NodePersist {
        NodePersist {
            node_id: self.node_id.clone(),
            keys: self.keys.clone(),
            joined: self.joined.as_ref().map(|j| JoinedPersist {
                member: j.member,
                controller_key: j.controller.to_bytes(),
            }),
            keyring: self.keyring.clone(),
            seq_reserved: self.seq_reserved,
            term: self.term,
            ratchet: self.ratchet.clone(),
            announced: self.announced,
        }
    }

    /// The highest leader term this node has accepted a controller message of.
    pub fn term(&self) -> u32 {
        self.term
    }

    /// The chain and share a controller mirrors (tests only).
    #[cfg(test)]
    pub(crate) fn ratchet_view(&self) -> Option<(Chain, Share)> {
        self.ratchet.as_ref().map(|r| (r.chain.clone(), r.share()))
    }

    /// The chain and share secret, as a copy of the state file holds them (tests only).
    #[cfg(test)]
    pub(crate) fn ratchet_copy(&self) -> Option<(Chain, ShareSecret)> {
        self.ratchet
            .as_ref()
            .map(|r| (r.chain.clone(), r.secret.clone()))
    }

    /// Whether the node holds a ratchet chain (it ran the enrollment handshake).
    pub fn has_ratchet(&self) -> bool {
        self.ratchet.is_some()
    }

    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    /// The member number the controller assigned at join.
    pub fn member(&self) -> Option<u32> {
        self.joined.as_ref().map(|j| j.member)
    }

    pub fn state(&self) -> NodeState {
        match &self.keyring {
            None => NodeState::Unjoined,
            Some(r) => match (r.phase(), r.epochs()) {
                (KeyPhase::DistributionCompleted, (old, Some(new))) => {
                    NodeState::DistributionCompleted { old, new }
                }
                (KeyPhase::InTransit, (old, Some(new))) => NodeState::InTransit { old, new },
                (_, (current, _)) => NodeState::UpdateCompleted { current },
            },
        }
    }

    /// The epoch and the last step of its round the node took (a node in
    /// `UpdateCompleted` took the second transition); only ever grows. `None`
    /// before the first join.
    pub fn position(&self) -> Option<(Epoch, Step)> {
        match self.state() {
            NodeState::Unjoined => None,
            NodeState::UpdateCompleted { current } => Some((current, Step::SecondTransition)),
            NodeState::DistributionCompleted { new, .. } => Some((new, Step::KeyUpdate)),
            NodeState::InTransit { new, .. } => Some((new, Step::FirstTransition)),
        }
    }

    /// [`Self::position`] with the step as its progress number (1-3), as the
    /// rules of the module docs compare it.
    fn progress(&self) -> Option<(Epoch, u8)> {
        self.position().map(|(e, step)| (e, step.progress()))
    }

    /// The deadline of the join or key request in progress, if any.
    #[cfg(test)]
    pub(crate) fn sync_due(&self) -> Option<Time> {
        self.sync.map(|s| s.due)
    }

    /// When the machine next has something to do by itself (a retried join
    /// or key request, a usage report): the shell feeds
    /// [`NodeInput::Timeout`] at or after it. Read it again after every input.
    pub fn poll_timeout(&self) -> Option<Time> {
        [self.sync.map(|s| s.due), self.usage_due]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn keyring(&self) -> Option<&Keyring> {
        self.keyring.as_ref()
    }

    /// Joined and not waiting for the controller's answer to a key request.
    pub fn is_synced(&self) -> bool {
        self.joined.is_some() && self.sync.is_none()
    }

    /// Bytes this machine occupies (struct plus heap), for the simulator's memory report.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.node_id.as_str().len()
            + self.queued.capacity() * std::mem::size_of::<Vec<u8>>()
            + self.queued.iter().map(Vec::capacity).sum::<usize>()
            + self.ahead.capacity() * std::mem::size_of::<(SocketAddr, Vec<u8>)>()
            + self.ahead.iter().map(|(_, b)| b.capacity()).sum::<usize>()
            + self.data_replay.heap_bytes()
            + self.keyring.as_ref().map_or(0, Keyring::heap_bytes)
    }

    /// Feed one input; actions are appended to `out`.
    pub fn handle(
        &mut self,
        now: Time,
        input: NodeInput<'_>,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) {
        match input {
            NodeInput::LinkUp | NodeInput::LinkDown => {
                if self.joined.is_none() && self.seq == 0 {
                    // A node with no stored state (new, or its state was lost)
                    // numbers its messages from the clock: above anything a
                    // previous life of it used, which the controller remembers.
                    self.seq = now.0.saturating_mul(1 << 16);
                    self.seq_reserved = self.seq;
                }
                self.start_sync(now, rng, out, Ask::LinkChanged)
            }
            NodeInput::Timeout => {
                let earliest = self.next_request_at(now);
                if let Some(s) = self.sync.as_mut().filter(|s| now >= s.due) {
                    if now < earliest {
                        // Due, but the last request went out too recently.
                        s.due = earliest;
                    } else {
                        self.send_sync_request(now, rng, out);
                    }
                }
                if self.usage_due.is_some_and(|d| now >= d) {
                    // Re-armed when sent; a node that cannot report waits for its next sync.
                    self.usage_due = None;
                    self.send_usage(now, out);
                }
            }
            NodeInput::Send(plaintext) => {
                let holding = self.sync.is_some_and(|s| s.hold) || self.joined.is_none();
                if holding {
                    if self.queued.len() < self.cfg.max_queued {
                        self.queued.push(plaintext.to_vec());
                    } else {
                        out.push(NodeAction::Event(NodeEvent::QueueFull));
                    }
                } else {
                    self.seal_and_send(plaintext, rng, out);
                }
            }
            NodeInput::Datagram { from, bytes }
            | NodeInput::DatagramWaited {
                from,
                bytes,
                waited_us: _,
            } => {
                let waited_us = match input {
                    NodeInput::DatagramWaited { waited_us, .. } => waited_us,
                    _ => 0,
                };
                let (term, start) = (self.term, out.len());
                match self.on_datagram(now, (from, waited_us), bytes, rng, out) {
                    Ok(()) => {}
                    Err(reason) if self.keep_until_synced(&reason) && self.keep(from, bytes) => {}
                    Err(reason) => out.push(NodeAction::Event(NodeEvent::Refused { from, reason })),
                }
                // A new leader term is stored before anything the message
                // led to goes out: a node restarted after it must still
                // refuse the deposed leader.
                if self.term != term {
                    let p = self.flushed_snapshot();
                    out.insert(start, p);
                }
            }
        }
    }

    /// Data sealed under an epoch ahead of this node's (at most
    /// [`AHEAD_EPOCHS`] ahead), while it waits for the controller's answer
    /// (which brings that key): kept, up to `max_queued`. Data without an
    /// epoch hint that no held key opens is kept too (it may be sealed under
    /// that newer key; trial decryption cannot tell). Outside a sync nothing
    /// is kept (a forged epoch hint costs nothing).
    fn keep_until_synced(&self, reason: &Refusal) -> bool {
        let Refusal::Undecryptable { reason, .. } = reason else {
            return false;
        };
        let newer = match reason {
            OpenError::NoKey(e) => self
                .position()
                .is_some_and(|(have, _)| *e > have && e.0 - have.0 <= AHEAD_EPOCHS),
            OpenError::Failed { .. } => true,
        };
        newer && self.sync.is_some() && self.cfg.max_queued > 0
    }

    /// Keeps one datagram for [`Self::open_kept`]. Nothing authenticates it
    /// yet, so the queue is shared fairly between source addresses: when it
    /// is full, the new datagram replaces the oldest one of the address that
    /// holds the most (or is dropped if its own address holds the most), so
    /// a flood from one host cannot push out what the fleet's other nodes sent.
    fn keep(&mut self, from: SocketAddr, bytes: &[u8]) -> bool {
        if self.ahead.len() < self.cfg.max_queued {
            self.ahead.push((from, bytes.to_vec()));
            return true;
        }
        let count = |ip| self.ahead.iter().filter(|(f, _)| f.ip() == ip).count();
        let Some((top_ip, top)) = self
            .ahead
            .iter()
            .map(|(f, _)| (f.ip(), count(f.ip())))
            .max_by_key(|(_, n)| *n)
        else {
            return false;
        };
        if count(from.ip()) + 1 >= top {
            return false;
        }
        match self.ahead.iter().position(|(f, _)| f.ip() == top_ip) {
            Some(i) => {
                self.ahead.remove(i);
                self.ahead.push((from, bytes.to_vec()));
                true
            }
            None => false,
        }
    }

    /// Opens the data kept by [`Self::keep_until_synced`] with the keys now held.
    fn open_kept(&mut self, out: &mut Out) {
        for (from, bytes) in std::mem::take(&mut self.ahead) {
            let r = match wire::decode(&bytes) {
                Ok(Message::Data(d)) => self.on_data(from, d, out),
                _ => continue,
            };
            if let Err(reason) = r {
                out.push(NodeAction::Event(NodeEvent::Refused { from, reason }));
            }
        }
    }

    fn next_seq(&mut self, out: &mut Out) -> u64 {
        self.seq += 1;
        if self.seq >= self.seq_reserved {
            self.seq_reserved = self.seq + SEQ_BLOCK;
            self.persist(out);
        }
        self.seq
    }

    fn persist(&mut self, out: &mut Out) {
        out.push(self.flushed_snapshot());
    }

    /// A `Persist` of the snapshot now; notes what it makes durable.
    fn flushed_snapshot(&mut self) -> NodeAction {
        self.durable_announced = self.announced;
        NodeAction::Persist(Box::new(self.snapshot()))
    }

    /// Sends a node message to the controller, MAC'd under the ratchet chain
    /// (nothing before the handshake): to its unicast address once learned, to
    /// the configured one (the group) before that or on `fallback` (see [`route`]).
    fn send_controller(&mut self, body: Vec<u8>, fallback: bool, out: &mut Out) {
        let Some(r) = &self.ratchet else { return };
        out.push(NodeAction::SendTo {
            to: self.route.dest(self.cfg.controller, fallback),
            bytes: wire::mac(body, &r.chain),
        });
    }

    /// The ratchet a restored node would hold had it taken the key update of
    /// the round its snapshot announced ([`NodeMachine::maybe_stepped`]).
    fn lost_step(&self) -> Option<NodeRatchet> {
        if !self.maybe_stepped {
            return None;
        }
        self.lost_step_of(self.announced.as_ref()?)
    }

    /// The step `a` makes from the ratchet in place, if `a` was announced for
    /// it: same term, the node level at `a`'s epoch, its share the one `a`
    /// was checked against. The share secret stays (a key request under the
    /// step carries the same share).
    fn lost_step_of(&self, a: &Announced) -> Option<NodeRatchet> {
        let r = self.ratchet.as_ref()?;
        if a.term != self.term
            || a.own != r.share()
            || self.position() != Some((a.epoch, Step::SecondTransition))
        {
            return None;
        }
        let step = r.step(self.member()?, &a.share)?;
        Some(NodeRatchet {
            chain: step.chain().clone(),
            secret: r.secret.clone(),
        })
    }

    /// The ratchet moved (a key update, a key response, a handshake): what
    /// was announced for the one before is of no use.
    fn ratchet_moved(&mut self) {
        self.announced = None;
        self.maybe_stepped = false;
    }

    /// Where this node sends what it has for the controller now: the
    /// controller's unicast address once learned from an authenticated
    /// controller message, else the configured `controller`.
    pub fn controller_addr(&self) -> SocketAddr {
        self.route.dest(self.cfg.controller, false)
    }

    /// Learns the controller's address from a controller message that was
    /// authenticated afresh (`fresh`: not a copy of one already accepted).
    fn learn_controller(&mut self, fresh: bool, from: SocketAddr) {
        if fresh {
            self.route.learn(self.cfg.controller, from);
        }
    }

    /// Begin (or, if `urgent`, restart at once) asking the controller for the current key.
    fn start_sync(
        &mut self,
        now: Time,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
        why: Ask,
    ) {
        let hold = matches!(why, Ask::LinkChanged | Ask::Behind);
        let urgent = why == Ask::LinkChanged;
        match &mut self.sync {
            Some(s) => {
                s.hold |= hold;
                if !urgent {
                    return;
                }
                s.attempt = 0;
            }
            None => {
                let due = if urgent {
                    now
                } else {
                    self.next_request_at(now)
                };
                self.sync = Some(Sync {
                    since: self.seq + 1,
                    attempt: 0,
                    due,
                    hold,
                });
                if due > now {
                    return;
                }
            }
        }
        self.send_sync_request(now, rng, out);
    }

    /// The earliest moment from `now` the next join or key request may go:
    /// `sync_retry_initial_ms` after the last one.
    fn next_request_at(&self, now: Time) -> Time {
        self.last_request
            .map_or(now, |t| now.max(t.plus(self.cfg.sync_retry_initial_ms)))
    }

    fn send_sync_request(
        &mut self,
        now: Time,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) {
        // Every second retry goes to the group, in case the unicast address
        // learned is not (or no longer) where the controller listens.
        let fallback = self.sync.is_some_and(|s| s.attempt % 2 == 1);
        match (&self.joined, &self.keyring, &self.ratchet) {
            (Some(j), Some(_), Some(r)) => {
                let (member, share) = (j.member, r.share());
                let seq = self.next_seq(out);
                let (epoch, step) = self
                    .position()
                    .unwrap_or((Epoch::default(), Step::SecondTransition));
                let body = wire::key_request(epoch, step, seq, member, &share);
                self.send_controller(body, fallback, out);
            }
            // Not joined yet, or joined under wire revision 1: the enrollment
            // handshake. A retry resends the same init (the controller answers
            // it from its cache, without a new key agreement); after
            // `HANDSHAKE_SENDS` sends of one init a fresh one goes (in case the
            // controller lost its answer, e.g. restored from an older backup).
            _ => {
                if self
                    .handshake
                    .as_ref()
                    .is_none_or(|h| h.sent >= HANDSHAKE_SENDS)
                {
                    let seq = self.next_seq(out);
                    match Handshake::start(&self.keys, &self.node_id, seq, rng) {
                        Ok(h) => self.handshake = Some(h),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start the enrollment handshake")
                        }
                    }
                }
                if let Some(h) = &mut self.handshake {
                    h.sent += 1;
                    // The answer replies to this init, whenever it was first sent.
                    if let Some(s) = &mut self.sync {
                        s.since = s.since.min(h.seq);
                    }
                    out.push(NodeAction::SendTo {
                        to: self.route.dest(self.cfg.controller, fallback),
                        bytes: h.bytes.clone(),
                    });
                }
            }
        }
        self.last_request = Some(now);
        if let Some(s) = &mut self.sync {
            s.attempt += 1;
            let wait = backoff(
                self.cfg.sync_retry_initial_ms,
                self.cfg.sync_retry_max_ms,
                s.attempt,
                25,
                rng,
            )
            .max(self.cfg.sync_retry_initial_ms);
            s.due = now.plus(wait);
        }
    }

    fn send_usage(&mut self, now: Time, out: &mut Out) {
        let (Some(j), Some(r)) = (&self.joined, &self.keyring) else {
            return;
        };
        let (member, epoch) = (j.member, r.sealing_epoch());
        let uses: Vec<_> = r.usage().collect();
        let seq = self.next_seq(out);
        self.send_controller(wire::usage_report(epoch, seq, member, &uses), false, out);
        self.usage_reports += 1;
        self.arm_usage(now);
    }

    fn arm_usage(&mut self, now: Time) {
        self.usage_due = self.cfg.usage_interval_ms.map(|every| now.plus(every));
    }

    fn seal_and_send(&mut self, plaintext: &[u8], rng: &mut impl RngCore, out: &mut Out) {
        let Some(member) = self.member() else { return };
        let seq = self.next_seq(out);
        let Some(ring) = &mut self.keyring else {
            return;
        };
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        let hint = self.cfg.epoch_hint.then(|| ring.sealing_epoch());
        let mut bytes = wire::data_header(member, seq, hint, &nonce);
        let (epoch, sealed) = ring.seal(&nonce, &bytes, plaintext);
        bytes.extend_from_slice(&sealed);
        out.push(NodeAction::SendGroup {
            bytes,
            data_epoch: Some(epoch),
        });
    }

    /// Signature checks done so far (each costs about 50 µs of CPU): what a
    /// flood of forged requests can make a node spend.
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks
    }

    /// Transition requests taken by their reveal instead of a signature check.
    pub fn reveal_checks(&self) -> u64 {
        self.reveal_checks
    }

    /// Whether transition request `t` holds by its reveal: the node holds the
    /// commitment of its round, signed under its own term (a request of
    /// another term goes by its signature, which may move the term).
    fn reveal_holds(&self, t: &wire::Transition<'_>) -> bool {
        self.joined.is_some()
            && t.term == self.term
            && self.commit.as_ref().is_some_and(|(term, epoch, c)| {
                *term == t.term && *epoch == t.epoch && crypto::reveal_holds(c, t.step, &t.reveal)
            })
    }

    /// Usage reports sent to the controller since the machine was made.
    pub fn usage_reports(&self) -> u64 {
        self.usage_reports
    }

    /// Check a controller signature, with the replay window. Run only after
    /// [`Self::precheck`]. A byte-identical copy of a recently verified message
    /// (a retransmission) skips the signature check; another message under a
    /// sequence number already used is a replay; a datagram whose signature
    /// failed recently fails again for the price of a hash.
    ///
    /// A message of a lower leader term than the node's is refused before
    /// anything else (`stale_term`); one of a higher term is checked against
    /// an empty replay window (a new leader counts its own sequence numbers)
    /// and, once its signature holds, makes its term the node's.
    #[allow(clippy::too_many_arguments)]
    fn authenticate(
        &mut self,
        now: Time,
        budgeted: bool,
        term: u32,
        seq: u64,
        auth: &Signed<'_>,
        bytes: &[u8],
        what: &'static str,
    ) -> Result<(), Refusal> {
        if self.joined.is_none() {
            return Err(Refusal::NotJoined { what });
        }
        self.check_term(term, what)?;
        let digest = digest16(bytes);
        let seen = if term > self.term {
            ReplayVerdict::Fresh
        } else {
            self.ctl_replay.check(seq)
        };
        match seen {
            ReplayVerdict::Fresh => {
                if self.failed.contains(&digest) {
                    return Err(Refusal::BadSignature { what });
                }
                if budgeted {
                    self.spend_verify(now, what)?;
                }
                let Some(j) = &self.joined else {
                    return Err(Refusal::NotJoined { what });
                };
                self.signature_checks += 1;
                if !verify(&j.controller, auth.body, &auth.signature) {
                    if self.failed.len() >= FAILED_SIGNATURES_KEPT {
                        self.failed.pop_front();
                    }
                    self.failed.push_back(digest);
                    return Err(Refusal::BadSignature { what });
                }
                self.follow_term(term);
                self.ctl_replay.mark(seq);
                if self.verified.len() >= VERIFIED_KEPT {
                    self.verified.pop_front();
                }
                self.verified.push_back(digest);
                Ok(())
            }
            // A retransmission of a message already accepted: handled again
            // (idempotently, rate-limited by `precheck`), so that a lost reply
            // gets sent once more.
            ReplayVerdict::Again if self.verified.contains(&digest) => Ok(()),
            // The controller never signs two messages under one number.
            ReplayVerdict::Again | ReplayVerdict::TooOld => Err(Refusal::Replay { what, seq }),
        }
    }

    /// A signed controller request checked by its signature (see
    /// [`Self::authenticate`]); a fresh one teaches the controller's address.
    fn verify_request(
        &mut self,
        now: Time,
        from: SocketAddr,
        (term, seq): (u32, u64),
        auth: &Signed<'_>,
        bytes: &[u8],
        what: &'static str,
    ) -> Result<(), Refusal> {
        let fresh = self.fresh(term, seq);
        self.authenticate(now, true, term, seq, auth, bytes, what)?;
        self.learn_controller(fresh, from);
        Ok(())
    }

    /// Whether a controller message of `term` and `seq` is new to this node
    /// (a higher term than its own starts a fresh replay window).
    fn fresh(&self, term: u32, seq: u64) -> bool {
        term > self.term || self.ctl_replay.check(seq) == ReplayVerdict::Fresh
    }

    /// Refuses a controller message of a lower leader term than the node's.
    fn check_term(&self, term: u32, what: &'static str) -> Result<(), Refusal> {
        if term < self.term {
            return Err(Refusal::StaleTerm {
                what,
                got: term,
                have: self.term,
            });
        }
        Ok(())
    }

    /// An authenticated controller message of `term`: a higher term than the
    /// node's becomes its own, with an empty replay window (the caller
    /// persists the change before acting on the message).
    fn follow_term(&mut self, term: u32) {
        if term > self.term {
            self.term = term;
            self.ctl_replay = ReplayWindow::default();
            self.verified.clear();
        }
    }

    /// The checks that cost nothing, before any signature: a request for step
    /// `m` of epoch `e` that could not move this node (older epoch, older
    /// step), a request for the step it already took that was answered less
    /// than [`DUPLICATE_ANSWER_INTERVAL_MS`] ago, and one that skips ahead
    /// while the node already asks the controller for the current key, are
    /// refused here. Only a request that would move the node, or the first
    /// duplicate in an interval, or a gap that starts a key request, costs a
    /// signature check.
    fn precheck(
        &mut self,
        now: Time,
        e: Epoch,
        m: Step,
        what: &'static str,
    ) -> Result<(), Refusal> {
        let Some((pe, pq)) = self.progress() else {
            return Err(Refusal::NotJoined { what });
        };
        let q = m.progress();
        if e < pe {
            return Err(Refusal::StaleEpoch {
                what,
                got: e,
                have: pe,
            });
        }
        if e == pe && q < pq {
            return Err(Refusal::Outdated { what, epoch: e });
        }
        let within = |t: Option<Time>| {
            t.is_some_and(|t| now >= t && now < t.plus(DUPLICATE_ANSWER_INTERVAL_MS))
        };
        if e == pe && q == pq {
            // One duplicate per interval is checked (and answered if genuine);
            // the slot is taken whether or not its signature holds.
            if within(self.last_reanswer) {
                return Err(Refusal::DuplicateRequest {
                    what,
                    seq: 0,
                    interval_ms: DUPLICATE_ANSWER_INTERVAL_MS,
                });
            }
            self.last_reanswer = Some(now);
        }
        let installs = e == pe.next() && pq == 3 && m == Step::KeyUpdate;
        if e > pe && !installs {
            // Already asking the controller, or asked to check a gap in this
            // interval: nothing a verified copy would add.
            if self.sync.is_some() || within(self.last_gap) {
                return Err(Refusal::EpochGap {
                    what,
                    got: e,
                    have: pe,
                });
            }
            self.last_gap = Some(now);
        }
        Ok(())
    }

    /// Takes one signature check from the budget ([`VERIFY_BURST`],
    /// [`VERIFY_EVERY_MS`]), or refuses.
    fn spend_verify(&mut self, now: Time, what: &'static str) -> Result<(), Refusal> {
        if !super::take_token(
            &mut self.verify_tokens,
            &mut self.verify_at,
            now,
            VERIFY_BURST,
            VERIFY_EVERY_MS,
        ) {
            return Err(Refusal::VerifyBudget { what });
        }
        Ok(())
    }

    /// `waited_us`: how long the datagram waited on this node before this
    /// call ([`NodeInput::DatagramWaited`]).
    fn on_datagram(
        &mut self,
        now: Time,
        (from, waited_us): (SocketAddr, u32),
        bytes: &[u8],
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), Refusal> {
        let msg = wire::decode(bytes).map_err(Refusal::Malformed)?;
        let what = msg.name();
        match msg {
            Message::Data(d) => self.on_data(from, d, out),
            Message::KeyUpdate(ku) => {
                let member = self.member().ok_or(Refusal::NotJoined { what })?;
                // Most batches hold other nodes' entries: skip them before any crypto.
                let Some(wrapped) = ku.entry_for(member) else {
                    return Ok(());
                };
                self.check_term(ku.term, what)?;
                self.precheck(now, ku.epoch, Step::KeyUpdate, what)
                    .map_err(|r| with_seq(r, ku.seq))?;
                // Only a key the node does not hold yet takes a ratchet step; a
                // duplicate, stale or gapped request goes the usual way (answered
                // again, refused, or a key request).
                let takes_step = matches!(self.position(), Some((pe, Step::SecondTransition)) if ku.epoch == pe.next());
                // The X25519 made ahead from a share notice, if it fits.
                let ready = self.ratchet.as_ref().and_then(|r| {
                    let dh = self.prepared.dh_for(&ku.share, &r.share())?;
                    Some(dh.and_then(|dh| r.step_from(member, &ku.share, dh)))
                });
                let used = ready.is_some();
                // A round notice whose signature held announced this term,
                // epoch, share and transition commitment: the entry opening
                // under the step (made ahead, so a forgery costs no X25519)
                // is then what authenticates the request, and no signature
                // is checked. Its sequence number is not covered: it moves no
                // replay window and teaches no controller address (a
                // byte-identical copy is answered again like a verified one).
                // If the entry does not open, the signature decides
                // (`prepare.rs`).
                let vouched = takes_step
                    && used
                    && self
                        .prepared
                        .vouches(ku.term, ku.epoch, &ku.share, &ku.commit);
                // The digest only where it is kept or compared (the signature
                // check makes its own).
                let digest = (vouched || !takes_step).then(|| digest16(bytes));
                let copy =
                    !takes_step && digest.is_some() && self.prepared.vouched_digest == digest;
                if !vouched && !copy {
                    self.verify_request(now, from, (ku.term, ku.seq), &ku.auth, bytes, what)?;
                }
                self.commit = Some((ku.term, ku.epoch, ku.commit));
                if !takes_step {
                    return self.on_step(
                        now,
                        (ku.epoch, waited_us),
                        Step::KeyUpdate,
                        None,
                        rng,
                        out,
                    );
                }
                // The disk holds this chain and share secret and the share
                // announced for this round: the step needs no flush.
                let light = match (&self.ratchet, self.position()) {
                    (Some(r), Some((pe, _))) => {
                        self.durable_announced
                            == Some(Announced {
                                term: ku.term,
                                epoch: pe,
                                share: ku.share,
                                own: r.share(),
                            })
                    }
                    _ => false,
                };
                let step = ready.unwrap_or_else(|| {
                    self.ratchet
                        .as_ref()
                        .and_then(|r| r.step(member, &ku.share))
                });
                let Some(key) = step
                    .as_ref()
                    .and_then(|s| s.unwrap(&wrapped, ku.epoch, member))
                else {
                    if vouched {
                        // Not opened: the signature tells the controller's
                        // request from a forgery that copied the notice.
                        self.verify_request(now, from, (ku.term, ku.seq), &ku.auth, bytes, what)?;
                    }
                    // Signed by the controller, yet not for this node's chain: out of
                    // step (e.g. a lost reply); the key request brings it back in.
                    self.start_sync(now, rng, out, Ask::OutOfStep);
                    return Err(Refusal::Unwrap { epoch: ku.epoch });
                };
                if vouched {
                    self.prepared.stats.vouched += 1;
                    self.prepared.vouched_digest = digest;
                }
                let spare = self.prepared.spent(used);
                let next = step.map(|s| NodeRatchet {
                    chain: s.chain().clone(),
                    secret: spare.unwrap_or_else(|| ShareSecret::generate(rng)),
                });
                let previous = std::mem::replace(&mut self.ratchet, next);
                let (announced, maybe_stepped) = (self.announced, self.maybe_stepped);
                self.ratchet_moved();
                let install = Install { key, flush: !light };
                let r = self.on_step(
                    now,
                    (ku.epoch, waited_us),
                    Step::KeyUpdate,
                    Some(install),
                    rng,
                    out,
                );
                if r.is_err() {
                    self.ratchet = previous;
                    (self.announced, self.maybe_stepped) = (announced, maybe_stepped);
                }
                r
            }
            Message::Transition(t) => {
                self.check_term(t.term, what)?;
                self.precheck(now, t.epoch, t.step, what)
                    .map_err(|r| with_seq(r, t.seq))?;
                // By its reveal: the step, epoch and term are the signed
                // commitment's. Its sequence number is not authenticated, so
                // it moves no replay window and teaches no controller address.
                if self.reveal_holds(&t) {
                    self.reveal_checks += 1;
                    return self.on_step(now, (t.epoch, waited_us), t.step, None, rng, out);
                }
                self.verify_request(now, from, (t.term, t.seq), &t.auth, bytes, what)?;
                self.on_step(now, (t.epoch, waited_us), t.step, None, rng, out)
            }
            Message::KeyResponse(r) => {
                let member = self.addressed_to_me(r.member, what)?;
                // Only an answer to a request outstanding is worth a signature check.
                self.solicited(what, r.in_reply_to)?;
                let fresh = self.fresh(r.term, r.seq);
                self.authenticate(now, false, r.term, r.seq, &r.auth, bytes, what)?;
                self.learn_controller(fresh, from);
                // The key state is wrapped under a ratchet step of its own:
                // from the node's chain, or (a node that may have lost a
                // checkpointed key update) from the step it re-derived.
                let open = |x: &NodeRatchet| {
                    let step = x.step(member, &r.share)?;
                    let key = step.unwrap(&r.state.current, r.state.current_epoch, member)?;
                    Some((step, key))
                };
                let (step, current) = self
                    .ratchet
                    .as_ref()
                    .and_then(open)
                    .or_else(|| self.lost_step().as_ref().and_then(open))
                    .ok_or(Refusal::Unwrap {
                        epoch: r.state.current_epoch,
                    })?;
                let round = match &r.state.round {
                    None => None,
                    Some(x) => Some((
                        x.phase,
                        step.unwrap(&x.wrapped, x.epoch, member)
                            .ok_or(Refusal::Unwrap { epoch: x.epoch })?,
                    )),
                };
                let next = NodeRatchet {
                    chain: step.chain().clone(),
                    secret: ShareSecret::generate(rng),
                };
                let previous = self.ratchet.replace(next);
                let (announced, maybe_stepped) = (self.announced, self.maybe_stepped);
                self.ratchet_moved();
                let res = self.adopt(
                    now,
                    what,
                    ((r.term, r.seq), r.in_reply_to),
                    current,
                    round,
                    rng,
                    out,
                );
                if res.is_err() {
                    self.ratchet = previous;
                    (self.announced, self.maybe_stepped) = (announced, maybe_stepped);
                }
                res
            }
            Message::HandshakeAnswer(a) => {
                let Some(h) = self.handshake.as_ref().filter(|h| h.seq == a.in_reply_to) else {
                    return Err(Refusal::Unsolicited {
                        what,
                        in_reply_to: a.in_reply_to,
                    });
                };
                self.solicited(what, a.in_reply_to)?;
                // Two X25519 operations (rebuilding the initiator, then `ee`): from
                // the same budget as signature checks. A forged answer leaves the
                // handshake in flight, so the genuine one still opens.
                let ini = h.initiator(&self.keys);
                self.spend_verify(now, what)?;
                let member_hint = self.member().unwrap_or_default();
                let (payload, fin) =
                    ini.and_then(|ini| ini.finish(a.noise))
                        .map_err(|_| Refusal::BadMac {
                            what,
                            member: member_hint,
                        })?;
                let p = wire::decode_answer_payload(&payload).map_err(Refusal::Malformed)?;
                if let Some(j) = &self.joined {
                    if j.member != p.member {
                        return Err(Refusal::NotForMe {
                            what,
                            to: p.member,
                            me: j.member,
                        });
                    }
                    // The controller's key is pinned at the first join.
                    if j.controller.to_bytes() != p.controller_key {
                        return Err(Refusal::BadControllerKey);
                    }
                }
                self.check_term(p.term, what)?;
                if p.term == self.term && self.ctl_replay.check(p.seq) != ReplayVerdict::Fresh {
                    return Err(Refusal::Replay { what, seq: p.seq });
                }
                let controller = VerifyingKey::from_bytes(&p.controller_key)
                    .map_err(|_| Refusal::BadControllerKey)?;
                let previous = self.joined.replace(Joined {
                    member: p.member,
                    controller,
                });
                let next = NodeRatchet {
                    chain: fin.chain(p.member),
                    secret: ShareSecret::generate(rng),
                };
                let previous_ratchet = self.ratchet.replace(next);
                let (announced, maybe_stepped) = (self.announced, self.maybe_stepped);
                self.ratchet_moved();
                match self.adopt(
                    now,
                    what,
                    ((p.term, p.seq), a.in_reply_to),
                    p.current,
                    p.round,
                    rng,
                    out,
                ) {
                    Ok(()) => {
                        self.follow_term(p.term);
                        self.ctl_replay.mark(p.seq);
                        self.handshake = None;
                        self.learn_controller(true, from);
                        Ok(())
                    }
                    Err(e) => {
                        self.joined = previous;
                        self.ratchet = previous_ratchet;
                        (self.announced, self.maybe_stepped) = (announced, maybe_stepped);
                        Err(e)
                    }
                }
            }
            Message::Beacon(b) => self.on_beacon(now, from, &b, bytes, rng, out),
            Message::ShareNotice(n) => self.on_share_notice(now, &n, bytes, rng, out),
            Message::Resync(x) => {
                let member = self.addressed_to_me(x.member, what)?;
                self.check_term(x.term, what)?;
                if !self
                    .ratchet
                    .as_ref()
                    .is_some_and(|r| x.auth.verify(&r.chain))
                {
                    return Err(Refusal::BadMac { what, member });
                }
                if x.term == self.term && self.ctl_replay.check(x.seq) != ReplayVerdict::Fresh {
                    return Err(Refusal::Replay { what, seq: x.seq });
                }
                self.follow_term(x.term);
                self.ctl_replay.mark(x.seq);
                self.learn_controller(true, from);
                if (x.term, x.seq) < self.synced_by {
                    // Sent before the answer that synced us: nothing left to ask.
                    return Ok(());
                }
                self.start_sync(now, rng, out, Ask::OutOfStep);
                Ok(())
            }
            Message::Ack(_)
            | Message::KeyRequest(_)
            | Message::HandshakeInit(_)
            | Message::UsageReport(_) => Err(Refusal::Unexpected { what, role: "node" }),
        }
    }

    /// A beacon: see the module docs. Only a beacon that could move this node,
    /// or that announces another controller address than the one it sends
    /// to, is verified, at most [`BEACON_VERIFY_BURST`] at once.
    fn on_beacon(
        &mut self,
        now: Time,
        from: SocketAddr,
        b: &wire::Beacon<'_>,
        bytes: &[u8],
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), Refusal> {
        let what = "beacon";
        self.beacon_stats.received += 1;
        let Some(controller) = self.joined.as_ref().map(|j| j.controller) else {
            // Not joined yet: a controller is there (or someone says so), so
            // the join goes out now rather than at its next backed-off retry.
            self.join_soon(now, rng);
            return Ok(());
        };
        let silence = self.cfg.beacon_silence_ms;
        let after_silence =
            silence > 0 && self.beacon_arrival.is_some_and(|t| now.since(t) > silence);
        self.beacon_arrival = Some(now);
        self.check_term(b.term, what)?;
        let order = (b.term, b.seq);
        if order < self.beacon_best {
            self.beacon_stats.replays += 1;
            return Err(Refusal::Replay { what, seq: b.seq });
        }
        let digest = digest16(bytes);
        let known = order == self.beacon_best && digest == self.beacon_digest;
        if order == self.beacon_best && !known {
            // The controller never signs two beacons under one sequence number.
            self.beacon_stats.reused += 1;
            return Err(Refusal::BadSignature { what });
        }
        let behind = behind_beacon(self.position(), b.epoch, b.round);
        // A beacon announcing another controller address than the one this
        // node sends to is worth a check: the node learns where to answer.
        let announced = route::beacon_address(b.controller, from);
        let moved =
            self.cfg.controller.ip().is_multicast() && self.route.learned() != Some(announced);
        if known {
            self.beacon_stats.digest_hits += 1;
        } else {
            if !behind && !after_silence && !moved {
                self.beacon_stats.skipped += 1;
                return Ok(());
            }
            if !self.take_beacon_token(now) {
                self.beacon_stats.over_budget += 1;
                return Ok(());
            }
            if !verify(&controller, b.auth.body, &b.auth.signature) {
                self.beacon_stats.forged += 1;
                return Err(Refusal::BadSignature { what });
            }
            self.beacon_stats.verified += 1;
            self.beacon_best = order;
            self.beacon_digest = digest;
            self.follow_term(b.term);
            self.route.learn(self.cfg.controller, announced);
        }
        if behind {
            if self.sync.is_none() {
                self.beacon_stats.syncs += 1;
            }
            self.start_sync(now, rng, out, Ask::Behind);
        } else if after_silence {
            self.nudge(now, rng);
        }
        Ok(())
    }

    /// The controller is heard again after a silence, and the node is level
    /// with it: ask (so that the controller counts it live), without holding,
    /// at a random moment within one silence period and at most once every
    /// [`SILENCE_NUDGE_MIN_GAP_MS`]: a controller back from an outage, or
    /// slowed by load, is not met by the whole fleet at once.
    fn nudge(&mut self, now: Time, rng: &mut impl RngCore) {
        if self.sync.is_some()
            || self
                .last_nudge
                .is_some_and(|t| now.since(t) < SILENCE_NUDGE_MIN_GAP_MS)
        {
            return;
        }
        self.last_nudge = Some(now);
        self.beacon_stats.syncs += 1;
        let due = now.plus(rng.next_u64() % self.cfg.beacon_silence_ms.max(1));
        self.sync = Some(Sync {
            since: self.seq + 1,
            attempt: 0,
            due,
            hold: false,
        });
    }

    /// An unjoined node hears a beacon (which it cannot check: it learns the
    /// controller's key from the join accept): its next join goes out within
    /// [`BEACON_JOIN_SPREAD_MS`] (at a random moment, so that a fleet waiting
    /// for a controller does not answer its first beacon all at once), and
    /// its retries start again from the shortest delay (a join lost in the
    /// crowd is sent again soon). At most once per [`BEACON_JOIN_MIN_GAP_MS`]:
    /// forged beacons cannot make it join much more often than it would.
    fn join_soon(&mut self, now: Time, rng: &mut impl RngCore) {
        if self
            .beacon_join
            .is_some_and(|t| now.since(t) < BEACON_JOIN_MIN_GAP_MS)
        {
            return;
        }
        let Some(s) = &mut self.sync else { return };
        if s.due <= now.plus(BEACON_JOIN_SPREAD_MS) {
            return;
        }
        self.beacon_join = Some(now);
        s.attempt = 0;
        s.due = now.plus(rng.next_u64() % BEACON_JOIN_SPREAD_MS);
    }

    /// One beacon signature check from the budget, if any is left.
    fn take_beacon_token(&mut self, now: Time) -> bool {
        super::take_token(
            &mut self.beacon_tokens,
            &mut self.beacon_refill,
            now,
            BEACON_VERIFY_BURST,
            BEACON_VERIFY_REFILL_MS,
        )
    }

    /// This node's member number, if a message for `to` is for it.
    fn addressed_to_me(&self, to: u32, what: &'static str) -> Result<u32, Refusal> {
        let me = self.member().ok_or(Refusal::NotJoined { what })?;
        if to == me {
            Ok(me)
        } else {
            Err(Refusal::NotForMe { what, to, me })
        }
    }

    /// Group data: opened with a held key, then checked against the replay
    /// window of (the epoch that opened it, its sender). The rule is the
    /// controller's too ([`DataReplay`]), so a message the nodes deliver is
    /// one the controller takes for fresh.
    fn on_data(
        &mut self,
        from: SocketAddr,
        d: wire::Data<'_>,
        out: &mut Out,
    ) -> Result<(), Refusal> {
        let Some(ring) = &mut self.keyring else {
            return Err(Refusal::NotJoined { what: "data" });
        };
        if self.joined.as_ref().is_some_and(|j| j.member == d.sender) {
            return Ok(()); // our own message looped back by the network
        }
        // Windows of epochs whose key is gone go with the key.
        self.data_replay.retain(|e| ring.holds(e));
        let refused = |seen: DataSeen, epoch: Epoch| match seen {
            DataSeen::Replay => Some(Refusal::DuplicateData {
                sender: d.sender,
                seq: d.seq,
            }),
            DataSeen::Full { max } => Some(Refusal::TooManySenders {
                sender: d.sender,
                epoch,
                max,
            }),
            DataSeen::Fresh { .. } => None,
        };
        // With an epoch hint a replay is refused before any decryption.
        if let Some(e) = d.epoch_hint.filter(|e| ring.holds(*e)) {
            if let Some(r) = refused(self.data_replay.check(e, d.sender, d.seq), e) {
                return Err(r);
            }
        }
        let opened = ring
            .open(d.epoch_hint, &d.nonce, d.header, d.sealed)
            .map_err(|reason| Refusal::Undecryptable {
                sender: d.sender,
                reason,
            })?;
        let seen = self.data_replay.check(opened.epoch, d.sender, d.seq);
        if let Some(r) = refused(seen, opened.epoch) {
            return Err(r);
        }
        self.data_replay.mark(opened.epoch, d.sender, d.seq);
        if let DataSeen::Fresh { jump: Some(last) } = seen {
            out.push(NodeAction::Event(NodeEvent::SeqJump {
                from,
                sender: d.sender,
                epoch: opened.epoch,
                last,
                seq: d.seq,
            }));
        }
        out.push(NodeAction::Deliver(Delivered {
            sender: d.sender,
            seq: d.seq,
            epoch: opened.epoch,
            trials: opened.trials,
            plaintext: opened.plaintext,
        }));
        Ok(())
    }

    /// Acknowledges a step; `fallback`: to the group (see [`route`]).
    /// `waited_us`: how long the request waited on this node, when a request
    /// is answered; a first transition reply says so (a timed reply) to a
    /// controller whose timed round notice announced this round.
    fn ack(
        &mut self,
        step: Step,
        epoch: Epoch,
        fallback: bool,
        waited_us: Option<u32>,
        out: &mut Out,
    ) {
        // Restored from before a key update it may have confirmed, the node's
        // chain may be the one the controller replaced, which refuses a reply
        // that late (`late`); its key request, answered either way, tells the
        // controller its position instead.
        if self.maybe_stepped {
            return;
        }
        let (Some(member), Some(share)) = (self.member(), self.ratchet.as_ref().map(|r| r.share()))
        else {
            return;
        };
        let seq = self.next_seq(out);
        let body = match waited_us {
            Some(held)
                if step == Step::FirstTransition && self.prepared.timed(self.term, epoch) =>
            {
                wire::timed_first_ack(epoch, seq, member, &share, held)
            }
            _ => wire::ack(step, epoch, seq, member, &share),
        };
        self.send_controller(body, fallback, out);
    }

    /// An answer must reply to a request of the sync in progress.
    fn solicited(&self, what: &'static str, in_reply_to: u64) -> Result<(), Refusal> {
        match self.sync {
            Some(s) if in_reply_to >= s.since => Ok(()),
            _ => Err(Refusal::Unsolicited { what, in_reply_to }),
        }
    }

    /// A request for step `m` of epoch `e` (after authentication), which
    /// waited `waited_us` on this node. See the module docs.
    fn on_step(
        &mut self,
        now: Time,
        (e, waited_us): (Epoch, u32),
        m: Step,
        key: Option<Install>,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), Refusal> {
        let what = match m {
            Step::KeyUpdate => "key update request",
            Step::FirstTransition => "first transition request",
            Step::SecondTransition => "second transition request",
        };
        let before = self.state();
        let (Some((pe, pq)), Some(ring)) = (self.progress(), self.keyring.as_mut()) else {
            return Err(Refusal::NotJoined { what });
        };
        let q = m.progress();
        if e < pe {
            return Err(Refusal::StaleEpoch {
                what,
                got: e,
                have: pe,
            });
        }
        if e == pe {
            if q < pq {
                return Err(Refusal::Outdated { what, epoch: e });
            }
            if q == pq {
                if let Some(k) = &key {
                    if ring.key(e) != Some(&k.key) {
                        return Err(Refusal::KeyMismatch { epoch: e });
                    }
                }
                self.last_reanswer = Some(now);
                let fallback = self.route.reanswer();
                self.ack(m, e, fallback, Some(waited_us), out);
                return Ok(());
            }
            // Forward: DC→IT, IT→UC, or DC→IT→UC (see module docs).
            if pq == 1 {
                let _ = ring.start_transit();
            }
            if q == 3 {
                let _ = ring.finish();
                // The notice for the next round gets a check of its own.
                self.prepared.earned = Some(e);
            }
            // A transition is checkpointed, not flushed (see `Checkpoint`).
            self.changed(before, false, out);
            self.route.stepped();
            self.ack(m, e, false, Some(waited_us), out);
            return Ok(());
        }
        if e == pe.next() && pq == 3 {
            match key {
                Some(Install { key, flush }) if m == Step::KeyUpdate => {
                    ring.install_new(key)
                        .map_err(|_| Refusal::Outdated { what, epoch: e })?;
                    self.changed(before, flush, out);
                    self.route.stepped();
                    self.ack(m, e, false, Some(waited_us), out);
                    return Ok(());
                }
                _ => {
                    self.start_sync(now, rng, out, Ask::OutOfStep);
                    return Err(Refusal::MissingKey { what, epoch: e });
                }
            }
        }
        self.start_sync(now, rng, out, Ask::OutOfStep);
        Err(Refusal::EpochGap {
            what,
            got: e,
            have: pe,
        })
    }

    /// Record a state change, stored first (with `flush` a `Persist`, else a
    /// `Checkpoint`), then tell the shell.
    fn changed(&mut self, from: NodeState, flush: bool, out: &mut Out) {
        let to = self.state();
        if from != to {
            out.push(if flush {
                self.flushed_snapshot()
            } else {
                NodeAction::Checkpoint(Box::new(self.snapshot()))
            });
            out.push(NodeAction::Event(NodeEvent::StateChanged { from, to }));
        }
    }

    /// Take the controller's key state (key response or handshake answer);
    /// `answer` is the message's own (term, sequence number), `in_reply_to`
    /// the request it answers.
    #[allow(clippy::too_many_arguments)]
    /// The keys come unwrapped (from a key response's ratchet step or a
    /// handshake answer); the caller has already moved the ratchet on and
    /// puts it back if this fails.
    fn adopt(
        &mut self,
        now: Time,
        what: &'static str,
        (answer, in_reply_to): ((u32, u64), u64),
        current: GroupKey,
        round: Option<(RoundPhase, GroupKey)>,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), Refusal> {
        self.solicited(what, in_reply_to)?;
        let current_epoch = current.epoch();
        let (phase, primary, next, target) = match round {
            None => (
                KeyPhase::UpdateCompleted,
                current,
                None,
                (current_epoch, Step::SecondTransition),
            ),
            Some((RoundPhase::Distributing, new)) => {
                let e = new.epoch();
                (
                    KeyPhase::DistributionCompleted,
                    current,
                    Some(new),
                    (e, Step::KeyUpdate),
                )
            }
            Some((RoundPhase::FirstTransition | RoundPhase::Draining, new)) => {
                let e = new.epoch();
                (
                    KeyPhase::InTransit,
                    current,
                    Some(new),
                    (e, Step::FirstTransition),
                )
            }
            Some((RoundPhase::SecondTransition, new)) => {
                let e = new.epoch();
                (
                    KeyPhase::UpdateCompleted,
                    new,
                    None,
                    (e, Step::SecondTransition),
                )
            }
        };
        let pos = self.position();
        if pos.is_some_and(|pos| target < pos) {
            return Err(Refusal::Outdated {
                what,
                epoch: target.0,
            });
        }
        if pos == Some(target) {
            // The controller's view matches ours (and, having seen our position in
            // the request, it counts us live): synced. The answer moved the ratchet
            // on: persist it, and confirm the step with a reply carrying the new
            // share (the controller then drops the chain it replaces). Send what was held.
            self.persist(out);
            self.ack(target.1, target.0, false, None, out);
            self.handshake = None;
            self.sync = None;
            self.synced_by = self.synced_by.max(answer);
            out.push(NodeAction::Event(NodeEvent::Synced {
                state: self.state(),
            }));
            self.open_kept(out);
            for plaintext in std::mem::take(&mut self.queued) {
                self.seal_and_send(&plaintext, rng, out);
            }
            if self.usage_due.is_none() {
                self.arm_usage(now);
            }
            return Ok(());
        }
        let before = self.state();
        match &mut self.keyring {
            Some(r) => r.resync(phase, primary, next),
            None => {
                let mut r = Keyring::new(primary.clone());
                r.resync(phase, primary, next);
                self.keyring = Some(r);
            }
        }
        self.persist(out);
        out.push(NodeAction::Event(NodeEvent::StateChanged {
            from: before,
            to: self.state(),
        }));
        self.open_kept(out);
        self.route.stepped();
        self.ack(target.1, target.0, false, None, out);
        // Ask once more with the new position: the answer confirms the controller counts us.
        // Only an answer to that request (not a late copy of this one) may confirm.
        let next_seq = self.seq + 1;
        if let Some(s) = &mut self.sync {
            s.attempt = 0;
            s.since = next_seq;
        }
        self.send_sync_request(now, rng, out);
        Ok(())
    }
}

/// A refusal from [`NodeMachine::precheck`] names the request's sequence number.
fn with_seq(r: Refusal, seq: u64) -> Refusal {
    match r {
        Refusal::DuplicateRequest {
            what, interval_ms, ..
        } => Refusal::DuplicateRequest {
            what,
            seq,
            interval_ms,
        },
        r => r,
    }
}
