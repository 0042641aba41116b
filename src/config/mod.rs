//! Configuration: one TOML file, every setting overridable by a `REDRIVE_…` environment variable
//! (`REDRIVE_RETRY__MAX_ATTEMPTS=5`, `REDRIVE_KAFKA__BOOTSTRAP_SERVERS=…`).
//!
//! Bad configuration fails at startup with an error that names the field (I8). Secrets live in
//! [`SecretString`] or are redacted by [`redact_url`] / [`kafka_property_is_secret`], so they never
//! reach a log line, an error or `status` output (I9).

use figment::providers::{Env, Format, Toml};
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
    "postgres",
    "kafka",
    "consumer",
    "workers",
    "retry",
    "breaker",
    "handler",
    "dlq",
    "http",
    "shutdown",
    "console",
    "telemetry",
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

pub(super) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
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
    /// The circuit breaker, and per-topic overrides (I13).
    pub breaker: BreakerConfig,
    /// Where messages are delivered.
    pub handler: HandlerConfig,
    /// The dead-letter topic publisher.
    pub dlq: DlqConfig,
    /// The `/metrics`, `/healthz`, `/readyz` listener.
    pub http: HttpConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// The table's gauges, and traces.
    pub telemetry: TelemetryConfig,
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

/// `[consumer]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    /// Messages handled at once; when all are busy the consumer waits. A failed message gives its
    /// slot back once the capturer has taken it, so this bounds handler calls, not rows being written.
    /// Through the HTTP handler each one holds a connection, about 45 KiB of memory: the default,
    /// 128, carries 12,800 messages/s to an endpoint that answers in 10 ms.
    pub max_in_flight: usize,
    /// Most failed messages written in one INSERT. The capturer holds at most
    /// `capture_in_flight` + 1 batches of failures that are not yet durable.
    pub capture_batch_size: usize,
    /// Most bytes (keys, values, headers, errors) written in one INSERT. Postgres refuses a value
    /// over 1 GB, so a burst of large records is split over several statements. Also the most
    /// bytes of failures the capturer holds that are not yet durable.
    pub capture_batch_bytes: usize,
    /// How long the capturer waits for more failures before it writes a batch. A batch that holds
    /// a row in a key line does not wait: that key's next messages wait for the row.
    #[serde(with = "humantime_serde")]
    pub capture_linger: Duration,
    /// Capture batches written at once, each on its own connection.
    pub capture_in_flight: usize,
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
    /// How long the completer waits for more completions before it writes a batch. A handler's
    /// slot is free as soon as its completion is handed over, so this costs no throughput; at
    /// modest rates a longer wait means fewer statements (at 1,000 rows/s, 50 ms spent about a
    /// tenth less of Postgres's CPU than 20 ms). Successes not yet written when a process dies
    /// are attempted again once their leases run out.
    #[serde(with = "humantime_serde")]
    pub complete_linger: Duration,
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
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DlqConfig {
    /// The DLQ topic; `{topic}` is the source topic. It must exist.
    pub topic: String,
    /// How long the broker has to acknowledge a record before the batch is tried again.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Most dead rows published per round.
    pub batch_size: i64,
    /// Most bytes of keys and values published per round (a row larger than this goes alone), so
    /// a round of large records is split over several.
    pub batch_bytes: usize,
    /// Rounds published at once while more rows wait, each holding a connection of the pool
    /// until the broker has answered for its records. Unset: 2, or 1 where
    /// `postgres.max_connections` leaves room for only one beside capture, claims and completions.
    pub rounds_in_flight: Option<usize>,
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

/// `[telemetry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// How often the row gauges (`redrive_rows`, `redrive_oldest_due_age_seconds`, the DLQ
    /// backlog, paused topics) are read from the table. One process of the database reads them at
    /// a time; `0s` turns them off in this process.
    #[serde(with = "humantime_serde")]
    pub sample_every: Duration,
    /// Where to send traces, over OTLP/HTTP (`http://collector:4318`, or `https://` with TLS;
    /// `/v1/traces` is added). Unset (the default): no trace is made.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of the traces.
    pub service_name: String,
    /// The share of the traces redrive starts that are exported, from 0 to 1 (the default, all).
    /// A record whose `traceparent` says sampled or not is followed as it says, and so are its
    /// retries and its DLQ publish.
    pub trace_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            sample_every: Duration::from_secs(15),
            otlp_endpoint: None,
            service_name: "redrive".into(),
            trace_ratio: 1.0,
        }
    }
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
            max_in_flight: 128,
            capture_batch_size: 500,
            capture_batch_bytes: 16 << 20,
            capture_linger: Duration::from_millis(5),
            capture_in_flight: 3,
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
            complete_linger: Duration::from_millis(50),
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
            batch_size: 1000,
            batch_bytes: 16 << 20,
            rounds_in_flight: None,
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

impl std::fmt::Debug for DlqConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kafka: Vec<&String> = self.kafka.keys().collect();
        f.debug_struct("DlqConfig")
            .field("topic", &self.topic)
            .field("publish_timeout", &self.publish_timeout)
            .field("batch_size", &self.batch_size)
            .field("batch_bytes", &self.batch_bytes)
            .field("rounds_in_flight", &self.rounds_in_flight)
            .field("kafka (values hidden)", &kafka)
            .finish()
    }
}

impl Config {
    /// Loads the file (if any), then the environment over it, and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::from_figment(sources(path)?)
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
        let breaker = BreakerConfig::from_figment(&figment)?;
        let partial: Partial = figment
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        let config = Config {
            postgres: partial.postgres,
            kafka,
            consumer: partial.consumer,
            workers: partial.workers,
            retry,
            breaker,
            handler: partial.handler,
            dlq: partial.dlq,
            http: partial.http,
            shutdown: partial.shutdown,
            telemetry: partial.telemetry,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.postgres.validate()?;
        if let Some(endpoint) = &self.telemetry.otlp_endpoint {
            let url = url::Url::parse(endpoint)
                .map_err(|e| invalid("telemetry.otlp_endpoint", format!("is not a URL: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(invalid(
                    "telemetry.otlp_endpoint",
                    "must start with http:// or https:// (OTLP over HTTP)",
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.telemetry.trace_ratio) {
            return Err(invalid(
                "telemetry.trace_ratio",
                format!("is {}: it must be from 0 to 1", self.telemetry.trace_ratio),
            ));
        }
        let positive = [
            ("consumer.max_in_flight", self.consumer.max_in_flight),
            (
                "consumer.capture_batch_size",
                self.consumer.capture_batch_size,
            ),
            (
                "consumer.capture_batch_bytes",
                self.consumer.capture_batch_bytes,
            ),
            (
                "consumer.capture_in_flight",
                self.consumer.capture_in_flight,
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
            ("dlq.batch_bytes", self.dlq.batch_bytes),
            (
                "dlq.rounds_in_flight",
                self.dlq.rounds_in_flight.unwrap_or(1),
            ),
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

/// What the typed extraction reads; `kafka`, `retry` and `breaker` are read by their own functions.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Partial {
    postgres: PostgresConfig,
    #[serde(rename = "kafka", default)]
    _kafka: serde::de::IgnoredAny,
    #[serde(rename = "retry", default)]
    _retry: serde::de::IgnoredAny,
    #[serde(rename = "breaker", default)]
    _breaker: serde::de::IgnoredAny,
    /// Read by `redrive console` alone.
    #[serde(rename = "console", default)]
    _console: serde::de::IgnoredAny,
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
    #[serde(default)]
    telemetry: TelemetryConfig,
}

/// The file (if any), then the environment over it.
fn sources(path: Option<&Path>) -> Result<Figment, ConfigError> {
    let mut figment = Figment::new();
    if let Some(path) = path {
        if !path.exists() {
            return Err(ConfigError::Missing(path.display().to_string()));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    Ok(figment.merge(environment()))
}

impl PostgresConfig {
    /// Reads only `[postgres]`: all that `redrive migrate` needs.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let config: Self = sources(path)?
            .extract_inner("postgres")
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let url = url::Url::parse(self.url.expose_secret())
            .map_err(|e| invalid("postgres.url", format!("is not a URL: {e}")))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(invalid("postgres.url", "must start with postgres://"));
        }
        Ok(())
    }
}

/// `REDRIVE_SECTION__FIELD` variables, for the known sections only.
fn environment() -> Env {
    Env::prefixed("REDRIVE_").split("__").filter(|key| {
        // The key is not lower-cased yet at this point: `KAFKA.GROUP_ID`.
        let section = key.as_str().split('.').next().unwrap_or_default();
        SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(section))
    })
}

/// Reads a section whose fields make a default, and whose `topics.<name>` tables override some of
/// them per topic: the default and each topic's fully resolved value, each validated by `check`
/// with the path to name in an error.
fn with_overrides<P>(
    figment: &Figment,
    section: &str,
    check: impl Fn(&P, &str) -> Result<(), ConfigError>,
) -> Result<(P, BTreeMap<String, P>), ConfigError>
where
    P: Default + Serialize + serde::de::DeserializeOwned,
{
    use figment::providers::Serialized;
    let mut fields: Dict = match figment.find_value(section) {
        Ok(v) => v
            .into_dict()
            .ok_or_else(|| invalid(section, "must be a table"))?,
        Err(_) => Dict::new(),
    };
    let overrides = fields.remove("topics");
    let default: P = Figment::from(Serialized::defaults(P::default()))
        .merge(Serialized::defaults(fields))
        .extract()
        .map_err(|e| prefixed(e, section))?;
    check(&default, section)?;
    let overrides = match overrides {
        Some(v) => v
            .into_dict()
            .ok_or_else(|| invalid(format!("{section}.topics"), "must be a table"))?,
        None => Dict::new(),
    };
    let mut topics = BTreeMap::new();
    for (topic, value) in overrides {
        let at = format!("{section}.topics.\"{topic}\"");
        let dict = value
            .into_dict()
            .ok_or_else(|| invalid(&at, "must be a table"))?;
        let resolved: P = Figment::from(Serialized::defaults(&default))
            .merge(Serialized::defaults(dict))
            .extract()
            .map_err(|e| prefixed(e, &at))?;
        check(&resolved, &at)?;
        topics.insert(topic, resolved);
    }
    Ok((default, topics))
}

mod breaker;
mod console;
mod kafka;
mod retry;

pub use breaker::{BreakerConfig, BreakerPolicy};
pub use console::{ConsoleConfig, ConsoleSettings, ConsoleUser, Role};
pub use kafka::{flatten_properties, kafka_property_is_secret, redact_url, KafkaConfig};
pub use retry::{OrderingMode, RetryConfig, RetryPolicy};

#[cfg(test)]
mod tests;
/// Prefixes the path of a figment error that was raised on a sub-figment.
pub(super) fn prefixed(mut e: figment::Error, at: &str) -> ConfigError {
    let path = std::mem::take(&mut e.path);
    let field = std::iter::once(at.to_string())
        .chain(path)
        .collect::<Vec<_>>()
        .join(".");
    invalid(field, e.kind.to_string())
}
