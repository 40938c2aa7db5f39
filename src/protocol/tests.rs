//! Unit tests of both machines: every node state against every kind of input
//! (including the unexpected ones), and the controller's round, retries,
//! stale nodes, triggers and restore.

mod controller;
mod node;

use super::*;
use crate::crypto::{GroupKey, InitialKey, NodeKeys};
use crate::wire::{self, KeyState, Message, NodeId, RoundState, Step};
use core::net::SocketAddr;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn rng() -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(42)
}

fn ctl_addr() -> SocketAddr {
    SocketAddr::from(([192, 168, 0, 1], 47800))
}

fn node_addr(i: u32) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i as u8], 47801))
}

fn initial(i: u32) -> InitialKey {
    InitialKey([i as u8 + 1; 16])
}

fn node_cfg() -> NodeConfig {
    NodeConfig {
        controller: ctl_addr(),
        usage_interval_ms: Some(1000),
        data_replay_senders: 8,
        ..NodeConfig::default()
    }
}

fn key(e: u32) -> GroupKey {
    GroupKey::from_bytes(crate::crypto::Epoch(e), [e as u8 * 3 + 1; 32])
}

/// Every datagram an action list sends, decoded to (kind name, epoch-ish, step) for asserts.
fn sent(out: &[NodeAction]) -> Vec<Vec<u8>> {
    out.iter()
        .filter_map(|a| match a {
            NodeAction::SendTo { bytes, .. } | NodeAction::SendGroup { bytes, .. } => {
                Some(bytes.clone())
            }
            _ => None,
        })
        .collect()
}

fn names(out: &[NodeAction]) -> Vec<&'static str> {
    out.iter()
        .filter_map(|a| match a {
            NodeAction::SendTo { bytes, .. } | NodeAction::SendGroup { bytes, .. } => {
                wire::decode(bytes).ok().map(|m| m.name())
            }
            _ => None,
        })
        .collect()
}

fn acks(out: &[NodeAction]) -> Vec<(Step, crate::crypto::Epoch)> {
    sent(out)
        .iter()
        .filter_map(|b| match wire::decode(b) {
            Ok(Message::Ack(a)) => Some((a.step, a.epoch)),
            _ => None,
        })
        .collect()
}

fn refusal(out: &[NodeAction]) -> Option<Refusal> {
    out.iter().find_map(|a| match a {
        NodeAction::Event(NodeEvent::Refused { reason, .. }) => Some(reason.clone()),
        _ => None,
    })
}

fn persisted(out: &[NodeAction]) -> bool {
    out.iter().any(|a| matches!(a, NodeAction::Persist(_)))
}

/// A hand-driven controller for node tests: signs what the test asks.
struct FakeController {
    sk: ed25519_dalek::SigningKey,
    keys: NodeKeys,
    member: u32,
    seq: u64,
    /// The leader term its messages carry.
    term: u32,
    rng: ChaCha20Rng,
}

impl FakeController {
    fn new(node: u32) -> FakeController {
        FakeController {
            sk: ed25519_dalek::SigningKey::generate(&mut rng()),
            keys: NodeKeys::derive(&initial(node)),
            member: node + 1,
            seq: 0,
            term: crate::protocol::TERM,
            rng: rng(),
        }
    }

    fn seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn state(&mut self, cur: &GroupKey, round: Option<(wire::RoundPhase, &GroupKey)>) -> KeyState {
        KeyState {
            current_epoch: cur.epoch(),
            current: self.keys.wrap(cur, self.member, &mut self.rng),
            round: round.map(|(phase, k)| RoundState {
                epoch: k.epoch(),
                phase,
                wrapped: self.keys.wrap(k, self.member, &mut self.rng),
            }),
        }
    }

    fn join_accept(&mut self, in_reply_to: u64, st: &KeyState) -> Vec<u8> {
        let seq = self.seq();
        let pk = self.sk.verifying_key().to_bytes();
        wire::mac(
            wire::join_accept(self.term, seq, self.member, in_reply_to, &pk, st),
            &self.keys,
        )
    }

    fn key_response(&mut self, in_reply_to: u64, st: &KeyState) -> Vec<u8> {
        let seq = self.seq();
        wire::sign(
            wire::key_response(self.term, seq, self.member, in_reply_to, st),
            &self.sk,
        )
    }

    fn key_update(&mut self, k: &GroupKey) -> Vec<u8> {
        let seq = self.seq();
        let w = self.keys.wrap(k, self.member, &mut self.rng);
        wire::sign(
            wire::key_update(self.term, k.epoch(), seq, &[(self.member, w)]),
            &self.sk,
        )
    }

    fn transition(&mut self, step: Step, e: u32) -> Vec<u8> {
        let seq = self.seq();
        wire::sign(
            wire::transition(self.term, step, crate::crypto::Epoch(e), seq),
            &self.sk,
        )
    }
}

/// The sequence number of the join or key request in `out`.
fn request_seq(out: &[NodeAction]) -> u64 {
    sent(out)
        .iter()
        .find_map(|b| match wire::decode(b) {
            Ok(Message::Join(j)) => Some(j.seq),
            Ok(Message::KeyRequest(k)) => Some(k.seq),
            _ => None,
        })
        .expect("a join or key request")
}
