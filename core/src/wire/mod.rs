//! Wire format: a versioned, length-checked binary encoding of every message.
//!
//! Every datagram starts with `[version][type]`, the version being the
//! revision its kind's layout last changed in ([`version_of`]: 3 for the key
//! update and transition requests and the kinds revision 3 added (the
//! notices, the timed first transition reply), 2 for every other message); all integers are
//! big-endian; every message carries an epoch and a sequence number (data
//! carries the sender's sequence number and, optionally, the epoch as a hint).
//! Controller messages end with a 64-byte Ed25519 signature over everything
//! before it; node messages end with a 16-byte HMAC-SHA256 tag under the
//! node's current MAC key, which comes from its ratchet chain
//! ([`crate::crypto::Chain`]); the enrollment handshake (0x17 / 0x09) is
//! authenticated by Noise `NNpsk0` under the node's enrollment PSK. [`decode`] checks every
//! length and returns a typed [`WireError`] — it never panics, whatever the bytes.
//!
//! | type | message | sender | body after `[ver][type]` | auth |
//! |---|---|---|---|---|
//! | 0x01 | data | node | flags u8, sender u32, seq u64, [epoch u32 if flags&1], nonce 12, ciphertext+tag ≥16 | AES-GCM (group key) |
//! | 0x02 | key update request | controller | term u32, epoch u32, seq u64, controller share 32, first u32, last u32, count u16, transition commitment 32, count × (member u32, wrapped key 60) | sig 64 |
//! | 0x03 / 0x04 | first / second transition request | controller | term u32, epoch u32, seq u64, reveal 32 | sig 64, or the reveal against the key update's commitment |
//! | 0x05 | key response | controller | term u32, epoch u32, seq u64, member u32, in_reply_to u64, controller share 32, key state | sig 64 |
//! | 0x07 | resync request | controller | term u32, epoch u32, seq u64, member u32 | mac 16 |
//! | 0x08 | beacon | controller | term u32, epoch u32, seq u64, phase u8 (0 no round, else the round phase), [round epoch u32 = epoch + 1 if phase ≠ 0], controller address (family u8: 4 → 4 bytes, 6 → 16 bytes; port u16) | sig 64 |
//! | 0x0A | share notice | controller | term u32, epoch u32, seq u64, controller share 32 (the next round's) | sig 64 |
//! | 0x0B | round notice | controller | term u32, epoch u32, seq u64, controller share 32, transition commitment 32 (the next round's) | sig 64 |
//! | 0x0C | timed round notice | controller | as 0x0B (its controller reads timed first transition replies) | sig 64 |
//! | 0x09 | handshake answer | controller | in_reply_to u64, Noise message 2 (e 32, encrypted payload, tag 16): payload = term u32, seq u64, member u32, controller public key 32, current epoch u32, current key 32, round u8 [round epoch u32, phase u8, round key 32] | Noise (psk, ee) |
//! | 0x11 / 0x12 / 0x13 | key update / first / second transition reply | node | epoch u32, seq u64, member u32, node share 32 | mac 16 |
//! | 0x18 | timed first transition reply | node | as 0x12, then held u32 (µs the request waited in the node's socket) | mac 16 |
//! | 0x14 | key request | node | epoch u32, seq u64, member u32, step u8 (the node's position: newest epoch held, last step taken in it), node share 32 | mac 16 |
//! | 0x17 | handshake init | node | seq u64, id_len u8, node id, Noise message 1 (e 32, tag 16) | Noise (psk; the header is the prologue) |
//! | 0x16 | usage report | node | epoch u32, seq u64, member u32, count u8, count × (epoch u32, seals u64, opens u64) | mac 16 |
//!
//! The shares are X25519 public keys of the per-node ratchet
//! ([`crate::crypto::ratchet`]): a node announces the share it holds the
//! secret for in every reply and key request; the controller's share of a key
//! update request (one per round) or key response makes, with the node's share,
//! the step whose wrap key wraps that node's entry. Types 0x06 (join accept)
//! and 0x15 (join) of revision 1 are gone: they were authenticated by keys
//! derived from the printed label alone.
//!
//! Key state (key response): the current key wrapped (60 bytes;
//! its epoch is the message epoch), then `round u8` (0 or 1) and, if 1, the
//! round's epoch u32, phase u8 (1 distributing, 2 first transition, 3
//! draining, 4 second transition) and the new key wrapped.
//!
//! Every controller message starts with the leader's `term` (issue 16): the
//! controller that holds the lease of a shared management table, 1 for the
//! sole controller of an embedded one. A node refuses a message of a lower
//! term than the highest it holds (`stale_term`), so a deposed leader moves
//! no node that has heard its successor; sequence numbers are counted per term.
//!
//! A beacon is the controller's signed statement of where the fleet is, sent
//! to the group at a fixed interval (Bluetooth Mesh's secure network beacon is
//! the model). While nothing changes the controller resends the same bytes, so
//! a node compares a digest instead of checking a signature; `term` is the
//! leader term (1 until a second controller exists), and `(term, seq)` orders
//! beacons so that a replayed one moves no node. The address is where the
//! controller takes unicast (0.0.0.0: the address the beacon came from).
//!
//! A transition request is checked by its reveal where the node holds the
//! round's commitment from a verified key update request: one or two SHA-256
//! instead of an Ed25519 check ([`crate::crypto::TransitionChain`]). The
//! reveal authenticates the step, the epoch and the term the commitment was
//! signed with, not the sequence number: a request taken by its reveal moves
//! no replay window and teaches the node no controller address. A node
//! without the commitment, or for another term, checks the signature.
//!
//! A message of another version than its kind's is refused with
//! [`WireError::Version`] (revision 1's all, revision 2's key update and
//! transition requests): a round needs every program of the fleet on the
//! same revision. Revision 3 added the commitment and the reveals and
//! changed nothing else, nothing persisted either; the other messages keep
//! revision 2's byte, so programs one revision apart still share group data,
//! beacons, key requests and responses while a fleet upgrades.
//!
//! A key update request is a batch of per-node entries sorted by member
//! number, at most [`MAX_BATCH_ENTRIES`] so that it fits in [`MAX_DATAGRAM`]
//! bytes; `first`/`last` let a node see from the header alone whether the
//! batch can hold its entry, before it spends a signature check.

mod replay;

pub use replay::{
    DataReplay, DataSeen, ReplayVerdict, ReplayWindow, SUSPICIOUS_JUMP, WINDOW as REPLAY_WINDOW,
};

use crate::crypto::ratchet::HANDSHAKE_INIT_LEN;
use crate::crypto::{
    Chain, Epoch, GroupKey, KeyUse, Share, WrappedKey, KEY_LEN, MAC_LEN, NONCE_LEN, REVEAL_LEN,
    SHARE_LEN, SIGNATURE_LEN, TAG_LEN, WRAPPED_LEN,
};
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// The wire revision this build speaks: the newest layout of any of its
/// messages. Each message carries the revision its own layout last changed
/// in ([`version_of`]), so that programs one revision apart still read the
/// messages both know alike (group data above all) while a fleet upgrades.
pub const VERSION: u8 = 3;

/// The revision before [`VERSION`], whose messages this build still reads
/// where their layout did not change.
pub const PREVIOUS_VERSION: u8 = 2;

/// The version byte of a message of `kind`: 3 for the key update and
/// transition requests (revision 3 added the transition chain) and the
/// kinds added in revision 3 (the share, round and timed round notices, the
/// timed first transition reply), 2 for every other message
/// (unchanged since revision 2). [`decode`] refuses a message carrying another version than
/// its kind's.
pub const fn version_of(kind: u8) -> u8 {
    match kind {
        kind::KEY_UPDATE
        | kind::FIRST_TRANSITION
        | kind::SECOND_TRANSITION
        | kind::SHARE_NOTICE
        | kind::ROUND_NOTICE
        | kind::TIMED_ROUND_NOTICE
        | kind::TIMED_FIRST_REPLY => VERSION,
        _ => PREVIOUS_VERSION,
    }
}

/// Largest datagram the controller builds (fits a 1280-byte IPv6 minimum MTU with headers).
pub const MAX_DATAGRAM: usize = 1200;
const KEY_UPDATE_FIXED: usize = 2 + 4 + 4 + 8 + SHARE_LEN + 4 + 4 + 2 + REVEAL_LEN + SIGNATURE_LEN;
/// Bytes of one key update entry: member u32 + wrapped key.
pub const ENTRY_LEN: usize = 4 + WRAPPED_LEN;
/// Most entries in one key update request datagram.
pub const MAX_BATCH_ENTRIES: usize = (MAX_DATAGRAM - KEY_UPDATE_FIXED) / ENTRY_LEN;
/// Most key-use entries in a usage report.
pub const MAX_USAGE_ENTRIES: usize = 4;

/// A decoding failure. Says what was wrong; carries the offending value.
#[derive(Debug, Error, Clone, PartialEq, Eq, Serialize)]
pub enum WireError {
    #[error("empty datagram")]
    Empty,
    #[error("wire version {0} is not supported for this message (this build speaks version 3: key update and transition requests, the share and round notices and the timed first transition reply of version 3, every other message of version 2); upgrade every keyfleet program of the fleet to the same release (the controller first is fine: agents hold their data until a version 3 controller answers them)")]
    Version(u8),
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    #[error("{what} truncated: needs {need} bytes, {have} left")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("{0} unexpected bytes after the message")]
    Trailing(usize),
    #[error("{field} has the invalid value {value}")]
    Invalid { field: &'static str, value: u64 },
    #[error("key update batch header says members {first}..={last} but its entries run {first_entry}..={last_entry}")]
    BatchRange {
        first: u32,
        last: u32,
        first_entry: u32,
        last_entry: u32,
    },
    #[error("key update entries are not in rising member order: member {member} follows member {previous}")]
    BatchOrder { previous: u32, member: u32 },
    #[error("node id invalid: {0}")]
    NodeId(#[from] NodeIdError),
}

/// Why a node id was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq, Serialize)]
pub enum NodeIdError {
    #[error("a node id has 1 to 64 characters, this one has {0}")]
    Length(usize),
    #[error("a node id uses only A-Z a-z 0-9 . _ - ; found {0:?}")]
    Character(char),
}

/// The name a node is enrolled under: 1–64 characters of `A-Z a-z 0-9 . _ -`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(Box<str>);

impl NodeId {
    pub fn parse(s: &str) -> Result<NodeId, NodeIdError> {
        if s.is_empty() || s.len() > 64 {
            return Err(NodeIdError::Length(s.chars().count()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NodeIdError::Character(c));
        }
        Ok(NodeId(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = NodeIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        NodeId::parse(&s)
    }
}

impl From<NodeId> for String {
    fn from(n: NodeId) -> String {
        n.0.into()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// The phase of the controller's rekey round (SPEC §2): the one vocabulary
/// for it on the wire (its number), in the management table, in every JSON
/// output and in the CLI's text ([`RoundPhase::as_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundPhase {
    /// Key update requests out; waiting for every key update reply.
    #[serde(alias = "Distributing")]
    Distributing = 1,
    /// First transition request out; waiting for every reply.
    #[serde(alias = "FirstTransition")]
    FirstTransition = 2,
    /// Everyone seals with the new key; waiting the drain grace.
    #[serde(alias = "Draining")]
    Draining = 3,
    /// Second transition request out; waiting for every reply.
    #[serde(alias = "SecondTransition")]
    SecondTransition = 4,
}

impl RoundPhase {
    /// Every phase, in the order a round goes through them.
    pub const ALL: [RoundPhase; 4] = [
        RoundPhase::Distributing,
        RoundPhase::FirstTransition,
        RoundPhase::Draining,
        RoundPhase::SecondTransition,
    ];

    /// The phase's name: `distributing`, `first_transition`, `draining`,
    /// `second_transition` (serde writes the same; it also reads the
    /// capitalised names that state files written before them hold).
    pub fn as_str(self) -> &'static str {
        match self {
            RoundPhase::Distributing => "distributing",
            RoundPhase::FirstTransition => "first_transition",
            RoundPhase::Draining => "draining",
            RoundPhase::SecondTransition => "second_transition",
        }
    }

    /// The phase named `s` by [`RoundPhase::as_str`].
    pub fn from_name(s: &str) -> Option<RoundPhase> {
        RoundPhase::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub(crate) fn from_u8(v: u8) -> Result<RoundPhase, WireError> {
        Ok(match v {
            1 => RoundPhase::Distributing,
            2 => RoundPhase::FirstTransition,
            3 => RoundPhase::Draining,
            4 => RoundPhase::SecondTransition,
            _ => {
                return Err(WireError::Invalid {
                    field: "round phase",
                    value: v.into(),
                })
            }
        })
    }
}

impl fmt::Display for RoundPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A step of a round, as requested by the controller and confirmed by a node.
/// Its number is the node's progress in the round once it has taken the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Step {
    /// Key update request / reply: the node holds the new key.
    KeyUpdate = 1,
    /// First transition request / reply: the node seals with the new key.
    FirstTransition = 2,
    /// Second transition request / reply: the node dropped the old key.
    SecondTransition = 3,
}

impl Step {
    pub fn progress(self) -> u8 {
        self as u8
    }
    pub fn from_progress(p: u8) -> Option<Step> {
        match p {
            1 => Some(Step::KeyUpdate),
            2 => Some(Step::FirstTransition),
            3 => Some(Step::SecondTransition),
            _ => None,
        }
    }
}

/// Every message kind [`decode`] reads.
const KNOWN_KINDS: [u8; 18] = [
    kind::DATA,
    kind::KEY_UPDATE,
    kind::FIRST_TRANSITION,
    kind::SECOND_TRANSITION,
    kind::KEY_RESPONSE,
    kind::RESYNC,
    kind::HANDSHAKE_ANSWER,
    kind::BEACON,
    kind::SHARE_NOTICE,
    kind::ROUND_NOTICE,
    kind::KEY_UPDATE_REPLY,
    kind::FIRST_REPLY,
    kind::SECOND_REPLY,
    kind::KEY_REQUEST,
    kind::USAGE_REPORT,
    kind::HANDSHAKE_INIT,
    kind::TIMED_ROUND_NOTICE,
    kind::TIMED_FIRST_REPLY,
];

/// Message type codes.
pub mod kind {
    pub const DATA: u8 = 0x01;
    pub const KEY_UPDATE: u8 = 0x02;
    pub const FIRST_TRANSITION: u8 = 0x03;
    pub const SECOND_TRANSITION: u8 = 0x04;
    pub const KEY_RESPONSE: u8 = 0x05;
    pub const RESYNC: u8 = 0x07;
    pub const HANDSHAKE_ANSWER: u8 = 0x09;
    pub const BEACON: u8 = 0x08;
    pub const SHARE_NOTICE: u8 = 0x0A;
    pub const ROUND_NOTICE: u8 = 0x0B;
    /// A round notice from a controller that reads timed first transition
    /// replies (session 14): the same layout as [`ROUND_NOTICE`].
    pub const TIMED_ROUND_NOTICE: u8 = 0x0C;
    pub const KEY_UPDATE_REPLY: u8 = 0x11;
    pub const FIRST_REPLY: u8 = 0x12;
    pub const SECOND_REPLY: u8 = 0x13;
    pub const KEY_REQUEST: u8 = 0x14;
    pub const USAGE_REPORT: u8 = 0x16;
    pub const HANDSHAKE_INIT: u8 = 0x17;
    /// A first transition reply that says how long the request waited at the
    /// node (session 14; only to a controller that sent a timed round notice).
    pub const TIMED_FIRST_REPLY: u8 = 0x18;
}

/// The signed part of a controller message and its signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signed<'a> {
    pub body: &'a [u8],
    pub signature: [u8; SIGNATURE_LEN],
}

/// The MAC'd part of a node message and its tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Maced<'a> {
    pub body: &'a [u8],
    pub tag: [u8; MAC_LEN],
}

impl Maced<'_> {
    pub fn verify(&self, chain: &Chain) -> bool {
        chain.verify_mac(self.body, &self.tag)
    }
}

/// A group data message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Data<'a> {
    pub sender: u32,
    pub seq: u64,
    pub epoch_hint: Option<Epoch>,
    pub nonce: [u8; NONCE_LEN],
    /// Everything before the ciphertext: the AES-GCM associated data.
    pub header: &'a [u8],
    pub sealed: &'a [u8],
}

/// A batch of key update entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyUpdate<'a> {
    /// The leader term.
    pub term: u32,
    pub epoch: Epoch,
    pub seq: u64,
    /// The controller's X25519 share for this round's ratchet step.
    pub share: Share,
    pub first: u32,
    pub last: u32,
    /// The round's transition chain commitment (`crypto::TransitionChain`):
    /// a node that took this request checks the round's transition
    /// requests by their reveals.
    pub commit: [u8; REVEAL_LEN],
    entries: &'a [u8],
    pub auth: Signed<'a>,
}

impl KeyUpdate<'_> {
    /// Whether the header alone rules out an entry for `member`.
    pub fn may_hold(&self, member: u32) -> bool {
        (self.first..=self.last).contains(&member)
    }

    pub fn len(&self) -> usize {
        self.entries.len() / ENTRY_LEN
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn entry_at(&self, i: usize) -> Option<(u32, WrappedKey)> {
        let e = self.entries.get(i * ENTRY_LEN..(i + 1) * ENTRY_LEN)?;
        let member = u32::from_be_bytes(e.get(..4)?.try_into().ok()?);
        let wrapped = WrappedKey(e.get(4..)?.try_into().ok()?);
        Some((member, wrapped))
    }

    /// The entries in order.
    pub fn entries(&self) -> impl Iterator<Item = (u32, WrappedKey)> + '_ {
        (0..self.len()).filter_map(|i| self.entry_at(i))
    }

    /// The entry for `member` (binary search; the controller sorts entries).
    pub fn entry_for(&self, member: u32) -> Option<WrappedKey> {
        if !self.may_hold(member) {
            return None;
        }
        let (mut lo, mut hi) = (0usize, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (m, w) = self.entry_at(mid)?;
            match m.cmp(&member) {
                std::cmp::Ordering::Equal => return Some(w),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        None
    }
}

/// First or second transition request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition<'a> {
    pub term: u32,
    pub step: Step,
    pub epoch: Epoch,
    pub seq: u64,
    /// The round's transition chain value of this step
    /// (`crypto::reveal_holds` against the key update's `commit`).
    pub reveal: [u8; REVEAL_LEN],
    pub auth: Signed<'a>,
}

/// The round in progress, as a key response describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundState {
    pub epoch: Epoch,
    pub phase: RoundPhase,
    pub wrapped: WrappedKey,
}

/// The keys and round state a controller gives a node that (re)joins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyState {
    pub current_epoch: Epoch,
    pub current: WrappedKey,
    pub round: Option<RoundState>,
}

/// Answer to a key request (SPEC §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyResponse<'a> {
    pub term: u32,
    pub seq: u64,
    pub member: u32,
    pub in_reply_to: u64,
    /// The controller's X25519 share of the step the key state is wrapped under.
    pub share: Share,
    pub state: KeyState,
    pub auth: Signed<'a>,
}

/// The controller's answer to a handshake init: Noise message 2, whose
/// payload ([`AnswerPayload`]) only the node that sent the init can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeAnswer<'a> {
    pub in_reply_to: u64,
    pub noise: &'a [u8],
}

/// The keys and round state of a handshake answer, in the clear inside the
/// Noise payload (which encrypts and authenticates them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnswerPayload {
    /// The leader term (inside the payload: Noise authenticates it).
    pub term: u32,
    pub seq: u64,
    pub member: u32,
    pub controller_key: [u8; 32],
    pub current: GroupKey,
    pub round: Option<(RoundPhase, GroupKey)>,
}

/// Most bytes of a handshake answer's Noise message.
const ANSWER_NOISE_MAX: usize = 32 + 4 + 8 + 4 + 32 + 4 + KEY_LEN + 1 + 4 + 1 + KEY_LEN + 16;
const ANSWER_NOISE_MIN: usize = 32 + 4 + 8 + 4 + 32 + 4 + KEY_LEN + 1 + 16;

/// The controller tells a node it is out of step (stale, or its reply did not
/// match the round) and should ask for the current key. MAC'd with the node's
/// key: cheap for both sides, and only that node can act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resync<'a> {
    pub term: u32,
    pub epoch: Epoch,
    pub seq: u64,
    pub member: u32,
    pub auth: Maced<'a>,
}

/// The controller's periodic beacon: where the fleet is (SPEC §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beacon<'a> {
    /// The leader term (1 until a second controller exists).
    pub term: u32,
    /// The current epoch.
    pub epoch: Epoch,
    pub seq: u64,
    /// The round in progress: its epoch (always `epoch + 1`) and phase.
    pub round: Option<(Epoch, RoundPhase)>,
    /// Where the controller takes unicast; an unspecified IP means the
    /// address the beacon came from.
    pub controller: SocketAddr,
    pub auth: Signed<'a>,
}

/// The controller's share for the next round, announced ahead of the round
/// (revision 3; the controller's `ahead.rs`): a node makes its X25519 with it
/// while idle, and the key update request, which carries the same share,
/// finds that work done. A round notice (0x0B, since session 13; what the
/// controller sends) carries the round's transition commitment too, and
/// then vouches for the key update's header: a node level with it takes a
/// key update that carries the same share and commitment, and whose entry
/// opens under the step, without a signature check (the node's
/// `prepare.rs`). A share notice (0x0A) is still read. Nothing else rests on
/// either: a node that never hears one checks the key update's signature and
/// makes the X25519 when it comes, as before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShareNotice<'a> {
    pub term: u32,
    /// The controller's current epoch: the announced round is for the next.
    pub epoch: Epoch,
    pub seq: u64,
    pub share: Share,
    /// The transition commitment of the round (a round notice); `None` for a share notice.
    pub commit: Option<[u8; REVEAL_LEN]>,
    /// A timed round notice (0x0C): its controller reads the first
    /// transition replies that say how long the request waited at the node
    /// ([`Ack::held_us`]), and measures the drain from the network's part of
    /// the round trip.
    pub timed: bool,
    pub auth: Signed<'a>,
}

/// A node's reply to a key update or transition request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack<'a> {
    pub step: Step,
    pub epoch: Epoch,
    pub seq: u64,
    pub member: u32,
    /// The node's current X25519 share (for its next ratchet step).
    pub share: Share,
    /// A timed first transition reply (0x18): how long the request waited at
    /// the node, in µs, from its socket's receive timestamp to the machine
    /// that answered (queued behind other work, not in flight).
    pub held_us: Option<u32>,
    pub auth: Maced<'a>,
}

/// A node asks for the current key (SPEC §5). `epoch` and `step` are its
/// position: the newest epoch it holds and the last step it took in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRequest<'a> {
    pub epoch: Epoch,
    pub step: Step,
    pub seq: u64,
    pub member: u32,
    /// The node's current X25519 share (the answer's step uses it).
    pub share: Share,
    pub auth: Maced<'a>,
}

/// A node starts the enrollment handshake under its enrolled id. `prologue`
/// (everything before the Noise message) is authenticated by it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeInit<'a> {
    pub seq: u64,
    pub node_id: NodeId,
    pub noise: [u8; HANDSHAKE_INIT_LEN],
    pub prologue: &'a [u8],
}

/// A node's seal/open counters per key, for the count triggers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageReport<'a> {
    pub epoch: Epoch,
    pub seq: u64,
    pub member: u32,
    pub uses: Vec<KeyUse>,
    pub auth: Maced<'a>,
}

/// Any decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Data(Data<'a>),
    KeyUpdate(KeyUpdate<'a>),
    Transition(Transition<'a>),
    KeyResponse(KeyResponse<'a>),
    HandshakeAnswer(HandshakeAnswer<'a>),
    Resync(Resync<'a>),
    Beacon(Beacon<'a>),
    ShareNotice(ShareNotice<'a>),
    Ack(Ack<'a>),
    KeyRequest(KeyRequest<'a>),
    HandshakeInit(HandshakeInit<'a>),
    UsageReport(UsageReport<'a>),
}

impl Message<'_> {
    /// A short name for logs and refusals.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Data(_) => "data",
            Message::KeyUpdate(_) => "key update request",
            Message::Transition(t) if t.step == Step::FirstTransition => "first transition request",
            Message::Transition(_) => "second transition request",
            Message::KeyResponse(_) => "key response",
            Message::HandshakeAnswer(_) => "handshake answer",
            Message::Resync(_) => "resync request",
            Message::Beacon(_) => "beacon",
            Message::ShareNotice(_) => "share notice",
            Message::Ack(a) => match a.step {
                Step::KeyUpdate => "key update reply",
                Step::FirstTransition => "first transition reply",
                Step::SecondTransition => "second transition reply",
            },
            Message::KeyRequest(_) => "key request",
            Message::HandshakeInit(_) => "handshake init",
            Message::UsageReport(_) => "usage report",
        }
    }
}

// ---------------------------------------------------------------- decoding

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let have = self.buf.len().saturating_sub(self.pos);
        let s = self
            .buf
            .get(self.pos..self.pos.saturating_add(n))
            .ok_or(WireError::Truncated {
                what,
                need: n,
                have,
            })?;
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    /// A leader term: 1 or more (the first leader's term is 1).
    fn term(&mut self) -> Result<u32, WireError> {
        match self.u32("term")? {
            0 => Err(WireError::Invalid {
                field: "term",
                value: 0,
            }),
            t => Ok(t),
        }
    }
    fn epoch(&mut self) -> Result<Epoch, WireError> {
        Ok(Epoch(self.u32("epoch")?))
    }
    fn share(&mut self, what: &'static str) -> Result<Share, WireError> {
        Ok(Share(self.array(what)?))
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = self.buf.get(self.pos..).unwrap_or_default();
        self.pos = self.buf.len();
        s
    }
    fn done(&self) -> Result<(), WireError> {
        match self.buf.len().saturating_sub(self.pos) {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
    fn key_state(&mut self, current_epoch: Epoch) -> Result<KeyState, WireError> {
        let current = WrappedKey(self.array("wrapped current key")?);
        let round = match self.u8("round flag")? {
            0 => None,
            1 => {
                let epoch = Epoch(self.u32("round epoch")?);
                let phase = RoundPhase::from_u8(self.u8("round phase")?)?;
                let wrapped = WrappedKey(self.array("wrapped round key")?);
                Some(RoundState {
                    epoch,
                    phase,
                    wrapped,
                })
            }
            v => {
                return Err(WireError::Invalid {
                    field: "round flag",
                    value: v.into(),
                })
            }
        };
        Ok(KeyState {
            current_epoch,
            current,
            round,
        })
    }
}

/// Split off a trailing authenticator of `N` bytes.
fn split_auth<'a, const N: usize>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<(&'a [u8], [u8; N]), WireError> {
    if bytes.len() < 2 + N {
        return Err(WireError::Truncated {
            what,
            need: 2 + N,
            have: bytes.len(),
        });
    }
    let (body, tail) = bytes.split_at(bytes.len() - N);
    let mut a = [0u8; N];
    a.copy_from_slice(tail);
    Ok((body, a))
}

/// Decode one datagram. Never panics; every failure is a [`WireError`].
pub fn decode(bytes: &[u8]) -> Result<Message<'_>, WireError> {
    let (&version, rest) = bytes.split_first().ok_or(WireError::Empty)?;
    if version != VERSION && version != PREVIOUS_VERSION {
        return Err(WireError::Version(version));
    }
    let &ty = rest.first().ok_or(WireError::Truncated {
        what: "message type",
        need: 1,
        have: 0,
    })?;
    if KNOWN_KINDS.contains(&ty) && version != version_of(ty) {
        return Err(WireError::Version(version));
    }
    match ty {
        kind::DATA => decode_data(bytes).map(Message::Data),
        kind::BEACON => decode_beacon(bytes).map(Message::Beacon),
        kind::KEY_UPDATE
        | kind::FIRST_TRANSITION
        | kind::SECOND_TRANSITION
        | kind::SHARE_NOTICE
        | kind::ROUND_NOTICE
        | kind::TIMED_ROUND_NOTICE
        | kind::KEY_RESPONSE => {
            let (body, signature) = split_auth::<SIGNATURE_LEN>(bytes, "signature")?;
            let auth = Signed { body, signature };
            let mut r = Reader { buf: body, pos: 2 };
            let term = r.term()?;
            let epoch = r.epoch()?;
            let seq = r.u64("sequence number")?;
            let msg = match ty {
                kind::KEY_UPDATE => {
                    let share = r.share("controller share")?;
                    let first = r.u32("first member")?;
                    let last = r.u32("last member")?;
                    let count = r.u16("entry count")? as usize;
                    let commit = r.array::<REVEAL_LEN>("transition commitment")?;
                    let entries = r.take(count * ENTRY_LEN, "key update entries")?;
                    let ku = KeyUpdate {
                        term,
                        epoch,
                        seq,
                        share,
                        first,
                        last,
                        commit,
                        entries,
                        auth,
                    };
                    if count == 0 {
                        return Err(WireError::Invalid {
                            field: "entry count",
                            value: 0,
                        });
                    }
                    let fe = ku.entry_at(0).map(|e| e.0).unwrap_or_default();
                    let le = ku.entry_at(count - 1).map(|e| e.0).unwrap_or_default();
                    if fe != first || le != last {
                        return Err(WireError::BatchRange {
                            first,
                            last,
                            first_entry: fe,
                            last_entry: le,
                        });
                    }
                    // Sorted and without repeats: a node finds its entry by
                    // binary search, and one batch has one byte string.
                    let members = (0..count).filter_map(|i| ku.entry_at(i).map(|e| e.0));
                    let mut previous = None;
                    for member in members {
                        if let Some(p) = previous.filter(|p| member <= *p) {
                            return Err(WireError::BatchOrder {
                                previous: p,
                                member,
                            });
                        }
                        previous = Some(member);
                    }
                    Message::KeyUpdate(ku)
                }
                kind::FIRST_TRANSITION | kind::SECOND_TRANSITION => {
                    let step = if ty == kind::FIRST_TRANSITION {
                        Step::FirstTransition
                    } else {
                        Step::SecondTransition
                    };
                    let reveal = r.array::<REVEAL_LEN>("transition reveal")?;
                    Message::Transition(Transition {
                        term,
                        step,
                        epoch,
                        seq,
                        reveal,
                        auth,
                    })
                }
                kind::SHARE_NOTICE | kind::ROUND_NOTICE | kind::TIMED_ROUND_NOTICE => {
                    let share = r.share("controller share")?;
                    let commit = if ty != kind::SHARE_NOTICE {
                        Some(r.array::<REVEAL_LEN>("transition commitment")?)
                    } else {
                        None
                    };
                    Message::ShareNotice(ShareNotice {
                        term,
                        epoch,
                        seq,
                        share,
                        commit,
                        timed: ty == kind::TIMED_ROUND_NOTICE,
                        auth,
                    })
                }
                _ => {
                    let member = r.u32("member")?;
                    let in_reply_to = r.u64("in reply to")?;
                    let share = r.share("controller share")?;
                    let state = r.key_state(epoch)?;
                    Message::KeyResponse(KeyResponse {
                        term,
                        seq,
                        member,
                        in_reply_to,
                        share,
                        state,
                        auth,
                    })
                }
            };
            r.done()?;
            Ok(msg)
        }
        kind::HANDSHAKE_INIT => decode_handshake_init(bytes).map(Message::HandshakeInit),
        kind::HANDSHAKE_ANSWER => {
            let mut r = Reader { buf: bytes, pos: 2 };
            let in_reply_to = r.u64("in reply to")?;
            let noise = r.rest();
            if noise.len() < ANSWER_NOISE_MIN || noise.len() > ANSWER_NOISE_MAX {
                return Err(WireError::Invalid {
                    field: "handshake answer length",
                    value: noise.len() as u64,
                });
            }
            Ok(Message::HandshakeAnswer(HandshakeAnswer {
                in_reply_to,
                noise,
            }))
        }
        kind::RESYNC
        | kind::KEY_UPDATE_REPLY
        | kind::FIRST_REPLY
        | kind::TIMED_FIRST_REPLY
        | kind::SECOND_REPLY
        | kind::KEY_REQUEST
        | kind::USAGE_REPORT => {
            let (body, tag) = split_auth::<MAC_LEN>(bytes, "mac")?;
            let auth = Maced { body, tag };
            let mut r = Reader { buf: body, pos: 2 };
            // The controller's MAC'd messages carry the leader term; node messages do not.
            let term = if ty == kind::RESYNC { r.term()? } else { 0 };
            let epoch = r.epoch()?;
            let seq = r.u64("sequence number")?;
            let msg = match ty {
                kind::KEY_UPDATE_REPLY
                | kind::FIRST_REPLY
                | kind::TIMED_FIRST_REPLY
                | kind::SECOND_REPLY => {
                    let step = match ty {
                        kind::KEY_UPDATE_REPLY => Step::KeyUpdate,
                        kind::FIRST_REPLY | kind::TIMED_FIRST_REPLY => Step::FirstTransition,
                        _ => Step::SecondTransition,
                    };
                    let member = r.u32("member")?;
                    let share = r.share("node share")?;
                    let held_us = if ty == kind::TIMED_FIRST_REPLY {
                        Some(r.u32("held")?)
                    } else {
                        None
                    };
                    Message::Ack(Ack {
                        step,
                        epoch,
                        seq,
                        member,
                        share,
                        held_us,
                        auth,
                    })
                }
                kind::RESYNC => {
                    let member = r.u32("member")?;
                    Message::Resync(Resync {
                        term,
                        epoch,
                        seq,
                        member,
                        auth,
                    })
                }
                kind::KEY_REQUEST => {
                    let member = r.u32("member")?;
                    let p = r.u8("step")?;
                    let step = Step::from_progress(p).ok_or(WireError::Invalid {
                        field: "step",
                        value: p.into(),
                    })?;
                    let share = r.share("node share")?;
                    Message::KeyRequest(KeyRequest {
                        epoch,
                        step,
                        seq,
                        member,
                        share,
                        auth,
                    })
                }
                _ => {
                    let member = r.u32("member")?;
                    let count = r.u8("usage entry count")? as usize;
                    if count > MAX_USAGE_ENTRIES {
                        return Err(WireError::Invalid {
                            field: "usage entry count",
                            value: count as u64,
                        });
                    }
                    let mut uses = Vec::with_capacity(count);
                    for _ in 0..count {
                        let epoch = r.epoch()?;
                        let seals = r.u64("seals")?;
                        let opens = r.u64("opens")?;
                        uses.push(KeyUse {
                            epoch,
                            seals,
                            opens,
                        });
                    }
                    Message::UsageReport(UsageReport {
                        epoch,
                        seq,
                        member,
                        uses,
                        auth,
                    })
                }
            };
            r.done()?;
            Ok(msg)
        }
        other => Err(WireError::UnknownType(other)),
    }
}

fn decode_handshake_init(bytes: &[u8]) -> Result<HandshakeInit<'_>, WireError> {
    let mut r = Reader { buf: bytes, pos: 2 };
    let seq = r.u64("sequence number")?;
    let len = r.u8("node id length")? as usize;
    let raw = r.take(len, "node id")?;
    let s = std::str::from_utf8(raw).map_err(|_| WireError::Invalid {
        field: "node id utf-8",
        value: len as u64,
    })?;
    let node_id = NodeId::parse(s)?;
    let prologue = bytes.get(..r.pos).unwrap_or_default();
    let noise = r.array("handshake message")?;
    r.done()?;
    Ok(HandshakeInit {
        seq,
        node_id,
        noise,
        prologue,
    })
}

/// Decode the payload of a handshake answer (after Noise opened it).
pub fn decode_answer_payload(p: &[u8]) -> Result<AnswerPayload, WireError> {
    let mut r = Reader { buf: p, pos: 0 };
    let term = r.term()?;
    let seq = r.u64("sequence number")?;
    let member = r.u32("member")?;
    let controller_key = r.array("controller public key")?;
    let current_epoch = r.epoch()?;
    let current = GroupKey::from_bytes(current_epoch, r.array("current key")?);
    let round = match r.u8("round flag")? {
        0 => None,
        1 => {
            let epoch = Epoch(r.u32("round epoch")?);
            let phase = RoundPhase::from_u8(r.u8("round phase")?)?;
            Some((phase, GroupKey::from_bytes(epoch, r.array("round key")?)))
        }
        v => {
            return Err(WireError::Invalid {
                field: "round flag",
                value: v.into(),
            })
        }
    };
    r.done()?;
    Ok(AnswerPayload {
        term,
        seq,
        member,
        controller_key,
        current,
        round,
    })
}

/// The payload of a handshake answer (encrypted by Noise before it is sent).
pub fn answer_payload(p: &AnswerPayload) -> zeroize::Zeroizing<Vec<u8>> {
    let w = Writer(Vec::with_capacity(128))
        .u32(p.term)
        .u64(p.seq)
        .u32(p.member)
        .bytes(&p.controller_key)
        .u32(p.current.epoch().0)
        .bytes(p.current.bytes());
    let w = match &p.round {
        None => w.u8(0),
        Some((phase, k)) => w.u8(1).u32(k.epoch().0).u8(*phase as u8).bytes(k.bytes()),
    };
    zeroize::Zeroizing::new(w.0)
}

/// The header of a handshake init (its Noise prologue); append the Noise message.
pub fn handshake_init_header(seq: u64, node_id: &NodeId) -> Vec<u8> {
    let id = node_id.as_str().as_bytes();
    Writer::new(kind::HANDSHAKE_INIT, 16 + id.len() + HANDSHAKE_INIT_LEN)
        .u64(seq)
        .u8(id.len() as u8)
        .bytes(id)
        .0
}

/// A whole handshake answer.
pub fn handshake_answer(in_reply_to: u64, noise: &[u8]) -> Vec<u8> {
    Writer::new(kind::HANDSHAKE_ANSWER, 10 + noise.len())
        .u64(in_reply_to)
        .bytes(noise)
        .0
}

fn decode_beacon(bytes: &[u8]) -> Result<Beacon<'_>, WireError> {
    let (body, signature) = split_auth::<SIGNATURE_LEN>(bytes, "signature")?;
    let auth = Signed { body, signature };
    let mut r = Reader { buf: body, pos: 2 };
    let term = r.term()?;
    let epoch = r.epoch()?;
    let seq = r.u64("sequence number")?;
    let round = match r.u8("round phase")? {
        0 => None,
        p => {
            let phase = RoundPhase::from_u8(p)?;
            let re = Epoch(r.u32("round epoch")?);
            // One byte string per meaning: a round is always for the next epoch.
            if re != epoch.next() || re == epoch {
                return Err(WireError::Invalid {
                    field: "round epoch",
                    value: re.0.into(),
                });
            }
            Some((re, phase))
        }
    };
    let ip = match r.u8("address family")? {
        4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>("IPv4 address")?)),
        6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>("IPv6 address")?)),
        f => {
            return Err(WireError::Invalid {
                field: "address family",
                value: f.into(),
            })
        }
    };
    let port = r.u16("port")?;
    r.done()?;
    Ok(Beacon {
        term,
        epoch,
        seq,
        round,
        controller: SocketAddr::new(ip, port),
        auth,
    })
}

fn decode_data(bytes: &[u8]) -> Result<Data<'_>, WireError> {
    let mut r = Reader { buf: bytes, pos: 2 };
    let flags = r.u8("data flags")?;
    if flags & !1 != 0 {
        return Err(WireError::Invalid {
            field: "data flags",
            value: flags.into(),
        });
    }
    let sender = r.u32("sender")?;
    let seq = r.u64("sequence number")?;
    let epoch_hint = if flags & 1 == 1 {
        Some(r.epoch()?)
    } else {
        None
    };
    let nonce = r.array("nonce")?;
    let header = bytes.get(..r.pos).unwrap_or_default();
    let sealed = r.rest();
    if sealed.len() < TAG_LEN {
        return Err(WireError::Truncated {
            what: "sealed data",
            need: TAG_LEN,
            have: sealed.len(),
        });
    }
    Ok(Data {
        sender,
        seq,
        epoch_hint,
        nonce,
        header,
        sealed,
    })
}

// ---------------------------------------------------------------- encoding

struct Writer(Vec<u8>);

impl Writer {
    fn new(ty: u8, cap: usize) -> Writer {
        let mut v = Vec::with_capacity(cap);
        v.push(version_of(ty));
        v.push(ty);
        Writer(v)
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn key_state(self, s: &KeyState) -> Self {
        let w = self.bytes(&s.current.0);
        match &s.round {
            None => w.u8(0),
            Some(r) => w.u8(1).u32(r.epoch.0).u8(r.phase as u8).bytes(&r.wrapped.0),
        }
    }
}

/// Where a data message's sender (a big-endian `u32`) starts: after the
/// version, the kind and the flags byte. For a filter in front of the decoder
/// (an agent drops its own data looped back by the network in the kernel).
pub const DATA_SENDER_AT: usize = 3;

/// Where a key update request's member range starts: the first member of
/// its batch, then the last (big-endian `u32`s), after the version, the
/// kind, the term, the epoch, the sequence number and the round's share. For
/// a filter in front of the decoder (an agent has the kernel drop the
/// batches that cannot hold its entry).
pub const KEY_UPDATE_RANGE_AT: usize = 2 + 4 + 4 + 8 + SHARE_LEN;

/// The header of a data message (the AES-GCM associated data); append the sealed payload.
pub fn data_header(
    sender: u32,
    seq: u64,
    epoch_hint: Option<Epoch>,
    nonce: &[u8; NONCE_LEN],
) -> Vec<u8> {
    let w = Writer::new(kind::DATA, 64)
        .u8(u8::from(epoch_hint.is_some()))
        .u32(sender)
        .u64(seq);
    let w = match epoch_hint {
        Some(e) => w.u32(e.0),
        None => w,
    };
    w.bytes(nonce).0
}

/// Body of a key update request of leader `term`; `entries` sorted by member, 1..=[`MAX_BATCH_ENTRIES`].
pub fn key_update(
    term: u32,
    epoch: Epoch,
    seq: u64,
    share: &Share,
    commit: &[u8; REVEAL_LEN],
    entries: &[(u32, WrappedKey)],
) -> Vec<u8> {
    let first = entries.first().map(|e| e.0).unwrap_or_default();
    let last = entries.last().map(|e| e.0).unwrap_or_default();
    let mut w = Writer::new(
        kind::KEY_UPDATE,
        KEY_UPDATE_FIXED + entries.len() * ENTRY_LEN,
    )
    .u32(term)
    .u32(epoch.0)
    .u64(seq)
    .bytes(&share.0)
    .u32(first)
    .u32(last)
    .u16(entries.len() as u16)
    .bytes(commit);
    for (m, wk) in entries {
        w = w.u32(*m).bytes(&wk.0);
    }
    w.0
}

/// Body of a first or second transition request, with its step's value of
/// the round's transition chain.
pub fn transition(
    term: u32,
    step: Step,
    epoch: Epoch,
    seq: u64,
    reveal: &[u8; REVEAL_LEN],
) -> Vec<u8> {
    let ty = match step {
        Step::SecondTransition => kind::SECOND_TRANSITION,
        _ => kind::FIRST_TRANSITION,
    };
    Writer::new(ty, 120)
        .u32(term)
        .u32(epoch.0)
        .u64(seq)
        .bytes(reveal)
        .0
}

/// Body of a key response.
pub fn key_response(
    term: u32,
    seq: u64,
    member: u32,
    in_reply_to: u64,
    share: &Share,
    state: &KeyState,
) -> Vec<u8> {
    Writer::new(kind::KEY_RESPONSE, 280)
        .u32(term)
        .u32(state.current_epoch.0)
        .u64(seq)
        .u32(member)
        .u64(in_reply_to)
        .bytes(&share.0)
        .key_state(state)
        .0
}

/// Body of a resync request.
pub fn resync(term: u32, epoch: Epoch, seq: u64, member: u32) -> Vec<u8> {
    Writer::new(kind::RESYNC, 40)
        .u32(term)
        .u32(epoch.0)
        .u64(seq)
        .u32(member)
        .0
}

/// Body of a beacon (sign it with [`sign`]). `round` is the round in progress,
/// whose epoch must be `epoch + 1`.
pub fn beacon(
    term: u32,
    epoch: Epoch,
    seq: u64,
    round: Option<(Epoch, RoundPhase)>,
    controller: SocketAddr,
) -> Vec<u8> {
    let w = Writer::new(kind::BEACON, 120)
        .u32(term)
        .u32(epoch.0)
        .u64(seq);
    let w = match round {
        None => w.u8(0),
        Some((e, p)) => w.u8(p as u8).u32(e.0),
    };
    let w = match controller.ip() {
        IpAddr::V4(a) => w.u8(4).bytes(&a.octets()),
        IpAddr::V6(a) => w.u8(6).bytes(&a.octets()),
    };
    w.u16(controller.port()).0
}

/// Body of a share notice ([`ShareNotice`]); sign it with [`sign`].
pub fn share_notice(term: u32, epoch: Epoch, seq: u64, share: &Share) -> Vec<u8> {
    Writer::new(
        kind::SHARE_NOTICE,
        2 + 4 + 4 + 8 + SHARE_LEN + SIGNATURE_LEN,
    )
    .u32(term)
    .u32(epoch.0)
    .u64(seq)
    .bytes(&share.0)
    .0
}

/// Body of a round notice ([`ShareNotice`] with the transition commitment of
/// the round after `epoch`); sign it with [`sign`].
pub fn round_notice(
    term: u32,
    epoch: Epoch,
    seq: u64,
    share: &Share,
    commit: &[u8; REVEAL_LEN],
) -> Vec<u8> {
    notice_with_commit(kind::ROUND_NOTICE, term, epoch, seq, share, commit)
}

/// Body of a timed round notice (0x0C: a [`round_notice`] from a controller
/// that reads timed first transition replies); sign it with [`sign`].
pub fn timed_round_notice(
    term: u32,
    epoch: Epoch,
    seq: u64,
    share: &Share,
    commit: &[u8; REVEAL_LEN],
) -> Vec<u8> {
    notice_with_commit(kind::TIMED_ROUND_NOTICE, term, epoch, seq, share, commit)
}

fn notice_with_commit(
    ty: u8,
    term: u32,
    epoch: Epoch,
    seq: u64,
    share: &Share,
    commit: &[u8; REVEAL_LEN],
) -> Vec<u8> {
    Writer::new(ty, 2 + 4 + 4 + 8 + SHARE_LEN + REVEAL_LEN + SIGNATURE_LEN)
        .u32(term)
        .u32(epoch.0)
        .u64(seq)
        .bytes(&share.0)
        .bytes(commit)
        .0
}

/// Body of a timed first transition reply (0x18): a [`ack`] of the first
/// transition that says how long its request waited at the node, in µs.
pub fn timed_first_ack(
    epoch: Epoch,
    seq: u64,
    member: u32,
    share: &Share,
    held_us: u32,
) -> Vec<u8> {
    Writer::new(kind::TIMED_FIRST_REPLY, 76)
        .u32(epoch.0)
        .u64(seq)
        .u32(member)
        .bytes(&share.0)
        .u32(held_us)
        .0
}

/// Body of a key update / first / second transition reply.
pub fn ack(step: Step, epoch: Epoch, seq: u64, member: u32, share: &Share) -> Vec<u8> {
    let ty = match step {
        Step::KeyUpdate => kind::KEY_UPDATE_REPLY,
        Step::FirstTransition => kind::FIRST_REPLY,
        Step::SecondTransition => kind::SECOND_REPLY,
    };
    Writer::new(ty, 72)
        .u32(epoch.0)
        .u64(seq)
        .u32(member)
        .bytes(&share.0)
        .0
}

/// Body of a key request.
pub fn key_request(epoch: Epoch, step: Step, seq: u64, member: u32, share: &Share) -> Vec<u8> {
    Writer::new(kind::KEY_REQUEST, 72)
        .u32(epoch.0)
        .u64(seq)
        .u32(member)
        .u8(step as u8)
        .bytes(&share.0)
        .0
}

/// Body of a usage report (at most [`MAX_USAGE_ENTRIES`] entries are written).
pub fn usage_report(epoch: Epoch, seq: u64, member: u32, uses: &[KeyUse]) -> Vec<u8> {
    let uses = &uses[..uses.len().min(MAX_USAGE_ENTRIES)];
    let mut w = Writer::new(kind::USAGE_REPORT, 100)
        .u32(epoch.0)
        .u64(seq)
        .u32(member)
        .u8(uses.len() as u8);
    for u in uses {
        w = w.u32(u.epoch.0).u64(u.seals).u64(u.opens);
    }
    w.0
}

/// Append the controller's Ed25519 signature over `body`.
pub fn sign(mut body: Vec<u8>, key: &ed25519_dalek::SigningKey) -> Vec<u8> {
    let sig = crate::crypto::sign(key, &body);
    body.extend_from_slice(&sig);
    body
}

/// Append the MAC of a node's current chain over `body`.
pub fn mac(mut body: Vec<u8>, chain: &Chain) -> Vec<u8> {
    let tag = chain.mac(&body);
    body.extend_from_slice(&tag);
    body
}

#[cfg(test)]
mod tests;
