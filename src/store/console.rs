//! What the web console reads and changes beyond what the CLI shares with it: a page of rows under
//! a filter, one row whole, failures and deaths over time, "retry now" and topic pauses with the
//! acting user recorded. Filters go through `redrive.find()`, as bound parameters.

use super::find::Filter;
use super::{Store, StoreError};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// One row of a browse page.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: Uuid,
    pub consumer_group: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// `pending`, `running` (a worker has it), `paused`, `waiting`, `dead` or `replayed`.
    pub state: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub first_failed_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub dead_at: Option<DateTime<Utc>>,
    /// The first 300 characters of the last error.
    pub last_error: Option<String>,
    pub error_kind: Option<String>,
}

/// One row, every column, for the detail page.
#[derive(Debug, Clone)]
pub struct Whole {
    pub id: Uuid,
    pub consumer_group: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub kafka_timestamp: Option<DateTime<Utc>>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// `[{"key": …, "value": <base64> | null}, …]`
    pub headers: serde_json::Value,
    pub state: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub error_kind: Option<String>,
    /// `[{"at", "attempt", "kind", "error"}, …]`, oldest first.
    pub error_history: serde_json::Value,
    pub first_failed_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub dead_at: Option<DateTime<Utc>>,
    pub dlq_topic: Option<String>,
    pub dlq_published_at: Option<DateTime<Utc>>,
    pub dlq_error: Option<String>,
    pub dlq_refused_at: Option<DateTime<Utc>>,
    pub replay_count: i32,
    pub last_replayed_at: Option<DateTime<Utc>>,
    pub last_replayed_by: Option<String>,
    pub last_replay_reason: Option<String>,
    pub replayed_to_topic: Option<String>,
    pub order_on_dead: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub locked_by: Option<String>,
    /// The first delivery's trace context, when traces were exported (schema V15).
    pub trace_context: Option<String>,
}

/// Rows that first failed, and rows that died, in one bucket of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub start: DateTime<Utc>,
    pub failed: i64,
    pub died: i64,
}

/// Failures and deaths over a window.
#[derive(Debug, Clone)]
pub struct Timeline {
    pub buckets: Vec<Bucket>,
    /// Whether the counts were scaled up from a sample of the table's pages.
    pub estimated: bool,
}

impl Store {
    /// Up to `limit` rows in `states` that `filter` matches, newest first (ids are time-ordered),
    /// starting after the row `before` of the previous page.
    ///
    /// Each kind of state is read apart, through what holds its rows, and the newest of each are
    /// merged, so a page costs about what its states' rows cost, never a walk of the whole table:
    /// - dead and replayed rows through `redrive.find`, whose filters have indexes of their own
    ///   (schemas V25 and V26);
    /// - pending rows through the queue, which holds every pending row and nothing else, newest
    ///   first, each looked up by its id; with ids, by them; with a topic, through the source
    ///   key's `(consumer_group, topic)` prefix when the planner judges that cheaper, for each of
    ///   `redrive.consumer_groups()` (schema V28);
    /// - paused rows through their own index, and waiting rows through the key lines' index.
    ///
    /// Live rows have no `dead_at` (the `retry_messages_dead_at` check), so a filter on the time of
    /// death reads none of them. A live row's key has no index: a key's pending rows are found by
    /// reading the pending rows, which is as much as the backlog and no more.
    pub async fn browse(
        &self,
        states: &[String],
        filter: &Filter,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Listed>, StoreError> {
        let (ids, topics, groups, kinds) = filter.arrays();
        let wants = |s: &str| states.iter().any(|x| x == s);
        let finished: Vec<&str> = ["dead", "replayed"]
            .into_iter()
            .filter(|s| wants(s))
            .collect();
        // redrive's sessions plan each statement for its values, so a branch whose flag is false
        // is planned as empty and never runs.
        let rows = sqlx::query_as!(
            Listed,
            r#"
            WITH picked AS (
                (SELECT f.id FROM redrive.find($1, $2, $3, $4, $5, $6, $7, $8, $9) f
                 WHERE cardinality($1::text[]) > 0 AND ($10::uuid IS NULL OR f.id < $10)
                 ORDER BY f.id DESC LIMIT $11)
                UNION ALL
                -- Without ids or a topic: the queue's rows, newest first, each looked up alone
                -- (the fence keeps the planner from walking the whole table's ids instead).
                (SELECT w.id
                 FROM redrive.queue w
                 CROSS JOIN LATERAL (
                     SELECT FROM redrive.find('{pending}', $2, $3, $4, $5, $6, $7, $8, $9) f
                     WHERE f.id = w.id OFFSET 0) m
                 WHERE $12 AND $2::uuid[] IS NULL AND $3::text[] IS NULL
                   AND $8::timestamptz IS NULL AND $9::timestamptz IS NULL
                   AND ($10::uuid IS NULL OR w.id < $10)
                 ORDER BY w.id DESC LIMIT $11)
                UNION ALL
                -- With ids, by their primary key. With a topic, the planner may instead read
                -- the topic's rows by the source key's prefix, for each group (schema V28): the
                -- group condition is always true.
                (SELECT w.id
                 FROM redrive.queue w
                 JOIN redrive.find('{pending}', $2, $3, $4, $5, $6, $7, $8, $9) f ON f.id = w.id
                 WHERE $12 AND ($2::uuid[] IS NOT NULL OR $3::text[] IS NOT NULL)
                   AND $8::timestamptz IS NULL AND $9::timestamptz IS NULL
                   AND ($10::uuid IS NULL OR w.id < $10)
                   AND ($3::text[] IS NULL
                        OR f.consumer_group = ANY (coalesce($4::text[], redrive.consumer_groups())))
                 ORDER BY w.id DESC LIMIT $11)
                UNION ALL
                (SELECT f.id FROM redrive.find('{paused}', $2, $3, $4, $5, $6, $7, $8, $9) f
                 WHERE $13 AND $8::timestamptz IS NULL AND $9::timestamptz IS NULL
                   AND ($10::uuid IS NULL OR f.id < $10)
                 ORDER BY f.id DESC LIMIT $11)
                UNION ALL
                -- A waiting row is always in a key line (I12).
                (SELECT f.id FROM redrive.find('{waiting}', $2, $3, $4, $5, $6, $7, $8, $9) f
                 WHERE $14 AND $8::timestamptz IS NULL AND $9::timestamptz IS NULL
                   AND f.order_key IS NOT NULL AND ($10::uuid IS NULL OR f.id < $10)
                 ORDER BY f.id DESC LIMIT $11)
            )
            SELECT r.id AS "id!", r.consumer_group AS "consumer_group!", r.topic AS "topic!",
                   r."partition" AS "partition!", r.kafka_offset AS "offset!", r.key,
                   CASE WHEN q.state = 'running' THEN 'running' ELSE r.state END AS "state!",
                   r.attempts AS "attempts!", r.max_attempts AS "max_attempts!",
                   r.first_failed_at AS "first_failed_at!",
                   coalesce(q.next_attempt_at, r.next_attempt_at) AS "next_attempt_at!",
                   r.dead_at, left(r.last_error, 300) AS last_error, r.error_kind
            FROM (SELECT p.id FROM picked p ORDER BY p.id DESC LIMIT $11) p
            JOIN redrive.retry_messages r ON r.id = p.id
            LEFT JOIN redrive.queue q ON q.id = r.id
            ORDER BY r.id DESC
            "#,
            &finished as &[&str],
            ids as Option<&[Uuid]>,
            topics as Option<&[String]>,
            groups as Option<&[String]>,
            filter.key,
            filter.error_contains,
            kinds as Option<&[String]>,
            filter.dead_since,
            filter.dead_before,
            before,
            limit,
            wants("pending"),
            wants("paused"),
            wants("waiting"),
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows)
    }

    /// The row `id`, whole, or `None` when there is none.
    pub async fn whole(&self, id: Uuid) -> Result<Option<Whole>, StoreError> {
        let row = sqlx::query_as!(
            Whole,
            r#"
            SELECT r.id, r.consumer_group, r.topic, r."partition", r.kafka_offset AS "offset",
                   r.kafka_timestamp, r.key, r.payload, r.headers,
                   CASE WHEN q.state = 'running' THEN 'running' ELSE r.state END AS "state!",
                   r.attempts, r.max_attempts,
                   coalesce(q.next_attempt_at, r.next_attempt_at) AS "next_attempt_at!",
                   r.last_error, r.error_kind, r.error_history, r.first_failed_at, r.updated_at,
                   r.dead_at, r.dlq_topic, r.dlq_published_at, r.dlq_error, r.dlq_refused_at,
                   r.replay_count, r.last_replayed_at, r.last_replayed_by, r.last_replay_reason,
                   r.replayed_to_topic, r.order_on_dead,
                   q.lease_expires_at AS "lease_expires_at?", q.locked_by AS "locked_by?",
                   r.trace_context
            FROM redrive.retry_messages r
            LEFT JOIN redrive.queue q ON q.id = r.id
            WHERE r.id = $1
            "#,
            id,
        )
        .fetch_optional(self.pool())
        .await?;
        Ok(row)
    }

    /// Rows that first failed and rows that died since `since`, in buckets of `bucket`. A table of
    /// more than `sample_pages` pages is sampled (`TABLESAMPLE SYSTEM`) and the counts scaled up,
    /// so the answer takes about as long at 10M rows as at 100k. The sample's pages are the same on
    /// every refresh (a fixed seed, as `redrive status`'s), so they stay in memory.
    pub async fn timeline(
        &self,
        since: DateTime<Utc>,
        bucket: std::time::Duration,
        sample_pages: i64,
    ) -> Result<Timeline, StoreError> {
        let pages = sqlx::query_scalar!(
            r#"SELECT (pg_relation_size('redrive.retry_messages')
                       / current_setting('block_size')::bigint)::bigint AS "pages!""#
        )
        .fetch_one(self.pool())
        .await?;
        let percent = if pages <= sample_pages {
            100.0
        } else {
            100.0 * sample_pages as f64 / pages as f64
        };
        let rows = sqlx::query!(
            r#"
            WITH s AS (
                SELECT first_failed_at, dead_at FROM redrive.retry_messages
                TABLESAMPLE SYSTEM ($3::real) REPEATABLE (0)
                WHERE first_failed_at >= $1 OR dead_at >= $1
            ), b AS (
                SELECT date_bin(make_interval(secs => $2), first_failed_at, $1) AS start,
                       1 AS failed, 0 AS died
                FROM s WHERE first_failed_at >= $1
                UNION ALL
                SELECT date_bin(make_interval(secs => $2), dead_at, $1), 0, 1
                FROM s WHERE dead_at >= $1
            )
            SELECT start AS "start!", sum(failed)::bigint AS "failed!", sum(died)::bigint AS "died!"
            FROM b GROUP BY start ORDER BY start
            "#,
            since,
            bucket.as_secs_f64(),
            percent as f32,
        )
        .fetch_all(self.pool())
        .await?;
        let scale = |n: i64| (n as f64 * 100.0 / percent).round() as i64;
        Ok(Timeline {
            buckets: rows
                .into_iter()
                .map(|r| Bucket {
                    start: r.start,
                    failed: scale(r.failed),
                    died: scale(r.died),
                })
                .collect(),
            estimated: percent < 100.0,
        })
    }

    /// Makes the pending row `id` due now. False when it is not pending (a worker has it, or it
    /// is paused, waiting, dead or gone).
    pub async fn retry_now(&self, id: Uuid) -> Result<bool, StoreError> {
        let changed = sqlx::query!(
            r#"
            UPDATE redrive.retry_messages r SET next_attempt_at = now(), updated_at = now()
            WHERE r.id = $1 AND r.state = 'pending'
              AND NOT EXISTS (SELECT 1 FROM redrive.queue q WHERE q.id = r.id AND q.state = 'running')
            "#,
            id,
        )
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(changed == 1)
    }

    /// Pauses `topic`'s retries in `group` (`*`: every group), recording `by` as the one who did:
    /// `redrive.pause()`, then its `paused_by` set. Returns the rows that became paused.
    pub async fn pause_topic(
        &self,
        topic: &str,
        group: &str,
        reason: Option<&str>,
        by: &str,
    ) -> Result<i64, StoreError> {
        let mut tx = self.pool().begin().await?;
        let paused = sqlx::query_scalar!(
            r#"SELECT redrive.pause($1, $2, $3) AS "paused!""#,
            topic,
            group,
            reason,
        )
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query!(
            "UPDATE redrive.paused_topics SET paused_by = $3 WHERE topic = $1 AND consumer_group = $2",
            topic,
            group,
            by,
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(paused)
    }

    /// Resumes `topic`'s retries in `group` (`*`: the pause of every group): `redrive.resume()`.
    /// Returns the rows that became pending again.
    pub async fn resume_topic(&self, topic: &str, group: &str) -> Result<i64, StoreError> {
        let resumed = sqlx::query_scalar!(
            r#"SELECT redrive.resume($1, $2) AS "resumed!""#,
            topic,
            group,
        )
        .fetch_one(self.pool())
        .await?;
        Ok(resumed)
    }
}

impl Store {
    /// How many rows in `states` `filter` matches.
    pub async fn count_rows(&self, states: &[String], filter: &Filter) -> Result<i64, StoreError> {
        let (ids, topics, groups, kinds) = filter.arrays();
        // A topic of few rows is read through the source key's prefix, group by group (schema
        // V28); one of many, and no topic, as `redrive.find` reads them.
        let by_groups = match topics {
            Some(topics) => {
                sqlx::query_scalar!(
                    r#"SELECT redrive.few_rows_of($1, $2) AS "few!""#,
                    topics,
                    groups as Option<&[String]>,
                )
                .fetch_one(self.pool())
                .await?
            }
            None => false,
        };
        // With `by_groups` false the condition is planned away (redrive's sessions plan each
        // statement for its values).
        let n = sqlx::query_scalar!(
            r#"
            SELECT count(*) AS "n!" FROM redrive.find($1, $2, $3, $4, $5, $6, $7, $8, $9) f
            WHERE NOT $10::boolean
               OR f.consumer_group = ANY (coalesce($4::text[], redrive.consumer_groups()))
            "#,
            states,
            ids as Option<&[Uuid]>,
            topics as Option<&[String]>,
            groups as Option<&[String]>,
            filter.key,
            filter.error_contains,
            kinds as Option<&[String]>,
            filter.dead_since,
            filter.dead_before,
            by_groups,
        )
        .fetch_one(self.pool())
        .await?;
        Ok(n)
    }
}
