//! Attacks and key secrecy on real processes: a host on the LAN that is not
//! enrolled, an insider holding a stolen state file, captured traffic after a
//! key is stolen, and no key in any print, file mode, log or output.

#[path = "../support/mod.rs"]
pub mod support;

mod adversary_insider;
mod adversary_processes;
mod capture_forward_secrecy;
mod key_hygiene;
