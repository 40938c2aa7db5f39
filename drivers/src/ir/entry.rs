//! From timings to an entered string: decoders, press detection, keymap and
//! the digits typed so far. Pure: the device and the replay feed it the same
//! way.
use zeroize::Zeroizing;

use super::decode::{MultiDecoder, Presses};
use super::keymap::{action, Action, Keymap};
use super::timing::Timing;

/// Longest entry kept (a label is far shorter); extra characters are dropped
/// and the parser then refuses the length.
pub const MAX_ENTRY: usize = 128;

/// How an entry ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// OK/ENTER/SELECT with this text.
    Done(Zeroizing<String>),
    /// EXIT/ESC/CANCEL.
    Cancelled,
}

/// The whole receive path after the receiver format.
#[derive(Debug)]
pub struct Pipeline {
    decoder: MultiDecoder,
    presses: Presses,
    keymap: Keymap,
    text: Zeroizing<String>,
    presses_seen: usize,
    unmapped: usize,
}

impl Pipeline {
    pub fn new(keymap: Keymap) -> Self {
        Pipeline {
            decoder: MultiDecoder::new(&keymap.families()),
            presses: Presses::default(),
            keymap,
            text: Zeroizing::new(String::new()),
            presses_seen: 0,
            unmapped: 0,
        }
    }

    /// Feed one timing; returns an outcome when the entry is over.
    pub fn feed(&mut self, t: Timing) -> Option<Outcome> {
        for out in self.decoder.feed(t) {
            let Some(frame) = self.presses.on_output(out) else {
                continue;
            };
            self.presses_seen += 1;
            let Some(button) = self.keymap.lookup(&frame) else {
                // Never log the scancode: with a wrong keymap it would spell the key.
                self.unmapped += 1;
                tracing::debug!(protocol = frame.protocol.name(), "button not in keymap");
                continue;
            };
            match action(button) {
                Action::Char(c) => {
                    if self.text.len() < MAX_ENTRY {
                        self.text.push(c);
                    }
                    tracing::info!(entered = self.text.len(), "character entered");
                }
                Action::Erase => {
                    self.text.pop();
                    tracing::info!(entered = self.text.len(), "last character erased");
                }
                Action::Clear => {
                    self.text.clear();
                    tracing::debug!("entry cleared");
                }
                Action::Finish if self.text.is_empty() => {
                    tracing::debug!("OK with nothing entered, ignored");
                }
                Action::Finish => {
                    let done = std::mem::replace(&mut self.text, Zeroizing::new(String::new()));
                    return Some(Outcome::Done(done));
                }
                Action::Cancel => {
                    self.text.clear();
                    return Some(Outcome::Cancelled);
                }
                Action::None => tracing::debug!(button, "button has no meaning here"),
            }
        }
        None
    }

    /// Characters entered so far in the current entry.
    pub fn entered(&self) -> usize {
        self.text.len()
    }

    /// Whether the decoders hold an unfinished pulse or space.
    pub fn has_pending(&self) -> bool {
        self.decoder.has_pending()
    }

    /// A summary for an entry that never finished: what was seen.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} characters entered, no OK/ENTER/SELECT button",
            self.text.len()
        );
        if self.presses_seen == 0 {
            s.push_str("; no NEC, RC5 or RC6 frame was decoded (check the receiver and the remote's protocol)");
        } else if self.unmapped > 0 {
            s.push_str(&format!(
                "; {} of {} button presses are not in keymap {} (protocols {}): is it this remote's keymap?",
                self.unmapped,
                self.presses_seen,
                self.keymap.source,
                self.keymap.protocol_names().join(", ")
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::super::decode::{Frame, Protocol};
    use super::super::encode;
    use super::*;

    const MAP: &str = "[[protocols]]\nprotocol = \"nec\"\n[protocols.scancodes]\n\
        0x2001 = \"KEY_1\"\n0x2002 = \"KEY_NUMERIC_2\"\n0x200a = \"KEY_A\"\n\
        0x2010 = \"KEY_OK\"\n0x2011 = \"KEY_BACK\"\n0x2013 = \"KEY_EXIT\"\n0x2014 = \"KEY_CLEAR\"\n";

    /// Press buttons (scancode, held frames) with pauses; return the outcomes.
    fn press(p: &mut Pipeline, buttons: &[(u32, u32)]) -> Vec<Outcome> {
        let mut out = Vec::new();
        for &(scancode, repeats) in buttons {
            let f = Frame {
                protocol: Protocol::Nec,
                scancode,
                toggle: false,
            };
            let mut t = encode::press(f, repeats).unwrap();
            t.push(Timing::Space(400_000));
            out.extend(t.into_iter().filter_map(|t| p.feed(t)));
        }
        out.extend(p.feed(Timing::Timeout(125_000)));
        out
    }

    fn pipeline() -> Pipeline {
        Pipeline::new(Keymap::parse(MAP, "test").unwrap())
    }

    #[test]
    fn digits_erase_and_finish() {
        let mut p = pipeline();
        let got = press(
            &mut p,
            &[
                (0x2001, 3),
                (0x200a, 0),
                (0x2011, 0),
                (0x2002, 0),
                (0x2002, 0),
                (0x2010, 0),
            ],
        );
        assert_eq!(got, vec![Outcome::Done(Zeroizing::new("122".into()))]);
        assert_eq!(p.entered(), 0);
    }

    #[test]
    fn ok_with_nothing_entered_is_ignored_and_clear_starts_over() {
        let mut p = pipeline();
        let got = press(
            &mut p,
            &[
                (0x2010, 0),
                (0x2001, 0),
                (0x2014, 0),
                (0x200a, 0),
                (0x2010, 0),
            ],
        );
        assert_eq!(got, vec![Outcome::Done(Zeroizing::new("A".into()))]);
    }

    #[test]
    fn exit_cancels() {
        let mut p = pipeline();
        assert_eq!(
            press(&mut p, &[(0x2001, 0), (0x2013, 0)]),
            vec![Outcome::Cancelled]
        );
    }

    #[test]
    fn summary_says_what_was_missing() {
        let mut p = pipeline();
        assert!(press(&mut p, &[(0x2001, 0), (0x2077, 0)]).is_empty());
        let s = p.summary();
        assert!(s.starts_with("1 characters entered"), "{s}");
        assert!(
            s.contains("1 of 2 button presses are not in keymap test"),
            "{s}"
        );
        let fresh = pipeline();
        assert!(fresh
            .summary()
            .contains("no NEC, RC5 or RC6 frame was decoded"));
    }
}
