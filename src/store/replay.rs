//! Replay: dead rows go back to pending with a fresh attempt budget (`redrive.replay()`, the same
//! SQL function operators call), or their records are produced back to Kafka and the rows marked
//! replayed. Each chunk is one short transaction, so a large replay never holds a long lock, and
//! an interrupted replay leaves every finished chunk replayed.

use super::find::{Filter, Scope};
use super::purge::Chunk;
use super::{Store, StoreError};
use crate::message::Message;
use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

/// Who replays, and why: the audit columns.
#[derive(Debug, Clone)]
pub struct Audit {
    /// `last_replayed_by`.
    pub by: String,
    /// `last_replay_reason`.
    pub reason: Option<String>,
}

/// A dead row locked for `replay --to-topic`; dropping it without
/// [`ToTopicChunk::finish`] leaves the rows dead and unlocked.
pub struct ToTopicChunk {
    tx: Transaction<'static, Postgres>,
    /// The locked rows, oldest death first.
    pub rows: Vec<(Uuid, Message)>,
    /// The trace context each row keeps of its first delivery (schema V15), in the same order.
    pub traces: Vec<Option<String>>,
    /// The death time of the newest row selected, where the next chunk starts.
    pub last_dead_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Re-enqueues the next `limit` matching dead rows in one transaction, resetting `attempts`
    /// and, when given, raising `max_attempts`.
    pub async fn replay_chunk(
        &self,
        filter: &Filter,
        limit: i64,
        audit: &Audit,
        max_attempts: Option<i32>,
    ) -> Result<Chunk, StoreError> {
        let mut tx = self.pool().begin().await?;
        let (ids, last_dead_at) = self
            .next_chunk(&mut *tx, Scope::Dead, filter, true, limit)
            .await?;
        if ids.is_empty() {
            return Ok(Chunk::default());
        }
        let replayed = sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM redrive.replay($1, $2, $3, $4)"#,
            &ids,
            audit.by,
            audit.reason,
            max_attempts,
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Chunk {
            selected: ids.len() as u64,
            changed: replayed as u64,
            last_dead_at,
        })
    }

    /// Locks the next `limit` matching dead rows and reads their records, for producing them back
    /// to Kafka.
    pub async fn to_topic_chunk(
        &self,
        filter: &Filter,
        limit: i64,
    ) -> Result<ToTopicChunk, StoreError> {
        let mut tx = self.pool().begin().await?;
        let (ids, last_dead_at) = self
            .next_chunk(&mut *tx, Scope::Dead, filter, true, limit)
            .await?;
        let records = sqlx::query!(
            r#"
            SELECT id, topic, "partition", kafka_offset, kafka_timestamp, key, payload,
                   headers::text AS "headers!", trace_context
            FROM redrive.retry_messages
            WHERE id = ANY ($1) AND state = 'dead'
            ORDER BY dead_at, id
            FOR UPDATE
            "#,
            &ids,
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut rows = Vec::with_capacity(records.len());
        let mut traces = Vec::with_capacity(records.len());
        for mut r in records {
            traces.push(r.trace_context.take());
            rows.push((r.id, stored_message!(r)?));
        }
        Ok(ToTopicChunk {
            tx,
            rows,
            traces,
            last_dead_at,
        })
    }
}

impl ToTopicChunk {
    /// Marks the rows whose records the broker acknowledged as replayed (to the topic given with
    /// each) and commits. The other rows stay dead.
    pub async fn finish(
        mut self,
        produced: &[(Uuid, String)],
        audit: &Audit,
    ) -> Result<u64, StoreError> {
        let (ids, topics): (Vec<Uuid>, Vec<String>) = produced.iter().cloned().unzip();
        let marked = sqlx::query!(
            r#"
            UPDATE redrive.retry_messages r
            SET state = 'replayed', replayed_to_topic = f.topic, updated_at = now(),
                replay_count = r.replay_count + 1, last_replayed_at = now(),
                last_replayed_by = $3, last_replay_reason = $4
            FROM unnest($1::uuid[], $2::text[]) AS f(id, topic)
            WHERE r.id = f.id AND r.state = 'dead'
            "#,
            &ids,
            &topics,
            audit.by,
            audit.reason,
        )
        .execute(&mut *self.tx)
        .await?
        .rows_affected();
        self.tx.commit().await?;
        Ok(marked)
    }
}
