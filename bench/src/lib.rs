//! keyfleet's benchmarks side by side (issue 6), as a library for the
//! `keyfleet-bench` binary and its tests.
//!
//! - [`datapath`]: sealing and opening group messages with the keyring in each
//!   node state, against raw `aes-gcm` and `ring`, and trial decryption;
//! - [`e2e`]: the data path end to end (client → agent → group → agent →
//!   client) against the same hops without the protocol and plain multicast;
//! - [`qr`]: the webcam QR decoder against `zbarimg` on the generated label photos;
//! - [`serf`] and [`fleet`]: rotating a shared key across N real processes
//!   with Serf's keyring and with keyfleet, and `keyfleet sim` at larger sizes;
//! - [`round`]: instruction counts of one in-process round (valgrind callgrind);
//! - [`report`]: `results.md` and the SVG plot.
#![forbid(unsafe_code)]

pub mod datapath;
pub mod e2e;
pub mod fleet;
pub mod procs;
pub mod qr;
pub mod report;
pub mod round;
pub mod serf;
pub mod stats;
/// A throw-away PostgreSQL server (Debian's `postgresql`: `initdb` and
/// `postgres` as the `postgres` user), the one the store tests use.
#[allow(dead_code)]
#[path = "../../src/store/testpg.rs"]
pub mod testpg;
