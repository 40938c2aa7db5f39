//! Enrollment by authenticated key agreement and the per-node ratchet (issue 17).
//!
//! **Enrollment.** A node and the controller run Noise `NNpsk0`
//! (`Noise_NNpsk0_25519_AESGCM_SHA256`, the `snow` crate): two ephemeral
//! X25519 keys, authenticated by a pre-shared key derived from the node's
//! stored [`NodeKeys`] (themselves HKDF outputs of the initial key, so a fleet
//! enrolled under wire revision 1 needs no label read again). The handshake's
//! split keys and hash give the node's first [`Chain`]: a chain key and the MAC
//! key of its messages. Someone who only listened and later reads the label
//! learns nothing (the chain depends on an ephemeral–ephemeral DH); someone
//! holding the label can impersonate only while a handshake is accepted (the
//! first join, or a re-join the operator allowed).
//!
//! **Ratchet.** Every later group key for the node is wrapped under a key of a
//! [`Step`]: `HKDF(salt = chain key, ikm = X25519(controller share, node
//! share), info = member ‖ shares)` → next chain key ‖ wrap key ‖ next MAC
//! key. The node holds one share secret at a time ([`ShareSecret`]), announces
//! its public share in its replies and key requests, and draws a new one each
//! time it takes a step; the old chain key, share secret and wrap key are
//! dropped (and zeroized). A copy of a node's state therefore opens at most the
//! next step (it holds the share secret that step uses), and nothing after the
//! step that follows, which mixes in a share the copy never saw; and it opens no
//! earlier wrap (HKDF is one-way).
//!
//! Nothing here reads a clock or the OS: randomness comes in as an argument.
//! Secrets serialize as byte arrays, as every other key of the crate does;
//! public shares as hex.

use super::kek::{mac_with, unwrap_with, verify_mac_with, wrap_with};
use super::{GroupKey, NodeKeys, WrappedKey, KEY_LEN, MAC_LEN};
use crate::crypto::Epoch;
use hkdf::Hkdf;
use rand::{CryptoRng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Bytes of a public X25519 share.
pub const SHARE_LEN: usize = 32;
/// Bytes of the first handshake message (`e` and the tag of an empty payload).
pub const HANDSHAKE_INIT_LEN: usize = 32 + 16;
/// The Noise protocol name.
pub const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";

/// A public X25519 share (sent in the clear).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Share(#[serde(with = "hex::serde")] pub [u8; SHARE_LEN]);

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Share({})", hex::encode(&self.0[..4]))
    }
}

/// An X25519 secret: the node's share secret between two steps, or the
/// controller's round share. Zeroized on drop.
///
/// Its public share is computed once, when the secret is drawn or read: a
/// node announces it in every reply and the controller puts the round's in
/// every wrap, and each computation is a scalar multiplication (about 30 µs,
/// the largest single cost of a round before it was kept). It serializes as
/// the secret's bytes alone, as before.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ShareSecret {
    secret: [u8; 32],
    #[zeroize(skip)]
    public: Share,
}

impl fmt::Debug for ShareSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShareSecret(public {:?})", self.public())
    }
}

impl Serialize for ShareSecret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.secret.serialize(s)
    }
}

impl<'de> Deserialize<'de> for ShareSecret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ShareSecret, D::Error> {
        let b = Zeroizing::new(<[u8; 32]>::deserialize(d)?);
        Ok(ShareSecret::from_bytes(*b))
    }
}

impl ShareSecret {
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> ShareSecret {
        let mut b = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(b.as_mut());
        ShareSecret::from_bytes(*b)
    }

    /// A secret from raw bytes: for tools and tests that model someone holding
    /// a copy of a node's state.
    pub fn from_bytes(secret: [u8; 32]) -> ShareSecret {
        let public = Share(
            x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret)).to_bytes(),
        );
        ShareSecret { secret, public }
    }

    fn secret(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(self.secret)
    }

    /// The public share (computed when the secret was drawn or read).
    pub fn public(&self) -> Share {
        self.public
    }

    /// X25519 with a peer's share; `None` for a share of small order (an
    /// all-zero result), which would make the step independent of this secret.
    pub fn dh(&self, peer: &Share) -> Option<Zeroizing<[u8; 32]>> {
        let shared = self
            .secret()
            .diffie_hellman(&x25519_dalek::PublicKey::from(peer.0));
        if !shared.was_contributory() {
            return None;
        }
        Some(Zeroizing::new(shared.to_bytes()))
    }
}

/// A chain key and the MAC key of the node's messages (and of the
/// controller's MAC'd messages to it). Zeroized on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct Chain {
    chain: [u8; KEY_LEN],
    mac: [u8; KEY_LEN],
}

impl fmt::Debug for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Chain(..)")
    }
}

impl Chain {
    /// A chain from raw bytes: for tools and tests that model someone guessing
    /// or holding keys; a real chain comes from the handshake and the steps.
    pub fn from_bytes(chain: [u8; KEY_LEN], mac: [u8; KEY_LEN]) -> Chain {
        Chain { chain, mac }
    }

    /// A chain of one repeated byte (tests only).
    #[cfg(test)]
    pub(crate) fn for_tests(b: u8) -> Chain {
        Chain {
            chain: [b; KEY_LEN],
            mac: [b; KEY_LEN],
        }
    }

    /// HMAC-SHA256 of `body` under this chain's MAC key, truncated to 16 bytes.
    pub fn mac(&self, body: &[u8]) -> [u8; MAC_LEN] {
        mac_with(&self.mac, body)
    }

    /// Constant-time check of a truncated MAC.
    pub fn verify_mac(&self, body: &[u8], tag: &[u8; MAC_LEN]) -> bool {
        verify_mac_with(&self.mac, body, tag)
    }
}

/// One ratchet step: the chain after it and the key that wraps group keys
/// sent with it. Zeroized on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct Step {
    next: Chain,
    wrap: [u8; KEY_LEN],
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Step(..)")
    }
}

fn expand3(hk: &Hkdf<Sha256>, info: &[u8]) -> Step {
    let mut okm = Zeroizing::new([0u8; 3 * KEY_LEN]);
    // 96 bytes is far below HKDF-SHA256's limit of 8160.
    hk.expand(info, okm.as_mut())
        .expect("96-byte HKDF output is valid");
    let mut s = Step {
        next: Chain {
            chain: [0; KEY_LEN],
            mac: [0; KEY_LEN],
        },
        wrap: [0; KEY_LEN],
    };
    s.next.chain.copy_from_slice(&okm[..KEY_LEN]);
    s.wrap.copy_from_slice(&okm[KEY_LEN..2 * KEY_LEN]);
    s.next.mac.copy_from_slice(&okm[2 * KEY_LEN..]);
    s
}

impl Step {
    /// The step from `base` with the DH result of the controller's and the
    /// node's shares; both sides compute it, each with its own secret.
    pub fn derive(
        base: &Chain,
        dh: &[u8; 32],
        member: u32,
        controller: &Share,
        node: &Share,
    ) -> Step {
        let hk = Hkdf::<Sha256>::new(Some(&base.chain), dh);
        let mut info = Vec::with_capacity(24 + 4 + 64);
        info.extend_from_slice(b"keyfleet v2 ratchet step");
        info.extend_from_slice(&member.to_be_bytes());
        info.extend_from_slice(&controller.0);
        info.extend_from_slice(&node.0);
        expand3(&hk, &info)
    }

    /// The chain after this step.
    pub fn chain(&self) -> &Chain {
        &self.next
    }

    /// Wrap `key` for `member` under this step's wrap key.
    pub fn wrap(
        &self,
        key: &GroupKey,
        member: u32,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> WrappedKey {
        wrap_with(&self.wrap, key, member, rng)
    }

    /// Unwrap a key of `epoch` for `member`; `None` if it was wrapped under another step.
    pub fn unwrap(&self, wrapped: &WrappedKey, epoch: Epoch, member: u32) -> Option<GroupKey> {
        unwrap_with(&self.wrap, wrapped, epoch, member)
    }
}

impl NodeKeys {
    /// The enrollment pre-shared key: HKDF of the stored key-encryption and MAC
    /// keys (so a revision-1 state file or secrets file has all it needs).
    pub fn enrollment_psk(&self) -> Zeroizing<[u8; 32]> {
        let mut ikm = Zeroizing::new([0u8; 2 * KEY_LEN]);
        let (kek, mac) = self.raw();
        ikm[..KEY_LEN].copy_from_slice(kek);
        ikm[KEY_LEN..].copy_from_slice(mac);
        let hk = Hkdf::<Sha256>::new(Some(b"keyfleet v2 enrollment psk"), ikm.as_ref());
        let mut psk = Zeroizing::new([0u8; 32]);
        hk.expand(b"noise NNpsk0 psk", psk.as_mut())
            .expect("32-byte HKDF output is valid");
        psk
    }
}

/// Hashes a check value of the bytes (never the bytes), as [`crate::crypto::GroupKey`]
/// does: equal secrets hash equally. Used to compare machine states (the model check).
impl std::hash::Hash for ShareSecret {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        super::check_value(b"keyfleet share secret check v2", &self.secret)[..8].hash(state);
    }
}

impl std::hash::Hash for Chain {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut both = Zeroizing::new([0u8; 2 * KEY_LEN]);
        both[..KEY_LEN].copy_from_slice(&self.chain);
        both[KEY_LEN..].copy_from_slice(&self.mac);
        super::check_value(b"keyfleet chain check v2", both.as_ref())[..8].hash(state);
    }
}

impl std::hash::Hash for Step {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.next.hash(state);
        super::check_value(b"keyfleet wrap check v2", &self.wrap)[..8].hash(state);
    }
}

/// Why a handshake message was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("the handshake does not verify under this node's enrollment key")]
    Auth,
    #[error("the handshake could not be set up: {0}")]
    Setup(String),
}

/// snow draws its ephemeral keys from its resolver's RNG: this one is a
/// ChaCha20 stream seeded from the caller's CSPRNG, so the core stays pure
/// and the simulator replayable.
struct SeededResolver {
    seed: std::sync::Mutex<Option<[u8; 32]>>,
}

struct SeededRng(ChaCha20Rng);
impl RngCore for SeededRng {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.0.try_fill_bytes(dest)
    }
}
impl CryptoRng for SeededRng {}
impl snow::types::Random for SeededRng {}

impl snow::resolvers::CryptoResolver for SeededResolver {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        let seed = self.seed.lock().ok()?.take()?;
        Some(Box::new(SeededRng(ChaCha20Rng::from_seed(seed))))
    }
    fn resolve_dh(&self, c: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        snow::resolvers::DefaultResolver.resolve_dh(c)
    }
    fn resolve_hash(&self, c: &snow::params::HashChoice) -> Option<Box<dyn snow::types::Hash>> {
        snow::resolvers::DefaultResolver.resolve_hash(c)
    }
    fn resolve_cipher(
        &self,
        c: &snow::params::CipherChoice,
    ) -> Option<Box<dyn snow::types::Cipher>> {
        snow::resolvers::DefaultResolver.resolve_cipher(c)
    }
}

fn builder<'a>(
    psk: &'a [u8; 32],
    prologue: &'a [u8],
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<snow::Builder<'a>, HandshakeError> {
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    let params = NOISE_PATTERN
        .parse()
        .map_err(|e: snow::Error| HandshakeError::Setup(e.to_string()))?;
    let resolver = SeededResolver {
        seed: std::sync::Mutex::new(Some(seed)),
    };
    seed.zeroize();
    Ok(snow::Builder::with_resolver(params, Box::new(resolver))
        .psk(0, psk)
        .prologue(prologue))
}

/// The first chain from a finished handshake: HKDF(salt = handshake hash,
/// ikm = both split keys, info = member).
fn first_chain(hs: &mut snow::HandshakeState, member: u32) -> Chain {
    let (a, b) = hs.dangerously_get_raw_split();
    let mut ikm = Zeroizing::new([0u8; 64]);
    ikm[..32].copy_from_slice(&a);
    ikm[32..].copy_from_slice(&b);
    let hk = Hkdf::<Sha256>::new(Some(hs.get_handshake_hash()), ikm.as_ref());
    let mut info = b"keyfleet v2 enrollment chain".to_vec();
    info.extend_from_slice(&member.to_be_bytes());
    let step = expand3(&hk, &info);
    step.next.clone()
}

/// The node's side of an enrollment handshake in progress (memory only: a
/// restarted node starts a new one).
pub struct Initiator {
    hs: snow::HandshakeState,
}

impl fmt::Debug for Initiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Initiator(..)")
    }
}

impl Initiator {
    /// Start a handshake; returns the first message (`psk, e`), which
    /// authenticates `prologue` (the datagram's header) under the PSK.
    pub fn start(
        keys: &NodeKeys,
        prologue: &[u8],
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(Initiator, [u8; HANDSHAKE_INIT_LEN]), HandshakeError> {
        let psk = keys.enrollment_psk();
        let mut hs = builder(&psk, prologue, rng)?
            .build_initiator()
            .map_err(|e| HandshakeError::Setup(e.to_string()))?;
        let mut msg = [0u8; HANDSHAKE_INIT_LEN];
        let n = hs
            .write_message(&[], &mut msg)
            .map_err(|e| HandshakeError::Setup(e.to_string()))?;
        debug_assert_eq!(n, HANDSHAKE_INIT_LEN);
        Ok((Initiator { hs }, msg))
    }

    /// Read the controller's answer; returns its payload and the first chain
    /// for `member` once the caller has read the member number from the payload.
    pub fn finish(mut self, answer: &[u8]) -> Result<(Vec<u8>, Finished), HandshakeError> {
        let mut payload = vec![0u8; answer.len()];
        let n = self
            .hs
            .read_message(answer, &mut payload)
            .map_err(|_| HandshakeError::Auth)?;
        payload.truncate(n);
        Ok((payload, Finished { hs: self.hs }))
    }
}

/// A handshake both messages of which were read; gives the chain once the member is known.
pub struct Finished {
    hs: snow::HandshakeState,
}

impl Finished {
    pub fn chain(mut self, member: u32) -> Chain {
        first_chain(&mut self.hs, member)
    }
}

/// The controller's side: read the node's first message and answer it with
/// `payload` (encrypted and authenticated by the handshake). Returns the
/// answer and the first chain for `member`.
pub fn respond(
    keys: &NodeKeys,
    prologue: &[u8],
    init: &[u8; HANDSHAKE_INIT_LEN],
    payload: &[u8],
    member: u32,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<(Vec<u8>, Chain), HandshakeError> {
    let psk = keys.enrollment_psk();
    let mut hs = builder(&psk, prologue, rng)?
        .build_responder()
        .map_err(|e| HandshakeError::Setup(e.to_string()))?;
    let mut scratch = [0u8; HANDSHAKE_INIT_LEN];
    hs.read_message(init, &mut scratch)
        .map_err(|_| HandshakeError::Auth)?;
    let mut msg = vec![0u8; 32 + payload.len() + 16];
    let n = hs
        .write_message(payload, &mut msg)
        .map_err(|e| HandshakeError::Setup(e.to_string()))?;
    msg.truncate(n);
    Ok((msg, first_chain(&mut hs, member)))
}

/// Only the first stage (the PSK check of the node's message), without the
/// answer's X25519 work: lets the controller refuse a forged or replayed
/// handshake before spending a key agreement on it.
pub fn check_init(
    keys: &NodeKeys,
    prologue: &[u8],
    init: &[u8; HANDSHAKE_INIT_LEN],
) -> Result<(), HandshakeError> {
    // A fixed seed: nothing from this responder is ever sent.
    let mut rng = ChaCha20Rng::from_seed([0; 32]);
    let psk = keys.enrollment_psk();
    let mut hs = builder(&psk, prologue, &mut rng)?
        .build_responder()
        .map_err(|e| HandshakeError::Setup(e.to_string()))?;
    let mut scratch = [0u8; HANDSHAKE_INIT_LEN];
    hs.read_message(init, &mut scratch)
        .map_err(|_| HandshakeError::Auth)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::InitialKey;

    fn rng(seed: u64) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(seed)
    }

    #[test]
    fn handshake_gives_both_sides_the_same_chain_and_payload() {
        let keys = NodeKeys::derive(&InitialKey([5; 16]));
        let (ini, m1) = Initiator::start(&keys, b"hdr", &mut rng(1)).unwrap();
        check_init(&keys, b"hdr", &m1).unwrap();
        let (m2, c_ctl) = respond(&keys, b"hdr", &m1, b"payload", 7, &mut rng(2)).unwrap();
        let (payload, fin) = ini.finish(&m2).unwrap();
        assert_eq!(payload, b"payload");
        let c_node = fin.chain(7);
        assert!(c_node == c_ctl);
        assert!(c_node.verify_mac(b"x", &c_ctl.mac(b"x")));
    }

    #[test]
    fn handshake_refuses_another_label_and_another_prologue() {
        let keys = NodeKeys::derive(&InitialKey([5; 16]));
        let other = NodeKeys::derive(&InitialKey([6; 16]));
        let (_, m1) = Initiator::start(&keys, b"hdr", &mut rng(1)).unwrap();
        assert_eq!(check_init(&other, b"hdr", &m1), Err(HandshakeError::Auth));
        assert_eq!(check_init(&keys, b"hdR", &m1), Err(HandshakeError::Auth));
        let mut bad = m1;
        bad[40] ^= 1;
        assert_eq!(check_init(&keys, b"hdr", &bad), Err(HandshakeError::Auth));
        // An answer made with another label does not open at the node.
        let (ini, m1) = Initiator::start(&keys, b"hdr", &mut rng(3)).unwrap();
        let (m2, _) = respond(&keys, b"hdr", &m1, b"p", 1, &mut rng(4)).unwrap();
        let (ini2, _) = Initiator::start(&keys, b"hdr", &mut rng(5)).unwrap();
        assert!(ini2.finish(&m2).is_err(), "answer to another handshake");
        assert!(ini.finish(&m2).is_ok());
    }

    #[test]
    fn label_alone_does_not_give_the_chain() {
        // A passive listener with the label runs the responder on the captured
        // first message: it gets a chain, but not the one the real pair agreed.
        let keys = NodeKeys::derive(&InitialKey([5; 16]));
        let (ini, m1) = Initiator::start(&keys, b"h", &mut rng(1)).unwrap();
        let (m2, real) = respond(&keys, b"h", &m1, b"", 3, &mut rng(2)).unwrap();
        let (_, attacker) = respond(&keys, b"h", &m1, b"", 3, &mut rng(99)).unwrap();
        assert!(attacker != real);
        let (_, fin) = ini.finish(&m2).unwrap();
        assert!(fin.chain(3) == real);
    }

    #[test]
    fn ratchet_step_agrees_and_heals() {
        let keys = NodeKeys::derive(&InitialKey([5; 16]));
        let (ini, m1) = Initiator::start(&keys, b"h", &mut rng(1)).unwrap();
        let (m2, ctl0) = respond(&keys, b"h", &m1, b"", 3, &mut rng(2)).unwrap();
        let node0 = ini.finish(&m2).unwrap().1.chain(3);
        let mut r = rng(10);
        let node_secret = ShareSecret::generate(&mut r);
        let ctl_secret = ShareSecret::generate(&mut r);
        let (s, c) = (node_secret.public(), ctl_secret.public());
        let ctl_step = Step::derive(&ctl0, &ctl_secret.dh(&s).unwrap(), 3, &c, &s);
        let node_step = Step::derive(&node0, &node_secret.dh(&c).unwrap(), 3, &c, &s);
        assert!(ctl_step == node_step);
        let key = GroupKey::generate(Epoch(4), &mut r);
        let w = ctl_step.wrap(&key, 3, &mut r);
        assert_eq!(node_step.unwrap(&w, Epoch(4), 3), Some(key));
        // Without the node's secret (a fresh one in its place) nothing opens.
        let guess = ShareSecret::generate(&mut r);
        let wrong = Step::derive(&node0, &guess.dh(&c).unwrap(), 3, &c, &s);
        assert_eq!(wrong.unwrap(&w, Epoch(4), 3), None);
        // A small-order share is refused.
        assert!(node_secret.dh(&Share([0; 32])).is_none());
    }
}
