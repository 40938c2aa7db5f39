//! Medians, percentiles and the machine facts every result file carries.

use serde::{Deserialize, Serialize};

/// The median of `xs` (mean of the two middle values for an even count); `None` when empty.
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The `p`-th percentile (nearest rank, 0..=100); `None` when empty.
pub fn percentile(xs: &[f64], p: u32) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p.min(100) as f64 / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// The three load averages of /proc/loadavg, when it can be read.
pub fn loadavg() -> Option<[f64; 3]> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// The load average around one section of the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Load {
    pub before: Option<[f64; 3]>,
    pub after: Option<[f64; 3]>,
}

impl Load {
    pub fn start() -> Load {
        Load {
            before: loadavg(),
            after: None,
        }
    }
    pub fn finish(mut self) -> Load {
        self.after = loadavg();
        self
    }
    /// "5.2 → 5.6" (the 1-minute averages).
    pub fn describe(&self) -> String {
        let one = |l: &Option<[f64; 3]>| l.map_or("?".to_string(), |l| format!("{:.1}", l[0]));
        format!("{} → {}", one(&self.before), one(&self.after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0), "NaN is left out");
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let xs: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50), Some(5.0));
        assert_eq!(percentile(&xs, 90), Some(9.0));
        assert_eq!(percentile(&xs, 100), Some(10.0));
        assert_eq!(percentile(&xs, 0), Some(1.0));
        assert_eq!(percentile(&[], 50), None);
    }

    #[test]
    fn load_is_described_by_its_one_minute_averages() {
        let l = Load {
            before: Some([5.25, 1.0, 1.0]),
            after: None,
        };
        assert_eq!(l.describe(), "5.2 → ?");
    }
}
