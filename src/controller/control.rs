//! The control socket of `keyfleet serve`: `<state>/control.sock`.
//!
//! A Unix stream socket, mode 0600 inside the 0700 state directory, so only
//! the controller's owner reaches it. Framing: line-delimited JSON. The
//! client writes one request line and reads reply lines until a final one:
//!
//! ```text
//! → {"op":"rekey"}
//! ← {"progress":{"epoch":5,"phase":"distributing","acked":12,"total":50}}
//! ← {"progress":{"epoch":5,"phase":"first_transition","acked":3,"total":50}}
//! ← {"rekeyed":{"outcome":"completed","epoch":5,"nodes":50,"joined":50,"acked":50,"stale":0,...}}
//!
//! → {"op":"rekey"}                          (while the round for epoch 5 runs)
//! ← {"queued":{"running_epoch":5,"running_phase":"draining","paused":false,"resumed":false,"epoch":6,"joined_queue":false}}
//! ← {"progress":...} … {"rekeyed":{"epoch":6,...,"earlier":[{"epoch":5,...}]}}
//!
//! ← {"rekeyed":{"outcome":"paused","epoch":5,"current_epoch":4,"phase":"distributing","acked":0,"needed":2,
//!               "silent_nodes":["pump-1","pump-2","pump-3"],"carried_on_by":"serve",...}}
//!
//! → {"op":"remove","node_id":"pump-7"}
//! ← {"progress":...} … {"removed":{"node_id":"pump-7","round":{...}}}
//!
//! → {"op":"enroll","node_id":"pump-8","addr":"10.0.0.8:7778","key":"<32 hex digits>"}
//! ← {"enrolled":{"node_id":"pump-8","member":8,"address":"10.0.0.8:7778","fingerprint":"…"}}
//!
//! ← {"error":{"message":"node id pump-9 is not enrolled (see `keyfleet status`)"}}
//! ```
//!
//! `progress`, `queued`, `rekeyed`, `removed`, `enrolled` and `error` are the
//! reply kinds; all but `progress` and `queued` end the exchange. A round
//! that reaches too few nodes by its deadline ends the exchange too, with
//! `"outcome":"paused"`: `serve` keeps retrying it. A client that goes away
//! does not stop the round.

use keyfleet_core::wire::NodeId;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use zeroize::Zeroizing;

use super::{
    ControllerError, EnrollReport, Progress, Queued, RejoinReport, RemoveReport, RoundReport,
};
use keyfleet_core::crypto::InitialKey;

/// Longest request line accepted.
const MAX_LINE: usize = 4096;

/// A request line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Rekey,
    Remove {
        node_id: String,
    },
    /// Let a node whose enrollment is pinned run the enrollment handshake again.
    Rejoin {
        node_id: String,
    },
    Enroll {
        node_id: String,
        /// `HOST:PORT`; `0.0.0.0:0` when not known yet (learned when the node joins).
        addr: String,
        /// The initial key, 32 hex digits (the socket is owner-only).
        key: Zeroizing<String>,
        /// Enroll even when another node has the same initial key or address.
        #[serde(default)]
        force: bool,
    },
    /// Where the running controller is (its group, interface and port): a
    /// client given other network flags is refused instead of ignored.
    Info,
}

impl Request {
    /// The typed command this request asks for (`None`: [`Request::Info`]),
    /// or what is wrong with it.
    pub fn command(self) -> Result<Option<super::Command>, String> {
        let id = |s: &str| NodeId::parse(s).map_err(|e| e.to_string());
        Ok(Some(match self {
            Request::Info => return Ok(None),
            Request::Rekey => super::Command::Rekey,
            Request::Remove { node_id } => super::Command::Remove(id(&node_id)?),
            Request::Rejoin { node_id } => super::Command::Rejoin(id(&node_id)?),
            Request::Enroll {
                node_id,
                addr,
                key,
                force,
            } => super::Command::Enroll {
                node_id: id(&node_id)?,
                addr: addr
                    .parse()
                    .map_err(|_| format!("{addr:?} is not HOST:PORT"))?,
                key: key_from_hex(&key)?,
                force,
            },
        }))
    }
}

/// What `keyfleet serve` runs on (the answer to [`Request::Info`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServeInfo {
    pub group: std::net::SocketAddrV4,
    pub iface: std::net::Ipv4Addr,
    pub listen_port: u16,
}

/// A reply line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Progress(Progress),
    /// The command waits behind the round in progress.
    Queued(Queued),
    Rekeyed(RoundReport),
    Removed(RemoveReport),
    Enrolled(EnrollReport),
    RejoinAllowed(RejoinReport),
    Info(ServeInfo),
    Error {
        message: String,
    },
}

impl Reply {
    pub fn is_final(&self) -> bool {
        !matches!(self, Reply::Progress(_) | Reply::Queued(_))
    }
}

/// A request from a client, with where its replies go.
pub struct Incoming {
    pub request: Request,
    pub tx: UnboundedSender<Reply>,
}

/// The 16 key bytes from 32 hex digits.
pub fn key_from_hex(s: &str) -> Result<InitialKey, String> {
    let mut k = [0u8; 16];
    hex::decode_to_slice(s.trim(), &mut k)
        .map_err(|_| "the initial key must be 32 hex digits".to_string())?;
    Ok(InitialKey(k))
}

/// Binds the socket (replacing a stale one: the caller holds the state
/// directory's lock, so no other controller uses it) and makes it owner-only.
pub fn listen(path: &Path) -> Result<UnixListener, ControllerError> {
    let io = |what: &'static str| {
        move |source| ControllerError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!(path = %path.display(), "removed a stale control socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove the stale control socket")(e)),
    }
    let l = UnixListener::bind(path).map_err(io("bind the control socket"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("make the control socket owner-only"))?;
    Ok(l)
}

/// Accepts clients; each one's request goes to the controller loop through `to_loop`.
pub async fn accept_loop(listener: UnixListener, to_loop: UnboundedSender<Incoming>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let to_loop = to_loop.clone();
        tokio::spawn(async move {
            if let Err(e) = client(stream, to_loop).await {
                tracing::debug!(error = %e, "control client");
            }
        });
    }
}

async fn client(stream: UnixStream, to_loop: UnboundedSender<Incoming>) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd).take(MAX_LINE as u64);
    let mut line = Zeroizing::new(String::new());
    rd.read_line(&mut line).await?;
    let (tx, mut rx) = unbounded_channel();
    match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            if to_loop.send(Incoming { request, tx }).is_err() {
                return Ok(());
            }
        }
        Err(e) => {
            let _ = tx.send(Reply::Error {
                message: format!("bad request: {e}"),
            });
        }
    }
    while let Some(reply) = rx.recv().await {
        let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
        out.push(b'\n');
        wr.write_all(&out).await?;
        if reply.is_final() {
            break;
        }
    }
    wr.shutdown().await
}

/// Connects to a running `keyfleet serve`; `None` when none listens.
pub async fn connect(path: &Path) -> Option<UnixStream> {
    UnixStream::connect(path).await.ok()
}

/// Sends `request` and reads replies, calling `update` for each line that
/// is not final (progress, queued); returns the final reply.
pub async fn call(
    stream: UnixStream,
    request: &Request,
    mut update: impl FnMut(&Reply),
) -> std::io::Result<Reply> {
    let (rd, mut wr) = stream.into_split();
    let mut line = Zeroizing::new(serde_json::to_string(request).map_err(std::io::Error::other)?);
    line.push('\n');
    wr.write_all(line.as_bytes()).await?;
    let mut lines = BufReader::new(rd).lines();
    while let Some(l) = lines.next_line().await? {
        let reply: Reply = serde_json::from_str(&l).map_err(std::io::Error::other)?;
        if reply.is_final() {
            return Ok(reply);
        }
        update(&reply);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "keyfleet serve closed the control socket before answering (did it stop?)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_reply_lines_are_the_documented_json() {
        let r: Request = serde_json::from_str(r#"{"op":"rekey"}"#).unwrap();
        assert!(matches!(r, Request::Rekey));
        let r: Request = serde_json::from_str(r#"{"op":"remove","node_id":"pump-7"}"#).unwrap();
        assert!(matches!(r, Request::Remove { node_id } if node_id == "pump-7"));
        let r: Request = serde_json::from_str(
            r#"{"op":"enroll","node_id":"p","addr":"10.0.0.8:7778","key":"00112233445566778899aabbccddeeff"}"#,
        )
        .unwrap();
        let Request::Enroll { key, .. } = r else {
            panic!("not an enroll")
        };
        assert_eq!(key_from_hex(&key).unwrap().0[15], 0xff);
        assert!(serde_json::from_str::<Request>(r#"{"op":"format"}"#).is_err());
        let p = Reply::Progress(Progress {
            epoch: 5,
            phase: "distributing".into(),
            acked: 12,
            total: 50,
            paused: false,
        });
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"progress":{"epoch":5,"phase":"distributing","acked":12,"total":50}}"#
        );
        assert!(!p.is_final());
        let e = Reply::Error {
            message: "no".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"error":{"message":"no"}}"#
        );
        assert!(e.is_final());
    }

    #[test]
    fn a_key_that_is_not_32_hex_digits_is_refused() {
        for bad in [
            "",
            "00",
            "zz112233445566778899aabbccddeeff",
            "00112233445566778899aabbccddeeff00",
        ] {
            assert!(key_from_hex(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_client_gets_progress_then_the_final_reply_and_the_socket_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        std::fs::write(&path, b"stale").unwrap();
        let l = listen(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (tx, mut rx) = unbounded_channel();
        tokio::spawn(accept_loop(l, tx));
        tokio::spawn(async move {
            let inc = rx.recv().await.unwrap();
            assert!(matches!(inc.request, Request::Rekey));
            let p = Progress {
                epoch: 2,
                phase: "draining".into(),
                acked: 3,
                total: 3,
                paused: false,
            };
            inc.tx.send(Reply::Progress(p)).unwrap();
            inc.tx
                .send(Reply::Error {
                    message: "done".into(),
                })
                .unwrap();
        });
        let s = connect(&path).await.unwrap();
        let mut seen = Vec::new();
        let r = call(s, &Request::Rekey, |p| seen.push(p.clone()))
            .await
            .unwrap();
        assert_eq!(seen.len(), 1);
        assert!(matches!(r, Reply::Error { message } if message == "done"));
    }
}
