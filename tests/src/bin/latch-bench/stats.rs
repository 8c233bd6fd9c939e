//! Percentiles and medians, and connections measured in turns added up ([`Tally`]).

use crate::probe::Rate;

/// The `p` percentile of `sorted` (0 if empty).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The median of `values`.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// `median (min–max)` of `values`, with `digits` decimals.
pub fn spread(values: Vec<f64>, digits: usize) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mid = median(values);
    format!("{mid:.digits$} ({min:.digits$}–{max:.digits$})")
}

/// Connections measured in turns, added up.
#[derive(Default)]
pub struct Tally {
    pub count: usize,
    pub failures: usize,
    pub seconds: f64,
    pub latencies: Vec<u64>,
}

impl Tally {
    pub fn add(&mut self, r: Rate) {
        self.count += r.count;
        self.failures += r.failures;
        self.seconds += r.total_s;
        self.latencies.extend(r.latencies_us);
    }

    /// Another tally's connections added to this one.
    pub fn merge(&mut self, other: &Tally) {
        self.count += other.count;
        self.failures += other.failures;
        self.seconds += other.seconds;
        self.latencies.extend_from_slice(&other.latencies);
    }

    /// Completed connections per second.
    pub fn rate(&self) -> f64 {
        (self.count - self.failures) as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }

    pub fn percentile(&self, p: f64) -> u64 {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        percentile(&sorted, p)
    }
}
