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
                    tracing::debug!(entered = self.text.len(), "character entered");
                }
                Action::Erase => {
                    self.text.pop();
                    tracing::debug!(entered = self.text.len(), "last character erased");
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
