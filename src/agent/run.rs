//! [`run`]: the whole agent — state directory, network, application socket.

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tokio::net::UnixDatagram;

use crate::crypto::InitialKey;
use crate::net::{Clock, NetConfig, Transport};
use crate::protocol::{NodeConfig, NodeMachine};
use crate::statefile;
use crate::wire::NodeId;

use super::app::{self, Request, SendOutcome};
use super::driver::{DriverEvent, NodeDriver};
use super::state::{self, AgentStatus, RunningStatus, StateFile, StatusSource};
use super::AgentError;

/// What `keyfleet-agent run` is given.
pub struct AgentConfig {
    /// The state directory (created 0700; see the module docs).
    pub state_dir: PathBuf,
    pub node_id: NodeId,
    /// Needed on the first start; on later starts, checked against the stored fingerprint.
    pub initial_key: Option<InitialKey>,
    pub net: NetConfig,
    /// The node's settings; `controller` is where joins, key requests, replies
    /// and usage reports go.
    pub node: NodeConfig,
    /// Refused datagrams are logged rate-counted in windows of this many ms
    /// (0: a line for every one); see [`NodeDriver`].
    pub refusal_log_window_ms: u64,
}

/// What `keyfleet-agent run` can add to the plain agent.
#[derive(Default)]
pub struct RunExtras {
    /// Serve Prometheus metrics and `/healthz` on this address.
    pub metrics: Option<std::net::SocketAddr>,
    /// Called once the state is restored and the sockets are bound (the
    /// network, the application socket, the metrics), before the loop runs:
    /// systemd's readiness notification.
    pub ready: Option<OnReady>,
}

/// The readiness callback of [`Ready`].
pub type OnReady = Box<dyn FnOnce(&Ready) + Send>;

/// What is up when the agent is ready.
#[derive(Debug, Clone)]
pub struct Ready {
    pub listen: std::net::SocketAddr,
    pub app_socket: PathBuf,
    /// The metrics server's address (the port chosen when 0 was asked).
    pub metrics: Option<std::net::SocketAddr>,
}

/// Runs the agent until `shutdown` resolves; then saves the state and removes
/// the application socket.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    run_with(cfg, RunExtras::default(), shutdown).await
}

/// [`run`] with metrics and a readiness callback.
pub async fn run_with(
    cfg: AgentConfig,
    extras: RunExtras,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let dir = cfg.state_dir.as_path();
    statefile::ensure_private_dir(dir).map_err(AgentError::StateDir)?;
    let _lock = lock(dir)?;
    remove_stale_temp_files(dir);

    let (machine, fingerprint, last_sync) = match state::load(dir)? {
        Some(stored) => {
            if stored.node.node_id != cfg.node_id {
                return Err(AgentError::NodeIdMismatch {
                    dir: dir.into(),
                    stored: stored.node.node_id.to_string(),
                    given: cfg.node_id.to_string(),
                });
            }
            if let Some(k) = &cfg.initial_key {
                if k.fingerprint() != stored.initial_key_fingerprint {
                    return Err(AgentError::InitialKeyMismatch {
                        dir: dir.into(),
                        node_id: cfg.node_id.to_string(),
                        stored: stored.initial_key_fingerprint,
                        given: k.fingerprint(),
                    });
                }
            }
            let machine = NodeMachine::restore(&stored.node, cfg.node.clone()).map_err(|e| {
                AgentError::Restore {
                    path: dir.join(state::STATE_FILE),
                    reason: e.to_string(),
                }
            })?;
            tracing::info!(
                node = %cfg.node_id,
                state = ?machine.state(),
                member = ?machine.member(),
                "resumed from the state file"
            );
            (machine, stored.initial_key_fingerprint, stored.last_sync_ms)
        }
        None => {
            let key = cfg
                .initial_key
                .as_ref()
                .ok_or_else(|| AgentError::NoInitialKey { dir: dir.into() })?;
            tracing::info!(node = %cfg.node_id, fingerprint = %key.fingerprint(), "first start: joining");
            (
                NodeMachine::new(cfg.node_id.clone(), key, cfg.node.clone()),
                key.fingerprint(),
                None,
            )
        }
    };

    let clock = Clock::wall();
    let transport = Transport::bind(&cfg.net, clock)?;
    tracing::info!(
        listen = %transport.local_addr(),
        group = %cfg.net.group,
        iface = %cfg.net.iface,
        controller = %cfg.node.controller,
        "network up"
    );
    let persister = StateFile::new(dir, fingerprint.clone());
    let mut driver = NodeDriver::new(machine, transport, Box::new(persister), cfg.node.controller)
        .with_last_sync(last_sync)
        .with_refusal_window(
            cfg.refusal_log_window_ms,
            crate::ratecount::DEFAULT_MAX_SOURCES,
        );
    // The state file exists from the first start on (and `status` can read it).
    driver.persist_now()?;

    let mut server = AppServer::bind(&dir.join(app::SOCKET_NAME))?;
    let started = Instant::now();
    let mut running = Running {
        fingerprint,
        started,
        group: cfg.net.group.to_string(),
    };

    let (metrics, _metrics_server, mut probes) = match extras.metrics {
        Some(addr) => {
            let (m, registry) = crate::metrics::AgentMetrics::new();
            let (ex, probes) = crate::metrics::Exporter::new(registry);
            let srv = crate::metrics::MetricsServer::bind(addr, std::sync::Arc::new(ex))
                .await
                .map_err(AgentError::io(
                    "serve metrics on",
                    Path::new(&addr.to_string()),
                ))?;
            tracing::info!(metrics = %srv.local_addr(), "metrics: /metrics and /healthz");
            (Some(m), Some(srv), Some(probes))
        }
        None => (None, None, None),
    };

    driver.link_up().await?;
    if let Some(ready) = extras.ready {
        ready(&Ready {
            listen: driver.transport().local_addr(),
            app_socket: server.path.clone(),
            metrics: _metrics_server.as_ref().map(|s| s.local_addr()),
        });
    }
    tokio::pin!(shutdown);
    let result = loop {
        let wake = tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            // Before the network: a flood must not starve a scrape (a probe
            // costs microseconds, and at most 8 wait).
            Some(p) = async { probes.as_mut()?.recv().await }, if probes.is_some() => Wake::Probe(p),
            w = driver.wait() => Wake::Net(w),
            r = server.recv() => Wake::App(r),
            () = tokio::time::sleep(std::time::Duration::from_millis(app::BACKLOG_RETRY_MS)),
                if server.backlogged() => Wake::Backlog,
        };
        let step = match wake {
            Wake::Net(Ok(w)) => driver.handle(w).await,
            Wake::Net(Err(e)) => Err(e),
            Wake::App(Ok(len)) => server.serve(len, &mut driver, &mut running).await,
            Wake::App(Err(e)) => {
                tracing::warn!(error = %e, "application socket receive failed");
                Ok(())
            }
            Wake::Backlog => {
                server.flush();
                Ok(())
            }
            Wake::Probe(p) => {
                let _ = p.send(probe(metrics.as_ref(), &driver, &server, &running));
                Ok(())
            }
        };
        for event in driver.take_events() {
            match event {
                DriverEvent::Delivered(d) => server.deliver(&app::encode_delivered(&d)),
                DriverEvent::Node(crate::protocol::NodeEvent::Refused { reason, .. }) => {
                    if let Some(m) = &metrics {
                        m.refusal(reason.kind());
                    }
                }
                _ => {}
            }
        }
        if let Err(e) = step {
            break Err(e);
        }
    };
    server.close();
    match result {
        Ok(()) => {
            driver.persist_now()?;
            tracing::info!("stopped; state saved");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

enum Wake {
    Net(Result<super::Wake, AgentError>),
    App(io::Result<usize>),
    /// Time to retry the clients' backlogs.
    Backlog,
    /// A metrics scrape or health check asks.
    Probe(crate::metrics::Probe),
}

/// Refreshes the metrics from the loop's own counters (the ones `status`
/// shows) and answers healthy: a loop that answers is a running agent.
fn probe(
    metrics: Option<&crate::metrics::AgentMetrics>,
    driver: &NodeDriver,
    server: &AppServer,
    running: &Running,
) -> crate::metrics::Health {
    let m = driver.machine();
    let st = driver.stats();
    let state = state::state_name(m.state());
    let sample = crate::metrics::AgentSample {
        datagrams_in: st.datagrams_in,
        undecryptable: st.undecryptable,
        data_sent: st.data_sent,
        delivered: st.delivered,
        persisted: st.persisted,
        usage_reports: st.usage_reports,
        app_dropped: server.dropped,
        app_clients: server.clients.len(),
        epoch: m.position().map_or(0, |(e, _)| e.0),
        sealing_epoch: m.keyring().map_or(0, |r| r.sealing_epoch().0),
        member: m.member().unwrap_or(0),
        state,
        synced: m.is_synced(),
        last_sync_ms: driver.last_sync_ms(),
        uptime_ms: u64::try_from(running.started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    if let Some(metrics) = metrics {
        metrics.refresh(&sample);
    }
    crate::metrics::Health {
        ok: true,
        detail: serde_json::json!({
            "status": "ok",
            "node": m.node_id().to_string(),
            "state": state,
            "epoch": sample.epoch,
            "synced": sample.synced,
        }),
    }
}

struct Running {
    fingerprint: String,
    started: Instant,
    group: String,
}

/// Takes `<dir>/agent.lock` (flock, exclusive) for the life of the agent.
fn lock(dir: &Path) -> Result<File, AgentError> {
    let path = dir.join(state::LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(AgentError::io("open the lock file", &path))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(AgentError::Busy { dir: dir.into() }),
        Err(e) => Err(AgentError::io("lock", &path)(e.into())),
    }
}

/// Temporary files a write interrupted by a crash left beside the state file.
/// Only this agent (it holds the lock) writes there, so they are garbage.
fn remove_stale_temp_files(dir: &Path) {
    let prefix = format!(".{}.", state::STATE_FILE);
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".tmp") {
            match fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::info!(file = %e.path().display(), "removed a temporary file left by an interrupted write")
                }
                Err(err) => {
                    tracing::warn!(file = %e.path().display(), error = %err, "cannot remove a leftover temporary file")
                }
            }
        }
    }
}

/// The application socket. See [`app`] for the framing.
struct AppServer {
    sock: UnixDatagram,
    /// The same socket for sending, outside tokio: every answer and delivery
    /// is tried on its own. (tokio's `try_send_to` gives up on every
    /// destination once one full client made a send fail, until the reactor
    /// next sees the socket writable: one slow client cost the others their
    /// messages and answers.)
    tx: std::os::unix::net::UnixDatagram,
    path: PathBuf,
    clients: Vec<Client>,
    dropped: u64,
    buf: Vec<u8>,
    from: Option<PathBuf>,
}

/// A registered client and the deliveries its full socket did not take yet.
struct Client {
    path: PathBuf,
    /// In order; retried every [`app::BACKLOG_RETRY_MS`]; at most [`app::BACKLOG`].
    backlog: std::collections::VecDeque<Vec<u8>>,
}

impl Client {
    fn new(path: PathBuf) -> Client {
        Client {
            path,
            backlog: std::collections::VecDeque::new(),
        }
    }
}

/// What one non-blocking send to a client came to.
enum Sent {
    Done,
    Full,
    Gone(io::Error),
}

impl AppServer {
    fn bind(path: &Path) -> Result<AppServer, AgentError> {
        // We hold the lock: a socket file left here is from an agent that died.
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(AgentError::io("remove the old socket", path)(e)),
        }
        let sock = UnixDatagram::bind(path).map_err(AgentError::io("bind", path))?;
        let tx = std::os::fd::AsFd::as_fd(&sock)
            .try_clone_to_owned()
            .map(std::os::unix::net::UnixDatagram::from)
            .and_then(|tx| tx.set_nonblocking(true).map(|()| tx))
            .map_err(AgentError::io("duplicate", path))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(AgentError::io("chmod 600", path))?;
        tracing::info!(socket = %path.display(), "application socket ready");
        Ok(AppServer {
            sock,
            tx,
            path: path.to_path_buf(),
            clients: Vec::new(),
            dropped: 0,
            buf: vec![0; 65_536],
            from: None,
        })
    }

    /// Receives one request into the buffer. Cancel-safe.
    async fn recv(&mut self) -> io::Result<usize> {
        let (n, from) = self.sock.recv_from(&mut self.buf).await?;
        self.from = from.as_pathname().map(Path::to_path_buf);
        Ok(n)
    }

    async fn serve(
        &mut self,
        len: usize,
        driver: &mut NodeDriver,
        running: &mut Running,
    ) -> Result<(), AgentError> {
        let bytes = self.buf.get(..len).unwrap_or_default().to_vec();
        let reply = match app::decode_request(&bytes) {
            Err(e) => Some(app::encode_error(&e.to_string())),
            Ok(Request::Send(plaintext)) => {
                let outcome = driver.send(plaintext).await?;
                if outcome == SendOutcome::Dropped {
                    tracing::warn!("application message dropped: the hold queue is full");
                }
                Some(app::encode_outcome(outcome))
            }
            Ok(Request::Register) => Some(self.register()),
            Ok(Request::Unregister) => {
                if let Some(from) = &self.from {
                    self.clients.retain(|c| &c.path != from);
                }
                Some(vec![b'U'])
            }
            Ok(Request::Status) => {
                let mut s = AgentStatus::of(
                    driver.machine(),
                    &running.fingerprint,
                    driver.last_sync_ms(),
                    StatusSource::RunningAgent,
                    &self.path,
                );
                let st = driver.stats();
                s.running = Some(RunningStatus {
                    pid: std::process::id(),
                    listen: driver.transport().local_addr().to_string(),
                    group: running.group.clone(),
                    controller: driver.controller().to_string(),
                    uptime_ms: u64::try_from(running.started.elapsed().as_millis())
                        .unwrap_or(u64::MAX),
                    synced: driver.machine().is_synced(),
                    datagrams_in: st.datagrams_in,
                    refused: st.refused,
                    node_messages_ignored: st.node_messages_ignored,
                    undecryptable: st.undecryptable,
                    data_sent: st.data_sent,
                    delivered: st.delivered,
                    persisted: st.persisted,
                    usage_reports: st.usage_reports,
                    app_clients: self.clients.len(),
                    app_dropped: self.dropped,
                });
                let mut v = vec![b'?'];
                // Serializing plain strings and numbers cannot fail.
                v.extend(serde_json::to_vec(&s).unwrap_or_default());
                Some(v)
            }
        };
        if let Some(reply) = reply {
            self.answer(&reply);
        }
        Ok(())
    }

    /// Sends `reply` to the sender of the last request, never blocking.
    fn answer(&self, reply: &[u8]) {
        if let Some(to) = &self.from {
            if let Err(e) = self.tx.send_to(reply, to) {
                tracing::debug!(client = %to.display(), error = %e, "cannot answer the client");
            }
        }
    }

    fn register(&mut self) -> Vec<u8> {
        let Some(from) = self.from.clone() else {
            return app::encode_error(
                "register from a socket bound to a path; an unnamed socket cannot receive",
            );
        };
        if !self.clients.iter().any(|c| c.path == from) {
            if self.clients.len() >= app::MAX_CLIENTS {
                return app::encode_error(&format!(
                    "{} clients are registered already, the most this agent serves",
                    app::MAX_CLIENTS
                ));
            }
            tracing::info!(client = %from.display(), "application client registered");
            self.clients.push(Client::new(from));
        }
        vec![b'R']
    }

    fn send_one(tx: &std::os::unix::net::UnixDatagram, msg: &[u8], to: &Path) -> Sent {
        match tx.send_to(msg, to) {
            Ok(_) => Sent::Done,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Sent::Full,
            Err(e) => Sent::Gone(e),
        }
    }

    /// Hands one `M` datagram to every registered client, never blocking. A
    /// client whose socket is full gets it later, in order (its backlog, up to
    /// [`app::BACKLOG`] messages; beyond that it is dropped and counted).
    fn deliver(&mut self, msg: &[u8]) {
        self.flush();
        let tx = &self.tx;
        let dropped = &mut self.dropped;
        self.clients.retain_mut(|c| {
            if !c.backlog.is_empty() {
                if c.backlog.len() < app::BACKLOG {
                    c.backlog.push_back(msg.to_vec());
                } else {
                    *dropped += 1;
                }
                return true;
            }
            match Self::send_one(tx, msg, &c.path) {
                Sent::Done => true,
                Sent::Full => {
                    c.backlog.push_back(msg.to_vec());
                    true
                }
                Sent::Gone(e) => {
                    tracing::info!(client = %c.path.display(), error = %e, "application client gone; unregistered");
                    false
                }
            }
        });
    }

    /// Sends what the clients' backlogs hold, in order, until a socket is full again.
    fn flush(&mut self) {
        let tx = &self.tx;
        self.clients.retain_mut(|c| {
            while let Some(msg) = c.backlog.front() {
                match Self::send_one(tx, msg, &c.path) {
                    Sent::Done => {
                        c.backlog.pop_front();
                    }
                    Sent::Full => return true,
                    Sent::Gone(e) => {
                        tracing::info!(client = %c.path.display(), error = %e, "application client gone; unregistered");
                        return false;
                    }
                }
            }
            true
        });
    }

    /// Whether a client's backlog waits for its socket to take more.
    fn backlogged(&self) -> bool {
        self.clients.iter().any(|c| !c.backlog.is_empty())
    }

    fn close(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_pair(dir: &Path) -> (AppServer, [std::os::unix::net::UnixDatagram; 2]) {
        let mut server = AppServer::bind(&dir.join(app::SOCKET_NAME)).unwrap();
        let socks = ["slow.sock", "fast.sock"].map(|n| {
            let p = dir.join(n);
            let s = std::os::unix::net::UnixDatagram::bind(&p).unwrap();
            s.set_nonblocking(true).unwrap();
            server.clients.push(Client::new(p));
            s
        });
        (server, socks)
    }

    fn drain(sock: &std::os::unix::net::UnixDatagram) -> Vec<u16> {
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        while let Ok(n) = sock.recv(&mut buf) {
            assert_eq!(n, 3);
            got.push(u16::from_be_bytes([buf[1], buf[2]]));
        }
        got
    }

    fn msg(i: u16) -> [u8; 3] {
        let [a, b] = i.to_be_bytes();
        [b'M', a, b]
    }

    /// One client that does not read (its socket queue full) must not cost
    /// the others their messages: every send is tried on its own. (Found by
    /// the fault matrix: a frozen agent's burst of deliveries filled one
    /// client, and the answer to another client's `S` was lost with it.) The
    /// slow client gets its messages later, all of them, in order.
    #[tokio::test]
    async fn a_full_client_does_not_stop_the_others_and_gets_its_messages_later() {
        let dir = tempfile::tempdir().unwrap();
        let (mut server, [slow, fast]) = client_pair(dir.path());
        // Let the reactor see the socket writable, as in a running agent.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        // The fast client reads everything at once; the slow one does not read
        // yet: deliver until its socket queue is full, then 40 more.
        let (mut n, mut extra) = (0u16, 0);
        let mut fast_got = Vec::new();
        while extra < 40 {
            assert!(n < 5000, "the slow client's socket never filled");
            server.deliver(&msg(n));
            n += 1;
            fast_got.extend(drain(&fast));
            if server.backlogged() {
                extra += 1;
            }
        }
        let all: Vec<u16> = (0..n).collect();
        assert_eq!(fast_got, all, "the fast client gets every message");
        assert_eq!(server.clients.len(), 2, "a full client stays registered");
        // An answer to the fast client goes out although the slow one is still full.
        server.from = Some(dir.path().join("fast.sock"));
        server.answer(&app::encode_outcome(SendOutcome::Sent));
        let mut buf = [0u8; 64];
        assert_eq!(fast.recv(&mut buf).ok(), Some(2), "the answer arrives");
        // The slow client reads; the retries hand it the rest, in order.
        let mut slow_got = Vec::new();
        for _ in 0..100 {
            slow_got.extend(drain(&slow));
            server.flush();
            if !server.backlogged() {
                break;
            }
        }
        slow_got.extend(drain(&slow));
        assert_eq!(slow_got, all, "late, but every message, in order");
        assert_eq!(server.dropped, 0);
    }

    /// A client that never reads costs at most its backlog; beyond it the
    /// messages are dropped for it alone, and counted.
    #[tokio::test]
    async fn a_client_that_never_reads_loses_what_passes_its_backlog_and_it_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut server, [slow, fast]) = client_pair(dir.path());
        let mut n = 0u64;
        let mut fast_count = 0u64;
        while server.dropped < 10 {
            assert!(n < 20_000, "nothing was ever dropped");
            server.deliver(&msg(n as u16));
            n += 1;
            fast_count += drain(&fast).len() as u64;
        }
        assert_eq!(fast_count, n);
        let slow_queued = drain(&slow).len() as u64;
        let backlog = server.clients[0].backlog.len() as u64;
        assert_eq!(backlog, app::BACKLOG as u64);
        assert_eq!(
            slow_queued + backlog + server.dropped,
            n,
            "every message is in the socket, in the backlog or counted dropped"
        );
        assert!(server.dropped > 0);
    }
}
