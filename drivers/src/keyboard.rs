//! `--from keyboard`: the installer types the key (or the whole label).
//!
//! On a terminal the entry is not echoed: the prompt shows how many
//! characters are in, never which. When stdin is not a terminal (a pipe, a
//! script) one line is read from it. `--replay FILE` feeds a file of typed
//! bytes (what `script -I` or a terminal logger records) through the same
//! line editor the terminal uses.
//!
//! The pure part is [`LineEditor`] (edits in, the finished line out) and
//! [`edits_from_bytes`] (typed bytes to edits); the terminal reader only
//! turns key events into the same edits.
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use zeroize::Zeroizing;

use crate::source::{KeySource, SourceError, SourceOptions};

/// Longest line accepted; a label is at most 4 + 64 + 1 + 44 characters.
pub const MAX_LINE: usize = 256;

/// One editing step, from a key event or a typed byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    Char(char),
    /// Backspace or Delete: erase the last character.
    Erase,
    /// Ctrl-U: erase the whole line.
    Clear,
    /// Enter: the line is complete.
    Done,
    /// Ctrl-C or Esc.
    Cancel,
}

/// Collects one line of key entry. Its buffer is zeroed on drop.
#[derive(Default)]
pub struct LineEditor {
    buf: Zeroizing<String>,
}

impl LineEditor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Characters entered so far (what the prompt shows).
    pub fn len(&self) -> usize {
        self.buf.chars().count()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Applies one edit; returns the finished line on `Done`, an error on
    /// `Cancel` or when the line grows past [`MAX_LINE`].
    pub fn apply(&mut self, edit: Edit) -> Option<Result<String, SourceError>> {
        match edit {
            Edit::Char(c) => {
                if self.len() >= MAX_LINE {
                    return Some(Err(SourceError::Malformed {
                        what: format!(
                            "the typed line is longer than {MAX_LINE} characters; no key form is that long"
                        ),
                    }));
                }
                self.buf.push(c);
                None
            }
            Edit::Erase => {
                self.buf.pop();
                None
            }
            Edit::Clear => {
                self.buf.clear();
                None
            }
            Edit::Done => Some(Ok(std::mem::take(&mut *self.buf))),
            Edit::Cancel => Some(Err(SourceError::Cancelled)),
        }
    }
}

/// Typed bytes to edits: CR or LF ends the line, DEL or BS erases, Ctrl-U
/// clears, Ctrl-C cancels, other control characters are ignored. Invalid
/// UTF-8 becomes U+FFFD, which the parser then refuses by position.
pub fn edits_from_bytes(bytes: &[u8]) -> impl Iterator<Item = Edit> + '_ {
    // from_utf8_lossy borrows when the input is valid, so nothing is copied then.
    let text = String::from_utf8_lossy(bytes);
    let edits: Vec<Edit> = text.chars().filter_map(edit_from_char).collect();
    edits.into_iter()
}

fn edit_from_char(c: char) -> Option<Edit> {
    match c {
        '\r' | '\n' => Some(Edit::Done),
        '\x7f' | '\x08' => Some(Edit::Erase),
        '\x15' => Some(Edit::Clear),
        '\x03' => Some(Edit::Cancel),
        c if c.is_control() => None,
        c => Some(Edit::Char(c)),
    }
}

/// Drops the header line and the trailer that util-linux `script` writes
/// around the typed bytes in a `--log-in` file; other input is returned whole.
pub fn strip_script_log(bytes: &[u8]) -> &[u8] {
    let mut b = bytes;
    if b.starts_with(b"Script started on ") {
        b = match b.iter().position(|&c| c == b'\n') {
            Some(i) => &b[i + 1..],
            None => &[],
        };
    }
    const DONE: &[u8] = b"Script done on ";
    if let Some(i) = b.windows(DONE.len()).rposition(|w| w == DONE) {
        b = &b[..i];
    }
    b
}

/// A terminal key event to an edit (presses only; releases and repeats of
/// terminals that report them are ignored).
pub fn edit_from_key(key: KeyEvent) -> Option<Edit> {
    if key.kind != KeyEventKind::Press {
        return None;
    }
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    match key.code {
        KeyCode::Char('c') if ctrl => Some(Edit::Cancel),
        KeyCode::Char('u') if ctrl => Some(Edit::Clear),
        KeyCode::Char('d') if ctrl => Some(Edit::Done),
        KeyCode::Char(_) if ctrl => None,
        KeyCode::Char(c) => Some(Edit::Char(c)),
        KeyCode::Backspace | KeyCode::Delete => Some(Edit::Erase),
        KeyCode::Enter => Some(Edit::Done),
        KeyCode::Esc => Some(Edit::Cancel),
        _ => None,
    }
}

/// Feeds edits to a fresh editor until a line is finished.
pub fn line_from_edits(edits: impl IntoIterator<Item = Edit>) -> Result<String, SourceError> {
    let mut ed = LineEditor::new();
    for e in edits {
        if let Some(done) = ed.apply(e) {
            return done;
        }
    }
    if ed.is_empty() {
        Err(SourceError::Ended(
            "no characters before the end of input".into(),
        ))
    } else {
        // A last line without a newline is complete too (a file without a final newline).
        ed.apply(Edit::Done).unwrap_or(Err(SourceError::Cancelled))
    }
}

enum Mode {
    Terminal,
    Stdin,
    Replay(PathBuf),
}

struct Keyboard {
    mode: Mode,
}

/// Opens the keyboard source: `--replay FILE`, else the terminal when stdin
/// is one, else a line from stdin.
pub fn open(opts: &SourceOptions) -> Result<Box<dyn KeySource>, SourceError> {
    let mode = if let Some(p) = &opts.replay {
        Mode::Replay(p.clone())
    } else if std::io::stdin().is_terminal() {
        Mode::Terminal
    } else {
        Mode::Stdin
    };
    Ok(Box::new(Keyboard { mode }))
}

impl KeySource for Keyboard {
    fn name(&self) -> &'static str {
        "keyboard"
    }

    fn read_raw(&mut self, timeout: Option<Duration>) -> Result<String, SourceError> {
        match &self.mode {
            Mode::Replay(p) => {
                let bytes = Zeroizing::new(std::fs::read(p).map_err(|e| SourceError::Open {
                    path: p.display().to_string(),
                    reason: e.to_string(),
                })?);
                line_from_edits(edits_from_bytes(strip_script_log(&bytes)))
            }
            Mode::Stdin => read_stdin_line(timeout),
            Mode::Terminal => read_terminal(timeout),
        }
    }
}

/// One line from a non-terminal stdin. The read runs on a helper thread so
/// that `--timeout` holds even when the writer never sends a newline.
fn read_stdin_line(timeout: Option<Duration>) -> Result<String, SourceError> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Zeroizing::new(Vec::new());
        let mut stdin = std::io::stdin().lock();
        let mut b = [0u8; 1];
        let result = loop {
            match stdin.read(&mut b) {
                Ok(0) => break Ok(()),
                Ok(_) => {
                    bytes.push(b[0]);
                    if b[0] == b'\n' || bytes.len() > MAX_LINE * 4 {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            }
        };
        let _ = tx.send(result.map(|()| line_from_edits(edits_from_bytes(&bytes))));
    });
    let got = match timeout {
        Some(t) => rx.recv_timeout(t).map_err(|_| SourceError::Timeout(t))?,
        None => rx
            .recv()
            .map_err(|_| SourceError::Ended("stdin reader stopped".into()))?,
    };
    got?
}

/// Restores the terminal's mode when the prompt ends, however it ends.
struct RawMode;

impl RawMode {
    fn enable() -> Result<RawMode, SourceError> {
        crossterm::terminal::enable_raw_mode()?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

fn prompt(out: &mut impl Write, n: usize) -> std::io::Result<()> {
    // \r and erase-line redraw the one prompt line in place.
    write!(
        out,
        "\r\x1b[2KInitial key (typing is not shown; Enter to finish, Esc to cancel): {n} character{}",
        if n == 1 { "" } else { "s" }
    )?;
    out.flush()
}

fn read_terminal(timeout: Option<Duration>) -> Result<String, SourceError> {
    let deadline = timeout.map(|t| (Instant::now() + t, t));
    let mut err = std::io::stderr();
    let raw = RawMode::enable()?;
    let mut ed = LineEditor::new();
    prompt(&mut err, 0)?;
    let result = loop {
        if let Some((at, t)) = deadline {
            let left = at.saturating_duration_since(Instant::now());
            if left.is_zero() || !event::poll(left)? {
                break Err(SourceError::Timeout(t));
            }
        }
        let edit = match event::read()? {
            Event::Key(k) => edit_from_key(k),
            // A paste arrives as text; it is entered as if typed.
            Event::Paste(s) => {
                let mut done = None;
                for e in s.chars().filter_map(edit_from_char) {
                    if let Some(d) = ed.apply(e) {
                        done = Some(d);
                        break;
                    }
                }
                if let Some(d) = done {
                    break d;
                }
                None
            }
            _ => None,
        };
        if let Some(e) = edit {
            if let Some(done) = ed.apply(e) {
                break done;
            }
        }
        prompt(&mut err, ed.len())?;
    };
    drop(raw);
    let _ = writeln!(err);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossterm::event::KeyEventState;

    #[test]
    fn typed_bytes_with_corrections() {
        // "83FX", backspace, "E", then the rest and Enter.
        let line = line_from_edits(edits_from_bytes(b"83FX\x7fE D340\r\n")).unwrap();
        assert_eq!(line, "83FE D340");
        // Ctrl-U clears what was typed before it.
        let line = line_from_edits(edits_from_bytes(b"wrong\x15right\n")).unwrap();
        assert_eq!(line, "right");
    }

    #[test]
    fn script_log_header_and_trailer_are_skipped() {
        let log = b"Script started on 2026-11-25 12:29:58+00:00 [COMMAND=\"read -s x\" TTY=\"/dev/pts/0\"]\n83fe\x7fE\r\nScript done on 2026-11-25 12:29:59+00:00 [COMMAND_EXIT_CODE=\"0\"]\n";
        assert_eq!(
            line_from_edits(edits_from_bytes(strip_script_log(log))).unwrap(),
            "83fE"
        );
        assert_eq!(strip_script_log(b"plain\n"), b"plain\n");
    }

    #[test]
    fn ctrl_c_cancels_and_empty_input_ends() {
        assert!(matches!(
            line_from_edits(edits_from_bytes(b"12\x03")),
            Err(SourceError::Cancelled)
        ));
        assert!(matches!(
            line_from_edits(edits_from_bytes(b"")),
            Err(SourceError::Ended(_))
        ));
        // A final line without newline is complete.
        assert_eq!(line_from_edits(edits_from_bytes(b"abc")).unwrap(), "abc");
    }

    #[test]
    fn overlong_line_is_refused() {
        let long = vec![b'1'; MAX_LINE + 1];
        let e = line_from_edits(edits_from_bytes(&long)).unwrap_err();
        assert!(e.to_string().contains("longer than 256"), "{e}");
    }

    #[test]
    fn key_events_map_to_edits() {
        let k = |code, modifiers| KeyEvent {
            code,
            modifiers,
            kind: KeyEventKind::Press,
            state: KeyEventState::NONE,
        };
        assert_eq!(
            edit_from_key(k(KeyCode::Char('a'), KeyModifiers::NONE)),
            Some(Edit::Char('a'))
        );
        assert_eq!(
            edit_from_key(k(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Some(Edit::Cancel)
        );
        assert_eq!(
            edit_from_key(k(KeyCode::Backspace, KeyModifiers::NONE)),
            Some(Edit::Erase)
        );
        assert_eq!(
            edit_from_key(k(KeyCode::Enter, KeyModifiers::NONE)),
            Some(Edit::Done)
        );
        let mut release = k(KeyCode::Char('a'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert_eq!(edit_from_key(release), None);
    }

    #[test]
    fn editor_counts_characters() {
        let mut ed = LineEditor::new();
        for c in "KF1:é".chars() {
            assert!(ed.apply(Edit::Char(c)).is_none());
        }
        assert_eq!(ed.len(), 5);
        ed.apply(Edit::Erase);
        assert_eq!(ed.len(), 4);
    }
}
