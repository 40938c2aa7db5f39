//! The next round's key agreement, done ahead of the round (issue 11): the
//! controller's share for the next round and the ratchet step it makes with
//! each member's confirmed chain and share, computed while the controller is
//! idle ([`ControllerMachine::prepare_round`], which the shell calls between
//! passes, a few members at a time), so that a round starts with its wraps
//! and not with one X25519 per node (at 100 nodes on the test VM about 6 ms
//! of the round's first pass, at 10 000 about 0.6 s).
//!
//! Nothing changes on the wire or on disk: the steps stay in memory, a round
//! persists the step it uses before anything wrapped under it goes out (as a
//! step computed at the round start), a restarted controller computes them at
//! the round start as before, and a share drawn ahead serves one round only
//! (the round takes it). A member whose chain or share changed since its step
//! was prepared (a key response, a rejoin) gets one computed afresh.
//!
//! The share drawn ahead is announced in a signed round notice
//! ([`wire::ShareNotice`], kind 0x0B: the share and the round's transition
//! commitment), at once and again with each beacon until a round takes it,
//! so that the nodes make their side of the step ahead as well (the node's
//! `prepare.rs`). The key update request carries both again, signed; a node
//! that checked the notice takes a key update that repeats them and whose
//! entry opens under its step without checking that signature.

use super::persist::Committed;
use super::{ControllerAction, ControllerMachine, Out};
use crate::crypto::{ratchet, Chain, Epoch, Share, ShareSecret};
use crate::wire;
use rand::{CryptoRng, RngCore};
use std::collections::BTreeMap;

/// The share notice of the share drawn ahead.
#[derive(Clone, Default, Hash)]
pub(super) struct Notice {
    /// A share was drawn: its notice goes out in the next pass.
    pub(super) due: bool,
    /// The last notice: the term, epoch and share it said, and its signed
    /// bytes (resent while they are unchanged).
    last: Option<((u32, Epoch, Share), Vec<u8>)>,
}

/// A share drawn for the next round and the steps made with it.
#[derive(Clone, Default)]
pub(super) struct Prepared {
    steps: BTreeMap<u32, Made>,
}

/// A step and what it was made from.
#[derive(Clone)]
struct Made {
    chain: Chain,
    node_share: Share,
    /// `None` for a node share of small order (no step can be made with it).
    step: Option<ratchet::Step>,
}

impl Made {
    /// Whether it was made from the chain and share the member has confirmed now.
    fn fits(&self, now: &Committed) -> bool {
        self.chain == now.chain && self.node_share == now.share
    }
}

impl Prepared {
    /// The step prepared for `member` with the round's share, if it was made
    /// from the chain and share the member has confirmed now.
    pub(super) fn take(&mut self, member: u32, now: &Committed) -> Option<ratchet::Step> {
        self.steps
            .remove(&member)
            .filter(|made| made.fits(now))
            .and_then(|made| made.step)
    }

    pub(super) fn len(&self) -> usize {
        self.steps.len()
    }
}

impl ControllerMachine {
    /// Prepares the next round's key agreement for at most `max` members
    /// (see the module docs); `true` while members remain. Nothing to do
    /// during a round, or with a round queued. Pure: the shell calls it when
    /// it has nothing else to do, a few members at a time so that a datagram
    /// or a command never waits long behind it.
    pub fn prepare_round(&mut self, rng: &mut (impl RngCore + CryptoRng), max: usize) -> bool {
        if self.round.is_some() || self.pending.is_some() {
            return false;
        }
        if self.ahead.is_none() {
            self.notice.due = true;
        }
        let (share, prepared) = self
            .ahead
            .get_or_insert_with(|| (ShareSecret::generate(rng), Prepared::default()));
        let mut made = 0;
        for m in self.members.iter() {
            // A step prepared outside a round (a key response the node has
            // not confirmed) goes first, as at any round start.
            let (Some(c), None) = (&m.row.ratchet.committed, &m.row.ratchet.next) else {
                continue;
            };
            let member = m.row.member;
            if prepared.steps.get(&member).is_some_and(|p| p.fits(c)) {
                continue;
            }
            if made == max {
                return true;
            }
            let step = c.step_with(share, member);
            prepared.steps.insert(
                member,
                Made {
                    chain: c.chain.clone(),
                    node_share: c.share,
                    step,
                },
            );
            made += 1;
        }
        false
    }

    /// The share notice of the share drawn ahead, to the group: in the pass
    /// after it was drawn and with each beacon, until a round takes the share.
    /// The same bytes while the term, epoch and share are unchanged.
    pub(super) fn send_notice(&mut self, out: &mut Out) {
        self.notice.due = false;
        let share = match &self.ahead {
            Some((secret, _)) if self.round.is_none() => secret.public(),
            _ => return,
        };
        let said = (self.term, self.current.epoch(), share);
        let bytes = match &self.notice.last {
            Some((s, bytes)) if *s == said => bytes.clone(),
            _ => {
                let seq = self.next_seq(out);
                // The round's transition commitment too: with it the notice
                // vouches for the key update's header (a round notice).
                let commit = self.commitment(said.1.next());
                let bytes = wire::sign(
                    wire::timed_round_notice(said.0, said.1, seq, &said.2, &commit),
                    &self.signing,
                );
                self.notice.last = Some((said, bytes.clone()));
                bytes
            }
        };
        out.push(ControllerAction::SendGroup(bytes));
    }

    /// Steps prepared for the next round so far (see [`Self::prepare_round`]).
    pub fn prepared_steps(&self) -> usize {
        self.ahead.as_ref().map_or(0, |(_, p)| p.len())
    }
}
