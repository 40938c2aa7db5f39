//! The store suite. [`suite!`] runs every test in it against both engines:
//! `sqlite_engine::*` on a file in a temporary directory, `postgres_engine::*`
//! on a fresh database of a real PostgreSQL server the tests start themselves
//! ([`super::testpg`]). Then the tests of what only one engine has.

use super::testpg;
use super::*;
use rusqlite::Connection;
use serde_json::json;

/// What a test's table lives in, kept until the test ends.
struct Fixture {
    at: Location,
    _dir: Option<tempfile::TempDir>,
}

fn open_sqlite() -> Option<(Fixture, Store)> {
    let dir = tempfile::tempdir().unwrap();
    let at = Location::Sqlite(dir.path().join("fleet.db"));
    let store = Store::open_at(&at).unwrap();
    Some((
        Fixture {
            at,
            _dir: Some(dir),
        },
        store,
    ))
}

fn open_postgres() -> Option<(Fixture, Store)> {
    let at = Location::Postgres(testpg::fresh_db()?);
    let store = Store::open_at(&at).unwrap();
    Some((Fixture { at, _dir: None }, store))
}

macro_rules! suite {
    ($($tests:tt)*) => {
        mod sqlite_engine {
            use super::*;
            fn open() -> Option<(Fixture, Store)> {
                open_sqlite()
            }
            $($tests)*
        }
        mod postgres_engine {
            use super::*;
            fn open() -> Option<(Fixture, Store)> {
                open_postgres()
            }
            $($tests)*
        }
    };
}

suite! {
#[test]
fn the_controller_state_rows_are_stored_replaced_and_deleted() {
    let Some((d, mut s)) = open() else { return };
    assert_eq!(s.state_rows().unwrap(), StateRows::default());
    s.put_state_core(b"core-1", 10).unwrap();
    s.put_state_core(b"core-2", 11).unwrap();
    s.put_state_member(2, b"two").unwrap();
    s.put_state_member(1, b"one").unwrap();
    s.put_state_member(1, b"one again").unwrap();
    // A sequence number is any u64, the top bit included.
    s.put_replay_marks(&[(1, 5), (2, u64::MAX)]).unwrap();
    s.put_replay_marks(&[(1, 9)]).unwrap();
    let rows = s.state_rows().unwrap();
    assert_eq!(rows.core.as_deref(), Some(&b"core-2"[..]));
    assert_eq!(
        rows.members,
        vec![(1, b"one again".to_vec()), (2, b"two".to_vec())]
    );
    assert_eq!(rows.marks, vec![(1, 9), (2, u64::MAX)]);
    // Deleting a member deletes its mark; a whole batch undoes together.
    s.delete_state_member(2).unwrap();
    let r: Result<()> = s.batch(|s| {
        s.put_state_member(3, b"three")?;
        Err(StoreError::UnknownNode("x".into()))
    });
    assert!(r.is_err());
    let rows = s.state_rows().unwrap();
    assert_eq!(rows.members, vec![(1, b"one again".to_vec())]);
    assert_eq!(rows.marks, vec![(1, 9)]);
    // The sole leader of an embedded table is never fenced; on a shared
    // table only the lease's holder passes (postgres_a_deposed_leaders_batch_is_fenced).
    if matches!(d.at, Location::Sqlite(_)) {
        s.fence("whoever", 1).unwrap();
    } else {
        assert!(matches!(s.fence("whoever", 1), Err(StoreError::Fenced { .. })));
    }
}

#[test]
fn enroll_remove_and_reenroll() {
    let Some((_d, mut s)) = open() else { return };
    let a = s
        .enroll_node("a", 1, Some("127.0.0.1:9001"), "c0ffee", 1_000)
        .unwrap();
    let b = s
        .enroll_node("b", 2, Some("127.0.0.1:9002"), "beef01", 1_001)
        .unwrap();
    assert_eq!((a.member_no, b.member_no), (1, 2));
    assert_eq!(a.state, RecordedState::Enrolled);
    assert!(matches!(
        s.enroll_node("a", 3, Some("x:1"), "c", 1_002),
        Err(StoreError::AlreadyEnrolled(id)) if id == "a"
    ));
    s.remove_node("a", "decommissioned", 2_000).unwrap();
    assert_eq!(
        s.nodes()
            .unwrap()
            .iter()
            .map(|n| n.node_id.as_str())
            .collect::<Vec<_>>(),
        ["b"]
    );
    assert_eq!(s.all_nodes().unwrap().len(), 2);
    assert!(matches!(
        s.remove_node("a", "again", 2_001),
        Err(StoreError::UnknownNode(_))
    ));
    let c = s
        .enroll_node("c", 5, Some("127.0.0.1:9003"), "0c0c0c", 2_500)
        .unwrap();
    assert_eq!(c.member_no, 5, "the controller's number is the table's");
    let a2 = s
        .enroll_node("a", 6, Some("127.0.0.1:9101"), "a2a2a2", 3_000)
        .unwrap();
    assert_eq!(
        (a2.member_no, a2.removed_at_ms, a2.address.as_deref()),
        (6, None, Some("127.0.0.1:9101"))
    );

    let log = s.audit_log(0, 100).unwrap();
    let kinds: Vec<_> = log
        .iter()
        .map(|e| (e.kind, e.node_id.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        kinds,
        [
            (AuditKind::Enrollment, "a".to_string()),
            (AuditKind::Enrollment, "b".into()),
            (AuditKind::Removal, "a".into()),
            (AuditKind::Enrollment, "c".into()),
            (AuditKind::Enrollment, "a".into()),
        ]
    );
    assert_eq!(log[2].detail, json!({"reason": "decommissioned"}));
}

#[test]
fn key_history_records_sends_acks_and_retirement() {
    let Some((_d, mut s)) = open() else { return };
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        s.enroll_node(
            id,
            i as u64 + 1,
            Some(&format!("127.0.0.1:{}", 9000 + i)),
            "ck",
            0,
        )
        .unwrap();
    }
    s.record_key_created(
        1,
        "chk1",
        Trigger::Initial,
        &json!(null),
        &["a", "b", "c"],
        10,
    )
    .unwrap();
    s.record_sent(1, &["a", "b", "c"], 11).unwrap();
    s.record_sent(1, &["c"], 15).unwrap();
    s.record_ack(1, &["a", "b"], 12).unwrap();
    s.record_ack(1, &["a"], 14).unwrap(); // a duplicate reply keeps the first time
    s.mark_stale("c", Some(1), "no reply in 30 s", 40).unwrap();
    s.record_key_created(
        2,
        "chk2",
        Trigger::KeyAge,
        &json!({"age_ms": 86_400_000u64}),
        &["a", "b"],
        50,
    )
    .unwrap();
    // Made, not yet current: its round has not completed.
    assert_eq!(s.current_epoch().unwrap(), Some(1));
    assert_eq!(s.newest_epoch().unwrap(), Some(2));
    s.activate_key(2, 60).unwrap();
    s.retire_key(1, 60).unwrap();
    assert_eq!(s.current_epoch().unwrap(), Some(2));
    assert!(matches!(
        s.activate_key(9, 61),
        Err(StoreError::UnknownEpoch(9))
    ));

    let h = s.history().unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(
        (h[0].epoch, h[0].retired_at_ms, h[0].trigger),
        (1, Some(60), Trigger::Initial)
    );
    let d: Vec<_> = h[0]
        .deliveries
        .iter()
        .map(|d| {
            (
                d.node_id.as_str(),
                d.first_sent_at_ms,
                d.last_sent_at_ms,
                d.attempts,
                d.acked_at_ms,
            )
        })
        .collect();
    assert_eq!(
        d,
        [
            ("a", Some(11), Some(11), 1, Some(12)),
            ("b", Some(11), Some(11), 1, Some(12)),
            ("c", Some(11), Some(15), 2, None),
        ]
    );
    assert_eq!(h[1].trigger_detail, json!({"age_ms": 86_400_000u64}));
    assert_eq!(h[1].deliveries.len(), 2);
    let c = s.node("c").unwrap().unwrap();
    assert!(c.stale);
    assert_eq!(s.node("a").unwrap().unwrap().last_seen_ms, Some(14));

    assert!(matches!(
        s.record_key_created(2, "x", Trigger::Manual, &json!(null), &["a"], 70),
        Err(StoreError::EpochExists(2))
    ));
    assert!(matches!(
        s.record_sent(9, &["a"], 70),
        Err(StoreError::UnknownEpoch(9))
    ));
    let triggers: Vec<_> = s
        .audit_log(0, 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == AuditKind::Trigger)
        .map(|e| e.detail["trigger"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(triggers, ["Initial", "KeyAge"]);
}

#[test]
fn a_failing_batch_changes_nothing() {
    let Some((_d, mut s)) = open() else { return };
    s.enroll_node("a", 1, Some("h:1"), "ck", 0).unwrap();
    let err = s
        .record_key_created(1, "chk", Trigger::Manual, &json!(null), &["a", "ghost"], 5)
        .unwrap_err();
    assert!(
        matches!(err, StoreError::UnknownNode(ref id) if id == "ghost"),
        "{err}"
    );
    assert_eq!(s.current_epoch().unwrap(), None);
    assert!(s.history().unwrap().is_empty());
    assert_eq!(s.audit_log(0, 10).unwrap().len(), 1, "only the enrollment");

    s.record_key_created(1, "chk", Trigger::Manual, &json!(null), &["a"], 5)
        .unwrap();
    assert!(s.record_sent(1, &["a", "ghost"], 6).is_err());
    assert_eq!(s.history().unwrap()[0].deliveries[0].attempts, 0);
    assert!(s
        .set_node_state(&["a", "ghost"], RecordedState::InTransit, Some(1), 7)
        .is_err());
    assert_eq!(s.node("a").unwrap().unwrap().state, RecordedState::Enrolled);
}

#[test]
fn rounds_record_phase_durations() {
    let Some((_d, mut s)) = open() else { return };
    s.enroll_node("a", 1, Some("h:1"), "ck", 0).unwrap();
    s.record_key_created(1, "chk", Trigger::Manual, &json!(null), &["a"], 100)
        .unwrap();
    let id = s.round_started(1, 1, 100).unwrap();
    assert_eq!(s.unfinished_round().unwrap().map(|r| r.id), Some(id));
    assert_eq!(
        s.unfinished_round().unwrap().map(|r| r.phase),
        Some(Some(RoundPhase::Distributing))
    );
    s.round_phase(id, RoundPhase::FirstTransition, 130).unwrap();
    s.round_phase(id, RoundPhase::Draining, 180).unwrap();
    assert_eq!(
        s.unfinished_round().unwrap().map(|r| r.phase),
        Some(Some(RoundPhase::Draining))
    );
    s.round_phase(id, RoundPhase::SecondTransition, 200).unwrap();
    s.set_node_state(&["a"], RecordedState::UpdateCompleted, Some(1), 190)
        .unwrap();
    s.round_finished(id, Outcome::Completed, None, 1, 0, 300)
        .unwrap();
    let r = &s.rounds().unwrap()[0];
    assert_eq!(
        r.phases_ms,
        PhaseDurations {
            distributing: 30,
            first_transition: 50,
            draining: 20,
            second_transition: 100
        }
    );
    assert_eq!(
        (r.phase, r.outcome, r.acked, r.stale),
        (None, Some(Outcome::Completed), Some(1), Some(0))
    );
    assert_eq!(s.unfinished_round().unwrap(), None);
    assert!(matches!(
        s.round_started(7, 1, 400),
        Err(StoreError::UnknownEpoch(7))
    ));
    assert!(matches!(
        s.round_phase(99, RoundPhase::Distributing, 400),
        Err(StoreError::UnknownRound(99))
    ));
    let a = s.node("a").unwrap().unwrap();
    assert_eq!(
        (a.state, a.epoch, a.last_seen_ms),
        (RecordedState::UpdateCompleted, Some(1), Some(190))
    );
}

#[test]
fn addresses_must_be_host_port() {
    let Some((_d, mut s)) = open() else { return };
    for bad in ["h", "h:", ":7000", "h:0", "h:70000", "a b:1"] {
        assert!(
            matches!(
                s.enroll_node("n", 1, Some(bad), "ck", 0),
                Err(StoreError::BadAddress(_))
            ),
            "{bad}"
        );
    }
    for good in ["appliance-3.lan:7778", "10.1.2.3:7778", "[fe80::1]:7778"] {
        s.enroll_node(good, 1 + good.len() as u64, Some(good), "ck", 0)
            .unwrap();
    }
    assert!(s.set_address("10.1.2.3:7778", "nope").is_err());
}

#[test]
fn batch_commits_together_and_a_failed_call_inside_undoes_only_itself() {
    let Some((_d, mut s)) = open() else { return };
    s.batch(|s| {
        s.enroll_node("a", 1, Some("127.0.0.1:9001"), "c0ffee", 1_000)?;
        // Fails (unknown node): its savepoint rolls back, the batch goes on.
        assert!(matches!(
            s.node_seen(&["ghost"], 1_001),
            Err(StoreError::UnknownNode(_))
        ));
        s.enroll_node("b", 2, Some("127.0.0.1:9002"), "beef01", 1_002)?;
        Ok(())
    })
    .unwrap();
    let ids: Vec<_> = s.nodes().unwrap().into_iter().map(|n| n.node_id).collect();
    assert_eq!(ids, ["a", "b"]);
    // A batch that returns an error leaves nothing behind.
    let err = s.batch(|s| {
        s.enroll_node("c", 3, Some("127.0.0.1:9003"), "0a0b0c", 1_003)?;
        s.enroll_node("a", 4, Some("127.0.0.1:9001"), "c0ffee", 1_004)
    });
    assert!(matches!(err, Err(StoreError::AlreadyEnrolled(_))));
    assert!(s.node("c").unwrap().is_none());
    assert_eq!(s.integrity_check().unwrap(), Ok(()));
}
#[test]
fn data_survives_reopen() {
    let Some((d, mut s)) = open() else { return };
    s.enroll_node("a", 1, Some("h:1"), "ck", 0).unwrap();
    s.audit(
        AuditKind::Refusal,
        None,
        &json!({"what": "unknown sender", "from": "10.0.0.9:7777"}),
        5,
    )
    .unwrap();
    drop(s);
    let s = Store::open_at(&d.at).unwrap();
    assert_eq!(s.nodes().unwrap().len(), 1);
    let log = s.audit_log(0, 10).unwrap();
    assert_eq!(log[1].kind, AuditKind::Refusal);
    assert_eq!(log[1].detail["from"], "10.0.0.9:7777");
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION as i64);
    assert_eq!(s.integrity_check().unwrap(), Ok(()));
}


#[test]
fn address_changes_handouts_and_pauses_are_rows() {
    let Some((_d, mut s)) = open() else { return };
    s.enroll_node("a", 1, Some("10.0.0.1:7000"), "ck", 1).unwrap();
    s.record_key_created(1, "c1", Trigger::Initial, &json!(null), &[] as &[&str], 2)
        .unwrap();
    s.record_address_change("a", "10.0.0.9:7001", "join", 17, 3)
        .unwrap();
    s.record_address_change("a", "10.0.0.9:7002", "key_request", 18, 4)
        .unwrap();
    assert_eq!(
        s.node("a").unwrap().unwrap().address.as_deref(),
        Some("10.0.0.9:7002")
    );
    let h = s.address_history("a").unwrap();
    assert_eq!(
        h.iter()
            .map(|c| (
                c.old_address.as_deref().unwrap_or(""),
                c.new_address.as_str(),
                c.message.as_str(),
                c.seq,
                c.at_ms
            ))
            .collect::<Vec<_>>(),
        vec![
            ("10.0.0.1:7000", "10.0.0.9:7001", "join", 17, 3),
            ("10.0.0.9:7001", "10.0.0.9:7002", "key_request", 18, 4)
        ]
    );
    assert_eq!(s.address_changes().unwrap(), h);
    assert!(matches!(
        s.record_address_change("zz", "10.0.0.9:1", "join", 1, 5),
        Err(StoreError::UnknownNode(_))
    ));
    assert!(matches!(
        s.record_address_change("a", "no port", "join", 1, 5),
        Err(StoreError::BadAddress(_))
    ));

    // The initial key is current at once; a round's key once activated.
    s.record_key_created(2, "c2", Trigger::Manual, &json!(null), &["a"], 6)
        .unwrap();
    s.record_handout(&[1], "a", Handout::Join, 7).unwrap();
    s.record_handout(&[1, 2], "a", Handout::KeyRequest, 8)
        .unwrap();
    assert!(matches!(
        s.record_handout(&[9], "a", Handout::Join, 9),
        Err(StoreError::UnknownEpoch(9))
    ));
    let keys = s.history().unwrap();
    assert_eq!(keys[0].activated_at_ms, Some(2));
    assert_eq!(keys[1].activated_at_ms, None);
    let vias = |k: &KeyRecord| {
        k.handouts
            .iter()
            .map(|h| (h.via, h.at_ms))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        vias(&keys[0]),
        [(Handout::Join, 7), (Handout::KeyRequest, 8)]
    );
    assert_eq!(vias(&keys[1]), [(Handout::KeyRequest, 8)]);
    assert_eq!(
        keys[1].deliveries.len(),
        1,
        "the round's delivery row stays apart"
    );

    let id = s.round_started(2, 1, 6).unwrap();
    s.round_paused(id, "no node answered", 10).unwrap();
    let r = s.unfinished_round().unwrap().unwrap();
    assert_eq!((r.pauses, r.paused_at_ms), (1, Some(10)));
    assert_eq!(r.pause_detail.as_deref(), Some("no node answered"));
    s.round_resumed(id).unwrap();
    s.round_paused(id, "1 of 3", 12).unwrap();
    s.round_finished(id, Outcome::Completed, None, 1, 0, 20)
        .unwrap();
    let r = &s.rounds().unwrap()[0];
    assert_eq!((r.pauses, r.paused_at_ms), (2, None));
    assert_eq!(s.current_epoch().unwrap(), Some(1));
    s.activate_key(2, 20).unwrap();
    assert_eq!(s.current_epoch().unwrap(), Some(2));
}
#[test]
fn member_numbers_are_the_callers_and_unique_among_enrolled_nodes() {
    let Some((_d, mut s)) = open() else { return };
    s.enroll_node("a", 1, Some("h:1"), "ck", 0).unwrap();
    s.enroll_node("b", 2, None, "ck", 0).unwrap();
    assert_eq!(s.node("b").unwrap().unwrap().address, None);
    assert!(matches!(
        s.enroll_node("c", 2, Some("h:3"), "ck", 0),
        Err(StoreError::MemberTaken { member_no: 2, holder }) if holder == "b"
    ));
    // Removed, then enrolled again: the row takes the controller's new number,
    // and the removed row's old number may be given again only by the caller.
    s.remove_node("a", "gone", 1).unwrap();
    let a = s.enroll_node("a", 3, Some("h:1"), "ck", 2).unwrap();
    assert_eq!(a.member_no, 3);
    let ids: Vec<_> = s
        .nodes()
        .unwrap()
        .into_iter()
        .map(|n| (n.node_id, n.member_no))
        .collect();
    assert_eq!(ids, [("b".to_string(), 2), ("a".to_string(), 3)]);
}

#[test]
fn renumbering_swaps_numbers_in_one_step_and_audits_each() {
    let Some((_d, mut s)) = open() else { return };
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        s.enroll_node(id, i as u64 + 1, Some("h:1"), "ck", 0)
            .unwrap();
    }
    let changed = s
        .renumber_members(&[("a", 2), ("b", 1), ("c", 3)], 7)
        .unwrap();
    assert_eq!(changed, [("a".to_string(), 1, 2), ("b".to_string(), 2, 1)]);
    let got: Vec<_> = s
        .nodes()
        .unwrap()
        .into_iter()
        .map(|n| (n.node_id, n.member_no))
        .collect();
    assert_eq!(
        got,
        [
            ("b".to_string(), 1),
            ("a".to_string(), 2),
            ("c".to_string(), 3)
        ]
    );
    let renumbered = s
        .audit_log(0, 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == AuditKind::Renumbered)
        .count();
    assert_eq!(renumbered, 2);
    // A number held by a node left out of the list is refused, and nothing changes.
    assert!(matches!(
        s.renumber_members(&[("a", 3)], 8),
        Err(StoreError::MemberTaken { member_no: 3, .. })
    ));
    assert_eq!(s.node("a").unwrap().unwrap().member_no, 2);
    assert_eq!(s.integrity_check().unwrap(), Ok(()));
}
}

// ----- SQLite only -----

fn open_sqlite_engine() -> (tempfile::TempDir, SqliteEngine) {
    let dir = tempfile::tempdir().unwrap();
    let e = SqliteEngine::open(&dir.path().join("fleet.db")).unwrap();
    (dir, e)
}

#[test]
fn open_sets_wal_full_sync_foreign_keys_and_latest_schema() {
    let (_d, s) = open_sqlite_engine();
    let mode: String = s
        .conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    let sync: i64 = s
        .conn
        .pragma_query_value(None, "synchronous", |r| r.get(0))
        .unwrap();
    let fk: i64 = s
        .conn
        .pragma_query_value(None, "foreign_keys", |r| r.get(0))
        .unwrap();
    assert_eq!((mode.as_str(), sync, fk), ("wal", 2, 1));
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION as i64);
    assert_eq!(s.integrity_check().unwrap(), Ok(()));
}

/// A round's commits do not copy the write-ahead log into the table file
/// (SQLite's default would, in the commit that crosses 1000 pages); the
/// controller's idle upkeep does.
#[test]
fn the_write_ahead_log_is_checkpointed_when_idle_not_by_a_rounds_commit() {
    let (d, mut s) = open_sqlite_engine();
    let pages: i64 = s
        .conn
        .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
        .unwrap();
    assert_eq!(pages, i64::from(sqlite::WAL_AUTOCHECKPOINT_PAGES));
    for i in 0..1500u32 {
        s.put_state_member(i, &[7u8; 3000]).unwrap();
    }
    let wal = std::fs::metadata(d.path().join("fleet.db-wal"))
        .unwrap()
        .len();
    assert!(
        wal > 1000 * 4096,
        "the commits kept the log ({wal} bytes) past SQLite's default bound"
    );
    // Inside a batch the upkeep waits; after it, the log is copied, and the
    // next write starts it over from its first frame.
    s.begin().unwrap();
    s.put_state_member(1, &[8u8; 10]).unwrap();
    s.idle_upkeep().unwrap();
    s.commit().unwrap();
    s.idle_upkeep().unwrap();
    s.put_state_member(2, &[9u8; 10]).unwrap();
    let (log, copied): (i64, i64) = s
        .conn
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert!(
        log < 10,
        "the log started over after the upkeep: {log} frames"
    );
    assert_eq!(copied, log);
    assert_eq!(s.integrity_check().unwrap(), Ok(()));
}

#[test]
fn database_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let (d, mut s) = open_sqlite_engine();
    s.enroll_node("a", 1, Some("h:1"), "ck", 0).unwrap();
    for name in ["fleet.db", "fleet.db-wal", "fleet.db-shm"] {
        let mode = std::fs::metadata(d.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
}

#[test]
fn migrates_a_version_1_database_keeping_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    {
        let mut conn = Connection::open(&path).unwrap();
        schema::migrations().to_version(&mut conn, 1).unwrap();
        conn.execute(
            "INSERT INTO nodes (node_id, member_no, address, key_check, state, enrolled_at_ms)
             VALUES ('old', 1, 'h:1', 'ck', 'UpdateCompleted', 5)",
            [],
        )
        .unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, 1);
    }
    let s = SqliteEngine::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION as i64);
    let n = s.node("old").unwrap().unwrap();
    assert_eq!(
        (n.state, n.enrolled_at_ms),
        (RecordedState::UpdateCompleted, 5)
    );
    let idx: i64 = s
        .conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'audit_by_time'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(idx, 1);
}

/// Rounds as a version 6 table (and every older one) holds them: a completed one (`Finished`, the
/// drain counted into the second transition) and one open in `Distribute`.
const OLD_ROUNDS: &str = "
    INSERT INTO keys (epoch, created_at_ms, check_value, trigger) VALUES (1, 5, 'c1', 'Initial');
    INSERT INTO keys (epoch, created_at_ms, check_value, trigger) VALUES (2, 10, 'c2', 'Manual');
    INSERT INTO keys (epoch, created_at_ms, check_value, trigger) VALUES (3, 20, 'c3', 'Manual');
    INSERT INTO rounds (epoch, started_at_ms, phase, phase_started_at_ms, distribute_ms,
                        first_transition_ms, second_transition_ms, nodes, acked, stale,
                        finished_at_ms, outcome)
    VALUES (2, 10, 'Finished', 19, 3, 4, 2, 1, 1, 0, 19, 'Completed');
    INSERT INTO rounds (epoch, started_at_ms, phase, phase_started_at_ms, distribute_ms, nodes)
    VALUES (3, 20, 'Distribute', 20, NULL, 1);";

/// What [`OLD_ROUNDS`] reads as after the migration to version 7: the phase
/// names of `RoundPhase`, `NULL` for a finished round, every duration kept,
/// and the table goes on numbering rounds after the old ones.
fn check_old_rounds_migrated(s: &mut Store) {
    let r = s.rounds().unwrap();
    assert_eq!(
        r.iter()
            .map(|r| (r.id, r.epoch, r.phase))
            .collect::<Vec<_>>(),
        [(1, 2, None), (2, 3, Some(RoundPhase::Distributing))]
    );
    assert_eq!(
        r[0].phases_ms,
        PhaseDurations {
            distributing: 3,
            first_transition: 4,
            draining: 0,
            second_transition: 2
        }
    );
    s.round_phase(2, RoundPhase::Draining, 25).unwrap();
    assert_eq!(s.rounds().unwrap()[1].phases_ms.distributing, 5);
    s.round_finished(2, Outcome::Aborted, None, 0, 0, 26)
        .unwrap();
    assert_eq!(s.rounds().unwrap()[1].phases_ms.draining, 1);
    assert_eq!(s.round_started(3, 1, 30).unwrap(), 3);
}

#[test]
fn migrates_version_6_round_phases_to_one_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    {
        let mut conn = Connection::open(&path).unwrap();
        schema::migrations().to_version(&mut conn, 6).unwrap();
        conn.execute_batch(OLD_ROUNDS).unwrap();
    }
    let mut s = Store::open_at(&Location::Sqlite(path)).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION as i64);
    assert_eq!(s.integrity_check().unwrap(), Ok(()));
    check_old_rounds_migrated(&mut s);
}

#[test]
fn postgres_migrates_version_6_round_phases_to_one_vocabulary() {
    let Some(pg) = testpg::shared() else { return };
    let url = pg.create_db();
    testpg::admin(
        &url,
        &format!(
            "CREATE TABLE keyfleet_schema (one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
                                           version INTEGER NOT NULL CHECK (version >= 0));
             INSERT INTO keyfleet_schema VALUES (true, 6);
             {}
             {OLD_ROUNDS}",
            schema::PG_MIGRATIONS[..6].join("\n")
        ),
    )
    .unwrap();
    let mut s = Store::connect(&url).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION as i64);
    assert_eq!(s.integrity_check().unwrap(), Ok(()));
    check_old_rounds_migrated(&mut s);
}

#[test]
fn refuses_a_database_from_a_newer_keyfleet() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    assert!(err.to_string().contains("upgrade keyfleet"));
}

#[test]
fn refuses_a_file_that_is_not_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    std::fs::write(&path, vec![b'x'; 4096]).unwrap();
    let msg = Store::open(&path).unwrap_err().to_string();
    assert!(msg.contains("fleet.db"), "{msg}");
}

/// `fixtures/state/rev1-renumbered/fleet.db` was written by keyfleet at
/// 2bc0f6e (schema 2, member numbers counted by the store).
#[test]
fn a_schema_2_table_written_by_2bc0f6e_migrates_and_keeps_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/state/rev1-renumbered/fleet.db"
        ),
        &path,
    )
    .unwrap();
    {
        let c = Connection::open(&path).unwrap();
        let v: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, 2, "the fixture is a schema 2 table");
    }
    let mut s = SqliteEngine::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION as i64);
    assert_eq!(s.integrity_check().unwrap(), Ok(()));
    let all: Vec<_> = s
        .all_nodes()
        .unwrap()
        .into_iter()
        .map(|n| (n.node_id, n.member_no, n.removed_at_ms.is_some(), n.address))
        .collect();
    assert_eq!(
        all,
        [
            (
                "pump-1".to_string(),
                1,
                false,
                Some("127.0.0.1:7011".to_string())
            ),
            (
                "pump-2".to_string(),
                2,
                false,
                Some("127.0.0.1:7002".to_string())
            ),
            (
                "pump-3".to_string(),
                3,
                true,
                Some("127.0.0.1:7003".to_string())
            ),
            (
                "pump-4".to_string(),
                4,
                false,
                Some("127.0.0.1:7004".to_string())
            ),
        ]
    );
    assert_eq!(s.history().unwrap().len(), 3);
    // The controller's numbers (4, 2, 5) go in: pump-1 takes pump-4's 4.
    s.renumber_members(&[("pump-1", 4), ("pump-2", 2), ("pump-4", 5)], 1)
        .unwrap();
    let live: Vec<_> = s
        .nodes()
        .unwrap()
        .into_iter()
        .map(|n| (n.node_id, n.member_no))
        .collect();
    assert_eq!(
        live,
        [
            ("pump-2".to_string(), 2),
            ("pump-1".to_string(), 4),
            ("pump-4".to_string(), 5)
        ]
    );
    // Foreign keys survived the table rebuild.
    assert!(s
        .conn
        .execute(
            "INSERT INTO key_deliveries (epoch, node_id) VALUES (1, 'nobody')",
            []
        )
        .is_err());
}

// ----- PostgreSQL only -----

#[test]
fn postgres_refuses_a_table_from_a_newer_keyfleet_and_migrates_a_version_1_table() {
    let Some(pg) = testpg::shared() else { return };
    let url = pg.create_db();
    drop(Store::connect(&url).unwrap());
    testpg::admin(&url, "UPDATE keyfleet_schema SET version = 99").unwrap();
    let err = Store::connect(&url).unwrap_err();
    assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    assert!(err.to_string().contains("upgrade keyfleet"), "{err}");

    // A table at version 1 with rows (member numbers counted by the table, a
    // removed node, a delivery): the migrations keep every row and bring in
    // one member numbering (unique among the enrolled nodes only) and the
    // optional address.
    let url = pg.create_db();
    testpg::admin(
        &url,
        &format!(
            "CREATE TABLE keyfleet_schema (one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
                                           version INTEGER NOT NULL CHECK (version >= 0));
             INSERT INTO keyfleet_schema VALUES (true, 1);
             {}
             INSERT INTO nodes (node_id, member_no, address, key_check, state, enrolled_at_ms)
             VALUES ('old', 1, 'h:1', 'ck', 'UpdateCompleted', 5);
             INSERT INTO nodes (node_id, member_no, address, key_check, state, enrolled_at_ms,
                                removed_at_ms)
             VALUES ('gone', 2, 'h:2', 'ck', 'Enrolled', 6, 7);
             INSERT INTO nodes (node_id, member_no, address, key_check, state, enrolled_at_ms)
             VALUES ('other', 3, 'h:3', 'ck', 'Enrolled', 8);
             INSERT INTO keys (epoch, created_at_ms, check_value, trigger)
             VALUES (1, 5, 'c1', 'Initial');
             INSERT INTO key_deliveries (epoch, node_id, attempts) VALUES (1, 'old', 1);",
            schema::PG_MIGRATIONS[0]
        ),
    )
    .unwrap();
    let mut s = Store::connect(&url).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION as i64);
    assert_eq!(s.integrity_check().unwrap(), Ok(()));
    let n = s.node("old").unwrap().unwrap();
    assert_eq!(
        (n.state, n.enrolled_at_ms),
        (RecordedState::UpdateCompleted, 5)
    );
    assert_eq!(s.all_nodes().unwrap().len(), 3);
    assert_eq!(s.history().unwrap()[0].deliveries.len(), 1);
    assert_eq!(s.history().unwrap()[0].activated_at_ms, Some(5));
    // The removed node's number may be given again; an enrolled one's not.
    s.enroll_node("new", 2, None, "ck", 9).unwrap();
    assert!(matches!(
        s.enroll_node("dup", 3, None, "ck", 9),
        Err(StoreError::MemberTaken { member_no: 3, holder }) if holder == "other"
    ));
    // The controller's numbers go in, swapping two.
    s.renumber_members(&[("old", 3), ("other", 1)], 10).unwrap();
    let live: Vec<_> = s
        .nodes()
        .unwrap()
        .into_iter()
        .map(|n| (n.node_id, n.member_no))
        .collect();
    assert_eq!(
        live,
        [
            ("other".to_string(), 1),
            ("new".to_string(), 2),
            ("old".to_string(), 3)
        ]
    );
    // The server enforces the unique index itself (a second installer that
    // skipped the check): an enrolled number twice is refused.
    assert!(testpg::admin(&url, "UPDATE nodes SET member_no = 1 WHERE node_id = 'new'").is_err());
}

#[test]
fn postgres_urls_are_checked_and_passwords_never_shown() {
    assert_eq!(
        crate::config::redact_url("postgres://kf:s3cret@db:5432/fleet?password=x"),
        "postgres://kf:***@db:5432/fleet"
    );
    let err = Store::connect("postgres://kf:s3cret@127.0.0.1:1/fleet").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Connect { .. }), "{msg}");
    assert!(
        !msg.contains("s3cret") && msg.contains("store.url"),
        "{msg}"
    );
    assert!(matches!(
        Location::from_config(Some("mysql://x"), Path::new("/d/fleet.db")),
        Err(StoreError::BadUrl(_))
    ));
    assert_eq!(
        Location::from_config(None, Path::new("/d/fleet.db")).unwrap(),
        Location::Sqlite("/d/fleet.db".into())
    );
}

#[test]
fn sqlite_on_a_full_file_system_fails_the_whole_batch() {
    // A real failure: the table's own small tmpfs, filled up under it.
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path();
    let mount = |args: &[&str]| {
        std::process::Command::new("mount")
            .args(args)
            .arg(mnt)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !mount(&["-t", "tmpfs", "-o", "size=8m", "tmpfs"]) {
        return eprintln!("skipping: cannot mount a tmpfs here (needs root)");
    }
    let umount = scopeguard(mnt);
    let mut s = Store::open(&mnt.join("fleet.db")).unwrap();
    s.enroll_node("a", 1, Some("h:1"), "ck", 0).unwrap();
    let filler = mnt.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[0u8; 65536]).is_ok() {}
        let _ = f.sync_all();
    }
    let err = s
        .batch(|s| {
            // The row fails; a caller that ignores it (as the controller's
            // per-row handling may) still gets the batch refused.
            let _ = s.enroll_node("b", 2, Some("h:2"), "ck", 1);
            let _ = s.audit(AuditKind::Restart, None, &json!(null), 2);
            Ok(())
        })
        .unwrap_err();
    // BatchFailed, or the commit's own error when the rows fit in memory.
    assert!(err.is_engine_failure(), "{err}");
    println!("full file system: {err}");
    std::fs::remove_file(&filler).unwrap();
    let ids: Vec<_> = s.nodes().unwrap().into_iter().map(|n| n.node_id).collect();
    assert_eq!(ids, ["a"], "nothing of the failed batch is kept");
    s.enroll_node("b", 2, Some("h:2"), "ck", 3).unwrap();
    drop(s);
    drop(umount);
}

/// Unmounts `path` when dropped (also when the test fails).
fn scopeguard(path: &Path) -> impl Drop + '_ {
    struct Umount<'a>(&'a Path);
    impl Drop for Umount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0)
                .status();
        }
    }
    Umount(path)
}

// ----- the leader lease (issue 16) -----

#[test]
fn sqlite_serve_is_the_sole_leader_under_term_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let mut s = Store::open(&path).unwrap();
    for holder in ["host-a:1:x", "host-b:2:y"] {
        assert_eq!(
            s.acquire_lease(holder, 1).unwrap(),
            LeaseOutcome::Held(LeaseRecord {
                holder: holder.into(),
                term: 1,
                expires_in_ms: None
            })
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(5));
    s.release_lease("host-b:2:y", 1).unwrap();
    drop(s);
    let s = Store::open(&path).unwrap();
    let l = s.lease().unwrap().unwrap();
    assert_eq!(
        (l.holder.as_str(), l.term, l.expires_in_ms),
        ("host-b:2:y", 1, None)
    );
}

#[test]
fn postgres_lease_has_one_holder_and_a_new_term_after_it_runs_out() {
    let Some(pg) = testpg::shared() else { return };
    let url = pg.create_db();
    let mut a = Store::connect(&url).unwrap();
    let mut b = Store::connect(&url).unwrap();
    let t0 = std::time::Instant::now();
    let LeaseOutcome::Held(l) = a.acquire_lease("a", 400).unwrap() else {
        panic!("the first asker takes the lease")
    };
    println!("lease taken in {:?}", t0.elapsed());
    assert_eq!(l.term, 1);
    assert!(
        l.expires_in_ms.is_some_and(|ms| ms > 0 && ms <= 400),
        "{l:?}"
    );
    // While it runs, nobody else gets it, however often they ask.
    for _ in 0..5 {
        match b.acquire_lease("b", 400).unwrap() {
            LeaseOutcome::Taken(l) => assert_eq!((l.holder.as_str(), l.term), ("a", 1)),
            held => panic!("a second holder: {held:?}"),
        }
    }
    // Its holder renews it under the same term.
    let t0 = std::time::Instant::now();
    assert!(matches!(a.acquire_lease("a", 400).unwrap(), LeaseOutcome::Held(l) if l.term == 1));
    println!("lease renewed in {:?}", t0.elapsed());
    // Run out: the next asker takes it under term 2, and the old holder's
    // renewal finds it gone.
    std::thread::sleep(std::time::Duration::from_millis(450));
    assert!(matches!(b.acquire_lease("b", 400).unwrap(), LeaseOutcome::Held(l) if l.term == 2));
    assert!(matches!(
        a.acquire_lease("a", 400).unwrap(),
        LeaseOutcome::Taken(l) if l.holder == "b" && l.term == 2
    ));
    // A release of an old term changes nothing; the holder's own ends it at once.
    a.release_lease("a", 1).unwrap();
    assert!(matches!(
        a.acquire_lease("a", 400).unwrap(),
        LeaseOutcome::Taken(_)
    ));
    b.release_lease("b", 2).unwrap();
    assert!(matches!(a.acquire_lease("a", 60_000).unwrap(), LeaseOutcome::Held(l) if l.term == 3));
    assert_eq!(
        b.lease().unwrap().map(|l| (l.holder, l.term)),
        Some(("a".into(), 3))
    );
}

/// Issue 16's fencing: a batch of a leader whose lease ran out is refused
/// whole, and a standby's takeover waits for a batch in flight to end.
#[test]
fn postgres_a_deposed_leaders_batch_is_fenced() {
    let Some(pg) = testpg::shared() else { return };
    let url = pg.create_db();
    let mut a = Store::connect(&url).unwrap();
    let mut b = Store::connect(&url).unwrap();
    assert!(matches!(a.acquire_lease("a", 400).unwrap(), LeaseOutcome::Held(l) if l.term == 1));
    a.batch(|s| {
        s.fence("a", 1)?;
        s.put_state_core(b"a's", 1)
    })
    .unwrap();
    // Not the holder, or not the term: refused.
    assert!(matches!(b.fence("b", 1), Err(StoreError::Fenced { .. })));
    assert!(matches!(a.fence("a", 2), Err(StoreError::Fenced { .. })));
    // A batch in flight holds the lease row: b's takeover of the expired
    // lease waits for its end, and then gets term 2.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        a.batch(|s| {
            s.fence("a", 1)?;
            std::thread::sleep(std::time::Duration::from_millis(450));
            scope.spawn(|| {
                let t0 = std::time::Instant::now();
                let got = b.acquire_lease("b", 60_000).unwrap();
                tx.send((got, t0.elapsed())).unwrap();
            });
            std::thread::sleep(std::time::Duration::from_millis(300));
            assert!(rx.try_recv().is_err(), "the takeover waits for the batch");
            s.put_state_core(b"a's last", 2)
        })
        .unwrap();
    });
    let (got, waited) = rx.recv().unwrap();
    assert!(
        matches!(&got, LeaseOutcome::Held(l) if l.term == 2),
        "{got:?}"
    );
    println!("the takeover waited {waited:?} for the deposed leader's batch");
    // From then on a's batches are refused whole: nothing of them is written.
    let r = a.batch(|s| {
        s.fence("a", 1)?;
        s.put_state_core(b"a's stale", 3)
    });
    assert!(matches!(r, Err(StoreError::Fenced { .. })), "{r:?}");
    assert_eq!(
        a.state_rows().unwrap().core.as_deref(),
        Some(&b"a's last"[..])
    );
}

/// Eight controllers ask at the same moment for a lease that has run out:
/// exactly one gets it, under exactly the next term.
#[test]
fn postgres_lease_goes_to_exactly_one_of_many_askers_at_once() {
    let Some(pg) = testpg::shared() else { return };
    let url = pg.create_db();
    let mut first = Store::connect(&url).unwrap();
    assert!(matches!(
        first.acquire_lease("gone", 1).unwrap(),
        LeaseOutcome::Held(_)
    ));
    std::thread::sleep(std::time::Duration::from_millis(5));
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
    let askers: Vec<_> = (0..8)
        .map(|i| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut s = Store::connect(&url).unwrap();
                barrier.wait();
                s.acquire_lease(&format!("c{i}"), 60_000).unwrap()
            })
        })
        .collect();
    let got: Vec<_> = askers.into_iter().map(|t| t.join().unwrap()).collect();
    let held: Vec<_> = got
        .iter()
        .filter_map(|g| match g {
            LeaseOutcome::Held(l) => Some(l.clone()),
            LeaseOutcome::Taken(_) => None,
        })
        .collect();
    assert_eq!(held.len(), 1, "{got:?}");
    assert_eq!(held[0].term, 2);
    for g in &got {
        if let LeaseOutcome::Taken(l) = g {
            assert_eq!((&l.holder, l.term), (&held[0].holder, 2));
        }
    }
}
