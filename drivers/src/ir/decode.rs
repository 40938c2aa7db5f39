//! Frames out of timings: the NEC, RC5 and RC6 decoders run side by side on
//! every event, as the kernel's raw IR core runs its decoders, and
//! [`Presses`] tells a new button press from a held button.
use super::nec::NecDecoder;
use super::rc5::Rc5Decoder;
use super::rc6::Rc6Decoder;
use super::timing::{Coalescer, RawEvent, Timing};

/// The protocol variants the decoders tell apart, named as the kernel's
/// `enum rc_proto` (and `/sys/class/rc/*/protocols`) names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Nec,
    NecX,
    Nec32,
    Rc5,
    Rc5x20,
    Rc5Sz,
    Rc6Mode0,
    Rc6_6a20,
    Rc6_6a24,
    Rc6_6a32,
    Rc6Mce,
}

impl Protocol {
    /// The kernel's name for the variant (`nec`, `necx`, `rc-5`, `rc-6-mce`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Nec => "nec",
            Protocol::NecX => "necx",
            Protocol::Nec32 => "nec32",
            Protocol::Rc5 => "rc-5",
            Protocol::Rc5x20 => "rc-5x-20",
            Protocol::Rc5Sz => "rc-5-sz",
            Protocol::Rc6Mode0 => "rc-6-0",
            Protocol::Rc6_6a20 => "rc-6-6a-20",
            Protocol::Rc6_6a24 => "rc-6-6a-24",
            Protocol::Rc6_6a32 => "rc-6-6a-32",
            Protocol::Rc6Mce => "rc-6-mce",
        }
    }

    /// The decoder family, as ir-keytable's TOML `protocol` field names it.
    pub fn family(self) -> Family {
        match self {
            Protocol::Nec | Protocol::NecX | Protocol::Nec32 => Family::Nec,
            Protocol::Rc5 | Protocol::Rc5x20 => Family::Rc5,
            Protocol::Rc5Sz => Family::Rc5Sz,
            _ => Family::Rc6,
        }
    }

    /// How long after a frame the kernel waits for the next before it calls
    /// the button released (`protocols[].repeat_period` in rc-main.c), in µs.
    pub fn repeat_period_us(self) -> u64 {
        match self.family() {
            Family::Nec => 110_000,
            _ => 114_000,
        }
    }
}

/// One decoder family, as a keymap's `protocol = "..."` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Nec,
    Rc5,
    Rc5Sz,
    Rc6,
}

impl Family {
    /// Parse an ir-keytable protocol name (`nec`, `rc5`, `rc-5`, `rc6`, ...).
    pub fn from_keymap_name(name: &str) -> Option<Family> {
        match name.to_ascii_lowercase().replace('_', "-").as_str() {
            "nec" | "necx" | "nec32" => Some(Family::Nec),
            "rc5" | "rc-5" | "rc5x" | "rc-5x" | "rc-5x-20" => Some(Family::Rc5),
            "rc-5-sz" | "rc5-sz" | "rc5sz" => Some(Family::Rc5Sz),
            "rc6" | "rc-6" | "rc-6-0" | "rc-6-6a-20" | "rc-6-6a-24" | "rc-6-6a-32" | "rc-6-mce"
            | "rc6-mce" => Some(Family::Rc6),
            _ => None,
        }
    }
}

/// One complete frame: protocol variant, the kernel's scancode and the
/// toggle bit (0 where the protocol has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub protocol: Protocol,
    pub scancode: u32,
    pub toggle: bool,
}

/// What a decoder reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// A full frame (the kernel's `rc_keydown`).
    Key(Frame),
    /// "The last button is still held" (the kernel's `rc_repeat`): NEC repeat codes.
    Repeat,
}

/// The decoder families enabled when nothing says otherwise: what a keymap
/// of protocol `unknown` gets (RC5-SZ, StreamZap's 15-bit RC5, only on request).
pub const DEFAULT_FAMILIES: [Family; 3] = [Family::Nec, Family::Rc5, Family::Rc6];

/// The enabled decoders side by side, fed through a [`Coalescer`], with a
/// clock that is the sum of the durations seen (the stream carries its own
/// time). As in the kernel, only the protocols of the keymap are decoded
/// (`ir-keytable` enables them from the keymap), which keeps a frame of
/// another protocol from being taken for a lookalike.
#[derive(Debug)]
pub struct MultiDecoder {
    coalescer: Coalescer,
    nec: Option<NecDecoder>,
    rc5: Option<Rc5Decoder>,
    rc6: Option<Rc6Decoder>,
    clock_us: u64,
}

impl Default for MultiDecoder {
    fn default() -> Self {
        MultiDecoder::new(&DEFAULT_FAMILIES)
    }
}

/// One decoder output with the stream time at which it happened, or the end
/// of a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Decoded {
        at_us: u64,
        what: Decoded,
    },
    /// The signal ended (a space of the receiver timeout or more): buttons are up.
    SignalEnd {
        at_us: u64,
    },
}

impl MultiDecoder {
    /// Decoders for these families only.
    pub fn new(families: &[Family]) -> Self {
        let has = |f| families.contains(&f);
        MultiDecoder {
            coalescer: Coalescer::default(),
            nec: has(Family::Nec).then(NecDecoder::default),
            rc5: (has(Family::Rc5) || has(Family::Rc5Sz))
                .then(|| Rc5Decoder::new(has(Family::Rc5), has(Family::Rc5Sz))),
            rc6: has(Family::Rc6).then(Rc6Decoder::default),
            clock_us: 0,
        }
    }

    /// Feed one timing; returns what the decoders made of it.
    pub fn feed(&mut self, t: Timing) -> Vec<Output> {
        let mut out = Vec::new();
        if t == Timing::Reset {
            self.coalescer.push(t);
            if let Some(d) = self.nec.as_mut() {
                d.reset();
            }
            if let Some(d) = self.rc5.as_mut() {
                d.reset();
            }
            if let Some(d) = self.rc6.as_mut() {
                d.reset();
            }
            return out;
        }
        // A timeout only releases the space at once; whether the signal
        // ended is the long-space rule's call: a receiver with a timeout
        // shorter than the gaps of a held button reports timeouts between
        // its frames, and the kernel still calls those repeats.
        for (ev, _) in self.coalescer.push(t) {
            self.run(ev, &mut out);
        }
        out
    }

    /// Run one event through every decoder. A space of the receiver timeout
    /// or more ends the signal: the kernel's receiver reports the space when
    /// the timeout fires, so the frame it completes is decoded then, not at
    /// the end of a long pause, and the button is up.
    fn run(&mut self, ev: RawEvent, out: &mut Vec<Output>) {
        let d = u64::from(ev.duration);
        let long = !ev.pulse && d >= DEFAULT_TIMEOUT_US;
        let at_us = self
            .clock_us
            .saturating_add(if long { DEFAULT_TIMEOUT_US } else { d });
        let nec = self.nec.as_mut().and_then(|d| d.feed(ev));
        let rc5 = self.rc5.as_mut().and_then(|d| d.feed(ev));
        let rc6 = self.rc6.as_mut().and_then(|d| d.feed(ev));
        for what in [nec, rc5, rc6].into_iter().flatten() {
            out.push(Output::Decoded { at_us, what });
        }
        self.clock_us = self.clock_us.saturating_add(d);
        if long {
            out.push(Output::SignalEnd {
                at_us: self.clock_us,
            });
        }
    }

    /// Whether part of a signal is still held back (a device then ends it
    /// with a timeout once the line has been idle).
    pub fn has_pending(&self) -> bool {
        self.coalescer.has_pending()
    }
}

/// The kernel's receiver timeout (`IR_DEFAULT_TIMEOUT`), part of its key-up delay.
pub const DEFAULT_TIMEOUT_US: u64 = 125_000;

/// Tells a new press from a held button, as rc-main.c's `rc_keydown` does: a
/// frame is a new press unless the same protocol, scancode and toggle came
/// while the previous one was still held. A button is held until the
/// protocol's repeat period plus the receiver timeout pass without a frame or
/// repeat code, or until the signal ends (a space of the receiver timeout,
/// 125 ms, or a timeout reported by the receiver).
#[derive(Debug, Default)]
pub struct Presses {
    last: Option<Frame>,
    held_until_us: u64,
}

impl Presses {
    /// Returns the frame when it is a new press.
    pub fn on_output(&mut self, o: Output) -> Option<Frame> {
        match o {
            Output::SignalEnd { .. } => {
                self.last = None;
                None
            }
            Output::Decoded {
                at_us,
                what: Decoded::Repeat,
            } => {
                if let Some(f) = self.last {
                    if at_us <= self.held_until_us {
                        self.held_until_us = at_us
                            .saturating_add(f.protocol.repeat_period_us() + DEFAULT_TIMEOUT_US);
                    } else {
                        // A repeat after the key went up repeats nothing.
                        self.last = None;
                    }
                }
                None
            }
            Output::Decoded {
                at_us,
                what: Decoded::Key(f),
            } => {
                let held = self.last == Some(f) && at_us <= self.held_until_us;
                self.last = Some(f);
                self.held_until_us =
                    at_us.saturating_add(f.protocol.repeat_period_us() + DEFAULT_TIMEOUT_US);
                (!held).then_some(f)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(at_us: u64, scancode: u32, toggle: bool) -> Output {
        Output::Decoded {
            at_us,
            what: Decoded::Key(Frame {
                protocol: Protocol::Rc5,
                scancode,
                toggle,
            }),
        }
    }

    #[test]
    fn held_button_with_same_toggle_is_one_press_and_flipped_toggle_is_another() {
        let mut p = Presses::default();
        assert!(p.on_output(key(0, 0x1e01, false)).is_some());
        assert!(p.on_output(key(114_000, 0x1e01, false)).is_none());
        assert!(p.on_output(key(228_000, 0x1e01, false)).is_none());
        assert!(p.on_output(key(342_000, 0x1e01, true)).is_some());
    }

    #[test]
    fn same_frame_after_key_up_is_a_new_press() {
        let mut p = Presses::default();
        assert!(p.on_output(key(0, 0x0203, false)).is_some());
        assert!(p.on_output(key(240_000, 0x0203, false)).is_some());
        assert!(p.on_output(Output::SignalEnd { at_us: 300_000 }).is_none());
        assert!(p.on_output(key(310_000, 0x0203, false)).is_some());
    }

    #[test]
    fn repeat_codes_keep_a_button_held_and_enter_nothing() {
        let mut p = Presses::default();
        let nec = |at_us| Output::Decoded {
            at_us,
            what: Decoded::Key(Frame {
                protocol: Protocol::Nec,
                scancode: 0x0408,
                toggle: false,
            }),
        };
        let rep = |at_us| Output::Decoded {
            at_us,
            what: Decoded::Repeat,
        };
        assert!(p.on_output(nec(0)).is_some());
        for i in 1..10 {
            assert!(p.on_output(rep(i * 108_000)).is_none());
        }
        // Still held: a full frame of the same button 108 ms later is a repeat.
        assert!(p.on_output(nec(10 * 108_000)).is_none());
    }

    /// A held RC5 button: frames every 114 ms with the same toggle, the last
    /// one followed by a long pause. The pause must not make the last frame
    /// look late (a new press): the receiver timeout ends the signal first.
    #[test]
    fn last_frame_of_a_held_button_before_a_long_pause_is_still_a_repeat() {
        let f = Frame {
            protocol: Protocol::Rc5,
            scancode: 0x1e05,
            toggle: true,
        };
        let frame = super::super::encode::frame(f).unwrap();
        let len: u32 = frame
            .iter()
            .map(|t| match t {
                Timing::Pulse(d) | Timing::Space(d) => *d,
                _ => 0,
            })
            .sum();
        let mut d = MultiDecoder::default();
        let mut p = Presses::default();
        let mut new_presses = 0;
        for pause in [113_778 - len, 113_778 - len, 900_000] {
            for &t in frame.iter().chain(&[Timing::Space(pause)]) {
                for o in d.feed(t) {
                    new_presses += usize::from(p.on_output(o).is_some());
                }
            }
        }
        // The next press of the same button (toggle flipped) counts; the
        // three held frames before it were one press (two if the last one
        // were taken as late).
        let again = super::super::encode::frame(Frame { toggle: false, ..f }).unwrap();
        for &t in again.iter().chain(&[Timing::Timeout(125_000)]) {
            for o in d.feed(t) {
                new_presses += usize::from(p.on_output(o).is_some());
            }
        }
        assert_eq!(new_presses, 2);
    }

    /// `ir-ctl -r --mode2` on a receiver with a 20 ms timeout: a held RC5
    /// button gives `timeout 20000` after every frame and the rest of each gap
    /// is not printed. Still one press; the next press (toggle flipped) is another.
    #[test]
    fn short_receiver_timeouts_inside_a_held_button_are_not_releases() {
        let frame = |toggle| {
            super::super::encode::frame(Frame {
                protocol: Protocol::Rc5,
                scancode: 0x1e05,
                toggle,
            })
            .unwrap()
        };
        let mut d = MultiDecoder::default();
        let mut p = Presses::default();
        let mut presses = 0;
        for toggle in [true, true, true, true, false, false] {
            for &t in frame(toggle).iter().chain(&[Timing::Timeout(20_000)]) {
                for o in d.feed(t) {
                    presses += usize::from(p.on_output(o).is_some());
                }
            }
        }
        assert_eq!(presses, 2);
    }

    #[test]
    fn family_names_from_keymaps() {
        assert_eq!(Family::from_keymap_name("nec"), Some(Family::Nec));
        assert_eq!(Family::from_keymap_name("rc5"), Some(Family::Rc5));
        assert_eq!(Family::from_keymap_name("rc-5-sz"), Some(Family::Rc5Sz));
        assert_eq!(Family::from_keymap_name("RC6"), Some(Family::Rc6));
        assert_eq!(Family::from_keymap_name("sony"), None);
    }
}
