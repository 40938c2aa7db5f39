//! The management table (SPEC §4): an embedded SQLite database.
//!
//! It records every node (id, member number, address, the check value of its
//! initial key — never the key —, state, epoch, last seen, stale or not), the
//! history of every group key (created when, by which trigger, sent to which
//! nodes and when, acknowledged when, retired when), every rekey round with its
//! per-phase durations, and an audit log of every trigger and every refusal.
//!
//! Two engines keep it behind one trait, [`Engine`]: the embedded SQLite
//! database in the state directory (the default, nothing to install; see
//! [`sqlite`]) and PostgreSQL (`store.url = "postgres://..."`; see
//! [`postgres`]), the database a site with several controllers already runs.
//! Both have an equivalent schema, versioned and migrated on open, and pass
//! the same test suite (`store::tests`). [`Store`] is what the controller and
//! the `status`/`history` commands hold: the engine plus the one-transaction
//! [`Store::batch`].
//!
//! Every write either commits or returns an error: a write that fails is an
//! error the caller acts on (the controller stops the pass, see
//! `controller::table`), never a line in a log.
//!
//! Times are milliseconds since the Unix epoch, given by the caller (the store
//! never reads the clock). The API is plain-typed so that the protocol core and
//! the store do not depend on each other.

pub mod postgres;
mod schema;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod testpg;

use std::path::{Path, PathBuf};

use keyfleet_core::protocol::PhaseDurations;
use keyfleet_core::wire::RoundPhase;
use serde::Serialize;

use crate::config::StoreUrl;

pub use self::postgres::PgEngine;
pub use self::sqlite::SqliteEngine;

pub use schema::SCHEMA_VERSION;

/// What went wrong with the management table.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the management table {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node address {0:?} is not HOST:PORT (e.g. 192.168.1.20:7778)")]
    BadAddress(String),
    #[error("cannot open the management table {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the management table {path} was written by a newer keyfleet (schema {found}, \
         this one knows up to {known}); upgrade keyfleet"
    )]
    TooNew {
        path: String,
        found: i64,
        known: usize,
    },
    #[error("cannot migrate the management table {path}: {source}")]
    Migrate {
        path: PathBuf,
        #[source]
        source: rusqlite_migration::Error,
    },
    #[error("management table: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error(
        "store.url {0:?} is not a PostgreSQL URL (postgres://USER@HOST:PORT/DATABASE); \
         leave store.url out for the embedded SQLite table"
    )]
    BadUrl(String),
    #[error(
        "cannot connect to the management table at {url}: {detail}; check store.url, that \
         the server runs and that it accepts this user"
    )]
    Connect {
        url: String,
        /// The error with its causes (the server's refusal, the socket's error).
        detail: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot migrate the management table {url} to schema {version}: {source}")]
    PgMigrate {
        url: String,
        version: usize,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot start the thread of the PostgreSQL connection: {0}")]
    Driver(#[source] std::io::Error),
    #[error("management table (PostgreSQL): {}", chain(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("the management table {at} could not be written ({cause}); the batch was rolled back")]
    BatchFailed { at: String, cause: String },
    #[error(
        "{holder} no longer holds the leader lease of term {term} in the management table: \
         another controller may lead; nothing of this batch was written"
    )]
    Fenced { holder: String, term: u32 },
    #[error("node {0:?} is already enrolled; remove it first to enroll it again")]
    AlreadyEnrolled(String),
    #[error("member number {member_no} already belongs to the enrolled node {holder:?}")]
    MemberTaken { member_no: u64, holder: String },
    #[error("node {0:?} is not enrolled; `keyfleet status` lists the enrolled nodes")]
    UnknownNode(String),
    #[error("epoch {0} is already in the key history")]
    EpochExists(u64),
    #[error("epoch {0} is not in the key history")]
    UnknownEpoch(u64),
    #[error("round {0} is not in the management table")]
    UnknownRound(i64),
    #[error("a time or count does not fit the database: {0}")]
    Range(u64),
    #[error(
        "the management table holds a value this keyfleet does not know: {column} = {value:?}"
    )]
    BadValue { column: &'static str, value: String },
}

type Result<T> = std::result::Result<T, StoreError>;

/// An error and its causes, `: `-separated.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = c.source();
    }
    out
}

impl StoreError {
    /// The engine could not do what was asked (a disk, a file, a connection,
    /// the server), as opposed to a row refused for what it says (unknown node,
    /// epoch already there, a constraint). A batch in which one happens is
    /// rolled back whole ([`Store::batch`]).
    pub fn is_engine_failure(&self) -> bool {
        match self {
            StoreError::Sql(rusqlite::Error::SqliteFailure(f, _)) => {
                f.code != rusqlite::ErrorCode::ConstraintViolation
            }
            StoreError::Sql(rusqlite::Error::SqlInputError { .. }) => false,
            StoreError::Sql(_) => true,
            StoreError::Postgres(e) => e
                .code()
                .is_none_or(|c| !c.code().starts_with("23") && !c.code().starts_with("22")),
            StoreError::Create { .. }
            | StoreError::Open { .. }
            | StoreError::Migrate { .. }
            | StoreError::Connect { .. }
            | StoreError::PgMigrate { .. }
            | StoreError::Driver(_)
            | StoreError::BatchFailed { .. } => true,
            _ => false,
        }
    }
}

macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
        pub enum $name { $($(#[$vm])* $v),+ }
        impl $name {
            /// The name stored in the database.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => stringify!($v)),+ }
            }
            fn parse(column: &'static str, s: &str) -> Result<Self> {
                match s {
                    $(stringify!($v) => Ok($name::$v),)+
                    other => Err(StoreError::BadValue { column, value: other.to_owned() }),
                }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum! {
    /// A node's state as last known to the controller (SPEC §1).
    RecordedState {
        /// Enrolled, has not yet confirmed any group key.
        Enrolled,
        UpdateCompleted,
        DistributionCompleted,
        InTransit,
    }
}

text_enum! {
    /// Why a new group key was made (SPEC §3).
    Trigger {
        /// The first key of the fleet.
        Initial,
        /// `keyfleet rekey`.
        Manual,
        /// A node was removed and must not get the new key.
        Removal,
        EncryptionCount,
        DecryptionCount,
        TotalCount,
        KeyAge,
        /// Data from a sender not in the management table: the key is presumed leaked.
        UnknownSender,
    }
}

text_enum! {
    /// How a rekey round ended.
    Outcome {
        Completed,
        Aborted,
        /// Replaced by a newer round before it completed.
        Superseded,
    }
}

text_enum! {
    /// How a key was handed out outside a round (SPEC §4, claim 6).
    Handout {
        /// In the answer to a node's join.
        Join,
        /// In the answer to a node's key request (SPEC §5).
        KeyRequest,
    }
}

text_enum! {
    /// What an audit entry records.
    AuditKind {
        /// A rekey trigger fired (detail: which and why).
        Trigger,
        /// Something was refused (detail: what and why): a message from an
        /// unknown sender, a bad signature, a replay, a malformed datagram, ...
        Refusal,
        /// Refusals counted instead of written one by one: the rest of a
        /// source's refusals of one kind in one window (detail: source, kind,
        /// count, first and last time; see [`keyfleet_core::ratecount::Summary`]).
        RefusalSummary,
        Enrollment,
        Removal,
        /// A node was marked stale and left out of a round.
        Stale,
        /// A stale or restarted node came back (key request of SPEC §5).
        Rejoin,
        /// The controller restarted and resumed.
        Restart,
        /// A round reached too few nodes by its deadline and waits (detail:
        /// phase, confirmed, needed, the silent nodes).
        RoundPaused,
        /// A paused round goes on (detail: why).
        RoundResumed,
        /// A node's member number in the table was set to the controller's
        /// (a repair of a table written before issue 15).
        Renumbered,
    }
}

/// One row of the fleet table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRecord {
    pub node_id: String,
    /// The member number the controller gave the node (the one on the wire),
    /// 1-based, never reused by the controller.
    pub member_no: u64,
    /// `HOST:PORT` of the agent's unicast socket; `None` until the node has
    /// been heard from when it was enrolled without one.
    pub address: Option<String>,
    /// The check value (fingerprint) of the initial key.
    pub key_check: String,
    pub state: RecordedState,
    pub epoch: Option<u64>,
    pub last_seen_ms: Option<u64>,
    pub stale: bool,
    pub enrolled_at_ms: u64,
    pub removed_at_ms: Option<u64>,
}

/// One node's delivery of one group key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveryRecord {
    pub node_id: String,
    pub first_sent_at_ms: Option<u64>,
    pub last_sent_at_ms: Option<u64>,
    pub attempts: u64,
    pub acked_at_ms: Option<u64>,
}

/// A key handed out to one node by a join or a key request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HandoutRecord {
    pub node_id: String,
    pub via: Handout,
    pub at_ms: u64,
}

/// One change of a node's address, and the authenticated message that caused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AddressChange {
    pub node_id: String,
    /// `None` for a node enrolled without an address, first heard from.
    pub old_address: Option<String>,
    pub new_address: String,
    pub at_ms: u64,
    /// The message's name (`join`, `key request`, `key update reply`, …, `usage report`).
    pub message: String,
    /// Its sequence number.
    pub seq: u64,
}

/// One group key's history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyRecord {
    pub epoch: u64,
    pub created_at_ms: u64,
    /// The key's check value, never the key.
    pub check_value: String,
    pub trigger: Trigger,
    pub trigger_detail: serde_json::Value,
    /// When it became the current key (`None`: its round has not completed).
    pub activated_at_ms: Option<u64>,
    pub retired_at_ms: Option<u64>,
    /// Deliveries by rekey rounds.
    pub deliveries: Vec<DeliveryRecord>,
    /// Deliveries in answers to joins and key requests, oldest first.
    pub handouts: Vec<HandoutRecord>,
}

/// One rekey round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoundRecord {
    pub id: i64,
    pub epoch: u64,
    pub started_at_ms: u64,
    /// The phase it is in; `None` once it finished.
    pub phase: Option<RoundPhase>,
    pub phase_started_at_ms: u64,
    /// Time spent in each phase so far (a phase is counted when it is left).
    pub phases_ms: PhaseDurations,
    /// Nodes in the round when it started.
    pub nodes: u64,
    pub acked: Option<u64>,
    pub stale: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub outcome: Option<Outcome>,
    pub outcome_detail: Option<String>,
    /// Times the round was paused (too few nodes answered by a deadline).
    pub pauses: u64,
    /// Paused since, while it is.
    pub paused_at_ms: Option<u64>,
    /// Why it was last paused.
    pub pause_detail: Option<String>,
}

/// The leader lease as the table holds it (issue 16).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseRecord {
    /// Who leads: `host:pid:random` of the controller process.
    pub holder: String,
    /// The leader term every controller message of that leader carries.
    pub term: u32,
    /// Milliseconds left by the table's clock when it was read (0: expired;
    /// `None`: never expires, the sole leader of an embedded table).
    pub expires_in_ms: Option<u64>,
}

/// What asking for the lease gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum LeaseOutcome {
    /// The caller holds the lease (taken or renewed).
    Held(LeaseRecord),
    /// Another controller holds it and it has not expired.
    Taken(LeaseRecord),
}

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    pub id: i64,
    pub at_ms: u64,
    pub kind: AuditKind,
    pub node_id: Option<String>,
    pub detail: serde_json::Value,
}

/// `rounds.phase` as the table holds it: [`RoundPhase::as_str`], `NULL` once
/// the round finished (schema 6 rewrote the names older versions wrote).
fn parse_phase(phase: Option<&str>) -> Result<Option<RoundPhase>> {
    phase
        .map(|p| {
            RoundPhase::from_name(p).ok_or_else(|| StoreError::BadValue {
                column: "rounds.phase",
                value: p.to_owned(),
            })
        })
        .transpose()
}

/// `HOST:PORT` with a non-empty host and a port 1..=65535 (`[v6]:PORT` too).
fn check_address(address: &str) -> Result<()> {
    let ok = address
        .rsplit_once(':')
        .filter(|(host, port)| {
            !host.is_empty()
                && !host.contains(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        })
        .is_some();
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadAddress(address.to_owned()))
    }
}

fn to_i64(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Range(v))
}

fn opt_i64(v: Option<u64>) -> Result<Option<i64>> {
    v.map(to_i64).transpose()
}

fn to_u64(column: &'static str, v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| StoreError::BadValue {
        column,
        value: v.to_string(),
    })
}

/// A stored leader term as the wire's `u32`.
fn lease_term(v: i64) -> Result<u32> {
    u32::try_from(v).map_err(|_| StoreError::BadValue {
        column: "leader_lease.term",
        value: v.to_string(),
    })
}

fn opt_u64(column: &'static str, v: Option<i64>) -> Result<Option<u64>> {
    v.map(|v| to_u64(column, v)).transpose()
}

/// The `rounds` column that adds up the time spent in `phase`.
fn duration_column(phase: RoundPhase) -> &'static str {
    match phase {
        RoundPhase::Distributing => "distributing_ms",
        RoundPhase::FirstTransition => "first_transition_ms",
        RoundPhase::Draining => "draining_ms",
        RoundPhase::SecondTransition => "second_transition_ms",
    }
}

/// A round's phase durations from its four duration columns, in the order of
/// [`RoundPhase::ALL`] (`NULL`, a phase not left yet, counts 0).
fn durations(ms: [Option<i64>; 4]) -> Result<PhaseDurations> {
    let mut d = PhaseDurations::default();
    for (phase, v) in RoundPhase::ALL.into_iter().zip(ms) {
        let v = opt_u64(duration_column(phase), v)?.unwrap_or(0);
        *d.get_mut(phase) = v;
    }
    Ok(d)
}

/// The storage operations the controller needs from an engine (object-safe,
/// so that [`Store`] holds either engine). Each call that changes several rows
/// is atomic on its own and nests inside [`Engine::begin`]..[`Engine::commit`]
/// (a failed call inside undoes only its own rows). Times are given by the caller.
pub trait Engine: Send {
    /// Where the table is, for messages (a file path, or a URL without its password).
    fn describe(&self) -> String;
    /// The schema version of the open table.
    fn schema_version(&self) -> Result<i64>;
    /// The engine's own consistency check; `Ok(())` when it finds nothing wrong.
    fn integrity_check(&self) -> Result<std::result::Result<(), String>>;
    /// Housekeeping the controller runs while idle, between rounds (SQLite:
    /// the write-ahead log copied into the table file). Nothing by default.
    fn idle_upkeep(&mut self) -> Result<()> {
        Ok(())
    }
    /// Opens the transaction of a batch.
    fn begin(&mut self) -> Result<()>;
    /// Commits the batch's transaction.
    fn commit(&mut self) -> Result<()>;
    /// Rolls the batch's transaction back (best effort: a lost connection rolls back too).
    fn rollback(&mut self);
    /// Enrolls `node_id` under `member_no` (the controller's number; refused
    /// with [`StoreError::MemberTaken`] while another enrolled node holds it),
    /// or enrolls a removed node again under its new number.
    fn enroll_node(
        &mut self,
        node_id: &str,
        member_no: u64,
        address: Option<&str>,
        key_check: &str,
        now_ms: u64,
    ) -> Result<NodeRecord>;
    /// Gives the enrolled nodes of `want` those member numbers, all or none
    /// (numbers may be swapped among them); one `Renumbered` audit row each.
    fn renumber_members(
        &mut self,
        want: &[(&str, u64)],
        now_ms: u64,
    ) -> Result<Vec<(String, u64, u64)>>;
    fn remove_node(&mut self, node_id: &str, reason: &str, now_ms: u64) -> Result<()>;
    fn set_address(&mut self, node_id: &str, address: &str) -> Result<()>;
    fn record_address_change(
        &mut self,
        node_id: &str,
        new: &str,
        message: &str,
        seq: u64,
        now_ms: u64,
    ) -> Result<()>;
    /// Address changes oldest first: of one node, or of every node with `None`.
    fn address_changes(&self, node_id: Option<&str>) -> Result<Vec<AddressChange>>;
    fn record_handout(
        &mut self,
        epochs: &[u64],
        node_id: &str,
        via: Handout,
        now_ms: u64,
    ) -> Result<()>;
    fn set_node_state(
        &mut self,
        node_ids: &[&str],
        state: RecordedState,
        epoch: Option<u64>,
        now_ms: u64,
    ) -> Result<()>;
    fn node_seen(&mut self, node_ids: &[&str], now_ms: u64) -> Result<()>;
    fn set_stale(
        &mut self,
        node_id: &str,
        stale: bool,
        epoch: Option<u64>,
        reason: &str,
        now_ms: u64,
    ) -> Result<()>;
    fn node(&self, node_id: &str) -> Result<Option<NodeRecord>>;
    /// Nodes in member-number order; removed ones only with `include_removed`.
    fn nodes(&self, include_removed: bool) -> Result<Vec<NodeRecord>>;
    fn record_key_created(
        &mut self,
        epoch: u64,
        check_value: &str,
        trigger: Trigger,
        trigger_detail: &serde_json::Value,
        recipients: &[&str],
        now_ms: u64,
    ) -> Result<()>;
    fn record_sent(&mut self, epoch: u64, node_ids: &[&str], now_ms: u64) -> Result<()>;
    fn record_ack(&mut self, epoch: u64, node_ids: &[&str], now_ms: u64) -> Result<()>;
    fn retire_key(&mut self, epoch: u64, now_ms: u64) -> Result<()>;
    fn activate_key(&mut self, epoch: u64, now_ms: u64) -> Result<()>;
    /// The newest key that became current.
    fn current_epoch(&self) -> Result<Option<u64>>;
    /// The newest key in the history, current or not.
    fn newest_epoch(&self) -> Result<Option<u64>>;
    fn history(&self) -> Result<Vec<KeyRecord>>;
    fn round_started(&mut self, epoch: u64, nodes: u64, now_ms: u64) -> Result<i64>;
    fn round_phase(&mut self, id: i64, phase: RoundPhase, now_ms: u64) -> Result<()>;
    fn round_finished(
        &mut self,
        id: i64,
        outcome: Outcome,
        detail: Option<&str>,
        acked: u64,
        stale: u64,
        now_ms: u64,
    ) -> Result<()>;
    fn round_paused(&mut self, id: i64, detail: &str, now_ms: u64) -> Result<()>;
    fn round_resumed(&mut self, id: i64) -> Result<()>;
    /// Rounds oldest first; only the unfinished ones with `unfinished_only`.
    fn rounds(&self, unfinished_only: bool) -> Result<Vec<RoundRecord>>;
    fn audit(
        &mut self,
        kind: AuditKind,
        node_id: Option<&str>,
        detail: &serde_json::Value,
        now_ms: u64,
    ) -> Result<i64>;
    fn audit_log(&self, after_id: i64, limit: u32) -> Result<Vec<AuditRecord>>;
    /// Takes the leader lease for `holder` for `lease_ms`, or renews it when
    /// `holder` has it; a lease another holder had is taken only once it has
    /// expired, and then under the next term. Outside a batch only.
    fn acquire_lease(&mut self, holder: &str, lease_ms: u64) -> Result<LeaseOutcome>;
    /// Ends `holder`'s lease of `term` at once (a clean stop), so a standby
    /// need not wait for it to run out. Nothing when it is no longer theirs.
    fn release_lease(&mut self, holder: &str, term: u32) -> Result<()>;
    /// The lease as it stands.
    fn lease(&self) -> Result<Option<LeaseRecord>>;
    /// Inside a batch: refuses it ([`StoreError::Fenced`]) unless `holder`
    /// still holds the lease of `term` by the table's clock, and keeps the
    /// lease row from changing hands until the batch ends (a deposed leader
    /// that wakes up writes nothing: the fencing of issue 16). Nothing to
    /// check on an engine whose controller is always the sole leader.
    fn fence(&mut self, holder: &str, term: u32) -> Result<()>;
    /// Stores (replaces) the controller's own state row (a sealed body).
    fn put_state_core(&mut self, body: &[u8], now_ms: u64) -> Result<()>;
    /// Stores (inserts or replaces) one member's state row (a sealed body).
    fn put_state_member(&mut self, member: u32, body: &[u8]) -> Result<()>;
    /// Deletes one member's state row and its replay mark.
    fn delete_state_member(&mut self, member: u32) -> Result<()>;
    /// Sets the replay marks given (member, highest sequence number accepted).
    fn put_replay_marks(&mut self, marks: &[(u32, u64)]) -> Result<()>;
    /// The controller's state rows as stored.
    fn state_rows(&self) -> Result<StateRows>;
    /// Queues an enrolment of `node_id` for the leader (`body`: the sealed
    /// request); its id.
    fn request_enrolment(
        &mut self,
        node_id: &str,
        body: &[u8],
        by: &str,
        now_ms: u64,
    ) -> Result<i64>;
    /// Listens for new enrolment requests: the returned signal is woken when
    /// one was queued (`None`: the engine cannot tell; poll).
    fn listen_enrolments(&mut self) -> Result<Option<std::sync::Arc<tokio::sync::Notify>>>;
    /// Up to `limit` unanswered enrolment requests, oldest first.
    fn open_enrolments(&self, limit: u32) -> Result<Vec<EnrolRequest>>;
    /// Answers request `id` (`answer`: JSON) and erases its sealed body.
    fn answer_enrolment(&mut self, id: i64, answer: &str, now_ms: u64) -> Result<()>;
    /// The answer to request `id` (JSON), once there is one.
    fn enrolment_answer(&self, id: i64) -> Result<Option<String>>;
}

/// An enrolment an installer asked of the leader through a shared table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolRequest {
    pub id: i64,
    pub node_id: String,
    /// The sealed request (initial key, address).
    pub body: Vec<u8>,
    pub requested_by: String,
}

/// The controller's state as the table holds it: sealed bodies (opened by
/// `controller::state` with the state key) and the replay marks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateRows {
    pub core: Option<Vec<u8>>,
    /// (member, sealed body), in member order.
    pub members: Vec<(u32, Vec<u8>)>,
    /// (member, highest sequence number accepted), in member order.
    pub marks: Vec<(u32, u64)>,
}

/// A stored member number as the wire's `u32`.
fn member_no(column: &'static str, v: i64) -> Result<u32> {
    u32::try_from(v).map_err(|_| StoreError::BadValue {
        column,
        value: v.to_string(),
    })
}

/// Where the management table is: `store.url` in the config, or the default
/// SQLite file in the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Location {
    /// `url` from the config if set (`postgres://` or `postgresql://`;
    /// `sqlite:PATH` names a SQLite file), else `default_sqlite`.
    pub fn from_config(url: Option<&str>, default_sqlite: &Path) -> Result<Location> {
        match url {
            None => Ok(Location::Sqlite(default_sqlite.to_path_buf())),
            Some(u) => match StoreUrl::parse(u) {
                Some(StoreUrl::Postgres(u)) => Ok(Location::Postgres(u.to_owned())),
                Some(StoreUrl::Sqlite(p)) => Ok(Location::Sqlite(p.to_path_buf())),
                None => Err(StoreError::BadUrl(u.to_owned())),
            },
        }
    }
}

/// The management table: one engine behind [`Engine`].
pub struct Store {
    engine: Box<dyn Engine>,
    /// Inside a batch: the first engine failure, which fails the whole batch.
    failed: Option<String>,
    in_batch: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("at", &self.engine.describe())
            .finish()
    }
}

fn strs<S: AsRef<str>>(ids: &[S]) -> Vec<&str> {
    ids.iter().map(AsRef::as_ref).collect()
}

impl Store {
    /// Opens (creating if needed) the SQLite management table at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        Ok(Store::with_engine(Box::new(SqliteEngine::open(path)?)))
    }

    /// Connects to the PostgreSQL management table at `url` (migrating its schema).
    pub fn connect(url: &str) -> Result<Store> {
        Ok(Store::with_engine(Box::new(PgEngine::connect(url)?)))
    }

    /// Opens the table at `location`.
    pub fn open_at(location: &Location) -> Result<Store> {
        match location {
            Location::Sqlite(p) => Store::open(p),
            Location::Postgres(u) => Store::connect(u),
        }
    }

    pub fn with_engine(engine: Box<dyn Engine>) -> Store {
        Store {
            engine,
            failed: None,
            in_batch: false,
        }
    }

    /// Notes an engine failure inside a batch (a row refused for its content
    /// only fails its own call).
    fn note<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if self.in_batch && self.failed.is_none() && e.is_engine_failure() {
                self.failed = Some(e.to_string());
            }
        }
        r
    }

    /// Where the table is (a file path, or the URL without its password).
    pub fn describe(&self) -> String {
        self.engine.describe()
    }

    /// The schema version of the open table.
    pub fn schema_version(&self) -> Result<i64> {
        self.engine.schema_version()
    }

    /// The engine's own consistency check; `Ok(())` when it finds nothing wrong.
    pub fn integrity_check(&self) -> Result<std::result::Result<(), String>> {
        self.engine.integrity_check()
    }

    /// The engine's housekeeping, for the controller to run while idle
    /// ([`Engine::idle_upkeep`]).
    pub fn idle_upkeep(&mut self) -> Result<()> {
        self.engine.idle_upkeep()
    }

    /// Runs `f` as one transaction: every change it makes through this store
    /// commits together (one commit, one fsync), or not at all when it returns
    /// an error or the commit fails. (Each method is atomic on its own and nests
    /// inside the batch; one that fails inside the batch undoes only its own rows.)
    ///
    /// A call inside that fails because the engine failed (disk, connection;
    /// see [`StoreError::is_engine_failure`]) fails the whole batch, even when
    /// `f` went on: the batch then returns [`StoreError::BatchFailed`] and
    /// nothing of it is kept, so a caller never takes a half-written pass for
    /// a written one.
    pub fn batch<R>(&mut self, f: impl FnOnce(&mut Store) -> Result<R>) -> Result<R> {
        self.engine.begin()?;
        self.in_batch = true;
        self.failed = None;
        let r = f(self);
        self.in_batch = false;
        let r = match (r, self.failed.take()) {
            (Ok(_), Some(cause)) => Err(StoreError::BatchFailed {
                at: self.engine.describe(),
                cause,
            }),
            (r, _) => r,
        };
        match r {
            Ok(r) => match self.engine.commit() {
                Ok(()) => Ok(r),
                Err(e) => {
                    self.engine.rollback();
                    Err(e)
                }
            },
            Err(e) => {
                self.engine.rollback();
                Err(e)
            }
        }
    }

    // ----- nodes -----

    /// Enrolls a node under the member number its controller gave it (or
    /// re-enrolls a removed one under its new number); `address` is `None`
    /// until the node has been heard from. Records an `Enrollment` audit
    /// entry in the same transaction. The store never numbers members itself:
    /// the number is the one on the wire.
    pub fn enroll_node(
        &mut self,
        node_id: &str,
        member_no: u64,
        address: Option<&str>,
        key_check: &str,
        now_ms: u64,
    ) -> Result<NodeRecord> {
        if let Some(a) = address {
            check_address(a)?;
        }
        if member_no == 0 {
            return Err(StoreError::Range(0));
        }
        let r = self
            .engine
            .enroll_node(node_id, member_no, address, key_check, now_ms);
        self.note(r)
    }

    /// Gives enrolled nodes the member numbers their controller uses (a
    /// table written before issue 15 numbered them itself), in one savepoint:
    /// numbers may be swapped among the nodes. Returns the nodes renumbered,
    /// as (node id, old number, new number), each also in the audit log.
    pub fn renumber_members(
        &mut self,
        want: &[(&str, u64)],
        now_ms: u64,
    ) -> Result<Vec<(String, u64, u64)>> {
        let r = self.engine.renumber_members(want, now_ms);
        self.note(r)
    }

    /// Marks a node removed (it keeps its row and history); audits it.
    pub fn remove_node(&mut self, node_id: &str, reason: &str, now_ms: u64) -> Result<()> {
        let r = self.engine.remove_node(node_id, reason, now_ms);
        self.note(r)
    }

    /// Updates the address of an enrolled node.
    pub fn set_address(&mut self, node_id: &str, address: &str) -> Result<()> {
        check_address(address)?;
        let r = self.engine.set_address(node_id, address);
        self.note(r)
    }

    /// A node's authenticated message (`message`, sequence number `seq`) came
    /// from `new`: the node's address becomes `new`, and the change is a row
    /// of its address history (one transaction).
    pub fn record_address_change(
        &mut self,
        node_id: &str,
        new: &str,
        message: &str,
        seq: u64,
        now_ms: u64,
    ) -> Result<()> {
        check_address(new)?;
        let r = self
            .engine
            .record_address_change(node_id, new, message, seq, now_ms);
        self.note(r)
    }

    /// Every address change of `node_id`, oldest first.
    pub fn address_history(&self, node_id: &str) -> Result<Vec<AddressChange>> {
        self.engine.address_changes(Some(node_id))
    }

    /// Every address change of every node, oldest first.
    pub fn address_changes(&self) -> Result<Vec<AddressChange>> {
        self.engine.address_changes(None)
    }

    /// The keys of `epochs` went to `node_id` in the answer to its join or key
    /// request: one row each (keys not in the history are refused).
    pub fn record_handout(
        &mut self,
        epochs: &[u64],
        node_id: &str,
        via: Handout,
        now_ms: u64,
    ) -> Result<()> {
        let r = self.engine.record_handout(epochs, node_id, via, now_ms);
        self.note(r)
    }

    /// Records the state and epoch the given nodes reported, and that they were
    /// seen at `now_ms` (one transaction).
    pub fn set_node_state<S: AsRef<str>>(
        &mut self,
        node_ids: &[S],
        state: RecordedState,
        epoch: Option<u64>,
        now_ms: u64,
    ) -> Result<()> {
        let r = self
            .engine
            .set_node_state(&strs(node_ids), state, epoch, now_ms);
        self.note(r)
    }

    /// Records that the given nodes were heard from at `now_ms`.
    pub fn node_seen<S: AsRef<str>>(&mut self, node_ids: &[S], now_ms: u64) -> Result<()> {
        let r = self.engine.node_seen(&strs(node_ids), now_ms);
        self.note(r)
    }

    /// Marks a node stale (left out of the round of `epoch`), with a `Stale` audit entry.
    pub fn mark_stale(
        &mut self,
        node_id: &str,
        epoch: Option<u64>,
        reason: &str,
        now_ms: u64,
    ) -> Result<()> {
        let r = self.engine.set_stale(node_id, true, epoch, reason, now_ms);
        self.note(r)
    }

    /// Clears a node's stale flag (it came back), with a `Rejoin` audit entry.
    pub fn clear_stale(
        &mut self,
        node_id: &str,
        epoch: Option<u64>,
        reason: &str,
        now_ms: u64,
    ) -> Result<()> {
        let r = self.engine.set_stale(node_id, false, epoch, reason, now_ms);
        self.note(r)
    }

    /// One node, removed or not.
    pub fn node(&self, node_id: &str) -> Result<Option<NodeRecord>> {
        self.engine.node(node_id)
    }

    /// The enrolled (not removed) nodes, in member-number order.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>> {
        self.engine.nodes(false)
    }

    /// Every node ever enrolled, removed ones included.
    pub fn all_nodes(&self) -> Result<Vec<NodeRecord>> {
        self.engine.nodes(true)
    }

    // ----- keys -----

    /// Records a new group key (its check value, never the key), the trigger that
    /// made it (also written to the audit log), and a pending delivery for each
    /// recipient; all in one transaction.
    pub fn record_key_created<S: AsRef<str>>(
        &mut self,
        epoch: u64,
        check_value: &str,
        trigger: Trigger,
        trigger_detail: &serde_json::Value,
        recipients: &[S],
        now_ms: u64,
    ) -> Result<()> {
        let r = self.engine.record_key_created(
            epoch,
            check_value,
            trigger,
            trigger_detail,
            &strs(recipients),
            now_ms,
        );
        self.note(r)
    }

    /// Records that the key of `epoch` was sent (again) to the given nodes.
    /// A node not yet listed for that epoch is added (e.g. a rejoining node).
    pub fn record_sent<S: AsRef<str>>(
        &mut self,
        epoch: u64,
        node_ids: &[S],
        now_ms: u64,
    ) -> Result<()> {
        let r = self.engine.record_sent(epoch, &strs(node_ids), now_ms);
        self.note(r)
    }

    /// Records the key update replies of the given nodes for `epoch` (the first
    /// acknowledgement time is kept) and that they were seen.
    pub fn record_ack<S: AsRef<str>>(
        &mut self,
        epoch: u64,
        node_ids: &[S],
        now_ms: u64,
    ) -> Result<()> {
        let r = self.engine.record_ack(epoch, &strs(node_ids), now_ms);
        self.note(r)
    }

    /// Records that the key of `epoch` was dropped by the fleet (after the second
    /// transition of the round that replaced it).
    pub fn retire_key(&mut self, epoch: u64, now_ms: u64) -> Result<()> {
        let r = self.engine.retire_key(epoch, now_ms);
        self.note(r)
    }

    /// The key of `epoch` became the current group key (its round completed).
    pub fn activate_key(&mut self, epoch: u64, now_ms: u64) -> Result<()> {
        let r = self.engine.activate_key(epoch, now_ms);
        self.note(r)
    }

    /// The newest epoch in the key history, current or not.
    pub fn newest_epoch(&self) -> Result<Option<u64>> {
        self.engine.newest_epoch()
    }

    /// The current group key's epoch: the newest key that became current. A
    /// round in progress (or one that never completed) does not count.
    pub fn current_epoch(&self) -> Result<Option<u64>> {
        self.engine.current_epoch()
    }

    /// Every group key, oldest first, with its deliveries.
    pub fn history(&self) -> Result<Vec<KeyRecord>> {
        self.engine.history()
    }

    // ----- rounds -----

    /// Starts a round for the key of `epoch` over `nodes` nodes, in phase `distributing`.
    pub fn round_started(&mut self, epoch: u64, nodes: u64, now_ms: u64) -> Result<i64> {
        let r = self.engine.round_started(epoch, nodes, now_ms);
        self.note(r)
    }

    /// Moves round `id` to `phase`, recording how long the phase it leaves lasted.
    pub fn round_phase(&mut self, id: i64, phase: RoundPhase, now_ms: u64) -> Result<()> {
        let r = self.engine.round_phase(id, phase, now_ms);
        self.note(r)
    }

    /// Ends round `id`: closes its current phase, records the outcome and counts.
    pub fn round_finished(
        &mut self,
        id: i64,
        outcome: Outcome,
        detail: Option<&str>,
        acked: u64,
        stale: u64,
        now_ms: u64,
    ) -> Result<()> {
        let r = self
            .engine
            .round_finished(id, outcome, detail, acked, stale, now_ms);
        self.note(r)
    }

    /// Round `id` reached too few nodes by a deadline and waits (`detail` says how many).
    pub fn round_paused(&mut self, id: i64, detail: &str, now_ms: u64) -> Result<()> {
        let r = self.engine.round_paused(id, detail, now_ms);
        self.note(r)
    }

    /// Round `id` goes on after a pause.
    pub fn round_resumed(&mut self, id: i64) -> Result<()> {
        let r = self.engine.round_resumed(id);
        self.note(r)
    }

    /// All rounds, oldest first.
    pub fn rounds(&self) -> Result<Vec<RoundRecord>> {
        self.engine.rounds(false)
    }

    /// The newest round that has not finished (to resume after a restart).
    pub fn unfinished_round(&self) -> Result<Option<RoundRecord>> {
        Ok(self.engine.rounds(true)?.pop())
    }

    // ----- audit -----

    /// Appends an audit entry (every trigger and every refusal goes here).
    pub fn audit(
        &mut self,
        kind: AuditKind,
        node_id: Option<&str>,
        detail: &serde_json::Value,
        now_ms: u64,
    ) -> Result<i64> {
        let r = self.engine.audit(kind, node_id, detail, now_ms);
        self.note(r)
    }

    /// Audit entries with an id greater than `after_id`, oldest first, at most `limit`.
    pub fn audit_log(&self, after_id: i64, limit: u32) -> Result<Vec<AuditRecord>> {
        self.engine.audit_log(after_id, limit)
    }

    // ----- leader lease (issue 16) -----

    /// Takes or renews the leader lease for `holder` (see [`Engine::acquire_lease`]).
    /// On SQLite the caller is the sole leader: term 1, never expiring.
    pub fn acquire_lease(&mut self, holder: &str, lease_ms: u64) -> Result<LeaseOutcome> {
        if holder.is_empty() {
            return Err(StoreError::BadValue {
                column: "leader_lease.holder",
                value: String::new(),
            });
        }
        to_i64(lease_ms)?;
        self.engine.acquire_lease(holder, lease_ms)
    }

    /// Ends `holder`'s lease of `term` at once.
    pub fn release_lease(&mut self, holder: &str, term: u32) -> Result<()> {
        self.engine.release_lease(holder, term)
    }

    /// The leader lease as it stands.
    /// See [`Engine::fence`].
    pub fn fence(&mut self, holder: &str, term: u32) -> Result<()> {
        let r = self.engine.fence(holder, term);
        self.note(r)
    }

    /// Stores (replaces) the controller's own state row.
    pub fn put_state_core(&mut self, body: &[u8], now_ms: u64) -> Result<()> {
        let r = self.engine.put_state_core(body, now_ms);
        self.note(r)
    }

    /// Stores (inserts or replaces) one member's state row.
    pub fn put_state_member(&mut self, member: u32, body: &[u8]) -> Result<()> {
        let r = self.engine.put_state_member(member, body);
        self.note(r)
    }

    /// Deletes one member's state row and its replay mark.
    pub fn delete_state_member(&mut self, member: u32) -> Result<()> {
        let r = self.engine.delete_state_member(member);
        self.note(r)
    }

    /// Sets replay marks (member, highest sequence number accepted).
    pub fn put_replay_marks(&mut self, marks: &[(u32, u64)]) -> Result<()> {
        if marks.is_empty() {
            return Ok(());
        }
        let r = self.engine.put_replay_marks(marks);
        self.note(r)
    }

    /// The controller's state rows as stored.
    pub fn state_rows(&self) -> Result<StateRows> {
        self.engine.state_rows()
    }

    /// See [`Engine::request_enrolment`].
    pub fn request_enrolment(
        &mut self,
        node_id: &str,
        body: &[u8],
        by: &str,
        now_ms: u64,
    ) -> Result<i64> {
        let r = self.engine.request_enrolment(node_id, body, by, now_ms);
        self.note(r)
    }

    /// See [`Engine::listen_enrolments`].
    pub fn listen_enrolments(&mut self) -> Result<Option<std::sync::Arc<tokio::sync::Notify>>> {
        self.engine.listen_enrolments()
    }

    /// See [`Engine::open_enrolments`].
    pub fn open_enrolments(&self, limit: u32) -> Result<Vec<EnrolRequest>> {
        self.engine.open_enrolments(limit)
    }

    /// See [`Engine::answer_enrolment`].
    pub fn answer_enrolment(&mut self, id: i64, answer: &str, now_ms: u64) -> Result<()> {
        let r = self.engine.answer_enrolment(id, answer, now_ms);
        self.note(r)
    }

    /// See [`Engine::enrolment_answer`].
    pub fn enrolment_answer(&self, id: i64) -> Result<Option<String>> {
        self.engine.enrolment_answer(id)
    }

    pub fn lease(&self) -> Result<Option<LeaseRecord>> {
        self.engine.lease()
    }
}

#[cfg(test)]
mod tests;
