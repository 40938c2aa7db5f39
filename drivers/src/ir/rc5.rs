//! RC5, RC5X (20 bits) and the 15-bit StreamZap variant.
//!
//! A port of the kernel's `drivers/media/rc/ir-rc5-decoder.c`: Manchester
//! code with an 889 µs half-bit; a 1 is space then pulse, so the first start
//! bit's leading space is invisible. Events are consumed half-bit by
//! half-bit (a 2-unit pulse covers the end of one bit and the start of the
//! next); every margin is ½ unit. After 8 bits a space of 4 units marks RC5X.
//! A space of 6 units or more after a bit ends the frame. Scancodes, toggle
//! and the inverted second start bit (command bit 6) as in the kernel:
//! - RC5 (14 bits): `system << 8 | command`;
//! - RC5X-20: `system << 16 | command << 8 | xdata`;
//! - RC5-SZ (15 bits): `system << 6 | command`, system with 7 bits.
use super::decode::{Decoded, Frame, Protocol};
use super::timing::{eq_margin, geq_margin, RawEvent};

/// The RC5 half-bit in microseconds.
pub const UNIT: u32 = 889;
const NBITS: u32 = 14;
const SZ_NBITS: u32 = 15;
const X_NBITS: u32 = 20;
const CHECK_X_NBITS: u32 = 8;
const BIT_START: u32 = UNIT;
const BIT_END: u32 = UNIT;
const X_SPACE: u32 = 4 * UNIT;
const TRAILER: u32 = 6 * UNIT;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    Inactive,
    BitStart,
    BitEnd,
    CheckX,
    Finished,
}

/// The RC5 decoder's state.
#[derive(Debug)]
pub struct Rc5Decoder {
    state: State,
    bits: u32,
    count: u32,
    is_x: bool,
    /// RC5 and RC5X enabled.
    rc5: bool,
    /// RC5-SZ enabled.
    sz: bool,
}

impl Default for Rc5Decoder {
    /// RC5 and RC5X, not RC5-SZ (as `ir-keytable -p rc-5` would).
    fn default() -> Self {
        Rc5Decoder::new(true, false)
    }
}

impl Rc5Decoder {
    /// A decoder reporting RC5/RC5X frames when `rc5`, RC5-SZ frames when `sz`.
    pub fn new(rc5: bool, sz: bool) -> Self {
        Rc5Decoder {
            state: State::Inactive,
            bits: 0,
            count: 0,
            is_x: false,
            rc5,
            sz,
        }
    }

    /// Forget a frame in progress.
    pub fn reset(&mut self) {
        self.state = State::Inactive;
    }

    /// Feed one pulse or space.
    pub fn feed(&mut self, ev: RawEvent) -> Option<Decoded> {
        let pulse = ev.pulse;
        let mut d = ev.duration;
        if !geq_margin(d, UNIT, UNIT / 2) {
            return self.fail();
        }
        loop {
            if !geq_margin(d, UNIT, UNIT / 2) {
                return None;
            }
            match self.state {
                State::Inactive => {
                    if !pulse {
                        return self.fail();
                    }
                    self.state = State::BitStart;
                    self.count = 1;
                    self.bits = 0;
                    d = d.saturating_sub(BIT_START);
                }
                State::BitStart => {
                    if !pulse && geq_margin(d, TRAILER, UNIT / 2) {
                        self.state = State::Finished;
                        continue;
                    }
                    if !eq_margin(d, BIT_START, UNIT / 2) {
                        return self.fail();
                    }
                    self.bits <<= 1;
                    if !pulse {
                        self.bits |= 1;
                    }
                    self.count += 1;
                    self.state = State::BitEnd;
                    return None;
                }
                State::BitEnd => {
                    self.state = if self.count == CHECK_X_NBITS {
                        State::CheckX
                    } else {
                        State::BitStart
                    };
                    d = d.saturating_sub(BIT_END);
                }
                State::CheckX => {
                    if !pulse && geq_margin(d, X_SPACE, UNIT / 2) {
                        self.is_x = true;
                        d = d.saturating_sub(X_SPACE);
                    } else {
                        self.is_x = false;
                    }
                    self.state = State::BitStart;
                }
                State::Finished => {
                    if pulse {
                        return self.fail();
                    }
                    self.state = State::Inactive;
                    return self.frame().map(Decoded::Key);
                }
            }
        }
    }

    fn frame(&self) -> Option<Frame> {
        let b = self.bits;
        let (protocol, scancode, toggle) = if self.rc5 && self.is_x && self.count == X_NBITS {
            let xdata = b & 0x3f;
            let mut command = (b & 0xfc0) >> 6;
            let system = (b & 0x1f000) >> 12;
            let toggle = b & 0x20000 != 0;
            if b & 0x40000 == 0 {
                command += 0x40;
            }
            (
                Protocol::Rc5x20,
                system << 16 | command << 8 | xdata,
                toggle,
            )
        } else if self.rc5 && !self.is_x && self.count == NBITS {
            let mut command = b & 0x3f;
            let system = (b & 0x7c0) >> 6;
            let toggle = b & 0x800 != 0;
            if b & 0x1000 == 0 {
                command += 0x40;
            }
            (Protocol::Rc5, system << 8 | command, toggle)
        } else if self.sz && !self.is_x && self.count == SZ_NBITS {
            let command = b & 0x3f;
            let system = (b & 0x2fc0) >> 6;
            let toggle = b & 0x1000 != 0;
            (Protocol::Rc5Sz, system << 6 | command, toggle)
        } else {
            return None;
        };
        Some(Frame {
            protocol,
            scancode,
            toggle,
        })
    }

    fn fail(&mut self) -> Option<Decoded> {
        self.state = State::Inactive;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Manchester by hand for a 14-bit RC5 word (bits MSB first, S1 included).
    fn manchester(word: u32, nbits: u32) -> Vec<(bool, u32)> {
        let mut halves = Vec::new();
        for i in (0..nbits).rev() {
            let one = word >> i & 1 == 1;
            halves.push(!one);
            halves.push(one);
        }
        // The leading space of the first (always 1) start bit is not seen.
        let mut out: Vec<(bool, u32)> = Vec::new();
        for &h in &halves[1..] {
            match out.last_mut() {
                Some(last) if last.0 == h => last.1 += 889,
                _ => out.push((h, 889)),
            }
        }
        out.push((false, 90_000));
        out
    }

    #[test]
    fn rc5_frame_decodes_to_kernel_scancode_and_toggle() {
        // S1=1, S2=1 (command < 64), toggle=1, system 0x1e, command 0x01.
        let word = 1 << 13 | 1 << 12 | 1 << 11 | 0x1e << 6 | 0x01;
        let mut d = Rc5Decoder::default();
        let got: Vec<_> = manchester(word, 14)
            .into_iter()
            .filter_map(|(pulse, duration)| d.feed(RawEvent { pulse, duration }))
            .collect();
        assert_eq!(
            got,
            vec![Decoded::Key(Frame {
                protocol: Protocol::Rc5,
                scancode: 0x1e01,
                toggle: true
            })]
        );
    }

    #[test]
    fn cleared_second_start_bit_adds_64_to_the_command() {
        let word = 1 << 13 | 0x05 << 6 | 0x02;
        let mut d = Rc5Decoder::default();
        let got: Vec<_> = manchester(word, 14)
            .into_iter()
            .filter_map(|(pulse, duration)| d.feed(RawEvent { pulse, duration }))
            .collect();
        assert_eq!(
            got,
            vec![Decoded::Key(Frame {
                protocol: Protocol::Rc5,
                scancode: 0x0542,
                toggle: false
            })]
        );
    }
}
