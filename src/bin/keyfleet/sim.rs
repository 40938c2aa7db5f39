//! `keyfleet sim`: the deterministic fleet simulator (see `keyfleet_core::sim`).

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use keyfleet::udpsim::UdpConfig;
use keyfleet_core::sim::{self, SimConfig};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

/// Where the simulated datagrams travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SimTransport {
    /// The seeded virtual network with a virtual clock (exactly reproducible by seed).
    Virtual,
    /// Real UDP sockets on one host: two per node and for the controller, one
    /// multicast group, loss drawn on receive, the wall clock (see `keyfleet::udpsim`).
    Udp,
}

/// Run one controller and N nodes through R rekey rounds on a lossy network.
#[derive(Args, Debug)]
pub struct SimArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 100)]
    agents: u32,
    /// Probability that a datagram copy is lost, 0 ≤ P < 1.
    #[arg(long, default_value_t = 0.1)]
    loss: f64,
    /// Seed of every random choice; the same seed replays the same run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Rekey rounds to run.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Nodes that go offline for a while in each round.
    #[arg(long, default_value_t = 0)]
    offline: u32,
    /// How long an offline node stays away, in virtual ms.
    #[arg(long, default_value_t = 3000)]
    offline_ms: u64,
    /// Nodes that crash and restart from their persisted state in each round.
    #[arg(long, default_value_t = 0)]
    crash: u32,
    /// Crash the controller once per round and restore it from its persisted state.
    #[arg(long)]
    controller_crash: bool,
    /// Node crashes are power losses: a node restarts from its last flushed
    /// snapshot, losing what it only checkpointed (a transition, or a key
    /// update whose step its disk can derive).
    #[arg(long)]
    power_loss: bool,
    /// Probability that a delivered datagram arrives twice.
    #[arg(long, default_value_t = 0.01)]
    duplicate: f64,
    /// Each node sends a data message this often (virtual ms, ±50 %).
    #[arg(long, default_value_t = 2000)]
    data_interval_ms: u64,
    /// Receivers each data message is delivered to (a seeded sample).
    #[arg(long, default_value_t = 4)]
    data_sample: u32,
    /// A node that has not answered this long after a phase began is marked stale (virtual ms).
    #[arg(long, default_value_t = 30_000)]
    stale_after_ms: u64,
    /// Transport.
    #[arg(long, value_enum, default_value_t = SimTransport::Virtual)]
    transport: SimTransport,
    /// With `--transport udp`: the multicast group (default 239.255.77.78 on a free port).
    #[arg(long, value_name = "ADDR:PORT")]
    group: Option<SocketAddrV4>,
    /// With `--transport udp`: the interface address every socket binds to and joins on.
    #[arg(long, value_name = "ADDR", default_value_t = Ipv4Addr::LOCALHOST)]
    iface: Ipv4Addr,
    /// With `--transport udp`: the longest a datagram may take from send to
    /// handling (kernel and queue), which sets the drain grace (ms).
    #[arg(long, default_value_t = 250)]
    max_delay_ms: u64,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

/// Exit code 0 when the fleet converged with no undecryptable message and no
/// invariant violation, 1 otherwise.
pub fn run(args: SimArgs) -> anyhow::Result<std::process::ExitCode> {
    if !(0.0..1.0).contains(&args.loss) {
        bail!(
            "--loss must be at least 0 and below 1 (got {}); at 100% loss nothing can converge",
            args.loss
        );
    }
    if !(0.0..=1.0).contains(&args.duplicate) {
        bail!(
            "--duplicate is a probability between 0 and 1 (got {})",
            args.duplicate
        );
    }
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let mut cfg = SimConfig::new(args.agents, args.loss, args.seed, args.rounds);
    cfg.offline = args.offline;
    cfg.offline_ms = args.offline_ms;
    cfg.crash = args.crash;
    cfg.controller_crash = args.controller_crash;
    cfg.power_loss = args.power_loss;
    cfg.duplicate = args.duplicate;
    cfg.data_interval_ms = args.data_interval_ms;
    cfg.data_sample = args.data_sample;
    cfg.stale_after_ms = args.stale_after_ms;
    let started = Instant::now();
    let mut udp_report = None;
    let mut report = match args.transport {
        SimTransport::Virtual => sim::run(&cfg),
        SimTransport::Udp => {
            let mut udp = UdpConfig::loopback();
            udp.iface = args.iface;
            udp.max_delay_ms = args.max_delay_ms;
            if let Some(g) = args.group {
                udp.group = g;
            }
            let r = keyfleet::udpsim::run(&cfg, &udp)
                .context("while setting up the UDP sockets of the simulated fleet")?;
            let sim = r.sim.clone();
            udp_report = Some(r);
            sim
        }
    };
    report.wall_ms = Some(started.elapsed().as_millis() as u64);
    if let Some(r) = &mut udp_report {
        r.sim.wall_ms = report.wall_ms;
    }
    let ok = report.converged
        && report.data_undecryptable == 0
        && report.s1_violations == 0
        && report.s2_violations == 0
        // A power loss moves a node back at its restart (what it lost), never live.
        && report.backward_transitions <= report.checkpoints_lost;
    if args.json {
        let json = match &udp_report {
            Some(r) => serde_json::to_string(r),
            None => serde_json::to_string(&report),
        };
        println!("{}", json.context("while writing the report as JSON")?);
    } else {
        println!(
            "{} nodes, loss {}, seed {}: {} of {} rounds, converged: {}",
            report.agents,
            report.loss,
            report.seed,
            report.rounds_completed,
            report.rounds,
            report.converged
        );
        println!(
            "data: {} sent, {} sampled copies, {} delivered, {} lost in the network, {} undecryptable ({} to/from nodes out of sync)",
            report.data_sent,
            report.data_copies,
            report.data_delivered,
            report.data_lost_in_network,
            report.data_undecryptable,
            report.data_undecryptable_out_of_sync
        );
        println!(
            "invariants: S1 violations {}, S2 violations {}, backward transitions {} (checkpoints lost to power losses {}); stale {}, retransmissions {}",
            report.s1_violations, report.s2_violations, report.backward_transitions, report.checkpoints_lost, report.stale, report.retransmissions
        );
        println!(
            "virtual ms per round: p50 {} max {}; {} bytes per node; {} ms wall",
            report.virtual_ms_per_round.p50,
            report.virtual_ms_per_round.max,
            report.bytes_per_node,
            report.wall_ms.unwrap_or(0)
        );
        if let Some(r) = &udp_report {
            println!(
                "udp: {} sockets, {} datagrams read, {} lost by injection, longest queue wait {} ms, \
                 {} send errors, {} kernel receive-buffer overflows; {:.2} rounds/s, \
                 peak RSS {} MiB ({} bytes per agent)",
                r.udp.sockets,
                r.udp.received,
                r.udp.injected_losses,
                r.udp.max_queue_wait_ms,
                r.udp.send_errors,
                r.udp.kernel_rcvbuf_errors,
                r.rounds_per_s,
                r.peak_rss_bytes >> 20,
                r.rss_bytes_per_agent
            );
        }
    }
    Ok(if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
