//! The text LIRC's `mode2` prints, and the close relatives people record with.
//!
//! Accepted, line by line (durations in microseconds, `#` or `//` starts a comment):
//! - `pulse N`, `space N` — `mode2` and `ir-ctl -r --mode2`;
//! - `timeout N` — a space after which the receiver declared the signal over
//!   (kernel timeout reports, printed by newer `mode2` and `ir-ctl --mode2`);
//! - `carrier N`, `frequency N`, `duty_cycle N` — carrier reports, ignored;
//! - `overflow` — the receiver lost samples: decoders start again;
//! - `mode2 -m` column output: lines of numbers alternating pulse and space,
//!   a number suffixed `-pulse` or `-space` where the order broke;
//! - `ir-ctl -r` raw output and the `ir-ctl --send` file format: `+N` pulse,
//!   `-N` space, unsigned numbers alternate; a `-N` ending a line is the
//!   receiver timeout `ir-ctl -r` ends each signal with;
//! - the banner lines `mode2` writes (`Using driver ... on device ...`,
//!   `Using raw access on device ...`, `Trying device: ...`, `Using device: ...`)
//!   and blank lines.
//!
//! `mode2 -d DEVICE` only picks the device and prints the same lines. The
//! `mode2 -s` "scope" drawing has no numbers and is refused, as is anything
//! else: the error names the line number and quotes the line.
//!
//! Unsigned numbers continue the alternation from the previous event; the
//! very first one is a pulse unless it is longer than [`MAX_PULSE_US`] (the
//! leading gap that `mode2 -m` prints first is a space).
use super::timing::Timing;

/// No IR protocol has a pulse this long; a leading unsigned number above it is the gap.
pub const MAX_PULSE_US: u32 = 20_000;

/// Longest line accepted, in bytes (a device that never sends a newline is malformed).
pub const MAX_LINE: usize = 4096;

/// A line that is not mode2 text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mode2 line {line}: {reason}: {text:?}")]
pub struct Mode2Error {
    /// 1-based line number.
    pub line: usize,
    pub reason: &'static str,
    /// The offending line (cut to 80 characters).
    pub text: String,
}

/// Parses mode2 text one line at a time, keeping the alternation state.
#[derive(Debug, Default)]
pub struct Mode2Parser {
    line: usize,
    /// Polarity of the last event (None before the first).
    last_pulse: Option<bool>,
}

impl Mode2Parser {
    /// Number of lines seen so far.
    pub fn lines(&self) -> usize {
        self.line
    }

    /// Parse one line (without its newline) into timings.
    pub fn parse_line(&mut self, raw: &str) -> Result<Vec<Timing>, Mode2Error> {
        self.line += 1;
        let line_no = self.line;
        let err = |reason| Mode2Error {
            line: line_no,
            reason,
            text: raw.chars().take(80).collect(),
        };
        // A byte-order mark (a recording saved by a Windows editor) is not content.
        let content = strip_comment(raw.trim_start_matches('\u{feff}')).trim();
        if content.is_empty() || is_banner(content) {
            return Ok(Vec::new());
        }
        let mut words = content.split_whitespace();
        let first = words.next().unwrap_or_default();
        let keyword = first.to_ascii_lowercase();
        match keyword.as_str() {
            "pulse" | "space" | "timeout" => {
                let value = words.next().ok_or_else(|| err("missing duration"))?;
                if words.next().is_some() {
                    return Err(err("unexpected text after the duration"));
                }
                let d = parse_duration(value)
                    .ok_or_else(|| err("duration is not a number of microseconds"))?;
                let t = match keyword.as_str() {
                    "pulse" => Timing::Pulse(d),
                    "space" => Timing::Space(d),
                    _ => Timing::Timeout(d),
                };
                self.last_pulse = Some(keyword == "pulse");
                Ok(vec![t])
            }
            "carrier" | "frequency" | "duty_cycle" => {
                let value = words.next().ok_or_else(|| err("missing value"))?;
                parse_duration(value).ok_or_else(|| err("value is not a number"))?;
                Ok(Vec::new())
            }
            "overflow" => {
                self.last_pulse = None;
                Ok(vec![Timing::Reset])
            }
            _ => {
                let mut out = Vec::new();
                let mut signed_space_last = false;
                for word in content.split(|c: char| c.is_whitespace() || c == ',') {
                    if word.is_empty() {
                        continue;
                    }
                    out.push(
                        self.number(word)
                            .ok_or_else(|| err("not a pulse, space or timeout line"))?,
                    );
                    signed_space_last = word.starts_with('-');
                }
                // `ir-ctl -r` ends a line only at a receiver timeout, printed `-N`.
                if signed_space_last {
                    if let Some(Timing::Space(d)) = out.pop() {
                        out.push(Timing::Timeout(d));
                    }
                }
                Ok(out)
            }
        }
    }

    /// One number of the column (`mode2 -m`) or signed (`ir-ctl`) forms.
    fn number(&mut self, word: &str) -> Option<Timing> {
        let (pulse, digits) = if let Some(rest) = word.strip_prefix('+') {
            (Some(true), rest)
        } else if let Some(rest) = word.strip_prefix('-') {
            (Some(false), rest)
        } else if let Some(rest) = word.strip_suffix("-pulse") {
            (Some(true), rest)
        } else if let Some(rest) = word.strip_suffix("-space") {
            (Some(false), rest)
        } else {
            (None, word)
        };
        let d = parse_duration(digits)?;
        let pulse = pulse.unwrap_or(match self.last_pulse {
            Some(last) => !last,
            None => d <= MAX_PULSE_US,
        });
        self.last_pulse = Some(pulse);
        Some(if pulse {
            Timing::Pulse(d)
        } else {
            Timing::Space(d)
        })
    }
}

fn strip_comment(line: &str) -> &str {
    let cut = [line.find('#'), line.find("//")]
        .into_iter()
        .flatten()
        .min();
    match cut {
        Some(i) => line.get(..i).unwrap_or(line),
        None => line,
    }
}

fn is_banner(content: &str) -> bool {
    [
        "Using driver ",
        "Using raw access",
        "Trying device",
        "Using device",
    ]
    .iter()
    .any(|p| content.starts_with(p))
}

fn parse_duration(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Durations beyond LIRC's 24-bit value mask are clamped, not refused.
    Some(
        s.parse::<u64>()
            .map_or(u32::MAX, |v| v.min(u64::from(u32::MAX)) as u32),
    )
}

/// Splits a byte stream into lines for [`Mode2Parser`], across reads.
#[derive(Debug, Default)]
pub struct LineAssembler {
    buf: Vec<u8>,
}

impl LineAssembler {
    /// Add bytes; returns the complete lines (without `\n` or `\r\n`).
    /// A line that is not UTF-8 comes back lossily converted, so the parser
    /// refuses it with its number; a line longer than [`MAX_LINE`] is an error.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, String> {
        let mut lines = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                lines.push(self.take());
            } else {
                if self.buf.len() >= MAX_LINE {
                    self.buf.clear();
                    return Err(format!("a line longer than {MAX_LINE} bytes"));
                }
                self.buf.push(b);
            }
        }
        Ok(lines)
    }

    /// The last line when the stream ends without a newline.
    pub fn finish(&mut self) -> Option<String> {
        (!self.buf.is_empty()).then(|| self.take())
    }

    /// Whether part of a line is waiting for its newline.
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }

    fn take(&mut self) -> String {
        let mut line = std::mem::take(&mut self.buf);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        // Invalid UTF-8 becomes U+FFFD, which never parses: the line is refused by number.
        String::from_utf8_lossy(&line).into_owned()
    }
}

/// Parse a whole mode2 text into timings (the replay path feeds lines one by
/// one instead; this is for tests and tools).
pub fn parse_str(text: &str) -> Result<Vec<Timing>, Mode2Error> {
    let mut p = Mode2Parser::default();
    let mut out = Vec::new();
    for line in text.lines() {
        out.extend(p.parse_line(line)?);
    }
    Ok(out)
}

/// Write timings as `mode2` prints them (`pulse N` / `space N` / `timeout N`).
pub fn to_text(timings: &[Timing]) -> String {
    let mut s = String::new();
    for t in timings {
        match t {
            Timing::Pulse(d) => s.push_str(&format!("pulse {d}\n")),
            Timing::Space(d) => s.push_str(&format!("space {d}\n")),
            Timing::Timeout(d) => s.push_str(&format!("timeout {d}\n")),
            Timing::Reset => s.push_str("overflow\n"),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use Timing::*;

    #[test]
    fn classic_mode2_lines_with_banner_and_timeout() {
        let text = "\u{feff}Using driver default on device /dev/lirc0\nTrying device: /dev/lirc0\nUsing device: /dev/lirc0\nspace 16777215\npulse 9024\nspace 4460\npulse 590 # first bit\n\ntimeout 125000\ncarrier 38000\n";
        assert_eq!(
            parse_str(text).unwrap(),
            vec![
                Space(16_777_215),
                Pulse(9024),
                Space(4460),
                Pulse(590),
                Timeout(125_000)
            ]
        );
    }

    #[test]
    fn column_mode_follows_mode2_m_order() {
        // mode2 -m: the leading gap on its own line, then rows of six.
        let text = " 16777215\n\n     9024     4460      590      540      590     1650\n      590    40000\n 9000-pulse 2200-space\n";
        assert_eq!(
            parse_str(text).unwrap(),
            vec![
                Space(16_777_215),
                Pulse(9024),
                Space(4460),
                Pulse(590),
                Space(540),
                Pulse(590),
                Space(1650),
                Pulse(590),
                Space(40000),
                Pulse(9000),
                Space(2200)
            ]
        );
    }

    #[test]
    fn ir_ctl_signed_form() {
        // As `ir-ctl -r` prints a signal: one line, ended by the timeout.
        let text = "+9024 -4460 +590 -540 +590 -125000\n# carrier 38000Hz, overflow\n";
        assert_eq!(
            parse_str(text).unwrap(),
            vec![
                Pulse(9024),
                Space(4460),
                Pulse(590),
                Space(540),
                Pulse(590),
                Timeout(125_000)
            ]
        );
    }

    #[test]
    fn malformed_lines_are_named() {
        let e = parse_str("pulse 100\nspace 1x0\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(e.to_string().contains("space 1x0"), "{e}");
        let e = parse_str("pulse\n").unwrap_err();
        assert_eq!((e.line, e.reason), (1, "missing duration"));
        let e = parse_str("---___---\n").unwrap_err();
        assert_eq!(e.line, 1);
        let e = parse_str("pulse 5 6\n").unwrap_err();
        assert_eq!(e.reason, "unexpected text after the duration");
    }

    #[test]
    fn lines_are_assembled_across_reads_and_crlf_is_stripped() {
        let mut a = LineAssembler::default();
        assert!(a.push(b"pul").unwrap().is_empty());
        assert_eq!(a.push(b"se 5\r\nspa").unwrap(), vec!["pulse 5".to_string()]);
        assert!(a.has_partial());
        assert_eq!(a.finish(), Some("spa".to_string()));
        assert!(a.push(&vec![b'1'; MAX_LINE + 1]).is_err());
    }

    #[test]
    fn non_utf8_line_is_refused_with_its_number() {
        let mut a = LineAssembler::default();
        let lines = a.push(b"pulse 10\npulse \xff\n").unwrap();
        let mut p = Mode2Parser::default();
        assert!(p.parse_line(&lines[0]).is_ok());
        assert_eq!(p.parse_line(&lines[1]).unwrap_err().line, 2);
    }

    #[test]
    fn text_round_trip() {
        let t = vec![Pulse(9000), Space(4500), Pulse(560), Timeout(125_000)];
        assert_eq!(parse_str(&to_text(&t)).unwrap(), t);
    }
}
