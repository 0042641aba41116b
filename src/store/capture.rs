//! Capture: failed messages become rows, many per statement.
//!
//! The insert is idempotent on `(consumer_group, topic, partition, kafka_offset)` (I2): a message
//! that Kafka redelivers after a crash finds its row already there and adds nothing. Only after
//! this statement commits may the consumer store the messages' offsets (I1).

use super::{Store, StoreError};
use crate::handler::HandlerError;
use crate::message::Message;
use chrono::{DateTime, Utc};
use std::time::Duration;
use uuid::Uuid;

/// Where a captured row starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialState {
    /// Retry at `next_attempt_at`.
    Pending,
    /// Out of attempts already, or a permanent error: straight to the DLQ outbox.
    Dead,
}

impl InitialState {
    /// The value stored in the `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            InitialState::Pending => "pending",
            InitialState::Dead => "dead",
        }
    }
}

/// A failed first delivery, ready to be stored.
#[derive(Debug, Clone)]
pub struct Capture {
    /// The message, byte for byte.
    pub message: Message,
    /// Pending or dead.
    pub state: InitialState,
    /// The policy's attempt budget for this topic.
    pub max_attempts: i32,
    /// How long after the capture commits the first retry is due (ignored for dead rows). The
    /// database adds it to its own `now()`, so a worker's clock never decides a due time (I11).
    pub retry_in: Duration,
    /// Why the first delivery failed.
    pub error: HandlerError,
}

impl Store {
    /// Inserts the batch in one statement; rows that already exist are left as they are.
    /// Returns how many rows were new.
    pub async fn capture(&self, group: &str, batch: &[Capture]) -> Result<u64, StoreError> {
        // One array per column, for the UNNEST below.
        let ids: Vec<Uuid> = batch.iter().map(|_| Uuid::now_v7()).collect();
        let topics: Vec<String> = batch.iter().map(|c| c.message.topic.clone()).collect();
        let partitions: Vec<i32> = batch.iter().map(|c| c.message.partition).collect();
        let offsets: Vec<i64> = batch.iter().map(|c| c.message.offset).collect();
        let timestamps: Vec<Option<DateTime<Utc>>> =
            batch.iter().map(|c| c.message.timestamp).collect();
        let keys: Vec<Option<Vec<u8>>> = batch.iter().map(|c| c.message.key.clone()).collect();
        let payloads: Vec<Option<Vec<u8>>> =
            batch.iter().map(|c| c.message.payload.clone()).collect();
        let headers: Vec<serde_json::Value> =
            batch.iter().map(|c| c.message.headers_json()).collect();
        let states: Vec<String> = batch.iter().map(|c| c.state.as_str().to_string()).collect();
        let max_attempts: Vec<i32> = batch.iter().map(|c| c.max_attempts).collect();
        let retry_in: Vec<f64> = batch.iter().map(|c| c.retry_in.as_secs_f64()).collect();
        let errors: Vec<String> = batch
            .iter()
            .map(|c| super::safe::error_text(&c.error.message))
            .collect();
        let kinds: Vec<String> = batch
            .iter()
            .map(|c| c.error.kind.as_str().to_string())
            .collect();
        let result = sqlx::query!(
            r#"
            INSERT INTO redrive.retry_messages (
                id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp, key, payload,
                headers, state, attempts, max_attempts, next_attempt_at, last_error, error_kind,
                error_history, first_failed_at, updated_at, dead_at)
            SELECT t.id, $1, t.topic, t.part, t.off, t.ts, t.key, t.payload,
                   t.headers, t.state, 1, t.max_attempts, now() + make_interval(secs => t.retry_in),
                   t.err, t.kind,
                   jsonb_build_array(jsonb_build_object(
                       'at', now(), 'attempt', 1, 'kind', t.kind, 'error', t.err)),
                   now(), now(), CASE WHEN t.state = 'dead' THEN now() END
            FROM UNNEST($2::uuid[], $3::text[], $4::int4[], $5::int8[], $6::timestamptz[],
                        $7::bytea[], $8::bytea[], $9::jsonb[], $10::text[], $11::int4[],
                        $12::float8[], $13::text[], $14::text[])
                 AS t(id, topic, part, off, ts, key, payload, headers, state, max_attempts,
                      retry_in, err, kind)
            ON CONFLICT (consumer_group, topic, "partition", kafka_offset) DO NOTHING
            "#,
            group,
            &ids,
            &topics,
            &partitions,
            &offsets,
            // The casts let the macro accept NULL elements (a record without key or value).
            &timestamps as &[Option<DateTime<Utc>>],
            &keys as &[Option<Vec<u8>>],
            &payloads as &[Option<Vec<u8>>],
            &headers,
            &states,
            &max_attempts,
            &retry_in,
            &errors,
            &kinds,
        )
        .execute(self.pool())
        .await?;
        Ok(result.rows_affected())
    }
}
