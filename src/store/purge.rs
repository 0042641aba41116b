//! Purge (I5): the only way a dead or replayed row leaves the table. Each chunk is one short
//! transaction. Dead rows the DLQ broker has not acknowledged yet are kept unless the operator
//! includes them, so a purge never loses a dead message that exists nowhere else (I4).

use super::find::{Filter, Scope};
use super::{Store, StoreError};
use chrono::{DateTime, Utc};

/// What one chunk did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Chunk {
    /// Rows the filter selected for this chunk; 0 when none are left.
    pub selected: u64,
    /// Rows the chunk changed (rows changed meanwhile by another process are left alone).
    pub changed: u64,
    /// The death time of the newest row selected, where the next chunk starts
    /// ([`Filter::start_at`]).
    pub last_dead_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Deletes the next `limit` matching dead or replayed rows in one transaction.
    pub async fn purge_chunk(
        &self,
        filter: &Filter,
        with_unpublished: bool,
        limit: i64,
    ) -> Result<Chunk, StoreError> {
        let mut tx = self.pool().begin().await?;
        let (ids, last_dead_at) = self
            .next_chunk(&mut *tx, Scope::Finished, filter, with_unpublished, limit)
            .await?;
        if ids.is_empty() {
            return Ok(Chunk::default());
        }
        let deleted = sqlx::query!(
            r#"
            DELETE FROM redrive.retry_messages
            WHERE id = ANY ($1) AND state IN ('dead', 'replayed')
              AND ($2 OR state <> 'dead' OR dlq_published_at IS NOT NULL)
            "#,
            &ids,
            with_unpublished,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(Chunk {
            selected: ids.len() as u64,
            changed: deleted,
            last_dead_at,
        })
    }
}
