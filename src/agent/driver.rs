//! [`NodeDriver`]: one [`NodeMachine`] on a [`Transport`], its timers and its persistence.
//!
//! The driver carries bytes and time in and actions out, in the order the
//! machine gave them; a `Persist` action is made durable (through the
//! [`Persister`]) before any action after it is carried out, and a failure
//! to persist stops the batch: nothing the disk does not know is ever sent.
//!
//! It makes no protocol decision. Several drivers run in one process (each
//! on its own sockets, see [`Transport::from_sockets`]) as well as one.
//!
//! Refused datagrams are logged rate-counted ([`RateCounter`]): the first of a
//! kind from a source address in a window (`keyfleet-agent run
//! --refusal-log-window S`, 60 s by default) gets its log line; the rest are
//! counted, and one line says how many when the window closes (a timer of the
//! driver's own, or shutdown). A flood costs a few lines, not one per datagram.
//!
//! ```no_run
//! # async fn demo(mut d: keyfleet::agent::NodeDriver) -> Result<(), keyfleet::agent::AgentError> {
//! d.link_up().await?; // after new or restore: the key request of SPEC §5
//! loop {
//!     let wake = d.wait().await?; // cancel-safe: may sit in a select! with other sources
//!     d.handle(wake).await?;
//!     for event in d.take_events() {
//!         // DriverEvent::Delivered(plaintext) → the application
//!     }
//! }
//! # }
//! ```

use std::net::SocketAddr;

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::net::{Clock, Datagram, Timers, Transport};
use crate::statefile::StateFileError;
use keyfleet_core::protocol::{
    Delivered, NodeAction, NodeEvent, NodeInput, NodeMachine, NodePersist, NodeState, Refusal, Time,
};
use keyfleet_core::ratecount::{RateCounter, RateVerdict, Summary};

use super::app::SendOutcome;
use super::AgentError;

/// Where a node's snapshots go before the sends that follow them.
pub trait Persister: Send {
    /// Store `node`: with `flush`, durably (return only when it is on disk,
    /// `NodeAction::Persist`); without, so that a restarted process finds it
    /// (`NodeAction::Checkpoint`, a transition: a power loss may take it back
    /// to the last flushed snapshot).
    fn persist(
        &mut self,
        node: &NodePersist,
        now_ms: u64,
        last_sync_ms: Option<u64>,
        flush: bool,
    ) -> Result<(), StateFileError>;
}

/// Keeps the latest snapshot in memory (a node of `keyfleet sim --transport udp`
/// whose "restart" restores from it).
#[derive(Default)]
pub struct MemoryPersister {
    pub latest: Option<NodePersist>,
    pub writes: u64,
}

impl Persister for MemoryPersister {
    fn persist(
        &mut self,
        node: &NodePersist,
        _: u64,
        _: Option<u64>,
        _: bool,
    ) -> Result<(), StateFileError> {
        self.latest = Some(node.clone());
        self.writes += 1;
        Ok(())
    }
}

/// What woke the driver: a datagram, or timers that passed.
#[derive(Debug)]
pub enum Wake {
    Datagram(Datagram),
    /// A deadline passed: the machine's own (see `NodeMachine::poll_timeout`) or the driver's.
    Timeout,
}

/// What the driver hands up after a [`NodeDriver::handle`] or [`NodeDriver::send`].
#[derive(Debug, Clone)]
pub enum DriverEvent {
    /// A group message decrypted for the application.
    Delivered(Delivered),
    /// A state change, a refusal, a sync, a full hold queue (already logged).
    Node(NodeEvent),
}

/// Counters of one driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverStats {
    pub datagrams_in: u64,
    pub refused: u64,
    /// Node-to-controller messages heard on the group (every agent's joins,
    /// key requests, acknowledgements, usage reports; or forged ones): not
    /// for a node, so ignored rather than refused.
    pub node_messages_ignored: u64,
    /// Data no held key opened (must stay 0 in a lossless rotation).
    pub undecryptable: u64,
    pub data_sent: u64,
    /// Application messages dropped because the hold queue was full (the
    /// client was answered `A` 2).
    pub send_dropped: u64,
    pub delivered: u64,
    /// Delivered data without an epoch hint, opened by trying the held keys.
    pub delivered_by_trial: u64,
    pub persisted: u64,
    /// Usage reports sent to the controller (for its count triggers; the
    /// machine counts them).
    pub usage_reports: u64,
}

/// The machine's next deadline.
const MACHINE_TIMER: u8 = 0;

/// The driver's own timer: the end of the next refusal window with counted
/// refusals, when its summary line is due.
const REFUSAL_TIMER: u8 = 2;

/// Refusal kinds that mean someone sends what the fleet would not (logged at
/// warn). The rest are routine on a node (other nodes' control messages to the
/// group, its own looped back, retransmissions) and logged at debug.
fn suspicious(kind: &str) -> bool {
    matches!(
        kind,
        "undecryptable"
            | "bad_signature"
            | "bad_mac"
            | "forged_data"
            | "key_mismatch"
            | "unwrap"
            | "seq_jump"
            | "too_many_senders"
            | "verify_budget"
            // A controller that lost its lease still sends (or a replay of one).
            | "stale_term"
    )
}

/// One node machine on real sockets. See the module docs.
pub struct NodeDriver {
    machine: NodeMachine,
    transport: Transport,
    clock: Clock,
    timers: Timers<u8>,
    persister: Box<dyn Persister>,
    rng: StdRng,
    out: Vec<NodeAction>,
    events: Vec<DriverEvent>,
    stats: DriverStats,
    last_sync_ms: Option<u64>,
    /// Refusals counted, not logged one by one.
    refusals: RateCounter,
    /// Not synced with the controller since (ms), for the waiting warning.
    unsynced_since: Option<u64>,
    /// When the waiting warning was last logged.
    waiting_logged: Option<u64>,
    /// The last datagram that failed its authentication while not synced:
    /// (kind, source).
    auth_failure: Option<(&'static str, SocketAddr)>,
    /// The member number the group socket's kernel filter is set for (it
    /// drops that member's own data looped back and the key update batches
    /// without its entry; see [`Transport::filter_group`]).
    filtered_for: Option<u32>,
}

/// A node not synced with its controller says so at warn level after this long…
pub const WAITING_FIRST_WARN_MS: u64 = 10_000;
/// …and again every this long while it waits.
pub const WAITING_WARN_EVERY_MS: u64 = 60_000;

/// Node-to-controller messages (joins, key requests, acknowledgements, usage
/// reports) sent to the group come back to every node, its own included: the
/// ordinary traffic of a healthy fleet, not refusals.
fn is_group_echo(reason: &Refusal) -> bool {
    matches!(reason, Refusal::Unexpected { role: "node", .. })
}

/// Refusal kinds that show the node hears a controller whose messages fail
/// their check (another initial key enrolled, or another controller).
fn is_auth_failure(kind: &str) -> bool {
    matches!(
        kind,
        "bad_mac" | "bad_signature" | "bad_controller_key" | "unwrap" | "key_mismatch"
    )
}

impl NodeDriver {
    /// A driver for `machine` (new or restored) on `transport`. Keys for
    /// data nonces come from the OS CSPRNG.
    pub fn new(
        machine: NodeMachine,
        transport: Transport,
        persister: Box<dyn Persister>,
    ) -> NodeDriver {
        let clock = transport.clock().clone();
        NodeDriver {
            machine,
            transport,
            clock,
            timers: Timers::new(),
            persister,
            rng: StdRng::from_entropy(),
            out: Vec::new(),
            events: Vec::new(),
            stats: DriverStats::default(),
            last_sync_ms: None,
            refusals: RateCounter::default(),
            unsynced_since: None,
            waiting_logged: None,
            auth_failure: None,
            filtered_for: None,
        }
    }

    /// Logs refusals in windows of `window_ms` (0: a line for every one), with
    /// at most `max_sources` source addresses counted separately at once.
    pub fn with_refusal_window(mut self, window_ms: u64, max_sources: usize) -> NodeDriver {
        self.refusals = RateCounter::new(window_ms, max_sources);
        self
    }

    /// The refusal counter's books (seen, logged in full, summarized, pending).
    pub fn refusal_totals(&self) -> keyfleet_core::ratecount::Totals {
        self.refusals.totals()
    }

    /// Draws data nonces from `rng` instead (a seeded run of a simulator).
    pub fn with_rng(mut self, rng: StdRng) -> NodeDriver {
        self.rng = rng;
        self
    }

    /// Carries over the last sync time of a restored node (for the status report).
    pub fn with_last_sync(mut self, last_sync_ms: Option<u64>) -> NodeDriver {
        self.last_sync_ms = last_sync_ms;
        self
    }

    pub fn machine(&self) -> &NodeMachine {
        &self.machine
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Where the node sends what it has for the controller: the
    /// controller's unicast address once learned, else the configured one.
    pub fn controller(&self) -> SocketAddr {
        self.machine.controller_addr()
    }

    pub fn stats(&self) -> DriverStats {
        DriverStats {
            usage_reports: self.machine.usage_reports(),
            ..self.stats
        }
    }

    pub fn last_sync_ms(&self) -> Option<u64> {
        self.last_sync_ms
    }

    /// Events since the last call.
    pub fn take_events(&mut self) -> Vec<DriverEvent> {
        std::mem::take(&mut self.events)
    }

    /// Tell the machine it can communicate (start, restart, link up): it asks
    /// the controller for the current key (SPEC §5) or joins.
    pub async fn link_up(&mut self) -> Result<(), AgentError> {
        let now = self.clock.now_ms();
        self.feed(now, NodeInput::LinkUp).await
    }

    /// Tell the machine a link it uses went down: it holds its data and asks
    /// for the current key (again, at once, on [`NodeDriver::link_up`]).
    pub async fn link_down(&mut self) -> Result<(), AgentError> {
        let now = self.clock.now_ms();
        self.feed(now, NodeInput::LinkDown).await
    }

    /// Waits for the next datagram or timer. Cancel-safe.
    pub async fn wait(&mut self) -> Result<Wake, AgentError> {
        tokio::select! {
            d = self.transport.recv() => Ok(Wake::Datagram(d?)),
            fired = self.timers.expired(&self.clock) => {
                if fired.contains(&REFUSAL_TIMER) {
                    let mut closed = Vec::new();
                    self.refusals.close_expired(self.clock.now_ms(), &mut closed);
                    self.log_summaries(&closed);
                    self.arm_refusal_timer();
                }
                Ok(Wake::Timeout)
            }
        }
    }

    /// Feeds what [`NodeDriver::wait`] returned and carries out the actions.
    pub async fn handle(&mut self, wake: Wake) -> Result<(), AgentError> {
        match wake {
            Wake::Datagram(d) => {
                self.stats.datagrams_in += 1;
                let input = match d.waited_us {
                    Some(waited_us) => NodeInput::DatagramWaited {
                        from: d.from,
                        bytes: &d.bytes,
                        waited_us,
                    },
                    None => NodeInput::Datagram {
                        from: d.from,
                        bytes: &d.bytes,
                    },
                };
                self.feed(d.at_ms, input).await
            }
            // Fed whichever deadline passed: the machine does what is due, if anything.
            Wake::Timeout => {
                let now = self.clock.now_ms();
                self.feed(now, NodeInput::Timeout).await
            }
        }
    }

    /// Application plaintext to the group: sealed and sent now, or held until synced.
    pub async fn send(&mut self, plaintext: &[u8]) -> Result<SendOutcome, AgentError> {
        let now = self.clock.now_ms();
        let before = self.stats.data_sent;
        let full = self.out.len();
        self.machine.handle(
            Time(now),
            NodeInput::Send(plaintext),
            &mut self.rng,
            &mut self.out,
        );
        let dropped = self.out[full..]
            .iter()
            .any(|a| matches!(a, NodeAction::Event(NodeEvent::QueueFull)));
        self.apply(now).await?;
        Ok(if self.stats.data_sent > before {
            SendOutcome::Sent
        } else if dropped {
            SendOutcome::Dropped
        } else {
            SendOutcome::Held
        })
    }

    /// Writes the current snapshot now (clean shutdown: the usage counters survive).
    pub fn persist_now(&mut self) -> Result<(), AgentError> {
        let now = self.clock.now_ms();
        let snap = self.machine.snapshot();
        self.store(&snap, now, true)
    }

    /// Hands `snap` to the persister (`flush`: durably) and counts it.
    fn store(&mut self, snap: &NodePersist, now: u64, flush: bool) -> Result<(), AgentError> {
        self.persister
            .persist(snap, now, self.last_sync_ms, flush)
            .map_err(AgentError::Persist)?;
        self.stats.persisted += 1;
        Ok(())
    }

    /// Runs until `shutdown` resolves, handing every event to `on_event`.
    pub async fn run_until(
        &mut self,
        shutdown: impl std::future::Future<Output = ()>,
        mut on_event: impl FnMut(DriverEvent),
    ) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        loop {
            let wake = tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                w = self.wait() => w?,
            };
            self.handle(wake).await?;
            for e in self.take_events() {
                on_event(e);
            }
        }
    }

    async fn feed(&mut self, now: u64, input: NodeInput<'_>) -> Result<(), AgentError> {
        self.machine
            .handle(Time(now), input, &mut self.rng, &mut self.out);
        self.apply(now).await
    }

    /// Carries out the pending actions in order.
    async fn apply(&mut self, now: u64) -> Result<(), AgentError> {
        let actions = std::mem::take(&mut self.out);
        match self.machine.poll_timeout() {
            Some(at) => self.timers.arm(MACHINE_TIMER, at.0),
            None => {
                self.timers.cancel(&MACHINE_TIMER);
            }
        }
        let mut synced = false;
        let mut closed = Vec::new();
        self.refusals.close_expired(now, &mut closed);
        self.log_summaries(&closed);
        for action in actions {
            match action {
                NodeAction::Persist(snap) => self.store(&snap, now, true)?,
                NodeAction::Checkpoint(snap) => self.store(&snap, now, false)?,
                NodeAction::SendGroup { bytes, data_epoch } => {
                    if let Err(e) = self.transport.send_group(&bytes).await {
                        tracing::warn!(error = %e, "send to the group failed; the protocol retries");
                    } else if data_epoch.is_some() {
                        self.stats.data_sent += 1;
                    }
                }
                NodeAction::SendTo { to, bytes } => {
                    if let Err(e) = self.transport.send_to(&bytes, to).await {
                        tracing::warn!(error = %e, "send failed; the protocol retries");
                    }
                }
                NodeAction::Deliver(d) => {
                    self.stats.delivered += 1;
                    self.stats.delivered_by_trial += u64::from(d.trials > 0);
                    self.events.push(DriverEvent::Delivered(d));
                }
                NodeAction::Event(NodeEvent::Refused { reason, .. }) if is_group_echo(&reason) => {
                    // Not for a node: neither a refusal nor an event (nor a metric).
                    self.stats.node_messages_ignored += 1;
                }
                NodeAction::Event(ev) => {
                    self.log_event(now, &ev);
                    match &ev {
                        NodeEvent::Synced { .. } => {
                            synced = true;
                            self.last_sync_ms = Some(now);
                        }
                        NodeEvent::Refused { reason, from } => {
                            if is_auth_failure(reason.kind()) {
                                self.auth_failure = Some((reason.kind(), *from));
                            }
                            self.stats.refused += 1;
                            if matches!(reason, Refusal::Undecryptable { .. }) {
                                self.stats.undecryptable += 1;
                            }
                        }
                        _ => {}
                    }
                    self.events.push(DriverEvent::Node(ev));
                }
            }
        }
        self.arm_refusal_timer();
        self.watch_sync(now);
        self.filter_group();
        if synced {
            // Record the sync time; a snapshot at any moment is at least as new
            // as the last one persisted, so this never moves the node backwards.
            self.persist_now()?;
        }
        Ok(())
    }

    /// Keeps the kernel's filter on the group socket on the node's member
    /// number (set once it has one): it drops what the machine would drop
    /// unread anyway, the node's own data and the key update batches without
    /// its entry, and only spares the node the wake-up and the receive.
    /// Without a filter nothing changes but the cost: a failure is logged,
    /// not retried.
    fn filter_group(&mut self) {
        let member = self.machine.member();
        if member == self.filtered_for {
            return;
        }
        self.filtered_for = member;
        if let Err(e) = self.transport.filter_group(member) {
            tracing::warn!(error = %e, "the node's own group data and other nodes' key updates will be received and dropped in user space");
        }
    }

    /// While the node is not synced with its controller, says so at warn
    /// level, first after [`WAITING_FIRST_WARN_MS`] and then every
    /// [`WAITING_WARN_EVERY_MS`], with what it waits for and what to check.
    /// (The machine's join and key-request retries wake the driver often
    /// enough: at most every ~10 s.)
    fn watch_sync(&mut self, now: u64) {
        if self.machine.is_synced() {
            self.unsynced_since = None;
            self.waiting_logged = None;
            self.auth_failure = None;
            return;
        }
        let since = *self.unsynced_since.get_or_insert(now);
        let waited = now.saturating_sub(since);
        let due = match self.waiting_logged {
            None => waited >= WAITING_FIRST_WARN_MS,
            Some(t) => now.saturating_sub(t) >= WAITING_WARN_EVERY_MS,
        };
        if !due {
            return;
        }
        self.waiting_logged = Some(now);
        let node = self.machine.node_id().as_str();
        let controller = self.machine.controller_addr();
        let waited_s = waited / 1000;
        let what = match self.machine.member() {
            None => "its join (a join is sent about every 10 s)",
            Some(_) => "its key request",
        };
        match self.auth_failure {
            Some((kind, from)) => tracing::warn!(
                node,
                %controller,
                waited_s,
                kind,
                %from,
                "not synced with the controller: no valid answer to {what}; datagrams from {from} \
                 failed their check ({kind}): the controller holds another initial key for this \
                 node (enroll it again with the key on its label), or another controller answers"
            ),
            None => tracing::warn!(
                node,
                %controller,
                waited_s,
                "not synced with the controller: no answer to {what} sent to {controller}; check \
                 that keyfleet serve runs on this group and interface (--group, --iface), that \
                 this node is enrolled as {node} (keyfleet status), and that this initial key is \
                 the enrolled one (the controller logs bad_mac from this node's address when not); \
                 application messages are held until it answers"
            ),
        }
    }

    fn arm_refusal_timer(&mut self) {
        match self.refusals.next_close() {
            Some(at) => self.timers.arm(REFUSAL_TIMER, at),
            None => {
                self.timers.cancel(&REFUSAL_TIMER);
            }
        }
    }

    fn log_summaries(&self, closed: &[Summary]) {
        let node = self.machine.node_id().as_str();
        for s in closed {
            let (source, kind, count) = (s.source.to_string(), s.kind, s.count);
            if suspicious(kind) {
                tracing::warn!(node, %source, kind, count, "{}", s.text());
            } else {
                tracing::debug!(node, %source, kind, count, "{}", s.text());
            }
        }
    }

    fn log_event(&mut self, now: u64, ev: &NodeEvent) {
        let counted = match ev {
            NodeEvent::Refused { from, reason } => Some((from.ip(), reason.kind())),
            NodeEvent::SeqJump { from, .. } => Some((from.ip(), "seq_jump")),
            _ => None,
        };
        if let Some((ip, kind)) = counted {
            let mut closed = Vec::new();
            let seen = self.refusals.observe(now, ip, kind, &mut closed);
            self.log_summaries(&closed);
            if seen == RateVerdict::Counted {
                return;
            }
        }
        let node = self.machine.node_id().as_str();
        let window_s = self.refusals.window_ms() / 1000;
        match ev {
            // A round's two middle steps at debug: a node logs a round in one
            // line at info, where it ends (UpdateCompleted), not three lines a
            // node (300 a round at 100 nodes, each a write to the journal).
            NodeEvent::StateChanged { from, to }
                if matches!(
                    (from, to),
                    (
                        NodeState::UpdateCompleted { .. } | NodeState::DistributionCompleted { .. },
                        NodeState::DistributionCompleted { .. } | NodeState::InTransit { .. }
                    )
                ) =>
            {
                tracing::debug!(node, ?from, ?to, "node state changed");
            }
            NodeEvent::StateChanged { from, to } => {
                tracing::info!(node, ?from, ?to, "node state changed");
            }
            NodeEvent::Synced { state } => {
                tracing::info!(node, ?state, member = ?self.machine.member(), "synced with the controller");
            }
            NodeEvent::QueueFull => {
                self.stats.send_dropped += 1;
                tracing::warn!(node, "hold queue full: application message dropped");
            }
            NodeEvent::SeqJump {
                from,
                sender,
                epoch,
                last,
                seq,
            } => {
                tracing::warn!(node, %from, kind = "seq_jump", sender, %epoch, last, seq, window_s, "data from member {sender} jumps from sequence number {last} to {seq} under epoch {epoch}: someone holding the group key may be trying to silence that member (its replay window is per epoch; the next key clears it)");
            }
            NodeEvent::Refused { from, reason } => {
                let kind = reason.kind();
                if suspicious(kind) {
                    tracing::warn!(node, %from, kind, %reason, window_s, "datagram refused (more of this kind from this address within window_s are counted, then summarized)");
                } else {
                    tracing::debug!(node, %from, kind, %reason, window_s, "datagram refused (more of this kind from this address within window_s are counted, then summarized)");
                }
            }
        }
    }
}

impl Drop for NodeDriver {
    /// The refusals still counted in open windows get their summary line.
    fn drop(&mut self) {
        let mut closed = Vec::new();
        self.refusals.close_all(&mut closed);
        self.log_summaries(&closed);
    }
}
