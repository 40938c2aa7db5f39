//! Sliding replay window over sequence numbers (as in IPsec and DTLS).

use crate::crypto::Epoch;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Width of the window: a sequence number more than this far below the
/// highest one seen is refused as too old.
pub const WINDOW: u64 = 64;

/// Result of looking a sequence number up in a [`ReplayWindow`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayVerdict {
    /// Never seen and inside (or above) the window: may be accepted.
    Fresh,
    /// Already accepted once.
    Again,
    /// Below the window: cannot be told apart from a replay.
    TooOld,
}

/// Remembers which of the last [`WINDOW`] sequence numbers were accepted.
/// 16 bytes. Look up with [`ReplayWindow::check`] before authenticating and
/// [`ReplayWindow::mark`] only after the message was authenticated.
///
/// No number is special: 0 is as fresh as any other in an empty window (a
/// window that refused 0 let a sender's first message through one path and
/// not another). The top number is always marked once anything was, so
/// `bits == 0` means "nothing accepted yet".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReplayWindow {
    top: u64,
    bits: u64,
}

impl ReplayWindow {
    pub fn check(&self, seq: u64) -> ReplayVerdict {
        if self.is_empty() || seq > self.top {
            return ReplayVerdict::Fresh;
        }
        let back = self.top - seq;
        if back >= WINDOW {
            ReplayVerdict::TooOld
        } else if self.bits & (1 << back) != 0 {
            ReplayVerdict::Again
        } else {
            ReplayVerdict::Fresh
        }
    }

    pub fn mark(&mut self, seq: u64) {
        if self.is_empty() {
            self.top = seq;
            self.bits = 1;
        } else if seq > self.top {
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

    /// Highest sequence number accepted so far (`None` if none).
    pub fn top(&self) -> Option<u64> {
        (!self.is_empty()).then_some(self.top)
    }

    /// Nothing accepted yet.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// A window that refuses everything up to and including `floor` (restored
    /// from a persisted highest-accepted number).
    pub fn above(floor: u64) -> ReplayWindow {
        let mut w = ReplayWindow::default();
        w.mark(floor);
        w.bits = u64::MAX;
        w
    }
}

/// A sender whose sequence number moves this far past the highest one seen
/// from it in the epoch is reported as suspicious ([`DataSeen::Fresh`] `jump`):
/// a genuine sender's numbers grow by one per message it sends (data and
/// control messages alike), and a restart skips at most a reserved block.
pub const SUSPICIOUS_JUMP: u64 = 4096;

/// What [`DataReplay::check`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataSeen {
    /// May be accepted; `jump` is the sender's previous highest number when
    /// this one lies more than [`SUSPICIOUS_JUMP`] above it.
    Fresh { jump: Option<u64> },
    /// Already accepted, or below the window.
    Replay,
    /// A sender not yet heard in this epoch while the epoch already tracks
    /// `max` senders: refused until the epoch ends (memory stays bounded and
    /// no window is ever evicted, so no captured message becomes fresh again).
    Full { max: usize },
}

/// Replay protection for group data: one [`ReplayWindow`] per (epoch,
/// sender), for every sender up to `max_senders` per epoch, dropped with the
/// epoch's key. Nodes and the controller share it, so that both take one
/// message for fresh or for a replay by the same rule.
///
/// Windows are per epoch: a forgery made with an epoch's key (a sequence
/// number far ahead, to silence a member) dies with that key; the next
/// epoch starts with empty windows. Only authenticated data may be
/// [`DataReplay::mark`]ed.
#[derive(Clone, Debug, Default)]
pub struct DataReplay {
    epochs: Vec<(Epoch, HashMap<u32, ReplayWindow>)>,
    max_senders: usize,
}

/// By epoch, then by sender in ascending order (a `HashMap` has no order of
/// its own): two equal replay states hash equally (the model check).
impl std::hash::Hash for DataReplay {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.max_senders.hash(state);
        for (epoch, windows) in &self.epochs {
            epoch.hash(state);
            let mut senders: Vec<_> = windows.iter().collect();
            senders.sort_unstable_by_key(|(s, _)| **s);
            senders.hash(state);
        }
    }
}

impl DataReplay {
    pub fn new(max_senders: usize) -> DataReplay {
        DataReplay {
            epochs: Vec::new(),
            max_senders,
        }
    }

    fn epoch(&self, epoch: Epoch) -> Option<&HashMap<u32, ReplayWindow>> {
        self.epochs
            .iter()
            .find(|(e, _)| *e == epoch)
            .map(|(_, m)| m)
    }

    pub fn check(&self, epoch: Epoch, sender: u32, seq: u64) -> DataSeen {
        let senders = self.epoch(epoch);
        match senders.and_then(|m| m.get(&sender)) {
            Some(w) => match w.check(seq) {
                ReplayVerdict::Fresh => DataSeen::Fresh {
                    jump: w
                        .top()
                        .filter(|top| seq.saturating_sub(*top) > SUSPICIOUS_JUMP),
                },
                ReplayVerdict::Again | ReplayVerdict::TooOld => DataSeen::Replay,
            },
            None if senders.map_or(0, HashMap::len) >= self.max_senders => DataSeen::Full {
                max: self.max_senders,
            },
            None => DataSeen::Fresh { jump: None },
        }
    }

    /// Record an authenticated message (after a `Fresh` check).
    pub fn mark(&mut self, epoch: Epoch, sender: u32, seq: u64) {
        let i = match self.epochs.iter().position(|(e, _)| *e == epoch) {
            Some(i) => i,
            None => {
                self.epochs.push((epoch, HashMap::new()));
                self.epochs.len() - 1
            }
        };
        let senders = &mut self.epochs[i].1;
        if senders.len() >= self.max_senders && !senders.contains_key(&sender) {
            return;
        }
        senders.entry(sender).or_default().mark(seq);
    }

    /// Drop the windows of every epoch `keep` says no longer matters (its key is gone).
    pub fn retain(&mut self, mut keep: impl FnMut(Epoch) -> bool) {
        self.epochs.retain(|(e, _)| keep(*e));
    }

    /// Senders tracked in `epoch`.
    pub fn senders(&self, epoch: Epoch) -> usize {
        self.epoch(epoch).map_or(0, HashMap::len)
    }

    /// Heap bytes held (approximate: the maps' capacity).
    pub fn heap_bytes(&self) -> usize {
        self.epochs.capacity() * std::mem::size_of::<(Epoch, HashMap<u32, ReplayWindow>)>()
            + self
                .epochs
                .iter()
                .map(|(_, m)| m.capacity() * (std::mem::size_of::<(u32, ReplayWindow)>() + 1))
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn duplicates_and_old_numbers_are_caught_reordering_is_allowed() {
        let mut w = ReplayWindow::default();
        for s in [5, 3, 4, 100] {
            assert_eq!(w.check(s), ReplayVerdict::Fresh, "{s}");
            w.mark(s);
            assert_eq!(w.check(s), ReplayVerdict::Again, "{s}");
        }
        assert_eq!(
            w.check(37),
            ReplayVerdict::Fresh,
            "inside the window, not seen"
        );
        assert_eq!(
            w.check(36),
            ReplayVerdict::TooOld,
            "100 - 64 and below are too old"
        );
        assert_eq!(w.check(3), ReplayVerdict::TooOld);
    }

    #[test]
    fn zero_is_a_number_like_any_other() {
        let mut w = ReplayWindow::default();
        assert_eq!(
            w.check(0),
            ReplayVerdict::Fresh,
            "an empty window refuses nothing"
        );
        w.mark(0);
        assert_eq!(w.check(0), ReplayVerdict::Again);
        assert_eq!(w.top(), Some(0));
        w.mark(70);
        assert_eq!(w.check(0), ReplayVerdict::TooOld);
        let w = ReplayWindow::above(10);
        for s in 0..=10 {
            assert_ne!(w.check(s), ReplayVerdict::Fresh, "{s}");
        }
        assert_eq!(w.check(11), ReplayVerdict::Fresh);
    }

    #[test]
    fn data_windows_are_per_epoch_bounded_and_never_evicted() {
        let mut r = DataReplay::new(3);
        let (e1, e2) = (Epoch(1), Epoch(2));
        r.mark(e1, 2, u64::MAX);
        assert_eq!(r.check(e1, 2, 5), DataSeen::Replay, "silenced in epoch 1");
        assert_eq!(
            r.check(e2, 2, 5),
            DataSeen::Fresh { jump: None },
            "not in epoch 2"
        );
        r.retain(|e| e == e2);
        assert_eq!(
            r.check(e1, 2, 5),
            DataSeen::Fresh { jump: None },
            "epoch 1 forgotten with its key"
        );
        r.mark(e2, 1, 1);
        r.mark(e2, 3, 1);
        r.mark(e2, 4, 1);
        assert_eq!(r.check(e2, 5, 1), DataSeen::Full { max: 3 });
        r.mark(e2, 5, 1);
        assert_eq!(r.senders(e2), 3, "a full epoch takes no new sender");
        for s in [1, 3, 4] {
            assert_eq!(
                r.check(e2, s, 1),
                DataSeen::Replay,
                "no window evicted: {s}"
            );
        }
        assert_eq!(
            r.check(e2, 1, 2 + SUSPICIOUS_JUMP),
            DataSeen::Fresh { jump: Some(1) }
        );
        assert_eq!(
            r.check(e2, 1, 1 + SUSPICIOUS_JUMP),
            DataSeen::Fresh { jump: None }
        );
    }

    proptest! {
        #[test]
        fn never_accepts_a_number_twice(seqs in proptest::collection::vec(0u64..300, 0..200)) {
            let mut w = ReplayWindow::default();
            let mut accepted = std::collections::HashSet::new();
            for s in seqs {
                if w.check(s) == ReplayVerdict::Fresh {
                    prop_assert!(accepted.insert(s), "{} accepted twice", s);
                    w.mark(s);
                }
            }
        }
    }
}
