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
    /// The whole input was read and held no entry: photos with no readable
    /// code, or only codes that are not key labels (the source itself worked).
    #[error("no key label in the input: {0}")]
    NoEntry(String),
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

/// Serial line settings for `--baud`, `--data-bits`, `--parity`, `--stop-bits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialSettings {
    pub baud: u32,
    pub data_bits: u8,
    /// `'N'`, `'E'` or `'O'`.
    pub parity: char,
    pub stop_bits: u8,
}

impl Default for SerialSettings {
    fn default() -> Self {
        // 9600 8N1: what most serial scanners and IR receivers ship with.
        SerialSettings {
            baud: 9600,
            data_bits: 8,
            parity: 'N',
            stop_bits: 1,
        }
    }
}

/// Everything `keyfleet read-key` and `keyfleet enroll --from` pass to a source.
/// Each module's `open(&SourceOptions)` uses the fields that apply to it.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// `--device`: the device node (hidraw, tty, video, block device).
    pub device: Option<std::path::PathBuf>,
    /// `--replay`: a recording to feed through the same decoder as the device.
    pub replay: Option<std::path::PathBuf>,
    /// `--keymap`: an ir-keytable TOML keymap.
    pub keymap: Option<std::path::PathBuf>,
    /// `--path`: one key file.
    pub path: Option<std::path::PathBuf>,
    /// Serial line settings.
    pub serial: SerialSettings,
}

/// One candidate device for `keyfleet devices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The `--from` source it suits (`hid-scanner`, `serial-scanner`, `webcam`, `ir`, `file`).
    pub kind: &'static str,
    /// The path to pass as `--device`.
    pub path: String,
    pub vendor: Option<String>,
    pub product: Option<String>,
    /// Why it may not be usable (no permission and the udev hint, not mounted, ...).
    pub note: Option<String>,
}
