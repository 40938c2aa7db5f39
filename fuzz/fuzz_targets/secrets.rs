//! The controller's secrets file: `secrets::decode` on any envelope bytes,
//! as `secrets::load` hands it the state file's payload (the JSON envelope,
//! sealed or not), into the `ControllerSecrets` the controller uses.
//!
//! A sealed envelope is opened with a passphrase when its Argon2id
//! parameters are cheap (the KDF is slow on purpose; the fuzzer would spend
//! its time there and learn nothing), and when they are past keyfleet's
//! bounds, which must be refused before the KDF runs.
#![no_main]

use std::path::Path;

use keyfleet_files::secrets::{
    self, ControllerSecrets, SecretsError, MAX_M_COST_KIB, MAX_P_COST, MAX_T_COST,
};
use libfuzzer_sys::fuzz_target;

/// The passphrase the sealed seeds in the corpus were made with.
const PASSPHRASE: &str = "fuzz";

enum Cost {
    Cheap,
    Costly,
    PastBounds,
}

fn seal_cost(data: &[u8]) -> Cost {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return Cost::Costly;
    };
    let cost = |k: &str| v["seal"][k].as_u64();
    match (cost("m_cost_kib"), cost("t_cost"), cost("p_cost")) {
        (Some(m), Some(t), Some(p)) if m <= 256 && t <= 2 && p <= 2 => Cost::Cheap,
        (Some(m), Some(t), Some(p))
            if m > u64::from(MAX_M_COST_KIB)
                || t > u64::from(MAX_T_COST)
                || p > u64::from(MAX_P_COST) =>
        {
            Cost::PastBounds
        }
        _ => Cost::Costly,
    }
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz-secrets.json");
    match secrets::decode::<ControllerSecrets>(path, data, None) {
        Ok(s) => {
            // An unsealed file: what was read is what a save writes back.
            let again = serde_json::to_vec(&s).expect("secrets serialize");
            let back: ControllerSecrets = serde_json::from_slice(&again).expect("round trip");
            assert_eq!(back, s);
        }
        Err(SecretsError::PassphraseRequired { .. }) => match seal_cost(data) {
            Cost::Cheap => {
                let _ = secrets::decode::<ControllerSecrets>(path, data, Some(PASSPHRASE));
            }
            Cost::PastBounds => {
                let r = secrets::decode::<ControllerSecrets>(path, data, Some(PASSPHRASE));
                assert!(
                    matches!(r, Err(SecretsError::BadSeal { .. })),
                    "costly seal opened: {r:?}"
                );
            }
            Cost::Costly => {}
        },
        Err(_) => {}
    }
});
