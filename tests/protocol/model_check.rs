//! Exhaustive model check of the real protocol machines (issue 12, deliverable 5).
//!
//! `stateright` explores every interleaving of the real [`ControllerMachine`]
//! and three real [`NodeMachine`]s — the library's own code, fed through its
//! public inputs, not a re-implementation — over a network that loses,
//! duplicates and reorders datagrams, with node crashes and restarts (restored
//! from the snapshots the machines' own `Persist` actions wrote), node link
//! loss, an isolated controller and a controller restart. See `fleet_model`
//! in `tests/protocol/model/mod.rs` for the model, its bounds and the properties.
//!
//! `cargo test --test protocol model_check::` runs the bounded check CI runs (seconds);
//! `cargo test --release --test protocol model_check:: -- --ignored --nocapture` the
//! longer one whose figures the README quotes. Both print what they explored.

use crate::model;
use crate::support;

use model::{check, Scope};

/// The check CI runs: one rekey round, one of each fault.
#[test]
fn model_check_bounded() {
    let _heavy = support::heavy();
    let reports: Vec<_> = Scope::ci().into_iter().map(check).collect();
    for r in &reports {
        r.print();
    }
    reports.iter().for_each(|r| r.assert_holds());
}

/// The longer run: a wider scope (more timer firings, late timers, two data
/// messages, healing from any state). Figures in the README.
#[test]
#[ignore = "long: minutes in a release build; run with --release -- --ignored --nocapture"]
fn model_check_long() {
    let _heavy = support::heavy();
    let reports: Vec<_> = Scope::long().into_iter().map(check).collect();
    for r in &reports {
        r.print();
    }
    reports.iter().for_each(|r| r.assert_holds());
}

/// One scope given by `MODEL_SCOPE` (fields over a fault-free base), to see what a bound costs.
#[test]
#[ignore = "for exploring bounds: MODEL_SCOPE=\"timer_firings=2,node_crashes=1\""]
fn model_check_scope_from_env() {
    let _heavy = support::heavy();
    let report = check(Scope::from_env());
    report.print();
    report.assert_holds();
}
