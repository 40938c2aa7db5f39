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
use crate::protocol::{
    Delivered, NodeAction, NodeEvent, NodeInput, NodeMachine, NodePersist, NodeTimer, Refusal, Time,
};
use crate::statefile::StateFileError;
use crate::wire::{self, Message};

use super::app::SendOutcome;
use super::AgentError;

/// Where a node's snapshots go before the sends that follow them.
pub trait Persister: Send {
    /// Store `node` durably; return only when it is.
    fn persist(
        &mut self,
        node: &NodePersist,
        now_ms: u64,
        last_sync_ms: Option<u64>,
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
    Timers(Vec<NodeTimer>),
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
    /// Data no held key opened (must stay 0 in a lossless rotation).
    pub undecryptable: u64,
    pub data_sent: u64,
    pub delivered: u64,
    pub persisted: u64,
    /// Usage reports sent to the controller (for its count triggers).
    pub usage_reports: u64,
}

fn timer_key(t: NodeTimer) -> u8 {
    match t {
        NodeTimer::Sync => 0,
        NodeTimer::Usage => 1,
    }
}

fn timer_of(k: u8) -> NodeTimer {
    if k == 0 {
        NodeTimer::Sync
    } else {
        NodeTimer::Usage
    }
}

/// One node machine on real sockets. See the module docs.
pub struct NodeDriver {
    machine: NodeMachine,
    transport: Transport,
    clock: Clock,
    timers: Timers<u8>,
    persister: Box<dyn Persister>,
    rng: StdRng,
    controller: SocketAddr,
    out: Vec<NodeAction>,
    events: Vec<DriverEvent>,
    stats: DriverStats,
    last_sync_ms: Option<u64>,
}

impl NodeDriver {
    /// A driver for `machine` (new or restored) on `transport`, sending
    /// control messages to `controller` (the machine's `NodeConfig::controller`,
    /// for the status report). Keys for data nonces come from the OS CSPRNG.
    pub fn new(
        machine: NodeMachine,
        transport: Transport,
        persister: Box<dyn Persister>,
        controller: SocketAddr,
    ) -> NodeDriver {
        let clock = transport.clock().clone();
        NodeDriver {
            machine,
            transport,
            clock,
            timers: Timers::new(),
            persister,
            rng: StdRng::from_entropy(),
            controller,
            out: Vec::new(),
            events: Vec::new(),
            stats: DriverStats::default(),
            last_sync_ms: None,
        }
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

    pub fn controller(&self) -> SocketAddr {
        self.controller
    }

    pub fn stats(&self) -> DriverStats {
        self.stats
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

    /// Waits for the next datagram or timer. Cancel-safe.
    pub async fn wait(&mut self) -> Result<Wake, AgentError> {
        tokio::select! {
            d = self.transport.recv() => Ok(Wake::Datagram(d?)),
            fired = self.timers.expired(&self.clock) => {
                Ok(Wake::Timers(fired.into_iter().map(timer_of).collect()))
            }
        }
    }

    /// Feeds what [`NodeDriver::wait`] returned and carries out the actions.
    pub async fn handle(&mut self, wake: Wake) -> Result<(), AgentError> {
        match wake {
            Wake::Datagram(d) => {
                self.stats.datagrams_in += 1;
                self.feed(
                    d.at_ms,
                    NodeInput::Datagram {
                        from: d.from,
                        bytes: &d.bytes,
                    },
                )
                .await
            }
            Wake::Timers(fired) => {
                for t in fired {
                    let now = self.clock.now_ms();
                    self.feed(now, NodeInput::Timer(t)).await?;
                }
                Ok(())
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
        self.persister
            .persist(&snap, now, self.last_sync_ms)
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
        let mut synced = false;
        for action in actions {
            match action {
                NodeAction::Persist(snap) => {
                    self.persister
                        .persist(&snap, now, self.last_sync_ms)
                        .map_err(AgentError::Persist)?;
                    self.stats.persisted += 1;
                }
                NodeAction::SendGroup { bytes, data_epoch } => {
                    if let Err(e) = self.transport.send_group(&bytes).await {
                        tracing::warn!(error = %e, "send to the group failed; the protocol retries");
                    } else if data_epoch.is_some() {
                        self.stats.data_sent += 1;
                    }
                }
                NodeAction::SendTo { to, bytes } => {
                    if matches!(wire::decode(&bytes), Ok(Message::UsageReport(_))) {
                        self.stats.usage_reports += 1;
                    }
                    if let Err(e) = self.transport.send_to(&bytes, to).await {
                        tracing::warn!(error = %e, "send failed; the protocol retries");
                    }
                }
                NodeAction::ArmTimer { timer, at } => self.timers.arm(timer_key(timer), at.0),
                NodeAction::Deliver(d) => {
                    self.stats.delivered += 1;
                    self.events.push(DriverEvent::Delivered(d));
                }
                NodeAction::Event(ev) => {
                    self.log_event(&ev);
                    match &ev {
                        NodeEvent::Synced { .. } => {
                            synced = true;
                            self.last_sync_ms = Some(now);
                        }
                        NodeEvent::Refused { reason, .. } => {
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
        if synced {
            // Record the sync time; a snapshot at any moment is at least as new
            // as the last one persisted, so this never moves the node backwards.
            self.persist_now()?;
        }
        Ok(())
    }

    fn log_event(&self, ev: &NodeEvent) {
        let node = self.machine.node_id().as_str();
        match ev {
            NodeEvent::StateChanged { from, to } => {
                tracing::info!(node, ?from, ?to, "node state changed");
            }
            NodeEvent::Synced { state } => {
                tracing::info!(node, ?state, member = ?self.machine.member(), "synced with the controller");
            }
            NodeEvent::QueueFull => {
                tracing::warn!(node, "hold queue full: application message dropped");
            }
            NodeEvent::Refused { from, reason } => match reason {
                Refusal::Undecryptable { .. }
                | Refusal::BadSignature { .. }
                | Refusal::BadMac { .. }
                | Refusal::ForgedData { .. }
                | Refusal::KeyMismatch { .. }
                | Refusal::Unwrap { .. } => {
                    tracing::warn!(node, %from, %reason, "datagram refused");
                }
                // Other nodes' control messages to the group, our own looped back,
                // retransmissions: routine.
                _ => tracing::debug!(node, %from, %reason, "datagram refused"),
            },
        }
    }
}
