//! When to rekey (SPEC §3): each trigger configurable, each able to be switched off.

use super::Time;
use crate::wire::NodeId;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The triggers of SPEC §3. `None` / `false` switches a trigger off.
///
/// Counts are the fleet-wide sums of what the nodes report for the current
/// key (all nodes share one key, so the sum is what wears it out: AES-GCM with
/// random 96-bit nonces must stay well below 2^32 encryptions per key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TriggerConfig {
    /// Rekey when encryptions under the current key exceed this [claim 3].
    pub max_encryptions: Option<u64>,
    /// Rekey when decryptions under the current key exceed this [claim 3].
    pub max_decryptions: Option<u64>,
    /// Rekey when encryptions + decryptions exceed this [claim 4].
    pub max_total: Option<u64>,
    /// Rekey when the current key has been in use longer than this many ms [claim 5].
    pub max_key_age_ms: Option<u64>,
    /// Rekey when data arrives from a sender not in the management table [claim 7].
    pub on_unknown_sender: bool,
    /// Rekey when a node is removed, so it does not get the new key.
    pub on_node_removed: bool,
    /// Allow a rekey by hand (`keyfleet rekey`).
    pub manual: bool,
}

impl Default for TriggerConfig {
    fn default() -> Self {
        TriggerConfig {
            max_encryptions: Some(1 << 30),
            max_decryptions: None,
            max_total: None,
            max_key_age_ms: Some(7 * 24 * 3600 * 1000),
            on_unknown_sender: true,
            on_node_removed: true,
            manual: true,
        }
    }
}

impl TriggerConfig {
    /// Every trigger off except the manual one (what the simulator uses).
    pub fn manual_only() -> Self {
        TriggerConfig {
            max_encryptions: None,
            max_decryptions: None,
            max_total: None,
            max_key_age_ms: None,
            on_unknown_sender: false,
            on_node_removed: false,
            manual: true,
        }
    }

    /// The count trigger that fires for these fleet-wide totals, if any.
    pub fn check_usage(&self, seals: u64, opens: u64) -> Option<TriggerReason> {
        if let Some(limit) = self.max_encryptions.filter(|l| seals > *l) {
            return Some(TriggerReason::Encryptions {
                count: seals,
                limit,
            });
        }
        if let Some(limit) = self.max_decryptions.filter(|l| opens > *l) {
            return Some(TriggerReason::Decryptions {
                count: opens,
                limit,
            });
        }
        let total = seals.saturating_add(opens);
        if let Some(limit) = self.max_total.filter(|l| total > *l) {
            return Some(TriggerReason::Total {
                count: total,
                limit,
            });
        }
        None
    }

    /// When the key activated at `activated` becomes too old, if that trigger is on.
    pub fn key_age_deadline(&self, activated: Time) -> Option<Time> {
        self.max_key_age_ms.map(|ms| activated.plus(ms))
    }
}

/// Why a rekey round started (or was queued).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "trigger", rename_all = "snake_case")]
pub enum TriggerReason {
    /// The fleet's first key, made when the controller is initialised.
    Initial,
    Encryptions {
        count: u64,
        limit: u64,
    },
    Decryptions {
        count: u64,
        limit: u64,
    },
    Total {
        count: u64,
        limit: u64,
    },
    KeyAge {
        age_ms: u64,
        limit_ms: u64,
    },
    /// Data sealed with a group key came from a sender not in the management table.
    UnknownSender {
        member: u32,
        /// Where the datagram came from, as the shell saw it.
        from: core::net::SocketAddr,
    },
    Manual,
    NodeRemoved {
        node_id: NodeId,
    },
}

impl fmt::Display for TriggerReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TriggerReason::Initial => write!(f, "first key"),
            TriggerReason::Encryptions { count, limit } => {
                write!(f, "{count} encryptions > {limit}")
            }
            TriggerReason::Decryptions { count, limit } => {
                write!(f, "{count} decryptions > {limit}")
            }
            TriggerReason::Total { count, limit } => {
                write!(f, "{count} encryptions+decryptions > {limit}")
            }
            TriggerReason::KeyAge { age_ms, limit_ms } => {
                write!(f, "key age {age_ms} ms > {limit_ms} ms")
            }
            TriggerReason::UnknownSender { member, from } => {
                write!(
                    f,
                    "data from unknown sender (member {member} at {from}): key presumed leaked"
                )
            }
            TriggerReason::Manual => write!(f, "by hand"),
            TriggerReason::NodeRemoved { node_id } => write!(f, "node {node_id} removed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_count_trigger_fires_above_its_limit_only() {
        let c = TriggerConfig {
            max_encryptions: Some(10),
            max_decryptions: Some(20),
            max_total: Some(25),
            ..TriggerConfig::manual_only()
        };
        assert_eq!(c.check_usage(10, 0), None, "equal is not exceeding");
        assert_eq!(
            c.check_usage(11, 0),
            Some(TriggerReason::Encryptions {
                count: 11,
                limit: 10
            })
        );
        assert_eq!(
            c.check_usage(0, 21),
            Some(TriggerReason::Decryptions {
                count: 21,
                limit: 20
            })
        );
        assert_eq!(
            c.check_usage(10, 16),
            Some(TriggerReason::Total {
                count: 26,
                limit: 25
            })
        );
    }

    #[test]
    fn switched_off_triggers_never_fire() {
        let c = TriggerConfig::manual_only();
        assert_eq!(c.check_usage(u64::MAX, u64::MAX), None);
        assert_eq!(c.key_age_deadline(Time(5)), None);
    }

    #[test]
    fn config_reads_from_toml_with_defaults() {
        let c: TriggerConfig = toml::from_str("max_total = 1000\non_node_removed = false").unwrap();
        assert_eq!(c.max_total, Some(1000));
        assert!(!c.on_node_removed);
        assert_eq!(c.max_encryptions, TriggerConfig::default().max_encryptions);
        assert!(
            toml::from_str::<TriggerConfig>("max_totl = 5").is_err(),
            "typos are refused"
        );
    }
}
