//! The DLQ outbox (I4): dead rows whose record the DLQ broker has not acknowledged yet.
//!
//! A publisher locks a batch (`FOR UPDATE SKIP LOCKED`, so publishers in several processes share
//! the work), produces the records, and sets `dlq_published_at` only for those the broker
//! acknowledged, in the same transaction. A failed send leaves the row unpublished for the next
//! round; the row itself never leaves the table.
//!
//! A record the broker refuses for good, and a row whose stored message cannot be read, are marked
//! with `dlq_error` and `dlq_refused_at` and leave the outbox, so they never sit at its head (I10).

use super::{Store, StoreError};
use crate::message::Message;
use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

/// A dead row on its way to the DLQ topic.
#[derive(Debug, Clone)]
pub struct DeadRow {
    /// The row id, sent as a header so the record can be traced back.
    pub id: Uuid,
    /// The consumer group that failed to process it.
    pub consumer_group: String,
    /// The original record.
    pub message: Message,
    /// Attempts made.
    pub attempts: i32,
    /// When it first failed.
    pub first_failed_at: DateTime<Utc>,
    /// The last error.
    pub last_error: Option<String>,
    /// `retryable`, `permanent` or `timeout`.
    pub error_kind: Option<String>,
    /// The trace context of its first delivery, when traces were exported then (schema V15).
    pub trace: Option<String>,
}

/// A locked batch of unpublished dead rows; dropping it without [`OutboxBatch::finish`] unlocks
/// the rows unchanged.
pub struct OutboxBatch {
    tx: Transaction<'static, Postgres>,
    /// The rows to publish.
    pub rows: Vec<DeadRow>,
    /// Rows whose stored message cannot be read, with the reason; they cannot be published.
    pub unreadable: Vec<(Uuid, String)>,
    /// Whether the batch stopped at a bound (its rows or its bytes) rather than at the end of the
    /// outbox: more rows may wait.
    pub full: bool,
}

impl Store {
    /// Locks up to `limit` unpublished dead rows of `group`, oldest first, and returns the oldest
    /// of them whose keys and values come to at most `bytes`, or the first alone when it is
    /// larger. Rows locked past that stay locked until the batch ends, unpublished, for a later
    /// round.
    pub async fn outbox_batch(
        &self,
        group: &str,
        limit: i64,
        bytes: i64,
    ) -> Result<OutboxBatch, StoreError> {
        let mut tx = self.pool().begin().await?;
        // `COLLATE "C"` as in `retry_messages_unpublished`'s predicate (schema V30): only that
        // index can serve this statement, so it never walks the dead rows already published. A
        // value's length is read from its header, without reading a stored large value itself.
        let records = sqlx::query!(
            r#"
            WITH locked AS (
                SELECT id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp, key,
                       payload, headers, attempts, first_failed_at, last_error, error_kind,
                       trace_context, dead_at,
                       coalesce(octet_length(key), 0) + coalesce(octet_length(payload), 0) AS size
                FROM redrive.retry_messages
                WHERE consumer_group = $1 AND state = 'dead' COLLATE "C"
                  AND dlq_published_at IS NULL AND dlq_refused_at IS NULL
                ORDER BY dead_at
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            )
            SELECT id AS "id!", consumer_group AS "consumer_group!", topic AS "topic!",
                   "partition" AS "partition!", kafka_offset AS "kafka_offset!", kafka_timestamp,
                   key, payload, headers::text AS "headers!", attempts AS "attempts!",
                   first_failed_at AS "first_failed_at!", last_error, error_kind, trace_context,
                   locked AS "locked!"
            FROM (SELECT l.*, count(*) OVER () AS locked,
                         row_number() OVER w AS n, sum(l.size) OVER w AS upto
                  FROM locked l
                  WINDOW w AS (ORDER BY l.dead_at, l.id ROWS UNBOUNDED PRECEDING)) t
            WHERE n = 1 OR upto <= $3
            ORDER BY dead_at, id
            "#,
            group,
            limit,
            bytes,
        )
        .fetch_all(&mut *tx)
        .await?;
        let locked = records.first().map_or(0, |r| r.locked);
        let full = locked == limit || (records.len() as i64) < locked;
        let (mut rows, mut unreadable) = (Vec::with_capacity(records.len()), Vec::new());
        for mut r in records {
            let (id, consumer_group, attempts) = (r.id, r.consumer_group, r.attempts);
            let (first_failed_at, last_error, error_kind) =
                (r.first_failed_at, r.last_error, r.error_kind);
            let trace = r.trace_context.take();
            match stored_message!(r) {
                Ok(message) => rows.push(DeadRow {
                    id,
                    consumer_group,
                    attempts,
                    first_failed_at,
                    last_error,
                    error_kind,
                    message,
                    trace,
                }),
                Err(e) => unreadable.push((id, e.to_string())),
            }
        }
        Ok(OutboxBatch {
            tx,
            rows,
            unreadable,
            full,
        })
    }

    /// How many dead rows of `group` wait for the DLQ broker.
    pub async fn outbox_backlog(&self, group: &str) -> Result<i64, StoreError> {
        let n = sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM redrive.retry_messages
               WHERE consumer_group = $1 AND state = 'dead' COLLATE "C" AND dlq_published_at IS NULL
                 AND dlq_refused_at IS NULL"#,
            group,
        )
        .fetch_one(self.pool())
        .await?;
        Ok(n)
    }
}

impl OutboxBatch {
    /// Records the acknowledged rows (id and the topic they went to) and the refused ones (id and
    /// why), and unlocks the batch.
    pub async fn finish(
        mut self,
        published: &[(Uuid, String)],
        refused: &[(Uuid, String)],
    ) -> Result<u64, StoreError> {
        let (ids, topics): (Vec<Uuid>, Vec<String>) = published.iter().cloned().unzip();
        let result = sqlx::query!(
            r#"
            UPDATE redrive.retry_messages r
            SET dlq_published_at = now(), dlq_topic = f.topic, updated_at = now()
            FROM UNNEST($1::uuid[], $2::text[]) AS f(id, topic)
            WHERE r.id = f.id AND r.state = 'dead' AND r.dlq_published_at IS NULL
            "#,
            &ids,
            &topics,
        )
        .execute(&mut *self.tx)
        .await?;
        if !refused.is_empty() {
            let (ids, errors): (Vec<Uuid>, Vec<String>) = refused
                .iter()
                .map(|(id, e)| (*id, super::safe::error_text(e)))
                .unzip();
            sqlx::query!(
                r#"
                UPDATE redrive.retry_messages r
                SET dlq_refused_at = now(), dlq_error = f.err, updated_at = now()
                FROM UNNEST($1::uuid[], $2::text[]) AS f(id, err)
                WHERE r.id = f.id AND r.state = 'dead' AND r.dlq_published_at IS NULL
                "#,
                &ids,
                &errors,
            )
            .execute(&mut *self.tx)
            .await?;
        }
        self.tx.commit().await?;
        Ok(result.rows_affected())
    }
}
