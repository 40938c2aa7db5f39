//! Rate-counted refusals: what keeps a flood of bad datagrams from filling the
//! controller's audit log and every log file with one line per datagram.
//!
//! A [`RateCounter`] sees each refusal as (source address, kind, `now`). The
//! first refusal of a kind from a source in a *window* is [`RateVerdict::First`]: the
//! caller reports it in full, as it always did. Further refusals of the same
//! source and kind until the window ends are [`RateVerdict::Counted`]: only counted.
//! When the window has passed, the counter closes it into one [`Summary`]
//! ("N more refusals of kind K from S between t0 and t1") — on the next
//! refusal of that key, on [`RateCounter::close_expired`] (the caller's next
//! pass, or a timer armed at [`RateCounter::next_close`]), or on
//! [`RateCounter::close_all`] (shutdown). A window in which nothing was counted
//! closes silently.
//!
//! Nothing is lost: every refusal is either reported in full or inside exactly
//! one summary's `count` ([`Totals`] keeps the books). Memory is bounded: at
//! most `max_sources` addresses are tracked at once (each with at most one
//! window per kind); refusals from further addresses while the table is full
//! go to one [`Source::Other`] bucket per kind, so a flood from spoofed source
//! addresses costs a fixed amount of memory and rows.
//!
//! Pure: no clock, no I/O; time comes in as milliseconds (`now`), like the
//! protocol machines. The controller's management table
//! ([`crate::controller::table`]) and the node agent's log
//! ([`crate::agent::NodeDriver`]) share this type.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

/// The window length unless configured otherwise: one minute.
pub const DEFAULT_WINDOW_MS: u64 = 60_000;
/// Source addresses tracked at once unless configured otherwise.
pub const DEFAULT_MAX_SOURCES: usize = 256;

/// Where refusals came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// One source address (any port: a port costs an attacker nothing).
    Addr(IpAddr),
    /// Every address beyond the first `max_sources` tracked at once.
    Other,
    /// One enrolled member (accepted but costly messages, counted per node:
    /// their number is bounded by the fleet, so no cap applies).
    Member(u32),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Addr(a) => write!(f, "{a}"),
            Source::Other => f.write_str("other sources"),
            Source::Member(m) => write!(f, "member {m}"),
        }
    }
}

impl Serialize for Source {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What the caller does with one refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateVerdict {
    /// The first of its source and kind in the window: report it in full.
    First,
    /// Counted; it will be in a [`Summary`].
    Counted,
}

/// A closed window: the refusals counted in it and not reported one by one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub source: Source,
    /// [`crate::protocol::Refusal::kind`].
    pub kind: &'static str,
    /// Refusals counted (the "N more"; the one reported in full is not in it).
    pub count: u64,
    /// When the refusal reported in full came: the window's start.
    pub window_start_ms: u64,
    pub window_ms: u64,
    /// The first and the last refusal counted.
    pub first_ms: u64,
    pub last_ms: u64,
}

fn rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

impl Summary {
    /// "N more refusals of kind K from S between t0 and t1" ("N more
    /// answered K of member M …" for a member's accepted messages).
    pub fn text(&self) -> String {
        if let Source::Member(_) = self.source {
            return format!(
                "{} more answered {} of {} between {} and {}",
                self.count,
                self.kind,
                self.source,
                rfc3339(self.first_ms),
                rfc3339(self.last_ms),
            );
        }
        format!(
            "{} more refusal{} of kind {} from {} between {} and {}",
            self.count,
            if self.count == 1 { "" } else { "s" },
            self.kind,
            self.source,
            rfc3339(self.first_ms),
            rfc3339(self.last_ms),
        )
    }

    /// The audit log's detail: every field, and [`Summary::text`] as `text`.
    pub fn detail(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(o) = v.as_object_mut() {
            o.insert("text".into(), self.text().into());
        }
        v
    }
}

/// The books: `seen == first + summarized + pending` at all times.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Refusals observed.
    pub seen: u64,
    /// Reported in full ([`RateVerdict::First`]).
    pub first: u64,
    /// In the `count` of a summary already handed out.
    pub summarized: u64,
    /// Counted in windows not closed yet.
    pub pending: u64,
}

#[derive(Clone, Copy, Debug)]
struct Window {
    start_ms: u64,
    count: u64,
    first_ms: u64,
    last_ms: u64,
}

/// The rate counter. See the module docs.
#[derive(Clone, Debug)]
pub struct RateCounter {
    window_ms: u64,
    max_sources: usize,
    /// Per source, one window per kind (kinds are few: a short list).
    windows: HashMap<Source, Vec<(&'static str, Window)>>,
    /// Tracked `Source::Addr` entries of `windows`.
    addrs: usize,
    totals: Totals,
}

impl Default for RateCounter {
    fn default() -> Self {
        RateCounter::new(DEFAULT_WINDOW_MS, DEFAULT_MAX_SOURCES)
    }
}

impl RateCounter {
    /// Windows of `window_ms` (0: every refusal is reported in full), at most
    /// `max_sources` addresses tracked at once (0 counts as 1).
    pub fn new(window_ms: u64, max_sources: usize) -> RateCounter {
        RateCounter {
            window_ms,
            max_sources: max_sources.max(1),
            windows: HashMap::new(),
            addrs: 0,
            totals: Totals::default(),
        }
    }

    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    pub fn max_sources(&self) -> usize {
        self.max_sources
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Source addresses tracked now (not counting the `Other` bucket).
    pub fn tracked_sources(&self) -> usize {
        self.addrs
    }

    fn expired(&self, w: &Window, now: u64) -> bool {
        now >= w.start_ms.saturating_add(self.window_ms)
    }

    fn summary(&mut self, source: Source, kind: &'static str, w: &Window) -> Option<Summary> {
        if w.count == 0 {
            return None;
        }
        self.totals.pending -= w.count;
        self.totals.summarized += w.count;
        Some(Summary {
            source,
            kind,
            count: w.count,
            window_start_ms: w.start_ms,
            window_ms: self.window_ms,
            first_ms: w.first_ms,
            last_ms: w.last_ms,
        })
    }

    /// One refusal of `kind` from `from` at `now`. Summaries of windows it
    /// closes (its own key's, or others' to make room) are appended to `closed`.
    pub fn observe(
        &mut self,
        now: u64,
        from: IpAddr,
        kind: &'static str,
        closed: &mut Vec<Summary>,
    ) -> RateVerdict {
        self.observe_source(now, Source::Addr(from), kind, closed)
    }

    /// As [`RateCounter::observe`], for any [`Source`] (a member's accepted
    /// messages are counted per member).
    pub fn observe_source(
        &mut self,
        now: u64,
        mut source: Source,
        kind: &'static str,
        closed: &mut Vec<Summary>,
    ) -> RateVerdict {
        self.totals.seen += 1;
        if matches!(source, Source::Addr(_))
            && !self.windows.contains_key(&source)
            && self.addrs >= self.max_sources
        {
            self.close_expired(now, closed);
            if self.addrs >= self.max_sources {
                source = Source::Other;
            }
        }
        if matches!(source, Source::Addr(_)) && !self.windows.contains_key(&source) {
            self.addrs += 1;
        }
        let fresh = Window {
            start_ms: now,
            count: 0,
            first_ms: now,
            last_ms: now,
        };
        let kinds = self.windows.entry(source).or_default();
        let Some(i) = kinds.iter().position(|(k, _)| *k == kind) else {
            kinds.push((kind, fresh));
            self.totals.first += 1;
            return RateVerdict::First;
        };
        let w = kinds[i].1;
        if self.expired(&w, now) {
            if let Some(s) = self.summary(source, kind, &w) {
                closed.push(s);
            }
            if let Some(slot) = self.windows.get_mut(&source).and_then(|k| k.get_mut(i)) {
                slot.1 = fresh;
            }
            self.totals.first += 1;
            return RateVerdict::First;
        }
        if let Some(slot) = self.windows.get_mut(&source).and_then(|k| k.get_mut(i)) {
            let w = &mut slot.1;
            if w.count == 0 {
                w.first_ms = now;
            }
            w.count += 1;
            w.last_ms = w.last_ms.max(now);
        }
        self.totals.pending += 1;
        RateVerdict::Counted
    }

    /// Closes every window that has passed at `now`; summaries of those that
    /// counted something are appended to `closed`, oldest window first.
    pub fn close_expired(&mut self, now: u64, closed: &mut Vec<Summary>) {
        self.close_where(closed, |c, w| c.expired(w, now));
    }

    /// Closes every window (shutdown).
    pub fn close_all(&mut self, closed: &mut Vec<Summary>) {
        self.close_where(closed, |_, _| true);
    }

    fn close_where(&mut self, closed: &mut Vec<Summary>, pick: impl Fn(&Self, &Window) -> bool) {
        let mut done: Vec<(Source, &'static str, Window)> = Vec::new();
        for (src, kinds) in &self.windows {
            for (kind, w) in kinds {
                if pick(self, w) {
                    done.push((*src, kind, *w));
                }
            }
        }
        if done.is_empty() {
            return;
        }
        done.sort_by_key(|(src, kind, w)| (w.start_ms, *src, *kind));
        for (src, kind, w) in done {
            if let Some(s) = self.summary(src, kind, &w) {
                closed.push(s);
            }
            if let Some(kinds) = self.windows.get_mut(&src) {
                kinds.retain(|(k, _)| *k != kind);
                if kinds.is_empty() {
                    self.windows.remove(&src);
                    if matches!(src, Source::Addr(_)) {
                        self.addrs -= 1;
                    }
                }
            }
        }
    }

    /// When the earliest window that counted something ends (for a timer):
    /// its summary is due then.
    pub fn next_close(&self) -> Option<u64> {
        self.windows
            .values()
            .flatten()
            .filter(|(_, w)| w.count > 0)
            .map(|(_, w)| w.start_ms.saturating_add(self.window_ms))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn books_balance(c: &RateCounter) {
        let t = c.totals();
        assert_eq!(t.seen, t.first + t.summarized + t.pending, "{t:?}");
    }

    #[test]
    fn the_first_of_a_source_and_kind_is_reported_the_rest_summarized_when_the_window_closes() {
        let mut c = RateCounter::new(1_000, 8);
        let mut closed = Vec::new();
        let a = ip("192.0.2.9");
        assert_eq!(
            c.observe(100, a, "bad_mac", &mut closed),
            RateVerdict::First
        );
        // Another kind from the same source, and the same kind from another, are firsts too.
        assert_eq!(
            c.observe(110, a, "malformed", &mut closed),
            RateVerdict::First
        );
        assert_eq!(
            c.observe(120, ip("192.0.2.10"), "bad_mac", &mut closed),
            RateVerdict::First
        );
        for t in [200, 300, 1_099] {
            assert_eq!(
                c.observe(t, a, "bad_mac", &mut closed),
                RateVerdict::Counted
            );
        }
        assert!(closed.is_empty());
        assert_eq!(c.next_close(), Some(1_100));
        c.close_expired(1_099, &mut closed);
        assert!(closed.is_empty(), "the window is still open");
        // Every window has passed at 1 120 (the last one opened at 120).
        c.close_expired(1_120, &mut closed);
        assert_eq!(
            closed,
            [Summary {
                source: Source::Addr(a),
                kind: "bad_mac",
                count: 3,
                window_start_ms: 100,
                window_ms: 1_000,
                first_ms: 200,
                last_ms: 1_099,
            }]
        );
        assert_eq!(c.next_close(), None, "nothing else was counted");
        assert_eq!(
            c.totals(),
            Totals {
                seen: 6,
                first: 3,
                summarized: 3,
                pending: 0
            }
        );
        // The windows that counted nothing closed silently and freed their sources.
        assert_eq!(c.tracked_sources(), 0);
        // After the window, the next one is reported in full again.
        assert_eq!(
            c.observe(1_200, a, "bad_mac", &mut closed),
            RateVerdict::First
        );
    }

    #[test]
    fn a_refusal_after_its_window_closes_it_and_opens_the_next() {
        let mut c = RateCounter::new(1_000, 8);
        let mut closed = Vec::new();
        let a = ip("2001:db8::1");
        c.observe(0, a, "replay", &mut closed);
        c.observe(10, a, "replay", &mut closed);
        c.observe(20, a, "replay", &mut closed);
        assert_eq!(
            c.observe(1_000, a, "replay", &mut closed),
            RateVerdict::First
        );
        assert_eq!(closed.len(), 1);
        assert_eq!(
            (closed[0].count, closed[0].first_ms, closed[0].last_ms),
            (2, 10, 20)
        );
        assert_eq!(
            c.observe(1_500, a, "replay", &mut closed),
            RateVerdict::Counted
        );
        assert_eq!(c.next_close(), Some(2_000));
        closed.clear();
        c.close_all(&mut closed);
        assert_eq!(closed.len(), 1);
        assert_eq!(
            (closed[0].count, closed[0].window_start_ms),
            (1, 1_000),
            "{closed:?}"
        );
        books_balance(&c);
        assert_eq!(c.totals().pending, 0);
    }

    #[test]
    fn sources_beyond_the_cap_share_one_bucket_per_kind() {
        let mut c = RateCounter::new(60_000, 4);
        let mut closed = Vec::new();
        let mut firsts = 0;
        // 1 000 spoofed sources, 5 refusals each, all inside one window.
        for i in 0..1_000u32 {
            let from = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            for j in 0..5 {
                if c.observe(u64::from(i * 5 + j), from, "bad_signature", &mut closed)
                    == RateVerdict::First
                {
                    firsts += 1;
                }
            }
            assert!(c.tracked_sources() <= 4);
        }
        assert!(closed.is_empty(), "no window has passed");
        // 4 tracked sources and the bucket: 5 reported in full.
        assert_eq!(firsts, 5);
        assert_eq!(c.windows.len(), 5, "memory stays at the cap");
        c.close_all(&mut closed);
        assert_eq!(closed.len(), 5);
        let other: Vec<_> = closed
            .iter()
            .filter(|s| s.source == Source::Other)
            .collect();
        assert_eq!(other.len(), 1);
        assert_eq!(other[0].count, 996 * 5 - 1);
        assert_eq!(
            closed.iter().map(|s| s.count).sum::<u64>() + firsts,
            5_000,
            "every refusal is reported or counted"
        );
        assert_eq!(other[0].detail()["source"], "other sources");
        books_balance(&c);
    }

    #[test]
    fn a_full_table_makes_room_by_closing_windows_that_passed() {
        let mut c = RateCounter::new(100, 2);
        let mut closed = Vec::new();
        c.observe(0, ip("10.0.0.1"), "malformed", &mut closed);
        c.observe(1, ip("10.0.0.1"), "malformed", &mut closed);
        c.observe(50, ip("10.0.0.2"), "malformed", &mut closed);
        // Full; 10.0.0.1's window passed at 100: closed to make room for 10.0.0.3.
        assert_eq!(
            c.observe(120, ip("10.0.0.3"), "malformed", &mut closed),
            RateVerdict::First
        );
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].source, Source::Addr(ip("10.0.0.1")));
        assert_eq!(c.tracked_sources(), 2, "10.0.0.2 (until 150) and 10.0.0.3");
        books_balance(&c);
    }

    #[test]
    fn exact_totals_over_a_random_stream() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let kinds = ["malformed", "bad_mac", "bad_signature", "replay"];
        let mut c = RateCounter::new(700, 16);
        let mut closed = Vec::new();
        let (mut now, mut firsts) = (0u64, 0u64);
        for n in 0..50_000u64 {
            now += rng.gen_range(0..3);
            let from = IpAddr::from(std::net::Ipv4Addr::new(10, 0, 0, rng.gen_range(0..40)));
            if c.observe(now, from, kinds[rng.gen_range(0..4)], &mut closed) == RateVerdict::First {
                firsts += 1;
            }
            if n % 1_000 == 0 {
                c.close_expired(now, &mut closed);
            }
            books_balance(&c);
            assert!(c.tracked_sources() <= 16);
        }
        c.close_all(&mut closed);
        let summed: u64 = closed.iter().map(|s| s.count).sum();
        assert_eq!(firsts + summed, 50_000);
        assert_eq!(c.totals().pending, 0);
        // At most two rows (the first, the summary) per key and window: 16
        // tracked sources and the bucket, 4 kinds each, over the windows spanned.
        let windows = now / 700 + 1;
        let bound = 2 * (16 + 1) * 4 * windows;
        assert!(
            firsts + (closed.len() as u64) <= bound,
            "{firsts} + {} rows for 50 000 refusals in {windows} windows",
            closed.len()
        );
        // Every summary lies inside its window.
        for s in &closed {
            assert!(s.count > 0 && s.window_start_ms <= s.first_ms, "{s:?}");
            assert!(
                s.first_ms <= s.last_ms && s.last_ms < s.window_start_ms + 700,
                "{s:?}"
            );
        }
    }

    #[test]
    fn a_steady_flood_from_one_source_costs_two_rows_per_window() {
        let mut c = RateCounter::new(60_000, 256);
        let mut closed = Vec::new();
        let mut firsts = 0;
        // 20 000 refusals over 5 minutes, one every 15 ms.
        for i in 0..20_000u64 {
            if c.observe(i * 15, ip("192.0.2.66"), "bad_signature", &mut closed)
                == RateVerdict::First
            {
                firsts += 1;
            }
        }
        c.close_all(&mut closed);
        assert_eq!((firsts, closed.len()), (5, 5));
        assert_eq!(closed.iter().map(|s| s.count).sum::<u64>(), 20_000 - 5);
    }

    #[test]
    fn a_zero_window_reports_every_refusal() {
        let mut c = RateCounter::new(0, 4);
        let mut closed = Vec::new();
        for t in 0..10 {
            assert_eq!(
                c.observe(t / 3, ip("10.0.0.1"), "malformed", &mut closed),
                RateVerdict::First
            );
        }
        assert!(closed.is_empty());
    }

    #[test]
    fn the_summary_says_how_many_of_what_from_whom_and_when() {
        let s = Summary {
            source: Source::Addr(ip("192.0.2.7")),
            kind: "bad_signature",
            count: 19_998,
            window_start_ms: 1_764_083_000_000,
            window_ms: 60_000,
            first_ms: 1_764_083_000_001,
            last_ms: 1_764_083_004_250,
        };
        assert_eq!(
            s.text(),
            "19998 more refusals of kind bad_signature from 192.0.2.7 between \
             2025-11-25T15:03:20.001Z and 2025-11-25T15:03:24.250Z"
        );
        let d = s.detail();
        assert_eq!(d["source"], "192.0.2.7");
        assert_eq!(d["kind"], "bad_signature");
        assert_eq!(d["count"], 19_998);
        assert_eq!(d["first_ms"], 1_764_083_000_001u64);
        assert_eq!(d["last_ms"], 1_764_083_004_250u64);
        assert_eq!(d["window_ms"], 60_000);
        assert_eq!(d["text"], s.text());
    }
}
