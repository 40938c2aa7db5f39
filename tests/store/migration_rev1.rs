//! Wire/state revision 2 migration (issue 17, docs/wire-v2.md): a fleet
//! enrolled and running under revision 1 (fixtures/rev1, written by
//! `scripts/make-rev1-fixture.sh` with the revision-1 binaries) keeps working
//! without its labels being read again. The real `keyfleet serve` restores the
//! revision-1 secrets file and management table, the real agent restores its
//! revision-1 `state.json`, runs the enrollment handshake (its PSK derived
//! from the stored node keys), and a rekey round completes.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use support::fleet::*;
use support::wait_for;

fn copy_private(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn a_revision_1_fleet_runs_the_handshake_and_rotates_without_reading_labels() {
    let _heavy = support::heavy();
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/rev1");
    let fleet = Fleet::new(1, "");
    assert_eq!(fleet.nodes[0].id, "node-00");
    // The revision-1 controller directory, agent state and key file.
    keyfleet::statefile::ensure_private_dir(&fleet.state()).unwrap();
    for f in ["controller.secrets", "fleet.db"] {
        copy_private(&fx.join(f), &fleet.state().join(f));
    }
    copy_private(
        &fx.join("state.json"),
        &fleet.nodes[0].state.join("state.json"),
    );
    copy_private(&fx.join("node-00.key"), &fleet.nodes[0].key_file);
    let before = std::fs::read_to_string(fleet.nodes[0].state.join("state.json")).unwrap();
    assert!(!before.contains("ratchet"), "a revision-1 file");

    let _serve = fleet.serve();
    let _agent = fleet.agent(0);
    // The agent holds epoch 2 from revision 1; it joins by handshake and syncs.
    assert_eq!(fleet.wait_converged(20_000), 2);
    let after = std::fs::read_to_string(fleet.nodes[0].state.join("state.json")).unwrap();
    assert!(after.contains("ratchet"), "the agent persisted its chain");
    // The node's first reply under its new chain completes the handshake (audited).
    wait_for("the completed handshake in the audit log", 10_000, || {
        fleet.history()["audit"].as_array().is_some_and(|audit| {
            audit
                .iter()
                .any(|a| a["detail"]["handshake"] == "completed" && a["node_id"] == "node-00")
        })
    });
    // A rekey round runs over the ratchet.
    fleet.run(&["rekey"]);
    assert_eq!(fleet.wait_converged(20_000), 3);
    println!("revision-1 fleet migrated: handshake, then epoch 3 over the ratchet");
}
