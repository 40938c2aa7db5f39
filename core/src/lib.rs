//! keyfleet's pure core: the protocol machines, the wire format, the keys and
//! the fleet simulator. Nothing in this crate does I/O: state machines take an
//! event and the current time and return actions; the shells (the `keyfleet`
//! crate: UDP driver, store, programs) move bytes and time in and out. The
//! crate's dependency tree has no tokio, socket2 or rusqlite
//! (`cargo tree -p keyfleet-core -e normal`).
//!
//! - [`protocol`]: [`protocol::NodeMachine`] (the three node states) and
//!   [`protocol::ControllerMachine`] (the three-phase rekey round, triggers,
//!   key requests). Input + `now` + CSPRNG in, actions out.
//! - [`crypto`]: group keys by epoch, the keyring, the per-node HKDF key wrap.
//! - [`wire`]: the versioned binary encoding of every message.
//! - [`sim`]: the deterministic fleet simulator behind `keyfleet sim`.
//! - [`label`]: the printed label's forms of an initial key and node id.
//! - [`ratecount`]: rate-counted refusals.
//!
//! A shell in a few lines — one controller, one node, datagrams carried by hand:
//!
//! ```
//! use keyfleet_core::crypto::InitialKey;
//! use keyfleet_core::protocol::*;
//! use keyfleet_core::wire::NodeId;
//! use rand::rngs::OsRng;
//!
//! let (ctl_addr, node_addr) = ("192.0.2.1:47800".parse()?, "192.0.2.7:47801".parse()?);
//! let (mut to_ctl, mut to_node) = (Vec::new(), Vec::new());
//! let mut c_out = Vec::new();
//! let mut ctl = ControllerMachine::new(ControllerConfig::default(), Time(0), &mut OsRng, &mut c_out);
//! let id = NodeId::parse("pump-7")?;
//! let key = InitialKey([0x42; 16]);
//! ctl.handle(Time(0), ControllerInput::Enroll { node_id: id.clone(), initial_key: key.clone(), addr: node_addr }, &mut OsRng, &mut c_out)?;
//! let mut node = NodeMachine::new(id, &key, NodeConfig { controller: ctl_addr, ..NodeConfig::default() });
//! let mut n_out = Vec::new();
//! node.handle(Time(0), NodeInput::LinkUp, &mut OsRng, &mut n_out);
//! for _ in 0..4 {
//!     for a in n_out.drain(..) {
//!         if let NodeAction::SendTo { bytes, .. } = a { to_ctl.push(bytes) }
//!     }
//!     for b in to_ctl.drain(..) {
//!         ctl.handle(Time(1), ControllerInput::Datagram { from: node_addr, bytes: &b }, &mut OsRng, &mut c_out)?;
//!     }
//!     for a in c_out.drain(..) {
//!         if let ControllerAction::SendTo { bytes, .. } = a { to_node.push(bytes) }
//!     }
//!     for b in to_node.drain(..) {
//!         node.handle(Time(2), NodeInput::Datagram { from: ctl_addr, bytes: &b }, &mut OsRng, &mut n_out);
//!     }
//! }
//! assert!(node.is_synced());
//! assert_eq!(node.state(), NodeState::UpdateCompleted { current: ctl.current_epoch() });
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

pub mod crypto;
/// The printed label: hex and decimal forms of an initial key, with check digits.
pub mod label;
pub mod protocol;
/// Rate-counted refusals: a flood becomes a few summary rows and log lines.
pub mod ratecount;
pub mod sim;
pub mod wire;
