//! Deliveries to one application client, sent by a thread of the client's
//! own.
//!
//! The agent's loop hands each delivered message to the client's [`Outbox`]
//! and goes back to the network at once; the outbox's thread sends them to
//! the client's socket, in order, with a blocking `sendmmsg`. A Unix
//! datagram socket queues only `net.unix.max_dgram_qlen` datagrams (10 by
//! default, 512 where systemd sets it), so a client that reads as fast as it
//! can still needs its queue refilled the moment it has read: the kernel
//! wakes the blocked thread as soon as the client takes one. When the loop
//! sent the deliveries itself, it refilled a client's queue once per pass
//! over the network; a client then read at most one queue's worth per pass,
//! fell behind in a long burst, and lost messages once its backlog was full
//! (in 5 of 42 end-to-end benchmark runs, and a backlog of up to 17 000
//! messages at 64 B; with the threads, none lost in 20 runs and a peak of
//! 700–2 000, also over 3 million messages a size).
//!
//! A client that does not read costs at most [`app::BACKLOG_BYTES`] of
//! queued messages; past that its messages are dropped for it alone and
//! counted. Its thread waits in the kernel, never the loop or another
//! client.
//!
//! A client that connected its own socket to the agent's application
//! socket can be sent to from that socket only (the kernel refuses any
//! other sender): its thread then sends through the agent's socket, which
//! is shared and non-blocking, so a full queue is retried every
//! [`app::BACKLOG_RETRY_MS`] ms instead of waited for.

use std::collections::VecDeque;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::app;

/// Deliveries one `sendmmsg` call to a client takes at most (the client is
/// woken once for them, not once a message).
pub(super) const DELIVER_BATCH: usize = 64;

/// How long a send to a full client waits before the thread looks whether
/// its outbox was closed (a client that never reads would otherwise keep
/// it in the kernel for good).
const SEND_TIMEOUT: Duration = Duration::from_millis(200);

/// What a queued message costs against [`app::BACKLOG_BYTES`].
pub(super) fn queued_size(msg: &[u8]) -> usize {
    msg.len() + 32
}

/// The deliveries of one client and the thread that sends them.
pub(super) struct Outbox {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    more: Condvar,
}

#[derive(Default)]
struct State {
    /// In order, not yet taken by the thread.
    queue: VecDeque<Vec<u8>>,
    /// [`queued_size`] of `queue` and of the batch the thread is sending.
    bytes: usize,
    /// Messages of the batch the thread is sending.
    sending: usize,
    /// The most messages waiting at once (queued and being sent).
    peak: usize,
    /// Set by [`Outbox`]'s drop: the thread ends.
    closed: bool,
    /// Set by the thread when it stopped: the client's socket is gone.
    gone: Option<io::Error>,
}

/// Locks `m`; nothing panics while the lock is held, so a poisoned one is as good.
fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What [`Outbox::push`] did with the messages it was given.
#[derive(Debug)]
pub(super) enum Pushed {
    /// Queued, except `dropped` of them, for which there was no room.
    Queued { dropped: u64 },
    /// The client's socket is gone (closed, or its file removed); nothing
    /// was queued, and the thread has ended.
    Gone(io::Error),
}

impl Outbox {
    /// Connects a blocking socket of the agent's to the client's socket at
    /// `path` and starts the thread that sends through it (or through
    /// `agent`, the agent's application socket, as the module says).
    pub fn connect(path: &Path, agent: &UnixDatagram) -> io::Result<Outbox> {
        let sock = UnixDatagram::unbound()?;
        sock.connect(path)?;
        sock.set_write_timeout(Some(SEND_TIMEOUT))?;
        let route = Route {
            own: Some(sock),
            agent: agent.try_clone()?,
            path: path.to_path_buf(),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            more: Condvar::new(),
        });
        let theirs = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("app-client".into())
            .stack_size(128 << 10)
            .spawn(move || send_loop(&theirs, route))
            .map_err(|e| io::Error::new(e.kind(), format!("no thread to deliver with: {e}")))?;
        Ok(Outbox { shared })
    }

    /// Queues `msgs` behind what waits, in order; one that does not fit in
    /// [`app::BACKLOG_BYTES`] is dropped. Wakes the thread when it was idle.
    pub fn push(&self, msgs: impl IntoIterator<Item = Vec<u8>>) -> Pushed {
        let mut st = lock(&self.shared.state);
        if let Some(e) = st.gone.take() {
            return Pushed::Gone(e);
        }
        let idle = st.queue.is_empty();
        let mut dropped = 0;
        for m in msgs {
            let size = queued_size(&m);
            if st.bytes + size > app::BACKLOG_BYTES {
                dropped += 1;
                continue;
            }
            st.bytes += size;
            st.queue.push_back(m);
        }
        st.peak = st.peak.max(st.queue.len() + st.sending);
        let wake = idle && !st.queue.is_empty();
        drop(st);
        if wake {
            self.shared.more.notify_one();
        }
        Pushed::Queued { dropped }
    }

    /// The most messages that waited for this client at once.
    pub fn peak(&self) -> usize {
        lock(&self.shared.state).peak
    }

    /// Messages waiting now (queued and being sent).
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        let st = lock(&self.shared.state);
        st.queue.len() + st.sending
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.more.notify_one();
    }
}

/// Where the thread sends.
struct Route {
    /// Its own socket, connected to the client's; `None` once the client
    /// turned out to be connected to the agent's socket.
    own: Option<UnixDatagram>,
    /// The agent's application socket (non-blocking).
    agent: UnixDatagram,
    /// The client's socket.
    path: std::path::PathBuf,
}

impl Route {
    /// Sends the first of `msgs` it can: how many the client's queue took
    /// (0 when it stayed full for a while).
    fn send(&mut self, msgs: &[Vec<u8>]) -> io::Result<usize> {
        if let Some(own) = &self.own {
            match crate::net::socket::send_many(
                own,
                msgs.iter().map(Vec::as_slice),
                None,
                rustix::net::SendFlags::empty(),
            ) {
                // The client's queue stayed full for SEND_TIMEOUT.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    tracing::debug!(client = %self.path.display(), "client socket connected to the agent; delivering through the agent's socket");
                    self.own = None;
                }
                r => return r,
            }
        }
        let mut sent = 0;
        for m in msgs {
            match self.agent.send_to(m, &self.path) {
                Ok(_) => sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if sent == 0 {
                        std::thread::sleep(Duration::from_millis(app::BACKLOG_RETRY_MS));
                    }
                    break;
                }
                Err(e) if sent > 0 => {
                    tracing::debug!(error = %e, "send to the client failed after {sent}; retried");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(sent)
    }
}

/// The thread: takes up to [`DELIVER_BATCH`] messages at a time and sends
/// them, waiting while the client's queue is full, until the outbox is
/// dropped or the client's socket is gone.
fn send_loop(shared: &Shared, mut route: Route) {
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(DELIVER_BATCH);
    loop {
        {
            let mut st = lock(&shared.state);
            while st.queue.is_empty() && !st.closed {
                st = shared.more.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.closed {
                return;
            }
            let n = st.queue.len().min(DELIVER_BATCH);
            batch.extend(st.queue.drain(..n));
            st.sending = n;
        }
        let mut done = 0;
        while done < batch.len() {
            let sent = match route.send(batch.get(done..).unwrap_or_default()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    let mut st = lock(&shared.state);
                    st.gone = Some(e);
                    st.queue.clear();
                    st.sending = 0;
                    return;
                }
            };
            if sent == 0 {
                if lock(&shared.state).closed {
                    return;
                }
                continue;
            }
            let freed: usize = batch
                .iter()
                .skip(done)
                .take(sent)
                .map(|m| queued_size(m))
                .sum();
            done += sent;
            let mut st = lock(&shared.state);
            st.bytes -= freed;
            st.sending -= sent;
            // Unregistered: the rest is not sent (a client that registers
            // again gets a thread of its own, and nothing twice).
            if st.closed {
                return;
            }
        }
        batch.clear();
    }
}
