//! The encoder our fixtures are generated with: scancodes to timings, as a
//! remote sends them, and a receiver model that distorts them.
//!
//! Frames follow the kernel's encoders (`ir_nec_encode`, `ir_rc5_encode`,
//! `ir_rc6_encode`) so that decoding gives back the same scancode:
//! - NEC: 9000 µs pulse, 4500 µs space, 32 bits of 562 µs pulse + 562/1687 µs
//!   space (LSB first: address, address inverted, command, command inverted;
//!   NECX sends the scancode's middle byte as second byte, NEC32 sends all
//!   four scancode bytes), a 562 µs trailer pulse; frames start every 108 ms;
//!   a held button sends repeat codes (9000 pulse, 2250 space, 562 pulse).
//! - RC5: 889 µs half-bits, 1 = space then pulse, S1 S2 T, 5 system bits and
//!   6 command bits (S2 is the inverted command bit 6); RC5X inserts a 3556 µs
//!   space after the 8th bit and sends 6 more bits; frames every 113.8 ms, a
//!   held button repeats the frame with the same toggle.
//! - RC6: 2664 µs leader pulse, 888 µs space, start bit, 3 mode bits, the
//!   double-width trailer bit (toggle in mode 0), then 16 (mode 0) or 20/24/32
//!   (6A) body bits, 1 = pulse then space, 444 µs half-bits; the MCE toggle is
//!   body bit 15.
//!
//! [`Receiver`] models a demodulating receiver (TSOP-like): pulses come out
//! longer and spaces shorter by a bias, plus uniform jitter, from a seeded
//! generator so every fixture can be regenerated bit for bit.
use super::decode::{Frame, Protocol};
use super::timing::Timing;

/// NEC half-unit as remotes send it.
const NEC_UNIT: u32 = 562;
/// Frame period of NEC, from one header to the next.
pub const NEC_PERIOD_US: u32 = 108_000;
const RC5_UNIT: u32 = 889;
/// Frame period of RC5 (64 bit times).
pub const RC5_PERIOD_US: u32 = 113_778;
const RC6_UNIT: u32 = 444;
/// Frame period used for RC6 (the MCE remote repeats about every 107 ms).
pub const RC6_PERIOD_US: u32 = 107_000;

fn push(out: &mut Vec<(bool, u32)>, pulse: bool, d: u32) {
    match out.last_mut() {
        Some(last) if last.0 == pulse => last.1 += d,
        _ => out.push((pulse, d)),
    }
}

fn to_timings(levels: Vec<(bool, u32)>) -> Vec<Timing> {
    levels
        .into_iter()
        .map(|(p, d)| {
            if p {
                Timing::Pulse(d)
            } else {
                Timing::Space(d)
            }
        })
        .collect()
}

/// One frame of the protocol for this scancode and toggle, from its first
/// pulse to its last (no trailing space). `None` for a scancode the variant
/// cannot carry.
pub fn frame(f: Frame) -> Option<Vec<Timing>> {
    match f.protocol {
        Protocol::Nec | Protocol::NecX | Protocol::Nec32 => nec(f.protocol, f.scancode),
        Protocol::Rc5 | Protocol::Rc5x20 | Protocol::Rc5Sz => rc5(f.protocol, f.scancode, f.toggle),
        _ => rc6(f.protocol, f.scancode, f.toggle),
    }
}

fn nec(protocol: Protocol, sc: u32) -> Option<Vec<Timing>> {
    let b = |shift: u32| (sc >> shift & 0xff) as u8;
    let (addr, addr_inv, cmd, cmd_inv) = match protocol {
        Protocol::Nec if sc <= 0xffff => (b(8), !b(8), b(0), !b(0)),
        Protocol::NecX if sc <= 0xff_ffff && b(16) ^ b(8) != 0xff => (b(16), b(8), b(0), !b(0)),
        Protocol::Nec32 if b(8) ^ b(0) != 0xff => (b(16), b(24), b(0), b(8)),
        _ => return None,
    };
    let mut out = vec![(true, 16 * NEC_UNIT + 8), (false, 8 * NEC_UNIT + 4)];
    for byte in [addr, addr_inv, cmd, cmd_inv] {
        for i in 0..8 {
            out.push((true, NEC_UNIT));
            out.push((
                false,
                if byte >> i & 1 == 1 {
                    3 * NEC_UNIT + 1
                } else {
                    NEC_UNIT
                },
            ));
        }
    }
    out.push((true, NEC_UNIT));
    Some(to_timings(out))
}

/// The NEC repeat code, first pulse to last.
pub fn nec_repeat() -> Vec<Timing> {
    vec![
        Timing::Pulse(16 * NEC_UNIT + 8),
        Timing::Space(4 * NEC_UNIT + 2),
        Timing::Pulse(NEC_UNIT),
    ]
}

fn rc5(protocol: Protocol, sc: u32, toggle: bool) -> Option<Vec<Timing>> {
    let t = u32::from(toggle);
    // (bits MSB first including S1, count, position after which the RC5X space goes)
    let (word, nbits, x_after) = match protocol {
        Protocol::Rc5 if sc & !0x1f7f == 0 => {
            let command = sc & 0x3f;
            let commandx = sc >> 6 & 1;
            let system = sc >> 8 & 0x1f;
            (
                1 << 13 | (commandx ^ 1) << 12 | t << 11 | system << 6 | command,
                14,
                None,
            )
        }
        Protocol::Rc5x20 if sc & !0x1f7f3f == 0 => {
            let xdata = sc & 0x3f;
            let command = sc >> 8 & 0x3f;
            let commandx = sc >> 14 & 1;
            let system = sc >> 16 & 0x1f;
            (
                1 << 19 | (commandx ^ 1) << 18 | t << 17 | system << 12 | command << 6 | xdata,
                20,
                Some(8),
            )
        }
        Protocol::Rc5Sz if sc & !0x2fff == 0 => (1 << 14 | sc | t << 12, 15, None),
        _ => return None,
    };
    let mut out = Vec::new();
    for (n, i) in (0..nbits).rev().enumerate() {
        let one = word >> i & 1 == 1;
        if n > 0 || !one {
            push(&mut out, !one, RC5_UNIT);
        }
        push(&mut out, one, RC5_UNIT);
        if x_after == Some(n + 1) {
            push(&mut out, false, 4 * RC5_UNIT);
        }
    }
    if out.last().is_some_and(|l| !l.0) {
        out.pop();
    }
    Some(to_timings(out))
}

fn rc6(protocol: Protocol, sc: u32, toggle: bool) -> Option<Vec<Timing>> {
    let (mode, trailer, body, nbits) = match protocol {
        Protocol::Rc6Mode0 if sc <= 0xffff => (0u32, toggle, sc, 16),
        Protocol::Rc6_6a20 if sc <= 0xf_ffff => (6, false, sc, 20),
        Protocol::Rc6_6a24 if sc <= 0xff_ffff => (6, false, sc, 24),
        Protocol::Rc6_6a32 if !super::rc6::MCE_CUSTOMER_CODES.contains(&(sc & 0xffff_0000)) => {
            (6, false, sc, 32)
        }
        Protocol::Rc6Mce
            if super::rc6::MCE_CUSTOMER_CODES.contains(&(sc & 0xffff_0000))
                && sc & super::rc6::MCE_TOGGLE_MASK == 0 =>
        {
            let t = if toggle {
                super::rc6::MCE_TOGGLE_MASK
            } else {
                0
            };
            (6, false, sc | t, 32)
        }
        _ => return None,
    };
    let mut out = vec![(true, 6 * RC6_UNIT), (false, 2 * RC6_UNIT)];
    let bit = |out: &mut Vec<(bool, u32)>, one: bool, w: u32| {
        push(out, one, w);
        push(out, !one, w);
    };
    bit(&mut out, true, RC6_UNIT);
    for i in (0..3).rev() {
        bit(&mut out, mode >> i & 1 == 1, RC6_UNIT);
    }
    bit(&mut out, trailer, 2 * RC6_UNIT);
    for i in (0..nbits).rev() {
        bit(&mut out, body >> i & 1 == 1, RC6_UNIT);
    }
    if out.last().is_some_and(|l| !l.0) {
        out.pop();
    }
    Some(to_timings(out))
}

fn duration(t: &[Timing]) -> u32 {
    t.iter()
        .map(|t| match t {
            Timing::Pulse(d) | Timing::Space(d) | Timing::Timeout(d) => *d,
            Timing::Reset => 0,
        })
        .sum()
}

/// A button pressed once and held for `repeats` more frame periods, as the
/// remote sends it, ending with the space up to the next period.
pub fn press(f: Frame, repeats: u32) -> Option<Vec<Timing>> {
    let first = frame(f)?;
    let (period, again) = match f.protocol.family() {
        super::decode::Family::Nec => (NEC_PERIOD_US, nec_repeat()),
        super::decode::Family::Rc6 => (RC6_PERIOD_US, first.clone()),
        _ => (RC5_PERIOD_US, first.clone()),
    };
    let mut out = first.clone();
    out.push(Timing::Space(period.saturating_sub(duration(&first))));
    for _ in 0..repeats {
        out.extend(again.iter().copied());
        out.push(Timing::Space(period.saturating_sub(duration(&again))));
    }
    Some(out)
}

/// SplitMix64: a tiny deterministic generator, so fixtures regenerate identically.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `-spread..=spread`.
    pub fn spread(&mut self, spread: u32) -> i64 {
        if spread == 0 {
            return 0;
        }
        let span = 2 * u64::from(spread) + 1;
        (self.next_u64() % span) as i64 - i64::from(spread)
    }
}

/// A receiver model: what a demodulator makes of the sent timings.
#[derive(Debug, Clone)]
pub struct Receiver {
    /// Added to every pulse and taken from every space (µs).
    pub bias: i32,
    /// Uniform jitter added to every duration (± µs).
    pub jitter: u32,
    /// Granularity of the receiver's clock (µs, 1 for none); IR Toy: 21.333.
    pub resolution: u32,
    pub rng: SplitMix64,
}

impl Receiver {
    pub fn new(seed: u64, bias: i32, jitter: u32) -> Self {
        Receiver {
            bias,
            jitter,
            resolution: 1,
            rng: SplitMix64(seed),
        }
    }

    /// Distort timings; long gaps (over 20 ms) keep only the jitter.
    pub fn receive(&mut self, sent: &[Timing]) -> Vec<Timing> {
        sent.iter()
            .map(|t| {
                let (d, sign) = match *t {
                    Timing::Pulse(d) => (d, 1),
                    Timing::Space(d) | Timing::Timeout(d) => (d, -1),
                    Timing::Reset => return Timing::Reset,
                };
                let bias = if d > 20_000 {
                    0
                } else {
                    sign * i64::from(self.bias)
                };
                let mut v = i64::from(d) + bias + self.rng.spread(self.jitter);
                if self.resolution > 1 {
                    let r = i64::from(self.resolution);
                    v = (v + r / 2) / r * r;
                }
                let v = v.clamp(1, i64::from(u32::MAX)) as u32;
                match t {
                    Timing::Pulse(_) => Timing::Pulse(v),
                    Timing::Space(_) => Timing::Space(v),
                    _ => Timing::Timeout(v),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::decode::{Decoded, Family, MultiDecoder, Output};
    use super::*;

    fn decode(t: &[Timing]) -> Vec<Decoded> {
        let mut d = MultiDecoder::new(&[Family::Nec, Family::Rc5, Family::Rc5Sz, Family::Rc6]);
        let mut out = Vec::new();
        for &x in t.iter().chain(&[Timing::Timeout(125_000)]) {
            for o in d.feed(x) {
                if let Output::Decoded { what, .. } = o {
                    out.push(what);
                }
            }
        }
        out
    }

    #[test]
    fn every_variant_round_trips_through_the_decoders() {
        let cases = [
            (Protocol::Nec, 0x0408),
            (Protocol::NecX, 0x866b12),
            (Protocol::Nec32, 0x87ee_045d),
            (Protocol::Rc5, 0x1e01),
            (Protocol::Rc5, 0x1e41),
            (Protocol::Rc5x20, 0x1d_4a_2c),
            (Protocol::Rc5Sz, 0x2a5),
            (Protocol::Rc6Mode0, 0x0c05),
            (Protocol::Rc6_6a20, 0x12345),
            (Protocol::Rc6_6a24, 0x123456),
            (Protocol::Rc6_6a32, 0x1234_5678),
            (Protocol::Rc6Mce, 0x800f_0405),
        ];
        for (protocol, scancode) in cases {
            for toggle in [false, true] {
                let has_toggle = !matches!(
                    protocol,
                    Protocol::Nec
                        | Protocol::NecX
                        | Protocol::Nec32
                        | Protocol::Rc6_6a20
                        | Protocol::Rc6_6a24
                        | Protocol::Rc6_6a32
                );
                let f = Frame {
                    protocol,
                    scancode,
                    toggle: toggle && has_toggle,
                };
                let t = frame(f).unwrap();
                assert_eq!(decode(&t), vec![Decoded::Key(f)], "{f:?}");
                if protocol == Protocol::Rc5Sz {
                    // Only decoded when asked for, as the kernel does.
                    let mut plain = MultiDecoder::default();
                    let got: Vec<_> = t
                        .iter()
                        .chain(&[Timing::Timeout(125_000)])
                        .flat_map(|&x| plain.feed(x))
                        .filter(|o| matches!(o, Output::Decoded { .. }))
                        .collect();
                    assert!(got.is_empty(), "{got:?}");
                }
                let jittered = Receiver::new(7, 80, 90).receive(&t);
                assert_eq!(
                    decode(&jittered),
                    vec![Decoded::Key(f)],
                    "{f:?} with jitter"
                );
            }
        }
    }

    #[test]
    fn held_nec_button_sends_repeat_codes() {
        let f = Frame {
            protocol: Protocol::Nec,
            scancode: 0x0408,
            toggle: false,
        };
        let t = press(f, 3).unwrap();
        let got = decode(&t);
        assert_eq!(got[0], Decoded::Key(f));
        assert_eq!(&got[1..], &[Decoded::Repeat; 3]);
    }

    #[test]
    fn scancodes_a_variant_cannot_carry_are_refused() {
        let f = |protocol, scancode| Frame {
            protocol,
            scancode,
            toggle: false,
        };
        assert!(frame(f(Protocol::Nec, 0x10000)).is_none());
        assert!(frame(f(Protocol::NecX, 0x04fb08)).is_none());
        assert!(frame(f(Protocol::Rc5, 0x2001)).is_none());
        assert!(frame(f(Protocol::Rc6Mce, 0x1234_0000)).is_none());
    }
}
