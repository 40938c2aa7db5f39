//! `--from keyboard`: the installer types the key (or the whole label).
//!
//! On a terminal the entry is not echoed: the prompt shows how many
//! characters are in and where the cursor is, never which. Enter checks the
//! entry with [`crate::label::parse`]; a refused entry is kept with the
//! reason on screen (for a failed CRC, which character it points at), to be
//! corrected with the arrow keys, Backspace and Delete instead of typed
//! again. When stdin is not a terminal (a pipe, a script) one line is read
//! from it. `--replay FILE` feeds a file of typed
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

use crate::label;
use crate::source::{KeySource, SourceError, SourceOptions};

/// Longest line accepted; a label is at most 4 + 64 + 1 + 44 characters.
pub const MAX_LINE: usize = 256;

/// One editing step, from a key event or a typed byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    Char(char),
    /// Backspace: erase the character before the cursor.
    Erase,
    /// Delete: erase the character under the cursor.
    EraseForward,
    /// Cursor left / right by one, to the start / end.
    Left,
    Right,
    Home,
    End,
    /// Ctrl-U: erase the whole line.
    Clear,
    /// Enter: the line is complete.
    Done,
    /// Ctrl-C or Esc.
    Cancel,
}

/// Collects one line of key entry, with a cursor. Its buffer is zeroed on drop.
#[derive(Default)]
pub struct LineEditor {
    buf: Zeroizing<Vec<char>>,
    /// Characters before the cursor.
    cursor: usize,
}

impl LineEditor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Characters entered so far (what the prompt shows).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Characters before the cursor: the cursor is after character `cursor()`.
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// The line as it stands.
    pub fn text(&self) -> Zeroizing<String> {
        Zeroizing::new(self.buf.iter().collect())
    }

    fn take(&mut self) -> String {
        let line = self.buf.iter().collect();
        self.buf.clear();
        self.cursor = 0;
        line
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
                self.buf.insert(self.cursor, c);
                self.cursor += 1;
                None
            }
            Edit::Erase => {
                if self.cursor > 0 {
                    self.cursor -= 1;
                    self.buf.remove(self.cursor);
                }
                None
            }
            Edit::EraseForward => {
                if self.cursor < self.buf.len() {
                    self.buf.remove(self.cursor);
                }
                None
            }
            Edit::Left => {
                self.cursor = self.cursor.saturating_sub(1);
                None
            }
            Edit::Right => {
                self.cursor = (self.cursor + 1).min(self.buf.len());
                None
            }
            Edit::Home => {
                self.cursor = 0;
                None
            }
            Edit::End => {
                self.cursor = self.buf.len();
                None
            }
            Edit::Clear => {
                self.buf.clear();
                self.cursor = 0;
                None
            }
            Edit::Done => Some(Ok(self.take())),
            Edit::Cancel => Some(Err(SourceError::Cancelled)),
        }
    }
}

/// Typed bytes to edits: CR or LF ends the line, DEL or BS erases, Ctrl-U
/// clears, Ctrl-C cancels, the cursor keys' escape sequences move the
/// cursor, other control characters are ignored. Invalid
/// UTF-8 becomes U+FFFD, which the parser then refuses by position.
pub fn edits_from_bytes(bytes: &[u8]) -> impl Iterator<Item = Edit> + '_ {
    // from_utf8_lossy borrows when the input is valid, so nothing is copied then.
    let text = String::from_utf8_lossy(bytes);
    let mut edits: Vec<Edit> = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        // The cursor keys a terminal sends (CSI or SS3): ESC [ C, ESC O D, ESC [ 3 ~ ...
        if c == '\x1b' && matches!(chars.peek(), Some('[' | 'O')) {
            chars.next();
            let mut params = String::new();
            while let Some(&p) = chars.peek() {
                chars.next();
                if p.is_ascii_digit() || p == ';' {
                    params.push(p);
                    continue;
                }
                edits.extend(match (params.as_str(), p) {
                    ("", 'C') => Some(Edit::Right),
                    ("", 'D') => Some(Edit::Left),
                    ("", 'H') | ("1", '~') => Some(Edit::Home),
                    ("", 'F') | ("4", '~') => Some(Edit::End),
                    ("3", '~') => Some(Edit::EraseForward),
                    _ => None,
                });
                break;
            }
            continue;
        }
        edits.extend(edit_from_char(c));
    }
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
        KeyCode::Char('a') if ctrl => Some(Edit::Home),
        KeyCode::Char('e') if ctrl => Some(Edit::End),
        KeyCode::Char(_) if ctrl => None,
        KeyCode::Char(c) => Some(Edit::Char(c)),
        KeyCode::Backspace => Some(Edit::Erase),
        KeyCode::Delete => Some(Edit::EraseForward),
        KeyCode::Left => Some(Edit::Left),
        KeyCode::Right => Some(Edit::Right),
        KeyCode::Home => Some(Edit::Home),
        KeyCode::End => Some(Edit::End),
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

/// The `--from` name and cargo feature.
pub const NAME: &str = "keyboard";

/// The keyboard in the [registry](crate::registry); it has no device to list.
pub static FACTORY: crate::registry::Factory = crate::registry::Factory {
    name: NAME,
    list: crate::registry::no_devices,
    open,
};

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
        NAME
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

fn prompt(out: &mut impl Write, ed: &LineEditor) -> std::io::Result<()> {
    let n = ed.len();
    let cursor = if ed.cursor() == n {
        String::new()
    } else {
        format!(", cursor after character {}", ed.cursor())
    };
    // \r and erase-line redraw the one prompt line in place.
    write!(
        out,
        "\r\x1b[2KInitial key (typing is not shown; Enter to finish, Esc to cancel): {n} character{}{cursor}",
        if n == 1 { "" } else { "s" }
    )?;
    out.flush()
}

/// What the installer is told when Enter finds the entry refused: the
/// reason, where a failed CRC points, and how to correct it.
pub fn refusal_message(line: &str, e: &label::LabelError) -> String {
    let hint = match label::locate_hex_error(line) {
        Some(h) => format!("; {h}"),
        None if matches!(e, label::LabelError::DecimalCheck) => {
            "; this check cannot tell which digit is wrong: compare all 41 with the label".into()
        }
        None => String::new(),
    };
    format!(
        "refused: {e}{hint}. The entry is kept: move with ←/→ (Home/End), Backspace/Delete erase, Ctrl-U clears; Enter checks again."
    )
}

/// The editor's line on Enter: the line when it parses, else the reason (the entry stays).
fn check(ed: &LineEditor) -> Result<(), String> {
    let line = ed.text();
    match label::parse(&line) {
        Ok(_) => Ok(()),
        Err(e) => Err(refusal_message(&line, &e)),
    }
}

fn read_terminal(timeout: Option<Duration>) -> Result<String, SourceError> {
    let deadline = timeout.map(|t| (Instant::now() + t, t));
    let mut err = std::io::stderr();
    let raw = RawMode::enable()?;
    let mut ed = LineEditor::new();
    prompt(&mut err, &ed)?;
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
                    if let Some(d) = apply_checked(&mut ed, e, &mut err)? {
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
            if let Some(done) = apply_checked(&mut ed, e, &mut err)? {
                break done;
            }
        }
        prompt(&mut err, &ed)?;
    };
    drop(raw);
    let _ = writeln!(err);
    result
}

/// Applies an edit at the prompt: Enter returns the line only when it
/// parses; a refusal is printed on its own line and the entry stays.
fn apply_checked(
    ed: &mut LineEditor,
    e: Edit,
    out: &mut impl Write,
) -> std::io::Result<Option<Result<String, SourceError>>> {
    if e == Edit::Done {
        if let Err(msg) = check(ed) {
            // Raw mode: \r\n to start the next line; the prompt follows below.
            write!(out, "\r\x1b[2K{msg}\r\n")?;
            tracing::debug!("typed entry refused; kept for correction");
            return Ok(None);
        }
    }
    Ok(ed.apply(e))
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
    fn cursor_keys_correct_a_digit_in_the_middle() {
        // "ABXD", Left (cursor after X), Backspace erases X, C, End, Enter.
        let line = line_from_edits(edits_from_bytes(b"ABXD\x1b[D\x7fC\x1b[F\r")).unwrap();
        assert_eq!(line, "ABCD");
        // Home, Delete, SS3 arrows (application cursor mode).
        let line = line_from_edits(edits_from_bytes(b"xABC\x1b[H\x1b[3~\x1bOC\x1bOCD\r")).unwrap();
        assert_eq!(line, "ABDC");
        // An unknown sequence is skipped whole.
        let line = line_from_edits(edits_from_bytes(b"A\x1b[1;5AB\r")).unwrap();
        assert_eq!(line, "AB");
    }

    #[test]
    fn refusal_says_where_a_crc_points_and_what_to_do() {
        let key = label::InitialKey::from_bytes([0x42; 16]);
        let mut typed: Vec<char> = label::group(&label::hex_form(&key), 4, ' ')
            .chars()
            .collect();
        // Character 12 is hex digit 10.
        typed[11] = if typed[11] == '0' { '1' } else { '0' };
        let typed: String = typed.into_iter().collect();
        let e = label::parse(&typed).unwrap_err();
        let m = refusal_message(&typed, &e);
        assert!(m.contains("CRC-16/X-25 check failed"), "{m}");
        assert!(m.contains("character 12 (hex digit 10 of 36)"), "{m}");
        assert!(m.contains("The entry is kept"), "{m}");
        let dec = label::decimal_form(&key);
        let bad = format!(
            "{}{}",
            &dec[..40],
            if dec.ends_with('0') { '1' } else { '0' }
        );
        let e = label::parse(&bad).unwrap_err();
        assert!(refusal_message(&bad, &e).contains("cannot tell which digit"));
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
