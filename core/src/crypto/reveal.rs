//! The transition requests' hash chain (wire revision 3).
//!
//! For each round (leader term, epoch) the controller derives a secret
//! `r2 = HMAC-SHA256(signing key, label ‖ term ‖ epoch)`, then
//! `r1 = H(r2)` and the commitment `C = H(r1)`, where `H` is SHA-256 under a
//! label of its own. The signed key update request carries `C`; the first
//! transition request reveals `r1`, the second `r2`. A node that took the
//! key update from a verified request checks a transition request with one
//! or two hashes instead of an Ed25519 signature: only the holder of the
//! signing key knows `r1` before the first transition request is sent, and
//! `r2` before the second. The requests stay signed, for a node without the
//! commitment (one that came back by a key response, or restarted).
//!
//! `r2` is derived, not drawn, so that a restarted controller, or a standby
//! that takes over with the same signing key, reveals the same values
//! without persisting them. A node cannot derive them: the group key it
//! holds is not an input.

use super::KEY_LEN;
use crate::wire::Step;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Length of a commitment or a reveal.
pub const REVEAL_LEN: usize = KEY_LEN;

/// `H`: SHA-256 under the chain's label.
fn hash(x: &[u8; REVEAL_LEN]) -> [u8; REVEAL_LEN] {
    let mut h = Sha256::new();
    h.update(b"keyfleet v3 transition chain");
    h.update(x);
    h.finalize().into()
}

/// One round's chain, as the controller derives it.
pub struct TransitionChain {
    r1: [u8; REVEAL_LEN],
    r2: [u8; REVEAL_LEN],
}

impl TransitionChain {
    /// The chain of the round of `epoch` under leader `term`, from the
    /// controller's signing key (its 32-byte secret).
    pub fn derive(signing_secret: &[u8; 32], term: u32, epoch: super::Epoch) -> TransitionChain {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(signing_secret)
            .expect("HMAC takes any key length");
        mac.update(b"keyfleet v3 transition secret");
        mac.update(&term.to_be_bytes());
        mac.update(&epoch.0.to_be_bytes());
        let r2: [u8; REVEAL_LEN] = mac.finalize().into_bytes().into();
        TransitionChain { r1: hash(&r2), r2 }
    }

    /// What the key update request commits to.
    pub fn commitment(&self) -> [u8; REVEAL_LEN] {
        hash(&self.r1)
    }

    /// What the transition request of `step` reveals (the first's for any
    /// step but the second).
    pub fn reveal(&self, step: Step) -> [u8; REVEAL_LEN] {
        match step {
            Step::SecondTransition => self.r2,
            _ => self.r1,
        }
    }
}

/// Whether `reveal` is the value of `step`'s transition request under
/// `commitment`: `H(r1) = C` for the first, `H(H(r2)) = C` for the second.
/// Any other step has no reveal.
pub fn reveal_holds(commitment: &[u8; REVEAL_LEN], step: Step, reveal: &[u8; REVEAL_LEN]) -> bool {
    use subtle::ConstantTimeEq;
    let got = match step {
        Step::FirstTransition => hash(reveal),
        Step::SecondTransition => hash(&hash(reveal)),
        _ => return false,
    };
    got.ct_eq(commitment).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Epoch;

    #[test]
    fn each_reveal_holds_for_its_own_step_only() {
        let c = TransitionChain::derive(&[7; 32], 1, Epoch(5));
        let commit = c.commitment();
        let (r1, r2) = (
            c.reveal(Step::FirstTransition),
            c.reveal(Step::SecondTransition),
        );
        assert!(reveal_holds(&commit, Step::FirstTransition, &r1));
        assert!(reveal_holds(&commit, Step::SecondTransition, &r2));
        // Swapped, or for a step without a reveal, or a bit off: refused.
        assert!(!reveal_holds(&commit, Step::FirstTransition, &r2));
        assert!(!reveal_holds(&commit, Step::SecondTransition, &r1));
        assert!(!reveal_holds(&commit, Step::KeyUpdate, &r1));
        assert!(!reveal_holds(&commit, Step::SecondTransition, &commit));
        let mut off = r1;
        off[31] ^= 1;
        assert!(!reveal_holds(&commit, Step::FirstTransition, &off));
    }

    #[test]
    fn another_round_term_or_key_makes_another_chain() {
        let base = TransitionChain::derive(&[7; 32], 1, Epoch(5)).commitment();
        for other in [
            TransitionChain::derive(&[7; 32], 1, Epoch(6)),
            TransitionChain::derive(&[7; 32], 2, Epoch(5)),
            TransitionChain::derive(&[8; 32], 1, Epoch(5)),
        ] {
            assert_ne!(other.commitment(), base);
        }
        // The same inputs, the same chain: a restarted controller reveals what
        // its key update committed to.
        assert_eq!(
            TransitionChain::derive(&[7; 32], 1, Epoch(5)).commitment(),
            base
        );
    }
}
