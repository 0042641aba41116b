//! librdkafka client configuration, and the startup checks that topics exist.
//!
//! The consumer always runs with `enable.auto.offset.store=false`: redrive stores an offset only
//! once the message's outcome is durable (I1), and auto-commit then commits what was stored.
//! Secret properties are never logged (I9).

use crate::config::kafka_property_is_secret;
use crate::message::Message;
use crate::offsets::OffsetTracker;
use anyhow::bail;
use rdkafka::bindings as rdsys;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedHeaders, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, TopicPartitionList};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Consumer-only properties, left out of the DLQ producer's configuration.
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "auto.offset.reset",
    "enable.auto.offset.store",
    "session.timeout.ms",
    "max.poll.interval.ms",
    "partition.assignment.strategy",
    "group.protocol",
    "isolation.level",
    "fetch.min.bytes",
    "fetch.wait.max.ms",
    "fetch.max.bytes",
    "max.partition.fetch.bytes",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.queue.backoff.ms",
    "heartbeat.interval.ms",
    "enable.partition.eof",
    "check.crcs",
];

/// Properties as one log-safe line, secrets replaced by `***`.
pub fn describe(props: &BTreeMap<String, String>) -> String {
    props
        .iter()
        .map(|(k, v)| {
            if kafka_property_is_secret(k) {
                format!("{k}=***")
            } else {
                format!("{k}={v}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The consumer's configuration: the user's properties with redrive's required settings.
pub fn consumer_config(props: &BTreeMap<String, String>) -> anyhow::Result<ClientConfig> {
    if props
        .get("enable.auto.offset.store")
        .is_some_and(|v| v != "false")
    {
        bail!("`kafka.\"enable.auto.offset.store\"` must be false: redrive stores offsets itself, only after a durable outcome");
    }
    let mut c = ClientConfig::new();
    // Cooperative rebalancing moves only the partitions that change owner, so a member joining or
    // leaving does not stop the whole group (the user's choice wins).
    c.set("partition.assignment.strategy", "cooperative-sticky")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            DEFAULT_COMMIT_INTERVAL_MS.to_string(),
        )
        // The pre-fetch queue, set deliberately (the user's values win). librdkafka's defaults
        // queue up to 100,000 messages or 64 MiB per client and, once a partition's queue is over
        // that, wait a whole second before fetching it again: a consumer that empties its queue in
        // less than a second then idles for the rest, and the queue is most of the process's
        // memory. A smaller queue refilled every 10 ms keeps the happy path at full speed in a
        // fraction of the memory. A record larger than the fetch sizes is still fetched whole.
        .set("queued.min.messages", "10000")
        .set("queued.max.messages.kbytes", "8192")
        .set("fetch.max.bytes", "8388608")
        .set("fetch.queue.backoff.ms", "10")
        // Statistics feed the consumer-lag gauges (GroupContext::stats).
        .set("statistics.interval.ms", "15000");
    for (k, v) in props {
        c.set(k, v);
    }
    c.set("enable.auto.offset.store", "false");
    Ok(c)
}

/// The consumer's auto-commit interval: the user's `auto.commit.interval.ms`, or redrive's default.
pub fn commit_interval(props: &BTreeMap<String, String>) -> Duration {
    let ms = props
        .get("auto.commit.interval.ms")
        .and_then(|v| v.parse().ok());
    Duration::from_millis(ms.unwrap_or(DEFAULT_COMMIT_INTERVAL_MS))
}

/// redrive's default `auto.commit.interval.ms`: what a crash redelivers is what was stored but not
/// yet committed, so keep that short.
const DEFAULT_COMMIT_INTERVAL_MS: u64 = 200;

/// The DLQ producer's configuration: idempotent and fully acknowledged, large records allowed.
pub fn producer_config(
    props: &BTreeMap<String, String>,
    publish_timeout: Duration,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.max.bytes", "16777216")
        .set("linger.ms", "5");
    for (k, v) in props
        .iter()
        .filter(|(k, _)| !CONSUMER_ONLY.contains(&k.as_str()))
    {
        c.set(k, v);
    }
    c.set(
        "message.timeout.ms",
        publish_timeout.as_millis().to_string(),
    );
    c
}

/// The cluster did not answer a metadata request: the broker is down or unreachable, which may
/// pass. Startup retries on this error and stops on any other.
#[derive(Debug, thiserror::Error)]
#[error("the Kafka cluster did not answer about {what} topic {topic:?}: {source}")]
pub struct Unreachable {
    what: String,
    topic: String,
    #[source]
    source: KafkaError,
}

/// The cluster answered that a topic does not exist. A topic created a moment ago may not be in
/// every broker's metadata yet (the controller has it; the broker that answered applies it a
/// little later), so `run` checks again for a short while before it stops on this error.
#[derive(Debug, thiserror::Error)]
#[error("{what} topic {topic:?} does not exist on the Kafka cluster; create it first (redrive never creates topics)")]
pub struct Missing {
    what: String,
    /// The topic.
    pub topic: String,
}

/// Fails with a clear error unless every topic exists on the cluster: [`Missing`] for a topic the
/// cluster does not know, [`Unreachable`] when the cluster does not answer.
pub fn ensure_topics<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topics: &[String],
    what: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    for topic in topics {
        let metadata = client
            .fetch_metadata(Some(topic), timeout)
            .map_err(|source| Unreachable {
                what: what.to_string(),
                topic: topic.clone(),
                source,
            })?;
        let known = metadata.topics().iter().find(|t| t.name() == topic);
        match known.and_then(|t| t.error()) {
            None if known.is_some_and(|t| !t.partitions().is_empty()) => {}
            Some(e) if RDKafkaErrorCode::from(e) != RDKafkaErrorCode::UnknownTopicOrPartition => {
                bail!(
                    "{what} topic {topic:?} is not usable: {}",
                    RDKafkaErrorCode::from(e)
                )
            }
            _ => {
                return Err(Missing {
                    what: what.to_string(),
                    topic: topic.clone(),
                }
                .into())
            }
        }
    }
    Ok(())
}

/// Produces a stored record, byte for byte, to `topic`: its key, value and headers, then `extra`
/// headers. Waits for the broker's acknowledgement, bounded by the producer's `message.timeout.ms`,
/// and returns where the record landed: (partition, offset).
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    m: &Message,
    extra: &[(&str, String)],
) -> Result<(i32, i64), KafkaError> {
    let headers = OwnedHeaders::new_with_capacity(m.headers.len() + extra.len());
    for h in &m.headers {
        add_header(&headers, &h.key, h.value.as_deref());
    }
    for (key, value) in extra {
        add_header(&headers, key.as_bytes(), Some(value.as_bytes()));
    }
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
    if let Some(k) = &m.key {
        record = record.key(k.as_slice());
    }
    if let Some(p) = &m.payload {
        record = record.payload(p.as_slice());
    }
    // The queue itself is not waited on: message.timeout.ms bounds the whole send.
    producer
        .send(record, Duration::from_secs(0))
        .await
        .map(|d| (d.partition, d.offset))
        .map_err(|(e, _)| e)
}

/// Appends a header whose name may be any bytes. rdkafka's `OwnedHeaders::insert` takes the name as
/// `&str`, but a record consumed with a non-UTF-8 name must reach the DLQ with that same name.
fn add_header(headers: &OwnedHeaders, key: &[u8], value: Option<&[u8]>) {
    let hdrs = headers.as_borrowed() as *const BorrowedHeaders as *mut rdsys::rd_kafka_headers_t;
    let (value_ptr, value_len) = match value {
        Some(v) => (v.as_ptr().cast::<c_void>(), v.len() as isize),
        None => (std::ptr::null(), 0),
    };
    // SAFETY: `BorrowedHeaders` is rdkafka's zero-sized view of the `rd_kafka_headers_t` that
    // `headers` owns (its `as_borrowed` is that same cast), and an `OwnedHeaders` is always writable.
    // librdkafka copies the name and value, with the explicit sizes, before returning.
    let err = unsafe {
        rdsys::rd_kafka_header_add(
            hdrs,
            key.as_ptr().cast::<c_char>(),
            key.len() as isize,
            value_ptr,
            value_len,
        )
    };
    debug_assert_eq!(err, rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
}

/// The consumer's side of a rebalance (I11). Before partitions are revoked it commits the stored
/// offsets, so their next owner starts where this member's durable work ends rather than at the
/// last periodic commit, and it tells the offset tracker, so that work still in flight for them
/// stores nothing. It also logs rebalances and failed commits.
#[derive(Debug, Default)]
pub struct GroupContext {
    /// The consumer's offset tracker, shared with [`crate::consumer::Consumer`].
    pub tracker: Arc<Mutex<OffsetTracker>>,
    /// The consumer's key lines (I12), which a revoke ends for the revoked partitions.
    pub lines: Arc<Mutex<crate::lines::Lines>>,
    /// The consumer group, the label of the lag gauges.
    pub group: String,
    /// The partitions whose lag was last exported.
    lagging: Mutex<std::collections::HashSet<(String, i32)>>,
}

impl GroupContext {
    /// A context for a consumer of `group`.
    pub fn new(group: &str) -> Self {
        Self {
            group: group.to_string(),
            ..Self::default()
        }
    }

    /// The tracker, whatever a panic elsewhere left in its lock (its counters stay usable).
    pub fn lock_tracker(&self) -> MutexGuard<'_, OffsetTracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientContext for GroupContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): each assigned partition's lag,
    /// `redrive_consumer_lag_messages{group, topic, partition}`: the messages between the
    /// consumer's position and the partition's end. A partition this member no longer reads is
    /// set to 0.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut now = std::collections::HashSet::new();
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                lag_gauge(&self.group, topic, *partition).set(p.consumer_lag as f64);
                now.insert((topic.clone(), *partition));
            }
        }
        let mut last = self.lagging.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, partition) in last.difference(&now) {
            lag_gauge(&self.group, topic, *partition).set(0.0);
        }
        *last = now;
    }
}

fn lag_gauge(group: &str, topic: &str, partition: i32) -> metrics::Gauge {
    metrics::gauge!(
        "redrive_consumer_lag_messages",
        "group" => group.to_string(),
        "topic" => topic.to_string(),
        "partition" => partition.to_string()
    )
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => tracing::debug!(partitions = %list(tpl), "committed before the revoke"),
            Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => {}
            Err(e) => tracing::warn!(
                partitions = %list(tpl),
                "commit before the revoke failed (the next owner redelivers from the last commit): {e}"
            ),
        }
        let mut tracker = self.lock_tracker();
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let mut abandoned = 0;
        for e in tpl.elements() {
            abandoned += tracker.revoke(e.topic(), e.partition());
            lines.revoke(e.topic(), e.partition(), tracker.stamp());
        }
        drop(lines);
        if abandoned > 0 {
            tracing::info!(
                abandoned,
                "messages in flight for revoked partitions will store no offset; their new owner redelivers them"
            );
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = %list(tpl), "partitions assigned")
            }
            Rebalance::Revoke(tpl) => tracing::info!(partitions = %list(tpl), "partitions revoked"),
            Rebalance::Error(e) => tracing::warn!("rebalance error: {e}"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => tracing::debug!(offsets = %list(offsets), "offsets committed"),
            Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => {}
            Err(e) => tracing::warn!(offsets = %list(offsets), "offset commit failed: {e}"),
        }
    }
}

/// Starts a blocking librdkafka call on a thread of its own; its answer comes on the receiver.
/// Such calls block until the broker answers, which a broker that is down or stalled makes
/// minutes. A stop does not wait for this thread, where the runtime would wait for a
/// `spawn_blocking` task before the process could exit; and should the call hold the last handle
/// of a consumer, its drop (the leave of the group, blocked just as long) happens there too.
pub fn on_own_thread<T: Send + 'static>(
    name: &str,
    call: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<tokio::sync::oneshot::Receiver<T>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(call());
        })?;
    Ok(rx)
}

fn list(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}[{}]@{:?}", e.topic(), e.partition(), e.offset()))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::consumer::BaseConsumer;

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn tls_and_sasl_settings_are_accepted_and_their_secrets_hidden() {
        let p = props(&[
            ("bootstrap.servers", "127.0.0.1:1"),
            ("group.id", "g"),
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "svc"),
            ("sasl.password", "kafka-s3cret"),
        ]);
        let consumer: Result<BaseConsumer, _> = consumer_config(&p).unwrap().create();
        assert!(
            consumer.is_ok(),
            "this build must support SASL_SSL: {:?}",
            consumer.err()
        );
        let line = describe(&p);
        assert!(
            !line.contains("kafka-s3cret") && line.contains("sasl.password=***"),
            "{line}"
        );
    }

    #[test]
    fn offsets_are_never_stored_automatically() {
        let p = props(&[("group.id", "g"), ("enable.auto.offset.store", "true")]);
        let e = consumer_config(&p).unwrap_err().to_string();
        assert!(e.contains("enable.auto.offset.store"), "{e}");
        let c = consumer_config(&props(&[("group.id", "g")])).unwrap();
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
    }

    #[test]
    fn the_dlq_producer_drops_consumer_settings_and_waits_for_all_replicas() {
        let c = producer_config(
            &props(&[("group.id", "g"), ("acks", "1")]),
            Duration::from_secs(7),
        );
        assert_eq!(c.get("group.id"), None);
        assert_eq!(
            c.get("acks"),
            Some("1"),
            "a user's choice wins over the default"
        );
        assert_eq!(c.get("message.timeout.ms"), Some("7000"));
        assert_eq!(
            producer_config(&BTreeMap::new(), Duration::from_secs(1)).get("acks"),
            Some("all")
        );
    }
}
