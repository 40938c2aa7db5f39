//! Two network namespaces joined by a veth pair: one side's link can be
//! taken down and brought back while the processes on both sides run.
//!
//! Use from an integration test with `#[path = "support/netns.rs"] mod netns;`
//! and `#[path = "support/veth.rs"] mod veth;` at its root.

use std::net::Ipv4Addr;
use std::process::Command;

use super::netns::Netns;

/// Namespace `a` (interface `kfa`, 10.77.0.1/24) and `b` (`kfb`, 10.77.0.2/24).
pub struct VethPair {
    pub a: Netns,
    pub b: Netns,
}

pub const A_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const B_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl VethPair {
    /// Both namespaces (`Err(reason)` where they cannot be made here), the
    /// link up on both sides.
    pub fn create(tag: &str) -> Result<VethPair, String> {
        let a = Netns::create(&format!("{tag}a"))?;
        let b = Netns::create(&format!("{tag}b"))?;
        ip(&[
            "-n",
            a.name(),
            "link",
            "add",
            "kfa",
            "type",
            "veth",
            "peer",
            "name",
            "kfb",
            "netns",
            b.name(),
        ])?;
        ip(&["-n", a.name(), "addr", "add", "10.77.0.1/24", "dev", "kfa"])?;
        ip(&["-n", b.name(), "addr", "add", "10.77.0.2/24", "dev", "kfb"])?;
        let p = VethPair { a, b };
        p.set_a(true)?;
        ip(&["-n", p.b.name(), "link", "set", "kfb", "up"])?;
        Ok(p)
    }

    /// Takes side a's end of the link down (`false`) or up (`true`).
    pub fn set_a(&self, up: bool) -> Result<(), String> {
        ip(&[
            "-n",
            self.a.name(),
            "link",
            "set",
            "kfa",
            if up { "up" } else { "down" },
        ])
    }

    /// `ip netns exec NAME` as a command prefix.
    pub fn wrap(ns: &Netns) -> Vec<String> {
        ["ip", "netns", "exec", ns.name()]
            .map(String::from)
            .to_vec()
    }
}
