//! Sealing and opening group messages: keyfleet's keyring (with the wire
//! framing of a data message) in each node state, against raw `aes-gcm` and
//! `ring` AES-256-GCM on the same buffers, and the extra cost of trial
//! decryption when a sender leaves out the epoch hint.
//!
//! Hand-timed: every case is first calibrated to a batch of about
//! `batch_ms`, then the cases are sampled in turn (round robin), so a change
//! of machine load during the run hits every case alike and the ratios, all
//! computed from one run, stay fair. A figure is the median over the samples
//! of the mean time per message in a batch, in this thread's CPU time, so
//! that the time other processes hold the core is left out (the wall-clock
//! medians are kept in the JSON).

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use anyhow::{bail, ensure, Context};
use keyfleet_core::crypto::{Epoch, GroupKey, KeyPhase, Keyring, NONCE_LEN};
use keyfleet_core::wire;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::stats::{median, percentile, Load};

/// Message sizes measured (plaintext bytes).
pub const SIZES: [usize; 3] = [64, 1024, 16 * 1024];

/// Who does the work in a row.
pub const AES_GCM: &str = "aes-gcm";
pub const AES_GCM_PER_MSG: &str = "aes-gcm, key set up per message";
pub const RING: &str = "ring";

/// What a row measures.
pub const SEAL: &str = "seal";
pub const OPEN: &str = "open";
pub const OPEN_HINT: &str = "open, epoch hint";
pub const OPEN_TRIAL_1: &str = "open, no hint, first key right";
pub const OPEN_TRIAL_2: &str = "open, no hint, second key right";

/// The keyfleet label of a node state.
pub fn keyfleet_label(phase: KeyPhase) -> String {
    format!("keyfleet {phase:?}")
}

pub const PHASES: [KeyPhase; 3] = [
    KeyPhase::UpdateCompleted,
    KeyPhase::DistributionCompleted,
    KeyPhase::InTransit,
];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Row {
    /// Plaintext bytes.
    pub size: usize,
    /// `aes-gcm`, `ring`, `keyfleet <state>`…
    pub who: String,
    /// `seal`, `open`, `open, epoch hint`…
    pub op: String,
    /// Median thread CPU time per message, nanoseconds.
    pub ns_median: f64,
    /// 90th percentile of the per-sample means (CPU time), nanoseconds.
    pub ns_p90: f64,
    /// Median wall-clock time per message, nanoseconds (above the CPU time
    /// when other processes took the core during a batch).
    #[serde(default)]
    pub wall_ns_median: f64,
    /// Plaintext throughput at the median, MiB/s.
    pub mib_s: f64,
    /// Messages per batch, samples taken.
    pub batch: u64,
    pub samples: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DataPathResult {
    pub batch_ms: u64,
    pub samples: usize,
    pub load: Load,
    pub rows: Vec<Row>,
}

impl DataPathResult {
    pub fn find(&self, size: usize, who: &str, op: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.size == size && r.who == who && r.op == op)
    }
}

struct Case {
    size: usize,
    who: String,
    op: &'static str,
    run: Box<dyn FnMut(u64)>,
    batch: u64,
    /// Thread CPU time per message, one entry per sample.
    ns: Vec<f64>,
    /// Wall-clock time per message, one entry per sample.
    wall_ns: Vec<f64>,
}

/// This thread's CPU time (CLOCK_THREAD_CPUTIME_ID): time the scheduler gives
/// to other processes on a busy machine is not counted.
struct CpuClock(f64);

impl CpuClock {
    fn now() -> f64 {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        t.tv_sec as f64 * 1e9 + t.tv_nsec as f64
    }
    fn start() -> CpuClock {
        CpuClock(Self::now())
    }
    fn elapsed_ns(&self) -> f64 {
        Self::now() - self.0
    }
}

/// The fixed buffers of one message size, shared by every implementation.
pub struct Buffers {
    pub old_key: [u8; 32],
    pub new_key: [u8; 32],
    pub plaintext: Vec<u8>,
    pub nonce: [u8; NONCE_LEN],
}

impl Buffers {
    pub fn new(size: usize, rng: &mut impl RngCore) -> Buffers {
        let mut b = Buffers {
            old_key: [0; 32],
            new_key: [0; 32],
            plaintext: vec![0; size],
            nonce: [0; NONCE_LEN],
        };
        rng.fill_bytes(&mut b.old_key);
        rng.fill_bytes(&mut b.new_key);
        rng.fill_bytes(&mut b.plaintext);
        rng.fill_bytes(&mut b.nonce);
        b
    }

    /// A node's keyring in `phase`: epoch 1 (old) and, past UpdateCompleted, epoch 2 (new).
    pub fn keyring(&self, phase: KeyPhase) -> anyhow::Result<Keyring> {
        let mut k = Keyring::new(GroupKey::from_bytes(Epoch(1), self.old_key));
        if phase != KeyPhase::UpdateCompleted {
            k.install_new(GroupKey::from_bytes(Epoch(2), self.new_key))?;
        }
        if phase == KeyPhase::InTransit {
            k.start_transit()?;
        }
        Ok(k)
    }
}

/// A nonce that changes with every message (a counter in the last 8 bytes):
/// the same cheap nonce for every implementation, so only the AEAD and the
/// framing are compared. (The agent draws its nonces from the OS CSPRNG.)
fn bump(nonce: &mut [u8; NONCE_LEN], i: u64) {
    nonce[4..].copy_from_slice(&i.to_be_bytes());
}

/// A whole data message as a sender in `phase` with `keys` would put it on
/// the wire: header (the associated data) then ciphertext and tag.
pub fn keyfleet_message(
    keys: &mut Keyring,
    seq: u64,
    nonce: &[u8; NONCE_LEN],
    hint: bool,
    plaintext: &[u8],
) -> Vec<u8> {
    let epoch = keys.sealing_epoch();
    let mut msg = wire::data_header(7, seq, hint.then_some(epoch), nonce);
    let (_, sealed) = keys.seal(nonce, &msg, plaintext);
    msg.extend_from_slice(&sealed);
    msg
}

/// Open a data message as the receiving node does: decode, then the keyring.
pub fn keyfleet_open(keys: &mut Keyring, msg: &[u8]) -> anyhow::Result<(Epoch, Vec<u8>, u8)> {
    let wire::Message::Data(d) = wire::decode(msg).context("decoding a data message")? else {
        bail!("not a data message");
    };
    let o = keys
        .open(d.epoch_hint, &d.nonce, d.header, d.sealed)
        .context("opening a data message")?;
    Ok((o.epoch, o.plaintext, o.trials))
}

fn aes(key: &[u8; 32]) -> Aes256Gcm {
    Aes256Gcm::new(key.into())
}

fn ring_key(key: &[u8; 32]) -> anyhow::Result<ring::aead::LessSafeKey> {
    let k = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key)
        .map_err(|_| anyhow::anyhow!("ring refused a 32-byte AES-256-GCM key"))?;
    Ok(ring::aead::LessSafeKey::new(k))
}

/// `ring` seal of `plaintext` (copied into a fresh buffer, like the others allocate).
pub fn ring_seal(
    key: &ring::aead::LessSafeKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(plaintext.len() + 16);
    buf.extend_from_slice(plaintext);
    key.seal_in_place_append_tag(
        ring::aead::Nonce::assume_unique_for_key(*nonce),
        ring::aead::Aad::from(aad),
        &mut buf,
    )
    .map_err(|_| anyhow::anyhow!("ring failed to seal"))?;
    Ok(buf)
}

/// Checks that every implementation computes the same thing on the same
/// buffers: the keyring's ciphertext is byte for byte what `aes-gcm` and
/// `ring` produce for the same key, nonce and associated data, and each one
/// opens what the others sealed. Run before timing anything.
pub fn check_same_output(size: usize) -> anyhow::Result<()> {
    let mut rng = rand::thread_rng();
    let b = Buffers::new(size, &mut rng);
    for phase in PHASES {
        let mut sender = b.keyring(phase)?;
        let msg = keyfleet_message(&mut sender, 1, &b.nonce, true, &b.plaintext);
        let key = if phase == KeyPhase::InTransit {
            &b.new_key
        } else {
            &b.old_key
        };
        let header = wire::data_header(7, 1, Some(sender.sealing_epoch()), &b.nonce);
        ensure!(
            msg.starts_with(&header),
            "message does not start with its header"
        );
        let sealed = &msg[header.len()..];
        let raw = aes(key)
            .encrypt(
                (&b.nonce).into(),
                Payload {
                    msg: &b.plaintext,
                    aad: &header,
                },
            )
            .map_err(|_| anyhow::anyhow!("aes-gcm failed to seal"))?;
        ensure!(
            raw == sealed,
            "keyring and aes-gcm differ ({phase:?}, {size} B)"
        );
        let r = ring_seal(&ring_key(key)?, &b.nonce, &header, &b.plaintext)?;
        ensure!(r == sealed, "keyring and ring differ ({phase:?}, {size} B)");
        for receiver in PHASES {
            let mut recv = b.keyring(receiver)?;
            if !recv.holds(sender.sealing_epoch()) {
                // An UpdateCompleted node holds only the old key.
                continue;
            }
            let (_, pt, _) = keyfleet_open(&mut recv, &msg)?;
            ensure!(pt == b.plaintext, "opened plaintext differs");
        }
    }
    Ok(())
}

fn cases_for(size: usize, rng: &mut impl RngCore) -> anyhow::Result<Vec<Case>> {
    let b = Buffers::new(size, rng);
    let aad = wire::data_header(7, 1, Some(Epoch(1)), &b.nonce);
    let mut cases = Vec::new();
    let mut push = |who: &str, op: &'static str, run: Box<dyn FnMut(u64)>| {
        cases.push(Case {
            size,
            who: who.to_string(),
            op,
            run,
            batch: 1,
            ns: Vec::new(),
            wall_ns: Vec::new(),
        })
    };

    // Raw aes-gcm, the cipher (key schedule and GHASH key) set up once.
    {
        let c = aes(&b.old_key);
        let (pt, aad_s, mut nonce) = (b.plaintext.clone(), aad.clone(), b.nonce);
        push(
            AES_GCM,
            SEAL,
            Box::new(move |n| {
                for i in 0..n {
                    bump(&mut nonce, i);
                    let ct = c.encrypt(
                        (&nonce).into(),
                        Payload {
                            msg: &pt,
                            aad: &aad_s,
                        },
                    );
                    black_box(ct.ok());
                }
            }),
        );
        let c = aes(&b.old_key);
        let nonce = b.nonce;
        let ct = c
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: &b.plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| anyhow::anyhow!("aes-gcm failed to seal"))?;
        let aad2 = aad.clone();
        push(
            AES_GCM,
            OPEN,
            Box::new(move |n| {
                for _ in 0..n {
                    let pt = c.decrypt(
                        black_box(&nonce).into(),
                        Payload {
                            msg: &ct,
                            aad: &aad2,
                        },
                    );
                    black_box(pt.ok());
                }
            }),
        );
    }
    // aes-gcm with the cipher set up for every message, as GroupKey::seal does.
    {
        let (key, pt, aad, mut nonce) = (b.old_key, b.plaintext.clone(), aad.clone(), b.nonce);
        push(
            AES_GCM_PER_MSG,
            SEAL,
            Box::new(move |n| {
                for i in 0..n {
                    bump(&mut nonce, i);
                    let c = aes(black_box(&key));
                    let ct = c.encrypt(
                        (&nonce).into(),
                        Payload {
                            msg: &pt,
                            aad: &aad,
                        },
                    );
                    black_box(ct.ok());
                }
            }),
        );
    }
    // ring, the key set up once.
    {
        let k = ring_key(&b.old_key)?;
        let (pt, aad_s, mut nonce) = (b.plaintext.clone(), aad.clone(), b.nonce);
        push(
            RING,
            SEAL,
            Box::new(move |n| {
                for i in 0..n {
                    bump(&mut nonce, i);
                    black_box(ring_seal(&k, &nonce, &aad_s, &pt).ok());
                }
            }),
        );
        let k = ring_key(&b.old_key)?;
        let nonce = b.nonce;
        let ct = ring_seal(&k, &nonce, &aad, &b.plaintext)?;
        let aad_o = aad.clone();
        push(
            RING,
            OPEN,
            Box::new(move |n| {
                for _ in 0..n {
                    let mut buf = ct.clone();
                    let r = k.open_in_place(
                        ring::aead::Nonce::assume_unique_for_key(*black_box(&nonce)),
                        ring::aead::Aad::from(&aad_o[..]),
                        &mut buf,
                    );
                    black_box(r.ok().map(|p| p.len()));
                }
            }),
        );
    }
    // keyfleet: the keyring in each node state, with the data message framing.
    for phase in PHASES {
        let who = keyfleet_label(phase);
        let mut keys = b.keyring(phase)?;
        let (pt, mut nonce) = (b.plaintext.clone(), b.nonce);
        push(
            &who,
            SEAL,
            Box::new(move |n| {
                for i in 0..n {
                    bump(&mut nonce, i);
                    black_box(keyfleet_message(&mut keys, i, &nonce, true, &pt));
                }
            }),
        );
        // A message from a sender in the same state, with the epoch hint.
        let mut sender = b.keyring(phase)?;
        let msg = keyfleet_message(&mut sender, 1, &b.nonce, true, &b.plaintext);
        push(&who, OPEN_HINT, open_case(b.keyring(phase)?, msg, 0)?);
        // Without the hint: the keyring tries the key it seals with first.
        let msg = keyfleet_message(&mut sender, 2, &b.nonce, false, &b.plaintext);
        push(&who, OPEN_TRIAL_1, open_case(b.keyring(phase)?, msg, 1)?);
        if phase != KeyPhase::UpdateCompleted {
            // ...and the other key second: a message from a node one step
            // ahead (DistributionCompleted receiving from InTransit) or behind.
            let other = if phase == KeyPhase::InTransit {
                KeyPhase::DistributionCompleted
            } else {
                KeyPhase::InTransit
            };
            let mut sender = b.keyring(other)?;
            let msg = keyfleet_message(&mut sender, 3, &b.nonce, false, &b.plaintext);
            push(&who, OPEN_TRIAL_2, open_case(b.keyring(phase)?, msg, 2)?);
        }
    }
    Ok(cases)
}

/// A case opening `msg` with `keys`; checks once that it opens with the
/// expected number of trials (0 with the hint).
fn open_case(mut keys: Keyring, msg: Vec<u8>, trials: u8) -> anyhow::Result<Box<dyn FnMut(u64)>> {
    let (_, _, t) = keyfleet_open(&mut keys, &msg)?;
    ensure!(
        t == trials,
        "expected {trials} trials, the keyring made {t}"
    );
    Ok(Box::new(move |n| {
        for _ in 0..n {
            black_box(keyfleet_open(&mut keys, black_box(&msg)).ok());
        }
    }))
}

/// Measure every case; `samples` rounds of batches of about `batch_ms` each.
pub fn run(batch_ms: u64, samples: usize) -> anyhow::Result<DataPathResult> {
    for size in SIZES {
        check_same_output(size)?;
    }
    let load = Load::start();
    let mut rng = rand::thread_rng();
    let mut cases = Vec::new();
    for size in SIZES {
        cases.extend(cases_for(size, &mut rng)?);
    }
    let target = Duration::from_millis(batch_ms.max(1));
    for c in &mut cases {
        // Warm up and calibrate on CPU time: double the batch until it takes
        // the target; the fastest of three tries sets the batch.
        let mut n = 1u64;
        loop {
            let t = CpuClock::start();
            (c.run)(n);
            let e = t.elapsed_ns();
            if e >= target.as_nanos() as f64 || n >= 1 << 30 {
                let per = (0..3)
                    .map(|_| {
                        let t = CpuClock::start();
                        (c.run)(n);
                        t.elapsed_ns() / n as f64
                    })
                    .fold(f64::INFINITY, f64::min);
                c.batch = ((target.as_nanos() as f64 / per.max(1e-3)) as u64).max(1);
                break;
            }
            n *= 2;
        }
    }
    for _ in 0..samples {
        for c in &mut cases {
            let wall = Instant::now();
            let cpu = CpuClock::start();
            (c.run)(c.batch);
            c.ns.push(cpu.elapsed_ns() / c.batch as f64);
            c.wall_ns
                .push(wall.elapsed().as_nanos() as f64 / c.batch as f64);
        }
    }
    let rows = cases
        .into_iter()
        .map(|c| {
            let ns = median(&c.ns).unwrap_or(f64::NAN);
            Row {
                size: c.size,
                who: c.who,
                op: c.op.to_string(),
                ns_median: ns,
                ns_p90: percentile(&c.ns, 90).unwrap_or(f64::NAN),
                wall_ns_median: median(&c.wall_ns).unwrap_or(f64::NAN),
                mib_s: c.size as f64 / (ns * 1e-9) / (1024.0 * 1024.0),
                batch: c.batch,
                samples: c.ns.len(),
            }
        })
        .collect();
    Ok(DataPathResult {
        batch_ms,
        samples,
        load: load.finish(),
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_implementation_computes_the_same_ciphertext() {
        for size in SIZES {
            check_same_output(size).unwrap();
        }
    }

    #[test]
    fn trial_decryption_cases_make_the_trials_they_claim() {
        // open_case refuses a message that opens with another number of trials,
        // so building the cases checks the 1st-key/2nd-key setups.
        let cases = cases_for(64, &mut rand::thread_rng()).unwrap();
        let ops: Vec<(String, &str)> = cases.iter().map(|c| (c.who.clone(), c.op)).collect();
        for phase in [KeyPhase::DistributionCompleted, KeyPhase::InTransit] {
            assert!(ops.contains(&(keyfleet_label(phase), OPEN_TRIAL_2)));
        }
        assert!(!ops.contains(&(keyfleet_label(KeyPhase::UpdateCompleted), OPEN_TRIAL_2)));
        assert_eq!(cases.len(), 5 + 3 * 3 + 2);
    }

    #[test]
    fn a_short_run_yields_every_row_with_a_positive_time() {
        let r = run(1, 2).unwrap();
        assert_eq!(r.rows.len(), SIZES.len() * 16);
        for row in &r.rows {
            assert!(row.ns_median > 0.0, "{row:?}");
            assert_eq!(row.samples, 2);
        }
        assert!(r.find(1024, RING, SEAL).is_some());
    }
}
