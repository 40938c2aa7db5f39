//! Socket set-up with `socket2`.
//!
//! Two sockets per agent:
//!
//! - the **group socket** receives the fleet's multicast. It is bound to the
//!   group address and port (so it gets neither unicast traffic to that port nor
//!   other groups' traffic; `IP_MULTICAST_ALL` is off for the same reason), with
//!   `SO_REUSEADDR` and `SO_REUSEPORT` so that several agents on one host share
//!   the port (each gets its own copy of every group datagram), and joined to the
//!   group on the chosen interface.
//! - the **unicast socket** (`--listen ADDR:PORT`) receives replies and direct
//!   requests, and sends everything, to the group included (`IP_MULTICAST_IF` =
//!   the interface, `IP_MULTICAST_LOOP` on so agents on the same host hear it,
//!   TTL 1 by default). So the source address of every datagram an agent sends —
//!   group or unicast — is its unicast address, where an answer reaches it.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use super::NetError;

/// Receive buffer asked for on every socket: a rekey round of a large fleet
/// arrives in bursts (the kernel caps it at `net.core.rmem_max`).
const RECV_BUFFER: usize = 4 << 20;

/// The sysctl that caps [`RECV_BUFFER`].
const RMEM_MAX: &str = "net.core.rmem_max";

/// Asks for [`RECV_BUFFER`] on `s` (best effort: a smaller buffer still
/// works) and says once per process, at warn level, when the kernel gave
/// less: a burst larger than the buffer is lost before the program sees it.
fn ask_recv_buffer(s: &Socket) {
    let _ = s.set_recv_buffer_size(RECV_BUFFER);
    let got = s.recv_buffer_size().unwrap_or(0);
    if let Some(short) = short_buffer(got) {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| tracing::warn!("{short}"));
    }
}

/// What to tell the operator when a socket's receive buffer is `got` bytes
/// as Linux reports it (twice what it grants, the other half being its
/// bookkeeping), or `None` when that is [`RECV_BUFFER`] or more.
fn short_buffer(got: usize) -> Option<String> {
    let granted = got / 2;
    (granted < RECV_BUFFER).then(|| {
        format!(
            "UDP receive buffers are {} KiB, not the {} KiB asked for ({RMEM_MAX} caps them): \
             a rekey round of a large fleet or a burst of group data beyond that is lost \
             before keyfleet reads it; raise the cap with `sysctl -w {RMEM_MAX}={RECV_BUFFER}` \
             (the Debian package sets it in /usr/lib/sysctl.d/40-keyfleet.conf)",
            granted / 1024,
            RECV_BUFFER / 1024
        )
    })
}

/// The host's count of UDP datagrams the kernel dropped for a full receive
/// buffer (`RcvbufErrors` in `/proc/net/snmp`, every socket of this network
/// namespace), when it can be read.
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    // Two "Udp:" lines: the names, then the values.
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next()?, udp.next()?);
    let i = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

fn setup(what: &'static str, addr: impl ToString) -> impl FnOnce(std::io::Error) -> NetError {
    let addr = addr.to_string();
    move |source| NetError::Setup { what, addr, source }
}

/// A non-blocking socket bound to `group`, joined on `iface`.
pub fn group_socket(group: SocketAddrV4, iface: Ipv4Addr) -> Result<UdpSocket, NetError> {
    if !group.ip().is_multicast() {
        return Err(NetError::NotMulticast(group));
    }
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(setup("create a UDP socket", group))?;
    s.set_reuse_address(true)
        .map_err(setup("set SO_REUSEADDR", group))?;
    s.set_reuse_port(true)
        .map_err(setup("set SO_REUSEPORT", group))?;
    ask_recv_buffer(&s);
    s.bind(&SockAddr::from(group))
        .map_err(setup("bind to the group address", group))?;
    s.set_multicast_all_v4(false)
        .map_err(setup("clear IP_MULTICAST_ALL", group))?;
    s.join_multicast_v4(group.ip(), &iface).map_err(setup(
        "join the multicast group on the interface (is --iface a local address?)",
        format!("{} on {iface}", group.ip()),
    ))?;
    s.set_nonblocking(true)
        .map_err(setup("make the socket non-blocking", group))?;
    receive_timestamps(&s);
    Ok(s.into())
}

/// Asks the kernel to stamp each datagram with its arrival (SO_TIMESTAMPNS):
/// the transport then knows how long one waited in the socket
/// ([`super::transport::Datagram::waited_us`]). Without it (an old kernel),
/// datagrams count as handled on arrival, which only makes the drain longer.
fn receive_timestamps(s: &Socket) {
    use nix::sys::socket::{setsockopt, sockopt::ReceiveTimestampns};
    if let Err(e) = setsockopt(s, ReceiveTimestampns, &true) {
        tracing::debug!(error = %e, "no receive timestamps (SO_TIMESTAMPNS)");
    }
}

/// A non-blocking unicast socket bound to `listen`, set to send multicast out of
/// `iface` with `ttl`, looping it back to this host.
pub fn unicast_socket(
    listen: SocketAddrV4,
    iface: Ipv4Addr,
    ttl: u32,
) -> Result<UdpSocket, NetError> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(setup("create a UDP socket", listen))?;
    ask_recv_buffer(&s);
    s.bind(&SockAddr::from(listen))
        .map_err(setup("bind the unicast socket (is the port free?)", listen))?;
    s.set_multicast_if_v4(&iface).map_err(setup(
        "set IP_MULTICAST_IF (is --iface a local address?)",
        iface,
    ))?;
    s.set_multicast_loop_v4(true)
        .map_err(setup("set IP_MULTICAST_LOOP", iface))?;
    s.set_multicast_ttl_v4(ttl)
        .map_err(setup("set IP_MULTICAST_TTL", ttl))?;
    s.set_nonblocking(true)
        .map_err(setup("make the socket non-blocking", listen))?;
    receive_timestamps(&s);
    Ok(s.into())
}

/// One `sendmmsg` call for `msgs`, in order (to `to`, one address a
/// message, or on a connected socket without): how many the kernel took.
pub(crate) fn send_many<'m>(
    sock: impl std::os::fd::AsFd,
    msgs: impl Iterator<Item = &'m [u8]>,
    to: Option<&[rustix::net::SocketAddrAny]>,
    flags: rustix::net::SendFlags,
) -> std::io::Result<usize> {
    let iovs: Vec<[std::io::IoSlice<'_>; 1]> = msgs.map(|b| [std::io::IoSlice::new(b)]).collect();
    let mut controls: Vec<rustix::net::SendAncillaryBuffer<'_, '_, '_>> =
        iovs.iter().map(|_| Default::default()).collect();
    let mut hdrs: Vec<rustix::net::MMsgHdr<'_>> = match to {
        Some(to) => iovs
            .iter()
            .zip(controls.iter_mut())
            .zip(to)
            .map(|((iov, c), a)| rustix::net::MMsgHdr::new_with_addr(a, iov, c))
            .collect(),
        None => iovs
            .iter()
            .zip(controls.iter_mut())
            .map(|(iov, c)| rustix::net::MMsgHdr::new(iov, c))
            .collect(),
    };
    rustix::net::sendmmsg(sock, &mut hdrs, flags).map_err(std::io::Error::from)
}

/// One non-blocking `recvmmsg` call into `slots`, one datagram each, with
/// `cmsg` as the control buffer each (`None`: no control messages): `each`
/// sees every message read, in order. How many were read; `WouldBlock` when
/// the socket held none. The receiving twin of [`send_many`].
pub(crate) fn recv_batch<S: nix::sys::socket::SockaddrLike + Copy>(
    sock: std::os::fd::BorrowedFd<'_>,
    slots: &mut [Vec<u8>],
    cmsg: Option<Vec<u8>>,
    mut each: impl FnMut(nix::sys::socket::RecvMsg<'_, '_, S>),
) -> std::io::Result<usize> {
    use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders};
    use std::os::fd::AsRawFd;
    let mut headers = MultiHeaders::<S>::preallocate(slots.len(), cmsg);
    let mut iovs: Vec<[std::io::IoSliceMut<'_>; 1]> = slots
        .iter_mut()
        .map(|b| [std::io::IoSliceMut::new(b)])
        .collect();
    let got = recvmmsg(
        sock.as_raw_fd(),
        &mut headers,
        iovs.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    )
    .map_err(std::io::Error::from)?;
    let mut n = 0;
    for m in got {
        n += 1;
        each(m);
    }
    Ok(n)
}

/// The address a socket is bound to, for messages.
pub(crate) fn local(s: &tokio::net::UdpSocket) -> SocketAddr {
    s.local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Classic BPF opcodes (`linux/filter.h`) of [`filter_group`]'s program.
mod bpf {
    /// `BPF_LD | BPF_W | BPF_LEN`: the datagram's length (UDP header included).
    pub const LD_LEN: u16 = 0x80;
    /// `BPF_LD | BPF_B | BPF_ABS`: one byte at `k`.
    pub const LDB: u16 = 0x30;
    /// `BPF_LD | BPF_W | BPF_ABS`: a big-endian `u32` at `k`.
    pub const LDW: u16 = 0x20;
    /// `BPF_JMP | BPF_JEQ | BPF_K`.
    pub const JEQ: u16 = 0x15;
    /// `BPF_JMP | BPF_JGT | BPF_K` (unsigned).
    pub const JGT: u16 = 0x25;
    /// `BPF_JMP | BPF_JGE | BPF_K` (unsigned).
    pub const JGE: u16 = 0x35;
    /// `BPF_RET | BPF_K`: keep `k` bytes (0: drop the datagram).
    pub const RET: u16 = 0x06;
}

/// Where a socket filter of a UDP socket finds the payload: the kernel runs
/// it with the packet starting at the UDP header.
const UDP_HEADER: u32 = 8;

/// The filter of [`filter_group`] for `member`. It drops group data (kind
/// [`wire::kind::DATA`], of its version [`wire::version_of`]) whose sender
/// is `member`, and key update requests (kind [`wire::kind::KEY_UPDATE`], of
/// theirs) whose batch's member range leaves `member` out: what the node
/// would skip anyway before any crypto. It keeps everything else, datagrams
/// too short to hold what it reads and other versions included (the decoder
/// says what is wrong with them).
fn group_filter(member: u32) -> [socket2::SockFilter; 19] {
    use keyfleet_core::wire::{self, kind};
    use socket2::SockFilter as F;
    let at = |offset: usize| UDP_HEADER + u32::try_from(offset).unwrap_or(u32::MAX);
    let sender = wire::DATA_SENDER_AT;
    let range = wire::KEY_UPDATE_RANGE_AT;
    let version = |k: u8| u32::from(wire::version_of(k));
    // The two returns at the end; a jump counts from the next instruction.
    const DROP: usize = 17;
    const KEEP: usize = 18;
    let to = |from: usize, target: usize| u8::try_from(target - from - 1).unwrap_or(u8::MAX);
    [
        /* 0 */ F::new(bpf::LD_LEN, 0, 0, 0),
        /* 1 */ F::new(bpf::JGE, 0, to(1, KEEP), at(sender + 4)),
        /* 2 */ F::new(bpf::LDB, 0, 0, at(1)),
        /* 3 */ F::new(bpf::JEQ, 0, to(3, 8), u32::from(kind::DATA)),
        /* 4 */ F::new(bpf::LDB, 0, 0, at(0)),
        /* 5 */ F::new(bpf::JEQ, 0, to(5, KEEP), version(kind::DATA)),
        /* 6 */ F::new(bpf::LDW, 0, 0, at(sender)),
        /* 7 */ F::new(bpf::JEQ, to(7, DROP), to(7, KEEP), member),
        /* 8 */ F::new(bpf::JEQ, 0, to(8, KEEP), u32::from(kind::KEY_UPDATE)),
        /* 9 */ F::new(bpf::LDB, 0, 0, at(0)),
        /* 10 */ F::new(bpf::JEQ, 0, to(10, KEEP), version(kind::KEY_UPDATE)),
        /* 11 */ F::new(bpf::LD_LEN, 0, 0, 0),
        /* 12 */ F::new(bpf::JGE, 0, to(12, KEEP), at(range + 8)),
        /* 13 */ F::new(bpf::LDW, 0, 0, at(range)), // the batch's first member…
        /* 14 */ F::new(bpf::JGT, to(14, DROP), 0, member), // …is past `member`
        /* 15 */ F::new(bpf::LDW, 0, 0, at(range + 4)), // its last member…
        /* 16 */ F::new(bpf::JGE, to(16, KEEP), 0, member), // …is not before it
        /* DROP */ F::new(bpf::RET, 0, 0, 0),
        /* KEEP */ F::new(bpf::RET, 0, 0, u32::MAX),
    ]
}

/// Has the kernel drop, on the group socket `sock`, what the node `member`
/// would drop unread: its own group data (looped back by
/// `IP_MULTICAST_LOOP`) and the key update batches that hold other nodes'
/// entries only (of a round's batches, all but one). They then cost no
/// wake-up and no receive. `None` removes the filter.
pub fn filter_group(sock: SockRef<'_>, member: Option<u32>) -> std::io::Result<()> {
    match member {
        Some(m) => sock.attach_filter(&group_filter(m)),
        None => match sock.detach_filter() {
            // No filter attached.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        },
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use keyfleet_core::crypto::Epoch;
    use keyfleet_core::wire;
    use std::time::Duration;

    /// A group datagram of `kind` whose bytes at the data sender's place are `sender`.
    fn datagram(kind: u8, sender: u32) -> Vec<u8> {
        let mut v = wire::data_header(sender, 1, Some(Epoch(3)), &[9; 12]);
        v[1] = kind;
        v.extend_from_slice(&[0; 16]);
        v
    }

    /// A multicast group `239.255.88.last` on a port nothing else uses (the
    /// kernel's pick for a unicast socket), for a test on loopback.
    pub(in crate::net) fn free_group(last: u8) -> SocketAddrV4 {
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        SocketAddrV4::new(Ipv4Addr::new(239, 255, 88, last), port)
    }

    /// What `s` holds, in order, until a receive fails (nothing left on a
    /// non-blocking socket, or its read timeout).
    pub(in crate::net) fn read_all(s: &UdpSocket) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = s.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }

    /// A free loopback group (`free_group(last)`), a blocking group socket
    /// joined to it that gives up after 200 ms of quiet, and a blocking
    /// sender to it.
    fn loopback_pair(last: u8) -> (SocketAddrV4, UdpSocket, UdpSocket) {
        let group = free_group(last);
        let rx = group_socket(group, Ipv4Addr::LOCALHOST).unwrap();
        rx.set_nonblocking(false).unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let tx = unicast_socket(
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
            Ipv4Addr::LOCALHOST,
            1,
        )
        .unwrap();
        tx.set_nonblocking(false).unwrap();
        (group, rx, tx)
    }

    /// What `rx` receives of `sent`, in order, until it has been quiet for its read timeout.
    fn heard(
        tx: &UdpSocket,
        rx: &UdpSocket,
        group: SocketAddrV4,
        sent: &[Vec<u8>],
    ) -> Vec<Vec<u8>> {
        for d in sent {
            tx.send_to(d, group).unwrap();
        }
        read_all(rx)
    }

    #[test]
    fn a_receive_buffer_below_the_one_asked_for_is_reported_with_the_sysctl_to_raise() {
        // Linux reports twice what it grants.
        assert_eq!(short_buffer(2 * RECV_BUFFER), None);
        assert_eq!(short_buffer(4 * RECV_BUFFER), None);
        // Debian's default cap, 212992 bytes.
        let msg = short_buffer(2 * 212_992).unwrap();
        assert!(
            msg.starts_with("UDP receive buffers are 208 KiB, not the 4096 KiB"),
            "{msg}"
        );
        assert!(msg.contains("sysctl -w net.core.rmem_max=4194304"), "{msg}");
        assert!(short_buffer(0).is_some());
        // What this machine grants agrees with the rule.
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        s.set_recv_buffer_size(RECV_BUFFER).unwrap();
        let got = s.recv_buffer_size().unwrap();
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .map_or(0, |c| c.trim().parse().unwrap_or(0));
        assert_eq!(
            short_buffer(got).is_none(),
            cap >= RECV_BUFFER,
            "got {got}, cap {cap}"
        );
    }

    /// A signed key update request whose batch holds `members` (sorted).
    fn key_update(members: &[u32]) -> Vec<u8> {
        use keyfleet_core::crypto::{Share, WrappedKey, WRAPPED_LEN};
        let entries: Vec<_> = members
            .iter()
            .map(|m| (*m, WrappedKey([5; WRAPPED_LEN])))
            .collect();
        let signing = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        wire::sign(
            wire::key_update(1, Epoch(4), 9, &Share([6; 32]), &[8; 32], &entries),
            &signing,
        )
    }

    #[test]
    fn the_kernel_drops_exactly_the_key_updates_whose_range_leaves_the_member_out() {
        let (group, rx, tx) = loopback_pair(18);

        // Batches around member 40, and the decoder's own view of each.
        let batches = [
            key_update(&[1, 2, 39]),           // ends before 40
            key_update(&[41, 50]),             // starts after 40
            key_update(&[40]),                 // 40 alone
            key_update(&[30, 40]),             // 40 last
            key_update(&[40, 45]),             // 40 first
            key_update(&[39, 41]),             // around 40, without its entry
            key_update(&[0, u32::MAX]),        // the whole range
            key_update(&[40u32.swap_bytes()]), // 40 in the other byte order
        ];
        for b in &batches {
            let wire::Message::KeyUpdate(ku) = wire::decode(b).unwrap() else {
                panic!("not a key update");
            };
            assert!(ku.first <= ku.last);
        }
        // A revision-2 controller's batch that ends before 40: not of the key
        // update's version, so kept, for the decoder to refuse with advice.
        let mut old_version = batches[0].clone();
        old_version[0] = wire::PREVIOUS_VERSION;
        // Cut inside the range: kept, for the decoder to refuse.
        let cut = batches[0][..wire::KEY_UPDATE_RANGE_AT + 6].to_vec();
        let transition = wire::sign(
            wire::transition(1, wire::Step::FirstTransition, Epoch(4), 10, &[9; 32]),
            &ed25519_dalek::SigningKey::from_bytes(&[3; 32]),
        );
        let mut sent = batches.to_vec();
        sent.extend([old_version, cut, transition]);

        filter_group(SockRef::from(&rx), Some(40)).unwrap();
        let got = heard(&tx, &rx, group, &sent);
        let mut want = sent.clone();
        // Dropped: the batch of 40 in the other byte order (a range of
        // 671088640 alone), the one that ends before 40 and the one after.
        want.remove(7);
        want.drain(0..2);
        assert_eq!(
            got, want,
            "only the batches whose range leaves member 40 out are dropped, the rest arrive in order"
        );
        // Kept although the node skips them: a range that holds 40, a batch that does not.
        assert_eq!(
            want.iter()
                .filter_map(|b| match wire::decode(b) {
                    Ok(wire::Message::KeyUpdate(ku)) => Some(ku.entry_for(40).is_some()),
                    _ => None,
                })
                .collect::<Vec<_>>(),
            [true, true, true, false, false],
        );

        // The edges of the number range: only the batch from 0 to the last number holds them.
        filter_group(SockRef::from(&rx), Some(0)).unwrap();
        let got = heard(&tx, &rx, group, &batches);
        assert_eq!(got, vec![batches[6].clone()]);
        filter_group(SockRef::from(&rx), Some(u32::MAX)).unwrap();
        let got = heard(&tx, &rx, group, &batches);
        assert_eq!(got, vec![batches[6].clone()]);

        // No filter: all of them.
        filter_group(SockRef::from(&rx), None).unwrap();
        assert_eq!(heard(&tx, &rx, group, &batches), batches.to_vec());
    }

    #[test]
    fn the_kernel_drops_exactly_the_members_own_group_data() {
        let (group, rx, tx) = loopback_pair(17);

        let own = datagram(wire::kind::DATA, 7);
        let other = datagram(wire::kind::DATA, 8);
        let other_byte_order = datagram(wire::kind::DATA, 7u32.swap_bytes());
        // Not data, though the bytes where data has its sender say 7.
        let control = datagram(wire::kind::KEY_UPDATE, 7);
        let mut old_version = own.clone();
        old_version[0] = 1;
        // Data is of version 2 (its layout is revision 2's); one of the key
        // update's version 3 is not data to this filter either.
        let mut other_version = own.clone();
        other_version[0] = wire::VERSION;
        // Cut before the sender ends: kept, for the decoder to refuse.
        let short = own[..wire::DATA_SENDER_AT + 3].to_vec();
        let sent = [
            own.clone(),
            other,
            other_byte_order,
            control,
            old_version,
            other_version,
            short,
        ];

        filter_group(SockRef::from(&rx), Some(7)).unwrap();
        let got = heard(&tx, &rx, group, &sent);
        assert_eq!(
            got,
            sent[1..].to_vec(),
            "everything but member 7's own data arrives, in order"
        );

        // Another member number (the node was enrolled again): only its data goes.
        filter_group(SockRef::from(&rx), Some(8)).unwrap();
        let got = heard(&tx, &rx, group, &sent);
        let mut want = sent.to_vec();
        want.remove(1);
        assert_eq!(got, want);

        // No filter: all of it, twice removed is fine.
        filter_group(SockRef::from(&rx), None).unwrap();
        filter_group(SockRef::from(&rx), None).unwrap();
        assert_eq!(heard(&tx, &rx, group, &sent), sent.to_vec());
    }
}
