//! `Hash` for [`ControllerMachine`]: two controllers that hash equally behave
//! alike on every later input. The model check (tests/protocol/model_check.rs)
//! identifies states by it.
//!
//! Every field is named (no `..`): a field added to the machine fails to
//! compile here until its author decides whether it belongs in the hash.
//! Left out are only what is fixed for the machine's life (configuration,
//! signing key, each member's keys derived from its initial key) and what
//! is derived from hashed fields (the member table's `by_id` from its rows). Group keys
//! are hashed by epoch and check value, never by their bytes.

use super::beacon::Beacon;
use super::members::{Member, Members};
use super::round::Round;
use super::{ControllerMachine, MemberPersist, PhaseDurations};
use std::cmp::Reverse;
use std::hash::{Hash, Hasher};

fn hash_row<H: Hasher>(row: &MemberPersist, state: &mut H) {
    let MemberPersist {
        member,
        node_id,
        addr,
        keys: _,
        fingerprint,
        status,
        enrolled_at,
        ratchet,
        rejoin_until,
        seq_seen,
    } = row;
    (
        member,
        node_id,
        addr,
        fingerprint,
        status,
        enrolled_at,
        seq_seen,
    )
        .hash(state);
    // Chains and steps by check values, never by their bytes.
    (ratchet, rejoin_until).hash(state);
}

impl Hash for Member {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let Member {
            row,
            hs_tokens,
            hs_at,
            hs_resent,
            progress,
            attempts,
            replay,
            last_from,
            tokens,
            tokens_at,
            ratchet_unsaved,
            seals,
            opens,
        } = self;
        hash_row(row, state);
        (progress, attempts, replay, last_from, tokens, tokens_at).hash(state);
        // What the next drain or round end writes.
        ratchet_unsaved.hash(state);
        (seals, opens).hash(state);
        (hs_tokens, hs_at, hs_resent).hash(state);
    }
}

impl Hash for Round {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let Round {
            epoch,
            key,
            phase,
            reason,
            started_at,
            phase_started,
            stale_from,
            paused,
            pauses,
            drain_until,
            activated_at,
            phases_ms,
            waiting,
            group_sent,
            next_wave,
            first_msg,
            second_msg,
            retries,
            share,
            restored,
            sent_at,
            sent_us,
            flight_us,
            prepared: _,
            stepped,
            notes_unsaved,
        } = self;
        (sent_at, sent_us, flight_us).hash(state);
        share.hash(state);
        (stepped, notes_unsaved).hash(state);
        (epoch, key, phase, reason, started_at, phase_started).hash(state);
        (stale_from, paused, pauses).hash(state);
        (drain_until, activated_at, waiting, group_sent, next_wave).hash(state);
        let PhaseDurations {
            distributing,
            first_transition,
            draining,
            second_transition,
        } = phases_ms;
        (distributing, first_transition, draining, second_transition).hash(state);
        (first_msg, second_msg, restored).hash(state);
        // A heap's layout depends on the order of pushes; its sorted contents do not.
        let mut due: Vec<_> = retries.iter().map(|Reverse(d)| *d).collect();
        due.sort_unstable();
        due.hash(state);
    }
}

impl Hash for ControllerMachine {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let ControllerMachine {
            cfg: _,
            signing: _,
            current,
            activated_at,
            round,
            members,
            seq,
            seq_reserved,
            pending,
            total_seals,
            total_opens,
            round_timer,
            age_timer,
            previous,
            data_replay,
            marks_unsaved,
            node_trigger_at,
            beacon,
            term,
            // A cache of what a round start computes anyway (`ahead.rs`);
            // the model check never prepares one.
            ahead: _,
            notice,
            // A cache of expanded keys, made on use.
            data_ciphers: _,
        } = self;
        (current, activated_at, round, members).hash(state);
        (seq, seq_reserved, pending, total_seals, total_opens).hash(state);
        (round_timer, age_timer).hash(state);
        (previous, data_replay, marks_unsaved, node_trigger_at).hash(state);
        beacon.hash(state);
        term.hash(state);
        notice.hash(state);
    }
}

impl Hash for Members {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // `by_id` is derived from the rows.
        self.slots.hash(state);
    }
}

impl Hash for Beacon {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let Beacon { due, last } = self;
        due.hash(state);
        // The last beacon by its signed bytes (what it said is in them).
        last.as_ref().map(|(_, bytes)| bytes).hash(state);
    }
}
