//! The node agent's runtime: the tokio shell around [`NodeMachine`](keyfleet_core::protocol::NodeMachine).
//!
//! Two levels:
//!
//! - [`NodeDriver`] runs one node machine on a [`Transport`](crate::net::Transport)
//!   (datagrams and timers in, actions out in order, `Persist` durable before the
//!   sends after it) with a [`Persister`] of the caller's choice. Many drivers can
//!   run in one process on their own sockets (`keyfleet sim --transport udp`).
//! - [`run`] is the whole agent of `keyfleet-agent run`: the state directory
//!   (lock, state file, restore), the network, the application socket
//!   ([`app`]), until a shutdown future resolves.
//!
//! The state directory (`--state DIR`, created 0700):
//!
//! | file | what |
//! |---|---|
//! | `state.json`, `state.json.b` | the node's snapshot ([`state::StoredState`]) in two slots written in turn, the newest intact one read; 0600 |
//! | `agent.lock` | held (flock) by the running agent: one agent per directory |
//! | `app.sock` | the application socket ([`app`]), 0600, while the agent runs |
//!
//! On start the agent restores the snapshot if there is one (else it starts
//! from `--node-id` and the initial key and joins), then tells the machine the
//! link is up, so it asks the controller for the current key (SPEC §5) and
//! rejoins in the round's state; application data is held until it has.
//! While it runs it watches its links ([`links`], rtnetlink): a link that goes
//! down or comes back is fed to the machine the same way, at once.

pub mod app;
mod driver;
pub mod links;
mod outbox;
mod run;
pub mod state;

use std::path::{Path, PathBuf};

pub use driver::{DriverEvent, DriverStats, MemoryPersister, NodeDriver, Persister, Wake};
pub use run::{run, run_with, AgentConfig, Ready, RunExtras};
pub use state::{AgentStatus, KeyStatus, RunningStatus, StatusSource};

use crate::net::NetError;
use crate::statefile::StateFileError;

/// Why the agent could not start or had to stop. Each message carries its
/// cause in full (no separate `source`, so `{:#}` does not repeat it).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "cannot resume from the agent's state file: {error}. \
         To start the node over: remove {path}, re-enroll the node on the controller \
         (`keyfleet remove ID`, then `keyfleet enroll`; a node that lost its state restarts \
         its sequence numbers, which the controller may refuse as replays), and start the \
         agent again with its initial key", path = .path.display()
    )]
    CorruptState {
        path: PathBuf,
        error: StateFileError,
    },
    #[error("{path} was written in format {format}, which this keyfleet-agent does not read; use a newer keyfleet-agent", path = .path.display())]
    UnknownFormat { path: PathBuf, format: u32 },
    #[error("cannot use the state directory: {0}")]
    StateDir(StateFileError),
    #[error("cannot save the node's state, so the agent stops before sending anything the disk does not know: {0}")]
    Persist(StateFileError),
    #[error("{path} cannot be restored: {reason}", path = .path.display())]
    Restore { path: PathBuf, reason: String },
    #[error("no state in {dir} yet (no {file}); start the agent once with `keyfleet-agent run --state {dir} ...`", dir = .dir.display(), file = state::STATE_FILE)]
    NoState { dir: PathBuf },
    #[error("{dir} holds no state yet, so the first start needs the node's initial key: give --initial-key-file FILE (or --initial-key FORM)", dir = .dir.display())]
    NoInitialKey { dir: PathBuf },
    #[error("{dir} holds the state of node {stored:?}, not {given:?}; give the right --state or --node-id", dir = .dir.display())]
    NodeIdMismatch {
        dir: PathBuf,
        stored: String,
        given: String,
    },
    #[error("the initial key given (fingerprint {given}) is not the one node {node_id} was started with (fingerprint {stored}); check the key, or remove {dir}/state.json to start the node over with the new key", dir = .dir.display())]
    InitialKeyMismatch {
        dir: PathBuf,
        node_id: String,
        stored: String,
        given: String,
    },
    #[error("another keyfleet-agent is running with --state {dir} (it holds {lock}); stop it first", dir = .dir.display(), lock = .dir.join(state::LOCK_FILE).display())]
    Busy { dir: PathBuf },
    #[error("cannot {what} {path}: {error}", path = .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Net(#[from] NetError),
}

impl AgentError {
    /// A state file that cannot be read: damaged or foreign content gets the
    /// "remove it and rejoin" advice; an I/O or permission problem keeps its own.
    pub(crate) fn state(path: &Path, e: StateFileError) -> AgentError {
        match e {
            StateFileError::Corrupt { .. } | StateFileError::Json { .. } => {
                AgentError::CorruptState {
                    path: path.to_path_buf(),
                    error: e,
                }
            }
            other => AgentError::StateDir(other),
        }
    }

    pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AgentError {
        let path = path.to_path_buf();
        move |error| AgentError::Io { what, path, error }
    }
}
