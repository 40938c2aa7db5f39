//! Inbound authentication: a node message counts only if its MAC holds
//! under one of its member's chains and its sequence number is fresh for the
//! member's replay window ([`Member::authenticate`]), whose top is persisted
//! (`MemberPersist::seq_seen`) so a restart does not reopen replays; and the
//! enrollment handshake that gives a member its first chain
//! (`on_handshake_init`).
//!
//! Enrollment and the ratchet (issue 17, [`crate::crypto::ratchet`]): a node
//! joins by a Noise `NNpsk0` handshake (its enrollment is pinned after the
//! first, [`super::ControllerInput::AllowRejoin`] opens one more); every key sent to a
//! node afterwards is wrapped under the one step prepared for it from its
//! confirmed chain and announced share ([`MemberRatchet`]), with the round's
//! share in key update batches or a fresh one in a key response. The step is
//! persisted before anything wrapped under it is sent, reused for every resend,
//! and confirmed when the node's MAC shows it took it.

use super::super::{take_token, Refusal, Time};
use super::members::Member;
use super::{
    AnsweredInit, Committed, ControllerAction, ControllerMachine, MemberRatchet, Out, Record,
    HANDSHAKE_BURST, HANDSHAKE_INTERVAL_MS, HANDSHAKE_RESEND_MS,
};
use crate::crypto::{digest16, ratchet, Chain, Share};
use crate::wire::{self, AnswerPayload, HandshakeInit, Maced, ReplayVerdict};
use core::net::SocketAddr;
use rand::{CryptoRng, RngCore};

/// A node message to authenticate: what it is, who claims to send it, and the
/// share it carries (replies and key requests do).
pub(super) struct Auth<'a, 'b> {
    what: &'static str,
    member: u32,
    seq: u64,
    auth: &'a Maced<'b>,
    share: Option<Share>,
    /// A key request: one under the chain the member's confirmed one
    /// replaced is answered (see [`Auth::one_step_late`]).
    late_answered: bool,
}

impl<'a, 'b> Auth<'a, 'b> {
    pub(super) fn new(
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
            late_answered: false,
        }
    }

    /// A key request MAC'd under the chain the member's confirmed one
    /// replaced counts, as if under the confirmed one, with the share it
    /// carries: a node whose key update was only checkpointed lost it in a
    /// power loss after its reply, and derives the step again from its disk
    /// (its chain, its share secret and the share announced ahead) to open
    /// the answer. Whoever holds that chain and share secret can derive the
    /// confirmed chain too, so this opens nothing more (SECURITY.md). A reply
    /// one step late is still refused (`late`).
    pub(super) fn one_step_late(mut self) -> Self {
        self.late_answered = true;
        self
    }
}

/// Which of a member's chains authenticated a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Under {
    Committed,
    Next,
    Handshake,
}

impl MemberRatchet {
    pub(super) fn chain(&self, under: Under) -> Option<&Chain> {
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

impl Member {
    /// Check a node message's MAC under one of this member's chains (its
    /// confirmed chain, the step prepared for it, an answered handshake), with
    /// the replay window. A message carrying the node's share (a reply, a key
    /// request) under a newer chain confirms that chain: the older one is
    /// dropped and the share recorded for the next step.
    /// The window's top is persisted (`MemberPersist::seq_seen`, restored after a
    /// restart) and the source noted; it moves no address (see [`Member::move_address`]).
    fn authenticate(
        &mut self,
        a: Auth<'_, '_>,
        from: SocketAddr,
        now: Time,
        out: &mut Out,
    ) -> Result<Under, Refusal> {
        let (what, member) = (a.what, a.member);
        if self.replay.check(a.seq) != ReplayVerdict::Fresh {
            return Err(Refusal::Replay { what, seq: a.seq });
        }
        let late = |m: &Self| {
            m.row
                .ratchet
                .previous
                .as_ref()
                .is_some_and(|c| a.auth.verify(c))
        };
        let under = match self.row.ratchet.verify(a.auth) {
            Some(under) => under,
            None if late(self) && a.late_answered && self.row.ratchet.committed.is_some() => {
                // As under the confirmed chain; the share the node holds now
                // is the one its next step is made with (below).
                Under::Committed
            }
            None if late(self) => return Err(Refusal::Late { what, member }),
            None => return Err(Refusal::BadMac { what, member }),
        };
        self.replay.mark(a.seq);
        if let Some(share) = a.share {
            let rt = &mut self.row.ratchet;
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
                        let old = rt.committed.replace(Committed { chain, share });
                        // After a handshake (a re-join) the chain before is
                        // not answered: whoever still holds it is not the node.
                        rt.previous = old
                            .filter(|_| under == Under::Next)
                            .map(|c| c.chain.clone());
                        rt.next = None;
                        if under == Under::Handshake {
                            rt.handshake = None;
                            rt.handshake_answer = None;
                            self.row.rejoin_until = None;
                            out.push(ControllerAction::Record(Record::HandshakeCompleted {
                                member,
                                node_id: self.row.node_id.clone(),
                                rejoin,
                                at: now,
                            }));
                        }
                        changed = true;
                    }
                }
            }
            // A confirmed step needs no write of its own: the prepared step it
            // came from is durable (written, or made again from the round's
            // share), and after a restart the node's next message under it
            // confirms it again. It is written with the member's next write,
            // at the latest with the round's drain or end
            // ([`Member::ratchet_unsaved`]). A completed handshake is rare and
            // written at once.
            if changed {
                if under == Under::Handshake {
                    self.persist(out);
                } else {
                    self.ratchet_unsaved = true;
                }
            }
        }
        self.row.seq_seen = self.replay.top();
        self.last_from = Some(from);
        Ok(under)
    }
}

impl ControllerMachine {
    /// [`Member::authenticate`] for the member the message names; an accepted
    /// sequence number is a replay mark the next snapshot saves.
    pub(super) fn authenticate(
        &mut self,
        a: Auth<'_, '_>,
        from: SocketAddr,
        now: Time,
        out: &mut Out,
    ) -> Result<Under, Refusal> {
        let (what, member) = (a.what, a.member);
        let m = self
            .members
            .get_mut(member)
            .ok_or(Refusal::UnknownMember { what, member })?;
        let under = m.authenticate(a, from, now, out)?;
        self.marks_unsaved = true;
        Ok(under)
    }

    /// A handshake init (the whole datagram is `bytes`): answered once per
    /// init with a fresh chain, or with the cached answer for a retry.
    pub(super) fn on_handshake_init(
        &mut self,
        now: Time,
        from: SocketAddr,
        (what, bytes): (&'static str, &[u8]),
        h: &HandshakeInit<'_>,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), Refusal> {
        let member = self
            .members
            .number_of(&h.node_id)
            .ok_or_else(|| Refusal::UnknownNodeId {
                node_id: h.node_id.to_string(),
            })?;
        let Some(m) = self.members.get_mut(member) else {
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
        if m.replay.check(h.seq) != ReplayVerdict::Fresh
            || (m.row.ratchet.handshake.is_some() && h.seq <= m.row.ratchet.handshake_seq)
        {
            return Err(Refusal::Replay { what, seq: h.seq });
        }
        if !take_token(
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
        let Some(m) = self.members.get_mut(member) else {
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
        m.persist(out);
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
}
