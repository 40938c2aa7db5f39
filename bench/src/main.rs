//! `keyfleet-bench`: keyfleet's benchmarks side by side (issue 6).
//!
//!     keyfleet-bench run --out DIR [--quick] [--only datapath,qr,serf,keyfleet,sim]
//!     keyfleet-bench report --json DIR/results.json --md bench/results.md --svg bench/rotation.svg
//!
//! `bench/run.sh` builds the release binaries and runs both. Progress goes to
//! stderr; `run` writes `results.json` into DIR, `report` turns it into the
//! Markdown tables and the SVG plot. Exit codes: 0 done (failed parts are
//! reported in the results), 1 error, 2 bad command line.
#![forbid(unsafe_code)]

use keyfleet_bench::{datapath, e2e, fleet, qr, report, round, serf, stats, testpg};

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "keyfleet-bench",
    version,
    about = "keyfleet's benchmarks: rotation against Serf, the data path against raw AES-GCM, QR decoding against zbarimg"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Measure, and write DIR/results.json.
    Run(RunArgs),
    /// Write results.md and the rotation plot from a results.json.
    Report {
        #[arg(long, value_name = "FILE")]
        json: PathBuf,
        #[arg(long, value_name = "FILE")]
        md: PathBuf,
        #[arg(long, value_name = "FILE")]
        svg: PathBuf,
        /// Also refresh the generated block of this README (between its bench markers).
        #[arg(long, value_name = "FILE")]
        readme: Option<PathBuf>,
    },
    /// One in-process rekey round after N joins (what `callgrind` counts).
    #[command(hide = true)]
    Round {
        #[arg(long, default_value_t = 100)]
        nodes: usize,
    },
    /// The plain relay of the `e2e` part (started by it): forwards the Unix
    /// datagrams of LISTEN to GROUP, and GROUP's datagrams to DELIVER.
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        listen: PathBuf,
        #[arg(long)]
        group: std::net::SocketAddrV4,
        #[arg(long)]
        deliver: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Where results.json goes.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Small sizes and few repetitions: a smoke test of the harness, not figures to publish.
    #[arg(long)]
    quick: bool,
    /// Parts to run (comma-separated): datapath, e2e, qr, serf, keyfleet,
    /// keyfleet-pg (the same rotations with the management table in
    /// PostgreSQL, a server this run starts), sim, callgrind.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "datapath,e2e,qr,serf,keyfleet,keyfleet-pg,sim,callgrind"
    )]
    only: Vec<String>,
    /// Fleet sizes for keyfleet-pg.
    #[arg(long, value_delimiter = ',', default_value = "100")]
    pg_sizes: Vec<usize>,
    /// Fleet sizes for the process benchmarks (Serf and keyfleet).
    #[arg(long, value_delimiter = ',', default_value = "10,50,100")]
    sizes: Vec<usize>,
    /// Rotations per fleet size; the median is reported.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Fleet sizes for `keyfleet sim --transport virtual`.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    sim_sizes: Vec<usize>,
    /// Fleet sizes for `keyfleet sim --transport udp` (when the build has it).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    udp_sim_sizes: Vec<usize>,
    /// Datagram loss for the simulator runs.
    #[arg(long, default_value_t = 0.0)]
    sim_loss: f64,
    /// Directory of the keyfleet and keyfleet-agent binaries [default: this binary's].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// The serf binary.
    #[arg(long, default_value = "serf")]
    serf: PathBuf,
    /// Serf's timing profile (lan, wan, local); lan is its default.
    #[arg(long, default_value = "lan")]
    serf_profile: String,
    /// First loopback port tried for Serf (keyfleet uses the range above +5000).
    #[arg(long, default_value_t = 31000)]
    base_port: u16,
    /// Messages per path and size in the end-to-end data path part.
    #[arg(long, default_value_t = 100_000)]
    e2e_count: u64,
    /// Folders of label photos with expected payloads.
    #[arg(long, value_name = "DIR")]
    fixtures: Vec<PathBuf>,
}

fn run(a: RunArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let on = |p: &str| a.only.iter().any(|x| x == p);
    let mut r = report::Results {
        machine: report::Machine::now(),
        ..report::Results::default()
    };
    let bin_dir = match &a.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .context("this binary has no directory")?,
    };
    let bins = fleet::Bins::in_dir(&bin_dir);
    let (sizes, reps) = if a.quick {
        (vec![3, 5], a.reps.min(2))
    } else {
        (a.sizes.clone(), a.reps)
    };
    if on("datapath") {
        eprintln!("== data path");
        let (batch_ms, samples) = if a.quick { (1, 5) } else { (1, 151) };
        r.datapath = Some(datapath::run(batch_ms, samples)?);
    }
    if on("e2e") {
        eprintln!("== data path end to end");
        let count = if a.quick { 2_000 } else { a.e2e_count };
        r.e2e = e2e::run(&bins, count, a.base_port.saturating_add(9000));
    }
    if on("qr") {
        eprintln!("== QR decoding");
        let dirs = if a.fixtures.is_empty() {
            let root =
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/webcam/generated");
            vec![root.join("640x480"), root.join("1280x720")]
        } else {
            a.fixtures.clone()
        };
        r.qr = Some(qr::run(&dirs, if a.quick { 1 } else { 3 })?);
    }
    if on("serf") {
        eprintln!("== Serf rotation");
        r.serf = Some(serf::run(
            &a.serf,
            &sizes,
            reps,
            a.base_port,
            &a.serf_profile,
        ));
    }
    if on("keyfleet") {
        eprintln!("== keyfleet rotation");
        r.keyfleet = Some(fleet::run(
            &bins,
            &sizes,
            reps,
            a.base_port.saturating_add(5000),
            None,
        ));
    }
    if on("keyfleet-pg") {
        eprintln!("== keyfleet rotation, management table in PostgreSQL");
        let pg_sizes = if a.quick { vec![5] } else { a.pg_sizes.clone() };
        r.keyfleet_pg = Some(match testpg::PgServer::start() {
            Ok(pg) => fleet::run(
                &bins,
                &pg_sizes,
                reps,
                a.base_port.saturating_add(7000),
                Some(&pg),
            ),
            Err(why) => {
                eprintln!("keyfleet-pg skipped: no PostgreSQL server: {why}");
                fleet::KfResult {
                    skipped: Some(format!("no PostgreSQL server could be started: {why}")),
                    runs: Vec::new(),
                }
            }
        });
    }
    if on("sim") {
        eprintln!("== keyfleet sim");
        let (virt, udp) = if a.quick {
            (vec![100], vec![50])
        } else {
            (a.sim_sizes.clone(), a.udp_sim_sizes.clone())
        };
        if !bins.keyfleet.is_file() {
            eprintln!(
                "keyfleet sim skipped: {} is not built",
                bins.keyfleet.display()
            );
        } else {
            for n in virt {
                r.sim
                    .push(fleet::sim(&bins.keyfleet, n, "virtual", a.sim_loss, 1));
            }
            if fleet::sim_has_udp(&bins.keyfleet) {
                for n in udp {
                    r.sim
                        .push(fleet::sim(&bins.keyfleet, n, "udp", a.sim_loss, 1));
                }
            } else {
                for n in udp {
                    r.sim.push(fleet::SimRun {
                        agents: n,
                        transport: "udp".into(),
                        loss: a.sim_loss,
                        rounds: 1,
                        error: Some("`keyfleet sim --transport udp` is not in this build".into()),
                        ..fleet::SimRun::default()
                    });
                }
            }
        }
    }
    if on("callgrind") {
        eprintln!("== instructions of one in-process round (callgrind)");
        let me = std::env::current_exe()?;
        for n in if a.quick { vec![10] } else { vec![100] } {
            r.callgrind.push(round::callgrind(&me, n, &a.out));
        }
    }
    r.load_at_end = stats::loadavg();
    r.total_s = Some(t0.elapsed().as_secs_f64());
    let path = a.out.join("results.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&r)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "wrote {} after {:.0} s",
        path.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Cmd::Run(a) => run(a),
        Cmd::Report {
            json,
            md,
            svg,
            readme,
        } => report::write(&json, &md, &svg, readme.as_deref()),
        Cmd::Round { nodes } => round::run_one(nodes),
        Cmd::Relay {
            listen,
            group,
            deliver,
        } => e2e::relay(&listen, group, deliver.as_deref()),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyfleet-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
