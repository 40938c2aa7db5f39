//! Rotation with keyfleet: one controller (`keyfleet serve`) and N
//! `keyfleet-agent` processes on loopback multicast, enrolled with
//! `keyfleet enroll`; a rotation is one `keyfleet rekey --json`, which
//! returns when the round is done (every node acknowledged both transition
//! requests, or was marked stale).
//!
//! While the rotations run, the applications of the first
//! [`TRAFFIC_SENDERS`] agents send a group message every
//! [`TRAFFIC_EVERY_MS`] through their agents; every message must reach
//! every other agent (counted from the agents' own `delivered` and
//! `undecryptable` counters).
//!
//! Also `keyfleet sim --json` at fleet sizes too large for processes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use keyfleet_core::label::{hex_form, InitialKey};
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::procs::{tail, timed, timed_ok, wait_for, Fleet, PortPool};
use crate::stats::{median, Load};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct KfRep {
    /// The whole `keyfleet rekey --json` process.
    pub wall_ms: f64,
    /// The round as the controller timed it (`elapsed_ms`).
    pub elapsed_ms: f64,
    /// Of which the drain grace (`phases_ms.draining`, measured from the round trips).
    pub draining_ms: f64,
    /// The other phases (`phases_ms`): distributing, first transition,
    /// second transition (absent in results written before they were kept).
    #[serde(default)]
    pub other_phases_ms: Option<[f64; 3]>,
    pub epoch: u64,
    pub nodes: u64,
    pub acked: u64,
    pub stale: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct KfRun {
    pub n: usize,
    /// From starting the agents until the table showed all N joined.
    pub join_ms: f64,
    pub reps: Vec<KfRep>,
    /// After the last round every agent reported UpdateCompleted at the round's epoch.
    pub verified: bool,
    /// Application messages during the rotations, and where they arrived.
    #[serde(default)]
    pub traffic: Option<TrafficFigures>,
    pub error: Option<String>,
    pub load: Load,
}

/// Rotations are this far apart (both keyfleet's and Serf's), as they are in
/// use, where a rotation follows usage counts, the key's age or an operator,
/// never the last one at once: the controller prepares the next round's key
/// agreement while idle (core `controller/ahead.rs`), and a benchmark of
/// back-to-back rotations would measure a controller never idle.
pub const REP_PAUSE_MS: u64 = 300;

/// Agents whose applications send during the rotations…
pub const TRAFFIC_SENDERS: usize = 5;
/// …a group message each this often.
pub const TRAFFIC_EVERY_MS: u64 = 50;

/// What the applications sent during the rotations, and what the agents did with it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrafficFigures {
    /// Messages the senders' agents confirmed (sealed and sent, or held and sent).
    pub sent: u64,
    /// Each reaches every other agent: `sent` × (N − 1).
    pub expected: u64,
    /// Deliveries the agents counted.
    pub delivered: u64,
    /// Data no held key opened, over all agents (must be 0).
    pub undecryptable: u64,
    /// Messages the senders' agents refused (hold queue full).
    pub refused: u64,
}

/// The senders of [`TrafficFigures`]: one thread per application.
struct AppTraffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl AppTraffic {
    fn start(f: &KfFleet, senders: usize, every: Duration) -> anyhow::Result<AppTraffic> {
        use keyfleet::agent::app;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for i in 0..senders.min(f.n) {
            let agent = f.agent_state(i).join(app::SOCKET_NAME);
            let me = f.dir.path().join(format!("app-{i}.sock"));
            let sock = std::os::unix::net::UnixDatagram::bind(&me)
                .with_context(|| format!("binding {}", me.display()))?;
            sock.set_read_timeout(Some(Duration::from_millis(5)))?;
            let (stop, sent, refused) = (stop.clone(), sent.clone(), refused.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                let mut n = 0u64;
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        n += 1;
                        let msg = app::encode_send(format!("a{i} #{n}").as_bytes());
                        let _ = sock.send_to(&msg, &agent);
                        next += every;
                    }
                    if let Ok(len) = sock.recv(&mut buf) {
                        match app::decode_reply(&buf[..len]) {
                            Ok(app::Reply::Outcome(
                                app::SendOutcome::Sent | app::SendOutcome::Held,
                            )) => {
                                sent.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(app::Reply::Outcome(app::SendOutcome::Dropped)) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {}
                        }
                    }
                }
                // The last answers.
                let until = Instant::now() + Duration::from_millis(300);
                while Instant::now() < until {
                    if let Ok(len) = sock.recv(&mut buf) {
                        if let Ok(app::Reply::Outcome(
                            app::SendOutcome::Sent | app::SendOutcome::Held,
                        )) = app::decode_reply(&buf[..len])
                        {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        Ok(AppTraffic {
            stop,
            sent,
            refused,
            threads,
        })
    }

    /// Stops sending; (messages confirmed, refused).
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

impl Drop for AppTraffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl KfRun {
    pub fn median_of(&self, f: impl Fn(&KfRep) -> f64) -> Option<f64> {
        median(&self.reps.iter().map(f).collect::<Vec<_>>())
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct KfResult {
    /// Why nothing was measured (a binary or subcommand missing), if so.
    pub skipped: Option<String>,
    pub runs: Vec<KfRun>,
}

/// The binaries of one build.
#[derive(Clone, Debug)]
pub struct Bins {
    pub keyfleet: PathBuf,
    pub agent: PathBuf,
}

impl Bins {
    pub fn in_dir(dir: &Path) -> Bins {
        Bins {
            keyfleet: dir.join("keyfleet"),
            agent: dir.join("keyfleet-agent"),
        }
    }

    /// Why the process benchmark cannot run with these binaries, if it cannot:
    /// a binary missing, or the controller commands not there yet.
    pub fn missing(&self) -> Option<String> {
        for b in [&self.keyfleet, &self.agent] {
            if !b.is_file() {
                return Some(format!("{} is not built", b.display()));
            }
        }
        let help = Command::new(&self.keyfleet).arg("--help").output().ok()?;
        let help = String::from_utf8_lossy(&help.stdout);
        for sub in ["init", "enroll", "rekey", "serve", "status"] {
            if !help.lines().any(|l| l.trim_start().starts_with(sub)) {
                return Some(format!("`keyfleet {sub}` is not in this build"));
            }
        }
        None
    }
}

/// A controller state directory and N agents, enrolled and joined.
pub struct KfFleet {
    bins: Bins,
    dir: tempfile::TempDir,
    config: PathBuf,
    agents: Vec<PathBuf>,
    fleet: Fleet,
    pub n: usize,
    pub join_ms: f64,
}

impl KfFleet {
    fn state(&self) -> PathBuf {
        self.dir.path().join("controller")
    }

    /// Agent `i`'s state directory (its `app.sock` is in it).
    pub fn agent_state(&self, i: usize) -> PathBuf {
        self.agents[i].clone()
    }

    /// Agent `i`'s process id.
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.fleet.pid(&format!("agent n{i:04}"))
    }

    /// The `keyfleet serve` process id.
    pub fn serve_pid(&self) -> Option<u32> {
        self.fleet.pid("keyfleet serve")
    }

    fn keyfleet(&self) -> Command {
        let mut c = Command::new(&self.bins.keyfleet);
        c.arg("--state")
            .arg(self.state())
            .arg("--config")
            .arg(&self.config)
            .env_remove("KEYFLEET_PASSPHRASE");
        c
    }

    /// `n` nodes; the management table in PostgreSQL at `store_url` when
    /// given, else the embedded SQLite default.
    pub fn start(
        bins: &Bins,
        n: usize,
        ports: &mut PortPool,
        store_url: Option<&str>,
    ) -> anyhow::Result<KfFleet> {
        // KFB_KEEP=1 keeps the fleet's directory (logs, state, the
        // management table) for a look afterwards.
        let dir = tempfile::Builder::new()
            .prefix("kfb-keyfleet-")
            .disable_cleanup(std::env::var_os("KFB_KEEP").is_some())
            .tempdir()?;
        let mut rng = rand::thread_rng();
        let group = format!(
            "239.255.{}.{}:{}",
            rng.gen_range(100..200),
            rng.gen_range(1..250),
            ports.take()?
        );
        let config = dir.path().join("keyfleet.toml");
        std::fs::write(
            &config,
            format!(
                "[network]\ngroup = \"{group}\"\niface = \"127.0.0.1\"\nlisten_port = {}\n{}",
                ports.take()?,
                store_url.map_or(String::new(), |u| format!("[store]\nurl = \"{u}\"\n"))
            ),
        )?;
        let mut f = KfFleet {
            bins: bins.clone(),
            dir,
            config,
            agents: Vec::new(),
            fleet: Fleet::default(),
            n,
            join_ms: 0.0,
        };
        let mut c = f.keyfleet();
        c.arg("init");
        timed_ok(c, Duration::from_secs(60)).context("keyfleet init")?;
        let mut keys = Vec::new();
        for i in 0..n {
            let mut k = [0u8; 16];
            rand::rngs::OsRng.fill_bytes(&mut k);
            let form = hex_form(&InitialKey::from_bytes(k));
            let port = ports.take()?;
            let mut c = f.keyfleet();
            c.args([
                "enroll",
                "--node-id",
                &format!("n{i:04}"),
                "--addr",
                &format!("127.0.0.1:{port}"),
                "--key",
                &form,
            ]);
            timed_ok(c, Duration::from_secs(60)).with_context(|| format!("enrolling n{i:04}"))?;
            keys.push((form, port));
        }
        let mut c = f.keyfleet();
        c.arg("serve");
        let log = f.dir.path().join("serve.log");
        f.fleet.spawn("keyfleet serve", c, &log)?;
        let t0 = Instant::now();
        for (i, (form, port)) in keys.iter().enumerate() {
            let state = f.dir.path().join(format!("agent-{i:04}"));
            // The agent creates its state directory itself, owner-only.
            let keyfile = f.dir.path().join(format!("key-{i:04}"));
            write_private(&keyfile, form)?;
            let mut c = Command::new(&bins.agent);
            c.arg("run")
                .arg("--state")
                .arg(&state)
                .args(["--node-id", &format!("n{i:04}")])
                .arg("--initial-key-file")
                .arg(&keyfile)
                .args(["--group", &group, "--iface", "127.0.0.1"])
                .args(["--listen", &format!("127.0.0.1:{port}")]);
            f.fleet.spawn(
                &format!("agent n{i:04}"),
                c,
                &f.dir.path().join(format!("agent-{i:04}.log")),
            )?;
            f.agents.push(state);
        }
        let limit = Duration::from_secs(60 + n as u64);
        wait_for(
            &format!("{n} keyfleet agents joined"),
            limit,
            Duration::from_millis(250),
            || {
                let dead = f.fleet.exited();
                if !dead.is_empty() {
                    let log = if dead[0] == "keyfleet serve" {
                        log.clone()
                    } else {
                        f.dir.path().join(format!("agent-{}.log", &dead[0][7..]))
                    };
                    bail!("{} exited: {}", dead[0], tail(&log, 5));
                }
                Ok((f.joined()? >= n).then_some(()))
            },
        )?;
        f.join_ms = t0.elapsed().as_secs_f64() * 1000.0;
        Ok(f)
    }

    /// Nodes the management table has heard from (`last_seen_ms` set).
    pub fn joined(&self) -> anyhow::Result<usize> {
        let mut c = self.keyfleet();
        c.args(["status", "--json"]);
        let (_, out) = timed(c, Duration::from_secs(20))?;
        if !out.status.success() {
            return Ok(0);
        }
        let v: Value = serde_json::from_slice(&out.stdout).context("keyfleet status --json")?;
        Ok(v["nodes"]
            .as_array()
            .map(|a| a.iter().filter(|n| !n["last_seen_ms"].is_null()).count())
            .unwrap_or(0))
    }

    /// One `keyfleet rekey --json`.
    pub fn rotate(&self) -> anyhow::Result<KfRep> {
        let mut c = self.keyfleet();
        c.args(["rekey", "--json"]);
        let (d, out) = timed_ok(c, Duration::from_secs(300)).context("keyfleet rekey --json")?;
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "keyfleet rekey --json printed {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        Ok(KfRep {
            wall_ms: d.as_secs_f64() * 1000.0,
            elapsed_ms: num("elapsed_ms"),
            draining_ms: v["phases_ms"]["draining"].as_f64().unwrap_or(f64::NAN),
            other_phases_ms: ["distributing", "first_transition", "second_transition"]
                .iter()
                .map(|p| v["phases_ms"][p].as_f64())
                .collect::<Option<Vec<f64>>>()
                .and_then(|v| v.try_into().ok()),
            epoch: v["epoch"].as_u64().unwrap_or(0),
            nodes: v["nodes"].as_u64().unwrap_or(0),
            acked: v["acked"].as_u64().unwrap_or(0),
            stale: v["stale"].as_u64().unwrap_or(0),
        })
    }

    /// (delivered, undecryptable) summed over the agents' counters.
    pub fn data_counters(&self) -> anyhow::Result<(u64, u64)> {
        let (mut delivered, mut undecryptable) = (0, 0);
        for a in &self.agents {
            let mut c = Command::new(&self.bins.agent);
            c.arg("status").arg("--state").arg(a).arg("--json");
            let (_, out) = timed_ok(c, Duration::from_secs(20))?;
            let v: Value = serde_json::from_slice(&out.stdout)?;
            delivered += v["running"]["delivered"].as_u64().unwrap_or(0);
            undecryptable += v["running"]["undecryptable"].as_u64().unwrap_or(0);
        }
        Ok((delivered, undecryptable))
    }

    /// Whether every agent is in UpdateCompleted at `epoch`.
    pub fn verify(&self, epoch: u64) -> anyhow::Result<bool> {
        for a in &self.agents {
            let mut c = Command::new(&self.bins.agent);
            c.arg("status").arg("--state").arg(a).arg("--json");
            let (_, out) = timed_ok(c, Duration::from_secs(20))?;
            let v: Value = serde_json::from_slice(&out.stdout)?;
            if v["state"] != "UpdateCompleted" || v["epoch"].as_u64() != Some(epoch) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Start, enroll, join and rotate a fleet of each size `reps` times.
/// The rotation benchmark at each size; with `store`, each fleet's
/// management table is a fresh database of that PostgreSQL server.
pub fn run(
    bins: &Bins,
    sizes: &[usize],
    reps: usize,
    base_port: u16,
    store: Option<&crate::testpg::PgServer>,
) -> KfResult {
    if let Some(why) = bins.missing() {
        eprintln!("keyfleet processes skipped: {why}");
        return KfResult {
            skipped: Some(why),
            runs: Vec::new(),
        };
    }
    let mut ports = PortPool::new(base_port);
    let runs = sizes
        .iter()
        .map(|&n| {
            let load = Load::start();
            let mut r = KfRun {
                n,
                ..KfRun::default()
            };
            let res = (|| -> anyhow::Result<()> {
                let url = store.map(|pg| pg.create_db());
                let f = KfFleet::start(bins, n, &mut ports, url.as_deref())?;
                r.join_ms = f.join_ms;
                let (d0, u0) = f.data_counters()?;
                let traffic = AppTraffic::start(
                    &f,
                    TRAFFIC_SENDERS,
                    Duration::from_millis(TRAFFIC_EVERY_MS),
                )?;
                std::thread::sleep(Duration::from_millis(500));
                let rotated = (|| -> anyhow::Result<()> {
                    for i in 0..reps {
                        if i > 0 {
                            std::thread::sleep(Duration::from_millis(REP_PAUSE_MS));
                        }
                        let rep = f.rotate()?;
                        r.reps.push(rep.clone());
                        ensure!(
                            rep.acked as usize == n && rep.stale == 0,
                            "round for epoch {} acknowledged by {} of {n} nodes, {} stale",
                            rep.epoch,
                            rep.acked,
                            rep.stale
                        );
                    }
                    Ok(())
                })();
                std::thread::sleep(Duration::from_millis(500));
                let (sent, refused) = traffic.finish();
                // Let the last messages arrive.
                std::thread::sleep(Duration::from_millis(1000));
                let (d1, u1) = f.data_counters()?;
                r.traffic = Some(TrafficFigures {
                    sent,
                    expected: sent * (n as u64 - 1),
                    delivered: d1 - d0,
                    undecryptable: u1 - u0,
                    refused,
                });
                rotated?;
                let last = r.reps.last().map_or(0, |x| x.epoch);
                r.verified = f.verify(last)?;
                Ok(())
            })();
            r.error = res.err().map(|e| format!("{e:#}"));
            r.load = load.finish();
            eprintln!(
                "keyfleet N={n}: median rekey {:?} ms over {} reps; traffic {:?}{}",
                r.median_of(|x| x.wall_ms).map(|m| m.round()),
                r.reps.len(),
                r.traffic,
                r.error
                    .as_deref()
                    .map(|e| format!("; error: {e}"))
                    .unwrap_or_default()
            );
            r
        })
        .collect();
    KfResult {
        skipped: None,
        runs,
    }
}

/// One `keyfleet sim --json` run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SimRun {
    pub agents: usize,
    pub transport: String,
    pub loss: f64,
    pub rounds: u32,
    /// The simulator's own wall time for the whole run.
    pub wall_ms: Option<f64>,
    /// Median length of a round: virtual ms for `virtual`, real ms for `udp`.
    pub ms_per_round_p50: Option<f64>,
    pub converged: Option<bool>,
    pub data_undecryptable: Option<u64>,
    pub stale: Option<u64>,
    pub error: Option<String>,
    pub load: Load,
    /// The whole report, as printed.
    pub report: Value,
}

/// Whether `keyfleet sim` offers `--transport udp` in this build.
pub fn sim_has_udp(keyfleet: &Path) -> bool {
    Command::new(keyfleet)
        .args(["sim", "--help"])
        .output()
        .map(|o| {
            let h = String::from_utf8_lossy(&o.stdout);
            h.lines()
                .skip_while(|l| !l.contains("--transport"))
                .take(12)
                .any(|l| l.contains("udp"))
        })
        .unwrap_or(false)
}

/// `keyfleet sim --agents N --loss L --rounds R --transport T --json`.
pub fn sim(keyfleet: &Path, agents: usize, transport: &str, loss: f64, rounds: u32) -> SimRun {
    let load = Load::start();
    let mut r = SimRun {
        agents,
        transport: transport.to_string(),
        loss,
        rounds,
        ..SimRun::default()
    };
    let mut c = Command::new(keyfleet);
    c.args([
        "sim",
        "--agents",
        &agents.to_string(),
        "--loss",
        &loss.to_string(),
        "--rounds",
        &rounds.to_string(),
        "--transport",
        transport,
        "--json",
    ]);
    match timed(c, Duration::from_secs(300)) {
        Err(e) => r.error = Some(format!("{e:#}")),
        Ok((d, out)) => match serde_json::from_slice::<Value>(&out.stdout) {
            Ok(v) => {
                r.wall_ms = v["wall_ms"].as_f64().or(Some(d.as_secs_f64() * 1000.0));
                let per_round = &v["virtual_ms_per_round"];
                r.ms_per_round_p50 = v["real_ms_per_round"]["p50"]
                    .as_f64()
                    .or_else(|| per_round["p50"].as_f64());
                r.converged = v["converged"].as_bool();
                r.data_undecryptable = v["data_undecryptable"].as_u64();
                r.stale = v["stale"].as_u64();
                if !out.status.success() {
                    r.error = Some(format!("keyfleet sim exited with {}", out.status));
                }
                r.report = v;
            }
            Err(e) => {
                r.error = Some(format!(
                    "keyfleet sim printed no JSON ({e}; exit {}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        },
    }
    r.load = load.finish();
    eprintln!(
        "sim {transport} N={agents}: {:?} ms per round, wall {:?} ms{}",
        r.ms_per_round_p50,
        r.wall_ms,
        r.error
            .as_deref()
            .map(|e| format!("; error: {e}"))
            .unwrap_or_default()
    );
    r
}
