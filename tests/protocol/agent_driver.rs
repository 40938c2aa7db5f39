//! The library runtime without the binary: `NodeDriver`s in one process on
//! their own loopback sockets (what `keyfleet sim --transport udp` builds on),
//! and the rule that nothing is sent after a `Persist` that failed.

use crate::support;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keyfleet::agent::{AgentError, DriverEvent, MemoryPersister, NodeDriver, Persister};
use keyfleet::net::{Clock, NetConfig, Transport};
use keyfleet::statefile::StateFileError;
use keyfleet_core::protocol::{NodeConfig, NodeMachine, NodePersist, NodeState, Record};
use keyfleet_core::wire::{NodeId, RoundPhase, Step};
use support::agent::*;
use support::fresh_group;
use support::inproc::*;

const T: Duration = Duration::from_secs(20);

fn driver(
    group: SocketAddrV4,
    ctl: &InProcFleet,
    name: &str,
    key: &TestKey,
    p: Box<dyn Persister>,
) -> NodeDriver {
    let net = NetConfig {
        group,
        iface: Ipv4Addr::LOCALHOST,
        listen: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
        ..NetConfig::default()
    };
    let transport = Transport::bind(&net, Clock::wall()).unwrap();
    let cfg = NodeConfig {
        controller: ctl.addr(),
        ..NodeConfig::default()
    };
    let machine = NodeMachine::new(NodeId::parse(name).unwrap(), &key.key, cfg);
    NodeDriver::new(machine, transport, p)
}

/// Drives `d` until `done` holds (or panics after `T`).
async fn drive_until(d: &mut NodeDriver, done: impl Fn(&NodeDriver) -> bool) {
    tokio::time::timeout(T, async {
        while !done(d) {
            let w = d.wait().await.unwrap();
            d.handle(w).await.unwrap();
        }
    })
    .await
    .expect("driver reached the expected state");
}

fn synced_uc(d: &NodeDriver, epoch: u32) -> bool {
    d.machine().is_synced()
        && d.machine().state()
            == NodeState::UpdateCompleted {
                current: keyfleet_core::crypto::Epoch(epoch),
            }
}

// Two workers: the controller waits below block one thread while B runs on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_drivers_in_one_process_exchange_data() {
    let _heavy = support::heavy();
    let dir = tempfile::tempdir().unwrap();
    let group = fresh_group();
    let ctl = InProcFleet::controller(group);
    let (ka, kb) = (
        TestKey::new(dir.path(), "drv-a"),
        TestKey::new(dir.path(), "drv-b"),
    );
    ctl.enroll("drv-a", &ka);
    ctl.enroll("drv-b", &kb);
    let mut a = driver(group, &ctl, "drv-a", &ka, Box::<MemoryPersister>::default());
    let mut b = driver(group, &ctl, "drv-b", &kb, Box::<MemoryPersister>::default());
    a.link_up().await.unwrap();
    b.link_up().await.unwrap();
    drive_until(&mut a, |d| synced_uc(d, 1)).await;

    // B runs on its own task; its deliveries come back over a channel.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let b_task = tokio::spawn(async move {
        b.run_until(
            async {
                let _ = stopped.await;
            },
            move |e| {
                if let DriverEvent::Delivered(m) = e {
                    let _ = tx.send(m);
                }
            },
        )
        .await
        .unwrap();
        b
    });
    ctl.wait(T, "both active", |v| {
        v.members.len() == 2
            && v.members
                .iter()
                .all(|m| m.2 == keyfleet_core::protocol::MemberStatus::Active)
    });
    let outcome = a.send(b"from a").await.unwrap();
    assert_eq!(outcome, keyfleet::agent::app::SendOutcome::Sent);
    let got = tokio::time::timeout(T, async {
        loop {
            tokio::select! {
                m = rx.recv() => break m.unwrap(),
                w = a.wait() => a.handle(w.unwrap()).await.unwrap(),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got.plaintext, b"from a");
    assert_eq!(Some(got.sender), a.machine().member());
    let _ = stop.send(());
    let b = b_task.await.unwrap();
    assert_eq!(b.stats().delivered, 1);
    assert_eq!(b.stats().undecryptable, 0);
}

/// Fails every write while `fail` is set.
struct Flaky {
    fail: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
}

impl Persister for Flaky {
    fn persist(
        &mut self,
        _: &NodePersist,
        _: u64,
        _: Option<u64>,
        _: bool,
    ) -> Result<(), StateFileError> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(StateFileError::NoSpace {
                path: "state.json".into(),
            });
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn nothing_is_sent_after_a_persist_that_failed() {
    let _heavy = support::heavy();
    let dir = tempfile::tempdir().unwrap();
    let group = fresh_group();
    let ctl = InProcFleet::controller(group);
    let key = TestKey::new(dir.path(), "drv-f");
    ctl.enroll("drv-f", &key);
    let fail = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let p = Flaky {
        fail: fail.clone(),
        writes: writes.clone(),
    };
    let mut d = driver(group, &ctl, "drv-f", &key, Box::new(p));
    d.link_up().await.unwrap();
    drive_until(&mut d, |d| synced_uc(d, 1)).await;
    assert!(
        writes.load(Ordering::Relaxed) >= 1,
        "the join was persisted"
    );
    ctl.wait(T, "active", |v| {
        v.members
            .iter()
            .all(|m| m.2 == keyfleet_core::protocol::MemberStatus::Active)
    });

    // The disk fills up; a rekey's key update must be persisted before the
    // node acknowledges it, so the driver stops and no acknowledgement leaves.
    fail.store(true, Ordering::Relaxed);
    ctl.rekey();
    let err = tokio::time::timeout(T, async {
        loop {
            let w = d.wait().await.unwrap();
            if let Err(e) = d.handle(w).await {
                break e;
            }
        }
    })
    .await
    .unwrap();
    assert!(
        matches!(err, AgentError::Persist(StateFileError::NoSpace { .. })),
        "{err}"
    );
    drop(d);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = ctl.view();
    assert_eq!(v.round.map(|r| r.1), Some(RoundPhase::Distributing));
    let acked = v.records.iter().any(|r| {
        matches!(
            r,
            Record::NodeAcked {
                step: Step::KeyUpdate,
                ..
            }
        )
    });
    assert!(
        !acked,
        "the key update was acknowledged without being persisted"
    );
}
