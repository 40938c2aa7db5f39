//! A controller state directory written by main before schema 3 (fixture in
//! `fixtures/store/main-2026-12-06/`, how it was made in its README) opens
//! with this build: the management table migrates to schema 3, the key of a
//! round that never completed is not taken for the current one, and the
//! controller resumes that round from its revision-1 secrets file.
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use keyfleet::config::Config;
use keyfleet::controller::{Controller, Options, StateDir};
use keyfleet::store::{Outcome, Store, SCHEMA_VERSION};
use keyfleet_core::wire::RoundPhase;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/store/main-2026-12-06"
);

/// A private copy of the fixture's state directory (git keeps no modes).
fn state_copy(dir: &Path) -> StateDir {
    let st = dir.join("ctl");
    std::fs::create_dir(&st).unwrap();
    std::fs::set_permissions(&st, std::fs::Permissions::from_mode(0o700)).unwrap();
    for f in ["fleet.db", "controller.secrets"] {
        std::fs::copy(Path::new(FIXTURE).join(f), st.join(f)).unwrap();
        std::fs::set_permissions(st.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    StateDir::new(st)
}

fn schema_of(db: &Path) -> i64 {
    // Read without migrating: the fixture is schema 2 as main wrote it.
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

#[test]
fn a_schema_2_table_from_main_migrates_and_its_unfinished_round_is_not_current() {
    let dir = tempfile::tempdir().unwrap();
    let st = state_copy(dir.path());
    assert_eq!(
        schema_of(&st.database()),
        2,
        "the fixture is main's schema 2"
    );

    let s = Store::open(&st.database()).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION as i64);
    assert_eq!(
        SCHEMA_VERSION, 8,
        "schema 3 (this test's rows), 4 (one member numbering), 5 (the leader lease), 6 \
         (the controller's state rows), 7 (one vocabulary for round phases) and 8 (no \
         index of the deliveries by node)"
    );
    assert_eq!(s.integrity_check().unwrap(), Ok(()));
    let c = rusqlite::Connection::open(st.database()).unwrap();
    let by_node: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'key_deliveries_by_node'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(by_node, 0, "schema 8 drops the deliveries' index by node");
    // main said epoch 3 (the newest key); epoch 3's round never completed.
    assert_eq!(s.current_epoch().unwrap(), Some(2));
    assert_eq!(s.newest_epoch().unwrap(), Some(3));
    let keys = s.history().unwrap();
    let rounds = s.rounds().unwrap();
    let completed_2 = rounds
        .iter()
        .find(|r| r.epoch == 2)
        .and_then(|r| r.finished_at_ms);
    assert!(completed_2.is_some());
    assert_eq!(
        keys.iter()
            .map(|k| (k.epoch, k.activated_at_ms.is_some()))
            .collect::<Vec<_>>(),
        vec![(1, true), (2, true), (3, false)]
    );
    assert_eq!(keys[0].activated_at_ms, Some(keys[0].created_at_ms));
    assert_eq!(keys[1].activated_at_ms, completed_2);
    assert!(keys.iter().all(|k| k.handouts.is_empty()));
    assert_eq!(rounds.len(), 2);
    assert_eq!(rounds[0].outcome, Some(Outcome::Completed));
    assert_eq!(
        (rounds[1].epoch, rounds[1].outcome, rounds[1].pauses),
        (3, None, 0)
    );
    // Schema 2's phase names read as the one vocabulary: `Finished` is no
    // phase, `Distribute` is `distributing`.
    assert_eq!(
        (rounds[0].phase, rounds[1].phase),
        (None, Some(RoundPhase::Distributing))
    );
    // What schema 2 knew stays: node-2's last address, the deliveries.
    let nodes = s.nodes().unwrap();
    assert_eq!(nodes.len(), 3);
    assert_eq!(nodes[1].address.as_deref(), Some("127.0.0.1:47952"));
    assert_eq!(keys[1].deliveries.len(), 3);
    assert!(s.address_changes().unwrap().is_empty());
    drop(s);

    // The controller moves main's secrets file (the whole snapshot) into
    // the table, restores it and resumes the round.
    let c = Controller::open(Options::new(st.clone(), Config::default())).unwrap();
    assert_eq!(c.machine().current_epoch().0, 2);
    // Its round phase was written as `Distributing`, read as `distributing`.
    assert_eq!(
        c.machine().round().map(|(e, p)| (e.0, p)),
        Some((3, RoundPhase::Distributing))
    );
    assert_eq!(c.store().current_epoch().unwrap(), Some(2));
    drop(c);

    // And `keyfleet status` says so.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyfleet"))
        .arg("--state")
        .arg(&st.dir)
        .args(["status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    println!("{}", text.lines().next().unwrap_or(""));
    assert!(
        text.starts_with("group key epoch 2, rotating to 3"),
        "{text}"
    );
}
