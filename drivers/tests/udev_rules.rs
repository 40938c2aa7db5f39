//! The udev rules in udev/: they parse (udev/check-rules.sh: `udevadm
//! verify`, or `udevadm test` in a private mount namespace), and they cover
//! every device kind the key sources open.
use std::path::Path;
use std::process::Command;

fn udev_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../udev")
}

#[test]
fn rules_parse() {
    let out = Command::new(udev_dir().join("check-rules.sh"))
        .output()
        .expect("run udev/check-rules.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {}
        Some(77) => eprintln!("SKIPPED: {}", stderr.trim()),
        code => panic!("udev rules do not parse (exit {code:?}):\n{stderr}"),
    }
}

#[test]
fn rules_cover_every_device_kind() {
    let text = std::fs::read_to_string(udev_dir().join("70-keyfleet.rules")).unwrap();
    let rules: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .collect();
    let has = |needle: &str| rules.iter().any(|l| l.contains(needle));
    for needle in [
        "SUBSYSTEM==\"hidraw\"",
        "ttyUSB",
        "ttyACM",
        "SUBSYSTEM==\"video4linux\"",
        "TAG+=\"uaccess\"",
        "SYMLINK+=\"keyfleet/hid-scanner-",
        "SYMLINK+=\"keyfleet/$env{KEYFLEET_KIND}-",
        "SYMLINK+=\"keyfleet/webcam-",
        "ID_MM_DEVICE_IGNORE",
    ] {
        assert!(has(needle), "no rule with {needle}");
    }
    // Every GOTO has its LABEL.
    for l in &rules {
        if let Some(i) = l.find("GOTO=\"") {
            let label = l[i + 6..].split('"').next().unwrap();
            assert!(
                rules
                    .iter()
                    .any(|r| r.contains(&format!("LABEL=\"{label}\""))),
                "GOTO {label} without LABEL"
            );
        }
    }
}
