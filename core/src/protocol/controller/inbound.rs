//! Datagrams in: decoding, dispatch to the node messages' handlers (replies,
//! key requests, handshake inits, usage reports) once `auth.rs` accepted
//! them, and group data checked for a leaked key.
//!
//! Node messages and group data (SECURITY.md §2a): a node message counts only
//! if its MAC holds and its sequence number is fresh for the member's window,
//! whose top is persisted (`MemberPersist::seq_seen`) so a restart does not
//! reopen replays; a member's recorded address moves only on a reply that
//! moved it forward in the round in progress; key requests and joins are
//! budgeted per member (`member_request_burst`, `member_request_interval_ms`).
//! Group data must open under a key before it moves any replay state, and is
//! checked by the nodes' own rule ([`crate::wire::DataReplay`]): fresh data that opens is a
//! member's own or sets off the leaked-key trigger. Rounds set off by what
//! nodes send are spaced by `node_trigger_min_interval_ms`.

use super::super::triggers::TriggerReason;
use super::super::{Refusal, Time};
use super::auth::{Auth, Under};
use super::round::{required_step, Wait};
use super::{ControllerAction, ControllerMachine, MemberStatus, Out, Record, ResumeCause};
use crate::crypto::{ratchet, Epoch, GroupKey, Share};
use crate::wire::{
    self, Ack, DataSeen, KeyRequest, KeyState, Message, RoundPhase, RoundState, Step, UsageReport,
};
use core::net::SocketAddr;
use rand::{CryptoRng, RngCore};

impl ControllerMachine {
    /// `wait`: how long the datagram waited here before this call, and when
    /// it arrived ([`super::ControllerInput::DatagramWaited`]).
    pub(super) fn on_datagram(
        &mut self,
        now: Time,
        (from, wait): (SocketAddr, Wait),
        bytes: &[u8],
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), Refusal> {
        let msg = wire::decode(bytes).map_err(Refusal::Malformed)?;
        let what = msg.name();
        match msg {
            Message::Data(d) => self.on_data(now, from, &d, rng, out),
            Message::Ack(a) => self.on_reply(now, (from, wait), (what, &a), rng, out),
            Message::KeyRequest(k) => self.on_key_request(now, from, (what, &k), rng, out),
            Message::HandshakeInit(h) => {
                self.on_handshake_init(now, from, (what, bytes), &h, rng, out)
            }
            Message::UsageReport(u) => self.on_usage_report(now, from, (what, &u), rng, out),
            Message::KeyUpdate(_)
            | Message::Transition(_)
            | Message::KeyResponse(_)
            | Message::HandshakeAnswer(_)
            | Message::Resync(_)
            | Message::Beacon(_)
            | Message::ShareNotice(_) => Err(Refusal::Unexpected {
                what,
                role: "controller",
            }),
        }
    }

    /// A node's reply to a round's request: it may move the round on, and
    /// moves the member's address when it moved the member forward. A first
    /// transition reply that ends the member's wait is a round trip for the
    /// drain, less what it waited here and the node's `held_us` (there).
    fn on_reply(
        &mut self,
        now: Time,
        (from, wait): (SocketAddr, Wait),
        (what, a): (&'static str, &Ack<'_>),
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), Refusal> {
        let auth = Auth::new(what, a.member, a.seq, &a.auth, Some(a.share));
        let under = self.authenticate(auth, from, now, out)?;
        let standing = |c: &Self| c.members.get(a.member).map(|m| (m.progress, m.row.status));
        let before = standing(self);
        if a.step == Step::FirstTransition && self.is_waiting(a.member) {
            if let Some(r) = self
                .round
                .as_mut()
                .filter(|r| r.epoch == a.epoch && r.phase == RoundPhase::FirstTransition)
            {
                r.note_flight(now, wait, a.held_us);
            }
        }
        if !self.on_ack(now, a.member, a.step, a.epoch, rng, out) {
            self.send_resync(a.member, under, from, out);
        }
        if let (Some((p0, s0)), Some((p1, s1))) = (before, standing(self)) {
            if p1 > p0 || (s1 == MemberStatus::Active && s0 != s1 && p1.is_some()) {
                if let Some(m) = self.members.get_mut(a.member) {
                    m.move_address(from, (what, a.seq), now, out);
                }
            }
        }
        Ok(())
    }

    /// A key request (SPEC §5): answered, within the member's budget, with
    /// the current key and the round's, wrapped under the member's next step.
    fn on_key_request(
        &mut self,
        now: Time,
        from: SocketAddr,
        (what, k): (&'static str, &KeyRequest<'_>),
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), Refusal> {
        let auth = Auth::new(what, k.member, k.seq, &k.auth, Some(k.share)).one_step_late();
        self.authenticate(auth, from, now, out)?;
        let budget = self.cfg.request_budget();
        self.members
            .get_mut(k.member)
            .ok_or(Refusal::UnknownMember {
                what,
                member: k.member,
            })?
            .spend_request(what, budget, now)?;
        // The request carries the node's position: it counts as a reply to
        // that step, and may make a stale or new member live again.
        let _ = self.on_ack(now, k.member, k.step, k.epoch, rng, out);
        let Some((share, step)) = self.step_for(k.member, rng, out) else {
            return Ok(());
        };
        self.persist_notes(out);
        let member = k.member;
        let state = KeyState {
            current_epoch: self.current.epoch(),
            current: step.wrap(&self.current, member, rng),
            round: self.round.as_ref().map(|r| RoundState {
                epoch: r.epoch,
                phase: r.phase,
                wrapped: step.wrap(&r.key, member, rng),
            }),
        };
        let seq = self.next_seq(out);
        let msg = wire::sign(
            wire::key_response(self.term, seq, member, k.seq, &share, &state),
            &self.signing,
        );
        out.push(ControllerAction::SendTo {
            to: from,
            bytes: msg,
        });
        if let Some(m) = self.members.get(member) {
            Self::record(
                out,
                Record::KeyRequestAnswered {
                    member,
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

    /// The step every wrap for `member` goes under ([`super::members::Member::step`]),
    /// with the round's share during a round.
    fn step_for(
        &mut self,
        member: u32,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Option<(Share, ratchet::Step)> {
        let round = self
            .round
            .as_mut()
            .and_then(super::round::Round::step_source);
        self.members.get_mut(member)?.step(round, rng, out)
    }

    /// A usage report: counted for the count triggers; a member not taking
    /// part in rounds is told to catch up.
    fn on_usage_report(
        &mut self,
        now: Time,
        from: SocketAddr,
        (what, u): (&'static str, &UsageReport<'_>),
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<(), Refusal> {
        let auth = Auth::new(what, u.member, u.seq, &u.auth, None);
        let under = self.authenticate(auth, from, now, out)?;
        let cur = self.current.epoch();
        self.count_usage(
            u.member,
            u.uses
                .iter()
                .filter(|x| x.epoch == cur)
                .map(|x| (x.seals, x.opens)),
        );
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
            .members
            .get(u.member)
            .is_some_and(|m| m.row.status != MemberStatus::Active)
        {
            self.send_resync(u.member, under, from, out);
        }
        Ok(())
    }

    /// Group data, by the nodes' rule ([`crate::wire::DataReplay`]): it must open under a
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
        let ciphers = &mut self.data_ciphers;
        let opened = keys
            .into_iter()
            .flatten()
            .filter(|k| d.epoch_hint.is_none_or(|e| e == k.epoch()))
            .find(|k| ciphers.open(k, &d.nonce, d.header, d.sealed).is_some())
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
            let own = self
                .members
                .get(d.sender)
                .is_some_and(|m| m.row.addr == from);
            if !own {
                return Err(Refusal::RetiredKey {
                    sender: d.sender,
                    epoch,
                    from,
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
            .members
            .get(d.sender)
            .is_some_and(|m| m.row.addr == from || m.last_from == Some(from));
        if own {
            return Ok(());
        }
        if self.cfg.triggers.on_unknown_sender {
            self.fire(
                now,
                TriggerReason::UnknownSender {
                    member: d.sender,
                    from,
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
        let current = self.current.epoch();
        let round = self.round.as_ref().map(|r| (r.epoch, r.phase));
        let Some(m) = self.members.get(member) else {
            return true;
        };
        let status = m.row.status;
        if status == MemberStatus::Active {
            let Some((re, _)) = round else { return true };
            if epoch != re {
                return true;
            }
            let was = self.is_waiting(member);
            let Some(m) = self.members.get_mut(member) else {
                return true;
            };
            if Some(step) > m.progress {
                m.progress = Some(step);
                let node_id = m.row.node_id.clone();
                Self::record(
                    out,
                    Record::NodeAcked {
                        epoch,
                        member,
                        node_id: node_id.clone(),
                        step,
                        at: now,
                    },
                );
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
        let done = step == Step::SecondTransition;
        let progress = match round {
            Some((re, phase)) if epoch == re && step >= required_step(phase) => Some(step),
            Some((_, RoundPhase::Distributing)) if epoch == current && done => None,
            None if epoch == current && done => None,
            _ => return false,
        };
        let Some(m) = self.members.get_mut(member) else {
            return true;
        };
        m.row.status = MemberStatus::Active;
        m.progress = progress;
        m.attempts = 0;
        let node_id = m.row.node_id.clone();
        m.persist(out);
        Self::record(
            out,
            m.status_changed(status, MemberStatus::Active, epoch, now),
        );
        if round.is_some() {
            self.resume(now, ResumeCause::Answer { member, node_id }, out);
        }
        if self.is_waiting(member) {
            if let Some(r) = &mut self.round {
                r.waiting += 1;
                r.queue_retry(now, member);
            }
        }
        self.arm_round_timer();
        true
    }

    /// Ask a member that is out of step (its message came from `to`) to send a
    /// key request (MAC'd under the chain its last message was MAC'd with).
    fn send_resync(&mut self, member: u32, under: Under, to: SocketAddr, out: &mut Out) {
        let seq = self.next_seq(out);
        let epoch = self.current.epoch();
        let Some(m) = self.members.get(member) else {
            return;
        };
        let Some(chain) = m.row.ratchet.chain(under) else {
            return;
        };
        let bytes = wire::mac(wire::resync(self.term, epoch, seq, member), chain);
        out.push(ControllerAction::SendTo { to, bytes });
    }
}
