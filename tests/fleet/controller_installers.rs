//! Issue 16.4 with real processes: two installers, each on a "machine" of
//! its own (a state directory with a copy of the fleet's `controller.secrets`
//! and the shared PostgreSQL table in its config), enroll 500 nodes each at
//! the same time while `keyfleet serve` leads the table. Every `keyfleet
//! enroll` is queued in the table and answered by the leader, which picks the
//! requests up without a restart: no member number twice, no enrolment lost,
//! and the nodes among them that run agents join and take the group key.

use crate::support;
use crate::support::testpg;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::fleet::{agent_status, Fleet};
use support::wait_for;

const PER_INSTALLER: usize = 500;

struct Installer {
    state: PathBuf,
    config: PathBuf,
}

impl Installer {
    fn enroll(&self, f: &Fleet, id: &str, form: &str) -> std::process::Output {
        f.keyfleet_at(
            &self.state,
            &self.config,
            &["enroll", "--json", "--node-id", id, "--key", form],
        )
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
    }
}

fn random_form() -> String {
    let mut key = [0u8; 16];
    getrandom::getrandom(&mut key).unwrap();
    keyfleet_core::label::hex_form(&keyfleet_core::label::InitialKey::from_bytes(key))
}

#[test]
fn two_installers_enroll_500_nodes_each_through_the_leader() {
    let _heavy = support::heavy();
    let Some(pg) = testpg::shared() else { return };
    let url = pg.create_db();
    let store = format!("[store]\nurl = \"{url}\"\n[beacon]\ninterval_ms = 200\n");
    // Five of the nodes run agents: installer 1 enrolls three, installer 2 two.
    let mut f = Fleet::new(5, &store);
    f.controller_flag = false;
    f.run(&["init"]);
    let installers: Vec<Installer> = (1..=2)
        .map(|i| {
            let state = f.dir.path().join(format!("installer-{i}"));
            keyfleet::statefile::ensure_private_dir(&state).unwrap();
            std::fs::copy(
                f.state().join("controller.secrets"),
                state.join("controller.secrets"),
            )
            .unwrap();
            let config = f.dir.path().join(format!("installer-{i}.toml"));
            std::fs::write(
                &config,
                format!(
                    "[network]\ngroup = \"{}\"\niface = \"127.0.0.1\"\n{store}",
                    f.group
                ),
            )
            .unwrap();
            Installer { state, config }
        })
        .collect();
    let _serve = f.serve();

    // Each installer's list: its agents' nodes first among its own.
    let mut lists: Vec<Vec<(String, String)>> = vec![Vec::new(), Vec::new()];
    for (i, n) in f.nodes.iter().enumerate() {
        lists[usize::from(i >= 3)].push((n.id.clone(), n.form.clone()));
    }
    for (k, list) in lists.iter_mut().enumerate() {
        while list.len() < PER_INSTALLER {
            list.push((format!("site{}-{:04}", k + 1, list.len()), random_form()));
        }
    }
    let t0 = Instant::now();
    let fleet = &f;
    let members: Vec<Vec<(String, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = installers
            .iter()
            .zip(&lists)
            .map(|(inst, list)| {
                s.spawn(move || {
                    list.iter()
                        .map(|(id, form)| {
                            let out = inst.enroll(fleet, id, form);
                            assert!(
                                out.status.success(),
                                "enroll {id}: {}",
                                String::from_utf8_lossy(&out.stderr)
                            );
                            let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                            assert_eq!(r["node_id"], id.as_str(), "{r}");
                            (id.clone(), r["member"].as_u64().unwrap())
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let took = t0.elapsed();
    println!(
        "2 installers x {PER_INSTALLER} enrolments through the leader in {:.1} s ({:.1} ms each, per installer)",
        took.as_secs_f64(),
        took.as_secs_f64() * 1000.0 / PER_INSTALLER as f64
    );

    // No member number twice, none lost: the answers and the table agree.
    let answered: Vec<(String, u64)> = members.concat();
    let numbers: HashSet<u64> = answered.iter().map(|(_, m)| *m).collect();
    assert_eq!(
        numbers.len(),
        2 * PER_INSTALLER,
        "a member number given twice"
    );
    let st = f.status();
    let rows = st["nodes"].as_array().unwrap();
    assert_eq!(rows.len(), 2 * PER_INSTALLER, "enrolled in the table");
    for (id, m) in &answered {
        let row = rows
            .iter()
            .find(|r| r["node_id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} missing from the table"));
        assert_eq!(row["member_no"].as_u64(), Some(*m), "{row}");
    }
    // An installer whose label was read twice is told so, not enrolled twice.
    let (id, form) = &lists[0][10];
    let out = installers[1].enroll(&f, &format!("{id}-again"), form);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already enrolled with the same initial key"),
        "{err}"
    );

    // The nodes with agents join the leader's fleet.
    let _agents = f.agents();
    wait_for("the five agents to join", 30_000, || {
        f.nodes.iter().all(|n| {
            agent_status(&n.state).is_some_and(|s| {
                s["state"] == "UpdateCompleted" && s["epoch"].as_u64() == st["epoch"].as_u64()
            })
        })
    });
    std::thread::sleep(Duration::from_millis(100));
}
