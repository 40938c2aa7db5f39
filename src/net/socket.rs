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
    Ok(s.into())
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
    Ok(s.into())
}

/// The address a socket is bound to, for messages.
pub(crate) fn local(s: &tokio::net::UdpSocket) -> SocketAddr {
    s.local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Classic BPF opcodes (`linux/filter.h`) of [`drop_data_from`]'s program.
mod bpf {
    /// `BPF_LD | BPF_W | BPF_LEN`: the datagram's length (UDP header included).
    pub const LD_LEN: u16 = 0x80;
    /// `BPF_LD | BPF_B | BPF_ABS`: one byte at `k`.
    pub const LDB: u16 = 0x30;
    /// `BPF_LD | BPF_W | BPF_ABS`: a big-endian `u32` at `k`.
    pub const LDW: u16 = 0x20;
    /// `BPF_JMP | BPF_JEQ | BPF_K`.
    pub const JEQ: u16 = 0x15;
    /// `BPF_JMP | BPF_JGE | BPF_K`.
    pub const JGE: u16 = 0x35;
    /// `BPF_RET | BPF_K`: keep `k` bytes (0: drop the datagram).
    pub const RET: u16 = 0x06;
}

/// Where a socket filter of a UDP socket finds the payload: the kernel runs
/// it with the packet starting at the UDP header.
const UDP_HEADER: u32 = 8;

/// The filter of [`drop_data_from`]: drops group data (wire version
/// [`wire::VERSION`], kind [`wire::kind::DATA`]) whose sender is `member`;
/// keeps everything else, short datagrams included (the decoder says what
/// is wrong with them).
fn own_data_filter(member: u32) -> [socket2::SockFilter; 10] {
    use keyfleet_core::wire;
    use socket2::SockFilter as F;
    let at = |offset: usize| UDP_HEADER + u32::try_from(offset).unwrap_or(u32::MAX);
    let sender = wire::DATA_SENDER_AT;
    // Each test jumps to `keep` (the last instruction) when it fails: the
    // false-branch offset of instruction i is 9 - (i + 1).
    [
        F::new(bpf::LD_LEN, 0, 0, 0),
        F::new(bpf::JGE, 0, 7, at(sender + 4)),
        F::new(bpf::LDB, 0, 0, at(0)),
        F::new(bpf::JEQ, 0, 5, u32::from(wire::VERSION)),
        F::new(bpf::LDB, 0, 0, at(1)),
        F::new(bpf::JEQ, 0, 3, u32::from(wire::kind::DATA)),
        F::new(bpf::LDW, 0, 0, at(sender)),
        F::new(bpf::JEQ, 0, 1, member),
        F::new(bpf::RET, 0, 0, 0),
        F::new(bpf::RET, 0, 0, u32::MAX),
    ]
}

/// Has the kernel drop, on the group socket `sock`, group data sent by
/// `member` (a node's own messages looped back by `IP_MULTICAST_LOOP`, which
/// the node would drop anyway): they then cost no wake-up and no receive.
/// `None` removes the filter.
pub fn drop_data_from(sock: SockRef<'_>, member: Option<u32>) -> std::io::Result<()> {
    match member {
        Some(m) => sock.attach_filter(&own_data_filter(m)),
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

    #[test]
    fn the_kernel_drops_exactly_the_members_own_group_data() {
        let group = free_group(17);
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

        let own = datagram(wire::kind::DATA, 7);
        let other = datagram(wire::kind::DATA, 8);
        let other_byte_order = datagram(wire::kind::DATA, 7u32.swap_bytes());
        // Not data, though the bytes where data has its sender say 7.
        let control = datagram(wire::kind::KEY_UPDATE, 7);
        let mut old_version = own.clone();
        old_version[0] = 1;
        // Cut before the sender ends: kept, for the decoder to refuse.
        let short = own[..wire::DATA_SENDER_AT + 3].to_vec();
        let sent = [
            own.clone(),
            other,
            other_byte_order,
            control,
            old_version,
            short,
        ];

        drop_data_from(SockRef::from(&rx), Some(7)).unwrap();
        let got = heard(&tx, &rx, group, &sent);
        assert_eq!(
            got,
            sent[1..].to_vec(),
            "everything but member 7's own data arrives, in order"
        );

        // Another member number (the node was enrolled again): only its data goes.
        drop_data_from(SockRef::from(&rx), Some(8)).unwrap();
        let got = heard(&tx, &rx, group, &sent);
        let mut want = sent.to_vec();
        want.remove(1);
        assert_eq!(got, want);

        // No filter: all of it, twice removed is fine.
        drop_data_from(SockRef::from(&rx), None).unwrap();
        drop_data_from(SockRef::from(&rx), None).unwrap();
        assert_eq!(heard(&tx, &rx, group, &sent), sent.to_vec());
    }
}
