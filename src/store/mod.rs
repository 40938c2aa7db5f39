//! The management table (SPEC §4): an embedded SQLite database.
//!
//! It records every node (id, member number, address, the check value of its
//! initial key — never the key —, state, epoch, last seen, stale or not), the
//! history of every group key (created when, by which trigger, sent to which
//! nodes and when, acknowledged when, retired when), every rekey round with its
//! per-phase durations, and an audit log of every trigger and every refusal.
//!
//! Crash safety: WAL journal with `synchronous=FULL`, so a transaction that
//! returned is on disk even after a power loss (in WAL mode `NORMAL` would only
//! survive a process crash: the last commits may roll back on power loss, and a
//! key that was sent must not be forgotten). Commits are few — one per enrollment,
//! per batch of sends or acknowledgements, per phase — so the fsync per commit
//! costs little. Every change of several rows is one transaction. Foreign keys
//! are enforced. The schema is versioned in `user_version` and migrated on open
//! (see [`schema`]).
//!
//! Times are milliseconds since the Unix epoch, given by the caller (the store
//! never reads the clock). The API is plain-typed so that the protocol core and
//! the store do not depend on each other.

mod schema;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

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
        path: PathBuf,
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
    NodeState {
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
    /// A rekey round's phase (SPEC §2).
    Phase {
        /// Key update requests out, waiting for every key update reply.
        Distribute,
        /// First transition request out, waiting for every confirmation.
        FirstTransition,
        /// Second transition request out (drain grace included).
        SecondTransition,
        Finished,
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
        /// count, first and last time; see [`crate::ratecount::Summary`]).
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
    pub state: NodeState,
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

/// Durations of a round's phases, in milliseconds; `None` while not reached or not over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PhaseDurations {
    pub distribute: Option<u64>,
    pub first_transition: Option<u64>,
    pub second_transition: Option<u64>,
}

/// One rekey round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoundRecord {
    pub id: i64,
    pub epoch: u64,
    pub started_at_ms: u64,
    pub phase: Phase,
    pub phase_started_at_ms: u64,
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

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    pub id: i64,
    pub at_ms: u64,
    pub kind: AuditKind,
    pub node_id: Option<String>,
    pub detail: serde_json::Value,
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

fn opt_u64(column: &'static str, v: Option<i64>) -> Result<Option<u64>> {
    v.map(|v| to_u64(column, v)).transpose()
}

fn audit_in(
    tx: &Connection,
    kind: AuditKind,
    node: Option<&str>,
    detail: &serde_json::Value,
    now_ms: u64,
) -> Result<()> {
    tx.execute(
        "INSERT INTO audit (at_ms, kind, node_id, detail) VALUES (?1, ?2, ?3, ?4)",
        params![to_i64(now_ms)?, kind.as_str(), node, detail.to_string()],
    )?;
    Ok(())
}

/// The management table.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

const NODE_COLUMNS: &str = "node_id, member_no, address, key_check, state, epoch, last_seen_ms, \
                            stale, enrolled_at_ms, removed_at_ms";

impl Store {
    /// Opens (creating if needed) the management table at `path`, brings its
    /// schema to [`SCHEMA_VERSION`], and sets WAL, `synchronous=FULL`, foreign keys.
    pub fn open(path: &Path) -> Result<Store> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        // Owner-only from the start: SQLite gives the -wal and -shm files the
        // database file's mode.
        if let Err(e) = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(StoreError::Create {
                    path: path.to_path_buf(),
                    source: e,
                });
            }
        }
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(open_err)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(open_err(rusqlite::Error::InvalidParameterName(format!(
                "journal_mode is {mode}, WAL was asked for"
            ))));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        let found: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open_err)?;
        if found > SCHEMA_VERSION as i64 {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        // The bundled SQLite enforces foreign keys by default
        // (SQLITE_DEFAULT_FOREIGN_KEYS=1): switch them off for the migrations,
        // as SQLite's table rebuild asks (a `DROP TABLE` of a table that other
        // rows name would fail). The pragma is a no-op inside a transaction,
        // so it is set here, before the migrations open theirs.
        conn.pragma_update(None, "foreign_keys", false)
            .map_err(open_err)?;
        schema::migrations()
            .to_latest(&mut conn)
            .map_err(|source| StoreError::Migrate {
                path: path.to_path_buf(),
                source,
            })?;
        // Foreign keys are enforced from here on; during the migrations they
        // are off, as SQLite's table rebuild asks (each step that rebuilds a
        // table checks them itself: `foreign_key_check`).
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(open_err)?;
        Ok(Store {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Where the database is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// SQLite's own consistency check; `Ok(())` when it answers `ok`.
    pub fn integrity_check(&self) -> Result<std::result::Result<(), String>> {
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        let rows: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<std::result::Result<_, _>>()?;
        let fk: Vec<String> = self
            .conn
            .prepare("PRAGMA foreign_key_check")?
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<std::result::Result<_, _>>()?;
        if rows == ["ok"] && fk.is_empty() {
            Ok(Ok(()))
        } else {
            Ok(Err(format!(
                "integrity: {}; foreign keys violated in: {}",
                rows.join("; "),
                fk.join(", ")
            )))
        }
    }

    /// Runs `f` as one transaction: every change it makes through this store
    /// commits together, with one fsync, or not at all when it returns an error.
    /// (Each method opens a savepoint, so it nests inside the batch; one that
    /// fails inside the batch undoes only its own rows.)
    pub fn batch<R>(&mut self, f: impl FnOnce(&mut Store) -> Result<R>) -> Result<R> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f(self) {
            Ok(r) => {
                self.conn.execute_batch("COMMIT")?;
                Ok(r)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
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
        let member = to_i64(member_no)?;
        if member == 0 {
            return Err(StoreError::Range(0));
        }
        let tx = self.conn.savepoint()?;
        let existing: Option<Option<i64>> = tx
            .query_row(
                "SELECT removed_at_ms FROM nodes WHERE node_id = ?1",
                [node_id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(None) = existing {
            return Err(StoreError::AlreadyEnrolled(node_id.to_owned()));
        }
        let holder: Option<String> = tx
            .query_row(
                "SELECT node_id FROM nodes WHERE member_no = ?1 AND removed_at_ms IS NULL",
                [member],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(holder) = holder {
            return Err(StoreError::MemberTaken { member_no, holder });
        }
        let now = to_i64(now_ms)?;
        if existing.is_some() {
            tx.execute(
                "UPDATE nodes SET member_no = ?2, address = ?3, key_check = ?4, state = 'Enrolled',
                 epoch = NULL, last_seen_ms = NULL, stale = 0, enrolled_at_ms = ?5, removed_at_ms = NULL
                 WHERE node_id = ?1",
                params![node_id, member, address, key_check, now],
            )?;
        } else {
            tx.execute(
                "INSERT INTO nodes (node_id, member_no, address, key_check, state, enrolled_at_ms)
                 VALUES (?1, ?2, ?3, ?4, 'Enrolled', ?5)",
                params![node_id, member, address, key_check, now],
            )?;
        }
        audit_in(
            &tx,
            AuditKind::Enrollment,
            Some(node_id),
            &serde_json::json!({ "member": member_no, "address": address, "key_check": key_check }),
            now_ms,
        )?;
        tx.commit()?;
        self.node(node_id)?
            .ok_or_else(|| StoreError::UnknownNode(node_id.to_owned()))
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
        let tx = self.conn.savepoint()?;
        let mut changed = Vec::new();
        for (id, member_no) in want {
            let old: Option<i64> = tx
                .query_row(
                    "SELECT member_no FROM nodes WHERE node_id = ?1 AND removed_at_ms IS NULL",
                    [id],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(old) = old else {
                return Err(StoreError::UnknownNode((*id).to_owned()));
            };
            let old = to_u64("nodes.member_no", old)?;
            if old != *member_no {
                changed.push(((*id).to_owned(), old, *member_no));
            }
        }
        // Out of the way first (member numbers are u32 on the wire, so
        // 2^32 + n never clashes with a real one; the savepoint commits only
        // the final numbers), then to their place.
        for (id, _, _) in &changed {
            tx.execute(
                "UPDATE nodes SET member_no = member_no + 4294967296 WHERE node_id = ?1",
                [id],
            )?;
        }
        for (id, old, new) in &changed {
            let holder: Option<String> = tx
                .query_row(
                    "SELECT node_id FROM nodes WHERE member_no = ?1 AND removed_at_ms IS NULL",
                    [to_i64(*new)?],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(holder) = holder {
                return Err(StoreError::MemberTaken {
                    member_no: *new,
                    holder,
                });
            }
            tx.execute(
                "UPDATE nodes SET member_no = ?2 WHERE node_id = ?1",
                params![id, to_i64(*new)?],
            )?;
            audit_in(
                &tx,
                AuditKind::Renumbered,
                Some(id),
                &serde_json::json!({ "from": old, "to": new,
                    "reason": "the table now records the controller's member number" }),
                now_ms,
            )?;
        }
        tx.commit()?;
        Ok(changed)
    }

    /// Marks a node removed (it keeps its row and history); audits it.
    pub fn remove_node(&mut self, node_id: &str, reason: &str, now_ms: u64) -> Result<()> {
        let tx = self.conn.savepoint()?;
        let n = tx.execute(
            "UPDATE nodes SET removed_at_ms = ?2 WHERE node_id = ?1 AND removed_at_ms IS NULL",
            params![node_id, to_i64(now_ms)?],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownNode(node_id.to_owned()));
        }
        audit_in(
            &tx,
            AuditKind::Removal,
            Some(node_id),
            &serde_json::json!({ "reason": reason }),
            now_ms,
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Updates the address of an enrolled node.
    pub fn set_address(&mut self, node_id: &str, address: &str) -> Result<()> {
        check_address(address)?;
        let n = self.conn.execute(
            "UPDATE nodes SET address = ?2 WHERE node_id = ?1 AND removed_at_ms IS NULL",
            params![node_id, address],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownNode(node_id.to_owned()));
        }
        Ok(())
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
        let tx = self.conn.savepoint()?;
        let old: Option<Option<String>> = tx
            .query_row(
                "SELECT address FROM nodes WHERE node_id = ?1 AND removed_at_ms IS NULL",
                [node_id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(old) = old else {
            return Err(StoreError::UnknownNode(node_id.to_owned()));
        };
        tx.execute(
            "UPDATE nodes SET address = ?2 WHERE node_id = ?1",
            params![node_id, new],
        )?;
        tx.execute(
            "INSERT INTO address_changes (node_id, old_address, new_address, at_ms, message, seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![node_id, old, new, to_i64(now_ms)?, message, to_i64(seq)?],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Every address change of `node_id`, oldest first.
    pub fn address_history(&self, node_id: &str) -> Result<Vec<AddressChange>> {
        self.query_address_changes("WHERE node_id = ?1", node_id)
    }

    /// Every address change of every node, oldest first.
    pub fn address_changes(&self) -> Result<Vec<AddressChange>> {
        self.query_address_changes("WHERE ?1 = ?1", "")
    }

    fn query_address_changes(&self, filter: &str, arg: &str) -> Result<Vec<AddressChange>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT node_id, old_address, new_address, at_ms, message, seq
             FROM address_changes {filter} ORDER BY id"
        ))?;
        type Raw = (String, Option<String>, String, i64, String, i64);
        let raws: Vec<Raw> = stmt
            .query_map([arg], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?
            .collect::<std::result::Result<_, _>>()?;
        raws.into_iter()
            .map(|(node_id, old_address, new_address, at, message, seq)| {
                Ok(AddressChange {
                    node_id,
                    old_address,
                    new_address,
                    at_ms: to_u64("address_changes.at_ms", at)?,
                    message,
                    seq: to_u64("address_changes.seq", seq)?,
                })
            })
            .collect()
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
        let tx = self.conn.savepoint()?;
        for &epoch in epochs {
            Self::check_epoch(&tx, epoch)?;
            tx.execute(
                "INSERT INTO key_handouts (epoch, node_id, via, at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![to_i64(epoch)?, node_id, via.as_str(), to_i64(now_ms)?],
            )
            .map_err(|err| match err {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    StoreError::UnknownNode(node_id.to_owned())
                }
                other => other.into(),
            })?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Records the state and epoch the given nodes reported, and that they were
    /// seen at `now_ms` (one transaction).
    pub fn set_node_state<S: AsRef<str>>(
        &mut self,
        node_ids: &[S],
        state: NodeState,
        epoch: Option<u64>,
        now_ms: u64,
    ) -> Result<()> {
        let tx = self.conn.savepoint()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE nodes SET state = ?2, epoch = ?3, last_seen_ms = ?4
                 WHERE node_id = ?1 AND removed_at_ms IS NULL",
            )?;
            let (epoch, now) = (opt_i64(epoch)?, to_i64(now_ms)?);
            for id in node_ids {
                if stmt.execute(params![id.as_ref(), state.as_str(), epoch, now])? == 0 {
                    return Err(StoreError::UnknownNode(id.as_ref().to_owned()));
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Records that the given nodes were heard from at `now_ms`.
    pub fn node_seen<S: AsRef<str>>(&mut self, node_ids: &[S], now_ms: u64) -> Result<()> {
        let tx = self.conn.savepoint()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE nodes SET last_seen_ms = MAX(COALESCE(last_seen_ms, 0), ?2) WHERE node_id = ?1",
            )?;
            let now = to_i64(now_ms)?;
            for id in node_ids {
                if stmt.execute(params![id.as_ref(), now])? == 0 {
                    return Err(StoreError::UnknownNode(id.as_ref().to_owned()));
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Marks a node stale (left out of the round of `epoch`), with a `Stale` audit entry.
    pub fn mark_stale(
        &mut self,
        node_id: &str,
        epoch: Option<u64>,
        reason: &str,
        now_ms: u64,
    ) -> Result<()> {
        self.set_stale(node_id, true, epoch, reason, now_ms)
    }

    /// Clears a node's stale flag (it came back), with a `Rejoin` audit entry.
    pub fn clear_stale(
        &mut self,
        node_id: &str,
        epoch: Option<u64>,
        reason: &str,
        now_ms: u64,
    ) -> Result<()> {
        self.set_stale(node_id, false, epoch, reason, now_ms)
    }

    fn set_stale(
        &mut self,
        node_id: &str,
        stale: bool,
        epoch: Option<u64>,
        reason: &str,
        now_ms: u64,
    ) -> Result<()> {
        let tx = self.conn.savepoint()?;
        let n = tx.execute(
            "UPDATE nodes SET stale = ?2 WHERE node_id = ?1 AND removed_at_ms IS NULL",
            params![node_id, stale],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownNode(node_id.to_owned()));
        }
        audit_in(
            &tx,
            if stale {
                AuditKind::Stale
            } else {
                AuditKind::Rejoin
            },
            Some(node_id),
            &serde_json::json!({ "epoch": epoch, "reason": reason }),
            now_ms,
        )?;
        tx.commit()?;
        Ok(())
    }

    fn node_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawNode> {
        Ok(RawNode {
            node_id: r.get(0)?,
            member_no: r.get(1)?,
            address: r.get(2)?,
            key_check: r.get(3)?,
            state: r.get(4)?,
            epoch: r.get(5)?,
            last_seen_ms: r.get(6)?,
            stale: r.get(7)?,
            enrolled_at_ms: r.get(8)?,
            removed_at_ms: r.get(9)?,
        })
    }

    /// One node, removed or not.
    pub fn node(&self, node_id: &str) -> Result<Option<NodeRecord>> {
        self.conn
            .query_row(
                &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE node_id = ?1"),
                [node_id],
                Self::node_from_row,
            )
            .optional()?
            .map(RawNode::cook)
            .transpose()
    }

    /// The enrolled (not removed) nodes, in member-number order.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>> {
        self.query_nodes("WHERE removed_at_ms IS NULL")
    }

    /// Every node ever enrolled, removed ones included.
    pub fn all_nodes(&self) -> Result<Vec<NodeRecord>> {
        self.query_nodes("")
    }

    fn query_nodes(&self, filter: &str) -> Result<Vec<NodeRecord>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {NODE_COLUMNS} FROM nodes {filter} ORDER BY member_no"
        ))?;
        let raws: Vec<RawNode> = stmt
            .query_map([], Self::node_from_row)?
            .collect::<std::result::Result<_, _>>()?;
        raws.into_iter().map(RawNode::cook).collect()
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
        let tx = self.conn.savepoint()?;
        let e = to_i64(epoch)?;
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM keys WHERE epoch = ?1)",
            [e],
            |r| r.get(0),
        )?;
        if exists {
            return Err(StoreError::EpochExists(epoch));
        }
        // The initial key is current from the start; a round's key once its round completes.
        tx.execute(
            "INSERT INTO keys (epoch, created_at_ms, check_value, trigger, trigger_detail,
                               activated_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, CASE WHEN ?4 = 'Initial' THEN ?2 END)",
            params![
                e,
                to_i64(now_ms)?,
                check_value,
                trigger.as_str(),
                trigger_detail.to_string()
            ],
        )?;
        {
            let mut stmt =
                tx.prepare_cached("INSERT INTO key_deliveries (epoch, node_id) VALUES (?1, ?2)")?;
            for id in recipients {
                let id = id.as_ref();
                stmt.execute(params![e, id]).map_err(|err| match err {
                    rusqlite::Error::SqliteFailure(f, _)
                        if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        StoreError::UnknownNode(id.to_owned())
                    }
                    other => other.into(),
                })?;
            }
        }
        audit_in(
            &tx,
            AuditKind::Trigger,
            None,
            &serde_json::json!({
                "trigger": trigger.as_str(),
                "epoch": epoch,
                "detail": trigger_detail,
                "recipients": recipients.len(),
            }),
            now_ms,
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records that the key of `epoch` was sent (again) to the given nodes.
    /// A node not yet listed for that epoch is added (e.g. a rejoining node).
    pub fn record_sent<S: AsRef<str>>(
        &mut self,
        epoch: u64,
        node_ids: &[S],
        now_ms: u64,
    ) -> Result<()> {
        let tx = self.conn.savepoint()?;
        {
            let (e, now) = (to_i64(epoch)?, to_i64(now_ms)?);
            Self::check_epoch(&tx, epoch)?;
            let mut stmt = tx.prepare_cached(
                "INSERT INTO key_deliveries (epoch, node_id, first_sent_at_ms, last_sent_at_ms, attempts)
                 VALUES (?1, ?2, ?3, ?3, 1)
                 ON CONFLICT (epoch, node_id) DO UPDATE SET
                   first_sent_at_ms = COALESCE(first_sent_at_ms, excluded.first_sent_at_ms),
                   last_sent_at_ms = excluded.last_sent_at_ms,
                   attempts = attempts + 1",
            )?;
            for id in node_ids {
                Self::delivery_exec(&mut stmt, e, id.as_ref(), now)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Records the key update replies of the given nodes for `epoch` (the first
    /// acknowledgement time is kept) and that they were seen.
    pub fn record_ack<S: AsRef<str>>(
        &mut self,
        epoch: u64,
        node_ids: &[S],
        now_ms: u64,
    ) -> Result<()> {
        let tx = self.conn.savepoint()?;
        {
            let (e, now) = (to_i64(epoch)?, to_i64(now_ms)?);
            Self::check_epoch(&tx, epoch)?;
            let mut stmt = tx.prepare_cached(
                "INSERT INTO key_deliveries (epoch, node_id, acked_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (epoch, node_id) DO UPDATE SET
                   acked_at_ms = COALESCE(acked_at_ms, excluded.acked_at_ms)",
            )?;
            let mut seen = tx.prepare_cached(
                "UPDATE nodes SET last_seen_ms = MAX(COALESCE(last_seen_ms, 0), ?2) WHERE node_id = ?1",
            )?;
            for id in node_ids {
                Self::delivery_exec(&mut stmt, e, id.as_ref(), now)?;
                seen.execute(params![id.as_ref(), now])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn check_epoch(tx: &Connection, epoch: u64) -> Result<()> {
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM keys WHERE epoch = ?1)",
            [to_i64(epoch)?],
            |r| r.get(0),
        )?;
        if exists {
            Ok(())
        } else {
            Err(StoreError::UnknownEpoch(epoch))
        }
    }

    fn delivery_exec(
        stmt: &mut rusqlite::CachedStatement<'_>,
        epoch: i64,
        node_id: &str,
        now: i64,
    ) -> Result<()> {
        stmt.execute(params![epoch, node_id, now])
            .map_err(|err| match err {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    StoreError::UnknownNode(node_id.to_owned())
                }
                other => other.into(),
            })?;
        Ok(())
    }

    /// Records that the key of `epoch` was dropped by the fleet (after the second
    /// transition of the round that replaced it).
    pub fn retire_key(&mut self, epoch: u64, now_ms: u64) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE keys SET retired_at_ms = COALESCE(retired_at_ms, ?2) WHERE epoch = ?1",
            params![to_i64(epoch)?, to_i64(now_ms)?],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownEpoch(epoch));
        }
        Ok(())
    }

    /// The key of `epoch` became the current group key (its round completed).
    pub fn activate_key(&mut self, epoch: u64, now_ms: u64) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE keys SET activated_at_ms = COALESCE(activated_at_ms, ?2) WHERE epoch = ?1",
            params![to_i64(epoch)?, to_i64(now_ms)?],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownEpoch(epoch));
        }
        Ok(())
    }

    /// The current group key's epoch: the newest key that became current. A
    /// round in progress (or one that never completed) does not count.
    pub fn current_epoch(&self) -> Result<Option<u64>> {
        let e: Option<i64> = self.conn.query_row(
            "SELECT MAX(epoch) FROM keys WHERE activated_at_ms IS NOT NULL",
            [],
            |r| r.get(0),
        )?;
        opt_u64("keys.epoch", e)
    }

    /// The newest epoch in the key history, current or not.
    pub fn newest_epoch(&self) -> Result<Option<u64>> {
        let e: Option<i64> = self
            .conn
            .query_row("SELECT MAX(epoch) FROM keys", [], |r| r.get(0))?;
        opt_u64("keys.epoch", e)
    }

    /// Every group key, oldest first, with its deliveries.
    pub fn history(&self) -> Result<Vec<KeyRecord>> {
        let mut keys = self.conn.prepare(
            "SELECT epoch, created_at_ms, check_value, trigger, trigger_detail, retired_at_ms,
                    activated_at_ms
             FROM keys ORDER BY epoch",
        )?;
        type RawKey = (i64, i64, String, String, String, Option<i64>, Option<i64>);
        let raws: Vec<RawKey> = keys
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })?
            .collect::<std::result::Result<_, _>>()?;
        let mut hand = self
            .conn
            .prepare("SELECT node_id, via, at_ms FROM key_handouts WHERE epoch = ?1 ORDER BY id")?;
        let mut del = self.conn.prepare(
            "SELECT d.node_id, d.first_sent_at_ms, d.last_sent_at_ms, d.attempts, d.acked_at_ms
             FROM key_deliveries d JOIN nodes n ON n.node_id = d.node_id
             WHERE d.epoch = ?1 ORDER BY n.member_no",
        )?;
        let mut out = Vec::with_capacity(raws.len());
        for (epoch, created, check_value, trigger, detail, retired, activated) in raws {
            let hands: Vec<(String, String, i64)> = hand
                .query_map([epoch], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<std::result::Result<_, _>>()?;
            let handouts = hands
                .into_iter()
                .map(|(node_id, via, at)| {
                    Ok(HandoutRecord {
                        node_id,
                        via: Handout::parse("key_handouts.via", &via)?,
                        at_ms: to_u64("key_handouts.at_ms", at)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            type RawDel = (String, Option<i64>, Option<i64>, i64, Option<i64>);
            let dels: Vec<RawDel> = del
                .query_map([epoch], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<std::result::Result<_, _>>()?;
            let deliveries = dels
                .into_iter()
                .map(|(node_id, first, last, attempts, acked)| {
                    Ok(DeliveryRecord {
                        node_id,
                        first_sent_at_ms: opt_u64("key_deliveries.first_sent_at_ms", first)?,
                        last_sent_at_ms: opt_u64("key_deliveries.last_sent_at_ms", last)?,
                        attempts: to_u64("key_deliveries.attempts", attempts)?,
                        acked_at_ms: opt_u64("key_deliveries.acked_at_ms", acked)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            out.push(KeyRecord {
                epoch: to_u64("keys.epoch", epoch)?,
                created_at_ms: to_u64("keys.created_at_ms", created)?,
                check_value,
                trigger: Trigger::parse("keys.trigger", &trigger)?,
                trigger_detail: serde_json::from_str(&detail).map_err(|_| {
                    StoreError::BadValue {
                        column: "keys.trigger_detail",
                        value: detail.clone(),
                    }
                })?,
                activated_at_ms: opt_u64("keys.activated_at_ms", activated)?,
                retired_at_ms: opt_u64("keys.retired_at_ms", retired)?,
                deliveries,
                handouts,
            });
        }
        Ok(out)
    }

    // ----- rounds -----

    /// Starts a round for the key of `epoch` over `nodes` nodes, in phase `Distribute`.
    pub fn round_started(&mut self, epoch: u64, nodes: u64, now_ms: u64) -> Result<i64> {
        let now = to_i64(now_ms)?;
        self.conn
            .execute(
                "INSERT INTO rounds (epoch, started_at_ms, phase, phase_started_at_ms, nodes)
                 VALUES (?1, ?2, 'Distribute', ?2, ?3)",
                params![to_i64(epoch)?, now, to_i64(nodes)?],
            )
            .map_err(|err| match err {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    StoreError::UnknownEpoch(epoch)
                }
                other => other.into(),
            })?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Moves round `id` to `phase`, recording how long the phase it leaves lasted.
    pub fn round_phase(&mut self, id: i64, phase: Phase, now_ms: u64) -> Result<()> {
        let tx = self.conn.savepoint()?;
        Self::close_phase(&tx, id, now_ms)?;
        tx.execute(
            "UPDATE rounds SET phase = ?2, phase_started_at_ms = ?3 WHERE id = ?1",
            params![id, phase.as_str(), to_i64(now_ms)?],
        )?;
        tx.commit()?;
        Ok(())
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
        let tx = self.conn.savepoint()?;
        Self::close_phase(&tx, id, now_ms)?;
        let now = to_i64(now_ms)?;
        tx.execute(
            "UPDATE rounds SET phase = 'Finished', phase_started_at_ms = ?2, finished_at_ms = ?2,
             outcome = ?3, outcome_detail = ?4, acked = ?5, stale = ?6, paused_at_ms = NULL
             WHERE id = ?1",
            params![
                id,
                now,
                outcome.as_str(),
                detail,
                to_i64(acked)?,
                to_i64(stale)?
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Round `id` reached too few nodes by a deadline and waits (`detail` says how many).
    pub fn round_paused(&mut self, id: i64, detail: &str, now_ms: u64) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE rounds SET pauses = pauses + 1, paused_at_ms = ?2, pause_detail = ?3
             WHERE id = ?1 AND finished_at_ms IS NULL",
            params![id, to_i64(now_ms)?, detail],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownRound(id));
        }
        Ok(())
    }

    /// Round `id` goes on after a pause.
    pub fn round_resumed(&mut self, id: i64) -> Result<()> {
        let n = self
            .conn
            .execute("UPDATE rounds SET paused_at_ms = NULL WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(StoreError::UnknownRound(id));
        }
        Ok(())
    }

    fn close_phase(tx: &Connection, id: i64, now_ms: u64) -> Result<()> {
        let (phase, since): (String, i64) = tx
            .query_row(
                "SELECT phase, phase_started_at_ms FROM rounds WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or(StoreError::UnknownRound(id))?;
        let spent = to_i64(now_ms)?.saturating_sub(since).max(0);
        let column = match Phase::parse("rounds.phase", &phase)? {
            Phase::Distribute => "distribute_ms",
            Phase::FirstTransition => "first_transition_ms",
            Phase::SecondTransition => "second_transition_ms",
            Phase::Finished => return Ok(()),
        };
        // A phase entered twice (e.g. after a controller restart) adds up.
        tx.execute(
            &format!("UPDATE rounds SET {column} = COALESCE({column}, 0) + ?2 WHERE id = ?1"),
            params![id, spent],
        )?;
        Ok(())
    }

    /// All rounds, oldest first.
    pub fn rounds(&self) -> Result<Vec<RoundRecord>> {
        self.query_rounds("")
    }

    /// The newest round that has not finished (to resume after a restart).
    pub fn unfinished_round(&self) -> Result<Option<RoundRecord>> {
        Ok(self.query_rounds("WHERE finished_at_ms IS NULL")?.pop())
    }

    fn query_rounds(&self, filter: &str) -> Result<Vec<RoundRecord>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT id, epoch, started_at_ms, phase, phase_started_at_ms, distribute_ms,
                    first_transition_ms, second_transition_ms, nodes, acked, stale,
                    finished_at_ms, outcome, outcome_detail, pauses, paused_at_ms, pause_detail
             FROM rounds {filter} ORDER BY id"
        ))?;
        type Raw = (
            i64,
            i64,
            i64,
            String,
            i64,
            [Option<i64>; 3],
            i64,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
            (i64, Option<i64>, Option<String>),
        );
        let raws: Vec<Raw> = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    [r.get(5)?, r.get(6)?, r.get(7)?],
                    r.get(8)?,
                    r.get(9)?,
                    r.get(10)?,
                    r.get(11)?,
                    r.get(12)?,
                    r.get(13)?,
                    (r.get(14)?, r.get(15)?, r.get(16)?),
                ))
            })?
            .collect::<std::result::Result<_, _>>()?;
        raws.into_iter()
            .map(
                |(
                    id,
                    epoch,
                    started,
                    phase,
                    since,
                    ph,
                    nodes,
                    acked,
                    stale,
                    fin,
                    outcome,
                    detail,
                    (pauses, paused_at, pause_detail),
                )| {
                    Ok(RoundRecord {
                        id,
                        epoch: to_u64("rounds.epoch", epoch)?,
                        started_at_ms: to_u64("rounds.started_at_ms", started)?,
                        phase: Phase::parse("rounds.phase", &phase)?,
                        phase_started_at_ms: to_u64("rounds.phase_started_at_ms", since)?,
                        phases_ms: PhaseDurations {
                            distribute: opt_u64("rounds.distribute_ms", ph[0])?,
                            first_transition: opt_u64("rounds.first_transition_ms", ph[1])?,
                            second_transition: opt_u64("rounds.second_transition_ms", ph[2])?,
                        },
                        nodes: to_u64("rounds.nodes", nodes)?,
                        acked: opt_u64("rounds.acked", acked)?,
                        stale: opt_u64("rounds.stale", stale)?,
                        finished_at_ms: opt_u64("rounds.finished_at_ms", fin)?,
                        outcome: outcome
                            .map(|o| Outcome::parse("rounds.outcome", &o))
                            .transpose()?,
                        outcome_detail: detail,
                        pauses: to_u64("rounds.pauses", pauses)?,
                        paused_at_ms: opt_u64("rounds.paused_at_ms", paused_at)?,
                        pause_detail,
                    })
                },
            )
            .collect()
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
        let tx = self.conn.savepoint()?;
        audit_in(&tx, kind, node_id, detail, now_ms)?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(id)
    }

    /// Audit entries with an id greater than `after_id`, oldest first, at most `limit`.
    pub fn audit_log(&self, after_id: i64, limit: u32) -> Result<Vec<AuditRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, at_ms, kind, node_id, detail FROM audit WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        type Raw = (i64, i64, String, Option<String>, String);
        let raws: Vec<Raw> = stmt
            .query_map(params![after_id, limit], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<std::result::Result<_, _>>()?;
        raws.into_iter()
            .map(|(id, at, kind, node_id, detail)| {
                Ok(AuditRecord {
                    id,
                    at_ms: to_u64("audit.at_ms", at)?,
                    kind: AuditKind::parse("audit.kind", &kind)?,
                    node_id,
                    detail: serde_json::from_str(&detail).map_err(|_| StoreError::BadValue {
                        column: "audit.detail",
                        value: detail.clone(),
                    })?,
                })
            })
            .collect()
    }
}

struct RawNode {
    node_id: String,
    member_no: i64,
    address: Option<String>,
    key_check: String,
    state: String,
    epoch: Option<i64>,
    last_seen_ms: Option<i64>,
    stale: bool,
    enrolled_at_ms: i64,
    removed_at_ms: Option<i64>,
}

impl RawNode {
    fn cook(self) -> Result<NodeRecord> {
        Ok(NodeRecord {
            node_id: self.node_id,
            member_no: to_u64("nodes.member_no", self.member_no)?,
            address: self.address,
            key_check: self.key_check,
            state: NodeState::parse("nodes.state", &self.state)?,
            epoch: opt_u64("nodes.epoch", self.epoch)?,
            last_seen_ms: opt_u64("nodes.last_seen_ms", self.last_seen_ms)?,
            stale: self.stale,
            enrolled_at_ms: to_u64("nodes.enrolled_at_ms", self.enrolled_at_ms)?,
            removed_at_ms: opt_u64("nodes.removed_at_ms", self.removed_at_ms)?,
        })
    }
}

#[cfg(test)]
mod tests;
