//! `--from keypad`: a full-screen on-screen keypad (0–9, A–F, back, OK) for
//! a touch panel or a mouse, which a keyboard drives too.
//!
//! Buttons are pressed by a left click or a touch (terminals report both as
//! mouse presses), or by typing `0`–`9`, `a`–`f`; Backspace is *back*, Enter
//! is *OK*, Esc or Ctrl-C cancels. The entry is shown masked, with a count.
//! OK checks the entry with [`crate::label::parse`]; a refused entry stays
//! on screen with the reason (for a failed CRC, the digit it points at:
//! [`crate::label::locate_hex_error`]), to be corrected.
//!
//! The pure part is [`Keypad`] (button presses in, the entry out) and
//! [`layout`] (where each button is for a terminal size), so a test can
//! click at the centre of a button the way a user would. The UI is drawn on
//! `/dev/tty`, so stdout stays free for `--json`.
use std::fs::OpenOptions;
use std::io::Write;
use std::time::{Duration, Instant};

use crossterm::event::{
    self, DisableMouseCapture, EnableMouseCapture, Event, KeyCode, KeyEventKind, KeyModifiers,
    MouseButton, MouseEventKind,
};
use crossterm::execute;
use crossterm::terminal::{EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::backend::CrosstermBackend;
use ratatui::layout::Alignment;
/// The rectangle type of [`layout`], re-exported for callers that aim at buttons.
pub use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};
use ratatui::{Frame, Terminal};
use zeroize::Zeroizing;

use crate::label;
use crate::source::{KeySource, SourceError, SourceOptions};

/// A keypad button.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Button {
    /// A hex digit, 0..=15.
    Digit(u8),
    Back,
    Ok,
}

impl Button {
    pub fn caption(self) -> String {
        match self {
            Button::Digit(d) => format!("{d:X}"),
            Button::Back => "⌫ back".into(),
            Button::Ok => "OK".into(),
        }
    }
}

/// The longest entry: the decimal form's 41 digits.
pub const MAX_DIGITS: usize = label::DECIMAL_DIGITS;

/// The keypad's state: the digits entered and the last message shown.
#[derive(Default)]
pub struct Keypad {
    digits: Zeroizing<String>,
    message: Option<String>,
}

impl Keypad {
    pub fn new() -> Self {
        Self::default()
    }

    /// Digits entered so far.
    pub fn len(&self) -> usize {
        self.digits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digits.is_empty()
    }

    /// What the status line says (a refusal, or a hint).
    pub fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }

    /// Presses a button; returns the entry when OK accepts it.
    pub fn press(&mut self, b: Button) -> Option<String> {
        match b {
            Button::Digit(d) => {
                if self.digits.len() >= MAX_DIGITS {
                    self.message = Some(format!(
                        "already {MAX_DIGITS} digits, the longest form; press back to correct"
                    ));
                } else if let Some(c) = char::from_digit(u32::from(d), 16) {
                    self.digits.push(c.to_ascii_uppercase());
                    self.message = None;
                }
                None
            }
            Button::Back => {
                self.digits.pop();
                self.message = None;
                None
            }
            Button::Ok => match label::parse(&self.digits) {
                Ok(_) => Some(std::mem::take(&mut *self.digits)),
                Err(e) => {
                    let hint = label::locate_hex_error(&self.digits)
                        .map(|h| format!("; {h}"))
                        .unwrap_or_default();
                    self.message = Some(format!("refused: {e}{hint}"));
                    None
                }
            },
        }
    }

    /// The entry as shown: one dot per digit, in groups of four.
    pub fn masked(&self) -> String {
        label::group(&"•".repeat(self.digits.len()), 4, ' ')
    }
}

/// Button rows, top to bottom.
const ROWS: [&[(Button, u16)]; 5] = [
    &[
        (Button::Digit(1), 1),
        (Button::Digit(2), 1),
        (Button::Digit(3), 1),
        (Button::Digit(0xA), 1),
    ],
    &[
        (Button::Digit(4), 1),
        (Button::Digit(5), 1),
        (Button::Digit(6), 1),
        (Button::Digit(0xB), 1),
    ],
    &[
        (Button::Digit(7), 1),
        (Button::Digit(8), 1),
        (Button::Digit(9), 1),
        (Button::Digit(0xC), 1),
    ],
    &[
        (Button::Digit(0xD), 1),
        (Button::Digit(0), 1),
        (Button::Digit(0xE), 1),
        (Button::Digit(0xF), 1),
    ],
    &[(Button::Back, 2), (Button::Ok, 2)],
];

/// Rows above the buttons: title, entry, status.
const HEADER_ROWS: u16 = 7;
/// Smallest usable terminal.
pub const MIN_SIZE: (u16, u16) = (24, HEADER_ROWS + 5 * 3);

/// Where each button is drawn in a terminal of `area`. Pure, so tests can
/// aim clicks at button centres.
pub fn layout(area: Rect) -> Vec<(Button, Rect)> {
    let grid = Rect {
        x: area.x,
        y: area.y + HEADER_ROWS.min(area.height),
        width: area.width,
        height: area.height.saturating_sub(HEADER_ROWS),
    };
    let row_h = grid.height / ROWS.len() as u16;
    let col_w = grid.width / 4;
    let mut out = Vec::new();
    for (r, row) in ROWS.iter().enumerate() {
        let mut col = 0u16;
        for &(b, span) in row.iter() {
            out.push((
                b,
                Rect {
                    x: grid.x + col * col_w,
                    y: grid.y + r as u16 * row_h,
                    width: col_w * span,
                    height: row_h,
                },
            ));
            col += span;
        }
    }
    out
}

/// The button at a cell (0-based column and row), if any.
pub fn hit(area: Rect, column: u16, row: u16) -> Option<Button> {
    layout(area)
        .into_iter()
        .find(|(_, r)| {
            column >= r.x && column < r.x + r.width && row >= r.y && row < r.y + r.height
        })
        .map(|(b, _)| b)
}

fn draw(f: &mut Frame, pad: &Keypad) {
    let area = f.area();
    if area.width < MIN_SIZE.0 || area.height < MIN_SIZE.1 {
        f.render_widget(
            Paragraph::new(format!(
                "terminal too small for the keypad: {}x{}, need {}x{}",
                area.width, area.height, MIN_SIZE.0, MIN_SIZE.1
            ))
            .wrap(Wrap { trim: true }),
            area,
        );
        return;
    }
    let title = Rect { height: 1, ..area };
    f.render_widget(
        Paragraph::new("keyfleet — enter the initial key (36 hex or 41 decimal digits)")
            .style(Style::default().add_modifier(Modifier::BOLD)),
        title,
    );
    let entry = Rect {
        y: area.y + 1,
        height: 3,
        ..area
    };
    f.render_widget(
        Paragraph::new(pad.masked()).block(
            Block::default()
                .borders(Borders::ALL)
                .title(format!(" {} digits ", pad.len())),
        ),
        entry,
    );
    let status = Rect {
        y: area.y + 4,
        height: 3,
        ..area
    };
    let text = pad.message().unwrap_or(
        "tap or click the buttons, or type 0-9 a-f; Backspace = back, Enter = OK, Esc = cancel",
    );
    f.render_widget(Paragraph::new(text).wrap(Wrap { trim: true }), status);
    for (b, r) in layout(area) {
        // Centre the caption vertically too: tall buttons suit a touch screen.
        let pad = "\n".repeat(usize::from(r.height.saturating_sub(3) / 2));
        f.render_widget(
            Paragraph::new(format!("{pad}{}", b.caption()))
                .alignment(Alignment::Center)
                .block(Block::default().borders(Borders::ALL)),
            r,
        );
    }
}

struct KeypadSource;

/// The `--from` name and cargo feature.
pub const NAME: &str = "keypad";

/// The keypad in the [registry](crate::registry); it has no device to list.
pub static FACTORY: crate::registry::Factory = crate::registry::Factory {
    name: NAME,
    list: crate::registry::no_devices,
    open,
};

/// Opens the keypad. It needs a terminal (`/dev/tty`); `--replay` does not
/// apply (the keyboard source replays typed bytes).
pub fn open(opts: &SourceOptions) -> Result<Box<dyn KeySource>, SourceError> {
    if opts.replay.is_some() {
        return Err(SourceError::Malformed {
            what: "the keypad has no replay; replay typed input with --from keyboard --replay FILE"
                .into(),
        });
    }
    Ok(Box::new(KeypadSource))
}

/// Puts the terminal back however the keypad ends.
struct Screen {
    tty: std::fs::File,
}

impl Screen {
    fn enter() -> Result<Screen, SourceError> {
        let mut tty = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/tty")
            .map_err(|e| {
                SourceError::Io(std::io::Error::new(
                    e.kind(),
                    format!(
                        "no terminal to draw the keypad on (/dev/tty: {e}); run keyfleet in a \
                         terminal, or pipe the key in with --from keyboard"
                    ),
                ))
            })?;
        crossterm::terminal::enable_raw_mode()?;
        execute!(tty, EnterAlternateScreen, EnableMouseCapture)?;
        Ok(Screen { tty })
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(self.tty, DisableMouseCapture, LeaveAlternateScreen);
        let _ = crossterm::terminal::disable_raw_mode();
        let _ = self.tty.flush();
    }
}

impl KeySource for KeypadSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn read_raw(&mut self, timeout: Option<Duration>) -> Result<String, SourceError> {
        let screen = Screen::enter()?;
        let tty = screen.tty.try_clone()?;
        let mut term = Terminal::new(CrosstermBackend::new(tty))?;
        term.clear()?;
        let deadline = timeout.map(|t| (Instant::now() + t, t));
        let mut pad = Keypad::new();
        let result = loop {
            term.draw(|f| draw(f, &pad))?;
            if let Some((at, t)) = deadline {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() || !event::poll(left)? {
                    break Err(SourceError::Timeout(t));
                }
            }
            let button = match event::read()? {
                Event::Key(k) if k.kind == KeyEventKind::Press => {
                    let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
                    match k.code {
                        KeyCode::Char('c') if ctrl => break Err(SourceError::Cancelled),
                        KeyCode::Esc => break Err(SourceError::Cancelled),
                        KeyCode::Char(c) => c.to_digit(16).map(|d| Button::Digit(d as u8)),
                        KeyCode::Backspace | KeyCode::Delete => Some(Button::Back),
                        KeyCode::Enter => Some(Button::Ok),
                        _ => None,
                    }
                }
                Event::Mouse(m) if m.kind == MouseEventKind::Down(MouseButton::Left) => {
                    let size = term.size()?;
                    hit(Rect::new(0, 0, size.width, size.height), m.column, m.row)
                }
                _ => None,
            };
            if let Some(b) = button {
                if let Some(entry) = pad.press(b) {
                    break Ok(entry);
                }
            }
        };
        drop(term);
        drop(screen);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn press_all(pad: &mut Keypad, s: &str) -> Option<String> {
        let mut out = None;
        for c in s.chars() {
            out = pad.press(Button::Digit(c.to_digit(16).unwrap() as u8));
        }
        out
    }

    #[test]
    fn entry_back_and_ok() {
        let mut pad = Keypad::new();
        press_all(&mut pad, "83FED3407A939723A5C639B26916D505C3B7");
        assert_eq!(pad.len(), 36);
        assert_eq!(pad.press(Button::Ok), None);
        assert!(pad.message().unwrap().contains("CRC-16/X-25"));
        pad.press(Button::Back);
        press_all(&mut pad, "5");
        let got = pad.press(Button::Ok).unwrap();
        assert_eq!(got, "83FED3407A939723A5C639B26916D505C3B5");
        assert!(pad.is_empty());
    }

    #[test]
    fn short_entry_is_refused_with_count() {
        let mut pad = Keypad::new();
        press_all(&mut pad, "1234");
        assert_eq!(pad.press(Button::Ok), None);
        assert!(
            pad.message().unwrap().contains("found 4"),
            "{:?}",
            pad.message()
        );
    }

    #[test]
    fn entry_stops_at_41_digits() {
        let mut pad = Keypad::new();
        press_all(&mut pad, &"1".repeat(45));
        assert_eq!(pad.len(), 41);
        assert!(pad.message().unwrap().contains("41 digits"));
    }

    #[test]
    fn masked_shows_count_not_digits() {
        let mut pad = Keypad::new();
        press_all(&mut pad, "83FED");
        assert_eq!(pad.masked(), "•••• •");
    }

    #[test]
    fn layout_covers_each_button_once_and_hit_finds_it() {
        let area = Rect::new(0, 0, 80, 24);
        let l = layout(area);
        assert_eq!(l.len(), 18);
        for (b, r) in &l {
            assert!(r.width > 0 && r.height > 0);
            assert_eq!(hit(area, r.x + r.width / 2, r.y + r.height / 2), Some(*b));
        }
        // The header is no button.
        assert_eq!(hit(area, 10, 2), None);
        // No two buttons overlap.
        for (i, (_, a)) in l.iter().enumerate() {
            for (_, b) in &l[i + 1..] {
                assert!(a.intersection(*b).is_empty(), "{a:?} {b:?}");
            }
        }
    }
}
