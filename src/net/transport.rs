//! Sending and receiving datagrams: the group and one unicast socket.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::net::UdpSocket;

use super::socket::{self, local};
use super::{Clock, NetConfig, NetError};

/// Largest UDP payload; nothing arriving is ever truncated.
const MAX_DATAGRAM: usize = 65_536;

/// One datagram from `sock` into `buf`: its length, source, and how long it
/// waited in the socket (µs, by its SO_TIMESTAMPNS receive timestamp, when
/// the kernel gave one; see [`socket::group_socket`]). Cancel-safe.
async fn recv_timed(
    sock: &UdpSocket,
    buf: &mut [u8],
    cmsg: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, Option<u32>)> {
    use std::os::fd::AsFd;
    sock.async_io(tokio::io::Interest::READABLE, || {
        recv_timed_now(sock.as_fd(), buf, cmsg)
    })
    .await
}

/// [`recv_timed`] on a non-blocking socket, now: `WouldBlock` when it holds
/// nothing.
fn recv_timed_now(
    sock: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
    cmsg: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, Option<u32>)> {
    use nix::sys::socket::{recvmsg, MsgFlags, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(sock.as_raw_fd(), &mut iov, Some(cmsg), MsgFlags::empty())
        .map_err(std::io::Error::from)?;
    let from = source(msg.address.as_ref())?;
    let waited_us = waited(
        msg.cmsgs().into_iter().flatten(),
        std::time::SystemTime::now(),
    );
    Ok((msg.bytes, from, waited_us))
}

/// A received datagram's source address.
fn source(a: Option<&nix::sys::socket::SockaddrStorage>) -> std::io::Result<SocketAddr> {
    a.and_then(|a| {
        a.as_sockaddr_in()
            .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
            .or_else(|| {
                a.as_sockaddr_in6()
                    .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
            })
    })
    .ok_or_else(|| std::io::Error::other("a datagram without a source address"))
}

/// How long a datagram waited in its socket until `now`, in µs, by the
/// receive timestamp among its control messages.
fn waited(
    cmsgs: impl Iterator<Item = nix::sys::socket::ControlMessageOwned>,
    now: std::time::SystemTime,
) -> Option<u32> {
    let mut waited_us = None;
    for c in cmsgs {
        if let nix::sys::socket::ControlMessageOwned::ScmTimestampns(ts) = c {
            let arrived = std::time::UNIX_EPOCH
                + Duration::new(ts.tv_sec().max(0) as u64, ts.tv_nsec().max(0) as u32);
            // The receive timestamp is wall-clock time: a clock stepped
            // back reads as no wait, which errs long.
            waited_us = Some(
                now.duration_since(arrived)
                    .map_or(0, |d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX)),
            );
        }
    }
    waited_us
}

/// What one [`recv_many`] call read.
#[derive(Debug, Clone, Copy, Default)]
struct ReadMany {
    /// Datagrams read (handed on, or dropped as below).
    read: usize,
    /// Of those, longer than a slot: dropped.
    truncated: usize,
}

/// When a datagram that waited `waited_us` in its socket (read before
/// `read_us`, a reading of `clock` taken after the wall-clock reading the
/// wait is measured to) arrived, on `clock`'s µs scale; it errs late.
fn arrival(waited_us: Option<u32>, read_us: u64) -> Option<u64> {
    waited_us.map(|w| read_us.saturating_sub(u64::from(w)))
}

/// Group datagrams read from `sock` (non-blocking) with one `recvmmsg`
/// call into `slots` (one datagram each), queued with their source, their
/// wait ([`waited`]), arrival and read time by `clock`; `WouldBlock` when it
/// held none. A datagram longer than its slot is dropped (counted in
/// `truncated`).
fn recv_many(
    sock: std::os::fd::BorrowedFd<'_>,
    slots: &mut [Vec<u8>],
    queue: &mut std::collections::VecDeque<Datagram>,
    clock: &Clock,
) -> std::io::Result<ReadMany> {
    use nix::sys::socket::{MsgFlags, SockaddrStorage};
    // One reading of the clocks for the call, after it (it took them all
    // at once), at its first message.
    let mut clocks = None;
    let mut truncated = 0;
    let read = socket::recv_batch::<SockaddrStorage>(
        sock,
        slots,
        Some(nix::cmsg_space!(nix::sys::time::TimeSpec)),
        |msg| {
            let (now, read_us) =
                *clocks.get_or_insert_with(|| (std::time::SystemTime::now(), clock.now_us()));
            if msg.flags.contains(MsgFlags::MSG_TRUNC) {
                truncated += 1;
                return;
            }
            let bytes = msg.iovs().next().unwrap_or_default();
            // A UDP datagram always has a source; one without is skipped.
            if let Ok(from) = source(msg.address.as_ref()) {
                let waited_us = waited(msg.cmsgs().into_iter().flatten(), now);
                queue.push_back(Datagram {
                    bytes: bytes.to_vec(),
                    from,
                    at_ms: read_us / 1000,
                    via: Via::Group,
                    waited_us,
                    arrived_us: arrival(waited_us, read_us),
                });
            }
        },
    )?;
    Ok(ReadMany { read, truncated })
}

/// Says that `dropped` group datagrams were longer than a slot: the first
/// time at warn level (a sender on the group that is not keyfleet, or an
/// attack), later at debug level; `total` so far.
fn say_oversized(dropped: usize, total: u64) {
    static SAID: std::sync::Once = std::sync::Once::new();
    let mut first = false;
    SAID.call_once(|| first = true);
    if first {
        tracing::warn!(
            dropped,
            longer_than = GROUP_SLOT_LEN,
            "dropped group datagrams too long to be keyfleet's (it sends none over 1200 bytes): \
             something else sends to the group; counted in the agent's status as `oversized`, \
             later ones logged at debug level"
        );
    } else {
        tracing::debug!(
            dropped,
            total,
            longer_than = GROUP_SLOT_LEN,
            "dropped oversized group datagrams"
        );
    }
}

/// Whether a receive error is an ICMP error about an earlier send, reported
/// on the socket: not a datagram, not fatal.
fn is_icmp_report(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::HostUnreachable
            | std::io::ErrorKind::NetworkUnreachable
    )
}

/// The group socket, as [`Transport::coalesce_group`] reads it.
#[derive(Debug)]
enum GroupRx {
    /// Registered with tokio: a datagram wakes the loop.
    Armed(UdpSocket),
    /// Out of tokio's poll set, so arrivals wake no one: read at `until`.
    Muted {
        sock: std::net::UdpSocket,
        until: tokio::time::Instant,
    },
    /// Only while moving between the two: a failed move leaves it here, and
    /// the receive that tried it and every later one fail.
    Moving,
}

impl GroupRx {
    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match self {
            GroupRx::Armed(s) => Some(s.as_fd()),
            GroupRx::Muted { sock, .. } => Some(sock.as_fd()),
            GroupRx::Moving => None,
        }
    }
}

/// The datagrams an armed group socket holds, read with [`recv_many`] into
/// `queue` once the socket is readable; never ready unless armed.
async fn read_armed(
    rx: &GroupRx,
    slots: &mut [Vec<u8>],
    queue: &mut std::collections::VecDeque<Datagram>,
    clock: &Clock,
) -> std::io::Result<ReadMany> {
    use std::os::fd::AsFd;
    match rx {
        GroupRx::Armed(s) => {
            s.async_io(tokio::io::Interest::READABLE, || {
                recv_many(s.as_fd(), slots, queue, clock)
            })
            .await
        }
        _ => std::future::pending().await,
    }
}

/// Group datagrams one `recvmmsg` call reads at most.
const GROUP_SLOTS: usize = 32;

/// Bytes of one group receive slot: room for any datagram keyfleet sends
/// (at most [`keyfleet_core::wire::MAX_DATAGRAM`], 1200) several times
/// over. A longer one is no keyfleet datagram and is dropped unread.
const GROUP_SLOT_LEN: usize = 4096;

/// Most group datagrams one read of a muted group socket takes; with more
/// waiting, the next read comes as soon as these are handed out.
const COALESCED_MAX: usize = 1024;

/// Which socket a datagram came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Sent to the multicast group.
    Group,
    /// Sent to this agent's unicast address.
    Unicast,
}

/// A received datagram: bytes, where from, when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub bytes: Vec<u8>,
    /// The sender's unicast address (where an answer reaches it).
    pub from: SocketAddr,
    /// Arrival time by the transport's [`Clock`].
    pub at_ms: u64,
    pub via: Via,
    /// How long it waited in its socket before it was read, in µs, by the
    /// kernel's receive timestamp; `None` without one, and for a datagram
    /// held by the receive delay (its flight is simulated: it counts as
    /// arrived when it is let through).
    pub waited_us: Option<u32>,
    /// When it arrived in its socket, on the transport's clock in µs
    /// ([`Clock::now_us`]): its read time less `waited_us` (`None` without
    /// it). It errs late, never early.
    pub arrived_us: Option<u64>,
}

/// Counters of one transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams handed to the caller.
    pub received: u64,
    /// Datagrams received from the kernel and dropped by loss injection.
    pub dropped: u64,
    /// Datagrams the kernel accepted for sending.
    pub sent: u64,
    /// Sends the kernel refused (the datagram is lost; retries cover it).
    pub send_errors: u64,
    /// Group datagrams longer than any keyfleet sends, dropped unread.
    pub oversized: u64,
}

/// Receive-side loss injection: drops each datagram with probability `p`,
/// drawn from a seeded ChaCha8 generator, so a run is replayed by its seed.
#[derive(Debug, Clone)]
pub struct Loss {
    p: f64,
    rng: ChaCha8Rng,
}

impl Loss {
    /// Drops with probability `p` (0 to 1).
    pub fn new(p: f64, seed: u64) -> Result<Loss, NetError> {
        Self::for_stream(p, seed, 0)
    }

    /// Like [`Loss::new`], on stream `stream` of the seed: the agents of one
    /// process (`keyfleet sim --transport udp`) take one stream each and so
    /// draw independent, reproducible losses from one `--seed`.
    pub fn for_stream(p: f64, seed: u64, stream: u64) -> Result<Loss, NetError> {
        if !(0.0..=1.0).contains(&p) {
            return Err(NetError::BadLoss(p));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Ok(Loss { p, rng })
    }

    /// The probability.
    pub fn p(&self) -> f64 {
        self.p
    }

    /// Whether to drop the next datagram.
    pub fn drop_next(&mut self) -> bool {
        self.rng.gen::<f64>() < self.p
    }
}

/// Receive-side delay injection, for tests (this kernel has no netem): every
/// datagram is handed to the caller `control_ms` after the kernel delivered
/// it, group data `data_ms` after, each ± a uniform `jitter_ms` (so datagrams
/// are reordered). All zero: off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delay {
    pub control_ms: u64,
    pub data_ms: u64,
    pub jitter_ms: u64,
}

impl Delay {
    /// Whether any datagram is held.
    pub fn is_on(&self) -> bool {
        self.control_ms > 0 || self.data_ms > 0 || self.jitter_ms > 0
    }
}

/// A datagram held by [`Delay`] until `due` (ms by the transport's clock).
#[derive(Debug)]
struct Held {
    due: u64,
    order: u64,
    datagram: Datagram,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.order) == (o.due, o.order)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.order).cmp(&(o.due, o.order))
    }
}

/// The group socket and the unicast socket of one agent (or the controller).
#[derive(Debug)]
pub struct Transport {
    group: SocketAddrV4,
    group_rx: GroupRx,
    /// See [`Transport::coalesce_group`].
    coalesce: Option<Duration>,
    /// Group datagrams read (a batch at a time), not handed out yet.
    group_queue: std::collections::VecDeque<Datagram>,
    /// Where `recvmmsg` reads the group socket ([`GROUP_SLOTS`] of
    /// [`GROUP_SLOT_LEN`]).
    gslots: Vec<Vec<u8>>,
    /// Group datagrams longer than a slot, dropped.
    oversized: u64,
    unicast: UdpSocket,
    /// `unicast`'s address, read once (the socket is never replaced): the
    /// controller asks for it every pass of its loop.
    local: SocketAddr,
    clock: Clock,
    loss: Option<Loss>,
    delay: Delay,
    delay_rng: ChaCha8Rng,
    /// Tells group data from control messages for [`Delay`] (the caller's
    /// protocol knows; by default everything is control).
    is_data: fn(&[u8]) -> bool,
    held: BinaryHeap<Reverse<Held>>,
    held_order: u64,
    ubuf: Vec<u8>,
    /// Room for the unicast socket's receive timestamp (reused: no allocation a datagram).
    ucmsg: Vec<u8>,
    received: u64,
    dropped: u64,
    sent: AtomicU64,
    send_errors: AtomicU64,
    /// Datagrams held by [`Transport::cork`] until [`Transport::uncork`].
    corked: std::sync::Mutex<Option<Corked>>,
}

/// Datagrams held while corked: (destination, bytes), in order.
type Corked = Vec<(SocketAddr, Vec<u8>)>;

/// Most datagrams one `sendmmsg` call is given (the kernel's `UIO_MAXIOV`).
const MMSG_MAX: usize = 1024;

/// What [`Transport::uncork`] could not send.
#[derive(Debug, thiserror::Error)]
#[error("{count} datagram(s) not sent; the first: {first}")]
pub struct Unsent {
    /// Datagrams the kernel refused (each is lost; retries cover control messages).
    pub count: usize,
    /// The first refusal.
    pub first: NetError,
}

impl Transport {
    /// Binds both sockets as `cfg` says. Call inside a tokio runtime.
    ///
    /// Loss injection is on when `cfg.loss > 0`, seeded with `cfg.loss_seed`.
    pub fn bind(cfg: &NetConfig, clock: Clock) -> Result<Transport, NetError> {
        cfg.validate()?;
        let loss = if cfg.loss > 0.0 {
            Some(Loss::new(cfg.loss, cfg.loss_seed)?)
        } else {
            None
        };
        let group_sock = socket::group_socket(cfg.group, cfg.iface)?;
        let unicast = socket::unicast_socket(cfg.listen, cfg.iface, cfg.ttl)?;
        let mut t = Self::from_sockets(cfg.group, group_sock, unicast, clock, loss)?;
        t.delay = cfg.delay;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.loss_seed);
        rng.set_stream(1);
        t.delay_rng = rng;
        Ok(t)
    }

    /// How to tell group data from control messages, for the receive delay
    /// (`NetConfig::delay`): data is held `data_ms`, the rest `control_ms`.
    pub fn set_data_classifier(&mut self, is_data: fn(&[u8]) -> bool) {
        self.is_data = is_data;
    }

    /// Wraps sockets made by [`socket::group_socket`] and
    /// [`socket::unicast_socket`] (or the caller's own). Call inside a tokio runtime.
    pub fn from_sockets(
        group: SocketAddrV4,
        group_sock: std::net::UdpSocket,
        unicast: std::net::UdpSocket,
        clock: Clock,
        loss: Option<Loss>,
    ) -> Result<Transport, NetError> {
        let reg = |s: std::net::UdpSocket| {
            let addr = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
            s.set_nonblocking(true)
                .and_then(|()| UdpSocket::from_std(s))
                .map_err(|source| NetError::Setup {
                    what: "register the socket with tokio",
                    addr,
                    source,
                })
        };
        let unicast = reg(unicast)?;
        let local = local(&unicast);
        Ok(Transport {
            group,
            group_rx: GroupRx::Armed(reg(group_sock)?),
            coalesce: None,
            group_queue: std::collections::VecDeque::new(),
            gslots: vec![vec![0; GROUP_SLOT_LEN]; GROUP_SLOTS],
            oversized: 0,
            unicast,
            local,
            clock,
            loss,
            delay: Delay::default(),
            delay_rng: ChaCha8Rng::seed_from_u64(0),
            is_data: |_| false,
            held: BinaryHeap::new(),
            held_order: 0,
            ubuf: vec![0; MAX_DATAGRAM],
            ucmsg: nix::cmsg_space!(nix::sys::time::TimeSpec),
            received: 0,
            dropped: 0,
            sent: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            corked: std::sync::Mutex::new(None),
        })
    }

    /// Has the kernel drop, on the group socket, what the node `member` would
    /// drop unread (see [`socket::filter_group`]); `None` lets it all through.
    pub fn filter_group(&self, member: Option<u32>) -> Result<(), NetError> {
        let fd = self.group_rx.fd().ok_or_else(|| NetError::Setup {
            what: "set the group socket's filter",
            addr: self.group.to_string(),
            source: std::io::Error::other(
                "the group socket was lost moving in or out of tokio's poll set",
            ),
        })?;
        socket::filter_group(socket2::SockRef::from(&fd), member).map_err(|source| {
            NetError::Setup {
                what:
                    "set the group socket's filter (the node's own data, other nodes' key updates)",
                addr: self.group.to_string(),
                source,
            }
        })
    }

    /// The unicast address (where replies reach this transport).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The multicast group.
    pub fn group(&self) -> SocketAddrV4 {
        self.group
    }

    /// The clock stamping arrivals.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Sends `bytes` to the group (from the unicast socket, so that receivers
    /// see this transport's unicast address as the source).
    pub async fn send_group(&self, bytes: &[u8]) -> Result<(), NetError> {
        self.send_to(bytes, SocketAddr::V4(self.group)).await
    }

    /// Sends `bytes` to one address (or holds them, corked).
    pub async fn send_to(&self, bytes: &[u8], to: SocketAddr) -> Result<(), NetError> {
        if let Some(held) = self.corked().as_mut() {
            held.push((to, bytes.to_vec()));
            return Ok(());
        }
        match self.unicast.send_to(bytes, to).await {
            Ok(_) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(source) => {
                self.send_errors.fetch_add(1, Ordering::Relaxed);
                Err(NetError::Send {
                    len: bytes.len(),
                    to,
                    source,
                })
            }
        }
    }

    fn corked(&self) -> std::sync::MutexGuard<'_, Option<Corked>> {
        // Nothing can panic while the lock is held: a poisoned one is as good.
        self.corked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds what is sent from now on (group and unicast, in order) until
    /// [`Transport::uncork`], which hands it all to the kernel in one
    /// `sendmmsg` call: a burst costs one system call, and the receivers
    /// are woken once for it rather than once a datagram.
    pub fn cork(&self) {
        self.corked().get_or_insert_with(Vec::new);
    }

    /// Sends what [`Transport::cork`] held, in order. A datagram the kernel
    /// refuses is counted and skipped; the rest still go.
    pub async fn uncork(&self) -> Result<(), Unsent> {
        let Some(held) = self.corked().take() else {
            return Ok(());
        };
        let addrs: Vec<rustix::net::SocketAddrAny> = held
            .iter()
            .map(|(to, _)| rustix::net::SocketAddrAny::from(*to))
            .collect();
        let mut done = 0;
        let mut unsent: Option<Unsent> = None;
        while done < held.len() {
            let end = held.len().min(done + MMSG_MAX);
            let (msgs, to) = (
                held.get(done..end).unwrap_or_default(),
                addrs.get(done..end).unwrap_or_default(),
            );
            let r = self
                .unicast
                .async_io(tokio::io::Interest::WRITABLE, || {
                    socket::send_many(
                        &self.unicast,
                        msgs.iter().map(|(_, b)| b.as_slice()),
                        Some(to),
                        rustix::net::SendFlags::empty(),
                    )
                })
                .await;
            match r {
                // The kernel stops a call at the first datagram it refuses
                // and reports it only when it is the first: it is retried
                // alone at the next turn, refused, and skipped.
                Ok(n) if n > 0 => {
                    self.sent.fetch_add(n as u64, Ordering::Relaxed);
                    done += n;
                }
                Ok(_) => done += 1,
                Err(source) => {
                    self.send_errors.fetch_add(1, Ordering::Relaxed);
                    let (to, bytes) = held
                        .get(done)
                        .map_or((SocketAddr::V4(self.group), 0), |(to, b)| (*to, b.len()));
                    match &mut unsent {
                        Some(u) => u.count += 1,
                        None => {
                            unsent = Some(Unsent {
                                count: 1,
                                first: NetError::Send {
                                    len: bytes,
                                    to,
                                    source,
                                },
                            })
                        }
                    }
                    done += 1;
                }
            }
        }
        match unsent {
            None => Ok(()),
            Some(u) => Err(u),
        }
    }

    /// The next datagram from either socket that loss injection lets through
    /// (after the receive delay, when one is set: then `at_ms` is when it was
    /// let through). Cancel-safe (it can sit in a `tokio::select!`).
    pub async fn recv(&mut self) -> Result<Datagram, NetError> {
        if !self.delay.is_on() {
            return self.recv_now().await;
        }
        loop {
            let now = self.clock.now_ms();
            let next = self.held.peek().map(|Reverse(h)| h.due);
            if next.is_some_and(|due| due <= now) {
                if let Some(Reverse(mut h)) = self.held.pop() {
                    h.datagram.at_ms = now;
                    h.datagram.waited_us = None;
                    h.datagram.arrived_us = None;
                    return Ok(h.datagram);
                }
            }
            let wait = next.map_or(Duration::from_secs(3600), |due| {
                Duration::from_millis(due.saturating_sub(now))
            });
            tokio::select! {
                d = self.recv_now() => {
                    let d = d?;
                    let d_ms = if (self.is_data)(&d.bytes) {
                        self.delay.data_ms
                    } else {
                        self.delay.control_ms
                    };
                    let j = self.delay.jitter_ms;
                    let ms = if j > 0 {
                        (d_ms + self.delay_rng.gen_range(0..=2 * j)).saturating_sub(j)
                    } else {
                        d_ms
                    };
                    self.held_order += 1;
                    self.held.push(Reverse(Held {
                        due: d.at_ms + ms,
                        order: self.held_order,
                        datagram: d,
                    }));
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The next datagram the sockets and loss injection give, without delay.
    /// The group socket is read in batches (one `recvmmsg` for what it
    /// holds), handed out one by one; the unicast socket a datagram at a time.
    async fn recv_now(&mut self) -> Result<Datagram, NetError> {
        /// What woke the receive.
        enum Got {
            Unicast(std::io::Result<(usize, SocketAddr, Option<u32>)>),
            Group(std::io::Result<ReadMany>),
            Queued,
            Due,
        }
        loop {
            if matches!(self.group_rx, GroupRx::Moving) {
                return Err(self.lost_group());
            }
            let armed = matches!(self.group_rx, GroupRx::Armed(_));
            let due = match &self.group_rx {
                GroupRx::Muted { until, .. } => Some(*until),
                _ => None,
            };
            let queued = !self.group_queue.is_empty();
            let got = tokio::select! {
                r = recv_timed(&self.unicast, &mut self.ubuf, &mut self.ucmsg) => Got::Unicast(r),
                () = std::future::ready(()), if queued => Got::Queued,
                r = read_armed(&self.group_rx, &mut self.gslots, &mut self.group_queue, &self.clock), if armed && !queued => Got::Group(r),
                () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() && !queued => Got::Due,
            };
            let d = match got {
                Got::Due => {
                    self.read_muted_group(false)?;
                    continue;
                }
                Got::Group(r) => {
                    self.armed_group_read(r)?;
                    continue;
                }
                Got::Queued => match self.group_queue.pop_front() {
                    Some(d) => d,
                    None => continue,
                },
                Got::Unicast(res) => match self.unicast_datagram(res)? {
                    Some(d) => d,
                    None => continue,
                },
            };
            if let Some(d) = self.admit(d) {
                return Ok(d);
            }
        }
    }

    /// The next datagram already here, without waiting for one and without
    /// arming a timer, for a drain after a datagram: `None` when nothing is
    /// here now. (Polling [`Self::recv`] once would do the same, but with the
    /// group socket coalesced it registers the next read's time with tokio's
    /// timer, and that wakes the runtime's driver: an `eventfd` write and an
    /// extra turn of its loop for each poll.) The unicast socket first, then
    /// the group datagrams already read, then a read of the group socket
    /// (a coalesced one only once its period is over). With a receive delay
    /// set it polls [`Self::recv`] once.
    pub fn try_recv(&mut self) -> Option<Result<Datagram, NetError>> {
        use std::os::fd::AsFd;
        if self.delay.is_on() {
            return futures_util::FutureExt::now_or_never(self.recv());
        }
        loop {
            if matches!(self.group_rx, GroupRx::Moving) {
                return Some(Err(self.lost_group()));
            }
            let res = self.unicast.try_io(tokio::io::Interest::READABLE, || {
                recv_timed_now(self.unicast.as_fd(), &mut self.ubuf, &mut self.ucmsg)
            });
            let d = if res
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock)
            {
                if self.group_queue.is_empty() {
                    if let Err(e) = self.try_read_group() {
                        return Some(Err(e));
                    }
                }
                self.group_queue.pop_front()?
            } else {
                match self.unicast_datagram(res) {
                    Ok(Some(d)) => d,
                    Ok(None) => continue,
                    Err(e) => return Some(Err(e)),
                }
            };
            if let Some(d) = self.admit(d) {
                return Some(Ok(d));
            }
        }
    }

    /// For [`Self::try_recv`]: reads what the group socket holds into
    /// `group_queue`, armed at once (then muted, when coalesced), muted once
    /// its period is over.
    fn try_read_group(&mut self) -> Result<(), NetError> {
        use std::os::fd::AsFd;
        match &self.group_rx {
            GroupRx::Muted { until, .. } if *until <= tokio::time::Instant::now() => {
                self.read_muted_group(false)
            }
            GroupRx::Armed(s) => {
                let r = s.try_io(tokio::io::Interest::READABLE, || {
                    recv_many(
                        s.as_fd(),
                        &mut self.gslots,
                        &mut self.group_queue,
                        &self.clock,
                    )
                });
                match r {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || is_icmp_report(&e) => {
                        Ok(())
                    }
                    r => self.armed_group_read(r),
                }
            }
            _ => Ok(()),
        }
    }

    /// What follows a read of the armed group socket: its oversized
    /// datagrams counted, a failure other than an ICMP report returned, and
    /// the socket muted when the group is coalesced.
    fn armed_group_read(&mut self, r: std::io::Result<ReadMany>) -> Result<(), NetError> {
        match r {
            Ok(n) => self.note_oversized(n),
            Err(e) if is_icmp_report(&e) => {}
            Err(source) => {
                return Err(NetError::Recv {
                    on: SocketAddr::V4(self.group),
                    source,
                })
            }
        }
        if self.coalesce.is_some() {
            self.mute_group()?;
        }
        Ok(())
    }

    /// The error of a receive once the group socket was lost.
    fn lost_group(&self) -> NetError {
        NetError::Recv {
            on: SocketAddr::V4(self.group),
            source: std::io::Error::other(
                "the group socket was lost moving in or out of tokio's poll set",
            ),
        }
    }

    /// The datagram of a unicast read; `None` for an ICMP error report
    /// (logged, skipped).
    fn unicast_datagram(
        &mut self,
        res: std::io::Result<(usize, SocketAddr, Option<u32>)>,
    ) -> Result<Option<Datagram>, NetError> {
        // Read after the wall clock the wait was measured to.
        let read_us = self.clock.now_us();
        let (n, from, waited_us) = match res {
            Ok(r) => r,
            Err(e) if is_icmp_report(&e) => {
                tracing::debug!(error = %e, "ignored an ICMP error on receive");
                return Ok(None);
            }
            Err(source) => {
                return Err(NetError::Recv {
                    on: self.local,
                    source,
                })
            }
        };
        Ok(Some(Datagram {
            bytes: self.ubuf.get(..n).map(<[u8]>::to_vec).unwrap_or_default(),
            from,
            at_ms: read_us / 1000,
            via: Via::Unicast,
            waited_us,
            arrived_us: arrival(waited_us, read_us),
        }))
    }

    /// A datagram read, through loss injection: counted as received, or
    /// dropped (`None`).
    fn admit(&mut self, d: Datagram) -> Option<Datagram> {
        if let Some(loss) = &mut self.loss {
            if loss.drop_next() {
                self.dropped += 1;
                return None;
            }
        }
        self.received += 1;
        Some(d)
    }

    /// Counts group datagrams dropped as longer than a slot (and says so:
    /// [`say_oversized`]).
    fn note_oversized(&mut self, n: ReadMany) {
        if n.truncated > 0 {
            self.oversized += n.truncated as u64;
            say_oversized(n.truncated, self.oversized);
        }
    }

    /// Wakes for every group arrival from now on (`None`, the default;
    /// what the socket holds then is read in one `recvmmsg`), or
    /// (`Some(every)`) for the first of a burst only: after a group datagram
    /// the socket leaves tokio's poll set, so arrivals wake no one, and what
    /// arrived is read every `every` until a read finds nothing (then the
    /// next datagram wakes the loop again). A datagram
    /// then waits up to `every` longer; in return a stream of group data
    /// costs a wake-up per `every`, not one per datagram. For the
    /// controller, which hears all group data but acts on little of it.
    pub fn coalesce_group(&mut self, every: Option<Duration>) {
        self.coalesce = every;
    }

    /// Takes the armed group socket out of tokio's poll set, reads what it
    /// holds already, and sets the next read.
    fn mute_group(&mut self) -> Result<(), NetError> {
        let GroupRx::Armed(s) = std::mem::replace(&mut self.group_rx, GroupRx::Moving) else {
            return Ok(());
        };
        let sock = s.into_std().map_err(|source| NetError::Recv {
            on: SocketAddr::V4(self.group),
            source,
        })?;
        self.group_rx = GroupRx::Muted {
            sock,
            until: tokio::time::Instant::now(),
        };
        self.read_muted_group(true)
    }

    /// Reads a muted group socket (up to [`COALESCED_MAX`] datagrams, into
    /// `group_queue`); then sets the next read: at once when it was full, in
    /// `coalesce` when it read something or `just_muted`, and otherwise
    /// (nothing came for a whole `coalesce`) puts the socket back into
    /// tokio's poll set.
    fn read_muted_group(&mut self, just_muted: bool) -> Result<(), NetError> {
        use std::os::fd::AsFd;
        let GroupRx::Muted { sock, .. } = &self.group_rx else {
            return Ok(());
        };
        let mut got = ReadMany::default();
        while got.read < COALESCED_MAX {
            match recv_many(
                sock.as_fd(),
                &mut self.gslots,
                &mut self.group_queue,
                &self.clock,
            ) {
                Ok(n) => {
                    got.read += n.read;
                    got.truncated += n.truncated;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if is_icmp_report(&e) => {}
                Err(source) => {
                    return Err(NetError::Recv {
                        on: SocketAddr::V4(self.group),
                        source,
                    })
                }
            }
        }
        self.note_oversized(got);
        let now = tokio::time::Instant::now();
        match (self.coalesce, &mut self.group_rx) {
            (Some(every), GroupRx::Muted { until, .. }) if got.read > 0 || just_muted => {
                *until = if got.read == COALESCED_MAX {
                    now
                } else {
                    now + every
                };
                Ok(())
            }
            _ => {
                let GroupRx::Muted { sock, .. } =
                    std::mem::replace(&mut self.group_rx, GroupRx::Moving)
                else {
                    return Ok(());
                };
                let s = UdpSocket::from_std(sock).map_err(|source| NetError::Recv {
                    on: SocketAddr::V4(self.group),
                    source,
                })?;
                self.group_rx = GroupRx::Armed(s);
                Ok(())
            }
        }
    }

    /// Whether group datagrams already read wait to be handed out (the
    /// next [`Transport::recv`] is then ready at once).
    pub fn has_queued(&self) -> bool {
        !self.group_queue.is_empty()
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        Stats {
            received: self.received,
            dropped: self.dropped,
            sent: self.sent.load(Ordering::Relaxed),
            send_errors: self.send_errors.load(Ordering::Relaxed),
            oversized: self.oversized,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::socket::tests::{free_group, read_all};
    use std::net::{Ipv4Addr, UdpSocket as StdUdp};

    /// A unicast socket on a free loopback port, multicast out of loopback.
    fn loopback_unicast() -> StdUdp {
        socket::unicast_socket(
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
            Ipv4Addr::LOCALHOST,
            1,
        )
        .unwrap()
    }

    /// A transport joined to `group` on loopback, no loss.
    fn transport_on(group: SocketAddrV4) -> Transport {
        Transport::from_sockets(
            group,
            socket::group_socket(group, Ipv4Addr::LOCALHOST).unwrap(),
            loopback_unicast(),
            Clock::monotonic(),
            None,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn corked_datagrams_leave_together_in_order_and_a_refused_one_costs_only_itself() {
        let group = free_group(18);
        let group_rx = socket::group_socket(group, Ipv4Addr::LOCALHOST).unwrap();
        let peer = StdUdp::bind("127.0.0.1:0").unwrap();
        peer.set_nonblocking(true).unwrap();
        let t = transport_on(group);
        let to_peer = peer.local_addr().unwrap();
        // An IPv6 destination on this IPv4 socket: the kernel refuses it.
        let refused: SocketAddr = "[::1]:9".parse().unwrap();

        t.cork();
        t.send_group(b"g1").await.unwrap();
        t.send_to(b"u1", to_peer).await.unwrap();
        t.send_group(b"g2").await.unwrap();
        t.send_to(b"lost", refused).await.unwrap();
        t.send_group(b"g3").await.unwrap();
        t.send_to(b"u2", to_peer).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            read_all(&group_rx).is_empty(),
            "nothing leaves while corked"
        );
        assert!(read_all(&peer).is_empty(), "nothing leaves while corked");

        let unsent = t.uncork().await.unwrap_err();
        assert_eq!(unsent.count, 1);
        assert!(
            matches!(unsent.first, NetError::Send { to, len: 4, .. } if to == refused),
            "{unsent}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(read_all(&group_rx), [b"g1", b"g2", b"g3"]);
        assert_eq!(read_all(&peer), [b"u1", b"u2"]);
        assert_eq!((t.stats().sent, t.stats().send_errors), (5, 1));

        // Uncorked, a send goes at once; a second uncork has nothing to do.
        t.uncork().await.unwrap();
        t.send_to(b"u3", to_peer).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(read_all(&peer), [b"u3"]);
        assert!(
            t.send_to(b"x", refused).await.is_err(),
            "not corked: refused at once"
        );
    }

    /// A transport on a fresh loopback group, and a socket to send to it.
    fn loopback_transport(last: u8) -> (Transport, StdUdp, SocketAddrV4) {
        let group = free_group(last);
        let tx = loopback_unicast();
        tx.set_nonblocking(false).unwrap();
        (transport_on(group), tx, group)
    }

    /// The next datagram `t` hands out, or a failure after 5 s.
    async fn next(t: &mut Transport) -> Datagram {
        tokio::time::timeout(Duration::from_secs(5), t.recv())
            .await
            .expect("a datagram within 5 s")
            .unwrap()
    }

    /// `try_recv` hands out what is already here without waiting: the
    /// unicast socket at once, a coalesced group socket's stream only once
    /// its period is over (as `recv`), nothing (`None`) when nothing is
    /// here; and every datagram once, in order.
    #[tokio::test]
    async fn try_recv_takes_what_is_here_and_keeps_the_coalesced_groups_period() {
        const EVERY: Duration = Duration::from_millis(300);
        let (mut t, tx, group) = loopback_transport(24);
        t.coalesce_group(Some(EVERY));
        assert!(t.try_recv().is_none(), "nothing here yet");
        tx.send_to(b"g0", group).unwrap();
        assert_eq!(next(&mut t).await.bytes, b"g0");
        let muted = tokio::time::Instant::now();
        for i in 1..=3u8 {
            tx.send_to(&[b'g', b'0' + i], group).unwrap();
        }
        tx.send_to(b"u1", t.local_addr()).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let d = t.try_recv().expect("the unicast datagram").unwrap();
        assert_eq!(
            (d.bytes.as_slice(), d.via),
            (b"u1".as_slice(), Via::Unicast)
        );
        if muted.elapsed() < EVERY - Duration::from_millis(50) {
            assert!(t.try_recv().is_none(), "the group waits for its period");
        }
        tokio::time::sleep(EVERY).await;
        let got: Vec<Vec<u8>> = std::iter::from_fn(|| t.try_recv())
            .map(|d| d.unwrap().bytes)
            .collect();
        assert_eq!(got, [b"g1".to_vec(), b"g2".to_vec(), b"g3".to_vec()]);
        assert!(t.try_recv().is_none());
        assert_eq!(t.stats().received, 5);
    }

    /// A datagram's arrival on the transport's µs clock (what the drain's
    /// round trips are measured to) lies between its send and its read, on
    /// either socket; it is the read time less the wait in the socket.
    #[tokio::test]
    async fn a_datagrams_arrival_on_the_us_clock_lies_between_its_send_and_its_read() {
        let (mut t, tx, group) = loopback_transport(23);
        for to in [SocketAddr::V4(group), t.local_addr()] {
            let before = t.clock().now_us();
            tx.send_to(b"timed", to).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            let d = next(&mut t).await;
            let after = t.clock().now_us();
            let (Some(waited), Some(arrived)) = (d.waited_us, d.arrived_us) else {
                panic!("{:?}: a receive timestamp and an arrival", d.via)
            };
            assert!(
                (before..=after).contains(&arrived),
                "{:?}: arrived at {arrived} µs, sent after {before}, read by {after}",
                d.via
            );
            assert!(arrived + u64::from(waited) <= after, "{:?}", d.via);
            assert_eq!(d.at_ms, (arrived + u64::from(waited)) / 1000, "{:?}", d.via);
        }
    }

    #[tokio::test]
    async fn group_datagrams_read_in_batches_come_out_in_order_and_an_oversized_one_costs_only_itself(
    ) {
        let (mut t, tx, group) = loopback_transport(19);
        // More than one batch waiting, and one datagram longer than a slot.
        let sent: Vec<Vec<u8>> = (0..150u32)
            .map(|i| {
                let mut b = i.to_be_bytes().to_vec();
                b.resize(
                    if i == 70 {
                        GROUP_SLOT_LEN + 1
                    } else {
                        100 + i as usize
                    },
                    0xa5,
                );
                b
            })
            .collect();
        for b in &sent {
            tx.send_to(b, group).unwrap();
        }
        let mut got = Vec::new();
        for _ in 0..149 {
            let d = next(&mut t).await;
            assert_eq!(d.via, Via::Group);
            assert_eq!(d.from, tx.local_addr().unwrap());
            assert!(d.waited_us.is_some(), "each keeps its receive timestamp");
            got.push(d.bytes);
        }
        let want: Vec<Vec<u8>> = sent
            .iter()
            .filter(|b| b.len() <= GROUP_SLOT_LEN)
            .cloned()
            .collect();
        assert_eq!(got, want, "every datagram, whole and in order");
        assert_eq!(t.stats().oversized, 1);
        assert_eq!(t.stats().received, 149);
        // Still read after it.
        tx.send_to(b"after", group).unwrap();
        assert_eq!(next(&mut t).await.bytes, b"after");
    }

    #[tokio::test]
    async fn a_coalesced_group_wakes_for_the_first_datagram_then_reads_what_came_each_period_and_unicast_never_waits(
    ) {
        const EVERY: Duration = Duration::from_millis(800);
        let (mut t, tx, group) = loopback_transport(20);
        t.coalesce_group(Some(EVERY));
        tx.send_to(b"g0", group).unwrap();
        assert_eq!(next(&mut t).await.bytes, b"g0");
        assert!(
            matches!(t.group_rx, GroupRx::Muted { .. }),
            "out of the poll set after a datagram"
        );
        // A stream meanwhile: read only when the period is over.
        let muted = tokio::time::Instant::now();
        for i in 1..=5u8 {
            tx.send_to(&[b'g', b'0' + i], group).unwrap();
        }
        // A reply to the unicast socket is not held behind them.
        tx.send_to(b"u1", t.local_addr()).unwrap();
        let d = next(&mut t).await;
        assert_eq!(
            (d.bytes.as_slice(), d.via),
            (b"u1".as_slice(), Via::Unicast)
        );
        let d = next(&mut t).await;
        assert_eq!(d.bytes, b"g1");
        assert!(
            muted.elapsed() >= EVERY - Duration::from_millis(50),
            "the stream waited for the period: {:?}",
            muted.elapsed()
        );
        // Its receive timestamp is kept. (How long it reads is the kernel's:
        // right after the first socket of the machine asks for timestamps,
        // the kernel turns them on in a deferred work item, and until then
        // stamps a datagram when it is read.)
        assert!(d.waited_us.is_some());
        for i in 2..=5u8 {
            assert_eq!(next(&mut t).await.bytes, [b'g', b'0' + i]);
        }
        // A quiet period: back in the poll set, and nothing was lost.
        assert!(
            tokio::time::timeout(EVERY * 3, t.recv()).await.is_err(),
            "nothing more was sent"
        );
        assert!(
            matches!(t.group_rx, GroupRx::Armed(_)),
            "armed again after a period without group data"
        );
        tx.send_to(b"g6", group).unwrap();
        assert_eq!(next(&mut t).await.bytes, b"g6");
        assert_eq!(t.stats().received, 8);
        // Coalescing off: armed again after the period, datagram by datagram.
        t.coalesce_group(None);
        tokio::time::sleep(EVERY * 2).await;
        tx.send_to(b"g7", group).unwrap();
        assert_eq!(next(&mut t).await.bytes, b"g7");
        tx.send_to(b"g8", group).unwrap();
        assert_eq!(next(&mut t).await.bytes, b"g8");
        assert!(matches!(t.group_rx, GroupRx::Armed(_)));
    }

    #[test]
    fn loss_is_reproducible_by_seed_and_near_p() {
        let draw = |seed, stream| {
            let mut l = Loss::for_stream(0.1, seed, stream).unwrap();
            (0..100_000).map(|_| l.drop_next()).collect::<Vec<_>>()
        };
        let a = draw(42, 0);
        assert_eq!(a, draw(42, 0), "same seed, same drops");
        assert_ne!(a, draw(43, 0), "another seed, other drops");
        assert_ne!(a, draw(42, 1), "another stream, other drops");
        let frac = a.iter().filter(|d| **d).count() as f64 / a.len() as f64;
        assert!((0.095..0.105).contains(&frac), "dropped {frac}");
    }

    #[test]
    fn loss_extremes_and_bad_values() {
        let mut never = Loss::new(0.0, 1).unwrap();
        let mut always = Loss::new(1.0, 1).unwrap();
        assert!((0..1000).all(|_| !never.drop_next() && always.drop_next()));
        assert!(matches!(Loss::new(1.01, 1), Err(NetError::BadLoss(_))));
        assert!(Loss::new(f64::NAN, 1).is_err());
    }
}
