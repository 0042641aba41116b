//! The retry delay: a pure function of the attempt number and the policy (I6).
//!
//! `delay = min(max_delay, initial × multiplier^(attempt−1))` for the exponential policy and
//! `min(max_delay, initial × attempt)` for the linear one (Knative's `linear`). Jitter only ever
//! shortens the delay, by at most `jitter × delay`, so the cap holds; it does so in
//! [`JITTER_STEPS`] equal steps. A handler's `Retry-After` replaces the computed delay, clamped to
//! `retry_after_max`.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Jitter shortens a delay by `k / JITTER_STEPS` of its fraction, `k` drawn evenly from
/// `0..=JITTER_STEPS`. Rows written by one statement (a capture batch, a batch of failed retries)
/// then share at most 33 due times per policy and attempt, so the claim index, ordered by due time,
/// takes each group's entries together at one place; a due time of its own for every row puts each
/// entry at a random place in it, which cost capture about a tenth of its throughput (BENCHMARKS.md,
/// "Jitter in steps"). The spread is the same: a step is 1/32 of the jitter's span.
pub const JITTER_STEPS: u32 = 32;

/// How the delay grows with the attempt number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackoffKind {
    /// `initial × multiplier^(attempt−1)`.
    Exponential,
    /// `initial × attempt`, as Knative's linear backoff policy.
    Linear,
}

/// The parameters of one retry policy; see [`crate::config::RetryPolicy`] for the defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Growth shape.
    pub kind: BackoffKind,
    /// Delay after the first failed attempt.
    pub initial: Duration,
    /// Growth factor per attempt (exponential only).
    pub multiplier: f64,
    /// Cap on the computed delay.
    pub max_delay: Duration,
    /// Fraction in `[0, 1]` by which a delay may be shortened at random.
    pub jitter: f64,
    /// Cap on a handler's `Retry-After`.
    pub retry_after_max: Duration,
}

impl Backoff {
    /// The delay before the attempt after `failed_attempt` (1-based).
    ///
    /// `random` is a sample in `[0, 1)`; passing it in keeps this function pure and testable.
    pub fn delay(
        &self,
        failed_attempt: u32,
        random: f64,
        retry_after: Option<Duration>,
    ) -> Duration {
        if let Some(ra) = retry_after {
            return ra.min(self.retry_after_max);
        }
        let n = failed_attempt.max(1);
        let base = match self.kind {
            BackoffKind::Exponential => {
                // powi on a huge exponent saturates to +inf, which the min() below caps.
                self.initial.as_secs_f64()
                    * self.multiplier.powi((n - 1).min(i32::MAX as u32) as i32)
            }
            BackoffKind::Linear => self.initial.as_secs_f64() * f64::from(n),
        };
        let capped = base.min(self.max_delay.as_secs_f64());
        let steps = f64::from(JITTER_STEPS);
        let step = (random.clamp(0.0, 1.0) * (steps + 1.0)).floor().min(steps) / steps;
        let jittered = capped * (1.0 - self.jitter.clamp(0.0, 1.0) * step);
        Duration::from_secs_f64(jittered.max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(kind: BackoffKind) -> Backoff {
        Backoff {
            kind,
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(10),
            jitter: 0.0,
            retry_after_max: Duration::from_secs(30),
        }
    }

    #[test]
    fn exponential_doubles_then_caps() {
        let p = policy(BackoffKind::Exponential);
        let secs: Vec<u64> = (1..=6).map(|n| p.delay(n, 0.0, None).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn linear_grows_by_initial_each_attempt() {
        let p = policy(BackoffKind::Linear);
        let secs: Vec<u64> = (1..=4).map(|n| p.delay(n, 0.0, None).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 3, 4]);
    }

    #[test]
    fn huge_attempt_numbers_stay_at_the_cap() {
        let p = policy(BackoffKind::Exponential);
        assert_eq!(p.delay(u32::MAX, 0.0, None), Duration::from_secs(10));
    }

    #[test]
    fn jitter_only_shortens_within_its_fraction() {
        let p = Backoff {
            jitter: 0.5,
            ..policy(BackoffKind::Exponential)
        };
        assert_eq!(p.delay(3, 0.0, None), Duration::from_secs(4));
        assert_eq!(p.delay(3, 0.999_999, None).as_millis(), 2000);
        let mid = p.delay(3, 0.5, None);
        assert_eq!(mid, Duration::from_secs(3));
        assert!(p.delay(10, 0.3, None) <= p.max_delay);
    }

    #[test]
    fn jitter_takes_each_of_its_steps_alike() {
        let p = Backoff {
            jitter: 0.5,
            ..policy(BackoffKind::Exponential)
        };
        let samples = 33_000;
        let mut seen = std::collections::BTreeMap::new();
        for i in 0..samples {
            let random = f64::from(i) / f64::from(samples);
            *seen.entry(p.delay(3, random, None)).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), JITTER_STEPS as usize + 1, "{seen:?}");
        assert_eq!(seen.keys().next(), Some(&Duration::from_secs(2)));
        assert_eq!(seen.keys().last(), Some(&Duration::from_secs(4)));
        let step = Duration::from_secs(2) / JITTER_STEPS;
        for (lower, higher) in seen.keys().zip(seen.keys().skip(1)) {
            let gap = *higher - *lower;
            assert!(gap.abs_diff(step) < Duration::from_micros(1), "{gap:?}");
        }
        assert!(seen.values().all(|&n| n == 1000), "{seen:?}");
    }

    #[test]
    fn retry_after_replaces_the_delay_up_to_its_cap() {
        let p = policy(BackoffKind::Exponential);
        assert_eq!(
            p.delay(1, 0.0, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            p.delay(1, 0.0, Some(Duration::from_secs(3600))),
            Duration::from_secs(30)
        );
    }
}
