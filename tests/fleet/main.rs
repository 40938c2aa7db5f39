//! The fleet on loopback multicast: real `keyfleet-agent` processes against an
//! in-process controller, the real `keyfleet` against in-process nodes,
//! and whole fleets of real processes (rotation, faults, restarts, joins,
//! delays, the lease, `keyfleet demo` and `keyfleet sim --transport udp`).

#[path = "../support/mod.rs"]
pub mod support;

mod agent_app;
mod agent_fleet;
mod agent_restart;
mod agent_state;
mod controller_acceptance;
mod controller_failover;
mod controller_installers;
mod controller_lease;
mod controller_progress;
mod controller_restart;
mod controller_rotate;
mod fault_matrix;
mod fleet_delay;
mod fleet_demo;
mod fleet_epoch_hint;
mod fleet_join;
mod fleet_processes;
mod fleet_udp_sim;
mod fleet_unicast;
mod member_numbers;
