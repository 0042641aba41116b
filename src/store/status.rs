//! What `redrive status` reads: row counts by topic and state, when rows are due, the DLQ outbox
//! backlog, topic pauses and the most frequent recent errors. Read-only, so the read-only role can
//! run it.
//!
//! It must answer in about a second however large the table is, so nothing here scans the whole
//! table unless the table is small or the operator asks for `--exact`:
//! - the (group, topic) pairs are found by skipping through the source-key index, one lookup each;
//! - a pair of at most [`Limits::pair_rows`] rows, due rows, the DLQ backlog and refusals are
//!   counted exactly through indexes, up to their limits;
//! - whatever is larger is estimated from a random sample of the table's pages
//!   (`TABLESAMPLE SYSTEM`), and marked `estimated`;
//! - times (oldest due, next due, oldest unpublished) are always exact: each is one index lookup.

use super::{Store, StoreError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

mod sample;

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
    /// Operators' holds on circuit breakers (I13).
    pub breaker_holds: Vec<super::breakers::Hold>,
    /// The circuit breakers of the processes that reported within the last hour.
    pub breakers: Vec<super::breakers::Reported>,
    /// The window the errors were counted over, in seconds.
    pub error_window_seconds: u64,
    /// The most frequent errors of failed attempts in the window, most frequent first.
    pub top_errors: Vec<TopError>,
    /// Whether `top_errors` was estimated from the sample rather than read from every row.
    pub top_errors_estimated: bool,
    /// The sample the estimates come from; `None` when every number is exact.
    pub sample: Option<SampleInfo>,
    /// The key lines holding rows (I12), those that wait for an operator first, then the longest;
    /// at most [`Limits::key_lines`] of them.
    pub key_lines: Vec<KeyLine>,
    /// How many key lines hold rows in all.
    pub key_lines_total: i64,
}

/// A key whose messages wait behind a row of it (I12): a row of `redrive.key_lines`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeyLine {
    pub consumer_group: String,
    pub topic: String,
    pub partition: i32,
    /// The key as text where it is valid UTF-8; its bytes in hex otherwise.
    pub key: Option<String>,
    /// The row the others wait behind.
    pub head_offset: i64,
    pub head_state: String,
    /// The head is dead and its topic blocks on a dead row: the key waits for a replay or a purge.
    pub needs_operator: bool,
    /// Rows waiting behind the head.
    pub waiting: i64,
}

/// The pages a status read to estimate what was too large to count.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct SampleInfo {
    /// The share of the table's pages read, in percent.
    pub percent: f64,
    /// The table's size in pages when the status was read.
    pub table_pages: i64,
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
    /// Rows parked behind an earlier row of their key (I12).
    pub waiting: i64,
    /// Whether these counts are estimates from the sample.
    pub estimated: bool,
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
    /// Whether any of the three counts is an estimate from the sample (the times never are).
    pub estimated: bool,
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

/// How much a status may read exactly before it estimates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A (group, topic) pair with at most this many rows is counted row by row.
    pub pair_rows: i64,
    /// All pairs counted row by row together read at most this many rows; the smallest go first.
    pub pair_budget: i64,
    /// Due rows, the DLQ backlog and refusals are counted through their indexes up to this many.
    pub index_rows: i64,
    /// The error summary reads every row that can hold an error of the window when there are at
    /// most this many; beyond that it reads the sample's.
    pub error_rows: i64,
    /// How many of the table's pages the sample reads. A table no larger is read whole, exactly.
    pub sample_pages: i64,
    /// How many key lines are listed.
    pub key_lines: i64,
}

impl Limits {
    /// Counting stays well under a second at 10M rows on a small machine.
    pub const DEFAULT: Limits = Limits {
        pair_rows: 10_000,
        pair_budget: 200_000,
        index_rows: 1_000_000,
        error_rows: 100_000,
        sample_pages: 5_000,
        key_lines: 10,
    };

    /// Every number exact: the whole table is read (`redrive status --exact`).
    pub const EXACT: Limits = Limits {
        pair_rows: i64::MAX - 1,
        pair_budget: i64::MAX - 1,
        index_rows: i64::MAX - 1,
        error_rows: i64::MAX - 1,
        sample_pages: i64::MAX,
        key_lines: 10,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

impl Store {
    /// The key lines that hold rows, as `redrive status` lists them: those that wait for an
    /// operator first, then those with the most rows waiting; at most `limit` of them, and how
    /// many there are in all.
    pub async fn key_lines(&self, limit: i64) -> Result<(Vec<KeyLine>, i64), StoreError> {
        let mut c = self.pool().acquire().await?;
        key_lines(&mut c, limit).await
    }

    /// Reads the status; errors are counted over the last `window`, at most `top` of them.
    pub async fn status(
        &self,
        window: Duration,
        top: i64,
        limits: Limits,
    ) -> Result<Status, StoreError> {
        let mut tx = self.pool().begin().await?;
        // One snapshot for every part, so the numbers agree with each other.
        sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        // Its statements are short index walks with costly-looking plans: the pool's sessions
        // compile none (`pool_options`).
        let r = sqlx::query!(
            r#"
            SELECT now() AS "now!",
                   now() - make_interval(secs => $1) AS "since!",
                   (pg_relation_size('redrive.retry_messages')
                    / current_setting('block_size')::bigint)::bigint AS "pages!"
            "#,
            window.as_secs_f64(),
        )
        .fetch_one(&mut *tx)
        .await?;
        let (at, since) = (r.now, r.since);
        let plan = sample::Plan::new(r.pages, limits.sample_pages);
        let mut sampled = sample::Lazy::new(plan);
        if !plan.whole() {
            let snapshot = sqlx::query_scalar!(r#"SELECT pg_export_snapshot() AS "snapshot!""#)
                .fetch_one(&mut *tx)
                .await?;
            sampled.read_ahead(self, snapshot);
        }

        // What only the sample can tell is filled in last, so that its read runs beside these.
        let (mut topics, to_estimate) = if plan.whole() {
            (sampled.get(&mut tx).await?.topics(plan), Vec::new())
        } else {
            topics(&mut tx, limits).await?
        };
        let mut names: Vec<String> = topics
            .iter()
            .map(|t| &t.consumer_group)
            .chain(to_estimate.iter().map(|(group, _)| group))
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        let mut groups = groups(&mut tx, &names, limits.index_rows).await?;

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

        let error_rows = if plan.whole() {
            i64::MAX - 1
        } else {
            limits.error_rows
        };
        let exact_errors = error_candidates(&mut tx, since, error_rows).await? <= error_rows;
        let exact_top_errors = if exact_errors {
            Some(top_errors(&mut tx, since, top).await?)
        } else {
            None
        };
        let (key_lines, key_lines_total) = key_lines(&mut tx, limits.key_lines).await?;

        let limit = limits.index_rows;
        let group_estimated =
            |g: &GroupStatus| g.due > limit || g.dlq_backlog > limit || g.dlq_refused > limit;
        if !to_estimate.is_empty() || !exact_errors || groups.iter().any(group_estimated) {
            let counts = sampled.get(&mut tx).await?;
            for (group, topic) in &to_estimate {
                topics.push(counts.pair(group, topic, plan));
            }
            for g in groups.iter_mut().filter(|g| group_estimated(g)) {
                counts.fill_group(g, limit, plan);
            }
        }
        move_running(&mut tx, &mut topics).await?;
        topics.sort_by(|a, b| (&a.consumer_group, &a.topic).cmp(&(&b.consumer_group, &b.topic)));
        groups.sort_by(|a, b| a.consumer_group.cmp(&b.consumer_group));
        // The sample's pages are in memory by now: its counts were read first.
        let top_errors = match exact_top_errors {
            Some(errors) => errors,
            None => sample::top_errors(&mut tx, plan, since, top).await?,
        };
        tx.commit().await?;
        let (breaker_holds, breakers) = self.breakers().await?;
        let estimated = !exact_errors
            || topics.iter().any(|t| t.estimated)
            || groups.iter().any(|g| g.estimated);
        Ok(Status {
            at,
            topics,
            groups,
            paused_topics,
            breaker_holds,
            breakers,
            error_window_seconds: window.as_secs(),
            top_errors,
            top_errors_estimated: !exact_errors,
            sample: estimated.then(|| plan.info()),
            key_lines,
            key_lines_total,
        })
    }
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Postgres>;

/// The key lines for [`Store::key_lines`]. Each line's head, rows waiting and whether its head is
/// dead come from the lines' index alone, which holds each row's state (schema V22); only the
/// heads listed are read from the table. Through the `redrive.key_lines` view, which reads every
/// line's head, a status at 100,000 lines took 1.5–1.9 s, and 10 s from a cold cache.
async fn key_lines(
    c: &mut sqlx::PgConnection,
    limit: i64,
) -> Result<(Vec<KeyLine>, i64), StoreError> {
    let lines = sqlx::query!(
        r#"
        WITH lines AS (
            SELECT consumer_group, topic, "partition", order_key,
                   count(*) FILTER (WHERE state = 'waiting') AS waiting,
                   min(kafka_offset) AS head_offset,
                   min(kafka_offset) FILTER (WHERE state = 'dead') AS first_dead
            FROM redrive.retry_messages
            WHERE order_key IS NOT NULL
              AND (state IN ('pending', 'paused', 'waiting')
                   OR (state = 'dead' AND order_on_dead = 'block'))
            GROUP BY consumer_group, topic, "partition", order_key
        ), shown AS (
            SELECT l.*, coalesce(l.first_dead = l.head_offset, false) AS needs_operator,
                   count(*) OVER () AS total
            FROM lines l
            ORDER BY needs_operator DESC, waiting DESC, consumer_group, topic, "partition",
                     head_offset
            LIMIT $1
        )
        SELECT s.consumer_group AS "consumer_group!", s.topic AS "topic!",
               s."partition" AS "partition!",
               coalesce(redrive.utf8_or_null(h.key), encode(h.key, 'hex')) AS key_shown,
               s.head_offset AS "head_offset!", h.state AS "head_state!",
               s.needs_operator AS "needs_operator!", s.waiting AS "waiting!",
               s.total AS "total!"
        FROM shown s
        CROSS JOIN LATERAL (
            SELECT r.key, r.state
            FROM redrive.retry_messages r
            WHERE r.consumer_group = s.consumer_group COLLATE "C" AND r.topic = s.topic
              AND r."partition" = s."partition" AND r.order_key = s.order_key
              AND r.kafka_offset = s.head_offset
              AND (r.state IN ('pending', 'paused', 'waiting')
                   OR (r.state = 'dead' AND r.order_on_dead = 'block'))
            LIMIT 1
        ) h
        ORDER BY s.needs_operator DESC, s.waiting DESC, s.consumer_group, s.topic, s."partition",
                 s.head_offset
        "#,
        limit,
    )
    .fetch_all(c)
    .await?;
    let total = lines.first().map_or(0, |l| l.total);
    let lines = lines
        .into_iter()
        .map(|l| KeyLine {
            consumer_group: l.consumer_group,
            topic: l.topic,
            partition: l.partition,
            key: l.key_shown,
            head_offset: l.head_offset,
            head_state: l.head_state,
            needs_operator: l.needs_operator,
            waiting: l.waiting,
        })
        .collect();
    Ok((lines, total))
}

/// Row counts by pair: small pairs row by row; the others, as (group, topic), are left for the
/// sample.
async fn topics(
    tx: &mut Tx<'_>,
    limits: Limits,
) -> Result<(Vec<TopicCounts>, Vec<(String, String)>), StoreError> {
    // Every pair, with its row count up to one past the limit, through the source-key index.
    let pairs = sqlx::query!(
        r#"
        WITH RECURSIVE pairs AS (
            (SELECT consumer_group, topic FROM redrive.retry_messages
             ORDER BY consumer_group, topic LIMIT 1)
            UNION ALL
            SELECT n.consumer_group, n.topic
            FROM pairs p, LATERAL (
                SELECT r.consumer_group, r.topic FROM redrive.retry_messages r
                WHERE (r.consumer_group, r.topic) > (p.consumer_group, p.topic)
                ORDER BY r.consumer_group, r.topic LIMIT 1) n
        )
        SELECT p.consumer_group AS "consumer_group!", p.topic AS "topic!",
               (SELECT count(*) FROM (
                    SELECT 1 FROM redrive.retry_messages r
                    WHERE r.consumer_group = p.consumer_group AND r.topic = p.topic
                    LIMIT $1) x) AS "rows!"
        FROM pairs p
        "#,
        limits.pair_rows + 1,
    )
    .fetch_all(&mut **tx)
    .await?;
    // The smallest pairs are counted row by row while the budget lasts.
    let mut small: Vec<_> = pairs
        .iter()
        .filter(|p| p.rows <= limits.pair_rows)
        .collect();
    small.sort_by_key(|p| p.rows);
    let mut spent = 0;
    small.retain(|p| {
        spent += p.rows;
        spent <= limits.pair_budget
    });
    // The ORDER BY and LIMIT (which cuts nothing: each pair is within the limit) steer the planner
    // to the source-key index; it would otherwise expect half the table per pair and scan it.
    let groups: Vec<String> = small.iter().map(|p| p.consumer_group.clone()).collect();
    let topics: Vec<String> = small.iter().map(|p| p.topic.clone()).collect();
    let mut exact: HashMap<(String, String), TopicCounts> = sqlx::query_as!(
        TopicCounts,
        r#"
        SELECT p.consumer_group AS "consumer_group!", p.topic AS "topic!",
               c.pending AS "pending!", c.running AS "running!", c.paused AS "paused!",
               c.dead AS "dead!", c.replayed AS "replayed!", c.waiting AS "waiting!",
               false AS "estimated!"
        FROM unnest($1::text[], $2::text[]) AS p(consumer_group, topic),
             LATERAL (
                 SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
                        count(*) FILTER (WHERE state = 'running') AS running,
                        count(*) FILTER (WHERE state = 'paused') AS paused,
                        count(*) FILTER (WHERE state = 'dead') AS dead,
                        count(*) FILTER (WHERE state = 'replayed') AS replayed,
                        count(*) FILTER (WHERE state = 'waiting') AS waiting
                 FROM (SELECT state FROM redrive.retry_messages r
                       WHERE r.consumer_group = p.consumer_group AND r.topic = p.topic
                       ORDER BY r.consumer_group, r.topic, r."partition", r.kafka_offset
                       LIMIT $3) x) c
        "#,
        &groups,
        &topics,
        limits.pair_rows + 1,
    )
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .map(|c| ((c.consumer_group.clone(), c.topic.clone()), c))
    .collect();
    let (mut counted, mut left) = (Vec::with_capacity(exact.len()), Vec::new());
    for p in pairs {
        let key = (p.consumer_group, p.topic);
        match exact.remove(&key) {
            Some(c) => counted.push(c),
            None => left.push(key),
        }
    }
    Ok((counted, left))
}

/// Moves the rows being attempted from `pending`, where the table counts them, to `running`:
/// the queue knows them exactly, and there are never more than the workers' claims.
async fn move_running(tx: &mut Tx<'_>, topics: &mut [TopicCounts]) -> Result<(), StoreError> {
    let running = sqlx::query!(
        r#"
        SELECT r.consumer_group AS "consumer_group!", r.topic AS "topic!", count(*) AS "running!"
        FROM redrive.queue q JOIN redrive.retry_messages r ON r.id = q.id
        WHERE q.state = 'running'
        GROUP BY 1, 2
        "#
    )
    .fetch_all(&mut **tx)
    .await?;
    // Every pair with a running row is in `topics`: its rows are in the table read in this snapshot.
    for r in running {
        let pair = topics
            .iter_mut()
            .find(|t| t.consumer_group == r.consumer_group && t.topic == r.topic);
        if let Some(t) = pair {
            t.running = r.running;
            t.pending = (t.pending - r.running).max(0);
        }
    }
    Ok(())
}

/// Each group's times, and its counts through the indexes up to one past `limit` (a count past
/// it is then estimated from the sample).
async fn groups(
    tx: &mut Tx<'_>,
    names: &[String],
    limit: i64,
) -> Result<Vec<GroupStatus>, StoreError> {
    let rows = sqlx::query_as!(
        GroupStatus,
        r#"
        SELECT g AS "consumer_group!",
               (SELECT count(*) FROM (
                    SELECT 1 FROM redrive.queue
                    WHERE state = 'pending' AND consumer_group = g AND next_attempt_at <= now()
                    LIMIT $2) x) AS "due!",
               (SELECT min(next_attempt_at) FROM redrive.queue
                WHERE state = 'pending' AND consumer_group = g AND next_attempt_at <= now())
                   AS oldest_due_at,
               (SELECT min(next_attempt_at) FROM redrive.queue
                WHERE state = 'pending' AND consumer_group = g AND next_attempt_at > now())
                   AS next_due_at,
               -- The outbox through its own index alone (`retry_messages_unpublished`, schema V30).
               (SELECT count(*) FROM (
                    SELECT 1 FROM redrive.retry_messages
                    WHERE state = 'dead' COLLATE "C" AND dlq_published_at IS NULL AND dlq_refused_at IS NULL
                      AND consumer_group = g
                    LIMIT $2) x) AS "dlq_backlog!",
               (SELECT min(dead_at) FROM redrive.retry_messages
                WHERE state = 'dead' COLLATE "C" AND dlq_published_at IS NULL AND dlq_refused_at IS NULL
                  AND consumer_group = g) AS dlq_oldest_dead_at,
               (SELECT count(*) FROM (
                    SELECT 1 FROM redrive.retry_messages
                    WHERE state = 'dead' AND dlq_refused_at IS NOT NULL AND consumer_group = g
                    LIMIT $2) x) AS "dlq_refused!",
               false AS "estimated!"
        FROM unnest($1::text[]) AS g
        "#,
        names,
        limit + 1,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows)
}

/// How many rows can hold an error of the window, up to one past `limit`: every row not finished,
/// and the rows that finished within it (a row's attempts all come before it dies).
async fn error_candidates(
    tx: &mut Tx<'_>,
    since: DateTime<Utc>,
    limit: i64,
) -> Result<i64, StoreError> {
    // One branch per state, so each reads its own partial index.
    let n = sqlx::query_scalar!(
        r#"
        SELECT count(*) AS "n!" FROM (
            SELECT 1 FROM redrive.queue
            UNION ALL
            SELECT 1 FROM redrive.retry_messages WHERE state = 'paused'
            UNION ALL
            SELECT 1 FROM redrive.retry_messages
            WHERE state IN ('dead', 'replayed') AND dead_at >= $1
            LIMIT $2) x
        "#,
        since,
        limit + 1,
    )
    .fetch_one(&mut **tx)
    .await?;
    Ok(n)
}

/// The most frequent errors since `since`, read from every row that can hold one.
async fn top_errors(
    tx: &mut Tx<'_>,
    since: DateTime<Utc>,
    top: i64,
) -> Result<Vec<TopError>, StoreError> {
    // `updated_at` moves with every failed attempt, so older rows are skipped before their
    // history is parsed.
    let rows = sqlx::query_as!(
        TopError,
        r#"
        WITH candidates AS (
            SELECT r.id, r.error_history FROM redrive.queue q
            JOIN redrive.retry_messages r ON r.id = q.id
            WHERE r.updated_at >= $1
            UNION ALL
            SELECT id, error_history FROM redrive.retry_messages
            WHERE state = 'paused' AND updated_at >= $1
            UNION ALL
            SELECT id, error_history FROM redrive.retry_messages
            WHERE state IN ('dead', 'replayed') AND dead_at >= $1
        )
        SELECT e ->> 'kind' AS kind, e ->> 'error' AS error, count(*) AS "failures!",
               count(DISTINCT c.id) AS "rows!", max((e ->> 'at')::timestamptz) AS last_at
        FROM candidates c, jsonb_array_elements(c.error_history) AS e
        WHERE (e ->> 'at')::timestamptz >= $1
        GROUP BY 1, 2
        ORDER BY 3 DESC, 5 DESC
        LIMIT $2
        "#,
        since,
        top,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows)
}
