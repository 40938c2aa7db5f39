//! Reports in, scans out: the pure decoders shared by the device reader and
//! the replay of a recording.
use super::layout::{bits, KeyboardFields, Layout, LayoutError, PosFields, ReportKind};

/// What one report contributed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing finished yet.
    Pending,
    /// A whole scan: the decoded text, framing and AIM prefix removed.
    Scan(String),
    /// More than [`MAX_SCAN`] characters without an end; what came is dropped.
    Overflow,
}

/// A scan longer than this without Enter, Tab or a last report is not a label:
/// a keyboard typing, or a scanner without its suffix.
pub const MAX_SCAN: usize = 4096;

const SHIFT_KEYS: [u16; 2] = [0xE1, 0xE5];
const CHORD_KEYS: [u16; 6] = [0xE0, 0xE2, 0xE3, 0xE4, 0xE6, 0xE7]; // ctrl, alt, gui

/// What a key usage types on a US layout, unshifted and shifted.
fn us_key(usage: u16) -> Option<(char, char)> {
    let letters = "abcdefghijklmnopqrstuvwxyz";
    Some(match usage {
        0x04..=0x1D => {
            let c = letters.chars().nth(usize::from(usage - 0x04))?;
            (c, c.to_ascii_uppercase())
        }
        0x1E..=0x26 => {
            let d = char::from_digit(u32::from(usage - 0x1D), 10)?;
            let shifted = ['!', '@', '#', '$', '%', '^', '&', '*', '(']
                .get(usize::from(usage - 0x1E))
                .copied()?;
            (d, shifted)
        }
        0x27 => ('0', ')'),
        0x2C => (' ', ' '),
        0x2D => ('-', '_'),
        0x2E => ('=', '+'),
        0x2F => ('[', '{'),
        0x30 => (']', '}'),
        0x31 | 0x32 => ('\\', '|'),
        0x33 => (';', ':'),
        0x34 => ('\'', '"'),
        0x35 => ('`', '~'),
        0x36 => (',', '<'),
        0x37 => ('.', '>'),
        0x38 => ('/', '?'),
        // Keypad, as a scanner with Num Lock emulation types it.
        0x54 => ('/', '/'),
        0x55 => ('*', '*'),
        0x56 => ('-', '-'),
        0x57 => ('+', '+'),
        0x59..=0x61 => {
            let d = char::from_digit(u32::from(usage - 0x58), 10)?;
            (d, d)
        }
        0x62 => ('0', '0'),
        0x63 => ('.', '.'),
        _ => return None,
    })
}

/// Enter, Tab, Keypad Enter: the usual scan suffixes.
fn ends_scan(usage: u16) -> bool {
    matches!(usage, 0x28 | 0x2B | 0x58)
}

const ALT_KEYS: [u16; 2] = [0xE2, 0xE6];

/// The digit a keypad key types (Num Lock on), for Alt+keypad codes.
fn keypad_digit(usage: u16) -> Option<u32> {
    match usage {
        0x59..=0x61 => Some(u32::from(usage - 0x58)),
        0x62 => Some(0),
        _ => None,
    }
}

/// Key-down edges of a keyboard report stream, typed on a US layout.
///
/// Scanners set to "Alt+keypad" (the layout-independent mode some offer) send
/// each character as Alt held while its decimal code is typed on the keypad;
/// the character counts when Alt is released. Codes outside printable ASCII
/// are dropped.
#[derive(Debug, Default)]
pub struct KeyboardDecoder {
    down: Vec<u16>,
    text: String,
    alt_code: Option<u32>,
}

impl KeyboardDecoder {
    /// Characters typed so far in the current scan.
    pub fn pending_len(&self) -> usize {
        self.text.chars().count()
    }

    /// Feed the keys held in one report (modifiers included as 0xE0–0xE7).
    pub fn feed(&mut self, held: Vec<u16>) -> Step {
        // ErrorRollOver (0x01) in the key slots: the state is unknown; keep the last one.
        if held.contains(&0x01) {
            return Step::Pending;
        }
        let shift = held.iter().any(|u| SHIFT_KEYS.contains(u));
        let chord = held.iter().any(|u| CHORD_KEYS.contains(u));
        let alt = held.iter().any(|u| ALT_KEYS.contains(u));
        let alt_only = alt
            && !held
                .iter()
                .any(|u| CHORD_KEYS.contains(u) && !ALT_KEYS.contains(u));
        if !alt {
            if let Some(code) = self.alt_code.take() {
                match u8::try_from(code).ok().filter(|c| (0x20..0x7F).contains(c)) {
                    Some(c) => self.text.push(char::from(c)),
                    None => {
                        tracing::debug!(code, "ignoring an Alt+keypad code outside printable ASCII")
                    }
                }
            }
        }
        let mut out = Step::Pending;
        for &usage in &held {
            if self.down.contains(&usage) || usage >= 0xE0 {
                continue; // held since the last report, or a modifier
            }
            if alt_only {
                if let Some(d) = keypad_digit(usage) {
                    let code = self
                        .alt_code
                        .unwrap_or(0)
                        .saturating_mul(10)
                        .saturating_add(d);
                    self.alt_code = Some(code.min(100_000));
                    continue;
                }
            }
            if ends_scan(usage) {
                if self.text.is_empty() {
                    continue; // a bare Enter is no scan
                }
                out = Step::Scan(std::mem::take(&mut self.text));
                continue;
            }
            if chord {
                tracing::debug!(usage, "ignoring a key typed with ctrl/alt/gui held");
                continue;
            }
            match us_key(usage) {
                Some((plain, shifted)) => self.text.push(if shift { shifted } else { plain }),
                None => tracing::debug!(usage, "ignoring a key that types no character"),
            }
        }
        self.down = held;
        if self.text.len() > MAX_SCAN {
            self.text.clear();
            return Step::Overflow;
        }
        out
    }
}

/// Collects HID POS Decoded Data across reports until Decode Data Continued is clear.
#[derive(Debug, Default)]
pub struct PosDecoder {
    data: Vec<u8>,
}

impl PosDecoder {
    pub fn pending_len(&self) -> usize {
        self.data.len()
    }

    pub fn feed(&mut self, fields: &PosFields, report: &[u8]) -> Step {
        let mut chunk: Vec<u8> = fields
            .data
            .iter()
            .filter_map(|r| bits(report, r))
            .map(|v| (v & 0xFF) as u8)
            .collect();
        match fields.byte_count.as_ref().and_then(|r| bits(report, r)) {
            Some(n) => chunk.truncate(n as usize),
            None => {
                while chunk.last() == Some(&0) {
                    chunk.pop();
                }
            }
        }
        self.data.extend_from_slice(&chunk);
        if self.data.len() > MAX_SCAN {
            self.data.clear();
            return Step::Overflow;
        }
        let more = fields
            .continued
            .as_ref()
            .and_then(|r| bits(report, r))
            .is_some_and(|v| v != 0);
        if more || self.data.is_empty() {
            return Step::Pending;
        }
        let data = std::mem::take(&mut self.data);
        let text = String::from_utf8_lossy(&data);
        // Scanners configured with a suffix send it inside the data too.
        let text = text.trim_end_matches(['\r', '\n', '\t']);
        Step::Scan(strip_aim(text).to_string())
    }
}

/// Remove an AIM symbology identifier (`]` + code letter + modifier, e.g. `]Q1`)
/// that a scanner set to transmit it types in front of the data.
pub fn strip_aim(text: &str) -> &str {
    let b = text.as_bytes();
    match b {
        [b']', code, modifier, ..]
            if code.is_ascii_alphabetic() && modifier.is_ascii_alphanumeric() =>
        {
            text.get(3..).unwrap_or("")
        }
        _ => text,
    }
}

/// One device's decoder: its layout and the state of each report kind.
#[derive(Debug)]
pub struct ScanDecoder {
    layout: Layout,
    keyboard: KeyboardDecoder,
    pos: PosDecoder,
}

impl ScanDecoder {
    pub fn new(descriptor: &[u8]) -> Result<ScanDecoder, LayoutError> {
        Ok(ScanDecoder {
            layout: Layout::from_descriptor(descriptor)?,
            keyboard: KeyboardDecoder::default(),
            pos: PosDecoder::default(),
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// How much of an unfinished scan is buffered (characters or bytes).
    pub fn pending_len(&self) -> usize {
        self.keyboard.pending_len() + self.pos.pending_len()
    }

    /// Feed one input report as hidraw delivers it. Reports of other kinds
    /// (mouse, consumer keys, vendor) and short reports are skipped.
    pub fn feed(&mut self, report: &[u8]) -> Step {
        let Some(rl) = self.layout.find(report) else {
            return Step::Pending;
        };
        if report.len() < rl.len {
            tracing::debug!(
                got = report.len(),
                want = rl.len,
                "skipping a report shorter than its descriptor says"
            );
            return Step::Pending;
        }
        match &rl.kind {
            ReportKind::Keyboard(k) => {
                let held = held_keys(k, report);
                let step = self.keyboard.feed(held);
                match step {
                    Step::Scan(text) => Step::Scan(strip_aim(&text).to_string()),
                    other => other,
                }
            }
            ReportKind::Pos(p) => self.pos.feed(p, report),
        }
    }
}

/// The keyboard-page usages held in a report, in report order.
fn held_keys(k: &KeyboardFields, report: &[u8]) -> Vec<u16> {
    let mut held = Vec::new();
    for (range, usage) in &k.bit_keys {
        if bits(report, range) == Some(1) {
            held.push(*usage);
        }
    }
    for a in &k.arrays {
        for slot in 0..a.count {
            let start = a.start + slot * a.slot_bits;
            let Some(v) = bits(report, &(start..start + a.slot_bits)) else {
                continue;
            };
            let index = i64::from(v) - a.logical_min;
            let usage = usize::try_from(index)
                .ok()
                .and_then(|i| a.usages.get(i).copied().flatten());
            if let Some(u) = usage {
                if u != 0 && !held.contains(&u) {
                    held.push(u);
                }
            }
        }
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kbd(mods: u8, keys: &[u8]) -> Vec<u8> {
        let mut r = vec![mods, 0, 0, 0, 0, 0, 0, 0];
        for (i, k) in keys.iter().enumerate() {
            r[2 + i] = *k;
        }
        r
    }

    fn boot() -> ScanDecoder {
        ScanDecoder::new(super::super::layout::tests_support::BOOT_KBD).unwrap()
    }

    #[test]
    fn repeated_digit_needs_a_release_between() {
        let mut d = boot();
        // "33": 3 down, up, 3 down, up, Enter.
        let seq = [
            kbd(0, &[0x20]),
            kbd(0, &[]),
            kbd(0, &[0x20]),
            kbd(0, &[]),
            kbd(0, &[0x28]),
        ];
        let steps: Vec<Step> = seq.iter().map(|r| d.feed(r)).collect();
        assert_eq!(steps.last(), Some(&Step::Scan("33".into())));
    }

    #[test]
    fn a_key_held_across_reports_types_once() {
        let mut d = boot();
        for r in [
            kbd(0, &[0x20]),
            kbd(0, &[0x20]),
            kbd(0, &[0x20, 0x21]),
            kbd(0, &[0x28]),
        ] {
            if let Step::Scan(s) = d.feed(&r) {
                assert_eq!(s, "34");
                return;
            }
        }
        panic!("no scan");
    }

    #[test]
    fn shift_from_the_modifier_byte() {
        let mut d = boot();
        // K (shift+k) F (right shift+f) 1 : (shift+;) then Tab.
        let seq = [
            kbd(0x02, &[0x0E]),
            kbd(0, &[]),
            kbd(0x20, &[0x09]),
            kbd(0, &[]),
            kbd(0, &[0x1E]),
            kbd(0x02, &[0x33]),
            kbd(0, &[]),
            kbd(0, &[0x2B]),
        ];
        let last = seq.iter().map(|r| d.feed(r)).last();
        assert_eq!(last, Some(Step::Scan("KF1:".into())));
    }

    #[test]
    fn rollover_error_changes_nothing() {
        let mut d = boot();
        let seq = [
            kbd(0, &[0x04]),
            kbd(0, &[1, 1, 1, 1, 1, 1]),
            kbd(0, &[0x04]),
            kbd(0, &[0x28]),
        ];
        let last = seq.iter().map(|r| d.feed(r)).last();
        assert_eq!(last, Some(Step::Scan("a".into())));
    }

    #[test]
    fn aim_prefix_is_stripped() {
        assert_eq!(strip_aim("]Q1KF1:a"), "KF1:a");
        assert_eq!(strip_aim("]d2abc"), "abc");
        assert_eq!(strip_aim("]C0"), "");
        assert_eq!(strip_aim("abc"), "abc");
        assert_eq!(strip_aim("]"), "]");
        assert_eq!(strip_aim("]1a"), "]1a");
    }

    #[test]
    fn alt_keypad_codes_type_their_character() {
        let mut d = boot();
        // Alt+075 = 'K', Alt+058 = ':', then a plain '1', Alt+0200 dropped, Enter.
        let alt = 0x04;
        let seq = [
            kbd(alt, &[]),
            kbd(alt, &[0x62]),
            kbd(alt, &[]),
            kbd(alt, &[0x5F]),
            kbd(alt, &[]),
            kbd(alt, &[0x5D]),
            kbd(0, &[]),
            kbd(alt, &[0x62]),
            kbd(alt, &[0x5D]),
            kbd(alt, &[0x60]),
            kbd(0, &[]),
            kbd(0, &[0x1E]),
            kbd(0, &[]),
            kbd(alt, &[0x62]),
            kbd(alt, &[0x5A]),
            kbd(alt, &[0x62]),
            kbd(alt, &[]),
            kbd(alt, &[0x62]),
            kbd(0, &[]),
            kbd(0, &[0x28]),
        ];
        let last = seq.iter().map(|r| d.feed(r)).last();
        assert_eq!(last, Some(Step::Scan("K:1".into())));
    }

    #[test]
    fn endless_typing_overflows() {
        let mut d = boot();
        let mut saw = None;
        for i in 1..=MAX_SCAN + 1 {
            if let s @ Step::Overflow = d.feed(&kbd(0, &[0x04])) {
                saw = Some((i, s));
                break;
            }
            assert_eq!(d.feed(&kbd(0, &[])), Step::Pending);
        }
        // The character past the limit is the one that overflows.
        assert_eq!(saw, Some((MAX_SCAN + 1, Step::Overflow)));
        // Then a normal scan goes through.
        d.feed(&kbd(0, &[0x05]));
        assert_eq!(d.feed(&kbd(0, &[0x28])), Step::Scan("b".into()));
    }

    #[test]
    fn ctrl_chords_type_nothing() {
        let mut d = boot();
        let seq = [
            kbd(0x01, &[0x06]),
            kbd(0, &[]),
            kbd(0, &[0x05]),
            kbd(0, &[0x28]),
        ];
        let last = seq.iter().map(|r| d.feed(r)).last();
        assert_eq!(last, Some(Step::Scan("b".into())));
    }
}
