//! Crypto: group keys numbered by epoch, the node keyring, and the per-node
//! key-encryption key.
//!
//! - Data is sealed with AES-256-GCM (`aes-gcm`) under the *group key* of an
//!   epoch, with a random 96-bit nonce from the caller's CSPRNG.
//! - [`Keyring`] holds the one or two group keys of a node; it seals with the key
//!   its state prescribes (SPEC §1) and opens with every key it holds, counting
//!   seals and opens per key and counting trial decryptions when a sender left
//!   out the epoch hint (claims 14–16).
//! - [`NodeKeys`] are derived with HKDF-SHA256 from a node's 16-byte initial key:
//!   a key-encryption key that wraps group keys for that node only, and a MAC
//!   key that authenticates the node's messages.
//! - The controller signs its messages with Ed25519 ([`sign`], [`verify`]).
//!
//! Nothing here reads a clock or the OS: randomness comes in as an argument
//! (`&mut impl RngCore + CryptoRng`); a real shell passes `rand::rngs::OsRng`.
//! Every secret is zeroized on drop.

mod kek;
mod keyring;
pub mod ratchet;
mod reveal;

pub use kek::{NodeKeys, WrappedKey, WRAPPED_LEN};
pub use keyring::{KeyPhase, KeyUse, Keyring, KeyringError, OpenError, Opened};
pub use ratchet::{Chain, Share, ShareSecret, Step, SHARE_LEN};
pub use reveal::{reveal_holds, TransitionChain, REVEAL_LEN};

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of a group key (AES-256).
pub const KEY_LEN: usize = 32;
/// Length of an AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of an AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Length of the truncated HMAC-SHA256 tag on node messages.
pub const MAC_LEN: usize = 16;

/// The number of a group key. Epochs only grow; epoch 1 is the fleet's first key.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u32);

impl Epoch {
    /// The epoch after this one (saturating: 2^32 rounds never happen).
    pub fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A short public fingerprint of a key: safe to log and to store, never the key.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CheckValue(pub [u8; 4]);

impl fmt::Display for CheckValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CheckValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CheckValue({self})")
    }
}

fn check_value(domain: &[u8], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(domain);
    h.update(key);
    h.finalize().into()
}

/// A group key and its epoch. Zeroized on drop; `Debug` shows only the check value.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct GroupKey {
    #[zeroize(skip)]
    epoch: Epoch,
    bytes: [u8; KEY_LEN],
}

impl GroupKey {
    /// A fresh key from the caller's CSPRNG (the OS CSPRNG in the real shells).
    pub fn generate(epoch: Epoch, rng: &mut (impl RngCore + CryptoRng)) -> GroupKey {
        let mut bytes = [0u8; KEY_LEN];
        rng.fill_bytes(&mut bytes);
        GroupKey { epoch, bytes }
    }

    /// A key from its bytes (used when unwrapping).
    pub fn from_bytes(epoch: Epoch, bytes: [u8; KEY_LEN]) -> GroupKey {
        GroupKey { epoch, bytes }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The first four bytes of SHA-256("keyfleet check value v1" || key).
    pub fn check_value(&self) -> CheckValue {
        let d = check_value(b"keyfleet check value v1", &self.bytes);
        CheckValue([d[0], d[1], d[2], d[3]])
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    /// The expanded AES-256-GCM key (key schedule and GHASH key); zeroized on
    /// drop (`aes`/`aes-gcm` with their `zeroize` features). The [`Keyring`]
    /// keeps one per held key, so a message costs no key expansion.
    pub(crate) fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&self.bytes.into())
    }

    /// AES-256-GCM seal; returns ciphertext || tag.
    pub fn seal(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        seal_with(&self.cipher(), nonce, aad, plaintext)
    }

    /// AES-256-GCM open; `None` when the tag does not verify under this key.
    pub fn open(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        open_with(&self.cipher(), nonce, aad, sealed)
    }
}

/// Expanded AES-256-GCM keys for opening under a few group keys in turn (the
/// controller's current, round and retired keys), each made on its key's
/// first use and kept while that key is among the last [`Self::CAP`] used:
/// an opened message costs no key expansion (about a quarter of a 64-byte
/// message's opening). Not state: clones and hashes of a machine leave it out
/// (a clone starts empty). The expanded keys are zeroized on drop, as the
/// keys are.
#[derive(Default)]
pub struct CipherCache {
    entries: Vec<(GroupKey, Box<Aes256Gcm>)>,
}

impl CipherCache {
    /// Keys kept at most (a controller opens under three).
    pub const CAP: usize = 3;

    /// [`GroupKey::open`], with `key`'s expanded key from the cache.
    pub fn open(
        &mut self,
        key: &GroupKey,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Option<Vec<u8>> {
        let i = match self.entries.iter().position(|(k, _)| k == key) {
            Some(i) => i,
            None => {
                if self.entries.len() >= Self::CAP {
                    self.entries.remove(0);
                }
                self.entries.push((key.clone(), Box::new(key.cipher())));
                self.entries.len() - 1
            }
        };
        let (_, cipher) = self.entries.get(i)?;
        open_with(cipher, nonce, aad, sealed)
    }

    /// Keys whose expansion is kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A clone starts empty: the cache is made again on use.
impl Clone for CipherCache {
    fn clone(&self) -> Self {
        CipherCache::default()
    }
}

impl fmt::Debug for CipherCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let epochs: Vec<Epoch> = self.entries.iter().map(|(k, _)| k.epoch()).collect();
        write!(f, "CipherCache({epochs:?})")
    }
}

fn seal_with(cipher: &Aes256Gcm, nonce: &[u8; NONCE_LEN], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    cipher
        .encrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        // aes-gcm only fails to encrypt beyond 64 GiB of plaintext per call.
        .unwrap_or_default()
}

fn open_with(
    cipher: &Aes256Gcm,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Option<Vec<u8>> {
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
        .ok()
}

impl PartialEq for GroupKey {
    fn eq(&self, other: &Self) -> bool {
        self.epoch == other.epoch && self.bytes == other.bytes
    }
}
impl Eq for GroupKey {}

/// Hashes the epoch and the check value (never the key bytes): equal keys
/// hash equally, as `Eq` requires. Used to compare machine states (the model check).
impl std::hash::Hash for GroupKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.epoch.hash(state);
        self.check_value().hash(state);
    }
}

impl fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GroupKey(epoch {}, check {})",
            self.epoch,
            self.check_value()
        )
    }
}

/// The 16-byte initial key an appliance carries from the factory.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct InitialKey(pub [u8; 16]);

impl InitialKey {
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        InitialKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Public fingerprint for the management table: the first 8 lowercase hex
    /// digits of SHA-256 over the 16 key bytes — the same `key_check` that
    /// `keyfleet read-key --json` prints, so the installer can compare them by eye.
    pub fn fingerprint(&self) -> String {
        let d = check_value(b"", &self.0);
        d[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for InitialKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InitialKey(fingerprint {})", self.fingerprint())
    }
}

/// Ed25519-sign `body` with the controller key.
pub fn sign(key: &ed25519_dalek::SigningKey, body: &[u8]) -> [u8; SIGNATURE_LEN] {
    use ed25519_dalek::Signer;
    key.sign(body).to_bytes()
}

/// Verify an Ed25519 signature strictly (no malleable or small-order forms).
pub fn verify(key: &ed25519_dalek::VerifyingKey, body: &[u8], sig: &[u8; SIGNATURE_LEN]) -> bool {
    let sig = ed25519_dalek::Signature::from_bytes(sig);
    key.verify_strict(body, &sig).is_ok()
}

/// A 16-byte digest of a datagram, used to recognise byte-identical
/// retransmissions of a message already verified.
pub fn digest16(bytes: &[u8]) -> [u8; 16] {
    let d = check_value(b"keyfleet datagram digest v1", bytes);
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    /// The cache opens exactly what the key opens, under the right key
    /// only (two keys of one epoch are not confused), keeps at most
    /// `CAP` expanded keys, and makes an evicted one again when it is used.
    #[test]
    fn the_cipher_cache_opens_what_the_key_opens_and_keeps_the_last_three_keys() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let keys: Vec<GroupKey> = (1..=4)
            .map(|e| GroupKey::generate(Epoch(e), &mut rng))
            .collect();
        let twin = GroupKey::generate(Epoch(2), &mut rng);
        let nonce = [9u8; NONCE_LEN];
        let mut cache = CipherCache::default();
        for round in 0..2 {
            for (i, k) in keys.iter().enumerate() {
                let sealed = k.seal(&nonce, b"aad", b"hello");
                assert_eq!(
                    cache.open(k, &nonce, b"aad", &sealed).as_deref(),
                    Some(&b"hello"[..]),
                    "round {round}, key {i}"
                );
                assert_eq!(cache.open(k, &nonce, b"other", &sealed), None);
                assert_eq!(cache.open(&twin, &nonce, b"aad", &sealed), None);
                for (j, other) in keys.iter().enumerate() {
                    if j != i {
                        assert_eq!(cache.open(other, &nonce, b"aad", &sealed), None);
                    }
                }
                assert!(cache.len() <= CipherCache::CAP);
            }
        }
        assert_eq!(cache.len(), CipherCache::CAP);
        assert!(cache.clone().is_empty(), "a clone starts empty");
    }

    #[test]
    fn initial_key_fingerprint_is_the_installers_key_check() {
        // The Zigbee install-code example key; SHA-256 over its 16 bytes begins 0cc7776b,
        // which is what `keyfleet read-key --json` prints as key_check for it.
        let k = InitialKey([
            0x83, 0xFE, 0xD3, 0x40, 0x7A, 0x93, 0x97, 0x23, 0xA5, 0xC6, 0x39, 0xB2, 0x69, 0x16,
            0xD5, 0x05,
        ]);
        assert_eq!(k.fingerprint(), "0cc7776b");
    }

    #[test]
    fn seal_then_open_and_tamper_fails() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let k = GroupKey::generate(Epoch(3), &mut rng);
        let nonce = [9u8; NONCE_LEN];
        let ct = k.seal(&nonce, b"hdr", b"hello fleet");
        assert_eq!(ct.len(), 11 + TAG_LEN);
        assert_eq!(
            k.open(&nonce, b"hdr", &ct).as_deref(),
            Some(&b"hello fleet"[..])
        );
        assert_eq!(k.open(&nonce, b"hdX", &ct), None, "aad is authenticated");
        let other = GroupKey::generate(Epoch(3), &mut rng);
        assert_eq!(
            other.open(&nonce, b"hdr", &ct),
            None,
            "another key cannot open"
        );
    }

    #[test]
    fn aes_gcm_matches_nist_vector() {
        // NIST GCM test case 14 (AES-256, zero key, zero IV, one zero block).
        let k = GroupKey::from_bytes(Epoch(1), [0u8; 32]);
        let ct = k.seal(&[0u8; 12], b"", &[0u8; 16]);
        let hex: String = ct.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919"
        );
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let k = GroupKey::from_bytes(Epoch(2), [0xab; 32]);
        let s = format!("{k:?}");
        assert!(!s.contains("abab"), "{s}");
        assert!(s.contains("epoch 2"));
    }

    #[test]
    fn signatures_verify_and_reject_changes() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let sk = ed25519_dalek::SigningKey::generate(&mut rng);
        let sig = sign(&sk, b"transition");
        assert!(verify(&sk.verifying_key(), b"transition", &sig));
        assert!(!verify(&sk.verifying_key(), b"transitioN", &sig));
    }
}

#[cfg(test)]
mod zeroize_tests {
    /// The AES round keys of every cipher the crate builds are wiped on drop
    /// (the `zeroize` features of `aes` and `aes-gcm` are on).
    #[test]
    fn ciphers_zeroize_their_round_keys_on_drop() {
        fn zeroized_on_drop<T: zeroize::ZeroizeOnDrop>(_: &T) {}
        zeroized_on_drop(&<aes::Aes256 as aes::cipher::KeyInit>::new(
            &[0u8; 32].into(),
        ));
        zeroized_on_drop(&super::GroupKey::from_bytes(super::Epoch(1), [0; 32]));
    }
}
