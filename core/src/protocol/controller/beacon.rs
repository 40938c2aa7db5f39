//! **Beacon.** Every `beacon_interval_ms` (default 1 s) the controller sends
//! the group a signed beacon: its term, current epoch, the round's epoch and
//! phase, and its unicast address (SPEC §5). While none of these change it
//! resends the same bytes (same sequence number, same signature), so nodes
//! compare a digest; a change takes a fresh sequence number and one signature.

use super::super::Time;
use super::{ControllerAction, ControllerMachine, Out};
use crate::crypto::Epoch;
use crate::wire::{self, RoundPhase};
use core::net::SocketAddr;

/// What a beacon says; a change of it takes a new sequence number.
pub(super) type BeaconState = (Epoch, Option<(Epoch, RoundPhase)>, SocketAddr);

/// The beacon's deadline and the last beacon sent.
#[derive(Clone, Default)]
pub(super) struct Beacon {
    /// When the next beacon is due (one of the machine's deadlines).
    pub(super) due: Option<Time>,
    /// The last beacon: what it said and its signed bytes (resent while nothing changes).
    pub(super) last: Option<(BeaconState, Vec<u8>)>,
}

impl ControllerMachine {
    /// A timeout: the beacon, if it is due.
    pub(super) fn on_beacon_timer(&mut self, now: Time, out: &mut Out) {
        if self.beacon.due.is_some_and(|t| now >= t) {
            self.send_beacon(now, out);
        }
    }

    /// The beacon to the group, and the next one's deadline. The same bytes as the
    /// last one while the state it tells is unchanged.
    pub(super) fn send_beacon(&mut self, now: Time, out: &mut Out) {
        let every = self.cfg.beacon_interval_ms;
        if every == 0 {
            return;
        }
        let state: BeaconState = (self.current.epoch(), self.round(), self.cfg.address);
        let bytes = match &self.beacon.last {
            Some((s, bytes)) if *s == state => bytes.clone(),
            _ => {
                let seq = self.next_seq(out);
                let bytes = wire::sign(
                    wire::beacon(self.term, state.0, seq, state.1, state.2),
                    &self.signing,
                );
                self.beacon.last = Some((state, bytes.clone()));
                bytes
            }
        };
        out.push(ControllerAction::SendGroup(bytes));
        // The share drawn for the next round goes with it, for the nodes that
        // missed it (`ahead.rs`).
        self.send_notice(out);
        self.beacon.due = Some(now.plus(every));
    }
}
