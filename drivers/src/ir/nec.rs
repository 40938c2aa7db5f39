//! NEC, NEC extended and 32-bit NEC, with repeat codes.
//!
//! A port of the state machine in the kernel's `drivers/media/rc/ir-nec-decoder.c`
//! with its unit (563 µs) and margins: header pulse 16 units (± 2 units; 8 units
//! ± ½ for the NECX header), header space 8 units (± 1) or 4 units for a repeat
//! code, bit pulse 1 unit, bit space 1 or 3 units, trailer pulse 1 unit, then a
//! space of at least 10 units (all ± ½ unit unless said). 32 bits are sent
//! least significant bit first per byte: address, address inverted, command,
//! command inverted. The scancode follows `ir_nec_bytes_to_scancode`
//! (`include/media/rc-core.h`):
//! - command check fails: NEC32, `not_address << 24 | address << 16 | not_command << 8 | command`;
//! - address check fails: NECX, `address << 16 | not_address << 8 | command`;
//! - otherwise: NEC, `address << 8 | command`.
use super::decode::{Decoded, Frame, Protocol};
use super::timing::{eq_margin, geq_margin, RawEvent};

/// The NEC unit in microseconds.
pub const UNIT: u32 = 563;
const NBITS: u32 = 32;
const HEADER_PULSE: u32 = 16 * UNIT;
const NECX_HEADER_PULSE: u32 = 8 * UNIT;
const HEADER_SPACE: u32 = 8 * UNIT;
const REPEAT_SPACE: u32 = 4 * UNIT;
const BIT_PULSE: u32 = UNIT;
const BIT_0_SPACE: u32 = UNIT;
const BIT_1_SPACE: u32 = 3 * UNIT;
const TRAILER_PULSE: u32 = UNIT;
const TRAILER_SPACE: u32 = 10 * UNIT;
const NECX_REPEAT_BITS: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    Inactive,
    HeaderSpace,
    BitPulse,
    BitSpace,
    TrailerPulse,
    TrailerSpace,
}

/// The NEC decoder's state.
#[derive(Debug, Default)]
pub struct NecDecoder {
    state: State,
    count: u32,
    bits: u32,
    is_nec_x: bool,
    necx_repeat: bool,
}

impl NecDecoder {
    /// Forget a frame in progress.
    pub fn reset(&mut self) {
        self.state = State::Inactive;
    }

    /// Feed one pulse or space.
    pub fn feed(&mut self, ev: RawEvent) -> Option<Decoded> {
        let d = ev.duration;
        match self.state {
            State::Inactive => {
                if !ev.pulse {
                    return self.fail();
                }
                if eq_margin(d, HEADER_PULSE, UNIT * 2) {
                    self.is_nec_x = false;
                    self.necx_repeat = false;
                } else if eq_margin(d, NECX_HEADER_PULSE, UNIT / 2) {
                    self.is_nec_x = true;
                } else {
                    return self.fail();
                }
                self.count = 0;
                self.state = State::HeaderSpace;
                None
            }
            State::HeaderSpace => {
                if ev.pulse {
                    return self.fail();
                }
                if eq_margin(d, HEADER_SPACE, UNIT) {
                    self.bits = 0;
                    self.state = State::BitPulse;
                } else if eq_margin(d, REPEAT_SPACE, UNIT / 2) {
                    self.state = State::TrailerPulse;
                } else {
                    return self.fail();
                }
                None
            }
            State::BitPulse => {
                if !ev.pulse || !eq_margin(d, BIT_PULSE, UNIT / 2) {
                    return self.fail();
                }
                self.state = State::BitSpace;
                None
            }
            State::BitSpace => {
                if ev.pulse {
                    return self.fail();
                }
                if self.necx_repeat
                    && self.count == NECX_REPEAT_BITS
                    && geq_margin(d, TRAILER_SPACE, UNIT / 2)
                {
                    self.state = State::Inactive;
                    return Some(Decoded::Repeat);
                } else if self.count > NECX_REPEAT_BITS {
                    self.necx_repeat = false;
                }
                self.bits <<= 1;
                if eq_margin(d, BIT_1_SPACE, UNIT / 2) {
                    self.bits |= 1;
                } else if !eq_margin(d, BIT_0_SPACE, UNIT / 2) {
                    return self.fail();
                }
                self.count += 1;
                self.state = if self.count == NBITS {
                    State::TrailerPulse
                } else {
                    State::BitPulse
                };
                None
            }
            State::TrailerPulse => {
                if !ev.pulse || !eq_margin(d, TRAILER_PULSE, UNIT / 2) {
                    return self.fail();
                }
                self.state = State::TrailerSpace;
                None
            }
            State::TrailerSpace => {
                if ev.pulse || !geq_margin(d, TRAILER_SPACE, UNIT / 2) {
                    return self.fail();
                }
                self.state = State::Inactive;
                if self.count == NBITS {
                    let b = self.bits;
                    let address = ((b >> 24) as u8).reverse_bits();
                    let not_address = ((b >> 16) as u8).reverse_bits();
                    let command = ((b >> 8) as u8).reverse_bits();
                    let not_command = (b as u8).reverse_bits();
                    let (protocol, scancode) =
                        bytes_to_scancode(address, not_address, command, not_command);
                    if self.is_nec_x {
                        self.necx_repeat = true;
                    }
                    Some(Decoded::Key(Frame {
                        protocol,
                        scancode,
                        toggle: false,
                    }))
                } else {
                    Some(Decoded::Repeat)
                }
            }
        }
    }

    fn fail(&mut self) -> Option<Decoded> {
        self.state = State::Inactive;
        None
    }
}

/// The kernel's `ir_nec_bytes_to_scancode`.
pub fn bytes_to_scancode(
    address: u8,
    not_address: u8,
    command: u8,
    not_command: u8,
) -> (Protocol, u32) {
    let (a, na, c, nc) = (
        u32::from(address),
        u32::from(not_address),
        u32::from(command),
        u32::from(not_command),
    );
    if command ^ not_command != 0xff {
        (Protocol::Nec32, na << 24 | a << 16 | nc << 8 | c)
    } else if address ^ not_address != 0xff {
        (Protocol::NecX, a << 16 | na << 8 | c)
    } else {
        (Protocol::Nec, a << 8 | c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(d: &mut NecDecoder, timings: &[(bool, u32)]) -> Vec<Decoded> {
        timings
            .iter()
            .filter_map(|&(pulse, duration)| d.feed(RawEvent { pulse, duration }))
            .collect()
    }

    /// A textbook NEC frame built by hand (not with our encoder): address
    /// 0x04, command 0x08, nominal 562.5 µs unit.
    #[test]
    fn textbook_nec_frame_and_repeat() {
        let mut t = vec![(true, 9000), (false, 4500)];
        for byte in [0x04u8, !0x04, 0x08, !0x08] {
            for i in 0..8 {
                t.push((true, 562));
                t.push((false, if byte >> i & 1 == 1 { 1687 } else { 562 }));
            }
        }
        t.push((true, 562));
        t.push((false, 40_000));
        t.extend([(true, 9000), (false, 2250), (true, 562), (false, 96_000)]);
        let mut d = NecDecoder::default();
        assert_eq!(
            run(&mut d, &t),
            vec![
                Decoded::Key(Frame {
                    protocol: Protocol::Nec,
                    scancode: 0x0408,
                    toggle: false
                }),
                Decoded::Repeat
            ]
        );
    }

    #[test]
    fn scancode_variants_follow_rc_core() {
        assert_eq!(
            bytes_to_scancode(0x04, 0xfb, 0x08, 0xf7),
            (Protocol::Nec, 0x0408)
        );
        assert_eq!(
            bytes_to_scancode(0x04, 0x12, 0x08, 0xf7),
            (Protocol::NecX, 0x041208)
        );
        assert_eq!(
            bytes_to_scancode(0xee, 0x87, 0x5d, 0x04),
            (Protocol::Nec32, 0x87ee_045d)
        );
    }

    #[test]
    fn header_out_of_margin_is_ignored() {
        let mut d = NecDecoder::default();
        // 9000 - 2*563 = 7874: the margin is exclusive.
        assert!(run(&mut d, &[(true, 7874), (false, 4500)]).is_empty());
        assert_eq!(d.state, State::Inactive);
    }
}
