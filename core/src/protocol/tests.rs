//! Unit tests of both machines: every node state against every kind of input
//! (including the unexpected ones), and the controller's round, retries,
//! stale nodes, triggers and restore.

mod controller;
mod node;

use super::*;
use crate::crypto::{Chain, GroupKey, InitialKey, NodeKeys, Share, ShareSecret};
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

/// A snapshot stored before what follows, flushed or checkpointed.
fn persisted(out: &[NodeAction]) -> bool {
    out.iter()
        .any(|a| matches!(a, NodeAction::Persist(_) | NodeAction::Checkpoint(_)))
}

/// A snapshot flushed to the disk before what follows.
fn flushed(out: &[NodeAction]) -> bool {
    out.iter().any(|a| matches!(a, NodeAction::Persist(_)))
}

/// The keys a fake key response or handshake answer carries.
struct St {
    cur: GroupKey,
    round: Option<(wire::RoundPhase, GroupKey)>,
}

/// A hand-driven controller for node tests: signs what the test asks. It
/// mirrors the node's ratchet (chain and share) as the rig last saw it, so
/// every key it wraps goes under a step the node can take.
struct FakeController {
    sk: ed25519_dalek::SigningKey,
    keys: NodeKeys,
    member: u32,
    seq: u64,
    /// The leader term its messages carry.
    term: u32,
    rng: ChaCha20Rng,
    view: Option<(Chain, Share)>,
    /// Handshake inits the node sent (whole datagrams).
    inits: Vec<Vec<u8>>,
    /// A share drawn ahead and announced ([`FakeController::share_notice`]):
    /// the next key update takes it.
    ahead: Option<ShareSecret>,
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
            view: None,
            inits: Vec::new(),
            ahead: None,
        }
    }

    /// A controller of another signing key (someone on the LAN who never
    /// had the fleet's), signing under sequence numbers from `seq` up.
    fn forger(seq: u64) -> FakeController {
        let mut f = FakeController::new(0);
        f.sk = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        f.seq = seq;
        f
    }

    fn seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Remember the handshake inits in `out`.
    fn see(&mut self, out: &[NodeAction]) {
        for b in sent(out) {
            if matches!(wire::decode(&b), Ok(Message::HandshakeInit(_))) {
                self.inits.push(b);
            }
        }
    }

    /// The node's chain as last seen (a throwaway one before it joined).
    fn chain(&self) -> Chain {
        self.view
            .as_ref()
            .map_or_else(|| Chain::for_tests(0x5a), |(c, _)| c.clone())
    }

    fn state(&mut self, cur: &GroupKey, round: Option<(wire::RoundPhase, &GroupKey)>) -> St {
        St {
            cur: cur.clone(),
            round: round.map(|(p, k)| (p, k.clone())),
        }
    }

    /// A ratchet step from the node's chain and share with a fresh share of
    /// ours (the one drawn ahead, if any).
    fn step(&mut self) -> (Share, crate::crypto::Step) {
        let secret = self
            .ahead
            .take()
            .unwrap_or_else(|| ShareSecret::generate(&mut self.rng));
        let ours = secret.public();
        let (chain, theirs) = match &self.view {
            Some((c, s)) => (c.clone(), *s),
            None => (
                Chain::for_tests(0x5a),
                ShareSecret::generate(&mut self.rng).public(),
            ),
        };
        let dh = secret.dh(&theirs).expect("contributory");
        let step = crate::crypto::Step::derive(&chain, &dh, self.member, &ours, &theirs);
        (ours, step)
    }

    fn join_accept(&mut self, in_reply_to: u64, st: &St) -> Vec<u8> {
        let seq = self.seq();
        let init = self
            .inits
            .iter()
            .find(|b| matches!(wire::decode(b), Ok(Message::HandshakeInit(h)) if h.seq == in_reply_to))
            .cloned()
            .expect("the node sent that handshake init");
        let Ok(Message::HandshakeInit(h)) = wire::decode(&init) else {
            unreachable!()
        };
        let payload = wire::answer_payload(&wire::AnswerPayload {
            term: self.term,
            seq,
            member: self.member,
            controller_key: self.sk.verifying_key().to_bytes(),
            current: st.cur.clone(),
            round: st.round.clone(),
        });
        let (noise, _) = crate::crypto::ratchet::respond(
            &self.keys,
            h.prologue,
            &h.noise,
            &payload,
            self.member,
            &mut self.rng,
        )
        .expect("handshake");
        wire::handshake_answer(in_reply_to, &noise)
    }

    fn key_response(&mut self, in_reply_to: u64, st: &St) -> Vec<u8> {
        let seq = self.seq();
        let (share, step) = self.step();
        let ks = KeyState {
            current_epoch: st.cur.epoch(),
            current: step.wrap(&st.cur, self.member, &mut self.rng),
            round: st.round.as_ref().map(|(phase, k)| RoundState {
                epoch: k.epoch(),
                phase: *phase,
                wrapped: step.wrap(k, self.member, &mut self.rng),
            }),
        };
        wire::sign(
            wire::key_response(self.term, seq, self.member, in_reply_to, &share, &ks),
            &self.sk,
        )
    }

    fn key_update(&mut self, k: &GroupKey) -> Vec<u8> {
        let seq = self.seq();
        let (share, step) = self.step();
        let w = step.wrap(k, self.member, &mut self.rng);
        wire::sign(
            wire::key_update(
                self.term,
                k.epoch(),
                seq,
                &share,
                &self.transition_chain(k.epoch()).commitment(),
                &[(self.member, w)],
            ),
            &self.sk,
        )
    }

    /// The share drawn ahead for the next key update (drawn now if none is).
    fn announced_share(&mut self) -> Share {
        let rng = &mut self.rng;
        self.ahead
            .get_or_insert_with(|| ShareSecret::generate(rng))
            .public()
    }

    /// A signed share notice for the round after epoch `e`, announcing the
    /// share drawn ahead.
    fn share_notice(&mut self, e: u32) -> Vec<u8> {
        let seq = self.seq();
        let share = self.announced_share();
        wire::sign(
            wire::share_notice(self.term, crate::crypto::Epoch(e), seq, &share),
            &self.sk,
        )
    }

    /// A signed round notice for the round after epoch `e`: the share drawn
    /// ahead and that round's transition commitment.
    fn round_notice(&mut self, e: u32) -> Vec<u8> {
        self.notice_with_commit(e, wire::round_notice)
    }

    /// A signed timed round notice (0x0C) for the round after epoch `e`:
    /// a round notice from a controller that reads timed replies.
    fn timed_round_notice(&mut self, e: u32) -> Vec<u8> {
        self.notice_with_commit(e, wire::timed_round_notice)
    }

    /// A notice for the round after epoch `e` with its commitment, its body
    /// made by `body` (the plain or the timed round notice), signed.
    fn notice_with_commit(
        &mut self,
        e: u32,
        body: fn(
            u32,
            crate::crypto::Epoch,
            u64,
            &Share,
            &[u8; crate::crypto::REVEAL_LEN],
        ) -> Vec<u8>,
    ) -> Vec<u8> {
        let seq = self.seq();
        let share = self.announced_share();
        let e = crate::crypto::Epoch(e);
        let commit = self.transition_chain(e.next()).commitment();
        wire::sign(body(self.term, e, seq, &share, &commit), &self.sk)
    }

    /// The transition chain of the round of epoch `e`, as a controller with
    /// this signing key and term derives it.
    fn transition_chain(&self, e: crate::crypto::Epoch) -> crate::crypto::TransitionChain {
        crate::crypto::TransitionChain::derive(&self.sk.to_bytes(), self.term, e)
    }

    fn transition(&mut self, step: Step, e: u32) -> Vec<u8> {
        let seq = self.seq();
        let e = crate::crypto::Epoch(e);
        wire::sign(
            wire::transition(
                self.term,
                step,
                e,
                seq,
                &self.transition_chain(e).reveal(step),
            ),
            &self.sk,
        )
    }
}

/// The sequence number of the join or key request in `out`.
fn request_seq(out: &[NodeAction]) -> u64 {
    sent(out)
        .iter()
        .find_map(|b| match wire::decode(b) {
            Ok(Message::HandshakeInit(j)) => Some(j.seq),
            Ok(Message::KeyRequest(k)) => Some(k.seq),
            _ => None,
        })
        .expect("a join or key request")
}
