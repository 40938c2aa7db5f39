//! What the controller persists: its own state ([`ControllerCore`], with the
//! round in progress as [`RoundPersist`]) and one row per member
//! ([`MemberPersist`], with its side of the node's ratchet, [`MemberRatchet`]).
//!
//! Persistence is incremental: `PersistCore` (keys, round, counters) at every
//! phase change and `PersistMember` at every change of a member's row. Per-node
//! acknowledgements are not persisted: a restored controller resends the
//! current phase's request and the nodes, which never move backwards, answer again.

use super::super::triggers::TriggerReason;
use super::super::Time;
use super::{MemberStatus, PhaseDurations};
use crate::crypto::{ratchet, Chain, Epoch, GroupKey, NodeKeys, Share, ShareSecret};
use crate::wire::{NodeId, RoundPhase};
use core::net::SocketAddr;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use zeroize::Zeroize;

/// Everything needed to restore a controller: its core and the member rows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControllerPersist {
    pub core: ControllerCore,
    pub members: Vec<MemberPersist>,
}

/// The controller's own persisted state. The signing key is zeroized on drop.
#[derive(Clone, Serialize, Deserialize)]
pub struct ControllerCore {
    pub(super) signing_key: [u8; 32],
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
    pub phases_ms: PhaseDurations,
    /// Paused since (too few nodes answered); absent in revision-1 files.
    #[serde(default)]
    pub paused_at: Option<Time>,
    /// Times paused so far.
    #[serde(default)]
    pub pauses: u32,
    /// Members whose step with this round's share is not in their row yet,
    /// with the node share it was made on (see `Round::stepped`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stepped: BTreeMap<u32, Share>,
}

/// One row of the management table's node list. Key bytes zeroized on drop.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberPersist {
    pub member: u32,
    pub node_id: NodeId,
    pub addr: SocketAddr,
    pub(super) keys: NodeKeys,
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
    /// enrollment is pinned (another handshake needs [`super::ControllerInput::AllowRejoin`]).
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
    /// The chain `committed` replaced at the node's last confirmed step
    /// (none after a handshake): a reply still in flight under it is late,
    /// not forged, and a key request under it is answered, one step late (a
    /// node whose checkpointed key update a power loss took; see
    /// `auth.rs`). Written with the row, so a restarted controller still
    /// answers it (absent in rows written before session 13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Chain>,
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

impl Committed {
    /// The step the controller's share `secret` makes with this chain and
    /// node share for `member`; `None` for a node share of small order.
    pub(super) fn step_with(&self, secret: &ShareSecret, member: u32) -> Option<ratchet::Step> {
        let dh = secret.dh(&self.share)?;
        Some(ratchet::Step::derive(
            &self.chain,
            &dh,
            member,
            &secret.public(),
            &self.share,
        ))
    }
}

#[derive(Clone, Debug, Hash, Serialize, Deserialize)]
pub struct Pending {
    /// The controller's share of the step (sent with every wrap under it).
    pub share: Share,
    pub step: ratchet::Step,
}

/// Where a controller's state is kept: every shell applies the machine's
/// persist actions (`PersistCore`, `PersistMember`, `ForgetMember`) to one of
/// these with [`apply_persist`], the same actions in the same order, and
/// restores a machine from [`StateStore::load`]. Production's engines are the
/// management table's (sealed rows in SQLite or PostgreSQL, in the shell);
/// the simulator and the model checker use [`MemoryState`].
pub trait StateStore {
    type Error;
    /// Stores (replaces) the controller's own row.
    fn put_core(&mut self, core: &ControllerCore) -> Result<(), Self::Error>;
    /// Stores (inserts or replaces) one member's row.
    fn put_member(&mut self, row: &MemberPersist) -> Result<(), Self::Error>;
    /// Deletes one member's row.
    fn forget_member(&mut self, member: u32) -> Result<(), Self::Error>;
    /// Replay marks: the highest sequence number accepted from each member
    /// listed (written apart from the rows, at most every second or so while
    /// messages flow: see [`super::ControllerMachine::replay_marks`]).
    fn put_replay_marks(&mut self, marks: &[(u32, u64)]) -> Result<(), Self::Error>;
    /// Everything stored, the replay marks folded into the member rows;
    /// `None` when no controller state was ever stored.
    fn load(&mut self) -> Result<Option<ControllerPersist>, Self::Error>;
}

/// Applies the persist actions among `actions` to `store`, in order; the
/// number applied. Other actions are left alone.
pub fn apply_persist<S: StateStore + ?Sized>(
    store: &mut S,
    actions: &[super::ControllerAction],
) -> Result<usize, S::Error> {
    use super::ControllerAction as A;
    let mut n = 0;
    for a in actions {
        match a {
            A::PersistCore(c) => store.put_core(c)?,
            A::PersistMember(m) => store.put_member(m)?,
            A::ForgetMember { member } => store.forget_member(*member)?,
            _ => continue,
        }
        n += 1;
    }
    Ok(n)
}

/// Stores a whole snapshot (a first store, or a migration): the core, every
/// member row and their replay marks.
pub fn store_snapshot<S: StateStore + ?Sized>(
    store: &mut S,
    p: &ControllerPersist,
) -> Result<(), S::Error> {
    store.put_core(&p.core)?;
    let mut marks = Vec::new();
    for m in &p.members {
        store.put_member(m)?;
        if let Some(s) = m.seq_seen {
            marks.push((m.member, s));
        }
    }
    store.put_replay_marks(&marks)
}

/// A [`StateStore`] in memory (the simulator's and the tests'; nothing survives
/// the process).
#[derive(Clone, Debug, Default)]
pub struct MemoryState {
    core: Option<ControllerCore>,
    members: std::collections::BTreeMap<u32, MemberPersist>,
    marks: std::collections::BTreeMap<u32, u64>,
}

impl MemoryState {
    /// Whether a controller state was ever stored.
    pub fn is_empty(&self) -> bool {
        self.core.is_none()
    }
}

impl StateStore for MemoryState {
    type Error = core::convert::Infallible;

    fn put_core(&mut self, core: &ControllerCore) -> Result<(), Self::Error> {
        self.core = Some(core.clone());
        Ok(())
    }

    fn put_member(&mut self, row: &MemberPersist) -> Result<(), Self::Error> {
        self.members.insert(row.member, row.clone());
        Ok(())
    }

    fn forget_member(&mut self, member: u32) -> Result<(), Self::Error> {
        self.members.remove(&member);
        self.marks.remove(&member);
        Ok(())
    }

    fn put_replay_marks(&mut self, marks: &[(u32, u64)]) -> Result<(), Self::Error> {
        for &(m, s) in marks {
            let e = self.marks.entry(m).or_insert(s);
            *e = (*e).max(s);
        }
        Ok(())
    }

    fn load(&mut self) -> Result<Option<ControllerPersist>, Self::Error> {
        let Some(core) = &self.core else {
            return Ok(None);
        };
        Ok(Some(ControllerPersist {
            core: core.clone(),
            members: self
                .members
                .values()
                .map(|m| fold_mark(m.clone(), self.marks.get(&m.member).copied()))
                .collect(),
        }))
    }
}

/// A member row with the replay mark stored apart folded in (the higher wins).
pub fn fold_mark(mut row: MemberPersist, mark: Option<u64>) -> MemberPersist {
    row.seq_seen = match (row.seq_seen, mark) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    row
}
