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
    /// Inserts the batch in one statement; rows that already exist are left as they are (I2).
    /// Returns how many rows were new.
    ///
    /// A message whose coordinates are taken by a row of a *different* message (the topic was
    /// deleted and recreated, or its log truncated, so offsets were reused) is not a redelivery: it
    /// is captured too, as the next `incarnation` of those coordinates, so it is never lost.
    pub async fn capture(&self, group: &str, batch: &[Capture]) -> Result<u64, StoreError> {
        let rows: Vec<&Capture> = batch.iter().collect();
        let c = Columns::of(&rows);
        // Nearly always every row is new: a plain INSERT costs Postgres a fifth less than one
        // with ON CONFLICT. Only a redelivery (after a crash or a rebalance) makes it fail, and
        // the batch then goes through the statement that sorts the new rows from the known ones.
        match self.insert_new(group, &c).await {
            Err(StoreError::Sql(e)) if is_source_key_violation(&e) => {}
            done => return done,
        }
        let inserted = sqlx::query_scalar!(
            r#"
            INSERT INTO redrive.retry_messages (
                id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp, key, payload,
                headers, state, attempts, max_attempts, next_attempt_at, last_error, error_kind,
                error_history, first_failed_at, updated_at, dead_at)
            SELECT t.id, $1, t.topic, t.part, t.off, t.ts, t.key, t.payload,
                   t.headers, t.state, 1, t.max_attempts, now() + make_interval(secs => t.retry_in),
                   t.err, t.kind,
                   to_jsonb(ARRAY[ROW(now(), 1, t.kind, t.err)::redrive.history_entry]),
                   now(), now(), CASE WHEN t.state = 'dead' THEN now() END
            FROM UNNEST($2::uuid[], $3::text[], $4::int4[], $5::int8[], $6::timestamptz[],
                        $7::bytea[], $8::bytea[], $9::jsonb[], $10::text[], $11::int4[],
                        $12::float8[], $13::text[], $14::text[])
                 AS t(id, topic, part, off, ts, key, payload, headers, state, max_attempts,
                      retry_in, err, kind)
            ON CONFLICT (consumer_group, topic, "partition", kafka_offset, incarnation) DO NOTHING
            RETURNING id
            "#,
            group,
            &c.ids,
            &c.topics as &[&str],
            &c.partitions,
            &c.offsets,
            // The casts let the macro accept NULL elements (a record without key or value).
            &c.timestamps as &[Option<DateTime<Utc>>],
            &c.keys as &[Option<&[u8]>],
            &c.payloads as &[Option<&[u8]>],
            &c.headers,
            &c.states as &[&str],
            &c.max_attempts,
            &c.retry_in,
            &c.errors,
            &c.kinds as &[&str],
        )
        .fetch_all(self.pool())
        .await?;
        if inserted.len() == batch.len() {
            return Ok(inserted.len() as u64);
        }
        let taken: Vec<&Capture> = rows
            .into_iter()
            .zip(&c.ids)
            .filter(|(_, id)| !inserted.contains(id))
            .map(|(row, _)| row)
            .collect();
        let reused = self.capture_reused(group, &taken).await?;
        Ok((inserted.len() + reused) as u64)
    }

    /// Inserts every row of the batch, or none: fails on the source key when any row exists.
    /// The error history's first entry is `to_jsonb` of a `redrive.history_entry` (schema V10):
    /// `jsonb_build_object` looked up the type of each of its arguments on every row.
    async fn insert_new(&self, group: &str, c: &Columns<'_>) -> Result<u64, StoreError> {
        let inserted = sqlx::query!(
            r#"
            INSERT INTO redrive.retry_messages (
                id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp, key, payload,
                headers, state, attempts, max_attempts, next_attempt_at, last_error, error_kind,
                error_history, first_failed_at, updated_at, dead_at)
            SELECT t.id, $1, t.topic, t.part, t.off, t.ts, t.key, t.payload,
                   t.headers, t.state, 1, t.max_attempts, now() + make_interval(secs => t.retry_in),
                   t.err, t.kind,
                   to_jsonb(ARRAY[ROW(now(), 1, t.kind, t.err)::redrive.history_entry]),
                   now(), now(), CASE WHEN t.state = 'dead' THEN now() END
            FROM UNNEST($2::uuid[], $3::text[], $4::int4[], $5::int8[], $6::timestamptz[],
                        $7::bytea[], $8::bytea[], $9::jsonb[], $10::text[], $11::int4[],
                        $12::float8[], $13::text[], $14::text[])
                 AS t(id, topic, part, off, ts, key, payload, headers, state, max_attempts,
                      retry_in, err, kind)
            "#,
            group,
            &c.ids,
            &c.topics as &[&str],
            &c.partitions,
            &c.offsets,
            &c.timestamps as &[Option<DateTime<Utc>>],
            &c.keys as &[Option<&[u8]>],
            &c.payloads as &[Option<&[u8]>],
            &c.headers,
            &c.states as &[&str],
            &c.max_attempts,
            &c.retry_in,
            &c.errors,
            &c.kinds as &[&str],
        )
        .execute(self.pool())
        .await?;
        Ok(inserted.rows_affected())
    }

    /// The rows whose coordinates were taken: a redelivery matches a stored row's timestamp and
    /// value and adds nothing; any other message is a new one at a reused offset, inserted as the
    /// next incarnation. Returns how many were inserted.
    async fn capture_reused(&self, group: &str, rows: &[&Capture]) -> Result<usize, StoreError> {
        let c = Columns::of(rows);
        let reused = sqlx::query!(
            r#"
            INSERT INTO redrive.retry_messages (
                id, consumer_group, topic, "partition", kafka_offset, incarnation, kafka_timestamp,
                key, payload, headers, state, attempts, max_attempts, next_attempt_at, last_error,
                error_kind, error_history, first_failed_at, updated_at, dead_at)
            SELECT t.id, $1, t.topic, t.part, t.off, prior.next, t.ts, t.key, t.payload,
                   t.headers, t.state, 1, t.max_attempts, now() + make_interval(secs => t.retry_in),
                   t.err, t.kind,
                   to_jsonb(ARRAY[ROW(now(), 1, t.kind, t.err)::redrive.history_entry]),
                   now(), now(), CASE WHEN t.state = 'dead' THEN now() END
            FROM UNNEST($2::uuid[], $3::text[], $4::int4[], $5::int8[], $6::timestamptz[],
                        $7::bytea[], $8::bytea[], $9::jsonb[], $10::text[], $11::int4[],
                        $12::float8[], $13::text[], $14::text[])
                 AS t(id, topic, part, off, ts, key, payload, headers, state, max_attempts,
                      retry_in, err, kind)
            CROSS JOIN LATERAL (
                SELECT coalesce(max(r.incarnation), -1) + 1 AS next,
                       bool_or(r.kafka_timestamp IS NOT DISTINCT FROM t.ts
                               AND r.payload IS NOT DISTINCT FROM t.payload) AS same
                FROM redrive.retry_messages r
                WHERE r.consumer_group = $1 AND r.topic = t.topic AND r."partition" = t.part
                  AND r.kafka_offset = t.off) AS prior
            WHERE prior.same IS NOT TRUE
            ON CONFLICT (consumer_group, topic, "partition", kafka_offset, incarnation) DO NOTHING
            RETURNING kafka_offset, "partition", topic, incarnation
            "#,
            group,
            &c.ids,
            &c.topics as &[&str],
            &c.partitions,
            &c.offsets,
            &c.timestamps as &[Option<DateTime<Utc>>],
            &c.keys as &[Option<&[u8]>],
            &c.payloads as &[Option<&[u8]>],
            &c.headers,
            &c.states as &[&str],
            &c.max_attempts,
            &c.retry_in,
            &c.errors,
            &c.kinds as &[&str],
        )
        .fetch_all(self.pool())
        .await?;
        for r in &reused {
            metrics::counter!("redrive_reused_offsets_total").increment(1);
            tracing::warn!(topic = r.topic, partition = r.partition, offset = r.kafka_offset,
                incarnation = r.incarnation,
                "a different message at an offset that already has a row (topic recreated, or its log truncated?): captured as a new incarnation");
        }
        Ok(reused.len())
    }
}

/// Whether a statement failed because a row with the same source coordinates exists.
fn is_source_key_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.constraint() == Some("retry_messages_source_key"))
}

/// One array per column, for the UNNEST of the capture statements. The arrays borrow from the
/// batch: a value is copied once, into the statement.
struct Columns<'a> {
    ids: Vec<Uuid>,
    topics: Vec<&'a str>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    timestamps: Vec<Option<DateTime<Utc>>>,
    keys: Vec<Option<&'a [u8]>>,
    payloads: Vec<Option<&'a [u8]>>,
    headers: Vec<serde_json::Value>,
    states: Vec<&'static str>,
    max_attempts: Vec<i32>,
    retry_in: Vec<f64>,
    errors: Vec<String>,
    kinds: Vec<&'static str>,
}

impl<'a> Columns<'a> {
    fn of(batch: &[&'a Capture]) -> Self {
        Columns {
            ids: batch.iter().map(|_| Uuid::now_v7()).collect(),
            topics: batch.iter().map(|c| c.message.topic.as_str()).collect(),
            partitions: batch.iter().map(|c| c.message.partition).collect(),
            offsets: batch.iter().map(|c| c.message.offset).collect(),
            timestamps: batch.iter().map(|c| c.message.timestamp).collect(),
            keys: batch.iter().map(|c| c.message.key.as_deref()).collect(),
            payloads: batch.iter().map(|c| c.message.payload.as_deref()).collect(),
            headers: batch.iter().map(|c| c.message.headers_json()).collect(),
            states: batch.iter().map(|c| c.state.as_str()).collect(),
            max_attempts: batch.iter().map(|c| c.max_attempts).collect(),
            retry_in: batch.iter().map(|c| c.retry_in.as_secs_f64()).collect(),
            errors: batch
                .iter()
                .map(|c| super::safe::error_text(&c.error.message))
                .collect(),
            kinds: batch.iter().map(|c| c.error.kind.as_str()).collect(),
        }
    }
}
