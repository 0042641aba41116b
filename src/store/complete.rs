//! Completions, in batches, fenced on the claim's token (I3, I11): a worker whose lease was taken
//! over finds another token on the row (or the row gone) and its late completion changes nothing.
//! The token is fresh on every claim, so unlike the attempt number it never comes back after a
//! replay or a release.
//! Successes delete the row (I5); failures reschedule it or mark it dead.

use super::{Store, StoreError};
use crate::handler::HandlerError;
use std::time::Duration;
use uuid::Uuid;

/// How one claimed attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The handler succeeded: the row is deleted.
    Succeeded,
    /// Try again after `retry_in`, counted from the database's `now()` (I11).
    Retry {
        retry_in: Duration,
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
    /// The attempt that was claimed, recorded in the error history.
    pub attempt: i32,
    /// The claim's token; the fence.
    pub token: Uuid,
    /// What happened.
    pub outcome: Outcome,
}

impl Completion {
    /// Bytes of error text this completion carries, for the batch's byte limit.
    pub fn size(&self) -> usize {
        match &self.outcome {
            Outcome::Succeeded => 0,
            Outcome::Retry { error, .. } | Outcome::Dead { error } => error.message.len(),
        }
    }

    /// The completion written when Postgres refuses this one: the row becomes dead (fenced as
    /// before) with the database's error, so it is kept and reaches the DLQ (I10).
    pub fn safe_form(&self, db_error: &str) -> Completion {
        Completion {
            id: self.id,
            attempt: self.attempt,
            token: self.token,
            outcome: Outcome::Dead {
                error: HandlerError::permanent(format!(
                    "postgres refused this attempt's completion: {db_error}"
                )),
            },
        }
    }
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

impl std::ops::AddAssign for Completed {
    fn add_assign(&mut self, o: Completed) {
        self.deleted += o.deleted;
        self.rescheduled += o.rescheduled;
        self.dead += o.dead;
        self.rejected += o.rejected;
    }
}

impl Store {
    /// Applies a batch of completions: one fenced delete of the successes
    /// (`redrive.delete_succeeded`) and one UPDATE of the failures, in one transaction when the
    /// batch has both.
    pub async fn complete(&self, batch: &[Completion]) -> Result<Completed, StoreError> {
        let (mut ok_ids, mut ok_tokens) = (Vec::new(), Vec::new());
        let mut failed = Failures::default();
        for c in batch {
            match &c.outcome {
                Outcome::Succeeded => {
                    ok_ids.push(c.id);
                    ok_tokens.push(c.token);
                }
                Outcome::Retry { retry_in, error } => failed.push(c, "pending", *retry_in, error),
                Outcome::Dead { error } => failed.push(c, "dead", Duration::ZERO, error),
            }
        }
        let (deleted, updated) = match (ok_ids.is_empty(), failed.ids.is_empty()) {
            (true, true) => (0, Vec::new()),
            // One statement needs no transaction around it to open and close.
            (true, false) => (0, failed.write(self.pool()).await?),
            (false, true) => {
                let deleted = delete_succeeded(self.pool(), &ok_ids, &ok_tokens).await?;
                (deleted, Vec::new())
            }
            (false, false) => {
                let mut tx = self.pool().begin().await?;
                let deleted = delete_succeeded(&mut *tx, &ok_ids, &ok_tokens).await?;
                let updated = failed.write(&mut *tx).await?;
                tx.commit().await?;
                (deleted, updated)
            }
        };
        let dead = updated.iter().filter(|s| s.as_str() == "dead").count() as u64;
        Ok(Completed {
            deleted,
            rescheduled: updated.len() as u64 - dead,
            dead,
            rejected: batch.len() as u64 - deleted - updated.len() as u64,
        })
    }

    /// Gives claimed-but-abandoned rows back at shutdown: pending, due now (or when it was due, for
    /// a row claimed ahead of that), the attempt returned. `claims` are (row id, claim token); a row
    /// claimed by someone else since is left alone.
    pub async fn release(&self, claims: &[(Uuid, Uuid)]) -> Result<u64, StoreError> {
        let (ids, tokens): (Vec<Uuid>, Vec<Uuid>) = claims.iter().copied().unzip();
        let result = sqlx::query!(
            r#"
            WITH released AS (
                UPDATE redrive.queue q
                SET state = 'pending', attempts = q.attempts - 1,
                    next_attempt_at = greatest(q.next_attempt_at, now()), lease_expires_at = NULL,
                    locked_by = NULL, claim_token = NULL
                FROM UNNEST($1::uuid[], $2::uuid[]) AS f(id, token)
                WHERE q.id = f.id AND q.claim_token = f.token AND q.state = 'running'
                RETURNING q.id, q.attempts, q.next_attempt_at)
            UPDATE redrive.retry_messages r
            SET attempts = q.attempts, next_attempt_at = q.next_attempt_at, updated_at = now()
            FROM released q
            WHERE r.id = q.id
            "#,
            &ids,
            &tokens,
        )
        .execute(self.pool())
        .await?;
        Ok(result.rows_affected())
    }
}

/// Deletes the succeeded rows among `ids` whose claim tokens match, through the SECURITY DEFINER
/// function, so the worker role needs no DELETE privilege. Returns how many.
async fn delete_succeeded<'e>(
    db: impl sqlx::PgExecutor<'e>,
    ids: &[Uuid],
    tokens: &[Uuid],
) -> Result<u64, StoreError> {
    let deleted = sqlx::query_scalar!(
        r#"SELECT redrive.delete_succeeded($1::uuid[], $2::uuid[]) AS "deleted!""#,
        ids,
        tokens,
    )
    .fetch_one(db)
    .await?;
    Ok(deleted as u64)
}

/// The failed attempts of a batch, one array per column of their UPDATE.
#[derive(Default)]
struct Failures {
    ids: Vec<Uuid>,
    tokens: Vec<Uuid>,
    attempts: Vec<i32>,
    states: Vec<&'static str>,
    retry_in: Vec<f64>,
    errors: Vec<String>,
    kinds: Vec<&'static str>,
}

impl Failures {
    fn push(
        &mut self,
        c: &Completion,
        state: &'static str,
        retry_in: Duration,
        error: &HandlerError,
    ) {
        self.ids.push(c.id);
        self.tokens.push(c.token);
        self.attempts.push(c.attempt);
        self.states.push(state);
        self.retry_in.push(retry_in.as_secs_f64());
        self.errors.push(super::safe::error_text(&error.message));
        self.kinds.push(error.kind.as_str());
    }

    /// Reschedules the rows or marks them dead, fenced on their claim tokens in the queue, each
    /// with its error added to a history of the last 10. A dead row leaves the queue through the
    /// trigger that keeps the queue in step with `state`. Returns the new state of each row it changed.
    async fn write<'e>(&self, db: impl sqlx::PgExecutor<'e>) -> Result<Vec<String>, StoreError> {
        let states = sqlx::query_scalar!(
            r#"
            WITH f AS (
                SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int4[], $4::text[], $5::float8[],
                                     $6::text[], $7::text[])
                     AS f(id, token, attempt, state, retry_in, err, kind)
            ), ended AS (
                UPDATE redrive.queue q
                SET state = 'pending', next_attempt_at = now() + make_interval(secs => f.retry_in),
                    lease_expires_at = NULL, locked_by = NULL, claim_token = NULL
                FROM f
                WHERE q.id = f.id AND q.claim_token = f.token AND q.state = 'running'
                RETURNING q.id, q.attempts, q.next_attempt_at)
            UPDATE redrive.retry_messages r
            SET state = f.state, attempts = q.attempts, next_attempt_at = q.next_attempt_at,
                last_error = f.err, error_kind = f.kind, updated_at = now(),
                dead_at = CASE WHEN f.state = 'dead' THEN now() END,
                dlq_published_at = NULL, dlq_topic = NULL, dlq_error = NULL, dlq_refused_at = NULL,
                error_history = (
                    SELECT jsonb_agg(e ORDER BY n) FROM (
                        SELECT e, n FROM jsonb_array_elements(r.error_history || jsonb_build_array(
                            jsonb_build_object('at', now(), 'attempt', f.attempt,
                                               'kind', f.kind, 'error', f.err)))
                            WITH ORDINALITY AS h(e, n)
                        ORDER BY n DESC LIMIT 10) AS recent)
            FROM ended q JOIN f ON f.id = q.id
            WHERE r.id = q.id
            RETURNING r.state
            "#,
            &self.ids,
            &self.tokens,
            &self.attempts,
            &self.states as &[&str],
            &self.retry_in,
            &self.errors,
            &self.kinds as &[&str],
        )
        .fetch_all(db)
        .await?;
        Ok(states)
    }
}
