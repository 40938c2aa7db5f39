//! The controller's own state in the management table: the machine's persist
//! actions applied to sealed rows, so that every controller sharing the table
//! (issue 16) can continue from it, and production persists exactly as the
//! simulator does (issue 14: one persistence path, [`StateStore`]).
//!
//! Rows: `controller_state` (the machine's [`ControllerCore`]: signing key,
//! group keys, round in progress, counters), `member_state` (one
//! [`MemberPersist`] per member: its key-encryption and MAC keys, ratchet) and
//! `replay_marks` (the highest sequence number accepted from each member; not
//! secret). A body is the row's JSON sealed with AES-256-GCM under the *state
//! key*, with the row's name (and member number) as associated data, so a body
//! moved to another row does not open:
//!
//! ```text
//! [1: format 1][12: nonce][ciphertext and 16-byte tag]
//! ```
//!
//! The state key is 32 random bytes in `controller.secrets` (owner-only,
//! sealed with the passphrase when there is one, [`crate::secrets`]): only the
//! controllers hold it, so a copy of the database alone (a PostgreSQL dump,
//! its WAL, a backup) holds no key. A standby controller gets a copy of that
//! file. A state directory written before (its `controller.secrets` held the
//! whole snapshot) is migrated on open by [`StateFile::load`] and
//! [`TableState::migrate`].

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use keyfleet_core::protocol::{
    fold_mark, store_snapshot, ControllerCore, ControllerPersist, MemberPersist, StateStore,
};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::store::{Store, StoreError};

/// The format byte of a sealed state row.
const FORMAT: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// The key the state rows are sealed with (zeroized on drop).
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct StateKey {
    #[serde(with = "hex::serde")]
    state_key: [u8; 32],
}

impl std::fmt::Debug for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateKey(..)")
    }
}

/// What `controller.secrets` holds: the state key (this version), or the
/// whole snapshot (a state directory written before the state moved into the
/// table; migrated on open).
#[derive(Deserialize)]
#[serde(untagged)]
pub enum StateFile {
    Key(StateKey),
    Snapshot(Box<ControllerPersist>),
}

/// A state row that does not open.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "the management table's controller state ({row}) does not open with this state \
         directory's key: the table belongs to another fleet, or controller.secrets is \
         not the file of the controllers sharing it (copy it from one of them); nothing \
         was changed"
    )]
    WrongKey { row: String },
    #[error(
        "the management table's controller state ({row}) is damaged: {detail}; restore \
         the table from a backup"
    )]
    Damaged { row: String, detail: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl StateKey {
    /// A fresh random key.
    pub fn generate() -> StateKey {
        let mut state_key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut state_key);
        StateKey { state_key }
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new((&self.state_key).into())
    }

    /// Seals `plain` as the row named `row`.
    pub fn seal(&self, row: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = self
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: row,
                },
            )
            .expect("AES-GCM seals any length the state has");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(FORMAT);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens the body of the row named `row`.
    pub fn open(&self, row: &[u8], body: &[u8]) -> Result<Zeroizing<Vec<u8>>, StateError> {
        let name = || String::from_utf8_lossy(row).into_owned();
        if body.len() < 1 + NONCE_LEN + TAG_LEN || body[0] != FORMAT {
            return Err(StateError::Damaged {
                row: name(),
                detail: format!("{} bytes, format {:?}", body.len(), body.first()),
            });
        }
        let (nonce, sealed) = body[1..].split_at(NONCE_LEN);
        self.cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: row,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| StateError::WrongKey { row: name() })
    }
}

fn core_row() -> Vec<u8> {
    b"keyfleet controller_state".to_vec()
}

fn member_row(member: u32) -> Vec<u8> {
    format!("keyfleet member_state {member}").into_bytes()
}

fn json<T: Serialize>(v: &T) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(serde_json::to_vec(v).expect("the controller state serializes"))
}

fn parse<T: serde::de::DeserializeOwned>(row: &[u8], plain: &[u8]) -> Result<T, StateError> {
    serde_json::from_slice(plain).map_err(|e| StateError::Damaged {
        row: String::from_utf8_lossy(row).into_owned(),
        detail: e.to_string(),
    })
}

/// The machine's state in the management table: a [`StateStore`] over the
/// table's state rows, sealed with the state key. Writes go into whatever
/// batch the store has open (the controller's pass writes its state rows and
/// its records in one transaction).
pub struct TableState<'a> {
    pub store: &'a mut Store,
    pub key: &'a StateKey,
    pub now_ms: u64,
}

impl StateStore for TableState<'_> {
    type Error = StateError;

    fn put_core(&mut self, core: &ControllerCore) -> Result<(), StateError> {
        let body = self.key.seal(&core_row(), &json(core));
        Ok(self.store.put_state_core(&body, self.now_ms)?)
    }

    fn put_member(&mut self, row: &MemberPersist) -> Result<(), StateError> {
        let body = self.key.seal(&member_row(row.member), &json(row));
        Ok(self.store.put_state_member(row.member, &body)?)
    }

    fn forget_member(&mut self, member: u32) -> Result<(), StateError> {
        Ok(self.store.delete_state_member(member)?)
    }

    fn put_replay_marks(&mut self, marks: &[(u32, u64)]) -> Result<(), StateError> {
        Ok(self.store.put_replay_marks(marks)?)
    }

    fn load(&mut self) -> Result<Option<ControllerPersist>, StateError> {
        let rows = self.store.state_rows()?;
        let Some(core) = rows.core else {
            return Ok(None);
        };
        let name = core_row();
        let core: ControllerCore = parse(&name, &self.key.open(&name, &core)?)?;
        let mut marks = rows.marks.into_iter().peekable();
        let mut members = Vec::with_capacity(rows.members.len());
        for (member, body) in rows.members {
            let name = member_row(member);
            let row: MemberPersist = parse(&name, &self.key.open(&name, &body)?)?;
            if row.member != member {
                return Err(StateError::Damaged {
                    row: String::from_utf8_lossy(&name).into_owned(),
                    detail: format!("it holds member {}", row.member),
                });
            }
            while marks.next_if(|(m, _)| *m < member).is_some() {}
            let mark = marks.next_if(|(m, _)| *m == member).map(|(_, s)| s);
            members.push(fold_mark(row, mark));
        }
        Ok(Some(ControllerPersist { core, members }))
    }
}

impl TableState<'_> {
    /// Stores a whole snapshot (a new fleet, or a state directory of an older
    /// version whose `controller.secrets` held it), in one transaction.
    pub fn migrate(&mut self, p: &ControllerPersist) -> Result<(), StateError> {
        let (key, now_ms) = (self.key, self.now_ms);
        self.store.batch(|store| {
            store_snapshot(&mut TableState { store, key, now_ms }, p)
                .map_err(StateError::into_store)
        })?;
        Ok(())
    }
}

impl StateError {
    /// A state write's failure as the store's (writing only seals, which
    /// cannot fail: the store is what fails), to fail a batch with.
    pub(super) fn into_store(self) -> StoreError {
        match self {
            StateError::Store(e) => e,
            other => StoreError::BatchFailed {
                at: "the controller state".into(),
                cause: other.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_row_opens_only_as_itself_and_with_its_key() {
        let key = StateKey::generate();
        let body = key.seal(&member_row(7), b"{\"x\":1}");
        assert_eq!(&*key.open(&member_row(7), &body).unwrap(), b"{\"x\":1}");
        // Moved to another member's row, or read with another fleet's key.
        assert!(matches!(
            key.open(&member_row(8), &body),
            Err(StateError::WrongKey { .. })
        ));
        assert!(matches!(
            StateKey::generate().open(&member_row(7), &body),
            Err(StateError::WrongKey { .. })
        ));
        // Every flipped bit is refused, truncations too, never a panic.
        for i in 0..body.len() {
            let mut b = body.clone();
            b[i] ^= 1;
            assert!(key.open(&member_row(7), &b).is_err(), "byte {i}");
            assert!(key.open(&member_row(7), &body[..i]).is_err(), "cut at {i}");
        }
    }
}
