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
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};
    use std::os::fd::AsRawFd;
    sock.async_io(tokio::io::Interest::READABLE, || {
        let mut iov = [std::io::IoSliceMut::new(&mut *buf)];
        let msg = recvmsg::<SockaddrStorage>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut *cmsg),
            MsgFlags::empty(),
        )
        .map_err(std::io::Error::from)?;
        let from = msg
            .address
            .as_ref()
            .and_then(|a| {
                a.as_sockaddr_in()
                    .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                    .or_else(|| {
                        a.as_sockaddr_in6()
                            .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                    })
            })
            .ok_or_else(|| std::io::Error::other("a datagram without a source address"))?;
        let mut waited_us = None;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmTimestampns(ts) = c {
                    let arrived = std::time::UNIX_EPOCH
                        + Duration::new(ts.tv_sec().max(0) as u64, ts.tv_nsec().max(0) as u32);
                    // The receive timestamp is wall-clock time: a clock
                    // stepped back reads as no wait, which errs long.
                    waited_us = Some(
                        std::time::SystemTime::now()
                            .duration_since(arrived)
                            .map_or(0, |d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX)),
                    );
                }
            }
        }
        Ok((msg.bytes, from, waited_us))
    })
    .await
}

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
    group_sock: UdpSocket,
    unicast: UdpSocket,
    clock: Clock,
    loss: Option<Loss>,
    delay: Delay,
    delay_rng: ChaCha8Rng,
    /// Tells group data from control messages for [`Delay`] (the caller's
    /// protocol knows; by default everything is control).
    is_data: fn(&[u8]) -> bool,
    held: BinaryHeap<Reverse<Held>>,
    held_order: u64,
    gbuf: Vec<u8>,
    ubuf: Vec<u8>,
    /// Room for each socket's receive timestamp (reused: no allocation a datagram).
    gcmsg: Vec<u8>,
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
        Ok(Transport {
            group,
            group_sock: reg(group_sock)?,
            unicast: reg(unicast)?,
            clock,
            loss,
            delay: Delay::default(),
            delay_rng: ChaCha8Rng::seed_from_u64(0),
            is_data: |_| false,
            held: BinaryHeap::new(),
            held_order: 0,
            gbuf: vec![0; MAX_DATAGRAM],
            ubuf: vec![0; MAX_DATAGRAM],
            gcmsg: nix::cmsg_space!(nix::sys::time::TimeSpec),
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
        socket::filter_group(socket2::SockRef::from(&self.group_sock), member).map_err(|source| {
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
        local(&self.unicast)
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
                    let iovs: Vec<[std::io::IoSlice<'_>; 1]> = msgs
                        .iter()
                        .map(|(_, b)| [std::io::IoSlice::new(b)])
                        .collect();
                    let mut controls: Vec<rustix::net::SendAncillaryBuffer<'_, '_, '_>> =
                        msgs.iter().map(|_| Default::default()).collect();
                    let mut hdrs: Vec<rustix::net::MMsgHdr<'_>> = iovs
                        .iter()
                        .zip(controls.iter_mut())
                        .zip(to)
                        .map(|((iov, c), a)| rustix::net::MMsgHdr::new_with_addr(a, iov, c))
                        .collect();
                    rustix::net::sendmmsg(&self.unicast, &mut hdrs, rustix::net::SendFlags::empty())
                        .map_err(std::io::Error::from)
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
    async fn recv_now(&mut self) -> Result<Datagram, NetError> {
        loop {
            let (res, via) = tokio::select! {
                r = recv_timed(&self.group_sock, &mut self.gbuf, &mut self.gcmsg) => (r, Via::Group),
                r = recv_timed(&self.unicast, &mut self.ubuf, &mut self.ucmsg) => (r, Via::Unicast),
            };
            let at_ms = self.clock.now_ms();
            let (n, from, waited_us) = match res {
                Ok(r) => r,
                // An ICMP error about an earlier send, reported on this socket:
                // not a datagram, not fatal.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::HostUnreachable
                            | std::io::ErrorKind::NetworkUnreachable
                    ) =>
                {
                    tracing::debug!(error = %e, "ignored an ICMP error on receive");
                    continue;
                }
                Err(source) => {
                    let on = match via {
                        Via::Group => local(&self.group_sock),
                        Via::Unicast => local(&self.unicast),
                    };
                    return Err(NetError::Recv { on, source });
                }
            };
            if let Some(loss) = &mut self.loss {
                if loss.drop_next() {
                    self.dropped += 1;
                    continue;
                }
            }
            self.received += 1;
            let buf = match via {
                Via::Group => &self.gbuf,
                Via::Unicast => &self.ubuf,
            };
            let bytes = buf.get(..n).map(<[u8]>::to_vec).unwrap_or_default();
            return Ok(Datagram {
                bytes,
                from,
                at_ms,
                via,
                waited_us,
            });
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        Stats {
            received: self.received,
            dropped: self.dropped,
            sent: self.sent.load(Ordering::Relaxed),
            send_errors: self.send_errors.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::socket::tests::{free_group, read_all};
    use std::net::{Ipv4Addr, UdpSocket as StdUdp};

    #[tokio::test]
    async fn corked_datagrams_leave_together_in_order_and_a_refused_one_costs_only_itself() {
        let group = free_group(18);
        let group_rx = socket::group_socket(group, Ipv4Addr::LOCALHOST).unwrap();
        let peer = StdUdp::bind("127.0.0.1:0").unwrap();
        peer.set_nonblocking(true).unwrap();
        let t = Transport::from_sockets(
            group,
            socket::group_socket(group, Ipv4Addr::LOCALHOST).unwrap(),
            socket::unicast_socket(
                SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
                Ipv4Addr::LOCALHOST,
                1,
            )
            .unwrap(),
            Clock::monotonic(),
            None,
        )
        .unwrap();
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
