//! Time for the machines: a millisecond clock, deadlines keyed by id, jitter.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use rand::Rng;

/// Milliseconds as `u64`, monotonic, from a fixed origin.
///
/// [`Clock::wall`] starts at the wall-clock time (ms since the Unix epoch) when
/// it is made and then advances with the monotonic clock, so its readings can
/// be stored in the management table and compared across restarts, yet never
/// jump backwards when the system time is changed. Clones share the origin.
///
/// It reads `tokio::time::Instant`, so tests with tokio's paused time see it
/// advance with the virtual clock.
#[derive(Debug, Clone)]
pub struct Clock {
    origin: Instant,
    origin_ms: u64,
}

impl Clock {
    /// Anchored to the Unix epoch (ms since 1970 at creation).
    pub fn wall() -> Self {
        let origin_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Clock {
            origin: Instant::now(),
            origin_ms,
        }
    }

    /// Starting at 0 now.
    pub fn monotonic() -> Self {
        Clock {
            origin: Instant::now(),
            origin_ms: 0,
        }
    }

    /// The current time in ms.
    pub fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// The current time in µs, on the same scale: `now_us() / 1000` is
    /// what [`Self::now_ms`] reads.
    pub fn now_us(&self) -> u64 {
        let since = Instant::now().saturating_duration_since(self.origin);
        self.origin_ms
            .saturating_mul(1000)
            .saturating_add(u64::try_from(since.as_micros()).unwrap_or(u64::MAX))
    }

    /// The reading of this clock at `instant`.
    pub fn ms_at(&self, instant: Instant) -> u64 {
        let since = instant.saturating_duration_since(self.origin);
        self.origin_ms
            .saturating_add(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    /// The instant when this clock reads `ms` (now, if that is in the past).
    pub fn instant_at(&self, ms: u64) -> Instant {
        let after = ms.saturating_sub(self.origin_ms);
        self.origin
            .checked_add(Duration::from_millis(after))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365))
    }
}

/// Deadlines keyed by an id: arming an id again moves its deadline.
#[derive(Debug, Clone)]
pub struct Timers<K: Ord + Clone> {
    by_id: BTreeMap<K, u64>,
    by_time: BTreeSet<(u64, K)>,
}

impl<K: Ord + Clone> Default for Timers<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Ord + Clone> Timers<K> {
    pub fn new() -> Self {
        Timers {
            by_id: BTreeMap::new(),
            by_time: BTreeSet::new(),
        }
    }

    /// Sets (or moves) the deadline of `id` to `at_ms`.
    pub fn arm(&mut self, id: K, at_ms: u64) {
        if let Some(old) = self.by_id.insert(id.clone(), at_ms) {
            self.by_time.remove(&(old, id.clone()));
        }
        self.by_time.insert((at_ms, id));
    }

    /// Removes the deadline of `id`; whether there was one.
    pub fn cancel(&mut self, id: &K) -> bool {
        match self.by_id.remove(id) {
            Some(at) => {
                self.by_time.remove(&(at, id.clone()));
                true
            }
            None => false,
        }
    }

    /// The deadline of `id`, if armed.
    pub fn deadline(&self, id: &K) -> Option<u64> {
        self.by_id.get(id).copied()
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<u64> {
        self.by_time.first().map(|(at, _)| *at)
    }

    /// Removes and returns the ids whose deadline is at or before `now_ms`,
    /// earliest first.
    pub fn pop_expired(&mut self, now_ms: u64) -> Vec<K> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.by_time.first() {
            if *at > now_ms {
                break;
            }
            if let Some((_, id)) = self.by_time.pop_first() {
                self.by_id.remove(&id);
                out.push(id);
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Waits until the earliest deadline by `clock`, then returns the expired
    /// ids (never empty). Pends forever while no timer is armed. Cancel-safe:
    /// nothing is removed until it returns, so it can sit in a `tokio::select!`.
    pub async fn expired(&mut self, clock: &Clock) -> Vec<K> {
        loop {
            match self.next_deadline() {
                None => std::future::pending::<()>().await,
                Some(at) => {
                    tokio::time::sleep_until(clock.instant_at(at)).await;
                }
            }
            let fired = self.pop_expired(clock.now_ms());
            if !fired.is_empty() {
                return fired;
            }
        }
    }
}

/// `base_ms` spread uniformly over ±`fraction` of itself (fraction clamped to
/// 0..=1), so that many nodes do not retry in lockstep.
pub fn jitter<R: Rng + ?Sized>(base_ms: u64, fraction: f64, rng: &mut R) -> u64 {
    let f = if fraction.is_finite() {
        fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let spread = (base_ms as f64 * f) as u64;
    if spread == 0 {
        return base_ms;
    }
    base_ms - spread + rng.gen_range(0..=2 * spread)
}

/// Exponential backoff: `base_ms · 2^attempt`, capped at `max_ms`
/// (attempt 0 is the first retry).
pub fn backoff(attempt: u32, base_ms: u64, max_ms: u64) -> u64 {
    base_ms
        .checked_shl(attempt.min(63))
        .filter(|v| *v >> attempt.min(63) == base_ms)
        .unwrap_or(u64::MAX)
        .min(max_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn timers_fire_in_order_and_rearming_moves_a_deadline() {
        let mut t = Timers::new();
        t.arm("retry", 50);
        t.arm("stale", 30);
        t.arm("drain", 40);
        t.arm("retry", 10); // moved earlier
        assert_eq!(t.next_deadline(), Some(10));
        assert_eq!(t.len(), 3);
        assert_eq!(t.pop_expired(9), Vec::<&str>::new());
        assert_eq!(t.pop_expired(35), vec!["retry", "stale"]);
        assert!(t.cancel(&"drain"));
        assert!(!t.cancel(&"drain"));
        assert_eq!(t.next_deadline(), None);
        assert!(t.is_empty());
    }

    #[test]
    fn same_deadline_different_ids_both_fire() {
        let mut t = Timers::new();
        t.arm(2u32, 5);
        t.arm(1u32, 5);
        assert_eq!(t.pop_expired(5), vec![1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_waits_for_the_next_deadline() {
        let clock = Clock::monotonic();
        let mut t = Timers::new();
        t.arm(7u8, 200);
        t.arm(8u8, 100);
        let start = Instant::now();
        assert_eq!(t.expired(&clock).await, vec![8]);
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert_eq!(t.expired(&clock).await, vec![7]);
        assert!(start.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn clock_round_trips_instants() {
        let c = Clock::wall();
        let now = c.now_ms();
        assert!(
            now > 1_600_000_000_000,
            "wall clock reads ms since 1970: {now}"
        );
        let later = c.instant_at(now + 1_000);
        let back = c.ms_at(later);
        assert!((now + 999..=now + 1_001).contains(&back), "{now} {back}");
    }

    #[test]
    fn jitter_stays_in_range_and_spreads() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let v: Vec<u64> = (0..1000).map(|_| jitter(1000, 0.2, &mut rng)).collect();
        assert!(v.iter().all(|x| (800..=1200).contains(x)));
        let (lo, hi) = (v.iter().min().unwrap(), v.iter().max().unwrap());
        assert!(*lo < 850 && *hi > 1150, "spread {lo}..{hi}");
        assert_eq!(jitter(1000, 0.0, &mut rng), 1000);
        assert_eq!(jitter(1000, f64::NAN, &mut rng), 1000);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let v: Vec<u64> = (0..6).map(|a| backoff(a, 100, 2_000)).collect();
        assert_eq!(v, [100, 200, 400, 800, 1600, 2000]);
        assert_eq!(backoff(200, 100, 5_000), 5_000);
    }
}
