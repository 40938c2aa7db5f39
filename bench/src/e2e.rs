//! The data path end to end (issue 11, item 7): messages per second and
//! latency from a sending client to a receiving client, through
//!
//! - **keyfleet**: client → Unix datagram → agent A (seals) → UDP multicast →
//!   agent B (opens) → Unix datagram → client;
//! - **relay**: the same hops without the protocol: client → Unix datagram →
//!   relay process → UDP multicast → relay process → Unix datagram → client
//!   (`keyfleet-bench relay`, this binary; the limit of this architecture);
//! - **multicast**: plain UDP multicast from a sending thread to a receiving
//!   thread of this process (no Unix hops).
//!
//! The sender sends `count` messages as fast as the first hop takes them
//! (a blocking Unix send waits for room in the agent's or relay's queue;
//! multicast has no such brake); each carries its index and the send time
//! (`CLOCK_MONOTONIC`, shared by the processes of one machine). The receiver
//! reads as fast as it can. Rate = messages received / (last receive − first
//! send); latency from the times carried; dropped = sent − received.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::fleet::{Bins, KfFleet};
use crate::procs::PortPool;
use crate::stats::percentile;

/// Plaintext sizes measured.
pub const SIZES: [usize; 2] = [64, 1024];

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct E2eRow {
    /// `keyfleet`, `relay`, `multicast`.
    pub path: String,
    pub size: usize,
    pub sent: u64,
    pub received: u64,
    pub dropped: u64,
    pub msgs_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Messages received out of order (index below one already seen).
    pub reordered: u64,
    /// Messages per second of each run, in the order run (keyfleet and
    /// relay alternate); `msgs_per_s` is their median, and the latencies and
    /// CPU are the median run's. `sent`, `received`, `dropped` and
    /// `reordered` add up all runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rates: Vec<f64>,
    /// CPU time (user and system) the path's two forwarding processes used
    /// per message received: agents A and B, or the two relays. Unlike the
    /// rate, it does not depend on how the scheduler shares two cores
    /// among five busy processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_msg: Option<f64>,
    /// The same for `keyfleet serve`, which hears every group message too
    /// (it opens group data to tell a leaked key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller_cpu_us_per_msg: Option<f64>,
    /// keyfleet path: the most deliveries agent B held at once for a
    /// client whose socket queue was full, since it started (its
    /// `app_backlog_peak`, so over this size's runs and those before;
    /// 3 500 of 1 KiB are held before any is dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog_peak: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

/// A message body: index, send time, padding to `size`.
fn body(i: u64, size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size.max(16));
    v.extend_from_slice(&i.to_be_bytes());
    v.extend_from_slice(&now_ns().to_be_bytes());
    v.resize(size.max(16), b'x');
    v
}

/// What the receiver saw.
struct Seen {
    lat_ns: Vec<f64>,
    last_ns: u64,
    reordered: u64,
}

fn parse(b: &[u8], seen: &mut Seen, max: &mut Option<u64>) {
    let (Some(i), Some(t)) = (b.get(..8), b.get(8..16)) else {
        return;
    };
    let i = u64::from_be_bytes(i.try_into().unwrap_or_default());
    let t = u64::from_be_bytes(t.try_into().unwrap_or_default());
    let now = now_ns();
    seen.lat_ns.push(now.saturating_sub(t) as f64);
    seen.last_ns = now;
    match max {
        Some(m) if i < *m => seen.reordered += 1,
        _ => *max = Some(i),
    }
}

/// Receives until `count` arrived or nothing came for the socket's read
/// timeout; `strip` bytes of framing precede the body.
fn receive(
    mut recv: impl FnMut(&mut [u8]) -> std::io::Result<usize>,
    count: u64,
    strip: usize,
) -> Seen {
    let mut buf = vec![0u8; 4096];
    let mut seen = Seen {
        lat_ns: Vec::with_capacity(count as usize),
        last_ns: 0,
        reordered: 0,
    };
    let mut max = None;
    while (seen.lat_ns.len() as u64) < count {
        match recv(&mut buf) {
            Ok(n) => parse(buf.get(strip..n).unwrap_or_default(), &mut seen, &mut max),
            Err(_) => break,
        }
    }
    seen
}

/// CPU time per message received, in µs, from readings before and after.
fn per_msg(before: Option<Duration>, after: Option<Duration>, received: u64) -> Option<f64> {
    let used = after?.checked_sub(before?)?;
    (received > 0).then(|| used.as_secs_f64() * 1e6 / received as f64)
}

fn row(path: &str, size: usize, sent: u64, first_ns: u64, seen: Seen) -> E2eRow {
    let lat = seen.lat_ns;
    let received = lat.len() as u64;
    let secs = seen.last_ns.saturating_sub(first_ns) as f64 / 1e9;
    E2eRow {
        path: path.into(),
        size,
        sent,
        received,
        dropped: sent.saturating_sub(received),
        msgs_per_s: if secs > 0.0 {
            received as f64 / secs
        } else {
            0.0
        },
        p50_us: percentile(&lat, 50).unwrap_or(f64::NAN) / 1000.0,
        p99_us: percentile(&lat, 99).unwrap_or(f64::NAN) / 1000.0,
        reordered: seen.reordered,
        rates: Vec::new(),
        cpu_us_per_msg: None,
        controller_cpu_us_per_msg: None,
        backlog_peak: None,
        error: None,
    }
}

/// The receiver gives up after this long without a message.
const IDLE: Duration = Duration::from_secs(3);

/// A path through two forwarding processes, as its clients see it.
struct Hops<'a> {
    /// Where the sending client sends.
    into: &'a Path,
    /// The first byte of every message sent, when the first hop wants one.
    frame: Option<u8>,
    /// Bytes of framing before the body of a delivered message.
    strip: usize,
    /// The forwarding processes, whose CPU time is counted.
    forwarders: &'a [u32],
}

/// The client sends through `hops`; the receiving client `client` reads.
fn through_unix(
    path: &str,
    size: usize,
    count: u64,
    hops: Hops<'_>,
    client: UnixDatagram,
) -> anyhow::Result<E2eRow> {
    let Hops {
        into,
        frame,
        strip,
        forwarders,
    } = hops;
    client.set_read_timeout(Some(IDLE))?;
    let cpu_before = crate::procs::cpu_total(forwarders);
    let rx = std::thread::spawn(move || {
        receive(
            |b| loop {
                let n = client.recv(b)?;
                // Only deliveries count (not the agent's other answers).
                if frame.is_none() || b.first() == Some(&b'M') {
                    return Ok(n);
                }
            },
            count,
            strip,
        )
    });
    let tx = UnixDatagram::unbound()?;
    let first = now_ns();
    for i in 0..count {
        let mut m = Vec::with_capacity(size + 1);
        m.extend(frame);
        m.extend(body(i, size));
        tx.send_to(&m, into)
            .with_context(|| format!("sending to {}", into.display()))?;
    }
    let seen = rx
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    let mut r = row(path, size, count, first, seen);
    r.cpu_us_per_msg = per_msg(cpu_before, crate::procs::cpu_total(forwarders), r.received);
    Ok(r)
}

/// Plain multicast between a sending and a receiving thread.
fn multicast(group: SocketAddrV4, size: usize, count: u64) -> anyhow::Result<E2eRow> {
    let rx = keyfleet::net::socket::group_socket(group, Ipv4Addr::LOCALHOST)?;
    rx.set_nonblocking(false)?;
    rx.set_read_timeout(Some(IDLE))?;
    let tx = keyfleet::net::socket::unicast_socket(
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
        Ipv4Addr::LOCALHOST,
        1,
    )?;
    tx.set_nonblocking(false)?;
    let h = std::thread::spawn(move || receive(|b| rx.recv(b), count, 0));
    std::thread::sleep(Duration::from_millis(50));
    let first = now_ns();
    for i in 0..count {
        tx.send_to(&body(i, size), group)?;
    }
    let seen = h.join().map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    Ok(row("multicast", size, count, first, seen))
}

/// `keyfleet-bench relay`: forwards every datagram received on the Unix
/// socket `listen` to `group`, and (with `deliver`) every datagram of
/// `group` to the Unix socket `deliver`. Runs until killed.
pub fn relay(listen: &Path, group: SocketAddrV4, deliver: Option<&Path>) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(listen);
    let unix =
        UnixDatagram::bind(listen).with_context(|| format!("binding {}", listen.display()))?;
    if let Some(to) = deliver {
        let rx = keyfleet::net::socket::group_socket(group, Ipv4Addr::LOCALHOST)?;
        rx.set_nonblocking(false)?;
        let out = unix.try_clone()?;
        let to = to.to_path_buf();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = rx.recv(&mut buf) {
                // Blocking: waits for room in the client's queue.
                let _ = out.send_to(buf.get(..n).unwrap_or_default(), &to);
            }
        });
    }
    let tx = keyfleet::net::socket::unicast_socket(
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
        Ipv4Addr::LOCALHOST,
        1,
    )?;
    tx.set_nonblocking(false)?;
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = unix.recv(&mut buf)?;
        tx.send_to(buf.get(..n).unwrap_or_default(), group)?;
    }
}

/// A child process killed when dropped.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn relay_path(dir: &Path, group: SocketAddrV4, size: usize, count: u64) -> anyhow::Result<E2eRow> {
    let me = std::env::current_exe()?;
    let tag = format!("{}-{size}", group.port());
    let r1 = dir.join(format!("relay1-{tag}.sock"));
    let r2 = dir.join(format!("relay2-{tag}.sock"));
    let client = dir.join(format!("client-{tag}.sock"));
    let sink = UnixDatagram::bind(&client)?;
    let spawn = |listen: &PathBuf, deliver: Option<&PathBuf>| -> anyhow::Result<Kill> {
        let mut c = Command::new(&me);
        c.arg("relay")
            .arg("--listen")
            .arg(listen)
            .arg("--group")
            .arg(group.to_string());
        if let Some(d) = deliver {
            c.arg("--deliver").arg(d);
        }
        Ok(Kill(c.spawn()?))
    };
    let _a = spawn(&r1, None)?;
    let _b = spawn(&r2, Some(&client))?;
    crate::procs::wait_for(
        "the relays' sockets",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || Ok((r1.exists() && r2.exists()).then_some(())),
    )?;
    std::thread::sleep(Duration::from_millis(100));
    let pids = [_a.0.id(), _b.0.id()];
    let hops = Hops {
        into: &r1,
        frame: None,
        strip: 0,
        forwarders: &pids,
    };
    through_unix("relay", size, count, hops, sink)
}

/// Through two agents of a running fleet; also, when not every message
/// arrived, where the agents' counters say the missing ones went.
fn keyfleet_path(
    fleet: &KfFleet,
    dir: &Path,
    size: usize,
    count: u64,
) -> anyhow::Result<(E2eRow, Option<String>)> {
    static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (a, b) = (fleet.agent_state(0), fleet.agent_state(1));
    let client = dir.join(format!("kf-client-{size}-{run}.sock"));
    let sink = UnixDatagram::bind(&client)?;
    sink.set_read_timeout(Some(Duration::from_secs(10)))?;
    sink.send_to(b"R", b.join("app.sock"))?;
    let mut buf = [0u8; 64];
    let n = sink.recv(&mut buf)?;
    anyhow::ensure!(
        buf.get(..n) == Some(b"R".as_slice()),
        "agent B did not register the client"
    );
    let before = [running(dir, &a)?, running(dir, &b)?];
    let overflows_before = keyfleet::net::socket::udp_rcvbuf_errors();
    let agents: Vec<u32> = [fleet.agent_pid(0), fleet.agent_pid(1)]
        .into_iter()
        .flatten()
        .collect();
    let serve: Vec<u32> = fleet.serve_pid().into_iter().collect();
    let serve_before = crate::procs::cpu_total(&serve);
    // `M` framing: kind, sender, seq, epoch.
    let hops = Hops {
        into: &a.join("app.sock"),
        frame: Some(b'S'),
        strip: 17,
        forwarders: &agents,
    };
    let r = through_unix("keyfleet", size, count, hops, sink);
    // The client socket is closed; agent B drops the client at its next
    // delivery (the next run registers a client of its own).
    let _ = std::fs::remove_file(&client);
    let mut r = r?;
    r.controller_cpu_us_per_msg =
        per_msg(serve_before, crate::procs::cpu_total(&serve), r.received);
    let after = [running(dir, &a)?, running(dir, &b)?];
    r.backlog_peak = after[1]["app_backlog_peak"].as_u64();
    let lost = (r.dropped > 0).then(|| {
        let mut l = where_lost(&before, &after);
        if let (Some(b), Some(a)) = (overflows_before, keyfleet::net::socket::udp_rcvbuf_errors()) {
            l.push_str(&format!(
                "; UDP receive buffers that overflowed on this host meanwhile (any socket, serve's too): {}",
                a.saturating_sub(b)
            ));
        }
        l
    });
    Ok((r, lost))
}

/// The counters of agents A and B that account for a message between the
/// two clients, as changed over a run: what A sent or lost sending, then
/// what B received, refused, could not open, delivered or dropped.
const ACCOUNT: [(usize, &str); 8] = [
    (0, "data_sent"),
    (0, "send_dropped"),
    (0, "send_errors"),
    (1, "datagrams_in"),
    (1, "refused"),
    (1, "undecryptable"),
    (1, "delivered"),
    (1, "app_dropped"),
];

/// What the agents' counters say of a run that lost messages, e.g. `agent
/// A data_sent +300000, agent A send_dropped +0, ...` (a counter an
/// older agent does not report is left out).
fn where_lost(before: &[serde_json::Value; 2], after: &[serde_json::Value; 2]) -> String {
    let parts: Vec<String> = ACCOUNT
        .iter()
        .filter_map(|&(agent, key)| {
            let (b, a) = (before[agent][key].as_u64()?, after[agent][key].as_u64()?);
            Some(format!(
                "agent {} {key} +{}",
                ["A", "B"][agent],
                a.saturating_sub(b)
            ))
        })
        .collect();
    parts.join(", ")
}

/// Agent `state`'s running counters, asked over its application socket.
fn running(dir: &Path, state: &Path) -> anyhow::Result<serde_json::Value> {
    let me = dir.join(format!("status-{}.sock", rand::random::<u32>()));
    let s = UnixDatagram::bind(&me)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.send_to(b"?", state.join("app.sock"))?;
    let mut buf = vec![0u8; 65_536];
    let v = loop {
        let n = s.recv(&mut buf)?;
        if buf.first() == Some(&b'?') {
            let v: serde_json::Value = serde_json::from_slice(buf.get(1..n).unwrap_or_default())?;
            break v["running"].clone();
        }
    };
    let _ = std::fs::remove_file(&me);
    Ok(v)
}

/// Runs of the keyfleet and relay paths at each size, alternated.
pub const RUNS: usize = 3;

/// One row for a path's runs: the median run by rate, with the counts of
/// all runs added up and every rate listed; the first failure when a run
/// failed (a failed run is not left out of the figures quietly).
fn median_run(runs: Vec<anyhow::Result<E2eRow>>) -> anyhow::Result<E2eRow> {
    let mut ok = Vec::new();
    for r in runs {
        ok.push(r?);
    }
    let rates: Vec<f64> = ok.iter().map(|r| r.msgs_per_s).collect();
    let peak = ok.iter().filter_map(|r| r.backlog_peak).max();
    let (sent, received, dropped, reordered) = ok.iter().fold((0, 0, 0, 0), |a, r| {
        (
            a.0 + r.sent,
            a.1 + r.received,
            a.2 + r.dropped,
            a.3 + r.reordered,
        )
    });
    let errors: Vec<String> = ok.iter().filter_map(|r| r.error.clone()).collect();
    ok.sort_by(|a, b| a.msgs_per_s.total_cmp(&b.msgs_per_s));
    let mid = ok.len() / 2;
    let mut row = ok.swap_remove(mid);
    row.sent = sent;
    row.received = received;
    row.dropped = dropped;
    row.reordered = reordered;
    row.rates = rates;
    row.backlog_peak = peak;
    row.error = (!errors.is_empty()).then(|| errors.join("; "));
    Ok(row)
}

/// Every path at every size, `count` messages a run; prints a line per row.
pub fn run(bins: &Bins, count: u64, base_port: u16) -> Vec<E2eRow> {
    let mut rows = Vec::new();
    let mut ports = PortPool::new(base_port);
    let dir = match tempfile::Builder::new().prefix("kfb-e2e-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("end to end: no temporary directory: {e}");
            return rows;
        }
    };
    let fleet = KfFleet::start(bins, 2, &mut ports, None);
    let group = |p: &mut PortPool| -> anyhow::Result<SocketAddrV4> {
        Ok(SocketAddrV4::new(
            Ipv4Addr::new(239, 255, 201, 7),
            p.take()?,
        ))
    };
    for size in SIZES {
        // keyfleet and the relay alternate, RUNS times each: the rate of
        // either moves more from run to run than a change to compare.
        let (mut kf, mut relay) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            kf.push(match &fleet {
                Ok(f) => keyfleet_path(f, dir.path(), size, count).map(|(mut r, lost)| {
                    r.error = lost.map(|l| format!("{} lost: {l}", r.dropped));
                    r
                }),
                Err(e) => Err(anyhow::anyhow!("the keyfleet fleet did not start: {e:#}")),
            });
            relay.push(group(&mut ports).and_then(|g| relay_path(dir.path(), g, size, count)));
        }
        let mc = group(&mut ports).and_then(|g| multicast(g, size, count));
        for (path, r) in [
            ("keyfleet", median_run(kf)),
            ("relay", median_run(relay)),
            ("multicast", mc),
        ] {
            let r = r.unwrap_or_else(|e| E2eRow {
                path: path.into(),
                size,
                error: Some(format!("{e:#}")),
                ..E2eRow::default()
            });
            let cpu = match (r.cpu_us_per_msg, r.controller_cpu_us_per_msg) {
                (Some(f), Some(c)) => format!("  cpu {f:.1} us/msg (+ controller {c:.1})"),
                (Some(f), None) => format!("  cpu {f:.1} us/msg"),
                _ => String::new(),
            };
            let runs = if r.rates.len() > 1 {
                let v: Vec<String> = r.rates.iter().map(|x| format!("{x:.0}")).collect();
                format!("  runs {}", v.join("/"))
            } else {
                String::new()
            };
            eprintln!(
                "{:>9} {:>5} B: {:>9.0} msg/s  p50 {:>8.0} us  p99 {:>8.0} us  received {}/{}  dropped {}{cpu}{runs}{}",
                r.path,
                r.size,
                r.msgs_per_s,
                r.p50_us,
                r.p99_us,
                r.received,
                r.sent,
                r.dropped,
                r.error
                    .as_deref()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default()
            );
            rows.push(r);
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rate: f64, dropped: u64, error: Option<&str>) -> anyhow::Result<E2eRow> {
        Ok(E2eRow {
            path: "keyfleet".into(),
            size: 64,
            sent: 100,
            received: 100 - dropped,
            dropped,
            msgs_per_s: rate,
            p50_us: rate / 1000.0,
            error: error.map(String::from),
            ..E2eRow::default()
        })
    }

    #[test]
    fn the_median_run_stands_for_the_runs_and_no_drop_or_failure_is_left_out() {
        let r = median_run(vec![
            run(70.0, 0, None),
            run(90.0, 5, None),
            run(50.0, 1, Some("agent B counted 1 app_dropped")),
        ])
        .unwrap();
        assert_eq!(r.msgs_per_s, 70.0, "the median rate");
        assert_eq!(r.p50_us, 0.07, "the median run's latency");
        assert_eq!(
            (r.sent, r.received, r.dropped),
            (300, 294, 6),
            "counts of all runs"
        );
        assert_eq!(r.rates, [70.0, 90.0, 50.0], "every rate, in the order run");
        assert_eq!(r.error.as_deref(), Some("agent B counted 1 app_dropped"));
        let failed = median_run(vec![
            run(70.0, 0, None),
            Err(anyhow::anyhow!("address in use")),
        ]);
        assert_eq!(
            failed.unwrap_err().to_string(),
            "address in use",
            "a failed run fails the row"
        );
    }

    /// A run that lost messages says where, from the agents' counters; a
    /// counter an older agent does not report is left out.
    #[test]
    fn a_loss_is_told_by_the_counters_that_moved() {
        let before = [
            serde_json::json!({"data_sent": 10, "send_dropped": 0}),
            serde_json::json!({"datagrams_in": 5, "delivered": 5, "app_dropped": 0}),
        ];
        let after = [
            serde_json::json!({"data_sent": 110, "send_dropped": 0}),
            serde_json::json!({"datagrams_in": 103, "delivered": 103, "app_dropped": 2}),
        ];
        assert_eq!(
            where_lost(&before, &after),
            "agent A data_sent +100, agent A send_dropped +0, agent B datagrams_in +98, \
             agent B delivered +98, agent B app_dropped +2"
        );
    }
}
