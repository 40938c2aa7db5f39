//! When the SPEC §3 triggers ([`super::super::triggers`]) start a round: at
//! once, queued behind the round in progress (one at most), or, for those
//! set off by what nodes send, no sooner than `node_trigger_min_interval_ms`
//! after the last such round; the key-age deadline and the usage counts.

use super::super::triggers::TriggerReason;
use super::super::Time;
use super::TriggerOutcome;
use super::{ControllerMachine, Out, Record, ResumeCause};
use rand::{CryptoRng, RngCore};

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

impl ControllerMachine {
    pub(super) fn fire(
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
                self.arm_round_timer();
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
            self.arm_round_timer();
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
    pub(super) fn pending_due(&self) -> Option<Time> {
        let p = self.pending.as_ref()?;
        match self.node_trigger_at {
            Some(t) if node_caused(p) => Some(t.plus(self.cfg.node_trigger_min_interval_ms)),
            _ => Some(Time(0)),
        }
    }

    /// Starts the queued round if no round runs and it is due.
    pub(super) fn start_pending(
        &mut self,
        now: Time,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) {
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

    /// Sets the key-age deadline of the current key (if the trigger is on).
    pub(super) fn arm_age(&mut self) {
        if let Some(at) = self.cfg.triggers.key_age_deadline(self.activated_at) {
            self.age_timer = Some(at);
        }
    }

    pub(super) fn check_age(
        &mut self,
        now: Time,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) {
        let Some(limit_ms) = self.cfg.triggers.max_key_age_ms else {
            return;
        };
        let age_ms = now.since(self.activated_at);
        if age_ms >= limit_ms && self.round.is_none() && self.pending.is_none() {
            self.fire(now, TriggerReason::KeyAge { age_ms, limit_ms }, rng, out);
        } else if self.round.is_none() {
            self.arm_age();
        }
    }

    /// Adds what `member`'s cumulative (seals, opens) counts for the current
    /// key grew by to the fleet's totals (a duplicate report adds nothing).
    pub(super) fn count_usage(&mut self, member: u32, uses: impl Iterator<Item = (u64, u64)>) {
        let Some(m) = self.members.get_mut(member) else {
            return;
        };
        for (seals, opens) in uses {
            self.total_seals = self
                .total_seals
                .saturating_add(seals.saturating_sub(m.seals));
            self.total_opens = self
                .total_opens
                .saturating_add(opens.saturating_sub(m.opens));
            m.seals = m.seals.max(seals);
            m.opens = m.opens.max(opens);
        }
    }
}
