//! `[retry]`: the default retry policy and per-topic overrides (I6).
//!
//! A `[retry.topics."name"]` table overrides some fields of the default; the rest are inherited.
//! Each resolved policy is validated, and an error names the field, override path included.

use super::{invalid, ConfigError};
use crate::backoff::{Backoff, BackoffKind};
use crate::store::capture::{Line, OnDead};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// One retry policy (`[retry]`, or a `[retry.topics."name"]` override of some of its fields).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first delivery included: 4 means one delivery and three retries.
    pub max_attempts: u32,
    /// `exponential` or `linear`.
    pub backoff: BackoffKind,
    /// Delay after the first failure.
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    /// Growth per attempt for the exponential policy.
    pub multiplier: f64,
    /// Cap on the delay.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Fraction in [0, 1] by which a delay is shortened at random, to spread retries out; in
    /// [`crate::backoff::JITTER_STEPS`] equal steps.
    pub jitter: f64,
    /// Cap on a handler's `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub retry_after_max: Duration,
    /// `none`: messages are handled concurrently and a failure holds back no other message.
    /// `key`: the messages of one key (within a partition) are handled one after another, and the
    /// messages behind a failed one wait in the retry table until it is done (I12).
    pub ordering: OrderingMode,
    /// With `ordering = "key"`, what a dead message does to the messages of its key behind it:
    /// `block` (they wait for an operator to replay or purge it) or `skip` (the next one goes on).
    pub on_dead: OnDead,
}

/// What order a topic's messages are handled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderingMode {
    /// Concurrently; a failed message does not hold back later ones.
    #[default]
    None,
    /// One at a time per key and partition; a failed message holds back its key's later ones.
    Key,
}

/// `[retry]`: the default policy, and `topics` with per-topic overrides.
#[derive(Debug, Clone, Default)]
pub struct RetryConfig {
    /// Applies to topics without an override.
    pub default: RetryPolicy,
    /// Fully resolved policy per overridden topic.
    pub topics: BTreeMap<String, RetryPolicy>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff: BackoffKind::Exponential,
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(3600),
            jitter: 0.1,
            retry_after_max: Duration::from_secs(3600),
            ordering: OrderingMode::None,
            on_dead: OnDead::Block,
        }
    }
}

impl RetryPolicy {
    /// The key line a message of this topic joins (I12): with key ordering and a key, its line;
    /// otherwise none (a record without a key has no order to keep).
    pub fn line(&self, key: Option<&[u8]>) -> Option<Line> {
        match (self.ordering, key) {
            (OrderingMode::Key, Some(key)) => Some(Line::of(key, self.on_dead)),
            _ => None,
        }
    }

    /// With key ordering, its dead-row policy; `None` without.
    pub fn ordered(&self) -> Option<OnDead> {
        (self.ordering == OrderingMode::Key).then_some(self.on_dead)
    }

    /// The backoff parameters of this policy.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            kind: self.backoff,
            initial: self.initial_delay,
            multiplier: self.multiplier,
            max_delay: self.max_delay,
            jitter: self.jitter,
            retry_after_max: self.retry_after_max,
        }
    }

    pub(super) fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.max_attempts < 1 {
            return Err(invalid(format!("{at}.max_attempts"), "must be at least 1"));
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(invalid(format!("{at}.multiplier"), "must be a number >= 1"));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(invalid(format!("{at}.jitter"), "must be between 0 and 1"));
        }
        if self.max_delay < self.initial_delay {
            return Err(invalid(
                format!("{at}.max_delay"),
                "must not be shorter than initial_delay",
            ));
        }
        Ok(())
    }
}

impl RetryConfig {
    /// Whether any topic keeps key order.
    pub fn any_ordered(&self) -> bool {
        std::iter::once(&self.default)
            .chain(self.topics.values())
            .any(|p| p.ordering == OrderingMode::Key)
    }

    /// The policy for a topic: its override, or the default.
    pub fn for_topic(&self, topic: &str) -> &RetryPolicy {
        self.topics.get(topic).unwrap_or(&self.default)
    }

    /// Reads `[retry]`: the default policy's fields, and `topics.<name>` tables that override some.
    pub(super) fn from_figment(figment: &Figment) -> Result<Self, ConfigError> {
        let (default, topics) = super::with_overrides(figment, "retry", RetryPolicy::validate)?;
        Ok(Self { default, topics })
    }
}
