//! Child processes for the rotation benchmarks: loopback ports, commands
//! with a time limit, and a fleet of processes killed when dropped.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Hands out loopback ports free for both TCP and UDP (Serf uses both on one
/// port), scanning upward from a base.
pub struct PortPool {
    next: u16,
}

impl PortPool {
    pub fn new(base: u16) -> PortPool {
        PortPool { next: base }
    }

    /// The next port that 127.0.0.1 can bind for TCP and UDP right now.
    pub fn take(&mut self) -> anyhow::Result<u16> {
        while self.next < u16::MAX {
            let p = self.next;
            self.next += 1;
            let a = SocketAddrV4::new(Ipv4Addr::LOCALHOST, p);
            let tcp = TcpListener::bind(a);
            let udp = UdpSocket::bind(a);
            if tcp.is_ok() && udp.is_ok() {
                return Ok(p);
            }
        }
        bail!("no free loopback port left above the pool's base")
    }
}

/// Runs `cmd` to completion within `limit`; returns its wall time and output.
/// A command still running at the limit is killed and reported.
pub fn timed(mut cmd: Command, limit: Duration) -> anyhow::Result<(Duration, Output)> {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("while starting {what}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = child.wait_with_output();
        let _ = tx.send((t0.elapsed(), r));
    });
    match rx.recv_timeout(limit) {
        Ok((e, r)) => Ok((e, r.with_context(|| format!("while waiting for {what}"))?)),
        Err(_) => {
            // The waiting thread owns the child; end it by its pid.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            bail!("{what} did not finish within {limit:?}; killed")
        }
    }
}

/// `timed`, and an error with its stderr unless it exits 0.
pub fn timed_ok(cmd: Command, limit: Duration) -> anyhow::Result<(Duration, Output)> {
    let what = format!("{cmd:?}");
    let (d, out) = timed(cmd, limit)?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok((d, out))
}

/// Long-running processes (agents), each logging to its own file; all are
/// killed and reaped when the fleet is dropped.
#[derive(Default)]
pub struct Fleet {
    children: Vec<(String, Child)>,
}

impl Fleet {
    /// Start `cmd` with stdout and stderr to `log`.
    pub fn spawn(&mut self, name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<()> {
        let f = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let g = f.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(f).stderr(g);
        let child = cmd
            .spawn()
            .with_context(|| format!("while starting {name}: {cmd:?}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// The names of processes that have already exited.
    pub fn exited(&mut self) -> Vec<String> {
        self.children
            .iter_mut()
            .filter_map(|(n, c)| matches!(c.try_wait(), Ok(Some(_))).then(|| n.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// The process id of the child started as `name`.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
    }

    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
        }
        for (_, c) in &mut self.children {
            let _ = c.wait();
        }
    }
}

/// The last `n` lines of a log file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Poll `check` every `every` until it returns `Some`, or fail after `limit`.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if t0.elapsed() >= limit {
            bail!("{what}: not reached within {limit:?}");
        }
        std::thread::sleep(every);
    }
}

/// CPU time a process has used so far, user and system, all its threads
/// (`/proc/PID/stat` fields 14 and 15, in clock ticks). `None` when the
/// process is gone or the file does not read as expected.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from its closing parenthesis.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let hz = rustix::param::clock_ticks_per_second();
    (hz > 0).then(|| Duration::from_secs_f64((utime + stime) as f64 / hz as f64))
}

/// The CPU time `pids` used together, when every one of them could be read.
pub fn cpu_total(pids: &[u32]) -> Option<Duration> {
    pids.iter().map(|p| cpu_time(*p)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_skips_a_port_in_use() {
        let held = UdpSocket::bind("127.0.0.1:0").unwrap();
        let busy = held.local_addr().unwrap().port();
        let mut pool = PortPool::new(busy);
        let p = pool.take().unwrap();
        assert_ne!(p, busy);
        assert!(p > busy);
    }

    #[test]
    fn timed_kills_a_command_past_its_limit() {
        let mut c = Command::new("sleep");
        c.arg("5");
        let t0 = Instant::now();
        let e = timed(c, Duration::from_millis(200)).unwrap_err();
        assert!(e.to_string().contains("did not finish"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(4));
    }

    #[test]
    fn timed_ok_reports_a_failing_command() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo nope >&2; exit 3"]);
        let e = timed_ok(c, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn cpu_time_reads_this_process_and_grows_with_work() {
        let me = std::process::id();
        let before = cpu_time(me).expect("this process's CPU time");
        let mut x = 0u64;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = cpu_time(me).expect("this process's CPU time");
        assert!(
            after >= before + Duration::from_millis(50),
            "{before:?} then {after:?}"
        );
        assert_eq!(cpu_total(&[me, me]).map(|d| d >= after * 2), Some(true));
        assert_eq!(cpu_time(u32::MAX), None, "no such process");
        assert_eq!(cpu_total(&[me, u32::MAX]), None);
    }
}
