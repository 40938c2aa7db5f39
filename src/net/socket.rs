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

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::NetError;

/// Receive buffer asked for on every socket: a rekey round of a large fleet
/// arrives in bursts (the kernel caps it at `net.core.rmem_max`).
const RECV_BUFFER: usize = 4 << 20;

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
    // Best effort: a smaller buffer still works.
    let _ = s.set_recv_buffer_size(RECV_BUFFER);
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
    let _ = s.set_recv_buffer_size(RECV_BUFFER);
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
