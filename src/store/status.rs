//! What `redrive status` reads: row counts by topic and state, when rows are due, the DLQ outbox
//! backlog, topic pauses and the most frequent recent errors. Read-only, so the read-only role can
//! run it.

use super::{Store, StoreError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::time::Duration;

/// Everything `redrive status` shows; `--json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The database's clock when the status was read.
    pub at: DateTime<Utc>,
    /// Rows by consumer group and topic, one count per state.
    pub topics: Vec<TopicCounts>,
    /// Due times and the DLQ backlog, per consumer group.
    pub groups: Vec<GroupStatus>,
    /// Topics whose retries are paused.
    pub paused_topics: Vec<PausedTopic>,
    /// The window the errors were counted over, in seconds.
    pub error_window_seconds: u64,
    /// The most frequent errors of failed attempts in the window, most frequent first.
    pub top_errors: Vec<TopError>,
}

/// Row counts of one topic in one consumer group.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TopicCounts {
    pub consumer_group: String,
    pub topic: String,
    pub pending: i64,
    pub running: i64,
    pub paused: i64,
    pub dead: i64,
    pub replayed: i64,
}

/// One consumer group's timing and outbox.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GroupStatus {
    pub consumer_group: String,
    /// Pending rows whose time has come.
    pub due: i64,
    /// The `next_attempt_at` of the longest-waiting due row: how far behind the workers are.
    pub oldest_due_at: Option<DateTime<Utc>>,
    /// The earliest `next_attempt_at` still in the future.
    pub next_due_at: Option<DateTime<Utc>>,
    /// Dead rows the DLQ broker has not acknowledged yet and may still take.
    pub dlq_backlog: i64,
    /// When the oldest of them died.
    pub dlq_oldest_dead_at: Option<DateTime<Utc>>,
    /// Dead rows the DLQ broker refused for good, or that cannot be read: `dlq_error` says why.
    pub dlq_refused: i64,
}

/// A row of `redrive.paused_topics`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PausedTopic {
    /// `*` for every group.
    pub consumer_group: String,
    pub topic: String,
    pub paused_at: DateTime<Utc>,
    pub paused_by: String,
    pub reason: Option<String>,
}

/// One error text and how often it was seen.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TopError {
    /// `retryable`, `permanent` or `timeout`.
    pub kind: Option<String>,
    pub error: Option<String>,
    /// Failed attempts with this error in the window.
    pub failures: i64,
    /// Distinct rows they belong to.
    pub rows: i64,
    /// The latest of them.
    pub last_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Reads the status; errors are counted over the last `window`, at most `top` of them.
    pub async fn status(&self, window: Duration, top: i64) -> Result<Status, StoreError> {
        let mut tx = self.pool().begin().await?;
        // One snapshot for every part, so the numbers agree with each other.
        sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let at = sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
            .fetch_one(&mut *tx)
            .await?;
        let topics = sqlx::query_as!(
            TopicCounts,
            r#"
            SELECT consumer_group, topic,
                   count(*) FILTER (WHERE state = 'pending') AS "pending!",
                   count(*) FILTER (WHERE state = 'running') AS "running!",
                   count(*) FILTER (WHERE state = 'paused') AS "paused!",
                   count(*) FILTER (WHERE state = 'dead') AS "dead!",
                   count(*) FILTER (WHERE state = 'replayed') AS "replayed!"
            FROM redrive.retry_messages
            GROUP BY consumer_group, topic
            ORDER BY consumer_group, topic
            "#
        )
        .fetch_all(&mut *tx)
        .await?;
        let groups = sqlx::query_as!(
            GroupStatus,
            r#"
            SELECT consumer_group,
                   count(*) FILTER (WHERE state = 'pending' AND next_attempt_at <= now()) AS "due!",
                   min(next_attempt_at) FILTER (WHERE state = 'pending' AND next_attempt_at <= now()) AS oldest_due_at,
                   min(next_attempt_at) FILTER (WHERE state = 'pending' AND next_attempt_at > now()) AS next_due_at,
                   count(*) FILTER (WHERE state = 'dead' AND dlq_published_at IS NULL
                                      AND dlq_refused_at IS NULL) AS "dlq_backlog!",
                   min(dead_at) FILTER (WHERE state = 'dead' AND dlq_published_at IS NULL
                                        AND dlq_refused_at IS NULL) AS dlq_oldest_dead_at,
                   count(*) FILTER (WHERE state = 'dead' AND dlq_refused_at IS NOT NULL) AS "dlq_refused!"
            FROM redrive.retry_messages
            GROUP BY consumer_group
            ORDER BY consumer_group
            "#
        )
        .fetch_all(&mut *tx)
        .await?;
        let paused_topics = sqlx::query_as!(
            PausedTopic,
            r#"
            SELECT consumer_group, topic, paused_at, paused_by, reason
            FROM redrive.paused_topics
            ORDER BY topic, consumer_group
            "#
        )
        .fetch_all(&mut *tx)
        .await?;
        let top_errors = sqlx::query_as!(
            TopError,
            r#"
            SELECT kind, error, count(*) AS "failures!", count(DISTINCT id) AS "rows!",
                   max(at) AS last_at
            FROM redrive.errors
            WHERE at >= now() - make_interval(secs => $1)
            GROUP BY kind, error
            ORDER BY 3 DESC, 5 DESC
            LIMIT $2
            "#,
            window.as_secs_f64(),
            top,
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Status {
            at,
            topics,
            groups,
            paused_topics,
            error_window_seconds: window.as_secs(),
            top_errors,
        })
    }
}
