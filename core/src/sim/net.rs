//! The transport under the simulated fleet: a [`SimNet`] trait and the
//! seeded virtual network [`VirtualNet`] that implements it.
//!
//! The fleet scenario ([`crate::sim::run_on`]) only talks to a `SimNet`, so the same
//! scenario can later run over real sockets (`keyfleet sim --transport udp`)
//! by implementing this trait with UDP sockets and the wall clock.

use crate::protocol::Time;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::rc::Rc;

/// An endpoint of the simulated fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    Controller,
    Node(u32),
}

/// What a group datagram carries: data is delivered to a seeded sample of
/// receivers (plus the controller), control traffic to every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    Control,
    Data,
}

/// A datagram arriving; `tag` is whatever the sender's shell attached.
#[derive(Clone, Debug)]
pub struct Arrival {
    pub at: Time,
    pub from: Peer,
    pub bytes: Rc<[u8]>,
    pub traffic: Traffic,
    pub tag: u32,
}

/// Counters kept by a transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Datagrams handed to the network (a group send counts once).
    pub sent: u64,
    /// Copies delivered to a receiver.
    pub delivered: u64,
    /// Copies dropped (random loss or receiver offline).
    pub dropped: u64,
    /// Extra copies made by duplication.
    pub duplicated: u64,
    /// Data copies addressed to sampled node receivers.
    pub data_copies: u64,
    /// Of those, dropped by loss or because the receiver was offline.
    pub data_dropped: u64,
}

/// What the fleet scenario needs from a network.
pub trait SimNet {
    /// Send from `from` to the multicast group.
    fn send_group(&mut self, now: Time, from: Peer, bytes: Vec<u8>, traffic: Traffic, tag: u32);
    /// Send from `from` to one peer.
    fn send_to(&mut self, now: Time, from: Peer, to: Peer, bytes: Vec<u8>);
    /// The next datagram arriving no later than `until`, its receivers written to
    /// `to`; `None` if nothing arrives by then.
    fn next_arrival(&mut self, until: Time, to: &mut Vec<Peer>) -> Option<Arrival>;
    /// Take a peer off the network (offline or crashed) or put it back.
    fn set_online(&mut self, peer: Peer, online: bool);
    /// The longest a datagram (or its duplicate) can be in flight.
    fn max_delay_ms(&self) -> u64;
    fn stats(&self) -> NetStats;
}

/// Settings of the virtual network.
#[derive(Clone, Copy, Debug)]
pub struct VirtualNetConfig {
    pub nodes: u32,
    /// Probability that one copy is lost.
    pub loss: f64,
    /// Probability that a delivered copy arrives a second time.
    pub duplicate: f64,
    /// One-way delay, uniform in `[delay_min_ms, delay_max_ms]`; different
    /// delays reorder datagrams.
    pub delay_min_ms: u64,
    pub delay_max_ms: u64,
    /// Group data is delayed uniformly in `[delay_min_ms, this]` instead
    /// (`None`: as control traffic).
    pub data_delay_max_ms: Option<u64>,
    /// Node receivers per data message.
    pub data_sample: u32,
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    One(Peer),
    AllNodes,
}

struct InFlight {
    at: Time,
    order: u64,
    from: Peer,
    dest: Dest,
    bytes: Rc<[u8]>,
    traffic: Traffic,
    tag: u32,
    kind: CopyKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CopyKind {
    Plain,
    /// A data copy counted in `data_copies`.
    Sampled,
    /// A network duplicate: not duplicated again, so the delay bound holds.
    Duplicate,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.order) == (o.at, o.order)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.at, self.order).cmp(&(o.at, o.order))
    }
}

/// A seeded network that drops, duplicates, delays and reorders datagrams.
/// A group datagram takes one delay for all receivers (as a switch floods it)
/// and is lost or duplicated independently per receiver.
pub struct VirtualNet {
    cfg: VirtualNetConfig,
    rng: ChaCha8Rng,
    queue: BinaryHeap<Reverse<InFlight>>,
    order: u64,
    online: Vec<bool>,
    controller_online: bool,
    stats: NetStats,
}

impl VirtualNet {
    pub fn new(cfg: VirtualNetConfig) -> VirtualNet {
        VirtualNet {
            rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x6e65_7477_6f72_6b00),
            queue: BinaryHeap::new(),
            order: 0,
            online: vec![true; cfg.nodes as usize],
            controller_online: true,
            stats: NetStats::default(),
            cfg,
        }
    }

    fn is_online(&self, p: Peer) -> bool {
        match p {
            Peer::Controller => self.controller_online,
            Peer::Node(i) => self.online.get(i as usize).copied().unwrap_or(false),
        }
    }

    fn delay(&mut self) -> u64 {
        self.rng
            .gen_range(self.cfg.delay_min_ms..=self.cfg.delay_max_ms.max(self.cfg.delay_min_ms))
    }

    fn data_delay_max(&self) -> u64 {
        self.cfg
            .data_delay_max_ms
            .unwrap_or(self.cfg.delay_max_ms)
            .max(self.cfg.delay_min_ms)
    }

    fn data_delay(&mut self) -> u64 {
        let max = self.data_delay_max();
        self.rng.gen_range(self.cfg.delay_min_ms..=max)
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        at: Time,
        from: Peer,
        dest: Dest,
        bytes: Rc<[u8]>,
        traffic: Traffic,
        tag: u32,
        kind: CopyKind,
    ) {
        self.order += 1;
        self.queue.push(Reverse(InFlight {
            at,
            order: self.order,
            from,
            dest,
            bytes,
            traffic,
            tag,
            kind,
        }));
    }

    fn lost(&mut self) -> bool {
        self.cfg.loss > 0.0 && self.rng.gen_bool(self.cfg.loss.clamp(0.0, 1.0))
    }

    fn maybe_duplicate(&mut self, f: &InFlight, to: Peer) {
        if f.kind == CopyKind::Duplicate {
            return;
        }
        if self.cfg.duplicate > 0.0 && self.rng.gen_bool(self.cfg.duplicate.clamp(0.0, 1.0)) {
            self.stats.duplicated += 1;
            let extra = self.rng.gen_range(0..=self.cfg.delay_max_ms);
            self.push(
                f.at.plus(extra),
                f.from,
                Dest::One(to),
                f.bytes.clone(),
                f.traffic,
                f.tag,
                CopyKind::Duplicate,
            );
        }
    }

    /// Pending datagrams (for the memory report).
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }
}

impl SimNet for VirtualNet {
    fn send_group(&mut self, now: Time, from: Peer, bytes: Vec<u8>, traffic: Traffic, tag: u32) {
        self.stats.sent += 1;
        if !self.is_online(from) {
            self.stats.dropped += 1;
            return;
        }
        let bytes: Rc<[u8]> = bytes.into();
        match traffic {
            Traffic::Control => {
                let at = now.plus(self.delay());
                self.push(
                    at,
                    from,
                    Dest::AllNodes,
                    bytes,
                    traffic,
                    tag,
                    CopyKind::Plain,
                );
            }
            Traffic::Data => {
                let n = self.cfg.nodes;
                let me = match from {
                    Peer::Node(i) => Some(i),
                    Peer::Controller => None,
                };
                let others = n - u32::from(me.is_some());
                let k = self.cfg.data_sample.min(others);
                let mut picked: Vec<u32> = Vec::with_capacity(k as usize);
                if k == others {
                    picked.extend((0..n).filter(|i| Some(*i) != me));
                } else {
                    while picked.len() < k as usize {
                        let i = self.rng.gen_range(0..n);
                        if Some(i) != me && !picked.contains(&i) {
                            picked.push(i);
                        }
                    }
                }
                for i in picked {
                    let at = now.plus(self.data_delay());
                    self.stats.data_copies += 1;
                    self.push(
                        at,
                        from,
                        Dest::One(Peer::Node(i)),
                        bytes.clone(),
                        traffic,
                        tag,
                        CopyKind::Sampled,
                    );
                }
                // The controller listens to the group too (unknown-sender trigger).
                let at = now.plus(self.delay());
                self.push(
                    at,
                    from,
                    Dest::One(Peer::Controller),
                    bytes,
                    traffic,
                    tag,
                    CopyKind::Plain,
                );
            }
        }
    }

    fn send_to(&mut self, now: Time, from: Peer, to: Peer, bytes: Vec<u8>) {
        self.stats.sent += 1;
        if !self.is_online(from) {
            self.stats.dropped += 1;
            return;
        }
        let at = now.plus(self.delay());
        self.push(
            at,
            from,
            Dest::One(to),
            bytes.into(),
            Traffic::Control,
            0,
            CopyKind::Plain,
        );
    }

    fn next_arrival(&mut self, until: Time, to: &mut Vec<Peer>) -> Option<Arrival> {
        loop {
            if self.queue.peek().is_none_or_later(until) {
                return None;
            }
            let Reverse(f) = self.queue.pop()?;
            to.clear();
            match f.dest {
                Dest::One(p) => {
                    if self.is_online(p) && !self.lost() {
                        to.push(p);
                        self.maybe_duplicate(&f, p);
                    } else if f.kind == CopyKind::Sampled {
                        self.stats.data_dropped += 1;
                    }
                }
                Dest::AllNodes => {
                    for i in 0..self.cfg.nodes {
                        let p = Peer::Node(i);
                        if p == f.from {
                            continue;
                        }
                        if self.online[i as usize] && !self.lost() {
                            to.push(p);
                            self.maybe_duplicate(&f, p);
                        } else {
                            self.stats.dropped += 1;
                        }
                    }
                }
            }
            self.stats.delivered += to.len() as u64;
            if matches!(f.dest, Dest::One(_)) && to.is_empty() {
                self.stats.dropped += 1;
            }
            if !to.is_empty() {
                return Some(Arrival {
                    at: f.at,
                    from: f.from,
                    bytes: f.bytes,
                    traffic: f.traffic,
                    tag: f.tag,
                });
            }
        }
    }

    fn set_online(&mut self, peer: Peer, online: bool) {
        match peer {
            Peer::Controller => self.controller_online = online,
            Peer::Node(i) => {
                if let Some(o) = self.online.get_mut(i as usize) {
                    *o = online;
                }
            }
        }
    }

    fn max_delay_ms(&self) -> u64 {
        // A duplicate arrives at most delay_max after its original.
        let one_way = self.cfg.delay_max_ms.max(self.cfg.delay_min_ms);
        one_way.max(self.data_delay_max()) + one_way
    }

    fn stats(&self) -> NetStats {
        self.stats
    }
}

trait PeekLater {
    fn is_none_or_later(&self, until: Time) -> bool;
}

impl PeekLater for Option<&Reverse<InFlight>> {
    fn is_none_or_later(&self, until: Time) -> bool {
        match self {
            None => true,
            Some(Reverse(f)) => f.at > until,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(loss: f64, dup: f64) -> VirtualNet {
        VirtualNet::new(VirtualNetConfig {
            nodes: 50,
            loss,
            duplicate: dup,
            delay_min_ms: 1,
            delay_max_ms: 30,
            data_delay_max_ms: None,
            data_sample: 4,
            seed: 9,
        })
    }

    fn drain(n: &mut VirtualNet) -> Vec<(Time, Vec<Peer>)> {
        let mut to = Vec::new();
        let mut got = Vec::new();
        while let Some(a) = n.next_arrival(Time::MAX, &mut to) {
            got.push((a.at, to.clone()));
        }
        got
    }

    #[test]
    fn lossless_group_send_reaches_every_other_node_once() {
        let mut n = net(0.0, 0.0);
        n.send_group(Time(0), Peer::Controller, vec![1], Traffic::Control, 0);
        let got = drain(&mut n);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.len(), 50);
        assert!(got[0].0 >= Time(1) && got[0].0 <= Time(30));
    }

    #[test]
    fn loss_rate_is_close_to_the_setting_and_offline_nodes_get_nothing() {
        let mut n = net(0.2, 0.0);
        n.set_online(Peer::Node(3), false);
        for _ in 0..200 {
            n.send_group(Time(0), Peer::Controller, vec![1], Traffic::Control, 0);
        }
        let got = drain(&mut n);
        let copies: usize = got.iter().map(|g| g.1.len()).sum();
        assert!(got.iter().all(|g| !g.1.contains(&Peer::Node(3))));
        let rate = copies as f64 / (200.0 * 49.0);
        assert!((0.77..0.83).contains(&rate), "delivered fraction {rate}");
    }

    #[test]
    fn data_goes_to_a_sample_and_the_controller_and_duplicates_stay_in_the_bound() {
        let mut n = net(0.0, 0.5);
        n.send_group(Time(100), Peer::Node(7), vec![1], Traffic::Data, 1);
        let got = drain(&mut n);
        let receivers: Vec<Peer> = got.iter().flat_map(|g| g.1.clone()).collect();
        assert!(receivers.contains(&Peer::Controller));
        assert!(
            !receivers.contains(&Peer::Node(7)),
            "no copy back to the sender"
        );
        assert_eq!(n.stats().data_copies, 4);
        assert_eq!(receivers.len() as u64, 5 + n.stats().duplicated);
        assert!(got.iter().all(|g| g.0.since(Time(100)) <= n.max_delay_ms()));
    }

    #[test]
    fn same_seed_same_schedule() {
        let run = || {
            let mut n = net(0.3, 0.1);
            for t in 0..50 {
                n.send_to(Time(t), Peer::Node(1), Peer::Controller, vec![t as u8]);
            }
            drain(&mut n)
        };
        assert_eq!(run(), run());
    }
}
