//! keyfleet's half of the rotation benchmark against the real binaries of
//! the same build (`keyfleet`, `keyfleet-agent` beside this test's
//! directory, as `bench/run.sh` builds them). Skipped, with the reason
//! printed, when those binaries are not built or lack the commands.

use std::path::PathBuf;

use keyfleet_bench::fleet::{self, Bins};

fn build_dir() -> PathBuf {
    // target/<profile>/deps/<this test> → target/<profile>/
    let exe = std::env::current_exe().expect("the test knows its path");
    exe.ancestors()
        .nth(2)
        .expect("in target/<profile>/deps")
        .to_path_buf()
}

fn bins() -> Option<Bins> {
    let b = Bins::in_dir(&build_dir());
    if let Some(why) = b.missing() {
        eprintln!("skipped: {why} (cargo build -p keyfleet --bins with the same profile first)");
        return None;
    }
    Some(b)
}

#[test]
fn three_agents_are_rotated_by_each_rekey() {
    let Some(b) = bins() else { return };
    let r = fleet::run(
        &b,
        &[3],
        2,
        45000 + (std::process::id() % 2000) as u16,
        None,
    );
    assert_eq!(r.skipped, None);
    let run = &r.runs[0];
    assert_eq!(run.error, None);
    assert_eq!(run.reps.len(), 2);
    for rep in &run.reps {
        assert_eq!((rep.acked, rep.stale), (3, 0), "{rep:?}");
        assert!(rep.wall_ms >= rep.elapsed_ms, "{rep:?}");
    }
    assert_eq!(run.reps[1].epoch, run.reps[0].epoch + 1);
    assert!(
        run.verified,
        "every agent in UpdateCompleted at the last epoch"
    );
}

#[test]
fn the_simulator_run_is_read_back() {
    let b = Bins::in_dir(&build_dir());
    if !b.keyfleet.is_file() {
        eprintln!("skipped: {} is not built", b.keyfleet.display());
        return;
    }
    let s = fleet::sim(&b.keyfleet, 20, "virtual", 0.0, 1);
    assert_eq!(s.error, None);
    assert_eq!(s.converged, Some(true));
    assert_eq!(s.data_undecryptable, Some(0));
    assert!(s.ms_per_round_p50.is_some_and(|m| m > 0.0));
    assert_eq!(s.report["agents"], 20);
}
