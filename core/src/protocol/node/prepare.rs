//! The next ratchet step's X25519, made ahead (issue 11).
//!
//! Between rounds the controller draws the next round's share and makes its
//! side of every member's step ahead (`controller/ahead.rs`). It announces
//! that share in a signed [`wire::ShareNotice`], once when it is drawn and
//! again with each beacon until the round takes it. A node that is level with
//! the controller (it holds the notice's epoch, its round finished) checks the
//! notice and makes, while idle, the X25519 of its own share secret with the
//! announced share, and draws its next share secret. The round's key update
//! request, which carries the share again under the controller's signature,
//! then finds both done: a round asks of each node one X25519 and one base
//! point multiplication less, at the moment all of the fleet's nodes wake at
//! once.
//!
//! Nothing else rests on it. The cache is used only when the key update's
//! signed share is the one announced and the node's share is the one the
//! X25519 was made with; otherwise the step is made as before. A node that
//! missed the notice, restarted, or moved its ratchet since (a key response)
//! makes the X25519 when the key update comes. The X25519 and the spare are
//! memory only; the share a round notice (below) announced is flushed with
//! the state ([`super::Announced`], one write while idle), so the key update
//! that steps with it needs no flush of its own.
//!
//! A round notice (kind 0x0B, what the controller sends since session 13)
//! also announces the round's transition commitment, and then vouches for
//! the key update request's header: a node that checked it takes a request
//! of that term and epoch carrying the same share and commitment without a
//! signature check, when its entry opens under the step made ahead. The
//! entry is wrapped under a key only the controller and this node can make
//! (the chain and share secret of the node's disk, the controller's share
//! secret), so the opening authenticates the key; the notice's signature
//! authenticates the rest of what the node uses (term, epoch, share,
//! commitment). The request's sequence number is not covered: such a request
//! moves no replay window and teaches no controller address. An entry that
//! does not open sends the request to its signature check, as before, so a
//! forgery that copies the notice costs a digest, an HKDF, an AES-GCM open
//! and a check from the usual budget (no X25519: only a step made ahead is
//! vouched for). Whoever holds the node's disk can wrap an entry that opens;
//! they can derive the step and open the genuine entry anyway
//! (SECURITY.md).
//!
//! What it costs a node: a byte-identical copy of the last notice it checked
//! costs a digest; another costs a signature check, at most
//! [`NOTICE_VERIFY_BURST`] at once and one more each
//! [`NOTICE_VERIFY_REFILL_MS`] (a budget of its own: a flood of forged
//! notices takes nothing from the checks of key updates or beacons), plus
//! one for the first notice after each round the node finished (its second
//! transition request authenticated by its reveal, which no forger can
//! make): rounds closer together than the refill find their notice checked
//! too, and a forgery that takes that check only sends the next key update
//! to its signature check, as without a notice. A notice taken costs one
//! X25519. A replayed notice is refused by the
//! controller's sequence numbers, as any signed request.

use super::super::{take_token, Time};
use super::{digest16, Announced, NodeMachine, Out, Refusal};
use crate::crypto::{Share, ShareSecret};
use crate::wire::{self, ReplayVerdict, Step};
use rand::{CryptoRng, RngCore};
use zeroize::Zeroizing;

/// Share notice signature checks a node may spend at once…
pub const NOTICE_VERIFY_BURST: u32 = 2;
/// …and one more each this many ms.
pub const NOTICE_VERIFY_REFILL_MS: u64 = 1_000;

/// What a node did with share notices (for the agent's status).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrepareStats {
    /// Notices whose signature held.
    pub notices: u64,
    /// Notices refused: a signature that did not hold, or a replay.
    pub refused: u64,
    /// Notices not checked: the node was not level with them, or out of budget.
    pub skipped: u64,
    /// Key update steps that found their X25519 made ahead.
    pub used: u64,
    /// Key updates taken without a signature check: their share and
    /// transition commitment were the ones a verified round notice announced,
    /// and the node's entry opened under the step.
    pub vouched: u64,
}

/// An X25519 made ahead: of the node's share secret (known by its public
/// share) with the announced share; `None` for a share of small order.
#[derive(Clone)]
struct Made {
    announced: Share,
    own: Share,
    dh: Option<Zeroizing<[u8; 32]>>,
}

/// A notice whose signature held: its digest (a copy costs no check) and
/// what it announced.
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
struct Checked {
    digest: [u8; 16],
    term: u32,
    epoch: crate::crypto::Epoch,
    share: Share,
    commit: Option<[u8; crate::crypto::REVEAL_LEN]>,
    /// A timed round notice: its controller reads timed first transition replies.
    timed: bool,
}

/// The X25519 made ahead and the share secret drawn ahead (memory only).
#[derive(Clone, Default)]
pub(super) struct Prepared {
    /// The last notice whose signature held.
    notice: Option<Checked>,
    dh: Option<Made>,
    /// The node's next share secret.
    spare: Option<ShareSecret>,
    /// Digest of the last key update request taken on a notice's word (a
    /// byte-identical copy is answered again without a signature check).
    pub(super) vouched_digest: Option<[u8; 16]>,
    tokens: u32,
    refill: Time,
    /// The epoch of the round this node last finished (its second transition
    /// request taken, authenticated by the reveal): the notice for the round
    /// after it gets one signature check outside the budget.
    pub(super) earned: Option<crate::crypto::Epoch>,
    pub(super) stats: PrepareStats,
}

impl Prepared {
    pub(super) fn new() -> Prepared {
        Prepared {
            tokens: NOTICE_VERIFY_BURST,
            ..Prepared::default()
        }
    }

    /// The X25519 of the node's share `own` with `announced`, if it was made
    /// ahead: `Some(None)` when it was and the share was of small order.
    pub(super) fn dh_for(
        &self,
        announced: &Share,
        own: &Share,
    ) -> Option<Option<&Zeroizing<[u8; 32]>>> {
        match &self.dh {
            Some(m) if m.announced == *announced && m.own == *own => Some(m.dh.as_ref()),
            _ => None,
        }
    }

    /// Whether the last checked notice vouches for a key update request of
    /// `term` and `epoch` carrying `share` and `commit`: a round notice (with
    /// a commitment) for the round of `epoch`, under the same term, that
    /// announced both. The request's entry must still open under the step.
    pub(super) fn vouches(
        &self,
        term: u32,
        epoch: crate::crypto::Epoch,
        share: &Share,
        commit: &[u8; crate::crypto::REVEAL_LEN],
    ) -> bool {
        self.notice.is_some_and(|n| {
            n.term == term
                && n.epoch.next() == epoch
                && n.share == *share
                && n.commit.as_ref() == Some(commit)
        })
    }

    /// Whether the controller of `term` said, in a checked timed round
    /// notice, that it reads timed replies in the round of `epoch`.
    pub(super) fn timed(&self, term: u32, epoch: crate::crypto::Epoch) -> bool {
        self.notice
            .is_some_and(|n| n.timed && n.term == term && n.epoch.next() == epoch)
    }

    /// The step that used them was taken: the X25519 is spent, and the spare
    /// is handed over as the node's next share secret.
    pub(super) fn spent(&mut self, used: bool) -> Option<ShareSecret> {
        self.dh = None;
        self.stats.used += u64::from(used);
        self.spare.take()
    }
}

impl std::hash::Hash for Prepared {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let Prepared {
            notice,
            dh,
            spare,
            vouched_digest,
            tokens,
            refill,
            earned,
            stats: _,
        } = self;
        notice.hash(state);
        vouched_digest.hash(state);
        dh.as_ref().map(|m| (m.announced, m.own)).hash(state);
        spare.as_ref().map(ShareSecret::public).hash(state);
        (tokens, refill, earned).hash(state);
    }
}

impl NodeMachine {
    /// A share notice (see the module docs). Never a reply, never a key
    /// request: at most a signature check and an X25519 while idle.
    pub(super) fn on_share_notice(
        &mut self,
        now: Time,
        n: &wire::ShareNotice<'_>,
        bytes: &[u8],
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), Refusal> {
        let what = "share notice";
        // Not joined yet (its handshake in flight): nothing to prepare, and
        // no error (a joining node hears the group's notices too).
        let Some(controller) = self.joined.as_ref().map(|j| j.controller) else {
            self.prepared.stats.skipped += 1;
            return Ok(());
        };
        self.check_term(n.term, what)?;
        // Only for the round after the node's own epoch, in the node's term
        // (a new leader's first key update brings its term), while the node
        // is level: anything else could not be used.
        if n.term != self.term || self.position() != Some((n.epoch, Step::SecondTransition)) {
            self.prepared.stats.skipped += 1;
            return Ok(());
        }
        let digest = digest16(bytes);
        if self.prepared.notice.is_none_or(|c| c.digest != digest) {
            if self.ctl_replay.check(n.seq) != ReplayVerdict::Fresh {
                self.prepared.stats.refused += 1;
                return Err(Refusal::Replay { what, seq: n.seq });
            }
            let p = &mut self.prepared;
            // The round this node just finished earned the next notice a
            // check of its own: rounds closer together than the refill are
            // prepared too, and a flood of forgeries still gets no more than
            // one check per genuine round on top of the budget.
            let earned = p.earned.take_if(|e| *e == n.epoch).is_some();
            if !earned
                && !take_token(
                    &mut p.tokens,
                    &mut p.refill,
                    now,
                    NOTICE_VERIFY_BURST,
                    NOTICE_VERIFY_REFILL_MS,
                )
            {
                p.stats.skipped += 1;
                return Ok(());
            }
            self.signature_checks += 1;
            if !crate::crypto::verify(&controller, n.auth.body, &n.auth.signature) {
                self.prepared.stats.refused += 1;
                return Err(Refusal::BadSignature { what });
            }
            self.ctl_replay.mark(n.seq);
            self.prepared.notice = Some(Checked {
                digest,
                term: n.term,
                epoch: n.epoch,
                share: n.share,
                commit: n.commit,
                timed: n.timed,
            });
            self.prepared.stats.notices += 1;
        }
        // The X25519 for the node's share as it is now (a key response since
        // the last notice moved it), and the next share secret.
        let Some(ratchet) = &self.ratchet else {
            return Ok(());
        };
        let own = ratchet.share();
        if self.prepared.dh_for(&n.share, &own).is_none() {
            self.prepared.dh = Some(Made {
                announced: n.share,
                own,
                dh: ratchet.secret.dh(&n.share),
            });
        }
        if self.prepared.spare.is_none() {
            self.prepared.spare = Some(ShareSecret::generate(rng));
        }
        // Flushed while idle, once per announced share and ratchet: the key
        // update's step can then be derived again from the disk. Only from a
        // round notice: a controller that sends one (session 13 on) answers
        // the key request one step late that a node back from a power loss
        // sends; one that sends share notices would refuse it.
        if n.commit.is_none() {
            return Ok(());
        }
        let a = Announced {
            term: n.term,
            epoch: n.epoch,
            share: n.share,
            own,
        };
        self.announced = Some(a);
        if self.durable_announced != Some(a) {
            self.persist(out);
        }
        Ok(())
    }

    /// What this node did with share notices.
    pub fn prepare_stats(&self) -> PrepareStats {
        self.prepared.stats
    }
}
