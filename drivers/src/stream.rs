//! The one read loop of the HID, serial and IR readers: a stream with a
//! deadline.
//!
//! A reader is two halves. A [`TimedStream`] only delivers items (HID
//! reports, serial byte chunks, IR receiver bytes) and tells the time on its
//! own clock: the wall clock for a device, the recording's clock for a HID
//! replay, a clock that stands still for a replay that has none. An
//! [`Assemble`] turns items into one entry and holds no I/O. [`read_entry`]
//! runs the two against `--timeout`, measured on the stream's clock, so a
//! replay times out where the device would have.
use std::time::Duration;

use crate::source::SourceError;

/// What a stream yields next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next<T> {
    /// One item (a report, a chunk of bytes).
    Item(T),
    /// Nothing arrived within the wait.
    Quiet,
    /// The stream is over (end of a recording, device gone); why, for the message.
    End(String),
}

/// Where a reader's items come from: a device or a recording of one.
pub trait TimedStream {
    type Item;
    /// Wait at most `wait` (forever when `None`) for the next item. A stream
    /// may return [`Next::Quiet`] before `wait` has passed; it is asked again.
    fn next(&mut self, wait: Option<Duration>) -> Result<Next<Self::Item>, SourceError>;
    /// The stream's clock, from any fixed origin.
    fn now(&self) -> Duration;
}

/// What turns items into one entry. Each method answers `Some` when the
/// entry is complete (or failed), `None` to read on.
pub trait Assemble<I> {
    /// An entry complete from input already held (a second scan that came in
    /// the same chunk as the first), looked for before each wait.
    fn ready(&mut self) -> Option<Result<String, SourceError>> {
        None
    }
    /// One item arrived at `now` (the stream's clock).
    fn feed(&mut self, item: I, now: Duration) -> Option<Result<String, SourceError>>;
    /// Nothing arrived within the wait; `now` is the stream's clock.
    fn quiet(&mut self, now: Duration) -> Option<Result<String, SourceError>> {
        let _ = now;
        None
    }
    /// The stream ended for the reason `why`. `None` means the end completed
    /// input that is now [`ready`](Assemble::ready) to look at; the stream is
    /// then asked again, says [`Next::End`] again, and this must then answer `Some`.
    fn end(&mut self, why: String) -> Option<Result<String, SourceError>>;
}

/// How long to wait next: the rest of `timeout` since `start`, or
/// [`SourceError::Timeout`] once it has passed. `None` waits forever.
pub fn remaining(
    start: Duration,
    now: Duration,
    timeout: Option<Duration>,
) -> Result<Option<Duration>, SourceError> {
    let Some(t) = timeout else {
        return Ok(None);
    };
    let spent = now.saturating_sub(start);
    if spent >= t {
        return Err(SourceError::Timeout(t));
    }
    Ok(Some(t - spent))
}

/// Read one entry: items from `stream` into `assembler` until it answers,
/// or [`SourceError::Timeout`] once `timeout` has passed on the stream's clock.
pub fn read_entry<S, A>(
    stream: &mut S,
    assembler: &mut A,
    timeout: Option<Duration>,
) -> Result<String, SourceError>
where
    S: TimedStream,
    A: Assemble<S::Item>,
{
    let start = stream.now();
    loop {
        if let Some(done) = assembler.ready() {
            return done;
        }
        let wait = remaining(start, stream.now(), timeout)?;
        let step = match stream.next(wait)? {
            Next::Item(item) => assembler.feed(item, stream.now()),
            Next::Quiet => assembler.quiet(stream.now()),
            Next::End(why) => assembler.end(why),
        };
        if let Some(done) = step {
            return done;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A script of (arrival time, item) on a virtual clock; quiet between.
    struct Script {
        items: VecDeque<(Duration, char)>,
        now: Duration,
        waits: Vec<Option<Duration>>,
    }

    impl TimedStream for Script {
        type Item = char;
        fn next(&mut self, wait: Option<Duration>) -> Result<Next<char>, SourceError> {
            self.waits.push(wait);
            let Some(&(at, c)) = self.items.front() else {
                return Ok(Next::End("script over".into()));
            };
            match wait.map(|w| self.now + w) {
                Some(limit) if at > limit => {
                    self.now = limit;
                    Ok(Next::Quiet)
                }
                _ => {
                    self.now = self.now.max(at);
                    self.items.pop_front();
                    Ok(Next::Item(c))
                }
            }
        }
        fn now(&self) -> Duration {
            self.now
        }
    }

    fn script(items: &[(u64, char)]) -> Script {
        Script {
            items: items
                .iter()
                .map(|&(ms, c)| (Duration::from_millis(ms), c))
                .collect(),
            now: Duration::ZERO,
            waits: Vec::new(),
        }
    }

    /// Lines ended by '.'; a line may complete in the same item as the next starts.
    #[derive(Default)]
    struct Lines {
        held: String,
        done: VecDeque<String>,
        ends: usize,
        quiet_at: Vec<Duration>,
    }

    impl Assemble<char> for Lines {
        fn ready(&mut self) -> Option<Result<String, SourceError>> {
            self.done.pop_front().map(Ok)
        }
        fn feed(&mut self, c: char, _now: Duration) -> Option<Result<String, SourceError>> {
            if c == '.' {
                self.done.push_back(std::mem::take(&mut self.held));
            } else {
                self.held.push(c);
            }
            None
        }
        fn quiet(&mut self, now: Duration) -> Option<Result<String, SourceError>> {
            self.quiet_at.push(now);
            None
        }
        fn end(&mut self, why: String) -> Option<Result<String, SourceError>> {
            self.ends += 1;
            if self.ends == 1 && !self.held.is_empty() {
                // The end completes the last line once.
                self.done.push_back(std::mem::take(&mut self.held));
                return None;
            }
            Some(Err(SourceError::Ended(why)))
        }
    }

    #[test]
    fn the_deadline_is_on_the_streams_clock() {
        let mut s = script(&[(0, 'a'), (400, 'b'), (2000, '.')]);
        let mut a = Lines::default();
        let e = read_entry(&mut s, &mut a, Some(Duration::from_secs(1))).unwrap_err();
        assert!(
            matches!(e, SourceError::Timeout(t) if t == Duration::from_secs(1)),
            "{e}"
        );
        // Each wait is what is left of the second; the last one reaches it exactly.
        assert_eq!(
            s.waits,
            [
                Some(Duration::from_secs(1)),
                Some(Duration::from_secs(1)),
                Some(Duration::from_millis(600)),
            ]
        );
        assert_eq!(a.quiet_at, [Duration::from_secs(1)]);
        // Without a timeout the same stream completes the line.
        assert_eq!(read_entry(&mut s, &mut a, None).unwrap(), "ab");
    }

    #[test]
    fn held_entries_come_before_any_wait() {
        let mut s = script(&[(0, 'x'), (0, '.'), (0, 'y'), (0, '.')]);
        let mut a = Lines::default();
        assert_eq!(read_entry(&mut s, &mut a, None).unwrap(), "x");
        assert_eq!(s.waits.len(), 2);
        a.feed('z', Duration::ZERO);
        a.feed('.', Duration::ZERO);
        // "z" is held: returned without asking the stream.
        assert_eq!(read_entry(&mut s, &mut a, None).unwrap(), "z");
        assert_eq!(s.waits.len(), 2);
        assert_eq!(read_entry(&mut s, &mut a, None).unwrap(), "y");
    }

    #[test]
    fn an_end_may_complete_the_last_entry_once() {
        let mut s = script(&[(0, 'q')]);
        let mut a = Lines::default();
        assert_eq!(read_entry(&mut s, &mut a, None).unwrap(), "q");
        let e = read_entry(&mut s, &mut a, None).unwrap_err();
        assert!(
            matches!(&e, SourceError::Ended(w) if w == "script over"),
            "{e}"
        );
        assert_eq!(a.ends, 2);
    }

    #[test]
    fn remaining_never_overflows() {
        let t = Some(Duration::MAX);
        assert_eq!(
            remaining(Duration::ZERO, Duration::from_secs(5), t).unwrap(),
            Some(Duration::MAX - Duration::from_secs(5))
        );
        assert_eq!(
            remaining(Duration::from_secs(9), Duration::ZERO, None).unwrap(),
            None
        );
        // A clock that went backwards counts as no time spent.
        assert_eq!(
            remaining(
                Duration::from_secs(9),
                Duration::ZERO,
                Some(Duration::from_secs(1))
            )
            .unwrap(),
            Some(Duration::from_secs(1))
        );
    }
}
