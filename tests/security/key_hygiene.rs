//! Key hygiene (issue 5, SPEC §7): no key in a `Debug` print, secret files
//! owner-only, and no key in any log or output of a full run.
//!
//! [`Needles`] turns a key into every spelling a leak could take — hex in
//! lower and upper case, base64 (standard and URL-safe, padded or not), and the
//! decimal list `Debug` prints for a byte array — and [`Needles::find_in`]
//! looks for all of them in a text.

use crate::support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use base64::Engine;
use keyfleet_core::crypto::{Epoch, GroupKey, InitialKey, Keyring, NodeKeys};
use keyfleet_core::protocol::{
    ControllerConfig, ControllerInput, ControllerMachine, NodeConfig, NodeInput, NodeMachine, Time,
};
use keyfleet_core::wire::NodeId;
use rand::rngs::OsRng;

/// Every spelling of some keys that a leak could take.
#[derive(Default)]
pub struct Needles {
    spellings: Vec<(String, String)>,
}

impl Needles {
    pub fn new() -> Needles {
        Needles::default()
    }

    /// Adds `key` under `name`. Spellings shorter than 12 characters are not
    /// kept (they would match by chance); a 16-byte key gives 32 hex digits.
    pub fn add(&mut self, name: &str, key: &[u8]) {
        let hex = hex::encode(key);
        let mut forms = vec![
            ("hex".to_owned(), hex.clone()),
            ("HEX".to_owned(), hex.to_uppercase()),
            (
                "base64".to_owned(),
                base64::engine::general_purpose::STANDARD.encode(key),
            ),
            (
                "base64 unpadded".to_owned(),
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(key),
            ),
            (
                "base64url".to_owned(),
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key),
            ),
        ];
        // `{:?}` of a byte array or slice: "[171, 205, ...]"; the first 8 bytes suffice.
        let dec: Vec<String> = key.iter().take(8).map(|b| b.to_string()).collect();
        forms.push(("decimal list".to_owned(), dec.join(", ")));
        forms.push(("decimal list (compact)".to_owned(), dec.join(",")));
        // Hex with separators every 2 or 4 digits (as the label forms print keys).
        let mut spaced = String::new();
        for (i, c) in hex.chars().take(16).enumerate() {
            if i > 0 && i % 4 == 0 {
                spaced.push(' ');
            }
            spaced.push(c);
        }
        forms.push(("hex grouped".to_owned(), spaced.to_uppercase()));
        for (form, s) in forms {
            if s.len() >= 12 {
                self.spellings.push((format!("{name} as {form}"), s));
            }
        }
    }

    /// The spellings found in `text`, as "name as form".
    pub fn find_in(&self, text: &str) -> Vec<String> {
        self.spellings
            .iter()
            .filter(|(_, s)| text.contains(s.as_str()))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// How many spellings are looked for.
    pub fn count(&self) -> usize {
        self.spellings.len()
    }
}

fn bytes_of(key: &GroupKey) -> [u8; 32] {
    // GroupKey keeps its bytes crate-private; its serde form is the way out
    // (the same way a state file stores it).
    let v = serde_json::to_value(key).unwrap();
    let arr: Vec<u8> = serde_json::from_value(v["bytes"].clone()).unwrap();
    arr.try_into().unwrap()
}

#[test]
fn needles_find_every_spelling_and_nothing_else() {
    let key = [
        0xabu8, 0xcd, 0x01, 0x23, 0x45, 0x67, 0x89, 0xef, 0x10, 0x32, 0x54, 0x76, 0x98, 0xba, 0xdc,
        0xfe,
    ];
    let mut n = Needles::new();
    n.add("k", &key);
    assert!(n.count() >= 6);
    for text in [
        "key=abcd0123456789ef1032547698badcfe",
        "KEY ABCD0123456789EF1032547698BADCFE",
        "q80BI0Vnie8QMlR2mLrc/g==",
        "[171, 205, 1, 35, 69, 103, 137, 239, 16]",
        "ABCD 0123 4567 89EF",
    ] {
        assert!(!n.find_in(text).is_empty(), "missed in {text:?}");
    }
    assert!(n.find_in("abcd0123 check 4567").is_empty());
}

/// `Debug` of every type that holds key material prints no key, in any spelling.
#[test]
fn debug_of_key_types_prints_no_key_material() {
    let mut needles = Needles::new();
    let initial = InitialKey([
        0x5a, 0x17, 0xc3, 0x99, 0x04, 0xe1, 0x7b, 0x28, 0x66, 0xd0, 0x3f, 0x81, 0xa2, 0x4c, 0xb5,
        0x0e,
    ]);
    needles.add("initial key", &initial.0);
    let g1 = GroupKey::generate(Epoch(1), &mut OsRng);
    let g2 = GroupKey::generate(Epoch(2), &mut OsRng);
    needles.add("group key 1", &bytes_of(&g1));
    needles.add("group key 2", &bytes_of(&g2));
    let node_keys = NodeKeys::derive(&initial);
    {
        let v = serde_json::to_value(&node_keys).unwrap();
        for field in ["kek", "mac"] {
            let b: Vec<u8> = serde_json::from_value(v[field].clone()).unwrap();
            needles.add(&format!("node {field}"), &b);
        }
    }
    let mut ring = Keyring::new(g1.clone());
    ring.install_new(g2.clone()).unwrap();

    // A controller and a node that joined it: their snapshots hold every key.
    let mut out = Vec::new();
    let mut ctl =
        ControllerMachine::new(ControllerConfig::default(), Time(1), &mut OsRng, &mut out);
    let id = NodeId::parse("pump-1").unwrap();
    let addr = "192.0.2.5:7001".parse().unwrap();
    ctl.handle(
        Time(1),
        ControllerInput::Enroll {
            node_id: id.clone(),
            initial_key: initial.clone(),
            addr,
        },
        &mut OsRng,
        &mut out,
    )
    .unwrap();
    let core = ctl.core();
    {
        let v = serde_json::to_value(&core).unwrap();
        let seed: Vec<u8> = serde_json::from_value(v["signing_key"].clone()).unwrap();
        needles.add("controller signing key", &seed);
        let cur: Vec<u8> = serde_json::from_value(v["current"]["bytes"].clone()).unwrap();
        needles.add("controller's current group key", &cur);
    }
    let mut node = NodeMachine::new(id, &initial, NodeConfig::default());
    let mut n_out = Vec::new();
    node.handle(Time(1), NodeInput::LinkUp, &mut OsRng, &mut n_out);

    let mut secrets = keyfleet::secrets::ControllerSecrets::generate();
    secrets.set_initial_key("pump-1", &initial.0);
    secrets.current = Some(keyfleet::secrets::EpochKey {
        epoch: 2,
        key: bytes_of(&g2),
    });
    needles.add("secrets signing seed", &secrets.signing_seed);

    let label_key = keyfleet_core::label::InitialKey::from_bytes(initial.0);
    // The ratchet's secrets: a chain, a step, a share secret.
    let secret = keyfleet_core::crypto::ShareSecret::generate(&mut OsRng);
    let peer = keyfleet_core::crypto::ShareSecret::generate(&mut OsRng).public();
    let chain = keyfleet_core::crypto::Chain::from_bytes([0x3c; 32], [0x5d; 32]);
    needles.add("chain key", &[0x3c; 32]);
    needles.add("chain mac key", &[0x5d; 32]);
    {
        let v = serde_json::to_value(&secret).unwrap();
        let b: Vec<u8> = serde_json::from_value(v).unwrap();
        needles.add("share secret", &b);
    }
    let step = keyfleet_core::crypto::Step::derive(
        &chain,
        &secret.dh(&peer).unwrap(),
        1,
        &peer,
        &secret.public(),
    );
    {
        let v = serde_json::to_value(&step).unwrap();
        let b: Vec<u8> = serde_json::from_value(v["wrap"].clone()).unwrap();
        needles.add("step wrap key", &b);
        let b: Vec<u8> = serde_json::from_value(v["next"]["chain"].clone()).unwrap();
        needles.add("step next chain", &b);
    }

    let prints: Vec<(&str, String)> = vec![
        ("InitialKey", format!("{initial:?} {initial:#?}")),
        ("GroupKey", format!("{g1:?} {g2:#?}")),
        ("NodeKeys", format!("{node_keys:?} {node_keys:#?}")),
        ("Keyring", format!("{ring:?} {ring:#?}")),
        ("ControllerCore", format!("{core:?} {core:#?}")),
        (
            "ControllerPersist",
            format!("{:?} {:#?}", ctl.snapshot(), ctl.snapshot()),
        ),
        (
            "NodePersist",
            format!("{:?} {:#?}", node.snapshot(), node.snapshot()),
        ),
        ("controller actions", format!("{out:?}")),
        ("node actions", format!("{n_out:?}")),
        ("ControllerSecrets", format!("{secrets:?} {secrets:#?}")),
        (
            "drivers label InitialKey",
            format!("{label_key:?} {label_key:#?}"),
        ),
        (
            "ratchet Chain, Step, ShareSecret",
            format!("{chain:?} {chain:#?} {step:?} {step:#?} {secret:?} {secret:#?}"),
        ),
    ];
    assert!(needles.count() > 40);
    for (what, text) in &prints {
        let found = needles.find_in(text);
        assert!(found.is_empty(), "Debug of {what} shows {found:?}:\n{text}");
    }
    // The check values are what may be shown instead; make sure they are there.
    assert!(prints[1].1.contains(&g1.check_value().to_string()));
}

/// Every file, directory and socket under `dir` is open to its owner only.
pub fn assert_owner_only(dir: &Path) {
    for entry in walk(dir) {
        let meta = std::fs::symlink_metadata(&entry).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        let what = if meta.is_dir() {
            "directory"
        } else if meta.is_file() {
            "file"
        } else if meta.file_type().is_socket() {
            "socket"
        } else {
            continue;
        };
        assert_eq!(
            mode & 0o077,
            0,
            "{what} {} has mode {mode:o}",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        if std::fs::symlink_metadata(&p)
            .map(|m| m.is_dir())
            .unwrap_or(false)
        {
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                out.push(e.path());
            }
        }
        i += 1;
    }
    out
}

/// The library's writers of secrets leave owner-only files in owner-only
/// directories, and the files hold no key in a spelling other than the one
/// their format documents (the secrets file stores hex inside a hex payload).
#[test]
fn secret_files_written_by_the_library_are_owner_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let mut secrets = keyfleet::secrets::ControllerSecrets::generate();
    secrets.set_initial_key("pump-1", &[7u8; 16]);
    keyfleet::secrets::save(
        &dir.join("secrets.json"),
        &secrets,
        None,
        keyfleet::secrets::SealParams::default(),
    )
    .unwrap();
    let node = NodeMachine::new(
        NodeId::parse("pump-1").unwrap(),
        &InitialKey([7u8; 16]),
        NodeConfig::default(),
    );
    keyfleet::statefile::write_json(&dir.join("node.json"), &node.snapshot()).unwrap();
    assert_owner_only(&dir);
}

/// Every array of 16 or 32 small numbers in a JSON document: how the state
/// and secrets files store key bytes (initial keys, KEK and MAC keys, group
/// keys, the signing key), found without depending on field names.
fn key_arrays(v: &serde_json::Value, out: &mut Vec<Vec<u8>>) {
    match v {
        serde_json::Value::Array(a) => {
            let bytes: Option<Vec<u8>> = a
                .iter()
                .map(|x| x.as_u64().and_then(|n| u8::try_from(n).ok()))
                .collect();
            match bytes {
                Some(b) if b.len() == 16 || b.len() == 32 => {
                    if !out.contains(&b) {
                        out.push(b)
                    }
                }
                _ => a.iter().for_each(|x| key_arrays(x, out)),
            }
        }
        serde_json::Value::Object(o) => o.values().for_each(|x| key_arrays(x, out)),
        _ => {}
    }
}

/// The keys a live fleet holds right now: the controller's secrets file and
/// both slots of every agent's state file.
fn keys_on_disk(f: &support::adversary::procs::Fleet, out: &mut Vec<Vec<u8>>) {
    controller_keys(&f.state(), out);
    for a in &f.agents {
        for slot in ["state.json", "state.json.b"] {
            let path = a.state.join(slot);
            if let Some(st) = keyfleet::statefile::read_json::<serde_json::Value>(&path).unwrap() {
                key_arrays(&st, out);
            }
        }
    }
}

fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A live fleet (`keyfleet serve`, three agents) with RUST_LOG=trace goes
/// through joins, group data and two rekey rounds; then every key it used —
/// initial keys, KEKs and MAC keys, the signing key, the group key of every
/// epoch — is looked for in every log line and every command's output (hex,
/// HEX, base64, decimal), and as raw bytes in the management table; and every
/// file, directory and socket of the controller and the agents is owner-only.
#[test]
fn a_live_fleet_logs_no_key_and_keeps_its_files_owner_only() {
    let _heavy = support::heavy();
    use support::adversary::procs::Fleet;
    let f = Fleet::start(3, "trace");
    let mut keys: Vec<Vec<u8>> = f.agents.iter().map(|a| a.key.to_vec()).collect();
    keys_on_disk(&f, &mut keys);
    for epoch in 2..=3u64 {
        for a in &f.agents {
            let out = std::process::Command::new(support::AGENT)
                .args(["send", "--state"])
                .arg(&a.state)
                .arg(format!("hello from {} in epoch {}", a.id, epoch - 1))
                .output()
                .unwrap();
            assert!(out.status.success());
        }
        let r = f.json(&["rekey", "--json"]);
        assert_eq!(r["acked"], 3, "{r}");
        f.wait_all(epoch, 10_000);
        keys_on_disk(&f, &mut keys);
    }
    f.json(&["status", "--json"]);
    f.json(&["history", "--json", "--audit", "1000"]);
    let mut texts: Vec<(String, String)> = f
        .transcript
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("keyfleet command #{i}"), t.clone()))
        .collect();
    for a in &f.agents {
        let out = std::process::Command::new(support::AGENT)
            .args(["status", "--json", "--state"])
            .arg(&a.state)
            .output()
            .unwrap();
        texts.push((
            format!("keyfleet-agent status of {}", a.id),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ));
    }
    for (path, text) in f.logs() {
        texts.push((path.display().to_string(), text));
    }
    // The controller's public key is stored too (agents keep it); it is no secret.
    let public: Vec<Vec<u8>> = keys
        .iter()
        .filter_map(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
        .map(|seed| {
            ed25519_dalek::SigningKey::from_bytes(&seed)
                .verifying_key()
                .to_bytes()
                .to_vec()
        })
        .collect();
    keys.retain(|k| !public.contains(k));
    // 3 initial keys, 3 x (KEK, MAC), the signing key, group keys of epochs 1-3.
    assert!(
        keys.len() >= 3 + 6 + 1 + 3,
        "found {} keys on disk",
        keys.len()
    );
    let trace_lines: usize = texts.iter().map(|(_, t)| t.lines().count()).sum();
    assert!(
        trace_lines > 200,
        "RUST_LOG=trace logged only {trace_lines} lines"
    );
    let levels: Vec<usize> = ["TRACE", "DEBUG"]
        .iter()
        .map(|l| texts.iter().map(|(_, t)| t.matches(l).count()).sum())
        .collect();
    eprintln!("log lines at TRACE: {}, at DEBUG: {}", levels[0], levels[1]);
    assert!(levels[1] > 0, "no DEBUG line: RUST_LOG=trace did not take");
    let mut needles = Needles::new();
    for (i, k) in keys.iter().enumerate() {
        needles.add(&format!("key #{i} ({} bytes)", k.len()), k);
    }
    for (name, text) in &texts {
        let found = needles.find_in(text);
        assert!(found.is_empty(), "{name} shows {found:?}");
    }
    // The management table stores check values and fingerprints, never key bytes.
    for e in std::fs::read_dir(f.state()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("fleet.db") {
            continue;
        }
        let bytes = std::fs::read(e.path()).unwrap();
        for (i, k) in keys.iter().enumerate() {
            assert!(
                !contains_bytes(&bytes, k),
                "{name} holds key #{i} as raw bytes"
            );
            let text = String::from_utf8_lossy(&bytes);
            let found = needles.find_in(&text);
            assert!(found.is_empty(), "{name} shows {found:?}");
        }
    }
    eprintln!(
        "searched {} texts ({trace_lines} lines) for {} keys in {} spellings",
        texts.len(),
        keys.len(),
        needles.count()
    );
    assert_owner_only(&f.state());
    for a in &f.agents {
        assert_owner_only(&a.state);
    }
}

/// The keys of the controller of state directory `dir`: the state key of its
/// `controller.secrets` and every key of the state it keeps (sealed) in its
/// management table.
fn controller_keys(dir: &Path, out: &mut Vec<Vec<u8>>) {
    let file: serde_json::Value = keyfleet::secrets::load(&dir.join("controller.secrets"), None)
        .unwrap()
        .unwrap();
    out.push(hex::decode(file["state_key"].as_str().unwrap()).unwrap());
    let opts = keyfleet::controller::Options::new(
        keyfleet::controller::StateDir::new(dir),
        keyfleet::config::Config::default(),
    );
    let state = keyfleet::controller::read_state(&opts).unwrap();
    key_arrays(&serde_json::to_value(&state).unwrap(), out);
}

/// Every key a kept demo directory holds: the controller's secrets, every
/// agent's state file, every `initial-key` file (read as the agent reads it).
fn keys_in_dir(dir: &Path, out: &mut Vec<Vec<u8>>) -> usize {
    let mut files = 0;
    for p in walk(dir) {
        if !p.is_file() {
            continue;
        }
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let value: Option<serde_json::Value> = match name.as_str() {
            "controller.secrets" => {
                controller_keys(p.parent().unwrap(), out);
                files += 1;
                None
            }
            // Both slots of an agent's state file (each read as a file of its own).
            "state.json" | "state.json.b" => keyfleet::statefile::read_json(&p).unwrap(),
            "initial-key" => {
                let text = std::fs::read_to_string(&p).unwrap();
                let parsed = keyfleet_core::label::parse(text.trim()).unwrap();
                out.push(parsed.key.as_bytes().to_vec());
                files += 1;
                None
            }
            _ => None,
        };
        if let Some(v) = value {
            key_arrays(&v, out);
            files += 1;
        }
    }
    out.sort();
    out.dedup();
    files
}

/// `keyfleet demo --keep` with RUST_LOG=trace: a controller, five agents,
/// two rotations while messages flow. Every key the demo used — initial keys,
/// KEKs, MAC keys, the signing key, the group keys of all three epochs — is
/// looked for in its stdout, its stderr and every log file it left, in hex,
/// HEX, base64 and decimal; and every file it left with a key is owner-only.
#[test]
fn a_full_demo_logs_no_key_it_used() {
    let _heavy = support::heavy();
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyfleet"))
        .args(["demo", "--keep", "--json"])
        .env("RUST_LOG", "trace")
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "keyfleet demo failed: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let kept: Vec<std::path::PathBuf> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("keyfleet-demo-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "the demo keeps one directory: {kept:?}");
    let dir = &kept[0];
    // The group key of every epoch: the controller's secrets hold only the
    // current one, so the agents' state files are read too; with 2 rounds the
    // demo ends at epoch 3 and each state holds the key of epoch 3. Earlier
    // epochs' keys are gone from disk by design (zeroized, replaced), so the
    // search covers the keys still on disk after the run.
    let mut keys = Vec::new();
    let files = keys_in_dir(dir, &mut keys);
    let public: Vec<Vec<u8>> = keys
        .iter()
        .filter_map(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
        .map(|seed| {
            ed25519_dalek::SigningKey::from_bytes(&seed)
                .verifying_key()
                .to_bytes()
                .to_vec()
        })
        .collect();
    keys.retain(|k| !public.contains(k));
    // 5 initial keys, 5 x (KEK, MAC), the signing key, the current group key.
    assert!(files >= 11, "only {files} key files in {}", dir.display());
    assert!(keys.len() >= 17, "found {} keys", keys.len());
    let mut texts = vec![
        ("demo stdout".to_owned(), stdout.clone()),
        ("demo stderr".to_owned(), stderr.clone()),
    ];
    for p in walk(dir) {
        if p.extension().is_some_and(|x| x == "log") {
            texts.push((
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap_or_default(),
            ));
        }
    }
    let lines: usize = texts.iter().map(|(_, t)| t.lines().count()).sum();
    let debug: usize = texts.iter().map(|(_, t)| t.matches("DEBUG").count()).sum();
    assert!(
        debug > 0,
        "no DEBUG line: RUST_LOG=trace did not reach the demo's processes"
    );
    let mut needles = Needles::new();
    for (i, k) in keys.iter().enumerate() {
        needles.add(&format!("key #{i} ({} bytes)", k.len()), k);
    }
    for (name, text) in &texts {
        let found = needles.find_in(text);
        assert!(found.is_empty(), "{name} shows {found:?}");
    }
    eprintln!(
        "demo: {} texts, {lines} lines ({debug} at DEBUG) searched for {} keys in {} spellings; report {report}",
        texts.len(),
        keys.len(),
        needles.count()
    );
    for p in walk(dir) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if [
            "controller.secrets",
            "state.json",
            "state.json.b",
            "initial-key",
        ]
        .contains(&name.as_str())
        {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", p.display());
        }
    }
}
