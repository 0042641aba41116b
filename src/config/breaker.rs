//! `[breaker]`: the circuit breaker (I13), and per-topic overrides in `[breaker.topics."name"]`.
//!
//! Topics without an override share one breaker, as they share the handler; a topic with an
//! override has a breaker of its own.

use super::{invalid, ConfigError};
use crate::breaker::{Settings, Window};
use crate::handler::ErrorKind;
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// One breaker's settings (`[breaker]`, or a `[breaker.topics."name"]` override of some).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerPolicy {
    /// `false` turns the breaker off: failures are captured and retried whatever their rate.
    pub enabled: bool,
    /// The time the failure rate is taken over.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// When set, the failure rate is taken over this many last calls instead of `window`.
    pub window_calls: Option<u32>,
    /// Fewer calls than this in the window never open the breaker.
    pub min_calls: u32,
    /// The share of failed calls, in (0, 1], at which the breaker opens.
    pub failure_rate: f64,
    /// The classes of failure that count: `retryable`, `timeout`, `permanent`. A permanent error
    /// says the message is bad, not the service, so it does not count by default.
    pub count: Vec<Counted>,
    /// How long the breaker stays open the first time; each failed probe doubles it.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// The longest it stays open, a handler's `Retry-After` included.
    #[serde(with = "humantime_serde")]
    pub open_max: Duration,
    /// Calls let through, one at a time, when the open time is over; all must succeed to close it.
    pub probes: u32,
    /// After it closes, the time over which the consumer and the workers go from a trickle back
    /// to their full rate.
    #[serde(with = "humantime_serde")]
    pub ramp: Duration,
}

/// A class of failure, as named in `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Counted {
    Retryable,
    Timeout,
    Permanent,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        let s = Settings::default();
        let window = match s.window {
            Window::Time(d) => d,
            Window::Calls(_) => Duration::from_secs(30),
        };
        BreakerPolicy {
            enabled: s.enabled,
            window,
            window_calls: None,
            min_calls: s.min_calls,
            failure_rate: s.failure_rate,
            count: vec![Counted::Retryable, Counted::Timeout],
            open_for: s.open_for,
            open_max: s.open_max,
            probes: s.probes,
            ramp: s.ramp,
        }
    }
}

impl BreakerPolicy {
    /// The breaker's settings.
    pub fn settings(&self) -> Settings {
        Settings {
            enabled: self.enabled,
            window: match self.window_calls {
                Some(n) => Window::Calls(n),
                None => Window::Time(self.window),
            },
            min_calls: self.min_calls,
            failure_rate: self.failure_rate,
            counted: self
                .count
                .iter()
                .map(|c| match c {
                    Counted::Retryable => ErrorKind::Retryable,
                    Counted::Timeout => ErrorKind::Timeout,
                    Counted::Permanent => ErrorKind::Permanent,
                })
                .collect(),
            open_for: self.open_for,
            open_max: self.open_max,
            probes: self.probes,
            ramp: self.ramp,
        }
    }

    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Err(invalid(
                format!("{at}.failure_rate"),
                "must be more than 0 and at most 1",
            ));
        }
        for (field, v) in [
            ("min_calls", self.min_calls),
            ("probes", self.probes),
            ("window_calls", self.window_calls.unwrap_or(1)),
        ] {
            if v == 0 {
                return Err(invalid(format!("{at}.{field}"), "must be at least 1"));
            }
        }
        if self.window.is_zero() {
            return Err(invalid(format!("{at}.window"), "must be longer than 0s"));
        }
        if self.open_for.is_zero() {
            return Err(invalid(format!("{at}.open_for"), "must be longer than 0s"));
        }
        if self.open_max < self.open_for {
            return Err(invalid(
                format!("{at}.open_max"),
                "must not be shorter than open_for",
            ));
        }
        if self.count.is_empty() {
            return Err(invalid(
                format!("{at}.count"),
                "must name at least one class (retryable, timeout, permanent); \
                 set enabled = false to turn the breaker off",
            ));
        }
        Ok(())
    }
}

/// `[breaker]`: the default, and per-topic overrides.
#[derive(Debug, Clone, Default)]
pub struct BreakerConfig {
    /// Applies to topics without an override; they share one breaker.
    pub default: BreakerPolicy,
    /// Fully resolved settings per overridden topic, each with a breaker of its own.
    pub topics: BTreeMap<String, BreakerPolicy>,
}

impl BreakerConfig {
    /// The settings for a topic: its override, or the default.
    pub fn for_topic(&self, topic: &str) -> &BreakerPolicy {
        self.topics.get(topic).unwrap_or(&self.default)
    }

    pub(super) fn from_figment(figment: &Figment) -> Result<Self, ConfigError> {
        let (default, topics) = super::with_overrides(figment, "breaker", BreakerPolicy::validate)?;
        Ok(Self { default, topics })
    }
}
