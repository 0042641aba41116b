//! Completions, in batches, fenced on the claimed attempt (I3): a worker whose lease was taken
//! over finds `attempts` moved on (or the row gone) and its late completion changes nothing.
//! Successes delete the row (I5); failures reschedule it or mark it dead.

use super::{Store, StoreError};
use crate::handler::HandlerError;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// How one claimed attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The handler succeeded: the row is deleted.
    Succeeded,
    /// Try again at the given time.
    Retry {
        next_attempt_at: DateTime<Utc>,
        error: HandlerError,
    },
    /// Out of attempts or permanent: the row becomes dead and goes to the DLQ outbox.
    Dead { error: HandlerError },
}

/// One finished attempt.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The row.
    pub id: Uuid,
    /// The attempt that was claimed; the fence.
    pub attempt: i32,
    /// What happened.
    pub outcome: Outcome,
}

/// What a batch of completions did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    /// Rows deleted after success.
    pub deleted: u64,
    /// Rows rescheduled.
    pub rescheduled: u64,
    /// Rows marked dead.
    pub dead: u64,
    /// Completions refused by the fence (the lease was taken over).
    pub rejected: u64,
}

impl Store {
    /// Applies a batch of completions in one transaction: one fenced delete of the successes
    /// (`redrive.delete_succeeded`), one UPDATE of the failures.
    pub async fn complete(&self, batch: &[Completion]) -> Result<Completed, StoreError> {
        let (mut ok_ids, mut ok_attempts) = (Vec::new(), Vec::new());
        let (mut ids, mut attempts, mut states, mut next_at, mut errors, mut kinds) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for c in batch {
            let (state, at, error) = match &c.outcome {
                Outcome::Succeeded => {
                    ok_ids.push(c.id);
                    ok_attempts.push(c.attempt);
                    continue;
                }
                Outcome::Retry {
                    next_attempt_at,
                    error,
                } => ("pending", *next_attempt_at, error),
                Outcome::Dead { error } => ("dead", Utc::now(), error),
            };
            ids.push(c.id);
            attempts.push(c.attempt);
            states.push(state.to_string());
            next_at.push(at);
            errors.push(error.message.clone());
            kinds.push(error.kind.as_str().to_string());
        }
        let mut tx = self.pool().begin().await?;
        let deleted = if ok_ids.is_empty() {
            0
        } else {
            // Through a SECURITY DEFINER function, so the worker role needs no DELETE privilege.
            sqlx::query_scalar!(
                r#"SELECT redrive.delete_succeeded($1::uuid[], $2::int4[]) AS "deleted!""#,
                &ok_ids,
                &ok_attempts,
            )
            .fetch_one(&mut *tx)
            .await? as u64
        };
        let updated = if ids.is_empty() {
            Vec::new()
        } else {
            sqlx::query_scalar!(
                r#"
                UPDATE redrive.retry_messages r
                SET state = f.state, next_attempt_at = f.next_at, last_error = f.err,
                    error_kind = f.kind, lease_expires_at = NULL, locked_by = NULL,
                    updated_at = now(), dead_at = CASE WHEN f.state = 'dead' THEN now() END,
                    dlq_published_at = NULL, dlq_topic = NULL,
                    error_history = (
                        SELECT jsonb_agg(e ORDER BY n) FROM (
                            SELECT e, n FROM jsonb_array_elements(r.error_history || jsonb_build_array(
                                jsonb_build_object('at', now(), 'attempt', f.attempt,
                                                   'kind', f.kind, 'error', f.err)))
                                WITH ORDINALITY AS h(e, n)
                            ORDER BY n DESC LIMIT 10) AS recent)
                FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::timestamptz[], $5::text[], $6::text[])
                     AS f(id, attempt, state, next_at, err, kind)
                WHERE r.id = f.id AND r.attempts = f.attempt AND r.state = 'running'
                RETURNING r.state
                "#,
                &ids,
                &attempts,
                &states,
                &next_at,
                &errors,
                &kinds,
            )
            .fetch_all(&mut *tx)
            .await?
        };
        tx.commit().await?;
        let dead = updated.iter().filter(|s| s.as_str() == "dead").count() as u64;
        Ok(Completed {
            deleted,
            rescheduled: updated.len() as u64 - dead,
            dead,
            rejected: batch.len() as u64 - deleted - updated.len() as u64,
        })
    }

    /// Gives claimed-but-abandoned rows back at shutdown: pending, due now, the attempt returned.
    pub async fn release(&self, claims: &[(Uuid, i32)]) -> Result<u64, StoreError> {
        let (ids, attempts): (Vec<Uuid>, Vec<i32>) = claims.iter().copied().unzip();
        let result = sqlx::query!(
            r#"
            UPDATE redrive.retry_messages r
            SET state = 'pending', attempts = r.attempts - 1, next_attempt_at = now(),
                lease_expires_at = NULL, locked_by = NULL, updated_at = now()
            FROM UNNEST($1::uuid[], $2::int4[]) AS f(id, attempt)
            WHERE r.id = f.id AND r.attempts = f.attempt AND r.state = 'running'
            "#,
            &ids,
            &attempts,
        )
        .execute(self.pool())
        .await?;
        Ok(result.rows_affected())
    }
}
