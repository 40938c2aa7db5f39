//! IR remote: an IR receiver on a serial port, raw timings decoded as the
//! Linux kernel decodes them, buttons named by an ir-keytable keymap.
//!
//! ```text
//!  serial port ──┐                     ┌─ mode2 text ─ LineAssembler → Mode2Parser ─┐
//!  (device.rs)   ├─ bytes ─ Stream ────┤                                            ├─ Timing
//!  --replay file ┘                     └─ IR Toy samples ─ IrToyParser ─────────────┘
//!
//!  Timing → Coalescer → NEC ∥ RC5 ∥ RC6 decoders → Presses (held vs new) →
//!  Keymap (scancode → KEY_*) → entry (digits, erase, OK) → read_raw()
//! ```
//! Everything right of "bytes" is pure and shared by the device and the
//! replay: a fixture exercises the same code as the hardware. Time inside the
//! decoders is the sum of the durations they were fed; a space of 125 ms or
//! more ends a signal (the kernel's receiver timeout). The device shell adds
//! one thing, a timeout event once the line has been idle for [`IDLE_END`],
//! so the last frame of a board that prints nothing after its final pulse is
//! complete. A replay runs at once and ignores `--timeout` (its stream's
//! clock stands still). Device and replay run through the shared read loop,
//! [`crate::stream::read_entry`].
//!
//! Only the decoders of the keymap's protocols run (as `ir-keytable` enables
//! them from the keymap); a keymap of protocol `unknown` gets NEC, RC5 and RC6.
//! Keymaps are looked up by scancode within those protocols
//! ([`keymap::Keymap::lookup`]).
//!
//! Receiver formats ([`Format`]): the text LIRC's `mode2` prints (see
//! [`mode2`] for the variants) or the USB IR Toy's binary sample mode (see
//! [`irtoy`]). A device is probed: an IR Toy answers the version command and
//! is put in sample mode; any other port is read as mode2 text. A replay file
//! is mode2 text unless it holds bytes text never has (NUL and other control
//! bytes), then it is an IR Toy recording.
//!
//! Buttons ([`keymap::action`]): digits and `A`–`F` enter characters,
//! `KEY_BACK`/`KEY_BACKSPACE`/`KEY_DELETE` erase the last one,
//! `KEY_OK`/`KEY_ENTER`/`KEY_SELECT` finish. A held button enters one
//! character: NEC repeat codes and RC5/RC6 frames with an unchanged toggle bit
//! (within the kernel's key-up delay) are repeats; a new press flips the toggle.
use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::source::{DeviceInfo, KeySource, SourceError, SourceOptions};
use crate::stream::{read_entry, Assemble, Next, TimedStream};

/// The `--from` name and cargo feature.
pub const NAME: &str = "ir";

pub mod decode;
mod device;
pub mod encode;
pub mod entry;
pub mod irtoy;
pub mod keymap;
pub mod mode2;
pub mod nec;
pub mod rc5;
pub mod rc6;
pub mod timing;

use entry::{Outcome, Pipeline};
use keymap::Keymap;
use timing::Timing;

/// Idle time after which a device's signal is taken as ended (the kernel's
/// default receiver timeout, `IR_DEFAULT_TIMEOUT`).
pub const IDLE_END: Duration = Duration::from_millis(125);

/// Largest recording `--replay` reads.
pub const MAX_REPLAY: u64 = 64 << 20;

/// What a receiver sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Lines as LIRC's `mode2` prints them.
    Mode2Text,
    /// The USB IR Toy's sample mode.
    IrToy,
}

/// Guess the format of a recording: IR Toy samples almost always hold a
/// zero high byte and other control bytes that text never has.
pub fn sniff(bytes: &[u8]) -> Format {
    let binary = bytes
        .iter()
        .take(4096)
        .any(|&b| b < 0x20 && !matches!(b, b'\n' | b'\r' | b'\t'));
    if binary {
        Format::IrToy
    } else {
        Format::Mode2Text
    }
}

/// Bytes to timings for one format, across reads.
#[derive(Debug)]
pub enum Stream {
    Mode2 {
        lines: mode2::LineAssembler,
        parser: mode2::Mode2Parser,
    },
    IrToy(irtoy::IrToyParser),
}

impl Stream {
    pub fn new(format: Format, recording: bool) -> Self {
        match format {
            Format::Mode2Text => Stream::Mode2 {
                lines: mode2::LineAssembler::default(),
                parser: mode2::Mode2Parser::default(),
            },
            Format::IrToy if recording => Stream::IrToy(irtoy::IrToyParser::for_recording()),
            Format::IrToy => Stream::IrToy(irtoy::IrToyParser::new()),
        }
    }

    /// Add bytes; returns the timings they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Timing>, SourceError> {
        match self {
            Stream::IrToy(p) => Ok(p.push(bytes)),
            Stream::Mode2 { lines, parser } => {
                let complete = lines.push(bytes).map_err(|e| SourceError::Malformed {
                    what: format!("mode2 line {}: {e}", parser.lines() + 1),
                })?;
                let mut out = Vec::new();
                for line in complete {
                    out.extend(parser.parse_line(&line).map_err(malformed)?);
                }
                Ok(out)
            }
        }
    }

    /// The stream ended (or went idle): complete what can be completed.
    pub fn finish(&mut self) -> Result<Vec<Timing>, SourceError> {
        match self {
            Stream::IrToy(p) => p
                .finish()
                .map(|()| Vec::new())
                .map_err(|what| SourceError::Malformed { what }),
            Stream::Mode2 { lines, parser } => match lines.finish() {
                Some(line) => parser.parse_line(&line).map_err(malformed),
                None => Ok(Vec::new()),
            },
        }
    }

    fn has_partial(&self) -> bool {
        match self {
            Stream::Mode2 { lines, .. } => lines.has_partial(),
            Stream::IrToy(_) => false,
        }
    }
}

fn malformed(e: mode2::Mode2Error) -> SourceError {
    SourceError::Malformed {
        what: e.to_string(),
    }
}

/// Where the receiver's bytes come from. Its items are wiped on drop: they
/// are the timings of a key entry.
enum Input {
    Replay {
        /// The recording.
        data: Zeroizing<Vec<u8>>,
        pos: usize,
        name: String,
    },
    Device {
        port: device::Port,
        /// Bytes that arrived while the port was probed, not yet decoded.
        early: Vec<u8>,
        started: Instant,
    },
}

impl TimedStream for Input {
    type Item = Zeroizing<Vec<u8>>;

    /// A replay in chunks of 4 KiB; a device's bytes as they come, or
    /// [`Next::Quiet`] after the port's 20 ms of silence (whatever `wait`).
    fn next(&mut self, _wait: Option<Duration>) -> Result<Next<Self::Item>, SourceError> {
        match self {
            Input::Replay { data, pos, name } => {
                if *pos >= data.len() {
                    return Ok(Next::End(name.clone()));
                }
                let end = (*pos + 4096).min(data.len());
                let chunk = data.get(*pos..end).unwrap_or_default().to_vec();
                *pos = end;
                Ok(Next::Item(Zeroizing::new(chunk)))
            }
            Input::Device { port, early, .. } => {
                if !early.is_empty() {
                    return Ok(Next::Item(Zeroizing::new(std::mem::take(early))));
                }
                let mut buf = Zeroizing::new(vec![0u8; 512]);
                match port.read(&mut buf) {
                    Ok(0) => Ok(Next::Quiet),
                    Ok(n) => {
                        buf.truncate(n);
                        Ok(Next::Item(buf))
                    }
                    Err(SourceError::Ended(why)) => Ok(Next::End(why)),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// A device's time since it was opened; a replay's clock stands still.
    fn now(&self) -> Duration {
        match self {
            Input::Replay { .. } => Duration::ZERO,
            Input::Device { started, .. } => started.elapsed(),
        }
    }
}

/// Bytes to an entry: the format's parser, the decoders and keymap
/// ([`Pipeline`]) and the timings between them. No I/O.
struct Entry {
    stream: Stream,
    pipeline: Pipeline,
    queue: VecDeque<Timing>,
    /// The end of the input was seen and the last signal completed.
    finished: bool,
    /// When the last bytes came, on the input's clock (for [`IDLE_END`]).
    last_input: Duration,
    /// The recording or port, named in messages about what it sent.
    origin: String,
}

impl Entry {
    /// Add timings (or the error that made them) and feed what is queued.
    fn queue_timings(
        &mut self,
        timings: Result<Vec<Timing>, SourceError>,
    ) -> Option<Result<String, SourceError>> {
        match timings {
            Ok(t) => self.queue.extend(t),
            Err(e) => return Some(Err(in_file(e, &self.origin))),
        }
        self.ready()
    }
}

impl Assemble<Zeroizing<Vec<u8>>> for Entry {
    /// Feed queued timings until an entry completes.
    fn ready(&mut self) -> Option<Result<String, SourceError>> {
        while let Some(t) = self.queue.pop_front() {
            match self.pipeline.feed(t) {
                Some(Outcome::Done(text)) => return Some(Ok(text.as_str().to_owned())),
                Some(Outcome::Cancelled) => return Some(Err(SourceError::Cancelled)),
                None => {}
            }
        }
        None
    }

    fn feed(
        &mut self,
        bytes: Zeroizing<Vec<u8>>,
        now: Duration,
    ) -> Option<Result<String, SourceError>> {
        self.last_input = now;
        let timings = self.stream.push(&bytes);
        self.queue_timings(timings)
    }

    /// A line idle for [`IDLE_END`] ends the signal on it, as the kernel's
    /// receiver timeout does.
    fn quiet(&mut self, now: Duration) -> Option<Result<String, SourceError>> {
        let idle = now.saturating_sub(self.last_input);
        if idle < IDLE_END || !(self.pipeline.has_pending() || self.stream.has_partial()) {
            return None;
        }
        let us = u32::try_from(idle.as_micros()).unwrap_or(u32::MAX);
        let timings = self.stream.finish().map(|mut t| {
            t.push(Timing::Timeout(us));
            t
        });
        self.queue_timings(timings)
    }

    /// The input ended: whatever was sent last is complete; the second end
    /// says what was decoded.
    fn end(&mut self, why: String) -> Option<Result<String, SourceError>> {
        if self.finished {
            return Some(Err(SourceError::Ended(format!(
                "{why}: {}",
                self.pipeline.summary()
            ))));
        }
        self.finished = true;
        let timings = self.stream.finish().map(|mut t| {
            t.push(Timing::Timeout(irtoy::LONG_SPACE_US));
            t
        });
        self.queue_timings(timings)
    }
}

/// The `ir` key source: a serial receiver or a recording of one.
pub struct IrSource {
    input: Input,
    entry: Entry,
}

/// Open the source `--from ir` describes: `--replay FILE` (mode2 text or an
/// IR Toy recording) or `--device PORT`, with `--keymap FILE` (required;
/// a bare name is looked up in `/etc/rc_keymaps` and `/lib/udev/rc_keymaps`).
pub fn open(opts: &SourceOptions) -> Result<Box<dyn KeySource>, SourceError> {
    let keymap_path = opts.keymap.as_deref().ok_or_else(|| SourceError::Open {
        path: "--keymap".into(),
        reason: "the ir source needs --keymap FILE, the remote's ir-keytable TOML keymap \
                 (e.g. /lib/udev/rc_keymaps/rc6_mce.toml; `ir-keytable -r` shows the one in use)"
            .into(),
    })?;
    let keymap = load_keymap(keymap_path)?;
    if let Some(replay) = &opts.replay {
        return Ok(Box::new(IrSource::replay(replay, keymap)?));
    }
    let Some(path) = &opts.device else {
        return Err(SourceError::Open {
            path: "--device".into(),
            reason: "the ir source needs --device PORT (a serial IR receiver, e.g. /dev/ttyACM0; \
                     see `keyfleet devices`) or --replay FILE"
                .into(),
        });
    };
    let (port, kind) = device::Port::open(path, &opts.serial)?;
    let (format, early) = match kind {
        device::Kind::IrToy(samples) => (Format::IrToy, samples),
        device::Kind::Text(bytes) => (Format::Mode2Text, bytes),
    };
    let origin = path.display().to_string();
    Ok(Box::new(IrSource::new(
        Input::Device {
            port,
            early,
            started: Instant::now(),
        },
        format,
        false,
        keymap,
        origin,
    )))
}

/// Load a keymap for `--keymap`. Any ir-keytable keymap loads; one for
/// protocols this source does not decode (sony, jvc, cec, ...) is accepted
/// with a warning, and an entry with it ends saying its buttons were not found.
pub fn load_keymap(path: &Path) -> Result<Keymap, SourceError> {
    let keymap = Keymap::load(path).map_err(|e| SourceError::Malformed {
        what: e.to_string(),
    })?;
    if !keymap.has_decodable_protocol() {
        tracing::warn!(
            keymap = %keymap.source,
            protocols = %keymap.protocol_names().join(", "),
            "keymap has no nec, rc5 or rc6 protocol; its buttons cannot be decoded"
        );
    }
    Ok(keymap)
}

/// Known IR receivers on serial ports, for `keyfleet devices`.
pub fn list() -> Vec<DeviceInfo> {
    device::list()
}

/// The IR receiver in the [registry](crate::registry).
pub static FACTORY: crate::registry::Factory = crate::registry::Factory {
    name: NAME,
    list,
    open,
};

impl IrSource {
    fn new(input: Input, format: Format, recording: bool, keymap: Keymap, origin: String) -> Self {
        IrSource {
            input,
            entry: Entry {
                stream: Stream::new(format, recording),
                pipeline: Pipeline::new(keymap),
                queue: VecDeque::new(),
                finished: false,
                last_input: Duration::ZERO,
                origin,
            },
        }
    }

    /// A source replaying a recording through the device's decoder path.
    pub fn replay(path: &Path, keymap: Keymap) -> Result<IrSource, SourceError> {
        let name = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| SourceError::Open {
            path: name.clone(),
            reason: e.to_string(),
        })?;
        if meta.len() > MAX_REPLAY {
            return Err(SourceError::Malformed {
                what: format!(
                    "{name} is {} bytes; a recording is at most {MAX_REPLAY}",
                    meta.len()
                ),
            });
        }
        let data = std::fs::read(path).map_err(|e| SourceError::Open {
            path: name.clone(),
            reason: e.to_string(),
        })?;
        Ok(IrSource::from_bytes(data, &name, keymap))
    }

    /// A source replaying bytes already in memory (`name` is for messages).
    pub fn from_bytes(data: Vec<u8>, name: &str, keymap: Keymap) -> IrSource {
        let format = sniff(&data);
        tracing::debug!(recording = name, ?format, "replaying IR recording");
        IrSource::new(
            Input::Replay {
                data: Zeroizing::new(data),
                pos: 0,
                name: name.to_string(),
            },
            format,
            true,
            keymap,
            name.to_string(),
        )
    }
}

fn in_file(e: SourceError, name: &str) -> SourceError {
    match e {
        SourceError::Malformed { what } => SourceError::Malformed {
            what: format!("{name}: {what}"),
        },
        other => other,
    }
}

impl KeySource for IrSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn read_raw(&mut self, timeout: Option<Duration>) -> Result<String, SourceError> {
        read_entry(&mut self.input, &mut self.entry, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keymap() -> Keymap {
        Keymap::parse(
            "[[protocols]]\nprotocol = \"nec\"\n[protocols.scancodes]\n0x2001 = \"KEY_1\"\n",
            "test",
        )
        .unwrap()
    }

    #[test]
    fn sniff_tells_text_from_ir_toy_samples() {
        assert_eq!(
            sniff(b"pulse 9000\r\nspace 4500\n\tpulse 560\n"),
            Format::Mode2Text
        );
        assert_eq!(sniff(b" 16777215\n\n 9000 4500\n"), Format::Mode2Text);
        assert_eq!(sniff(b"S01\x01\xa6\x00\xd3"), Format::IrToy);
        assert_eq!(sniff(b""), Format::Mode2Text);
    }

    #[test]
    fn malformed_replay_names_the_file_and_line() {
        let mut s = IrSource::from_bytes(
            b"pulse 9000\nspace 4500\npulse nine\n".to_vec(),
            "capture.mode2",
            keymap(),
        );
        let e = s.read_raw(None).unwrap_err().to_string();
        assert!(
            e.contains("capture.mode2") && e.contains("line 3") && e.contains("pulse nine"),
            "{e}"
        );
    }

    #[test]
    fn cut_ir_toy_recording_is_refused() {
        let mut s = IrSource::from_bytes(b"S01\x01\xa6\x00".to_vec(), "cut.irtoy", keymap());
        let e = s.read_raw(None).unwrap_err().to_string();
        assert!(
            e.contains("cut.irtoy") && e.contains("middle of a sample"),
            "{e}"
        );
    }

    #[test]
    fn empty_replay_ends_saying_nothing_was_decoded() {
        let mut s = IrSource::from_bytes(Vec::new(), "empty.mode2", keymap());
        let e = s.read_raw(None).unwrap_err();
        assert!(matches!(e, SourceError::Ended(_)), "{e}");
        assert!(
            e.to_string()
                .contains("no NEC, RC5 or RC6 frame was decoded"),
            "{e}"
        );
    }
}
