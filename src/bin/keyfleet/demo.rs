//! `keyfleet demo`: the whole thing on one machine with nothing installed.
//!
//! In a temporary directory: a controller (`keyfleet init`, its management
//! table), five appliances enrolled with random initial keys (`keyfleet enroll`),
//! `keyfleet serve`, and five `keyfleet-agent run` processes on loopback
//! multicast. Every agent's application socket gets a client that sends a
//! message to the group every 200 ms and reads what the agent delivers. Two
//! rotations (`keyfleet rekey --json`) run while the messages flow; then the
//! fleet table (`keyfleet status`) and one line: messages sent, received,
//! undecryptable. Every program is the real one, started from the directory of
//! this `keyfleet` (so `cargo build` then `target/debug/keyfleet demo` works).
//!
//! Exit code 0 when both rotations were acknowledged by every node and no
//! message became undecryptable; 1 otherwise.

use anyhow::{bail, Context};
use clap::Args;
use keyfleet::agent::app::{self, Reply, SendOutcome};
use serde::Serialize;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UnixDatagram;

/// Run a controller and five agents on loopback, rotate the key twice while
/// they exchange messages, and show the fleet table.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of `keyfleet-agent` processes.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(2..=50))]
    agents: u32,
    /// Rekey rounds while the messages flow.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Each agent sends a message this often (ms).
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    /// Keep the demo's directory (state, logs) instead of removing it.
    #[arg(long)]
    keep: bool,
    /// Print one JSON object at the end instead of the table and summary.
    #[arg(long)]
    json: bool,
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = i32::try_from(self.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let end = Instant::now() + Duration::from_secs(3);
            while Instant::now() < end {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        tracing::warn!(process = %self.name, "did not stop on SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Messages counted by the application clients.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Counts {
    sent: u64,
    held: u64,
    dropped: u64,
    received: u64,
    errors: u64,
}

#[derive(Serialize)]
struct Report {
    dir: String,
    group: String,
    agents: u32,
    joined_ms: u64,
    rounds: Vec<serde_json::Value>,
    messages: Counts,
    /// Messages the agents could not open (from their status).
    undecryptable: u64,
    fleet: serde_json::Value,
    ok: bool,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|s| s.local_addr())
        .context("while looking for a free UDP port on 127.0.0.1")?
        .port())
}

/// `keyfleet-agent` beside this `keyfleet`.
fn agent_program() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("while locating this keyfleet program")?;
    let dir = me
        .parent()
        .context("this keyfleet program has no directory")?;
    let agent = dir.join("keyfleet-agent");
    if !agent.is_file() {
        bail!(
            "keyfleet-agent is not next to {} (looked for {}); build both: cargo build --bins",
            me.display(),
            agent.display()
        );
    }
    Ok(agent)
}

struct Demo {
    keyfleet: PathBuf,
    agent: PathBuf,
    dir: PathBuf,
    config: PathBuf,
}

impl Demo {
    fn state(&self) -> PathBuf {
        self.dir.join("controller")
    }

    fn keyfleet(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.keyfleet);
        c.arg("--state")
            .arg(self.state())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("KEYFLEET_PASSPHRASE");
        c
    }

    /// Runs `keyfleet ARGS` to its end; its stdout.
    fn run(&self, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        let out = self
            .keyfleet(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("while running keyfleet {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "keyfleet {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    }

    fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = self.run(args)?;
        serde_json::from_slice(&out).with_context(|| {
            format!(
                "keyfleet {} printed no JSON: {}",
                args.join(" "),
                String::from_utf8_lossy(&out)
            )
        })
    }

    fn log(&self, name: &str) -> anyhow::Result<std::fs::File> {
        let p = self.dir.join("logs").join(format!("{name}.log"));
        std::fs::File::create(&p).with_context(|| format!("while creating {}", p.display()))
    }
}

/// One question to an agent's application socket: its status as JSON.
async fn agent_status(
    clients: &Path,
    agent_state: &Path,
    tag: &str,
) -> anyhow::Result<serde_json::Value> {
    let me = clients.join(format!("q-{tag}.sock"));
    let _ = std::fs::remove_file(&me);
    let sock = UnixDatagram::bind(&me).with_context(|| format!("binding {}", me.display()))?;
    let agent = agent_state.join(app::SOCKET_NAME);
    let result = async {
        sock.send_to(b"?", &agent)
            .await
            .with_context(|| format!("asking {} for its status", agent.display()))?;
        let mut buf = vec![0u8; 65_536];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
                .await
                .with_context(|| format!("{} did not answer within 2 s", agent.display()))??;
            if let Ok(Reply::Status(json)) = app::decode_reply(buf.get(..n).unwrap_or_default()) {
                return serde_json::from_slice(&json).context("the agent's status is not JSON");
            }
        }
    }
    .await;
    let _ = std::fs::remove_file(&me);
    result
}

/// An application on one agent: registers for delivered messages (says so on
/// `registered` once the agent confirmed), sends one message every `interval`
/// while `sending`, counts everything until `stop`.
#[allow(clippy::too_many_arguments)]
async fn app_client(
    me: PathBuf,
    agent_state: PathBuf,
    name: String,
    interval: Duration,
    registered: tokio::sync::mpsc::Sender<()>,
    sending: tokio::sync::watch::Receiver<bool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    counts: Arc<Mutex<Counts>>,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&me);
    let sock = UnixDatagram::bind(&me).with_context(|| format!("binding {}", me.display()))?;
    let agent = agent_state.join(app::SOCKET_NAME);
    sock.send_to(b"R", &agent)
        .await
        .with_context(|| format!("registering with {}", agent.display()))?;
    let mut buf = vec![0u8; 65_536];
    // Nothing is sent before every client is registered, so nothing is lost here.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = sock.recv(&mut buf).await?;
            if buf.get(..n).and_then(|b| b.first()) == Some(&b'R') {
                return std::io::Result::Ok(());
            }
        }
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "{} did not confirm the registration within 10 s",
            agent.display()
        )
    })?
    .with_context(|| format!("registering with {}", agent.display()))?;
    let _ = registered.send(()).await;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {
                if *sending.borrow() {
                    n += 1;
                    let text = format!("{name} says hello #{n}");
                    if sock.send_to(&app::encode_send(text.as_bytes()), &agent).await.is_err() {
                        counts.lock().map(|mut c| c.errors += 1).ok();
                    }
                }
            }
            r = sock.recv(&mut buf) => {
                let Ok(len) = r else { continue };
                let Ok(mut c) = counts.lock() else { continue };
                match app::decode_reply(buf.get(..len).unwrap_or_default()) {
                    Ok(Reply::Message(_)) => c.received += 1,
                    Ok(Reply::Outcome(SendOutcome::Sent)) => c.sent += 1,
                    Ok(Reply::Outcome(SendOutcome::Held)) => { c.sent += 1; c.held += 1 }
                    Ok(Reply::Outcome(SendOutcome::Dropped)) => c.dropped += 1,
                    Ok(Reply::Error(e)) => { tracing::warn!(agent = %name, error = %e, "the agent refused a request"); c.errors += 1 }
                    Ok(_) => {}
                    Err(e) => { tracing::warn!(agent = %name, error = %e, "unreadable answer"); c.errors += 1 }
                }
            }
        }
    }
    let _ = sock.send_to(b"U", &agent).await;
    let _ = std::fs::remove_file(&me);
    Ok(())
}

pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    crate::fleet::init_logging("warn");
    let keyfleet = std::env::current_exe().context("while locating this keyfleet program")?;
    let agent = agent_program()?;
    let tmp = tempfile::Builder::new()
        .prefix("keyfleet-demo-")
        .tempdir()
        .context("while creating the demo's temporary directory")?;
    let dir = tmp.path().to_path_buf();
    let result = run_in(&a, keyfleet, agent, dir.clone());
    if a.keep || result.is_err() {
        let kept = tmp.keep();
        eprintln!("the demo's state and logs are kept in {}", kept.display());
    }
    result
}

fn run_in(
    a: &DemoArgs,
    keyfleet: PathBuf,
    agent: PathBuf,
    dir: PathBuf,
) -> anyhow::Result<ExitCode> {
    let say = |s: String| {
        if !a.json {
            println!("{s}");
        }
    };
    for sub in ["logs", "agents", "clients"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("while creating {}", dir.join(sub).display()))?;
    }
    let pid = std::process::id();
    let group = SocketAddrV4::new(
        Ipv4Addr::new(239, 255, 78, (pid % 250) as u8 + 1),
        free_port()?,
    );
    let ctl_port = free_port()?;
    let config = dir.join("keyfleet.toml");
    std::fs::write(
        &config,
        format!(
            "[network]\ngroup = \"{group}\"\niface = \"127.0.0.1\"\nlisten_port = {ctl_port}\n"
        ),
    )
    .with_context(|| format!("while writing {}", config.display()))?;
    let d = Demo {
        keyfleet,
        agent,
        dir: dir.clone(),
        config,
    };
    say(format!(
        "keyfleet demo: a controller and {} agents on loopback multicast {group}, in {}",
        a.agents,
        dir.display()
    ));

    let init = d.json(&["init", "--json"])?;
    say(format!(
        "  keyfleet init: group key epoch {} (check {})",
        init["epoch"],
        init["check"].as_str().unwrap_or("?")
    ));

    // Enroll every appliance: a random initial key, printed as its hex form.
    let mut nodes = Vec::new();
    for i in 1..=a.agents {
        let id = format!("demo-{i:02}");
        let mut key = [0u8; 16];
        getrandom::getrandom(&mut key).context("while drawing an initial key")?;
        let form = zeroize::Zeroizing::new(keyfleet_core::label::hex_form(
            &keyfleet_core::label::InitialKey::from_bytes(key),
        ));
        let state = dir.join("agents").join(&id);
        keyfleet::statefile::ensure_private_dir(&state)
            .with_context(|| format!("while creating {}", state.display()))?;
        let key_file = state.join("initial-key");
        write_private(&key_file, form.as_bytes())?;
        let listen = SocketAddrV4::new(Ipv4Addr::LOCALHOST, free_port()?);
        d.run(&[
            "enroll",
            "--node-id",
            &id,
            "--addr",
            &listen.to_string(),
            "--key",
            &form,
        ])?;
        nodes.push((id, state, key_file, listen));
    }
    say(format!(
        "  keyfleet enroll: {} nodes ({} … {})",
        nodes.len(),
        nodes.first().map_or("", |n| n.0.as_str()),
        nodes.last().map_or("", |n| n.0.as_str())
    ));

    let mut procs = Vec::new();
    let serve = d
        .keyfleet(&["serve"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(d.log("serve")?)
        .spawn()
        .context("while starting keyfleet serve")?;
    procs.push(Proc {
        name: "keyfleet serve".into(),
        child: serve,
    });
    wait_for(
        "keyfleet serve's control socket",
        Duration::from_secs(10),
        || std::os::unix::net::UnixStream::connect(d.state().join("control.sock")).is_ok(),
    )?;
    say(format!(
        "  keyfleet serve: running (pid {})",
        procs[0].child.id()
    ));

    let started = Instant::now();
    for (id, state, key_file, listen) in &nodes {
        let child = Command::new(&d.agent)
            .arg("run")
            .arg("--state")
            .arg(state)
            .args(["--node-id", id])
            .arg("--initial-key-file")
            .arg(key_file)
            .args(["--group", &group.to_string(), "--iface", "127.0.0.1"])
            .args(["--listen", &listen.to_string()])
            .args(["--controller", &format!("127.0.0.1:{ctl_port}")])
            .args(["--usage-interval", "5"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(d.log(id)?)
            .spawn()
            .with_context(|| format!("while starting keyfleet-agent for {id}"))?;
        procs.push(Proc {
            name: format!("keyfleet-agent {id}"),
            child,
        });
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("while starting the tokio runtime")?;
    let clients = dir.join("clients");
    let report = rt.block_on(async {
        // Every agent up and joined at the controller's epoch.
        for (id, state, _, _) in &nodes {
            let sock = state.join(app::SOCKET_NAME);
            wait_for(
                &format!("{id}'s application socket"),
                Duration::from_secs(10),
                || sock.exists(),
            )?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut joined = 0;
            for (id, state, _, _) in &nodes {
                if let Ok(s) = agent_status(&clients, state, id).await {
                    if s["state"] == "UpdateCompleted" && s["running"]["synced"] == true {
                        joined += 1;
                    }
                }
            }
            if joined == nodes.len() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "only {joined} of {} agents joined within 30 s; see the logs in {}",
                    nodes.len(),
                    d.dir.join("logs").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let joined_ms = started.elapsed().as_millis() as u64;
        say(format!(
            "  keyfleet-agent: {} processes started and joined in {joined_ms} ms",
            nodes.len()
        ));

        // The applications: one client per agent.
        let counts = Arc::new(Mutex::new(Counts::default()));
        // Sending starts once every client is registered: a message sent
        // earlier would miss the applications not registered yet.
        let (sending_tx, sending) = tokio::sync::watch::channel(false);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let (registered_tx, mut registered) = tokio::sync::mpsc::channel(nodes.len().max(1));
        let mut tasks = Vec::new();
        for (id, state, _, _) in &nodes {
            tasks.push(tokio::spawn(app_client(
                clients.join(format!("{id}.sock")),
                state.clone(),
                id.clone(),
                Duration::from_millis(a.interval_ms.max(10)),
                registered_tx.clone(),
                sending.clone(),
                stop.clone(),
                counts.clone(),
            )));
        }
        drop(registered_tx);
        for _ in 0..nodes.len() {
            if registered.recv().await.is_none() {
                // A client failed: its task's error is reported below.
                break;
            }
        }
        let _ = sending_tx.send(true);
        say(format!(
            "  applications: each agent sends a group message every {} ms through its socket",
            a.interval_ms
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;

        // The rotations, while the messages flow.
        let mut rounds = Vec::new();
        for r in 1..=a.rounds {
            let state = d.state();
            let config = d.config.clone();
            let program = d.keyfleet.clone();
            let out = tokio::task::spawn_blocking(move || {
                Command::new(program)
                    .arg("--state")
                    .arg(state)
                    .arg("--config")
                    .arg(config)
                    .args(["rekey", "--json"])
                    .stdin(Stdio::null())
                    .env_remove("KEYFLEET_PASSPHRASE")
                    .output()
            })
            .await
            .context("while waiting for keyfleet rekey")?
            .context("while running keyfleet rekey")?;
            if !out.status.success() {
                bail!(
                    "keyfleet rekey failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .context("keyfleet rekey --json printed no JSON")?;
            let phases: Vec<String> = keyfleet_core::wire::RoundPhase::ALL
                .iter()
                .filter_map(|p| {
                    let ms = v["phases_ms"][p.as_str()].as_u64()?;
                    Some(format!("{} {ms} ms", p.as_str().replace('_', " ")))
                })
                .collect();
            say(format!(
                "  rotation {r}: epoch {}, {}/{} acknowledged, {} stale, {} ms ({})",
                v["epoch"],
                v["acked"],
                v["nodes"],
                v["stale"],
                v["elapsed_ms"],
                phases.join(", ")
            ));
            rounds.push(v);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }

        // Stop sending, let the last messages arrive, then stop the clients.
        let _ = sending_tx.send(false);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = stop_tx.send(true);
        for t in tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => bail!("an application client failed: {e}"),
            }
        }
        let messages = *counts
            .lock()
            .map_err(|_| anyhow::anyhow!("the message counts were poisoned"))?;
        let mut undecryptable = 0;
        for (id, state, _, _) in &nodes {
            let s = agent_status(&clients, state, id).await?;
            undecryptable += s["running"]["undecryptable"].as_u64().unwrap_or(0);
        }
        anyhow::Ok((joined_ms, rounds, messages, undecryptable))
    })?;
    let (joined_ms, rounds, messages, undecryptable) = report;

    let fleet = d.json(&["status", "--json"])?;
    let all_acked = rounds.len() == a.rounds as usize
        && rounds
            .iter()
            .all(|r| r["acked"] == r["nodes"] && r["stale"] == 0);
    // Lossless: every message sent reached every other application.
    let every_copy = messages.sent * u64::from(a.agents.saturating_sub(1));
    let ok =
        all_acked && undecryptable == 0 && messages.received > 0 && messages.received == every_copy;
    if a.json {
        let r = Report {
            dir: dir.display().to_string(),
            group: group.to_string(),
            agents: a.agents,
            joined_ms,
            rounds,
            messages,
            undecryptable,
            fleet,
            ok,
        };
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!();
        let table = d.run(&["status"])?;
        print!("{}", String::from_utf8_lossy(&table));
        println!();
        println!(
            "messages: {} sent, {} received (of {} possible: each to the {} other agents), {} undecryptable",
            messages.sent,
            messages.received,
            messages.sent * u64::from(a.agents - 1),
            a.agents - 1,
            undecryptable
        );
    }
    if !ok {
        let mut why = Vec::new();
        if !all_acked {
            why.push("a rotation was not acknowledged by every agent".to_owned());
        }
        if undecryptable > 0 {
            why.push(format!("{undecryptable} messages could not be opened"));
        }
        if messages.received != every_copy {
            why.push(format!(
                "{} of {every_copy} copies of the messages reached an application",
                messages.received
            ));
        }
        eprintln!("keyfleet demo failed: {}", why.join("; "));
    }
    drop(procs);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("while creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("while writing {}", path.display()))
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {} s waiting for {what}", within.as_secs())
}
