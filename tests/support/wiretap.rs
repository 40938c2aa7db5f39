//! What an attacker on a hub (or a mirrored switch port) has beyond
//! [`super::adversary::Lan`]: it hears *unicast* datagrams too (a node's
//! replies and key requests to the controller), and it sends datagrams with
//! any source address it likes (a spoofed member address).
//!
//! - [`Tap`]: an `AF_PACKET` socket (root) that keeps every UDP datagram on
//!   the loopback interface to a given destination port, with its source.
//!   Loopback shows each packet twice (out and in): copies are kept once.
//! - [`spoof`]: a raw IPv4 socket (`IPPROTO_RAW`, root) that sends one UDP
//!   datagram with a source address of the caller's choice.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// One UDP datagram heard on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Heard {
    pub from: SocketAddrV4,
    pub to: SocketAddrV4,
    pub payload: Vec<u8>,
}

/// A capture of the UDP datagrams to one port on loopback.
pub struct Tap {
    heard: Arc<Mutex<Vec<Heard>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The UDP datagram in an IPv4 packet (no link header), if it is one.
fn parse_udp(p: &[u8]) -> Option<Heard> {
    if p.len() < 20 || p[0] >> 4 != 4 || p[9] != 17 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
    let udp = p.get(ihl..total)?;
    if udp.len() < 8 {
        return None;
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    Some(Heard {
        from: SocketAddrV4::new(src, sport),
        to: SocketAddrV4::new(dst, dport),
        payload: udp[8..].to_vec(),
    })
}

impl Tap {
    /// Starts capturing UDP datagrams to `port` (any address).
    pub fn port(port: u16) -> Tap {
        // ETH_P_IP, cooked (SOCK_DGRAM): the buffer starts at the IP header.
        let proto = Protocol::from(i32::from(0x0800u16.to_be()));
        let s = Socket::new(Domain::PACKET, Type::DGRAM, Some(proto))
            .expect("an AF_PACKET socket (the adversary tests run as root)");
        s.bind_device(Some(b"lo")).expect("bind the tap to lo");
        let _ = s.set_recv_buffer_size(8 << 20);
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let sock: std::net::UdpSocket = s.into();
        let heard: Arc<Mutex<Vec<Heard>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (h, st) = (heard.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut seen: HashSet<Heard> = HashSet::new();
            let mut buf = vec![0u8; 65_536];
            while !st.load(Ordering::Relaxed) {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                let Some(d) = parse_udp(&buf[..n]) else {
                    continue;
                };
                if d.to.port() == port && seen.insert(d.clone()) {
                    h.lock().unwrap().push(d);
                }
            }
        });
        Tap {
            heard,
            stop,
            thread: Some(thread),
        }
    }

    /// Every distinct datagram heard so far, in order.
    pub fn heard(&self) -> Vec<Heard> {
        self.heard.lock().unwrap().clone()
    }

    /// Distinct datagrams heard so far.
    pub fn count(&self) -> usize {
        self.heard.lock().unwrap().len()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `payload` to `to` as a UDP datagram whose source is `from` (raw
/// socket, root). Multicast goes out of 127.0.0.1 and loops back.
pub fn spoof(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) {
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))
        .expect("a raw IPv4 socket (the adversary tests run as root)");
    if to.ip().is_multicast() {
        s.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
        s.set_multicast_loop_v4(true).unwrap();
    }
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 1, 17, 0, 0]); // id, DF, ttl 1, UDP, checksum (kernel)
    p.extend_from_slice(&from.ip().octets());
    p.extend_from_slice(&to.ip().octets());
    p.extend_from_slice(&from.port().to_be_bytes());
    p.extend_from_slice(&to.port().to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    p.extend_from_slice(payload);
    s.send_to(&p, &SockAddr::from(SocketAddr::V4(to)))
        .expect("send a spoofed datagram");
}
