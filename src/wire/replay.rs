//! Sliding replay window over sequence numbers (as in IPsec and DTLS).

use serde::{Deserialize, Serialize};

/// Width of the window: a sequence number more than this far below the
/// highest one seen is refused as too old.
pub const WINDOW: u64 = 64;

/// Result of looking a sequence number up in a [`ReplayWindow`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Never seen and inside (or above) the window: may be accepted.
    Fresh,
    /// Already accepted once.
    Again,
    /// Below the window (or 0, which no sender uses): cannot be told apart from a replay.
    TooOld,
}

/// Remembers which of the last [`WINDOW`] sequence numbers were accepted.
/// 16 bytes. Look up with [`ReplayWindow::check`] before authenticating and
/// [`ReplayWindow::mark`] only after the message was authenticated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReplayWindow {
    top: u64,
    bits: u64,
}

impl ReplayWindow {
    pub fn check(&self, seq: u64) -> Seen {
        if seq == 0 {
            return Seen::TooOld;
        }
        if seq > self.top {
            return Seen::Fresh;
        }
        let back = self.top - seq;
        if back >= WINDOW {
            Seen::TooOld
        } else if self.bits & (1 << back) != 0 {
            Seen::Again
        } else {
            Seen::Fresh
        }
    }

    pub fn mark(&mut self, seq: u64) {
        if seq == 0 {
            return;
        }
        if seq > self.top {
            let shift = seq - self.top;
            self.bits = if shift >= WINDOW {
                0
            } else {
                self.bits << shift
            };
            self.bits |= 1;
            self.top = seq;
        } else {
            let back = self.top - seq;
            if back < WINDOW {
                self.bits |= 1 << back;
            }
        }
    }

    /// Highest sequence number accepted so far (0 if none).
    pub fn top(&self) -> u64 {
        self.top
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn duplicates_and_old_numbers_are_caught_reordering_is_allowed() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.check(0), Seen::TooOld);
        for s in [5, 3, 4, 100] {
            assert_eq!(w.check(s), Seen::Fresh, "{s}");
            w.mark(s);
            assert_eq!(w.check(s), Seen::Again, "{s}");
        }
        assert_eq!(w.check(37), Seen::Fresh, "inside the window, not seen");
        assert_eq!(w.check(36), Seen::TooOld, "100 - 64 and below are too old");
        assert_eq!(w.check(3), Seen::TooOld);
    }

    proptest! {
        #[test]
        fn never_accepts_a_number_twice(seqs in proptest::collection::vec(1u64..300, 0..200)) {
            let mut w = ReplayWindow::default();
            let mut accepted = std::collections::HashSet::new();
            for s in seqs {
                if w.check(s) == Seen::Fresh {
                    prop_assert!(accepted.insert(s), "{} accepted twice", s);
                    w.mark(s);
                }
            }
        }
    }
}
