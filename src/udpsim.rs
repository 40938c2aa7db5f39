//! The fleet scenario over real UDP sockets: [`UdpNet`] implements the
//! simulator's [`SimNet`] with kernel sockets on one host, and [`run`] drives
//! the same `scenario` as the virtual network through it
//! (`keyfleet sim --transport udp`).
//!
//! # The network
//!
//! One controller and `agents` nodes live in this process; each has the two
//! sockets of a real agent, made by [`crate::net::socket`]: a **unicast socket**
//! on `iface:0` that sends everything (group included, so every datagram's source
//! is its sender's unicast address) and receives unicast, and a **group socket**
//! bound to the group with `SO_REUSEADDR`/`SO_REUSEPORT` and joined to it on
//! `iface` (127.0.0.1 by default). A group send is one `sendto` to the group; the
//! kernel delivers a copy to every member socket. One tokio runtime with a few
//! worker threads reads all sockets (a task per socket) into one queue; the
//! scenario runs on the calling thread and takes datagrams from that queue in
//! arrival order, with the loss of [`crate::net::Loss`] drawn on receive (one
//! seeded stream per receiver).
//!
//! # Time
//!
//! The scenario's clock is real here: `Time(ms)` is milliseconds since the
//! sockets were ready. [`SimNet::next_arrival`] blocks until a datagram comes
//! or the wall clock reaches `until`, so timers fire in real time and
//! `virtual_ms_per_round` in the report is real milliseconds per round.
//!
//! # What differs from the virtual network
//!
//! - Every datagram carries a 9-byte simulator prefix: a run id (datagrams of
//!   another run on the same group are ignored), the traffic kind and the
//!   scenario's tag (whether the sender was live when it sealed, for the
//!   `data_undecryptable` count). The machines get the bytes after it.
//! - Data messages go to `data_sample` seeded receivers plus the controller,
//!   as in the virtual network; when the sample is every other node the message
//!   is sent once to the group, otherwise as unicast copies (sending every data
//!   message to every node would make a run cost N² decryptions).
//! - The kernel neither duplicates nor reorders on loopback: `network_duplicates`
//!   is 0, and delays are what the machine and the scheduler give. The drain grace
//!   of the controller is `max_delay_ms` (+20 ms), which must cover the time a
//!   datagram can wait in the queue while the scenario thread is busy;
//!   [`UdpExtras::max_queue_wait_ms`] reports the largest wait seen.
//! - Runs are not byte-for-byte reproducible: the order in which sockets are read
//!   depends on the scheduler. The seeds still fix the keys, the fault plan, the
//!   data samples and each receiver's loss stream.

use crate::net::{socket, Loss, NetError};
use keyfleet_core::protocol::Time;
use keyfleet_core::sim::net::{Arrival, NetStats, Peer, SimNet, Traffic};
use keyfleet_core::sim::{SimConfig, SimReport};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use socket2::{SockAddr, SockRef};
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// Bytes of the simulator prefix: run id (4), kind (1), tag (4).
const PREFIX: usize = 9;
/// Receive buffer per socket task: the largest wire datagram plus the prefix,
/// with room to tell an oversized datagram (it fills the buffer) from a fit.
const RECV_BUF: usize = 2048;
const KIND_CONTROL: u8 = 1;
const KIND_DATA: u8 = 2;
/// File descriptors kept free for everything else in the process.
const FD_SPARE: u64 = 64;

/// Settings of the UDP network (the scenario's settings are a [`SimConfig`]).
#[derive(Clone, Debug)]
pub struct UdpConfig {
    /// The group every socket joins.
    pub group: SocketAddrV4,
    /// The interface address all sockets bind to and join on.
    pub iface: Ipv4Addr,
    /// The longest a datagram is assumed to be in flight (kernel plus queue),
    /// which sets the controller's drain grace and the S2 check.
    pub max_delay_ms: u64,
    /// Worker threads of the tokio runtime that reads the sockets.
    pub worker_threads: usize,
}

impl UdpConfig {
    /// Loopback, group 239.255.77.78 on a port that is free on this host now,
    /// 250 ms in flight at most, two reader threads.
    pub fn loopback() -> UdpConfig {
        let port = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .unwrap_or(47_877);
        UdpConfig {
            group: SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, 78), port),
            iface: Ipv4Addr::LOCALHOST,
            max_delay_ms: 250,
            worker_threads: 2,
        }
    }
}

/// What can stop a UDP run before it starts.
#[derive(Debug, thiserror::Error)]
pub enum UdpSimError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(
        "{agents} agents need {needed} file descriptors (2 sockets each) but this process may open only {limit}; \
         raise the limit (ulimit -n {needed}) or run fewer agents"
    )]
    FdLimit {
        agents: u32,
        needed: u64,
        limit: u64,
    },
    #[error("cannot start the tokio runtime that reads the sockets: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot register a socket with tokio ({addr}): {source}")]
    Register {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Counters only the UDP network has (beside the [`SimReport`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UdpExtras {
    /// Sockets opened (two per node and two for the controller).
    pub sockets: u64,
    /// Datagrams read from the kernel.
    pub received: u64,
    /// Of those, dropped by the injected loss.
    pub injected_losses: u64,
    /// Datagrams that were not this run's (another run on the group, or oversized).
    pub foreign: u64,
    /// Sends the kernel refused after retrying for a while (the datagram is lost).
    pub send_errors: u64,
    /// Sends that found the socket buffer full and were retried.
    pub send_retries: u64,
    /// Longest time a datagram waited between the socket and the scenario.
    pub max_queue_wait_ms: u64,
    /// Host-wide UDP receive-buffer overflows during the run (`/proc/net/snmp`
    /// `RcvbufErrors`; other programs' sockets count too).
    pub kernel_rcvbuf_errors: u64,
}

/// The report of a UDP run: the simulator's report and the network's extras.
#[derive(Clone, Debug, Serialize)]
pub struct UdpReport {
    #[serde(flatten)]
    pub sim: SimReport,
    pub transport: &'static str,
    /// Real milliseconds per round (the same numbers as `virtual_ms_per_round`).
    pub real_ms_per_round: keyfleet_core::sim::Spread,
    /// Completed rounds per second of real time from the first rekey to the end
    /// (500 ms gaps between rounds included).
    pub rounds_per_s: f64,
    /// Peak resident memory of the process (`VmHWM`), bytes.
    pub peak_rss_bytes: u64,
    /// Peak resident memory above what the process held before the sockets
    /// were opened, per agent (machines, sockets, tasks and queues), bytes.
    pub rss_bytes_per_agent: u64,
    #[serde(flatten)]
    pub udp: UdpExtras,
}

/// A datagram read by a socket task.
struct Received {
    at: Instant,
    /// Receiver index: 0 the controller, `i + 1` node `i`.
    to: u32,
    from: SocketAddr,
    kind: u8,
    tag: u32,
    bytes: Vec<u8>,
}

/// The simulator's [`SimNet`] over kernel UDP sockets.
pub struct UdpNet {
    // Field order matters on drop: the runtime (and its socket tasks) goes first.
    rt: tokio::runtime::Runtime,
    rx: mpsc::UnboundedReceiver<Received>,
    peeked: Option<Received>,
    start: Instant,
    run_id: u32,
    group: SocketAddr,
    /// Unicast socket (the sender) per receiver index.
    unicast: Vec<Arc<UdpSocket>>,
    addrs: Vec<SocketAddr>,
    by_addr: HashMap<SocketAddr, u32>,
    online: Vec<bool>,
    loss: Vec<Loss>,
    rng: ChaCha8Rng,
    nodes: u32,
    data_sample: u32,
    max_delay_ms: u64,
    frame: Vec<u8>,
    stats: NetStats,
    extras: Rc<RefCell<UdpExtras>>,
    #[cfg_attr(not(test), allow(dead_code))]
    foreign: Arc<std::sync::atomic::AtomicU64>,
}

fn index(p: Peer) -> u32 {
    match p {
        Peer::Controller => 0,
        Peer::Node(i) => i.saturating_add(1),
    }
}

fn peer(i: u32) -> Peer {
    match i {
        0 => Peer::Controller,
        n => Peer::Node(n - 1),
    }
}

/// Raises the soft limit of open files towards the hard one when `needed` is
/// more than the soft limit allows.
pub fn ensure_fd_limit(agents: u32) -> Result<(), UdpSimError> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let needed = (u64::from(agents) + 1) * 2 + FD_SPARE;
    let lim = getrlimit(Resource::Nofile);
    let current = lim.current.unwrap_or(u64::MAX);
    if current >= needed {
        return Ok(());
    }
    let hard = lim.maximum.unwrap_or(u64::MAX);
    let want = needed.min(hard);
    let raised = setrlimit(
        Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(want),
            maximum: lim.maximum,
        },
    );
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    if raised.is_ok() && now >= needed {
        tracing::debug!(from = current, to = now, "raised the open-file limit");
        return Ok(());
    }
    Err(UdpSimError::FdLimit {
        agents,
        needed,
        limit: now,
    })
}

/// `VmHWM` and `VmRSS` of this process, bytes.
fn memory() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kb("VmHWM:"), kb("VmRSS:"))
}

async fn read_socket(
    sock: Arc<UdpSocket>,
    to: u32,
    run_id: u32,
    tx: mpsc::UnboundedSender<Received>,
    extras_foreign: Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering;
    let mut buf = vec![0u8; RECV_BUF];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors about earlier sends surface here; nothing to read.
                tracing::debug!(error = %e, "receive error ignored");
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let at = Instant::now();
        let Some(got) = buf.get(..n) else { continue };
        let parsed = (n < RECV_BUF)
            .then(|| {
                let id = u32::from_be_bytes(got.get(0..4)?.try_into().ok()?);
                let kind = *got.get(4)?;
                let tag = u32::from_be_bytes(got.get(5..9)?.try_into().ok()?);
                (id == run_id).then_some((kind, tag))
            })
            .flatten();
        let Some((kind, tag)) = parsed else {
            extras_foreign.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let bytes = got.get(PREFIX..).unwrap_or_default().to_vec();
        let r = Received {
            at,
            to,
            from,
            kind,
            tag,
            bytes,
        };
        if tx.send(r).is_err() {
            return;
        }
    }
}

impl UdpNet {
    /// Opens the sockets of one controller and `cfg.agents` nodes and starts
    /// reading them.
    pub fn bind(cfg: &SimConfig, udp: &UdpConfig) -> Result<(UdpNet, UdpHandle), UdpSimError> {
        ensure_fd_limit(cfg.agents)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(udp.worker_threads.max(1))
            .thread_name("keyfleet-sim-udp")
            .enable_all()
            .build()
            .map_err(UdpSimError::Runtime)?;
        let run_id: u32 = rand::random();
        let (tx, rx) = mpsc::unbounded_channel();
        let foreign = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let receivers = cfg.agents + 1;
        let mut unicast = Vec::with_capacity(receivers as usize);
        let mut addrs = Vec::with_capacity(receivers as usize);
        let mut by_addr = HashMap::with_capacity(receivers as usize);
        let mut loss = Vec::with_capacity(receivers as usize);
        {
            let _guard = rt.enter();
            let register = |s: std::net::UdpSocket| {
                let addr = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
                UdpSocket::from_std(s)
                    .map(Arc::new)
                    .map_err(|source| UdpSimError::Register { addr, source })
            };
            for i in 0..receivers {
                let u = socket::unicast_socket(
                    SocketAddrV4::new(udp.iface, 0),
                    udp.iface,
                    crate::net::DEFAULT_TTL,
                )?;
                let g = socket::group_socket(udp.group, udp.iface)?;
                let u = register(u)?;
                let g = register(g)?;
                let addr = u.local_addr().map_err(|source| UdpSimError::Register {
                    addr: udp.iface.to_string(),
                    source,
                })?;
                for s in [u.clone(), g] {
                    rt.spawn(read_socket(s, i, run_id, tx.clone(), foreign.clone()));
                }
                unicast.push(u);
                by_addr.insert(addr, i);
                addrs.push(addr);
                loss.push(Loss::for_stream(cfg.loss, cfg.seed, u64::from(i))?);
            }
        }
        let extras = Rc::new(RefCell::new(UdpExtras {
            sockets: u64::from(receivers) * 2,
            ..UdpExtras::default()
        }));
        let net = UdpNet {
            rt,
            rx,
            peeked: None,
            start: Instant::now(),
            run_id,
            group: SocketAddr::V4(udp.group),
            unicast,
            addrs,
            by_addr,
            online: vec![true; receivers as usize],
            loss,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x7564_705f_6e65_7400),
            nodes: cfg.agents,
            data_sample: cfg.data_sample,
            max_delay_ms: udp.max_delay_ms,
            frame: Vec::with_capacity(RECV_BUF),
            stats: NetStats::default(),
            extras: extras.clone(),
            foreign: foreign.clone(),
        };
        Ok((net, UdpHandle { extras, foreign }))
    }

    fn time_of(&self, at: Instant) -> Time {
        Time(at.saturating_duration_since(self.start).as_millis() as u64)
    }

    fn instant_of(&self, t: Time) -> Instant {
        self.start + Duration::from_millis(t.0)
    }

    fn is_online(&self, p: Peer) -> bool {
        self.online.get(index(p) as usize).copied().unwrap_or(false)
    }

    /// Sends one framed datagram from `from`'s unicast socket. A full socket
    /// buffer is retried for up to 20 ms; anything else loses the datagram
    /// (the protocol's retries cover it), counted in `send_errors`.
    fn send_raw(&mut self, from: Peer, to: SocketAddr, kind: u8, tag: u32, bytes: &[u8]) {
        self.frame.clear();
        self.frame.extend_from_slice(&self.run_id.to_be_bytes());
        self.frame.push(kind);
        self.frame.extend_from_slice(&tag.to_be_bytes());
        self.frame.extend_from_slice(bytes);
        let Some(sock) = self.unicast.get(index(from) as usize) else {
            return;
        };
        let to = SockAddr::from(to);
        let mut tries = 0;
        loop {
            // The socket is registered with tokio for reading only; sending
            // straight through the descriptor needs no readiness from the runtime.
            match SockRef::from(&**sock).send_to(&self.frame, &to) {
                Ok(_) => return,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && tries < 100 => {
                    tries += 1;
                    self.extras.borrow_mut().send_retries += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "send failed");
                    self.extras.borrow_mut().send_errors += 1;
                    return;
                }
            }
        }
    }

    /// The next item from the sockets, waiting until `deadline` at most.
    fn take(&mut self, deadline: Instant) -> Option<Received> {
        if let Some(r) = self.peeked.take() {
            return Some(r);
        }
        match self.rx.try_recv() {
            Ok(r) => return Some(r),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        if deadline <= Instant::now() {
            return None;
        }
        let rx = &mut self.rx;
        self.rt
            .block_on(async { tokio::time::timeout_at(deadline.into(), rx.recv()).await })
            .ok()
            .flatten()
    }
}

/// Read access to a [`UdpNet`]'s counters after [`keyfleet_core::sim::run_on`] consumed it.
pub struct UdpHandle {
    extras: Rc<RefCell<UdpExtras>>,
    foreign: Arc<std::sync::atomic::AtomicU64>,
}

impl UdpHandle {
    pub fn extras(&self) -> UdpExtras {
        let mut e = *self.extras.borrow();
        e.foreign += self.foreign.load(std::sync::atomic::Ordering::Relaxed);
        e
    }
}

impl SimNet for UdpNet {
    fn send_group(&mut self, _now: Time, from: Peer, bytes: Vec<u8>, traffic: Traffic, tag: u32) {
        self.stats.sent += 1;
        if !self.is_online(from) {
            self.stats.dropped += 1;
            return;
        }
        match traffic {
            Traffic::Control => self.send_raw(from, self.group, KIND_CONTROL, tag, &bytes),
            Traffic::Data => {
                let n = self.nodes;
                let me = match from {
                    Peer::Node(i) => Some(i),
                    Peer::Controller => None,
                };
                let others = n - u32::from(me.is_some());
                let k = self.data_sample.min(others);
                self.stats.data_copies += u64::from(k);
                if k == others {
                    self.send_raw(from, self.group, KIND_DATA, tag, &bytes);
                    return;
                }
                let mut picked: Vec<u32> = Vec::with_capacity(k as usize);
                while picked.len() < k as usize {
                    let i = self.rng.gen_range(0..n);
                    if Some(i) != me && !picked.contains(&i) {
                        picked.push(i);
                    }
                }
                for i in picked {
                    if let Some(to) = self.addrs.get(index(Peer::Node(i)) as usize).copied() {
                        self.send_raw(from, to, KIND_DATA, tag, &bytes);
                    }
                }
                // The controller listens to the group too (unknown-sender trigger).
                if let Some(to) = self.addrs.first().copied() {
                    self.send_raw(from, to, KIND_DATA, tag, &bytes);
                }
            }
        }
    }

    fn send_to(&mut self, _now: Time, from: Peer, to: Peer, bytes: Vec<u8>) {
        self.stats.sent += 1;
        if !self.is_online(from) {
            self.stats.dropped += 1;
            return;
        }
        if let Some(addr) = self.addrs.get(index(to) as usize).copied() {
            self.send_raw(from, addr, KIND_CONTROL, 0, &bytes);
        }
    }

    fn next_arrival(&mut self, until: Time, to: &mut Vec<Peer>) -> Option<Arrival> {
        // With nothing left to wait for (`until` = never), stop once the
        // network has been quiet for the longest flight.
        let deadline = if until == Time::MAX {
            Instant::now() + Duration::from_millis(self.max_delay_ms)
        } else {
            self.instant_of(until)
        };
        loop {
            let r = self.take(deadline)?;
            let at = self.time_of(r.at);
            if at > until {
                self.peeked = Some(r);
                return None;
            }
            let wait = r.at.elapsed().as_millis() as u64;
            {
                let mut x = self.extras.borrow_mut();
                x.received += 1;
                x.max_queue_wait_ms = x.max_queue_wait_ms.max(wait);
            }
            let Some(&sender) = self.by_addr.get(&r.from) else {
                self.extras.borrow_mut().foreign += 1;
                continue;
            };
            if sender == r.to {
                continue; // our own group datagram, looped back
            }
            let receiver = peer(r.to);
            let traffic = if r.kind == KIND_DATA {
                Traffic::Data
            } else {
                Traffic::Control
            };
            // A data copy to a node is one of the sampled copies.
            let sampled = traffic == Traffic::Data && matches!(receiver, Peer::Node(_));
            let lost = self
                .loss
                .get_mut(r.to as usize)
                .is_some_and(Loss::drop_next);
            if lost {
                self.extras.borrow_mut().injected_losses += 1;
            }
            if lost || !self.is_online(receiver) {
                self.stats.dropped += 1;
                if sampled {
                    self.stats.data_dropped += 1;
                }
                continue;
            }
            self.stats.delivered += 1;
            to.clear();
            to.push(receiver);
            return Some(Arrival {
                at,
                from: peer(sender),
                bytes: r.bytes.into(),
                traffic,
                tag: r.tag,
            });
        }
    }

    fn set_online(&mut self, peer: Peer, online: bool) {
        if let Some(o) = self.online.get_mut(index(peer) as usize) {
            *o = online;
        }
    }

    fn max_delay_ms(&self) -> u64 {
        self.max_delay_ms
    }

    fn stats(&self) -> NetStats {
        self.stats
    }
}

/// Runs the scenario of `cfg` over UDP sockets as `udp` says.
pub fn run(cfg: &SimConfig, udp: &UdpConfig) -> Result<UdpReport, UdpSimError> {
    let (_, rss_before) = memory();
    let rcvbuf_before = socket::udp_rcvbuf_errors().unwrap_or(0);
    let (net, handle) = UdpNet::bind(cfg, udp)?;
    let mut cfg = cfg.clone();
    if cfg.max_virtual_ms == 0 {
        cfg.max_virtual_ms = cfg.deadline();
    }
    let agents = cfg.agents;
    let sim = keyfleet_core::sim::run_on(cfg, net);
    let (peak, _) = memory();
    let mut udp_extras = handle.extras();
    udp_extras.kernel_rcvbuf_errors = socket::udp_rcvbuf_errors()
        .unwrap_or(0)
        .saturating_sub(rcvbuf_before);
    let busy_ms = sim.virtual_ms_total.saturating_sub(sim.joined_by_ms);
    let rounds_per_s = if busy_ms > 0 {
        f64::from(sim.rounds_completed) * 1000.0 / busy_ms as f64
    } else {
        0.0
    };
    Ok(UdpReport {
        real_ms_per_round: sim.virtual_ms_per_round,
        rounds_per_s,
        peak_rss_bytes: peak,
        rss_bytes_per_agent: peak.saturating_sub(rss_before) / u64::from(agents.max(1)),
        transport: "udp",
        udp: udp_extras,
        sim,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(agents: u32, loss: f64) -> UdpNet {
        let mut cfg = SimConfig::new(agents, loss, 7, 1);
        cfg.data_sample = 2;
        UdpNet::bind(&cfg, &UdpConfig::loopback()).unwrap().0
    }

    fn drain(n: &mut UdpNet, for_ms: u64) -> Vec<(Peer, Peer, Vec<u8>, Traffic)> {
        let until = n.time_of(Instant::now()).plus(for_ms);
        let mut to = Vec::new();
        let mut got = Vec::new();
        while let Some(a) = n.next_arrival(until, &mut to) {
            for p in &to {
                got.push((a.from, *p, a.bytes.to_vec(), a.traffic));
            }
        }
        got
    }

    #[test]
    fn a_group_send_reaches_every_other_socket_once_and_unicast_one() {
        let mut n = net(20, 0.0);
        n.send_group(Time(0), Peer::Node(3), vec![1, 2, 3], Traffic::Control, 0);
        n.send_to(Time(0), Peer::Controller, Peer::Node(5), vec![9]);
        let got = drain(&mut n, 300);
        let group: Vec<_> = got.iter().filter(|g| g.2 == [1, 2, 3]).collect();
        // The 19 other nodes and the controller, not the sender.
        assert_eq!(group.len(), 20, "{group:?}");
        assert!(group
            .iter()
            .all(|g| g.0 == Peer::Node(3) && g.1 != Peer::Node(3)));
        let uni: Vec<_> = got.iter().filter(|g| g.2 == [9]).collect();
        assert_eq!(uni.len(), 1);
        assert_eq!((uni[0].0, uni[0].1), (Peer::Controller, Peer::Node(5)));
    }

    #[test]
    fn data_goes_to_the_sample_and_the_controller() {
        let mut n = net(20, 0.0);
        n.send_group(Time(0), Peer::Node(7), vec![4; 40], Traffic::Data, 1);
        let got = drain(&mut n, 300);
        let receivers: Vec<Peer> = got.iter().map(|g| g.1).collect();
        assert_eq!(got.len(), 3, "2 sampled nodes + controller: {receivers:?}");
        assert!(receivers.contains(&Peer::Controller));
        assert!(!receivers.contains(&Peer::Node(7)));
        assert!(got.iter().all(|g| g.3 == Traffic::Data));
        assert_eq!(n.stats().data_copies, 2);
    }

    #[test]
    fn loss_on_receive_is_near_the_setting_and_offline_nodes_get_nothing() {
        let mut n = net(30, 0.2);
        n.set_online(Peer::Node(4), false);
        for i in 0..100u8 {
            n.send_group(Time(0), Peer::Controller, vec![i], Traffic::Control, 0);
        }
        let got = drain(&mut n, 500);
        assert!(got.iter().all(|g| g.1 != Peer::Node(4)));
        let x = n.extras.borrow();
        // Every group socket got every datagram, the controller's own (looped back) included.
        assert_eq!(x.received, 100 * 31);
        let rate = x.injected_losses as f64 / (100.0 * 30.0);
        assert!((0.17..0.23).contains(&rate), "lost {rate}");
        assert_eq!(got.len() as u64, n.stats().delivered);
    }

    #[test]
    fn another_runs_datagrams_are_ignored() {
        let mut a = net(3, 0.0);
        let mut b = net(3, 0.0);
        // Same group for both: point b at a's group and send from b.
        b.group = a.group;
        b.send_group(Time(0), Peer::Controller, vec![1], Traffic::Control, 0);
        assert!(drain(&mut a, 200).is_empty());
        // Every socket of a (3 nodes and the controller) heard it and set it aside.
        assert_eq!(a.foreign.load(std::sync::atomic::Ordering::Relaxed), 4);
    }
}
