//! The management table's schema, one migration per version, in each engine's
//! dialect: [`MIGRATIONS`] for SQLite, [`PG_MIGRATIONS`] for PostgreSQL. Both
//! lists have the same length and version N means the same tables, columns and
//! constraints on both (`store::tests` runs one suite against both).
//!
//! SQLite keeps the version in `user_version` (via `rusqlite_migration`);
//! PostgreSQL in the one-row table `keyfleet_schema`, migrated in one
//! transaction under an advisory lock so that two controllers starting at once
//! do not both migrate. Never edit a released migration: append a new one to
//! both lists.

use rusqlite_migration::{Migrations, M};

/// Version 1: nodes, keys, key deliveries, rounds, audit.
const V1: &str = r#"
CREATE TABLE nodes (
    node_id        TEXT PRIMARY KEY NOT NULL CHECK (length(node_id) > 0),
    member_no      INTEGER NOT NULL UNIQUE,
    address        TEXT NOT NULL,
    key_check      TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN
                     ('Enrolled', 'UpdateCompleted', 'DistributionCompleted', 'InTransit')),
    epoch          INTEGER,
    last_seen_ms   INTEGER,
    stale          INTEGER NOT NULL DEFAULT 0 CHECK (stale IN (0, 1)),
    enrolled_at_ms INTEGER NOT NULL,
    removed_at_ms  INTEGER
) STRICT;

CREATE TABLE keys (
    epoch          INTEGER PRIMARY KEY NOT NULL CHECK (epoch >= 0),
    created_at_ms  INTEGER NOT NULL,
    check_value    TEXT NOT NULL,
    trigger        TEXT NOT NULL,
    trigger_detail TEXT NOT NULL DEFAULT 'null',
    retired_at_ms  INTEGER
) STRICT;

CREATE TABLE key_deliveries (
    epoch            INTEGER NOT NULL REFERENCES keys(epoch),
    node_id          TEXT NOT NULL REFERENCES nodes(node_id),
    first_sent_at_ms INTEGER,
    last_sent_at_ms  INTEGER,
    attempts         INTEGER NOT NULL DEFAULT 0,
    acked_at_ms      INTEGER,
    PRIMARY KEY (epoch, node_id)
) STRICT;

CREATE TABLE rounds (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch               INTEGER NOT NULL REFERENCES keys(epoch),
    started_at_ms       INTEGER NOT NULL,
    phase               TEXT NOT NULL CHECK (phase IN
                          ('Distribute', 'FirstTransition', 'SecondTransition', 'Finished')),
    phase_started_at_ms INTEGER NOT NULL,
    distribute_ms       INTEGER,
    first_transition_ms INTEGER,
    second_transition_ms INTEGER,
    nodes               INTEGER NOT NULL,
    acked               INTEGER,
    stale               INTEGER,
    finished_at_ms      INTEGER,
    outcome             TEXT CHECK (outcome IS NULL OR outcome IN ('Completed', 'Aborted', 'Superseded')),
    outcome_detail      TEXT
) STRICT;

CREATE TABLE audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms   INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    node_id TEXT,
    detail  TEXT NOT NULL DEFAULT 'null' CHECK (json_valid(detail))
) STRICT;
"#;

/// Version 2: indexes for the per-node and time-ordered queries.
const V2: &str = r#"
CREATE INDEX key_deliveries_by_node ON key_deliveries(node_id, epoch);
CREATE INDEX audit_by_time ON audit(at_ms);
CREATE INDEX audit_by_node ON audit(node_id) WHERE node_id IS NOT NULL;
CREATE INDEX rounds_by_epoch ON rounds(epoch);
"#;

/// Version 3 (state revision 2, issue 12): what claim 6 asks of the table.
/// Every address change of a node as a row (old, new, when, which
/// authenticated message caused it); keys handed out by a join or a key
/// request; when each key became current (a round that did not complete
/// never makes its key current); pauses of a round that reached too few nodes.
///
/// Keys of older databases count as activated when a completed round brought
/// them, when they are the initial key, or when they were retired.
const V3: &str = r#"
CREATE TABLE address_changes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id     TEXT NOT NULL REFERENCES nodes(node_id),
    old_address TEXT,
    new_address TEXT NOT NULL,
    at_ms       INTEGER NOT NULL,
    message     TEXT NOT NULL,
    seq         INTEGER NOT NULL CHECK (seq >= 0)
) STRICT;
CREATE INDEX address_changes_by_node ON address_changes(node_id, id);

CREATE TABLE key_handouts (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch   INTEGER NOT NULL REFERENCES keys(epoch),
    node_id TEXT NOT NULL REFERENCES nodes(node_id),
    via     TEXT NOT NULL CHECK (via IN ('Join', 'KeyRequest')),
    at_ms   INTEGER NOT NULL
) STRICT;
CREATE INDEX key_handouts_by_epoch ON key_handouts(epoch, id);

ALTER TABLE keys ADD COLUMN activated_at_ms INTEGER;
UPDATE keys SET activated_at_ms = COALESCE(
    (SELECT MIN(r.finished_at_ms) FROM rounds r
      WHERE r.epoch = keys.epoch AND r.outcome = 'Completed'),
    CASE WHEN trigger = 'Initial' OR retired_at_ms IS NOT NULL THEN created_at_ms END);

ALTER TABLE rounds ADD COLUMN pauses INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rounds ADD COLUMN paused_at_ms INTEGER;
ALTER TABLE rounds ADD COLUMN pause_detail TEXT;
"#;

/// Version 4 (issue 15): one member numbering. The controller numbers its
/// members and the table records that number (it no longer counts
/// `MAX(member_no) + 1` itself), so member numbers are unique among the
/// enrolled nodes, while a removed node's row keeps the number it last had;
/// a node enrolled without an address (learned from its first authenticated
/// message) has none yet. SQLite cannot drop a column constraint in place:
/// the table is rebuilt (its 12-step procedure; foreign keys are off during
/// migrations, see `Store::open`, and checked after this step). The
/// tables of version 3 that name `nodes(node_id)` keep their references:
/// they name the table, which the rename gives back.
const V4: &str = r#"
CREATE TABLE nodes_v3 (
    node_id        TEXT PRIMARY KEY NOT NULL CHECK (length(node_id) > 0),
    member_no      INTEGER NOT NULL CHECK (member_no > 0),
    address        TEXT,
    key_check      TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN
                     ('Enrolled', 'UpdateCompleted', 'DistributionCompleted', 'InTransit')),
    epoch          INTEGER,
    last_seen_ms   INTEGER,
    stale          INTEGER NOT NULL DEFAULT 0 CHECK (stale IN (0, 1)),
    enrolled_at_ms INTEGER NOT NULL,
    removed_at_ms  INTEGER
) STRICT;
INSERT INTO nodes_v3 SELECT node_id, member_no, address, key_check, state, epoch,
    last_seen_ms, stale, enrolled_at_ms, removed_at_ms FROM nodes;
DROP TABLE nodes;
ALTER TABLE nodes_v3 RENAME TO nodes;
CREATE UNIQUE INDEX nodes_enrolled_member ON nodes(member_no) WHERE removed_at_ms IS NULL;
CREATE INDEX nodes_by_member ON nodes(member_no);
"#;

/// Version 5 (issue 16): the leader lease. One row: who leads, under which
/// term, until when (`NULL`: never expires, the sole leader of an embedded
/// table). On PostgreSQL the controllers sharing the table take and renew it
/// by the server's clock; the SQLite engine only records its sole leader.
const V5: &str = r#"
CREATE TABLE leader_lease (
    one           INTEGER PRIMARY KEY NOT NULL DEFAULT 1 CHECK (one = 1),
    holder        TEXT NOT NULL CHECK (length(holder) > 0),
    term          INTEGER NOT NULL CHECK (term > 0 AND term <= 4294967295),
    expires_at_ms INTEGER
) STRICT;
"#;

/// Version 6 (issues 14 and 16): the controller's own state in the table, so
/// that every controller sharing it can continue from it. `controller_state`
/// (one row: keys, round in progress, counters) and `member_state` (one row
/// per member: its key-encryption and MAC keys, ratchet) hold sealed bodies
/// (AES-256-GCM under the state key of `controller.secrets`, see
/// `controller::state`); `replay_marks` the highest sequence number accepted
/// from each member (not secret; the `u64` stored bit for bit as `INTEGER`);
/// `enrol_requests` the enrolments installers ask of the leader through a
/// shared table (issue 16.4): the node id, the sealed request (initial key,
/// address; erased once answered) and the answer.
const V6: &str = r#"
CREATE TABLE controller_state (
    one           INTEGER PRIMARY KEY NOT NULL DEFAULT 1 CHECK (one = 1),
    body          BLOB NOT NULL,
    updated_at_ms INTEGER NOT NULL
) STRICT;

CREATE TABLE member_state (
    member INTEGER PRIMARY KEY NOT NULL CHECK (member >= 0 AND member <= 4294967295),
    body   BLOB NOT NULL
) STRICT;

CREATE TABLE replay_marks (
    member INTEGER PRIMARY KEY NOT NULL CHECK (member >= 0 AND member <= 4294967295),
    seq    INTEGER NOT NULL
) STRICT;

CREATE TABLE enrol_requests (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id         TEXT NOT NULL CHECK (length(node_id) > 0),
    body            BLOB,
    requested_at_ms INTEGER NOT NULL,
    requested_by    TEXT NOT NULL,
    answered_at_ms  INTEGER,
    answer          TEXT CHECK (answer IS NULL OR json_valid(answer))
) STRICT;
CREATE INDEX enrol_requests_open ON enrol_requests(id) WHERE answered_at_ms IS NULL;
"#;

/// Version 7: one vocabulary for a round's phase. `rounds.phase` holds
/// `wire::RoundPhase::as_str` (`distributing`, `first_transition`, `draining`,
/// `second_transition`) and is `NULL` once the round finished; the drain has
/// its own phase and duration column (it used to be counted into the second
/// transition), and `distribute_ms` is `distributing_ms`. The names of older
/// versions are rewritten (`Distribute`, `FirstTransition`,
/// `SecondTransition`; `Finished` becomes `NULL`). The table is rebuilt for
/// its new `CHECK` (SQLite cannot change one in place; nothing references
/// `rounds`).
const V7: &str = r#"
CREATE TABLE rounds_v7 (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch                INTEGER NOT NULL REFERENCES keys(epoch),
    started_at_ms        INTEGER NOT NULL,
    phase                TEXT CHECK (phase IS NULL OR phase IN
                           ('distributing', 'first_transition', 'draining', 'second_transition')),
    phase_started_at_ms  INTEGER NOT NULL,
    distributing_ms      INTEGER,
    first_transition_ms  INTEGER,
    draining_ms          INTEGER,
    second_transition_ms INTEGER,
    nodes                INTEGER NOT NULL,
    acked                INTEGER,
    stale                INTEGER,
    finished_at_ms       INTEGER,
    outcome              TEXT CHECK (outcome IS NULL OR outcome IN ('Completed', 'Aborted', 'Superseded')),
    outcome_detail       TEXT,
    pauses               INTEGER NOT NULL DEFAULT 0,
    paused_at_ms         INTEGER,
    pause_detail         TEXT
) STRICT;
INSERT INTO rounds_v7 (id, epoch, started_at_ms, phase, phase_started_at_ms, distributing_ms,
    first_transition_ms, second_transition_ms, nodes, acked, stale, finished_at_ms, outcome,
    outcome_detail, pauses, paused_at_ms, pause_detail)
SELECT id, epoch, started_at_ms,
    CASE phase WHEN 'Distribute' THEN 'distributing'
               WHEN 'FirstTransition' THEN 'first_transition'
               WHEN 'SecondTransition' THEN 'second_transition' END,
    phase_started_at_ms, distribute_ms, first_transition_ms, second_transition_ms, nodes, acked,
    stale, finished_at_ms, outcome, outcome_detail, pauses, paused_at_ms, pause_detail
FROM rounds;
DROP TABLE rounds;
ALTER TABLE rounds_v7 RENAME TO rounds;
CREATE INDEX rounds_by_epoch ON rounds(epoch);
"#;

/// Version 8: no `key_deliveries_by_node`. No query reads the deliveries by
/// node (`status` and `history` read them by epoch, the primary key's
/// prefix; nodes are never deleted, so no foreign key check looks them up by
/// node either), and a round's deliveries, one row per node, each went to a
/// page of its own in that index: about 90 pages of the write-ahead log in
/// the round start's commit at 100 nodes, on the way to the key update
/// (7.6 → 2.3–4.3 ms from the `rekey` request to that commit, `perf trace`).
const V8: &str = r#"
DROP INDEX IF EXISTS key_deliveries_by_node;
"#;

const MIGRATIONS: &[M<'static>] = &[
    M::up(V1).foreign_key_check(),
    M::up(V2),
    M::up(V3).foreign_key_check(),
    M::up(V4).foreign_key_check(),
    M::up(V5),
    M::up(V6),
    M::up(V7).foreign_key_check(),
    M::up(V8),
];

/// PostgreSQL version 1: the tables of SQLite's [`V1`]. Differences of dialect
/// only: `BIGINT` for SQLite's 64-bit `INTEGER`, `BOOLEAN` for the 0/1 flag,
/// identity columns for `AUTOINCREMENT`, and a JSON cast for `json_valid`.
const PG_V1: &str = r#"
CREATE TABLE nodes (
    node_id        TEXT PRIMARY KEY NOT NULL CHECK (length(node_id) > 0),
    member_no      BIGINT NOT NULL UNIQUE,
    address        TEXT NOT NULL,
    key_check      TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN
                     ('Enrolled', 'UpdateCompleted', 'DistributionCompleted', 'InTransit')),
    epoch          BIGINT,
    last_seen_ms   BIGINT,
    stale          BOOLEAN NOT NULL DEFAULT false,
    enrolled_at_ms BIGINT NOT NULL,
    removed_at_ms  BIGINT
);

CREATE TABLE keys (
    epoch          BIGINT PRIMARY KEY NOT NULL CHECK (epoch >= 0),
    created_at_ms  BIGINT NOT NULL,
    check_value    TEXT NOT NULL,
    trigger        TEXT NOT NULL,
    trigger_detail TEXT NOT NULL DEFAULT 'null',
    retired_at_ms  BIGINT
);

CREATE TABLE key_deliveries (
    epoch            BIGINT NOT NULL REFERENCES keys(epoch),
    node_id          TEXT NOT NULL REFERENCES nodes(node_id),
    first_sent_at_ms BIGINT,
    last_sent_at_ms  BIGINT,
    attempts         BIGINT NOT NULL DEFAULT 0,
    acked_at_ms      BIGINT,
    PRIMARY KEY (epoch, node_id)
);

CREATE TABLE rounds (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    epoch               BIGINT NOT NULL REFERENCES keys(epoch),
    started_at_ms       BIGINT NOT NULL,
    phase               TEXT NOT NULL CHECK (phase IN
                          ('Distribute', 'FirstTransition', 'SecondTransition', 'Finished')),
    phase_started_at_ms BIGINT NOT NULL,
    distribute_ms       BIGINT,
    first_transition_ms BIGINT,
    second_transition_ms BIGINT,
    nodes               BIGINT NOT NULL,
    acked               BIGINT,
    stale               BIGINT,
    finished_at_ms      BIGINT,
    outcome             TEXT CHECK (outcome IS NULL OR outcome IN ('Completed', 'Aborted', 'Superseded')),
    outcome_detail      TEXT
);

CREATE TABLE audit (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms   BIGINT NOT NULL,
    kind    TEXT NOT NULL,
    node_id TEXT,
    detail  TEXT NOT NULL DEFAULT 'null' CHECK (detail::jsonb IS NOT NULL)
);
"#;

/// PostgreSQL version 2: the indexes of [`V2`] (same SQL).
const PG_V2: &str = V2;

/// PostgreSQL version 3: [`V3`] in PostgreSQL's dialect.
const PG_V3: &str = r#"
CREATE TABLE address_changes (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    node_id     TEXT NOT NULL REFERENCES nodes(node_id),
    old_address TEXT,
    new_address TEXT NOT NULL,
    at_ms       BIGINT NOT NULL,
    message     TEXT NOT NULL,
    seq         BIGINT NOT NULL CHECK (seq >= 0)
);
CREATE INDEX address_changes_by_node ON address_changes(node_id, id);

CREATE TABLE key_handouts (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    epoch   BIGINT NOT NULL REFERENCES keys(epoch),
    node_id TEXT NOT NULL REFERENCES nodes(node_id),
    via     TEXT NOT NULL CHECK (via IN ('Join', 'KeyRequest')),
    at_ms   BIGINT NOT NULL
);
CREATE INDEX key_handouts_by_epoch ON key_handouts(epoch, id);

ALTER TABLE keys ADD COLUMN activated_at_ms BIGINT;
UPDATE keys SET activated_at_ms = COALESCE(
    (SELECT MIN(r.finished_at_ms) FROM rounds r
      WHERE r.epoch = keys.epoch AND r.outcome = 'Completed'),
    CASE WHEN trigger = 'Initial' OR retired_at_ms IS NOT NULL THEN created_at_ms END);

ALTER TABLE rounds ADD COLUMN pauses BIGINT NOT NULL DEFAULT 0;
ALTER TABLE rounds ADD COLUMN paused_at_ms BIGINT;
ALTER TABLE rounds ADD COLUMN pause_detail TEXT;
"#;

/// PostgreSQL version 4: [`V4`]. PostgreSQL changes the constraints in place
/// (no table rebuild): the table-wide `UNIQUE` of V1 (named `nodes_member_no_key`
/// by PostgreSQL) gives way to uniqueness among the enrolled nodes, the
/// address may be unknown, member numbers are positive.
const PG_V4: &str = r#"
ALTER TABLE nodes DROP CONSTRAINT nodes_member_no_key;
ALTER TABLE nodes ALTER COLUMN address DROP NOT NULL;
ALTER TABLE nodes ADD CONSTRAINT nodes_member_no_positive CHECK (member_no > 0);
CREATE UNIQUE INDEX nodes_enrolled_member ON nodes(member_no) WHERE removed_at_ms IS NULL;
CREATE INDEX nodes_by_member ON nodes(member_no);
"#;

/// PostgreSQL version 5: [`V5`] in PostgreSQL's dialect.
const PG_V5: &str = r#"
CREATE TABLE leader_lease (
    one           BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    holder        TEXT NOT NULL CHECK (length(holder) > 0),
    term          BIGINT NOT NULL CHECK (term > 0 AND term <= 4294967295),
    expires_at_ms BIGINT
);
"#;

/// The PostgreSQL migrations; `PG_MIGRATIONS[i]` brings version `i` to `i + 1`.
pub(crate) const PG_MIGRATIONS: &[&str] = &[PG_V1, PG_V2, PG_V3, PG_V4, PG_V5, PG_V6, PG_V7, PG_V8];

/// PostgreSQL version 8: [`V8`].
const PG_V8: &str = V8;

/// PostgreSQL version 6: SQLite's [`V6`] (`BYTEA` for `BLOB`, `BIGINT`).
const PG_V6: &str = r#"
CREATE TABLE controller_state (
    one           INTEGER PRIMARY KEY NOT NULL DEFAULT 1 CHECK (one = 1),
    body          BYTEA NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

CREATE TABLE member_state (
    member BIGINT PRIMARY KEY NOT NULL CHECK (member >= 0 AND member <= 4294967295),
    body   BYTEA NOT NULL
);

CREATE TABLE replay_marks (
    member BIGINT PRIMARY KEY NOT NULL CHECK (member >= 0 AND member <= 4294967295),
    seq    BIGINT NOT NULL
);

CREATE TABLE enrol_requests (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    node_id         TEXT NOT NULL CHECK (length(node_id) > 0),
    body            BYTEA,
    requested_at_ms BIGINT NOT NULL,
    requested_by    TEXT NOT NULL,
    answered_at_ms  BIGINT,
    answer          TEXT CHECK (answer IS NULL OR answer::json IS NOT NULL)
);
CREATE INDEX enrol_requests_open ON enrol_requests(id) WHERE answered_at_ms IS NULL;
"#;

/// PostgreSQL version 7: [`V7`]. PostgreSQL changes the constraint and the
/// columns in place (`rounds_phase_check` is the name it gave V1's `CHECK`).
const PG_V7: &str = r#"
ALTER TABLE rounds DROP CONSTRAINT rounds_phase_check;
ALTER TABLE rounds ALTER COLUMN phase DROP NOT NULL;
UPDATE rounds SET phase = CASE phase WHEN 'Distribute' THEN 'distributing'
                                     WHEN 'FirstTransition' THEN 'first_transition'
                                     WHEN 'SecondTransition' THEN 'second_transition' END;
ALTER TABLE rounds ADD CONSTRAINT rounds_phase_check CHECK (phase IS NULL OR phase IN
    ('distributing', 'first_transition', 'draining', 'second_transition'));
ALTER TABLE rounds RENAME COLUMN distribute_ms TO distributing_ms;
ALTER TABLE rounds ADD COLUMN draining_ms BIGINT;
"#;

pub(crate) fn migrations() -> Migrations<'static> {
    Migrations::from_slice(MIGRATIONS)
}

/// The schema version this build writes.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

#[cfg(test)]
mod tests {
    #[test]
    fn migrations_are_valid() {
        super::migrations().validate().unwrap();
    }

    #[test]
    fn both_engines_have_every_version() {
        assert_eq!(super::PG_MIGRATIONS.len(), super::SCHEMA_VERSION);
    }
}
