//! The agent's state file and its status report.
//!
//! `<state>/state.json` is kept in two slots by [`crate::statefile::Slots`]
//! (`state.json` and `state.json.b`, overwritten in place in turn, each with
//! a generation number and a checksum, made durable with one `fdatasync`;
//! mode 0600), so the newest intact slot is always the previous or the new
//! complete snapshot: a write torn by a crash loses only itself. It holds the
//! [`NodePersist`] snapshot (node id, the keys derived from the initial key,
//! member number, controller public key, keyring, reserved sequence numbers)
//! plus what `keyfleet-agent status` shows without a running agent.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::statefile::{self, StateFileError};
use keyfleet_core::crypto::Epoch;
use keyfleet_core::protocol::{NodeConfig, NodeMachine, NodePersist, NodeState};

use super::AgentError;

/// The state file's name inside the state directory.
pub const STATE_FILE: &str = "state.json";
/// The lock file's name: one agent per state directory.
pub const LOCK_FILE: &str = "agent.lock";
/// The version of [`StoredState`] this build writes.
const FORMAT: u32 = 1;

/// What `state.json` holds.
#[derive(Serialize, Deserialize)]
pub struct StoredState {
    pub format: u32,
    pub node: NodePersist,
    /// Fingerprint of the initial key the node was started with, so that a
    /// restart with another key is refused instead of silently ignored.
    pub initial_key_fingerprint: String,
    /// When this snapshot was written (ms since the UNIX epoch).
    pub saved_at_ms: u64,
    /// When the node last synced with the controller (ms since the UNIX epoch).
    pub last_sync_ms: Option<u64>,
}

/// Reads `<dir>/state.json` (its newest intact slot); `Ok(None)` when there
/// is none yet. A damaged other slot (a write torn by a crash) is logged.
pub fn load(dir: &Path) -> Result<Option<StoredState>, AgentError> {
    let path = dir.join(STATE_FILE);
    let Some(read) = statefile::read_slots(&path).map_err(|e| AgentError::state(&path, e))? else {
        return Ok(None);
    };
    if let Some(damaged) = &read.damaged {
        tracing::warn!(
            using = %read.from.display(),
            "{damaged}; the other slot is intact and is used (a write cut short by a crash or a power loss leaves this)"
        );
    }
    let stored: Option<StoredState> = serde_json::from_slice(&read.payload)
        .map(Some)
        .map_err(|source| StateFileError::Json {
            path: read.from.clone(),
            source,
        })
        .map_err(|e| AgentError::state(&path, e))?;
    match stored {
        Some(s) if s.format != FORMAT => Err(AgentError::UnknownFormat {
            path,
            format: s.format,
        }),
        other => Ok(other),
    }
}

/// Saves agent snapshots to `<dir>/state.json`, in its two slots.
pub struct StateFile {
    path: PathBuf,
    slots: statefile::Slots,
    fingerprint: String,
}

impl StateFile {
    pub fn new(dir: &Path, initial_key_fingerprint: String) -> StateFile {
        let path = dir.join(STATE_FILE);
        StateFile {
            slots: statefile::Slots::open(&path),
            path,
            fingerprint: initial_key_fingerprint,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl super::Persister for StateFile {
    fn persist(
        &mut self,
        node: &NodePersist,
        now_ms: u64,
        last_sync_ms: Option<u64>,
        flush: bool,
    ) -> Result<(), StateFileError> {
        #[derive(Serialize)]
        struct Borrowed<'a> {
            format: u32,
            node: &'a NodePersist,
            initial_key_fingerprint: &'a str,
            saved_at_ms: u64,
            last_sync_ms: Option<u64>,
        }
        let bytes = statefile::to_json_zeroizing(&Borrowed {
            format: FORMAT,
            node,
            initial_key_fingerprint: &self.fingerprint,
            saved_at_ms: now_ms,
            last_sync_ms,
        })
        .map_err(|source| StateFileError::Json {
            path: self.path.clone(),
            source,
        })?;
        if flush {
            self.slots.write(&bytes)
        } else {
            self.slots.write_unsynced(&bytes)
        }
    }
}

/// Where a status report came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusSource {
    /// Asked the running agent over its application socket.
    RunningAgent,
    /// Read from the state file (no agent answered).
    StateFile,
}

/// One group key the node holds, by its check value (never the key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatus {
    pub epoch: u32,
    /// `current` (UpdateCompleted), `old` or `new` (during a round).
    pub role: String,
    pub check: String,
    /// Encryptions and decryptions under this key (the count triggers' input).
    pub seals: u64,
    pub opens: u64,
}

/// Counters of a running agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningStatus {
    pub pid: u32,
    pub listen: String,
    pub group: String,
    pub controller: String,
    pub uptime_ms: u64,
    /// Joined and not waiting for the controller's answer to a key request.
    pub synced: bool,
    pub datagrams_in: u64,
    pub refused: u64,
    /// Group datagrams longer than any keyfleet sends (over 4 KiB), dropped
    /// unread by the transport (not in `datagrams_in` or `refused`).
    #[serde(default)]
    pub oversized: u64,
    /// Node messages on the group (other agents', its own echoed): ignored, not refused.
    #[serde(default)]
    pub node_messages_ignored: u64,
    pub undecryptable: u64,
    pub data_sent: u64,
    /// Application messages dropped because the hold queue was full (the
    /// agent held them while it was not synced, and more came).
    #[serde(default)]
    pub send_dropped: u64,
    /// Datagrams the kernel refused to send (each one lost: the protocol's
    /// retries cover control messages, not application data).
    #[serde(default)]
    pub send_errors: u64,
    pub delivered: u64,
    /// Delivered data that carried no epoch hint: opened by trying the held
    /// keys (claims 14-15).
    #[serde(default)]
    pub delivered_by_trial: u64,
    pub persisted: u64,
    pub usage_reports: u64,
    /// Controller signatures checked (each about 50 µs of CPU).
    #[serde(default)]
    pub signature_checks: u64,
    /// Transition requests taken by their reveal against the round's
    /// commitment instead of a signature check (wire revision 3).
    #[serde(default)]
    pub reveal_checks: u64,
    /// Key update steps whose X25519 was made ahead, from the controller's
    /// share notice, while the node was idle.
    #[serde(default)]
    pub steps_prepared: u64,
    /// Share and round notices taken (their signature held).
    #[serde(default)]
    pub share_notices: u64,
    /// Key update requests taken without a signature check: a round notice
    /// announced their share and transition commitment, and the entry
    /// opened under the step.
    #[serde(default)]
    pub keys_vouched: u64,
    pub app_clients: usize,
    pub app_dropped: u64,
    /// The most deliveries one client's backlog held at once since the
    /// agent started (they wait there while the client's socket queue is
    /// full; beyond `BACKLOG_BYTES`, about 3 500 messages of 1 KiB, they are
    /// dropped for that client and counted in `app_dropped`).
    #[serde(default)]
    pub app_backlog_peak: usize,
}

/// What `keyfleet-agent status` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node_id: String,
    /// `Unjoined`, `UpdateCompleted`, `DistributionCompleted` or `InTransit`.
    pub state: String,
    /// The newest epoch the node holds (the round's epoch during a round).
    pub epoch: Option<u32>,
    /// The epoch whose key seals outgoing data.
    pub sealing_epoch: Option<u32>,
    /// The member number the controller assigned at join.
    pub member: Option<u32>,
    pub keys: Vec<KeyStatus>,
    pub initial_key_fingerprint: String,
    pub last_sync_ms: Option<u64>,
    pub source: StatusSource,
    /// The state file (for `state_file`) or the socket asked (for `running_agent`).
    pub path: String,
    /// Present when the running agent answered.
    pub running: Option<RunningStatus>,
}

/// The state's name and epochs as the status shows them.
pub fn state_name(s: NodeState) -> &'static str {
    match s {
        NodeState::Unjoined => "Unjoined",
        NodeState::UpdateCompleted { .. } => "UpdateCompleted",
        NodeState::DistributionCompleted { .. } => "DistributionCompleted",
        NodeState::InTransit { .. } => "InTransit",
    }
}

impl AgentStatus {
    /// The status of `machine`; `source`, `path` and `running` as given.
    pub fn of(
        machine: &NodeMachine,
        fingerprint: &str,
        last_sync_ms: Option<u64>,
        source: StatusSource,
        path: &Path,
    ) -> AgentStatus {
        let state = machine.state();
        let (epoch, roles): (Option<Epoch>, Vec<(Epoch, &str)>) = match state {
            NodeState::Unjoined => (None, vec![]),
            NodeState::UpdateCompleted { current } => (Some(current), vec![(current, "current")]),
            NodeState::DistributionCompleted { old, new } | NodeState::InTransit { old, new } => {
                (Some(new), vec![(old, "old"), (new, "new")])
            }
        };
        let keys = match machine.keyring() {
            None => vec![],
            Some(ring) => {
                let usage: Vec<_> = ring.usage().collect();
                roles
                    .iter()
                    .map(|(e, role)| {
                        let u = usage.iter().find(|u| u.epoch == *e);
                        KeyStatus {
                            epoch: e.0,
                            role: (*role).to_owned(),
                            check: ring
                                .key(*e)
                                .map(|k| k.check_value().to_string())
                                .unwrap_or_default(),
                            seals: u.map_or(0, |u| u.seals),
                            opens: u.map_or(0, |u| u.opens),
                        }
                    })
                    .collect()
            }
        };
        AgentStatus {
            node_id: machine.node_id().to_string(),
            state: state_name(state).to_owned(),
            epoch: epoch.map(|e| e.0),
            sealing_epoch: machine.keyring().map(|r| r.sealing_epoch().0),
            member: machine.member(),
            keys,
            initial_key_fingerprint: fingerprint.to_owned(),
            last_sync_ms,
            source,
            path: path.display().to_string(),
            running: None,
        }
    }

    /// The status from `<dir>/state.json` alone.
    pub fn from_state_dir(dir: &Path) -> Result<AgentStatus, AgentError> {
        let path = dir.join(STATE_FILE);
        let stored = load(dir)?.ok_or_else(|| AgentError::NoState { dir: dir.into() })?;
        let machine = NodeMachine::restore(&stored.node, NodeConfig::default()).map_err(|e| {
            AgentError::Restore {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        Ok(AgentStatus::of(
            &machine,
            &stored.initial_key_fingerprint,
            stored.last_sync_ms,
            StatusSource::StateFile,
            &path,
        ))
    }
}
