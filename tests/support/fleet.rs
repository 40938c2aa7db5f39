//! Support for the fleet tests: the real `keyfleet` (init, enroll, serve,
//! rekey, status) and real `keyfleet-agent run` processes on loopback
//! multicast, each test in its own temporary directory, group and ports;
//! application clients on the agents' sockets; every process killed on drop.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyfleet::agent::app::{self, Reply, SendOutcome};

use super::{free_port, fresh_group, wait_for, Proc, AGENT, KEYFLEET};

/// One appliance: id, initial key file, state directory, unicast address.
pub struct Node {
    pub id: String,
    /// Its initial key, and the label's hex form of it.
    pub key: [u8; 16],
    pub form: String,
    pub state: PathBuf,
    pub key_file: PathBuf,
    pub listen: SocketAddrV4,
    /// Its interface address (`--iface`); 127.0.0.1 unless a test moves it.
    pub iface: Ipv4Addr,
    /// Prefix of its agent command (`ip netns exec NAME`) instead of the fleet's.
    pub wrap: Option<Vec<String>>,
    /// Extra arguments of its `keyfleet-agent run`.
    pub args: Vec<String>,
}

/// A controller and its nodes in one temporary directory.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub group: SocketAddrV4,
    pub ctl_port: u16,
    pub nodes: Vec<Node>,
    /// Prefix of every command (`ip netns exec NAME`), empty on the host.
    pub wrap: Vec<String>,
    /// Prefix of the agents' commands when they run apart from the
    /// controller ([`Fleet::split`]); `None`: `wrap`.
    pub agent_wrap: Option<Vec<String>>,
    /// The agents' interface address, and the controller's (both loopback
    /// unless [`Fleet::split`]).
    pub agent_ip: Ipv4Addr,
    pub ctl_ip: Ipv4Addr,
    /// Whether the agents get `--controller CTL_IP:CTL_PORT` (default true);
    /// without it they start as a user's do: sending to the group until they
    /// learn the controller's unicast address.
    pub controller_flag: bool,
    /// `RUST_LOG` of every process; `None`: `info` (the agents:
    /// `FLEET_AGENT_LOG` when set).
    pub rust_log: Option<String>,
    /// The agents' `--usage-interval` in seconds (default 2; 0: no reports).
    pub usage_interval: u32,
    extra: String,
}

impl Fleet {
    /// `n` nodes, `extra` appended to the controller's config file.
    pub fn new(n: usize, extra: &str) -> Fleet {
        Fleet::in_group(fresh_group(), n, extra)
    }

    /// As [`Fleet::new`] on `group` (another controller's, say).
    pub fn in_group(group: SocketAddrV4, n: usize, extra: &str) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let ctl_port = free_port();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        std::fs::write(
            dir.path().join("keyfleet.toml"),
            format!(
                "[network]\ngroup = \"{group}\"\niface = \"127.0.0.1\"\nlisten_port = {ctl_port}\n{extra}"
            ),
        )
        .unwrap();
        let nodes = (0..n)
            .map(|i| {
                let mut key = [0u8; 16];
                getrandom::getrandom(&mut key).unwrap();
                let form = keyfleet_core::label::hex_form(
                    &keyfleet_core::label::InitialKey::from_bytes(key),
                );
                let id = format!("node-{i:02}");
                let state = dir.path().join("agents").join(&id);
                keyfleet::statefile::ensure_private_dir(&state).unwrap();
                let key_file = dir.path().join(format!("{id}.key"));
                {
                    use std::io::Write;
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&key_file)
                        .unwrap();
                    f.write_all(form.as_bytes()).unwrap();
                }
                Node {
                    id,
                    key,
                    form,
                    state,
                    key_file,
                    listen: SocketAddrV4::new(Ipv4Addr::LOCALHOST, free_port()),
                    iface: Ipv4Addr::LOCALHOST,
                    wrap: None,
                    args: Vec::new(),
                }
            })
            .collect();
        Fleet {
            dir,
            group,
            ctl_port,
            nodes,
            wrap: Vec::new(),
            agent_wrap: None,
            agent_ip: Ipv4Addr::LOCALHOST,
            ctl_ip: Ipv4Addr::LOCALHOST,
            controller_flag: true,
            rust_log: None,
            usage_interval: 2,
            extra: extra.to_owned(),
        }
    }

    /// The controller's commands run behind `ctl_wrap` on interface
    /// `ctl_ip`, the agents behind `agent_wrap` on `agent_ip` (two network
    /// namespaces joined by a link, say); `extra` is the controller's config
    /// as given to [`Fleet::new`]. Call before `init`.
    pub fn split(
        &mut self,
        ctl_wrap: Vec<String>,
        ctl_ip: Ipv4Addr,
        agent_wrap: Vec<String>,
        agent_ip: Ipv4Addr,
        extra: &str,
    ) {
        std::fs::write(
            self.dir.path().join("keyfleet.toml"),
            format!(
                "[network]\ngroup = \"{}\"\niface = \"{ctl_ip}\"\nlisten_port = {}\n{extra}",
                self.group, self.ctl_port
            ),
        )
        .unwrap();
        for n in &mut self.nodes {
            n.listen = SocketAddrV4::new(agent_ip, n.listen.port());
            n.iface = agent_ip;
        }
        self.wrap = ctl_wrap;
        self.agent_wrap = Some(agent_wrap);
        self.ctl_ip = ctl_ip;
        self.agent_ip = agent_ip;
        self.extra = extra.to_owned();
    }

    /// Moves the controller to interface address `ip` (rewrites its config file).
    pub fn set_controller_ip(&mut self, ip: Ipv4Addr) {
        self.ctl_ip = ip;
        std::fs::write(
            self.dir.path().join("keyfleet.toml"),
            format!(
                "[network]\ngroup = \"{}\"\niface = \"{ip}\"\nlisten_port = {}\n{}",
                self.group, self.ctl_port, self.extra
            ),
        )
        .unwrap();
    }

    /// Moves node `i` to interface address `ip` (its agent listens there).
    pub fn set_node_ip(&mut self, i: usize, ip: Ipv4Addr) {
        let n = &mut self.nodes[i];
        n.iface = ip;
        n.listen = SocketAddrV4::new(ip, n.listen.port());
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("controller")
    }

    fn command(&self, program: &str) -> Command {
        Self::wrapped(&self.wrap, program)
    }

    fn wrapped(wrap: &[String], program: &str) -> Command {
        match wrap.split_first() {
            None => Command::new(program),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
        }
    }

    pub fn keyfleet(&self, args: &[&str]) -> Command {
        self.keyfleet_at(&self.state(), &self.dir.path().join("keyfleet.toml"), args)
    }

    /// `keyfleet ARGS` of another controller or installer of this fleet:
    /// its own state directory and config file.
    pub fn keyfleet_at(&self, state: &Path, config: &Path, args: &[&str]) -> Command {
        let mut c = self.command(KEYFLEET);
        c.arg("--state")
            .arg(state)
            .arg("--config")
            .arg(config)
            .args(args)
            .stdin(Stdio::null())
            .env_remove("KEYFLEET_PASSPHRASE")
            .env("RUST_LOG", self.rust_log.as_deref().unwrap_or("info"))
            .env("RUST_BACKTRACE", "0");
        c
    }

    /// Runs `keyfleet ARGS` to its end; panics with its stderr if it fails.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.keyfleet(args).output().unwrap();
        assert!(
            out.status.success(),
            "keyfleet {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.run(args);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "keyfleet {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs `keyfleet ARGS`, which must exit with `code`; its JSON output and stderr.
    pub fn json_exit(&self, args: &[&str], code: i32) -> (serde_json::Value, String) {
        let out = self.keyfleet(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "keyfleet {args:?}: {}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "keyfleet {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        (v, stderr)
    }

    /// The log file of process `name` (`serve`, a node id), appended to: a
    /// restarted process keeps its earlier lines.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{name}.log"))
    }

    pub fn log(&self, name: &str) -> std::fs::File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .unwrap()
    }

    pub fn logs(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// `keyfleet init` and `keyfleet enroll` of every node.
    pub fn init_and_enroll(&self) {
        self.run(&["init"]);
        for n in &self.nodes {
            self.run(&[
                "enroll",
                "--node-id",
                &n.id,
                "--addr",
                &n.listen.to_string(),
                "--key",
                &n.form,
            ]);
        }
    }

    /// `keyfleet serve`, once its control socket answers.
    pub fn serve(&self) -> Proc {
        let p = self.serve_waiting();
        let sock = self.state().join("control.sock");
        wait_for("keyfleet serve's control socket", 15_000, || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        p
    }

    /// `keyfleet serve` in the background, not waiting for anything (a standby).
    pub fn serve_waiting(&self) -> Proc {
        let child = self
            .keyfleet(&["serve"])
            .stdout(Stdio::null())
            .stderr(self.log("serve"))
            .spawn()
            .unwrap();
        Proc {
            child,
            log: Some(self.log_path("serve")),
        }
    }

    /// `keyfleet-agent run` for node `i`, once its application socket exists.
    /// It logs at the fleet's `rust_log`, else `info` or `FLEET_AGENT_LOG` when set.
    pub fn agent(&self, i: usize) -> Proc {
        let n = &self.nodes[i];
        let child = self.agent_command(i).spawn().unwrap();
        let p = Proc {
            child,
            log: Some(self.log_path(&n.id)),
        };
        // A restarted agent replaces the socket file of the killed one; wait
        // until the new one answers.
        wait_for(&format!("{}'s application socket", n.id), 15_000, || {
            agent_status(&n.state).is_some()
        });
        p
    }

    /// The command of [`Fleet::agent`], not started (add flags, then spawn).
    pub fn agent_command(&self, i: usize) -> Command {
        let n = &self.nodes[i];
        let mut c = match &n.wrap {
            None => Self::wrapped(self.agent_wrap.as_ref().unwrap_or(&self.wrap), AGENT),
            Some(w) => Self::wrapped(w, AGENT),
        };
        c.arg("run")
            .arg("--state")
            .arg(&n.state)
            .args(["--node-id", &n.id])
            .arg("--initial-key-file")
            .arg(&n.key_file)
            .args(["--group", &self.group.to_string()])
            .args(["--iface", &n.iface.to_string()])
            .args(["--listen", &n.listen.to_string()]);
        if self.controller_flag {
            c.args([
                "--controller",
                &format!("{}:{}", self.ctl_ip, self.ctl_port),
            ]);
        }
        let log = self
            .rust_log
            .clone()
            .unwrap_or_else(|| std::env::var("FLEET_AGENT_LOG").unwrap_or_else(|_| "info".into()));
        c.args(["--usage-interval", &self.usage_interval.to_string()])
            .args(&n.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log(&n.id))
            .env("RUST_LOG", log);
        c
    }

    pub fn agents(&self) -> Vec<Proc> {
        (0..self.nodes.len()).map(|i| self.agent(i)).collect()
    }

    /// The whole fleet up: `init`, `enroll` of every node, `keyfleet serve`,
    /// one `keyfleet-agent run` per node, every agent synced at epoch 1.
    pub fn up(&self, ms: u64) -> (Proc, Vec<Proc>) {
        self.init_and_enroll();
        let serve = self.serve();
        let agents = self.agents();
        assert_eq!(self.wait_converged(ms), 1);
        (serve, agents)
    }

    /// `keyfleet status --json`.
    pub fn status(&self) -> serde_json::Value {
        self.json(&["status", "--json"])
    }

    /// `keyfleet history --json` with the whole audit log.
    pub fn history(&self) -> serde_json::Value {
        self.json(&["history", "--json", "--audit", "1000000"])
    }

    /// Waits until every node is in `UpdateCompleted` at the controller's epoch
    /// and synced; the epoch.
    pub fn wait_converged(&self, ms: u64) -> u64 {
        let mut epoch = 0;
        wait_for(
            "every agent in UpdateCompleted at the controller's epoch",
            ms,
            || {
                let Some(e) = self.json(&["status", "--json"])["epoch"].as_u64() else {
                    return false;
                };
                epoch = e;
                self.nodes.iter().all(|n| {
                    agent_status(&n.state).is_some_and(|s| {
                        s["state"] == "UpdateCompleted"
                            && s["epoch"].as_u64() == Some(e)
                            && s["running"]["synced"] == true
                    })
                })
            },
        );
        epoch
    }

    /// Group messages the running agents could not open, summed over them.
    pub fn undecryptable(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| {
                agent_status(&n.state).expect("status")["running"]["undecryptable"]
                    .as_u64()
                    .unwrap()
            })
            .sum()
    }

    /// Lines in node `id`'s log (all its runs) that report data that could
    /// not be opened.
    pub fn undecryptable_logged(&self, id: &str) -> usize {
        self.logs(id)
            .lines()
            .filter(|l| l.contains("datagram refused") && l.contains("cannot be opened"))
            .count()
    }
}

/// The running agent's status through its application socket (`?`), or `None`
/// when no agent answers within a second.
pub fn agent_status(state: &Path) -> Option<serde_json::Value> {
    let agent = state.join(app::SOCKET_NAME);
    let me = state.join(format!(
        ".test-q-{}-{}.sock",
        std::process::id(),
        QSEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let sock = std::os::unix::net::UnixDatagram::bind(&me).ok()?;
    let _ = sock.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = vec![0u8; 65_536];
    let answer = (|| {
        sock.send_to(b"?", &agent).ok()?;
        loop {
            let n = sock.recv(&mut buf).ok()?;
            if let Ok(Reply::Status(json)) = app::decode_reply(buf.get(..n)?) {
                return serde_json::from_slice(&json).ok();
            }
        }
    })();
    let _ = std::fs::remove_file(&me);
    answer
}

static QSEQ: AtomicU64 = AtomicU64::new(0);

/// What the application clients counted.
#[derive(Debug, Default)]
pub struct Traffic {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub send_failed: AtomicU64,
    pub dropped: AtomicU64,
}

/// One application client per agent, each sending a message every
/// `interval` and reading what its agent delivers; re-registers every second
/// (a restarted agent has forgotten its clients). Stopped on drop.
pub struct Chatter {
    pub traffic: Arc<Traffic>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Chatter {
    pub fn start(fleet: &Fleet, interval: Duration) -> Chatter {
        let traffic = Arc::new(Traffic::default());
        let stop = Arc::new(AtomicBool::new(false));
        let threads = fleet
            .nodes
            .iter()
            .map(|n| {
                let agent = n.state.join(app::SOCKET_NAME);
                let me = fleet.dir.path().join(format!("{}-app.sock", n.id));
                let (t, s, id) = (traffic.clone(), stop.clone(), n.id.clone());
                std::thread::spawn(move || client(agent, me, id, interval, t, s))
            })
            .collect();
        Chatter {
            traffic,
            stop,
            threads,
        }
    }

    /// Stops sending, lets the last messages arrive, stops the clients.
    pub fn finish(mut self) -> Arc<Traffic> {
        std::thread::sleep(Duration::from_millis(500));
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.traffic.clone()
    }
}

impl Drop for Chatter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn client(
    agent: PathBuf,
    me: PathBuf,
    id: String,
    interval: Duration,
    t: Arc<Traffic>,
    stop: Arc<AtomicBool>,
) {
    let _ = std::fs::remove_file(&me);
    let sock = std::os::unix::net::UnixDatagram::bind(&me).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = vec![0u8; 65_536];
    let mut n = 0u64;
    let mut next_send = Instant::now();
    let mut next_register = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next_register {
            let _ = sock.send_to(b"R", &agent);
            next_register = now + Duration::from_secs(1);
        }
        if now >= next_send {
            n += 1;
            let text = format!("{id} #{n}");
            if sock
                .send_to(&app::encode_send(text.as_bytes()), &agent)
                .is_err()
            {
                t.send_failed.fetch_add(1, Ordering::Relaxed);
            }
            next_send = now + interval;
        }
        if let Ok(len) = sock.recv(&mut buf) {
            match app::decode_reply(&buf[..len]) {
                Ok(Reply::Message(_)) => {
                    t.received.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Reply::Outcome(SendOutcome::Sent | SendOutcome::Held)) => {
                    t.sent.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Reply::Outcome(SendOutcome::Dropped)) => {
                    t.dropped.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    }
    let _ = sock.send_to(b"U", &agent);
    let _ = std::fs::remove_file(&me);
}

/// One application client's book: what it sent and what its agent delivered to it.
#[derive(Debug, Default)]
pub struct Book {
    /// Messages (by number) the agent confirmed: sealed and sent, or held
    /// until synced and sent then; with the moment the confirmation came.
    pub sent: Vec<(u64, Instant)>,
    /// Messages whose confirmation never came (the agent was killed with the
    /// message in its socket, or its answer was lost): they may or may not
    /// have gone out, so receivers may or may not have them.
    pub unconfirmed: Vec<u64>,
    /// Messages the agent refused (`Dropped`: its hold queue was full).
    pub refused: u64,
    /// Sends that did not reach the agent's socket (no agent running, or its socket full).
    pub send_failed: u64,
    /// Messages delivered to this client: (sender's node id, number) → epoch it was sealed under.
    pub received: HashMap<(String, u64), u32>,
    outstanding: Option<(u64, Instant)>,
    generation: u64,
}

/// Application traffic with every message accounted for. Two clients per
/// agent on its application socket:
/// - a sender, with at most one message awaiting its agent's answer, sending
///   every `interval`. An answer that does not come within 3 s (or an agent
///   killed, [`Ledger::killed`]) makes the message unconfirmed, and the sender
///   moves to a fresh socket, so a late answer can never be taken for the
///   next message's;
/// - a receiver, registered for the delivered messages (again every 300 ms:
///   a restarted agent has forgotten its clients), so that a burst of
///   deliveries cannot crowd out an answer.
///
/// Neither ever blocks on a frozen or dead agent. Messages are
/// `"<node id> #<n>"`. Stopped on drop.
pub struct Ledger {
    pub books: Arc<HashMap<String, Mutex<Book>>>,
    sending: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Ledger {
    /// (messages sent, deliveries missing): every message each application
    /// sent against what every other application of `fleet` received.
    pub fn missing(&self, fleet: &Fleet) -> (usize, usize) {
        let (mut sent, mut missing) = (0, 0);
        for from in &fleet.nodes {
            let mine = self.book(&from.id).sent.clone();
            sent += mine.len();
            for to in fleet.nodes.iter().filter(|n| n.id != from.id) {
                let got = self.book(&to.id);
                missing += mine
                    .iter()
                    .filter(|(k, _)| !got.received.contains_key(&(from.id.clone(), *k)))
                    .count();
            }
        }
        (sent, missing)
    }

    /// Starts the clients; sending begins once every agent has registered its receiver.
    pub fn start(fleet: &Fleet, interval: Duration) -> Ledger {
        let books: Arc<HashMap<String, Mutex<Book>>> = Arc::new(
            fleet
                .nodes
                .iter()
                .map(|n| (n.id.clone(), Mutex::new(Book::default())))
                .collect(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let sending = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for n in &fleet.nodes {
            let agent = n.state.join(app::SOCKET_NAME);
            let dir = fleet.dir.path().to_path_buf();
            let (me, agent2) = (dir.join(format!("{}-recv.sock", n.id)), agent.clone());
            let (b, s, id) = (books.clone(), stop.clone(), n.id.clone());
            threads.push(std::thread::spawn(move || {
                ledger_receiver(agent2, me, id, b, s)
            }));
            let (b, s, g, id) = (books.clone(), stop.clone(), sending.clone(), n.id.clone());
            threads.push(std::thread::spawn(move || {
                ledger_sender(agent, dir, id, interval, b, s, g)
            }));
        }
        wait_for(
            "every agent to register its application client",
            10_000,
            || {
                fleet.nodes.iter().all(|n| {
                    agent_status(&n.state)
                        .is_some_and(|s| s["running"]["app_clients"].as_u64() >= Some(1))
                })
            },
        );
        sending.store(true, Ordering::Relaxed);
        Ledger {
            books,
            sending,
            stop,
            threads,
        }
    }

    /// The agent of `id` was killed: the message it had not answered may or
    /// may not have gone out, and no answer from it will come.
    pub fn killed(&self, id: &str) {
        let mut b = self.books[id].lock().unwrap();
        if let Some((n, _)) = b.outstanding.take() {
            b.unconfirmed.push(n);
        }
        b.generation += 1;
    }

    /// Stops sending, waits for the last answers and lets the last messages
    /// arrive, stops the clients.
    pub fn finish(&mut self) {
        self.sending.store(false, Ordering::Relaxed);
        wait_for("the last answers", 5_000, || {
            self.books
                .values()
                .all(|b| b.lock().unwrap().outstanding.is_none())
        });
        std::thread::sleep(Duration::from_millis(500));
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    pub fn book(&self, id: &str) -> std::sync::MutexGuard<'_, Book> {
        self.books[id].lock().unwrap()
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sends without blocking (a frozen agent's socket may be full).
fn send_nowait(
    sock: &std::os::unix::net::UnixDatagram,
    bytes: &[u8],
    to: &Path,
) -> std::io::Result<usize> {
    sock.set_nonblocking(true)?;
    let r = sock.send_to(bytes, to);
    sock.set_nonblocking(false)?;
    r
}

fn bind_client(path: &Path, timeout_ms: u64) -> std::os::unix::net::UnixDatagram {
    let _ = std::fs::remove_file(path);
    let sock = std::os::unix::net::UnixDatagram::bind(path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(timeout_ms)))
        .unwrap();
    sock
}

fn ledger_sender(
    agent: PathBuf,
    dir: PathBuf,
    id: String,
    interval: Duration,
    books: Arc<HashMap<String, Mutex<Book>>>,
    stop: Arc<AtomicBool>,
    sending: Arc<AtomicBool>,
) {
    let book = &books[&id];
    let mut sockets = 0;
    let mut path = dir.join(format!("{id}-send-{sockets}.sock"));
    let mut sock = bind_client(&path, 5);
    let mut buf = vec![0u8; 65_536];
    let mut n = 0u64;
    let mut seen_generation = 0;
    let mut next_send = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        {
            let mut b = book.lock().unwrap();
            let mut fresh = b.generation != seen_generation;
            seen_generation = b.generation;
            if let Some((k, since)) = b.outstanding {
                if now.duration_since(since) > Duration::from_secs(3) {
                    b.outstanding = None;
                    b.unconfirmed.push(k);
                    fresh = true;
                }
            }
            if fresh {
                // A late answer to the message given up goes to the old socket.
                let _ = std::fs::remove_file(&path);
                sockets += 1;
                path = dir.join(format!("{id}-send-{sockets}.sock"));
                sock = bind_client(&path, 5);
            }
            if sending.load(Ordering::Relaxed) && b.outstanding.is_none() && now >= next_send {
                n += 1;
                let text = format!("{id} #{n}");
                match send_nowait(&sock, &app::encode_send(text.as_bytes()), &agent) {
                    Ok(_) => b.outstanding = Some((n, now)),
                    Err(_) => b.send_failed += 1,
                }
                next_send = now + interval;
            }
        }
        if let Ok(len) = sock.recv(&mut buf) {
            let mut b = book.lock().unwrap();
            if let Ok(Reply::Outcome(o)) = app::decode_reply(&buf[..len]) {
                if let Some((k, _)) = b.outstanding.take() {
                    match o {
                        SendOutcome::Sent | SendOutcome::Held => b.sent.push((k, Instant::now())),
                        SendOutcome::Dropped => b.refused += 1,
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

fn ledger_receiver(
    agent: PathBuf,
    me: PathBuf,
    id: String,
    books: Arc<HashMap<String, Mutex<Book>>>,
    stop: Arc<AtomicBool>,
) {
    let book = &books[&id];
    let sock = bind_client(&me, 20);
    let mut buf = vec![0u8; 65_536];
    let mut next_register = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next_register {
            let _ = send_nowait(&sock, b"R", &agent);
            next_register = now + Duration::from_millis(300);
        }
        if let Ok(len) = sock.recv(&mut buf) {
            if let Ok(Reply::Message(m)) = app::decode_reply(&buf[..len]) {
                let text = String::from_utf8_lossy(&m.plaintext).into_owned();
                if let Some((from, k)) = text.split_once(" #") {
                    if let Ok(k) = k.parse() {
                        book.lock()
                            .unwrap()
                            .received
                            .insert((from.to_owned(), k), m.epoch);
                    }
                }
            }
        }
    }
    let _ = send_nowait(&sock, b"U", &agent);
    let _ = std::fs::remove_file(&me);
}
