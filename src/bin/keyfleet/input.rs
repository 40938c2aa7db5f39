//! `keyfleet read-key` and `keyfleet devices`: the installer's key sources.
//!
//! [`KeySourceArgs`] is the source selection (`--from` and what goes with
//! it); `keyfleet enroll --from` flattens the same struct and calls
//! [`read_initial_key`].
//!
//! Exit codes of `read-key`:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | a valid initial key was read |
//! | 1 | the input was read but refused: wrong length, bad character or failing check |
//! | 2 | the command line is wrong (clap) |
//! | 3 | the source failed: device missing or not accessible, malformed recording, key file refused, source not built in |
//! | 4 | nothing arrived before `--timeout` |
//! | 5 | the installer cancelled (Esc, Ctrl-C) |
//! | 6 | the source worked but its input held no key: photos with no readable QR code, or only codes that are not key labels (`--raw` shows them) |
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use keyfleet_core::label::{self, LabelError, Parsed};
use keyfleet_drivers::source::{KeySource, SerialSettings, SourceError, SourceOptions};
use zeroize::Zeroizing;

/// Where the initial key comes from (`--from`).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// Typed on the keyboard; not echoed on a terminal, one line from stdin otherwise.
    Keyboard,
    /// A full-screen on-screen keypad for a mouse or touch screen.
    Keypad,
    /// A USB barcode/QR scanner in HID keyboard or point-of-sale mode.
    HidScanner,
    /// A barcode/QR scanner on a serial port.
    SerialScanner,
    /// A QR code read by a webcam.
    Webcam,
    /// Digits entered on an IR remote, through a receiver on a serial port.
    Ir,
    /// A key file on removable media.
    File,
}

impl SourceKind {
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Keyboard => "keyboard",
            SourceKind::Keypad => "keypad",
            SourceKind::HidScanner => "hid-scanner",
            SourceKind::SerialScanner => "serial-scanner",
            SourceKind::Webcam => "webcam",
            SourceKind::Ir => "ir",
            SourceKind::File => "file",
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parity {
    None,
    Even,
    Odd,
}

/// The source selection of `read-key`: `--from` and the source's flags.
#[derive(Args, Debug, Clone)]
pub struct KeySourceArgs {
    /// Where the initial key comes from.
    #[arg(long = "from", value_enum, value_name = "SOURCE")]
    pub from: SourceKind,
    #[command(flatten)]
    pub flags: SourceFlags,
}

/// The flags of a key source (shared by `read-key` and `enroll --from`).
#[derive(Args, Debug, Clone)]
pub struct SourceFlags {
    /// The device node: hidraw, tty, video device, or a block device for `file`
    /// (see `keyfleet devices`).
    #[arg(long, value_name = "PATH")]
    pub device: Option<PathBuf>,
    /// Feed a recording through the same decoder as the device: hid-recorder
    /// output, raw serial bytes, an image or a folder of frames, mode2 text,
    /// typed bytes for `keyboard`.
    #[arg(long, value_name = "FILE")]
    pub replay: Option<PathBuf>,
    /// An ir-keytable TOML keymap naming the remote's buttons (`ir`).
    #[arg(long, value_name = "TOML")]
    pub keymap: Option<PathBuf>,
    /// One key file (`file`); relative to the medium's root when `--device` is given.
    #[arg(long, value_name = "FILE")]
    pub path: Option<PathBuf>,
    /// Give up when no complete entry arrives within this many seconds.
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// Serial line speed (`serial-scanner`, `ir`).
    #[arg(long, default_value_t = SerialSettings::default().baud)]
    pub baud: u32,
    /// Serial data bits.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(5..=8))]
    pub data_bits: u8,
    /// Serial parity.
    #[arg(long, value_enum, default_value_t = Parity::None)]
    pub parity: Parity,
    /// Serial stop bits.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub stop_bits: u8,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("{s} is not a positive number of seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s}: {e}"))
}

impl KeySourceArgs {
    pub fn options(&self) -> SourceOptions {
        self.flags.options()
    }
}

impl SourceFlags {
    pub fn options(&self) -> SourceOptions {
        SourceOptions {
            device: self.device.clone(),
            replay: self.replay.clone(),
            keymap: self.keymap.clone(),
            path: self.path.clone(),
            serial: SerialSettings {
                baud: self.baud,
                data_bits: self.data_bits,
                parity: match self.parity {
                    Parity::None => 'N',
                    Parity::Even => 'E',
                    Parity::Odd => 'O',
                },
                stop_bits: self.stop_bits,
            },
        }
    }
}

/// Raised for a source the binary was built without.
#[derive(Debug, thiserror::Error)]
#[error("source {0} is not built into this binary{1}")]
pub struct NotBuiltIn(&'static str, &'static str);

/// Opens the source `kind`. Each source is behind the cargo feature of its name.
/// With `show_raw`, a source that decodes several candidates (the webcam)
/// prints each one's text on stderr as it finds it.
pub fn open_source(
    kind: SourceKind,
    opts: &SourceOptions,
    show_raw: bool,
) -> anyhow::Result<Box<dyn KeySource>> {
    let _ = show_raw;
    let opened: anyhow::Result<Box<dyn KeySource>> = match kind {
        #[cfg(feature = "keyboard")]
        SourceKind::Keyboard => keyfleet_drivers::keyboard::open(opts).map_err(Into::into),
        #[cfg(feature = "keypad")]
        SourceKind::Keypad => keyfleet_drivers::keypad::open(opts).map_err(Into::into),
        #[cfg(feature = "file")]
        SourceKind::File => keyfleet_drivers::media::open(opts).map_err(Into::into),
        #[cfg(feature = "hid-scanner")]
        SourceKind::HidScanner => keyfleet_drivers::hid::open(opts).map_err(Into::into),
        #[cfg(feature = "serial-scanner")]
        SourceKind::SerialScanner => keyfleet_drivers::serial::open(opts).map_err(Into::into),
        #[cfg(feature = "ir")]
        SourceKind::Ir => keyfleet_drivers::ir::open(opts).map_err(Into::into),
        // Keep scanning past QR codes that are not valid labels (a URL on the
        // appliance's box, a half-read frame) until one parses; with --raw,
        // show the text of every code found, label or not.
        #[cfg(feature = "webcam")]
        SourceKind::Webcam => keyfleet_drivers::webcam::WebcamSource::open(
            opts,
            Box::new(move |p: &str| {
                let ok = keyfleet_core::label::parse(p).is_ok();
                if show_raw {
                    eprintln!(
                        "raw: {p:?}{}",
                        if ok {
                            ""
                        } else {
                            " (not a key label; still scanning)"
                        }
                    );
                }
                ok
            }),
        )
        .map(|s| Box::new(s) as Box<dyn KeySource>)
        .map_err(Into::into),
        #[allow(unreachable_patterns)]
        other => not_built_in(other),
    };
    opened.with_context(|| format!("opening the {} source", kind.name()))
}

/// The error for a source this binary was built without (its cargo feature off).
fn not_built_in(kind: SourceKind) -> anyhow::Result<Box<dyn KeySource>> {
    let enabled = match kind {
        SourceKind::HidScanner => cfg!(feature = "hid-scanner"),
        SourceKind::SerialScanner => cfg!(feature = "serial-scanner"),
        SourceKind::Webcam => cfg!(feature = "webcam"),
        SourceKind::Ir => cfg!(feature = "ir"),
        SourceKind::Keyboard => cfg!(feature = "keyboard"),
        SourceKind::Keypad => cfg!(feature = "keypad"),
        SourceKind::File => cfg!(feature = "file"),
    };
    let hint = match (enabled, kind.name()) {
        (true, _) => "",
        (false, "keyboard") => "; rebuild keyfleet with `--features keyboard`",
        (false, "keypad") => "; rebuild keyfleet with `--features keypad`",
        (false, "file") => "; rebuild keyfleet with `--features file`",
        (false, "hid-scanner") => "; rebuild keyfleet with `--features hid-scanner`",
        (false, "serial-scanner") => "; rebuild keyfleet with `--features serial-scanner`",
        (false, "webcam") => "; rebuild keyfleet with `--features webcam`",
        (false, _) => "; rebuild keyfleet with `--features ir`",
    };
    Err(NotBuiltIn(kind.name(), hint).into())
}

/// What one reading gave.
pub struct ReadOutcome {
    pub source: &'static str,
    pub parsed: Parsed,
}

/// Opens the source, reads one entry and parses it. With `show_raw`, what
/// the source decoded is printed on stderr before parsing (escaped, so
/// control characters show).
pub fn read_initial_key(args: &KeySourceArgs, show_raw: bool) -> anyhow::Result<ReadOutcome> {
    let mut src = open_source(args.from, &args.options(), show_raw)?;
    let source = src.name();
    let raw = Zeroizing::new(
        src.read_raw(args.flags.timeout)
            .with_context(|| format!("reading from the {source} source"))?,
    );
    // The webcam printed every code it found already.
    if show_raw && args.from != SourceKind::Webcam {
        eprintln!("raw: {:?}", raw.as_str());
    }
    let parsed = label::parse(&raw)
        .with_context(|| format!("the initial key from the {source} source was refused"))?;
    tracing::info!(source, key_check = %parsed.key.fingerprint(), node_id = ?parsed.node_id.as_ref().map(|n| n.as_str()), "initial key read");
    Ok(ReadOutcome { source, parsed })
}

/// `keyfleet read-key`.
#[derive(Args, Debug)]
#[command(
    after_help = "Exit codes: 0 a valid key was read; 1 the input was refused (wrong length, \
bad character, failing check); 2 bad command line; 3 the source failed (device missing or not \
accessible, malformed recording, key file refused, source not built in); 4 --timeout passed; \
5 cancelled by the installer; 6 the input held no key (photos with no readable QR code, or only \
codes that are not key labels: --raw prints the text of every code found)."
)]
pub struct ReadKeyArgs {
    #[command(flatten)]
    pub source: KeySourceArgs,
    /// Print {"source", "node_id", "key_check"} as JSON; the key itself is never printed.
    #[arg(long)]
    pub json: bool,
    /// Print what the source decoded (text or digits) on stderr before parsing, to diagnose
    /// labels; for the webcam, the text of every QR code found, key label or not.
    #[arg(long)]
    pub raw: bool,
}

/// The exit code for an error, as documented at the top of this module.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if cause.downcast_ref::<LabelError>().is_some() {
            return 1;
        }
        if let Some(s) = cause.downcast_ref::<SourceError>() {
            return match s {
                SourceError::Timeout(_) => 4,
                SourceError::Cancelled => 5,
                SourceError::NoEntry(_) => 6,
                _ => 3,
            };
        }
    }
    3
}

/// Runs `keyfleet read-key`; on failure prints the reason on stderr and exits
/// with the documented code.
pub fn read_key(args: ReadKeyArgs) -> anyhow::Result<()> {
    match run_read_key(&args) {
        Ok(()) => Ok(()),
        Err(e) => {
            // Every key buffer of the failed attempt is dropped (and zeroed) by now.
            eprintln!("keyfleet read-key: {e:#}");
            std::process::exit(exit_code(&e));
        }
    }
}

fn run_read_key(args: &ReadKeyArgs) -> anyhow::Result<()> {
    let out = read_initial_key(&args.source, args.raw)?;
    let node_id = out.parsed.node_id.as_ref().map(|n| n.as_str().to_owned());
    let check = out.parsed.key.fingerprint();
    if args.json {
        let v = serde_json::json!({
            "source": out.source,
            "node_id": node_id,
            "key_check": check,
        });
        println!("{v}");
    } else {
        println!("source:    {}", out.source);
        println!(
            "node id:   {}",
            node_id.as_deref().unwrap_or("(none in the input)")
        );
        println!("key check: {check}");
    }
    Ok(())
}

/// `keyfleet devices`.
#[derive(Args, Debug)]
pub struct DevicesArgs {
    /// Print a JSON array of {"kind", "path", "vendor", "product", "note"}.
    #[arg(long)]
    pub json: bool,
}

pub fn devices(args: DevicesArgs) -> anyhow::Result<()> {
    let list = keyfleet_drivers::sysfs::list();
    if args.json {
        let v: Vec<serde_json::Value> = list
            .iter()
            .map(|d| {
                serde_json::json!({
                    "kind": d.kind,
                    "path": d.path,
                    "vendor": d.vendor,
                    "product": d.product,
                    "note": d.note,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    if list.is_empty() {
        println!("no candidate devices (hidraw, ttyUSB/ttyACM, video, removable media) found");
        return Ok(());
    }
    for d in &list {
        let ids = [d.vendor.as_deref(), d.product.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" / ");
        println!(
            "{:<15} {:<16} {}",
            d.kind,
            d.path,
            if ids.is_empty() { "-" } else { &ids }
        );
        if let Some(n) = &d.note {
            println!("{:<15} {:<16} note: {n}", "", "");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: KeySourceArgs,
    }

    #[test]
    fn serial_flags_fill_options() {
        let t = T::try_parse_from([
            "t",
            "--from",
            "serial-scanner",
            "--device",
            "/dev/ttyACM0",
            "--baud",
            "115200",
            "--data-bits",
            "7",
            "--parity",
            "even",
            "--stop-bits",
            "2",
            "--timeout",
            "1.5",
        ])
        .unwrap();
        let o = t.a.options();
        assert_eq!(t.a.from, SourceKind::SerialScanner);
        assert_eq!(o.device, Some(PathBuf::from("/dev/ttyACM0")));
        assert_eq!(
            o.serial,
            SerialSettings {
                baud: 115200,
                data_bits: 7,
                parity: 'E',
                stop_bits: 2
            }
        );
        assert_eq!(t.a.flags.timeout, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn bad_flags_are_refused() {
        assert!(T::try_parse_from(["t", "--from", "telepathy"]).is_err());
        assert!(T::try_parse_from(["t", "--from", "ir", "--data-bits", "9"]).is_err());
        assert!(T::try_parse_from(["t", "--from", "ir", "--timeout", "-1"]).is_err());
        assert!(T::try_parse_from(["t", "--from", "ir", "--timeout", "soon"]).is_err());
    }

    #[test]
    fn exit_codes_follow_the_cause() {
        let e = anyhow::Error::new(LabelError::HexCheck).context("refused");
        assert_eq!(exit_code(&e), 1);
        let e = anyhow::Error::new(SourceError::Timeout(Duration::from_secs(1))).context("x");
        assert_eq!(exit_code(&e), 4);
        let e = anyhow::Error::new(SourceError::Cancelled);
        assert_eq!(exit_code(&e), 5);
        let e = anyhow::Error::new(NotBuiltIn("webcam", ""));
        assert_eq!(exit_code(&e), 3);
        let e = anyhow::Error::new(SourceError::NoEntry("no code".into())).context("reading");
        assert_eq!(exit_code(&e), 6);
        let e = anyhow::Error::new(SourceError::Open {
            path: "/dev/video9".into(),
            reason: "missing".into(),
        });
        assert_eq!(exit_code(&e), 3);
    }
}
