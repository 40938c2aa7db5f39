//! `status`, `send`, `recv`: a client of the agent's application socket.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tempfile::NamedTempFile;
use tokio::net::UnixDatagram;

use keyfleet::agent::app::{self, Message, Reply, SendOutcome};
use keyfleet::agent::AgentStatus;

/// How long to wait for the agent's answer.
const ANSWER: Duration = Duration::from_secs(2);

/// A socket bound in the state directory (0700), removed on drop.
struct Client {
    sock: NamedTempFile<UnixDatagram>,
    agent: std::path::PathBuf,
}

impl Client {
    fn bind(state: &Path) -> anyhow::Result<Client> {
        let agent = state.join(app::SOCKET_NAME);
        if !agent.exists() {
            bail!(
                "no agent socket at {}; is `keyfleet-agent run --state {}` running?",
                agent.display(),
                state.display()
            );
        }
        let sock = tempfile::Builder::new()
            .prefix(".client-")
            .suffix(".sock")
            .make_in(state, |p| UnixDatagram::bind(p))
            .with_context(|| format!("cannot bind a client socket in {}", state.display()))?;
        Ok(Client { sock, agent })
    }

    async fn request(&self, bytes: &[u8]) -> anyhow::Result<()> {
        self.sock
            .as_file()
            .send_to(bytes, &self.agent)
            .await
            .with_context(|| {
                format!(
                    "no agent answers on {}; is `keyfleet-agent run` running?",
                    self.agent.display()
                )
            })?;
        Ok(())
    }

    /// The next reply, or `None` after `wait`.
    async fn next(&self, wait: Duration) -> anyhow::Result<Option<Reply>> {
        let mut buf = vec![0u8; 65_536];
        match tokio::time::timeout(wait, self.sock.as_file().recv(&mut buf)).await {
            Err(_) => Ok(None),
            Ok(r) => {
                let n = r.context("cannot receive from the agent")?;
                let reply = app::decode_reply(buf.get(..n).unwrap_or_default())?;
                Ok(Some(reply))
            }
        }
    }

    /// The first reply that is not a delivered message.
    async fn answer(&self) -> anyhow::Result<Reply> {
        loop {
            match self.next(ANSWER).await? {
                None => bail!(
                    "the agent at {} did not answer within {} s",
                    self.agent.display(),
                    ANSWER.as_secs()
                ),
                Some(Reply::Message(_)) => continue,
                Some(Reply::Error(e)) => bail!("the agent refused: {e}"),
                Some(r) => return Ok(r),
            }
        }
    }
}

/// `status`: the running agent's answer, else the state file.
pub async fn status(state: &Path, json: bool) -> anyhow::Result<()> {
    let live = match Client::bind(state) {
        Ok(c) => match c.request(b"?").await {
            Ok(()) => match c.answer().await {
                Ok(Reply::Status(bytes)) => Some(
                    serde_json::from_slice::<AgentStatus>(&bytes)
                        .context("the agent's status is not the JSON this keyfleet-agent reads")?,
                ),
                _ => None,
            },
            Err(_) => None,
        },
        Err(_) => None,
    };
    let s = match live {
        Some(s) => s,
        None => AgentStatus::from_state_dir(state).context("while reading the node's state")?,
    };
    if json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    let member = s
        .member
        .map_or("not joined".into(), |m| format!("member {m}"));
    println!("node        {} ({member})", s.node_id);
    println!(
        "state       {}{}",
        s.state,
        s.epoch.map_or(String::new(), |e| format!(", epoch {e}"))
    );
    for k in &s.keys {
        println!(
            "key         epoch {} ({}) check {}  seals {}  opens {}",
            k.epoch, k.role, k.check, k.seals, k.opens
        );
    }
    if let Some(e) = s.sealing_epoch {
        println!("seals with  epoch {e}");
    }
    println!("last sync   {}", s.last_sync_ms.map_or("never".into(), ago));
    match &s.running {
        Some(r) => {
            println!(
                "agent       running, pid {}, {} (listen {}, group {}, controller {})",
                r.pid,
                if r.synced { "synced" } else { "syncing" },
                r.listen,
                r.group,
                r.controller
            );
            println!(
                "counters    in {}  refused {}  undecryptable {}  sent {}  delivered {} ({} by trial)  clients {}",
                r.datagrams_in, r.refused, r.undecryptable, r.data_sent, r.delivered, r.delivered_by_trial, r.app_clients
            );
            println!(
                "lost        hold queue full {}  sends refused {}  for slow clients {}  (most waiting for one client {})",
                r.send_dropped, r.send_errors, r.app_dropped, r.app_backlog_peak
            );
        }
        None => println!("agent       not reachable; shown from {}", s.path),
    }
    Ok(())
}

fn ago(ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    format!(
        "{} s ago (at {ms} ms since the UNIX epoch)",
        now.saturating_sub(ms) / 1000
    )
}

/// `send TEXT`.
pub async fn send(state: &Path, text: &str, json: bool) -> anyhow::Result<ExitCode> {
    if text.is_empty() {
        bail!("nothing to send: TEXT is empty");
    }
    if text.len() > app::MAX_PLAINTEXT {
        bail!(
            "TEXT is {} bytes; at most {} fit in one group message",
            text.len(),
            app::MAX_PLAINTEXT
        );
    }
    let c = Client::bind(state)?;
    c.request(&app::encode_send(text.as_bytes())).await?;
    let outcome = match c.answer().await? {
        Reply::Outcome(o) => o,
        other => return Err(anyhow!("unexpected answer from the agent: {other:?}")),
    };
    if json {
        println!("{}", serde_json::json!({ "outcome": outcome }));
    } else {
        match outcome {
            SendOutcome::Sent => println!("sent"),
            SendOutcome::Held => {
                println!("held: the agent sends it once it has synced with the controller")
            }
            SendOutcome::Dropped => eprintln!("dropped: the agent's hold queue is full"),
        }
    }
    Ok(if outcome == SendOutcome::Dropped {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// `recv [--count N] [--timeout S] [--json]`.
pub async fn recv(
    state: &Path,
    count: Option<u64>,
    timeout: Option<f64>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    // SIGTERM (a service manager, `timeout`, `kill`) ends the wait like Ctrl-C:
    // what was received is still printed.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).context("while installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("while installing the SIGINT handler")?;
    let c = Client::bind(state)?;
    c.request(b"R").await?;
    match c.answer().await? {
        Reply::Registered => {}
        other => bail!("unexpected answer from the agent: {other:?}"),
    }
    let deadline = match timeout {
        Some(s) if s.is_finite() && s >= 0.0 => {
            Some(tokio::time::Instant::now() + Duration::from_secs_f64(s))
        }
        Some(s) => bail!("--timeout {s} is not a number of seconds"),
        None => None,
    };
    let mut got: Vec<Message> = Vec::new();
    let mut interrupted = false;
    while count.is_none_or(|n| (got.len() as u64) < n) {
        let wait = deadline.map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(tokio::time::Instant::now())
        });
        if wait.is_zero() {
            break;
        }
        let next = tokio::select! {
            r = c.next(wait) => r?,
            _ = int.recv() => { interrupted = true; break }
            _ = term.recv() => { interrupted = true; break }
        };
        match next {
            Some(Reply::Message(m)) => {
                if !json {
                    println!("{}", String::from_utf8_lossy(&m.plaintext));
                }
                got.push(m);
            }
            Some(_) => {}
            None if deadline.is_some() => break,
            None => {}
        }
    }
    let _ = c.request(b"U").await;
    if json {
        let messages: Vec<_> = got
            .iter()
            .map(|m| {
                serde_json::json!({
                    "sender": m.sender,
                    "seq": m.seq,
                    "epoch": m.epoch,
                    "text": String::from_utf8_lossy(&m.plaintext),
                    "hex": hex::encode(&m.plaintext),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "count": got.len(), "messages": messages })
        );
    }
    let short = count.is_some_and(|n| (got.len() as u64) < n);
    if short && !interrupted {
        eprintln!(
            "received {} of {} messages before the timeout",
            got.len(),
            count.unwrap_or_default()
        );
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}
