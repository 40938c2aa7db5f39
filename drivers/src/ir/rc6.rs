//! RC6 mode 0 and mode 6A (20, 24 and 32 bits, and the MCE variant).
//!
//! A port of the kernel's `drivers/media/rc/ir-rc6-decoder.c`: a 444 µs unit;
//! leader pulse 6 units (± 1 unit, "some hardware takes some time to adjust"),
//! leader space 2 units; start bit and 3 mode bits of 1 unit per half, a
//! double-width trailer ("toggle") bit, then the body; a 1 is pulse then
//! space. All other margins are ½ unit. Mode 0 has 16 body bits and the
//! toggle in the trailer bit; mode 6A (trailer bit 0) ends at a space of 6
//! units or more. A 32-bit 6A body whose top half is a known MCE customer
//! code (0x800f, 0x8034, 0x8046) is RC6-MCE, its toggle in body bit 15,
//! cleared from the scancode.
use super::decode::{Decoded, Frame, Protocol};
use super::timing::{eq_margin, geq_margin, RawEvent};

/// The RC6 unit in microseconds.
pub const UNIT: u32 = 444;
const HEADER_NBITS: u32 = 4;
const MODE0_NBITS: u32 = 16;
const MODE6A_NBITS: u32 = 128;
const PREFIX_PULSE: u32 = 6 * UNIT;
const PREFIX_SPACE: u32 = 2 * UNIT;
const BIT_START: u32 = UNIT;
const BIT_END: u32 = UNIT;
const TOGGLE_START: u32 = 2 * UNIT;
const TOGGLE_END: u32 = 2 * UNIT;
const SUFFIX_SPACE: u32 = 6 * UNIT;
const MODE_MASK: u8 = 0x07;
const STARTBIT_MASK: u8 = 0x08;
/// Toggle bit of the MCE variant, in the body.
pub const MCE_TOGGLE_MASK: u32 = 0x8000;
const LCC_MASK: u32 = 0xffff_0000;
/// Customer codes that make a 32-bit 6A frame an MCE one.
pub const MCE_CUSTOMER_CODES: [u32; 3] = [0x800f_0000, 0x8034_0000, 0x8046_0000];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    Inactive,
    PrefixSpace,
    HeaderBitStart,
    HeaderBitEnd,
    ToggleStart,
    ToggleEnd,
    BodyBitStart,
    BodyBitEnd,
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Zero,
    SixA,
    Unknown,
}

/// The RC6 decoder's state.
#[derive(Debug, Default)]
pub struct Rc6Decoder {
    state: State,
    header: u8,
    body: u32,
    toggle: bool,
    count: u32,
    wanted_bits: u32,
}

impl Rc6Decoder {
    /// Forget a frame in progress.
    pub fn reset(&mut self) {
        self.state = State::Inactive;
    }

    fn mode(&self) -> Mode {
        match self.header & MODE_MASK {
            0 => Mode::Zero,
            6 if !self.toggle => Mode::SixA,
            _ => Mode::Unknown,
        }
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
                    if !pulse || !eq_margin(d, PREFIX_PULSE, UNIT) {
                        return self.fail();
                    }
                    self.state = State::PrefixSpace;
                    self.count = 0;
                    return None;
                }
                State::PrefixSpace => {
                    if pulse || !eq_margin(d, PREFIX_SPACE, UNIT / 2) {
                        return self.fail();
                    }
                    self.state = State::HeaderBitStart;
                    self.header = 0;
                    return None;
                }
                State::HeaderBitStart => {
                    if !eq_margin(d, BIT_START, UNIT / 2) {
                        return self.fail();
                    }
                    self.header <<= 1;
                    if pulse {
                        self.header |= 1;
                    }
                    self.count += 1;
                    self.state = State::HeaderBitEnd;
                    return None;
                }
                State::HeaderBitEnd => {
                    self.state = if self.count == HEADER_NBITS {
                        State::ToggleStart
                    } else {
                        State::HeaderBitStart
                    };
                    d = d.saturating_sub(BIT_END);
                }
                State::ToggleStart => {
                    if !eq_margin(d, TOGGLE_START, UNIT / 2) {
                        return self.fail();
                    }
                    self.toggle = pulse;
                    self.state = State::ToggleEnd;
                    return None;
                }
                State::ToggleEnd => {
                    if self.header & STARTBIT_MASK == 0 {
                        return self.fail();
                    }
                    self.state = State::BodyBitStart;
                    d = d.saturating_sub(TOGGLE_END);
                    self.count = 0;
                    self.body = 0;
                    self.wanted_bits = match self.mode() {
                        Mode::Zero => MODE0_NBITS,
                        Mode::SixA => MODE6A_NBITS,
                        Mode::Unknown => return self.fail(),
                    };
                }
                State::BodyBitStart => {
                    if eq_margin(d, BIT_START, UNIT / 2) {
                        // Bits past 32 do not fit the body; the frame is refused later.
                        if self.count < 32 {
                            self.body <<= 1;
                            if pulse {
                                self.body |= 1;
                            }
                        }
                        self.count += 1;
                        self.state = State::BodyBitEnd;
                        return None;
                    } else if self.mode() == Mode::SixA
                        && !pulse
                        && geq_margin(d, SUFFIX_SPACE, UNIT / 2)
                    {
                        self.state = State::Finished;
                        continue;
                    }
                    return self.fail();
                }
                State::BodyBitEnd => {
                    self.state = if self.count == self.wanted_bits {
                        State::Finished
                    } else {
                        State::BodyBitStart
                    };
                    d = d.saturating_sub(BIT_END);
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
        let mut scancode = self.body;
        let (protocol, toggle) = match self.mode() {
            Mode::Zero => (Protocol::Rc6Mode0, self.toggle),
            Mode::SixA => match self.count {
                20 => (Protocol::Rc6_6a20, false),
                24 => (Protocol::Rc6_6a24, false),
                32 if MCE_CUSTOMER_CODES.contains(&(scancode & LCC_MASK)) => {
                    let toggle = scancode & MCE_TOGGLE_MASK != 0;
                    scancode &= !MCE_TOGGLE_MASK;
                    (Protocol::Rc6Mce, toggle)
                }
                32 => (Protocol::Rc6_6a32, false),
                _ => return None,
            },
            Mode::Unknown => return None,
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

    /// Build an RC6 frame by hand from half-bit levels (not with our encoder).
    fn frame(mode: u8, toggle: bool, body: u32, nbits: u32) -> Vec<(bool, u32)> {
        let mut halves: Vec<(bool, u32)> = vec![(true, 6 * 444), (false, 2 * 444)];
        let bit = |one: bool, w: u32, h: &mut Vec<(bool, u32)>| {
            h.push((one, w));
            h.push((!one, w));
        };
        bit(true, 444, &mut halves);
        for i in (0..3).rev() {
            bit(mode >> i & 1 == 1, 444, &mut halves);
        }
        bit(toggle, 888, &mut halves);
        for i in (0..nbits).rev() {
            bit(body >> i & 1 == 1, 444, &mut halves);
        }
        halves.push((false, 100_000));
        let mut out: Vec<(bool, u32)> = Vec::new();
        for (p, d) in halves {
            match out.last_mut() {
                Some(last) if last.0 == p => last.1 += d,
                _ => out.push((p, d)),
            }
        }
        out
    }

    fn decode(t: &[(bool, u32)]) -> Vec<Decoded> {
        let mut d = Rc6Decoder::default();
        t.iter()
            .filter_map(|&(pulse, duration)| d.feed(RawEvent { pulse, duration }))
            .collect()
    }

    #[test]
    fn mce_frame_with_toggle_in_body() {
        let got = decode(&frame(6, false, 0x800f_8401, 32));
        assert_eq!(
            got,
            vec![Decoded::Key(Frame {
                protocol: Protocol::Rc6Mce,
                scancode: 0x800f_0401,
                toggle: true
            })]
        );
    }

    #[test]
    fn mode0_frame_with_toggle_in_trailer_bit() {
        let got = decode(&frame(0, true, 0x0c05, 16));
        assert_eq!(
            got,
            vec![Decoded::Key(Frame {
                protocol: Protocol::Rc6Mode0,
                scancode: 0x0c05,
                toggle: true
            })]
        );
    }

    #[test]
    fn other_6a_lengths() {
        assert_eq!(
            decode(&frame(6, false, 0x12345, 20)),
            vec![Decoded::Key(Frame {
                protocol: Protocol::Rc6_6a20,
                scancode: 0x12345,
                toggle: false
            })]
        );
        assert_eq!(
            decode(&frame(6, false, 0x1234_5678, 32)),
            vec![Decoded::Key(Frame {
                protocol: Protocol::Rc6_6a32,
                scancode: 0x1234_5678,
                toggle: false
            })]
        );
        // 6A with the trailer bit set is an unknown mode: refused.
        assert!(decode(&frame(6, true, 0x1234_5678, 32)).is_empty());
    }
}
