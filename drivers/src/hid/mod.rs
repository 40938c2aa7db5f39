//! hid-scanner: USB barcode/QR scanners read through hidraw.
//!
//! Two modes, told apart by the report descriptor (parsed with `hidreport`,
//! see [`layout`]):
//! - HID keyboard mode: the scanner types the scan as boot keyboard reports
//!   (with or without a report ID). A key counts when it appears in a report
//!   where it was absent from the previous one, so "33" needs a release in
//!   between; shift comes from the modifier bits; the layout is US; Enter or
//!   Tab ends the scan.
//! - HID point-of-sale mode (usage page 0x8C): Decoded Data bytes, a Byte
//!   Count, and Decode Data Continued for scans longer than one report.
//!
//! The device reader ([`open`] with `--device` or autodetection) uses
//! `hidapi`'s native Linux backend (no system library). `--replay` reads a
//! recording in hid-recorder's format ([`recording`]) and feeds its
//! descriptor and events to the same [`decode::ScanDecoder`], with the
//! recording's own clock standing in for the wall clock, so timeouts behave
//! as they would have on the device (the shared read loop
//! [`crate::stream::read_entry`] measures them on the stream's clock).
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::source::{Access, DeviceInfo, KeySource, SourceError, SourceOptions};
use crate::stream::{read_entry, Assemble, Next, TimedStream};

/// The `--from` name and cargo feature.
pub const NAME: &str = "hid-scanner";

/// What [`Access::Denied`] says for a hidraw node.
pub const FIX: &str = "install udev/70-keyfleet.rules (TAG+=\"uaccess\" on the hidraw nodes of \
     scanners from known vendors; another vendor needs its own rule, README \"udev rules\"), then replug";

pub mod decode;
pub mod layout;
pub mod recording;

use decode::{ScanDecoder, Step};

/// Vendors whose keyboard-mode interfaces are taken for scanners when autodetecting
/// (usb.ids): Metrologic/Honeywell, Hand Held Products, Symbol/Zebra,
/// PSC/Datalogic, Newland, Opticon. Others are found by a product name with
/// "scan", "barcode" and the like, or named with `--device`.
const SCANNER_VENDORS: [u16; 6] = [0x0c2e, 0x0536, 0x05e0, 0x05f9, 0x1eab, 0x065a];

/// Largest report descriptor the kernel accepts (HID_MAX_DESCRIPTOR_SIZE).
const MAX_DESCRIPTOR: usize = 4096;

/// One input report from device `device` (a recording may hold several devices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub device: u32,
    pub bytes: Vec<u8>,
}

/// A scanner: a report stream (a [`ReplayStream`] or a hidraw device) and
/// one decoder per device in it.
pub struct HidScanner<S> {
    stream: S,
    decoders: Decoders,
}

/// The decoders of a scanner's devices, by device number.
struct Decoders(BTreeMap<u32, ScanDecoder>);

impl Decoders {
    fn pending_len(&self) -> usize {
        self.0.values().map(ScanDecoder::pending_len).sum()
    }
}

impl Assemble<Report> for Decoders {
    fn feed(&mut self, report: Report, _now: Duration) -> Option<Result<String, SourceError>> {
        // A device the recording holds but no decoder took: skipped.
        let decoder = self.0.get_mut(&report.device)?;
        match decoder.feed(&report.bytes) {
            Step::Scan(text) => {
                tracing::debug!(chars = text.chars().count(), "hid scan complete");
                Some(Ok(text))
            }
            Step::Overflow => Some(Err(SourceError::Malformed {
                what: format!(
                    "more than {} characters without Enter, Tab or a last report; is this a keyboard rather than a scanner, or is the scanner's suffix switched off?",
                    decode::MAX_SCAN
                ),
            })),
            Step::Pending => None,
        }
    }

    fn end(&mut self, why: String) -> Option<Result<String, SourceError>> {
        let pending = self.pending_len();
        let what = if pending > 0 {
            format!("{why}, in a scan of {pending} characters with no end (Enter, Tab or a last report)")
        } else {
            format!("{why}, with no scan")
        };
        Some(Err(SourceError::Ended(what)))
    }
}

impl<S: TimedStream<Item = Report>> KeySource for HidScanner<S> {
    fn name(&self) -> &'static str {
        NAME
    }

    fn read_raw(&mut self, timeout: Option<Duration>) -> Result<String, SourceError> {
        read_entry(&mut self.stream, &mut self.decoders, timeout)
    }
}

/// Replays the events of a recording on its own clock.
pub struct ReplayStream {
    events: std::vec::IntoIter<recording::RecordedEvent>,
    peeked: Option<recording::RecordedEvent>,
    now: Duration,
}

impl TimedStream for ReplayStream {
    type Item = Report;

    fn next(&mut self, wait: Option<Duration>) -> Result<Next<Report>, SourceError> {
        let next = match self.peeked.take().or_else(|| self.events.next()) {
            Some(e) => e,
            None => return Ok(Next::End("the recording ended".into())),
        };
        let due = next.time.max(self.now);
        // A wait too long to add to the clock is as good as forever.
        match wait.and_then(|w| self.now.checked_add(w)) {
            Some(limit) if due > limit => {
                self.now = limit;
                self.peeked = Some(next);
                Ok(Next::Quiet)
            }
            _ => {
                self.now = due;
                Ok(Next::Item(Report {
                    device: next.device,
                    bytes: next.bytes,
                }))
            }
        }
    }

    fn now(&self) -> Duration {
        self.now
    }
}

/// Build a scanner from a parsed recording. `origin` names the file in errors.
pub fn from_recording(
    rec: recording::Recording,
    origin: &str,
) -> Result<HidScanner<ReplayStream>, SourceError> {
    let mut decoders = BTreeMap::new();
    let mut refusals = Vec::new();
    for d in &rec.devices {
        match ScanDecoder::new(&d.descriptor) {
            Ok(dec) => {
                decoders.insert(d.index, dec);
            }
            Err(e) => refusals.push(format!(
                "device {} ({}): {e}",
                d.index,
                d.name.as_deref().unwrap_or("unnamed")
            )),
        }
    }
    if decoders.is_empty() {
        return Err(SourceError::Malformed {
            what: format!("{origin}: {}", refusals.join("; ")),
        });
    }
    Ok(HidScanner {
        stream: ReplayStream {
            events: rec.events.into_iter(),
            peeked: None,
            now: Duration::ZERO,
        },
        decoders: Decoders(decoders),
    })
}

fn open_replay(path: &Path) -> Result<Box<dyn KeySource>, SourceError> {
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| SourceError::Open {
        path: origin.clone(),
        reason: e.to_string(),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| SourceError::Malformed {
        what: format!(
            "{origin}: not a hid-recorder text file (invalid UTF-8 at byte {})",
            e.utf8_error().valid_up_to()
        ),
    })?;
    let rec = recording::parse(&text).map_err(|e| SourceError::Malformed {
        what: format!("{origin}: {e}"),
    })?;
    Ok(Box::new(from_recording(rec, &origin)?))
}

/// A hidraw device read through hidapi.
struct DeviceStream {
    device: hidapi::HidDevice,
    path: String,
    started: Instant,
    buf: Vec<u8>,
}

impl TimedStream for DeviceStream {
    type Item = Report;

    fn next(&mut self, wait: Option<Duration>) -> Result<Next<Report>, SourceError> {
        let ms = match wait {
            // Round up so a sub-millisecond rest still waits instead of spinning.
            Some(w) => i32::try_from(w.as_micros().div_ceil(1000)).unwrap_or(i32::MAX),
            None => -1,
        };
        match self.device.read_timeout(&mut self.buf, ms) {
            Ok(0) => Ok(Next::Quiet),
            Ok(n) => Ok(Next::Item(Report {
                device: 0,
                bytes: self.buf.get(..n).unwrap_or(&[]).to_vec(),
            })),
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

fn open_error(path: &str, e: impl std::fmt::Display) -> SourceError {
    SourceError::Open {
        path: path.to_string(),
        reason: e.to_string(),
    }
}

fn open_device(path: &str) -> Result<Box<dyn KeySource>, SourceError> {
    let c_path = std::ffi::CString::new(path).map_err(|e| open_error(path, e))?;
    let api = hidapi::HidApi::new().map_err(|e| open_error(path, e))?;
    let device = api.open_path(&c_path).map_err(|e| open_error(path, e))?;
    let mut desc = vec![0u8; MAX_DESCRIPTOR];
    let n = device
        .get_report_descriptor(&mut desc)
        .map_err(|e| open_error(path, format!("cannot read its report descriptor: {e}")))?;
    desc.truncate(n);
    let mut decoder = ScanDecoder::new(&desc).map_err(|e| open_error(path, e))?;
    seed_held_keys(&device, &mut decoder);
    tracing::info!(path, pos = decoder.layout().has_pos(), "hid scanner opened");
    let mut decoders = BTreeMap::new();
    decoders.insert(0, decoder);
    Ok(Box::new(HidScanner {
        stream: DeviceStream {
            device,
            path: path.to_string(),
            started: Instant::now(),
            buf: vec![0u8; MAX_DESCRIPTOR],
        },
        decoders: Decoders(decoders),
    }))
}

/// Asks the device which keys are down now (Get Report, Input), so that a key
/// held when reading starts (the Enter that started the command, a trigger
/// held down) is not taken for a press. Many scanners do not answer; then
/// the first report counts as presses, as the kernel counts it.
fn seed_held_keys(device: &hidapi::HidDevice, decoder: &mut ScanDecoder) {
    let ids: Vec<Option<u8>> = decoder
        .layout()
        .reports
        .iter()
        .filter(|r| matches!(r.kind, layout::ReportKind::Keyboard(_)))
        .map(|r| r.report_id)
        .collect();
    for id in ids {
        let mut buf = vec![0u8; MAX_DESCRIPTOR];
        buf[0] = id.unwrap_or(0);
        match device.get_input_report(&mut buf) {
            // Unnumbered reports come back behind a 0 byte.
            Ok(n) if n > 0 => {
                let report = buf.get(usize::from(id.is_none())..n).unwrap_or(&[]);
                decoder.set_held(report);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "no Get Report answer; keys held at open count as presses")
            }
        }
    }
}

/// One hidraw interface as the autodetection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Candidate {
    path: String,
    vendor_id: u16,
    product_id: u16,
    manufacturer: String,
    product: String,
    /// Usage page 0x8C (point-of-sale mode).
    pos: bool,
    /// Generic Desktop / Keyboard.
    keyboard: bool,
}

impl Candidate {
    fn looks_like_scanner(&self) -> bool {
        let words = format!("{} {}", self.manufacturer, self.product).to_lowercase();
        self.pos
            || (self.keyboard
                && (SCANNER_VENDORS.contains(&self.vendor_id)
                    || ["scan", "barcode", "bar code", "imager", "qr"]
                        .iter()
                        .any(|w| words.contains(w))))
    }
}

fn candidates() -> Vec<Candidate> {
    let api = match hidapi::HidApi::new() {
        Ok(api) => api,
        Err(e) => {
            tracing::warn!(error = %e, "cannot enumerate HID devices");
            return Vec::new();
        }
    };
    let mut out: Vec<Candidate> = Vec::new();
    for d in api.device_list() {
        let path = d.path().to_string_lossy().into_owned();
        let pos = d.usage_page() == layout::PAGE_BARCODE;
        let keyboard = d.usage_page() == 0x01 && d.usage() == 0x06;
        if let Some(c) = out.iter_mut().find(|c| c.path == path) {
            c.pos |= pos;
            c.keyboard |= keyboard;
            continue;
        }
        out.push(Candidate {
            path,
            vendor_id: d.vendor_id(),
            product_id: d.product_id(),
            manufacturer: d.manufacturer_string().unwrap_or("").trim().to_string(),
            product: d.product_string().unwrap_or("").trim().to_string(),
            pos,
            keyboard,
        });
    }
    out.retain(|c| c.pos || c.keyboard);
    out
}

/// Pick the one scanner among the candidates, POS-mode interfaces first.
fn choose(cands: &[Candidate]) -> Result<String, SourceError> {
    let pos: Vec<&Candidate> = cands.iter().filter(|c| c.pos).collect();
    let kbd: Vec<&Candidate> = cands
        .iter()
        .filter(|c| !c.pos && c.looks_like_scanner())
        .collect();
    let pick = if pos.len() == 1 {
        pos
    } else if pos.is_empty() {
        kbd
    } else {
        pos
    };
    match pick.as_slice() {
        [one] => Ok(one.path.clone()),
        [] => Err(SourceError::Open {
            path: "(autodetect)".into(),
            reason: "no HID barcode scanner found (looked for usage page 0x8C and keyboards from scanner vendors); pass --device /dev/hidrawN".into(),
        }),
        many => Err(SourceError::Open {
            path: "(autodetect)".into(),
            reason: format!(
                "{} scanners found ({}); pick one with --device",
                many.len(),
                many.iter()
                    .map(|c| c.path.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// Open the scanner: the recording when `opts.replay` is set, else
/// `opts.device`, else the one scanner autodetection finds.
pub fn open(opts: &SourceOptions) -> Result<Box<dyn KeySource>, SourceError> {
    if let Some(replay) = &opts.replay {
        return open_replay(replay);
    }
    let path = match &opts.device {
        Some(p) => p.display().to_string(),
        None => choose(&candidates())?,
    };
    open_device(&path)
}

/// HID interfaces that may be scanners: every POS-mode interface and every
/// keyboard interface (a keyboard-mode scanner is a keyboard to the system).
pub fn list() -> Vec<DeviceInfo> {
    candidates()
        .into_iter()
        .map(|c| {
            let mode = if c.pos {
                "point-of-sale mode"
            } else if c.looks_like_scanner() {
                "keyboard mode"
            } else {
                "a keyboard; a scanner only if it is one in keyboard mode"
            };
            let name = |s: String, id: u16| {
                if s.is_empty() {
                    format!("{id:04x}")
                } else {
                    format!("{s} ({id:04x})")
                }
            };
            DeviceInfo {
                kind: NAME,
                access: Access::check(Path::new(&c.path), FIX),
                path: c.path,
                vendor: Some(name(c.manufacturer, c.vendor_id)),
                product: Some(name(c.product, c.product_id)),
                note: Some(mode.to_string()),
            }
        })
        .collect()
}

/// The HID scanner in the [registry](crate::registry).
pub static FACTORY: crate::registry::Factory = crate::registry::Factory {
    name: NAME,
    list,
    open,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(path: &str, vendor_id: u16, product: &str, pos: bool, keyboard: bool) -> Candidate {
        Candidate {
            path: path.into(),
            vendor_id,
            product_id: 1,
            manufacturer: String::new(),
            product: product.into(),
            pos,
            keyboard,
        }
    }

    #[test]
    fn autodetect_prefers_the_pos_interface() {
        let c = [
            cand("/dev/hidraw0", 0x046d, "USB Keyboard", false, true),
            cand("/dev/hidraw1", 0x0c2e, "Voyager 1450g", false, true),
            cand("/dev/hidraw2", 0x0c2e, "Voyager 1450g", true, false),
        ];
        assert_eq!(choose(&c).unwrap(), "/dev/hidraw2");
    }

    #[test]
    fn autodetect_takes_a_keyboard_scanner_but_not_a_keyboard() {
        let c = [
            cand("/dev/hidraw0", 0x046d, "USB Keyboard", false, true),
            cand("/dev/hidraw3", 0x1234, "2D Barcode Scanner", false, true),
        ];
        assert_eq!(choose(&c).unwrap(), "/dev/hidraw3");
        let e = choose(&c[..1]).unwrap_err().to_string();
        assert!(e.contains("no HID barcode scanner found"), "{e}");
    }

    #[test]
    fn autodetect_refuses_to_guess_between_two() {
        let c = [
            cand("/dev/hidraw1", 0x0c2e, "a", true, false),
            cand("/dev/hidraw2", 0x05e0, "b", true, false),
        ];
        let e = choose(&c).unwrap_err().to_string();
        assert!(
            e.contains("/dev/hidraw1, /dev/hidraw2") && e.contains("--device"),
            "{e}"
        );
    }

    #[test]
    fn a_huge_timeout_is_no_overflow() {
        let rec = recording::parse(&boot_recording(&[
            (0, "00 00 04 00 00 00 00 00"),
            (1, "00 00 28 00 00 00 00 00"),
        ]))
        .unwrap();
        let mut s = from_recording(rec, "t").unwrap();
        assert_eq!(s.read_raw(Some(Duration::MAX)).unwrap(), "a");
    }

    fn boot_recording(events: &[(u64, &str)]) -> String {
        let desc = layout::tests_support::BOOT_KBD;
        let mut text = format!(
            "R: {} {}\n",
            desc.len(),
            desc.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        for (sec, bytes) in events {
            text.push_str(&format!("E: {sec:06}.000000 8 {bytes}\n"));
        }
        text
    }

    #[test]
    fn replay_timeout_follows_the_recorded_clock() {
        let text = format!(
            "R: {} {}\nE: 000000.000000 8 00 00 04 00 00 00 00 00\nE: 000000.010000 8 00 00 00 00 00 00 00 00\nE: 000030.000000 8 00 00 28 00 00 00 00 00\n",
            layout::tests_support::BOOT_KBD.len(),
            layout::tests_support::BOOT_KBD
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let rec = recording::parse(&text).unwrap();
        let mut s = from_recording(rec.clone(), "t").unwrap();
        let e = s.read_raw(Some(Duration::from_secs(10))).unwrap_err();
        assert!(
            matches!(e, SourceError::Timeout(t) if t == Duration::from_secs(10)),
            "{e}"
        );
        let mut s = from_recording(rec, "t").unwrap();
        assert_eq!(s.read_raw(Some(Duration::from_secs(60))).unwrap(), "a");
    }
}
