//! The UDP driver on real multicast over loopback: sockets in one process,
//! two processes, and receive-side loss injection.

use crate::support;
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keyfleet::net::{Clock, Loss, NetConfig, Transport, Via};
use tokio::time::timeout;

/// A free UDP port ([`support::free_port`]: one no other test of this binary
/// holds) and a group address of its own, so tests running in parallel do
/// not hear each other.
fn fresh_config(group_last: u8) -> NetConfig {
    let port = support::free_port();
    let mut cfg = NetConfig::loopback(port);
    cfg.group = SocketAddrV4::new(Ipv4Addr::new(239, 255, 78, group_last), port);
    cfg
}

async fn recv_within(t: &mut Transport, ms: u64) -> keyfleet::net::Datagram {
    timeout(Duration::from_millis(ms), t.recv())
        .await
        .expect("a datagram within the time limit")
        .expect("receive")
}

#[tokio::test]
async fn two_agents_in_one_process_share_the_group_port() {
    let _heavy = support::heavy();
    let cfg = fresh_config(1);
    let clock = Clock::wall();
    let mut a = Transport::bind(&cfg, clock.clone()).unwrap();
    let mut b = Transport::bind(&cfg, clock.clone()).unwrap();
    assert_ne!(a.local_addr(), b.local_addr());

    let a_addr = a.local_addr();
    assert_eq!(a_addr.ip(), std::net::IpAddr::V4(cfg.iface));
    a.send_group(b"key update request").await.unwrap();
    for t in [&mut a, &mut b] {
        let d = recv_within(t, 2_000).await;
        assert_eq!(d.bytes, b"key update request");
        assert_eq!(d.via, Via::Group);
        assert_eq!(d.from, a_addr, "the source is the sender's unicast socket");
    }
    // b answers a by unicast, to the source address it saw.
    b.send_to(b"key update reply", a_addr).await.unwrap();
    let d = recv_within(&mut a, 2_000).await;
    assert_eq!(
        (d.bytes.as_slice(), d.via, d.from),
        (&b"key update reply"[..], Via::Unicast, b.local_addr())
    );
    let now = clock.now_ms();
    assert!(
        d.at_ms <= now && now - d.at_ms < 2_000,
        "arrival time {} vs now {now}",
        d.at_ms
    );
    // Nothing else arrived at b: it does not hear unicast meant for a.
    assert!(timeout(Duration::from_millis(200), b.recv()).await.is_err());
    assert_eq!(a.stats().sent, 1);
    assert_eq!(b.stats().received, 1);
}

#[tokio::test]
async fn another_group_on_the_same_port_is_not_heard() {
    let _heavy = support::heavy();
    let cfg = fresh_config(2);
    let mut other = cfg.clone();
    other.group = SocketAddrV4::new(Ipv4Addr::new(239, 255, 78, 3), cfg.group.port());
    let clock = Clock::monotonic();
    let mut a = Transport::bind(&cfg, clock.clone()).unwrap();
    let b = Transport::bind(&other, clock).unwrap();
    b.send_group(b"other fleet").await.unwrap();
    assert!(timeout(Duration::from_millis(300), a.recv()).await.is_err());
}

const CHILD_ENV: &str = "KEYFLEET_NET_CHILD";

/// The other process: announces itself to the group until it hears the
/// parent's greeting on the group, then acknowledges it by unicast.
#[test]
#[ignore = "run by two_processes_exchange_datagrams_through_the_group as a child process"]
fn net_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (group, port): (Ipv4Addr, u16) = {
        let a: SocketAddrV4 = spec.parse().expect("group");
        (*a.ip(), a.port())
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut cfg = NetConfig::loopback(port);
        cfg.group = SocketAddrV4::new(group, port);
        let mut t = Transport::bind(&cfg, Clock::wall()).unwrap();
        let pid = std::process::id();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            t.send_group(format!("child {pid} ready").as_bytes())
                .await
                .unwrap();
            if let Ok(Ok(d)) = timeout(Duration::from_millis(50), t.recv()).await {
                if d.via == Via::Group && d.bytes.starts_with(b"parent hello") {
                    t.send_to(format!("child {pid} ack").as_bytes(), d.from)
                        .await
                        .unwrap();
                    println!("child got: {}", String::from_utf8_lossy(&d.bytes));
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "child: no greeting from the parent"
            );
        }
    });
}

#[tokio::test]
async fn two_processes_exchange_datagrams_through_the_group() {
    let _heavy = support::heavy();
    let cfg = fresh_config(4);
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "net_multicast::net_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, cfg.group.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let child_pid = child.id();
    let mut t = Transport::bind(&cfg, Clock::wall()).unwrap();
    let me = t.local_addr();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut heard_ready_from = None;
    let mut acked = false;
    while !acked {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no exchange with the child in 10 s"
        );
        if let Ok(Ok(d)) = timeout(Duration::from_millis(50), t.recv()).await {
            let text = String::from_utf8_lossy(&d.bytes).into_owned();
            if text == format!("child {child_pid} ready") {
                assert_eq!(d.via, Via::Group);
                heard_ready_from = Some(d.from);
            } else if text == format!("child {child_pid} ack") {
                assert_eq!(d.via, Via::Unicast);
                assert_eq!(
                    Some(d.from),
                    heard_ready_from,
                    "ack from the child's unicast socket"
                );
                acked = true;
            }
        }
        if heard_ready_from.is_some() && !acked {
            t.send_group(format!("parent hello from {me}").as_bytes())
                .await
                .unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("child got: parent hello from {me}")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_injection_drops_exactly_what_the_seed_says() {
    let _heavy = support::heavy();
    const N: u32 = 3_000;
    const SEED: u64 = 2024;
    let cfg = fresh_config(5);
    let mut rx_cfg = cfg.clone();
    rx_cfg.loss = 0.2;
    rx_cfg.loss_seed = SEED;
    let clock = Clock::monotonic();
    let mut rx = Transport::bind(&rx_cfg, clock.clone()).unwrap();
    let tx = Transport::bind(&cfg, clock).unwrap();
    // Flow control, so the kernel's receive buffer never overflows even on a
    // loaded machine: any loss must come from the injection alone.
    let processed = Arc::new(AtomicU64::new(0));
    let seen = processed.clone();
    let mut sender = tokio::spawn(async move {
        for i in 0..N {
            while u64::from(i).saturating_sub(seen.load(Ordering::Relaxed)) > 128 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tx.send_group(&i.to_be_bytes()).await.unwrap();
        }
        tx
    });
    let mut got = BTreeSet::new();
    let mut tx = None;
    loop {
        // Quiet for 1 s after the sender is done: everything has arrived.
        let quiet = Duration::from_millis(if tx.is_some() { 1_000 } else { 30_000 });
        tokio::select! {
            d = rx.recv() => {
                let d = d.unwrap();
                got.insert(u32::from_be_bytes(d.bytes.as_slice().try_into().unwrap()));
                let s = rx.stats();
                processed.store(s.received + s.dropped, Ordering::Relaxed);
            }
            t = &mut sender, if tx.is_none() => tx = Some(t.unwrap()),
            _ = tokio::time::sleep(quiet) => {
                assert!(tx.is_some(), "the sender stalled");
                break;
            }
        }
    }
    let tx = tx.unwrap();
    let (stats, sent) = (rx.stats(), tx.stats().sent);
    assert_eq!(sent, u64::from(N));
    assert_eq!(
        stats.received + stats.dropped,
        u64::from(N),
        "every datagram reached the receiver before injection (no kernel loss): {stats:?}"
    );
    // Loopback keeps one sender's datagrams in order, so the k-th arrival met
    // the k-th draw of the seeded generator.
    let mut loss = Loss::new(0.2, SEED).unwrap();
    let expected: BTreeSet<u32> = (0..N).filter(|_| !loss.drop_next()).collect();
    assert_eq!(
        got, expected,
        "the seed decides which datagrams are dropped"
    );
    let frac = stats.dropped as f64 / f64::from(N);
    assert!((0.17..0.23).contains(&frac), "dropped fraction {frac}");
    eprintln!(
        "loss injection: {} of {N} dropped ({frac:.3}) for p = 0.2, seed {SEED}",
        stats.dropped
    );
}
