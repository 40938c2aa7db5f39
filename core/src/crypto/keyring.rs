//! A node's keyring: one or two group keys and the state that says which one seals.

use super::{open_with, seal_with, Epoch, GroupKey, NONCE_LEN};
use aes_gcm::Aes256Gcm;
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;
use thiserror::Error;

/// The three node states of SPEC §1, as far as keys are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyPhase {
    /// Current key only; seals and opens with it.
    UpdateCompleted,
    /// Old + new; seals with the **old** key, opens with either.
    DistributionCompleted,
    /// Old + new; seals with the **new** key, opens with either.
    InTransit,
}

/// Per-key counters, as reported to the controller for the count triggers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUse {
    pub epoch: Epoch,
    pub seals: u64,
    pub opens: u64,
}

#[derive(Clone, Serialize, Deserialize)]
struct Slot {
    key: GroupKey,
    seals: u64,
    opens: u64,
    /// The key expanded for AES-256-GCM, made on first use and kept (not stored).
    /// Boxed: about 1 KiB that a node which never sends or receives data under
    /// this key does not pay for.
    #[serde(skip)]
    cipher: OnceLock<Box<Aes256Gcm>>,
}

/// The key and its counters; the expanded cipher is a cache made from the key.
impl std::hash::Hash for Slot {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let Slot {
            key,
            seals,
            opens,
            cipher: _,
        } = self;
        (key, seals, opens).hash(state);
    }
}

impl Slot {
    fn new(key: GroupKey) -> Slot {
        Slot {
            key,
            seals: 0,
            opens: 0,
            cipher: OnceLock::new(),
        }
    }
    fn cipher(&self) -> &Aes256Gcm {
        self.cipher.get_or_init(|| Box::new(self.key.cipher()))
    }
    fn heap_bytes(&self) -> usize {
        self.cipher
            .get()
            .map_or(0, |_| std::mem::size_of::<Aes256Gcm>())
    }
    fn seal(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        seal_with(self.cipher(), nonce, aad, plaintext)
    }
    fn open(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        open_with(self.cipher(), nonce, aad, sealed)
    }
    fn usage(&self) -> KeyUse {
        KeyUse {
            epoch: self.key.epoch(),
            seals: self.seals,
            opens: self.opens,
        }
    }
}

/// A transition the keyring's state does not allow.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KeyringError {
    #[error("keyring is in {phase:?}; {wanted} needs {needs:?}")]
    WrongPhase {
        phase: KeyPhase,
        wanted: &'static str,
        needs: KeyPhase,
    },
    #[error("new key has epoch {new} but the current key already has epoch {current}; keys only move forward")]
    NotNewer { current: Epoch, new: Epoch },
}

/// Why a data message could not be opened.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OpenError {
    #[error("sealed under epoch {0}, which this node does not hold")]
    NoKey(Epoch),
    #[error("no held key opens it ({tried} tried)")]
    Failed { tried: u8 },
}

/// A successfully opened data message.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    pub epoch: Epoch,
    pub plaintext: Vec<u8>,
    /// Keys tried; more than 0 only when the sender left out the epoch hint.
    pub trials: u8,
}

/// Holds the group keys of one node; seals with the key its [`KeyPhase`]
/// prescribes and opens with every key it holds.
#[derive(Clone, Hash, Serialize, Deserialize)]
pub struct Keyring {
    phase: KeyPhase,
    /// The current key (UpdateCompleted) or the old key (the two other phases).
    primary: Slot,
    /// The new key (DistributionCompleted and InTransit only).
    next: Option<Slot>,
    /// Data messages without an epoch hint, for which keys were tried in turn.
    trial_opens: u64,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("phase", &self.phase)
            .field("primary", &self.primary.key)
            .field("next", &self.next.as_ref().map(|s| &s.key))
            .finish()
    }
}

impl Keyring {
    /// A keyring in `UpdateCompleted` with `current`.
    pub fn new(current: GroupKey) -> Keyring {
        Keyring {
            phase: KeyPhase::UpdateCompleted,
            primary: Slot::new(current),
            next: None,
            trial_opens: 0,
        }
    }

    /// A keyring in any phase, as the controller's answer to a key request
    /// prescribes it. Counters of keys already held are kept.
    pub fn resync(&mut self, phase: KeyPhase, primary: GroupKey, next: Option<GroupKey>) {
        let keep = |k: GroupKey, this: &Keyring| -> Slot {
            let old = [Some(&this.primary), this.next.as_ref()]
                .into_iter()
                .flatten()
                .find(|s| s.key == k);
            match old {
                Some(s) => s.clone(),
                None => Slot::new(k),
            }
        };
        let primary = keep(primary, self);
        let next = next.map(|k| keep(k, self));
        let phase = if next.is_none() {
            KeyPhase::UpdateCompleted
        } else {
            phase
        };
        self.phase = phase;
        self.primary = primary;
        self.next = next;
    }

    pub fn phase(&self) -> KeyPhase {
        self.phase
    }

    /// The epoch this keyring seals with.
    pub fn sealing_epoch(&self) -> Epoch {
        match (self.phase, &self.next) {
            (KeyPhase::InTransit, Some(n)) => n.key.epoch(),
            _ => self.primary.key.epoch(),
        }
    }

    /// The epochs held: (current or old, new).
    pub fn epochs(&self) -> (Epoch, Option<Epoch>) {
        (
            self.primary.key.epoch(),
            self.next.as_ref().map(|s| s.key.epoch()),
        )
    }

    pub fn holds(&self, epoch: Epoch) -> bool {
        self.key(epoch).is_some()
    }

    pub fn key(&self, epoch: Epoch) -> Option<&GroupKey> {
        [Some(&self.primary), self.next.as_ref()]
            .into_iter()
            .flatten()
            .map(|s| &s.key)
            .find(|k| k.epoch() == epoch)
    }

    /// UpdateCompleted → DistributionCompleted on receiving the new key.
    pub fn install_new(&mut self, key: GroupKey) -> Result<(), KeyringError> {
        self.need(KeyPhase::UpdateCompleted, "installing a new key")?;
        if key.epoch() <= self.primary.key.epoch() {
            return Err(KeyringError::NotNewer {
                current: self.primary.key.epoch(),
                new: key.epoch(),
            });
        }
        self.next = Some(Slot::new(key));
        self.phase = KeyPhase::DistributionCompleted;
        Ok(())
    }

    /// DistributionCompleted → InTransit on the first transition request.
    pub fn start_transit(&mut self) -> Result<(), KeyringError> {
        self.need(KeyPhase::DistributionCompleted, "the first transition")?;
        self.phase = KeyPhase::InTransit;
        Ok(())
    }

    /// InTransit → UpdateCompleted on the second transition request; drops the old key.
    pub fn finish(&mut self) -> Result<(), KeyringError> {
        self.need(KeyPhase::InTransit, "the second transition")?;
        if let Some(next) = self.next.take() {
            self.primary = next;
        }
        self.phase = KeyPhase::UpdateCompleted;
        Ok(())
    }

    fn need(&self, needs: KeyPhase, wanted: &'static str) -> Result<(), KeyringError> {
        if self.phase == needs {
            Ok(())
        } else {
            Err(KeyringError::WrongPhase {
                phase: self.phase,
                wanted,
                needs,
            })
        }
    }

    fn sealing_slot(&mut self) -> &mut Slot {
        match (self.phase, self.next.as_mut()) {
            (KeyPhase::InTransit, Some(n)) => n,
            _ => &mut self.primary,
        }
    }

    /// Seal with the key the phase prescribes; returns its epoch and ciphertext || tag.
    pub fn seal(
        &mut self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> (Epoch, Vec<u8>) {
        let slot = self.sealing_slot();
        slot.seals = slot.seals.saturating_add(1);
        (slot.key.epoch(), slot.seal(nonce, aad, plaintext))
    }

    /// Open with the key named by `hint`, or, without a hint (claims 14–16),
    /// with each held key in turn — the sealing key first — counting the trial.
    pub fn open(
        &mut self,
        hint: Option<Epoch>,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Opened, OpenError> {
        if let Some(epoch) = hint {
            let slot = [Some(&mut self.primary), self.next.as_mut()]
                .into_iter()
                .flatten()
                .find(|s| s.key.epoch() == epoch)
                .ok_or(OpenError::NoKey(epoch))?;
            let plaintext = slot
                .open(nonce, aad, sealed)
                .ok_or(OpenError::Failed { tried: 1 })?;
            slot.opens = slot.opens.saturating_add(1);
            return Ok(Opened {
                epoch,
                plaintext,
                trials: 0,
            });
        }
        self.trial_opens = self.trial_opens.saturating_add(1);
        let seal_first = self.phase == KeyPhase::InTransit;
        let (a, b) = (&mut self.primary, self.next.as_mut());
        let order: [Option<&mut Slot>; 2] = match (seal_first, b) {
            (true, Some(n)) => [Some(n), Some(a)],
            (false, b) => [Some(a), b],
            (true, None) => [Some(a), None],
        };
        let mut tried = 0u8;
        for slot in order.into_iter().flatten() {
            tried += 1;
            if let Some(plaintext) = slot.open(nonce, aad, sealed) {
                slot.opens = slot.opens.saturating_add(1);
                return Ok(Opened {
                    epoch: slot.key.epoch(),
                    plaintext,
                    trials: tried,
                });
            }
        }
        Err(OpenError::Failed { tried })
    }

    /// Seal/open counters of every held key.
    pub fn usage(&self) -> impl Iterator<Item = KeyUse> + '_ {
        [Some(&self.primary), self.next.as_ref()]
            .into_iter()
            .flatten()
            .map(Slot::usage)
    }

    /// Heap memory held beyond the struct itself: the expanded ciphers in use.
    pub fn heap_bytes(&self) -> usize {
        [Some(&self.primary), self.next.as_ref()]
            .into_iter()
            .flatten()
            .map(Slot::heap_bytes)
            .sum()
    }

    /// Data messages opened without an epoch hint (keys tried in turn).
    pub fn trial_opens(&self) -> u64 {
        self.trial_opens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(e: u32) -> GroupKey {
        GroupKey::from_bytes(Epoch(e), [e as u8; 32])
    }

    #[test]
    fn seals_with_the_key_each_state_prescribes() {
        let mut r = Keyring::new(key(1));
        assert_eq!(r.seal(&[0; 12], b"", b"x").0, Epoch(1));
        r.install_new(key(2)).unwrap();
        assert_eq!(r.phase(), KeyPhase::DistributionCompleted);
        assert_eq!(
            r.seal(&[0; 12], b"", b"x").0,
            Epoch(1),
            "DistributionCompleted seals with the old key"
        );
        r.start_transit().unwrap();
        assert_eq!(
            r.seal(&[0; 12], b"", b"x").0,
            Epoch(2),
            "InTransit seals with the new key"
        );
        r.finish().unwrap();
        assert_eq!(r.epochs(), (Epoch(2), None), "old key dropped");
        let u: Vec<_> = r.usage().collect();
        assert_eq!(
            u,
            vec![KeyUse {
                epoch: Epoch(2),
                seals: 1,
                opens: 0
            }]
        );
    }

    #[test]
    fn transitions_out_of_order_are_refused() {
        let mut r = Keyring::new(key(1));
        assert!(matches!(
            r.start_transit(),
            Err(KeyringError::WrongPhase { .. })
        ));
        assert!(matches!(r.finish(), Err(KeyringError::WrongPhase { .. })));
        assert_eq!(
            r.install_new(key(1)),
            Err(KeyringError::NotNewer {
                current: Epoch(1),
                new: Epoch(1)
            })
        );
        r.install_new(key(2)).unwrap();
        assert!(
            r.install_new(key(3)).is_err(),
            "no third key while a round is open"
        );
        assert!(r.finish().is_err(), "cannot skip InTransit");
    }

    #[test]
    fn opens_with_hint_and_by_trial_without_it() {
        let mut sender = Keyring::new(key(1));
        let mut recv = Keyring::new(key(1));
        recv.install_new(key(2)).unwrap();
        sender.install_new(key(2)).unwrap();
        sender.start_transit().unwrap();
        let (e, ct) = sender.seal(&[1; 12], b"h", b"new data");
        assert_eq!(e, Epoch(2));
        let o = recv.open(Some(Epoch(2)), &[1; 12], b"h", &ct).unwrap();
        assert_eq!((o.epoch, o.trials), (Epoch(2), 0));
        // Without the hint the DistributionCompleted receiver tries old first, then new.
        let o = recv.open(None, &[1; 12], b"h", &ct).unwrap();
        assert_eq!(
            (o.epoch, o.trials, o.plaintext.as_slice()),
            (Epoch(2), 2, &b"new data"[..])
        );
        assert_eq!(recv.trial_opens(), 1);
        assert_eq!(
            recv.open(Some(Epoch(9)), &[1; 12], b"h", &ct),
            Err(OpenError::NoKey(Epoch(9)))
        );
        assert_eq!(
            recv.open(Some(Epoch(2)), &[1; 12], b"X", &ct),
            Err(OpenError::Failed { tried: 1 })
        );
        let opens: Vec<_> = recv.usage().map(|u| u.opens).collect();
        assert_eq!(opens, vec![0, 2]);
    }

    #[test]
    fn resync_keeps_counters_of_keys_already_held() {
        let mut r = Keyring::new(key(1));
        r.seal(&[0; 12], b"", b"x");
        r.resync(KeyPhase::InTransit, key(1), Some(key(2)));
        assert_eq!(r.phase(), KeyPhase::InTransit);
        assert_eq!(r.usage().next().map(|u| u.seals), Some(1));
        r.resync(KeyPhase::InTransit, key(2), None);
        assert_eq!(
            r.phase(),
            KeyPhase::UpdateCompleted,
            "one key means UpdateCompleted"
        );
    }
}
