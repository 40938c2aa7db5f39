//! The node side: [`NodeMachine`], the three node states of SPEC §1 and the
//! key request of SPEC §5.
//!
//! | state | seals with | opens with |
//! |---|---|---|
//! | `UpdateCompleted` | current | current |
//! | `DistributionCompleted` | **old** | old or new |
//! | `InTransit` | **new** | old or new |
//!
//! A node's *position* is `(epoch, progress)`: `UpdateCompleted(c)` is
//! `(c, 3)`, `DistributionCompleted(o, n)` is `(n, 1)`, `InTransit(o, n)` is
//! `(n, 2)`. A controller request for step `m` of epoch `E` moves the node
//! only forward:
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
//! The controller's answer to a key request (or a handshake) puts the node in the
//! state of the round as the controller sees it, but never behind its position.
//! After a link-up or a restart the node *holds* application data (bounded
//! queue) until that answer arrives, so it never seals with a key the fleet
//! has already dropped. While it waits, group data sealed under a key newer
//! than any it holds (a node back after missing rounds) is kept too (bounded,
//! the same limit) and opened once the answer brings the key, so that data
//! does not become undecryptable for it.

use super::{backoff, Refusal, Time};
use crate::crypto::ratchet::Initiator;
use crate::crypto::{
    digest16, verify, Chain, Epoch, GroupKey, InitialKey, KeyPhase, Keyring, NodeKeys, OpenError,
    Share, ShareSecret,
};
use crate::wire::{self, Message, NodeId, ReplayWindow, RoundPhase, Seen, Signed, Step};
use core::net::SocketAddr;
use ed25519_dalek::VerifyingKey;
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Sequence numbers are reserved in blocks so that a restart never reuses one
/// without persisting on every message.
const SEQ_BLOCK: u64 = 1024;

/// Node settings. Defaults are documented on each field.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Where joins, key requests, replies and usage reports go.
    pub controller: SocketAddr,
    /// First key-request retry after this many ms (default 500), doubling…
    pub sync_retry_initial_ms: u64,
    /// …up to this many ms (default 8000), with ±25 % jitter.
    pub sync_retry_max_ms: u64,
    /// Send a usage report this often (default every 60 s); `None` = never.
    pub usage_interval_ms: Option<u64>,
    /// Application messages held while (re)joining (default 64); more are dropped.
    pub max_queued: usize,
    /// Senders whose data sequence numbers are remembered to drop replays (default 64).
    pub data_replay_senders: usize,
    /// Put the epoch in the data header (default true); without it receivers
    /// try their keys in turn (claims 14–16).
    pub epoch_hint: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            controller: SocketAddr::from(([127, 0, 0, 1], 47800)),
            sync_retry_initial_ms: 500,
            sync_retry_max_ms: 8000,
            usage_interval_ms: Some(60_000),
            max_queued: 64,
            data_replay_senders: 64,
            epoch_hint: true,
        }
    }
}

/// The node's timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeTimer {
    /// Retry the join or key request.
    Sync,
    /// Send the next usage report.
    Usage,
}

/// What a shell feeds a node.
#[derive(Clone, Copy, Debug)]
pub enum NodeInput<'a> {
    /// A datagram and its source address as the shell saw it.
    Datagram { from: SocketAddr, bytes: &'a [u8] },
    /// A timer armed earlier has passed.
    Timer(NodeTimer),
    /// Application plaintext to send to the group.
    Send(&'a [u8]),
    /// The node went from unable to able to communicate (link up, controller
    /// reachable again, process (re)started): ask for the current key (SPEC §5).
    LinkUp,
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
    ArmTimer {
        timer: NodeTimer,
        at: Time,
    },
    /// Store this snapshot durably (owner-only) before carrying out what follows.
    Persist(Box<NodePersist>),
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
    /// The ratchet (wire revision 2); absent in a revision-1 file, whose node
    /// runs the enrollment handshake at its next join.
    #[serde(default)]
    ratchet: Option<NodeRatchet>,
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
        let own = self.share();
        let dh = self.secret.dh(share)?;
        Some(crate::crypto::Step::derive(
            &self.chain,
            &dh,
            member,
            share,
            &own,
        ))
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

#[derive(Clone, Copy, Debug)]
struct Sync {
    /// Answers must reply to a request with at least this sequence number.
    since: u64,
    attempt: u32,
    due: Time,
    /// Hold application data until the answer (after link-up / restart / join).
    hold: bool,
}

/// The node agent's protocol state. See the module docs for its rules.
pub struct NodeMachine {
    cfg: NodeConfig,
    node_id: NodeId,
    keys: NodeKeys,
    joined: Option<Joined>,
    keyring: Option<Keyring>,
    seq: u64,
    seq_reserved: u64,
    ctl_replay: ReplayWindow,
    last_verified: [u8; 16],
    ratchet: Option<NodeRatchet>,
    /// The enrollment handshake in flight: the init's sequence number and state.
    handshake: Option<(u64, Initiator)>,
    sync: Option<Sync>,
    queued: Vec<Vec<u8>>,
    /// Group data for an epoch ahead of this node's, received while it asks
    /// the controller for the current key: (sender address, datagram).
    ahead: Vec<(SocketAddr, Vec<u8>)>,
    data_replay: Vec<(u32, ReplayWindow)>,
    data_replay_next: usize,
    usage_due: Option<Time>,
}

type Out = Vec<NodeAction>;

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
        n.ratchet = p.ratchet.clone();
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
            cfg,
            node_id,
            keys,
            joined,
            keyring,
            seq,
            seq_reserved: seq,
            ctl_replay: ReplayWindow::default(),
            last_verified: [0; 16],
            ratchet: None,
            handshake: None,
            sync: None,
            queued: Vec::new(),
            ahead: Vec::new(),
            data_replay: Vec::new(),
            data_replay_next: 0,
            usage_due: None,
        }
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
            ratchet: self.ratchet.clone(),
        }
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

    /// `(epoch, progress)`; only ever grows. `None` before the first join.
    pub fn position(&self) -> Option<(Epoch, u8)> {
        match self.state() {
            NodeState::Unjoined => None,
            NodeState::UpdateCompleted { current } => Some((current, 3)),
            NodeState::DistributionCompleted { new, .. } => Some((new, 1)),
            NodeState::InTransit { new, .. } => Some((new, 2)),
        }
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
            + self.data_replay.capacity() * std::mem::size_of::<(u32, ReplayWindow)>()
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
            NodeInput::LinkUp => self.start_sync(now, rng, out, true, true),
            NodeInput::Timer(NodeTimer::Sync) => {
                if self.sync.is_some_and(|s| now >= s.due) {
                    self.send_sync_request(now, rng, out);
                }
            }
            NodeInput::Timer(NodeTimer::Usage) => {
                if self.usage_due.is_some_and(|d| now >= d) {
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
            NodeInput::Datagram { from, bytes } => match self.on_datagram(now, bytes, rng, out) {
                Ok(()) => {}
                Err(reason) if self.keep_until_synced(&reason) => {
                    self.ahead.push((from, bytes.to_vec()));
                }
                Err(reason) => out.push(NodeAction::Event(NodeEvent::Refused { from, reason })),
            },
        }
    }

    /// Data sealed under an epoch ahead of this node's, while it waits for the
    /// controller's answer (which brings that key): kept, up to `max_queued`.
    /// Outside a sync nothing is kept (a forged epoch hint costs nothing).
    fn keep_until_synced(&self, reason: &Refusal) -> bool {
        let Refusal::Undecryptable {
            reason: OpenError::NoKey(e),
            ..
        } = reason
        else {
            return false;
        };
        self.sync.is_some()
            && self.position().is_some_and(|(have, _)| *e > have)
            && self.ahead.len() < self.cfg.max_queued
    }

    /// Opens the data kept by [`Self::keep_until_synced`] with the keys now held.
    fn open_kept(&mut self, out: &mut Out) {
        for (from, bytes) in std::mem::take(&mut self.ahead) {
            let r = match wire::decode(&bytes) {
                Ok(Message::Data(d)) => self.on_data(d, out),
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

    fn persist(&self, out: &mut Out) {
        out.push(NodeAction::Persist(Box::new(self.snapshot())));
    }

    /// Send a message MAC'd under the ratchet chain (nothing before the handshake).
    fn send_controller(&mut self, body: Vec<u8>, out: &mut Out) {
        let Some(r) = &self.ratchet else { return };
        out.push(NodeAction::SendTo {
            to: self.cfg.controller,
            bytes: wire::mac(body, &r.chain),
        });
    }

    /// Begin (or, if `urgent`, restart at once) asking the controller for the current key.
    fn start_sync(
        &mut self,
        now: Time,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
        hold: bool,
        urgent: bool,
    ) {
        match &mut self.sync {
            Some(s) => {
                s.hold |= hold;
                if !urgent {
                    return;
                }
                s.attempt = 0;
            }
            None => {
                self.sync = Some(Sync {
                    since: self.seq + 1,
                    attempt: 0,
                    due: now,
                    hold,
                })
            }
        }
        self.send_sync_request(now, rng, out);
    }

    fn send_sync_request(
        &mut self,
        now: Time,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) {
        let seq = self.next_seq(out);
        match (&self.joined, &self.keyring, &self.ratchet) {
            (Some(j), Some(_), Some(r)) => {
                let (epoch, progress) = self.position().unwrap_or_default();
                let step = Step::from_progress(progress).unwrap_or(Step::SecondTransition);
                let body = wire::key_request(epoch, step, seq, j.member, &r.share());
                self.send_controller(body, out);
            }
            // Not joined yet, or joined under wire revision 1: the enrollment handshake.
            _ => {
                let mut bytes = wire::handshake_init_header(seq, &self.node_id);
                match Initiator::start(&self.keys, &bytes, rng) {
                    Ok((ini, msg)) => {
                        bytes.extend_from_slice(&msg);
                        self.handshake = Some((seq, ini));
                        out.push(NodeAction::SendTo {
                            to: self.cfg.controller,
                            bytes,
                        });
                    }
                    Err(e) => tracing::error!(error = %e, "cannot start the enrollment handshake"),
                }
            }
        }
        if let Some(s) = &mut self.sync {
            s.attempt += 1;
            let wait = backoff(
                self.cfg.sync_retry_initial_ms,
                self.cfg.sync_retry_max_ms,
                s.attempt,
                25,
                rng,
            );
            s.due = now.plus(wait);
            out.push(NodeAction::ArmTimer {
                timer: NodeTimer::Sync,
                at: s.due,
            });
        }
    }

    fn send_usage(&mut self, now: Time, out: &mut Out) {
        let (Some(j), Some(r)) = (&self.joined, &self.keyring) else {
            return;
        };
        let (member, epoch) = (j.member, r.sealing_epoch());
        let uses: Vec<_> = r.usage().collect();
        let seq = self.next_seq(out);
        self.send_controller(wire::usage_report(epoch, seq, member, &uses), out);
        self.arm_usage(now, out);
    }

    fn arm_usage(&mut self, now: Time, out: &mut Out) {
        if let Some(every) = self.cfg.usage_interval_ms {
            let at = now.plus(every);
            self.usage_due = Some(at);
            out.push(NodeAction::ArmTimer {
                timer: NodeTimer::Usage,
                at,
            });
        }
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

    /// Check a controller signature, with the replay window. A byte-identical
    /// copy of the last verified message (a retransmission) skips the signature check.
    fn authenticate(
        &mut self,
        seq: u64,
        auth: &Signed<'_>,
        bytes: &[u8],
        what: &'static str,
    ) -> Result<(), Refusal> {
        let Some(j) = &self.joined else {
            return Err(Refusal::NotJoined { what });
        };
        match self.ctl_replay.check(seq) {
            Seen::Fresh => {
                if !verify(&j.controller, auth.body, &auth.signature) {
                    return Err(Refusal::BadSignature { what });
                }
                self.ctl_replay.mark(seq);
                self.last_verified = digest16(bytes);
                Ok(())
            }
            // A retransmission of a message already accepted: handled again
            // (idempotently), so that a lost reply gets sent once more.
            Seen::Again if digest16(bytes) == self.last_verified => Ok(()),
            Seen::Again if verify(&j.controller, auth.body, &auth.signature) => Ok(()),
            Seen::Again => Err(Refusal::BadSignature { what }),
            Seen::TooOld => Err(Refusal::Replay { what, seq }),
        }
    }

    fn on_datagram(
        &mut self,
        now: Time,
        bytes: &[u8],
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), Refusal> {
        let msg = wire::decode(bytes).map_err(Refusal::Malformed)?;
        let what = msg.name();
        match msg {
            Message::Data(d) => self.on_data(d, out),
            Message::KeyUpdate(ku) => {
                let member = self.member().ok_or(Refusal::NotJoined { what })?;
                // Most batches hold other nodes' entries: skip them before any crypto.
                let Some(wrapped) = ku.entry_for(member) else {
                    return Ok(());
                };
                self.authenticate(ku.seq, &ku.auth, bytes, what)?;
                // Only a key the node does not hold yet takes a ratchet step; a
                // duplicate, stale or gapped request goes the usual way (answered
                // again, refused, or a key request).
                let takes_step = matches!(self.position(), Some((pe, 3)) if ku.epoch == pe.next());
                if !takes_step {
                    return self.on_step(now, ku.epoch, Step::KeyUpdate, None, rng, out);
                }
                let step = self
                    .ratchet
                    .as_ref()
                    .and_then(|r| r.step(member, &ku.share));
                let Some(key) = step
                    .as_ref()
                    .and_then(|s| s.unwrap(&wrapped, ku.epoch, member))
                else {
                    // Signed by the controller, yet not for this node's chain: out of
                    // step (e.g. a lost reply); the key request brings it back in.
                    self.start_sync(now, rng, out, false, false);
                    return Err(Refusal::Unwrap { epoch: ku.epoch });
                };
                let next = step.map(|s| NodeRatchet {
                    chain: s.chain().clone(),
                    secret: ShareSecret::generate(rng),
                });
                let previous = std::mem::replace(&mut self.ratchet, next);
                let r = self.on_step(now, ku.epoch, Step::KeyUpdate, Some(key), rng, out);
                if r.is_err() {
                    self.ratchet = previous;
                }
                r
            }
            Message::Transition(t) => {
                self.authenticate(t.seq, &t.auth, bytes, what)?;
                self.on_step(now, t.epoch, t.step, None, rng, out)
            }
            Message::KeyResponse(r) => {
                let member = self.addressed_to_me(r.member, what)?;
                self.authenticate(r.seq, &r.auth, bytes, what)?;
                self.solicited(what, r.in_reply_to)?;
                // The key state is wrapped under a ratchet step of its own.
                let step = self
                    .ratchet
                    .as_ref()
                    .and_then(|x| x.step(member, &r.share))
                    .ok_or(Refusal::Unwrap {
                        epoch: r.state.current_epoch,
                    })?;
                let current = step
                    .unwrap(&r.state.current, r.state.current_epoch, member)
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
                let res = self.adopt(now, what, r.in_reply_to, current, round, rng, out);
                if res.is_err() {
                    self.ratchet = previous;
                }
                res
            }
            Message::HandshakeAnswer(a) => {
                match &self.handshake {
                    Some((seq, _)) if *seq == a.in_reply_to => {}
                    _ => {
                        return Err(Refusal::Unsolicited {
                            what,
                            in_reply_to: a.in_reply_to,
                        })
                    }
                }
                self.solicited(what, a.in_reply_to)?;
                let Some((_, ini)) = self.handshake.take() else {
                    return Err(Refusal::Unsolicited {
                        what,
                        in_reply_to: a.in_reply_to,
                    });
                };
                let member_hint = self.member().unwrap_or_default();
                let (payload, fin) = ini.finish(a.noise).map_err(|_| Refusal::BadMac {
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
                if self.ctl_replay.check(p.seq) != Seen::Fresh {
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
                match self.adopt(now, what, a.in_reply_to, p.current, p.round, rng, out) {
                    Ok(()) => {
                        self.ctl_replay.mark(p.seq);
                        Ok(())
                    }
                    Err(e) => {
                        self.joined = previous;
                        self.ratchet = previous_ratchet;
                        Err(e)
                    }
                }
            }
            Message::Resync(x) => {
                let member = self.addressed_to_me(x.member, what)?;
                if !self
                    .ratchet
                    .as_ref()
                    .is_some_and(|r| x.auth.verify(&r.chain))
                {
                    return Err(Refusal::BadMac { what, member });
                }
                if self.ctl_replay.check(x.seq) != Seen::Fresh {
                    return Err(Refusal::Replay { what, seq: x.seq });
                }
                self.ctl_replay.mark(x.seq);
                self.start_sync(now, rng, out, false, false);
                Ok(())
            }
            Message::Ack(_)
            | Message::KeyRequest(_)
            | Message::HandshakeInit(_)
            | Message::UsageReport(_) => Err(Refusal::Unexpected { what, role: "node" }),
        }
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

    fn on_data(&mut self, d: wire::Data<'_>, out: &mut Out) -> Result<(), Refusal> {
        let Some(ring) = &mut self.keyring else {
            return Err(Refusal::NotJoined { what: "data" });
        };
        if self.joined.as_ref().is_some_and(|j| j.member == d.sender) {
            return Ok(()); // our own message looped back by the network
        }
        let slot = self.data_replay.iter().position(|(s, _)| *s == d.sender);
        if let Some(i) = slot {
            if self.data_replay[i].1.check(d.seq) != Seen::Fresh {
                return Err(Refusal::DuplicateData {
                    sender: d.sender,
                    seq: d.seq,
                });
            }
        }
        let opened = ring
            .open(d.epoch_hint, &d.nonce, d.header, d.sealed)
            .map_err(|reason| Refusal::Undecryptable {
                sender: d.sender,
                reason,
            })?;
        match slot {
            Some(i) => self.data_replay[i].1.mark(d.seq),
            None if self.cfg.data_replay_senders > 0 => {
                let mut w = ReplayWindow::default();
                w.mark(d.seq);
                if self.data_replay.len() < self.cfg.data_replay_senders {
                    self.data_replay.push((d.sender, w));
                } else {
                    let i = self.data_replay_next % self.data_replay.len();
                    self.data_replay[i] = (d.sender, w);
                    self.data_replay_next = i + 1;
                }
            }
            None => {}
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

    fn ack(&mut self, step: Step, epoch: Epoch, out: &mut Out) {
        let (Some(member), Some(share)) = (self.member(), self.ratchet.as_ref().map(|r| r.share()))
        else {
            return;
        };
        let seq = self.next_seq(out);
        self.send_controller(wire::ack(step, epoch, seq, member, &share), out);
    }

    /// An answer must reply to a request of the sync in progress.
    fn solicited(&self, what: &'static str, in_reply_to: u64) -> Result<(), Refusal> {
        match self.sync {
            Some(s) if in_reply_to >= s.since => Ok(()),
            _ => Err(Refusal::Unsolicited { what, in_reply_to }),
        }
    }

    /// A request for step `m` of epoch `e` (after authentication). See the module docs.
    fn on_step(
        &mut self,
        now: Time,
        e: Epoch,
        m: Step,
        key: Option<GroupKey>,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), Refusal> {
        let what = match m {
            Step::KeyUpdate => "key update request",
            Step::FirstTransition => "first transition request",
            Step::SecondTransition => "second transition request",
        };
        let before = self.state();
        let (Some((pe, pq)), Some(ring)) = (self.position(), self.keyring.as_mut()) else {
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
                    if ring.key(e) != Some(k) {
                        return Err(Refusal::KeyMismatch { epoch: e });
                    }
                }
                self.ack(m, e, out);
                return Ok(());
            }
            // Forward: DC→IT, IT→UC, or DC→IT→UC (see module docs).
            if pq == 1 {
                let _ = ring.start_transit();
            }
            if q == 3 {
                let _ = ring.finish();
            }
            self.changed(before, out);
            self.ack(m, e, out);
            return Ok(());
        }
        if e == pe.next() && pq == 3 {
            match key {
                Some(k) if m == Step::KeyUpdate => {
                    ring.install_new(k)
                        .map_err(|_| Refusal::Outdated { what, epoch: e })?;
                    self.changed(before, out);
                    self.ack(m, e, out);
                    return Ok(());
                }
                _ => {
                    self.start_sync(now, rng, out, false, false);
                    return Err(Refusal::MissingKey { what, epoch: e });
                }
            }
        }
        self.start_sync(now, rng, out, false, false);
        Err(Refusal::EpochGap {
            what,
            got: e,
            have: pe,
        })
    }

    /// Record a state change: persist first, then tell the shell.
    fn changed(&mut self, from: NodeState, out: &mut Out) {
        let to = self.state();
        if from != to {
            self.persist(out);
            out.push(NodeAction::Event(NodeEvent::StateChanged { from, to }));
        }
    }

    /// Take the controller's key state (key response or handshake answer).
    #[allow(clippy::too_many_arguments)]
    /// The keys come unwrapped (from a key response's ratchet step or a
    /// handshake answer); the caller has already moved the ratchet on and
    /// puts it back if this fails.
    fn adopt(
        &mut self,
        now: Time,
        what: &'static str,
        in_reply_to: u64,
        current: GroupKey,
        round: Option<(RoundPhase, GroupKey)>,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), Refusal> {
        self.solicited(what, in_reply_to)?;
        let current_epoch = current.epoch();
        let (phase, primary, next, target) = match round {
            None => (KeyPhase::UpdateCompleted, current, None, (current_epoch, 3)),
            Some((RoundPhase::Distributing, new)) => {
                let e = new.epoch();
                (KeyPhase::DistributionCompleted, current, Some(new), (e, 1))
            }
            Some((RoundPhase::FirstTransition | RoundPhase::Draining, new)) => {
                let e = new.epoch();
                (KeyPhase::InTransit, current, Some(new), (e, 2))
            }
            Some((RoundPhase::SecondTransition, new)) => {
                let e = new.epoch();
                (KeyPhase::UpdateCompleted, new, None, (e, 3))
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
            if let Some(step) = Step::from_progress(target.1) {
                self.ack(step, target.0, out);
            }
            self.handshake = None;
            self.sync = None;
            out.push(NodeAction::Event(NodeEvent::Synced {
                state: self.state(),
            }));
            self.open_kept(out);
            for plaintext in std::mem::take(&mut self.queued) {
                self.seal_and_send(&plaintext, rng, out);
            }
            if self.usage_due.is_none() {
                self.arm_usage(now, out);
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
        if let Some(step) = Step::from_progress(target.1) {
            self.ack(step, target.0, out);
        }
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
