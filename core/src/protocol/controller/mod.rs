//! The controller side: [`ControllerMachine`], the rekey round of SPEC §2, the
//! triggers of SPEC §3 and the answers to joins and key requests (SPEC §5).
//!
//! The machine is split along its seams, one subsystem per file:
//!
//! - `mod.rs` (here): the machine itself — its state, `new` / `restore`,
//!   snapshots, accessors, and `handle`, which dispatches each input;
//! - `config.rs`: [`ControllerConfig`], every default in one place;
//! - `io.rs`: the vocabulary — [`ControllerInput`], [`ControllerAction`],
//!   [`Record`] and the errors of commands;
//! - `persist.rs`: what is stored — [`ControllerCore`], [`MemberPersist`],
//!   [`MemberRatchet`] — and when;
//! - `members.rs`: the member table (`Members`, `Member`: enrollment,
//!   addresses, per-member budgets, the ratchet step prepared for each) and
//!   the commands that change it;
//! - `round.rs`: the round (`Round`) and its phase engine, with the S1/S2
//!   checks, the drain, the stale deadline, pause and resume;
//! - `retries.rs`: the requests of each phase, group waves then unicast
//!   retries, and the round's deadline;
//! - `trigger.rs`: when a trigger starts a round (at once, queued, spaced);
//! - `auth.rs`: inbound authentication (MACs under a member's chains, replay
//!   windows) and the enrollment handshake;
//! - `inbound.rs`: datagrams in — dispatch of node messages, group data
//!   checked for a leaked key;
//! - `beacon.rs`: the signed beacon;
//! - `state_hash.rs`: `Hash` for the model check.
//!
//! Persistence is incremental (`persist.rs`): `PersistCore` at every phase
//! change and `PersistMember` at every change of a member's row.
//!
//! Time: the machine keeps its own deadlines — the round's (retries, the
//! stale deadline, the end of the drain, a queued trigger), the key age and
//! the beacon — and tells the shell only the earliest,
//! [`ControllerMachine::poll_timeout`]; the shell feeds
//! [`ControllerInput::Timeout`] once it has passed.

mod ahead;
mod auth;
mod beacon;
mod config;
mod inbound;
mod io;
mod members;
mod persist;
mod retries;
mod round;
mod state_hash;
mod trigger;

pub use config::ControllerConfig;
pub use io::{
    CommandError, ControllerAction, ControllerInput, MemberStatus, Outcome, PhaseDurations, Record,
    RestoreError, ResumeCause, TriggerOutcome, Via,
};
pub use persist::{
    apply_persist, fold_mark, store_snapshot, AnsweredInit, Committed, ControllerCore,
    ControllerPersist, MemberPersist, MemberRatchet, MemoryState, Pending, RoundPersist,
    StateStore,
};

use super::triggers::TriggerReason;
use super::Time;
use crate::crypto::{CheckValue, CipherCache, Epoch, GroupKey, InitialKey, ShareSecret};
use crate::wire::{DataReplay, NodeId, RoundPhase, Step};
use beacon::Beacon;
use core::net::SocketAddr;
use ed25519_dalek::SigningKey;
use members::Members;
use rand::{CryptoRng, RngCore};
use round::{Round, Wait};

const SEQ_BLOCK: u64 = 4096;
/// New handshakes (each costs two X25519 operations) a member may have
/// answered at once…
pub const HANDSHAKE_BURST: u32 = 2;
/// …and one more per this many ms.
pub const HANDSHAKE_INTERVAL_MS: u64 = 250;
/// A retry of an answered handshake init gets the cached answer again at most
/// once per this many ms (a hash and a send: no key agreement).
pub const HANDSHAKE_RESEND_MS: u64 = 100;
/// How long a re-join allowed by the operator stays open.
pub const REJOIN_WINDOW_MS: u64 = 10 * 60 * 1000;

/// The leader term of a sole controller (an embedded management table, or
/// the first leader of a shared one). Every controller message carries the
/// machine's term ([`ControllerMachine::set_term`]); nodes refuse a lower one.
pub const TERM: u32 = 1;

type Out = Vec<ControllerAction>;

/// The controller's protocol state. See the module docs.
///
/// `Clone` and `Hash` (in `controller/state_hash.rs`) let a model checker keep
/// machine states and tell them apart (tests/protocol/model_check.rs).
#[derive(Clone)]
pub struct ControllerMachine {
    cfg: ControllerConfig,
    signing: SigningKey,
    current: GroupKey,
    activated_at: Time,
    round: Option<Round>,
    members: Members,
    seq: u64,
    seq_reserved: u64,
    pending: Option<TriggerReason>,
    total_seals: u64,
    total_opens: u64,
    /// The round's deadline: retries, stale deadline, end of the drain grace
    /// (or, with no round, when the queued trigger may start its round).
    round_timer: Option<Time>,
    /// When the key-age trigger is due.
    age_timer: Option<Time>,
    /// The key the last round retired: nodes that have not taken the second
    /// transition request yet still open data under it, so the controller
    /// still checks such data for a leak.
    previous: Option<GroupKey>,
    /// Group data replay state, by the rule the nodes use.
    data_replay: DataReplay,
    /// A sequence number accepted since the last snapshot was written.
    marks_unsaved: bool,
    /// When the last round set off by node reports started.
    node_trigger_at: Option<Time>,
    beacon: Beacon,
    /// The leader term every message carries ([`TERM`] unless the shell set
    /// the term of its lease).
    term: u32,
    /// The next round's share and steps, prepared while idle (`ahead.rs`;
    /// in memory only).
    ahead: Option<(ShareSecret, ahead::Prepared)>,
    /// The share notice of `ahead`'s share (`ahead.rs`).
    notice: ahead::Notice,
    /// The expanded keys group data is opened under (a cache, not state).
    data_ciphers: CipherCache,
}

impl ControllerMachine {
    /// A new controller with a fresh signing key and the fleet's first group key (epoch 1).
    pub fn new(
        cfg: ControllerConfig,
        now: Time,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Self {
        let signing = SigningKey::generate(rng);
        let current = GroupKey::generate(Epoch(1), rng);
        out.push(ControllerAction::Record(Record::KeyCreated {
            epoch: current.epoch(),
            check: current.check_value(),
            reason: TriggerReason::Initial,
            at: now,
        }));
        let mut c = ControllerMachine::from_parts(cfg, signing, current, now, None, Members::new());
        c.persist_core(out);
        c
    }

    /// Resume from persisted state; feed [`ControllerInput::Start`] next.
    pub fn restore(
        p: &ControllerPersist,
        cfg: ControllerConfig,
        now: Time,
    ) -> Result<Self, RestoreError> {
        let core = &p.core;
        let members = Members::restore(&p.members, core.next_member)?;
        let round = core.round.as_ref().map(|r| Round::restore(r, now));
        let signing = SigningKey::from_bytes(&core.signing_key);
        let mut c = ControllerMachine::from_parts(
            cfg,
            signing,
            core.current.clone(),
            core.activated_at,
            round,
            members,
        );
        c.seq = core.seq_reserved;
        c.seq_reserved = core.seq_reserved;
        c.pending = core.pending.clone();
        c.remake_round_steps();
        Ok(c)
    }

    /// A machine with nothing in memory but its keys, round and members.
    fn from_parts(
        cfg: ControllerConfig,
        signing: SigningKey,
        current: GroupKey,
        activated_at: Time,
        round: Option<Round>,
        members: Members,
    ) -> Self {
        ControllerMachine {
            cfg,
            signing,
            current,
            activated_at,
            round,
            members,
            seq: 0,
            seq_reserved: 0,
            pending: None,
            total_seals: 0,
            total_opens: 0,
            round_timer: None,
            age_timer: None,
            previous: None,
            data_replay: DataReplay::new(super::NodeConfig::default().data_replay_senders),
            marks_unsaved: false,
            node_trigger_at: None,
            beacon: Beacon::default(),
            term: TERM,
            ahead: None,
            notice: ahead::Notice::default(),
            data_ciphers: CipherCache::default(),
        }
    }

    /// The snapshot of the controller's own state.
    pub fn core(&self) -> ControllerCore {
        ControllerCore {
            signing_key: self.signing.to_bytes(),
            current: self.current.clone(),
            activated_at: self.activated_at,
            round: self.round.as_ref().map(Round::persist),
            seq_reserved: self.seq_reserved,
            next_member: self.members.next_number(),
            pending: self.pending.clone(),
        }
    }

    /// Whether a node's sequence number was accepted since the last snapshot
    /// was taken with [`Self::snapshot_saved`]: the shell writes one at most
    /// every second or so while this holds, and at a clean stop, so a restarted
    /// controller still refuses replays (no write per message).
    pub fn replay_marks_unsaved(&self) -> bool {
        self.marks_unsaved
    }

    /// The shell wrote [`Self::snapshot`] (or [`Self::replay_marks`]) durably.
    pub fn snapshot_saved(&mut self) {
        self.marks_unsaved = false;
    }

    /// Each member's replay mark: the highest sequence number accepted from
    /// it (members that sent nothing yet are left out). A shell writes the
    /// ones that moved with [`StateStore::put_replay_marks`] while
    /// [`Self::replay_marks_unsaved`] holds, then calls [`Self::snapshot_saved`].
    pub fn replay_marks(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.members
            .iter()
            .filter_map(|m| m.row.seq_seen.map(|s| (m.row.member, s)))
    }

    /// The full snapshot (core and every member row).
    pub fn snapshot(&self) -> ControllerPersist {
        ControllerPersist {
            core: self.core(),
            members: self.members.iter().map(|m| m.row.clone()).collect(),
        }
    }

    /// The leader term every message of this controller carries.
    pub fn term(&self) -> u32 {
        self.term
    }

    /// Takes the leader term of the lease the shell holds (only ever
    /// raised). What was signed under the old term (the beacon, a round's
    /// transition request) is signed again under the new one, so nothing of
    /// the old term goes out after this.
    pub fn set_term(&mut self, term: u32, out: &mut Out) {
        if term <= self.term {
            return;
        }
        self.term = term;
        self.beacon.last = None;
        for step in [Step::FirstTransition, Step::SecondTransition] {
            let signed = self.round.as_ref().and_then(|r| r.transition_msg(step));
            if signed.is_some() {
                self.sign_transition(step, out);
            }
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// Sets the unicast address the beacon announces (the shell's socket).
    pub fn set_address(&mut self, addr: SocketAddr) {
        self.cfg.address = addr;
    }

    pub fn current_epoch(&self) -> Epoch {
        self.current.epoch()
    }

    /// The round in progress: its epoch and phase.
    pub fn round(&self) -> Option<(Epoch, RoundPhase)> {
        self.round.as_ref().map(|r| (r.epoch, r.phase))
    }

    /// The round in progress: when it started and its key's check value.
    pub fn round_started(&self) -> Option<(Time, CheckValue)> {
        self.round
            .as_ref()
            .map(|r| (r.started_at, r.key.check_value()))
    }

    /// Live members still to confirm the current phase.
    pub fn waiting(&self) -> u32 {
        self.round.as_ref().map_or(0, |r| r.waiting)
    }

    /// Member number and status of every enrolled node.
    pub fn members(&self) -> impl Iterator<Item = (u32, &NodeId, MemberStatus)> + '_ {
        self.members
            .iter()
            .map(|m| (m.row.member, &m.row.node_id, m.row.status))
    }

    /// Enrolled nodes that an enrollment of `initial_key` at `addr` would
    /// duplicate: the node already enrolled with the same initial key (each
    /// appliance has its own: a second one is a mislabelled or cloned
    /// appliance), and the node already at the same address (an unspecified
    /// address, not yet known, matches none).
    pub fn enrolled_alike(
        &self,
        initial_key: &InitialKey,
        addr: SocketAddr,
    ) -> (Option<&NodeId>, Option<&NodeId>) {
        self.members.alike(initial_key, addr)
    }

    pub fn member_status(&self, node_id: &NodeId) -> Option<MemberStatus> {
        let i = self.members.number_of(node_id)?;
        self.members.get(i).map(|m| m.row.status)
    }

    /// The member number of an enrolled node.
    pub fn member_number(&self, node_id: &NodeId) -> Option<u32> {
        self.members.number_of(node_id)
    }

    /// Feed one input; actions are appended to `out`. Only commands can fail;
    /// a bad datagram becomes a [`Record::Refused`].
    pub fn handle(
        &mut self,
        now: Time,
        input: ControllerInput<'_>,
        rng: &mut (impl RngCore + CryptoRng),
        out: &mut Out,
    ) -> Result<Outcome, CommandError> {
        let records_from = out.len();
        let round_before = self.round.as_ref().map(|r| r.epoch);
        match input {
            ControllerInput::Start => self.start(now, rng, out),
            ControllerInput::Datagram { from, bytes }
            | ControllerInput::DatagramWaited {
                from,
                bytes,
                waited_us: _,
                arrived_us: _,
            } => {
                let wait = match input {
                    ControllerInput::DatagramWaited {
                        waited_us,
                        arrived_us,
                        ..
                    } => Wait {
                        us: waited_us,
                        arrived_us: Some(arrived_us),
                    },
                    _ => Wait::default(),
                };
                if let Err(reason) = self.on_datagram(now, (from, wait), bytes, rng, out) {
                    Self::record(
                        out,
                        Record::Refused {
                            from,
                            reason,
                            at: now,
                        },
                    );
                }
            }
            ControllerInput::Timeout => self.on_timeout(now, rng, out),
            ControllerInput::Enroll {
                node_id,
                initial_key,
                addr,
            } => {
                let fingerprint = initial_key.fingerprint();
                self.enroll(now, node_id.clone(), initial_key, addr, out)?;
                let member = self.members.number_of(&node_id).unwrap_or(0);
                return Ok(Outcome::Enrolled {
                    member,
                    fingerprint,
                });
            }
            ControllerInput::Remove { node_id } => {
                self.remove(now, node_id, rng, out)?;
                return Ok(self.round_outcome(round_before, &out[records_from..]));
            }
            ControllerInput::Rekey => {
                if !self.cfg.triggers.manual {
                    return Err(CommandError::ManualRekeyOff);
                }
                self.fire(now, TriggerReason::Manual, rng, out);
                return Ok(self.round_outcome(round_before, &out[records_from..]));
            }
            ControllerInput::AllowRejoin { node_id } => {
                self.allow_rejoin(now, node_id.clone(), out)?;
                let until = self
                    .members
                    .number_of(&node_id)
                    .and_then(|i| self.members.get(i))
                    .and_then(|m| m.row.rejoin_until)
                    .unwrap_or(now);
                return Ok(Outcome::RejoinAllowed { until });
            }
        }
        Ok(Outcome::Done)
    }

    /// The round that answers a round command whose actions are `actions`:
    /// none unless a trigger fired; the round it started, or the one queued
    /// behind the round in progress (`before`).
    fn round_outcome(&self, before: Option<Epoch>, actions: &[ControllerAction]) -> Outcome {
        let fired = actions
            .iter()
            .any(|a| matches!(a, ControllerAction::Record(Record::TriggerFired { .. })));
        let answered_by = match (fired, before, self.round.as_ref()) {
            (false, _, _) => None,
            (true, Some(e), _) => Some(Epoch(e.0 + 1)),
            (true, None, Some(r)) => Some(r.epoch),
            (true, None, None) => None,
        };
        Outcome::Round { answered_by }
    }

    /// The machine's next deadline: feed [`ControllerInput::Timeout`] once it
    /// has passed. The shell asks again after every input (an input may move
    /// it, earlier or later); `None` with nothing to wait for (as before
    /// `Start`).
    pub fn poll_timeout(&self) -> Option<Time> {
        let notice = self.notice.due.then_some(Time(0));
        [self.round_timer, self.age_timer, self.beacon.due, notice]
            .into_iter()
            .flatten()
            .min()
    }

    /// [`ControllerInput::Timeout`]: each deadline due by `now`, in this
    /// order: the round's, the key age, the beacon. A deadline one of them
    /// sets again at or before `now` shows in [`Self::poll_timeout`] after.
    fn on_timeout(&mut self, now: Time, rng: &mut (impl RngCore + CryptoRng), out: &mut Out) {
        if self.round_timer.is_some_and(|t| t <= now) {
            self.round_timer = None;
            self.tick(now, rng, out);
        }
        if self.age_timer.is_some_and(|t| t <= now) {
            self.age_timer = None;
            self.check_age(now, rng, out);
        }
        self.on_beacon_timer(now, out);
        if self.notice.due {
            self.send_notice(out);
        }
    }

    fn start(&mut self, now: Time, rng: &mut (impl RngCore + CryptoRng), out: &mut Out) {
        self.demote_members_without_ratchet(now, out);
        self.resume(now, ResumeCause::Restart, out);
        if let Some(phase) = self.round.as_ref().map(|r| r.phase) {
            // Acknowledgements were not persisted: ask again; nodes answer idempotently.
            self.enter_phase(now, phase, rng, out);
        }
        self.arm_age();
        self.progress_round(now, rng, out);
        self.start_pending(now, rng, out);
        self.check_age(now, rng, out);
        self.send_beacon(now, out);
    }

    /// The next sequence number of a controller message; a block of them is
    /// reserved (persisted) ahead, so a restarted controller never reuses one.
    fn next_seq(&mut self, out: &mut Out) -> u64 {
        self.seq += 1;
        if self.seq >= self.seq_reserved {
            self.seq_reserved = self.seq + SEQ_BLOCK;
            self.persist_core(out);
        }
        self.seq
    }

    fn persist_core(&mut self, out: &mut Out) {
        if let Some(r) = &mut self.round {
            r.notes_unsaved = false;
        }
        out.push(ControllerAction::PersistCore(Box::new(self.core())));
    }

    /// Persists the round's row when a step made with its share was noted
    /// since it was last written ([`round::Round::notes_unsaved`]): the note is
    /// what makes that step again after a restart, so it is durable before
    /// anything wrapped under the step goes out. Called after making steps
    /// and before the sends that carry them.
    fn persist_notes(&mut self, out: &mut Out) {
        if self.round.as_ref().is_some_and(|r| r.notes_unsaved) {
            self.persist_core(out);
        }
    }

    fn record(out: &mut Out, r: Record) {
        out.push(ControllerAction::Record(r));
    }
}
