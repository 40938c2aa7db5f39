//! The rekey round of SPEC §2 ([`Round`]) and its phase engine: start,
//! phase changes with the S1/S2 checks (`progress_round`), the drain, the
//! stale deadline, pause and resume, and the finish that makes the key
//! current. The requests of each phase and their retries are in `retries.rs`.
//!
//! A round for epoch `n` goes through four phases:
//!
//! 1. **Distributing** — the new key comes from the CSPRNG, is recorded
//!    (`Record::KeyCreated`) and persisted; key update requests go out. The
//!    key travels only wrapped per node under that node's ratchet step, so
//!    the request is a *batch*: the round's X25519 share and at most 16
//!    `(member, wrapped key)` entries sorted by member number in one
//!    ≤1200-byte signed multicast datagram. 10 000 nodes take 625 datagrams; a node reads the batch's member range
//!    from the header and verifies a signature only for the one batch holding
//!    its entry. The first `group_attempts` waves go to the group (a retry wave
//!    batches only the nodes still missing), then each missing node gets its
//!    own signed one-entry request by unicast, with exponential backoff and jitter.
//! 2. **FirstTransition** — once every live node replied. One signed request
//!    to the group, its group waves resent byte for byte (a node that already
//!    verified it only compares a digest before replying again), then to each
//!    missing node by unicast, with backoff and jitter, each retry signed
//!    under a fresh number (a node whose replay window moved past the group
//!    copy's number would refuse that copy as a replay).
//! 3. **Draining** — once every live node confirmed: wait for data sealed
//!    with the old key still in flight, `drain_rtt_factor` times the first
//!    transition's longest time in flight (its replies' round trips less
//!    what requests and replies waited in the sockets at either end; between
//!    `drain_floor_ms` and `max_flight_ms`; [`Round::drain_grace`]), or a
//!    fixed `drain_grace_ms`.
//! 4. **SecondTransition** — as the first; once every live node confirmed,
//!    the round is finished and the new key is current.
//!
//! **S1** (no node seals with the new key before every live node can open it)
//! holds because the first transition request is only signed once every live
//! node has acknowledged the key update, and a node that rejoins during a
//! round is only counted live again once its acknowledgement shows it holds
//! the keys the phase needs ([`required_step`]). **S2** (no node drops
//! the old key while a node may still seal with it or old data may be in
//! flight) holds because the second transition request is only signed once
//! every live node confirmed the first one *and* the drain grace has passed.
//! Both rules are checked next to the round logic in `progress_round`.
//!
//! A node that does not answer within `stale_after_ms` of the phase start is
//! marked *stale* (`Record::NodeStale`), left out of the round, and counted
//! live again when it catches up through a key request (SPEC §5) — but only
//! when enough others confirmed the phase ([`ControllerMachine::needed`]:
//! `min_acked` and a majority of the joined nodes). With fewer (none at all:
//! the controller is the one cut off) the round is *paused*
//! (`Record::RoundPaused`): nobody is marked stale, the old key stays
//! current, retries go on, and the first confirmation, a restart, a rekey by
//! hand or a removal resumes it (`Record::RoundResumed`) with a fresh stale
//! deadline. A phase never ends with fewer confirmations than needed. When a stale
//! node shows it is alive (a usage report, a reply out of step) the controller
//! sends it a resync request, so it asks even without a link-up.

use super::super::triggers::TriggerReason;
use super::super::Time;
use super::members::Member;
use super::{
    ControllerConfig, ControllerMachine, MemberStatus, Out, PhaseDurations, Record, ResumeCause,
    RoundPersist,
};
use crate::crypto::{Epoch, GroupKey, Share, ShareSecret, TransitionChain, REVEAL_LEN};
use crate::wire::{self, NodeId, RoundPhase, Step};
use rand::{CryptoRng, RngCore};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

/// How long a datagram waited in the controller's socket before it was
/// handled, and when it arrived there on the shell's µs clock
/// ([`super::ControllerInput::DatagramWaited`]); nothing for a datagram
/// without a receive timestamp.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Wait {
    pub(super) us: u32,
    pub(super) arrived_us: Option<u64>,
}

/// The round in progress.
#[derive(Clone)]
pub(super) struct Round {
    pub(super) epoch: Epoch,
    pub(super) key: GroupKey,
    /// The controller's secret of this round's ratchet share.
    pub(super) share: Option<ShareSecret>,
    pub(super) phase: RoundPhase,
    pub(super) reason: TriggerReason,
    pub(super) started_at: Time,
    pub(super) phase_started: Time,
    /// The stale deadline counts from here: the phase start, or the moment a
    /// pause ended (the controller, not the nodes, was away).
    pub(super) stale_from: Time,
    /// Paused since: too few nodes confirmed the phase by its deadline.
    pub(super) paused: Option<Time>,
    pub(super) pauses: u32,
    pub(super) drain_until: Option<Time>,
    pub(super) activated_at: Option<Time>,
    pub(super) phases_ms: PhaseDurations,
    /// Live members still to confirm the current phase.
    pub(super) waiting: u32,
    pub(super) group_sent: u32,
    /// Next group wave, or the moment per-node unicast begins.
    pub(super) next_wave: Option<Time>,
    /// Signed first / second transition request (its group waves resend it byte for byte).
    pub(super) first_msg: Option<Vec<u8>>,
    pub(super) second_msg: Option<Vec<u8>>,
    /// Per-member unicast retries: (due, member).
    pub(super) retries: BinaryHeap<Reverse<(Time, u32)>>,
    /// Restored from a snapshot: acknowledgements that crossed the restart
    /// answer requests of the previous run, so the phase times are no round
    /// trips (the drain grace is then `max_flight_ms`).
    pub(super) restored: bool,
    /// When the current phase's first group wave went out, in the shell's
    /// word ([`ControllerMachine::requests_sent`]: after the pass's table
    /// write); `None` until it says so.
    pub(super) sent_at: Option<Time>,
    /// The same send on the shell's µs clock, when it said.
    pub(super) sent_us: Option<u64>,
    /// The first transition's longest time in flight so far, in µs: each
    /// reply that ended a member's wait, from the request's send
    /// ([`Self::sent_at`]) to the reply's arrival here, less (a timed reply)
    /// what the request waited at the node ([`Self::note_flight`]). `None`
    /// before any, or without `sent_at`.
    pub(super) flight_us: Option<u64>,
    /// Steps made with this round's share before it started (`ahead.rs`; in
    /// memory only, taken as the wraps go out).
    pub(super) prepared: super::ahead::Prepared,
    /// The members whose step was made with this round's share on their row
    /// as last written, whose row is not written since, with the node share
    /// of that row's `committed` (persisted with the round): after a restart
    /// each is made again ([`ControllerMachine::remake_round_steps`]).
    pub(super) stepped: BTreeMap<u32, Share>,
    /// A note was added to `stepped` since the round's row was last
    /// persisted (memory only): the row must be written before anything
    /// wrapped under that step goes out ([`ControllerMachine::persist_notes`]).
    pub(super) notes_unsaved: bool,
}

/// What a member's step in a round is made with ([`Member::step`]): the
/// round's share, the steps prepared with it ahead (`ahead.rs`), and the
/// note of the members stepped on their row as written ([`Round::stepped`]).
pub(super) struct RoundSource<'a> {
    pub(super) share: &'a ShareSecret,
    pub(super) prepared: &'a mut super::ahead::Prepared,
    pub(super) stepped: &'a mut BTreeMap<u32, Share>,
    pub(super) notes_unsaved: &'a mut bool,
}

/// The step a phase waits for members to confirm, if any.
pub(super) fn target_step(phase: RoundPhase) -> Option<Step> {
    match phase {
        RoundPhase::Distributing => Some(Step::KeyUpdate),
        RoundPhase::FirstTransition => Some(Step::FirstTransition),
        RoundPhase::Draining => None,
        RoundPhase::SecondTransition => Some(Step::SecondTransition),
    }
}

/// The least step a node must show to be counted live again during a
/// phase: from the first transition on it must hold the new key (S1), and from
/// the drain on it must already seal with the new key (S2).
pub(super) fn required_step(phase: RoundPhase) -> Step {
    match phase {
        RoundPhase::Distributing | RoundPhase::FirstTransition => Step::KeyUpdate,
        RoundPhase::Draining | RoundPhase::SecondTransition => Step::FirstTransition,
    }
}

/// The transition request a phase sends, if it sends one.
pub(super) fn transition_step(phase: RoundPhase) -> Option<Step> {
    match phase {
        RoundPhase::FirstTransition => Some(Step::FirstTransition),
        RoundPhase::SecondTransition => Some(Step::SecondTransition),
        RoundPhase::Distributing | RoundPhase::Draining => None,
    }
}

impl Round {
    /// A new round for `epoch`, in its first phase.
    fn new(
        epoch: Epoch,
        key: GroupKey,
        share: ShareSecret,
        reason: TriggerReason,
        now: Time,
    ) -> Round {
        Round {
            epoch,
            key,
            share: Some(share),
            phase: RoundPhase::Distributing,
            reason,
            started_at: now,
            phase_started: now,
            stale_from: now,
            paused: None,
            pauses: 0,
            drain_until: None,
            activated_at: None,
            phases_ms: PhaseDurations::default(),
            waiting: 0,
            group_sent: 0,
            next_wave: None,
            first_msg: None,
            second_msg: None,
            retries: BinaryHeap::new(),
            restored: false,
            sent_at: None,
            sent_us: None,
            flight_us: None,
            prepared: super::ahead::Prepared::default(),
            stepped: BTreeMap::new(),
            notes_unsaved: false,
        }
    }

    /// The persisted round, resumed at `now`.
    pub(super) fn restore(r: &RoundPersist, now: Time) -> Round {
        Round {
            epoch: r.epoch,
            key: r.key.clone(),
            share: r.share.clone(),
            phase: r.phase,
            reason: r.reason.clone(),
            started_at: r.started_at,
            // The stale clock restarts: the controller, not the nodes, was away.
            phase_started: now,
            stale_from: now,
            paused: r.paused_at,
            pauses: r.pauses,
            drain_until: r.drain_until,
            activated_at: r.activated_at,
            phases_ms: r.phases_ms,
            restored: true,
            waiting: 0,
            group_sent: 0,
            next_wave: None,
            first_msg: None,
            second_msg: None,
            retries: BinaryHeap::new(),
            sent_at: None,
            sent_us: None,
            flight_us: None,
            prepared: super::ahead::Prepared::default(),
            stepped: r.stepped.clone(),
            notes_unsaved: false,
        }
    }

    pub(super) fn persist(&self) -> RoundPersist {
        RoundPersist {
            epoch: self.epoch,
            key: self.key.clone(),
            share: self.share.clone(),
            phase: self.phase,
            reason: self.reason.clone(),
            started_at: self.started_at,
            drain_until: self.drain_until,
            activated_at: self.activated_at,
            phases_ms: self.phases_ms,
            paused_at: self.paused,
            pauses: self.pauses,
            stepped: self.stepped.clone(),
        }
    }

    /// Whether the current phase waits for `m`: a live member that has not
    /// confirmed it yet.
    pub(super) fn waits_for(&self, m: &Member) -> bool {
        m.row.status == MemberStatus::Active
            && target_step(self.phase).is_some_and(|t| m.progress < Some(t))
    }

    /// The signed transition request of `step` (each group wave resends it byte for byte).
    pub(super) fn transition_msg(&self, step: Step) -> Option<&Vec<u8>> {
        match step {
            Step::FirstTransition => self.first_msg.as_ref(),
            _ => self.second_msg.as_ref(),
        }
    }

    fn set_transition_msg(&mut self, step: Step, msg: Vec<u8>) {
        match step {
            Step::FirstTransition => self.first_msg = Some(msg),
            _ => self.second_msg = Some(msg),
        }
    }

    /// How long the drain waits (S2): `drain_grace_ms` when fixed; else
    /// `drain_rtt_factor` times the first transition's longest time in
    /// flight, at least `drain_floor_ms` and at most `max_flight_ms`.
    ///
    /// Each first transition reply that ends a member's wait is a sample
    /// ([`Self::note_flight`]): its round trip from the request's first send
    /// (when the shell said when that was, [`ControllerMachine::requests_sent`])
    /// to its arrival in the controller's socket (to the µs when the shell
    /// gives both on its µs clock; else to its handling here in ms, less what
    /// it waited in the socket), less, for a timed reply, what the request
    /// waited in the node's (both by the sockets' receive timestamps); the
    /// product with the factor is rounded up to the ms. What is left is the way
    /// there and back, and the node's own handling (its state write, its
    /// scheduling; it errs long). A wait in a socket is no flight for S2: a
    /// node reads its group socket in order, so old-key data queued there
    /// ahead of the second transition request is read, and opened, before
    /// it. An untimed reply (its node checked no timed round notice: an
    /// older agent, a notice lost) counts its node's wait as flight. Without
    /// the shell's word on the send, the phase's length from its start
    /// stands in, the controller's table write included (errs long). It is
    /// the exchange just before the drain, so it measures the network as the
    /// old-key data still in flight meets it. The key update phase is not
    /// counted: its length is the round's key agreement, work at both ends,
    /// not time in flight.
    /// Old-key data was sealed before its sender acknowledged the first
    /// transition request, so it is lost only if it stays in flight longer
    /// than this grace (plus the second transition request's own way to the
    /// receiver). A round restored after a restart may count acknowledgements
    /// of requests sent before the restart, which measure nothing: it waits
    /// `max_flight_ms`.
    /// `sent_rtt` is the phase from the send, when the shell said when the
    /// send was (used when no reply gave a sample).
    pub(super) fn drain_grace(&self, cfg: &ControllerConfig, sent_rtt: Option<u64>) -> u64 {
        if let Some(fixed) = cfg.drain_grace_ms {
            return fixed;
        }
        if self.restored {
            return cfg.max_flight_ms;
        }
        let factor = u64::from(cfg.drain_rtt_factor);
        let grace = match self.flight_us {
            Some(us) => us.saturating_mul(factor).div_ceil(1000),
            None => sent_rtt
                .unwrap_or(self.phases_ms.first_transition)
                .saturating_mul(factor),
        };
        grace.max(cfg.drain_floor_ms).min(cfg.max_flight_ms)
    }

    /// What a member's step in this round is made with ([`Member::step`]).
    pub(super) fn step_source(&mut self) -> Option<RoundSource<'_>> {
        Some(RoundSource {
            share: self.share.as_ref()?,
            prepared: &mut self.prepared,
            stepped: &mut self.stepped,
            notes_unsaved: &mut self.notes_unsaved,
        })
    }

    /// Enter `phase` (again, after a restart or a rekey by hand): its clock,
    /// waves and retries start over; the key's activation and the drain's
    /// end are set once.
    fn enter(&mut self, phase: RoundPhase, now: Time, cfg: &ControllerConfig) {
        if self.phase != phase {
            self.phases_ms
                .add(self.phase, now.since(self.phase_started));
        }
        // The first transition's round trip from its request's send.
        let sent_rtt = self
            .sent_at
            .take()
            .filter(|_| self.phase == RoundPhase::FirstTransition)
            .map(|sent| now.since(sent));
        self.sent_us = None;
        self.phase = phase;
        self.phase_started = now;
        self.stale_from = now;
        self.group_sent = 0;
        self.next_wave = None;
        self.retries.clear();
        if phase == RoundPhase::FirstTransition && self.activated_at.is_none() {
            self.activated_at = Some(now);
        }
        if phase == RoundPhase::Draining && self.drain_until.is_none() {
            self.drain_until = Some(now.plus(self.drain_grace(cfg, sent_rtt)));
        }
    }

    /// A first transition reply that ended a member's wait, handled at `now`
    /// after waiting `wait` here, whose request waited `held_us` at the
    /// node (a timed reply; an untimed one counts its node's wait as
    /// flight, which errs long).
    ///
    /// With the send and the reply's arrival both on the shell's µs clock
    /// ([`ControllerMachine::requests_sent`], [`Wait::arrived_us`]) the
    /// round trip is their difference. Otherwise the clock is the machine's,
    /// in ms: the round trip counts one ms more than it reads, so that it
    /// never reads short, less the reply's wait here. A reply that arrived
    /// before its request was sent says that a clock stepped (the wait is
    /// by the wall clock): its wait then counts as flight (errs long).
    pub(super) fn note_flight(&mut self, now: Time, wait: Wait, held_us: Option<u32>) {
        let Some(sent) = self.sent_at else { return };
        let rtt_ms_us = now.since(sent).saturating_add(1).saturating_mul(1000);
        let rtt_us = match (self.sent_us, wait.arrived_us) {
            (Some(s), Some(a)) if a >= s => a - s,
            (Some(_), Some(_)) => rtt_ms_us,
            _ => rtt_ms_us.saturating_sub(u64::from(wait.us)),
        };
        let flight = rtt_us.saturating_sub(u64::from(held_us.unwrap_or(0)));
        self.flight_us = Some(self.flight_us.map_or(flight, |f| f.max(flight)));
    }

    /// Whether the phase's stale deadline has passed with nodes still silent.
    pub(super) fn stale_due(&self, now: Time, cfg: &ControllerConfig) -> bool {
        self.waiting > 0 && self.paused.is_none() && now >= self.stale_from.plus(cfg.stale_after_ms)
    }

    /// The next moment the round has work to do: a group wave, a unicast
    /// retry, the stale deadline, the end of the drain.
    pub(super) fn next_due(&self, cfg: &ControllerConfig) -> Option<Time> {
        let mut due: Option<Time> = None;
        let mut take = |t: Option<Time>| {
            if let Some(t) = t {
                due = Some(due.map_or(t, |d: Time| d.min(t)));
            }
        };
        if self.waiting > 0 {
            take(self.next_wave);
            take(self.retries.peek().map(|Reverse((t, _))| *t));
            if self.paused.is_none() {
                take(Some(self.stale_from.plus(cfg.stale_after_ms)));
            }
        }
        if self.phase == RoundPhase::Draining {
            take(self.drain_until);
        }
        due
    }
}

impl ControllerMachine {
    /// Whether the round in progress waits for `member`.
    pub(super) fn is_waiting(&self, member: u32) -> bool {
        match (&self.round, self.members.get(member)) {
            (Some(r), Some(m)) => r.waits_for(m),
            _ => false,
        }
    }

    pub(super) fn start_round(
        &mut self,
        now: Time,
        reason: TriggerReason,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) {
        let epoch = self.current.epoch().next();
        let key = GroupKey::generate(epoch, rng);
        Self::record(
            out,
            Record::KeyCreated {
                epoch,
                check: key.check_value(),
                reason: reason.clone(),
                at: now,
            },
        );
        for m in self.members.iter_mut() {
            m.progress = None;
        }
        // The share drawn ahead, with its steps (`ahead.rs`), serves this
        // round only; without one, a fresh share.
        let (share, prepared) = self
            .ahead
            .take()
            .unwrap_or_else(|| (ShareSecret::generate(rng), Default::default()));
        let mut round = Round::new(epoch, key, share, reason, now);
        round.prepared = prepared;
        self.round = Some(round);
        self.enter_phase(now, RoundPhase::Distributing, rng, out);
        self.progress_round(now, rng, out);
    }

    /// Enter `phase`: persist, then send its request to the group.
    pub(super) fn enter_phase(
        &mut self,
        now: Time,
        phase: RoundPhase,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) {
        let Some(r) = &mut self.round else { return };
        r.enter(phase, now, &self.cfg);
        let mut waiting = 0;
        for m in self.members.iter_mut() {
            m.attempts = 0;
            waiting += u32::from(r.waits_for(m));
        }
        r.waiting = waiting;
        Self::record(
            out,
            Record::PhaseChanged {
                epoch: r.epoch,
                phase,
                waiting,
                at: now,
            },
        );
        if phase == RoundPhase::Draining {
            // A wait with nothing to send: the rows written here cost the
            // round nothing.
            self.save_ratchets(out);
        }
        if phase == RoundPhase::Distributing {
            // The steps first, then the round's row with their notes, then
            // the batches (`send_key_wave`).
            self.send_key_wave(now, true, rng, out);
            return;
        }
        self.persist_core(out);
        if let Some(step) = transition_step(phase) {
            self.sign_transition(step, out);
            self.send_transition_wave(now, step, rng, out);
        }
    }

    /// The shell's word that the sends of the pass just handled went out at
    /// `at`, after that pass's table write. The first such word after a
    /// phase's group wave is where the phase's round trip starts for the
    /// drain ([`Round::drain_grace`]): the write before it is the
    /// controller's own, no flight. Without it the round trip starts with
    /// the phase, which only errs long. `at_us`: the same moment on the
    /// shell's µs clock, read before the sends (the clock of
    /// [`super::ControllerInput::DatagramWaited`]'s `arrived_us`).
    pub fn requests_sent(&mut self, at: Time, at_us: Option<u64>) {
        if let Some(r) = &mut self.round {
            if r.sent_at.is_none() && r.group_sent > 0 && at >= r.phase_started {
                r.sent_at = Some(at);
                r.sent_us = at_us;
            }
        }
    }

    /// Writes the rows of the members whose ratchet moved since they were
    /// last written ([`super::members::Member::ratchet_unsaved`]); the
    /// round's note of steps to make again after a restart is then void.
    /// Before the pass's `PersistCore`, which carries the emptied note.
    pub(super) fn save_ratchets(&mut self, out: &mut Out) {
        for m in self.members.iter_mut() {
            if m.ratchet_unsaved {
                m.persist(out);
            }
        }
        if let Some(r) = &mut self.round {
            r.stepped.clear();
        }
    }

    /// After a restart: each step noted in the restored round
    /// ([`Round::stepped`]) made again, with the round's share, for a member
    /// whose row still holds the confirmed share it was made on and no
    /// other step (the same step: the node may have taken it, and its
    /// messages are checked under it).
    pub(super) fn remake_round_steps(&mut self) {
        let Some(r) = &mut self.round else { return };
        let noted: Vec<(u32, Share)> = r.stepped.iter().map(|(m, s)| (*m, *s)).collect();
        for (member, node_share) in noted {
            let Some(m) = self.members.get_mut(member) else {
                continue;
            };
            let rt = &m.row.ratchet;
            if rt.next.is_some() || rt.committed.as_ref().map(|c| c.share) != Some(node_share) {
                continue;
            }
            if let Some(src) = r.step_source() {
                let _ = m.round_step(src);
            }
        }
        // The notes made again are the persisted ones.
        r.notes_unsaved = false;
    }

    /// Signs the round's transition request of `step` under the current term
    /// (the copy its group waves resend).
    pub(super) fn sign_transition(&mut self, step: Step, out: &mut Out) {
        let Some(msg) = self.transition_request(step, out) else {
            return;
        };
        if let Some(r) = &mut self.round {
            r.set_transition_msg(step, msg);
        }
    }

    /// The transition chain of the round of `epoch` under the current term
    /// (`crypto::TransitionChain`): derived from the signing key, so a
    /// restarted or standby controller reveals what its key update committed to.
    pub(super) fn chain(&self, epoch: Epoch) -> TransitionChain {
        TransitionChain::derive(&self.signing.to_bytes(), self.term, epoch)
    }

    /// The commitment every key update request of the round of `epoch` carries.
    pub(super) fn commitment(&self, epoch: Epoch) -> [u8; REVEAL_LEN] {
        self.chain(epoch).commitment()
    }

    /// A transition request of `step` for the round's epoch, signed under
    /// the current term and the next sequence number.
    pub(super) fn transition_request(&mut self, step: Step, out: &mut Out) -> Option<Vec<u8>> {
        let epoch = self.round.as_ref()?.epoch;
        let seq = self.next_seq(out);
        Some(wire::sign(
            wire::transition(self.term, step, epoch, seq, &self.chain(epoch).reveal(step)),
            &self.signing,
        ))
    }

    /// Marks every member the phase still waits for stale.
    pub(super) fn mark_stale(&mut self, now: Time, out: &mut Out) {
        let Some(r) = &mut self.round else { return };
        let (epoch, phase) = (r.epoch, r.phase);
        for m in self.members.iter_mut() {
            if !r.waits_for(m) {
                continue;
            }
            m.row.status = MemberStatus::Stale;
            m.persist(out);
            Self::record(
                out,
                Record::NodeStale {
                    epoch,
                    member: m.row.member,
                    node_id: m.row.node_id.clone(),
                    phase,
                    at: now,
                },
            );
            Self::record(
                out,
                m.status_changed(MemberStatus::Active, MemberStatus::Stale, epoch, now),
            );
        }
        r.waiting = 0;
    }

    /// Confirmations a phase needs before it may end (SPEC §2: a round that
    /// reaches too few nodes is not completed): `min_acked` and, with
    /// `min_acked_majority`, more than half the joined nodes; never more
    /// than the joined nodes, and none when no node has joined yet.
    pub fn needed(&self) -> u32 {
        self.cfg.needed(self.members.joined())
    }

    /// Live nodes that confirmed the current phase (in the drain: the first transition).
    pub fn confirmed(&self) -> u32 {
        let Some(r) = &self.round else { return 0 };
        let target = target_step(r.phase).unwrap_or(Step::FirstTransition);
        self.members
            .iter()
            .filter(|m| m.row.status == MemberStatus::Active && m.progress >= Some(target))
            .count() as u32
    }

    /// Since when the round in progress is paused, if it is.
    pub fn paused_since(&self) -> Option<Time> {
        self.round.as_ref().and_then(|r| r.paused)
    }

    /// Pause the round: nobody is marked stale, the old key stays current,
    /// retries go on; an answer, a restart or a rekey by hand resumes it.
    pub(super) fn pause(&mut self, now: Time, out: &mut Out) {
        let (confirmed, needed, joined) = (self.confirmed(), self.needed(), self.members.joined());
        let Some(r) = &mut self.round else { return };
        if r.paused.is_some() {
            return;
        }
        let silent: Vec<NodeId> = self
            .members
            .iter()
            .filter(|m| r.waits_for(m))
            .map(|m| m.row.node_id.clone())
            .collect();
        r.paused = Some(now);
        r.pauses += 1;
        Self::record(
            out,
            Record::RoundPaused {
                epoch: r.epoch,
                phase: r.phase,
                confirmed,
                needed,
                joined,
                silent,
                pauses: r.pauses,
                at: now,
            },
        );
        self.persist_core(out);
        self.arm_round_timer();
    }

    /// End a pause; the stale deadline counts again from now. Returns whether
    /// the round was paused.
    pub(super) fn resume(&mut self, now: Time, cause: ResumeCause, out: &mut Out) -> bool {
        let Some(r) = &mut self.round else {
            return false;
        };
        if r.paused.take().is_none() {
            return false;
        }
        r.stale_from = now;
        Self::record(
            out,
            Record::RoundResumed {
                epoch: r.epoch,
                phase: r.phase,
                cause,
                at: now,
            },
        );
        self.persist_core(out);
        true
    }

    /// Move the round on while its conditions hold. The checks of S1 and S2 live here:
    /// the first transition only once every live node holds the new key (`waiting == 0`
    /// in Distributing), the second only once every live node seals with it and the
    /// drain grace for old-key data in flight has passed.
    pub(super) fn progress_round(
        &mut self,
        now: Time,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) {
        while let Some(r) = &self.round {
            // A phase that waits for confirmations ends only with enough of
            // them (`needed`): too few (live nodes left out earlier, say) and
            // the round pauses until nodes answer again.
            let waited_out = r.waiting == 0 && target_step(r.phase).is_some() && r.paused.is_none();
            if waited_out && self.confirmed() < self.needed() {
                self.pause(now, out);
                break;
            }
            let next = match r.phase {
                // S1: every live node acknowledged the new key.
                RoundPhase::Distributing if waited_out => RoundPhase::FirstTransition,
                // Every live node seals with the new key: start the drain.
                RoundPhase::FirstTransition if waited_out => RoundPhase::Draining,
                // S2: nobody seals with the old key and the drain grace is over.
                RoundPhase::Draining if r.drain_until.is_some_and(|t| now >= t) => {
                    RoundPhase::SecondTransition
                }
                RoundPhase::SecondTransition if waited_out => {
                    self.finish_round(now, rng, out);
                    continue;
                }
                _ => break,
            };
            self.enter_phase(now, next, rng, out);
        }
        self.arm_round_timer();
    }

    fn finish_round(&mut self, now: Time, rng: &mut (impl RngCore + CryptoRng), out: &mut Out) {
        let Some(mut r) = self.round.take() else {
            return;
        };
        r.phases_ms.add(r.phase, now.since(r.phase_started));
        let (mut nodes, mut acked, mut enrolled) = (0, 0, 0);
        let (mut stale_nodes, mut not_joined) = (Vec::new(), Vec::new());
        for m in self.members.iter_mut() {
            enrolled += 1;
            match m.row.status {
                MemberStatus::Active => {
                    nodes += 1;
                    acked += u32::from(m.progress == Some(Step::SecondTransition));
                }
                MemberStatus::Stale => {
                    nodes += 1;
                    stale_nodes.push(m.row.node_id.clone());
                }
                MemberStatus::Enrolled => not_joined.push(m.row.node_id.clone()),
            }
            m.seals = 0;
            m.opens = 0;
        }
        Self::record(
            out,
            Record::RoundFinished {
                epoch: r.epoch,
                check: r.key.check_value(),
                reason: r.reason.clone(),
                started_at: r.started_at,
                finished_at: now,
                phases_ms: r.phases_ms,
                nodes,
                acked,
                stale: stale_nodes.len() as u32,
                enrolled,
                stale_nodes,
                not_joined,
                pauses: r.pauses,
            },
        );
        self.previous = Some(std::mem::replace(&mut self.current, r.key.clone()));
        // The round's deadlines are void; the next one armed replaces them.
        self.round_timer = None;
        self.activated_at = r.activated_at.unwrap_or(now);
        self.total_seals = 0;
        self.total_opens = 0;
        // The round's share is forgotten with it: what it made is written now.
        self.save_ratchets(out);
        self.persist_core(out);
        self.arm_age();
        self.start_pending(now, rng, out);
    }
}
