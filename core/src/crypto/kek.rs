//! The per-node keys derived from the initial key: the key-encryption key that
//! wraps group keys for one node, and the MAC key of that node's messages.

use super::{GroupKey, InitialKey, KEY_LEN, MAC_LEN, NONCE_LEN, TAG_LEN};
use crate::crypto::Epoch;
use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Bytes of a wrapped group key: nonce || AES-GCM(key) || tag.
pub const WRAPPED_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;

/// A group key wrapped for one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WrappedKey(pub [u8; WRAPPED_LEN]);

/// A node's key-encryption key and MAC key, both HKDF-SHA256 outputs of its
/// initial key (salt `keyfleet v1 node keys`, infos `key-encryption key` and
/// `node message mac`). Held by the node and by the controller only.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct NodeKeys {
    kek: [u8; KEY_LEN],
    mac: [u8; KEY_LEN],
}

impl std::fmt::Debug for NodeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeKeys(..)")
    }
}

fn wrap_aad(epoch: Epoch, member: u32) -> [u8; 24] {
    let mut aad = [0u8; 24];
    aad[..16].copy_from_slice(b"keyfleet wrap v1");
    aad[16..20].copy_from_slice(&epoch.0.to_be_bytes());
    aad[20..].copy_from_slice(&member.to_be_bytes());
    aad
}

/// AES-256-GCM wrap of `key` under `kek`, epoch and member as associated data.
pub(crate) fn wrap_with(
    kek: &[u8; KEY_LEN],
    key: &GroupKey,
    member: u32,
    rng: &mut (impl RngCore + CryptoRng),
) -> WrappedKey {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    let aad = wrap_aad(key.epoch(), member);
    let sealed = Aes256Gcm::new(&(*kek).into())
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: key.bytes(),
                aad: &aad,
            },
        )
        .unwrap_or_default();
    let mut out = [0u8; WRAPPED_LEN];
    out[..NONCE_LEN].copy_from_slice(&nonce);
    if sealed.len() == KEY_LEN + TAG_LEN {
        out[NONCE_LEN..].copy_from_slice(&sealed);
    }
    WrappedKey(out)
}

/// The inverse of [`wrap_with`]; `None` if the tag does not verify.
pub(crate) fn unwrap_with(
    kek: &[u8; KEY_LEN],
    wrapped: &WrappedKey,
    epoch: Epoch,
    member: u32,
) -> Option<GroupKey> {
    let (nonce, sealed) = wrapped.0.split_at(NONCE_LEN);
    let aad = wrap_aad(epoch, member);
    let plain = Zeroizing::new(
        Aes256Gcm::new(&(*kek).into())
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .ok()?,
    );
    let bytes: [u8; KEY_LEN] = plain.as_slice().try_into().ok()?;
    Some(GroupKey::from_bytes(epoch, bytes))
}

impl NodeKeys {
    /// Whether both come from the same initial key (constant time).
    pub fn same_as(&self, other: &NodeKeys) -> bool {
        use subtle::ConstantTimeEq;
        (self.kek.ct_eq(&other.kek) & self.mac.ct_eq(&other.mac)).into()
    }

    pub fn derive(initial: &InitialKey) -> NodeKeys {
        let hk = Hkdf::<Sha256>::new(Some(b"keyfleet v1 node keys"), &initial.0);
        let mut keys = NodeKeys {
            kek: [0; KEY_LEN],
            mac: [0; KEY_LEN],
        };
        // 32 bytes is far below HKDF-SHA256's limit of 8160, so expand cannot fail.
        hk.expand(b"key-encryption key", &mut keys.kek)
            .expect("32-byte HKDF output is valid");
        hk.expand(b"node message mac", &mut keys.mac)
            .expect("32-byte HKDF output is valid");
        keys
    }

    /// Wrap `key` for the node numbered `member`; the epoch and member are bound
    /// as associated data, so an entry cannot be replayed for another epoch or node.
    pub fn wrap(
        &self,
        key: &GroupKey,
        member: u32,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> WrappedKey {
        wrap_with(&self.kek, key, member, rng)
    }

    /// Unwrap a group key of `epoch` sent to `member`; `None` if it was wrapped
    /// under another node's key, for another epoch or member, or altered.
    pub fn unwrap(&self, wrapped: &WrappedKey, epoch: Epoch, member: u32) -> Option<GroupKey> {
        unwrap_with(&self.kek, wrapped, epoch, member)
    }

    /// The key-encryption key and the MAC key (input of the enrollment PSK).
    pub(crate) fn raw(&self) -> (&[u8; KEY_LEN], &[u8; KEY_LEN]) {
        (&self.kek, &self.mac)
    }

    /// HMAC-SHA256 of `body`, truncated to 16 bytes.
    pub fn mac(&self, body: &[u8]) -> [u8; MAC_LEN] {
        mac_with(&self.mac, body)
    }

    /// Constant-time check of a truncated MAC.
    pub fn verify_mac(&self, body: &[u8], tag: &[u8; MAC_LEN]) -> bool {
        verify_mac_with(&self.mac, body, tag)
    }
}

fn hmac(key: &[u8; KEY_LEN]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length.
    <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length")
}

/// HMAC-SHA256 of `body` under `key`, truncated to 16 bytes (the node keys'
/// MAC and the ratchet chains' MAC).
pub(crate) fn mac_with(key: &[u8; KEY_LEN], body: &[u8]) -> [u8; MAC_LEN] {
    let mut m = hmac(key);
    m.update(body);
    let full = m.finalize().into_bytes();
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&full[..MAC_LEN]);
    out
}

/// Constant-time check of a truncated MAC made by [`mac_with`].
pub(crate) fn verify_mac_with(key: &[u8; KEY_LEN], body: &[u8], tag: &[u8; MAC_LEN]) -> bool {
    let mut m = hmac(key);
    m.update(body);
    m.verify_truncated_left(tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn wrapped_key_opens_only_for_its_node_epoch_and_member() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let a = NodeKeys::derive(&InitialKey([1; 16]));
        let b = NodeKeys::derive(&InitialKey([2; 16]));
        let key = GroupKey::generate(Epoch(5), &mut rng);
        let w = a.wrap(&key, 17, &mut rng);
        assert_eq!(a.unwrap(&w, Epoch(5), 17), Some(key.clone()));
        assert_eq!(
            b.unwrap(&w, Epoch(5), 17),
            None,
            "another node's key cannot unwrap"
        );
        assert_eq!(a.unwrap(&w, Epoch(6), 17), None, "bound to its epoch");
        assert_eq!(a.unwrap(&w, Epoch(5), 18), None, "bound to its member");
        let mut bad = w;
        bad.0[20] ^= 1;
        assert_eq!(a.unwrap(&bad, Epoch(5), 17), None, "altered entry refused");
    }

    #[test]
    fn hkdf_derivation_is_deterministic_and_separates_keys() {
        let a1 = NodeKeys::derive(&InitialKey([7; 16]));
        let a2 = NodeKeys::derive(&InitialKey([7; 16]));
        assert_eq!(a1.kek, a2.kek);
        assert_ne!(a1.kek, a1.mac, "kek and mac key are distinct");
        assert_ne!(a1.kek, NodeKeys::derive(&InitialKey([8; 16])).kek);
    }

    #[test]
    fn mac_verifies_and_detects_changes() {
        let k = NodeKeys::derive(&InitialKey([9; 16]));
        let t = k.mac(b"ack epoch 4");
        assert!(k.verify_mac(b"ack epoch 4", &t));
        assert!(!k.verify_mac(b"ack epoch 5", &t));
        assert!(!NodeKeys::derive(&InitialKey([1; 16])).verify_mac(b"ack epoch 4", &t));
    }
}
