//! The controller's secrets at rest.
//!
//! One owner-only file (mode 0600, in a 0700 directory), written atomically
//! through [`crate::statefile`]. The controller stores its snapshot in it
//! ([`keyfleet_core::protocol::ControllerPersist`]): the Ed25519 signing key seed, the
//! current group key and the round's new key with their epochs, and, for each
//! enrolled node, its key-encryption key and MAC key (both HKDF outputs of its
//! initial key) with the highest sequence number accepted from it. Initial
//! keys themselves are never stored: only their fingerprints, in the
//! management table.
//!
//! The file is a JSON envelope:
//!
//! ```text
//! {"format":"keyfleet-secrets","version":1,"seal":null,"data":"<hex of the JSON payload>"}
//! {"format":"keyfleet-secrets","version":1,
//!  "seal":{"kdf":"argon2id","m_cost_kib":19456,"t_cost":2,"p_cost":1,"salt":"<hex>",
//!          "cipher":"aes-256-gcm","nonce":"<hex>"},
//!  "data":"<hex of the AES-256-GCM ciphertext of the JSON payload>"}
//! ```
//!
//! When sealed with a passphrase, the key is derived with Argon2id from the
//! passphrase and the salt, and the header (format, version and every seal
//! parameter) is authenticated as AES-GCM associated data, so a changed
//! parameter is detected like a wrong passphrase.
//!
//! The payload is any serde type ([`save`], [`load`]); [`ControllerSecrets`] is
//! a sample payload (tests and the fuzz target), not what the controller
//! writes. Secrets are held in zeroizing buffers and zeroed on drop.

use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::statefile::{self, StateFileError};

const FORMAT: &str = "keyfleet-secrets";
const VERSION: u32 = 1;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 12;

/// A passphrase, zeroed on drop.
pub type Passphrase = Zeroizing<String>;

/// The costliest Argon2id parameters a secrets file may ask for: 2 GiB (RFC 9106's
/// first recommended setting), 16 passes, 16 lanes. A file asking for more is
/// refused before the key derivation runs, which would otherwise try to
/// allocate up to 4 TiB (and abort) or run for hours.
pub const MAX_M_COST_KIB: u32 = 2 * 1024 * 1024;
pub const MAX_T_COST: u32 = 16;
pub const MAX_P_COST: u32 = 16;

/// Argon2id cost parameters used when sealing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for SealParams {
    /// OWASP's recommended Argon2id minimum: 19 MiB, 2 iterations, 1 lane.
    fn default() -> Self {
        SealParams {
            m_cost_kib: 19 * 1024,
            t_cost: 2,
            p_cost: 1,
        }
    }
}

/// What went wrong with the secrets file.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error(transparent)]
    File(#[from] StateFileError),
    #[error("{path} is not a keyfleet secrets file of a version this keyfleet reads ({found})")]
    Format { path: PathBuf, found: String },
    #[error("{path} is sealed with a passphrase; give the passphrase to open it")]
    PassphraseRequired { path: PathBuf },
    #[error("the passphrase does not open {path} (or the file was altered); check the passphrase")]
    WrongPassphrase { path: PathBuf },
    #[error("{path} has seal parameters this keyfleet cannot use: {reason}")]
    BadSeal { path: PathBuf, reason: String },
    #[error("{path} opened, but its content is not what keyfleet expects: {source}")]
    Payload {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

type Result<T> = std::result::Result<T, SecretsError>;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct Seal {
    kdf: String,
    m_cost_kib: u32,
    t_cost: u32,
    p_cost: u32,
    #[serde(with = "hex::serde")]
    salt: Vec<u8>,
    cipher: String,
    #[serde(with = "hex::serde")]
    nonce: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: String,
    version: u32,
    seal: Option<Seal>,
    /// Hex; for an unsealed file this is the plaintext, hence zeroizing.
    data: Zeroizing<String>,
}

/// The associated data that binds the header to the ciphertext.
fn aad(seal: &Seal) -> Vec<u8> {
    format!(
        "{FORMAT} v{VERSION} {} m={} t={} p={} salt={} {} nonce={}",
        seal.kdf,
        seal.m_cost_kib,
        seal.t_cost,
        seal.p_cost,
        hex::encode(&seal.salt),
        seal.cipher,
        hex::encode(&seal.nonce)
    )
    .into_bytes()
}

fn derive_key(path: &Path, passphrase: &str, seal: &Seal) -> Result<Zeroizing<[u8; 32]>> {
    let bad = |reason: String| SecretsError::BadSeal {
        path: path.to_path_buf(),
        reason,
    };
    if seal.m_cost_kib > MAX_M_COST_KIB || seal.t_cost > MAX_T_COST || seal.p_cost > MAX_P_COST {
        return Err(bad(format!(
            "Argon2id m={} KiB t={} p={} is costlier than keyfleet allows (m <= {MAX_M_COST_KIB}, t <= {MAX_T_COST}, p <= {MAX_P_COST})",
            seal.m_cost_kib, seal.t_cost, seal.p_cost
        )));
    }
    let params = argon2::Params::new(seal.m_cost_kib, seal.t_cost, seal.p_cost, Some(32))
        .map_err(|e| bad(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase.as_bytes(), &seal.salt, key.as_mut())
        .map_err(|e| bad(e.to_string()))?;
    Ok(key)
}

/// A sealing key derived once from a passphrase (Argon2id, with a fresh salt
/// and the given cost) and reused by every later [`save_sealed`]: each save
/// draws a fresh 96-bit nonce, so a process that persists often (the
/// controller, at every phase change) pays for Argon2id once, not per save.
/// Zeroized on drop.
pub struct SealKey {
    params: SealParams,
    salt: Vec<u8>,
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKey")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl SealKey {
    /// Runs Argon2id over `passphrase` with a fresh salt (`path` names the
    /// file in errors).
    pub fn derive(path: &Path, passphrase: &str, params: SealParams) -> Result<SealKey> {
        let mut salt = vec![0u8; SALT_LEN];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        let probe = Seal {
            kdf: "argon2id".into(),
            m_cost_kib: params.m_cost_kib,
            t_cost: params.t_cost,
            p_cost: params.p_cost,
            salt,
            cipher: "aes-256-gcm".into(),
            nonce: Vec::new(),
        };
        let key = derive_key(path, passphrase, &probe)?;
        Ok(SealKey {
            params,
            salt: probe.salt,
            key,
        })
    }
}

/// Writes `value` to `path` (atomically, mode 0600, parent directory 0700),
/// sealed with `passphrase` when one is given.
pub fn save<T: Serialize + ?Sized>(
    path: &Path,
    value: &T,
    passphrase: Option<&str>,
    params: SealParams,
) -> Result<()> {
    match passphrase {
        None => save_plain(path, value),
        Some(pass) => save_sealed(path, value, &SealKey::derive(path, pass, params)?),
    }
}

fn private_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<Zeroizing<Vec<u8>>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        statefile::ensure_private_dir(dir)?;
    }
    statefile::to_json_zeroizing(value).map_err(|source| SecretsError::Payload {
        path: path.to_path_buf(),
        source,
    })
}

fn save_plain<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let plain = private_json(path, value)?;
    statefile::write_json(
        path,
        &Envelope {
            format: FORMAT.into(),
            version: VERSION,
            seal: None,
            data: Zeroizing::new(hex::encode(&*plain)),
        },
    )?;
    Ok(())
}

/// [`save`] with a key derived already ([`SealKey::derive`]).
pub fn save_sealed<T: Serialize + ?Sized>(path: &Path, value: &T, key: &SealKey) -> Result<()> {
    let plain = private_json(path, value)?;
    let mut nonce = vec![0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let seal = Seal {
        kdf: "argon2id".into(),
        m_cost_kib: key.params.m_cost_kib,
        t_cost: key.params.t_cost,
        p_cost: key.params.p_cost,
        salt: key.salt.clone(),
        cipher: "aes-256-gcm".into(),
        nonce,
    };
    let cipher =
        Aes256Gcm::new_from_slice(key.key.as_ref()).map_err(|e| SecretsError::BadSeal {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let aad = aad(&seal);
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&seal.nonce),
            Payload {
                msg: &plain,
                aad: &aad,
            },
        )
        .map_err(|_| SecretsError::BadSeal {
            path: path.to_path_buf(),
            reason: "AES-GCM refused to encrypt".into(),
        })?;
    statefile::write_json(
        path,
        &Envelope {
            format: FORMAT.into(),
            version: VERSION,
            seal: Some(seal),
            data: Zeroizing::new(hex::encode(ct)),
        },
    )?;
    Ok(())
}

/// Reads `path` written by [`save`]; `Ok(None)` when it does not exist.
///
/// Refuses a file that group or others can read (`chmod 600 FILE`), a damaged
/// file, a sealed file without a passphrase, and a wrong passphrase.
pub fn load<T: DeserializeOwned>(path: &Path, passphrase: Option<&str>) -> Result<Option<T>> {
    let Some(raw) = statefile::read(path)? else {
        return Ok(None);
    };
    decode(path, &raw, passphrase).map(Some)
}

/// Opens the envelope that [`load`] read (the state file's payload) and parses
/// its payload. Pure: `path` only names the file in errors; the fuzz target
/// `secrets` calls it directly.
pub fn decode<T: DeserializeOwned>(path: &Path, raw: &[u8], passphrase: Option<&str>) -> Result<T> {
    let envelope: Envelope = serde_json::from_slice(raw).map_err(|e| SecretsError::Format {
        path: path.to_path_buf(),
        found: e.to_string(),
    })?;
    if envelope.format != FORMAT || envelope.version != VERSION {
        return Err(SecretsError::Format {
            path: path.to_path_buf(),
            found: format!("{} version {}", envelope.format, envelope.version),
        });
    }
    let mut data = Zeroizing::new(vec![0u8; envelope.data.len() / 2]);
    hex::decode_to_slice(envelope.data.as_bytes(), &mut data).map_err(|e| {
        SecretsError::Format {
            path: path.to_path_buf(),
            found: format!("data is not hex: {e}"),
        }
    })?;
    let plain = match &envelope.seal {
        None => data,
        Some(seal) => {
            let Some(pass) = passphrase else {
                return Err(SecretsError::PassphraseRequired {
                    path: path.to_path_buf(),
                });
            };
            if seal.kdf != "argon2id"
                || seal.cipher != "aes-256-gcm"
                || seal.nonce.len() != NONCE_LEN
            {
                return Err(SecretsError::BadSeal {
                    path: path.to_path_buf(),
                    reason: format!("kdf {} cipher {}", seal.kdf, seal.cipher),
                });
            }
            let key = derive_key(path, pass, seal)?;
            let cipher =
                Aes256Gcm::new_from_slice(key.as_ref()).map_err(|e| SecretsError::BadSeal {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
            let aad = aad(seal);
            let pt = cipher
                .decrypt(
                    Nonce::from_slice(&seal.nonce),
                    Payload {
                        msg: &data,
                        aad: &aad,
                    },
                )
                .map_err(|_| SecretsError::WrongPassphrase {
                    path: path.to_path_buf(),
                })?;
            Zeroizing::new(pt)
        }
    };
    serde_json::from_slice(&plain).map_err(|source| SecretsError::Payload {
        path: path.to_path_buf(),
        source,
    })
}

/// Whether the file at `path` is sealed with a passphrase (so the caller knows
/// to ask for one). `Ok(None)` when it does not exist.
pub fn is_sealed(path: &Path) -> Result<Option<bool>> {
    #[derive(Deserialize)]
    struct Head {
        seal: Option<serde::de::IgnoredAny>,
    }
    let Some(raw) = statefile::read(path)? else {
        return Ok(None);
    };
    let head: Head = serde_json::from_slice(&raw).map_err(|e| SecretsError::Format {
        path: path.to_path_buf(),
        found: e.to_string(),
    })?;
    Ok(Some(head.seal.is_some()))
}

/// A group key with its epoch.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct EpochKey {
    pub epoch: u64,
    #[serde(with = "hex::serde")]
    pub key: [u8; 32],
}

impl std::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochKey")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// A node's initial key (as checked by the input path of SPEC §6).
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct NodeInitialKey {
    pub node_id: String,
    #[serde(with = "hex::serde")]
    pub key: Vec<u8>,
}

impl std::fmt::Debug for NodeInitialKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeInitialKey")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// Everything secret the controller keeps between runs.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct ControllerSecrets {
    /// The Ed25519 signing key seed that authenticates control messages.
    #[serde(with = "hex::serde")]
    pub signing_seed: [u8; 32],
    /// The group key in use (or being rolled out).
    pub current: Option<EpochKey>,
    /// The group key before it, kept until the round that replaced it ends.
    pub previous: Option<EpochKey>,
    /// The initial key of every enrolled node.
    pub initial_keys: Vec<NodeInitialKey>,
}

impl std::fmt::Debug for ControllerSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerSecrets")
            .field("current_epoch", &self.current.as_ref().map(|k| k.epoch))
            .field("previous_epoch", &self.previous.as_ref().map(|k| k.epoch))
            .field("nodes", &self.initial_keys.len())
            .finish_non_exhaustive()
    }
}

impl ControllerSecrets {
    /// A fresh controller: a new signing seed from the OS CSPRNG, no keys yet.
    pub fn generate() -> Self {
        let mut signing_seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut signing_seed);
        ControllerSecrets {
            signing_seed,
            current: None,
            previous: None,
            initial_keys: Vec::new(),
        }
    }

    /// The initial key of `node_id`, if enrolled.
    pub fn initial_key(&self, node_id: &str) -> Option<&[u8]> {
        self.initial_keys
            .iter()
            .find(|k| k.node_id == node_id)
            .map(|k| k.key.as_slice())
    }

    /// Adds or replaces the initial key of `node_id`.
    pub fn set_initial_key(&mut self, node_id: &str, key: &[u8]) {
        self.initial_keys.retain(|k| k.node_id != node_id);
        self.initial_keys.push(NodeInitialKey {
            node_id: node_id.to_owned(),
            key: key.to_vec(),
        });
    }

    /// Forgets the initial key of `node_id` (a removed node).
    pub fn remove_initial_key(&mut self, node_id: &str) {
        self.initial_keys.retain(|k| k.node_id != node_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    /// Cheap parameters so the tests run fast in debug builds.
    const FAST: SealParams = SealParams {
        m_cost_kib: 64,
        t_cost: 1,
        p_cost: 1,
    };

    fn sample() -> ControllerSecrets {
        let mut s = ControllerSecrets::generate();
        s.current = Some(EpochKey {
            epoch: 7,
            key: [7u8; 32],
        });
        s.previous = Some(EpochKey {
            epoch: 6,
            key: [6u8; 32],
        });
        s.set_initial_key("node-a", &[0xa5; 16]);
        s
    }

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn unsealed_round_trip_in_private_dir() {
        let d = dir();
        let path = d.path().join("state/secrets.json");
        let s = sample();
        save(&path, &s, None, FAST).unwrap();
        assert_eq!(load::<ControllerSecrets>(&path, None).unwrap(), Some(s));
        assert_eq!(is_sealed(&path).unwrap(), Some(false));
        let fmode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        let dmode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!((fmode, dmode), (0o600, 0o700));
    }

    #[test]
    fn sealed_round_trip_hides_keys_and_needs_the_passphrase() {
        let d = dir();
        let path = d.path().join("state/secrets.json");
        let s = sample();
        save(&path, &s, Some("correct horse"), FAST).unwrap();
        let raw = fs::read(&path).unwrap();
        let hay = String::from_utf8_lossy(&raw);
        assert!(!hay.contains(&hex::encode([7u8; 32])));
        assert!(!hay.contains(&hex::encode(s.signing_seed)));
        assert!(!hay.contains("node-a"));
        assert_eq!(is_sealed(&path).unwrap(), Some(true));
        assert_eq!(
            load::<ControllerSecrets>(&path, Some("correct horse")).unwrap(),
            Some(s)
        );
        assert!(matches!(
            load::<ControllerSecrets>(&path, None),
            Err(SecretsError::PassphraseRequired { .. })
        ));
        let err = load::<ControllerSecrets>(&path, Some("wrong")).unwrap_err();
        assert!(matches!(err, SecretsError::WrongPassphrase { .. }), "{err}");
    }

    #[test]
    fn a_sealing_key_derived_once_seals_every_save_with_a_fresh_nonce() {
        let d = dir();
        let path = d.path().join("state/secrets.json");
        let key = SealKey::derive(&path, "correct horse", FAST).unwrap();
        assert!(!format!("{key:?}").contains(&hex::encode(*key.key)));
        let mut s = sample();
        let mut seals = Vec::new();
        for round in 0..3u8 {
            s.signing_seed = [round; 32];
            save_sealed(&path, &s, &key).unwrap();
            let raw = statefile::read(&path).unwrap().unwrap();
            let env: Envelope = serde_json::from_slice(&raw).unwrap();
            seals.push(env.seal.unwrap());
            // Each file opens with the passphrase alone, as after a restart.
            assert_eq!(
                load::<ControllerSecrets>(&path, Some("correct horse")).unwrap(),
                Some(s.clone())
            );
            let err = load::<ControllerSecrets>(&path, Some("wrong")).unwrap_err();
            assert!(matches!(err, SecretsError::WrongPassphrase { .. }), "{err}");
        }
        assert!(seals.iter().all(|x| x.salt == key.salt));
        assert_ne!(seals[0].nonce, seals[1].nonce);
        assert_ne!(seals[1].nonce, seals[2].nonce);
        assert_ne!(seals[0].nonce, seals[2].nonce);
    }

    #[test]
    fn altered_seal_parameters_are_detected() {
        let d = dir();
        let path = d.path().join("state/secrets.json");
        save(&path, &sample(), Some("pw"), FAST).unwrap();
        // Rewrite the envelope (with a valid statefile checksum) but another t_cost.
        let raw = statefile::read(&path).unwrap().unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        v["seal"]["t_cost"] = 2.into();
        statefile::write_json(&path, &v).unwrap();
        assert!(matches!(
            load::<ControllerSecrets>(&path, Some("pw")),
            Err(SecretsError::WrongPassphrase { .. })
        ));
    }

    #[test]
    fn costly_seal_parameters_are_refused_before_the_kdf_runs() {
        // Found while writing the fuzz target `secrets`: a sealed file asking
        // for m_cost_kib = 4294967295 made Argon2id allocate 4 TiB and abort
        // the process; t_cost = 4294967295 would run for days.
        let d = dir();
        let path = d.path().join("state/secrets.json");
        save(&path, &sample(), Some("pw"), FAST).unwrap();
        let raw = statefile::read(&path).unwrap().unwrap();
        for (field, value) in [
            ("m_cost_kib", u32::MAX),
            ("t_cost", u32::MAX),
            ("p_cost", 1 << 20),
        ] {
            let mut v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
            v["seal"][field] = value.into();
            let bytes = serde_json::to_vec(&v).unwrap();
            let err = decode::<ControllerSecrets>(&path, &bytes, Some("pw")).unwrap_err();
            assert!(
                matches!(err, SecretsError::BadSeal { .. }),
                "{field}: {err}"
            );
            assert!(
                err.to_string().contains("costlier than keyfleet allows"),
                "{err}"
            );
        }
        // Saving with such parameters is refused too, and writes nothing.
        let other = d.path().join("state/other.json");
        let costly = SealParams {
            m_cost_kib: MAX_M_COST_KIB + 1,
            ..FAST
        };
        assert!(matches!(
            save(&other, &sample(), Some("pw"), costly),
            Err(SecretsError::BadSeal { .. })
        ));
        assert!(!other.exists());
    }

    #[test]
    fn world_readable_secrets_are_refused() {
        let d = dir();
        let path = d.path().join("state/secrets.json");
        save(&path, &sample(), None, FAST).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let msg = load::<ControllerSecrets>(&path, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("chmod 600"), "{msg}");
    }

    #[test]
    fn saving_into_a_directory_open_to_others_is_refused() {
        let d = dir();
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let path = d.path().join("secrets.json");
        let msg = save(&path, &sample(), None, FAST).unwrap_err().to_string();
        assert!(msg.contains("chmod 700"), "{msg}");
        assert!(!path.exists());
    }

    #[test]
    fn debug_never_shows_key_material() {
        let s = sample();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("165") && !dbg.contains("a5"), "{dbg}");
        assert!(dbg.contains("current_epoch: Some(7)"), "{dbg}");
    }

    #[test]
    fn generic_payload() {
        let d = dir();
        let path = d.path().join("state/blob.json");
        let v = serde_json::json!({"anything": [1, 2, 3]});
        save(&path, &v, Some("pw"), FAST).unwrap();
        assert_eq!(
            load::<serde_json::Value>(&path, Some("pw")).unwrap(),
            Some(v)
        );
    }
}
