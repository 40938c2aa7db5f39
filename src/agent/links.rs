//! [`LinkWatch`]: the links the agent sends on, watched through rtnetlink
//! (SPEC §5: a node notices without a restart that it can communicate again).
//!
//! One `NETLINK_ROUTE` socket subscribed to link and IPv4 address events
//! (`RTMGRP_LINK`, `RTMGRP_IPV4_IFADDR`). At start it dumps the links and
//! addresses, so that it knows which interface carries the agent's `--iface`
//! address and which links are up; after that, a relevant link that goes from
//! up-and-running to not (or back), or the agent's address that goes away (or
//! comes), is a [`LinkChange`]. The agent feeds it to the node as
//! `NodeInput::LinkDown` / `NodeInput::LinkUp`.
//!
//! Relevant: with `--iface 0.0.0.0` (the routing table picks) every link;
//! otherwise the link holding that address. Only the kernel's messages count
//! (sender port 0). If the socket overruns (events lost), that is reported as
//! a change too: the node asks for the current key, which costs one exchange.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};

/// `RTMGRP_LINK` and `RTMGRP_IPV4_IFADDR` of `<linux/rtnetlink.h>`.
const GROUPS: u32 = 0x1 | 0x10;

/// What changed on a link the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkChange {
    /// It can communicate again: a link came up and runs, or the address came.
    Up,
    /// It went down, or lost the address.
    Down,
}

/// Link and address events from the kernel. See the module docs.
pub struct LinkWatch {
    sock: TokioSocket,
    iface: Ipv4Addr,
    /// Link index → up and running.
    running: HashMap<u32, bool>,
    /// Link index → its IPv4 addresses.
    addrs: HashMap<u32, HashSet<Ipv4Addr>>,
    pending: VecDeque<(LinkChange, String)>,
}

impl LinkWatch {
    /// Opens the socket and learns the current links and addresses.
    pub async fn open(iface: Ipv4Addr) -> io::Result<LinkWatch> {
        let mut sock = TokioSocket::new(NETLINK_ROUTE)?;
        sock.socket_mut().bind(&SocketAddr::new(0, GROUPS))?;
        let mut w = LinkWatch {
            sock,
            iface,
            running: HashMap::new(),
            addrs: HashMap::new(),
            pending: VecDeque::new(),
        };
        // One dump at a time on a socket: links, then addresses.
        w.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()), 1)
            .await?;
        let mut am = AddressMessage::default();
        am.header.family = AddressFamily::Inet;
        w.dump(RouteNetlinkMessage::GetAddress(am), 2).await?;
        // What the dumps said is the starting point, not a change.
        w.pending.clear();
        Ok(w)
    }

    async fn dump(&mut self, req: RouteNetlinkMessage, seq: u32) -> io::Result<()> {
        let mut msg = NetlinkMessage::from(req);
        msg.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        msg.header.sequence_number = seq;
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.sock
            .send_to(&buf, &SocketAddr::new(0, 0))
            .await
            .map(|_| ())?;
        loop {
            let (bytes, from) = self.sock.recv_from_full().await?;
            if from.port_number() != 0 {
                continue;
            }
            if self.absorb(&bytes, Some(seq)) {
                return Ok(());
            }
        }
    }

    /// The next change (cancel-safe: a change already read waits in a queue).
    pub async fn next(&mut self) -> io::Result<(LinkChange, String)> {
        loop {
            if let Some(c) = self.pending.pop_front() {
                return Ok(c);
            }
            match self.sock.recv_from_full().await {
                Ok((bytes, from)) => {
                    if from.port_number() == 0 {
                        self.absorb(&bytes, None);
                    }
                }
                Err(e) if e.raw_os_error() == Some(105) => {
                    // ENOBUFS: the kernel dropped events; something may have changed.
                    return Ok((LinkChange::Up, "link events were lost (ENOBUFS)".into()));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A change already waiting on the socket, without blocking.
    pub fn try_next(&mut self) -> Option<(LinkChange, String)> {
        while self.pending.is_empty() {
            match self.sock.socket_ref().recv_from_full() {
                Ok((bytes, from)) => {
                    if from.port_number() == 0 {
                        self.absorb(&bytes, None);
                    }
                }
                Err(_) => break,
            }
        }
        self.pending.pop_front()
    }

    fn relevant(&self, index: u32) -> bool {
        self.iface.is_unspecified()
            || self
                .addrs
                .get(&index)
                .is_some_and(|a| a.contains(&self.iface))
    }

    /// Takes in one datagram of netlink messages; true once the dump `done` ends.
    fn absorb(&mut self, mut bytes: &[u8], done: Option<u32>) -> bool {
        let mut finished = false;
        while !bytes.is_empty() {
            let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes) else {
                break;
            };
            let len = (msg.header.length as usize).next_multiple_of(4);
            match msg.payload {
                NetlinkPayload::Done(_) | NetlinkPayload::Error(_)
                    if done == Some(msg.header.sequence_number) =>
                {
                    finished = true
                }
                NetlinkPayload::InnerMessage(m) => self.message(m),
                _ => {}
            }
            if len == 0 || len >= bytes.len() {
                break;
            }
            bytes = &bytes[len..];
        }
        finished
    }

    fn message(&mut self, m: RouteNetlinkMessage) {
        match m {
            RouteNetlinkMessage::NewLink(l) => {
                let i = l.header.index;
                let f = l.header.flags;
                let up = f.contains(LinkFlags::Up) && f.contains(LinkFlags::Running);
                let before = self.running.insert(i, up);
                if before == Some(!up) && self.relevant(i) {
                    let change = if up { LinkChange::Up } else { LinkChange::Down };
                    let what = if up { "runs again" } else { "went down" };
                    self.pending
                        .push_back((change, format!("link {} {what}", link_name(&l))));
                }
            }
            RouteNetlinkMessage::DelLink(l) => {
                let i = l.header.index;
                if self.running.remove(&i) == Some(true) && self.relevant(i) {
                    self.pending.push_back((
                        LinkChange::Down,
                        format!("link {} was removed", link_name(&l)),
                    ));
                }
                self.addrs.remove(&i);
            }
            RouteNetlinkMessage::NewAddress(a) => {
                if let Some(ip) = ipv4(&a) {
                    let new = self.addrs.entry(a.header.index).or_default().insert(ip);
                    if new && (self.iface.is_unspecified() || ip == self.iface) {
                        self.pending
                            .push_back((LinkChange::Up, format!("address {ip} added")));
                    }
                }
            }
            RouteNetlinkMessage::DelAddress(a) => {
                if let Some(ip) = ipv4(&a) {
                    let gone = self
                        .addrs
                        .get_mut(&a.header.index)
                        .is_some_and(|s| s.remove(&ip));
                    if gone && (self.iface.is_unspecified() || ip == self.iface) {
                        self.pending
                            .push_back((LinkChange::Down, format!("address {ip} removed")));
                    }
                }
            }
            _ => {}
        }
    }
}

fn link_name(l: &LinkMessage) -> String {
    l.attributes
        .iter()
        .find_map(|a| match a {
            netlink_packet_route::link::LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_else(|| format!("#{}", l.header.index))
}

fn ipv4(a: &AddressMessage) -> Option<Ipv4Addr> {
    a.attributes.iter().find_map(|x| match x {
        AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => {
            Some(*ip)
        }
        _ => None,
    })
}
