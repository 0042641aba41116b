//! Claims: due rows are taken in batches with `FOR UPDATE SKIP LOCKED`, so any number of workers
//! share the table without taking a row twice. A claim is a lease (I3): `attempts` goes up by one,
//! the row gets the claim's fresh `claim_token` (one per statement, shared by the rows it takes),
//! and it is the worker's until `lease_expires_at`. Every claim statement also rescues expired
//! leases, when there are any, so a dead worker's rows come back without anyone acting.
//! A claim may also take rows that come due shortly ([`Store::claim_ahead`]): the worker holds each
//! until it is due, and its lease runs from then.
//!
//! Claims and leases change only the row's narrow entry in `redrive.queue` (schema V8), never the
//! row of `retry_messages` with its message, which the claim reads by primary key.
//!
//! The claim is one statement in `redrive.claim` (schema V7, on the queue since V8), which forces
//! its generic plan, so it is planned once per connection: costed for a tenth of the due rows by
//! `LIMIT`, the generic plan never won against a custom one, and planning each call took about a
//! tenth of a claim. The rows to take are chosen in an `= ANY(ARRAY(…))` subquery, so the plan is
//! an index scan whatever the limit; they are then updated by the ctid that locked them (V9).
//!
//! A claim's commit does not wait for its WAL to reach the disk (`synchronous_commit` off for the
//! statement's own transaction): a flush that stalls then does not hold up the rows coming due. A
//! claim lost in a crash of Postgres loses nothing: the row is pending again with its attempt not
//! counted, the worker's completion is refused by the token fence (I3), and the row is attempted
//! again, as at-least-once allows. Captures and completions, which are outcomes, commit as usual.
//!
//! A claimed row whose stored message cannot be read is returned apart, as [`Unreadable`], so it
//! fails alone and the rest of the batch is attempted (I10).

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
    /// The attempt this claim is for.
    pub attempt: i32,
    /// This claim's token; its completion is fenced on it (I3).
    pub token: Uuid,
    /// The row's attempt budget.
    pub max_attempts: i32,
    /// The message.
    pub message: Message,
    /// When the message first failed.
    pub first_failed_at: DateTime<Utc>,
    /// How long, by the database's clock when it was claimed, until the row is due: zero unless it
    /// was claimed ahead ([`Store::claim_ahead`]). Its handler is not called before this has passed.
    pub wait: Duration,
    /// How late the row already was when it was claimed: zero unless it was due before.
    pub late: Duration,
    /// The trace context of its first delivery, when traces were exported then (schema V15).
    pub trace: Option<String>,
}

/// A claimed row whose stored message cannot be read back: the worker completes it as dead with
/// `problem` as its error, without calling the handler.
#[derive(Debug, Clone)]
pub struct Unreadable {
    /// The row.
    pub id: Uuid,
    /// The attempt this claim is for.
    pub attempt: i32,
    /// This claim's token.
    pub token: Uuid,
    /// Why the row cannot be read.
    pub problem: String,
}

/// What one claim statement took.
#[derive(Debug, Default)]
pub struct Claim {
    /// Rows to attempt.
    pub rows: Vec<Claimed>,
    /// Rows that cannot be attempted.
    pub unreadable: Vec<Unreadable>,
}

impl Claim {
    /// Rows claimed in all.
    pub fn len(&self) -> usize {
        self.rows.len() + self.unreadable.len()
    }

    /// Whether nothing was claimed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    ) -> Result<Claim, StoreError> {
        self.claim_ahead(group, limit, lease, worker, Duration::ZERO)
            .await
    }

    /// [`Store::claim`], also taking rows that come due within `ahead`, earliest first. Each such
    /// row says in [`Claimed::wait`] how long until it is due; its lease runs from then. Rows that
    /// come due one after another are so taken a few per statement, and each is attempted when it
    /// is due rather than on the next claim after that.
    pub async fn claim_ahead(
        &self,
        group: &str,
        limit: i64,
        lease: Duration,
        worker: &str,
        ahead: Duration,
    ) -> Result<Claim, StoreError> {
        let rows = sqlx::query!(
            r#"
            SELECT id AS "id!", attempts AS "attempts!", claim_token AS "claim_token!",
                   max_attempts AS "max_attempts!", topic AS "topic!", "partition" AS "partition!",
                   kafka_offset AS "kafka_offset!", kafka_timestamp, key, payload,
                   headers::text AS "headers!", first_failed_at AS "first_failed_at!", wait AS "wait!",
                   trace_context
            FROM redrive.claim($1, $2, $3, $4, $5)
            "#,
            group,
            limit,
            lease.as_secs_f64(),
            worker,
            ahead.as_secs_f64(),
        )
        .fetch_all(self.pool())
        .await?;
        let mut claim = Claim::default();
        for mut r in rows {
            let (id, attempt, token) = (r.id, r.attempts, r.claim_token);
            let (max_attempts, first_failed_at) = (r.max_attempts, r.first_failed_at);
            // Signed (schema V14): positive until a row claimed ahead is due, negative when late.
            let wait = Duration::try_from_secs_f64(r.wait).unwrap_or_default();
            let late = Duration::try_from_secs_f64(-r.wait).unwrap_or_default();
            let trace = r.trace_context.take();
            match stored_message!(r) {
                Ok(message) => claim.rows.push(Claimed {
                    id,
                    attempt,
                    token,
                    max_attempts,
                    first_failed_at,
                    wait,
                    late,
                    message,
                    trace,
                }),
                Err(e) => claim.unreadable.push(Unreadable {
                    id,
                    attempt,
                    token,
                    problem: e.to_string(),
                }),
            }
        }
        Ok(claim)
    }

    /// How long until `lead` before the next row of `group` is due, or until the next lease
    /// expires, by the database's clock (I11): a worker whose own clock is off neither shortens a
    /// backoff nor polls in a loop. A worker that claims ahead wakes `lead` early, so its claim
    /// takes the row before it is due. `None` when nothing is waiting.
    pub async fn next_wake(
        &self,
        group: &str,
        lead: Duration,
    ) -> Result<Option<Duration>, StoreError> {
        // In a function of schema V17, whose plan takes the first row of each index whatever the
        // queue's statistics say.
        let seconds = sqlx::query_scalar!(
            r#"SELECT redrive.next_wake($1, $2) AS wait"#,
            group,
            lead.as_secs_f64(),
        )
        .fetch_one(self.pool())
        .await?;
        Ok(seconds.map(|s| Duration::try_from_secs_f64(s).unwrap_or_default()))
    }
}
