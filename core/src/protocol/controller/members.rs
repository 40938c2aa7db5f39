//! The member table: one [`Member`] per enrolled node (its persisted row,
//! its place in the round, its replay window and its budgets), found by
//! member number or node id ([`Members`]); and the commands that change it
//! (enroll, remove, allow a re-join).
//!
//! Key requests and joins are budgeted per member (`member_request_burst`,
//! `member_request_interval_ms`); a member's recorded address moves only on
//! a reply that moved it forward in the round in progress
//! ([`Member::move_address`]).

use super::super::triggers::TriggerReason;
use super::super::{take_token, Refusal, Time};
use super::round::RoundSource;
use super::{
    CommandError, ControllerAction, ControllerMachine, MemberPersist, MemberRatchet, MemberStatus,
    Out, Pending, Record, ResumeCause, HANDSHAKE_BURST, REJOIN_WINDOW_MS,
};
use crate::crypto::{ratchet, InitialKey, NodeKeys, Share, ShareSecret};
use crate::wire::{NodeId, ReplayWindow, Step};
use core::net::SocketAddr;
use rand::{CryptoRng, RngCore};
use std::collections::HashMap;
use std::ops::Range;

/// The member table: rows by member number (0 is never used) and by node id.
#[derive(Clone)]
pub(super) struct Members {
    /// Indexed by member number; 0 is never used.
    pub(super) slots: Vec<Option<Member>>,
    by_id: HashMap<NodeId, u32>,
}

/// One enrolled node as the controller keeps it.
#[derive(Clone)]
pub(super) struct Member {
    pub(super) row: MemberPersist,
    /// New-handshake budget ([`HANDSHAKE_BURST`], [`super::HANDSHAKE_INTERVAL_MS`]).
    pub(super) hs_tokens: u32,
    pub(super) hs_at: Time,
    /// When the cached handshake answer was last resent.
    pub(super) hs_resent: Option<Time>,
    /// Progress in the current round: the last step it confirmed (`None`:
    /// none yet; `KeyUpdate`: it holds the key; `FirstTransition`: it seals
    /// with it; `SecondTransition`: done).
    pub(super) progress: Option<Step>,
    /// Requests sent to this member in the current phase.
    pub(super) attempts: u32,
    pub(super) replay: ReplayWindow,
    /// The source of this member's latest fresh authenticated message (in
    /// memory): its data from there is its own, as from its recorded address.
    pub(super) last_from: Option<SocketAddr>,
    /// Key request / join budget: tokens left and when they were counted.
    pub(super) tokens: u32,
    pub(super) tokens_at: Time,
    /// The row's ratchet moved since it was last persisted (memory only): a
    /// step confirmed (the step it came from is durable, or made again from
    /// the round's share), or a step made with the round's share on the
    /// `committed` as written (the round's own row holds that share's secret,
    /// `RoundPersist::share`, so a restarted controller makes the same step
    /// again). Written with the member's next write, at the latest in the
    /// round's drain or at its end ([`super::ControllerMachine::save_ratchets`]).
    pub(super) ratchet_unsaved: bool,
    /// Cumulative counts reported for the current key.
    pub(super) seals: u64,
    pub(super) opens: u64,
}

impl Members {
    pub(super) fn new() -> Members {
        Members {
            slots: vec![None],
            by_id: HashMap::new(),
        }
    }

    /// The table of a persisted controller; `next_member` is the number the
    /// next enrollment gets (never one of a removed member).
    pub(super) fn restore(
        rows: &[MemberPersist],
        next_member: u32,
    ) -> Result<Members, super::RestoreError> {
        let mut t = Members::new();
        for row in rows {
            let i = row.member as usize;
            if t.slots.len() <= i {
                t.slots.resize_with(i + 1, || None);
            }
            if i == 0 || t.slots[i].is_some() {
                return Err(super::RestoreError::DuplicateMember(row.member));
            }
            t.by_id.insert(row.node_id.clone(), row.member);
            t.slots[i] = Some(Member::new(row.clone()));
        }
        let want = next_member.max(1) as usize;
        if t.slots.len() < want {
            t.slots.resize_with(want, || None);
        }
        Ok(t)
    }

    /// The number the next enrolled node gets.
    pub(super) fn next_number(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Every member number that is or was in use (some may be free).
    pub(super) fn numbers(&self) -> Range<u32> {
        0..self.next_number()
    }

    pub(super) fn get(&self, i: u32) -> Option<&Member> {
        self.slots.get(i as usize).and_then(Option::as_ref)
    }

    pub(super) fn get_mut(&mut self, i: u32) -> Option<&mut Member> {
        self.slots.get_mut(i as usize).and_then(Option::as_mut)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Member> + '_ {
        self.slots.iter().flatten()
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Member> + '_ {
        self.slots.iter_mut().flatten()
    }

    pub(super) fn number_of(&self, node_id: &NodeId) -> Option<u32> {
        self.by_id.get(node_id).copied()
    }

    /// Adds the member of `row` (numbered by [`Self::next_number`]).
    fn add(&mut self, row: MemberPersist) {
        let i = row.member as usize;
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
        }
        self.by_id.insert(row.node_id.clone(), row.member);
        self.slots[i] = Some(Member::new(row));
    }

    fn remove(&mut self, node_id: &NodeId) -> Option<u32> {
        let member = self.by_id.remove(node_id)?;
        if let Some(slot) = self.slots.get_mut(member as usize) {
            *slot = None;
        }
        Some(member)
    }

    /// Nodes that joined (active or stale): the base of the majority.
    pub(super) fn joined(&self) -> u32 {
        self.iter()
            .filter(|m| m.row.status != MemberStatus::Enrolled)
            .count() as u32
    }

    /// See [`ControllerMachine::enrolled_alike`].
    pub(super) fn alike(
        &self,
        initial_key: &InitialKey,
        addr: SocketAddr,
    ) -> (Option<&NodeId>, Option<&NodeId>) {
        let keys = NodeKeys::derive(initial_key);
        let rows = || self.iter().map(|m| &m.row);
        let same_key = rows().find(|r| r.keys.same_as(&keys)).map(|r| &r.node_id);
        let known = !addr.ip().is_unspecified() && addr.port() != 0;
        let same_addr = rows().find(|r| known && r.addr == addr).map(|r| &r.node_id);
        (same_key, same_addr)
    }
}

impl Member {
    fn new(row: MemberPersist) -> Member {
        Member {
            hs_tokens: HANDSHAKE_BURST,
            hs_at: Time(0),
            hs_resent: None,
            progress: None,
            attempts: 0,
            replay: row
                .seq_seen
                .map_or_else(ReplayWindow::default, ReplayWindow::above),
            row,
            last_from: None,
            tokens: u32::MAX,
            tokens_at: Time(0),
            ratchet_unsaved: false,
            seals: 0,
            opens: 0,
        }
    }

    /// Store this member's row durably before what follows.
    pub(super) fn persist(&mut self, out: &mut Out) {
        self.ratchet_unsaved = false;
        out.push(ControllerAction::PersistMember(Box::new(self.row.clone())));
    }

    /// The record of this member's status going `from` → `to` (in `epoch`).
    pub(super) fn status_changed(
        &self,
        from: MemberStatus,
        to: MemberStatus,
        epoch: crate::crypto::Epoch,
        now: Time,
    ) -> Record {
        Record::StatusChanged {
            member: self.row.member,
            node_id: self.row.node_id.clone(),
            from,
            to,
            epoch,
            at: now,
        }
    }

    /// The step every wrap for this member goes under: the one prepared
    /// earlier (the node may have taken it), else a new one from its confirmed
    /// chain and share, with the round's share and steps `round` (made ahead
    /// when they still fit; outside a round, with a fresh share). Durable
    /// before anything wrapped under it goes out: written now, or, when made
    /// with the round's share on the row as last written, made again from
    /// the round's row after a restart ([`Member::round_step`]). `None` for a
    /// node without a confirmed chain (not joined by handshake).
    pub(super) fn step(
        &mut self,
        round: Option<RoundSource<'_>>,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Option<(Share, ratchet::Step)> {
        if let Some(p) = &self.row.ratchet.next {
            return Some((p.share, p.step.clone()));
        }
        if let Some(src) = round {
            let (made, write) = self.round_step(src)?;
            if write {
                self.persist(out);
            }
            return Some(made);
        }
        let c = self.row.ratchet.committed.as_ref()?;
        let secret = ShareSecret::generate(rng);
        let ours = secret.public();
        let step = c.step_with(&secret, self.row.member)?;
        self.row.ratchet.next = Some(Pending {
            share: ours,
            step: step.clone(),
        });
        self.persist(out);
        Some((ours, step))
    }

    /// [`Member::step`] with the round's share, on a member without a
    /// prepared step; `true` with it when the row must be written now.
    ///
    /// At a round's start this is every member's row, a write on the way to
    /// the first send. When the ratchet has not moved since the row was last
    /// written, it is not written here: the round's row, durable before that
    /// send, holds the share's secret and notes the node share the step was
    /// made on (`Round::stepped`), and [`ControllerMachine::restore`] makes
    /// the same step again from them. The row is written once the key update
    /// phase is over, in the drain's pass, or at the round's end.
    pub(super) fn round_step(
        &mut self,
        src: RoundSource<'_>,
    ) -> Option<((Share, ratchet::Step), bool)> {
        let member = self.row.member;
        let c = self.row.ratchet.committed.as_ref()?;
        let ours = src.share.public();
        let step = match src.prepared.take(member, c) {
            // Made before the round, from the chain and share the member
            // still has (`ahead.rs`).
            Some(step) => step,
            None => c.step_with(src.share, member)?,
        };
        let node_share = c.share;
        self.row.ratchet.next = Some(Pending {
            share: ours,
            step: step.clone(),
        });
        let write = self.ratchet_unsaved;
        if !write {
            src.stepped.insert(member, node_share);
            *src.notes_unsaved = true;
            self.ratchet_unsaved = true;
        }
        Some(((ours, step), write))
    }

    /// Takes one token of this member's key request / join budget
    /// (`burst`, one more per `every` ms), or refuses.
    pub(super) fn spend_request(
        &mut self,
        what: &'static str,
        (burst, every): (u32, u64),
        now: Time,
    ) -> Result<(), Refusal> {
        // A new member's budget starts full (`u32::MAX` until first spent).
        self.tokens = self.tokens.min(burst);
        if !take_token(&mut self.tokens, &mut self.tokens_at, now, burst, every) {
            return Err(Refusal::RateLimited {
                what,
                member: self.row.member,
            });
        }
        Ok(())
    }

    /// A member's recorded address moves only on a reply that moved it
    /// forward in the round in progress: an answer to this controller's own
    /// request that the node had not given yet, so not a copy of anything
    /// sent before (a replay after a restart, or a message captured while the
    /// controller was down). Key requests, joins and usage reports are
    /// answered where they came from and move nothing.
    pub(super) fn move_address(
        &mut self,
        from: SocketAddr,
        (message, seq): (&'static str, u64),
        now: Time,
        out: &mut Out,
    ) {
        if self.row.addr == from {
            return;
        }
        out.push(ControllerAction::Record(Record::NodeAddressChanged {
            member: self.row.member,
            node_id: self.row.node_id.clone(),
            from: self.row.addr,
            to: from,
            message,
            seq,
            at: now,
        }));
        self.row.addr = from;
        self.persist(out);
    }
}

// ------------------------------------------------------------ commands

impl ControllerMachine {
    /// [`super::ControllerInput::Enroll`].
    pub(super) fn enroll(
        &mut self,
        now: Time,
        node_id: NodeId,
        initial_key: InitialKey,
        addr: SocketAddr,
        out: &mut Out,
    ) -> Result<(), CommandError> {
        if self.members.number_of(&node_id).is_some() {
            return Err(CommandError::AlreadyEnrolled(node_id));
        }
        let member = self.members.next_number();
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
            node_id,
            addr,
            fingerprint: row.fingerprint.clone(),
            at: now,
        }));
        self.members.add(row);
        self.persist_core(out);
        Ok(())
    }

    /// [`super::ControllerInput::Remove`].
    pub(super) fn remove(
        &mut self,
        now: Time,
        node_id: NodeId,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), CommandError> {
        let member = self
            .members
            .number_of(&node_id)
            .ok_or_else(|| CommandError::NotEnrolled(node_id.clone()))?;
        let was_waiting = self.is_waiting(member);
        self.members.remove(&node_id);
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
        Ok(())
    }

    /// [`super::ControllerInput::AllowRejoin`]: one more enrollment handshake
    /// within [`REJOIN_WINDOW_MS`].
    pub(super) fn allow_rejoin(
        &mut self,
        now: Time,
        node_id: NodeId,
        out: &mut Out,
    ) -> Result<(), CommandError> {
        let member = self
            .members
            .number_of(&node_id)
            .ok_or_else(|| CommandError::NotEnrolled(node_id.clone()))?;
        let until = now.plus(REJOIN_WINDOW_MS);
        if let Some(m) = self.members.get_mut(member) {
            m.row.rejoin_until = Some(until);
            // A node that lost its state counts its sequence numbers from 1 again.
            m.replay = ReplayWindow::default();
            m.row.ratchet.handshake = None;
            m.row.ratchet.handshake_seq = 0;
            m.row.ratchet.handshake_answer = None;
            m.persist(out);
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
        Ok(())
    }

    /// Members of a revision-1 table have no ratchet yet: they take part in
    /// rounds again once they ran the enrollment handshake.
    pub(super) fn demote_members_without_ratchet(&mut self, now: Time, out: &mut Out) {
        let epoch = self.current.epoch();
        for m in self.members.iter_mut() {
            if m.row.ratchet.committed.is_none() && m.row.status != MemberStatus::Enrolled {
                let from = m.row.status;
                m.row.status = MemberStatus::Enrolled;
                m.persist(out);
                out.push(ControllerAction::Record(m.status_changed(
                    from,
                    MemberStatus::Enrolled,
                    epoch,
                    now,
                )));
            }
        }
    }
}
