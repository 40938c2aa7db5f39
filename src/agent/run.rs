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
use super::outbox::{Outbox, Pushed};
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

enum Wake {
    Link(io::Result<(LinkChange, String)>),
    Net(Result<super::Wake, AgentError>),
    App(io::Result<Vec<AppRequest>>),
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
        send_dropped: st.send_dropped,
        send_errors: driver.transport().stats().send_errors,
        app_dropped: server.dropped,
        app_backlog_peak: server.backlog_peak(),
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
    /// The most deliveries that waited for a client no longer registered
    /// (the status's `app_backlog_peak` is the most of this and of the
    /// registered clients': how near a slow client came to losing some).
    backlog_peak: usize,
    from: Option<PathBuf>,
    /// Between [`AppServer::hold`] and [`AppServer::release`]: deliveries
    /// wait in each client's `held` and reach its thread together.
    holding: bool,
}

/// A registered client.
struct Client {
    path: PathBuf,
    /// Its deliveries and the thread that sends them.
    outbox: Outbox,
    /// Deliveries of the pass in progress, between [`AppServer::hold`] and
    /// [`AppServer::release`].
    held: Vec<Vec<u8>>,
    /// Messages dropped for this client since it last kept up (for the log).
    dropping: u64,
}

impl Client {
    /// Starts the thread that delivers to the client's socket at `path`
    /// (`agent` is the agent's application socket).
    fn new(path: PathBuf, agent: &std::os::unix::net::UnixDatagram) -> io::Result<Client> {
        Ok(Client {
            outbox: Outbox::connect(&path, agent)?,
            path,
            held: Vec::new(),
            dropping: 0,
        })
    }

    /// Hands `msgs` on, in order, behind what waits: how many were dropped
    /// for want of room; an error when the client's socket is gone.
    fn hand(&mut self, msgs: Vec<Vec<u8>>) -> Result<u64, io::Error> {
        let dropped = match self.outbox.push(msgs) {
            Pushed::Queued { dropped } => dropped,
            Pushed::Gone(e) => return Err(e),
        };
        if dropped > 0 {
            if self.dropping == 0 {
                tracing::warn!(client = %self.path.display(), "application client does not read; dropping its deliveries until it catches up (counted as app_dropped)");
            }
            self.dropping += dropped;
        } else if self.dropping > 0 {
            tracing::info!(client = %self.path.display(), dropped = self.dropping, "application client caught up");
            self.dropping = 0;
        }
        Ok(dropped)
    }
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
            backlog_peak: 0,
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
                self.unregister();
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
                    send_dropped: st.send_dropped,
                    send_errors: driver.transport().stats().send_errors,
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
                    app_backlog_peak: self.backlog_peak(),
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
            match Client::new(from.clone(), &self.tx) {
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

    /// Unregisters the sender of the request being served: its thread
    /// stops (what one `sendmmsg` call of it had begun may still arrive).
    fn unregister(&mut self) {
        if let Some(from) = &self.from {
            let peak = &mut self.backlog_peak;
            self.clients.retain(|c| {
                let keep = &c.path != from;
                if !keep {
                    *peak = (*peak).max(c.outbox.peak());
                }
                keep
            });
        }
    }

    /// Hands one `M` datagram to every registered client, never blocking
    /// (between [`AppServer::hold`] and [`AppServer::release`] it waits for
    /// the release). Each client's thread sends it in order as soon as the
    /// client's socket has room; a client that falls more than
    /// [`app::BACKLOG_BYTES`] behind loses it, alone, and it is counted.
    fn deliver(&mut self, msg: &[u8]) {
        if self.holding {
            for c in &mut self.clients {
                c.held.push(msg.to_vec());
            }
            return;
        }
        self.hand_each(|_| vec![msg.to_vec()]);
    }

    /// Hands each client what `msgs` gives it; unregisters a client whose
    /// socket is gone.
    fn hand_each(&mut self, mut msgs: impl FnMut(&mut Client) -> Vec<Vec<u8>>) {
        let (dropped, peak) = (&mut self.dropped, &mut self.backlog_peak);
        self.clients.retain_mut(|c| {
            let m = msgs(c);
            if m.is_empty() {
                return true;
            }
            match c.hand(m) {
                Ok(d) => {
                    *dropped += d;
                    true
                }
                Err(e) => {
                    tracing::info!(client = %c.path.display(), error = %e, "application client gone; unregistered");
                    *peak = (*peak).max(c.outbox.peak());
                    false
                }
            }
        });
    }

    /// Holds deliveries until [`AppServer::release`], so that a pass's
    /// deliveries reach each client's thread together (it sends them with
    /// one system call).
    fn hold(&mut self) {
        self.holding = true;
    }

    /// Hands on what was held; nothing to do when nothing was held.
    fn release(&mut self) {
        if std::mem::take(&mut self.holding) {
            self.hand_each(|c| std::mem::take(&mut c.held));
        }
    }

    /// The most deliveries that waited for one client at once, since start.
    fn backlog_peak(&self) -> usize {
        self.clients
            .iter()
            .map(|c| c.outbox.peak())
            .fold(self.backlog_peak, usize::max)
    }

    fn close(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn client_pair(dir: &Path) -> (AppServer, [std::os::unix::net::UnixDatagram; 2]) {
        let mut server = AppServer::bind(&dir.join(app::SOCKET_NAME)).unwrap();
        let socks = ["slow.sock", "fast.sock"].map(|n| {
            let p = dir.join(n);
            let s = std::os::unix::net::UnixDatagram::bind(&p).unwrap();
            let c = Client::new(p, &server.tx).unwrap();
            server.clients.push(c);
            s
        });
        (server, socks)
    }

    /// What `sock` has now, without waiting.
    fn drain(sock: &std::os::unix::net::UnixDatagram) -> Vec<u16> {
        sock.set_nonblocking(true).unwrap();
        let got = read(sock, usize::MAX, |_| true);
        sock.set_nonblocking(false).unwrap();
        got
    }

    /// Reads `sock` until it has `n` messages or none came for 1 s.
    fn read_until(sock: &std::os::unix::net::UnixDatagram, n: usize) -> Vec<u16> {
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        read(sock, n, |_| true)
    }

    fn read(
        sock: &std::os::unix::net::UnixDatagram,
        n: usize,
        mut keep_on: impl FnMut(usize) -> bool,
    ) -> Vec<u16> {
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        while got.len() < n && keep_on(got.len()) {
            let Ok(len) = sock.recv(&mut buf) else { break };
            assert_eq!(len, 3);
            got.push(u16::from_be_bytes([buf[1], buf[2]]));
        }
        got
    }

    fn msg(i: u16) -> [u8; 3] {
        let [a, b] = i.to_be_bytes();
        [b'M', a, b]
    }

    /// The deliveries of one pass wait for its release; then each client
    /// gets all of them, in order, as fast as it reads, far more than its
    /// socket queue holds, while the loop does nothing more (it is busy with
    /// the network in a running agent); none is lost. (Before the outbox
    /// threads, a client got one socket queue's worth, 10 messages, per pass
    /// of the loop.)
    #[tokio::test]
    async fn held_deliveries_leave_at_the_release_and_every_one_arrives_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut server, [slow, fast]) = client_pair(dir.path());
        server.hold();
        for i in 0..300u16 {
            server.deliver(&msg(i));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(drain(&fast).is_empty(), "nothing leaves while held");
        server.release();
        let all: Vec<u16> = (0..300).collect();
        assert_eq!(read_until(&fast, 300), all, "every message, in order");
        assert_eq!(
            read_until(&slow, 300),
            all,
            "read later: every message, in order"
        );
        assert_eq!(server.dropped, 0);
    }

    /// One client that does not read (its socket queue full) must not cost
    /// the others their messages or their answers. (Found by the fault
    /// matrix: a frozen agent's burst of deliveries filled one client, and
    /// the answer to another client's `S` was lost with it.) The slow
    /// client gets its messages later, all of them, in order.
    #[tokio::test]
    async fn a_full_client_does_not_stop_the_others_and_gets_its_messages_later() {
        let dir = tempfile::tempdir().unwrap();
        let (mut server, [slow, fast]) = client_pair(dir.path());
        // The fast client reads as it goes; the slow one does not read yet.
        let n = 2000u16;
        let mut fast_got = Vec::new();
        for i in 0..n {
            server.deliver(&msg(i));
            fast_got.extend(drain(&fast));
        }
        fast_got.extend(read_until(&fast, usize::from(n) - fast_got.len()));
        let all: Vec<u16> = (0..n).collect();
        assert_eq!(fast_got, all, "the fast client gets every message");
        assert_eq!(server.clients.len(), 2, "a full client stays registered");
        assert!(
            server.clients[0].outbox.waiting() > 0,
            "the slow client's messages wait for it"
        );
        // An answer to the fast client goes out although the slow one is full.
        server.from = Some(dir.path().join("fast.sock"));
        server.answer(&app::encode_outcome(SendOutcome::Sent));
        let mut buf = [0u8; 64];
        fast.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(fast.recv(&mut buf).ok(), Some(2), "the answer arrives");
        // The slow client reads: the rest follows, in order.
        assert_eq!(
            read_until(&slow, usize::from(n)),
            all,
            "late, but every message, in order"
        );
        assert_eq!(server.dropped, 0);
        assert!(server.backlog_peak() > 1000, "{}", server.backlog_peak());
    }

    /// A client that never reads costs at most its backlog; beyond it the
    /// messages are dropped for it alone, and counted. When it reads at
    /// last, it gets what was kept, in order, and nothing else.
    #[tokio::test]
    async fn a_client_that_never_reads_loses_what_passes_its_backlog_and_it_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut server, [slow, fast]) = client_pair(dir.path());
        let fit = app::BACKLOG_BYTES / super::super::outbox::queued_size(&msg(0));
        let fast_reader = std::thread::spawn(move || read_until(&fast, usize::MAX));
        let mut n = 0usize;
        while server.dropped < 10 {
            assert!(n < 4 * fit, "nothing was ever dropped");
            server.hold();
            for _ in 0..64 {
                server.deliver(&msg(n as u16));
                n += 1;
            }
            server.release();
        }
        let waiting = server.clients[0].outbox.waiting();
        assert!(
            waiting <= fit,
            "{waiting} messages wait, more than the backlog's {fit}"
        );
        assert_eq!(
            fast_reader.join().unwrap().len(),
            n,
            "the fast client lost nothing"
        );
        let slow_got = read_until(&slow, usize::MAX);
        assert_eq!(
            slow_got.len() as u64 + server.dropped,
            n as u64,
            "every message was read late or counted dropped"
        );
        assert!(
            slow_got.windows(2).all(|w| w[1] == w[0].wrapping_add(1)),
            "what was kept arrives in order, from the start"
        );
        assert_eq!(slow_got.first(), Some(&0));
    }

    /// A client whose socket is gone is unregistered at a delivery after its
    /// thread found out, and the others go on getting theirs.
    #[tokio::test]
    async fn a_client_whose_socket_is_gone_is_unregistered() {
        let dir = tempfile::tempdir().unwrap();
        let (mut server, [slow, fast]) = client_pair(dir.path());
        drop(slow);
        fs::remove_file(dir.path().join("slow.sock")).unwrap();
        let mut i = 0u16;
        let start = Instant::now();
        while server.clients.len() == 2 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "still registered after {i} deliveries"
            );
            server.deliver(&msg(i));
            i += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(server.clients[0].path, dir.path().join("fast.sock"));
        assert_eq!(
            read_until(&fast, usize::from(i)),
            (0..i).collect::<Vec<_>>()
        );
        assert_eq!(server.dropped, 0);
    }

    /// A client that connected its socket to the agent's socket cannot be
    /// sent to from any other socket: its deliveries, those its thread held
    /// when it found out included, come through the agent's socket, in
    /// order, as fast as it reads (its queue is retried every
    /// `BACKLOG_RETRY_MS` ms), with nothing more to do for the loop.
    #[tokio::test]
    async fn a_client_connected_to_the_agents_socket_gets_its_messages_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut server, [slow, fast]) = client_pair(dir.path());
        slow.connect(dir.path().join(app::SOCKET_NAME)).unwrap();
        let n = 300u16;
        server.hold();
        for i in 0..n {
            server.deliver(&msg(i));
        }
        server.release();
        let all: Vec<u16> = (0..n).collect();
        assert_eq!(
            read_until(&slow, usize::from(n)),
            all,
            "every message, in order"
        );
        assert_eq!(read_until(&fast, usize::from(n)), all);
        assert_eq!(server.dropped, 0);
        assert_eq!(server.clients.len(), 2);
    }

    /// A client that unregisters gets nothing delivered meanwhile; once it
    /// registers again it gets what follows, in order, once each.
    #[tokio::test]
    async fn a_client_that_unregisters_and_registers_again_gets_nothing_between_and_nothing_twice()
    {
        let dir = tempfile::tempdir().unwrap();
        let (mut server, [slow, fast]) = client_pair(dir.path());
        drop(slow);
        let path = dir.path().join("fast.sock");
        server.from = Some(dir.path().join("slow.sock"));
        server.unregister();
        for i in 0..100u16 {
            server.deliver(&msg(i));
        }
        assert_eq!(read_until(&fast, 100), (0..100).collect::<Vec<_>>());
        server.from = Some(path.clone());
        server.unregister();
        assert!(server.clients.is_empty());
        for i in 100..200u16 {
            server.deliver(&msg(i));
        }
        assert_eq!(server.register(), vec![b'R']);
        for i in 200..300u16 {
            server.deliver(&msg(i));
        }
        assert_eq!(
            read_until(&fast, usize::MAX),
            (200..300).collect::<Vec<_>>(),
            "what came while unregistered is not delivered; the rest once, in order"
        );
    }
}
