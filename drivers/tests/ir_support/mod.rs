//! Shared by the IR integration tests: key forms, a person typing on a
//! remote, and writers for the formats real tools produce (`mode2`,
//! `mode2 -m`, `ir-ctl -r`, `ir-ctl -r --mode2`, the IR Toy's sample stream).
#![allow(dead_code)]

use keyfleet_drivers::ir::decode::{Frame, Protocol};
use keyfleet_drivers::ir::encode::{self, Receiver, SplitMix64};
use keyfleet_drivers::ir::irtoy;
use keyfleet_drivers::ir::timing::Timing;
use sha2::{Digest, Sha256};

/// CRC-16/X-25 (reflected 0x1021, init and xorout 0xFFFF).
pub fn crc16_x25(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xffff;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x8408
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The hex form: 32 hex digits of the key and its CRC-16/X-25 little-endian.
pub fn hex_form(key: &[u8; 16]) -> String {
    let crc = crc16_x25(key).to_le_bytes();
    key.iter()
        .chain(crc.iter())
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// The decimal form: 39 digits of the key as a big-endian integer and the
/// two ISO 7064 MOD 97-10 check digits.
pub fn decimal_form(key: &[u8; 16]) -> String {
    let digits = format!("{:039}", u128::from_be_bytes(*key));
    let r = digits
        .bytes()
        .chain(*b"00")
        .fold(0u32, |acc, d| (acc * 10 + u32::from(d - b'0')) % 97);
    format!("{digits}{:02}", 98 - r)
}

/// First 8 hex digits of SHA-256 over the key: what `--json` prints as key_check.
pub fn key_check(key: &[u8; 16]) -> String {
    Sha256::digest(key)
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn key_from_seed(seed: u64) -> [u8; 16] {
    let mut rng = SplitMix64(seed);
    let mut k = [0u8; 16];
    for chunk in k.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_be_bytes());
    }
    k
}

/// A remote: its protocol and which scancode each button sends.
pub struct Remote {
    pub protocol: Protocol,
    pub chars: Vec<(char, u32)>,
    pub finish: u32,
    pub erase: Option<u32>,
    pub noise: Option<u32>,
    pub cancel: Option<u32>,
    pub toggle: bool,
}

/// One button press: the scancode, how many frame periods it is held, and
/// the pause after it (µs) before the next press.
#[derive(Debug, Clone, Copy)]
pub struct Press {
    pub scancode: u32,
    pub repeats: u32,
    pub pause_us: u32,
}

impl Remote {
    pub fn code(&self, c: char) -> u32 {
        self.chars
            .iter()
            .find(|(k, _)| *k == c)
            .map(|(_, s)| *s)
            .unwrap_or_else(|| panic!("remote has no button {c:?}"))
    }

    /// A person entering `text` and pressing OK: now and then a wrong button
    /// corrected with the erase button, a button held a while, a stray
    /// button without meaning; pauses of 0.2 to 0.9 s.
    pub fn typing(&self, text: &str, rng: &mut SplitMix64, mistakes: bool) -> Vec<Press> {
        let mut out = Vec::new();
        let pause = |rng: &mut SplitMix64| 200_000 + (rng.next_u64() % 700_000) as u32;
        let hold = |rng: &mut SplitMix64| {
            if rng.next_u64() % 6 == 0 {
                1 + (rng.next_u64() % 4) as u32
            } else {
                0
            }
        };
        for (i, c) in text.chars().enumerate() {
            if mistakes {
                if let Some(erase) = self.erase {
                    if rng.next_u64() % 9 == 0 {
                        let wrong =
                            self.chars[(rng.next_u64() % self.chars.len() as u64) as usize].1;
                        out.push(Press {
                            scancode: wrong,
                            repeats: hold(rng),
                            pause_us: pause(rng),
                        });
                        out.push(Press {
                            scancode: erase,
                            repeats: 0,
                            pause_us: pause(rng),
                        });
                    }
                }
                if let Some(noise) = self.noise {
                    if i == text.len() / 2 {
                        out.push(Press {
                            scancode: noise,
                            repeats: 2,
                            pause_us: pause(rng),
                        });
                    }
                }
            }
            out.push(Press {
                scancode: self.code(c),
                repeats: hold(rng),
                pause_us: pause(rng),
            });
        }
        out.push(Press {
            scancode: self.finish,
            repeats: 0,
            pause_us: 300_000,
        });
        out
    }

    /// What the remote sends for each press (frames and the spaces between
    /// them, first pulse to last), flipping the toggle on every new press.
    pub fn send(&mut self, presses: &[Press]) -> Vec<(Vec<Timing>, u32)> {
        presses
            .iter()
            .map(|p| {
                self.toggle = !self.toggle;
                let toggle = self.toggle && has_toggle(self.protocol);
                let f = Frame {
                    protocol: self.protocol,
                    scancode: p.scancode,
                    toggle,
                };
                let mut t =
                    encode::press(f, p.repeats).unwrap_or_else(|| panic!("cannot encode {f:?}"));
                // The space after the last frame is the pause, written by the format.
                let last = t.pop();
                let trailing = match last {
                    Some(Timing::Space(d)) => d,
                    _ => 0,
                };
                (t, trailing + p.pause_us)
            })
            .collect()
    }
}

pub fn has_toggle(p: Protocol) -> bool {
    matches!(
        p,
        Protocol::Rc5 | Protocol::Rc5x20 | Protocol::Rc5Sz | Protocol::Rc6Mode0 | Protocol::Rc6Mce
    )
}

/// The recording formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// LIRC `mode2`: banner, `pulse`/`space` lines, real pauses as spaces.
    Mode2,
    /// `ir-ctl -r --mode2`: `timeout 125000` after each signal, the space after it dropped.
    IrCtlMode2,
    /// `ir-ctl -r`: one line of `+N -N` per signal, ended by `-125000`.
    IrCtl,
    /// `mode2 -m`: columns as mode2 prints them, starting with the idle gap.
    Mode2Columns,
    /// The IR Toy's sample stream after `S01`.
    IrToy,
}

/// Received signals (after the receiver model) written as the tool writes them.
pub fn write(format: Format, signals: &[(Vec<Timing>, u32)], device: &str) -> Vec<u8> {
    let mut s = String::new();
    match format {
        Format::Mode2 => {
            s.push_str(&format!("Using driver default on device {device}\n"));
            s.push_str(&format!(
                "Trying device: {device}\nUsing device: {device}\n"
            ));
            for (t, pause) in signals {
                s.push_str(&keyfleet_drivers::ir::mode2::to_text(t));
                s.push_str(&format!("space {pause}\n"));
            }
        }
        Format::IrCtlMode2 => {
            for (t, _) in signals {
                s.push_str(&keyfleet_drivers::ir::mode2::to_text(t));
                s.push_str("timeout 125000\n");
            }
        }
        Format::IrCtl => {
            for (t, _) in signals {
                for x in t {
                    match x {
                        Timing::Pulse(d) => s.push_str(&format!("+{d} ")),
                        Timing::Space(d) => s.push_str(&format!("-{d} ")),
                        _ => {}
                    }
                }
                s.push_str("-125000\n");
            }
        }
        Format::Mode2Columns => {
            // mode2.c print_mode2_data, opt_dmode 1, gap 10000.
            let mut bitno = 1;
            let mut all = vec![(false, 16_777_215u32)];
            for (t, pause) in signals {
                for x in t {
                    match *x {
                        Timing::Pulse(d) => all.push((true, d)),
                        Timing::Space(d) => all.push((false, d)),
                        _ => {}
                    }
                }
                all.push((false, *pause));
            }
            for (pulse, d) in all {
                s.push_str(&format!(" {d:8}"));
                bitno += 1;
                if pulse {
                    if bitno & 1 == 0 {
                        s.push_str("-pulse");
                    }
                } else {
                    if bitno & 1 == 1 {
                        s.push_str("-space");
                    }
                    if d > 10_000 || bitno >= 6 {
                        s.push('\n');
                        if d > 10_000 {
                            s.push('\n');
                        }
                        bitno = 0;
                    }
                }
            }
        }
        Format::IrToy => {
            let mut out = b"S01".to_vec();
            for (t, _) in signals {
                out.extend(irtoy::encode(t));
                out.extend(irtoy::encode(&[Timing::Timeout(0)]));
            }
            return out;
        }
    }
    s.into_bytes()
}

/// Put a burst of 3-12 short glitches (40-300 us pulses, 0.2-3 ms apart) in
/// the middle of every pause, as a lamp or sunlight on the receiver does.
pub fn add_glitches(signals: &mut [(Vec<Timing>, u32)], seed: u64) {
    let mut rng = SplitMix64(seed);
    for (t, pause) in signals.iter_mut() {
        let before = *pause / 2;
        t.push(Timing::Space(before));
        let mut used = before;
        for i in 0..3 + rng.next_u64() % 10 {
            if i > 0 {
                let gap = 200 + (rng.next_u64() % 2800) as u32;
                t.push(Timing::Space(gap));
                used += gap;
            }
            let glitch = 40 + (rng.next_u64() % 260) as u32;
            t.push(Timing::Pulse(glitch));
            used += glitch;
        }
        *pause = pause.saturating_sub(used).max(20_000);
    }
}

/// Apply a receiver model to each signal.
pub fn receive(rx: &mut Receiver, signals: Vec<(Vec<Timing>, u32)>) -> Vec<(Vec<Timing>, u32)> {
    signals
        .into_iter()
        .map(|(t, pause)| (rx.receive(&t), pause))
        .collect()
}
