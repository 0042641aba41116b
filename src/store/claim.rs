//! Claims: due rows are taken in batches with `FOR UPDATE SKIP LOCKED`, so any number of workers
//! share the table without taking a row twice. A claim is a lease (I3): `attempts` goes up by one,
//! and the row is the worker's until `lease_expires_at`. Every claim statement also rescues expired
//! leases, so a dead worker's rows come back without anyone acting.

use super::{Store, StoreError};
use crate::message::Message;
use chrono::{DateTime, Utc};
use std::time::Duration;
use uuid::Uuid;

/// A row claimed for one attempt.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The row.
    pub id: Uuid,
    /// The attempt this claim is for; the completion is fenced on it.
    pub attempt: i32,
    /// The row's attempt budget.
    pub max_attempts: i32,
    /// The message.
    pub message: Message,
    /// When the message first failed.
    pub first_failed_at: DateTime<Utc>,
}

/// When a worker should look again: the next due row and the next lease to expire.
#[derive(Debug, Clone, Copy, Default)]
pub struct NextWake {
    /// `min(next_attempt_at)` of pending rows.
    pub next_due: Option<DateTime<Utc>>,
    /// `min(lease_expires_at)` of running rows.
    pub next_lease_expiry: Option<DateTime<Utc>>,
}

impl NextWake {
    /// The earlier of the two, if any.
    pub fn earliest(&self) -> Option<DateTime<Utc>> {
        match (self.next_due, self.next_lease_expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Store {
    /// Claims up to `limit` due rows of `group` for `lease`, in one statement that also rescues
    /// expired leases: a running row whose lease ran out goes back to `pending` (or `dead`, when
    /// that was its last attempt) and is claimable from the next call on.
    pub async fn claim(
        &self,
        group: &str,
        limit: i64,
        lease: Duration,
        worker: &str,
    ) -> Result<Vec<Claimed>, StoreError> {
        let rows = sqlx::query!(
            r#"
            WITH rescued AS (
                UPDATE redrive.retry_messages r
                SET state = CASE WHEN r.attempts >= r.max_attempts THEN 'dead' ELSE 'pending' END,
                    dead_at = CASE WHEN r.attempts >= r.max_attempts THEN now() END,
                    next_attempt_at = now(), lease_expires_at = NULL, locked_by = NULL,
                    error_kind = 'timeout', updated_at = now(), dlq_published_at = NULL, dlq_topic = NULL,
                    last_error = format('lease expired: worker %s did not finish attempt %s',
                                        coalesce(r.locked_by, '?'), r.attempts)
                WHERE r.id IN (
                    SELECT id FROM redrive.retry_messages
                    WHERE consumer_group = $1 AND state = 'running' AND lease_expires_at < now()
                    LIMIT 1000
                    FOR UPDATE SKIP LOCKED)
                RETURNING r.id
            ), due AS (
                SELECT id FROM redrive.retry_messages
                WHERE consumer_group = $1 AND state = 'pending' AND next_attempt_at <= now()
                ORDER BY next_attempt_at
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            )
            UPDATE redrive.retry_messages r
            SET state = 'running', attempts = r.attempts + 1, locked_by = $4, updated_at = now(),
                lease_expires_at = now() + make_interval(secs => $3)
            FROM due WHERE r.id = due.id
            RETURNING r.id, r.attempts, r.max_attempts, r.topic, r."partition", r.kafka_offset,
                      r.kafka_timestamp, r.key, r.payload, r.headers, r.first_failed_at
            "#,
            group,
            limit,
            lease.as_secs_f64(),
            worker,
        )
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Claimed {
                    id: r.id,
                    attempt: r.attempts,
                    max_attempts: r.max_attempts,
                    first_failed_at: r.first_failed_at,
                    message: stored_message!(r),
                })
            })
            .collect()
    }

    /// When the next row of `group` is due, or the next lease expires.
    pub async fn next_wake(&self, group: &str) -> Result<NextWake, StoreError> {
        let r = sqlx::query!(
            r#"
            SELECT
              (SELECT min(next_attempt_at) FROM redrive.retry_messages
                WHERE consumer_group = $1 AND state = 'pending') AS next_due,
              (SELECT min(lease_expires_at) FROM redrive.retry_messages
                WHERE consumer_group = $1 AND state = 'running') AS next_lease_expiry
            "#,
            group,
        )
        .fetch_one(self.pool())
        .await?;
        Ok(NextWake {
            next_due: r.next_due,
            next_lease_expiry: r.next_lease_expiry,
        })
    }
}
