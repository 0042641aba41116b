//! Configuration: one TOML file, every setting overridable by a `REDRIVE_…` environment variable
//! (`REDRIVE_RETRY__MAX_ATTEMPTS=5`, `REDRIVE_KAFKA__BOOTSTRAP_SERVERS=…`).
//!
//! Bad configuration fails at startup with an error that names the field (I8). Secrets live in
//! [`SecretString`] or are redacted by [`redact_url`] / [`kafka_property_is_secret`], so they never
//! reach a log line, an error or `status` output (I9).

use crate::backoff::{Backoff, BackoffKind};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// The top-level sections; environment variables outside them (`REDRIVE_LOG`…) are not config.
const SECTIONS: &[&str] = &[
    "postgres", "kafka", "consumer", "workers", "retry", "handler", "dlq", "http", "shutdown",
];

/// A configuration error, with the field it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment variable did not parse into the expected types.
    #[error("invalid configuration: {0}")]
    Parse(#[from] Box<figment::Error>),
    /// A value parsed but is not allowed.
    #[error("invalid configuration: `{field}` {problem}")]
    Invalid { field: String, problem: String },
    /// The named file does not exist.
    #[error("configuration file {0} does not exist")]
    Missing(String),
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Everything `redrive` reads from its configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The retry store.
    pub postgres: PostgresConfig,
    /// Topics, and librdkafka properties passed through as they are.
    pub kafka: KafkaConfig,
    /// How the consumer batches captures and bounds its in-flight messages.
    pub consumer: ConsumerConfig,
    /// The retry workers.
    pub workers: WorkersConfig,
    /// Default retry policy and per-topic overrides.
    pub retry: RetryConfig,
    /// Where messages are delivered.
    pub handler: HandlerConfig,
    /// The dead-letter topic publisher.
    pub dlq: DlqConfig,
    /// The `/metrics`, `/healthz`, `/readyz` listener.
    pub http: HttpConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
}

/// `[postgres]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/db`; the password is never printed.
    pub url: SecretString,
    /// Pool size; each retry worker batch and each capture batch holds one connection briefly.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u32,
    /// How long one connection attempt may take before it counts as failed.
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

/// `[kafka]`: `topics`, plus any librdkafka property (`"bootstrap.servers"`, `"group.id"`, …).
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Topics to consume. They must exist: redrive never creates or assumes them.
    pub topics: Vec<String>,
    /// librdkafka properties, passed to the consumer and the DLQ producer as they are.
    pub properties: BTreeMap<String, String>,
}

/// `[consumer]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    /// Messages handled at once; when all are busy (or Postgres is down) the consumer waits.
    pub max_in_flight: usize,
    /// Most failed messages written in one INSERT.
    pub capture_batch_size: usize,
    /// How long the capturer waits for more failures before it writes a batch.
    #[serde(with = "humantime_serde")]
    pub capture_linger: Duration,
}

/// `[workers]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// Handler calls in flight at once in this process.
    pub concurrency: usize,
    /// Most rows claimed by one statement.
    pub claim_batch_size: usize,
    /// How long a claim is held; a worker that dies loses its rows after this (I3).
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Fallback wake-up when no NOTIFY arrives; wake-ups are normally by NOTIFY or the next due time.
    #[serde(with = "humantime_serde")]
    pub max_idle: Duration,
    /// Most completions finished in one statement.
    pub complete_batch_size: usize,
    /// How long the completer waits for more completions before it writes a batch.
    #[serde(with = "humantime_serde")]
    pub complete_linger: Duration,
}

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
    /// Fraction in [0, 1] by which a delay is shortened at random, to spread retries out.
    pub jitter: f64,
    /// Cap on a handler's `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub retry_after_max: Duration,
}

/// `[retry]`: the default policy, and `topics` with per-topic overrides.
#[derive(Debug, Clone, Default)]
pub struct RetryConfig {
    /// Applies to topics without an override.
    pub default: RetryPolicy,
    /// Fully resolved policy per overridden topic.
    pub topics: BTreeMap<String, RetryPolicy>,
}

/// `[handler]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandlerConfig {
    /// The HTTP endpoint every message is POSTed to.
    pub url: Option<String>,
    /// A call that takes longer fails as a timeout (retryable).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Statuses that are retried: exact codes ("429") or classes ("5xx").
    pub retryable_statuses: Vec<String>,
    /// Statuses that kill the message at once. Statuses in neither list are retried.
    pub permanent_statuses: Vec<String>,
    /// CloudEvents `source`; `{group}` and `{topic}` are filled in.
    pub ce_source: String,
    /// CloudEvents `type`.
    pub ce_type: String,
}

/// `[dlq]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DlqConfig {
    /// The DLQ topic; `{topic}` is the source topic. It must exist.
    pub topic: String,
    /// How long the broker has to acknowledge a record before the batch is tried again.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Most dead rows published per round.
    pub batch_size: i64,
    /// librdkafka properties for the DLQ producer only, over those in `[kafka]`.
    pub kafka: BTreeMap<String, Value>,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the `/metrics`, `/healthz` and `/readyz` listener.
    pub listen: SocketAddr,
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Time in-flight work gets to finish after SIGTERM before it is abandoned to redelivery.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

mod defaults {
    use std::time::Duration;
    pub fn max_connections() -> u32 {
        10
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            capture_batch_size: 500,
            capture_linger: Duration::from_millis(5),
        }
    }
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            concurrency: 32,
            claim_batch_size: 100,
            lease: Duration::from_secs(60),
            max_idle: Duration::from_secs(30),
            complete_batch_size: 200,
            complete_linger: Duration::from_millis(5),
        }
    }
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
        }
    }
}

impl Default for HandlerConfig {
    fn default() -> Self {
        Self {
            url: None,
            timeout: Duration::from_secs(30),
            retryable_statuses: vec!["408".into(), "429".into(), "5xx".into()],
            permanent_statuses: vec!["4xx".into()],
            ce_source: "/redrive/{group}#{topic}".into(),
            ce_type: "dev.knative.kafka.event".into(),
        }
    }
}

impl Default for DlqConfig {
    fn default() -> Self {
        Self {
            topic: "{topic}.dlq".into(),
            publish_timeout: Duration::from_secs(30),
            batch_size: 100,
            kafka: BTreeMap::new(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
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

    fn validate(&self, at: &str) -> Result<(), ConfigError> {
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
    /// The policy for a topic: its override, or the default.
    pub fn for_topic(&self, topic: &str) -> &RetryPolicy {
        self.topics.get(topic).unwrap_or(&self.default)
    }

    /// Reads `[retry]`: the default policy's fields, and `topics.<name>` tables that override some.
    fn from_figment(figment: &Figment) -> Result<Self, ConfigError> {
        let mut section: Dict = match figment.find_value("retry") {
            Ok(v) => v
                .into_dict()
                .ok_or_else(|| invalid("retry", "must be a table"))?,
            Err(_) => Dict::new(),
        };
        let overrides = section.remove("topics");
        let base = Figment::from(Serialized::defaults(RetryPolicy::default()))
            .merge(Serialized::defaults(section));
        let default: RetryPolicy = base.extract().map_err(|e| prefixed(e, "retry"))?;
        default.validate("retry")?;
        let mut topics = BTreeMap::new();
        let overrides = match overrides {
            Some(v) => v
                .into_dict()
                .ok_or_else(|| invalid("retry.topics", "must be a table"))?,
            None => Dict::new(),
        };
        for (topic, value) in overrides {
            let at = format!("retry.topics.\"{topic}\"");
            let dict = value
                .into_dict()
                .ok_or_else(|| invalid(&at, "must be a table"))?;
            let policy: RetryPolicy = Figment::from(Serialized::defaults(&default))
                .merge(Serialized::defaults(dict))
                .extract()
                .map_err(|e| prefixed(e, &at))?;
            policy.validate(&at)?;
            topics.insert(topic, policy);
        }
        Ok(Self { default, topics })
    }
}

/// Prefixes the path of a figment error that was raised on a sub-figment.
fn prefixed(mut e: figment::Error, at: &str) -> ConfigError {
    let path = std::mem::take(&mut e.path);
    let field = std::iter::once(at.to_string())
        .chain(path)
        .collect::<Vec<_>>()
        .join(".");
    invalid(field, e.kind.to_string())
}

impl KafkaConfig {
    /// Reads `[kafka]`: `topics`, and every other key as a librdkafka property.
    ///
    /// An environment override arrives nested (`REDRIVE_KAFKA__GROUP_ID` → `group` → `id`), so
    /// nested tables are flattened back into dotted names, after (and so over) the file's keys.
    fn from_figment(figment: &Figment) -> Result<Self, ConfigError> {
        let mut section = figment
            .find_value("kafka")
            .map_err(|_| {
                invalid(
                    "kafka",
                    "is missing: it needs at least `topics` and \"group.id\"",
                )
            })?
            .into_dict()
            .ok_or_else(|| invalid("kafka", "must be a table"))?;
        let topics = match section.remove("topics") {
            Some(Value::Array(_, items)) => items
                .into_iter()
                .map(|v| {
                    v.into_string()
                        .ok_or_else(|| invalid("kafka.topics", "must be a list of strings"))
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(Value::String(_, s)) => s.split(',').map(|t| t.trim().to_string()).collect(),
            Some(_) => return Err(invalid("kafka.topics", "must be a list of strings")),
            None => {
                return Err(invalid(
                    "kafka.topics",
                    "is missing: name the topics to consume",
                ))
            }
        };
        if topics.is_empty() || topics.iter().any(|t| t.is_empty()) {
            return Err(invalid(
                "kafka.topics",
                "must name at least one topic, none of them empty",
            ));
        }
        let properties = flatten_properties(section, "kafka")?;
        if !properties.contains_key("group.id") {
            return Err(invalid(
                "kafka.\"group.id\"",
                "is missing: the consumer group is required",
            ));
        }
        Ok(Self { topics, properties })
    }

    /// The consumer group.
    pub fn group_id(&self) -> &str {
        self.properties
            .get("group.id")
            .map(String::as_str)
            .unwrap_or_default()
    }
}

/// Turns a table of librdkafka properties into dotted names and string values.
pub fn flatten_properties(dict: Dict, at: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    let (flat, nested): (Vec<_>, Vec<_>) =
        dict.into_iter().partition(|(_, v)| v.as_dict().is_none());
    for (key, value) in flat.into_iter().chain(nested) {
        flatten_into(&mut out, key.replace('_', "."), value, at)?;
    }
    Ok(out)
}

fn flatten_into(
    out: &mut BTreeMap<String, String>,
    key: String,
    v: Value,
    at: &str,
) -> Result<(), ConfigError> {
    let text = match v {
        Value::Dict(_, d) => {
            for (k, inner) in d {
                flatten_into(out, format!("{key}.{}", k.replace('_', ".")), inner, at)?;
            }
            return Ok(());
        }
        Value::String(_, s) => s,
        Value::Char(_, c) => c.to_string(),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => n
            .to_i128()
            .map(|i| i.to_string())
            .or_else(|| n.to_f64().map(|f| f.to_string()))
            .unwrap_or_default(),
        Value::Empty(..) | Value::Array(..) => {
            return Err(invalid(
                format!("{at}.\"{key}\""),
                "must be a string, number or boolean",
            ))
        }
    };
    out.insert(key, text);
    Ok(())
}

impl Config {
    /// Loads the file (if any), then the environment over it, and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::Missing(path.display().to_string()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        Self::from_figment(figment.merge(environment()))
    }

    /// Parses a TOML document with no environment overrides (tests, and embedded configs).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(text)))
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        // A file that does not parse is reported as such, before any field is looked for.
        let _: Dict = figment
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        let kafka = KafkaConfig::from_figment(&figment)?;
        let retry = RetryConfig::from_figment(&figment)?;
        let partial: Partial = figment
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        let config = Config {
            postgres: partial.postgres,
            kafka,
            consumer: partial.consumer,
            workers: partial.workers,
            retry,
            handler: partial.handler,
            dlq: partial.dlq,
            http: partial.http,
            shutdown: partial.shutdown,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let url = url::Url::parse(self.postgres.url.expose_secret())
            .map_err(|e| invalid("postgres.url", format!("is not a URL: {e}")))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(invalid("postgres.url", "must start with postgres://"));
        }
        let positive = [
            ("consumer.max_in_flight", self.consumer.max_in_flight),
            (
                "consumer.capture_batch_size",
                self.consumer.capture_batch_size,
            ),
            ("workers.concurrency", self.workers.concurrency),
            ("workers.claim_batch_size", self.workers.claim_batch_size),
            (
                "workers.complete_batch_size",
                self.workers.complete_batch_size,
            ),
            (
                "postgres.max_connections",
                self.postgres.max_connections as usize,
            ),
            ("dlq.batch_size", self.dlq.batch_size.max(0) as usize),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(invalid(*field, "must be at least 1"));
        }
        if self.workers.lease <= self.handler.timeout {
            return Err(invalid(
                "workers.lease",
                "must be longer than handler.timeout, or live attempts would be taken over",
            ));
        }
        if let Some(u) = &self.handler.url {
            let parsed = url::Url::parse(u)
                .map_err(|e| invalid("handler.url", format!("is not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(invalid("handler.url", "must be an http:// or https:// URL"));
            }
        }
        for (field, list) in [
            (
                "handler.retryable_statuses",
                &self.handler.retryable_statuses,
            ),
            (
                "handler.permanent_statuses",
                &self.handler.permanent_statuses,
            ),
        ] {
            if let Some(bad) = list
                .iter()
                .find(|s| crate::handler::http::StatusPattern::parse(s).is_none())
            {
                return Err(invalid(
                    field,
                    format!("has {bad:?}, which is neither a status code nor a class like \"5xx\""),
                ));
            }
        }
        if self.dlq.topic.trim().is_empty() {
            return Err(invalid("dlq.topic", "must not be empty"));
        }
        Ok(())
    }

    /// The DLQ producer's librdkafka properties: `[kafka]`'s, then `[dlq.kafka]` over them.
    pub fn dlq_kafka_properties(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        let mut props = self.kafka.properties.clone();
        props.extend(flatten_properties(
            self.dlq.kafka.clone().into_iter().collect(),
            "dlq.kafka",
        )?);
        Ok(props)
    }
}

/// What the typed extraction reads; `kafka` and `retry` are read by their own functions.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Partial {
    postgres: PostgresConfig,
    #[serde(rename = "kafka", default)]
    _kafka: serde::de::IgnoredAny,
    #[serde(rename = "retry", default)]
    _retry: serde::de::IgnoredAny,
    #[serde(default)]
    consumer: ConsumerConfig,
    #[serde(default)]
    workers: WorkersConfig,
    #[serde(default)]
    handler: HandlerConfig,
    #[serde(default)]
    dlq: DlqConfig,
    #[serde(default)]
    http: HttpConfig,
    #[serde(default)]
    shutdown: ShutdownConfig,
}

/// `REDRIVE_SECTION__FIELD` variables, for the known sections only.
fn environment() -> Env {
    Env::prefixed("REDRIVE_").split("__").filter(|key| {
        // The key is not lower-cased yet at this point: `KAFKA.GROUP_ID`.
        let section = key.as_str().split('.').next().unwrap_or_default();
        SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(section))
    })
}

/// The URL with its password replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                // Setting a password only fails for URLs that cannot have one, checked just above.
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".to_string(),
    }
}

/// Whether a librdkafka property holds a secret (`sasl.password`, `ssl.key.password`, …).
pub fn kafka_property_is_secret(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("password")
        || n.contains("secret")
        || n.contains("sasl.jaas")
        || n.contains("oauthbearer.config")
}

#[cfg(test)]
mod tests;
