//! Percentiles and medians, the ratio of paired rounds with its interval ([`ratio_interval`]),
//! and connections measured in turns added up ([`Tally`]).

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

/// [`ratio_interval`] as `mean (low–high)` with `digits` decimals.
pub fn ratio_text(measured: &[f64], baseline: &[f64], digits: usize) -> Option<String> {
    ratio_interval(measured, baseline)
        .map(|(low, mean, high)| format!("{mean:.digits$} ({low:.digits$}–{high:.digits$})"))
}

/// The ratio of `measured` to `baseline` over rounds taken in pairs (round `i` of each side
/// together): the geometric mean of the rounds' own ratios with its 95% interval (normal
/// approximation, `mean ± 1.96 standard errors` of the logarithms), as (low, mean, high). What a
/// run can resolve: with few rounds, or rounds that spread widely, the interval is wide. `None`
/// with fewer than two pairs or a ratio that is not positive.
pub fn ratio_interval(measured: &[f64], baseline: &[f64]) -> Option<(f64, f64, f64)> {
    let logs: Vec<f64> = measured
        .iter()
        .zip(baseline)
        .map(|(m, b)| (m / b).ln())
        .collect();
    if logs.len() < 2 || logs.iter().any(|l| !l.is_finite()) {
        return None;
    }
    let n = logs.len() as f64;
    let mean = logs.iter().sum::<f64>() / n;
    let variance = logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let half = 1.96 * (variance / n).sqrt();
    Some(((mean - half).exp(), mean.exp(), (mean + half).exp()))
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

#[cfg(test)]
mod tests {
    use super::ratio_interval;

    #[test]
    fn the_interval_of_paired_rounds_narrows_with_agreeing_rounds() {
        let baseline = [100.0, 200.0, 150.0, 120.0];
        // Every round exactly 2% below its baseline: no spread, an interval of one point.
        let steady: Vec<f64> = baseline.iter().map(|b| b * 0.98).collect();
        let (low, mean, high) = ratio_interval(&steady, &baseline).expect("four pairs");
        for v in [low, mean, high] {
            assert!((v - 0.98).abs() < 1e-9, "{v}");
        }
        // Rounds 10% above and below: the mean is about 1 and the interval wide.
        let noisy = [110.0, 180.0, 165.0, 108.0];
        let (low, mean, high) = ratio_interval(&noisy, &baseline).expect("four pairs");
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        assert!(low < 0.92 && high > 1.08, "{low} {high}");
        assert_eq!(ratio_interval(&[1.0], &[1.0]), None);
        assert_eq!(ratio_interval(&[1.0, 0.0], &[1.0, 1.0]), None);
    }
}
