//! The tokio UDP multicast driver: it carries bytes and time, nothing else.
//!
//! No protocol decision lives here. The pieces compose into a driver loop of a
//! few lines around a pure machine:
//!
//! - [`NetConfig`] / [`NetArgs`]: the `--group ADDR:PORT`, `--iface ADDR`,
//!   `--listen ADDR:PORT`, `--loss P` and receive-delay (`--delay-ms`,
//!   `--data-delay-ms`, `--delay-jitter-ms`: [`Delay`]) flags of the agent;
//! - [`socket`]: the socket set-up (multicast group socket shared by several
//!   agents on one host, per-agent unicast socket);
//! - [`Transport`]: `send_group`, `send_to`, `recv` → [`Datagram`] (bytes, source,
//!   arrival time), with receive-side [`Loss`] injection from a seeded RNG;
//! - [`Clock`]: milliseconds as `u64`, the `now` handed to the machines;
//! - [`Timers`]: deadlines keyed by an id, [`Timers::next_deadline`], and
//!   [`jitter`] / [`backoff`] helpers.
//!
//! A driver loop looks like this (the machine and its action type belong to
//! the protocol core):
//!
//! ```no_run
//! # async fn demo() -> Result<(), keyfleet::net::NetError> {
//! use keyfleet::net::{Clock, NetConfig, Timers, Transport};
//! let clock = Clock::wall();
//! let mut transport = Transport::bind(&NetConfig::loopback(7777), clock.clone())?;
//! let mut timers: Timers<u32> = Timers::new();
//! loop {
//!     tokio::select! {
//!         d = transport.recv() => {
//!             let d = d?;
//!             // actions = machine.handle(d.at_ms, Input::Datagram(d.from, d.bytes));
//!         }
//!         expired = timers.expired(&clock) => {
//!             for id in expired {
//!                 // id 0, the machine's: machine.handle(clock.now_ms(), Input::Timeout)
//!             }
//!         }
//!     }
//!     // for a in actions: transport.send_group(..) / send_to(..)
//!     // then timers.arm(0, machine.poll_timeout()), the machine's next deadline
//! }
//! # }
//! ```

pub mod socket;
mod timers;
mod transport;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

pub use timers::{backoff, jitter, Clock, Timers};
pub use transport::{Datagram, Delay, Loss, Stats, Transport, Via};

/// The defaults live with the configuration file's, which uses them too.
pub use crate::config::{DEFAULT_GROUP, DEFAULT_IFACE};
/// The multicast TTL: 1, the datagrams stay on the local link (SPEC: a LAN).
pub const DEFAULT_TTL: u32 = 1;

/// What went wrong on the network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0} is not an IPv4 multicast address (224.0.0.0/4); use e.g. 239.255.77.77:7777")]
    NotMulticast(SocketAddrV4),
    #[error(
        "--iface {0} is a multicast address; give the address of a local interface, e.g. 127.0.0.1"
    )]
    IfaceMulticast(Ipv4Addr),
    #[error("loss probability {0} is not between 0 and 1")]
    BadLoss(f64),
    #[error("cannot {what} ({addr}): {source}")]
    Setup {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot send {len} bytes to {to}: {source}")]
    Send {
        len: usize,
        to: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot receive on {on}: {source}")]
    Recv {
        on: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where and how to reach the fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfig {
    /// The multicast group and port the fleet shares.
    pub group: SocketAddrV4,
    /// The local address of the interface to join the group on and send from.
    pub iface: Ipv4Addr,
    /// The unicast socket for replies (port 0: any free port).
    pub listen: SocketAddrV4,
    /// Multicast TTL.
    pub ttl: u32,
    /// Receive-side loss probability (0 = none), for tests and the simulator.
    pub loss: f64,
    /// Seed of the loss RNG (and of the delay jitter's).
    pub loss_seed: u64,
    /// Receive-side delay (none = off), for tests.
    pub delay: Delay,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            group: DEFAULT_GROUP,
            iface: DEFAULT_IFACE,
            listen: SocketAddrV4::new(DEFAULT_IFACE, 0),
            ttl: DEFAULT_TTL,
            loss: 0.0,
            loss_seed: 0,
            delay: Delay::default(),
        }
    }
}

impl NetConfig {
    /// Everything on loopback: group 239.255.77.77:`port`, interface 127.0.0.1,
    /// unicast socket on 127.0.0.1 at any free port.
    pub fn loopback(port: u16) -> Self {
        NetConfig {
            group: SocketAddrV4::new(*DEFAULT_GROUP.ip(), port),
            iface: Ipv4Addr::LOCALHOST,
            listen: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
            ..NetConfig::default()
        }
    }

    /// Checks the addresses and the loss probability.
    pub fn validate(&self) -> Result<(), NetError> {
        if !self.group.ip().is_multicast() {
            return Err(NetError::NotMulticast(self.group));
        }
        if self.iface.is_multicast() {
            return Err(NetError::IfaceMulticast(self.iface));
        }
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(NetError::BadLoss(self.loss));
        }
        Ok(())
    }
}

fn parse_group(s: &str) -> Result<SocketAddrV4, String> {
    let addr: SocketAddrV4 = s
        .parse()
        .map_err(|_| format!("{s:?} is not ADDR:PORT (IPv4), e.g. 239.255.77.77:7777"))?;
    if !addr.ip().is_multicast() {
        return Err(NetError::NotMulticast(addr).to_string());
    }
    Ok(addr)
}

fn parse_loss(s: &str) -> Result<f64, String> {
    let p: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number between 0 and 1"))?;
    if !(0.0..=1.0).contains(&p) {
        return Err(NetError::BadLoss(p).to_string());
    }
    Ok(p)
}

/// The network flags of both programs, to `#[command(flatten)]` into a clap command.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct NetArgs {
    /// Multicast group and port the fleet shares.
    #[arg(long, value_name = "ADDR:PORT", default_value_t = DEFAULT_GROUP, value_parser = parse_group)]
    pub group: SocketAddrV4,
    /// Local IPv4 address of the interface to join the group on and send from
    /// (0.0.0.0: chosen by the routing table; 127.0.0.1: loopback, for tests).
    #[arg(long, value_name = "ADDR", default_value_t = DEFAULT_IFACE)]
    pub iface: Ipv4Addr,
    /// Drop this fraction of received datagrams (0 to 1), for tests.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = parse_loss)]
    pub loss: f64,
    /// Seed of the loss injection's random generator (and the delay jitter's).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub loss_seed: u64,
    /// Hold every received control message this many ms before handling it,
    /// for tests (group data: --data-delay-ms).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub delay_ms: u64,
    /// Hold every received group data message this many ms [default: --delay-ms].
    #[arg(long, value_name = "MS")]
    pub data_delay_ms: Option<u64>,
    /// Vary each delay by up to ± this many ms (uniformly; reorders datagrams).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub delay_jitter_ms: u64,
}

impl NetArgs {
    /// The configuration, with the unicast socket on `listen` (the agent's
    /// `--listen ADDR:PORT`; the controller passes `iface:0`).
    pub fn config(&self, listen: SocketAddrV4) -> NetConfig {
        NetConfig {
            group: self.group,
            iface: self.iface,
            listen,
            ttl: DEFAULT_TTL,
            loss: self.loss,
            loss_seed: self.loss_seed,
            delay: Delay {
                control_ms: self.delay_ms,
                data_ms: self.data_delay_ms.unwrap_or(self.delay_ms),
                jitter_ms: self.delay_jitter_ms,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        net: NetArgs,
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.net.group.to_string(), "239.255.77.77:7777");
        assert_eq!(cli.net.iface.to_string(), "0.0.0.0");
        assert_eq!(cli.net.loss, 0.0);
    }

    #[test]
    fn flags_parse_and_bad_values_are_refused_with_a_hint() {
        let cli = Cli::try_parse_from([
            "x",
            "--group",
            "239.1.2.3:9000",
            "--iface",
            "127.0.0.1",
            "--loss",
            "0.1",
        ])
        .unwrap();
        assert_eq!(cli.net.group, "239.1.2.3:9000".parse().unwrap());
        assert_eq!(cli.net.iface, Ipv4Addr::LOCALHOST);
        let err = Cli::try_parse_from(["x", "--group", "10.0.0.1:9000"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an IPv4 multicast address"), "{err}");
        let err = Cli::try_parse_from(["x", "--group", "239.1.2.3"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("ADDR:PORT"), "{err}");
        let err = Cli::try_parse_from(["x", "--loss", "1.5"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("between 0 and 1"), "{err}");
    }

    #[test]
    fn validate_refuses_what_the_kernel_would_misuse() {
        let mut c = NetConfig::loopback(1);
        c.validate().unwrap();
        c.group = "10.0.0.1:1".parse().unwrap();
        assert!(matches!(c.validate(), Err(NetError::NotMulticast(_))));
        let mut c = NetConfig::loopback(1);
        c.iface = Ipv4Addr::new(239, 0, 0, 1);
        assert!(matches!(c.validate(), Err(NetError::IfaceMulticast(_))));
        let mut c = NetConfig::loopback(1);
        c.loss = -0.1;
        assert!(matches!(c.validate(), Err(NetError::BadLoss(_))));
    }
}
