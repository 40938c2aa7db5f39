//! `keyfleet init / enroll / rekey / status / history / serve / remove` as a
//! user runs them, against a fleet of nodes on loopback multicast.
use crate::support;

use keyfleet_core::protocol::NodeState;
use support::ctl::*;
use support::inproc::*;
use support::{wait_for, Proc};

const FAST: &str = "[round]\ndrain_grace_ms = 300\nretry_initial_ms = 100\nretry_max_ms = 800\nstale_after_ms = 8000\n[rekey]\njoin_wait_ms = 8000\nlinger_ms = 300\n";

#[test]
fn enroll_and_rotate_without_and_with_serve_then_remove_one() {
    let _heavy = support::heavy();
    let ctl = Ctl::new(FAST);
    let init = ctl.json(&["init", "--json"]);
    assert_eq!(init["epoch"], 1);
    // Init never overwrites.
    let again = ctl.cmd(&["init"]).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwrites"));

    let specs = node_specs(6);
    let (first, late) = specs.split_at(5);
    // The nodes start first and keep asking to join; nobody answers yet.
    let shells = InProcFleet::nodes(first, ctl.group, ctl.addr());
    for s in first {
        let r = ctl.json(&[
            "enroll",
            "--node-id",
            &s.id,
            "--addr",
            &s.listen.to_string(),
            "--key",
            &s.form,
            "--json",
        ]);
        assert_eq!(r["node_id"], s.id.as_str());
    }
    // Enrolling twice is refused.
    let dup = ctl
        .cmd(&[
            "enroll",
            "--node-id",
            &specs[0].id,
            "--addr",
            "127.0.0.1:9",
            "--key",
            &specs[0].form,
        ])
        .output()
        .unwrap();
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already enrolled"));

    // No serve: rekey runs the round itself, after the nodes joined.
    let r = ctl.json(&["rekey", "--json"]);
    assert_eq!(
        (r["epoch"].as_u64(), r["nodes"].as_u64()),
        (Some(2), Some(5)),
        "{r}"
    );
    assert_eq!(
        (r["acked"].as_u64(), r["stale"].as_u64()),
        (Some(5), Some(0)),
        "{r}"
    );
    for k in ["elapsed_ms", "phases_ms"] {
        assert!(r.get(k).is_some(), "{k} missing in {r}");
    }
    wait_for("every node at epoch 2", 5000, || {
        shells.completed_at(2) == 5
    });

    let st = ctl.json(&["status", "--json"]);
    assert_eq!(st["epoch"], 2);
    assert!(st["round"].is_null());
    let nodes = st["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 5);
    for n in nodes {
        assert_eq!(n["state"], "UpdateCompleted", "{n}");
        assert_eq!(n["epoch"], 2, "{n}");
        assert_eq!(n["stale"], false, "{n}");
        assert!(n["last_seen_ms"].is_u64(), "{n}");
    }

    // With serve: enroll goes through the control socket, and serve answers the join at once.
    let _serve = ctl.serve();
    let newcomer = InProcFleet::nodes(late, ctl.group, ctl.addr());
    let r = ctl.json(&[
        "enroll",
        "--node-id",
        &late[0].id,
        "--addr",
        &late[0].listen.to_string(),
        "--key",
        &late[0].form,
        "--json",
    ]);
    assert_eq!(r["member"], 6, "{r}");
    wait_for("the newcomer joined at epoch 2", 10_000, || {
        newcomer.completed_at(2) == 1
    });
    // rekey goes through the control socket too.
    let r = ctl.json(&["rekey", "--json"]);
    assert_eq!(
        (
            r["epoch"].as_u64(),
            r["acked"].as_u64(),
            r["stale"].as_u64()
        ),
        (Some(3), Some(6), Some(0)),
        "{r}"
    );
    wait_for("every node at epoch 3", 5000, || {
        shells.completed_at(3) == 5 && newcomer.completed_at(3) == 1
    });

    // Remove: a round that leaves the node out.
    let gone = &specs[4].id;
    let r = ctl.json(&["remove", gone, "--json"]);
    assert_eq!(r["node_id"], gone.as_str());
    assert_eq!(
        (r["round"]["epoch"].as_u64(), r["round"]["acked"].as_u64()),
        (Some(4), Some(5)),
        "{r}"
    );
    wait_for("the remaining nodes at epoch 4", 5000, || {
        shells.completed_at(4) == 4 && newcomer.completed_at(4) == 1
    });
    assert_eq!(
        shells.state(gone),
        Some(NodeState::UpdateCompleted {
            current: keyfleet_core::crypto::Epoch(3)
        }),
        "the removed node never got the new key"
    );
    let unknown = ctl.cmd(&["remove", "no-such-node"]).output().unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("not enrolled"));

    // History: every key, sent to whom, acknowledged when; rounds; audit.
    let h = ctl.json(&["history", "--json", "--audit", "500"]);
    let keys = h["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 4);
    let k4 = &keys[3];
    assert_eq!(k4["epoch"], 4);
    assert_eq!(k4["trigger"], "Removal");
    let got: Vec<&str> = k4["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["acked_at_ms"].is_u64())
        .map(|d| d["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(got.len(), 5);
    assert!(!got.contains(&gone.as_str()));
    assert!(
        keys[2]["retired_at_ms"].is_u64(),
        "epoch 3 retired by the round of epoch 4"
    );
    let rounds = h["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    assert!(
        rounds.iter().all(|r| r["outcome"] == "Completed"),
        "{rounds:?}"
    );
    let audit = h["audit"].as_array().unwrap();
    assert!(audit
        .iter()
        .any(|a| a["kind"] == "Removal" && a["node_id"] == gone.as_str()));
    assert_eq!(
        audit.iter().filter(|a| a["kind"] == "Trigger").count(),
        4,
        "one per key"
    );
    let st = ctl.json(&["status", "--json"]);
    assert_eq!(st["nodes"].as_array().unwrap().len(), 5);
}

#[test]
fn status_and_rekey_before_init_say_what_to_do() {
    let _heavy = support::heavy();
    let ctl = Ctl::new("");
    for args in [&["status"][..], &["rekey", "--json"], &["history"]] {
        let out = ctl.cmd(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("keyfleet init"), "{args:?}: {err}");
    }
}

#[test]
fn a_second_controller_on_the_same_state_is_refused() {
    let _heavy = support::heavy();
    let ctl = Ctl::new(FAST);
    ctl.run(&["init"]);
    let _serve = ctl.serve();
    let out = ctl.cmd(&["serve"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another keyfleet controller"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sock = in_state(&ctl, "control.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the control socket is owner-only");
}

#[test]
fn a_passphrase_seals_the_secrets_and_every_command_then_needs_it() {
    let _heavy = support::heavy();
    let ctl = Ctl::new(FAST);
    let out = ctl
        .cmd(&["init", "--json"])
        .env("KEYFLEET_PASSPHRASE", "correct horse")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let init: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(init["sealed"], true);
    let raw = std::fs::read_to_string(in_state(&ctl, "controller.secrets")).unwrap();
    assert!(
        raw.contains("argon2id") && !raw.contains("signing_key"),
        "sealed on disk"
    );
    let spec = &node_specs(1)[0];
    let enroll = |pass: Option<&str>| {
        let mut c = ctl.cmd(&[
            "enroll",
            "--node-id",
            &spec.id,
            "--addr",
            &spec.listen.to_string(),
            "--key",
            &spec.form,
        ]);
        if let Some(p) = pass {
            c.env("KEYFLEET_PASSPHRASE", p);
        }
        c.output().unwrap()
    };
    let no = enroll(None);
    assert!(!no.status.success());
    assert!(
        String::from_utf8_lossy(&no.stderr).contains("KEYFLEET_PASSPHRASE"),
        "{}",
        String::from_utf8_lossy(&no.stderr)
    );
    let wrong = enroll(Some("wrong"));
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("passphrase does not open"));
    let ok = enroll(Some("correct horse"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // The table is readable without it (it holds no secret).
    assert_eq!(
        ctl.json(&["status", "--json"])["nodes"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn serve_rekeys_by_itself_when_the_key_is_too_old() {
    let _heavy = support::heavy();
    let ctl = Ctl::new(&format!("{FAST}[triggers]\nmax_key_age_ms = 2500\n"));
    ctl.run(&["init"]);
    let specs = node_specs(2);
    let shells = InProcFleet::nodes(&specs, ctl.group, ctl.addr());
    ctl.enroll_all(&specs);
    let _serve = ctl.serve();
    wait_for("a key-age round to finish", 20_000, || {
        ctl.json(&["status", "--json"])["epoch"].as_u64() >= Some(2)
            && ctl.json(&["history", "--json", "--audit", "0"])["rounds"][0]["outcome"]
                == "Completed"
    });
    let h = ctl.json(&["history", "--json", "--audit", "0"]);
    assert_eq!(h["keys"][1]["trigger"], "KeyAge", "{}", h["keys"][1]);
    assert!(h["keys"][1]["trigger_detail"]["limit_ms"] == 2500);
    wait_for("both nodes on the new key", 5000, || {
        shells.completed_at(2) == 2
    });
}

#[test]
fn data_from_a_sender_not_in_the_table_makes_serve_rekey_without_it() {
    let _heavy = support::heavy();
    // Removal alone does not rekey here, so the removed node still holds the key…
    let ctl = Ctl::new(&format!("{FAST}[triggers]\non_node_removed = false\n"));
    ctl.run(&["init"]);
    let specs = node_specs(3);
    let shells = InProcFleet::nodes(&specs, ctl.group, ctl.addr());
    ctl.enroll_all(&specs);
    let _serve = ctl.serve();
    wait_for("the nodes joined", 10_000, || shells.completed_at(1) == 3);
    let r = ctl.json(&["remove", &specs[2].id, "--json"]);
    assert!(r["round"].is_null(), "{r}");
    assert_eq!(ctl.json(&["status", "--json"])["epoch"], 1);
    // …and when it sends group data under that key, the key is presumed leaked.
    shells.send(&specs[2].id, b"hello from a removed node");
    wait_for("the unknown-sender round to finish", 20_000, || {
        ctl.json(&["history", "--json", "--audit", "0"])["rounds"][0]["outcome"] == "Completed"
    });
    let h = ctl.json(&["history", "--json", "--audit", "200"]);
    assert_eq!(h["keys"][1]["trigger"], "UnknownSender", "{}", h["keys"][1]);
    wait_for("the enrolled nodes on the new key", 5000, || {
        shells.completed_at(2) == 2
    });
    assert_eq!(
        shells.state(&specs[2].id),
        Some(NodeState::UpdateCompleted {
            current: keyfleet_core::crypto::Epoch(1)
        })
    );
}

#[test]
fn rekey_completes_when_the_controller_loses_half_of_what_it_receives() {
    let _heavy = support::heavy();
    let ctl = Ctl::new(FAST);
    ctl.run(&["init"]);
    let specs = node_specs(8);
    let shells = InProcFleet::nodes(&specs, ctl.group, ctl.addr());
    ctl.enroll_all(&specs);
    // The nodes join in a first, lossless round: a join lost at the controller
    // is only retried on the node's join backoff (up to ~10 s), which the
    // one-shot rekey's join wait does not cover; the lossy round is the test.
    let r = ctl.json(&["rekey", "--json"]);
    assert_eq!(
        (r["epoch"].as_u64(), r["acked"].as_u64()),
        (Some(2), Some(8)),
        "{r}"
    );
    let r = ctl.json(&["rekey", "--json", "--loss", "0.5", "--loss-seed", "7"]);
    assert_eq!(
        (
            r["epoch"].as_u64(),
            r["acked"].as_u64(),
            r["stale"].as_u64()
        ),
        (Some(3), Some(8), Some(0)),
        "{r}"
    );
    wait_for("every node at epoch 3", 5000, || {
        shells.completed_at(3) == 8
    });
    // Lost replies were made up for by retries: some key went out more than once.
    let h = ctl.json(&["history", "--json", "--audit", "0"]);
    let attempts: u64 = h["keys"][2]["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["attempts"].as_u64().unwrap())
        .sum();
    assert!(attempts > 8, "retries recorded: {attempts}");
}

#[test]
fn enroll_from_a_key_source_takes_the_node_id_from_the_label() {
    let _heavy = support::heavy();
    let ctl = Ctl::new(FAST);
    ctl.run(&["init"]);
    let log = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/keyboard/typed-label.log"
    );
    // The label says boiler-3; another --node-id is refused.
    let out = ctl
        .cmd(&[
            "enroll",
            "--from",
            "keyboard",
            "--replay",
            log,
            "--node-id",
            "boiler-4",
            "--addr",
            "127.0.0.1:9001",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("differs from the node id boiler-3"));
    let r = ctl.json(&[
        "enroll",
        "--from",
        "keyboard",
        "--replay",
        log,
        "--addr",
        "127.0.0.1:9001",
        "--json",
    ]);
    assert_eq!(r["node_id"], "boiler-3");
    // What was typed (with a Backspace) is the key on the label.
    let label =
        keyfleet_core::label::parse("KF1:boiler-3:0CFC33D6D50E086C99BCAD0E073C4BC65696").unwrap();
    let fp = label.key.fingerprint();
    assert_eq!(r["fingerprint"], fp.as_str());
    let st = ctl.json(&["status", "--json"]);
    assert_eq!(st["nodes"][0]["key_check"], fp.as_str());
    // A bad form is refused with the reason.
    let bad = ctl
        .cmd(&[
            "enroll",
            "--node-id",
            "x",
            "--addr",
            "127.0.0.1:9002",
            "--key",
            "0CFC33D6D50E086C99BCAD0E073C4BC65697",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .to_lowercase()
            .contains("crc"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// `rekey` without `serve` returns as soon as every node acknowledged the
/// second transition request, however long `rekey.linger_ms` is; it keeps
/// answering late key requests only after a round some node missed.
#[test]
fn one_shot_rekey_lingers_only_when_a_node_is_missing() {
    let _heavy = support::heavy();
    // Ten minutes of linger: a `rekey` that waited it out would never return here.
    const LONG: &str = "[round]\ndrain_grace_ms = 300\nretry_initial_ms = 100\nretry_max_ms = 800\nstale_after_ms = 3000\n[rekey]\njoin_wait_ms = 8000\nlinger_ms = 600000\n";
    let ctl = Ctl::new(LONG);
    ctl.run(&["init"]);
    let specs = node_specs(3);
    let (stay, leave) = specs.split_at(2);
    let staying = InProcFleet::nodes(stay, ctl.group, ctl.addr());
    let leaving = InProcFleet::nodes(leave, ctl.group, ctl.addr());
    ctl.enroll_all(&specs);

    let rekey = |what: &str, code: i32| {
        let out = ctl.dir.path().join("rekey.out");
        let err = ctl.dir.path().join("rekey.err");
        let mut child = Proc::from(
            ctl.cmd(&["rekey", "--json"])
                .stdout(std::fs::File::create(&out).unwrap())
                .stderr(std::fs::File::create(&err).unwrap())
                .spawn()
                .unwrap(),
        );
        let mut status = None;
        wait_for(what, 60_000, || {
            status = child.child.try_wait().unwrap();
            status.is_some()
        });
        let log = std::fs::read_to_string(&err).unwrap();
        assert_eq!(status.unwrap().code(), Some(code), "{log}");
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        (r, log)
    };
    let (r, log) = rekey("rekey to return although linger_ms is 10 minutes", 0);
    assert_eq!(
        (
            r["nodes"].as_u64(),
            r["acked"].as_u64(),
            r["stale"].as_u64()
        ),
        (Some(3), Some(3), Some(0)),
        "{r}"
    );
    assert!(log.contains("not lingering"), "{log}");
    assert!(!log.contains("answering late key requests"), "{log}");

    // One node goes away: the next round marks it stale, and `rekey` then
    // lingers (a short one this time) for it to come back asking.
    drop(leaving);
    std::fs::write(
        ctl.dir.path().join("keyfleet.toml"),
        std::fs::read_to_string(ctl.dir.path().join("keyfleet.toml"))
            .unwrap()
            .replace("linger_ms = 600000", "linger_ms = 500"),
    )
    .unwrap();
    let (r, log) = rekey("rekey with a stale node to return (exit 3: stale nodes)", 3);
    assert_eq!(
        (
            r["nodes"].as_u64(),
            r["acked"].as_u64(),
            r["stale"].as_u64()
        ),
        (Some(3), Some(2), Some(1)),
        "{r}"
    );
    assert!(log.contains("answering late key requests"), "{log}");
    assert!(log.contains("missing=1"), "{log}");
    wait_for("the staying nodes on the new key", 5000, || {
        staying.completed_at(3) == 2
    });
}
