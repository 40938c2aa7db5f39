//! What a user sees: the `keyfleet` commands' messages, exit codes, JSON and
//! reports (`keyfleet sim`, `keyfleet rekey`, the first-run traps of issue 15).

#[path = "../support/mod.rs"]
pub mod support;

mod cli_sim;
mod cli_ux;
mod rekey_report;
