//! serial-scanner: barcode/QR scanners on a serial line (RS-232, USB CDC-ACM
//! `ttyACM*`, USB-serial `ttyUSB*`).
//!
//! The scanner sends each scan as bytes, optionally framed by STX (0x02) and
//! ETX (0x03), optionally led by an AIM symbology identifier (`]` + code
//! letter + modifier, e.g. `]Q1` for QR, `]d2` for Data Matrix, `]C0` for
//! Code 128) and ended by CR, LF, CRLF or ETX. [`ScanFramer`] turns that byte
//! stream into scans; the device reader (`serialport`, with the line settings
//! of [`SerialSettings`]) and `--replay` (a file holding the raw byte stream,
//! as `cat /dev/ttyACM0 > scan.bin` or a serial capture tool saves it) feed
//! the same framer, through the shared read loop [`crate::stream::read_entry`].
use std::collections::VecDeque;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::source::{Access, DeviceInfo, KeySource, SerialSettings, SourceError, SourceOptions};
use crate::stream::{read_entry, Assemble, Next, TimedStream};
pub use crate::tty::line_settings;

/// The `--from` name and cargo feature.
pub const NAME: &str = "serial-scanner";

const STX: u8 = 0x02;
const ETX: u8 = 0x03;
const CR: u8 = b'\r';
const LF: u8 = b'\n';
/// A scan longer than this without an end byte means a wrong suffix setting or line noise.
pub const MAX_SCAN: usize = 4096;

/// What the framer made of the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framed {
    /// A complete scan: framing, AIM prefix and terminator removed.
    Scan(String),
    /// More than [`MAX_SCAN`] bytes arrived without CR, LF or ETX.
    Overflow,
}

/// Splits a serial byte stream into scans. Pure: bytes in, scans out.
#[derive(Debug, Default)]
pub struct ScanFramer {
    buf: Vec<u8>,
    overflowed: bool,
}

impl ScanFramer {
    /// Bytes of an unfinished scan.
    pub fn pending_len(&self) -> usize {
        self.buf.len()
    }

    /// Feed one byte; returns a scan when this byte ends one.
    pub fn push(&mut self, b: u8) -> Option<Framed> {
        match b {
            STX => {
                // A new frame: whatever came before it without an end was noise.
                self.buf.clear();
                self.overflowed = false;
                None
            }
            ETX | CR | LF => {
                let overflowed = std::mem::take(&mut self.overflowed);
                let data = std::mem::take(&mut self.buf);
                if overflowed {
                    return Some(Framed::Overflow);
                }
                // The LF of a CRLF, or a bare terminator, ends nothing.
                if data.is_empty() {
                    return None;
                }
                let text = String::from_utf8_lossy(&data);
                Some(Framed::Scan(strip_aim(&text).to_string()))
            }
            _ => {
                if self.buf.len() >= MAX_SCAN {
                    self.overflowed = true;
                    self.buf.clear();
                }
                if !self.overflowed {
                    self.buf.push(b);
                }
                None
            }
        }
    }
}

/// Remove a leading AIM symbology identifier: `]`, a code letter, a modifier character.
pub fn strip_aim(text: &str) -> &str {
    match text.as_bytes() {
        [b']', code, modifier, ..]
            if code.is_ascii_alphabetic() && modifier.is_ascii_alphanumeric() =>
        {
            text.get(3..).unwrap_or("")
        }
        _ => text,
    }
}

/// A serial scanner: a byte stream ([`ReplayStream`] or a port) and the framing.
pub struct SerialScanner<S> {
    stream: S,
    framing: Framing,
}

impl<S: TimedStream<Item = Vec<u8>>> SerialScanner<S> {
    pub fn new(stream: S) -> Self {
        SerialScanner {
            stream,
            framing: Framing::default(),
        }
    }
}

/// The framer and the bytes read but not yet framed (several scans may
/// arrive in one read).
#[derive(Default)]
struct Framing {
    framer: ScanFramer,
    unread: VecDeque<u8>,
}

impl Assemble<Vec<u8>> for Framing {
    fn ready(&mut self) -> Option<Result<String, SourceError>> {
        while let Some(b) = self.unread.pop_front() {
            match self.framer.push(b) {
                Some(Framed::Scan(text)) => {
                    tracing::debug!(chars = text.chars().count(), "serial scan complete");
                    return Some(Ok(text));
                }
                Some(Framed::Overflow) => {
                    return Some(Err(SourceError::Malformed {
                        what: format!("more than {MAX_SCAN} bytes without CR, LF or ETX; check the scanner's suffix setting and the line settings (--baud, --data-bits, --parity, --stop-bits)"),
                    }))
                }
                None => {}
            }
        }
        None
    }

    fn feed(&mut self, bytes: Vec<u8>, _now: Duration) -> Option<Result<String, SourceError>> {
        self.unread.extend(bytes);
        self.ready()
    }

    fn end(&mut self, why: String) -> Option<Result<String, SourceError>> {
        let pending = self.framer.pending_len();
        Some(Err(SourceError::Ended(if pending > 0 {
            format!("{why}, in a scan of {pending} bytes with no CR, LF or ETX")
        } else {
            format!("{why}, with no scan")
        })))
    }
}

impl<S: TimedStream<Item = Vec<u8>>> KeySource for SerialScanner<S> {
    fn name(&self) -> &'static str {
        NAME
    }

    fn read_raw(&mut self, timeout: Option<Duration>) -> Result<String, SourceError> {
        read_entry(&mut self.stream, &mut self.framing, timeout)
    }
}

/// A capture file, delivered in one piece; it has no clock, so a replay never times out.
pub struct ReplayStream {
    data: Option<Vec<u8>>,
    origin: String,
}

impl ReplayStream {
    pub fn new(data: Vec<u8>, origin: impl Into<String>) -> Self {
        ReplayStream {
            data: Some(data),
            origin: origin.into(),
        }
    }
}

impl TimedStream for ReplayStream {
    type Item = Vec<u8>;

    fn next(&mut self, _wait: Option<Duration>) -> Result<Next<Vec<u8>>, SourceError> {
        Ok(match self.data.take() {
            Some(d) => Next::Item(d),
            None => Next::End(format!("{} ended", self.origin)),
        })
    }

    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// A serial port.
struct PortStream {
    port: serialport::TTYPort,
    path: String,
    started: Instant,
    buf: Vec<u8>,
}

impl TimedStream for PortStream {
    type Item = Vec<u8>;

    fn next(&mut self, wait: Option<Duration>) -> Result<Next<Vec<u8>>, SourceError> {
        use serialport::SerialPort;
        // `None` waits in slices of an hour; the caller loops.
        let wait = wait
            .unwrap_or(Duration::from_secs(3600))
            .min(Duration::from_secs(3600))
            .max(Duration::from_millis(1));
        if let Err(e) = self.port.set_timeout(wait) {
            return Ok(Next::End(format!("{}: {e}", self.path)));
        }
        match self.port.read(&mut self.buf) {
            Ok(0) => Ok(Next::End(format!(
                "{}: hung up (was the scanner unplugged?)",
                self.path
            ))),
            Ok(n) => Ok(Next::Item(self.buf.get(..n).unwrap_or(&[]).to_vec())),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(Next::Quiet),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(Next::Quiet),
            Err(e) => Ok(Next::End(format!(
                "{}: {e} (was the scanner unplugged?)",
                self.path
            ))),
        }
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }
}

fn open_port(path: &str, settings: &SerialSettings) -> Result<Box<dyn KeySource>, SourceError> {
    let open_err = |reason: String| SourceError::Open {
        path: path.to_string(),
        reason,
    };
    let (data, parity, stop) = line_settings(settings).map_err(open_err)?;
    let port = serialport::new(path, settings.baud)
        .data_bits(data)
        .parity(parity)
        .stop_bits(stop)
        .flow_control(serialport::FlowControl::None)
        .timeout(Duration::from_millis(100))
        .open_native()
        .map_err(|e| open_err(e.to_string()))?;
    tracing::info!(path, baud = settings.baud, "serial scanner opened");
    Ok(Box::new(SerialScanner::new(PortStream {
        port,
        path: path.to_string(),
        started: Instant::now(),
        buf: vec![0u8; 1024],
    })))
}

fn open_replay(path: &Path) -> Result<Box<dyn KeySource>, SourceError> {
    let origin = path.display().to_string();
    let data = std::fs::read(path).map_err(|e| SourceError::Open {
        path: origin.clone(),
        reason: e.to_string(),
    })?;
    Ok(Box::new(SerialScanner::new(ReplayStream::new(
        data, origin,
    ))))
}

/// Open the scanner: the capture when `opts.replay` is set, else
/// `opts.device`, else the one USB serial port present.
pub fn open(opts: &SourceOptions) -> Result<Box<dyn KeySource>, SourceError> {
    if let Some(replay) = &opts.replay {
        return open_replay(replay);
    }
    let path = match &opts.device {
        Some(p) => p.display().to_string(),
        None => {
            let usb: Vec<String> = crate::tty::ports()
                .into_iter()
                .filter(|p| matches!(p.port_type, serialport::SerialPortType::UsbPort(_)))
                .map(|p| p.port_name)
                .collect();
            match usb.as_slice() {
                [one] => one.clone(),
                [] => {
                    return Err(SourceError::Open {
                        path: "(autodetect)".into(),
                        reason: "no USB serial port found; plug the scanner in (serial/CDC mode) or pass --device".into(),
                    })
                }
                many => {
                    return Err(SourceError::Open {
                        path: "(autodetect)".into(),
                        reason: format!("{} USB serial ports ({}); pick one with --device", many.len(), many.join(", ")),
                    })
                }
            }
        }
    };
    open_port(&path, &opts.serial)
}

/// Serial ports a scanner may sit on, with USB vendor and product where known.
pub fn list() -> Vec<DeviceInfo> {
    crate::tty::ports()
        .into_iter()
        .map(|p| {
            let (vendor, product) = match &p.port_type {
                serialport::SerialPortType::UsbPort(u) => (
                    Some(match &u.manufacturer {
                        Some(m) => format!("{m} ({:04x})", u.vid),
                        None => format!("{:04x}", u.vid),
                    }),
                    Some(match &u.product {
                        Some(m) => format!("{m} ({:04x})", u.pid),
                        None => format!("{:04x}", u.pid),
                    }),
                ),
                _ => (None, None),
            };
            DeviceInfo {
                kind: NAME,
                access: Access::check(Path::new(&p.port_name), crate::tty::FIX),
                path: p.port_name,
                vendor,
                product,
                note: None,
            }
        })
        .collect()
}

/// The serial scanner in the [registry](crate::registry).
pub static FACTORY: crate::registry::Factory = crate::registry::Factory {
    name: NAME,
    list,
    open,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: &[u8]) -> Vec<Framed> {
        let mut f = ScanFramer::default();
        bytes.iter().filter_map(|b| f.push(*b)).collect()
    }

    fn scans(bytes: &[u8]) -> Vec<String> {
        frame(bytes)
            .into_iter()
            .map(|f| match f {
                Framed::Scan(s) => s,
                Framed::Overflow => panic!("overflow"),
            })
            .collect()
    }

    #[test]
    fn every_terminator_ends_a_scan() {
        assert_eq!(scans(b"abc\r"), ["abc"]);
        assert_eq!(scans(b"abc\n"), ["abc"]);
        assert_eq!(scans(b"abc\r\ndef\r\n"), ["abc", "def"]);
        assert_eq!(scans(b"\x02abc\x03"), ["abc"]);
        assert_eq!(scans(b"\x02abc\x03\r\n"), ["abc"]);
    }

    #[test]
    fn no_terminator_no_scan() {
        assert!(scans(b"abc").is_empty());
    }

    #[test]
    fn stx_drops_earlier_noise() {
        assert_eq!(scans(b"zz\x02abc\x03"), ["abc"]);
    }

    #[test]
    fn aim_identifiers_are_stripped() {
        assert_eq!(scans(b"]Q1KF1:x\r"), ["KF1:x"]);
        assert_eq!(scans(b"\x02]d2123\x03"), ["123"]);
        assert_eq!(scans(b"]C0abc\n"), ["abc"]);
        // Not an AIM identifier: left alone for the label parser to judge.
        assert_eq!(scans(b"]]abc\n"), ["]]abc"]);
    }

    #[test]
    fn endless_input_overflows_once() {
        let mut bytes = vec![b'7'; MAX_SCAN + 10];
        bytes.push(b'\r');
        bytes.extend_from_slice(b"ok\r");
        let f = frame(&bytes);
        assert_eq!(f, [Framed::Overflow, Framed::Scan("ok".into())]);
    }

    #[test]
    fn replay_reads_scan_after_scan_then_ends() {
        let mut s = SerialScanner::new(ReplayStream::new(
            b"]Q1one\r\ntwo\x03par".to_vec(),
            "cap.bin",
        ));
        assert_eq!(s.read_raw(None).unwrap(), "one");
        assert_eq!(s.read_raw(None).unwrap(), "two");
        let e = s.read_raw(None).unwrap_err().to_string();
        assert!(e.contains("cap.bin ended, in a scan of 3 bytes"), "{e}");
    }
}
