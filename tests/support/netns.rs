//! Network namespaces for tests: a fresh namespace with only `lo` up, an
//! optional nftables rule dropping a share of UDP, commands run inside it, and
//! removal when dropped.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables); [`Netns::create`] says
//! which is missing so a test can print why it skipped. CI installs both
//! (`scripts/dev deps`) and runs as root.
//!
//! Use from an integration test with `mod support;` and a `tests/support/mod.rs`
//! that has `pub mod netns;`.

use std::ffi::OsStr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

static SERIAL: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> Result<Output, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn have(program: &str, arg: &str) -> Result<(), String> {
    Command::new(program)
        .arg(arg)
        .output()
        .map(|_| ())
        .map_err(|e| format!("`{program}` is not available ({e}); install iproute2 and nftables (scripts/dev deps)"))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

impl Netns {
    /// A new namespace named `kf-TAG-PID-N` with `lo` up; `Err(reason)` when it
    /// cannot be set up here.
    pub fn create(tag: &str) -> Result<Netns, String> {
        if !is_root() {
            return Err("not root: network namespaces and nftables need root".into());
        }
        have("ip", "-V")?;
        have("nft", "--version")?;
        let name = format!(
            "kf-{tag}-{}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Drops `percent`% of the UDP datagrams entering any socket of the
    /// namespace (`numgen random mod 100 < percent drop` on the input hook),
    /// multicast on `lo` included. Each datagram is dropped once for all its
    /// receivers in the namespace.
    pub fn drop_udp_percent(&self, percent: u8) -> Result<(), String> {
        let rules = format!(
            "table inet keyfleet_loss {{\n\
               chain input {{\n\
                 type filter hook input priority 0; policy accept;\n\
                 meta l4proto udp numgen random mod 100 < {percent} counter drop\n\
               }}\n\
             }}\n"
        );
        let path = std::env::temp_dir().join(format!("{}.nft", self.name));
        std::fs::write(&path, rules)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let res = run(self.command("nft").arg("-f").arg(&path));
        let _ = std::fs::remove_file(&path);
        res.map(|_| ())
    }

    /// The packets the drop rule has dropped so far (from its counter).
    pub fn dropped_packets(&self) -> Result<u64, String> {
        let out = run(self
            .command("nft")
            .args(["list", "table", "inet", "keyfleet_loss"]))?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("no packet counter in: {text}"))
    }

    /// Removes the drop rule.
    pub fn clear_rules(&self) -> Result<(), String> {
        run(self
            .command("nft")
            .args(["delete", "table", "inet", "keyfleet_loss"]))
        .map(|_| ())
    }

    /// `program` to be run inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still running inside keep their namespace alive until they exit.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
