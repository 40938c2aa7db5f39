//! keyfleet's shells: everything that moves bytes, time and state around the
//! pure core in [`keyfleet_core`] (the protocol machines, wire format, keys and
//! simulator, which do no I/O).
//!
//! - [`controller`]: the controller's shell: state directory, management
//!   table, `serve`, the one-shot round, the control socket.
//! - [`agent`]: the node agent's shell around `NodeMachine`.
//! - [`net`]: UDP multicast and unicast sockets and timers (tokio).
//! - [`store`]: the management table on SQLite or PostgreSQL.
//! - [`udpsim`]: the simulator's scenario over real UDP sockets.
//! - [`config`], [`secrets`], [`statefile`]: the on-disk formats, from
//!   [`keyfleet_files`].
//!
//! The core in a few lines is in `keyfleet_core`'s crate documentation.
#![forbid(unsafe_code)]

pub mod agent;
pub mod controller;
/// Logs, errors and stdout of the two programs.
pub mod logs;
pub mod metrics;
pub mod net;
pub mod ops;
pub mod store;
/// The on-disk formats, in their own crate (the fuzz targets use them without
/// the shells): kept here under their old paths.
pub use keyfleet_files::{config, secrets, statefile};
/// The simulator's scenario over real UDP sockets (a shell around `keyfleet_core::sim`).
pub mod udpsim;
