//! The crate boundaries ARCHITECTURE.md draws, checked on the dependency graph
//! cargo resolves (not on what the source happens to import today):
//! - the pure core (`keyfleet-core`) has no runtime, socket or database crate
//!   in its tree;
//! - `keyfleet-agent` links no peripheral code: the `keyfleet` package without
//!   its default features has no drivers crate in its tree.
use std::process::Command;

fn tree(args: &[&str]) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none"])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Crates that do I/O or hold a runtime: none of them belongs in the core.
const SHELL_CRATES: &[&str] = &[
    "tokio",
    "mio",
    "socket2",
    "rusqlite",
    "libsqlite3-sys",
    "tokio-postgres",
    "hyper",
    "netlink-sys",
    "tracing-subscriber",
    "keyfleet",
    "keyfleet-drivers",
];

#[test]
fn the_core_has_no_runtime_socket_or_database_crate_in_its_tree() {
    let names = tree(&["-p", "keyfleet-core"]);
    assert!(names.iter().any(|n| n == "keyfleet-core"), "{names:?}");
    // The tree is real: the core's own cryptography is in it.
    assert!(names.iter().any(|n| n == "aes-gcm"), "{names:?}");
    let found: Vec<&String> = names
        .iter()
        .filter(|n| SHELL_CRATES.contains(&n.as_str()))
        .collect();
    assert!(found.is_empty(), "keyfleet-core depends on {found:?}");
}

#[test]
fn the_agent_build_links_no_peripheral_code() {
    let names = tree(&["-p", "keyfleet", "--no-default-features"]);
    assert!(names.iter().any(|n| n == "keyfleet-core"), "{names:?}");
    for peripheral in [
        "keyfleet-drivers",
        "hidapi",
        "serialport",
        "nokhwa",
        "crossterm",
        "ratatui",
    ] {
        assert!(
            !names.iter().any(|n| n == peripheral),
            "keyfleet without default features still pulls {peripheral}"
        );
    }
    // With the default features the drivers are there: the check above can fail.
    let full = tree(&["-p", "keyfleet"]);
    assert!(full.iter().any(|n| n == "keyfleet-drivers"), "{full:?}");
}
