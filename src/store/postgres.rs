//! The PostgreSQL engine: the management table in a database several
//! controllers and installers can share (`store.url = "postgres://..."`).
//!
//! Client: `tokio-postgres`. Its connection (the socket, the protocol state)
//! runs on a thread of its own with a one-thread tokio runtime; each store call
//! waits for its answer with `futures_executor::block_on`, which only parks the
//! calling thread. So the store stays synchronous as the controller calls it
//! (inside its tokio loop, as it calls SQLite), without nesting a runtime in
//! the controller's (the sync `postgres` crate calls `Runtime::block_on` on the
//! caller's thread, which panics inside a tokio task), and without an async
//! trait through the controller (`sqlx` is async-only). ARCHITECTURE.md has the
//! reasoning.
//!
//! Atomicity: a call that changes several rows runs in `BEGIN`..`COMMIT`, or,
//! inside a batch, in a savepoint, so a failed call in a batch undoes only its
//! own rows, as on SQLite. A connection that dropped (server restarted) is
//! opened again on the next call outside a batch; a call on a dropped
//! connection returns an error, never a silent success.
//!
//! The schema is versioned in the one-row table `keyfleet_schema` and migrated
//! on connect in one transaction under an advisory lock (see [`super::schema`]).

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Row};

use super::schema::PG_MIGRATIONS;
use super::sqlite::RawNode;
use super::*;
use crate::config::redact_url;

/// The advisory lock key the migration holds ("keyfleet" in ASCII).
const MIGRATION_LOCK: i64 = 0x6b65_7966_6c65_6574;

struct Conn {
    client: Client,
}

/// The channel installers' enrolment requests are announced on.
const ENROL_CHANNEL: &str = "keyfleet_enrol";

/// The management table in PostgreSQL.
pub struct PgEngine {
    conn: RefCell<Conn>,
    config: tokio_postgres::Config,
    shown: String,
    /// Open transactions: 0 outside a batch, 1 in a batch, more in a call's savepoint.
    depth: u32,
    /// Told of every notification the connection receives.
    signal: Arc<tokio::sync::Notify>,
    /// Whether the connection LISTENs on [`ENROL_CHANNEL`] (again after a reconnect).
    listening: std::cell::Cell<bool>,
}

impl std::fmt::Debug for PgEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEngine")
            .field("url", &self.shown)
            .finish()
    }
}

fn wait<T>(f: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>) -> Result<T> {
    Ok(futures_executor::block_on(f)?)
}

/// Opens a connection whose driver runs on its own thread; each notification
/// it receives (LISTEN) wakes `signal`.
fn open_conn(
    config: &tokio_postgres::Config,
    shown: &str,
    signal: Arc<tokio::sync::Notify>,
) -> Result<Conn> {
    let (tx, rx) = std::sync::mpsc::channel();
    let config = config.clone();
    std::thread::Builder::new()
        .name("keyfleet-pg".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(StoreError::Driver(e)));
                    return;
                }
            };
            rt.block_on(async move {
                match config.connect(NoTls).await {
                    Ok((client, mut connection)) => {
                        let _ = tx.send(Ok(client));
                        let mut messages =
                            futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                        while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
                            match m {
                                Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                                    signal.notify_one()
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    tracing::error!(error = %e, "the PostgreSQL connection of the management table failed");
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(StoreError::Postgres(e)));
                    }
                }
            });
        })
        .map_err(StoreError::Driver)?;
    match rx.recv() {
        Ok(Ok(client)) => Ok(Conn { client }),
        Ok(Err(StoreError::Postgres(source))) => Err(StoreError::Connect {
            url: shown.to_owned(),
            detail: chain(&source),
            source,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(StoreError::Driver(std::io::Error::other(
            "the connection thread ended before it answered",
        ))),
    }
}

fn is(e: &tokio_postgres::Error, state: &SqlState) -> bool {
    e.code() == Some(state)
}

fn node_from_row(r: &Row) -> Result<NodeRecord> {
    RawNode {
        node_id: r.try_get(0)?,
        member_no: r.try_get(1)?,
        address: r.try_get(2)?,
        key_check: r.try_get(3)?,
        state: r.try_get(4)?,
        epoch: r.try_get(5)?,
        last_seen_ms: r.try_get(6)?,
        stale: r.try_get(7)?,
        enrolled_at_ms: r.try_get(8)?,
        removed_at_ms: r.try_get(9)?,
    }
    .cook()
}

const NODE_COLUMNS: &str = "node_id, member_no, address, key_check, state, epoch, last_seen_ms, \
                            stale, enrolled_at_ms, removed_at_ms";

impl PgEngine {
    /// Connects to `url` and brings the schema to [`SCHEMA_VERSION`].
    pub fn connect(url: &str) -> Result<PgEngine> {
        let shown = redact_url(url);
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(StoreError::BadUrl(shown));
        }
        let mut config: tokio_postgres::Config =
            url.parse()
                .map_err(|source: tokio_postgres::Error| StoreError::Connect {
                    url: shown.clone(),
                    detail: chain(&source),
                    source,
                })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("keyfleet");
        }
        let signal = Arc::new(tokio::sync::Notify::new());
        let conn = open_conn(&config, &shown, signal.clone())?;
        let mut engine = PgEngine {
            conn: RefCell::new(conn),
            config,
            shown,
            depth: 0,
            signal,
            listening: std::cell::Cell::new(false),
        };
        engine.migrate()?;
        Ok(engine)
    }

    fn migrate(&mut self) -> Result<()> {
        let shown = self.shown.clone();
        let conn = self.conn.get_mut();
        let c = &conn.client;
        let fail = |version: usize| {
            let shown = shown.clone();
            move |source| StoreError::PgMigrate {
                url: shown,
                version,
                source,
            }
        };
        wait(c.batch_execute("BEGIN")).map_err(|e| match e {
            StoreError::Postgres(s) => fail(0)(s),
            e => e,
        })?;
        let run = || -> std::result::Result<std::result::Result<(), StoreError>, (usize, tokio_postgres::Error)> {
            let b = |sql: &str, v: usize| {
                futures_executor::block_on(c.batch_execute(sql)).map_err(|e| (v, e))
            };
            let q = |sql: &str, v: usize| {
                futures_executor::block_on(c.query_one(sql, &[])).map_err(|e| (v, e))
            };
            q(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"), 0)?;
            b(
                "CREATE TABLE IF NOT EXISTS keyfleet_schema (
                   one     BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
                   version INTEGER NOT NULL CHECK (version >= 0));
                 INSERT INTO keyfleet_schema (one, version) VALUES (true, 0)
                   ON CONFLICT (one) DO NOTHING",
                0,
            )?;
            let found: i32 = q("SELECT version FROM keyfleet_schema", 0)?.get(0);
            if found as i64 > SCHEMA_VERSION as i64 {
                return Ok(Err(StoreError::TooNew {
                    path: shown.clone(),
                    found: found.into(),
                    known: SCHEMA_VERSION,
                }));
            }
            for (i, sql) in PG_MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
                b(sql, i + 1)?;
                b(&format!("UPDATE keyfleet_schema SET version = {}", i + 1), i + 1)?;
            }
            Ok(Ok(()))
        };
        match run() {
            Ok(Ok(())) => {
                wait(c.batch_execute("COMMIT"))?;
                Ok(())
            }
            Ok(Err(e)) => {
                let _ = wait(c.batch_execute("ROLLBACK"));
                Err(e)
            }
            Err((v, e)) => {
                let _ = wait(c.batch_execute("ROLLBACK"));
                Err(fail(v)(e))
            }
        }
    }

    /// The connection, opened again if it dropped while no transaction was open.
    fn client(&self) -> Result<std::cell::Ref<'_, Client>> {
        if self.conn.borrow().client.is_closed() {
            if self.depth > 0 {
                return Err(StoreError::Driver(std::io::Error::other(
                    "the PostgreSQL connection dropped inside a transaction; it was rolled back",
                )));
            }
            let fresh = open_conn(&self.config, &self.shown, self.signal.clone())?;
            tracing::info!(url = %self.shown, "reconnected to the management table");
            if self.listening.get() {
                wait(
                    fresh
                        .client
                        .batch_execute(&format!("LISTEN {ENROL_CHANNEL}")),
                )?;
                // Requests may have come while it was down.
                self.signal.notify_one();
            }
            *self.conn.borrow_mut() = fresh;
        }
        Ok(std::cell::Ref::map(self.conn.borrow(), |c| &c.client))
    }

    fn exec(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64> {
        let c = self.client()?;
        wait(c.execute(sql, params))
    }

    fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let c = self.client()?;
        wait(c.query(sql, params))
    }

    fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<Row>> {
        let c = self.client()?;
        wait(c.query_opt(sql, params))
    }

    fn batch_sql(&self, sql: &str) -> Result<()> {
        let c = self.client()?;
        wait(c.batch_execute(sql))
    }

    /// Runs `f` atomically: a transaction of its own, or a savepoint inside a batch.
    fn atomic<R>(&mut self, f: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        let (open, done, undo) = if self.depth == 0 {
            ("BEGIN", "COMMIT", "ROLLBACK")
        } else {
            (
                "SAVEPOINT keyfleet_call",
                "RELEASE SAVEPOINT keyfleet_call",
                "ROLLBACK TO SAVEPOINT keyfleet_call; RELEASE SAVEPOINT keyfleet_call",
            )
        };
        self.batch_sql(open)?;
        self.depth += 1;
        let r = f(self);
        self.depth -= 1;
        match r {
            Ok(v) => {
                if let Err(e) = self.batch_sql(done) {
                    if self.depth == 0 {
                        let _ = self.batch_sql("ROLLBACK");
                    }
                    return Err(e);
                }
                Ok(v)
            }
            Err(e) => {
                let _ = self.batch_sql(undo);
                Err(e)
            }
        }
    }

    fn audit_in(
        &self,
        kind: AuditKind,
        node: Option<&str>,
        detail: &serde_json::Value,
        now_ms: u64,
    ) -> Result<i64> {
        let row = self
            .query_opt(
                "INSERT INTO audit (at_ms, kind, node_id, detail) VALUES ($1, $2, $3, $4) RETURNING id",
                &[&to_i64(now_ms)?, &kind.as_str(), &node, &detail.to_string()],
            )?
            .expect("INSERT .. RETURNING returns a row");
        Ok(row.try_get(0)?)
    }

    fn check_epoch(&self, epoch: u64) -> Result<()> {
        let row = self.query_opt("SELECT 1 FROM keys WHERE epoch = $1", &[&to_i64(epoch)?])?;
        row.map(drop).ok_or(StoreError::UnknownEpoch(epoch))
    }

    fn query_nodes(&self, filter: &str) -> Result<Vec<NodeRecord>> {
        self.query(
            &format!("SELECT {NODE_COLUMNS} FROM nodes {filter} ORDER BY member_no"),
            &[],
        )?
        .iter()
        .map(node_from_row)
        .collect()
    }

    /// The enrolled node that holds member number `member`, if any.
    fn member_holder(&self, member: i64) -> Result<Option<String>> {
        self.query_opt(
            "SELECT node_id FROM nodes WHERE member_no = $1 AND removed_at_ms IS NULL",
            &[&member],
        )?
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(Into::into)
    }

    fn close_phase(&self, id: i64, now_ms: u64) -> Result<()> {
        let row = self
            .query_opt(
                "SELECT phase, phase_started_at_ms FROM rounds WHERE id = $1",
                &[&id],
            )?
            .ok_or(StoreError::UnknownRound(id))?;
        let (phase, since): (Option<String>, i64) = (row.try_get(0)?, row.try_get(1)?);
        let spent = to_i64(now_ms)?.saturating_sub(since).max(0);
        let Some(phase) = parse_phase(phase.as_deref())? else {
            return Ok(());
        };
        let column = duration_column(phase);
        self.exec(
            &format!("UPDATE rounds SET {column} = COALESCE({column}, 0) + $2 WHERE id = $1"),
            &[&id, &spent],
        )?;
        Ok(())
    }
}

/// The server's clock in milliseconds, fixed for the statement.
const SERVER_MS: &str = "(extract(epoch FROM statement_timestamp()) * 1000)::BIGINT";

fn lease_row(r: &Row) -> Result<LeaseRecord> {
    let left: Option<i64> = r.try_get(2)?;
    Ok(LeaseRecord {
        holder: r.try_get(0)?,
        term: lease_term(r.try_get(1)?)?,
        expires_in_ms: left.map(|l| l.max(0) as u64),
    })
}

impl Engine for PgEngine {
    fn describe(&self) -> String {
        self.shown.clone()
    }

    fn schema_version(&self) -> Result<i64> {
        let row = self
            .query_opt("SELECT version FROM keyfleet_schema", &[])?
            .ok_or_else(|| StoreError::BadValue {
                column: "keyfleet_schema.version",
                value: "(no row)".into(),
            })?;
        Ok(i64::from(row.try_get::<_, i32>(0)?))
    }

    fn integrity_check(&self) -> Result<std::result::Result<(), String>> {
        // The server enforces every constraint on every write; what is left to
        // check is that no foreign key points nowhere (a restore without them).
        let orphans: i64 = self
            .query_opt(
                "SELECT (SELECT COUNT(*) FROM key_deliveries d
                          WHERE NOT EXISTS (SELECT 1 FROM nodes n WHERE n.node_id = d.node_id)
                             OR NOT EXISTS (SELECT 1 FROM keys k WHERE k.epoch = d.epoch))
                      + (SELECT COUNT(*) FROM rounds r
                          WHERE NOT EXISTS (SELECT 1 FROM keys k WHERE k.epoch = r.epoch))",
                &[],
            )?
            .map(|r| r.try_get(0))
            .transpose()?
            .unwrap_or(0);
        Ok(if orphans == 0 {
            Ok(())
        } else {
            Err(format!(
                "{orphans} rows point to a node, key or round that is not there"
            ))
        })
    }

    fn begin(&mut self) -> Result<()> {
        if self.depth != 0 {
            return Err(StoreError::Driver(std::io::Error::other(
                "a batch is already open",
            )));
        }
        self.batch_sql("BEGIN")?;
        self.depth = 1;
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        self.depth = 0;
        self.batch_sql("COMMIT")
    }

    fn rollback(&mut self) {
        self.depth = 0;
        let _ = self.batch_sql("ROLLBACK");
    }

    fn enroll_node(
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
        let now = to_i64(now_ms)?;
        let r = self.atomic(|s| {
            let existing = s.query_opt(
                "SELECT removed_at_ms FROM nodes WHERE node_id = $1 FOR UPDATE",
                &[&node_id],
            )?;
            let existing = existing
                .map(|r| r.try_get::<_, Option<i64>>(0))
                .transpose()?;
            if let Some(None) = existing {
                return Err(StoreError::AlreadyEnrolled(node_id.to_owned()));
            }
            if let Some(holder) = s.member_holder(member)? {
                return Err(StoreError::MemberTaken { member_no, holder });
            }
            if existing.is_some() {
                s.exec(
                    "UPDATE nodes SET member_no = $2, address = $3, key_check = $4, state = 'Enrolled',
                     epoch = NULL, last_seen_ms = NULL, stale = false, enrolled_at_ms = $5,
                     removed_at_ms = NULL
                     WHERE node_id = $1",
                    &[&node_id, &member, &address, &key_check, &now],
                )?;
            } else {
                s.exec(
                    "INSERT INTO nodes (node_id, member_no, address, key_check, state, enrolled_at_ms)
                     VALUES ($1, $2, $3, $4, 'Enrolled', $5)",
                    &[&node_id, &member, &address, &key_check, &now],
                )?;
            }
            s.audit_in(
                AuditKind::Enrollment,
                Some(node_id),
                &serde_json::json!({ "member": member_no, "address": address, "key_check": key_check }),
                now_ms,
            )?;
            s.query_opt(
                &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE node_id = $1"),
                &[&node_id],
            )?
            .as_ref()
            .map(node_from_row)
            .transpose()?
            .ok_or_else(|| StoreError::UnknownNode(node_id.to_owned()))
        });
        // Another controller or installer enrolled the same node or took the
        // same number between the checks and the insert: the server's unique
        // index refused it (the call's savepoint is rolled back, so the
        // transaction can still ask who holds it).
        match r {
            Err(StoreError::Postgres(e)) if is(&e, &SqlState::UNIQUE_VIOLATION) => {
                match e.as_db_error().and_then(|d| d.constraint()) {
                    Some("nodes_enrolled_member") => Err(StoreError::MemberTaken {
                        member_no,
                        holder: self
                            .member_holder(member)?
                            .unwrap_or_else(|| "(enrolled meanwhile)".into()),
                    }),
                    _ => Err(StoreError::AlreadyEnrolled(node_id.to_owned())),
                }
            }
            r => r,
        }
    }

    fn renumber_members(
        &mut self,
        want: &[(&str, u64)],
        now_ms: u64,
    ) -> Result<Vec<(String, u64, u64)>> {
        self.atomic(|s| {
            let mut changed = Vec::new();
            for (id, member_no) in want {
                let old: i64 = s
                    .query_opt(
                        "SELECT member_no FROM nodes WHERE node_id = $1 AND removed_at_ms IS NULL
                         FOR UPDATE",
                        &[id],
                    )?
                    .ok_or_else(|| StoreError::UnknownNode((*id).to_owned()))?
                    .try_get(0)?;
                let old = to_u64("nodes.member_no", old)?;
                if old != *member_no {
                    changed.push(((*id).to_owned(), old, *member_no));
                }
            }
            // Out of the way first (member numbers are u32 on the wire, so
            // 2^32 + n never clashes with a real one; the transaction commits
            // only the final numbers), then to their place: the unique index
            // is checked after each statement.
            for (id, _, _) in &changed {
                s.exec(
                    "UPDATE nodes SET member_no = member_no + 4294967296 WHERE node_id = $1",
                    &[id],
                )?;
            }
            for (id, old, new) in &changed {
                let member = to_i64(*new)?;
                if let Some(holder) = s.member_holder(member)? {
                    return Err(StoreError::MemberTaken {
                        member_no: *new,
                        holder,
                    });
                }
                s.exec(
                    "UPDATE nodes SET member_no = $2 WHERE node_id = $1",
                    &[id, &member],
                )?;
                s.audit_in(
                    AuditKind::Renumbered,
                    Some(id),
                    &serde_json::json!({ "from": old, "to": new,
                        "reason": "the table now records the controller's member number" }),
                    now_ms,
                )?;
            }
            Ok(changed)
        })
    }

    fn remove_node(&mut self, node_id: &str, reason: &str, now_ms: u64) -> Result<()> {
        let now = to_i64(now_ms)?;
        self.atomic(|s| {
            let n = s.exec(
                "UPDATE nodes SET removed_at_ms = $2 WHERE node_id = $1 AND removed_at_ms IS NULL",
                &[&node_id, &now],
            )?;
            if n == 0 {
                return Err(StoreError::UnknownNode(node_id.to_owned()));
            }
            s.audit_in(
                AuditKind::Removal,
                Some(node_id),
                &serde_json::json!({ "reason": reason }),
                now_ms,
            )?;
            Ok(())
        })
    }

    fn set_address(&mut self, node_id: &str, address: &str) -> Result<()> {
        check_address(address)?;
        let n = self.exec(
            "UPDATE nodes SET address = $2 WHERE node_id = $1 AND removed_at_ms IS NULL",
            &[&node_id, &address],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownNode(node_id.to_owned()));
        }
        Ok(())
    }

    fn record_address_change(
        &mut self,
        node_id: &str,
        new: &str,
        message: &str,
        seq: u64,
        now_ms: u64,
    ) -> Result<()> {
        check_address(new)?;
        let (now, seq) = (to_i64(now_ms)?, to_i64(seq)?);
        self.atomic(|s| {
            let old: Option<String> = s
                .query_opt(
                    "SELECT address FROM nodes WHERE node_id = $1 AND removed_at_ms IS NULL
                     FOR UPDATE",
                    &[&node_id],
                )?
                .ok_or_else(|| StoreError::UnknownNode(node_id.to_owned()))?
                .try_get(0)?;
            s.exec(
                "UPDATE nodes SET address = $2 WHERE node_id = $1",
                &[&node_id, &new],
            )?;
            s.exec(
                "INSERT INTO address_changes (node_id, old_address, new_address, at_ms, message, seq)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&node_id, &old, &new, &now, &message, &seq],
            )?;
            Ok(())
        })
    }

    fn address_changes(&self, node_id: Option<&str>) -> Result<Vec<AddressChange>> {
        let sql = "SELECT node_id, old_address, new_address, at_ms, message, seq
                   FROM address_changes WHERE $1::TEXT IS NULL OR node_id = $1 ORDER BY id";
        self.query(sql, &[&node_id])?
            .iter()
            .map(|r| {
                Ok(AddressChange {
                    node_id: r.try_get(0)?,
                    old_address: r.try_get(1)?,
                    new_address: r.try_get(2)?,
                    at_ms: to_u64("address_changes.at_ms", r.try_get(3)?)?,
                    message: r.try_get(4)?,
                    seq: to_u64("address_changes.seq", r.try_get(5)?)?,
                })
            })
            .collect()
    }

    fn record_handout(
        &mut self,
        epochs: &[u64],
        node_id: &str,
        via: Handout,
        now_ms: u64,
    ) -> Result<()> {
        let now = to_i64(now_ms)?;
        self.atomic(|s| {
            for &epoch in epochs {
                s.check_epoch(epoch)?;
                s.exec(
                    "INSERT INTO key_handouts (epoch, node_id, via, at_ms) VALUES ($1, $2, $3, $4)",
                    &[&to_i64(epoch)?, &node_id, &via.as_str(), &now],
                )
                .map_err(|err| unknown_node(err, node_id))?;
            }
            Ok(())
        })
    }

    fn set_node_state(
        &mut self,
        node_ids: &[&str],
        state: RecordedState,
        epoch: Option<u64>,
        now_ms: u64,
    ) -> Result<()> {
        let (epoch, now) = (opt_i64(epoch)?, to_i64(now_ms)?);
        let ids = distinct(node_ids);
        // One statement for every node (a phase's acknowledgements come
        // together): a round trip each was most of a round's time.
        self.atomic(|s| {
            let n = s.exec(
                "UPDATE nodes SET state = $2, epoch = $3, last_seen_ms = $4
                 WHERE node_id = ANY($1) AND removed_at_ms IS NULL",
                &[&ids, &state.as_str(), &epoch, &now],
            )?;
            if n as usize != ids.len() {
                return Err(s.first_unknown(&ids, "AND removed_at_ms IS NULL")?);
            }
            Ok(())
        })
    }

    fn node_seen(&mut self, node_ids: &[&str], now_ms: u64) -> Result<()> {
        let now = to_i64(now_ms)?;
        self.atomic(|s| {
            for id in node_ids {
                let n = s.exec(
                    "UPDATE nodes SET last_seen_ms = GREATEST(COALESCE(last_seen_ms, 0), $2)
                     WHERE node_id = $1",
                    &[id, &now],
                )?;
                if n == 0 {
                    return Err(StoreError::UnknownNode((*id).to_owned()));
                }
            }
            Ok(())
        })
    }

    fn set_stale(
        &mut self,
        node_id: &str,
        stale: bool,
        epoch: Option<u64>,
        reason: &str,
        now_ms: u64,
    ) -> Result<()> {
        self.atomic(|s| {
            let n = s.exec(
                "UPDATE nodes SET stale = $2 WHERE node_id = $1 AND removed_at_ms IS NULL",
                &[&node_id, &stale],
            )?;
            if n == 0 {
                return Err(StoreError::UnknownNode(node_id.to_owned()));
            }
            s.audit_in(
                if stale {
                    AuditKind::Stale
                } else {
                    AuditKind::Rejoin
                },
                Some(node_id),
                &serde_json::json!({ "epoch": epoch, "reason": reason }),
                now_ms,
            )?;
            Ok(())
        })
    }

    fn node(&self, node_id: &str) -> Result<Option<NodeRecord>> {
        self.query_opt(
            &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE node_id = $1"),
            &[&node_id],
        )?
        .as_ref()
        .map(node_from_row)
        .transpose()
    }

    fn nodes(&self, include_removed: bool) -> Result<Vec<NodeRecord>> {
        self.query_nodes(if include_removed {
            ""
        } else {
            "WHERE removed_at_ms IS NULL"
        })
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
        let (e, now) = (to_i64(epoch)?, to_i64(now_ms)?);
        self.atomic(|s| {
            if s.query_opt("SELECT 1 FROM keys WHERE epoch = $1", &[&e])?
                .is_some()
            {
                return Err(StoreError::EpochExists(epoch));
            }
            s.exec(
                "INSERT INTO keys (epoch, created_at_ms, check_value, trigger, trigger_detail,
                                   activated_at_ms)
                 VALUES ($1, $2, $3, $4, $5, CASE WHEN $4::TEXT = 'Initial' THEN $2::BIGINT END)",
                &[
                    &e,
                    &now,
                    &check_value,
                    &trigger.as_str(),
                    &trigger_detail.to_string(),
                ],
            )?;
            for id in recipients {
                s.exec(
                    "INSERT INTO key_deliveries (epoch, node_id) VALUES ($1, $2)",
                    &[&e, id],
                )
                .map_err(|err| unknown_node(err, id))?;
            }
            s.audit_in(
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
            Ok(())
        })
    }

    fn record_sent(&mut self, epoch: u64, node_ids: &[&str], now_ms: u64) -> Result<()> {
        let (e, now) = (to_i64(epoch)?, to_i64(now_ms)?);
        let ids = distinct(node_ids);
        self.atomic(|s| {
            s.check_epoch(epoch)?;
            s.exec(
                "INSERT INTO key_deliveries AS d
                   (epoch, node_id, first_sent_at_ms, last_sent_at_ms, attempts)
                 SELECT $1, id, $3, $3, 1 FROM unnest($2::text[]) AS id
                 ON CONFLICT (epoch, node_id) DO UPDATE SET
                   first_sent_at_ms = COALESCE(d.first_sent_at_ms, excluded.first_sent_at_ms),
                   last_sent_at_ms = excluded.last_sent_at_ms,
                   attempts = d.attempts + 1",
                &[&e, &ids, &now],
            )
            .map_err(|err| s.unknown_among(err, &ids))?;
            Ok(())
        })
    }

    fn record_ack(&mut self, epoch: u64, node_ids: &[&str], now_ms: u64) -> Result<()> {
        let (e, now) = (to_i64(epoch)?, to_i64(now_ms)?);
        let ids = distinct(node_ids);
        self.atomic(|s| {
            s.check_epoch(epoch)?;
            s.exec(
                "INSERT INTO key_deliveries AS d (epoch, node_id, acked_at_ms)
                 SELECT $1, id, $3 FROM unnest($2::text[]) AS id
                 ON CONFLICT (epoch, node_id) DO UPDATE SET
                   acked_at_ms = COALESCE(d.acked_at_ms, excluded.acked_at_ms)",
                &[&e, &ids, &now],
            )
            .map_err(|err| s.unknown_among(err, &ids))?;
            s.exec(
                "UPDATE nodes SET last_seen_ms = GREATEST(COALESCE(last_seen_ms, 0), $2)
                 WHERE node_id = ANY($1)",
                &[&ids, &now],
            )?;
            Ok(())
        })
    }

    fn retire_key(&mut self, epoch: u64, now_ms: u64) -> Result<()> {
        let n = self.exec(
            "UPDATE keys SET retired_at_ms = COALESCE(retired_at_ms, $2) WHERE epoch = $1",
            &[&to_i64(epoch)?, &to_i64(now_ms)?],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownEpoch(epoch));
        }
        Ok(())
    }

    fn activate_key(&mut self, epoch: u64, now_ms: u64) -> Result<()> {
        let n = self.exec(
            "UPDATE keys SET activated_at_ms = COALESCE(activated_at_ms, $2) WHERE epoch = $1",
            &[&to_i64(epoch)?, &to_i64(now_ms)?],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownEpoch(epoch));
        }
        Ok(())
    }

    fn current_epoch(&self) -> Result<Option<u64>> {
        let row = self.query_opt(
            "SELECT MAX(epoch) FROM keys WHERE activated_at_ms IS NOT NULL",
            &[],
        )?;
        let e: Option<i64> = row.map(|r| r.try_get(0)).transpose()?.flatten();
        opt_u64("keys.epoch", e)
    }

    fn newest_epoch(&self) -> Result<Option<u64>> {
        let row = self.query_opt("SELECT MAX(epoch) FROM keys", &[])?;
        let e: Option<i64> = row.map(|r| r.try_get(0)).transpose()?.flatten();
        opt_u64("keys.epoch", e)
    }

    fn history(&self) -> Result<Vec<KeyRecord>> {
        let keys = self.query(
            "SELECT epoch, created_at_ms, check_value, trigger, trigger_detail, retired_at_ms,
                    activated_at_ms
             FROM keys ORDER BY epoch",
            &[],
        )?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let epoch: i64 = k.try_get(0)?;
            let deliveries = self
                .query(
                    "SELECT d.node_id, d.first_sent_at_ms, d.last_sent_at_ms, d.attempts, d.acked_at_ms
                     FROM key_deliveries d JOIN nodes n ON n.node_id = d.node_id
                     WHERE d.epoch = $1 ORDER BY n.member_no",
                    &[&epoch],
                )?
                .iter()
                .map(|r| {
                    Ok(DeliveryRecord {
                        node_id: r.try_get(0)?,
                        first_sent_at_ms: opt_u64(
                            "key_deliveries.first_sent_at_ms",
                            r.try_get(1)?,
                        )?,
                        last_sent_at_ms: opt_u64("key_deliveries.last_sent_at_ms", r.try_get(2)?)?,
                        attempts: to_u64("key_deliveries.attempts", r.try_get(3)?)?,
                        acked_at_ms: opt_u64("key_deliveries.acked_at_ms", r.try_get(4)?)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let handouts = self
                .query(
                    "SELECT node_id, via, at_ms FROM key_handouts WHERE epoch = $1 ORDER BY id",
                    &[&epoch],
                )?
                .iter()
                .map(|r| {
                    let via: String = r.try_get(1)?;
                    Ok(HandoutRecord {
                        node_id: r.try_get(0)?,
                        via: Handout::parse("key_handouts.via", &via)?,
                        at_ms: to_u64("key_handouts.at_ms", r.try_get(2)?)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let trigger: String = k.try_get(3)?;
            let detail: String = k.try_get(4)?;
            out.push(KeyRecord {
                epoch: to_u64("keys.epoch", epoch)?,
                created_at_ms: to_u64("keys.created_at_ms", k.try_get(1)?)?,
                check_value: k.try_get(2)?,
                trigger: Trigger::parse("keys.trigger", &trigger)?,
                trigger_detail: serde_json::from_str(&detail).map_err(|_| {
                    StoreError::BadValue {
                        column: "keys.trigger_detail",
                        value: detail.clone(),
                    }
                })?,
                activated_at_ms: opt_u64("keys.activated_at_ms", k.try_get(6)?)?,
                retired_at_ms: opt_u64("keys.retired_at_ms", k.try_get(5)?)?,
                deliveries,
                handouts,
            });
        }
        Ok(out)
    }

    fn round_started(&mut self, epoch: u64, nodes: u64, now_ms: u64) -> Result<i64> {
        let now = to_i64(now_ms)?;
        let row = self
            .query_opt(
                "INSERT INTO rounds (epoch, started_at_ms, phase, phase_started_at_ms, nodes)
                 VALUES ($1, $2, $3, $2, $4) RETURNING id",
                &[
                    &to_i64(epoch)?,
                    &now,
                    &RoundPhase::Distributing.as_str(),
                    &to_i64(nodes)?,
                ],
            )
            .map_err(|err| match err {
                StoreError::Postgres(e) if is(&e, &SqlState::FOREIGN_KEY_VIOLATION) => {
                    StoreError::UnknownEpoch(epoch)
                }
                other => other,
            })?
            .expect("INSERT .. RETURNING returns a row");
        Ok(row.try_get(0)?)
    }

    fn round_phase(&mut self, id: i64, phase: RoundPhase, now_ms: u64) -> Result<()> {
        let now = to_i64(now_ms)?;
        self.atomic(|s| {
            s.close_phase(id, now_ms)?;
            s.exec(
                "UPDATE rounds SET phase = $2, phase_started_at_ms = $3 WHERE id = $1",
                &[&id, &phase.as_str(), &now],
            )?;
            Ok(())
        })
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
        let (now, acked, stale) = (to_i64(now_ms)?, to_i64(acked)?, to_i64(stale)?);
        self.atomic(|s| {
            s.close_phase(id, now_ms)?;
            s.exec(
                "UPDATE rounds SET phase = NULL, phase_started_at_ms = $2, finished_at_ms = $2,
                 outcome = $3, outcome_detail = $4, acked = $5, stale = $6, paused_at_ms = NULL
                 WHERE id = $1",
                &[&id, &now, &outcome.as_str(), &detail, &acked, &stale],
            )?;
            Ok(())
        })
    }

    fn round_paused(&mut self, id: i64, detail: &str, now_ms: u64) -> Result<()> {
        let n = self.exec(
            "UPDATE rounds SET pauses = pauses + 1, paused_at_ms = $2, pause_detail = $3
             WHERE id = $1 AND finished_at_ms IS NULL",
            &[&id, &to_i64(now_ms)?, &detail],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownRound(id));
        }
        Ok(())
    }

    fn round_resumed(&mut self, id: i64) -> Result<()> {
        let n = self.exec(
            "UPDATE rounds SET paused_at_ms = NULL WHERE id = $1",
            &[&id],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownRound(id));
        }
        Ok(())
    }

    fn rounds(&self, unfinished_only: bool) -> Result<Vec<RoundRecord>> {
        let filter = if unfinished_only {
            "WHERE finished_at_ms IS NULL"
        } else {
            ""
        };
        self.query(
            &format!(
                "SELECT id, epoch, started_at_ms, phase, phase_started_at_ms, distributing_ms,
                        first_transition_ms, draining_ms, second_transition_ms, nodes, acked, stale,
                        finished_at_ms, outcome, outcome_detail, pauses, paused_at_ms, pause_detail
                 FROM rounds {filter} ORDER BY id"
            ),
            &[],
        )?
        .iter()
        .map(|r| {
            let phase: Option<String> = r.try_get(3)?;
            let outcome: Option<String> = r.try_get(13)?;
            Ok(RoundRecord {
                id: r.try_get(0)?,
                epoch: to_u64("rounds.epoch", r.try_get(1)?)?,
                started_at_ms: to_u64("rounds.started_at_ms", r.try_get(2)?)?,
                phase: parse_phase(phase.as_deref())?,
                phase_started_at_ms: to_u64("rounds.phase_started_at_ms", r.try_get(4)?)?,
                phases_ms: durations([r.try_get(5)?, r.try_get(6)?, r.try_get(7)?, r.try_get(8)?])?,
                nodes: to_u64("rounds.nodes", r.try_get(9)?)?,
                acked: opt_u64("rounds.acked", r.try_get(10)?)?,
                stale: opt_u64("rounds.stale", r.try_get(11)?)?,
                finished_at_ms: opt_u64("rounds.finished_at_ms", r.try_get(12)?)?,
                outcome: outcome
                    .map(|o| Outcome::parse("rounds.outcome", &o))
                    .transpose()?,
                outcome_detail: r.try_get(14)?,
                pauses: to_u64("rounds.pauses", r.try_get(15)?)?,
                paused_at_ms: opt_u64("rounds.paused_at_ms", r.try_get(16)?)?,
                pause_detail: r.try_get(17)?,
            })
        })
        .collect()
    }

    fn audit(
        &mut self,
        kind: AuditKind,
        node_id: Option<&str>,
        detail: &serde_json::Value,
        now_ms: u64,
    ) -> Result<i64> {
        self.audit_in(kind, node_id, detail, now_ms)
    }

    fn acquire_lease(&mut self, holder: &str, lease_ms: u64) -> Result<LeaseOutcome> {
        // One statement, judged by the server's clock: the row is created,
        // renewed by its holder, or taken over once expired (next term);
        // concurrent callers are serialised by the row's lock.
        let ms = to_i64(lease_ms)?;
        let sql = format!(
            "INSERT INTO leader_lease AS l (one, holder, term, expires_at_ms)
             VALUES (true, $1, 1, {SERVER_MS} + $2)
             ON CONFLICT (one) DO UPDATE SET
               term = CASE WHEN l.holder = EXCLUDED.holder THEN l.term ELSE l.term + 1 END,
               holder = EXCLUDED.holder,
               expires_at_ms = EXCLUDED.expires_at_ms
             WHERE l.holder = EXCLUDED.holder OR l.expires_at_ms <= {SERVER_MS}
             RETURNING holder, term, expires_at_ms - {SERVER_MS}"
        );
        if let Some(r) = self.query_opt(&sql, &[&holder, &ms])? {
            return Ok(LeaseOutcome::Held(lease_row(&r)?));
        }
        match self.lease()? {
            Some(l) => Ok(LeaseOutcome::Taken(l)),
            // Released and gone between the two statements: ask again.
            None => self.acquire_lease(holder, lease_ms),
        }
    }

    fn release_lease(&mut self, holder: &str, term: u32) -> Result<()> {
        self.exec(
            &format!(
                "UPDATE leader_lease SET expires_at_ms = {SERVER_MS}
                 WHERE holder = $1 AND term = $2"
            ),
            &[&holder, &i64::from(term)],
        )?;
        Ok(())
    }

    fn request_enrolment(
        &mut self,
        node_id: &str,
        body: &[u8],
        by: &str,
        now_ms: u64,
    ) -> Result<i64> {
        let r = self
            .query_opt(
                &format!(
                    "WITH r AS (INSERT INTO enrol_requests (node_id, body, requested_at_ms, requested_by)
                     VALUES ($1, $2, $3, $4) RETURNING id)
                     SELECT id, pg_notify('{ENROL_CHANNEL}', '') FROM r"
                ),
                &[&node_id, &body, &to_i64(now_ms)?, &by],
            )?
            .ok_or_else(|| StoreError::BadValue {
                column: "enrol_requests.id",
                value: "no id returned".into(),
            })?;
        Ok(r.try_get(0)?)
    }
    fn listen_enrolments(&mut self) -> Result<Option<Arc<tokio::sync::Notify>>> {
        self.batch_sql(&format!("LISTEN {ENROL_CHANNEL}"))?;
        self.listening.set(true);
        Ok(Some(self.signal.clone()))
    }
    fn open_enrolments(&self, limit: u32) -> Result<Vec<EnrolRequest>> {
        self.query(
            "SELECT id, node_id, body, requested_by FROM enrol_requests
             WHERE answered_at_ms IS NULL AND body IS NOT NULL ORDER BY id LIMIT $1",
            &[&i64::from(limit)],
        )?
        .iter()
        .map(|r| {
            Ok(EnrolRequest {
                id: r.try_get(0)?,
                node_id: r.try_get(1)?,
                body: r.try_get(2)?,
                requested_by: r.try_get(3)?,
            })
        })
        .collect()
    }
    fn answer_enrolment(&mut self, id: i64, answer: &str, now_ms: u64) -> Result<()> {
        self.exec(
            "UPDATE enrol_requests SET answer = $2, answered_at_ms = $3, body = NULL WHERE id = $1",
            &[&id, &answer, &to_i64(now_ms)?],
        )?;
        Ok(())
    }
    fn enrolment_answer(&self, id: i64) -> Result<Option<String>> {
        Ok(self
            .query_opt("SELECT answer FROM enrol_requests WHERE id = $1", &[&id])?
            .map(|r| r.try_get::<_, Option<String>>(0))
            .transpose()?
            .flatten())
    }
    fn fence(&mut self, holder: &str, term: u32) -> Result<()> {
        // FOR SHARE: a standby's takeover (an UPDATE of this row) waits for
        // the end of this batch, so no write of a deposed leader lands after it.
        let held = self
            .query_opt(
                &format!(
                    "SELECT expires_at_ms > {SERVER_MS} FROM leader_lease
                     WHERE holder = $1 AND term = $2 FOR SHARE"
                ),
                &[&holder, &i64::from(term)],
            )?
            .map(|r| r.try_get::<_, bool>(0))
            .transpose()?;
        match held {
            Some(true) => Ok(()),
            _ => Err(StoreError::Fenced {
                holder: holder.to_owned(),
                term,
            }),
        }
    }
    fn put_state_core(&mut self, body: &[u8], now_ms: u64) -> Result<()> {
        self.exec(
            "INSERT INTO controller_state (one, body, updated_at_ms) VALUES (1, $1, $2)
             ON CONFLICT (one) DO UPDATE SET body = excluded.body, updated_at_ms = excluded.updated_at_ms",
            &[&body, &to_i64(now_ms)?],
        )?;
        Ok(())
    }
    fn put_state_member(&mut self, member: u32, body: &[u8]) -> Result<()> {
        self.exec(
            "INSERT INTO member_state (member, body) VALUES ($1, $2)
             ON CONFLICT (member) DO UPDATE SET body = excluded.body",
            &[&i64::from(member), &body],
        )?;
        Ok(())
    }
    fn delete_state_member(&mut self, member: u32) -> Result<()> {
        self.atomic(|e| {
            e.exec(
                "DELETE FROM member_state WHERE member = $1",
                &[&i64::from(member)],
            )?;
            e.exec(
                "DELETE FROM replay_marks WHERE member = $1",
                &[&i64::from(member)],
            )?;
            Ok(())
        })
    }
    fn put_replay_marks(&mut self, marks: &[(u32, u64)]) -> Result<()> {
        // One statement for every mark (arrays unnested), not one round trip each.
        let members: Vec<i64> = marks.iter().map(|&(m, _)| i64::from(m)).collect();
        // Bit for bit: a sequence number is any u64.
        let seqs: Vec<i64> = marks.iter().map(|&(_, s)| s as i64).collect();
        self.exec(
            "INSERT INTO replay_marks (member, seq) SELECT * FROM unnest($1::bigint[], $2::bigint[])
             ON CONFLICT (member) DO UPDATE SET seq = excluded.seq",
            &[&members, &seqs],
        )?;
        Ok(())
    }
    fn state_rows(&self) -> Result<StateRows> {
        let core = self
            .query_opt("SELECT body FROM controller_state", &[])?
            .map(|r| r.try_get::<_, Vec<u8>>(0))
            .transpose()?;
        let members = self
            .query("SELECT member, body FROM member_state ORDER BY member", &[])?
            .iter()
            .map(|r| {
                Ok((
                    member_no("member_state.member", r.try_get(0)?)?,
                    r.try_get(1)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let marks = self
            .query("SELECT member, seq FROM replay_marks ORDER BY member", &[])?
            .iter()
            .map(|r| {
                let seq: i64 = r.try_get(1)?;
                Ok((member_no("replay_marks.member", r.try_get(0)?)?, seq as u64))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StateRows {
            core,
            members,
            marks,
        })
    }
    fn lease(&self) -> Result<Option<LeaseRecord>> {
        self.query_opt(
            &format!("SELECT holder, term, expires_at_ms - {SERVER_MS} FROM leader_lease"),
            &[],
        )?
        .as_ref()
        .map(lease_row)
        .transpose()
    }

    fn audit_log(&self, after_id: i64, limit: u32) -> Result<Vec<AuditRecord>> {
        self.query(
            "SELECT id, at_ms, kind, node_id, detail FROM audit WHERE id > $1 ORDER BY id LIMIT $2",
            &[&after_id, &i64::from(limit)],
        )?
        .iter()
        .map(|r| {
            let kind: String = r.try_get(2)?;
            let detail: String = r.try_get(4)?;
            Ok(AuditRecord {
                id: r.try_get(0)?,
                at_ms: to_u64("audit.at_ms", r.try_get(1)?)?,
                kind: AuditKind::parse("audit.kind", &kind)?,
                node_id: r.try_get(3)?,
                detail: serde_json::from_str(&detail).map_err(|_| StoreError::BadValue {
                    column: "audit.detail",
                    value: detail.clone(),
                })?,
            })
        })
        .collect()
    }
}

/// A foreign-key violation on a delivery row: the node is not enrolled.
/// `ids` without repeats, in their order.
fn distinct(ids: &[&str]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    ids.iter()
        .filter(|id| seen.insert(**id))
        .map(|id| (*id).to_owned())
        .collect()
}

impl PgEngine {
    /// A row for several nodes refused by the foreign key to `nodes`: the
    /// first of `ids` the table does not have, as [`unknown_node`] names it
    /// for one node; any other error as it is.
    fn unknown_among(&self, err: StoreError, ids: &[String]) -> StoreError {
        match unknown_node(err, "") {
            StoreError::UnknownNode(_) => self.first_unknown(ids, "").unwrap_or_else(|e| e),
            other => other,
        }
    }

    /// The first of `ids` with no row in `nodes` (`filter`: more conditions,
    /// as `AND removed_at_ms IS NULL` for enrolled nodes only), as the error.
    fn first_unknown(&self, ids: &[String], filter: &str) -> Result<StoreError> {
        let rows = self.query(
            &format!("SELECT node_id FROM nodes WHERE node_id = ANY($1) {filter}"),
            &[&ids],
        )?;
        let known: std::collections::HashSet<String> = rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<_, _>>()?;
        Ok(StoreError::UnknownNode(
            ids.iter()
                .find(|id| !known.contains(*id))
                .cloned()
                .unwrap_or_default(),
        ))
    }
}

fn unknown_node(err: StoreError, id: &str) -> StoreError {
    match err {
        StoreError::Postgres(e) if is(&e, &SqlState::FOREIGN_KEY_VIOLATION) => {
            StoreError::UnknownNode(id.to_owned())
        }
        other => other,
    }
}
