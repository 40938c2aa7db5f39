//! The crate boundaries ARCHITECTURE.md draws, checked on the dependency graph
//! cargo resolves (not on what the source happens to import today):
//! - the pure core (`keyfleet-core`) has no runtime, socket or database crate
//!   in its tree;
//! - nor have the on-disk formats (`keyfleet-files`), nor the fuzz targets
//!   (`fuzz/`, its own workspace), which parse those formats without SQLite;
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

/// What the fuzz build must not hold: the shells and their runtime, sockets
/// and databases (`SHELL_CRATES` but for the drivers, whose decoders it fuzzes).
const FUZZ_FORBIDDEN: &[&str] = &[
    "tokio",
    "socket2",
    "rusqlite",
    "libsqlite3-sys",
    "tokio-postgres",
    "hyper",
    "netlink-sys",
    "tracing-subscriber",
    "keyfleet",
];

/// The crates of `names` that are in `crates`.
fn among<'a>(names: &'a [String], crates: &[&str]) -> Vec<&'a String> {
    names
        .iter()
        .filter(|n| crates.contains(&n.as_str()))
        .collect()
}

#[test]
fn the_core_has_no_runtime_socket_or_database_crate_in_its_tree() {
    let names = tree(&["-p", "keyfleet-core"]);
    assert!(names.iter().any(|n| n == "keyfleet-core"), "{names:?}");
    // The tree is real: the core's own cryptography is in it.
    assert!(names.iter().any(|n| n == "aes-gcm"), "{names:?}");
    let found = among(&names, SHELL_CRATES);
    assert!(found.is_empty(), "keyfleet-core depends on {found:?}");
}

#[test]
fn the_file_formats_have_no_runtime_socket_or_database_crate_in_their_tree() {
    let names = tree(&["-p", "keyfleet-files"]);
    assert!(names.iter().any(|n| n == "keyfleet-files"), "{names:?}");
    // The tree is real: the sealed secrets' key derivation is in it.
    assert!(names.iter().any(|n| n == "argon2"), "{names:?}");
    let found = among(&names, SHELL_CRATES);
    assert!(found.is_empty(), "keyfleet-files depends on {found:?}");
}

#[test]
fn the_fuzz_targets_build_without_sqlite_or_the_shells() {
    let names = tree(&["--manifest-path", "fuzz/Cargo.toml"]);
    // The tree is real: the targets' parsers and libFuzzer are in it.
    for needed in ["keyfleet-fuzz", "keyfleet-files", "libfuzzer-sys"] {
        assert!(names.iter().any(|n| n == needed), "{needed}: {names:?}");
    }
    // The drivers' decoders are fuzzed too (and bring mio, through the
    // keyboard's crossterm); the shells, their runtime and databases are not there.
    let found = among(&names, FUZZ_FORBIDDEN);
    assert!(found.is_empty(), "the fuzz targets depend on {found:?}");
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
