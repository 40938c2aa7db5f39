//! The one trait every key source implements, what opens one
//! ([`SourceOptions`]) and what `keyfleet devices` shows of a device
//! ([`DeviceInfo`], [`Access`]).
use std::path::Path;
use std::sync::Arc;
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

/// Decides whether a decoded candidate is the entry to return. A source that
/// finds several candidates in one entry (the webcam: every QR code in view)
/// skips the ones this refuses and reads on.
#[derive(Clone)]
pub struct CandidateFilter(Arc<dyn Fn(&str) -> bool + Send + Sync>);

impl CandidateFilter {
    pub fn new(f: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        CandidateFilter(Arc::new(f))
    }

    pub fn accepts(&self, candidate: &str) -> bool {
        (self.0)(candidate)
    }
}

impl std::fmt::Debug for CandidateFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CandidateFilter(..)")
    }
}

/// Everything `keyfleet read-key` and `keyfleet enroll --from` pass to a source.
/// Each source's `open(&SourceOptions)` uses the fields that apply to it.
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
    /// Which candidate to return where a source finds several; `None`: the
    /// source's own test (the webcam's [`looks_like_key`](crate::webcam::looks_like_key)).
    pub accept: Option<CandidateFilter>,
}

/// Whether this user may open a listed device, and what grants it when not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// This user may open it for reading and writing.
    Granted,
    /// Permission denied; `fix` names the udev rule or group that grants it.
    Denied { fix: &'static str },
    /// It cannot be opened for another reason (gone, a dangling link).
    Unavailable { reason: String },
    /// Not a node the source opens (a medium is mounted, not opened); see the note.
    NotChecked,
}

/// How to install the udev rules; each [`Access::Denied`] fix refers to it.
pub const UDEV_INSTALL: &str = "sudo install -m 0644 udev/70-keyfleet.rules /etc/udev/rules.d/ \
     && sudo udevadm control --reload && sudo udevadm trigger, then replug the device";

impl Access {
    /// Whether this user may open `path` for reading and writing, by
    /// access(2): nothing is opened, since opening a tty can reset the board
    /// behind it. `fix` is what [`Access::Denied`] carries.
    pub fn check(path: &Path, fix: &'static str) -> Access {
        use rustix::fs::Access as Mode;
        match rustix::fs::access(path, Mode::READ_OK | Mode::WRITE_OK) {
            Ok(()) => Access::Granted,
            Err(e) if e == rustix::io::Errno::ACCESS || e == rustix::io::Errno::PERM => {
                Access::Denied { fix }
            }
            Err(e) => Access::Unavailable {
                reason: std::io::Error::from(e).to_string(),
            },
        }
    }

    /// One word for scripts: `granted`, `denied`, `unavailable` or `not-checked`.
    pub fn word(&self) -> &'static str {
        match self {
            Access::Granted => "granted",
            Access::Denied { .. } => "denied",
            Access::Unavailable { .. } => "unavailable",
            Access::NotChecked => "not-checked",
        }
    }

    /// What to tell the user, when there is anything to tell.
    pub fn hint(&self) -> Option<String> {
        match self {
            Access::Granted | Access::NotChecked => None,
            Access::Denied { fix } => Some(format!("no read/write access for this user; {fix}")),
            Access::Unavailable { reason } => Some(format!("cannot be opened: {reason}")),
        }
    }
}

/// One candidate device for `keyfleet devices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The `--from` source it suits (the [`SourceFactory`](crate::registry::SourceFactory)'s name).
    pub kind: &'static str,
    /// The path to pass as `--device`.
    pub path: String,
    pub vendor: Option<String>,
    pub product: Option<String>,
    /// What it is, where that helps (point-of-sale mode, mounted at ...).
    pub note: Option<String>,
    /// Whether this user may open it, and the fix when not.
    pub access: Access,
}

impl DeviceInfo {
    /// The note and the access hint in one line, as `keyfleet devices` prints them.
    pub fn full_note(&self) -> Option<String> {
        match (&self.note, self.access.hint()) {
            (Some(n), Some(h)) => Some(format!("{n}; {h}")),
            (n, h) => n.clone().or(h),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_is_checked_without_opening() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("node");
        std::fs::write(&p, "").unwrap();
        assert_eq!(Access::check(&p, "fix"), Access::Granted);
        let missing = Access::check(&d.path().join("missing"), "fix");
        assert!(
            matches!(&missing, Access::Unavailable { reason } if reason.contains("No such file")),
            "{missing:?}"
        );
        assert_eq!(missing.word(), "unavailable");
    }

    #[test]
    fn the_note_carries_the_fix() {
        let mut d = DeviceInfo {
            kind: "ir",
            path: "/dev/ttyACM0".into(),
            vendor: None,
            product: None,
            note: Some("USB IR Toy".into()),
            access: Access::Denied {
                fix: "join the dialout group",
            },
        };
        assert_eq!(
            d.full_note().as_deref(),
            Some("USB IR Toy; no read/write access for this user; join the dialout group")
        );
        d.note = None;
        d.access = Access::Granted;
        assert_eq!(d.full_note(), None);
        assert_eq!(d.access.word(), "granted");
    }
}
