//! keyfleet's on-disk formats, apart from the shells so that their parsers
//! (and the fuzz targets over them) build without a runtime, sockets or a
//! database:
//!
//! - [`statefile`]: atomic, owner-only, checksummed state files (the agent's
//!   state, the controller's secrets);
//! - [`secrets`]: the controller's secrets at rest, sealed with a passphrase;
//! - [`config`]: the controller's configuration file (TOML), every default in
//!   one place.
#![forbid(unsafe_code)]

pub mod config;
pub mod secrets;
pub mod statefile;
