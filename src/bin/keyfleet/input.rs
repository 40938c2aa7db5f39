//! `keyfleet read-key` and `keyfleet devices`: the installer's key sources.
//!
//! [`KeySourceArgs`] is the source selection (`--from` and what goes with
//! it); `keyfleet enroll --from` flattens the same struct and calls
//! [`read_initial_key`]. Both commands go through the drivers' registry
//! (`keyfleet_drivers::registry`): `--from NAME` opens the factory of that
//! name, `devices` shows what every factory lists. The `--from` values are
//! the CLI's own list ([`SourceKind`]); a value whose source this binary was
//! built without is not in the registry and is refused with its feature.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use keyfleet_core::label::{self, LabelError, Parsed};
use keyfleet_drivers::registry::{self, SourceFactory};
use keyfleet_drivers::source::{
    Access, CandidateFilter, DeviceInfo, KeySource, SerialSettings, SourceError, SourceOptions,
    UDEV_INSTALL,
};
use zeroize::Zeroizing;

/// Where the initial key comes from (`--from`). Each value is the name of a
/// source in the drivers' registry and of the cargo feature that builds it in.
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
    /// The `--from` value as typed (`hid-scanner`, ...).
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
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
            accept: None,
        }
    }
}

/// Raised for a source the binary was built without (its cargo feature,
/// of the same name, was off).
#[derive(Debug, thiserror::Error)]
#[error("source {0} is not built into this binary; rebuild keyfleet with `--features {0}`")]
pub struct NotBuiltIn(pub String);

/// The registry's source named `name`.
pub fn factory(name: &str) -> Result<&'static dyn SourceFactory, NotBuiltIn> {
    registry::find(name).ok_or_else(|| NotBuiltIn(name.to_owned()))
}

/// Opens the source `kind` through the registry.
pub fn open_source(kind: SourceKind, opts: &SourceOptions) -> anyhow::Result<Box<dyn KeySource>> {
    let name = kind.name();
    let opened = match factory(&name) {
        Ok(f) => f.open(opts).map_err(anyhow::Error::from),
        Err(e) => Err(e.into()),
    };
    opened.with_context(|| format!("opening the {name} source"))
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
    let mut opts = args.options();
    // A source that finds several candidates (the webcam: every QR code in
    // view) keeps scanning past those that are not valid labels (a URL on
    // the appliance's box, a half-read frame) until one parses; with --raw,
    // it shows the text of each, label or not.
    let shown = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&shown);
    opts.accept = Some(CandidateFilter::new(move |p: &str| {
        let ok = label::parse(p).is_ok();
        if show_raw {
            seen.store(true, Ordering::Relaxed);
            let why = if ok {
                ""
            } else {
                " (not a key label; still scanning)"
            };
            eprintln!("raw: {p:?}{why}");
        }
        ok
    }));
    let mut src = open_source(args.from, &opts)?;
    let source = src.name();
    let raw = Zeroizing::new(
        src.read_raw(args.flags.timeout)
            .with_context(|| format!("reading from the {source} source"))?,
    );
    // A source that filtered candidates printed every one already.
    if show_raw && !shown.load(Ordering::Relaxed) {
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
    /// Print a JSON array of {"kind", "path", "vendor", "product", "note", "access", "fix"}:
    /// `access` is granted, denied, unavailable or not-checked; `fix` says what grants a
    /// denied one; `note` carries the hint too.
    #[arg(long)]
    pub json: bool,
}

/// The candidate devices of every source built in, as `keyfleet devices` shows them.
pub fn devices(args: DevicesArgs) -> anyhow::Result<()> {
    let list = registry::list_all();
    if args.json {
        let v: Vec<serde_json::Value> = list.iter().map(device_json).collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    let names: Vec<&str> = registry::registry().iter().map(|f| f.name()).collect();
    if list.is_empty() {
        println!("no candidate devices found");
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
        if let Some(n) = d.full_note() {
            println!("{:<15} {:<16} note: {n}", "", "");
        }
    }
    if list
        .iter()
        .any(|d| matches!(d.access, Access::Denied { .. }))
    {
        println!("udev rules: {UDEV_INSTALL}");
    }
    println!(
        "sources built in: {}",
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    );
    Ok(())
}

/// One device for `devices --json`: the keys of before (`note` with the
/// access hint in it), plus `access` and `fix`.
fn device_json(d: &DeviceInfo) -> serde_json::Value {
    let fix = match &d.access {
        Access::Denied { fix } => Some(*fix),
        _ => None,
    };
    serde_json::json!({
        "kind": d.kind,
        "path": d.path,
        "vendor": d.vendor,
        "product": d.product,
        "note": d.full_note(),
        "access": d.access.word(),
        "fix": fix,
    })
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
        let e = anyhow::Error::new(NotBuiltIn("webcam".into())).context("opening");
        assert_eq!(exit_code(&e), 3);
        let e = anyhow::Error::new(SourceError::NoEntry("no code".into())).context("reading");
        assert_eq!(exit_code(&e), 6);
        let e = anyhow::Error::new(SourceError::Open {
            path: "/dev/video9".into(),
            reason: "missing".into(),
        });
        assert_eq!(exit_code(&e), 3);
    }

    /// Every source of this build: `read-key --from` opens each through the
    /// registry, and the names are the CLI's own.
    #[test]
    fn the_registry_and_the_from_values_agree() {
        let values: Vec<String> = SourceKind::value_variants()
            .iter()
            .map(|k| k.name())
            .collect();
        for f in registry::registry() {
            assert!(
                values.iter().any(|v| v == f.name()),
                "{} has no --from value",
                f.name()
            );
        }
        let full = cfg!(all(
            feature = "keyboard",
            feature = "keypad",
            feature = "hid-scanner",
            feature = "serial-scanner",
            feature = "webcam",
            feature = "ir",
            feature = "file"
        ));
        for v in &values {
            match factory(v) {
                Ok(f) => assert_eq!(f.name(), v),
                Err(e) => assert!(!full, "{e}"),
            }
        }
        if full {
            assert_eq!(registry::registry().len(), values.len());
        }
    }

    /// The hint "rebuild with `--features NAME`" names a feature that exists.
    #[test]
    fn every_from_value_is_a_feature_of_keyfleet() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
        let manifest: toml::Table = text.parse().unwrap();
        let features = manifest["features"].as_table().unwrap();
        for k in SourceKind::value_variants() {
            assert!(features.contains_key(&k.name()), "no feature {}", k.name());
        }
    }

    #[test]
    fn a_source_not_built_in_says_which_feature_builds_it() {
        let e = factory("telepathy").map(|f| f.name()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "source telepathy is not built into this binary; rebuild keyfleet with `--features telepathy`"
        );
        let e = anyhow::Error::new(e).context("opening the telepathy source");
        assert_eq!(exit_code(&e), 3);
    }

    #[test]
    fn devices_json_keeps_the_old_keys_and_adds_access() {
        let d = DeviceInfo {
            kind: "serial-scanner",
            path: "/dev/ttyACM0".into(),
            vendor: Some("0c2e".into()),
            product: None,
            note: None,
            access: Access::Denied {
                fix: "join dialout",
            },
        };
        let v = device_json(&d);
        assert_eq!(v["kind"], "serial-scanner");
        assert_eq!(v["path"], "/dev/ttyACM0");
        assert_eq!(v["vendor"], "0c2e");
        assert!(v["product"].is_null());
        assert_eq!(
            v["note"],
            "no read/write access for this user; join dialout"
        );
        assert_eq!(v["access"], "denied");
        assert_eq!(v["fix"], "join dialout");
    }
}
