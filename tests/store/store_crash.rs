//! Crash safety of the management table: a writer process killed with SIGKILL in
//! the middle of many transactions leaves a database that opens, passes SQLite's
//! integrity check, and holds every transaction the writer saw committed, each
//! whole (no transaction half-applied).
//!
//! The writer is this test binary re-run with `crash_child` and an environment
//! variable naming the database.

use crate::support;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use keyfleet::store::{AuditKind, Store, Trigger};

const CHILD_ENV: &str = "KEYFLEET_STORE_CRASH_CHILD";

/// The writer: loops forever, two multi-row transactions per step, printing a
/// line after each commit returns. Does nothing unless run by the test below.
#[test]
#[ignore = "run by store_survives_sigkill_mid_write as a child process"]
fn crash_child() {
    let Ok(db) = std::env::var(CHILD_ENV) else {
        return;
    };
    let run: u64 = std::env::var("KEYFLEET_STORE_CRASH_RUN")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let mut store = Store::open(std::path::Path::new(&db)).expect("open");
    for i in 0u64.. {
        let id = format!("r{run}-n{i}");
        // One transaction: node row + audit row.
        store
            .enroll_node(
                &id,
                run * 1_000_000 + i + 1,
                Some(&format!("127.0.0.1:{}", 10_000 + i % 50_000)),
                &format!("ck{i}"),
                i,
            )
            .expect("enroll");
        println!("enrolled {id}");
        // One transaction: key row + a delivery row per recipient + audit row.
        let epoch = run * 1_000_000 + i;
        let recipients: Vec<String> = (i.saturating_sub(3)..=i)
            .map(|j| format!("r{run}-n{j}"))
            .collect();
        store
            .record_key_created(
                epoch,
                &format!("chk{epoch}"),
                Trigger::Manual,
                &serde_json::json!({"i": i}),
                &recipients,
                i,
            )
            .expect("key");
        println!("key {epoch} {}", recipients.len());
    }
}

#[test]
fn store_survives_sigkill_mid_write() {
    let _heavy = support::heavy();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fleet.db");
    let exe = std::env::current_exe().unwrap();
    let mut nodes_seen = Vec::new();
    let mut keys_seen = Vec::new();
    // Several kills at different points, each on the database the last one left.
    for (run, kill_after) in [(1u64, 57usize), (2, 203), (3, 11), (4, 400)] {
        let mut child = Command::new(&exe)
            .args([
                "store_crash::crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &db)
            .env("KEYFLEET_STORE_CRASH_RUN", run.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut lines = 0;
        for line in out.lines() {
            let line = line.unwrap();
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                ["enrolled", id] => nodes_seen.push(id.to_string()),
                ["key", epoch, n] => {
                    keys_seen.push((epoch.parse::<u64>().unwrap(), n.parse::<usize>().unwrap()))
                }
                _ => continue,
            }
            lines += 1;
            if lines == kill_after {
                child.kill().unwrap(); // SIGKILL, while it keeps writing
                break;
            }
        }
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "the writer must die by SIGKILL mid-write (it ended with {status}); \
             run {run} read {lines} lines"
        );

        let store = Store::open(&db).expect("the database opens after SIGKILL");
        assert_eq!(store.integrity_check().unwrap(), Ok(()));
        let nodes = store.nodes().unwrap();
        let history = store.history().unwrap();
        let audit = store.audit_log(0, u32::MAX).unwrap();
        for id in &nodes_seen {
            assert!(
                nodes.iter().any(|n| &n.node_id == id),
                "committed node {id} lost"
            );
        }
        for (epoch, n) in &keys_seen {
            let k = history
                .iter()
                .find(|k| k.epoch == *epoch)
                .unwrap_or_else(|| panic!("committed key {epoch} lost"));
            assert_eq!(k.deliveries.len(), *n, "key {epoch} half-written");
        }
        // Whole transactions only, including any committed after the last line read.
        for n in &nodes {
            let entries = audit
                .iter()
                .filter(|e| {
                    e.kind == AuditKind::Enrollment && e.node_id.as_deref() == Some(&n.node_id)
                })
                .count();
            assert_eq!(entries, 1, "node {} without its audit entry", n.node_id);
        }
        let triggers = audit
            .iter()
            .filter(|e| e.kind == AuditKind::Trigger)
            .count();
        assert_eq!(
            triggers,
            history.len(),
            "a key without its trigger audit entry"
        );
        for k in &history {
            let i = k.epoch % 1_000_000;
            assert_eq!(
                k.deliveries.len() as u64,
                i.min(3) + 1,
                "key {} half-written",
                k.epoch
            );
        }
        eprintln!(
            "run {run}: killed after {lines} lines; {} nodes, {} keys in the table",
            nodes.len(),
            history.len()
        );
    }
}
