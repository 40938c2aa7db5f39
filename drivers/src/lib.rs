//! Installer key sources for keyfleet.
//!
//! Every source ends in the same checked value: the 16-byte initial key of an
//! appliance, optionally with the node id its label carried (SPEC §6).
//!
//! Each peripheral kind is one module behind one cargo feature. A module has a
//! pure decoder (bytes, timings or frames in; the decoded text out) and a
//! device reader that only delivers those bytes; `--replay` feeds a recording
//! to the same decoder. All of them implement [`source::KeySource`], and what
//! they yield is parsed by [`label::parse`].
#![forbid(unsafe_code)]

/// The label forms (from the core, shared with the controller and the agent).
pub use keyfleet_core::label;
pub mod source;
/// Candidate devices from sysfs for `keyfleet devices`.
pub mod sysfs;

#[cfg(feature = "hid-scanner")]
pub mod hid;
#[cfg(feature = "ir")]
pub mod ir;
#[cfg(feature = "keyboard")]
pub mod keyboard;
#[cfg(feature = "keypad")]
pub mod keypad;
#[cfg(feature = "file")]
pub mod media;
#[cfg(feature = "serial-scanner")]
pub mod serial;
#[cfg(feature = "webcam")]
pub mod webcam;
