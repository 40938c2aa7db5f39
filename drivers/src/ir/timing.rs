//! Raw IR timings: what every receiver format turns into, and the margin
//! helpers the decoders share.
//!
//! A receiver reports the demodulated signal as alternating *pulses* (carrier
//! on) and *spaces* (carrier off) in microseconds. `Timeout` is a space after
//! which the receiver declared the signal over (mode2's `timeout N`, the IR
//! Toy's `0xFFFF`, or our own idle detection on a device); `Reset` is an
//! overflow, after which every decoder starts again (mode2's `overflow`).

/// One raw IR event, durations in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// Carrier on for this long.
    Pulse(u32),
    /// Carrier off for this long.
    Space(u32),
    /// Carrier off for this long, and the receiver says the signal ended.
    Timeout(u32),
    /// The receiver lost samples; decoders drop what they had.
    Reset,
}

/// What the protocol decoders see: one pulse or space (the kernel's
/// `struct ir_raw_event` reduced to what matters here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent {
    pub pulse: bool,
    pub duration: u32,
}

/// `d1` is within `margin` of `d2`, both bounds exclusive (the kernel's `eq_margin`).
pub(crate) fn eq_margin(d1: u32, d2: u32, margin: u32) -> bool {
    d1 > d2.saturating_sub(margin) && d1 < d2.saturating_add(margin)
}

/// `d1` is more than `d2 - margin` (the kernel's `geq_margin`).
pub(crate) fn geq_margin(d1: u32, d2: u32, margin: u32) -> bool {
    d1 > d2.saturating_sub(margin)
}

/// Merges consecutive events of the same kind, as the kernel's
/// `ir_raw_event_store_with_filter` and `ir-ctl` do: two spaces in a row are
/// one longer space. An event is released when the next one of the other
/// kind arrives, or at once for a timeout or a reset.
#[derive(Debug, Default)]
pub struct Coalescer {
    pending: Option<RawEvent>,
}

impl Coalescer {
    /// Feed one timing; returns the events that are now complete, in order
    /// (at most two), each with whether it ends the signal.
    pub fn push(&mut self, t: Timing) -> Vec<(RawEvent, bool)> {
        let mut out = Vec::with_capacity(2);
        match t {
            Timing::Pulse(d) | Timing::Space(d) => {
                let pulse = matches!(t, Timing::Pulse(_));
                if d == 0 {
                    return out;
                }
                match self.pending.as_mut() {
                    Some(p) if p.pulse == pulse => p.duration = p.duration.saturating_add(d),
                    _ => {
                        if let Some(p) = self.pending.take() {
                            out.push((p, false));
                        }
                        self.pending = Some(RawEvent { pulse, duration: d });
                    }
                }
            }
            Timing::Timeout(d) => {
                let space = match self.pending.take() {
                    Some(p) if !p.pulse => RawEvent {
                        pulse: false,
                        duration: p.duration.saturating_add(d),
                    },
                    Some(p) => {
                        out.push((p, false));
                        RawEvent {
                            pulse: false,
                            duration: d,
                        }
                    }
                    None => RawEvent {
                        pulse: false,
                        duration: d,
                    },
                };
                out.push((space, true));
            }
            Timing::Reset => {
                self.pending = None;
            }
        }
        out
    }

    /// Whether a pulse or space is held back waiting for its end.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margins_match_the_kernel_definitions() {
        // 9000 ± 1126 (NEC header pulse): both bounds exclusive.
        assert!(eq_margin(9000, 9008, 1126));
        assert!(!eq_margin(9008 - 1126, 9008, 1126));
        assert!(!eq_margin(9008 + 1126, 9008, 1126));
        assert!(geq_margin(5000, 5334, 444));
        assert!(!geq_margin(4890, 5334, 444));
        // No underflow when the margin exceeds the target.
        assert!(eq_margin(1, 10, 20));
    }

    #[test]
    fn same_kind_events_are_merged_and_released_on_change() {
        let mut c = Coalescer::default();
        assert!(c.push(Timing::Pulse(500)).is_empty());
        assert!(c.push(Timing::Pulse(60)).is_empty());
        let out = c.push(Timing::Space(400));
        assert_eq!(
            out,
            vec![(
                RawEvent {
                    pulse: true,
                    duration: 560
                },
                false
            )]
        );
        assert!(c.push(Timing::Space(100)).is_empty());
        let out = c.push(Timing::Timeout(1000));
        assert_eq!(
            out,
            vec![(
                RawEvent {
                    pulse: false,
                    duration: 1500
                },
                true
            )]
        );
        assert!(!c.has_pending());
    }

    #[test]
    fn timeout_after_a_pulse_releases_both() {
        let mut c = Coalescer::default();
        c.push(Timing::Pulse(560));
        let out = c.push(Timing::Timeout(125_000));
        assert_eq!(out.len(), 2);
        assert!(out[0].0.pulse && !out[0].1);
        assert!(!out[1].0.pulse && out[1].1);
    }
}
