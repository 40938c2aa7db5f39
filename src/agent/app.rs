//! The application interface: a Unix datagram socket, one datagram = one message.
//!
//! The agent binds `<state>/app.sock` (mode 0600, in the 0700 state
//! directory, so only the agent's user reaches it). Every datagram starts with
//! one ASCII byte that says what it is; the rest is its body.
//!
//! Client → agent:
//!
//! | first byte | body | what the agent does |
//! |---|---|---|
//! | `S` | plaintext (1 to [`MAX_PLAINTEXT`] bytes) | seals it with the group key and sends it to the group; answers `A` |
//! | `R` | — | registers the sender's socket path for delivered messages; answers `R` |
//! | `U` | — | unregisters it; answers `U` |
//! | `?` | — | answers `?` with the agent's status as one JSON object |
//!
//! Agent → client:
//!
//! | first byte | body |
//! |---|---|
//! | `M` | a delivered group message: sender member `u32`, sequence number `u64`, epoch `u32` (all big-endian), then the plaintext |
//! | `A` | one byte: 0 sealed and sent, 1 held until the agent has synced with the controller (sent then), 2 dropped (the hold queue is full) |
//! | `R`, `U` | — (the registration is done) |
//! | `?` | the status JSON |
//! | `E` | a UTF-8 message saying what was wrong with the last request |
//!
//! Answers go to the sender's address, so a client that wants them binds its
//! own socket to a path first (`keyfleet-agent send`/`recv` bind one in the
//! state directory); a client that only sends `S` may stay unbound
//! (`printf 'Shello' | socat - UNIX-SENDTO:<state>/app.sock`). Messages
//! are delivered to every registered client without blocking the agent:
//! each client has a thread of the agent's that sends to it, in order,
//! through a socket connected to the client's. The kernel keeps only
//! `net.unix.max_dgram_qlen` datagrams in a client's queue (10 by default,
//! 512 where systemd sets it); the thread waits in the kernel while the
//! queue is full and sends the next the moment the client has read one, so
//! a client that reads as fast as it can keeps up with the agent's own
//! work. Meanwhile up to [`BACKLOG_BYTES`] of messages wait per client. A
//! client that falls further behind misses messages (counted in the status
//! as `app_dropped`; the others lose nothing; `app_backlog_peak` says how
//! near a client came); a client whose socket is gone is unregistered. (A
//! client that connected its socket to the agent's cannot be sent to from
//! another socket: it is served through the agent's own socket, its queue
//! retried every [`BACKLOG_RETRY_MS`] ms while full.)

use keyfleet_core::protocol::Delivered;

/// The socket's file name inside the state directory.
pub const SOCKET_NAME: &str = "app.sock";
/// Largest plaintext one `S` message may carry: a sealed data message stays
/// within the protocol's datagram size ([`keyfleet_core::wire::MAX_DATAGRAM`], 1200 bytes;
/// 47 bytes go to the header, nonce and tag).
pub const MAX_PLAINTEXT: usize = keyfleet_core::wire::MAX_DATAGRAM - 47;
/// Most clients registered at once.
pub const MAX_CLIENTS: usize = 32;
/// Deliveries kept per client while its socket queue is full, in bytes (each
/// message counted with 32 bytes of overhead): about 3 500 messages of 1 KiB
/// or 30 000 of 64 B; at most [`MAX_CLIENTS`] × this in all.
pub const BACKLOG_BYTES: usize = 4 << 20;
/// How often a full client's queue is retried when the client's socket is
/// connected to the agent's (the other clients' threads are woken by the
/// kernel).
pub const BACKLOG_RETRY_MS: u64 = 5;
/// Length of the `M` header after its kind byte.
const DELIVERED_HEADER: usize = 4 + 8 + 4;

/// What became of an `S` message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SendOutcome {
    /// Sealed with the group key and sent to the group.
    Sent,
    /// Held until the agent has synced with the controller; sent then.
    Held,
    /// Dropped: the hold queue is full.
    Dropped,
}

impl SendOutcome {
    fn code(self) -> u8 {
        match self {
            SendOutcome::Sent => 0,
            SendOutcome::Held => 1,
            SendOutcome::Dropped => 2,
        }
    }

    fn from_code(c: u8) -> Option<SendOutcome> {
        match c {
            0 => Some(SendOutcome::Sent),
            1 => Some(SendOutcome::Held),
            2 => Some(SendOutcome::Dropped),
            _ => None,
        }
    }
}

/// A client's request, decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a> {
    Send(&'a [u8]),
    Register,
    Unregister,
    Status,
}

/// Why a client's datagram was refused (sent back as `E`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("empty datagram; the first byte says what it is: S (send), R (register), U (unregister), ? (status)")]
    Empty,
    #[error("unknown message kind {0:?}; expected S, R, U or ?")]
    Kind(char),
    #[error("nothing to send: an S message carries the plaintext after the S")]
    EmptyPlaintext,
    #[error("plaintext of {0} bytes is too long; at most {MAX_PLAINTEXT} bytes fit in one group message")]
    TooLong(usize),
    #[error("datagram of more than {0} bytes is too long; at most {MAX_PLAINTEXT} bytes of plaintext fit in one group message")]
    TooLongAtLeast(usize),
}

/// Decodes a client's datagram.
pub fn decode_request(bytes: &[u8]) -> Result<Request<'_>, RequestError> {
    let (&kind, body) = bytes.split_first().ok_or(RequestError::Empty)?;
    match kind {
        b'S' if body.is_empty() => Err(RequestError::EmptyPlaintext),
        b'S' if body.len() > MAX_PLAINTEXT => Err(RequestError::TooLong(body.len())),
        b'S' => Ok(Request::Send(body)),
        b'R' => Ok(Request::Register),
        b'U' => Ok(Request::Unregister),
        b'?' => Ok(Request::Status),
        other => Err(RequestError::Kind(char::from(other))),
    }
}

/// An `S` datagram.
pub fn encode_send(plaintext: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + plaintext.len());
    v.push(b'S');
    v.extend_from_slice(plaintext);
    v
}

/// An `M` datagram.
pub fn encode_delivered(d: &Delivered) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + DELIVERED_HEADER + d.plaintext.len());
    v.push(b'M');
    v.extend_from_slice(&d.sender.to_be_bytes());
    v.extend_from_slice(&d.seq.to_be_bytes());
    v.extend_from_slice(&d.epoch.0.to_be_bytes());
    v.extend_from_slice(&d.plaintext);
    v
}

/// An `A` datagram.
pub fn encode_outcome(o: SendOutcome) -> Vec<u8> {
    vec![b'A', o.code()]
}

/// An `E` datagram.
pub fn encode_error(msg: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + msg.len());
    v.push(b'E');
    v.extend_from_slice(msg.as_bytes());
    v
}

/// A delivered message as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    pub sender: u32,
    pub seq: u64,
    pub epoch: u32,
    pub plaintext: Vec<u8>,
}

/// What the agent sent a client, decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Message(Message),
    Outcome(SendOutcome),
    Registered,
    Unregistered,
    Status(Vec<u8>),
    Error(String),
}

/// Why an agent's datagram could not be read (a newer or foreign agent).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplyError {
    #[error("empty datagram from the agent")]
    Empty,
    #[error("unknown reply kind {0:?} from the agent")]
    Kind(char),
    #[error("{what} from the agent is {len} bytes, too short")]
    Short { what: &'static str, len: usize },
}

/// Decodes an agent's datagram.
pub fn decode_reply(bytes: &[u8]) -> Result<Reply, ReplyError> {
    let (&kind, body) = bytes.split_first().ok_or(ReplyError::Empty)?;
    match kind {
        b'M' => {
            let (head, plaintext) =
                body.split_at_checked(DELIVERED_HEADER)
                    .ok_or(ReplyError::Short {
                        what: "delivered message",
                        len: bytes.len(),
                    })?;
            let (sender, rest) = head.split_at(4);
            let (seq, epoch) = rest.split_at(8);
            let be4 = |b: &[u8]| <[u8; 4]>::try_from(b).map(u32::from_be_bytes);
            let short = |_| ReplyError::Short {
                what: "delivered message",
                len: bytes.len(),
            };
            Ok(Reply::Message(Message {
                sender: be4(sender).map_err(short)?,
                seq: <[u8; 8]>::try_from(seq)
                    .map(u64::from_be_bytes)
                    .map_err(short)?,
                epoch: be4(epoch).map_err(short)?,
                plaintext: plaintext.to_vec(),
            }))
        }
        b'A' => {
            let code = body.first().ok_or(ReplyError::Short {
                what: "send outcome",
                len: bytes.len(),
            })?;
            SendOutcome::from_code(*code)
                .map(Reply::Outcome)
                .ok_or(ReplyError::Kind('A'))
        }
        b'R' => Ok(Reply::Registered),
        b'U' => Ok(Reply::Unregistered),
        b'?' => Ok(Reply::Status(body.to_vec())),
        b'E' => Ok(Reply::Error(String::from_utf8_lossy(body).into_owned())),
        other => Err(ReplyError::Kind(char::from(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfleet_core::crypto::Epoch;

    #[test]
    fn delivered_round_trip() {
        let d = Delivered {
            sender: 7,
            seq: 1 << 40,
            epoch: Epoch(3),
            trials: 0,
            plaintext: b"hello fleet".to_vec(),
        };
        let bytes = encode_delivered(&d);
        assert_eq!(bytes[0], b'M');
        assert_eq!(
            decode_reply(&bytes).unwrap(),
            Reply::Message(Message {
                sender: 7,
                seq: 1 << 40,
                epoch: 3,
                plaintext: b"hello fleet".to_vec()
            })
        );
    }

    #[test]
    fn requests_decode_and_bad_ones_say_why() {
        assert_eq!(decode_request(b"Shi").unwrap(), Request::Send(b"hi"));
        assert_eq!(decode_request(b"R").unwrap(), Request::Register);
        assert_eq!(decode_request(b"U").unwrap(), Request::Unregister);
        assert_eq!(decode_request(b"?").unwrap(), Request::Status);
        assert_eq!(decode_request(b""), Err(RequestError::Empty));
        assert_eq!(decode_request(b"S"), Err(RequestError::EmptyPlaintext));
        assert_eq!(decode_request(b"xyz"), Err(RequestError::Kind('x')));
        let long = encode_send(&vec![b'a'; MAX_PLAINTEXT + 1]);
        assert_eq!(
            decode_request(&long),
            Err(RequestError::TooLong(MAX_PLAINTEXT + 1))
        );
        let max = encode_send(&vec![b'a'; MAX_PLAINTEXT]);
        assert!(decode_request(&max).is_ok());
    }

    #[test]
    fn replies_decode_and_truncated_ones_are_refused() {
        for o in [SendOutcome::Sent, SendOutcome::Held, SendOutcome::Dropped] {
            assert_eq!(decode_reply(&encode_outcome(o)).unwrap(), Reply::Outcome(o));
        }
        assert_eq!(
            decode_reply(&encode_error("no")).unwrap(),
            Reply::Error("no".into())
        );
        assert!(matches!(
            decode_reply(b"M\0\0\0\x01"),
            Err(ReplyError::Short { .. })
        ));
        assert_eq!(decode_reply(b"A\x09"), Err(ReplyError::Kind('A')));
        assert_eq!(decode_reply(b""), Err(ReplyError::Empty));
    }

    #[test]
    fn a_sealed_message_of_max_plaintext_fits_the_datagram_limit() {
        // header (version, kind, hint flag, sender, seq, epoch, nonce) + tag.
        let header = keyfleet_core::wire::data_header(1, 1, Some(Epoch(1)), &[0; 12]).len();
        assert_eq!(
            header + 16 + MAX_PLAINTEXT,
            keyfleet_core::wire::MAX_DATAGRAM
        );
    }
}
