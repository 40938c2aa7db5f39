//! Installer key sources for keyfleet.
//!
//! Every source ends in the same checked value: the 16-byte initial key of an
//! appliance, optionally with the node id its label carried (SPEC §6).
//!
//! Each peripheral kind is one module behind one cargo feature. A module has a
//! pure decoder (bytes, timings or frames in; the decoded text out) and a
//! device reader that only delivers those bytes; `--replay` feeds a recording
//! to the same decoder. All of them implement [`source::KeySource`], and what
//! they yield is parsed by [`label::parse`]. Each kind has one
//! [`registry::SourceFactory`] (its name, its devices, how to open it), and
//! [`registry::registry`] lists the ones built in. The HID, serial and IR
//! readers share one read loop with a deadline, [`stream::read_entry`].
#![forbid(unsafe_code)]

/// The label forms (from the core, shared with the controller and the agent).
pub use keyfleet_core::label;
pub mod registry;
pub mod source;
pub mod stream;
#[cfg(any(feature = "serial-scanner", feature = "ir"))]
pub mod tty;

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
