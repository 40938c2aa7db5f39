//! The hid-recorder text format that hid-tools writes (`hid-recorder`,
//! `hid-decode`) and `hid-replay` reads:
//!
//! ```text
//! # comment lines (hid-recorder prints the decoded descriptor and each report here)
//! D: 0                            device index, only in recordings of several devices
//! R: 63 05 01 09 06 a1 01 ...     report descriptor: its length, then its bytes in hex
//! N: Acme Barcode Scanner         device name
//! P: usb-0000:00:14.0-2/input0    physical path (optional)
//! I: 3 0c2e 0b61                  bus, vendor, product, in hex
//! E: 000000.012345 8 00 00 20 ... event: seconds.microseconds, length, report bytes in hex
//! ```
//!
//! Parsing is pure: text in, [`Recording`] out, and every fault names its line.
use std::time::Duration;

/// One recorded device: its descriptor and identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordedDevice {
    /// The `D:` index (0 when the recording has a single device).
    pub index: u32,
    pub descriptor: Vec<u8>,
    pub name: Option<String>,
    pub phys: Option<String>,
    /// `I:` bus, vendor, product.
    pub ids: Option<(u32, u16, u16)>,
}

/// One recorded input report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    /// The `D:` index of the device that sent it.
    pub device: u32,
    /// Time since the recording started.
    pub time: Duration,
    /// The report as hidraw delivered it (report ID first when the device numbers its reports).
    pub bytes: Vec<u8>,
    /// The line it came from (1-based), for error messages.
    pub line: usize,
}

/// A parsed hid-recorder file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recording {
    pub devices: Vec<RecordedDevice>,
    pub events: Vec<RecordedEvent>,
}

/// What is wrong with a recording, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("recording line {line}: {what}")]
pub struct RecordingError {
    pub line: usize,
    pub what: String,
}

fn err(line: usize, what: impl Into<String>) -> RecordingError {
    RecordingError {
        line,
        what: what.into(),
    }
}

/// Parse `count hex hex ...` (the rest of an `R:` line or of an `E:` line after its time).
fn counted_bytes(line: usize, kind: &str, rest: &str) -> Result<Vec<u8>, RecordingError> {
    let mut words = rest.split_whitespace();
    let count_word = words
        .next()
        .ok_or_else(|| err(line, format!("{kind} line has no length")))?;
    let count: usize = count_word.parse().map_err(|_| {
        err(
            line,
            format!("{kind} length {count_word:?} is not a decimal number"),
        )
    })?;
    let mut bytes = Vec::with_capacity(count.min(4096));
    for (i, word) in words.enumerate() {
        if word.starts_with('#') {
            break;
        }
        let ok = word.len() <= 2 && !word.is_empty();
        let b = if ok {
            u8::from_str_radix(word, 16).ok()
        } else {
            None
        };
        match b {
            Some(b) => bytes.push(b),
            None => {
                return Err(err(
                    line,
                    format!("{kind} byte {} is {word:?}, not a hex byte", i + 1),
                ))
            }
        }
    }
    if bytes.len() != count {
        return Err(err(
            line,
            format!("{kind} length {count} but {} bytes", bytes.len()),
        ));
    }
    Ok(bytes)
}

/// `sec.usec`, as hid-recorder prints it (`000001.255952`).
fn timestamp(line: usize, word: &str) -> Result<Duration, RecordingError> {
    let bad = || {
        err(
            line,
            format!("event time {word:?} is not <seconds>.<microseconds>"),
        )
    };
    let (sec, usec) = word.split_once('.').ok_or_else(bad)?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(sec) || !all_digits(usec) || usec.len() > 6 {
        return Err(bad());
    }
    let sec: u64 = sec.parse().map_err(|_| bad())?;
    // hid-recorder always prints six digits; scale a shorter fraction as a decimal.
    let scale = 10u32.pow(6 - usec.len() as u32);
    let usec: u32 = usec.parse::<u32>().map_err(|_| bad())? * scale;
    Ok(Duration::from_secs(sec) + Duration::from_micros(u64::from(usec)))
}

/// Drop ANSI colour sequences (`ESC [ ... m`): the Rust hid-recorder colours
/// its lines when its stdout is a terminal, also in the file `--output-file` writes.
fn strip_ansi(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.contains('\u{1b}') {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameter and intermediate bytes, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Parse a hid-recorder file (from hid-tools' Python `hid-recorder` or the
/// Rust one from hidutils: `B:` lines of HID-BPF events and other unknown
/// tags are skipped).
pub fn parse(text: &str) -> Result<Recording, RecordingError> {
    let mut rec = Recording::default();
    let mut current: u32 = 0;
    let mut last_line = 0;
    for (idx, raw) in text.lines().enumerate() {
        let line = idx + 1;
        last_line = line;
        let clean = strip_ansi(raw);
        let l = clean.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let (tag, rest) = match l.split_once(':') {
            Some((tag, rest)) if tag.len() == 1 => (tag, rest.trim()),
            _ => {
                return Err(err(
                    line,
                    "expected a `X: ...` line (R, N, P, I, D, E) or a # comment",
                ))
            }
        };
        let dev_index = |rec: &mut Recording| -> usize {
            match rec.devices.iter().position(|d| d.index == current) {
                Some(i) => i,
                None => {
                    rec.devices.push(RecordedDevice {
                        index: current,
                        ..RecordedDevice::default()
                    });
                    rec.devices.len() - 1
                }
            }
        };
        match tag {
            "D" => {
                current = rest
                    .parse()
                    .map_err(|_| err(line, format!("device index {rest:?} is not a number")))?;
            }
            "R" => {
                let bytes = counted_bytes(line, "descriptor", rest)?;
                if bytes.is_empty() {
                    return Err(err(line, "report descriptor is empty"));
                }
                let i = dev_index(&mut rec);
                if let Some(d) = rec.devices.get_mut(i) {
                    d.descriptor = bytes;
                }
            }
            "N" => {
                let i = dev_index(&mut rec);
                if let Some(d) = rec.devices.get_mut(i) {
                    d.name = Some(rest.to_string());
                }
            }
            "P" => {
                let i = dev_index(&mut rec);
                if let Some(d) = rec.devices.get_mut(i) {
                    d.phys = Some(rest.to_string());
                }
            }
            "I" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let ids = match words.as_slice() {
                    [bus, vid, pid] => (
                        u32::from_str_radix(bus, 16).ok(),
                        u16::from_str_radix(vid, 16).ok(),
                        u16::from_str_radix(pid, 16).ok(),
                    ),
                    _ => (None, None, None),
                };
                let ids = match ids {
                    (Some(b), Some(v), Some(p)) => (b, v, p),
                    _ => {
                        return Err(err(
                            line,
                            format!("I: wants `<bus> <vendor> <product>` in hex, got {rest:?}"),
                        ))
                    }
                };
                let i = dev_index(&mut rec);
                if let Some(d) = rec.devices.get_mut(i) {
                    d.ids = Some(ids);
                }
            }
            "E" => {
                let (time_word, tail) = rest
                    .split_once(char::is_whitespace)
                    .ok_or_else(|| err(line, "event has no length and bytes"))?;
                let time = timestamp(line, time_word)?;
                let bytes = counted_bytes(line, "event", tail)?;
                let known = rec
                    .devices
                    .iter()
                    .any(|d| d.index == current && !d.descriptor.is_empty());
                if !known {
                    return Err(err(
                        line,
                        format!("event for device {current} before its R: descriptor line"),
                    ));
                }
                rec.events.push(RecordedEvent {
                    device: current,
                    time,
                    bytes,
                    line,
                });
            }
            other => {
                // A newer recorder may add lines; say so but do not refuse the file.
                tracing::debug!(line, tag = other, "ignoring unknown hid-recorder line");
            }
        }
    }
    if rec.devices.iter().all(|d| d.descriptor.is_empty()) {
        return Err(err(
            last_line.max(1),
            "no R: report descriptor line; record with hid-recorder from hid-tools",
        ));
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KBD: &str = "# Acme scanner\n\
R: 4 05 01 09 06\n\
N: Acme Scanner\n\
P: usb-0000:00:14.0-2/input0\n\
I: 3 0c2e 0b61\n\
E: 000000.000000 8 00 00 20 00 00 00 00 00\n\
E: 000001.250000 8 00 00 00 00 00 00 00 00\n";

    #[test]
    fn reads_every_line_kind() {
        let r = parse(KBD).unwrap();
        assert_eq!(r.devices.len(), 1);
        let d = &r.devices[0];
        assert_eq!(d.descriptor, vec![0x05, 0x01, 0x09, 0x06]);
        assert_eq!(d.name.as_deref(), Some("Acme Scanner"));
        assert_eq!(d.phys.as_deref(), Some("usb-0000:00:14.0-2/input0"));
        assert_eq!(d.ids, Some((3, 0x0c2e, 0x0b61)));
        assert_eq!(r.events.len(), 2);
        assert_eq!(r.events[0].bytes, vec![0, 0, 0x20, 0, 0, 0, 0, 0]);
        assert_eq!(r.events[1].time, Duration::from_micros(1_250_000));
        assert_eq!(r.events[1].line, 7);
    }

    #[test]
    fn short_event_names_line_and_counts() {
        let text = KBD.replace(
            "E: 000001.250000 8 00 00 00 00 00 00 00 00",
            "E: 000001.250000 8 00 00 00 00 00 00",
        );
        let e = parse(&text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "recording line 7: event length 8 but 6 bytes"
        );
    }

    #[test]
    fn descriptor_length_is_checked() {
        let e = parse("R: 5 05 01 09 06\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "recording line 1: descriptor length 5 but 4 bytes"
        );
    }

    #[test]
    fn bad_hex_and_bad_time_are_named() {
        let e = parse("R: 2 05 zz\n").unwrap_err();
        assert!(e.to_string().contains("byte 2 is \"zz\""), "{e}");
        let e = parse("R: 2 05 01\nE: 12 1 00\n").unwrap_err();
        assert!(
            e.to_string().starts_with("recording line 2: event time"),
            "{e}"
        );
    }

    #[test]
    fn event_before_descriptor_is_refused() {
        let e = parse("E: 000000.000000 1 00\nR: 1 05\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.what.contains("before its R:"), "{e}");
    }

    #[test]
    fn missing_descriptor_is_refused() {
        let e = parse("# nothing here\nN: x\n").unwrap_err();
        assert!(e.what.contains("no R:"), "{e}");
    }

    #[test]
    fn several_devices_keep_their_events_apart() {
        let text = "D: 0\nR: 1 05\nN: a\nD: 1\nR: 1 06\nN: b\nD: 0\nE: 000000.000001 1 aa\nD: 1\nE: 000000.000002 1 bb\n";
        let r = parse(text).unwrap();
        assert_eq!(r.devices.len(), 2);
        assert_eq!(r.events[0].device, 0);
        assert_eq!(r.events[1].device, 1);
        assert_eq!(r.devices[1].name.as_deref(), Some("b"));
    }

    #[test]
    fn rust_hid_recorder_output_is_read() {
        // Coloured lines, unpadded I:, a trailing space after the bytes, a B: line.
        let text =
            "# Current time: 12:00:00\n\u{1b}[31mR: 2 05 01\u{1b}[39m\n\u{1b}[31mN: x\u{1b}[39m\n\
I: 3 46d c52b\nB: 000000.000000 2 01 02 \n\u{1b}[31mE: 000000.000100 2 01 02 \u{1b}[39m\n";
        let r = parse(text).unwrap();
        assert_eq!(r.devices[0].descriptor, vec![0x05, 0x01]);
        assert_eq!(r.devices[0].ids, Some((3, 0x046d, 0xc52b)));
        assert_eq!(r.events.len(), 1);
        assert_eq!(r.events[0].bytes, vec![1, 2]);
        assert_eq!(r.events[0].time, Duration::from_micros(100));
    }

    #[test]
    fn garbage_line_is_refused_with_its_number() {
        let e = parse("R: 1 05\nhello world\n").unwrap_err();
        assert_eq!(e.line, 2);
    }
}
