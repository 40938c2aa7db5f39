//! Installer key sources for keyfleet.
//!
//! Every source ends in the same checked value: the 16-byte initial key of an
//! appliance, optionally with the node id its label carried (SPEC §6).
#![forbid(unsafe_code)]
