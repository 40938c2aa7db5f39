//! The SQLite engine: the management table in one file of the state directory.
//!
//! Crash safety: WAL journal with `synchronous=FULL`, so a transaction that
//! returned is on disk even after a power loss (in WAL mode `NORMAL` would only
//! survive a process crash: the last commits may roll back on power loss, and a
//! key that was sent must not be forgotten). Every change of several rows is one
//! savepoint, so it nests inside a batch. Foreign keys are enforced. The schema
//! is versioned in `user_version` and migrated on open (see [`super::schema`]).
//!
//! The write-ahead log is copied into the table file (a checkpoint) while the
//! controller is idle ([`Engine::idle_upkeep`], between rounds), not by the
//! commit that crosses SQLite's default 1000 pages: that commit, one of a
//! round's phase changes, returned only after copying the log (about 450
//! pages and an fsync at 100 nodes, 4 ms in one traced round, before the
//! second transition request went out). The automatic checkpoint stays as
//! a bound, at [`WAL_AUTOCHECKPOINT_PAGES`], for a controller never idle.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::schema;
use super::*;

/// Pages of write-ahead log past which a commit copies it into the table file
/// itself (SQLite's default is 1000; a 100-node round writes about 200).
pub const WAL_AUTOCHECKPOINT_PAGES: u32 = 20_000;

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

/// The management table in an embedded SQLite database (the default engine).
pub struct SqliteEngine {
    pub(super) conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteEngine")
            .field("path", &self.path)
            .finish()
    }
}

const NODE_COLUMNS: &str = "node_id, member_no, address, key_check, state, epoch, last_seen_ms, \
                            stale, enrolled_at_ms, removed_at_ms";

impl SqliteEngine {
    /// Opens (creating if needed) the management table at `path`, brings its
    /// schema to [`SCHEMA_VERSION`], and sets WAL, `synchronous=FULL`, foreign keys.
    pub fn open(path: &Path) -> Result<SqliteEngine> {
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
        conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)
            .map_err(open_err)?;
        let found: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open_err)?;
        if found > SCHEMA_VERSION as i64 {
            return Err(StoreError::TooNew {
                path: path.display().to_string(),
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
        Ok(SqliteEngine {
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
        state: RecordedState,
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

    /// Starts a round for the key of `epoch` over `nodes` nodes, in phase `distributing`.
    pub fn round_started(&mut self, epoch: u64, nodes: u64, now_ms: u64) -> Result<i64> {
        let now = to_i64(now_ms)?;
        self.conn
            .execute(
                "INSERT INTO rounds (epoch, started_at_ms, phase, phase_started_at_ms, nodes)
                 VALUES (?1, ?2, ?3, ?2, ?4)",
                params![
                    to_i64(epoch)?,
                    now,
                    RoundPhase::Distributing.as_str(),
                    to_i64(nodes)?
                ],
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
    pub fn round_phase(&mut self, id: i64, phase: RoundPhase, now_ms: u64) -> Result<()> {
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
            "UPDATE rounds SET phase = NULL, phase_started_at_ms = ?2, finished_at_ms = ?2,
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
        let (phase, since): (Option<String>, i64) = tx
            .query_row(
                "SELECT phase, phase_started_at_ms FROM rounds WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or(StoreError::UnknownRound(id))?;
        let spent = to_i64(now_ms)?.saturating_sub(since).max(0);
        let Some(phase) = parse_phase(phase.as_deref())? else {
            return Ok(());
        };
        let column = duration_column(phase);
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
            "SELECT id, epoch, started_at_ms, phase, phase_started_at_ms, distributing_ms,
                    first_transition_ms, draining_ms, second_transition_ms, nodes, acked, stale,
                    finished_at_ms, outcome, outcome_detail, pauses, paused_at_ms, pause_detail
             FROM rounds {filter} ORDER BY id"
        ))?;
        type Raw = (
            i64,
            i64,
            i64,
            Option<String>,
            i64,
            [Option<i64>; 4],
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
                    [r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?],
                    r.get(9)?,
                    r.get(10)?,
                    r.get(11)?,
                    r.get(12)?,
                    r.get(13)?,
                    r.get(14)?,
                    (r.get(15)?, r.get(16)?, r.get(17)?),
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
                        phase: parse_phase(phase.as_deref())?,
                        phase_started_at_ms: to_u64("rounds.phase_started_at_ms", since)?,
                        phases_ms: durations(ph)?,
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

pub(super) struct RawNode {
    pub(super) node_id: String,
    pub(super) member_no: i64,
    pub(super) address: Option<String>,
    pub(super) key_check: String,
    pub(super) state: String,
    pub(super) epoch: Option<i64>,
    pub(super) last_seen_ms: Option<i64>,
    pub(super) stale: bool,
    pub(super) enrolled_at_ms: i64,
    pub(super) removed_at_ms: Option<i64>,
}

impl RawNode {
    pub(super) fn cook(self) -> Result<NodeRecord> {
        Ok(NodeRecord {
            node_id: self.node_id,
            member_no: to_u64("nodes.member_no", self.member_no)?,
            address: self.address,
            key_check: self.key_check,
            state: RecordedState::parse("nodes.state", &self.state)?,
            epoch: opt_u64("nodes.epoch", self.epoch)?,
            last_seen_ms: opt_u64("nodes.last_seen_ms", self.last_seen_ms)?,
            stale: self.stale,
            enrolled_at_ms: to_u64("nodes.enrolled_at_ms", self.enrolled_at_ms)?,
            removed_at_ms: opt_u64("nodes.removed_at_ms", self.removed_at_ms)?,
        })
    }
}

impl SqliteEngine {
    /// The embedded table has one controller (the state directory's lock
    /// keeps a second one out): it is always the leader, term 1, with no
    /// expiry; the row only records who that is.
    fn sole_lease(&mut self, holder: &str) -> Result<LeaseOutcome> {
        self.conn.execute(
            "INSERT INTO leader_lease (one, holder, term, expires_at_ms) VALUES (1, ?1, 1, NULL)
             ON CONFLICT (one) DO UPDATE SET holder = excluded.holder, term = 1,
             expires_at_ms = NULL",
            [holder],
        )?;
        Ok(LeaseOutcome::Held(LeaseRecord {
            holder: holder.to_owned(),
            term: keyfleet_core::protocol::TERM,
            expires_in_ms: None,
        }))
    }
}

impl Engine for SqliteEngine {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    fn schema_version(&self) -> Result<i64> {
        SqliteEngine::schema_version(self)
    }
    fn integrity_check(&self) -> Result<std::result::Result<(), String>> {
        SqliteEngine::integrity_check(self)
    }
    /// A passive checkpoint: what no reader still needs is copied into the
    /// table file (a reader, such as `keyfleet nodes`, is never waited for).
    fn idle_upkeep(&mut self) -> Result<()> {
        if !self.conn.is_autocommit() {
            return Ok(());
        }
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        Ok(())
    }
    fn begin(&mut self) -> Result<()> {
        Ok(self.conn.execute_batch("BEGIN IMMEDIATE")?)
    }
    fn commit(&mut self) -> Result<()> {
        Ok(self.conn.execute_batch("COMMIT")?)
    }
    fn rollback(&mut self) {
        let _ = self.conn.execute_batch("ROLLBACK");
    }
    fn enroll_node(
        &mut self,
        node_id: &str,
        member_no: u64,
        address: Option<&str>,
        key_check: &str,
        now_ms: u64,
    ) -> Result<NodeRecord> {
        SqliteEngine::enroll_node(self, node_id, member_no, address, key_check, now_ms)
    }
    fn renumber_members(
        &mut self,
        want: &[(&str, u64)],
        now_ms: u64,
    ) -> Result<Vec<(String, u64, u64)>> {
        SqliteEngine::renumber_members(self, want, now_ms)
    }
    fn remove_node(&mut self, node_id: &str, reason: &str, now_ms: u64) -> Result<()> {
        SqliteEngine::remove_node(self, node_id, reason, now_ms)
    }
    fn set_address(&mut self, node_id: &str, address: &str) -> Result<()> {
        SqliteEngine::set_address(self, node_id, address)
    }
    fn record_address_change(
        &mut self,
        node_id: &str,
        new: &str,
        message: &str,
        seq: u64,
        now_ms: u64,
    ) -> Result<()> {
        SqliteEngine::record_address_change(self, node_id, new, message, seq, now_ms)
    }
    fn address_changes(&self, node_id: Option<&str>) -> Result<Vec<AddressChange>> {
        match node_id {
            Some(id) => self.address_history(id),
            None => SqliteEngine::address_changes(self),
        }
    }
    fn record_handout(
        &mut self,
        epochs: &[u64],
        node_id: &str,
        via: Handout,
        now_ms: u64,
    ) -> Result<()> {
        SqliteEngine::record_handout(self, epochs, node_id, via, now_ms)
    }
    fn set_node_state(
        &mut self,
        node_ids: &[&str],
        state: RecordedState,
        epoch: Option<u64>,
        now_ms: u64,
    ) -> Result<()> {
        SqliteEngine::set_node_state(self, node_ids, state, epoch, now_ms)
    }
    fn node_seen(&mut self, node_ids: &[&str], now_ms: u64) -> Result<()> {
        SqliteEngine::node_seen(self, node_ids, now_ms)
    }
    fn set_stale(
        &mut self,
        node_id: &str,
        stale: bool,
        epoch: Option<u64>,
        reason: &str,
        now_ms: u64,
    ) -> Result<()> {
        SqliteEngine::set_stale(self, node_id, stale, epoch, reason, now_ms)
    }
    fn node(&self, node_id: &str) -> Result<Option<NodeRecord>> {
        SqliteEngine::node(self, node_id)
    }
    fn nodes(&self, include_removed: bool) -> Result<Vec<NodeRecord>> {
        if include_removed {
            self.all_nodes()
        } else {
            SqliteEngine::nodes(self)
        }
    }
    fn record_key_created(
        &mut self,
        epoch: u64,
        check_value: &str,
        trigger: Trigger,
        trigger_detail: &serde_json::Value,
        recipients: &[&str],
        now_ms: u64,
    ) -> Result<()> {
        SqliteEngine::record_key_created(
            self,
            epoch,
            check_value,
            trigger,
            trigger_detail,
            recipients,
            now_ms,
        )
    }
    fn record_sent(&mut self, epoch: u64, node_ids: &[&str], now_ms: u64) -> Result<()> {
        SqliteEngine::record_sent(self, epoch, node_ids, now_ms)
    }
    fn record_ack(&mut self, epoch: u64, node_ids: &[&str], now_ms: u64) -> Result<()> {
        SqliteEngine::record_ack(self, epoch, node_ids, now_ms)
    }
    fn retire_key(&mut self, epoch: u64, now_ms: u64) -> Result<()> {
        SqliteEngine::retire_key(self, epoch, now_ms)
    }
    fn activate_key(&mut self, epoch: u64, now_ms: u64) -> Result<()> {
        SqliteEngine::activate_key(self, epoch, now_ms)
    }
    fn current_epoch(&self) -> Result<Option<u64>> {
        SqliteEngine::current_epoch(self)
    }
    fn newest_epoch(&self) -> Result<Option<u64>> {
        SqliteEngine::newest_epoch(self)
    }
    fn history(&self) -> Result<Vec<KeyRecord>> {
        SqliteEngine::history(self)
    }
    fn round_started(&mut self, epoch: u64, nodes: u64, now_ms: u64) -> Result<i64> {
        SqliteEngine::round_started(self, epoch, nodes, now_ms)
    }
    fn round_phase(&mut self, id: i64, phase: RoundPhase, now_ms: u64) -> Result<()> {
        SqliteEngine::round_phase(self, id, phase, now_ms)
    }
    fn round_finished(
        &mut self,
        id: i64,
        outcome: Outcome,
        detail: Option<&str>,
        acked: u64,
        stale: u64,
        now_ms: u64,
    ) -> Result<()> {
        SqliteEngine::round_finished(self, id, outcome, detail, acked, stale, now_ms)
    }
    fn round_paused(&mut self, id: i64, detail: &str, now_ms: u64) -> Result<()> {
        SqliteEngine::round_paused(self, id, detail, now_ms)
    }
    fn round_resumed(&mut self, id: i64) -> Result<()> {
        SqliteEngine::round_resumed(self, id)
    }
    fn rounds(&self, unfinished_only: bool) -> Result<Vec<RoundRecord>> {
        if unfinished_only {
            self.query_rounds("WHERE finished_at_ms IS NULL")
        } else {
            SqliteEngine::rounds(self)
        }
    }
    fn audit(
        &mut self,
        kind: AuditKind,
        node_id: Option<&str>,
        detail: &serde_json::Value,
        now_ms: u64,
    ) -> Result<i64> {
        SqliteEngine::audit(self, kind, node_id, detail, now_ms)
    }
    fn audit_log(&self, after_id: i64, limit: u32) -> Result<Vec<AuditRecord>> {
        SqliteEngine::audit_log(self, after_id, limit)
    }
    fn acquire_lease(&mut self, holder: &str, _lease_ms: u64) -> Result<LeaseOutcome> {
        self.sole_lease(holder)
    }
    fn release_lease(&mut self, _holder: &str, _term: u32) -> Result<()> {
        Ok(())
    }
    fn request_enrolment(
        &mut self,
        node_id: &str,
        body: &[u8],
        by: &str,
        now_ms: u64,
    ) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO enrol_requests (node_id, body, requested_at_ms, requested_by)
             VALUES (?1, ?2, ?3, ?4)",
            params![node_id, body, to_i64(now_ms)?, by],
        )?;
        Ok(self.conn.last_insert_rowid())
    }
    fn listen_enrolments(&mut self) -> Result<Option<std::sync::Arc<tokio::sync::Notify>>> {
        // Installers of an embedded table come through the control socket.
        Ok(None)
    }
    fn open_enrolments(&self, limit: u32) -> Result<Vec<EnrolRequest>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, node_id, body, requested_by FROM enrol_requests
             WHERE answered_at_ms IS NULL AND body IS NOT NULL ORDER BY id LIMIT ?1",
        )?;
        let rows = stmt
            .query_map(params![limit], |r| {
                Ok(EnrolRequest {
                    id: r.get(0)?,
                    node_id: r.get(1)?,
                    body: r.get(2)?,
                    requested_by: r.get(3)?,
                })
            })?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows)
    }
    fn answer_enrolment(&mut self, id: i64, answer: &str, now_ms: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE enrol_requests SET answer = ?2, answered_at_ms = ?3, body = NULL WHERE id = ?1",
            params![id, answer, to_i64(now_ms)?],
        )?;
        Ok(())
    }
    fn enrolment_answer(&self, id: i64) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT answer FROM enrol_requests WHERE id = ?1",
                params![id],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
    }
    fn fence(&mut self, _holder: &str, _term: u32) -> Result<()> {
        // The sole leader: the state directory's lock keeps every other out.
        Ok(())
    }
    fn put_state_core(&mut self, body: &[u8], now_ms: u64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO controller_state (one, body, updated_at_ms) VALUES (1, ?1, ?2)
             ON CONFLICT(one) DO UPDATE SET body = excluded.body, updated_at_ms = excluded.updated_at_ms",
            params![body, to_i64(now_ms)?],
        )?;
        Ok(())
    }
    fn put_state_member(&mut self, member: u32, body: &[u8]) -> Result<()> {
        self.conn.execute(
            "INSERT INTO member_state (member, body) VALUES (?1, ?2)
             ON CONFLICT(member) DO UPDATE SET body = excluded.body",
            params![member, body],
        )?;
        Ok(())
    }
    fn delete_state_member(&mut self, member: u32) -> Result<()> {
        let tx = self.conn.savepoint()?;
        tx.execute(
            "DELETE FROM member_state WHERE member = ?1",
            params![member],
        )?;
        tx.execute(
            "DELETE FROM replay_marks WHERE member = ?1",
            params![member],
        )?;
        tx.commit()?;
        Ok(())
    }
    fn put_replay_marks(&mut self, marks: &[(u32, u64)]) -> Result<()> {
        let tx = self.conn.savepoint()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO replay_marks (member, seq) VALUES (?1, ?2)
                 ON CONFLICT(member) DO UPDATE SET seq = excluded.seq",
            )?;
            for &(member, seq) in marks {
                // Bit for bit: a sequence number is any u64.
                stmt.execute(params![member, seq as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
    fn state_rows(&self) -> Result<StateRows> {
        let core: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT body FROM controller_state", [], |r| r.get(0))
            .optional()?;
        let mut stmt = self
            .conn
            .prepare_cached("SELECT member, body FROM member_state ORDER BY member")?;
        let members = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?
            .map(|r| {
                let (m, b) = r?;
                Ok((member_no("member_state.member", m)?, b))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut stmt = self
            .conn
            .prepare_cached("SELECT member, seq FROM replay_marks ORDER BY member")?;
        let marks = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?
            .map(|r| {
                let (m, s) = r?;
                Ok((member_no("replay_marks.member", m)?, s as u64))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StateRows {
            core,
            members,
            marks,
        })
    }
    fn lease(&self) -> Result<Option<LeaseRecord>> {
        let row: Option<(String, i64)> = self
            .conn
            .query_row("SELECT holder, term FROM leader_lease", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        row.map(|(holder, term)| {
            Ok(LeaseRecord {
                holder,
                term: lease_term(term)?,
                expires_in_ms: None,
            })
        })
        .transpose()
    }
}
