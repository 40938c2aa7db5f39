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

/// Runs the agent until `shutdown` resolves; then saves the state and removes
/// the application socket.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
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

    driver.link_up().await?;
    tokio::pin!(shutdown);
    let result = loop {
        let wake = tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            w = driver.wait() => Wake::Net(w),
            r = server.recv() => Wake::App(r),
        };
        let step = match wake {
            Wake::Net(Ok(w)) => driver.handle(w).await,
            Wake::Net(Err(e)) => Err(e),
            Wake::App(Ok(len)) => server.serve(len, &mut driver, &mut running).await,
            Wake::App(Err(e)) => {
                tracing::warn!(error = %e, "application socket receive failed");
                Ok(())
            }
        };
        for event in driver.take_events() {
            if let DriverEvent::Delivered(d) = event {
                server.deliver(&app::encode_delivered(&d));
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
    clients: Vec<PathBuf>,
    dropped: u64,
    buf: Vec<u8>,
    from: Option<PathBuf>,
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
                    self.clients.retain(|c| c != from);
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
        if !self.clients.contains(&from) {
            if self.clients.len() >= app::MAX_CLIENTS {
                return app::encode_error(&format!(
                    "{} clients are registered already, the most this agent serves",
                    app::MAX_CLIENTS
                ));
            }
            tracing::info!(client = %from.display(), "application client registered");
            self.clients.push(from);
        }
        vec![b'R']
    }

    /// Hands one `M` datagram to every registered client, never blocking.
    fn deliver(&mut self, msg: &[u8]) {
        let mut gone = Vec::new();
        for c in &self.clients {
            match self.tx.send_to(msg, c) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.dropped += 1,
                Err(e) => {
                    tracing::info!(client = %c.display(), error = %e, "application client gone; unregistered");
                    gone.push(c.clone());
                }
            }
        }
        self.clients.retain(|c| !gone.contains(c));
    }

    fn close(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One client that does not read (its socket queue full) must not cost
    /// the others their messages: every send is tried on its own. (Found by
    /// the fault matrix: a frozen agent's burst of deliveries filled one
    /// client, and the answer to another client's `S` was lost with it.)
    #[tokio::test]
    async fn a_full_client_does_not_stop_deliveries_and_answers_to_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = AppServer::bind(&dir.path().join(app::SOCKET_NAME)).unwrap();
        let slow_path = dir.path().join("slow.sock");
        let fast_path = dir.path().join("fast.sock");
        let slow = std::os::unix::net::UnixDatagram::bind(&slow_path).unwrap();
        let fast = std::os::unix::net::UnixDatagram::bind(&fast_path).unwrap();
        fast.set_nonblocking(true).unwrap();
        server.clients = vec![slow_path, fast_path.clone()];
        // Let the reactor see the socket writable, as in a running agent.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut buf = [0u8; 64];
        let mut fast_got = 0;
        for i in 0..40u8 {
            // The fast client reads everything at once; the slow one never reads.
            server.deliver(&[b'M', i]);
            while fast.recv(&mut buf).is_ok() {
                fast_got += 1;
            }
        }
        assert_eq!(fast_got, 40, "the fast client gets every message");
        assert!(
            server.dropped > 0,
            "the slow client's full socket is counted"
        );
        assert_eq!(server.clients.len(), 2, "a full client stays registered");
        // An answer to the fast client goes out although the slow one is still full.
        server.from = Some(fast_path);
        server.answer(&app::encode_outcome(SendOutcome::Sent));
        assert_eq!(fast.recv(&mut buf).ok(), Some(2), "the answer arrives");
        drop(slow);
    }
}
