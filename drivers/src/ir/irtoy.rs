//! The USB IR Toy's sample mode (also the IR Droid), as the LIRC `irtoy`
//! plugin and the kernel's `drivers/media/rc/ir_toy.c` speak it.
//!
//! Set-up on the serial port: a reset (`0xFF 0xFF` and five `0x00`: leaves a
//! transmit or SUMP mode, then returns to the IRman default), `v` answered by
//! `Vhss` (hardware version `h`, firmware `ss`; firmware 20 or later is
//! needed), then `s` answered by `S01` (sample mode, protocol version 01).
//! From then on the Toy sends 16-bit big-endian counts of 21.3333 µs
//! (64/3 µs, what LIRC uses; the kernel rounds to 21), alternately pulse and
//! space, starting with a pulse; `0xFFFF` ends a signal (after the Toy's own
//! timeout) and the next count is a pulse again.
//!
//! A recording of the stream (`--replay`) may start with the `Vhss` and `S01` replies.
use super::timing::Timing;

/// The reset sequence the kernel driver sends.
pub const CMD_RESET: &[u8] = &[0xff, 0xff, 0, 0, 0, 0, 0];
/// Ask for the version.
pub const CMD_VERSION: u8 = b'v';
/// Enter sample mode.
pub const CMD_SAMPLE_MODE: u8 = b's';
/// Oldest firmware with a working sample mode.
pub const MIN_FIRMWARE: u32 = 20;
/// The end-of-signal marker.
pub const END_MARKER: u16 = 0xffff;
/// The space reported for an end of signal, in µs (LIRC's `IRTOY_LONGSPACE`).
pub const LONG_SPACE_US: u32 = 1_000_000;

/// A sample count in microseconds: `count * 64 / 3`, rounded.
pub fn count_to_us(count: u16) -> u32 {
    (u32::from(count) * 64 + 1) / 3
}

/// The nearest sample count for a duration (at least 1, at most 0xFFFE).
pub fn us_to_count(us: u32) -> u16 {
    let c = (u64::from(us) * 3 + 32) / 64;
    c.clamp(1, 0xfffe) as u16
}

/// A `Vhss` version reply: `(hardware, firmware)`.
pub fn parse_version(reply: &[u8]) -> Option<(u32, u32)> {
    match reply {
        [b'V', digits @ ..] if digits.len() == 3 && digits.iter().all(u8::is_ascii_digit) => {
            let v = digits
                .iter()
                .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
            Some((v / 100, v % 100))
        }
        _ => None,
    }
}

/// An `Snn` sample-mode reply: the protocol version.
pub fn parse_sample_mode_reply(reply: &[u8]) -> Option<u32> {
    match reply {
        [b'S', a, b] if a.is_ascii_digit() && b.is_ascii_digit() => {
            Some(u32::from(a - b'0') * 10 + u32::from(b - b'0'))
        }
        _ => None,
    }
}

/// Turns the sample stream into timings, across reads.
#[derive(Debug)]
pub struct IrToyParser {
    half: Option<u8>,
    pulse: bool,
    /// Bytes still to check for a leading `S01` reply (recordings only).
    header: Vec<u8>,
    expect_header: bool,
}

impl IrToyParser {
    /// A parser for a live stream, after the `S01` reply was read.
    pub fn new() -> Self {
        IrToyParser {
            half: None,
            pulse: true,
            header: Vec::new(),
            expect_header: false,
        }
    }

    /// A parser for a recording, which may begin with the `Vhss` and `S01` replies.
    pub fn for_recording() -> Self {
        IrToyParser {
            expect_header: true,
            ..IrToyParser::new()
        }
    }

    /// Add bytes; returns the timings they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Timing> {
        if !self.expect_header {
            return self.samples(bytes);
        }
        // A recording may start with the replies to `v` (`Vhss`) and `s` (`Snn`).
        self.header.extend_from_slice(bytes);
        loop {
            let reply_len = match self.header.first() {
                None => return Vec::new(),
                Some(b'V') => 4,
                Some(b'S') => 3,
                Some(_) => break,
            };
            let Some(reply) = self.header.get(..reply_len) else {
                return Vec::new();
            };
            let known = if reply_len == 4 {
                parse_version(reply).is_some()
            } else {
                parse_sample_mode_reply(reply).is_some()
            };
            if !known {
                break;
            }
            self.header.drain(..reply_len);
            if reply_len == 3 {
                break;
            }
        }
        self.expect_header = false;
        let rest = std::mem::take(&mut self.header);
        self.samples(&rest)
    }

    fn samples(&mut self, bytes: &[u8]) -> Vec<Timing> {
        let mut out = Vec::new();
        for &b in bytes {
            let Some(hi) = self.half.take() else {
                self.half = Some(b);
                continue;
            };
            let v = u16::from_be_bytes([hi, b]);
            if v == END_MARKER {
                out.push(Timing::Timeout(LONG_SPACE_US));
                self.pulse = true;
                continue;
            }
            let d = count_to_us(v);
            out.push(if self.pulse {
                Timing::Pulse(d)
            } else {
                Timing::Space(d)
            });
            self.pulse = !self.pulse;
        }
        out
    }

    /// At the end of a recording: an error when a sample was cut in half.
    pub fn finish(&mut self) -> Result<(), String> {
        if self.expect_header && !self.header.is_empty() {
            return Err(format!(
                "IR Toy recording of {} bytes is too short for a sample",
                self.header.len()
            ));
        }
        match self.half {
            Some(b) => Err(format!(
                "IR Toy stream ends in the middle of a sample (odd byte 0x{b:02x})"
            )),
            None => Ok(()),
        }
    }
}

impl Default for IrToyParser {
    fn default() -> Self {
        IrToyParser::new()
    }
}

/// Encode timings as the Toy sends them (pulse first; a timeout becomes
/// `0xFFFF`). Used to write fixtures and in tests.
pub fn encode(timings: &[Timing]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut expect_pulse = true;
    for t in timings {
        match *t {
            Timing::Pulse(d) | Timing::Space(d) => {
                let pulse = matches!(t, Timing::Pulse(_));
                if pulse != expect_pulse {
                    // The Toy cannot send two of a kind in a row; pad with the shortest other.
                    out.extend_from_slice(&1u16.to_be_bytes());
                }
                out.extend_from_slice(&us_to_count(d).to_be_bytes());
                expect_pulse = !pulse;
            }
            Timing::Timeout(_) | Timing::Reset => {
                out.extend_from_slice(&END_MARKER.to_be_bytes());
                expect_pulse = true;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        assert_eq!(parse_version(b"V222"), Some((2, 22)));
        assert_eq!(parse_version(b"V2x2"), None);
        assert_eq!(parse_sample_mode_reply(b"S01"), Some(1));
        assert_eq!(parse_sample_mode_reply(b"s01"), None);
    }

    #[test]
    fn counts_are_21_333_us() {
        assert_eq!(count_to_us(3), 64);
        assert_eq!(count_to_us(422), 9003);
        assert_eq!(us_to_count(9000), 422);
        assert_eq!(us_to_count(0), 1);
        assert_eq!(us_to_count(u32::MAX), 0xfffe);
    }

    #[test]
    fn samples_alternate_and_ffff_ends_a_signal() {
        let mut p = IrToyParser::for_recording();
        let mut got = p.push(b"S0");
        got.extend(p.push(&[b'1', 0x01, 0xa6, 0x00]));
        got.extend(p.push(&[0xd3, 0x00, 0x1a, 0xff, 0xff, 0x01, 0xa6]));
        assert_eq!(
            got,
            vec![
                Timing::Pulse(9003),
                Timing::Space(4501),
                Timing::Pulse(555),
                Timing::Timeout(LONG_SPACE_US),
                Timing::Pulse(9003)
            ]
        );
        assert!(p.finish().is_ok());
        p.push(&[0x01]);
        assert!(p.finish().is_err());
    }

    #[test]
    fn recording_with_both_replies() {
        let mut p = IrToyParser::for_recording();
        let mut got = p.push(b"V2");
        got.extend(p.push(b"22S01"));
        got.extend(p.push(&[0x01, 0xa6, 0xff, 0xff]));
        assert_eq!(
            got,
            vec![Timing::Pulse(9003), Timing::Timeout(LONG_SPACE_US)]
        );
        assert!(p.finish().is_ok());
        let mut short = IrToyParser::for_recording();
        assert!(short.push(b"V2").is_empty());
        assert!(short.finish().is_err());
    }

    #[test]
    fn recording_without_reply_starts_with_samples() {
        let mut p = IrToyParser::for_recording();
        assert_eq!(
            p.push(&[0x01, 0xa6, 0x00, 0xd3]),
            vec![Timing::Pulse(9003), Timing::Space(4501)]
        );
    }

    #[test]
    fn encode_round_trip() {
        let t = [Timing::Pulse(9003), Timing::Space(4501), Timing::Pulse(555)];
        let mut p = IrToyParser::new();
        let mut bytes = encode(&t);
        bytes.extend(encode(&[Timing::Timeout(0)]));
        let got = p.push(&bytes);
        assert_eq!(&got[..3], &t);
        assert_eq!(got[3], Timing::Timeout(LONG_SPACE_US));
    }
}
