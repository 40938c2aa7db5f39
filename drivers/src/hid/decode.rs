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
const BACKSPACE: u16 = 0x2A;

/// The digit a keypad key types (Num Lock on), for Alt+keypad codes.
fn keypad_digit(usage: u16) -> Option<u32> {
    match usage {
        0x59..=0x61 => Some(u32::from(usage - 0x58)),
        0x62 => Some(0),
        _ => None,
    }
}

/// What an Alt+keypad code types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AltChar {
    /// A printable ASCII character (codes 32–126, with or without leading zeros).
    Char(char),
    /// Codes 9, 10 and 13 (Tab, LF, CR): the scanner's suffix sent as an Alt code.
    End,
    /// Anything else: systems disagree on it, so it becomes U+FFFD and the
    /// label parser refuses it by position.
    Other,
}

/// The character an Alt+keypad code types. Windows and the Linux console
/// agree on printable ASCII: 32–126 type that character, and a leading zero
/// (Windows' ANSI code page instead of the OEM one) changes nothing there.
/// Above 127 they differ (Windows: code page 437 for `nnn`, the ANSI code
/// page for `0nnn`, modulo 256; the Linux console: the Unicode code point),
/// and no key form uses such characters.
pub fn alt_char(code: u32) -> AltChar {
    match code {
        9 | 10 | 13 => AltChar::End,
        32..=126 => AltChar::Char(char::from(code as u8)),
        _ => AltChar::Other,
    }
}

/// Key-down edges of a keyboard report stream, typed on a US layout.
///
/// Scanners set to "Alt+keypad" (the layout-independent mode some offer) send
/// each character as Alt held while its decimal code is typed on the keypad;
/// the character counts when Alt is released, or when a key that ends the
/// scan comes first. See [`alt_char`] for the codes.
///
/// Keys already held when reading starts are not presses: [`Self::set_held`]
/// takes them (a device's Get Report at open).
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

    /// Keys held before the first report: they count as pressed only after
    /// a release.
    pub fn set_held(&mut self, held: Vec<u16>) {
        if !held.contains(&0x01) {
            self.down = held;
        }
    }

    /// Types the pending Alt code, if any; true when it ends the scan.
    fn finish_alt_code(&mut self) -> bool {
        let Some(code) = self.alt_code.take() else {
            return false;
        };
        match alt_char(code) {
            AltChar::Char(c) => self.text.push(c),
            AltChar::End => return true,
            AltChar::Other => {
                tracing::debug!(code, "an Alt+keypad code outside printable ASCII");
                self.text.push(char::REPLACEMENT_CHARACTER);
            }
        }
        false
    }

    /// The scan typed so far, or nothing when it is empty.
    fn take_scan(&mut self) -> Step {
        if self.text.is_empty() {
            Step::Pending // a bare Enter is no scan
        } else {
            Step::Scan(std::mem::take(&mut self.text))
        }
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
        let mut out = Step::Pending;
        if !alt && self.finish_alt_code() {
            out = self.take_scan();
        }
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
                // An Alt code still open (Alt not yet released) is typed first.
                self.finish_alt_code();
                if let Step::Scan(s) = self.take_scan() {
                    out = Step::Scan(s);
                }
                continue;
            }
            if chord {
                tracing::debug!(usage, "ignoring a key typed with ctrl/alt/gui held");
                continue;
            }
            if usage == BACKSPACE {
                // A person typing on a keyboard-mode device corrects a typo.
                self.text.pop();
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
        non_empty(strip_aim(text))
    }
}

/// A scan, unless nothing is left of it: a bare suffix, an AIM identifier
/// alone or only spaces is no entry, and reading goes on.
fn non_empty(text: &str) -> Step {
    if text.trim().is_empty() {
        tracing::debug!("skipping an empty scan");
        Step::Pending
    } else {
        Step::Scan(text.to_string())
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

    /// The state of the device before reading starts (an input report from
    /// a Get Report request): keys held in it are not presses.
    pub fn set_held(&mut self, report: &[u8]) {
        let Some(rl) = self.layout.find(report) else {
            return;
        };
        if let (ReportKind::Keyboard(k), true) = (&rl.kind, report.len() >= rl.len) {
            self.keyboard.set_held(held_keys(k, report));
        }
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
                    Step::Scan(text) => non_empty(strip_aim(&text)),
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
        // Alt+075 = 'K', Alt+058 = ':', then a plain '1', Alt+0200 (no
        // printable ASCII: U+FFFD, for the parser to refuse by position), Enter.
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
        assert_eq!(last, Some(Step::Scan("K:1\u{FFFD}".into())));
    }

    /// Alt held, the code's digits on the keypad, each key released.
    fn alt_code(code: &str) -> Vec<Vec<u8>> {
        let alt = 0x04;
        let mut out = vec![kbd(alt, &[])];
        for d in code.chars() {
            let usage = match d {
                '0' => 0x62,
                d => 0x58 + d.to_digit(10).unwrap() as u8,
            };
            out.push(kbd(alt, &[usage]));
            out.push(kbd(alt, &[]));
        }
        out
    }

    #[test]
    fn an_alt_code_still_open_at_enter_is_not_lost() {
        // "K" then "F" whose Alt is still held when Enter comes.
        let mut seq = alt_code("075");
        seq.push(kbd(0, &[]));
        seq.extend(alt_code("070"));
        seq.push(kbd(0x04, &[0x28]));
        let mut d = boot();
        let last = seq.iter().map(|r| d.feed(r)).last();
        assert_eq!(last, Some(Step::Scan("KF".into())));
    }

    #[test]
    fn an_alt_code_suffix_ends_the_scan() {
        // A scanner sending its CR suffix as Alt+013, then one sending Tab as Alt+9.
        for end in ["013", "13", "9", "010"] {
            let mut seq = alt_code("049");
            seq.push(kbd(0, &[]));
            seq.extend(alt_code(end));
            seq.push(kbd(0, &[]));
            let mut d = boot();
            let steps: Vec<Step> = seq.iter().map(|r| d.feed(r)).collect();
            assert_eq!(steps.last(), Some(&Step::Scan("1".into())), "{end}");
        }
    }

    #[test]
    fn alt_chars_agree_with_windows_and_linux_on_ascii() {
        assert_eq!(alt_char(75), AltChar::Char('K'));
        assert_eq!(alt_char(32), AltChar::Char(' '));
        assert_eq!(alt_char(126), AltChar::Char('~'));
        assert_eq!(alt_char(13), AltChar::End);
        for other in [0, 1, 27, 127, 128, 200, 255, 256, 331, 100_000] {
            assert_eq!(alt_char(other), AltChar::Other, "{other}");
        }
    }

    #[test]
    fn empty_scans_are_skipped() {
        let mut d = boot();
        // Enter alone, an AIM identifier alone, spaces alone: no entry.
        let seq = [
            kbd(0, &[0x28]),
            kbd(0, &[]),
            kbd(0, &[0x30]),    // ]
            kbd(0x02, &[0x14]), // Q
            kbd(0, &[0x1E]),    // 1
            kbd(0, &[0x28]),
            kbd(0, &[0x2C]),
            kbd(0, &[]),
            kbd(0, &[0x2B]),
            kbd(0, &[0x05]),
            kbd(0, &[0x28]),
        ];
        let steps: Vec<Step> = seq.iter().map(|r| d.feed(r)).collect();
        let scans: Vec<&Step> = steps.iter().filter(|s| **s != Step::Pending).collect();
        assert_eq!(scans, [&Step::Scan("b".into())]);
    }

    #[test]
    fn a_key_held_when_reading_starts_is_no_press() {
        let mut d = boot();
        // Enter and 'a' already down at open (Get Report), then released; "b", Enter.
        d.set_held(&kbd(0, &[0x28, 0x04]));
        let seq = [
            kbd(0, &[0x28, 0x04]),
            kbd(0, &[0x04]),
            kbd(0, &[]),
            kbd(0, &[0x05]),
            kbd(0, &[0x28]),
        ];
        let steps: Vec<Step> = seq.iter().map(|r| d.feed(r)).collect();
        let scans: Vec<&Step> = steps.iter().filter(|s| **s != Step::Pending).collect();
        assert_eq!(scans, [&Step::Scan("b".into())]);
    }

    #[test]
    fn backspace_erases_the_last_character() {
        let mut d = boot();
        let seq = [
            kbd(0, &[0x04]),
            kbd(0, &[0x05]),
            kbd(0, &[0x2A]),
            kbd(0, &[0x06]),
            kbd(0, &[0x28]),
        ];
        let last = seq.iter().map(|r| d.feed(r)).last();
        assert_eq!(last, Some(Step::Scan("ac".into())));
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
