//! The controller's runtime: the tokio shell around [`ControllerMachine`].
//!
//! It owns a *state directory* (mode 0700):
//!
//! | file | what |
//! |---|---|
//! | `controller.secrets` | the *state key* the controller's state rows in the table are sealed with ([`state`]), owner-only, optionally sealed with a passphrase ([`crate::secrets`]); a standby controller gets a copy |
//! | `fleet.db` | the management table ([`crate::store`]), with the controller's own state ([`ControllerPersist`]: signing key, group keys, round, node keys; sealed rows) unless `store.url` names a shared PostgreSQL table |
//! | `lock` | `flock`ed by whichever controller runs, so two never run at once |
//! | `control.sock` | `keyfleet serve`'s control socket (see [`control`]) |
//!
//! One *loop pass* takes an input (a datagram — plus any others already
//! waiting —, a timer, a command), feeds the machine, and carries its actions
//! out in this order: (1) the pass's `Persist…`/`ForgetMember` actions (applied
//! to the sealed state rows, as the simulator applies them to its memory:
//! [`keyfleet_core::protocol::apply_persist`]), the replay marks when due and
//! every `Record` of the pass are written in one transaction of the
//! management table ([`table`]) — durable before any send of the pass; (2)
//! datagrams go out; (3) the machine's one timer is armed for its next
//! deadline ([`ControllerMachine::poll_timeout`]; its firing feeds
//! `ControllerInput::Timeout`), beside the shell's own (refusal summaries,
//! table retries, the lease renewal, enrolment requests). A restarted controller (or a
//! standby taking over) restores the state from the table, reconciles the
//! table's records with it, and feeds `Start`, which resumes a round in progress.

pub mod control;
pub mod enrolment;
pub mod state;
pub mod table;

use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, SocketAddrV4};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

use rand::rngs::OsRng;
use serde::Serialize;

use crate::config::Config;
use crate::net::{Clock, Datagram, NetConfig, NetError, Timers, Transport, DEFAULT_TTL};
use crate::secrets::{self, Passphrase, SealParams, SecretsError};
use crate::statefile::{self, StateFileError};
use crate::store::{LeaseOutcome, Location, Store, StoreError};
use keyfleet_core::crypto::InitialKey;
use keyfleet_core::protocol::{
    CommandError, ControllerAction, ControllerInput, ControllerMachine, ControllerPersist,
    MemberStatus, Outcome, PhaseDurations, Record, RestoreError, Time,
};
use keyfleet_core::wire::{NodeId, RoundPhase};

use table::Table;

/// What went wrong in the controller.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("no controller in {dir}: run `keyfleet init` first (or give --state DIR)")]
    NotInitialised { dir: PathBuf },
    #[error("permission denied reading {path}: the controller's state directory {dir} belongs to {owner} and this is uid {me}; run keyfleet as the user that owns it (e.g. `sudo -u <owner> keyfleet ...`), or give --state DIR (or KEYFLEET_STATE) for a directory of your own")]
    NoAccess {
        dir: PathBuf,
        path: PathBuf,
        owner: String,
        me: u32,
    },
    #[error("{dir} already holds a controller; `keyfleet init` never overwrites one (use another --state DIR, or remove the directory to start over)")]
    AlreadyInitialised { dir: PathBuf },
    #[error("another keyfleet controller is working on {dir} (a `keyfleet serve`, or another command); wait for it or stop it")]
    Busy { dir: PathBuf },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("the controller state cannot be restored: {0}")]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(
        "the management table {at} already holds a controller's state (another fleet, or \
         this one's): `keyfleet init` never overwrites it. To run a standby controller of \
         that fleet, copy controller.secrets from one of its controllers into {dir} instead"
    )]
    TableHasFleet { at: String, dir: PathBuf },
    #[error(
        "the leader has not answered enrolment request {id} in {waited_ms} ms: it stays \
         queued in the management table and the leader enrolls it when it runs (`keyfleet \
         status` lists the node once it is enrolled)"
    )]
    NotAnswered { id: i64, waited_ms: u64 },
    #[error(
        "{dir} holds a controller but the management table {at} has no controller state: \
         store.url points at another table than the one `keyfleet init` wrote"
    )]
    NoStateInTable { at: String, dir: PathBuf },
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(
        "the management table could not be written for {for_ms} ms ({pending} records and \
         state writes held back, no message sent meanwhile; the last error: {last}); \
         stopped. The table holds the state of the last pass it wrote and nothing was sent \
         after it: start `keyfleet serve` again once the table is writable"
    )]
    TableDown {
        for_ms: u64,
        pending: usize,
        last: Box<StoreError>,
    },
    #[error("{0}")]
    Duplicate(String),
    /// An installer's enrolment request the leader refused (what it said), or
    /// could not read.
    #[error("{0}")]
    EnrolmentRefused(String),
    #[error(
        "the management table's leader lease is held by {holder} (term {term}, {left_ms} ms \
         left): another controller leads this fleet; stop it (its lease then ends at once) or \
         wait until its lease runs out"
    )]
    LeaseTaken {
        holder: String,
        term: u32,
        left_ms: u64,
    },
    #[error(
        "this controller lost the leader lease ({detail}); it sent nothing after its lease \
         ran short and stops now"
    )]
    LeaseLost { detail: String },
}

type Result<T> = std::result::Result<T, ControllerError>;

/// The files of a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> StateDir {
        StateDir { dir: dir.into() }
    }

    /// `$XDG_DATA_HOME/keyfleet` (usually `~/.local/share/keyfleet`).
    pub fn default_dir() -> Option<PathBuf> {
        dirs::data_dir().map(|d| d.join("keyfleet"))
    }

    pub fn secrets(&self) -> PathBuf {
        self.dir.join("controller.secrets")
    }
    pub fn database(&self) -> PathBuf {
        self.dir.join("fleet.db")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.dir.join("lock")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// Whether `keyfleet init` has run here.
    pub fn is_initialised(&self) -> bool {
        self.secrets().exists()
    }

    /// Whether `keyfleet init` has run here, telling "no controller" apart
    /// from "a controller this user may not read" (a directory of another
    /// user, or of root, is not "no controller").
    pub fn initialised(&self) -> Result<bool> {
        for path in [self.dir.clone(), self.secrets()] {
            match std::fs::metadata(&path) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(self.no_access(&path));
                }
                Err(source) => {
                    return Err(ControllerError::Io {
                        what: "read",
                        path,
                        source,
                    })
                }
            }
        }
        // The directory may be searchable but its files not readable.
        match std::fs::File::open(self.secrets()) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                Err(self.no_access(&self.secrets()))
            }
            Err(source) => Err(ControllerError::Io {
                what: "read",
                path: self.secrets(),
                source,
            }),
        }
    }

    fn no_access(&self, path: &std::path::Path) -> ControllerError {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(&self.dir)
            .map(|m| format!("uid {}", m.uid()))
            .unwrap_or_else(|_| "another user".into());
        ControllerError::NoAccess {
            dir: self.dir.clone(),
            path: path.to_path_buf(),
            owner,
            me: rustix::process::geteuid().as_raw(),
        }
    }

    /// Takes the directory's exclusive lock (non-blocking); held until dropped.
    pub fn lock(&self) -> Result<DirLock> {
        statefile::ensure_private_dir(&self.dir)?;
        let path = self.lock_file();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| ControllerError::Io {
                what: "open the lock file",
                path: path.clone(),
                source,
            })?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(ControllerError::Busy {
                dir: self.dir.clone(),
            }),
            Err(e) => Err(ControllerError::Io {
                what: "lock",
                path,
                source: e.into(),
            }),
        }
    }

    /// Where the management table is: `store.url` (from the config) or the
    /// SQLite file in this directory.
    pub fn table_at(&self, store_url: Option<&str>) -> Result<Location> {
        Ok(Location::from_config(store_url, &self.database())?)
    }

    /// Opens the management table for reading (`status`, `history`).
    pub fn open_table(&self, store_url: Option<&str>) -> Result<Store> {
        if !self.initialised()? {
            return Err(ControllerError::NotInitialised {
                dir: self.dir.clone(),
            });
        }
        Ok(Store::open_at(&self.table_at(store_url)?)?)
    }
}

/// The state directory's lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Everything a controller needs from the command line and the config file.
#[derive(Debug, Clone)]
pub struct Options {
    pub state: StateDir,
    pub config: Config,
    pub passphrase: Option<Passphrase>,
    /// Argon2id cost when sealing with the passphrase.
    pub seal: SealParams,
    /// Receive-side loss injection (tests).
    pub loss: f64,
    pub loss_seed: u64,
}

impl Options {
    pub fn new(state: StateDir, config: Config) -> Options {
        Options {
            state,
            config,
            passphrase: None,
            seal: SealParams::default(),
            loss: 0.0,
            loss_seed: 0,
        }
    }

    fn net(&self) -> NetConfig {
        let n = &self.config.network;
        NetConfig {
            group: n.group,
            iface: n.iface,
            listen: SocketAddrV4::new(n.iface, n.listen_port),
            ttl: DEFAULT_TTL,
            loss: self.loss,
            loss_seed: self.loss_seed,
            delay: crate::net::Delay::default(),
        }
    }
}

/// What `init` made.
#[derive(Debug, Clone, Serialize)]
pub struct InitReport {
    pub state: PathBuf,
    pub epoch: u32,
    pub check: String,
    pub public_key: String,
    pub sealed: bool,
}

/// What `keyfleet rejoin` did.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RejoinReport {
    pub node_id: String,
    /// The re-join is accepted until then (ms since the UNIX epoch).
    pub until_ms: u64,
}

/// What `enroll` did.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct EnrollReport {
    pub node_id: String,
    pub member: u32,
    /// `None` until the node is heard from, when enrolled without an address.
    pub address: Option<String>,
    pub fingerprint: String,
}

/// A round's progress, for a progress bar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Progress {
    pub epoch: u32,
    /// `waiting_for_joins`, `distributing`, `first_transition`, `draining`, `second_transition`.
    pub phase: String,
    pub acked: u32,
    pub total: u32,
    /// The round waits: too few nodes answered by the deadline.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

/// How a round command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundOutcome {
    /// The new key is current.
    #[default]
    Completed,
    /// Too few nodes answered (none: the controller is cut off): the old key
    /// stays current and the round waits, retrying, in `keyfleet serve` or
    /// until the next `keyfleet rekey`.
    Paused,
}

/// Who carries a paused round on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CarriedOnBy {
    /// The running `keyfleet serve` keeps retrying and completes it once nodes answer.
    Serve,
    /// Nobody until the next `keyfleet rekey` or `keyfleet serve`, which finishes it first.
    NextCommand,
}

/// A round as a command reports it (what `rekey --json` prints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RoundReport {
    #[serde(default)]
    pub outcome: RoundOutcome,
    pub epoch: u32,
    /// The current group key's epoch when the report was made: `epoch` once
    /// the round completed, the old one while it is paused.
    #[serde(default)]
    pub current_epoch: u32,
    /// Every enrolled node, joined or not.
    pub nodes: u32,
    /// Nodes that joined (active or stale).
    #[serde(default)]
    pub joined: u32,
    /// Nodes that confirmed the round (paused: the phase it waits in).
    pub acked: u32,
    pub stale: u32,
    /// Enrolled nodes that never joined (they get the key when they join).
    #[serde(default)]
    pub not_joined: u32,
    #[serde(default)]
    pub stale_nodes: Vec<String>,
    #[serde(default)]
    pub not_joined_nodes: Vec<String>,
    /// Paused: the phase the round waits in, the confirmations it needs and
    /// the live nodes that have not answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needed: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub silent_nodes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried_on_by: Option<CarriedOnBy>,
    /// Times the round paused on its way.
    #[serde(default)]
    pub pauses: u32,
    /// From the new key to the end of the second transition (paused: so far).
    pub elapsed_ms: u64,
    pub phases_ms: PhaseDurations,
    /// The new key's check value.
    pub check: String,
    /// Spent before the round began (waiting for joins, or for a round in progress).
    pub waited_ms: u64,
    /// Rounds that finished while the command waited, before its own: the
    /// round in progress it was queued behind, or one an interrupted command left.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<RoundReport>,
}

impl RoundReport {
    /// Whether the command failed: the round did not complete, or left nodes stale.
    pub fn failed(&self) -> bool {
        self.outcome != RoundOutcome::Completed || self.stale > 0
    }
}

/// A round command that waits behind a round in progress (the control
/// socket's `queued` line; printed by `rekey` instead of nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Queued {
    /// The round in progress, finished first.
    pub running_epoch: u32,
    pub running_phase: String,
    /// It is paused (the command made it retry at once).
    pub paused: bool,
    /// It was left by a controller that stopped (an interrupted `rekey`, a crash).
    pub resumed: bool,
    /// The round that answers the command.
    pub epoch: u32,
    /// Another command had queued that round already: this one joins it.
    pub joined_queue: bool,
}

/// The round in progress when a command came in: the command's own round
/// follows it.
#[derive(Clone, Copy)]
struct Running {
    epoch: u32,
    phase: RoundPhase,
    paused: bool,
    origin: RoundOrigin,
}

/// Who started a round in progress.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RoundOrigin {
    /// This controller, still running (`serve`).
    ThisController,
    /// A controller that stopped before finishing it (an interrupted
    /// `rekey`, a crash), resumed by this one-shot run.
    Resumed,
}

/// A command to the controller: what `keyfleet enroll`, `rejoin`, `rekey`
/// and `remove` ask, from a one-shot run or through `serve`'s control socket
/// ([`control::Request::command`]) alike. Every one goes into the machine by
/// [`Controller::execute`].
#[derive(Debug, Clone)]
pub enum Command {
    /// Enroll a node; `force`: even when another node has the same initial
    /// key or address.
    Enroll {
        node_id: NodeId,
        key: InitialKey,
        addr: SocketAddr,
        force: bool,
    },
    /// Let a node whose enrollment is pinned run the handshake again.
    Rejoin(NodeId),
    /// Rekey by hand (a round).
    Rekey,
    /// Remove a node (a round without it, with `triggers.on_node_removed`).
    Remove(NodeId),
}

/// What a command came to, as the shell reports it: the machine's
/// [`Outcome`] with the shell's names.
#[derive(Debug, Clone)]
pub enum Executed {
    Enrolled(EnrollReport),
    RejoinAllowed(RejoinReport),
    /// A round command: the epoch whose round's end answers it (`None`: no
    /// round follows).
    Round(Option<u32>),
}

/// What `remove` did.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RemoveReport {
    pub node_id: String,
    /// The round that left it out; `None` when `triggers.on_node_removed` is off.
    pub round: Option<RoundReport>,
}

/// The machine's one timer: its next deadline ([`ControllerMachine::poll_timeout`]).
const MACHINE_TIMER: u8 = 0;

/// The shell's own timer: the end of the next refusal window with counted
/// refusals, when its summary row is due ([`table`]).
const REFUSAL_TIMER: u8 = 2;

/// The shell's timer to write again the records of a pass whose batch failed.
const TABLE_RETRY_TIMER: u8 = 4;

/// How often the records of a failed batch are tried again (ms).
const TABLE_RETRY_MS: u64 = 1_000;

/// The shell's timer to renew the leader lease of a shared table.
const LEASE_TIMER: u8 = 5;
/// The shell's timer to look for installers' enrolment requests in a shared table.
const ENROL_TIMER: u8 = 6;
/// The shell's timer to write the records of passes that only recorded
/// (acknowledgements), held back to be written together.
const RECORDS_TIMER: u8 = 7;

/// The shell's timer to go on preparing the next round's key agreement
/// ([`ControllerMachine::prepare_round`]) in the next pass.
const PREPARE_TIMER: u8 = 8;
/// Members whose next ratchet step one pass prepares (an X25519 each, about
/// 60 µs on the test VM: about 1 ms a pass; a 100-node fleet is prepared in
/// about 7 ms, 10 000 nodes in about 0.7 s).
const PREPARE_PER_PASS: usize = 16;
/// With every member prepared (or a round running), the next look is this
/// many ms later.
const PREPARE_CHECK_MS: u64 = 100;

/// Acknowledgement records wait at most this long, or until the round is
/// over, and are then written together: a round's acknowledgements cost one
/// commit, not one each (issue 11.3), and none of them sits in the commit
/// before a phase's request (a hundred rows of the phase before). Nothing
/// sent depends on them: a controller that stops before they are written
/// resends the phase's request and the nodes answer again.
pub const RECORDS_HOLD_MS: u64 = 50;

/// The group socket is read this often while group datagrams keep coming
/// ([`Transport::coalesce_group`]): the controller hears every node's group
/// data, and acts on it only to tell a leaked key (data under the group key
/// from an address no member has) or a replay of it, neither of which a few
/// ms change. Replies and requests come to the unicast socket, read at once;
/// only a node that has not learned the controller's address yet, or a
/// retry sent to the group, waits up to this long. In return a stream of
/// group data costs the controller a wake-up every few ms, not one per
/// datagram (half of the data path's cost beyond the two agents' own, by
/// the end-to-end benchmark, issue 11.7).
pub const GROUP_READ_EVERY_MS: u64 = 5;

/// The leader lease this controller holds ([`crate::store::Store::acquire_lease`]).
#[derive(Debug, Clone)]
struct LeaseHeld {
    /// This controller in the lease row: host and state directory, so that
    /// the same controller restarted takes its own lease back at once.
    holder: String,
    term: u32,
    /// Until when (this process's clock) it may send; `None`: always (the
    /// sole leader of an embedded table).
    send_until_ms: Option<u64>,
}

/// The lease holder name of the controller of `st`.
fn lease_holder(st: &StateDir) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let dir = std::fs::canonicalize(&st.dir).unwrap_or_else(|_| st.dir.clone());
    format!(
        "{}:{}",
        if host.is_empty() { "localhost" } else { &host },
        dir.display()
    )
}

/// Takes the leader lease of the management table for the controller of
/// `st`: term 1 and no expiry on SQLite (the sole leader); on a shared table
/// the lease row's term, or [`ControllerError::LeaseTaken`] while another
/// controller holds it.
fn take_lease(
    table: &mut Table,
    st: &StateDir,
    cfg: &crate::config::StoreConfig,
    clock: &Clock,
) -> Result<LeaseHeld> {
    let holder = lease_holder(st);
    let asked = clock.now_ms();
    match table.store_mut().acquire_lease(&holder, cfg.lease_ms)? {
        LeaseOutcome::Held(l) => {
            if l.expires_in_ms.is_some() {
                tracing::info!(holder = %holder, term = l.term, "leader lease taken");
            }
            Ok(LeaseHeld {
                holder,
                term: l.term,
                send_until_ms: l
                    .expires_in_ms
                    .map(|_| asked + cfg.lease_ms.saturating_sub(cfg.lease_margin_ms)),
            })
        }
        LeaseOutcome::Taken(l) => Err(ControllerError::LeaseTaken {
            holder: l.holder,
            term: l.term,
            left_ms: l.expires_in_ms.unwrap_or(u64::MAX),
        }),
    }
}

/// Creates a controller in an empty state directory: a signing key, the first
/// group key (epoch 1), the management table. Refuses an existing controller.
pub fn init(opts: &Options) -> Result<InitReport> {
    let st = &opts.state;
    statefile::ensure_private_dir(&st.dir)?;
    let _lock = st.lock()?;
    if st.is_initialised() || st.database().exists() {
        return Err(ControllerError::AlreadyInitialised {
            dir: st.dir.clone(),
        });
    }
    let now = Time(Clock::wall().now_ms());
    let mut out = Vec::new();
    let machine = ControllerMachine::new(opts.config.controller(), now, &mut OsRng, &mut out);
    let at = st.table_at(opts.config.store.url.as_deref())?;
    let store = Store::open_at(&at)?;
    if store.state_rows()?.core.is_some() {
        return Err(ControllerError::TableHasFleet {
            at: store.describe(),
            dir: st.dir.clone(),
        });
    }
    let key = state::StateKey::generate();
    let mut table = Table::new(store)?.with_state_key(key.clone());
    // The rows first, then the key file: a failure in between leaves no
    // controller here (no file) and sealed rows nobody can open, which the
    // next `init` finds (`TableHasFleet`) on a shared table; on the state
    // directory's own SQLite file the directory is then not empty.
    let persist: Vec<ControllerAction> = out
        .iter()
        .filter(|a| {
            matches!(
                a,
                ControllerAction::PersistCore(_)
                    | ControllerAction::PersistMember(_)
                    | ControllerAction::ForgetMember { .. }
            )
        })
        .cloned()
        .collect();
    let records: Vec<Record> = out
        .into_iter()
        .filter_map(|a| match a {
            ControllerAction::Record(r) => Some(r),
            _ => None,
        })
        .collect();
    table.write_pass(persist, &[], &records, &machine, now.0)?;
    save_key(opts, &st.secrets(), &key)?;
    let snap = machine.snapshot();
    tracing::info!(dir = %st.dir.display(), epoch = %snap.core.current.epoch(), check = %snap.core.current.check_value(), "controller initialised");
    Ok(InitReport {
        state: st.dir.clone(),
        epoch: snap.core.current.epoch().0,
        check: snap.core.current.check_value().to_string(),
        public_key: hex::encode(machine.public_key()),
        sealed: opts.passphrase.is_some(),
    })
}

/// Writes the state key file (sealed with the passphrase when there is one).
fn save_key(opts: &Options, path: &std::path::Path, key: &state::StateKey) -> Result<()> {
    secrets::save(
        path,
        key,
        opts.passphrase.as_ref().map(|s| s.as_str()),
        opts.seal,
    )?;
    Ok(())
}

/// The state key of `opts`'s state directory, migrating a directory of an
/// older version (its `controller.secrets` held the whole snapshot) into
/// `table` on the way: the key is written to `controller.secrets.migrating`
/// first, the snapshot's rows then in one transaction, and the key file
/// last replaces the snapshot (a rename). An interrupted migration is taken
/// up again from where it stopped; a table that already holds another
/// state is never overwritten.
fn state_key(opts: &Options, table: &mut Table, now_ms: u64) -> Result<state::StateKey> {
    let st = &opts.state;
    let pass = opts.passphrase.as_ref().map(|s| s.as_str());
    let file: state::StateFile =
        secrets::load(&st.secrets(), pass)?.ok_or_else(|| ControllerError::NotInitialised {
            dir: st.dir.clone(),
        })?;
    let snap = match file {
        state::StateFile::Key(k) => {
            table.set_state_key(k.clone());
            return Ok(k);
        }
        state::StateFile::Snapshot(s) => s,
    };
    let migrating = st.dir.join("controller.secrets.migrating");
    let key: state::StateKey = match secrets::load(&migrating, pass)? {
        Some(k) => k,
        None => {
            let k = state::StateKey::generate();
            save_key(opts, &migrating, &k)?;
            k
        }
    };
    table.set_state_key(key.clone());
    match table.load_state(now_ms) {
        // Rows of this very migration (they open with its key): only the rename is left.
        Ok(Some(_)) => {}
        Ok(None) => table.store_state(&snap, now_ms)?,
        Err(state::StateError::WrongKey { .. }) => {
            return Err(ControllerError::TableHasFleet {
                at: table.store().describe(),
                dir: st.dir.clone(),
            })
        }
        Err(e) => return Err(e.into()),
    }
    std::fs::rename(&migrating, st.secrets())
        .and_then(|()| File::open(&st.dir)?.sync_all())
        .map_err(|source| ControllerError::Io {
            what: "rename",
            path: migrating.clone(),
            source,
        })?;
    tracing::info!(dir = %st.dir.display(), members = snap.members.len(), "controller state moved from controller.secrets into the management table");
    Ok(key)
}

/// The controller state of the state directory `opts` names, read from its
/// management table (what a controller restores; for tests and tools).
pub fn read_state(opts: &Options) -> Result<ControllerPersist> {
    let st = &opts.state;
    if !st.initialised()? {
        return Err(ControllerError::NotInitialised {
            dir: st.dir.clone(),
        });
    }
    let at = st.table_at(opts.config.store.url.as_deref())?;
    let mut table = Table::new(Store::open_at(&at)?)?;
    state_key(opts, &mut table, Clock::wall().now_ms())?;
    table
        .load_state(Clock::wall().now_ms())?
        .ok_or_else(|| ControllerError::NoStateInTable {
            at: table.store().describe(),
            dir: st.dir.clone(),
        })
}

/// A waiting client of a round (the one-shot command, or a control-socket client).
struct Waiter {
    /// Done once a round of this epoch or later finishes.
    target: u32,
    /// Rounds finished before it while it waited.
    earlier: Vec<RoundReport>,
    since_ms: u64,
    last: Option<Progress>,
    tx: tokio::sync::mpsc::UnboundedSender<control::Reply>,
    kind: WaitKind,
}

enum WaitKind {
    Rekey,
    Remove(String),
}

/// A controller that holds its state directory: restored, table reconciled.
pub struct Controller {
    opts: Options,
    machine: ControllerMachine,
    table: Table,
    clock: Clock,
    timers: Timers<u8>,
    out: Vec<ControllerAction>,
    /// Rounds finished in the last pass.
    finished: Vec<RoundReport>,
    /// Rounds paused in the last pass.
    paused: Vec<RoundReport>,
    waiters: Vec<Waiter>,
    /// Since when the management table cannot be written (None: it can).
    table_down_since: Option<u64>,
    /// The leader lease held.
    lease: LeaseHeld,
    /// When the replay marks were last written (see `flush`).
    saved_at_ms: u64,
    /// The replay marks as the table holds them (only moved ones are written).
    marks_saved: std::collections::HashMap<u32, u64>,
    /// The enrolment timer fired: look for installers' requests after the pass.
    enrolments_due: bool,
    /// Records of passes that only recorded, waiting for the next write.
    held: Vec<Record>,
    /// The records timer fired: write what is held.
    held_due: bool,
    /// [`PREPARE_TIMER`] fired: prepare a batch of the next round's steps.
    prepare_due: bool,
    /// The table's idle upkeep failed last time (logged once until it works).
    upkeep_failing: bool,
    /// What `keyfleet serve --metrics` reports (counters, and the health of
    /// the table and the network as the last pass found them).
    ops: Ops,
    _lock: DirLock,
}

/// Nodes' sequence numbers accepted since the last snapshot are written at
/// most this long after (when no other change wrote the snapshot first), and
/// at a clean stop: replay protection that survives a restart without a
/// write per message.
pub const REPLAY_MARKS_SAVE_MS: u64 = 1000;

/// The operator's view of the loop: metrics and the last errors it met.
#[derive(Default)]
struct Ops {
    metrics: Option<std::sync::Arc<crate::metrics::ControllerMetrics>>,
    /// The last management-table write failed with this.
    store_error: Option<String>,
    /// The last send failed with this (cleared by the next one that works).
    send_error: Option<String>,
}

/// What `keyfleet serve` can add to the plain loop.
#[derive(Default)]
pub struct ServeExtras {
    /// Serve Prometheus metrics and `/healthz` on this address.
    pub metrics: Option<SocketAddr>,
    /// Called once the sockets are bound and the state restored, before the
    /// loop runs (systemd's readiness notification).
    pub ready: Option<OnReady>,
}

/// The readiness callback of [`Ready`].
pub type OnReady = Box<dyn FnOnce(&Ready) + Send>;

/// What is up when `keyfleet serve` is ready.
#[derive(Debug, Clone)]
pub struct Ready {
    pub listen: SocketAddr,
    pub group: SocketAddrV4,
    pub control_socket: PathBuf,
    /// The metrics server's address (the port chosen when 0 was asked).
    pub metrics: Option<SocketAddr>,
}

impl Controller {
    /// Takes the lock and the leader lease, restores the machine from the
    /// management table and reconciles the table's records with it;
    /// [`ControllerError::LeaseTaken`] while another controller leads.
    pub fn open(opts: Options) -> Result<Controller> {
        let (lock, mut table, clock) = Controller::prepare(&opts)?;
        let lease = take_lease(&mut table, &opts.state, &opts.config.store, &clock)?;
        Controller::restore(opts, lock, table, clock, lease)
    }

    /// [`Controller::open`] for `keyfleet serve`: while another controller
    /// leads a shared table, waits as its standby (asking for the lease every
    /// third of `store.lease_ms`) and takes over once its lease runs out,
    /// restoring the state (round in progress, replay marks) it left in the
    /// table. `on_wait` is told once who leads.
    pub async fn open_standby(
        opts: Options,
        on_wait: impl FnOnce(&str, u32),
    ) -> Result<Controller> {
        let (lock, mut table, clock) = Controller::prepare(&opts)?;
        let cfg = &opts.config.store;
        let mut on_wait = Some(on_wait);
        let lease = loop {
            match take_lease(&mut table, &opts.state, cfg, &clock) {
                Ok(l) => break l,
                Err(ControllerError::LeaseTaken {
                    holder,
                    term,
                    left_ms,
                }) => {
                    if let Some(f) = on_wait.take() {
                        tracing::info!(leader = %holder, term, left_ms, "standby: another controller leads; taking over when its lease runs out");
                        f(&holder, term);
                    }
                    let wait = (cfg.lease_ms / 3).clamp(50, left_ms.max(50));
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                Err(e) => return Err(e),
            }
        };
        Controller::restore(opts, lock, table, clock, lease)
    }

    /// The state directory's lock and its management table (not yet read).
    fn prepare(opts: &Options) -> Result<(DirLock, Table, Clock)> {
        let st = &opts.state;
        if !st.initialised()? {
            return Err(ControllerError::NotInitialised {
                dir: st.dir.clone(),
            });
        }
        let lock = st.lock()?;
        let audit = &opts.config.audit;
        let at = st.table_at(opts.config.store.url.as_deref())?;
        let table = Table::new(Store::open_at(&at)?)?
            .with_refusal_window(audit.refusal_window_ms, audit.refusal_max_sources);
        Ok((lock, table, Clock::wall()))
    }

    /// Restores the machine from the table, once the lease is held (a
    /// standby reads the state only as the leader: nothing moves it meanwhile).
    fn restore(
        opts: Options,
        lock: DirLock,
        mut table: Table,
        clock: Clock,
        lease: LeaseHeld,
    ) -> Result<Controller> {
        let st = opts.state.clone();
        let now = clock.now_ms();
        state_key(&opts, &mut table, now)?;
        let snap = table
            .load_state(now)?
            .ok_or_else(|| ControllerError::NoStateInTable {
                at: table.store().describe(),
                dir: st.dir.clone(),
            })?;
        let machine = ControllerMachine::restore(&snap, opts.config.controller(), Time(now))?;
        if lease.send_until_ms.is_some() {
            table.set_fence(&lease.holder, lease.term);
        }
        // The table's records may have missed the last pass of a controller
        // that stopped (an older version wrote its state file first).
        table.reconcile(&snap, now)?;
        if let Some(r) = &snap.core.round {
            tracing::info!(epoch = %r.epoch, phase = %r.phase, "resuming the round in progress");
        }
        let marks_saved = snap
            .members
            .iter()
            .filter_map(|m| m.seq_seen.map(|s| (m.member, s)))
            .collect();
        let mut c = Controller {
            opts,
            machine,
            table,
            clock,
            timers: Timers::new(),
            out: Vec::new(),
            finished: Vec::new(),
            paused: Vec::new(),
            waiters: Vec::new(),
            table_down_since: None,
            saved_at_ms: now,
            marks_saved,
            enrolments_due: false,
            held: Vec::new(),
            held_due: false,
            prepare_due: false,
            upkeep_failing: false,
            ops: Ops::default(),
            lease: lease.clone(),
            _lock: lock,
        };
        c.machine.set_term(lease.term, &mut c.out);
        c.arm_lease_timer();
        Ok(c)
    }

    /// The leader term this controller's messages carry.
    pub fn term(&self) -> u32 {
        self.machine.term()
    }

    /// Whether this controller may send now: always as the sole leader of
    /// an embedded table; with a shared one until `store.lease_margin_ms`
    /// before its lease runs out.
    pub fn may_send(&self) -> bool {
        self.lease
            .send_until_ms
            .is_none_or(|until| self.clock.now_ms() < until)
    }

    fn arm_lease_timer(&mut self) {
        if self.lease.send_until_ms.is_some() {
            let every = (self.opts.config.store.lease_ms / 3).max(1);
            self.timers.arm(LEASE_TIMER, self.clock.now_ms() + every);
        }
    }

    /// Renews the leader lease: [`ControllerError::LeaseLost`] when another
    /// controller has it (or had it: a new term); a table that does not
    /// answer leaves the lease to run out (sends stop before it does) and
    /// is asked again sooner.
    fn renew_lease(&mut self) -> Result<()> {
        let cfg = &self.opts.config.store;
        let (lease_ms, margin) = (cfg.lease_ms, cfg.lease_margin_ms);
        let asked = self.clock.now_ms();
        match self
            .table
            .store_mut()
            .acquire_lease(&self.lease.holder, lease_ms)
        {
            Ok(LeaseOutcome::Held(l)) if l.term == self.lease.term => {
                self.lease.send_until_ms = l
                    .expires_in_ms
                    .map(|_| asked + lease_ms.saturating_sub(margin));
                self.arm_lease_timer();
                Ok(())
            }
            Ok(LeaseOutcome::Held(l)) => Err(ControllerError::LeaseLost {
                detail: format!(
                    "it ran out and was taken again under term {} (term {} was this \
                     controller's): another controller may have led meanwhile",
                    l.term, self.lease.term
                ),
            }),
            Ok(LeaseOutcome::Taken(l)) => Err(ControllerError::LeaseLost {
                detail: format!("{} leads under term {}", l.holder, l.term),
            }),
            Err(e) => {
                let short_for = self
                    .lease
                    .send_until_ms
                    .map_or(0, |until| asked.saturating_sub(until));
                if short_for > self.opts.config.store.max_outage_ms {
                    return Err(ControllerError::LeaseLost {
                        detail: format!(
                            "the table has not answered a renewal for {short_for} ms past the \
                             lease's end: {e}"
                        ),
                    });
                }
                tracing::error!(error = %e, "the leader lease could not be renewed; sends stop before it runs out");
                self.timers.arm(LEASE_TIMER, asked + (lease_ms / 6).max(1));
                Ok(())
            }
        }
    }

    pub fn machine(&self) -> &ControllerMachine {
        &self.machine
    }

    pub fn store(&self) -> &Store {
        self.table.store()
    }

    fn now(&self) -> Time {
        Time(self.clock.now_ms())
    }

    fn feed(&mut self, input: ControllerInput<'_>) -> std::result::Result<Outcome, CommandError> {
        let now = self.now();
        self.machine.handle(now, input, &mut OsRng, &mut self.out)
    }

    /// The replay marks that moved since the table last got them.
    fn moved_marks(&self) -> Vec<(u32, u64)> {
        self.machine
            .replay_marks()
            .filter(|(m, s)| self.marks_saved.get(m) != Some(s))
            .collect()
    }

    /// The replay marks `marks` are in the table.
    fn marks_written(&mut self, marks: Vec<(u32, u64)>) {
        self.marks_saved.extend(marks);
        self.machine.snapshot_saved();
        self.saved_at_ms = self.clock.now_ms();
    }

    /// Writes the replay marks that moved (a clean stop, a quiet loop).
    fn save_marks(&mut self) -> Result<()> {
        let marks = self.moved_marks();
        let r = self
            .table
            .write_pass(Vec::new(), &marks, &[], &self.machine, self.clock.now_ms());
        if self.table_written(r)? {
            self.marks_written(marks);
        }
        Ok(())
    }

    /// Carries out the pending actions (state rows and records, sends) and
    /// arms the machine's timer. A pass held back for the lease arms nothing either.
    async fn flush(&mut self, net: Option<&Transport>) -> Result<()> {
        // A leader whose lease ran short (a renewal failed, or the process
        // was frozen) asks for it first: lost, it stops here having written
        // and sent nothing of this pass; still unanswered, the pass waits
        // (snapshot, rows and sends) until the lease is renewed.
        if !self.out.is_empty() && !self.may_send() {
            self.renew_lease()?;
            if !self.may_send() {
                tracing::warn!(
                    term = self.machine.term(),
                    "the leader lease runs short: this pass waits for its renewal"
                );
                return Ok(());
            }
        }
        self.arm_machine_timer();
        let actions = std::mem::take(&mut self.out);
        let marks_due = self.machine.replay_marks_unsaved()
            && self.clock.now_ms() >= self.saved_at_ms.saturating_add(REPLAY_MARKS_SAVE_MS);
        let held_due = std::mem::take(&mut self.held_due) && !self.held.is_empty();
        if actions.is_empty() && !held_due {
            if marks_due {
                self.save_marks()?;
            }
            return Ok(());
        }
        // (1) One transaction: the pass's state rows (the machine's persist
        // actions), the replay marks when due, and its records — durable
        // before any send of this pass.
        let mut persist = Vec::new();
        let mut records = Vec::new();
        let mut sends = Vec::new();
        for a in actions {
            match a {
                ControllerAction::Record(r) => records.push(r),
                ControllerAction::SendGroup(b) => sends.push((None, b)),
                ControllerAction::SendTo { to, bytes } => sends.push((Some(to), bytes)),
                a @ (ControllerAction::PersistCore(_)
                | ControllerAction::PersistMember(_)
                | ControllerAction::ForgetMember { .. }) => persist.push(a),
            }
        }
        // Acknowledgements and status changes are history, not state: they
        // wait, and are written together when the records timer fires
        // (RECORDS_HOLD_MS after the first), once a round is over (after its
        // report went out, `write_held_after_round`) or with the clean stop.
        // A pass that writes state or sends does not carry them: a round's
        // next request would wait for a phase's hundred rows.
        if !held_due {
            let (wait, now): (Vec<Record>, Vec<Record>) = records.into_iter().partition(may_wait);
            if !wait.is_empty() && self.held.is_empty() {
                self.timers
                    .arm(RECORDS_TIMER, self.clock.now_ms() + RECORDS_HOLD_MS);
            }
            self.held.extend(wait);
            records = now;
            if persist.is_empty() && sends.is_empty() && !marks_due && records.is_empty() {
                return Ok(());
            }
        } else {
            self.timers.cancel(&RECORDS_TIMER);
            let mut all = std::mem::take(&mut self.held);
            all.append(&mut records);
            records = all;
        }
        let marks = if marks_due {
            self.moved_marks()
        } else {
            Vec::new()
        };
        let written = self.table.write_pass(
            persist,
            &marks,
            &records,
            &self.machine,
            self.clock.now_ms(),
        );
        let table_ok = self.table_written(written)?;
        if table_ok && marks_due {
            self.marks_written(marks);
        }
        self.arm_refusal_timer();
        for r in &records {
            log_record(r);
            if let Some(m) = &self.ops.metrics {
                m.record(r);
            }
            match r {
                Record::RoundFinished {
                    epoch,
                    check,
                    started_at,
                    finished_at,
                    phases_ms,
                    nodes,
                    acked,
                    enrolled,
                    stale_nodes,
                    not_joined,
                    pauses,
                    ..
                } => self.finished.push(RoundReport {
                    outcome: RoundOutcome::Completed,
                    epoch: epoch.0,
                    current_epoch: epoch.0,
                    nodes: *enrolled,
                    joined: *nodes,
                    acked: *acked,
                    stale: stale_nodes.len() as u32,
                    not_joined: not_joined.len() as u32,
                    stale_nodes: stale_nodes.iter().map(ToString::to_string).collect(),
                    not_joined_nodes: not_joined.iter().map(ToString::to_string).collect(),
                    phase: None,
                    needed: None,
                    silent_nodes: Vec::new(),
                    carried_on_by: None,
                    pauses: *pauses,
                    elapsed_ms: finished_at.since(*started_at),
                    phases_ms: *phases_ms,
                    check: check.to_string(),
                    waited_ms: 0,
                    earlier: Vec::new(),
                }),
                Record::RoundPaused {
                    epoch,
                    phase,
                    confirmed,
                    needed,
                    silent,
                    pauses,
                    at,
                    ..
                } => {
                    let mut rep = self.paused_report(*epoch, *phase, *at);
                    rep.pauses = *pauses;
                    rep.acked = *confirmed;
                    rep.needed = Some(*needed);
                    rep.silent_nodes = silent.iter().map(ToString::to_string).collect();
                    self.paused.push(rep);
                }
                _ => {}
            }
        }
        // (3) Sends, only once the pass's rows are in the table: a controller
        // that cannot write its table (a full or read-only disk, a lost
        // database server, and with a shared table perhaps a lost lease) moves
        // nobody. What is held back is resent by the round's retries.
        if !table_ok {
            if !sends.is_empty() {
                tracing::warn!(
                    count = sends.len(),
                    "management table not written: this pass's messages are not sent"
                );
            }
            return Ok(());
        }
        // A leader whose lease runs short sends nothing (its renewal failed):
        // a standby may take it once it runs out.
        if !self.may_send() {
            if !sends.is_empty() {
                tracing::warn!(
                    count = sends.len(),
                    term = self.machine.term(),
                    "the leader lease runs short: this pass's messages are not sent"
                );
            }
            return Ok(());
        }
        match net {
            Some(t) if !sends.is_empty() => {
                // The pass's datagrams go to the kernel together (one
                // system call for a round's key update batches).
                let sent_at = self.now();
                let sent_us = self.clock.now_us();
                t.cork();
                for (to, bytes) in sends {
                    // Corked: held, not sent; uncork says what failed.
                    let _ = match to {
                        None => t.send_group(&bytes).await,
                        Some(to) => t.send_to(&bytes, to).await,
                    };
                }
                match t.uncork().await {
                    Ok(()) => self.ops.send_error = None,
                    Err(e) => {
                        tracing::warn!(error = %e, "send failed; the retries cover it");
                        self.ops.send_error = Some(e.to_string());
                    }
                }
                // The round trip the drain measures starts here, not before
                // the table write above.
                self.machine.requests_sent(sent_at, Some(sent_us));
            }
            Some(_) => {}
            None if !sends.is_empty() => {
                tracing::debug!(
                    count = sends.len(),
                    "no network in this command; sends left to the next run"
                )
            }
            None => {}
        }
        Ok(())
    }

    /// Progress of the round in progress, if any.
    fn progress(&self) -> Option<Progress> {
        let (epoch, phase) = self.machine.round()?;
        let total = self
            .machine
            .members()
            .filter(|(_, _, s)| *s == MemberStatus::Active)
            .count() as u32;
        Some(Progress {
            epoch: epoch.0,
            phase: phase.as_str().into(),
            acked: total.saturating_sub(self.machine.waiting()),
            total,
            paused: self.machine.paused_since().is_some(),
        })
    }

    /// Allows a pinned node to run the enrollment handshake again (audited,
    /// open for [`keyfleet_core::protocol::REJOIN_WINDOW_MS`]).
    pub async fn allow_rejoin(&mut self, node_id: NodeId) -> Result<RejoinReport> {
        let Executed::RejoinAllowed(r) = self.execute(&Command::Rejoin(node_id))? else {
            unreachable!("a rejoin answers RejoinAllowed")
        };
        self.flush(None).await?;
        Ok(r)
    }

    /// Enrolls a node (no network needed).
    /// The report of the round in progress as it stands, paused (the caller
    /// fills in what the pause record says).
    fn paused_report(
        &self,
        epoch: keyfleet_core::crypto::Epoch,
        phase: RoundPhase,
        now: Time,
    ) -> RoundReport {
        let names = |want: MemberStatus| -> Vec<String> {
            self.machine
                .members()
                .filter(|(_, _, s)| *s == want)
                .map(|(_, id, _)| id.to_string())
                .collect()
        };
        let (stale_nodes, not_joined_nodes) =
            (names(MemberStatus::Stale), names(MemberStatus::Enrolled));
        let nodes = self.machine.members().count() as u32;
        let (started, check) = self
            .machine
            .round_started()
            .map_or((now, String::new()), |(t, c)| (t, c.to_string()));
        RoundReport {
            outcome: RoundOutcome::Paused,
            epoch: epoch.0,
            current_epoch: self.machine.current_epoch().0,
            nodes,
            joined: nodes - not_joined_nodes.len() as u32,
            acked: self.machine.confirmed(),
            stale: stale_nodes.len() as u32,
            not_joined: not_joined_nodes.len() as u32,
            stale_nodes,
            not_joined_nodes,
            phase: Some(phase.as_str().into()),
            needed: Some(self.machine.needed()),
            silent_nodes: Vec::new(),
            carried_on_by: None,
            pauses: 0,
            elapsed_ms: now.since(started),
            phases_ms: PhaseDurations::default(),
            check,
            waited_ms: 0,
            earlier: Vec::new(),
        }
    }

    /// The paused round in progress, as a report, if it is paused.
    fn paused_now(&self) -> Option<RoundReport> {
        self.machine.paused_since()?;
        let (epoch, phase) = self.machine.round()?;
        Some(self.paused_report(epoch, phase, self.now()))
    }

    /// The round in progress as a command comes in, if any.
    fn running(&self, origin: RoundOrigin) -> Option<Running> {
        self.machine.round().map(|(epoch, phase)| Running {
            epoch: epoch.0,
            phase,
            paused: self.machine.paused_since().is_some(),
            origin,
        })
    }

    /// What a round command whose round is `target` waits behind: the round
    /// `before` it, if one was in progress.
    fn queued(&self, before: Option<Running>, target: u32) -> Option<Queued> {
        let r = before?;
        (target > r.epoch).then(|| Queued {
            running_epoch: r.epoch,
            running_phase: r.phase.as_str().into(),
            paused: r.paused,
            resumed: r.origin == RoundOrigin::Resumed,
            epoch: target,
            joined_queue: self.out_has_folded_trigger(),
        })
    }

    fn out_has_folded_trigger(&self) -> bool {
        self.out.iter().any(|a| {
            matches!(
                a,
                ControllerAction::Record(Record::TriggerFired {
                    outcome: keyfleet_core::protocol::TriggerOutcome::AlreadyQueued,
                    ..
                })
            )
        })
    }

    /// Refuses (or, with `force`, warns about) an enrollment that gives a
    /// second node the initial key or the address of an enrolled one.
    fn check_alike(
        &self,
        node_id: &NodeId,
        key: &InitialKey,
        addr: SocketAddr,
        force: bool,
    ) -> std::result::Result<(), String> {
        let (same_key, same_addr) = self.machine.enrolled_alike(key, addr);
        let mut problems = Vec::new();
        if let Some(other) = same_key.filter(|o| *o != node_id) {
            problems.push(format!(
                "node {other} is already enrolled with the same initial key (check {}): each \
                 appliance has a key of its own, so this label is mislabelled, copied or read twice",
                key.fingerprint()
            ));
        }
        if let Some(other) = same_addr.filter(|o| *o != node_id) {
            problems.push(format!(
                "node {other} is already enrolled at {addr}: two agents cannot listen on one \
                 address (leave --addr out and the controller learns each node's address when it joins)"
            ));
        }
        if problems.is_empty() {
            return Ok(());
        }
        if force {
            for p in &problems {
                tracing::warn!(node = %node_id, "enrolled with --force although {p}");
            }
            return Ok(());
        }
        Err(format!(
            "{node_id} was not enrolled: {}; check and enroll again, or give --force to enroll it anyway",
            problems.join("; and ")
        ))
    }

    /// Where this controller is on the network.
    pub fn info(&self) -> control::ServeInfo {
        let n = &self.opts.config.network;
        control::ServeInfo {
            group: n.group,
            iface: n.iface,
            listen_port: n.listen_port,
        }
    }

    /// Enrolls a node (no network needed). `addr` is `0.0.0.0:0` when not
    /// known yet: the controller learns it from the node's first
    /// authenticated message. A second node with the same initial key or
    /// address is refused unless `force`.
    pub async fn enroll(
        &mut self,
        node_id: NodeId,
        key: InitialKey,
        addr: SocketAddr,
        force: bool,
    ) -> Result<EnrollReport> {
        let cmd = Command::Enroll {
            node_id,
            key,
            addr,
            force,
        };
        let Executed::Enrolled(r) = self.execute(&cmd)? else {
            unreachable!("an enrollment answers Enrolled")
        };
        self.flush(None).await?;
        Ok(r)
    }

    /// The one path of every command into the machine (control socket and
    /// one-shot run alike): what only the shell checks (a second node with
    /// the same label or address), the machine's input, and its
    /// [`Outcome`] as the report. Nothing is written or sent yet: the pass's
    /// flush does that.
    pub fn execute(&mut self, cmd: &Command) -> Result<Executed> {
        let outcome = match cmd {
            Command::Enroll {
                node_id,
                key,
                addr,
                force,
            } => {
                self.check_alike(node_id, key, *addr, *force)
                    .map_err(ControllerError::Duplicate)?;
                self.feed(ControllerInput::Enroll {
                    node_id: node_id.clone(),
                    initial_key: key.clone(),
                    addr: *addr,
                })?
            }
            Command::Rejoin(id) => self.feed(ControllerInput::AllowRejoin {
                node_id: id.clone(),
            })?,
            Command::Rekey => self.feed(ControllerInput::Rekey)?,
            Command::Remove(id) => self.feed(ControllerInput::Remove {
                node_id: id.clone(),
            })?,
        };
        Ok(match (cmd, outcome) {
            (
                Command::Enroll { node_id, addr, .. },
                Outcome::Enrolled {
                    member,
                    fingerprint,
                },
            ) => Executed::Enrolled(EnrollReport {
                node_id: node_id.to_string(),
                member,
                address: (addr.port() != 0).then(|| addr.to_string()),
                fingerprint,
            }),
            (Command::Rejoin(id), Outcome::RejoinAllowed { until }) => {
                Executed::RejoinAllowed(RejoinReport {
                    node_id: id.to_string(),
                    until_ms: until.0,
                })
            }
            (_, Outcome::Round { answered_by }) => Executed::Round(answered_by.map(|e| e.0)),
            (cmd, other) => unreachable!("{cmd:?} answered {other:?}"),
        })
    }

    /// Bind the sockets (the controller's unicast socket on `iface:listen_port`);
    /// the beacon announces that socket's address.
    fn bind(&mut self) -> Result<Transport> {
        let mut t = Transport::bind(&self.opts.net(), self.clock.clone())?;
        t.coalesce_group(Some(Duration::from_millis(GROUP_READ_EVERY_MS)));
        self.machine.set_address(t.local_addr());
        Ok(t)
    }

    /// Whether a datagram is one of our own, looped back by the kernel.
    fn is_own(local: SocketAddr, from: SocketAddr) -> bool {
        from.port() == local.port() && (local.ip().is_unspecified() || local.ip() == from.ip())
    }

    /// One input from the network or a timer, with whatever else is already waiting.
    async fn step(&mut self, t: &mut Transport) -> Result<()> {
        let local = t.local_addr();
        tokio::select! {
            d = t.recv() => {
                let d = d?;
                if !Self::is_own(local, d.from) {
                    self.datagram(&d);
                }
                // Drain what is already queued, so that one pass carries many
                // inputs: read without waiting and without arming a timer
                // (`try_recv`; `recv` is cancel-safe).
                for _ in 0..256 {
                    match t.try_recv() {
                        Some(Ok(d)) => {
                            if !Self::is_own(local, d.from) {
                                self.datagram(&d);
                            }
                        }
                        Some(Err(e)) => return Err(e.into()),
                        None => break,
                    }
                }
            }
            fired = self.timers.expired(&self.clock) => {
                for id in fired {
                    if id == REFUSAL_TIMER {
                        self.close_refusal_windows();
                    } else if id == TABLE_RETRY_TIMER {
                        self.retry_table()?;
                    } else if id == LEASE_TIMER {
                        self.renew_lease()?;
                    } else if id == ENROL_TIMER {
                        self.enrolments_due = true;
                    } else if id == RECORDS_TIMER {
                        self.held_due = true;
                    } else if id == PREPARE_TIMER {
                        self.prepare_due = true;
                    } else if id == MACHINE_TIMER {
                        let _ = self.feed(ControllerInput::Timeout);
                    }
                }
            }
        }
        Ok(())
    }

    /// The acknowledgement records held through a round (see `flush`),
    /// written once it is over: after its report went out (the other tasks
    /// get their turn first), so that the round's last reply does not wait
    /// for them and `history` read after `rekey` returned has them.
    async fn write_held_after_round(&mut self, net: &Transport) -> Result<()> {
        if self.held.is_empty() || self.machine.round().is_some() {
            return Ok(());
        }
        tokio::task::yield_now().await;
        self.held_due = true;
        self.flush(Some(net)).await
    }

    /// Between rounds, the next round's key agreement
    /// ([`ControllerMachine::prepare_round`]), when [`PREPARE_TIMER`] fired:
    /// [`PREPARE_PER_PASS`] members (after the other tasks had their turn:
    /// the report of a round that just ended goes out first), the timer armed
    /// again at once while members remain, else [`PREPARE_CHECK_MS`] later
    /// (members confirm new chains in rounds and key responses), so that a
    /// pass never scans the members for nothing.
    async fn prepare_next_round(&mut self) {
        if !std::mem::take(&mut self.prepare_due) {
            if self.timers.deadline(&PREPARE_TIMER).is_none() {
                self.timers
                    .arm(PREPARE_TIMER, self.clock.now_ms() + PREPARE_CHECK_MS);
            }
            return;
        }
        tokio::task::yield_now().await;
        let more = self.machine.prepare_round(&mut OsRng, PREPARE_PER_PASS);
        if !more && self.machine.round().is_none() {
            // Idle: the table's housekeeping (SQLite's checkpoint) goes here,
            // not into a round's commits.
            match self.table.store_mut().idle_upkeep() {
                Ok(()) => self.upkeep_failing = false,
                Err(e) if !std::mem::replace(&mut self.upkeep_failing, true) => {
                    tracing::warn!(error = %e, "management table upkeep failed; tried again whenever idle (logged once until it works)");
                }
                Err(_) => {}
            }
        }
        let wait = if more { 0 } else { PREPARE_CHECK_MS };
        self.timers.arm(PREPARE_TIMER, self.clock.now_ms() + wait);
        // A share just drawn is announced in the machine's next pass.
        self.arm_machine_timer();
    }

    /// Acts on the outcome of a table write: `Ok(true)` when the table holds
    /// every record so far; `Ok(false)` while it cannot be written (the
    /// records are held by the table, a retry is armed, sends are held back);
    /// [`ControllerError::TableDown`] once that lasted `store.max_outage_ms`.
    fn table_written(&mut self, r: std::result::Result<(), StoreError>) -> Result<bool> {
        let now = self.clock.now_ms();
        match r {
            Ok(()) => {
                self.ops.store_error = None;
                if let Some(since) = self.table_down_since.take() {
                    tracing::info!(
                        down_ms = now.saturating_sub(since),
                        "management table writable again; the held-back records are written"
                    );
                    self.timers.cancel(&TABLE_RETRY_TIMER);
                }
                Ok(true)
            }
            Err(StoreError::Fenced { holder, term }) => Err(ControllerError::LeaseLost {
                detail: format!(
                    "the table refused this pass: {holder} no longer holds term {term}'s lease"
                ),
            }),
            Err(e) => {
                self.ops.store_error = Some(e.to_string());
                let since = *self.table_down_since.get_or_insert(now);
                let for_ms = now.saturating_sub(since);
                let pending = self.table.pending();
                if for_ms >= self.opts.config.store.max_outage_ms {
                    tracing::error!(error = %e, for_ms, pending, "management table unwritable too long; stopping");
                    return Err(ControllerError::TableDown {
                        for_ms,
                        pending,
                        last: Box::new(e),
                    });
                }
                tracing::error!(
                    error = %e,
                    pending,
                    for_ms,
                    "management table not written; sends held back, retrying every {TABLE_RETRY_MS} ms"
                );
                self.timers.arm(TABLE_RETRY_TIMER, now + TABLE_RETRY_MS);
                Ok(false)
            }
        }
    }

    /// Whether the management table holds every record so far.
    pub fn table_healthy(&self) -> bool {
        self.table_down_since.is_none()
    }

    /// Writes again the records of the passes whose batch failed.
    fn retry_table(&mut self) -> Result<()> {
        let r = self.table.write(&[], &self.machine, self.clock.now_ms());
        self.table_written(r).map(drop)
    }

    /// Writes the summaries of the refusal windows that have passed.
    fn close_refusal_windows(&mut self) {
        if let Err(e) = self.table.close_refusal_windows(self.clock.now_ms()) {
            tracing::error!(error = %e, "management table: refusal summaries were not written");
        }
        self.arm_refusal_timer();
    }

    /// Arms the machine's one timer for its next deadline, after every pass
    /// (any input may move it, earlier or later).
    fn arm_machine_timer(&mut self) {
        match self.machine.poll_timeout() {
            Some(at) => self.timers.arm(MACHINE_TIMER, at.0),
            None => {
                self.timers.cancel(&MACHINE_TIMER);
            }
        }
    }

    fn arm_refusal_timer(&mut self) {
        match self.table.next_refusal_close() {
            Some(at) => self.timers.arm(REFUSAL_TIMER, at),
            None => {
                self.timers.cancel(&REFUSAL_TIMER);
            }
        }
    }

    /// Refusals this controller has seen, written in full, summarized, and
    /// still counted in open windows.
    pub fn refusal_totals(&self) -> keyfleet_core::ratecount::Totals {
        self.table.refusals().totals()
    }

    /// `d.waited_us`: how long it waited in the socket (its receive
    /// timestamp), and `d.arrived_us` when it arrived there (the µs clock the
    /// sends are timed on, [`Self::flush`]).
    fn datagram(&mut self, d: &Datagram) {
        let (from, bytes) = (d.from, &d.bytes[..]);
        let _ = self.feed(match (d.waited_us, d.arrived_us) {
            (Some(waited_us), Some(arrived_us)) => ControllerInput::DatagramWaited {
                from,
                bytes,
                waited_us,
                arrived_us,
            },
            _ => ControllerInput::Datagram { from, bytes },
        });
    }

    /// Enrolled members that never joined.
    fn unjoined(&self) -> usize {
        self.machine
            .members()
            .filter(|(_, _, s)| *s == MemberStatus::Enrolled)
            .count()
    }

    /// Runs one round command without `keyfleet serve`: binds the sockets,
    /// resumes a round in progress (a controller that stopped left it; it is
    /// finished first and reported in `earlier`), waits (up to
    /// `rekey.join_wait_ms`) for enrolled nodes that never joined, runs the
    /// round to its end or until it pauses (too few nodes answered: the next
    /// `rekey` or `serve` carries it on), and returns: at once when every node
    /// acknowledged the second transition request, else after answering late
    /// key requests for `rekey.linger_ms`. `update` gets the progress and, when
    /// the command waits behind a round in progress, a [`control::Reply::Queued`].
    pub async fn run_round(
        &mut self,
        cmd: Command,
        mut update: impl FnMut(&control::Reply),
    ) -> Result<Option<RoundReport>> {
        if let Command::Remove(id) = &cmd {
            if self.machine.member_status(id).is_none() {
                return Err(CommandError::NotEnrolled(id.clone()).into());
            }
        }
        let mut net = self.bind()?;
        let t0 = self.clock.now_ms();
        self.feed(ControllerInput::Start)?;
        self.flush(Some(&net)).await?;
        // Joins: the core does not wait for members that never joined, so give
        // the agents (which retry their join at most every ~10 s) the chance.
        let join_until = t0 + self.opts.config.rekey.join_wait_ms;
        let total = self.machine.members().count() as u32;
        while self.unjoined() > 0 && self.clock.now_ms() < join_until {
            update(&control::Reply::Progress(Progress {
                epoch: self.machine.current_epoch().0,
                phase: "waiting_for_joins".into(),
                acked: total - self.unjoined() as u32,
                total,
                paused: false,
            }));
            let left = Duration::from_millis(join_until.saturating_sub(self.clock.now_ms()));
            match tokio::time::timeout(left, self.step(&mut net)).await {
                Ok(r) => r?,
                Err(_) => break,
            }
            self.flush(Some(&net)).await?;
        }
        if self.unjoined() > 0 {
            tracing::warn!(
                count = self.unjoined(),
                "enrolled nodes did not join in time; they are left out of this round and catch up when they join"
            );
        }
        // A round a stopped controller left unfinished is finished first; this
        // command's own round follows it, and both are reported.
        let before = self.running(RoundOrigin::Resumed);
        if let Some(r) = before {
            tracing::info!(
                epoch = r.epoch,
                "finishing first the round a previous controller left unfinished"
            );
        }
        let Executed::Round(Some(target)) = self.execute(&cmd)? else {
            self.flush(Some(&net)).await?;
            return Ok(None);
        };
        if let Some(q) = self.queued(before, target) {
            update(&control::Reply::Queued(q));
        }
        // Pauses of the resumed round before this command's feed are history.
        self.paused.clear();
        let started = self.clock.now_ms();
        self.flush(Some(&net)).await?;
        let mut last = None;
        let mut earlier = Vec::new();
        let report = loop {
            let mut own = None;
            for r in self.finished.drain(..) {
                if r.epoch >= target {
                    own = Some(r);
                } else {
                    earlier.push(r);
                }
            }
            if let Some(r) = own {
                break r;
            }
            if let Some(mut r) = self.paused.pop() {
                self.paused.clear();
                r.carried_on_by = Some(CarriedOnBy::NextCommand);
                r.earlier = earlier;
                r.waited_ms = started.saturating_sub(t0);
                return Ok(Some(r));
            }
            let p = self.progress();
            if p != last {
                if let Some(p) = &p {
                    update(&control::Reply::Progress(p.clone()));
                }
                last = p;
            }
            self.step(&mut net).await?;
            self.flush(Some(&net)).await?;
        };
        // Every node in the round acknowledged the second transition request
        // and every enrolled node took part: nobody will ask for the key late,
        // so return at once. Otherwise a missing node (stale, or never joined)
        // may come back asking; answer it for `rekey.linger_ms`.
        let missing = report.nodes.saturating_sub(report.acked) as usize + self.unjoined();
        let linger_ms = if missing == 0 {
            tracing::info!(
                epoch = report.epoch,
                "every node acknowledged the second transition request; not lingering"
            );
            0
        } else {
            let ms = self.opts.config.rekey.linger_ms;
            tracing::info!(
                epoch = report.epoch,
                missing,
                linger_ms = ms,
                "nodes missing from the round; answering late key requests before returning"
            );
            ms
        };
        let linger_until = self.clock.now_ms() + linger_ms;
        while self.clock.now_ms() < linger_until {
            let left = Duration::from_millis(linger_until.saturating_sub(self.clock.now_ms()));
            match tokio::time::timeout(left, self.step(&mut net)).await {
                Ok(r) => r?,
                Err(_) => break,
            }
            self.flush(Some(&net)).await?;
        }
        let mut report = report;
        report.waited_ms = started.saturating_sub(t0);
        report.earlier = earlier;
        Ok(Some(report))
    }

    /// `keyfleet serve`: the daemon. Triggers, joins, key requests, usage
    /// reports, data from unknown senders, and commands on the control socket,
    /// until `shutdown` resolves.
    pub async fn serve(&mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        self.serve_with(shutdown, ServeExtras::default()).await
    }

    /// [`Controller::serve`] with metrics and a readiness callback.
    pub async fn serve_with(
        &mut self,
        shutdown: impl std::future::Future<Output = ()>,
        extras: ServeExtras,
    ) -> Result<()> {
        let mut net = self.bind()?;
        let listener = control::listen(&self.opts.state.socket())?;
        let (req_tx, mut req_rx) = tokio::sync::mpsc::unbounded_channel::<control::Incoming>();
        let accept = tokio::spawn(control::accept_loop(listener, req_tx));
        let (_metrics_server, mut probes) = match extras.metrics {
            Some(addr) => {
                let (m, registry) = crate::metrics::ControllerMetrics::new();
                self.ops.metrics = Some(std::sync::Arc::new(m));
                let (ex, probes) = crate::metrics::Exporter::new(registry);
                let server = crate::metrics::MetricsServer::bind(addr, std::sync::Arc::new(ex))
                    .await
                    .map_err(|source| ControllerError::Io {
                        what: "serve metrics on",
                        path: PathBuf::from(addr.to_string()),
                        source,
                    })?;
                tracing::info!(metrics = %server.local_addr(), "metrics: /metrics and /healthz");
                (Some(server), Some(probes))
            }
            None => (None, None),
        };
        tracing::info!(
            group = %self.opts.config.network.group,
            listen = %net.local_addr(),
            socket = %self.opts.state.socket().display(),
            "keyfleet serve: running"
        );
        self.feed(ControllerInput::Start)?;
        self.flush(Some(&net)).await?;
        // A shared table: installers on other machines queue enrolments in
        // it, announced (LISTEN) and looked for now and then besides.
        let mut enrol_signal = None;
        if self.lease.send_until_ms.is_some() {
            self.timers.arm(ENROL_TIMER, self.clock.now_ms());
            enrol_signal = self
                .table
                .store_mut()
                .listen_enrolments()
                .inspect_err(|e| tracing::warn!(error = %e, "enrolment requests are not announced; looked for every {} ms", enrolment::POLL_MS))
                .ok()
                .flatten();
        }
        if let Some(ready) = extras.ready {
            ready(&Ready {
                listen: net.local_addr(),
                group: self.opts.config.network.group,
                control_socket: self.opts.state.socket(),
                metrics: _metrics_server.as_ref().map(|s| s.local_addr()),
            });
        }
        tokio::pin!(shutdown);
        let result = loop {
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                Some(inc) = req_rx.recv() => self.on_request(inc),
                Some(probe) = async { probes.as_mut()?.recv().await }, if probes.is_some() => {
                    let _ = probe.send(self.health());
                }
                r = self.step(&mut net) => if let Err(e) = r { break Err(e) },
                Some(()) = async { enrol_signal.as_ref()?.notified().await; Some(()) }, if enrol_signal.is_some() => {
                    self.enrolments_due = true;
                }
            }
            if let Err(e) = self.flush(Some(&net)).await {
                break Err(e);
            }
            if std::mem::take(&mut self.enrolments_due) {
                let next = match self.take_enrolments().await {
                    Ok(0) => enrolment::POLL_MS,
                    Ok(_) => enrolment::BUSY_POLL_MS,
                    Err(e) => break Err(e),
                };
                self.timers.arm(ENROL_TIMER, self.clock.now_ms() + next);
            }
            self.answer_waiters();
            if let Err(e) = self.write_held_after_round(&net).await {
                break Err(e);
            }
            self.prepare_next_round().await;
        };
        accept.abort();
        let _ = std::fs::remove_file(self.opts.state.socket());
        if result.is_ok() {
            // A clean stop ends the lease at once: a standby need not wait.
            let (holder, term) = (self.lease.holder.clone(), self.lease.term);
            if let Err(e) = self.table.store_mut().release_lease(&holder, term) {
                tracing::warn!(error = %e, "the leader lease was not released; it runs out by itself");
            }
        }
        tracing::info!("keyfleet serve: stopped");
        result
    }

    /// Refreshes the loop-side metrics and says whether the controller is
    /// healthy: its management table answers and its last write and send worked.
    fn health(&mut self) -> crate::metrics::Health {
        let now = self.clock.now_ms();
        let (mut enrolled, mut active, mut stale) = (0, 0, 0);
        for (_, _, s) in self.machine.members() {
            match s {
                MemberStatus::Enrolled => enrolled += 1,
                MemberStatus::Active => active += 1,
                MemberStatus::Stale => stale += 1,
            }
        }
        let activated = self.machine.core().activated_at.0;
        let round = self.machine.round();
        if let Some(m) = &self.ops.metrics {
            m.refresh(&crate::metrics::ControllerSample {
                epoch: self.machine.current_epoch().0,
                key_activated_ms: activated,
                now_ms: now,
                enrolled,
                active,
                stale,
                round_phase: round.map(|(_, p)| p),
            });
        }
        let store = match (self.table.store().current_epoch(), &self.ops.store_error) {
            (Err(e), _) => Some(format!("the management table cannot be read: {e}")),
            (Ok(_), Some(e)) => Some(format!(
                "the last write to the management table failed: {e}"
            )),
            (Ok(_), None) => None,
        };
        let network = self
            .ops
            .send_error
            .as_ref()
            .map(|e| format!("the last send to the fleet failed: {e}"));
        let ok = store.is_none() && network.is_none();
        crate::metrics::Health {
            ok,
            detail: serde_json::json!({
                "status": if ok { "ok" } else { "unavailable" },
                "store": store.as_deref().unwrap_or("ok"),
                "network": network.as_deref().unwrap_or("ok"),
                "epoch": self.machine.current_epoch().0,
                "term": self.machine.term(),
                "round": round.map(|(e, p)| serde_json::json!({"epoch": e.0, "phase": p.as_str()})),
                "nodes": {"enrolled": enrolled, "active": active, "stale": stale},
            }),
        }
    }

    fn on_request(&mut self, inc: control::Incoming) {
        let control::Incoming { request, tx } = inc;
        let reply = |tx: &tokio::sync::mpsc::UnboundedSender<control::Reply>, r| {
            let _ = tx.send(r);
        };
        let cmd = match request.command() {
            Ok(Some(cmd)) => cmd,
            Ok(None) => return reply(&tx, control::Reply::Info(self.info())),
            Err(message) => return reply(&tx, control::Reply::Error { message }),
        };
        let before = self.running(RoundOrigin::ThisController);
        match (self.execute(&cmd), cmd) {
            (Ok(Executed::Enrolled(r)), _) => reply(&tx, control::Reply::Enrolled(r)),
            (Ok(Executed::RejoinAllowed(r)), _) => reply(&tx, control::Reply::RejoinAllowed(r)),
            (Ok(Executed::Round(Some(target))), cmd) => {
                if let Some(q) = self.queued(before, target) {
                    let _ = tx.send(control::Reply::Queued(q));
                }
                let kind = match cmd {
                    Command::Remove(id) => WaitKind::Remove(id.to_string()),
                    _ => WaitKind::Rekey,
                };
                self.waiters.push(Waiter {
                    target,
                    earlier: Vec::new(),
                    since_ms: self.clock.now_ms(),
                    last: None,
                    tx,
                    kind,
                });
            }
            (Ok(Executed::Round(None)), Command::Remove(id)) => reply(
                &tx,
                control::Reply::Removed(RemoveReport {
                    node_id: id.to_string(),
                    round: None,
                }),
            ),
            (Ok(Executed::Round(None)), _) => reply(
                &tx,
                control::Reply::Error {
                    message: "no round was started".into(),
                },
            ),
            (Err(e), _) => reply(
                &tx,
                control::Reply::Error {
                    message: e.to_string(),
                },
            ),
        }
    }

    fn answer_waiters(&mut self) {
        let finished = std::mem::take(&mut self.finished);
        let mut paused = std::mem::take(&mut self.paused).pop();
        // A command that arrives while the round is paused (a removal, say,
        // that cannot move it on) is told at once rather than left waiting.
        if paused.is_none() && self.waiters.iter().any(|w| w.last.is_none()) {
            paused = self.paused_now();
        }
        let progress = self.progress();
        let now = self.clock.now_ms();
        self.waiters.retain_mut(|w| {
            w.earlier
                .extend(finished.iter().filter(|r| r.epoch < w.target).cloned());
            let done = finished
                .iter()
                .find(|r| r.epoch >= w.target)
                .cloned()
                .or_else(|| {
                    paused.clone().map(|mut p| {
                        p.carried_on_by = Some(CarriedOnBy::Serve);
                        p
                    })
                });
            if let Some(mut r) = done {
                r.waited_ms = now.saturating_sub(w.since_ms).saturating_sub(r.elapsed_ms);
                r.earlier = std::mem::take(&mut w.earlier);
                let reply = match &w.kind {
                    WaitKind::Rekey => control::Reply::Rekeyed(r),
                    WaitKind::Remove(id) => control::Reply::Removed(RemoveReport {
                        node_id: id.clone(),
                        round: Some(r),
                    }),
                };
                let _ = w.tx.send(reply);
                return false;
            }
            if progress != w.last {
                if let Some(p) = &progress {
                    if w.tx.send(control::Reply::Progress(p.clone())).is_err() {
                        return false; // the client went away; the round goes on
                    }
                }
                w.last = progress.clone();
            }
            !w.tx.is_closed()
        });
    }
}

impl Drop for Controller {
    /// Whatever stops the controller (the end of `serve` or of a command, an
    /// error), the refusals still counted in open windows get their summary
    /// rows: the counts add up to every datagram refused.
    fn drop(&mut self) {
        if self.machine.replay_marks_unsaved() || !self.held.is_empty() {
            let marks = self.moved_marks();
            let held = std::mem::take(&mut self.held);
            match self.table.write_pass(
                Vec::new(),
                &marks,
                &held,
                &self.machine,
                self.clock.now_ms(),
            ) {
                Ok(()) => self.marks_written(marks),
                Err(e) => {
                    tracing::error!(error = %e, "the nodes' latest sequence numbers were not saved; replays of their last messages may be accepted after a restart")
                }
            }
        }
        let t = self.table.refusals().totals();
        if let Err(e) = self.table.close_all_refusal_windows() {
            tracing::error!(error = %e, "management table: refusal summaries were not written");
        }
        if t.seen > 0 {
            tracing::info!(
                refused = t.seen,
                written_in_full = t.first,
                counted = t.summarized + t.pending,
                "datagrams refused while this controller ran"
            );
        }
    }
}

/// Whether a record may wait ([`RECORDS_HOLD_MS`]): a node's
/// acknowledgement and the state it shows, and the key's sending to a node
/// (history: the key itself is in the state written before it is sent).
fn may_wait(r: &Record) -> bool {
    matches!(
        r,
        Record::NodeAcked { .. } | Record::StatusChanged { .. } | Record::KeySent { .. }
    )
}

fn log_record(r: &Record) {
    match r {
        Record::KeyCreated {
            epoch,
            check,
            reason,
            ..
        } => tracing::info!(%epoch, %check, %reason, "new group key"),
        Record::PhaseChanged {
            epoch,
            phase,
            waiting,
            ..
        } => tracing::info!(%epoch, %phase, waiting, "round phase"),
        Record::RoundFinished {
            epoch,
            nodes,
            acked,
            stale,
            ..
        } => tracing::info!(%epoch, nodes, acked, stale, "round finished"),
        Record::NodeStale { node_id, epoch, .. } => {
            tracing::warn!(node = %node_id, %epoch, "node stale: left out of the round")
        }
        Record::RoundPaused {
            epoch,
            phase,
            confirmed,
            needed,
            joined,
            silent,
            ..
        } => tracing::warn!(
            %epoch,
            "round paused: {}",
            table::pause_text(*phase, *confirmed, *needed, *joined, silent)
        ),
        Record::RoundResumed { epoch, cause, .. } => {
            tracing::info!(%epoch, ?cause, "round resumed")
        }
        Record::NodeAddressChanged {
            node_id,
            from,
            to,
            message,
            ..
        } => tracing::info!(node = %node_id, %from, %to, message, "node address changed"),
        // Logged by the table, rate-counted with the audit rows.
        r if table::rate_counted(r).is_some() => {}
        Record::TriggerFired {
            reason, outcome, ..
        } => tracing::info!(%reason, ?outcome, "trigger"),
        Record::JoinAnswered { node_id, .. } => tracing::debug!(node = %node_id, "join answered"),
        _ => tracing::trace!(?r, "record"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_directory_lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let st = StateDir::new(dir.path().join("kf"));
        let held = st.lock().unwrap();
        assert!(matches!(st.lock(), Err(ControllerError::Busy { .. })));
        drop(held);
        st.lock().unwrap();
        let mode = std::fs::metadata(&st.dir).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
    }

    #[tokio::test]
    async fn init_refuses_to_overwrite_and_open_restores_what_enroll_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options::new(StateDir::new(dir.path().join("kf")), Config::default());
        let r = init(&opts).unwrap();
        assert_eq!(r.epoch, 1);
        assert!(matches!(
            init(&opts),
            Err(ControllerError::AlreadyInitialised { .. })
        ));
        {
            let mut c = Controller::open(opts.clone()).unwrap();
            // A second controller on the same directory is refused while this one runs.
            assert!(matches!(
                Controller::open(opts.clone()),
                Err(ControllerError::Busy { .. })
            ));
            let e = c
                .enroll(
                    NodeId::parse("n1").unwrap(),
                    InitialKey([7; 16]),
                    "127.0.0.1:9000".parse().unwrap(),
                    false,
                )
                .await
                .unwrap();
            assert_eq!(e.member, 1);
        }
        // The lock went with `c`; but a test of this binary that spawns a
        // process at that moment holds a copy of its descriptor from fork to
        // exec (CI saw `Busy` here once): a moment's wait, not a refusal.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let c = loop {
            match Controller::open(opts.clone()) {
                Err(ControllerError::Busy { .. }) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                r => break r.unwrap(),
            }
        };
        let ids: Vec<String> = c
            .machine()
            .members()
            .map(|(_, id, _)| id.to_string())
            .collect();
        assert_eq!(ids, ["n1"]);
        assert_eq!(c.store().nodes().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn refusals_still_counted_are_summarized_when_the_controller_stops() {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options::new(StateDir::new(dir.path().join("kf")), Config::default());
        init(&opts).unwrap();
        let from: SocketAddr = "192.0.2.66:4000".parse().unwrap();
        {
            let mut c = Controller::open(opts.clone()).unwrap();
            for i in 0..500u32 {
                c.datagram(&Datagram {
                    bytes: i.to_be_bytes().to_vec(),
                    from,
                    at_ms: 0,
                    via: crate::net::Via::Unicast,
                    waited_us: None,
                    arrived_us: None,
                });
            }
            c.flush(None).await.unwrap();
            let t = c.refusal_totals();
            assert_eq!((t.seen, t.first, t.pending), (500, 1, 499));
            // One row so far; the 60 s window is open, with its timer armed.
            let rows = c.store().audit_log(0, 1000).unwrap();
            assert_eq!(
                rows.iter()
                    .filter(|r| r.kind == crate::store::AuditKind::Refusal)
                    .count(),
                1
            );
            assert!(c.timers.deadline(&REFUSAL_TIMER).is_some());
        }
        let rows = opts
            .state
            .open_table(None)
            .unwrap()
            .audit_log(0, 1000)
            .unwrap();
        let sums: Vec<_> = rows
            .iter()
            .filter(|r| r.kind == crate::store::AuditKind::RefusalSummary)
            .collect();
        assert_eq!(sums.len(), 1, "{rows:#?}");
        assert_eq!(sums[0].detail["count"], 499);
        assert_eq!(sums[0].detail["source"], "192.0.2.66");
        assert_eq!(sums[0].detail["kind"], "malformed");
    }

    /// A state directory of an older version (its `controller.secrets` held
    /// the whole snapshot, the table no state rows, and the table one pass
    /// behind the snapshot after a crash between the two) is moved into the
    /// table on open: the same fleet, the table's records completed, the key
    /// file in place of the snapshot. An interrupted move is finished by the
    /// next open; a table that holds another fleet's state is never overwritten.
    #[tokio::test]
    async fn an_older_state_directory_moves_its_snapshot_into_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options::new(StateDir::new(dir.path().join("kf")), Config::default());
        init(&opts).unwrap();
        let db = opts.state.database();
        let old = dir.path().join("old.db");
        std::fs::copy(&db, &old).unwrap();
        let before = {
            let mut c = Controller::open(opts.clone()).unwrap();
            enroll_one(&mut c, "late", 9009).await.unwrap();
            c.machine().public_key()
        };
        let snap = read_state(&opts).unwrap();
        assert_eq!(snap.members.len(), 1);
        // The older layout: the snapshot in controller.secrets, a table
        // without state rows and without the enrollment's pass.
        let older = |opts: &Options| {
            for ext in ["-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
            }
            std::fs::copy(&old, &db).unwrap();
            let conn = rusqlite::Connection::open(&db).unwrap();
            conn.execute_batch(
                "DELETE FROM controller_state; DELETE FROM member_state; DELETE FROM replay_marks;",
            )
            .unwrap();
            secrets::save(&opts.state.secrets(), &snap, None, opts.seal).unwrap();
        };
        older(&opts);
        assert!(Store::open(&db).unwrap().nodes().unwrap().is_empty());
        let c = Controller::open(opts.clone()).unwrap();
        assert_eq!(c.machine().public_key(), before);
        let nodes = c.store().nodes().unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].node_id, "late");
        assert_eq!(
            nodes[0].key_check,
            InitialKey([9009u16 as u8; 16]).fingerprint()
        );
        assert_eq!(c.store().current_epoch().unwrap(), Some(1));
        drop(c);
        let file: state::StateFile = secrets::load(&opts.state.secrets(), None).unwrap().unwrap();
        assert!(
            matches!(file, state::StateFile::Key(_)),
            "the key file replaced the snapshot"
        );
        assert!(!opts.state.dir.join("controller.secrets.migrating").exists());
        assert_eq!(read_state(&opts).unwrap().members.len(), 1);

        // Interrupted after the rows, before the rename: the next open
        // finishes it with the key the rows were sealed with.
        older(&opts);
        let migrating = opts.state.dir.join("controller.secrets.migrating");
        {
            let at = opts.state.table_at(None).unwrap();
            let mut t = Table::new(Store::open_at(&at).unwrap()).unwrap();
            let key = state::StateKey::generate();
            save_key(&opts, &migrating, &key).unwrap();
            t.set_state_key(key);
            t.store_state(&snap, 0).unwrap();
        }
        let c = Controller::open(opts.clone()).unwrap();
        assert_eq!(c.machine().public_key(), before);
        drop(c);
        assert!(!migrating.exists());

        // The table holds another fleet's state: refused, nothing changed.
        older(&opts);
        let other = Options::new(StateDir::new(dir.path().join("other")), Config::default());
        init(&other).unwrap();
        let theirs = read_state(&other).unwrap();
        {
            let at = opts.state.table_at(None).unwrap();
            let mut t = Table::new(Store::open_at(&at).unwrap()).unwrap();
            let raw = secrets::load::<state::StateKey>(&other.state.secrets(), None)
                .unwrap()
                .unwrap();
            t.set_state_key(raw);
            t.store_state(&theirs, 0).unwrap();
        }
        let err = Controller::open(opts.clone()).map(drop).unwrap_err();
        assert!(
            matches!(err, ControllerError::TableHasFleet { .. }),
            "{err}"
        );
        let file: state::StateFile = secrets::load(&opts.state.secrets(), None).unwrap().unwrap();
        assert!(
            matches!(file, state::StateFile::Snapshot(_)),
            "the snapshot is kept"
        );
    }

    /// Enrolls `id` through the controller (a pass: snapshot, rows).
    async fn enroll_one(c: &mut Controller, id: &str, port: u16) -> Result<EnrollReport> {
        c.enroll(
            NodeId::parse(id).unwrap(),
            InitialKey([port as u8; 16]),
            format!("127.0.0.1:{port}").parse().unwrap(),
            false,
        )
        .await
    }

    /// Issue 16: with a shared table the controller takes the leader lease
    /// and its term; a second controller is refused while the lease runs,
    /// takes it under the next term once it ran out, and the first one then
    /// learns at its renewal that it lost it. A leader that cannot renew
    /// stops sending `store.lease_margin_ms` before its lease runs out.
    #[tokio::test]
    async fn a_shared_table_has_one_leader_whose_term_rises_at_each_takeover() {
        let Some(pg) = crate::store::testpg::shared() else {
            return;
        };
        let url = pg.create_db();
        let dir = tempfile::tempdir().unwrap();
        let opts_for = |name: &str, lease_ms: u64, margin: u64| {
            let mut config = Config::default();
            config.store.url = Some(url.clone());
            config.store.lease_ms = lease_ms;
            config.store.lease_margin_ms = margin;
            Options::new(StateDir::new(dir.path().join(name)), config)
        };
        let a_opts = opts_for("a", 600, 200);
        init(&a_opts).unwrap();
        // b is the standby of a's fleet: a copy of a's key file, the same
        // table; its own `init` is refused (the table has a fleet).
        let b_opts = opts_for("b", 600, 200);
        let err = init(&b_opts).unwrap_err();
        assert!(
            matches!(err, ControllerError::TableHasFleet { .. }),
            "{err}"
        );
        std::fs::copy(a_opts.state.secrets(), b_opts.state.secrets()).unwrap();

        let t0 = std::time::Instant::now();
        let a = Controller::open(a_opts.clone()).unwrap();
        assert_eq!(a.term(), 1);
        assert!(a.may_send());
        assert!(a.timers.deadline(&LEASE_TIMER).is_some(), "renewal armed");
        let Err(err) = Controller::open(b_opts.clone()) else {
            panic!("a second controller while the lease runs")
        };
        assert!(
            matches!(&err, ControllerError::LeaseTaken { term: 1, .. }),
            "{err}"
        );
        println!("second controller refused: {err}");
        // The same controller started again takes its own lease back (same term).
        drop(a);
        let mut a = Controller::open(a_opts.clone()).unwrap();
        assert_eq!(a.term(), 1);

        // a does not renew: it stops sending 200 ms before the 600 ms lease
        // runs out, by its own clock, while the table still gives it time.
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert!(!a.may_send(), "silent before the lease runs out");
        let left = a.store().lease().unwrap().and_then(|l| l.expires_in_ms);
        println!(
            "a silent {} ms after taking the lease; the table gives it {left:?} ms more",
            t0.elapsed().as_millis()
        );
        // Once it ran out, b takes it under term 2, and a's renewal fails.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let b = Controller::open(b_opts.clone()).unwrap();
        assert_eq!(b.term(), 2);
        assert!(b.may_send());
        // b continues a's fleet from the table: same identity, same key.
        assert_eq!(b.machine().public_key(), a.machine().public_key());
        assert_eq!(b.machine().current_epoch(), a.machine().current_epoch());
        // a wakes up (as from SIGSTOP) with work to do: it writes no row to
        // the shared table and sends nothing; it stops with LeaseLost.
        let lost = enroll_one(&mut a, "late", 9100).await.unwrap_err();
        assert!(matches!(lost, ControllerError::LeaseLost { .. }), "{lost}");
        println!("a woken up: {lost}");
        assert!(!a.may_send());
        assert_eq!(b.store().node("late").unwrap(), None, "no row from a");
        let lost = a.renew_lease().unwrap_err();
        assert!(matches!(lost, ControllerError::LeaseLost { .. }), "{lost}");

        // On SQLite the controller is always the sole leader, term 1.
        let s_opts = Options::new(StateDir::new(dir.path().join("s")), Config::default());
        init(&s_opts).unwrap();
        let s = Controller::open(s_opts).unwrap();
        assert_eq!((s.term(), s.may_send()), (1, true));
        assert!(s.timers.deadline(&LEASE_TIMER).is_none());
    }

    #[tokio::test]
    async fn a_table_that_cannot_be_written_holds_the_pass_back_and_gets_its_rows_later() {
        // A real PostgreSQL server of this test's own, stopped and started again.
        let mut pg = match crate::store::testpg::PgServer::start() {
            Ok(pg) => pg,
            Err(why) if std::env::var_os(crate::store::testpg::REQUIRE_ENV).is_some() => {
                panic!("no PostgreSQL server: {why}")
            }
            Err(why) => return eprintln!("skipping: no PostgreSQL server: {why}"),
        };
        let url = pg.create_db();
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.store.url = Some(url.clone());
        let opts = Options::new(StateDir::new(dir.path().join("kf")), config);
        init(&opts).unwrap();
        let mut c = Controller::open(opts.clone()).unwrap();
        enroll_one(&mut c, "n1", 9001).await.unwrap();
        assert!(c.table_healthy());

        pg.stop();
        // The enrollment is the controller's (its state file), but its rows
        // are not written: the pass is held back and the controller says so.
        enroll_one(&mut c, "n2", 9002).await.unwrap();
        assert!(!c.table_healthy());
        let held = c.table.pending();
        assert!(held >= 1, "the enrollment's record is held");
        assert!(c.timers.deadline(&TABLE_RETRY_TIMER).is_some());
        // A retry while the server is still down fails again and holds on.
        c.retry_table().unwrap();
        assert!(!c.table_healthy());
        println!("server stopped: {held} records held back");

        pg.launch().unwrap();
        c.retry_table().unwrap();
        assert!(c.table_healthy());
        assert_eq!(c.table.pending(), 0);
        assert!(c.timers.deadline(&TABLE_RETRY_TIMER).is_none());
        let ids: Vec<_> = c
            .store()
            .nodes()
            .unwrap()
            .into_iter()
            .map(|n| (n.node_id, n.member_no))
            .collect();
        assert_eq!(ids, [("n1".to_string(), 1), ("n2".to_string(), 2)]);
        let enrolments = c
            .store()
            .audit_log(0, 100)
            .unwrap()
            .into_iter()
            .filter(|r| r.kind == crate::store::AuditKind::Enrollment)
            .count();
        assert_eq!(enrolments, 2, "each enrollment written once");
        assert_eq!(c.store().integrity_check().unwrap(), Ok(()));
        drop(c);

        // Down longer than store.max_outage_ms: the controller stops with an
        // error that says so (serve exits non-zero).
        let mut strict = opts.clone();
        strict.config.store.max_outage_ms = 0;
        let mut c = Controller::open(strict).unwrap();
        pg.stop();
        let err = enroll_one(&mut c, "n3", 9003).await.unwrap_err();
        assert!(matches!(err, ControllerError::TableDown { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("could not be written") && msg.contains("serve"),
            "{msg}"
        );
        println!("{msg}");
    }
}
