//! The requests of a round's phases and their retries: group waves (key
//! update batches, transition requests resent byte for byte), then one
//! unicast per missing member with backoff and jitter, each signed under a
//! fresh number; the round's deadline
//! (`tick`) that drives them, the stale deadline and the drain.

use super::super::Time;
use super::round::{transition_step, Round};
use super::{
    ControllerAction, ControllerConfig, ControllerMachine, MemberStatus, Out, Record, Via,
};
use crate::crypto::{Epoch, Share, ShareSecret, WrappedKey, REVEAL_LEN};
use crate::wire::{self, RoundPhase, Step, MAX_BATCH_ENTRIES};
use rand::{CryptoRng, RngCore};
use std::cmp::Reverse;

impl Round {
    /// Count a group wave and schedule the next one; returns its number.
    fn start_wave(&mut self, now: Time, cfg: &ControllerConfig, rng: &mut impl RngCore) -> u32 {
        let wave = self.group_sent + 1;
        self.next_wave = Some(now.plus(cfg.retry_delay(wave, rng)));
        self.group_sent = wave;
        wave
    }

    /// Takes the earliest unicast retry due by `now`.
    fn pop_due(&mut self, now: Time) -> Option<u32> {
        let &Reverse((due, member)) = self.retries.peek()?;
        if due > now {
            return None;
        }
        self.retries.pop();
        Some(member)
    }

    pub(super) fn queue_retry(&mut self, at: Time, member: u32) {
        self.retries.push(Reverse((at, member)));
    }
}

impl ControllerMachine {
    /// One group wave of key update batches to every waiting member. The
    /// steps are made first; the round's row is persisted before the first
    /// batch goes out when `entering` the phase (its row) or when a step was
    /// noted in it ([`ControllerMachine::persist_notes`]): one write either way.
    pub(super) fn send_key_wave(
        &mut self,
        now: Time,
        entering: bool,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) {
        let Some(r) = &mut self.round else { return };
        let wave = r.start_wave(now, &self.cfg, rng);
        let Some(share) = r.share.as_ref().map(ShareSecret::public) else {
            if entering {
                self.persist_core(out);
            }
            return;
        };
        let epoch = r.epoch;
        let mut entries: Vec<(u32, WrappedKey)> = Vec::new();
        for i in self.members.numbers() {
            let (Some(r), Some(m)) = (&mut self.round, self.members.get_mut(i)) else {
                continue;
            };
            if !r.waits_for(m) {
                continue;
            }
            let Some((step_share, step)) = m.step(r.step_source(), rng, out) else {
                continue;
            };
            if step_share != share {
                // A step prepared before this round (an unconfirmed key
                // response): its share is not the batch's, so it goes by unicast.
                r.queue_retry(now, i);
                continue;
            }
            m.attempts += 1;
            entries.push((i, step.wrap(&r.key, i, rng)));
            Self::record(
                out,
                Record::KeySent {
                    epoch,
                    member: i,
                    node_id: m.row.node_id.clone(),
                    attempt: m.attempts,
                    via: Via::Group,
                    at: now,
                },
            );
        }
        if entering {
            self.persist_core(out);
        } else {
            self.persist_notes(out);
        }
        let commit = self.commitment(epoch);
        for batch in entries.chunks(MAX_BATCH_ENTRIES) {
            self.send_batch(now, (epoch, &share, &commit), wave, batch, out);
        }
    }

    /// One key update batch of the round of `epoch`, with the round's share
    /// and transition commitment.
    fn send_batch(
        &mut self,
        now: Time,
        (epoch, share, commit): (Epoch, &Share, &[u8; REVEAL_LEN]),
        wave: u32,
        batch: &[(u32, WrappedKey)],
        out: &mut Out,
    ) {
        let seq = self.next_seq(out);
        let msg = wire::sign(
            wire::key_update(self.term, epoch, seq, share, commit, batch),
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
    }

    /// One group wave of the transition request of `step`.
    pub(super) fn send_transition_wave(
        &mut self,
        now: Time,
        step: Step,
        rng: &mut impl RngCore,
        out: &mut Out,
    ) {
        let Some(r) = &mut self.round else { return };
        let wave = r.start_wave(now, &self.cfg, rng);
        if let Some(msg) = r.transition_msg(step) {
            out.push(ControllerAction::SendGroup(msg.clone()));
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
        for m in self.members.iter_mut() {
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
        if phase == RoundPhase::Distributing {
            let (Some(r), Some(m)) = (&mut self.round, self.members.get_mut(member)) else {
                return;
            };
            let Some((share, step)) = m.step(r.step_source(), rng, out) else {
                return;
            };
            self.persist_notes(out);
            let seq = self.next_seq(out);
            let commit = self.round.as_ref().map(|r| self.commitment(r.epoch));
            let (Some(r), Some(m), Some(commit)) =
                (&self.round, self.members.get_mut(member), commit)
            else {
                return;
            };
            m.attempts += 1;
            let entry = [(member, step.wrap(&r.key, member, rng))];
            let msg = wire::sign(
                wire::key_update(self.term, r.epoch, seq, &share, &commit, &entry),
                &self.signing,
            );
            out.push(ControllerAction::SendTo {
                to: m.row.addr,
                bytes: msg,
            });
            Self::record(
                out,
                Record::KeySent {
                    epoch: r.epoch,
                    member,
                    node_id: m.row.node_id.clone(),
                    attempt: m.attempts,
                    via: Via::Unicast,
                    at: now,
                },
            );
        } else if let Some(step) = transition_step(phase) {
            // A message of its own under a fresh number, not the group's
            // copy: a node whose replay window has moved past that copy's
            // number (it was answered since, and other nodes' messages were
            // numbered in between) or forgot its digest would refuse it as a
            // replay for as long as the round waits, its reply having been lost.
            let Some(msg) = self.transition_request(step, out) else {
                return;
            };
            let (Some(r), Some(m)) = (&self.round, self.members.get_mut(member)) else {
                return;
            };
            m.attempts += 1;
            out.push(ControllerAction::SendTo {
                to: m.row.addr,
                bytes: msg,
            });
            Self::record(
                out,
                Record::TransitionSent {
                    epoch: r.epoch,
                    step,
                    attempt: m.attempts,
                    via: Via::Unicast,
                    member: Some(member),
                    at: now,
                },
            );
        }
    }

    /// The round's deadline passed: group waves, unicast retries, the stale deadline, the drain.
    pub(super) fn tick(&mut self, now: Time, rng: &mut (impl RngCore + CryptoRng), out: &mut Out) {
        let Some(r) = &self.round else {
            self.start_pending(now, rng, out);
            self.arm_round_timer();
            return;
        };
        let phase = r.phase;
        if r.stale_due(now, &self.cfg) {
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
                if phase == RoundPhase::Distributing {
                    self.send_key_wave(now, false, rng, out);
                } else if let Some(step) = transition_step(phase) {
                    self.send_transition_wave(now, step, rng, out);
                }
            } else {
                // Group waves are spent: every member still missing gets unicast now.
                r.next_wave = None;
                let due: Vec<u32> = self
                    .members
                    .iter()
                    .filter(|m| r.waits_for(m))
                    .map(|m| m.row.member)
                    .collect();
                for i in due {
                    r.queue_retry(now, i);
                }
            }
        }
        while let Some(member) = self.round.as_mut().and_then(|r| r.pop_due(now)) {
            if !self.is_waiting(member) {
                continue;
            }
            self.send_unicast(now, member, rng, out);
            let attempts = self.members.get(member).map_or(1, |m| m.attempts);
            let wait = self.cfg.retry_delay(attempts, rng);
            if let Some(r) = &mut self.round {
                r.queue_retry(now.plus(wait), member);
            }
        }
        self.progress_round(now, rng, out);
    }

    /// Sets the round's deadline to the round's next one (or, with no round,
    /// to the queued trigger's), unless an earlier one is set.
    pub(super) fn arm_round_timer(&mut self) {
        let due = match &self.round {
            None => self.pending_due(),
            Some(r) => r.next_due(&self.cfg),
        };
        if let Some(at) = due {
            if self.round_timer.is_none_or(|t| at < t) {
                self.round_timer = Some(at);
            }
        }
    }
}
