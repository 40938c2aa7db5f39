//! Serf's half of the rotation benchmark against real `serf agent` processes
//! on 127.0.0.1: the cluster forms, a rotation replaces the key on every
//! member, and nothing but the new key is left. Skipped, with the reason
//! printed, where Debian's `serf` is not installed.

use std::path::Path;

use keyfleet_bench::procs::PortPool;
use keyfleet_bench::serf::{self, Cluster};

fn serf_binary() -> Option<&'static Path> {
    let ok = std::process::Command::new("serf")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: serf is not installed (apt-get install -y serf)");
    }
    ok.then_some(Path::new("serf"))
}

#[test]
fn a_rotation_leaves_only_the_new_key_on_every_member() {
    let Some(bin) = serf_binary() else { return };
    let mut ports = PortPool::new(41000 + (std::process::id() % 2000) as u16);
    let mut c = Cluster::start(bin, 3, &mut ports, "lan").unwrap();
    assert_eq!(c.alive().unwrap(), 3);
    assert_eq!(c.processes(), 3);
    let first = c.key.clone();
    assert_eq!(c.list().unwrap(), vec![(first.clone(), 3, 3)]);

    let rep = c.rotate().unwrap();
    assert_ne!(c.key, first);
    assert!(rep.total_ms >= rep.install_ms + rep.use_ms);
    assert_eq!(
        c.list().unwrap(),
        vec![(c.key.clone(), 3, 3)],
        "the old key is gone and the new one is on all three"
    );
    assert!(c.verify().unwrap());
}

#[test]
fn the_benchmark_reports_every_repetition_and_a_verified_cluster() {
    let Some(bin) = serf_binary() else { return };
    let r = serf::run(
        bin,
        &[2],
        2,
        43000 + (std::process::id() % 2000) as u16,
        "lan",
    );
    assert_eq!(r.runs.len(), 1);
    let run = &r.runs[0];
    assert_eq!(run.error, None);
    assert_eq!(run.reps.len(), 2);
    assert!(run.verified);
    assert!(run.median_total_ms().is_some_and(|m| m > 0.0));
    assert!(r.version.is_some_and(|v| !v.is_empty()));
}
