//! Every file in fixtures/labels/ parsed by `label::parse`, checked against
//! the answer beside it (`NAME.expected.json`), which fixtures/make.py
//! computed with an independent implementation of the forms.
use std::path::{Path, PathBuf};

use keyfleet_drivers::label;

fn fixtures() -> Vec<(PathBuf, serde_json::Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/labels");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).expect("fixtures/labels") {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) != Some("txt") {
            continue;
        }
        let exp = p.with_extension("expected.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&exp).expect("expected.json beside"))
                .unwrap();
        out.push((p, v));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_label_fixture_gives_its_expected_answer() {
    let all = fixtures();
    assert!(all.len() >= 20, "only {} fixtures", all.len());
    let (mut accepted, mut refused) = (0, 0);
    for (path, exp) in all {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy();
        match (
            label::parse(&text),
            exp.get("refused").and_then(|r| r.as_str()),
        ) {
            (Ok(p), None) => {
                assert_eq!(p.key.fingerprint(), exp["key_check"], "{name}");
                assert_eq!(
                    p.node_id.as_ref().map(|n| n.as_str()),
                    exp["node_id"].as_str(),
                    "{name}"
                );
                accepted += 1;
            }
            (Err(e), Some(reason)) => {
                assert!(
                    e.to_string().contains(reason),
                    "{name}: refused with {e:?}, expected the reason to say {reason:?}"
                );
                refused += 1;
            }
            (Ok(p), Some(reason)) => panic!("{name}: accepted ({p:?}), expected refusal: {reason}"),
            (Err(e), None) => panic!("{name}: refused with {e}, expected {exp}"),
        }
    }
    assert!(
        accepted >= 10 && refused >= 10,
        "{accepted} accepted, {refused} refused"
    );
}
