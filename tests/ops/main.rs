//! Operations: the metrics endpoints, the systemd units and Debian package
//! files, and the Wireshark dissector.

#[path = "../support/mod.rs"]
pub mod support;

mod ops_metrics;
mod ops_units;
mod wireshark_dissector;
