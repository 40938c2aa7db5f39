//! `keyfleet read-key` run as a real process.
//!
//! The keyboard prompt and the on-screen keypad are driven through a real
//! pseudo-terminal (portable-pty): keystrokes and SGR mouse clicks go in as
//! a terminal sends them, and what the program draws is read back through a
//! terminal emulator (vt100), so the tests see the screen an installer sees.
#![cfg(all(feature = "keyboard", feature = "keypad"))]

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyfleet_core::label::{self, InitialKey, NodeId};
use keyfleet_drivers::keypad::{self, Button, Rect};
use portable_pty::{native_pty_system, Child, CommandBuilder, MasterPty, PtySize};

const ROWS: u16 = 24;
const COLS: u16 = 80;
/// The Zigbee install code used throughout; its check value is fixed by SHA-256.
const ZIGBEE_HEX: &str = "83FED3407A939723A5C639B26916D505C3B5";
const ZIGBEE_CHECK: &str = "0cc7776b";

struct Term {
    child: Box<dyn Child + Send + Sync>,
    writer: Box<dyn Write + Send>,
    screen: Arc<Mutex<vt100::Parser>>,
    raw: Arc<Mutex<Vec<u8>>>,
    _master: Box<dyn MasterPty + Send>,
}

impl Term {
    fn spawn(args: &[&str]) -> Term {
        let pty = native_pty_system()
            .openpty(PtySize {
                rows: ROWS,
                cols: COLS,
                pixel_width: 0,
                pixel_height: 0,
            })
            .expect("openpty");
        let mut cmd = CommandBuilder::new(env!("CARGO_BIN_EXE_keyfleet"));
        cmd.args(args);
        cmd.env("TERM", "xterm-256color");
        let child = pty.slave.spawn_command(cmd).expect("spawn keyfleet");
        drop(pty.slave);
        let mut reader = pty.master.try_clone_reader().expect("reader");
        let writer = pty.master.take_writer().expect("writer");
        let screen = Arc::new(Mutex::new(vt100::Parser::new(ROWS, COLS, 0)));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (screen.clone(), raw.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s.lock().unwrap().process(&buf[..n]);
                r.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Term {
            child,
            writer,
            screen,
            raw,
            _master: pty.master,
        }
    }

    fn contents(&self) -> String {
        self.screen.lock().unwrap().screen().contents()
    }

    fn raw_text(&self) -> String {
        String::from_utf8_lossy(&self.raw.lock().unwrap()).into_owned()
    }

    /// Waits until the screen shows `needle`.
    fn wait_for(&self, needle: &str) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if self.contents().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "screen never showed {needle:?}; it shows:\n{}",
            self.contents()
        );
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
        self.writer.flush().unwrap();
        // Let the program draw before the next input, as a person's pace would.
        std::thread::sleep(Duration::from_millis(15));
    }

    /// A left click (press and release) at a 0-based cell, in the SGR
    /// encoding (mode 1006) that xterm, kitty, foot and the Linux console's
    /// gpm clients send.
    fn click(&mut self, col: u16, row: u16) {
        let press = format!("\x1b[<0;{};{}M", col + 1, row + 1);
        let release = format!("\x1b[<0;{};{}m", col + 1, row + 1);
        self.send(press.as_bytes());
        self.send(release.as_bytes());
    }

    fn click_button(&mut self, b: Button) {
        let (_, r) = keypad::layout(Rect::new(0, 0, COLS, ROWS))
            .into_iter()
            .find(|(x, _)| *x == b)
            .expect("button on the layout");
        self.click(r.x + r.width / 2, r.y + r.height / 2);
    }

    /// Waits for the process to end; returns its exit code.
    fn wait(&mut self) -> u32 {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last output.
                std::thread::sleep(Duration::from_millis(100));
                return st.exit_code();
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                panic!("keyfleet did not exit; screen:\n{}", self.contents());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The JSON object keyfleet printed last.
    fn json(&self) -> serde_json::Value {
        let text = self.raw_text();
        let start = text.rfind("{\"").expect("a JSON object in the output");
        let end = start + text[start..].find('}').expect("closing brace") + 1;
        serde_json::from_str(&text[start..end]).expect("valid JSON")
    }
}

fn digit_button(c: char) -> Button {
    Button::Digit(c.to_digit(16).unwrap() as u8)
}

#[test]
fn keypad_by_mouse_clicks_reads_the_key() {
    let mut t = Term::spawn(&["read-key", "--from", "keypad", "--json"]);
    t.wait_for("enter the initial key");
    for c in ZIGBEE_HEX.chars() {
        t.click_button(digit_button(c));
    }
    t.wait_for(" 36 digits ");
    // The entry is masked: the screen shows dots, not the digits.
    assert!(!t.contents().contains("83FE"), "{}", t.contents());
    t.click_button(Button::Ok);
    assert_eq!(t.wait(), 0, "screen:\n{}", t.contents());
    let v = t.json();
    assert_eq!(v["source"], "keypad");
    assert_eq!(v["key_check"], ZIGBEE_CHECK);
    assert!(v["node_id"].is_null());
    assert!(!t.raw_text().contains(ZIGBEE_HEX));
}

#[test]
fn keypad_refuses_a_bad_crc_on_screen_then_takes_the_correction() {
    let mut t = Term::spawn(&["read-key", "--from", "keypad", "--json"]);
    t.wait_for("enter the initial key");
    // Typed on a keyboard, lowercase, the last digit wrong.
    let wrong = format!("{}6", &ZIGBEE_HEX[..35]).to_lowercase();
    t.send(wrong.as_bytes());
    t.send(b"\r");
    t.wait_for("CRC-16/X-25 check failed");
    // The check points at the last digit (digit 36).
    t.wait_for("hex digit 36 of 36");
    // Back by a click on the back button, the right digit by a click, OK by Enter.
    t.click_button(Button::Back);
    t.wait_for(" 35 digits ");
    t.click_button(Button::Digit(5));
    t.send(b"\r");
    assert_eq!(t.wait(), 0, "screen:\n{}", t.contents());
    assert_eq!(t.json()["key_check"], ZIGBEE_CHECK);
}

#[test]
fn keypad_takes_the_decimal_form() {
    let key = InitialKey::from_bytes([7u8; 16]);
    let dec = label::decimal_form(&key);
    let mut t = Term::spawn(&["read-key", "--from", "keypad", "--json"]);
    t.wait_for("enter the initial key");
    for c in dec.chars() {
        t.click_button(digit_button(c));
    }
    t.wait_for(" 41 digits ");
    t.click_button(Button::Ok);
    assert_eq!(t.wait(), 0, "screen:\n{}", t.contents());
    assert_eq!(t.json()["key_check"], key.fingerprint());
}

#[test]
fn keypad_escape_cancels_with_exit_5() {
    let mut t = Term::spawn(&["read-key", "--from", "keypad"]);
    t.wait_for("enter the initial key");
    t.send(b"12");
    t.send(b"\x1b");
    assert_eq!(t.wait(), 5);
    assert!(t.contents().contains("cancelled"), "{}", t.contents());
}

#[test]
fn keypad_timeout_exits_4() {
    let mut t = Term::spawn(&["read-key", "--from", "keypad", "--timeout", "0.5"]);
    assert_eq!(t.wait(), 4);
    assert!(t.contents().contains("no input within"), "{}", t.contents());
}

#[test]
fn keyboard_prompt_does_not_echo_and_counts() {
    let id = NodeId::parse("pump-07").unwrap();
    let key = InitialKey::from_bytes([0x42; 16]);
    let typed = label::label(&id, &key);
    let mut t = Term::spawn(&["read-key", "--from", "keyboard", "--json"]);
    t.wait_for("typing is not shown");
    t.send(&typed.as_bytes()[..10]);
    t.wait_for("10 characters");
    // A typo and its correction.
    t.send(b"X\x7f");
    t.send(&typed.as_bytes()[10..]);
    t.wait_for(&format!("{} characters", typed.chars().count()));
    let shown = t.contents();
    assert!(!shown.contains("KF1"), "typed text echoed:\n{shown}");
    assert!(!shown.contains("pump"), "typed text echoed:\n{shown}");
    t.send(b"\r");
    assert_eq!(t.wait(), 0, "screen:\n{}", t.contents());
    let v = t.json();
    assert_eq!(v["source"], "keyboard");
    assert_eq!(v["node_id"], "pump-07");
    assert_eq!(v["key_check"], key.fingerprint());
    assert!(!t.raw_text().contains(&label::hex_form(&key)));
}

#[test]
fn keyboard_prompt_keeps_a_refused_entry_for_correction() {
    let mut t = Term::spawn(&["read-key", "--from", "keyboard", "--json"]);
    t.wait_for("typing is not shown");
    // A wrong length first: the reason shows and the prompt stays.
    t.send(b"1234\r");
    t.wait_for("found 4");
    assert!(t.contents().contains("wrong length"), "{}", t.contents());
    assert!(t.child.try_wait().unwrap().is_none(), "exited on a refusal");
    // Ctrl-U clears; the hex form with hex digit 10 mistyped.
    t.send(b"\x15");
    let mut typed: Vec<u8> = ZIGBEE_HEX.as_bytes().to_vec();
    typed[9] = if typed[9] == b'0' { b'1' } else { b'0' };
    t.send(&typed);
    t.wait_for("36 characters");
    t.send(b"\r");
    t.wait_for("CRC-16/X-25 check failed");
    t.wait_for("character 10 (hex digit 10 of 36)");
    assert!(
        t.child.try_wait().unwrap().is_none(),
        "exited on a bad check digit"
    );
    // Back 26 characters with the arrow key: the cursor is after character 10.
    for _ in 0..26 {
        t.send(b"\x1b[D");
    }
    t.wait_for("36 characters, cursor after character 10");
    // Erase it, type the right digit, Enter: the other 35 are not typed again.
    t.send(b"\x7f");
    t.send(&ZIGBEE_HEX.as_bytes()[9..10]);
    t.send(b"\r");
    assert_eq!(t.wait(), 0, "screen:\n{}", t.contents());
    assert_eq!(t.json()["key_check"], ZIGBEE_CHECK);
    // Neither the digits nor the mistyped form were ever shown.
    assert!(!t.raw_text().contains(&ZIGBEE_HEX[..8]));
}

#[test]
fn keyboard_prompt_esc_after_a_refusal_cancels_with_exit_5() {
    let mut t = Term::spawn(&["read-key", "--from", "keyboard"]);
    t.wait_for("typing is not shown");
    t.send(b"1234\r");
    t.wait_for("wrong length");
    t.send(b"\x1b");
    assert_eq!(t.wait(), 5, "screen:\n{}", t.contents());
    assert!(t.contents().contains("cancelled"), "{}", t.contents());
}
