//! Monte Carlo summaries in integers, so the firmware and the host print the same digits.
//!
//! A run's result is a count of correctly classified samples. The summary keeps exact sums
//! (`u64` sum, `u128` sum of squares) and prints fixed-point decimals computed by integer
//! division, never by floating point:
//! - `mean = round(sum * 10^4 / n) / 10^4` (half away from zero);
//! - `std` is the sample standard deviation (n - 1 in the denominator; 0 for a single run),
//!   `floor(sqrt(floor((n * sumsq - sum^2) * 10^8 / (n (n - 1))))) / 10^4`;
//! - `acc`, the mean accuracy in percent, `round(sum * 10^6 / (n * total)) / 10^4`.
//!
//! ```
//! use nvcim_firmware::stats::Accumulator;
//! let mut acc = Accumulator::new(100);
//! for c in [90, 92, 94] { acc.push(c); }
//! let s = acc.summary().unwrap();
//! assert_eq!(s.to_string(), "summary runs 3 total 100 mean 92.0000 std 2.0000 min 90 max 94 acc 92.0000%");
//! ```

use core::fmt;

/// A non-negative decimal with four fraction digits, stored as `value * 10^4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fixed4(pub u64);

impl fmt::Display for Fixed4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:04}", self.0 / 10_000, self.0 % 10_000)
    }
}

/// A non-negative decimal with two fraction digits, stored as `value * 100` (instruction
/// counts per operation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fixed2(pub u64);

impl Fixed2 {
    /// `num / den` rounded to two decimals (half up); `None` when `den` is 0.
    pub fn ratio(num: u64, den: u64) -> Option<Fixed2> {
        if den == 0 {
            return None;
        }
        let scaled = u128::from(num) * 200 + u128::from(den);
        Some(Fixed2(
            u64::try_from(scaled / (2 * u128::from(den))).unwrap_or(u64::MAX),
        ))
    }
}

impl fmt::Display for Fixed2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

/// One Monte Carlo run's output line: `run R correct C of T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLine {
    /// Run index, from 0.
    pub run: u32,
    /// Correctly classified samples.
    pub correct: u32,
    /// Samples classified.
    pub total: u32,
}

impl fmt::Display for RunLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "run {} correct {} of {}",
            self.run, self.correct, self.total
        )
    }
}

/// Running sums over the correct counts of the runs so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accumulator {
    total: u32,
    n: u64,
    sum: u64,
    sumsq: u128,
    min: u32,
    max: u32,
}

/// The summary line of a Monte Carlo evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Runs.
    pub runs: u64,
    /// Samples per run.
    pub total: u32,
    /// Mean correct count.
    pub mean: Fixed4,
    /// Sample standard deviation of the correct count.
    pub std: Fixed4,
    /// Fewest correct.
    pub min: u32,
    /// Most correct.
    pub max: u32,
    /// Mean accuracy in percent.
    pub accuracy: Fixed4,
}

impl Accumulator {
    /// No runs yet, `total` samples per run.
    pub const fn new(total: u32) -> Self {
        Accumulator {
            total,
            n: 0,
            sum: 0,
            sumsq: 0,
            min: u32::MAX,
            max: 0,
        }
    }

    /// Adds one run's correct count.
    pub fn push(&mut self, correct: u32) {
        let c = u64::from(correct);
        self.n += 1;
        self.sum += c;
        self.sumsq += u128::from(c * c);
        self.min = self.min.min(correct);
        self.max = self.max.max(correct);
    }

    /// The summary, or `None` before the first run.
    pub fn summary(&self) -> Option<Summary> {
        if self.n == 0 {
            return None;
        }
        let (n, sum) = (u128::from(self.n), u128::from(self.sum));
        let mean = (sum * 20_000 + n) / (2 * n);
        let std = if self.n < 2 {
            0
        } else {
            // n * sumsq >= sum^2 by Cauchy-Schwarz, so this never underflows.
            let spread = n * self.sumsq - sum * sum;
            (spread * 100_000_000 / (n * (n - 1))).isqrt()
        };
        let accuracy = if self.total == 0 {
            0
        } else {
            let den = n * u128::from(self.total);
            (sum * 2_000_000 + den) / (2 * den)
        };
        let fixed = |v: u128| Fixed4(u64::try_from(v).unwrap_or(u64::MAX));
        Some(Summary {
            runs: self.n,
            total: self.total,
            mean: fixed(mean),
            std: fixed(std),
            min: self.min,
            max: self.max,
            accuracy: fixed(accuracy),
        })
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "summary runs {} total {} mean {} std {} min {} max {} acc {}%",
            self.runs, self.total, self.mean, self.std, self.min, self.max, self.accuracy
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(total: u32, counts: &[u32]) -> Summary {
        let mut a = Accumulator::new(total);
        counts.iter().for_each(|&c| a.push(c));
        a.summary().unwrap()
    }

    #[test]
    fn empty_has_no_summary() {
        assert_eq!(Accumulator::new(10).summary(), None);
    }

    #[test]
    fn single_run_has_zero_std() {
        let s = summary(10, &[7]);
        assert_eq!(
            (s.mean, s.std, s.min, s.max, s.accuracy),
            (Fixed4(70_000), Fixed4(0), 7, 7, Fixed4(700_000))
        );
    }

    #[test]
    fn matches_float_statistics() {
        let counts = [9_812u32, 9_790, 9_833, 9_801, 9_777, 9_850, 9_799];
        let s = summary(10_000, &counts);
        let n = counts.len() as f64;
        let mean = counts.iter().map(|&c| f64::from(c)).sum::<f64>() / n;
        let var = counts
            .iter()
            .map(|&c| (f64::from(c) - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        assert!((s.mean.0 as f64 / 1e4 - mean).abs() <= 0.5e-4);
        // floor of the square root: at most one unit of the last digit below the true value.
        let std = s.std.0 as f64 / 1e4;
        assert!(
            std <= var.sqrt() + 1e-9 && var.sqrt() - std < 1.0e-4,
            "{std} vs {}",
            var.sqrt()
        );
        assert!((s.accuracy.0 as f64 / 1e4 - mean / 100.0).abs() <= 0.5e-4);
        assert_eq!((s.min, s.max), (9_777, 9_850));
    }

    #[test]
    fn rounding_is_half_up() {
        assert_eq!(summary(3, &[1, 2]).mean, Fixed4(15_000));
        assert_eq!(summary(3, &[0, 0, 1]).mean, Fixed4(3_333));
        assert_eq!(summary(3, &[0, 1, 1]).mean, Fixed4(6_667));
        assert_eq!(Fixed2::ratio(1, 3), Some(Fixed2(33)));
        assert_eq!(Fixed2::ratio(2, 3), Some(Fixed2(67)));
        assert_eq!(Fixed2::ratio(1, 0), None);
    }

    #[test]
    fn lines_format() {
        assert_eq!(
            RunLine {
                run: 3,
                correct: 97,
                total: 100
            }
            .to_string(),
            "run 3 correct 97 of 100"
        );
        assert_eq!(Fixed4(12_345).to_string(), "1.2345");
        assert_eq!(Fixed4(5).to_string(), "0.0005");
        assert_eq!(Fixed2(230).to_string(), "2.30");
        assert_eq!(
            summary(100, &[100, 0]).to_string(),
            "summary runs 2 total 100 mean 50.0000 std 70.7106 min 0 max 100 acc 50.0000%"
        );
    }
}
