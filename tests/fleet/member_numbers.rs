//! Issue 15, item 1: one member numbering. The number `keyfleet enroll`
//! prints, the one `keyfleet status` shows and the one the agent uses on the
//! wire (`keyfleet-agent status`: `member`) are the same, across `remove` +
//! `enroll` of the same node id and restarts of the controller; a table
//! written by an earlier keyfleet (which counted `MAX(member_no)+1` itself) is
//! repaired to the controller's numbers. Real processes on loopback multicast.

use crate::support;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::OpenOptionsExt;

use support::fleet::{agent_status, Fleet, Node};
use support::{free_port, wait_for};

/// node id → member number, from `keyfleet status --json`.
fn table_members(f: &Fleet) -> BTreeMap<String, u64> {
    f.status()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node_id"].as_str().unwrap().to_owned(),
                n["member_no"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// node id → member number, from each running agent (what it puts on the wire).
fn agent_members(f: &Fleet) -> BTreeMap<String, u64> {
    f.nodes
        .iter()
        .map(|n| {
            let s = agent_status(&n.state).expect("agent answers");
            (n.id.clone(), s["member"].as_u64().unwrap_or(0))
        })
        .collect()
}

fn enroll_json(f: &Fleet, n: &Node) -> u64 {
    let r = f.json(&[
        "enroll",
        "--node-id",
        &n.id,
        "--addr",
        &n.listen.to_string(),
        "--key",
        &n.form,
        "--json",
    ]);
    r["member"].as_u64().unwrap()
}

fn wait_all_members(f: &Fleet) {
    wait_for("every agent holds its member number", 30_000, || {
        f.nodes.iter().all(|n| {
            agent_status(&n.state).is_some_and(|s| {
                s["member"].as_u64().is_some_and(|m| m > 0) && s["running"]["synced"] == true
            })
        })
    });
}

#[test]
fn enroll_status_and_the_wire_agree_across_remove_reenroll_and_restart() {
    let _heavy = support::heavy();
    let mut f = Fleet::new(4, "[rekey]\njoin_wait_ms = 0\n");
    f.run(&["init"]);
    let mut printed = BTreeMap::new();
    for n in &f.nodes[..3] {
        printed.insert(n.id.clone(), enroll_json(&f, n));
    }
    // node-01 is removed, then enrolled again as a new appliance (node 3's
    // key, state directory and address, under node-01's id).
    f.run(&["remove", "node-01"]);
    let spare = f.nodes.pop().unwrap();
    f.nodes[1] = Node {
        id: "node-01".into(),
        ..spare
    };
    printed.insert("node-01".into(), enroll_json(&f, &f.nodes[1]));
    println!("enroll printed {printed:?}");
    assert_eq!(
        printed["node-01"], 4,
        "the controller never reuses a number"
    );
    assert_eq!(table_members(&f), printed, "status before any agent joined");

    let mut serve = f.serve();
    let _agents = f.agents();
    wait_all_members(&f);
    let wire = agent_members(&f);
    println!("status {:?}, agents {wire:?}", table_members(&f));
    assert_eq!(wire, printed, "the agents' member numbers");
    assert_eq!(table_members(&f), printed);

    serve.terminate();
    let _serve = f.serve();
    f.run(&["rekey"]);
    assert_eq!(table_members(&f), printed, "after a restart and a round");
    assert_eq!(agent_members(&f), printed);
}

/// A key file for `form`, owner-only.
fn key_file(f: &Fleet, id: &str, form: &str) -> std::path::PathBuf {
    let p = f.dir.path().join(format!("{id}.key"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&p)
        .unwrap();
    file.write_all(form.as_bytes()).unwrap();
    p
}

/// `fixtures/state/rev1-renumbered` (see its README): written by keyfleet at
/// 2bc0f6e, whose table shows pump-1, pump-2, pump-4 as 1, 2, 4 while the
/// controller and the wire use 4, 2, 5.
#[test]
fn a_table_written_by_2bc0f6e_is_repaired_to_the_numbers_on_the_wire() {
    let _heavy = support::heavy();
    let mut f = Fleet::new(0, "");
    let state = f.state();
    keyfleet::statefile::ensure_private_dir(&state).unwrap();
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/state/rev1-renumbered"
    );
    for name in ["controller.secrets", "fleet.db"] {
        std::fs::copy(format!("{fixture}/{name}"), state.join(name)).unwrap();
        // A checkout gives files mode 644; the controller refuses secrets
        // others may read.
        std::fs::set_permissions(
            state.join(name),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
    }
    let before = table_members(&f);
    println!("table as 2bc0f6e left it (after the schema step): {before:?}");
    assert_eq!(before["pump-1"], 1);

    for (id, hex) in [("pump-1", "11"), ("pump-2", "22"), ("pump-4", "44")] {
        let bytes = <[u8; 16]>::try_from(hex::decode(hex.repeat(16)).unwrap()).unwrap();
        let form =
            keyfleet_core::label::hex_form(&keyfleet_core::label::InitialKey::from_bytes(bytes));
        let st = f.dir.path().join("agents").join(id);
        keyfleet::statefile::ensure_private_dir(&st).unwrap();
        f.nodes.push(Node {
            id: id.into(),
            key: bytes,
            key_file: key_file(&f, id, &form),
            form,
            state: st,
            listen: SocketAddrV4::new(Ipv4Addr::LOCALHOST, free_port()),
            iface: Ipv4Addr::LOCALHOST,
            wrap: None,
            args: Vec::new(),
        });
    }
    let _serve = f.serve();
    let after = table_members(&f);
    let _agents = f.agents();
    wait_all_members(&f);
    let wire = agent_members(&f);
    println!("repaired table {after:?}, agents {wire:?}");
    assert_eq!(after, wire);
    assert_eq!(
        after,
        BTreeMap::from([
            ("pump-1".to_string(), 4),
            ("pump-2".to_string(), 2),
            ("pump-4".to_string(), 5)
        ])
    );
    let audit = f.history()["audit"].to_string();
    assert_eq!(audit.matches("Renumbered").count(), 2, "{audit}");
}
