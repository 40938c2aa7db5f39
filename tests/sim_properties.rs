//! Property tests over random schedules of the fleet simulator: S1, S2, no
//! backward transition, no undecryptable message between live nodes, and
//! convergence whenever no node went stale.

use keyfleet::sim::{run, SimConfig};
use proptest::prelude::*;

fn schedule() -> impl Strategy<Value = SimConfig> {
    (
        (2u32..9, 0.0f64..0.85, any::<u64>(), 1u32..=3),
        (0u32..3, 500u64..6000, 0u32..3, any::<bool>()),
        (0.0f64..0.05, 200u64..1500, 0.0f64..1.0, 1u64..40),
    )
        .prop_map(
            |(
                (agents, loss, seed, rounds),
                (offline, offline_ms, crash, ctl),
                (dup, data, no_hint, delay),
            )| {
                let mut c = SimConfig::new(agents, loss, seed, rounds);
                c.offline = offline;
                c.offline_ms = offline_ms;
                c.crash = crash;
                c.controller_crash = ctl;
                c.duplicate = dup;
                c.data_interval_ms = data;
                c.no_hint_fraction = no_hint;
                c.delay_max_ms = delay;
                c.stale_after_ms = 15_000;
                c
            },
        )
}

proptest! {
    // 24 schedules by default (debug builds are slow); PROPTEST_CASES=400 for a long search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        ..ProptestConfig::default()
    })]

    #[test]
    fn rotation_is_lossless_under_any_schedule(cfg in schedule()) {
        let r = run(&cfg);
        prop_assert_eq!(r.s1_violations, 0, "S1 {:?}", r);
        prop_assert_eq!(r.s2_violations, 0, "S2 {:?}", r);
        prop_assert_eq!(r.backward_transitions, 0, "backward {:?}", r);
        prop_assert_eq!(r.restore_failures, 0);
        prop_assert_eq!(r.data_undecryptable, 0, "undecryptable {:?}", r);
        if r.stale == 0 {
            prop_assert!(r.converged, "no node stale, loss {} < 1, yet not converged: {:?}", cfg.loss, r);
            prop_assert_eq!(r.rounds_completed, cfg.rounds);
        }
    }
}
