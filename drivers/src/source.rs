//! The one trait every key source implements.
use std::time::Duration;

/// What went wrong while reading from a key source. Every variant says what
/// to do next; none carries key material.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Nothing usable arrived before the deadline.
    #[error("no input within {0:?}; present the label again or raise --timeout")]
    Timeout(Duration),
    /// The device could not be opened (missing, busy, or no permission).
    #[error("cannot open {path}: {reason}; check the path with `keyfleet devices` and the udev rules in udev/")]
    Open { path: String, reason: String },
    /// A recording or device stream was malformed; `what` names the place and the fault.
    #[error("malformed input: {what}")]
    Malformed { what: String },
    /// The installer cancelled the entry.
    #[error("entry cancelled")]
    Cancelled,
    /// The source ended (end of file, device unplugged) before a complete entry.
    #[error("input ended before a complete entry: {0}")]
    Ended(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A source of initial keys: a device or a recording of one.
///
/// `read_raw` returns what the source decoded for one entry (a scan, a typed
/// line, a QR payload, the digits entered on a remote, a file's text) before
/// any parsing; [`crate::label::parse`] turns it into a checked key.
pub trait KeySource {
    /// The source's name as given to `--from` (`hid-scanner`, `ir`, ...).
    fn name(&self) -> &'static str;
    /// Read one entry, waiting at most `timeout` (forever when `None`).
    fn read_raw(&mut self, timeout: Option<Duration>) -> Result<String, SourceError>;
}
