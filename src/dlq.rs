//! The DLQ publisher: produces dead rows to the DLQ topic from the outbox, and records
//! `dlq_published_at` only once the broker acknowledged (I4).
//!
//! A DLQ outage leaves rows unpublished and retries with backoff; it never drops a row and never
//! touches capture, which runs on its own. The record keeps the original key, value and headers and
//! adds origin headers (DESIGN §4).
//!
//! A record the broker refuses for good (too large for the DLQ topic, an invalid topic) is marked on
//! its row and the publisher moves on; only broker-wide trouble (timeouts, a broker down) makes it
//! back off (I10).
//!
//! A producer that librdkafka declares failed for good (a fatal error: the idempotent producer can
//! no longer keep its order and no-duplicate guarantee) refuses every later send. The publisher
//! makes a new one from the same settings before its next round, so the outbox never waits for a
//! restart of the process. It does the same after [`UNANSWERED_ROUNDS`] rounds in a row in which no
//! send was acknowledged.

use crate::store::outbox::DeadRow;
use crate::store::{Store, StoreError};
use futures::stream::{FuturesUnordered, StreamExt as _};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer as _};
use rdkafka::ClientConfig;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Rounds in a row whose sends all failed after which the producer is replaced. A broker that is
/// down fails every send of a new producer too, at no cost; a producer that stopped delivering to a
/// broker that came back (librdkafka has had such states) is replaced, where otherwise the outbox
/// would wait for a restart of the process.
pub const UNANSWERED_ROUNDS: u32 = 3;

/// NOTIFY channel for rows that became dead.
pub const DEAD_CHANNEL: &str = "redrive_dead";

/// Origin header names added to every DLQ record.
pub mod headers {
    /// The source topic.
    pub const TOPIC: &str = "redrive.origin.topic";
    /// The source partition.
    pub const PARTITION: &str = "redrive.origin.partition";
    /// The source offset.
    pub const OFFSET: &str = "redrive.origin.offset";
    /// The source record's timestamp, in milliseconds since the epoch.
    pub const TIMESTAMP: &str = "redrive.origin.timestamp";
    /// The consumer group that failed to process it.
    pub const GROUP: &str = "redrive.consumer.group";
    /// Attempts made.
    pub const ATTEMPTS: &str = "redrive.attempts";
    /// First failure, RFC 3339.
    pub const FIRST_FAILED_AT: &str = "redrive.first.failed.at";
    /// The last error.
    pub const LAST_ERROR: &str = "redrive.last.error";
    /// `retryable`, `permanent` or `timeout`.
    pub const ERROR_KIND: &str = "redrive.error.kind";
    /// The retry table row id.
    pub const ID: &str = "redrive.id";
}

/// What one publishing round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Rows taken for this round.
    pub fetched: usize,
    /// Whether the round stopped at its bound of rows or bytes: more may wait.
    pub full: bool,
    /// Rows acknowledged by the broker and marked published.
    pub published: usize,
    /// Rows whose send failed for a reason that may pass; they stay in the outbox.
    pub failed: usize,
    /// Rows refused for good, or unreadable: marked with the error, out of the outbox.
    pub refused: usize,
    /// Groups of refused records sent again, one after another, to find the records the broker
    /// refuses on their own (see [`DlqPublisher::run_once`]).
    pub resent_groups: usize,
}

/// Publishes one consumer group's dead rows.
pub struct DlqPublisher {
    store: Store,
    /// The producer's settings, for a new producer in place of one that failed (see
    /// [`Self::usable_producer`]).
    settings: ClientConfig,
    producer: Mutex<FutureProducer>,
    /// Rounds in a row in which sends failed and none was acknowledged.
    unanswered: AtomicU32,
    group: String,
    topic_template: String,
    batch_size: i64,
    batch_bytes: i64,
    /// Most rounds at once (see [`Self::run`]).
    rounds: usize,
    /// Rounds send their records side by side (shared), but a record sent again to learn whether
    /// the broker refuses it on its own goes with no other round's records (sole): the producer
    /// would put them in one produce batch, and the broker refuses a batch whole.
    sending: tokio::sync::RwLock<()>,
    idle: Duration,
}

impl DlqPublisher {
    /// A publisher whose producer is made from `settings` (see [`crate::kafka::producer_config`]).
    /// `topic_template` names the DLQ topic; `{topic}` is the source topic. A round takes up to
    /// `batch_size` rows and `batch_bytes` of their keys and values.
    pub fn new(
        store: Store,
        settings: ClientConfig,
        group: &str,
        topic_template: &str,
        batch_size: i64,
        batch_bytes: usize,
    ) -> KafkaResult<Self> {
        let producer = settings.create()?;
        Ok(Self {
            store,
            settings,
            producer: Mutex::new(producer),
            unanswered: AtomicU32::new(0),
            group: group.to_string(),
            topic_template: topic_template.to_string(),
            batch_size,
            batch_bytes: i64::try_from(batch_bytes).unwrap_or(i64::MAX),
            rounds: 1,
            sending: tokio::sync::RwLock::new(()),
            idle: Duration::from_secs(30),
        })
    }

    /// Lets [`Self::run`] keep up to `rounds` rounds in flight while more rows wait (at least one;
    /// one unless set). Each holds a connection of the store's pool until the broker has answered
    /// for its records.
    pub fn with_rounds_in_flight(mut self, rounds: usize) -> Self {
        self.rounds = rounds.max(1);
        self
    }

    /// The producer the next round sends through.
    pub fn producer(&self) -> FutureProducer {
        self.producer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The producer for a round: the current one, or a new one in its place when librdkafka has
    /// failed the current one for good, or when none of its sends was acknowledged for
    /// [`UNANSWERED_ROUNDS`] rounds in a row. A new producer that cannot be made leaves the old
    /// one, so the round fails and backs off, and the next one tries again.
    fn usable_producer(&self) -> FutureProducer {
        let mut current = self.producer.lock().unwrap_or_else(|p| p.into_inner());
        let unanswered = self.unanswered.load(Ordering::Relaxed);
        let (cause, why) = match current.client().fatal_error() {
            Some((code, reason)) => ("fatal", format!("failed for good ({code:?}: {reason})")),
            None if unanswered >= UNANSWERED_ROUNDS => (
                "unanswered",
                format!("had no send acknowledged in {unanswered} rounds in a row"),
            ),
            None => return current.clone(),
        };
        match self.settings.create::<FutureProducer>() {
            Ok(renewed) => {
                let what = format!(
                    "the DLQ producer {why}; a new producer takes its place, and the dead rows it \
                     had not published are sent again through it"
                );
                if cause == "fatal" {
                    tracing::error!(group = %self.group, "{what}");
                } else {
                    tracing::warn!(group = %self.group, "{what}");
                }
                metrics::counter!("redrive_dlq_producer_renewals_total", "cause" => cause)
                    .increment(1);
                self.unanswered.store(0, Ordering::Relaxed);
                let old = std::mem::replace(&mut *current, renewed);
                // Destroying a client joins its threads: not on the runtime's.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(e) => tracing::error!(
                group = %self.group,
                "the DLQ producer {why}, and a new one could not be made: {e}"
            ),
        }
        current.clone()
    }

    /// The DLQ topic for a source topic.
    pub fn topic_for(&self, source: &str) -> String {
        self.topic_template.replace("{topic}", source)
    }

    /// Publishes until `shutdown`: at once on a `redrive_dead` NOTIFY, after a backoff following a
    /// failed round, and at the latest every 30 s.
    ///
    /// A wake-up starts one round. While rounds come back with more waiting (a round stopped at
    /// its bound of rows or bytes), up to [`Self::with_rounds_in_flight`] run at once: each locks
    /// rows the others have not (`SKIP LOCKED`), so one round's records are on their way to the
    /// broker while another's rows are read or marked. On shutdown no new round starts, and the
    /// rounds in flight finish.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let mut listener = self.store.listen(DEAD_CHANNEL).await?;
        let mut backoff = Duration::from_millis(500);
        let mut rounds = FuturesUnordered::new();
        // Rounds to keep in flight: one after a wake-up, all of them while more rows wait, none
        // once the outbox is found empty or a round failed.
        let mut wanted = 1;
        // How long to wait once the rounds in flight are done, when not for a NOTIFY.
        let mut pause: Option<Duration> = None;
        loop {
            while !shutdown.is_cancelled() && pause.is_none() && rounds.len() < wanted {
                rounds.push(self.run_once());
            }
            match rounds.next().await {
                Some(Ok(r)) if r.failed == 0 => {
                    backoff = Duration::from_millis(500);
                    // Records refused for good leave the outbox: go on with the rest at once.
                    wanted = match r.full || r.refused > 0 {
                        true => self.rounds,
                        false => 0,
                    };
                }
                Some(Ok(r)) => {
                    tracing::warn!(failed = r.failed, retry_in = ?backoff, "DLQ publishing failed; rows stay in the outbox");
                    // Rounds that fail together back off once.
                    if pause.is_none() {
                        pause = Some(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
                Some(Err(e)) => {
                    tracing::error!("reading the DLQ outbox failed: {e}");
                    pause.get_or_insert(Duration::from_secs(1));
                }
                None => {
                    if shutdown.is_cancelled() {
                        break;
                    }
                    let wait = pause.take().unwrap_or(self.idle);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = listener.wait(), if wait == self.idle => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wanted = 1;
                }
            }
        }
        Ok(())
    }

    /// Publishes one batch of the outbox, and marks what the broker acknowledged and what it
    /// refused for good.
    pub async fn run_once(&self) -> Result<Round, StoreError> {
        let batch = self
            .store
            .outbox_batch(&self.group, self.batch_size, self.batch_bytes)
            .await?;
        let (fetched, full) = (batch.rows.len() + batch.unreadable.len(), batch.full);
        if fetched == 0 {
            return Ok(Round::default());
        }
        let mut refused = batch.unreadable.clone();
        let producer = self.usable_producer();
        let (mut published, mut failed, mut resent_groups) = (Vec::new(), 0, 0);
        // The broker refuses a whole produce batch for one record too large for the DLQ topic (or
        // for a batch larger than the topic allows), so a refusal counts only once the record is
        // refused on its own. The refused records are sent again in halves, one half after the
        // other so that each goes in batches of its own: a half without the culprit goes through
        // at once, and the culprit's is halved again, down to the record alone. One bad record
        // among n costs about 2·log2(n) waits for the broker, not n.
        let mut groups: VecDeque<Vec<&DeadRow>> = VecDeque::from([batch.rows.iter().collect()]);
        let mut first = true;
        while let Some(group) = groups.pop_front() {
            let halves: Vec<&[&DeadRow]> = match (first, group.len()) {
                (true, _) | (false, 1) => vec![&group[..]],
                (false, n) => {
                    let (a, b) = group.split_at(n / 2);
                    vec![a, b]
                }
            };
            for half in halves {
                let (_shared, _sole) = match first {
                    true => (Some(self.sending.read().await), None),
                    false => (None, Some(self.sending.write().await)),
                };
                if !first {
                    resent_groups += 1;
                }
                let results =
                    futures::future::join_all(half.iter().map(|r| self.send(&producer, r))).await;
                let mut again = Vec::new();
                for (row, result) in half.iter().zip(results) {
                    let topic = self.topic_for(&row.message.topic);
                    match result {
                        Ok(()) => published.push((row.id, topic)),
                        Err(e) if refused_for_good(&e) && half.len() == 1 && !first => refused
                            .push((
                                row.id,
                                format!("the broker refused the record for {topic}: {e}"),
                            )),
                        Err(e) if refused_for_good(&e) => again.push(*row),
                        Err(e) => {
                            failed += 1;
                            tracing::debug!(id = %row.id, topic, "DLQ send failed: {e}");
                        }
                    }
                }
                if !again.is_empty() {
                    groups.push_back(again);
                }
            }
            first = false;
        }
        for (id, error) in &refused {
            tracing::warn!(%id, "dead row left out of the DLQ topic (see dlq_error on the row): {error}");
        }
        if failed > 0 && published.is_empty() {
            self.unanswered.fetch_add(1, Ordering::Relaxed);
        } else {
            self.unanswered.store(0, Ordering::Relaxed);
        }
        batch.finish(&published, &refused).await?;
        metrics::counter!("redrive_dlq_published_total").increment(published.len() as u64);
        metrics::counter!("redrive_dlq_failures_total").increment(failed as u64);
        metrics::counter!("redrive_dlq_refused_total").increment(refused.len() as u64);
        Ok(Round {
            fetched,
            full,
            published: published.len(),
            failed,
            refused: refused.len(),
            resent_groups,
        })
    }

    /// Produces one dead row, in a `publish` span when traces are exported. A record that carried
    /// no `traceparent` of its own gets one: the publish's, or else the one its row keeps, so
    /// whoever reads the DLQ topic goes on in the message's trace.
    async fn send(&self, producer: &FutureProducer, row: &DeadRow) -> Result<(), KafkaError> {
        use tracing::Instrument;
        let topic = self.topic_for(&row.message.topic);
        let trace = row.trace.as_deref();
        let span = crate::telemetry::publish_span(&row.message, &topic, &self.group, trace);
        let mut headers = origin_headers(row).to_vec();
        if row.message.header("traceparent").is_none() {
            let mut context = crate::telemetry::exported_headers(&span);
            if context.is_empty() {
                context = trace
                    .map(crate::telemetry::stored_headers)
                    .unwrap_or_default();
            }
            headers.extend(context);
        }
        crate::kafka::produce(producer, &topic, &row.message, &headers)
            .instrument(span)
            .await
            .map(|_| ())
    }
}

/// Whether the broker (or the client, before sending) refused this record for a reason of its own
/// that trying again will not change. Timeouts, a broker down, missing rights and the like are
/// broker-wide: the publisher backs off and tries again. So is a DLQ topic that does not exist:
/// startup checks that every configured one does, and one deleted later is an outage to repair.
fn refused_for_good(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | MessageBatchTooLarge
                | InvalidMessageSize
                | InvalidMessage
                | InvalidRecord
                | BadMessage
                | InvalidTopic
                | PolicyViolation
        )
    )
}

/// The origin headers added after the record's own.
fn origin_headers(row: &DeadRow) -> [(&'static str, String); 10] {
    let m = &row.message;
    [
        (headers::TOPIC, m.topic.clone()),
        (headers::PARTITION, m.partition.to_string()),
        (headers::OFFSET, m.offset.to_string()),
        (
            headers::TIMESTAMP,
            m.timestamp
                .map(|t| t.timestamp_millis().to_string())
                .unwrap_or_default(),
        ),
        (headers::GROUP, row.consumer_group.clone()),
        (headers::ATTEMPTS, row.attempts.to_string()),
        (headers::FIRST_FAILED_AT, row.first_failed_at.to_rfc3339()),
        (
            headers::LAST_ERROR,
            row.last_error.clone().unwrap_or_default(),
        ),
        (
            headers::ERROR_KIND,
            row.error_kind.clone().unwrap_or_default(),
        ),
        (headers::ID, row.id.to_string()),
    ]
}
