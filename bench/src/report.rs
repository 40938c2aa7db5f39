//! `results.md` and the rotation plot, from the JSON files of one run.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::datapath::{self, DataPathResult};
use crate::fleet::{KfResult, SimRun};
use crate::qr::QrResult;
use crate::serf::SerfResult;
use crate::stats::{loadavg, median};

/// Facts about the machine and the build, taken when the run starts.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    pub date_utc: String,
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total: String,
    pub kernel: String,
    pub rustc: String,
    pub commit: String,
    pub load_at_start: Option<[f64; 3]>,
    /// `net.unix.max_dgram_qlen` and `net.core.rmem_max`: the datagrams a
    /// Unix socket queues (what an application client of an agent, or of a
    /// relay, gets per wake-up) and the cap on UDP receive buffers.
    #[serde(default)]
    pub sysctls: Vec<(String, String)>,
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| "?".into())
}

fn proc_field(file: &str, key: &str) -> String {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

impl Machine {
    pub fn now() -> Machine {
        Machine {
            date_utc: first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: proc_field("/proc/cpuinfo", "model name"),
            mem_total: proc_field("/proc/meminfo", "MemTotal"),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into()),
            rustc: first_line("rustc", &["--version"]),
            commit: first_line("git", &["rev-parse", "--short", "HEAD"]),
            load_at_start: loadavg(),
            sysctls: ["net.unix.max_dgram_qlen", "net.core.rmem_max"]
                .iter()
                .map(|k| {
                    let path = format!("/proc/sys/{}", k.replace('.', "/"));
                    let v = std::fs::read_to_string(path)
                        .map(|v| v.trim().to_string())
                        .unwrap_or_else(|_| "?".into());
                    ((*k).to_string(), v)
                })
                .collect(),
        }
    }
}

/// Everything one run measured; a part left out was not run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Results {
    pub machine: Machine,
    pub load_at_end: Option<[f64; 3]>,
    pub total_s: Option<f64>,
    pub datapath: Option<DataPathResult>,
    pub qr: Option<QrResult>,
    pub serf: Option<SerfResult>,
    pub keyfleet: Option<KfResult>,
    /// The same rotations with the management table in PostgreSQL.
    #[serde(default)]
    pub keyfleet_pg: Option<KfResult>,
    pub sim: Vec<SimRun>,
    /// The data path end to end (`e2e`).
    #[serde(default)]
    pub e2e: Vec<crate::e2e::E2eRow>,
    /// Instruction counts of one in-process round (`callgrind`).
    #[serde(default)]
    pub callgrind: Vec<crate::round::Callgrind>,
}

fn ms(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() && v >= 100.0 => format!("{v:.0}"),
        Some(v) if v.is_finite() => format!("{v:.1}"),
        _ => "–".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a.is_finite() && b.is_finite() && b > 0.0 && a > 0.0 => {
            let x = a / b;
            // Below 0.1× three decimals and the fraction: the bound
            // (1/50 of Serf) must not hide in a rounding to 0.02×.
            if x < 0.1 {
                format!("{x:.3}× (1/{:.0})", 1.0 / x)
            } else {
                format!("{x:.2}×")
            }
        }
        _ => "–".into(),
    }
}

fn load3(l: Option<[f64; 3]>) -> String {
    l.map_or("?".into(), |l| {
        format!("{:.2}, {:.2}, {:.2}", l[0], l[1], l[2])
    })
}

fn size_name(s: usize) -> String {
    if s >= 1024 {
        format!("{} KiB", s / 1024)
    } else {
        format!("{s} B")
    }
}

/// The points of the plot: (fleet size, median rotation ms) per series.
pub fn series(r: &Results) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut out = Vec::new();
    if let Some(s) = &r.serf {
        let pts: Vec<(f64, f64)> = s
            .runs
            .iter()
            .filter_map(|run| run.median_total_ms().map(|m| (run.n as f64, m)))
            .collect();
        out.push((
            "Serf: keys -install, -use, -remove (processes)".to_string(),
            pts,
        ));
    }
    if let Some(k) = &r.keyfleet {
        let pts: Vec<(f64, f64)> = k
            .runs
            .iter()
            .filter_map(|run| run.median_of(|x| x.wall_ms).map(|m| (run.n as f64, m)))
            .collect();
        out.push(("keyfleet: one rekey (processes)".to_string(), pts));
        let pts: Vec<(f64, f64)> = k
            .runs
            .iter()
            .filter_map(|run| {
                run.median_of(|x| x.elapsed_ms - x.draining_ms)
                    .filter(|m| *m > 0.0)
                    .map(|m| (run.n as f64, m))
            })
            .collect();
        out.push((
            "keyfleet: the same rounds less the 2 s drain grace".to_string(),
            pts,
        ));
    }
    for transport in ["virtual", "udp"] {
        let pts: Vec<(f64, f64)> = r
            .sim
            .iter()
            .filter(|s| s.transport == transport && s.error.is_none())
            .filter_map(|s| s.ms_per_round_p50.map(|m| (s.agents as f64, m)))
            .collect();
        if !pts.is_empty() {
            let what = if transport == "virtual" {
                "keyfleet sim: virtual time, drain = max delay + 20 ms"
            } else {
                "keyfleet sim over loopback UDP, drain = max delay + 20 ms"
            };
            out.push((what.to_string(), pts));
        }
    }
    out.retain(|(_, p)| !p.is_empty());
    out
}

/// The SVG plot of rotation time against fleet size (both axes logarithmic).
pub fn plot(r: &Results, path: &Path) -> anyhow::Result<()> {
    let all = series(r);
    let ys: Vec<f64> = all
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .collect();
    let xs: Vec<f64> = all
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .collect();
    let (ymin, ymax) = (
        ys.iter().copied().fold(f64::INFINITY, f64::min),
        ys.iter().copied().fold(0.0f64, f64::max),
    );
    let (ymin, ymax) = if ys.is_empty() {
        (1.0, 10_000.0)
    } else {
        // Room above the highest point for the legend.
        ((ymin / 2.0).max(0.1), ymax * 8.0)
    };
    let xmax = xs.iter().copied().fold(100.0f64, f64::max) * 1.6;
    let root = SVGBackend::new(path, (860, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Rotating the group key: time against fleet size",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((6.0f64..xmax).log_scale(), (ymin..ymax).log_scale())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(238, 238, 238))
        .x_desc("fleet size (nodes)")
        .y_desc("median rotation time (ms)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let colors = [
        RGBColor(200, 60, 40),
        RGBColor(30, 90, 200),
        RGBColor(40, 150, 80),
        RGBColor(140, 70, 170),
        RGBColor(220, 140, 20),
    ];
    for (i, (name, pts)) in all.iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// The rotation table (Markdown), shared by results.md and the README.
pub fn rotation_table(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| nodes | Serf: install + use + remove, median ms | keyfleet: `rekey --json`, median ms | keyfleet ÷ Serf | keyfleet round less its drain grace, median ms | that ÷ Serf |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|");
    let mut sizes: Vec<usize> = Vec::new();
    if let Some(x) = &r.serf {
        sizes.extend(x.runs.iter().map(|r| r.n));
    }
    if let Some(x) = &r.keyfleet {
        sizes.extend(x.runs.iter().map(|r| r.n));
    }
    sizes.sort();
    sizes.dedup();
    for n in sizes {
        let serf = r
            .serf
            .as_ref()
            .and_then(|x| x.runs.iter().find(|r| r.n == n));
        let kf = r
            .keyfleet
            .as_ref()
            .and_then(|x| x.runs.iter().find(|r| r.n == n));
        let s_ms = serf.and_then(|r| r.median_total_ms());
        let k_ms = kf.and_then(|r| r.median_of(|x| x.wall_ms));
        let k_core = kf.and_then(|r| r.median_of(|x| x.elapsed_ms - x.draining_ms));
        let note = |e: Option<&String>, reps: usize| match e {
            Some(_) => format!(" (failed after {reps} reps)"),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "| {n} | {}{} | {}{} | {} | {} | {} |",
            ms(s_ms),
            serf.map(|r| note(r.error.as_ref(), r.reps.len()))
                .unwrap_or_default(),
            ms(k_ms),
            kf.map(|r| note(r.error.as_ref(), r.reps.len()))
                .unwrap_or_default(),
            ratio(k_ms, s_ms),
            ms(k_core),
            ratio(k_core, s_ms),
        );
    }
    s
}

fn rotation_section(r: &Results, s: &mut String) {
    let _ = writeln!(
        s,
        "## Rotation: keyfleet against Serf, real processes on 127.0.0.1\n"
    );
    let _ = writeln!(s, "{}", rotation_table(r));
    let _ = writeln!(s, "![rotation time against fleet size](rotation.svg)\n");
    if let Some(x) = &r.serf {
        let _ = writeln!(
            s,
            "Serf ({}, profile `{}`): N `serf agent` processes, each bound to 127.0.0.1 on its own port with its own `-keyring-file` holding the first key (Serf refuses `-encrypt` together with a keyring file: \"Encryption key not allowed while using a keyring\"; the file carries the key and traffic is encrypted), joined into one cluster with `-retry-join` to agent 0. A rotation is `serf keys -install NEW`, `-use NEW`, `-remove OLD` against agent 0; each returns when every member answered. Times are those three processes end to end; rotations start {} ms apart (as keyfleet's).\n",
            x.version.as_deref().unwrap_or("version unknown"),
            x.profile,
            crate::fleet::REP_PAUSE_MS
        );
        let _ = writeln!(s, "A `serf keys` operation that does not hear from every member exits 1 (\"49/50 nodes reported success\"); it is idempotent, so the harness runs it again, as an operator would (up to {} times), and the rotation's time includes every attempt. Such repeats are counted below.\n", crate::serf::ATTEMPTS);
        let _ = writeln!(s, "| nodes | reps | install ms | use ms | remove ms | total ms (median) | operations repeated | joined in ms | only the new key on N/N after | load (1 min) |");
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
        for run in &x.runs {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                run.n,
                run.reps.len(),
                ms(run.median_of(|r| r.install_ms)),
                ms(run.median_of(|r| r.use_ms)),
                ms(run.median_of(|r| r.remove_ms)),
                ms(run.median_total_ms()),
                run.reps.iter().map(|r| r.retries.len()).sum::<usize>(),
                ms(Some(run.join_ms)),
                if run.verified { "yes" } else { "**no**" },
                run.load.describe()
            );
        }
        for run in x.runs.iter().filter(|r| r.error.is_some()) {
            let _ = writeln!(
                s,
                "\n- Serf at N = {}: {}",
                run.n,
                run.error.as_deref().unwrap_or("")
            );
        }
        for run in &x.runs {
            for (i, rep) in run.reps.iter().enumerate() {
                for why in &rep.retries {
                    let _ = writeln!(
                        s,
                        "\n- Serf at N = {}, rotation {}: repeated `serf keys {why}`",
                        run.n,
                        i + 1
                    );
                }
            }
        }
        let _ = writeln!(s);
    }
    match &r.keyfleet {
        Some(k) if k.skipped.is_some() => {
            let _ = writeln!(
                s,
                "keyfleet processes: **not measured** in this run: {}.\n",
                k.skipped.as_deref().unwrap_or("")
            );
        }
        Some(k) => {
            let _ = writeln!(s, "keyfleet: one `keyfleet serve` and N `keyfleet-agent run` processes on loopback multicast (`--iface 127.0.0.1`), each node enrolled with `keyfleet enroll`, default configuration (after every node switched to the new key the controller waits before the second transition request, twice the first transition's longest time in flight, its round trips less what requests and replies waited in the sockets (`round.drain_rtt_factor`, at least `round.drain_floor_ms` = 2), so that messages sealed with the old key and still in flight can be opened, SPEC S2; Serf has no such wait). A rotation is one `keyfleet rekey --json` talking to `serve`; the time is that process end to end. Rotations start {} ms apart, as in use (a rotation follows usage counts, the key's age or an operator): between them `serve` prepares the next round's key agreement (an X25519 per node), which back-to-back rotations would leave to the round's start. `elapsed_ms` is the round as the controller timed it. While the rotations run, the applications of {} agents each send a group message every {} ms through their agents; each message must reach every other agent (the agents' own `delivered` and `undecryptable` counters).\n", crate::fleet::REP_PAUSE_MS, crate::fleet::TRAFFIC_SENDERS, crate::fleet::TRAFFIC_EVERY_MS);
            let _ = writeln!(s, "| nodes | reps | `rekey` process ms | round `elapsed_ms` | of which drain | distributing / first transition / second transition, ms | acked | stale | all agents UpdateCompleted at the new epoch after | messages sent | deliveries / expected | undecryptable | joined in ms | load (1 min) |");
            let _ = writeln!(
                s,
                "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"
            );
            for run in &k.runs {
                let phase = |i: usize| {
                    let v: Vec<f64> = run
                        .reps
                        .iter()
                        .filter_map(|r| r.other_phases_ms.map(|p| p[i]))
                        .collect();
                    ms(median(&v))
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} / {} / {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    run.n,
                    run.reps.len(),
                    ms(run.median_of(|r| r.wall_ms)),
                    ms(run.median_of(|r| r.elapsed_ms)),
                    ms(run.median_of(|r| r.draining_ms)),
                    phase(0),
                    phase(1),
                    phase(2),
                    median(&run.reps.iter().map(|r| r.acked as f64).collect::<Vec<_>>())
                        .map_or("–".into(), |a| format!("{a:.0}")),
                    run.reps.iter().map(|r| r.stale).max().unwrap_or(0),
                    if run.verified { "yes" } else { "**no**" },
                    run.traffic
                        .as_ref()
                        .map_or("–".into(), |t| t.sent.to_string()),
                    run.traffic.as_ref().map_or("–".into(), |t| format!(
                        "{} / {}",
                        t.delivered, t.expected
                    )),
                    run.traffic
                        .as_ref()
                        .map_or("–".into(), |t| t.undecryptable.to_string()),
                    ms(Some(run.join_ms)),
                    run.load.describe()
                );
            }
            for run in k.runs.iter().filter(|r| r.error.is_some()) {
                let _ = writeln!(
                    s,
                    "\n- keyfleet at N = {}: {}",
                    run.n,
                    run.error.as_deref().unwrap_or("")
                );
            }
            let _ = writeln!(s);
        }
        None => {}
    }
    // The same rotations with the management table in PostgreSQL.
    if let Some(pg) = &r.keyfleet_pg {
        let _ = writeln!(
            s,
            "### The management table: embedded SQLite against PostgreSQL\n"
        );
        match &pg.skipped {
            Some(why) => {
                let _ = writeln!(s, "PostgreSQL: **not measured** in this run: {why}.\n");
            }
            None => {
                let _ = writeln!(s, "The rotations above again, with `store.url` naming a fresh database of a PostgreSQL server this run started on the same machine (Debian's `postgresql`, default settings, local TCP): the state rows and records of every pass of the controller in one transaction, as with SQLite. Same run, same machine.\n");
                let _ = writeln!(s, "| nodes | SQLite: `rekey --json`, median ms | PostgreSQL: `rekey --json`, median ms | PostgreSQL ÷ SQLite | all acknowledged, undecryptable |");
                let _ = writeln!(s, "|---|---|---|---|---|");
                for run in &pg.runs {
                    let lite = r
                        .keyfleet
                        .as_ref()
                        .and_then(|k| k.runs.iter().find(|x| x.n == run.n))
                        .and_then(|x| x.median_of(|y| y.wall_ms));
                    let p = run.median_of(|y| y.wall_ms);
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {}, {} |",
                        run.n,
                        ms(lite),
                        ms(p),
                        ratio(p, lite),
                        run.verified,
                        run.traffic
                            .as_ref()
                            .map_or("–".into(), |t| t.undecryptable.to_string()),
                    );
                }
                for run in pg.runs.iter().filter(|r| r.error.is_some()) {
                    let _ = writeln!(
                        s,
                        "\n- PostgreSQL at N = {}: {}",
                        run.n,
                        run.error.as_deref().unwrap_or("")
                    );
                }
                let _ = writeln!(s);
            }
        }
    }
    if !r.callgrind.is_empty() {
        let _ = writeln!(s, "### Instructions of one round (valgrind callgrind)\n");
        let _ = writeln!(s, "`keyfleet-bench round --nodes N` under `valgrind --tool=callgrind --toggle-collect=*measured_round*`: the real controller and N real node machines in one process, joined, then one rekey round delivered through memory (no sockets; virtual time jumps over the drain). Only the round is counted. Instruction counts do not move with the machine's load: a regression in the protocol's work shows here when wall times are noisy.\n");
        let _ = writeln!(
            s,
            "| nodes | instructions | datagrams delivered | per datagram |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|");
        for c in &r.callgrind {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                c.nodes,
                c.instructions.map_or("–".into(), |i| i.to_string()),
                c.datagrams.map_or("–".into(), |d| d.to_string()),
                match (c.instructions, c.datagrams) {
                    (Some(i), Some(d)) if d > 0 => (i / d).to_string(),
                    _ => "–".into(),
                }
            );
            if let Some(e) = &c.error {
                let _ = writeln!(s, "\n- callgrind at N = {}: {e}", c.nodes);
            }
        }
        let _ = writeln!(s);
    }
    if !r.sim.is_empty() {
        let _ = writeln!(s, "### keyfleet alone at scale: the simulator\n");
        let _ = writeln!(s, "`keyfleet sim --agents N --loss L --rounds R --transport T --json`: one controller and N node machines in one process. `virtual`: the seeded virtual network, whose round time is **virtual** milliseconds (the protocol's timers and retries, not CPU time); `udp`: every node on its own loopback socket, round time in real milliseconds. The simulator sets the controller's drain grace to its network's largest delay + 20 ms (core/src/sim), not the measured drain of the process runs above, and its virtual network delays every datagram by 1–20 ms; so these round times show how the protocol scales with fleet size, not what a default `keyfleet rekey` takes.\n");
        let _ = writeln!(s, "| nodes | transport | loss | rounds | ms per round (median) | converged | undecryptable data | stale | wall ms | load (1 min) |");
        let _ = writeln!(s, "|---:|---|---:|---:|---:|---|---:|---:|---:|---|");
        for x in &r.sim {
            match &x.error {
                Some(e) if x.converged.is_none() => {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | – | not run: {} | | | | {} |",
                        x.agents,
                        x.transport,
                        x.loss,
                        x.rounds,
                        e.replace('|', "/").replace('\n', " "),
                        x.load.describe()
                    );
                }
                _ => {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        x.agents,
                        x.transport,
                        x.loss,
                        x.rounds,
                        ms(x.ms_per_round_p50),
                        x.converged.map_or("?".into(), |c| c.to_string()),
                        x.data_undecryptable.map_or("?".into(), |c| c.to_string()),
                        x.stale.map_or("?".into(), |c| c.to_string()),
                        ms(x.wall_ms),
                        x.load.describe()
                    );
                }
            }
        }
        let _ = writeln!(s);
    }
}

fn datapath_section(d: &DataPathResult, s: &mut String) {
    use datapath::*;
    let _ = writeln!(s, "## Data path: sealing and opening group messages\n");
    let _ = writeln!(s, "Per message: median time (ns, this thread's CPU time, so that time the scheduler gives to other processes on a busy machine is left out; wall-clock medians are in results.json) and plaintext throughput (MiB/s) over {} samples of batches of about {} ms of CPU, cases sampled in turn (load {}). keyfleet rows are the whole data message: `wire::data_header` (the associated data, 31 bytes with the epoch hint, 27 without) and `Keyring::seal`, or `wire::decode` and `Keyring::open`; raw rows seal the same plaintext with the same 31-byte associated data, key and nonce (the ciphertexts were checked equal before timing). Every implementation allocates its output. Nonces come from a counter for all (the agent draws them from the OS CSPRNG, not counted here). ×aes-gcm: time relative to raw `aes-gcm` with its cipher set up once.\n", d.samples, d.batch_ms, d.load.describe());
    let cell = |size: usize, who: &str, op: &str, base_op: &str| -> String {
        match d.find(size, who, op) {
            Some(r) => {
                let base = d.find(size, AES_GCM, base_op).map(|b| b.ns_median);
                format!(
                    "{:.0} ns · {:.0} MiB/s · {}",
                    r.ns_median,
                    r.mib_s,
                    ratio(Some(r.ns_median), base)
                )
            }
            None => "–".into(),
        }
    };
    let head = |s: &mut String, first: &str| {
        let _ = write!(s, "| {first} |");
        for z in SIZES {
            let _ = write!(s, " {} |", size_name(z));
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "|---|{}", "---:|".repeat(SIZES.len()));
    };
    let _ = writeln!(s, "### Sealing\n");
    head(s, "seal");
    let mut rows: Vec<(String, String)> = vec![
        (AES_GCM.into(), AES_GCM.into()),
        (AES_GCM_PER_MSG.into(), AES_GCM_PER_MSG.into()),
        (RING.into(), RING.into()),
    ];
    for p in PHASES {
        rows.push((format!("keyfleet, node in {p:?}"), keyfleet_label(p)));
    }
    for (label, who) in &rows {
        let _ = write!(s, "| {label} |");
        for z in SIZES {
            let _ = write!(s, " {} |", cell(z, who, SEAL, SEAL));
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "\n### Opening\n");
    head(s, "open");
    let mut rows: Vec<(String, String, &str)> = vec![
        (AES_GCM.into(), AES_GCM.into(), OPEN),
        (RING.into(), RING.into(), OPEN),
    ];
    for p in PHASES {
        for op in [OPEN_HINT, OPEN_TRIAL_1, OPEN_TRIAL_2] {
            if d.find(SIZES[0], &keyfleet_label(p), op).is_some() {
                rows.push((
                    format!("keyfleet, node in {p:?}: {op}"),
                    keyfleet_label(p),
                    op,
                ));
            }
        }
    }
    for (label, who, op) in &rows {
        let _ = write!(s, "| {label} |");
        for z in SIZES {
            let _ = write!(s, " {} |", cell(z, who, op, OPEN));
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "\n### The extra cost of trial decryption (no epoch hint)\n"
    );
    let _ = writeln!(s, "Extra time per message against the same node opening with the hint. Without a hint a node tries the key it seals with first; the second key is tried when the message comes from a node one step behind or ahead in the round (DistributionCompleted receiving from InTransit, or the reverse), which happens only between the first and second transition requests.\n");
    head(s, "node state, which key opens it");
    for p in PHASES {
        for op in [OPEN_TRIAL_1, OPEN_TRIAL_2] {
            let who = keyfleet_label(p);
            if d.find(SIZES[0], &who, op).is_none() {
                continue;
            }
            let _ = write!(
                s,
                "| {p:?}, {} |",
                if op == OPEN_TRIAL_1 {
                    "first key"
                } else {
                    "second key"
                }
            );
            for z in SIZES {
                let t = d.find(z, &who, op).map(|r| r.ns_median);
                let h = d.find(z, &who, OPEN_HINT).map(|r| r.ns_median);
                let c = match (t, h) {
                    (Some(t), Some(h)) => format!("{:+.0} ns ({})", t - h, ratio(Some(t), Some(h))),
                    _ => "–".into(),
                };
                let _ = write!(s, " {c} |");
            }
            let _ = writeln!(s);
        }
    }
    let _ = writeln!(s);
}

fn qr_section(q: &QrResult, s: &mut String) {
    let _ = writeln!(s, "## QR: the webcam decoder against zbarimg\n");
    let _ = writeln!(s, "The generated label photos of `fixtures/webcam/generated` (see its README), by degradation and frame size. A photo counts as read when the exact expected payload comes out. Ours: `keyfleet_drivers::webcam::decode_frame` on the image already in memory (per frame the median of {} runs); zbarimg ({}): one `zbarimg` process per photo, QR only, loading the JPEG included, so its times are an upper bound for its decoder. Load {}.\n", q.runs, q.zbarimg_version.as_deref().unwrap_or("not installed"), q.load.describe());
    if let Some(w) = &q.zbarimg_skipped {
        let _ = writeln!(s, "zbarimg skipped: {w}\n");
    }
    let _ = writeln!(s, "| frame | photos | cases | ours read | zbarimg read | ours ms/frame (median) | zbarimg ms/frame (median) |");
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|");
    for r in &q.rows {
        let bold = |x: String| {
            if r.kind == "all" {
                format!("**{x}**")
            } else {
                x
            }
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.frame,
            bold(r.kind.clone()),
            r.cases,
            bold(format!("{}/{}", r.ours_right, r.cases)),
            bold(
                r.zbar_right
                    .map_or("–".into(), |z| format!("{z}/{}", r.cases))
            ),
            ms(Some(r.ours_ms)),
            ms(r.zbar_ms)
        );
    }
    let _ = writeln!(s, "\n\"other\": low contrast, shadow, small codes (75–105 px), JPEG quality 25, and several degradations combined.\n");
    for r in q.rows.iter().filter(|r| r.kind == "all") {
        let _ = writeln!(
            s,
            "- {}: ours missed {}; zbarimg missed {}.",
            r.frame,
            if r.ours_missed.is_empty() {
                "none".into()
            } else {
                r.ours_missed.join(", ")
            },
            if r.zbar_missed.is_empty() {
                "none".into()
            } else {
                r.zbar_missed.join(", ")
            }
        );
    }
    let _ = writeln!(s);
}

/// The whole results.md.
pub fn markdown(r: &Results) -> String {
    let m = &r.machine;
    let mut s = String::new();
    let _ = writeln!(s, "# keyfleet benchmarks\n");
    let _ = writeln!(s, "Written by `bench/run.sh` (crate `bench/`, binary `keyfleet-bench`); every figure below comes from one run on one machine.\n");
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| date | {} |", m.date_utc);
    let _ = writeln!(s, "| commit | {} |", m.commit);
    let _ = writeln!(s, "| `nproc` | {} |", m.nproc);
    let _ = writeln!(s, "| CPU model | {} |", m.cpu_model);
    let _ = writeln!(s, "| memory | {} |", m.mem_total);
    let _ = writeln!(s, "| kernel | {} |", m.kernel);
    let _ = writeln!(s, "| rustc | {} (release build) |", m.rustc);
    for (k, v) in &m.sysctls {
        let _ = writeln!(s, "| `{k}` | {v} |");
    }
    let _ = writeln!(
        s,
        "| load average (1, 5, 15 min) at start | {} |",
        load3(m.load_at_start)
    );
    let _ = writeln!(s, "| load average at end | {} |", load3(r.load_at_end));
    if let Some(t) = r.total_s {
        let _ = writeln!(s, "| measuring time | {t:.0} s |");
    }
    let _ = writeln!(s);
    let busy = m
        .load_at_start
        .is_some_and(|l| l[0] > m.nproc as f64 * 0.75);
    if busy {
        let _ = writeln!(s, "**The machine was busy with other work during this run** (load average above the core count): absolute times are inflated and noisier than on an idle machine; the ratios, measured side by side in the same run, hold better, and the decode counts do not depend on load.\n");
    }
    rotation_section(r, &mut s);
    if let Some(d) = &r.datapath {
        datapath_section(d, &mut s);
    }
    if !r.e2e.is_empty() {
        e2e_section(&r.e2e, &mut s);
    }
    if let Some(q) = &r.qr {
        qr_section(q, &mut s);
    }
    s
}

/// keyfleet's messages/s as a share of the relay path's, at `size`.
fn e2e_share(rows: &[crate::e2e::E2eRow], size: usize) -> Option<f64> {
    let rate = |p: &str| {
        rows.iter()
            .find(|r| r.path == p && r.size == size && r.error.is_none() && r.msgs_per_s > 0.0)
            .map(|r| r.msgs_per_s)
    };
    Some(rate("keyfleet")? / rate("relay")?)
}

fn e2e_section(rows: &[crate::e2e::E2eRow], s: &mut String) {
    let _ = writeln!(
        s,
        "## Data path end to end: application to application
"
    );
    let _ = writeln!(s, "A client sends as fast as the first hop takes its messages; a client at the other end reads as fast as it can. **keyfleet**: client → Unix datagram → agent (seals) → UDP multicast → agent (opens) → Unix datagram → client. **relay**: the same hops through two plain forwarding processes, without the protocol (the limit of this architecture). **multicast**: a UDP multicast sender and receiver, no Unix hops. Latency from send to receipt, under that full load; dropped = sent − received.\n");
    let _ = writeln!(s, "CPU per message: what the two forwarding processes (the agents, the relays) used together, user and system time, per message received; for keyfleet also `keyfleet serve`, which hears the group too. The rate depends on how the scheduler shares two cores among five busy processes; the CPU time much less.\n");
    let _ = writeln!(s, "A client's Unix socket queues `net.unix.max_dgram_qlen` datagrams (in the table at the top): 10 where nothing sets it, 512 where systemd does. At 512 the relays block less on their clients and the relay path gains more than keyfleet's, whose agents send to their clients from a thread each (README, \"Benchmarks\").\n");
    let _ = writeln!(s, "keyfleet and relay ran {} times each at each size, alternated (the rate of one path moves more from run to run than most changes do): messages/s is the median run's, and so are the latencies and the CPU; received and dropped add up all runs; each run's rate is in the note.\n", crate::e2e::RUNS);
    let _ = writeln!(s, "| path | size | messages/s | p50 latency | p99 latency | received | dropped | CPU per message | note |\n|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let runs = (r.rates.len() > 1).then(|| {
            let v: Vec<String> = r.rates.iter().map(|x| format!("{x:.0}")).collect();
            format!("runs: {}", v.join(", "))
        });
        let peak = r
            .backlog_peak
            .map(|p| format!("receiving agent's backlog for its client peaked at {p} messages (since it started)"));
        let note: Vec<&str> = [runs.as_deref(), peak.as_deref(), r.error.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        let cpu = match (r.cpu_us_per_msg, r.controller_cpu_us_per_msg) {
            (Some(f), Some(c)) => format!("{f:.1} µs + controller {c:.1} µs"),
            (Some(f), None) => format!("{f:.1} µs"),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.0} µs | {:.0} µs | {} of {} | {} | {cpu} | {} |",
            r.path,
            size_name(r.size),
            r.msgs_per_s,
            r.p50_us,
            r.p99_us,
            r.received,
            r.sent,
            r.dropped,
            note.join("; ")
        );
    }
    let shares: Vec<String> = crate::e2e::SIZES
        .iter()
        .filter_map(|&z| {
            e2e_share(rows, z).map(|x| format!("{:.0}% at {}", x * 100.0, size_name(z)))
        })
        .collect();
    if !shares.is_empty() {
        let _ = writeln!(
            s,
            "\nkeyfleet delivers {} of the relay path's messages per second.",
            shares.join(", ")
        );
    }
    let _ = writeln!(s);
}

/// The range of a ratio over fleet sizes, as "0.8–1.3×" (or one value).
fn ratio_range(xs: &[f64]) -> Option<String> {
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return None;
    }
    // Three decimals below 0.1×, two below 1×, so that a small ratio does
    // not read as 0.0×.
    let f = |x: f64| {
        if x < 0.1 {
            format!("{x:.3}")
        } else if x < 1.0 {
            format!("{x:.2}")
        } else {
            format!("{x:.1}")
        }
    };
    Some(if f(lo) == f(hi) {
        format!("{}×", f(lo))
    } else {
        format!("{}–{}×", f(lo), f(hi))
    })
}

/// The README's "Benchmarks" block: a summary of the ratios, the rotation
/// table and the plot, generated so that it always matches results.md.
pub fn readme_block(r: &Results) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(
        s,
        "Measured {} on {} × {} (load average {} at the start; see [bench/results.md](bench/results.md) for every table, the machine and the load), with `bench/run.sh`.\n",
        m.date_utc,
        m.nproc,
        m.cpu_model,
        m.load_at_start.map_or("?".into(), |l| format!("{:.1}", l[0]))
    );
    let mut whole = Vec::new();
    let mut core = Vec::new();
    let mut ns = Vec::new();
    if let (Some(sf), Some(kf)) = (&r.serf, &r.keyfleet) {
        for k in &kf.runs {
            if let Some(sr) = sf.runs.iter().find(|x| x.n == k.n) {
                if let (Some(a), Some(b), Some(c)) = (
                    k.median_of(|x| x.wall_ms),
                    sr.median_total_ms(),
                    k.median_of(|x| x.elapsed_ms - x.draining_ms),
                ) {
                    whole.push(a / b);
                    core.push(c / b);
                    ns.push(k.n);
                }
            }
        }
    }
    match (ratio_range(&whole), ratio_range(&core)) {
        (Some(w), Some(c)) => {
            let _ = writeln!(
                s,
                "- **Rotation** across {} real processes on loopback: one `keyfleet rekey` takes {w} the time of Serf's `keys -install`, `-use`, `-remove` (above 1× keyfleet is slower). The drain grace (SPEC S2: old-key messages still in flight stay readable) is measured from the first transition's time in flight; without it the round takes {c} Serf's time.",
                ns.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
            );
        }
        _ => {
            let _ = writeln!(s, "- **Rotation**: keyfleet's process benchmark did not run in this measurement (see bench/results.md for why); Serf's figures are in the table.");
        }
    }
    if let Some(kf) = &r.keyfleet {
        let t: Vec<String> = kf
            .runs
            .iter()
            .filter_map(|k| {
                k.traffic.as_ref().map(|t| {
                    format!(
                        "N = {}: {} messages, {} of {} deliveries, {} undecryptable",
                        k.n, t.sent, t.delivered, t.expected, t.undecryptable
                    )
                })
            })
            .collect();
        if !t.is_empty() {
            let _ = writeln!(
                s,
                "- **Application traffic during the rotations** ({} senders, every {} ms): {}.",
                crate::fleet::TRAFFIC_SENDERS,
                crate::fleet::TRAFFIC_EVERY_MS,
                t.join("; ")
            );
        }
    }
    for c in &r.callgrind {
        if let Some(i) = c.instructions {
            let _ = writeln!(
                s,
                "- **One round's work** (callgrind, in-process, N = {}): {} instructions.",
                c.nodes, i
            );
        }
    }
    let sims: Vec<String> = r
        .sim
        .iter()
        .filter(|x| x.error.is_none() && x.converged == Some(true))
        .filter_map(|x| {
            x.ms_per_round_p50.map(|m| {
                format!(
                    "{} nodes in {} ms ({})",
                    x.agents,
                    ms(Some(m)),
                    if x.transport == "virtual" {
                        "virtual time"
                    } else {
                        "real time, over loopback UDP"
                    }
                )
            })
        })
        .collect();
    if !sims.is_empty() {
        let _ = writeln!(
            s,
            "- **keyfleet alone at scale** (`keyfleet sim`, one round, the simulator's short drain grace): {}.",
            sims.join("; ")
        );
    }
    if let Some(d) = &r.datapath {
        let mut seal = Vec::new();
        let mut open = Vec::new();
        let mut trial = Vec::new();
        for z in datapath::SIZES {
            let base_s = d
                .find(z, datapath::AES_GCM, datapath::SEAL)
                .map(|x| x.ns_median);
            let base_o = d
                .find(z, datapath::AES_GCM, datapath::OPEN)
                .map(|x| x.ns_median);
            for p in datapath::PHASES {
                let who = datapath::keyfleet_label(p);
                if let (Some(a), Some(b)) = (d.find(z, &who, datapath::SEAL), base_s) {
                    seal.push(a.ns_median / b);
                }
                if let (Some(a), Some(b)) = (d.find(z, &who, datapath::OPEN_HINT), base_o) {
                    open.push(a.ns_median / b);
                }
                if let (Some(a), Some(b)) = (
                    d.find(z, &who, datapath::OPEN_TRIAL_2),
                    d.find(z, &who, datapath::OPEN_HINT),
                ) {
                    trial.push(a.ns_median / b.ns_median);
                }
            }
        }
        if let (Some(a), Some(b)) = (ratio_range(&seal), ratio_range(&open)) {
            let _ = writeln!(
                s,
                "- **Data path** (64 B to 16 KiB): sealing a group message with the keyring costs {a} raw `aes-gcm` and opening one {b}, in every node state (the keyring keeps each held key's cipher set up; what is left over raw `aes-gcm` is the data message's header and framing; `ring` and the rest are in results.md). Without the epoch hint, a message that only the second key opens costs {} an opening with the hint.",
                ratio_range(&trial).unwrap_or_else(|| "–".into())
            );
        }
    }
    if let Some(q) = &r.qr {
        let all: Vec<&crate::qr::QrRow> = q.rows.iter().filter(|x| x.kind == "all").collect();
        let cases: usize = all.iter().map(|x| x.cases).sum();
        let ours: usize = all.iter().map(|x| x.ours_right).sum();
        let zbar: Option<usize> = all.iter().map(|x| x.zbar_right).sum();
        let _ = writeln!(
            s,
            "- **QR labels** (generated photos, 640x480 and 1280x720): our webcam decoder reads {ours} of {cases}, `zbarimg` {}.",
            zbar.map_or("was not run".into(), |z| format!("{z} of {cases}"))
        );
    }
    let shares: Vec<String> = crate::e2e::SIZES
        .iter()
        .filter_map(|&z| {
            e2e_share(&r.e2e, z).map(|x| format!("{:.0}% at {}", x * 100.0, size_name(z)))
        })
        .collect();
    if !shares.is_empty() {
        let dropped: u64 = r
            .e2e
            .iter()
            .filter(|x| x.path == "keyfleet")
            .map(|x| x.dropped)
            .sum();
        let _ = writeln!(
            s,
            "- **Data path end to end** (application → agent → group → agent → application): keyfleet delivers {} of the messages per second of the same hops through plain relay processes; {dropped} messages dropped for a client reading as fast as it can.",
            shares.join(", ")
        );
    }
    let _ = writeln!(s, "\n{}", rotation_table(r));
    let _ = writeln!(s, "![rotation time against fleet size](bench/rotation.svg)");
    s
}

const README_START: &str = "<!-- bench:start (generated by bench/run.sh) -->";
const README_END: &str = "<!-- bench:end -->";

/// Replace the generated block between the markers in `readme`; `None` when the markers are missing.
pub fn splice_readme(readme: &str, block: &str) -> Option<String> {
    let a = readme.find(README_START)? + README_START.len();
    let b = a + readme[a..].find(README_END)?;
    Some(format!("{}\n{}{}", &readme[..a], block, &readme[b..]))
}

/// Read the JSON of a run, write results.md and the SVG.
pub fn write(
    results_json: &Path,
    md: &Path,
    svg: &Path,
    readme: Option<&Path>,
) -> anyhow::Result<()> {
    let r: Results = serde_json::from_slice(
        &std::fs::read(results_json)
            .with_context(|| format!("reading {}", results_json.display()))?,
    )
    .with_context(|| format!("parsing {}", results_json.display()))?;
    plot(&r, svg).context("drawing the rotation plot")?;
    std::fs::write(md, markdown(&r)).with_context(|| format!("writing {}", md.display()))?;
    if let Some(p) = readme {
        let old = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let new = splice_readme(&old, &readme_block(&r)).with_context(|| {
            format!(
                "{} has no {README_START} … {README_END} block to fill",
                p.display()
            )
        })?;
        std::fs::write(p, new).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{KfRep, KfRun};
    use crate::serf::{SerfRep, SerfRun};

    fn sample() -> Results {
        let serf = |n, t: f64| SerfRun {
            n,
            reps: (0..5)
                .map(|i| SerfRep {
                    install_ms: t,
                    use_ms: t,
                    remove_ms: t + i as f64,
                    total_ms: 3.0 * t + i as f64,
                    retries: vec![],
                })
                .collect(),
            verified: true,
            ..SerfRun::default()
        };
        let kf = |n, t: f64| KfRun {
            n,
            reps: (0..5)
                .map(|i| KfRep {
                    wall_ms: t + i as f64,
                    elapsed_ms: t,
                    draining_ms: 2000.0,
                    acked: n as u64,
                    ..KfRep::default()
                })
                .collect(),
            verified: true,
            ..KfRun::default()
        };
        Results {
            serf: Some(SerfResult {
                version: Some("Serf v0.8.2".into()),
                profile: "lan".into(),
                runs: vec![serf(10, 100.0), serf(50, 200.0)],
            }),
            keyfleet: Some(KfResult {
                skipped: None,
                runs: vec![kf(10, 2300.0), kf(50, 2600.0)],
            }),
            sim: vec![SimRun {
                agents: 1000,
                transport: "virtual".into(),
                ms_per_round_p50: Some(2500.0),
                converged: Some(true),
                ..SimRun::default()
            }],
            ..Results::default()
        }
    }

    #[test]
    fn rotation_table_shows_medians_and_ratios() {
        let t = rotation_table(&sample());
        // N=10: Serf totals 300..304, median 302; keyfleet 2300..2304, median 2302.
        let row = t.lines().find(|l| l.starts_with("| 10 |")).unwrap();
        assert_eq!(row, "| 10 | 302 | 2302 | 7.62× | 300 | 0.99× |");
        assert!(t.lines().any(|l| l.starts_with("| 50 | 602 | 2602 |")));
    }

    #[test]
    fn plot_has_a_series_per_system_and_is_svg() {
        let r = sample();
        let s = series(&r);
        assert_eq!(s.len(), 4, "{s:?}");
        assert_eq!(s[0].1, vec![(10.0, 302.0), (50.0, 602.0)]);
        assert_eq!(s[1].1, vec![(10.0, 2302.0), (50.0, 2602.0)]);
        assert_eq!(s[2].1, vec![(10.0, 300.0), (50.0, 600.0)], "less the drain");
        assert_eq!(s[3].1, vec![(1000.0, 2500.0)]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.svg");
        plot(&r, &p).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.contains("fleet size"));
        assert!(svg.contains("Serf"));
    }

    #[test]
    fn readme_block_replaces_only_what_is_between_the_markers() {
        let r = sample();
        let block = readme_block(&r);
        assert!(block.contains("4.3–7.6×"), "{block}");
        assert!(
            block.contains("without it the round takes 0.99–1.00×"),
            "{block}"
        );
        assert!(
            block.contains("1000 nodes in 2500 ms (virtual time)"),
            "{block}"
        );
        assert!(block.contains("bench/rotation.svg"));
        let readme = format!(
            "# x\n\n## Benchmarks\n\nby hand\n{README_START}\nold\n{README_END}\n\n## Next\n"
        );
        let new = splice_readme(&readme, &block).unwrap();
        assert!(new.contains("by hand") && new.contains("## Next"));
        assert!(!new.contains("\nold\n"));
        assert!(new.contains(&block));
        assert_eq!(splice_readme(&new, &block).unwrap(), new, "idempotent");
        assert_eq!(splice_readme("no markers", &block), None);
    }

    #[test]
    fn small_ratios_keep_their_decimals() {
        assert_eq!(ratio_range(&[0.02, 0.2]).as_deref(), Some("0.020–0.20×"));
        assert_eq!(
            ratio_range(&[0.013, 0.019]).as_deref(),
            Some("0.013–0.019×")
        );
        assert_eq!(ratio_range(&[1.25, 2.06]).as_deref(), Some("1.2–2.1×"));
        assert_eq!(ratio_range(&[0.5, 0.5]).as_deref(), Some("0.50×"));
        assert_eq!(ratio_range(&[]), None);
        // Below 0.1× the fraction too: 1/50 must not hide in a rounded 0.02×.
        assert_eq!(ratio(Some(36.5), Some(1959.0)), "0.019× (1/54)");
        assert_eq!(ratio(Some(38.0), Some(1889.8)), "0.020× (1/50)");
        assert_eq!(ratio(Some(40.0), Some(1800.0)), "0.022× (1/45)");
        assert_eq!(ratio(Some(900.0), Some(1000.0)), "0.90×");
        assert_eq!(ratio(Some(1.0), Some(0.0)), "–");
    }

    #[test]
    fn a_skipped_keyfleet_half_is_said_so() {
        let mut r = sample();
        r.keyfleet = Some(KfResult {
            skipped: Some("`keyfleet rekey` is not in this build".into()),
            runs: vec![],
        });
        let md = markdown(&r);
        assert!(md.contains("**not measured**"));
        assert!(md.contains("| 10 | 302 | – | – |"));
    }
}
