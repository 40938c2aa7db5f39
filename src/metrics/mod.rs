//! Prometheus metrics of `keyfleet serve` and `keyfleet-agent run` (`--metrics ADDR`).
//!
//! A shell beside the controller's and the agent's loops, never inside the
//! pure core. Two kinds of values:
//!
//! - events the loop already carries out (a `Record` of the controller, a
//!   refusal of the agent) go straight into counters and histograms, shared
//!   with the HTTP task through atomics;
//! - the state of the loop (epoch, key age, nodes by status, the agent's
//!   counters) is read by the loop itself when a scrape asks it to, through a
//!   [`Probe`]: the HTTP task sends a one-shot channel and waits at most
//!   [`PROBE_TIMEOUT`] for the answer. The same answer is the health check: a
//!   loop that does not answer, a management table that cannot be read or
//!   written, or a network the controller cannot send to makes `/healthz`
//!   return 503.
//!
//! The names and meanings are listed in the README ("Metrics"); the HTTP
//! server is in [`http`].

pub mod http;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use keyfleet_core::protocol::{Record, TriggerOutcome, TriggerReason};
use keyfleet_core::wire::{RoundPhase, Step};

pub use http::MetricsServer;

/// How long a scrape waits for the loop to answer before it reports the loop
/// as not answering (and serves the counters it has).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the loop answers a probe with: whether it is healthy, and why (JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub ok: bool,
    /// Shown as the body of `/healthz`.
    pub detail: serde_json::Value,
}

/// A scrape's question to the loop: refresh the loop-side gauges, then answer.
pub type Probe = oneshot::Sender<Health>;

/// The loop's end of the probe channel.
pub type ProbeReceiver = mpsc::Receiver<Probe>;

/// What the HTTP server serves: a registry and the way to ask the loop.
pub struct Exporter {
    registry: Registry,
    probe: mpsc::Sender<Probe>,
}

impl Exporter {
    /// An exporter for `registry`, and the receiver the loop answers probes on.
    pub fn new(registry: Registry) -> (Exporter, ProbeReceiver) {
        let (tx, rx) = mpsc::channel(8);
        (
            Exporter {
                registry,
                probe: tx,
            },
            rx,
        )
    }

    /// Asks the loop (bounded: a full queue or no answer in [`PROBE_TIMEOUT`]
    /// is an unhealthy answer, not a wait).
    pub async fn probe(&self) -> Health {
        let (tx, rx) = oneshot::channel();
        let not = |why: &str| Health {
            ok: false,
            detail: serde_json::json!({ "status": "unavailable", "reason": why }),
        };
        if self.probe.try_send(tx).is_err() {
            return not("the loop has a backlog of probes or has stopped");
        }
        match tokio::time::timeout(PROBE_TIMEOUT, rx).await {
            Ok(Ok(h)) => h,
            Ok(Err(_)) => not("the loop has stopped"),
            Err(_) => not("the loop did not answer within 2 s"),
        }
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabels {
    reason: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// A gauge holding an `f64` (times, ages).
type FGauge = Gauge<f64, AtomicU64>;

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// Round and phase durations: 50 ms to about 7 minutes.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 14))
}

/// A short, stable label for a trigger's reason.
pub fn reason_label(r: &TriggerReason) -> &'static str {
    match r {
        TriggerReason::Initial => "initial",
        TriggerReason::Encryptions { .. } => "encryptions",
        TriggerReason::Decryptions { .. } => "decryptions",
        TriggerReason::Total { .. } => "total",
        TriggerReason::KeyAge { .. } => "key_age",
        TriggerReason::UnknownSender { .. } => "unknown_sender",
        TriggerReason::Manual => "manual",
        TriggerReason::NodeRemoved { .. } => "node_removed",
    }
}

/// The controller's metrics (`keyfleet serve --metrics ADDR`).
#[derive(Clone)]
pub struct ControllerMetrics {
    rounds: Family<OutcomeLabel, Counter>,
    round_duration: Histogram,
    phase_duration: Family<PhaseLabel, Histogram, fn() -> Histogram>,
    acks: Family<StepLabel, Counter>,
    round_acked: Counter,
    round_stale: Counter,
    marked_stale: Counter,
    refusals: Family<KindLabel, Counter>,
    undecryptable: Counter,
    triggers: Family<TriggerLabels, Counter>,
    last_round_epoch: Gauge,
    last_round_nodes: Gauge,
    last_round_acked: Gauge,
    last_round_stale: Gauge,
    last_round_finished: FGauge,
    // Refreshed by the loop on each probe.
    epoch: Gauge,
    key_activated: FGauge,
    key_age: FGauge,
    nodes: Family<StatusLabel, Gauge>,
    round_in_progress: Gauge,
    round_phase: Family<PhaseLabel, Gauge>,
}

/// What the controller's loop knows when a scrape asks.
#[derive(Debug, Clone, Default)]
pub struct ControllerSample {
    pub epoch: u32,
    /// When the current group key became the one every node seals with (ms since the UNIX epoch).
    pub key_activated_ms: u64,
    pub now_ms: u64,
    pub enrolled: u32,
    pub active: u32,
    pub stale: u32,
    /// The round in progress: its phase.
    pub round_phase: Option<RoundPhase>,
}

impl ControllerMetrics {
    /// The metrics and the registry (prefix `keyfleet_`) that serves them.
    pub fn new() -> (ControllerMetrics, Registry) {
        let m = ControllerMetrics {
            rounds: Family::default(),
            round_duration: duration_histogram(),
            phase_duration: Family::new_with_constructor(duration_histogram),
            acks: Family::default(),
            round_acked: Counter::default(),
            round_stale: Counter::default(),
            marked_stale: Counter::default(),
            refusals: Family::default(),
            undecryptable: Counter::default(),
            triggers: Family::default(),
            last_round_epoch: Gauge::default(),
            last_round_nodes: Gauge::default(),
            last_round_acked: Gauge::default(),
            last_round_stale: Gauge::default(),
            last_round_finished: FGauge::default(),
            epoch: Gauge::default(),
            key_activated: FGauge::default(),
            key_age: FGauge::default(),
            nodes: Family::default(),
            round_in_progress: Gauge::default(),
            round_phase: Family::default(),
        };
        // Known label values start at 0, so rates and alerts see them from the start.
        for outcome in ["completed", "completed_with_stale"] {
            let _ = m.rounds.get_or_create(&OutcomeLabel { outcome });
        }
        for phase in RoundPhase::ALL {
            let _ = m.phase_duration.get_or_create(&PhaseLabel {
                phase: phase.as_str(),
            });
        }
        for step in ["key_update", "first_transition", "second_transition"] {
            let _ = m.acks.get_or_create(&StepLabel { step });
        }
        let mut r = Registry::with_prefix("keyfleet");
        r.register(
            "rounds",
            "Rekey rounds by outcome: completed (every node acknowledged), completed_with_stale (stale nodes left out), paused (counted each time a round paused because too few nodes acknowledged; it is retried, not completed)",
            m.rounds.clone(),
        );
        r.register_with_unit(
            "round_duration",
            "From the new key to the end of the second transition",
            Unit::Seconds,
            m.round_duration.clone(),
        );
        r.register_with_unit(
            "round_phase_duration",
            "Time spent in each phase of a finished round",
            Unit::Seconds,
            m.phase_duration.clone(),
        );
        r.register(
            "node_acknowledgements",
            "Nodes' confirmations of a round's steps (key_update, first_transition, second_transition)",
            m.acks.clone(),
        );
        r.register(
            "round_acknowledged_nodes",
            "Over every finished round: nodes that acknowledged the whole round",
            m.round_acked.clone(),
        );
        r.register(
            "round_stale_nodes",
            "Over every finished round: nodes left out as stale",
            m.round_stale.clone(),
        );
        r.register(
            "nodes_marked_stale",
            "Times a node did not answer in time and was left out of a round",
            m.marked_stale.clone(),
        );
        r.register(
            "refusals",
            "Datagrams refused, by kind (bad_mac, replay, malformed, ...)",
            m.refusals.clone(),
        );
        r.register(
            "undecryptable",
            "Group data no key the controller holds opens",
            m.undecryptable.clone(),
        );
        r.register(
            "triggers",
            "Rekey triggers fired, by reason and what followed (started, queued, already_queued)",
            m.triggers.clone(),
        );
        r.register(
            "last_round_epoch",
            "Epoch of the last round finished since the controller started (0: none yet)",
            m.last_round_epoch.clone(),
        );
        r.register(
            "last_round_nodes",
            "Nodes in the last finished round",
            m.last_round_nodes.clone(),
        );
        r.register(
            "last_round_acked",
            "Nodes that acknowledged the last finished round",
            m.last_round_acked.clone(),
        );
        r.register(
            "last_round_stale",
            "Nodes left out of the last finished round as stale",
            m.last_round_stale.clone(),
        );
        r.register_with_unit(
            "last_round_finished_timestamp",
            "When the last round finished (UNIX time)",
            Unit::Seconds,
            m.last_round_finished.clone(),
        );
        r.register(
            "group_key_epoch",
            "Epoch of the current group key",
            m.epoch.clone(),
        );
        r.register_with_unit(
            "group_key_activated_timestamp",
            "When the current group key became the one every node seals with (UNIX time)",
            Unit::Seconds,
            m.key_activated.clone(),
        );
        r.register_with_unit(
            "group_key_age",
            "Age of the current group key (what triggers.max_key_age_ms compares)",
            Unit::Seconds,
            m.key_age.clone(),
        );
        r.register(
            "nodes",
            "Nodes in the management table by status (enrolled: never joined; active; stale)",
            m.nodes.clone(),
        );
        r.register(
            "round_in_progress",
            "1 while a rekey round runs",
            m.round_in_progress.clone(),
        );
        r.register(
            "round_phase",
            "1 for the phase of the round in progress",
            m.round_phase.clone(),
        );
        (m, r)
    }

    /// Counts what a record of the controller's loop says.
    pub fn record(&self, r: &Record) {
        match r {
            Record::RoundFinished {
                epoch,
                finished_at,
                started_at,
                phases_ms,
                nodes,
                acked,
                stale,
                ..
            } => {
                let outcome = if *stale == 0 {
                    "completed"
                } else {
                    "completed_with_stale"
                };
                self.rounds.get_or_create(&OutcomeLabel { outcome }).inc();
                self.round_duration
                    .observe(seconds(finished_at.since(*started_at)));
                for phase in RoundPhase::ALL {
                    self.phase_duration
                        .get_or_create(&PhaseLabel {
                            phase: phase.as_str(),
                        })
                        .observe(seconds(phases_ms.get(phase)));
                }
                self.round_acked.inc_by(u64::from(*acked));
                self.round_stale.inc_by(u64::from(*stale));
                self.last_round_epoch.set(i64::from(epoch.0));
                self.last_round_nodes.set(i64::from(*nodes));
                self.last_round_acked.set(i64::from(*acked));
                self.last_round_stale.set(i64::from(*stale));
                self.last_round_finished.set(seconds(finished_at.0));
            }
            Record::NodeAcked { step, .. } => {
                let step = match step {
                    Step::KeyUpdate => "key_update",
                    Step::FirstTransition => "first_transition",
                    Step::SecondTransition => "second_transition",
                };
                self.acks.get_or_create(&StepLabel { step }).inc();
            }
            Record::NodeStale { .. } => {
                self.marked_stale.inc();
            }
            Record::RoundPaused { .. } => {
                self.rounds
                    .get_or_create(&OutcomeLabel { outcome: "paused" })
                    .inc();
            }
            Record::Refused { reason, .. } => {
                let kind = reason.kind();
                self.refusals.get_or_create(&KindLabel { kind }).inc();
                if kind == "undecryptable" {
                    self.undecryptable.inc();
                }
            }
            Record::TriggerFired {
                reason, outcome, ..
            } => {
                let outcome = match outcome {
                    TriggerOutcome::Started => "started",
                    TriggerOutcome::Queued => "queued",
                    TriggerOutcome::AlreadyQueued => "already_queued",
                };
                self.triggers
                    .get_or_create(&TriggerLabels {
                        reason: reason_label(reason),
                        outcome,
                    })
                    .inc();
            }
            _ => {}
        }
    }

    /// Sets the gauges the loop refreshes on each probe.
    pub fn refresh(&self, s: &ControllerSample) {
        self.epoch.set(i64::from(s.epoch));
        self.key_activated.set(seconds(s.key_activated_ms));
        self.key_age
            .set(seconds(s.now_ms.saturating_sub(s.key_activated_ms)));
        for (status, n) in [
            ("enrolled", s.enrolled),
            ("active", s.active),
            ("stale", s.stale),
        ] {
            self.nodes
                .get_or_create(&StatusLabel { status })
                .set(i64::from(n));
        }
        self.round_in_progress
            .set(i64::from(s.round_phase.is_some()));
        for phase in RoundPhase::ALL {
            self.round_phase
                .get_or_create(&PhaseLabel {
                    phase: phase.as_str(),
                })
                .set(i64::from(s.round_phase == Some(phase)));
        }
    }
}

/// The node agent's metrics (`keyfleet-agent run --metrics ADDR`), prefix `keyfleet_agent_`.
#[derive(Clone)]
pub struct AgentMetrics {
    refusals: Family<KindLabel, Counter>,
    // Refreshed by the loop on each probe from its own counters.
    datagrams_in: Counter,
    undecryptable: Counter,
    data_sent: Counter,
    delivered: Counter,
    persisted: Counter,
    usage_reports: Counter,
    send_dropped: Counter,
    send_errors: Counter,
    app_dropped: Counter,
    app_backlog_peak: Gauge,
    app_clients: Gauge,
    epoch: Gauge,
    sealing_epoch: Gauge,
    member: Gauge,
    state: Family<StateLabel, Gauge>,
    synced: Gauge,
    last_sync: FGauge,
    uptime: FGauge,
}

/// What the agent's loop knows when a scrape asks (counters are totals since the agent started).
#[derive(Debug, Clone, Default)]
pub struct AgentSample {
    pub datagrams_in: u64,
    pub undecryptable: u64,
    pub data_sent: u64,
    pub delivered: u64,
    pub persisted: u64,
    pub usage_reports: u64,
    pub send_dropped: u64,
    pub send_errors: u64,
    pub app_dropped: u64,
    pub app_backlog_peak: usize,
    pub app_clients: usize,
    /// The newest epoch the node holds (0: not joined).
    pub epoch: u32,
    pub sealing_epoch: u32,
    pub member: u32,
    /// `Unjoined`, `UpdateCompleted`, `DistributionCompleted` or `InTransit`.
    pub state: &'static str,
    pub synced: bool,
    pub last_sync_ms: Option<u64>,
    pub uptime_ms: u64,
}

const NODE_STATES: [&str; 4] = [
    "Unjoined",
    "UpdateCompleted",
    "DistributionCompleted",
    "InTransit",
];

/// Raises a counter to `total` (counters only grow; the loop's totals do too).
fn raise(c: &Counter, total: u64) {
    c.inc_by(total.saturating_sub(c.get()));
}

impl AgentMetrics {
    pub fn new() -> (AgentMetrics, Registry) {
        let m = AgentMetrics {
            refusals: Family::default(),
            datagrams_in: Counter::default(),
            undecryptable: Counter::default(),
            data_sent: Counter::default(),
            delivered: Counter::default(),
            persisted: Counter::default(),
            usage_reports: Counter::default(),
            send_dropped: Counter::default(),
            send_errors: Counter::default(),
            app_dropped: Counter::default(),
            app_backlog_peak: Gauge::default(),
            app_clients: Gauge::default(),
            epoch: Gauge::default(),
            sealing_epoch: Gauge::default(),
            member: Gauge::default(),
            state: Family::default(),
            synced: Gauge::default(),
            last_sync: FGauge::default(),
            uptime: FGauge::default(),
        };
        let mut r = Registry::with_prefix("keyfleet_agent");
        r.register(
            "refusals",
            "Datagrams refused, by kind (routine: not_for_me, unexpected, ...; suspicious: bad_signature, bad_mac, forged_data, undecryptable, ...)",
            m.refusals.clone(),
        );
        r.register(
            "datagrams_received",
            "Datagrams received from the network",
            m.datagrams_in.clone(),
        );
        r.register(
            "undecryptable",
            "Group data no held key opened (stays 0 in a lossless rotation)",
            m.undecryptable.clone(),
        );
        r.register(
            "data_sent",
            "Application messages sealed and sent to the group",
            m.data_sent.clone(),
        );
        r.register(
            "delivered",
            "Group messages opened and handed to the applications",
            m.delivered.clone(),
        );
        r.register(
            "state_saves",
            "Snapshots written to the state file",
            m.persisted.clone(),
        );
        r.register(
            "usage_reports",
            "Usage reports (encryption and decryption counts) sent to the controller",
            m.usage_reports.clone(),
        );
        r.register(
            "send_dropped",
            "Application messages dropped because the hold queue was full (held while not synced)",
            m.send_dropped.clone(),
        );
        r.register(
            "send_errors",
            "Datagrams the kernel refused to send (application data among them is lost)",
            m.send_errors.clone(),
        );
        r.register(
            "app_dropped",
            "Deliveries dropped for an application whose socket stayed full",
            m.app_dropped.clone(),
        );
        r.register(
            "app_backlog_peak",
            "The most deliveries that waited for one application at once since the agent started (4 MiB of them are kept)",
            m.app_backlog_peak.clone(),
        );
        r.register(
            "app_clients",
            "Applications registered on the agent's socket",
            m.app_clients.clone(),
        );
        r.register(
            "epoch",
            "The newest group key epoch the node holds (0: not joined)",
            m.epoch.clone(),
        );
        r.register(
            "sealing_epoch",
            "The epoch whose key seals outgoing data",
            m.sealing_epoch.clone(),
        );
        r.register(
            "member",
            "The member number the controller assigned (0: not joined)",
            m.member.clone(),
        );
        r.register(
            "state",
            "1 for the node's state (Unjoined, UpdateCompleted, DistributionCompleted, InTransit)",
            m.state.clone(),
        );
        r.register(
            "synced",
            "1 when the controller has answered the node's key request (data flows), 0 while it holds data",
            m.synced.clone(),
        );
        r.register_with_unit(
            "last_sync_timestamp",
            "When the node last synced with the controller (UNIX time; 0: never)",
            Unit::Seconds,
            m.last_sync.clone(),
        );
        r.register_with_unit(
            "uptime",
            "Time since the agent started",
            Unit::Seconds,
            m.uptime.clone(),
        );
        (m, r)
    }

    /// Counts one refused datagram.
    pub fn refusal(&self, kind: &'static str) {
        self.refusals.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn refresh(&self, s: &AgentSample) {
        raise(&self.datagrams_in, s.datagrams_in);
        raise(&self.undecryptable, s.undecryptable);
        raise(&self.data_sent, s.data_sent);
        raise(&self.delivered, s.delivered);
        raise(&self.persisted, s.persisted);
        raise(&self.usage_reports, s.usage_reports);
        raise(&self.send_dropped, s.send_dropped);
        raise(&self.send_errors, s.send_errors);
        raise(&self.app_dropped, s.app_dropped);
        self.app_backlog_peak
            .set(i64::try_from(s.app_backlog_peak).unwrap_or(i64::MAX));
        self.app_clients
            .set(i64::try_from(s.app_clients).unwrap_or(i64::MAX));
        self.epoch.set(i64::from(s.epoch));
        self.sealing_epoch.set(i64::from(s.sealing_epoch));
        self.member.set(i64::from(s.member));
        for state in NODE_STATES {
            self.state
                .get_or_create(&StateLabel { state })
                .set(i64::from(s.state == state));
        }
        self.synced.set(i64::from(s.synced));
        self.last_sync.set(s.last_sync_ms.map_or(0.0, seconds));
        self.uptime.set(seconds(s.uptime_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfleet_core::crypto::Epoch;
    use keyfleet_core::protocol::PhaseDurations;
    use keyfleet_core::protocol::{Refusal, Time};

    fn sample_line<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        text.lines()
            .find(|l| l.split([' ', '{']).next() == Some(name))
            .and_then(|l| l.rsplit(' ').next())
    }

    #[test]
    fn a_finished_round_is_counted_with_its_outcome_phases_and_acknowledgements() {
        let (m, reg) = ControllerMetrics::new();
        let (ex, _rx) = Exporter::new(reg);
        m.record(&Record::RoundFinished {
            epoch: Epoch(7),
            check: keyfleet_core::crypto::GroupKey::generate(Epoch(7), &mut rand::rngs::OsRng)
                .check_value(),
            reason: TriggerReason::Manual,
            started_at: Time(10_000),
            finished_at: Time(12_500),
            phases_ms: PhaseDurations {
                distributing: 100,
                first_transition: 200,
                draining: 2000,
                second_transition: 200,
            },
            nodes: 5,
            acked: 4,
            stale: 1,
            enrolled: 5,
            stale_nodes: vec![keyfleet_core::wire::NodeId::parse("pump-5").unwrap()],
            not_joined: Vec::new(),
            pauses: 0,
        });
        m.record(&Record::Refused {
            from: "192.0.2.1:9".parse().unwrap(),
            reason: Refusal::Malformed(keyfleet_core::wire::WireError::Truncated {
                what: "header",
                need: 4,
                have: 1,
            }),
            at: Time(1),
        });
        let t = ex.encode();
        assert!(
            t.contains("keyfleet_rounds_total{outcome=\"completed_with_stale\"} 1"),
            "{t}"
        );
        assert_eq!(
            sample_line(&t, "keyfleet_round_duration_seconds_sum"),
            Some("2.5")
        );
        assert!(
            t.contains("keyfleet_round_phase_duration_seconds_sum{phase=\"draining\"} 2.0"),
            "{t}"
        );
        assert_eq!(
            sample_line(&t, "keyfleet_round_acknowledged_nodes_total"),
            Some("4")
        );
        assert_eq!(sample_line(&t, "keyfleet_last_round_epoch"), Some("7"));
        assert!(
            t.contains("keyfleet_refusals_total{kind=\"malformed\"} 1"),
            "{t}"
        );
        assert!(t.ends_with("# EOF\n"));
    }

    #[test]
    fn agent_counters_follow_the_loop_totals_and_never_go_back() {
        let (m, reg) = AgentMetrics::new();
        let (ex, _rx) = Exporter::new(reg);
        let mut s = AgentSample {
            datagrams_in: 10,
            state: "InTransit",
            epoch: 3,
            ..AgentSample::default()
        };
        m.refresh(&s);
        s.datagrams_in = 25;
        m.refresh(&s);
        let t = ex.encode();
        assert_eq!(
            sample_line(&t, "keyfleet_agent_datagrams_received_total"),
            Some("25")
        );
        assert!(
            t.contains("keyfleet_agent_state{state=\"InTransit\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("keyfleet_agent_state{state=\"UpdateCompleted\"} 0"),
            "{t}"
        );
        assert_eq!(sample_line(&t, "keyfleet_agent_epoch"), Some("3"));
        // What can lose an application's message is exported too.
        s.send_errors = 2;
        s.send_dropped = 1;
        s.app_backlog_peak = 1800;
        m.refresh(&s);
        let t = ex.encode();
        assert_eq!(
            sample_line(&t, "keyfleet_agent_send_errors_total"),
            Some("2")
        );
        assert_eq!(
            sample_line(&t, "keyfleet_agent_send_dropped_total"),
            Some("1")
        );
        assert_eq!(
            sample_line(&t, "keyfleet_agent_app_backlog_peak"),
            Some("1800")
        );
    }

    #[tokio::test]
    async fn a_loop_that_does_not_answer_is_unhealthy() {
        let (_m, reg) = AgentMetrics::new();
        let (ex, rx) = Exporter::new(reg);
        tokio::time::pause();
        let h = ex.probe().await;
        assert!(!h.ok);
        assert!(h.detail["reason"]
            .as_str()
            .unwrap()
            .contains("did not answer"));
        drop(rx);
        let h = ex.probe().await;
        assert!(!h.ok, "{:?}", h.detail);
    }
}
