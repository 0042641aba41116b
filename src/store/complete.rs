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

/// Opens a transaction, in one round trip, whose statements wait at most 5 s for a row that another
/// session holds locked (an operator's UPDATE in a transaction left open) before a completion goes
/// around it; schema V16 gives `redrive.delete_succeeded` the same.
const BEGIN_WITH_LOCK_TIMEOUT: &str = "BEGIN; SET LOCAL lock_timeout = '5s'";

/// Whether a statement gave up waiting for a lock (`lock_timeout`, SQLSTATE 55P03).
pub fn is_lock_timeout(e: &StoreError) -> bool {
    match e {
        StoreError::Sql(sqlx::Error::Database(db)) => db.code().as_deref() == Some("55P03"),
        _ => false,
    }
}

/// What [`Store::complete_around_held`] did, and the completions it could not write yet because
/// another session holds their rows locked.
#[derive(Debug, Default)]
pub struct Finished {
    /// What was written.
    pub done: Completed,
    /// Not written yet: try them again with [`Store::complete_unheld`].
    pub held: Vec<Completion>,
}

impl std::ops::AddAssign for Finished {
    fn add_assign(&mut self, o: Finished) {
        self.done += o.done;
        self.held.extend(o.held);
    }
}

impl Store {
    /// Applies a batch of completions: one fenced delete of the successes
    /// (`redrive.delete_succeeded`) and one UPDATE of the failures, in one transaction when the
    /// batch has failures. A row that another session holds locked makes it fail after
    /// 5 s ([`BEGIN_WITH_LOCK_TIMEOUT`], SQLSTATE 55P03) rather than wait for as long as
    /// that session likes.
    pub async fn complete(&self, batch: &[Completion]) -> Result<Completed, StoreError> {
        let split = Split::of(batch);
        let (deleted, updated) = match (split.ok_ids.is_empty(), split.failed.ids.is_empty()) {
            (true, true) => (0, Vec::new()),
            // One statement needs no transaction around it to open and close; the function has
            // its own lock timeout.
            (false, true) => {
                let deleted =
                    delete_succeeded(self.pool(), &split.ok_ids, &split.ok_tokens).await?;
                (deleted, Vec::new())
            }
            _ => {
                let mut tx = self.begin_with_lock_timeout().await?;
                let done = split.apply(&mut tx).await;
                commit_or_roll_back(tx, done).await?
            }
        };
        Ok(split.counted(batch.len(), deleted, &updated))
    }

    /// A transaction whose statements give up waiting for a lock after 5 s.
    async fn begin_with_lock_timeout(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
        Ok(self.pool().begin_with(BEGIN_WITH_LOCK_TIMEOUT).await?)
    }

    /// [`Store::complete`], going around the rows that another session holds locked: when the
    /// batch gave up waiting for one (or at once, without `wait`), the rows nobody else holds are
    /// completed, and the others are returned in [`Finished::held`], to be tried again.
    pub async fn complete_around_held(
        &self,
        batch: &[Completion],
        wait: bool,
    ) -> Result<Finished, StoreError> {
        if wait {
            match self.complete(batch).await {
                Ok(done) => {
                    return Ok(Finished {
                        done,
                        held: Vec::new(),
                    })
                }
                Err(e) if is_lock_timeout(&e) => {}
                Err(e) => return Err(e),
            }
        }
        match self.complete_unheld(batch).await {
            // A trigger of one of them waited on a row held elsewhere: all wait their turn.
            Err(e) if is_lock_timeout(&e) => Ok(Finished {
                done: Completed::default(),
                held: batch.to_vec(),
            }),
            other => other,
        }
    }

    /// Completes, without waiting for any lock of another session, the completions of `batch`
    /// whose rows no other session holds locked; returns the others in [`Finished::held`]. The
    /// rows it completes are locked first with `SKIP LOCKED`, the message's and then the queue's;
    /// a row already gone (its lease taken over and finished elsewhere) is left to the fence.
    pub async fn complete_unheld(&self, batch: &[Completion]) -> Result<Finished, StoreError> {
        // A trigger of a completed row may still need a row held elsewhere (the next row of its
        // key line): that waits no longer than a completion does.
        let mut tx = self.begin_with_lock_timeout().await?;
        let finished = unheld(&mut tx, batch).await;
        commit_or_roll_back(tx, finished).await
    }

    /// Gives claimed-but-abandoned rows back at shutdown: pending, due now (or when it was due, for
    /// a row claimed ahead of that), the attempt returned. `claims` are (row id, claim token); a row
    /// claimed by someone else since is left alone.
    pub async fn release(&self, claims: &[(Uuid, Uuid)]) -> Result<u64, StoreError> {
        let (ids, tokens): (Vec<Uuid>, Vec<Uuid>) = claims.iter().copied().unzip();
        // A function of schema V19: it reads the rows by key, however many others run.
        let released = sqlx::query_scalar!(
            r#"SELECT redrive.release_claims($1::uuid[], $2::uuid[]) AS "released!""#,
            &ids,
            &tokens,
        )
        .fetch_one(self.pool())
        .await?;
        Ok(released as u64)
    }
}

/// [`Store::complete_unheld`]'s statements, in its transaction.
async fn unheld(tx: &mut sqlx::PgConnection, batch: &[Completion]) -> Result<Finished, StoreError> {
    let ids: Vec<Uuid> = batch.iter().map(|c| c.id).collect();
    let rows = sqlx::query_scalar!(
        r#"SELECT id AS "id!" FROM redrive.retry_messages WHERE id = ANY($1) FOR UPDATE SKIP LOCKED"#,
        &ids,
    )
    .fetch_all(&mut *tx)
    .await?;
    let queued = sqlx::query_scalar!(
        r#"SELECT id AS "id!" FROM redrive.queue WHERE id = ANY($1) FOR UPDATE SKIP LOCKED"#,
        &rows,
    )
    .fetch_all(&mut *tx)
    .await?;
    let held = sqlx::query_scalar!(
        r#"
            SELECT w.id AS "id!" FROM unnest($1::uuid[]) AS w(id)
            WHERE EXISTS (SELECT 1 FROM redrive.retry_messages r WHERE r.id = w.id AND r.id <> ALL($2))
               OR EXISTS (SELECT 1 FROM redrive.queue q WHERE q.id = w.id AND q.id <> ALL($3))
            "#,
        &ids,
        &rows,
        &queued,
    )
    .fetch_all(&mut *tx)
    .await?;
    let (held, free): (Vec<Completion>, Vec<Completion>) =
        batch.iter().cloned().partition(|c| held.contains(&c.id));
    let split = Split::of(&free);
    let (deleted, updated) = split.apply(tx).await?;
    Ok(Finished {
        done: split.counted(free.len(), deleted, &updated),
        held,
    })
}

/// Commits `tx` when `result` is a success. Otherwise rolls it back before returning the error, so
/// its locks are gone when the caller goes on: a transaction that is only dropped keeps them until
/// the pool gets round to its connection, and the rows it had changed would look held by another
/// session to the next statement that skips locked rows.
async fn commit_or_roll_back<T>(
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    result: Result<T, StoreError>,
) -> Result<T, StoreError> {
    match result {
        Ok(done) => {
            tx.commit().await?;
            Ok(done)
        }
        Err(e) => {
            // The statement's error is the one to report; a rollback that fails (the connection
            // is gone) ends the transaction all the same.
            let _ = tx.rollback().await;
            Err(e)
        }
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

/// A batch of completions, split into the successes (deleted) and the failures (updated).
struct Split {
    ok_ids: Vec<Uuid>,
    ok_tokens: Vec<Uuid>,
    failed: Failures,
}

impl Split {
    fn of(batch: &[Completion]) -> Self {
        let mut split = Split {
            ok_ids: Vec::new(),
            ok_tokens: Vec::new(),
            failed: Failures::default(),
        };
        for c in batch {
            match &c.outcome {
                Outcome::Succeeded => {
                    split.ok_ids.push(c.id);
                    split.ok_tokens.push(c.token);
                }
                Outcome::Retry { retry_in, error } => {
                    split.failed.push(c, "pending", *retry_in, error)
                }
                Outcome::Dead { error } => split.failed.push(c, "dead", Duration::ZERO, error),
            }
        }
        split
    }

    /// Both statements, in the caller's transaction; returns how many rows were deleted, and the
    /// new state of each row updated.
    async fn apply(&self, tx: &mut sqlx::PgConnection) -> Result<(u64, Vec<String>), StoreError> {
        let deleted = match self.ok_ids.is_empty() {
            true => 0,
            false => delete_succeeded(&mut *tx, &self.ok_ids, &self.ok_tokens).await?,
        };
        let updated = match self.failed.ids.is_empty() {
            true => Vec::new(),
            false => self.failed.write(&mut *tx).await?,
        };
        Ok((deleted, updated))
    }

    /// What `total` completions did, `deleted` and `updated` of them written.
    fn counted(&self, total: usize, deleted: u64, updated: &[String]) -> Completed {
        let dead = updated.iter().filter(|s| s.as_str() == "dead").count() as u64;
        Completed {
            deleted,
            rescheduled: updated.len() as u64 - dead,
            dead,
            rejected: total as u64 - deleted - updated.len() as u64,
        }
    }
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
        // A function of schema V19: it reads the rows by key, however many others run.
        let states = sqlx::query_scalar!(
            r#"SELECT s AS "state!" FROM redrive.fail_attempts($1::uuid[], $2::uuid[], $3::int4[],
                   $4::text[], $5::float8[], $6::text[], $7::text[]) AS s"#,
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
