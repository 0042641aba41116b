//! Estimates for `redrive status` from a random sample of the retry table's pages
//! (`TABLESAMPLE SYSTEM`): each page is read with the same probability, so a count in the sample
//! divided by that probability estimates the count in the table. A table no larger than the
//! sample is read whole, and its "estimates" are exact.
//!
//! The pages are chosen with a fixed seed (`REPEATABLE (0)`), the same for every read: the
//! counts and the errors of one status come from the same pages, which the second read finds in
//! memory, and so do the statuses after it, instead of a new set of random reads each time. On a
//! table that is not changing, repeated statuses show the same estimates.

use super::{GroupStatus, SampleInfo, TopError, TopicCounts, Tx};
use crate::store::{Store, StoreError};
use chrono::{DateTime, Utc};
use sqlx::Connection;
use std::collections::BTreeMap;

/// How much of the table the sample reads.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    /// The share of pages read, in percent (`TABLESAMPLE SYSTEM` takes a `real`).
    percent: f32,
    /// The table's size in pages.
    table_pages: i64,
}

impl Plan {
    /// A sample of about `sample_pages` of a table of `table_pages`.
    pub(super) fn new(table_pages: i64, sample_pages: i64) -> Plan {
        let percent = if table_pages <= sample_pages {
            100.0
        } else {
            (100.0 * sample_pages as f64 / table_pages as f64) as f32
        };
        Plan {
            percent,
            table_pages,
        }
    }

    /// Whether the sample is the whole table, so what it counts is exact.
    pub(super) fn whole(&self) -> bool {
        self.percent >= 100.0
    }

    /// What `n` rows in the sample stand for in the table.
    fn scale(&self, n: i64) -> i64 {
        (n as f64 * 100.0 / f64::from(self.percent)).round() as i64
    }

    pub(super) fn info(&self) -> SampleInfo {
        SampleInfo {
            percent: f64::from(self.percent),
            table_pages: self.table_pages,
        }
    }
}

/// What the sample holds of one (group, topic) pair.
#[derive(Debug, Clone, Copy, Default)]
struct PairCounts {
    pending: i64,
    paused: i64,
    dead: i64,
    replayed: i64,
    waiting: i64,
    due: i64,
    dlq_backlog: i64,
    dlq_refused: i64,
}

/// The sample's counts, by pair.
pub(super) struct Counts {
    by_pair: BTreeMap<(String, String), PairCounts>,
}

impl Counts {
    /// Reads the sample: one pass over the sampled pages.
    async fn read(c: &mut sqlx::PgConnection, plan: Plan) -> Result<Counts, StoreError> {
        let rows = sqlx::query!(
            r#"
            SELECT consumer_group AS "consumer_group!", topic AS "topic!",
                   count(*) FILTER (WHERE state = 'pending') AS "pending!",
                   count(*) FILTER (WHERE state = 'paused') AS "paused!",
                   count(*) FILTER (WHERE state = 'dead') AS "dead!",
                   count(*) FILTER (WHERE state = 'replayed') AS "replayed!",
                   count(*) FILTER (WHERE state = 'waiting') AS "waiting!",
                   count(*) FILTER (WHERE state = 'pending' AND next_attempt_at <= now()) AS "due!",
                   count(*) FILTER (WHERE state = 'dead' AND dlq_published_at IS NULL
                                      AND dlq_refused_at IS NULL) AS "dlq_backlog!",
                   count(*) FILTER (WHERE state = 'dead' AND dlq_refused_at IS NOT NULL)
                       AS "dlq_refused!"
            FROM redrive.retry_messages TABLESAMPLE SYSTEM ($1) REPEATABLE (0)
            GROUP BY consumer_group, topic
            "#,
            plan.percent,
        )
        .fetch_all(c)
        .await?;
        let by_pair = rows
            .into_iter()
            .map(|r| {
                let counts = PairCounts {
                    pending: r.pending,
                    paused: r.paused,
                    dead: r.dead,
                    replayed: r.replayed,
                    waiting: r.waiting,
                    due: r.due,
                    dlq_backlog: r.dlq_backlog,
                    dlq_refused: r.dlq_refused,
                };
                ((r.consumer_group, r.topic), counts)
            })
            .collect();
        Ok(Counts { by_pair })
    }

    /// Every pair the sample saw: all of them when the sample is the whole table.
    pub(super) fn topics(&self, plan: Plan) -> Vec<TopicCounts> {
        self.by_pair
            .keys()
            .map(|(group, topic)| self.pair(group, topic, plan))
            .collect()
    }

    /// The estimated counts of one pair (zero when the sample holds none of its rows).
    pub(super) fn pair(&self, group: &str, topic: &str, plan: Plan) -> TopicCounts {
        let c = self
            .by_pair
            .get(&(group.to_string(), topic.to_string()))
            .copied()
            .unwrap_or_default();
        TopicCounts {
            consumer_group: group.to_string(),
            topic: topic.to_string(),
            pending: plan.scale(c.pending),
            // A row being attempted is `pending` in the table; the caller moves the queue's
            // exact count of them from `pending` to `running`.
            running: 0,
            paused: plan.scale(c.paused),
            dead: plan.scale(c.dead),
            replayed: plan.scale(c.replayed),
            waiting: plan.scale(c.waiting),
            estimated: !plan.whole(),
        }
    }

    /// Replaces each of a group's counts that reached `limit` by the sample's estimate.
    pub(super) fn fill_group(&self, g: &mut GroupStatus, limit: i64, plan: Plan) {
        let mut sum = PairCounts::default();
        for ((group, _), c) in &self.by_pair {
            if *group == g.consumer_group {
                sum.due += c.due;
                sum.dlq_backlog += c.dlq_backlog;
                sum.dlq_refused += c.dlq_refused;
            }
        }
        for (count, sampled) in [
            (&mut g.due, sum.due),
            (&mut g.dlq_backlog, sum.dlq_backlog),
            (&mut g.dlq_refused, sum.dlq_refused),
        ] {
            if *count > limit {
                *count = plan.scale(sampled);
                g.estimated |= !plan.whole();
            }
        }
    }
}

/// The sample, read the first time an estimate needs it, or beside the status's own reads once
/// [`Lazy::read_ahead`] has started it.
pub(super) struct Lazy {
    plan: Plan,
    counts: Option<Counts>,
    ahead: Option<tokio::task::JoinHandle<Result<Counts, StoreError>>>,
}

impl Lazy {
    pub(super) fn new(plan: Plan) -> Lazy {
        Lazy {
            plan,
            counts: None,
            ahead: None,
        }
    }

    /// Starts reading the sample now, on a connection of its own that sees the status's
    /// `snapshot`. The sample is thousands of pages, most of them read from disk when the table
    /// has not been read for a while; read beside the status's index walks, it adds to their time
    /// only what it takes longer than they do.
    ///
    /// A read the status turns out not to need (every count was small enough) is left to finish
    /// rather than cut off: it ends by itself (its lock waits and its connecting are bounded),
    /// and it closes its connection, where a connection dropped in the middle of a transaction is
    /// a line in Postgres's log ("unexpected EOF"), at every read of the row gauges.
    pub(super) fn read_ahead(&mut self, store: &Store, snapshot: String) {
        let (store, plan) = (store.clone(), self.plan);
        self.ahead = Some(tokio::spawn(async move {
            let mut c = store.snapshot_reader(&snapshot).await?;
            let counts = Counts::read(&mut c, plan).await;
            let _ = c.close().await;
            counts
        }));
    }

    pub(super) async fn get(&mut self, tx: &mut Tx<'_>) -> Result<&Counts, StoreError> {
        if self.counts.is_none() {
            let ahead = match self.ahead.take() {
                Some(handle) => match handle.await {
                    Ok(Ok(counts)) => Some(counts),
                    // No connection to spare (the server's limit, say), or a lock the reader
                    // would have waited for behind another's request: the status's own
                    // transaction, which holds that lock, reads the sample.
                    Ok(Err(e)) => {
                        tracing::debug!("the sample could not be read beside the status: {e}");
                        None
                    }
                    Err(e) => {
                        tracing::debug!("the sample's read beside the status ended: {e}");
                        None
                    }
                },
                None => None,
            };
            self.counts = Some(match ahead {
                Some(counts) => counts,
                None => Counts::read(tx, self.plan).await?,
            });
        }
        // Filled just above.
        Ok(self.counts.as_ref().expect("the sample was read"))
    }
}

/// The most frequent errors since `since` among the sampled rows, scaled to the table.
pub(super) async fn top_errors(
    tx: &mut Tx<'_>,
    plan: Plan,
    since: DateTime<Utc>,
    top: i64,
) -> Result<Vec<TopError>, StoreError> {
    let rows = sqlx::query_as!(
        TopError,
        r#"
        SELECT e ->> 'kind' AS kind, e ->> 'error' AS error, count(*) AS "failures!",
               count(DISTINCT r.id) AS "rows!", max((e ->> 'at')::timestamptz) AS last_at
        FROM redrive.retry_messages r TABLESAMPLE SYSTEM ($1) REPEATABLE (0),
             jsonb_array_elements(r.error_history) AS e
        WHERE r.updated_at >= $2
          AND (r.state IN ('pending', 'paused') OR r.dead_at >= $2)
          AND (e ->> 'at')::timestamptz >= $2
        GROUP BY 1, 2
        ORDER BY 3 DESC, 5 DESC
        LIMIT $3
        "#,
        plan.percent,
        since,
        top,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|e| TopError {
            failures: plan.scale(e.failures),
            rows: plan.scale(e.rows),
            ..e
        })
        .collect())
}
