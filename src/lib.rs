//! keyfleet keeps one shared group key fresh across a fleet of appliances.
//!
//! The protocol core (`protocol`, `crypto`, `wire`, `sim`) is pure: state
//! machines take an event and the current time and return actions. The shells
//! (the simulator, the UDP driver, the binaries) move bytes and time in and out.
#![forbid(unsafe_code)]

// The pure core.
pub mod crypto;
pub mod protocol;
pub mod sim;
pub mod wire;

// The shells' building blocks.
pub mod agent;
pub mod net;
pub mod secrets;
pub mod statefile;
pub mod store;
