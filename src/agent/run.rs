//! [`run`]: the whole agent — state directory, network, application socket.

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tokio::net::UnixDatagram;

use crate::net::{Clock, NetConfig, Transport};
use crate::statefile;
use keyfleet_core::crypto::InitialKey;
use keyfleet_core::protocol::{NodeConfig, NodeMachine};
use keyfleet_core::wire::NodeId;

use super::app::{self, Request, SendOutcome};
use super::driver::{DriverEvent, NodeDriver};
use super::links::{LinkChange, LinkWatch};
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
    let mut transport = Transport::bind(&cfg.net, clock)?;
    // The receive delay of tests holds group data longer than control messages.
    transport.set_data_classifier(|b| {
        matches!(
            keyfleet_core::wire::decode(b),
            Ok(keyfleet_core::wire::Message::Data(_))
        )
    });
    tracing::info!(
        listen = %transport.local_addr(),
        group = %cfg.net.group,
        iface = %cfg.net.iface,
        controller = %cfg.node.controller,
        "network up"
    );
    let persister = StateFile::new(dir, fingerprint.clone());
    let mut driver = NodeDriver::new(machine, transport, Box::new(persister))
        .with_last_sync(last_sync)
        .with_refusal_window(
            cfg.refusal_log_window_ms,
            keyfleet_core::ratecount::DEFAULT_MAX_SOURCES,
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

    let mut links = match LinkWatch::open(cfg.net.iface).await {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the links (rtnetlink); a link that comes back is noticed through the controller's beacon instead");
            None
        }
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
    let mut app_slots = vec![vec![0u8; APP_SLOT_LEN]; APP_BATCH];
    let result = loop {
        let wake = tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            // Before datagrams and application data: what the node sends or
            // opens next must follow the link change.
            l = next_link(&mut links) => Wake::Link(l),
            // Before the network: a flood must not starve a scrape (a probe
            // costs microseconds, and at most 8 wait).
            Some(p) = async { probes.as_mut()?.recv().await }, if probes.is_some() => Wake::Probe(p),
            w = driver.wait() => Wake::Net(w),
            r = server.recv_many(&mut app_slots) => Wake::App(r),
            // A backlogged client read: its connected socket has room again.
            () = server.writable(), if server.backlogged() => Wake::Backlog,
            // A client whose socket is connected to the agent's cannot be sent
            // to from a socket of its own: its backlog is retried on a timer.
            () = tokio::time::sleep(std::time::Duration::from_millis(app::BACKLOG_RETRY_MS)),
                if server.shared_backlogged() => Wake::Backlog,
        };
        // A link change the kernel already reported goes first.
        if !matches!(wake, Wake::Link(_)) {
            if let Some(change) = links.as_mut().and_then(LinkWatch::try_next) {
                if let Err(e) = on_link(&mut driver, change).await {
                    break Err(e);
                }
            }
        }
        let step = match wake {
            Wake::Link(Ok(change)) => on_link(&mut driver, change).await,
            Wake::Link(Err(e)) => {
                tracing::warn!(error = %e, "the link watch failed; links are no longer watched (the beacon still is)");
                links = None;
                Ok(())
            }
            Wake::Net(Ok(w)) => {
                server.hold();
                let mut r = driver.handle(w).await;
                // What the transport already read (the rest of a `recvmmsg`
                // batch) in the same pass: their deliveries leave together.
                for _ in 1..NET_BATCH {
                    if r.is_err() || !driver.transport().has_queued() {
                        break;
                    }
                    match futures_util::FutureExt::now_or_never(driver.wait()) {
                        Some(Ok(w)) => r = driver.handle(w).await,
                        Some(Err(e)) => r = Err(e),
                        None => break,
                    }
                }
                r
            }
            Wake::Net(Err(e)) => Err(e),
            Wake::App(Ok(got)) => {
                // What the clients queued, read with one system call and
                // served in one pass (one wake-up of the loop per batch, not
                // per message); what the batch sends goes out together at its
                // end (one system call; the receivers woken once for it).
                driver.transport().cork();
                let mut r = Ok(());
                for (req, slot) in got.into_iter().zip(&app_slots) {
                    if r.is_err() {
                        break;
                    }
                    server.from = req.from;
                    if req.truncated {
                        let e = app::RequestError::TooLongAtLeast(APP_SLOT_LEN);
                        server.answer(&app::encode_error(&e.to_string()));
                        continue;
                    }
                    let bytes = slot.get(..req.len).unwrap_or_default();
                    r = server.serve(bytes, &mut driver, &mut running).await;
                }
                if let Err(e) = driver.transport().uncork().await {
                    tracing::warn!(error = %e, "send to the group failed; those messages are lost");
                }
                r
            }
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
                DriverEvent::Node(keyfleet_core::protocol::NodeEvent::Refused {
                    reason, ..
                }) => {
                    if let Some(m) = &metrics {
                        m.refusal(reason.kind());
                    }
                }
                _ => {}
            }
        }
        server.release();
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

/// The next link change, or never without a link watch.
async fn next_link(links: &mut Option<LinkWatch>) -> io::Result<(LinkChange, String)> {
    match links {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

async fn on_link(
    driver: &mut NodeDriver,
    (change, what): (LinkChange, String),
) -> Result<(), AgentError> {
    match change {
        LinkChange::Up => {
            tracing::info!(%what, "link up: asking the controller for the current key");
            driver.link_up().await
        }
        LinkChange::Down => {
            tracing::info!(%what, "link down: holding outgoing data until the controller answers");
            driver.link_down().await
        }
    }
}
/// Application requests served per wake-up of the loop at most (then the
/// network and the other sources get their turn), read with one `recvmmsg`.
const APP_BATCH: usize = 64;

/// Bytes of one application request read at most: an `S` request of
/// [`app::MAX_PLAINTEXT`] bytes fits with room to spare; a longer one is
/// answered with an error (`E`), as it would be whole.
const APP_SLOT_LEN: usize = 4096;

/// Datagrams the transport already read (one `recvmmsg` batch) handled per
/// wake-up of the loop at most: their deliveries leave together.
const NET_BATCH: usize = 64;

/// Deliveries one `sendmmsg` call to a client takes at most.
const DELIVER_BATCH: usize = 64;

enum Wake {
    Link(io::Result<(LinkChange, String)>),
    Net(Result<super::Wake, AgentError>),
    App(io::Result<Vec<AppRequest>>),
    /// A backlogged client can take more (or its retry timer fired).
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
    from: Option<PathBuf>,
    /// Between [`AppServer::hold`] and [`AppServer::release`]: deliveries
    /// wait in the clients' backlogs and leave together.
    holding: bool,
}

/// A registered client and the deliveries its full socket did not take yet.
struct Client {
    path: PathBuf,
    /// A socket of the agent's connected to the client's: the kernel reports
    /// it writable exactly when the client's queue has room again, so a
    /// backlog is sent as soon as the client reads (no polling). `None` when
    /// the client's own socket is connected to the agent's (the kernel then
    /// refuses any other sender): deliveries go through the shared socket
    /// and its backlog is retried every [`app::BACKLOG_RETRY_MS`] ms.
    conn: Option<UnixDatagram>,
    /// `conn`'s socket for sending outside tokio: tokio's cached readiness
    /// lags while the loop is busy with the network, so a send is always
    /// tried; only a refused one goes through tokio (which then clears the
    /// readiness, so the loop waits for the kernel's wake-up).
    raw: Option<std::os::unix::net::UnixDatagram>,
    /// In order; at most [`app::BACKLOG_BYTES`] (counted as [`queued_size`]).
    backlog: std::collections::VecDeque<Vec<u8>>,
    backlog_bytes: usize,
    /// Messages dropped for this client since it last kept up (for the log).
    dropping: u64,
}

/// What a backlogged message costs against [`app::BACKLOG_BYTES`].
fn queued_size(msg: &[u8]) -> usize {
    msg.len() + 32
}

impl Client {
    /// Connects a socket of the agent's to the client's socket at `path`.
    fn new(path: PathBuf) -> io::Result<Client> {
        let conn = std::os::unix::net::UnixDatagram::unbound()?;
        conn.connect(&path)?;
        conn.set_nonblocking(true)?;
        let raw = std::os::fd::AsFd::as_fd(&conn)
            .try_clone_to_owned()
            .map(std::os::unix::net::UnixDatagram::from)?;
        Ok(Client {
            path,
            conn: Some(UnixDatagram::from_std(conn)?),
            raw: Some(raw),
            backlog: std::collections::VecDeque::new(),
            backlog_bytes: 0,
            dropping: 0,
        })
    }

    fn send(&mut self, shared: &std::os::unix::net::UnixDatagram, msg: &[u8]) -> Sent {
        let r = match (&self.conn, &self.raw) {
            (Some(c), Some(raw)) => match raw.send(msg) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.try_io(tokio::io::Interest::WRITABLE, || raw.send(msg))
                }
                r => r,
            },
            _ => shared.send_to(msg, &self.path),
        };
        match r {
            Ok(_) => Sent::Done,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Sent::Full,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied && self.conn.is_some() => {
                // The client connected its socket to the agent's socket.
                tracing::debug!(client = %self.path.display(), "client socket connected to the agent; delivering through the shared socket");
                self.conn = None;
                self.raw = None;
                self.send(shared, msg)
            }
            Err(e) => Sent::Gone(e),
        }
    }

    /// Sends the backlog, in order, until the socket is full again: through
    /// the connected socket [`DELIVER_BATCH`] messages a `sendmmsg` call
    /// (the client is woken once for them, not once a message), through the
    /// shared socket one by one.
    fn flush(&mut self, shared: &std::os::unix::net::UnixDatagram) -> Result<(), io::Error> {
        while self.raw.is_some() && !self.backlog.is_empty() {
            match self.send_batch() {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    for msg in self.backlog.drain(..n) {
                        self.backlog_bytes -= queued_size(&msg);
                    }
                }
                // The client connected its socket to the agent's socket: the
                // rest goes one by one through the shared socket, below.
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    tracing::debug!(client = %self.path.display(), "client socket connected to the agent; delivering through the shared socket");
                    self.conn = None;
                    self.raw = None;
                }
                Err(e) => return Err(e),
            }
        }
        while let Some(msg) = self.backlog.pop_front() {
            match self.send(shared, &msg) {
                Sent::Done => self.backlog_bytes -= queued_size(&msg),
                Sent::Full => {
                    self.backlog.push_front(msg);
                    return Ok(());
                }
                Sent::Gone(e) => return Err(e),
            }
        }
        if self.dropping > 0 {
            tracing::info!(client = %self.path.display(), dropped = self.dropping, "application client caught up");
            self.dropping = 0;
        }
        Ok(())
    }

    /// The backlog's first messages (up to [`DELIVER_BATCH`]) in one
    /// `sendmmsg` on the connected socket: how many the client's socket took
    /// (0 when it is full: tokio then waits for the kernel's wake-up).
    fn send_batch(&self) -> io::Result<usize> {
        let (Some(conn), Some(raw)) = (&self.conn, &self.raw) else {
            return Ok(0);
        };
        let send = || {
            crate::net::socket::send_many(
                raw,
                self.backlog.iter().take(DELIVER_BATCH).map(Vec::as_slice),
                None,
                rustix::net::SendFlags::DONTWAIT,
            )
        };
        let r = match send() {
            // Through tokio, so that a full socket clears its readiness and
            // `writable` waits for the client to read.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.try_io(tokio::io::Interest::WRITABLE, send)
            }
            r => r,
        };
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            r => r,
        }
    }

    /// Queues `msg` behind the backlog, or drops it when the backlog is full.
    fn queue(&mut self, msg: &[u8]) -> bool {
        if self.backlog_bytes + queued_size(msg) > app::BACKLOG_BYTES {
            if self.dropping == 0 {
                tracing::warn!(client = %self.path.display(), "application client does not read; dropping its deliveries until it catches up (counted as app_dropped)");
            }
            self.dropping += 1;
            return false;
        }
        self.backlog_bytes += queued_size(msg);
        self.backlog.push_back(msg.to_vec());
        true
    }
}

/// What one non-blocking send to a client came to.
enum Sent {
    Done,
    Full,
    Gone(io::Error),
}

/// One request read by [`AppServer::recv_many`]: its length in its slot,
/// its sender's path (an unbound sender has none), and whether it was
/// longer than the slot (then cut).
#[derive(Debug, Clone, PartialEq, Eq)]
struct AppRequest {
    len: usize,
    from: Option<PathBuf>,
    truncated: bool,
}

/// Requests read from the non-blocking `sock` with one `recvmmsg`, one into
/// each of `slots`; `WouldBlock` when it held none.
fn recv_requests(
    sock: std::os::fd::BorrowedFd<'_>,
    slots: &mut [Vec<u8>],
) -> io::Result<Vec<AppRequest>> {
    use nix::sys::socket::{MsgFlags, SockaddrLike, UnixAddr};
    let mut got = Vec::new();
    crate::net::socket::recv_batch::<UnixAddr>(sock, slots, None, |m| {
        got.push(AppRequest {
            len: m.bytes,
            // An unbound sender's address comes back 0 bytes long (not even
            // the family, which `UnixAddr::path` would assert on): none.
            from: m
                .address
                .as_ref()
                .filter(|a| a.len() as usize >= std::mem::size_of::<u16>())
                .and_then(UnixAddr::path)
                .map(Path::to_path_buf),
            truncated: m.flags.contains(MsgFlags::MSG_TRUNC),
        })
    })?;
    Ok(got)
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
            from: None,
            holding: false,
        })
    }

    /// Waits for requests, then reads what the socket holds, one request
    /// into each of `slots` (as many as there are), with one `recvmmsg`.
    /// Cancel-safe.
    async fn recv_many(&self, slots: &mut [Vec<u8>]) -> io::Result<Vec<AppRequest>> {
        use std::os::fd::AsFd;
        self.sock
            .async_io(tokio::io::Interest::READABLE, || {
                recv_requests(self.sock.as_fd(), slots)
            })
            .await
    }

    async fn serve(
        &mut self,
        bytes: &[u8],
        driver: &mut NodeDriver,
        running: &mut Running,
    ) -> Result<(), AgentError> {
        let reply = match app::decode_request(bytes) {
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
                    oversized: driver.transport().stats().oversized,
                    node_messages_ignored: st.node_messages_ignored,
                    undecryptable: st.undecryptable,
                    data_sent: st.data_sent,
                    delivered: st.delivered,
                    delivered_by_trial: st.delivered_by_trial,
                    persisted: st.persisted,
                    usage_reports: st.usage_reports,
                    signature_checks: driver.machine().signature_checks(),
                    reveal_checks: driver.machine().reveal_checks(),
                    steps_prepared: driver.machine().prepare_stats().used,
                    share_notices: driver.machine().prepare_stats().notices,
                    keys_vouched: driver.machine().prepare_stats().vouched,
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
            match Client::new(from.clone()) {
                Ok(c) => {
                    tracing::info!(client = %from.display(), "application client registered");
                    self.clients.push(c);
                }
                Err(e) => {
                    return app::encode_error(&format!(
                        "cannot reach your socket {} to deliver messages: {e}",
                        from.display()
                    ))
                }
            }
        }
        vec![b'R']
    }

    /// Hands one `M` datagram to every registered client, never blocking. A
    /// client whose socket is full gets it later, in order, as soon as it
    /// reads (its backlog, up to [`app::BACKLOG_BYTES`]; beyond that it is
    /// dropped for that client alone and counted).
    fn deliver(&mut self, msg: &[u8]) {
        if self.holding {
            for c in &mut self.clients {
                if !c.queue(msg) {
                    self.dropped += 1;
                }
            }
            return;
        }
        let tx = &self.tx;
        let dropped = &mut self.dropped;
        self.clients.retain_mut(|c| {
            let sent = if c.backlog.is_empty() {
                c.send(tx, msg)
            } else {
                match c.flush(tx) {
                    Ok(()) if c.backlog.is_empty() => c.send(tx, msg),
                    Ok(()) => Sent::Full,
                    Err(e) => Sent::Gone(e),
                }
            };
            match sent {
                Sent::Done => true,
                Sent::Full => {
                    if !c.queue(msg) {
                        *dropped += 1;
                    }
                    true
                }
                Sent::Gone(e) => {
                    tracing::info!(client = %c.path.display(), error = %e, "application client gone; unregistered");
                    false
                }
            }
        });
    }

    /// Holds deliveries (in the clients' backlogs, counted against them)
    /// until [`AppServer::release`].
    fn hold(&mut self) {
        self.holding = true;
    }

    /// Sends what was held, in batches (see [`Client::flush`]); nothing to
    /// do when nothing was held.
    fn release(&mut self) {
        if std::mem::take(&mut self.holding) {
            self.flush();
        }
    }

    /// Sends what the clients' backlogs hold, in order, until a socket is full again.
    fn flush(&mut self) {
        let tx = &self.tx;
        self.clients.retain_mut(|c| match c.flush(tx) {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(client = %c.path.display(), error = %e, "application client gone; unregistered");
                false
            }
        });
    }

    /// Whether a client's backlog waits for its socket to take more.
    fn backlogged(&self) -> bool {
        self.clients.iter().any(|c| !c.backlog.is_empty())
    }

    /// Whether a client reached through the shared socket has a backlog.
    fn shared_backlogged(&self) -> bool {
        self.clients
            .iter()
            .any(|c| c.conn.is_none() && !c.backlog.is_empty())
    }

    /// Resolves when a backlogged client's connected socket has room.
    /// Cancel-safe (it only waits for readiness).
    async fn writable(&self) {
        std::future::poll_fn(|cx| {
            for c in &self.clients {
                if let (Some(conn), false) = (&c.conn, c.backlog.is_empty()) {
                    if conn.poll_send_ready(cx).is_ready() {
                        return std::task::Poll::Ready(());
                    }
                }
            }
            std::task::Poll::Pending
        })
        .await
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
            server.clients.push(Client::new(p).unwrap());
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

    /// The deliveries of one pass (held, then released) leave in `sendmmsg`
    /// batches, in order, as far as each client's socket takes them; the
    /// rest follow as each client reads, none lost. While held, a backlog
    /// that would pass its bound drops the message for that client alone,
    /// counted, as without holding.
    #[tokio::test]
    async fn held_deliveries_leave_together_in_order_and_what_a_socket_cannot_take_follows() {
        let dir = tempfile::tempdir().unwrap();
        let (mut server, [slow, fast]) = client_pair(dir.path());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        server.hold();
        for i in 0..300u16 {
            server.deliver(&msg(i));
        }
        assert!(drain(&fast).is_empty(), "nothing leaves while held");
        server.release();
        let mut fast_got = drain(&fast);
        assert!(!fast_got.is_empty(), "released: sent at once");
        assert!(server.backlogged(), "300 do not fit a socket's queue");
        // Each client reads; the agent is woken and sends it more.
        async fn read_until(
            server: &mut AppServer,
            sock: &std::os::unix::net::UnixDatagram,
            got: &mut Vec<u16>,
            n: usize,
        ) {
            loop {
                got.extend(drain(sock));
                if got.len() >= n {
                    return;
                }
                let woke =
                    tokio::time::timeout(std::time::Duration::from_secs(5), server.writable())
                        .await;
                assert!(woke.is_ok(), "the client read, but the agent was not woken");
                server.flush();
            }
        }
        read_until(&mut server, &fast, &mut fast_got, 300).await;
        let mut slow_got = Vec::new();
        read_until(&mut server, &slow, &mut slow_got, 300).await;
        let all: Vec<u16> = (0..300).collect();
        assert_eq!(fast_got, all, "every message, in order");
        assert_eq!(slow_got, all, "late, but every message, in order");
        assert_eq!(server.dropped, 0);
        assert!(!server.backlogged());

        // Past the backlog's bound while held: dropped for each client, counted.
        let fit = app::BACKLOG_BYTES / queued_size(&msg(0));
        server.hold();
        for i in 0..fit + 5 {
            server.deliver(&msg(i as u16));
        }
        assert_eq!(server.dropped, 2 * 5);
        server.release();
        assert!(!drain(&fast).is_empty());
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
        for _ in 0..1000 {
            slow_got.extend(drain(&slow));
            // What the agent's loop does: wait until the kernel says the
            // client's queue has room, then send.
            let woke =
                tokio::time::timeout(std::time::Duration::from_secs(5), server.writable()).await;
            assert!(woke.is_ok(), "the client read, but the agent was not woken");
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
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut n = 0u64;
        let mut fast_count = 0u64;
        while server.dropped < 10 {
            assert!(n < 1_000_000, "nothing was ever dropped");
            server.deliver(&msg(n as u16));
            n += 1;
            fast_count += drain(&fast).len() as u64;
        }
        assert_eq!(fast_count, n);
        let slow_queued = drain(&slow).len() as u64;
        let backlog = server.clients[0].backlog.len() as u64;
        assert_eq!(
            server.clients[0].backlog_bytes,
            app::BACKLOG_BYTES / queued_size(&msg(0)) * queued_size(&msg(0))
        );
        assert_eq!(
            slow_queued + backlog + server.dropped,
            n,
            "every message is in the socket, in the backlog or counted dropped"
        );
        assert!(server.dropped > 0);
    }
}
