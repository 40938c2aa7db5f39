//! The protocol core in one process: the machines on a hand-carried network
//! in virtual time (the adversary library), the exhaustive model check, the
//! simulator's properties, and the library's UDP driver and node driver on
//! loopback sockets (no `keyfleet` or `keyfleet-agent` process).

#[path = "../support/mod.rs"]
pub mod support;

mod adversary_library;
mod agent_driver;
mod model;
mod model_check;
mod net_multicast;
mod sim_properties;
