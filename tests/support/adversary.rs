//! A host on the LAN that is not enrolled: it listens to the fleet's multicast
//! group, keeps what it overhears, and sends forged, replayed, altered,
//! truncated and oversized datagrams and floods — to the group and to any
//! unicast address it learnt.
//!
//! Two halves:
//! - [`forge`]: pure functions that build the attacker's datagrams with the
//!   real wire encoder ([`keyfleet_core::wire`]), so the in-process tests and the
//!   process tests send the same bytes;
//! - [`Lan`]: real sockets on loopback multicast (a capture thread joined to
//!   the group, a sending socket), bounded floods.
//!
//! The attacker never holds a fleet key unless a test hands it one (a stolen
//! appliance's state file): it signs with its own Ed25519 key and MACs with
//! keys derived from a random initial key.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyfleet_core::crypto::{
    Chain, Epoch, GroupKey, InitialKey, NodeKeys, Share, ShareSecret, TransitionChain,
};
use keyfleet_core::wire::{self, NodeId, Step};
use rand::{Rng, RngCore};

/// The wire type byte of a datagram (its second byte), if it has one.
pub fn kind(bytes: &[u8]) -> Option<u8> {
    bytes.get(1).copied()
}

/// Wire type bytes of the controller's group messages and of data.
pub mod kinds {
    pub const DATA: u8 = 0x01;
    pub const KEY_UPDATE: u8 = 0x02;
    pub const FIRST_TRANSITION: u8 = 0x03;
    pub const SECOND_TRANSITION: u8 = 0x04;
}

/// One labelled attack datagram.
#[derive(Clone, Debug)]
pub struct Attack {
    pub label: String,
    pub bytes: Vec<u8>,
}

impl Attack {
    pub fn new(label: impl Into<String>, bytes: Vec<u8>) -> Attack {
        Attack {
            label: label.into(),
            bytes,
        }
    }
}

/// Building the attacker's datagrams.
pub mod forge {
    use super::*;

    /// The attacker's own controller key: not the fleet's.
    pub fn attacker_signing_key(
        rng: &mut (impl RngCore + rand::CryptoRng),
    ) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::generate(rng)
    }

    /// Node keys from a random initial key: what an attacker who guesses has.
    pub fn attacker_node_keys(rng: &mut impl RngCore) -> NodeKeys {
        let mut k = [0u8; 16];
        rng.fill_bytes(&mut k);
        NodeKeys::derive(&InitialKey(k))
    }

    /// A ratchet chain the attacker made up (it never saw a handshake's secrets).
    pub fn attacker_chain(rng: &mut impl RngCore) -> Chain {
        let (mut c, mut m) = ([0u8; 32], [0u8; 32]);
        rng.fill_bytes(&mut c);
        rng.fill_bytes(&mut m);
        Chain::from_bytes(c, m)
    }

    /// An X25519 share of the attacker's.
    pub fn attacker_share(rng: &mut (impl RngCore + rand::CryptoRng)) -> Share {
        ShareSecret::generate(rng).public()
    }

    /// Key update requests for `epoch` with an entry for every member in
    /// `members` (sorted), each a group key of the attacker's wrapped under a
    /// key-encryption key the attacker made up; signed with the attacker's key,
    /// and once more with an all-zero signature.
    pub fn key_updates(
        epoch: Epoch,
        seq: u64,
        members: &[u32],
        rng: &mut (impl RngCore + rand::CryptoRng),
    ) -> Vec<Attack> {
        let sk = attacker_signing_key(rng);
        let kek = attacker_node_keys(rng);
        let key = GroupKey::generate(epoch, rng);
        let mut members = members.to_vec();
        members.sort_unstable();
        members.dedup();
        let entries: Vec<_> = members
            .iter()
            .map(|&m| (m, kek.wrap(&key, m, rng)))
            .collect();
        // The attacker's own transition chain: a node that took this update
        // would take the attacker's transition requests by their reveals.
        let commit = TransitionChain::derive(&sk.to_bytes(), 1, epoch).commitment();
        let body = wire::key_update(1, epoch, seq, &attacker_share(rng), &commit, &entries);
        let mut zero = body.clone();
        zero.extend_from_slice(&[0u8; 64]);
        vec![
            Attack::new(
                format!("forged key update epoch {epoch} seq {seq} (attacker's signature)"),
                wire::sign(body, &sk),
            ),
            Attack::new(
                format!("forged key update epoch {epoch} seq {seq} (zero signature)"),
                zero,
            ),
            // The highest leader term: a node that took it would refuse the
            // real controller (`stale_term`) for good.
            Attack::new(
                format!("forged key update epoch {epoch} seq {seq} of term u32::MAX"),
                wire::sign(
                    wire::key_update(
                        u32::MAX,
                        epoch,
                        seq,
                        &attacker_share(rng),
                        &commit,
                        &entries,
                    ),
                    &sk,
                ),
            ),
        ]
    }

    /// First and second transition requests for `epoch`, signed by the
    /// attacker, and with a zero signature; each with the reveal of the
    /// attacker's own transition chain, a random one and an all-zero one.
    pub fn transitions(
        epoch: Epoch,
        seq: u64,
        rng: &mut (impl RngCore + rand::CryptoRng),
    ) -> Vec<Attack> {
        let sk = attacker_signing_key(rng);
        let chain = TransitionChain::derive(&sk.to_bytes(), 1, epoch);
        let mut random = [0u8; 32];
        rng.fill_bytes(&mut random);
        let mut out = Vec::new();
        for step in [Step::FirstTransition, Step::SecondTransition] {
            for (which, reveal) in [
                ("attacker's chain", chain.reveal(step)),
                ("random", random),
                ("zero", [0u8; 32]),
            ] {
                let body = wire::transition(1, step, epoch, seq, &reveal);
                let mut zero = body.clone();
                zero.extend_from_slice(&[0u8; 64]);
                out.push(Attack::new(
                    format!("forged {step:?} request epoch {epoch} seq {seq} ({which} reveal, attacker's signature)"),
                    wire::sign(body, &sk),
                ));
                out.push(Attack::new(
                    format!("forged {step:?} request epoch {epoch} seq {seq} ({which} reveal, zero signature)"),
                    zero,
                ));
            }
        }
        out
    }

    /// Node messages to the controller claiming to be `member`, MAC'd with a
    /// made-up key: replies of every step, a key request, a join, a usage report.
    pub fn node_messages(
        member: u32,
        node_id: &NodeId,
        epoch: Epoch,
        seq: u64,
        rng: &mut (impl RngCore + rand::CryptoRng),
    ) -> Vec<Attack> {
        let k = attacker_chain(rng);
        let share = attacker_share(rng);
        let label = attacker_node_keys(rng);
        let mut out = Vec::new();
        for step in [
            Step::KeyUpdate,
            Step::FirstTransition,
            Step::SecondTransition,
        ] {
            out.push(Attack::new(
                format!("forged {step:?} reply from member {member}"),
                wire::mac(wire::ack(step, epoch, seq, member, &share), &k),
            ));
        }
        out.push(Attack::new(
            format!("forged key request from member {member}"),
            wire::mac(
                wire::key_request(epoch, Step::SecondTransition, seq, member, &share),
                &k,
            ),
        ));
        let mut init = wire::handshake_init_header(seq, node_id);
        if let Ok((_, msg)) = keyfleet_core::crypto::ratchet::Initiator::start(&label, &init, rng) {
            init.extend_from_slice(&msg);
            out.push(Attack::new(
                format!("forged handshake init as {node_id} (a guessed label)"),
                init,
            ));
        }
        out.push(Attack::new(
            format!("forged usage report from member {member}"),
            wire::mac(
                wire::usage_report(
                    epoch,
                    seq,
                    member,
                    &[keyfleet_core::crypto::KeyUse {
                        epoch,
                        seals: u64::MAX / 2,
                        opens: u64::MAX / 2,
                    }],
                ),
                &k,
            ),
        ));
        out
    }

    /// A data message sealed with `key` (a key the attacker stole), claiming `sender`.
    pub fn data_sealed_with(
        key: &GroupKey,
        sender: u32,
        seq: u64,
        plaintext: &[u8],
        rng: &mut impl RngCore,
    ) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        let mut bytes = wire::data_header(sender, seq, Some(key.epoch()), &nonce);
        let sealed = key.seal(&nonce, &bytes, plaintext);
        bytes.extend_from_slice(&sealed);
        bytes
    }

    /// A data message with a valid-looking header (`sender`, `epoch` hint) and
    /// random bytes where the ciphertext and tag go: no group key opens it.
    pub fn data_unsealed(
        sender: u32,
        seq: u64,
        epoch: Option<Epoch>,
        rng: &mut impl RngCore,
    ) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        let mut bytes = wire::data_header(sender, seq, epoch, &nonce);
        let mut junk = vec![0u8; 48];
        rng.fill_bytes(&mut junk);
        bytes.extend_from_slice(&junk);
        bytes
    }

    /// Copies of `msg` with one bit flipped, at up to `max` positions spread
    /// over the whole datagram (every byte when the datagram is short enough),
    /// each position flipping a different bit.
    pub fn bit_flips(label: &str, msg: &[u8], max: usize) -> Vec<Attack> {
        if msg.is_empty() || max == 0 {
            return Vec::new();
        }
        let stride = msg.len().div_ceil(max).max(1);
        (0..msg.len())
            .step_by(stride)
            .map(|i| {
                let mut m = msg.to_vec();
                m[i] ^= 1 << (i % 8);
                Attack::new(format!("{label}, bit {} of byte {i} flipped", i % 8), m)
            })
            .collect()
    }

    /// Every prefix of `msg` shorter than it (at up to `max` lengths, always 0, 1 and len-1).
    pub fn truncations(label: &str, msg: &[u8], max: usize) -> Vec<Attack> {
        if msg.is_empty() {
            return Vec::new();
        }
        let stride = msg.len().div_ceil(max.max(1)).max(1);
        let mut lens: Vec<usize> = (0..msg.len()).step_by(stride).collect();
        lens.extend([1, msg.len() - 1]);
        lens.sort_unstable();
        lens.dedup();
        lens.into_iter()
            .filter(|&n| n < msg.len())
            .map(|n| {
                Attack::new(
                    format!("{label}, truncated to {n} bytes"),
                    msg[..n].to_vec(),
                )
            })
            .collect()
    }

    /// `msg` with bytes appended (one byte; up to 1201, 9000 and 65 507 bytes,
    /// the largest UDP payload over IPv4), and oversized datagrams of random bytes.
    pub fn oversized(label: &str, msg: &[u8], rng: &mut impl RngCore) -> Vec<Attack> {
        let mut out = Vec::new();
        for total in [msg.len() + 1, 1201, 9000, 65_507] {
            if total <= msg.len() {
                continue;
            }
            let mut m = msg.to_vec();
            let mut tail = vec![0u8; total - msg.len()];
            rng.fill_bytes(&mut tail);
            m.extend_from_slice(&tail);
            out.push(Attack::new(format!("{label}, padded to {total} bytes"), m));
        }
        for total in [1201usize, 65_507] {
            let mut m = vec![0u8; total];
            rng.fill_bytes(&mut m);
            // Half of them with a valid version and a known type, to get past the first check.
            m[0] = wire::VERSION;
            m[1] = [kinds::KEY_UPDATE, kinds::FIRST_TRANSITION, kinds::DATA][total % 3];
            out.push(Attack::new(
                format!("{total} random bytes with a valid header"),
                m,
            ));
        }
        out
    }

    /// Short random datagrams, as a fuzzer on the LAN would send them.
    pub fn garbage(n: usize, rng: &mut impl RngCore) -> Vec<Attack> {
        (0..n)
            .map(|i| {
                let len = rng.gen_range(0..200);
                let mut m = vec![0u8; len];
                rng.fill_bytes(&mut m);
                if len > 1 && i % 2 == 0 {
                    m[0] = wire::VERSION;
                }
                Attack::new(format!("{len} random bytes"), m)
            })
            .collect()
    }

    /// Everything an unenrolled host can send, built from what it overheard:
    /// forged requests for the current and next epochs, every overheard
    /// datagram replayed as is, bit-flipped, truncated and padded, forged node
    /// messages for each member, data with no key behind it, and garbage.
    pub fn everything(
        overheard: &[Vec<u8>],
        current: Epoch,
        members: &[(u32, NodeId)],
        rng: &mut (impl RngCore + rand::CryptoRng),
    ) -> Vec<Attack> {
        let nums: Vec<u32> = members.iter().map(|m| m.0).collect();
        let mut out = Vec::new();
        for (e, seq) in [
            (current, u64::MAX / 4),
            (current.next(), 1),
            (current.next(), u64::MAX / 4),
            (Epoch(current.0 + 7), 1 << 40),
        ] {
            out.extend(key_updates(e, seq, &nums, rng));
            out.extend(transitions(e, seq, rng));
        }
        for (m, id) in members {
            out.extend(node_messages(*m, id, current.next(), 1 << 41, rng));
        }
        for (i, msg) in overheard.iter().enumerate() {
            let label = format!("overheard #{i} (type 0x{:02x})", kind(msg).unwrap_or(0));
            out.push(Attack::new(format!("{label} replayed as is"), msg.clone()));
            out.extend(bit_flips(&label, msg, 24));
            out.extend(truncations(&label, msg, 12));
            out.extend(oversized(&label, msg, rng));
        }
        for &m in &nums {
            out.push(Attack::new(
                format!("data claiming member {m}, no key behind it"),
                data_unsealed(m, 1 << 42, Some(current), rng),
            ));
        }
        out.push(Attack::new(
            "data from unknown member 4242, no key behind it",
            data_unsealed(4242, 7, Some(current), rng),
        ));
        out.push(Attack::new(
            "data from unknown member 4243, no epoch hint, no key behind it",
            data_unsealed(4243, 7, None, rng),
        ));
        out.extend(garbage(64, rng));
        out.push(Attack::new("empty datagram", Vec::new()));
        out
    }
}

/// One datagram the attacker overheard.
#[derive(Clone, Debug)]
pub struct Overheard {
    pub from: SocketAddr,
    pub bytes: Vec<u8>,
    pub at: Instant,
}

/// What a flood did.
#[derive(Clone, Copy, Debug)]
pub struct FloodReport {
    pub sent: u64,
    pub send_errors: u64,
    pub elapsed: Duration,
}

/// The attacker's sockets on the LAN: a capture thread joined to the fleet's
/// group, and a sending socket (multicast out of `iface`, looped back).
pub struct Lan {
    pub group: SocketAddrV4,
    send: UdpSocket,
    heard: Arc<Mutex<Vec<Overheard>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Lan {
    /// Joins `group` on `iface` (127.0.0.1 in tests) and starts capturing.
    pub fn join(group: SocketAddrV4, iface: Ipv4Addr) -> Lan {
        let cap =
            keyfleet::net::socket::group_socket(group, iface).expect("attacker joins the group");
        cap.set_nonblocking(false).unwrap();
        cap.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let send = keyfleet::net::socket::unicast_socket(SocketAddrV4::new(iface, 0), iface, 1)
            .expect("attacker's sending socket");
        send.set_nonblocking(false).unwrap();
        let heard: Arc<Mutex<Vec<Overheard>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (heard.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = cap.recv_from(&mut buf) {
                    h.lock().unwrap().push(Overheard {
                        from,
                        bytes: buf[..n].to_vec(),
                        at: Instant::now(),
                    });
                }
            }
        });
        Lan {
            group,
            send,
            heard,
            stop,
            thread: Some(thread),
        }
    }

    /// The attacker's own source address.
    pub fn addr(&self) -> SocketAddr {
        self.send.local_addr().unwrap()
    }

    /// Everything overheard so far.
    pub fn overheard(&self) -> Vec<Overheard> {
        self.heard.lock().unwrap().clone()
    }

    /// Forget what was overheard.
    pub fn clear(&self) {
        self.heard.lock().unwrap().clear();
    }

    /// Sends `bytes` to `to` (the group or a unicast address); errors are
    /// counted, not fatal (a 65 507-byte datagram may be refused locally).
    pub fn send(&self, to: SocketAddr, bytes: &[u8]) -> bool {
        self.send.send_to(bytes, to).is_ok()
    }

    /// Sends each attack to each target, pacing every `pace` datagrams by 1 ms
    /// so that the receivers see them (a flood is [`Lan::flood`]). Returns how
    /// many sends failed locally.
    pub fn send_all(&self, attacks: &[Attack], targets: &[SocketAddr], pace: usize) -> u64 {
        let mut failed = 0;
        let mut n = 0usize;
        for a in attacks {
            for t in targets {
                if !self.send(*t, &a.bytes) {
                    failed += 1;
                }
                n += 1;
                if pace > 0 && n % pace == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        failed
    }

    /// Sends `count` datagrams round-robin from `attacks` to `targets` as fast
    /// as the socket takes them, but never past `limit`.
    pub fn flood(
        &self,
        attacks: &[Attack],
        targets: &[SocketAddr],
        count: u64,
        limit: Duration,
    ) -> FloodReport {
        let start = Instant::now();
        let (mut sent, mut send_errors) = (0u64, 0u64);
        if attacks.is_empty() || targets.is_empty() {
            return FloodReport {
                sent,
                send_errors,
                elapsed: start.elapsed(),
            };
        }
        let mut i = 0usize;
        while sent + send_errors < count && start.elapsed() < limit {
            let a = &attacks[i % attacks.len()];
            let t = targets[(i / attacks.len()) % targets.len()];
            if self.send(t, &a.bytes) {
                sent += 1;
            } else {
                send_errors += 1;
            }
            i += 1;
        }
        FloodReport {
            sent,
            send_errors,
            elapsed: start.elapsed(),
        }
    }
}

/// Sends `count` datagrams round-robin from `attacks` to `targets`, from each
/// source address in `sources` in turn (`per_source` datagrams each, then the
/// next; round and round until `count`), each from a socket of its own bound to
/// that address (any loopback address 127.x.y.z is a source on `lo`, so a test
/// plays many hosts, or one that spoofs many addresses, without privileges).
/// Sleeps 1 ms every `pace` datagrams (0: never).
pub fn flood_from(
    sources: &[Ipv4Addr],
    iface: Ipv4Addr,
    attacks: &[Attack],
    targets: &[SocketAddr],
    count: u64,
    per_source: u64,
    pace: u64,
) -> FloodReport {
    let start = Instant::now();
    let (mut sent, mut send_errors) = (0u64, 0u64);
    if attacks.is_empty() || targets.is_empty() || sources.is_empty() {
        return FloodReport {
            sent,
            send_errors,
            elapsed: start.elapsed(),
        };
    }
    let mut i = 0usize;
    'flood: for src in sources.iter().cycle() {
        let sock = keyfleet::net::socket::unicast_socket(SocketAddrV4::new(*src, 0), iface, 1)
            .expect("a sending socket on a loopback address");
        sock.set_nonblocking(false).unwrap();
        for _ in 0..per_source.max(1) {
            if sent + send_errors >= count {
                break 'flood;
            }
            let a = &attacks[i % attacks.len()];
            let t = targets[(i / attacks.len()) % targets.len()];
            if sock.send_to(&a.bytes, t).is_ok() {
                sent += 1;
            } else {
                send_errors += 1;
            }
            i += 1;
            if pace > 0 && (sent + send_errors) % pace == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    FloodReport {
        sent,
        send_errors,
        elapsed: start.elapsed(),
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Real processes: `keyfleet serve` and `keyfleet-agent run` on loopback
/// multicast, each test with its own group, port and state directories: the
/// real-process fleet of [`crate::support::fleet`], started whole, with what
/// the attacker's tests read of it (statuses, keys, logs, every command's
/// output).
pub mod procs {
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};
    use std::time::{Duration, Instant};

    use serde_json::Value;

    use crate::support::{fleet, Proc, AGENT};

    /// One running `keyfleet-agent` (node `i` of the fleet).
    pub struct Agent {
        pub id: String,
        pub state: PathBuf,
        pub listen: std::net::SocketAddrV4,
        pub key: [u8; 16],
        pub proc: Proc,
    }

    /// What an agent's status shows of its keys: state, epoch and check values.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct KeyView {
        /// The running agent answered and is synced with the controller.
        pub live_and_synced: bool,
        pub state: String,
        pub epoch: Option<u64>,
        pub checks: Vec<(u64, String)>,
    }

    impl KeyView {
        pub fn of(status: &Value) -> KeyView {
            KeyView {
                live_and_synced: status["source"] == "running_agent"
                    && status["running"]["synced"] == true,
                state: status["state"].as_str().unwrap_or_default().to_owned(),
                epoch: status["epoch"].as_u64(),
                checks: status["keys"]
                    .as_array()
                    .map(|ks| {
                        ks.iter()
                            .map(|k| {
                                (
                                    k["epoch"].as_u64().unwrap_or_default(),
                                    k["check"].as_str().unwrap_or_default().to_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        }
    }

    /// The fleet of [`fleet::Fleet`] running: its controller (`keyfleet
    /// serve`) and `n` agents, every one enrolled and synced at epoch 1.
    /// Its configuration, nodes and commands are the inner fleet's (`Deref`).
    pub struct Fleet {
        pub fleet: fleet::Fleet,
        pub serve: Option<Proc>,
        pub agents: Vec<Agent>,
        /// stdout and stderr of every `keyfleet` command run, in order.
        pub transcript: std::sync::Mutex<Vec<String>>,
    }

    impl std::ops::Deref for Fleet {
        type Target = fleet::Fleet;
        fn deref(&self) -> &fleet::Fleet {
            &self.fleet
        }
    }

    /// Datagrams the kernel dropped on the UDP sockets process `pid` holds
    /// (its receive queues were full): the `drops` column of /proc/net/udp for
    /// the socket inodes among /proc/PID/fd.
    pub fn udp_drops(pid: u32) -> u64 {
        let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .filter_map(|l| {
                        let l = l.to_string_lossy().into_owned();
                        l.strip_prefix("socket:[")
                            .and_then(|r| r.strip_suffix(']'))
                            .map(str::to_owned)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let table = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
        table
            .lines()
            .skip(1)
            .filter_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                let inode = cols.get(9)?;
                if inodes.iter().any(|i| i == inode) {
                    cols.last()?.parse::<u64>().ok()
                } else {
                    None
                }
            })
            .sum()
    }

    /// A log file's text without the terminal colour codes tracing may put in.
    pub fn plain(text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    /// Round settings that keep a test's rounds short.
    pub const FAST: &str = "[round]\ndrain_grace_ms = 300\nretry_initial_ms = 100\nretry_max_ms = 800\nstale_after_ms = 15000\n[rekey]\njoin_wait_ms = 8000\nlinger_ms = 300\n";

    impl Fleet {
        pub fn start(n: usize, rust_log: &str) -> Fleet {
            Fleet::start_with(n, rust_log, "", &[])
        }

        /// As [`Fleet::start`], with `config` appended to the controller's
        /// configuration file and `agent_args` added to every `keyfleet-agent run`.
        /// Every process logs at `rust_log`; the agents send no usage reports.
        pub fn start_with(n: usize, rust_log: &str, config: &str, agent_args: &[&str]) -> Fleet {
            let mut inner = fleet::Fleet::new(n, &format!("{FAST}{config}"));
            inner.rust_log = Some(rust_log.to_owned());
            inner.usage_interval = 0;
            for node in &mut inner.nodes {
                node.args = agent_args.iter().map(|a| a.to_string()).collect();
            }
            let mut f = Fleet {
                fleet: inner,
                serve: None,
                agents: Vec::new(),
                transcript: Default::default(),
            };
            f.json(&["init", "--json"]);
            for i in 0..n {
                let node = &f.fleet.nodes[i];
                let (id, listen, form) =
                    (node.id.clone(), node.listen.to_string(), node.form.clone());
                f.json(&[
                    "enroll",
                    "--node-id",
                    &id,
                    "--addr",
                    &listen,
                    "--key",
                    &form,
                    "--json",
                ]);
            }
            f.start_serve();
            for i in 0..n {
                let proc = f.fleet.agent(i);
                let node = &f.fleet.nodes[i];
                f.agents.push(Agent {
                    id: node.id.clone(),
                    state: node.state.clone(),
                    listen: node.listen,
                    key: node.key,
                    proc,
                });
            }
            f.wait_all(1, 20_000);
            f
        }

        pub fn ctl_addr(&self) -> SocketAddr {
            SocketAddr::from((self.ctl_ip, self.ctl_port))
        }

        /// `keyfleet ARGS` of this fleet's controller, not started.
        pub fn cmd(&self, args: &[&str]) -> Command {
            self.fleet.keyfleet(args)
        }

        /// Runs `keyfleet ARGS` to its end, its output kept in the transcript;
        /// panics with its stderr if it fails.
        pub fn run(&self, args: &[&str]) -> Output {
            let out = self.cmd(args).output().unwrap();
            self.transcript.lock().unwrap().push(format!(
                // The command's name only: its arguments may hold a key form.
                "$ keyfleet {}\n{}{}",
                args.first().copied().unwrap_or_default(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
            assert!(
                out.status.success(),
                "keyfleet {args:?} failed: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            out
        }

        pub fn json(&self, args: &[&str]) -> Value {
            let out = self.run(args);
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "keyfleet {args:?} printed no JSON ({e}): {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            })
        }

        /// `keyfleet serve`, once its control socket answers (its log is
        /// appended to: a restarted serve keeps the earlier lines).
        pub fn start_serve(&mut self) {
            self.serve = Some(self.fleet.serve());
        }

        /// Kills agent `i` and starts it again on its state directory.
        pub fn restart_agent(&mut self, i: usize) {
            self.agents[i].proc.kill9();
            self.agents[i].proc = self.fleet.agent(i);
        }

        /// `keyfleet-agent status --json` of every agent (`Value::Null` if it failed).
        pub fn statuses(&self) -> Vec<Value> {
            self.agents.iter().map(|a| status(&a.state)).collect()
        }

        pub fn views(&self) -> Vec<KeyView> {
            self.statuses().iter().map(KeyView::of).collect()
        }

        /// Waits until every agent is synced in UpdateCompleted at `epoch`.
        pub fn wait_all(&self, epoch: u64, ms: u64) {
            let mut last = Vec::new();
            let end = Instant::now() + Duration::from_millis(ms);
            while Instant::now() < end {
                last = self.statuses();
                if last.iter().all(|s| {
                    s["source"] == "running_agent"
                        && s["state"] == "UpdateCompleted"
                        && s["epoch"] == epoch
                        && s["running"]["synced"] == true
                }) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            panic!(
                "agents not all synced at epoch {epoch}: {last:#?}\nserve log:\n{}",
                self.serve
                    .as_ref()
                    .map(|p| p.log_text())
                    .unwrap_or_default()
            );
        }

        /// Panics if any process died.
        pub fn assert_alive(&mut self) {
            if let Some(s) = self.serve.as_mut() {
                assert!(
                    s.exited().is_none(),
                    "keyfleet serve died:\n{}",
                    s.log_text()
                );
            }
            for a in &mut self.agents {
                assert!(
                    a.proc.exited().is_none(),
                    "agent {} died:\n{}",
                    a.id,
                    a.proc.log_text()
                );
            }
        }

        /// Every log file of the fleet's processes.
        pub fn logs(&self) -> Vec<(PathBuf, String)> {
            std::fs::read_dir(self.dir.path().join("logs"))
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .map(|p| {
                    let t = std::fs::read_to_string(&p).unwrap_or_default();
                    (p, t)
                })
                .collect()
        }

        pub fn unicast_targets(&self) -> Vec<SocketAddr> {
            let mut t: Vec<SocketAddr> = self
                .agents
                .iter()
                .map(|a| SocketAddr::V4(a.listen))
                .collect();
            t.push(self.ctl_addr());
            t
        }
    }

    /// `keyfleet-agent status --json --state DIR`, parsed (`Null` when it failed).
    pub fn status(state: &Path) -> Value {
        let out = Command::new(AGENT)
            .args(["status", "--json", "--state"])
            .arg(state)
            .output()
            .unwrap();
        if !out.status.success() {
            return Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }
}
