//! The DLQ publisher: produces dead rows to the DLQ topic from the outbox, and records
//! `dlq_published_at` only once the broker acknowledged (I4).
//!
//! A DLQ outage leaves rows unpublished and retries with backoff; it never drops a row and never
//! touches capture, which runs on its own. The record keeps the original key, value and headers and
//! adds origin headers (DESIGN §4).

use crate::store::outbox::DeadRow;
use crate::store::{Store, StoreError};
use rdkafka::producer::FutureProducer;
use sqlx::postgres::PgListener;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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
    /// Rows locked for this round.
    pub fetched: usize,
    /// Rows acknowledged by the broker and marked published.
    pub published: usize,
    /// Rows whose send failed; they stay in the outbox.
    pub failed: usize,
}

/// Publishes one consumer group's dead rows.
pub struct DlqPublisher {
    store: Store,
    producer: FutureProducer,
    group: String,
    topic_template: String,
    batch_size: i64,
    idle: Duration,
}

impl DlqPublisher {
    /// `topic_template` names the DLQ topic; `{topic}` is the source topic.
    pub fn new(
        store: Store,
        producer: FutureProducer,
        group: &str,
        topic_template: &str,
        batch_size: i64,
    ) -> Self {
        Self {
            store,
            producer,
            group: group.to_string(),
            topic_template: topic_template.to_string(),
            batch_size,
            idle: Duration::from_secs(30),
        }
    }

    /// The DLQ topic for a source topic.
    pub fn topic_for(&self, source: &str) -> String {
        self.topic_template.replace("{topic}", source)
    }

    /// Publishes until `shutdown`: at once on a `redrive_dead` NOTIFY, after a backoff following a
    /// failed round, and at the latest every 30 s.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let mut listener = PgListener::connect_with(self.store.pool()).await?;
        listener.listen(DEAD_CHANNEL).await?;
        let mut backoff = Duration::from_millis(500);
        while !shutdown.is_cancelled() {
            let wait = match self.run_once().await {
                Ok(r) if r.failed == 0 && r.fetched as i64 == self.batch_size => continue,
                Ok(r) if r.failed == 0 => {
                    backoff = Duration::from_millis(500);
                    self.idle
                }
                Ok(r) => {
                    tracing::warn!(failed = r.failed, retry_in = ?backoff, "DLQ publishing failed; rows stay in the outbox");
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    backoff
                }
                Err(e) => {
                    tracing::error!("reading the DLQ outbox failed: {e}");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                n = listener.try_recv(), if wait == self.idle => if let Err(e) = n {
                    tracing::warn!("LISTEN connection lost: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                },
                _ = tokio::time::sleep(wait) => {}
            }
        }
        Ok(())
    }

    /// Publishes one batch of the outbox and marks what the broker acknowledged.
    pub async fn run_once(&self) -> Result<Round, StoreError> {
        let batch = self
            .store
            .outbox_batch(&self.group, self.batch_size)
            .await?;
        if batch.rows.is_empty() {
            return Ok(Round::default());
        }
        let topics: Vec<String> = batch
            .rows
            .iter()
            .map(|r| self.topic_for(&r.message.topic))
            .collect();
        let sends = batch
            .rows
            .iter()
            .zip(&topics)
            .map(|(row, topic)| self.send(row, topic));
        let results = futures::future::join_all(sends).await;
        let mut published = Vec::new();
        let mut failed = 0;
        for ((row, topic), result) in batch.rows.iter().zip(&topics).zip(results) {
            match result {
                Ok(()) => published.push((row.id, topic.clone())),
                Err(e) => {
                    failed += 1;
                    tracing::debug!(id = %row.id, topic, "DLQ send failed: {e}");
                }
            }
        }
        let fetched = batch.rows.len();
        batch.finish(&published).await?;
        metrics::counter!("redrive_dlq_published_total").increment(published.len() as u64);
        metrics::counter!("redrive_dlq_failures_total").increment(failed as u64);
        Ok(Round {
            fetched,
            published: published.len(),
            failed,
        })
    }

    async fn send(&self, row: &DeadRow, topic: &str) -> Result<(), rdkafka::error::KafkaError> {
        crate::kafka::produce(&self.producer, topic, &row.message, &origin_headers(row)).await
    }
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
