//! The row filters that `redrive replay` and `redrive purge` share, evaluated by the
//! `redrive.find()` SQL function that operators also call by hand. Every filter is a bound
//! parameter compared as a value, so a hostile filter string can only fail to match.
//!
//! A command's chunks and its dry run's sample are the oldest matches, taken by
//! `redrive.find_oldest()` (schema V25). It reads the rows of the key (V26), topics, groups or
//! error kinds (V29) a filter names through their own index, in order, so a chunk reads about as
//! many rows as it returns even when the matches are the table's newest deaths.

use super::{Store, StoreError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

/// Which rows an operator command applies to. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only these rows.
    pub ids: Vec<Uuid>,
    /// Only rows of these source topics.
    pub topics: Vec<String>,
    /// Only rows of these consumer groups.
    pub consumer_groups: Vec<String>,
    /// Only rows whose key is these UTF-8 bytes.
    pub key: Option<String>,
    /// Only rows whose last error contains this text, ignoring case.
    pub error_contains: Option<String>,
    /// Only rows whose `error_kind` is one of these.
    pub error_kinds: Vec<String>,
    /// Only rows that died at or after this time.
    pub dead_since: Option<DateTime<Utc>>,
    /// Only rows that died before this time.
    pub dead_before: Option<DateTime<Utc>>,
}

impl Filter {
    /// Whether no filter is set, so every row of the states would match.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.topics.is_empty()
            && self.consumer_groups.is_empty()
            && self.key.is_none()
            && self.error_contains.is_none()
            && self.error_kinds.is_empty()
            && self.dead_since.is_none()
            && self.dead_before.is_none()
    }

    /// Narrows the filter to rows that died at or after `last_dead_at`, the death time of the
    /// newest row a command's chunk took. A chunk takes the oldest matches first, so every match
    /// that died before it was taken by that chunk or one before it, and left the scope (replayed,
    /// marked replayed or deleted): the next chunk's walk starts there instead of passing their
    /// index entries, and the rows before them, again. A row that becomes eligible behind that
    /// point meanwhile (a dead row the DLQ broker acknowledges during a purge that leaves out
    /// unacknowledged ones) is left to the next command.
    pub fn start_at(&mut self, last_dead_at: Option<DateTime<Utc>>) {
        if let Some(t) = last_dead_at {
            self.dead_since = Some(self.dead_since.map_or(t, |since| since.max(t)));
        }
    }

    /// The list filters as SQL arrays: NULL (match all) when empty.
    pub(super) fn arrays(&self) -> Arrays<'_> {
        fn some<T>(v: &[T]) -> Option<&[T]> {
            (!v.is_empty()).then_some(v)
        }
        (
            some(&self.ids),
            some(&self.topics),
            some(&self.consumer_groups),
            some(&self.error_kinds),
        )
    }
}

/// ids, topics, consumer groups and error kinds, each `None` when it matches everything.
pub(super) type Arrays<'a> = (
    Option<&'a [Uuid]>,
    Option<&'a [String]>,
    Option<&'a [String]>,
    Option<&'a [String]>,
);

/// The row states a command looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `replay`: dead rows.
    Dead,
    /// `purge`: dead rows, and replayed ones (dead rows already produced back to Kafka).
    Finished,
}

impl Scope {
    pub(super) fn states(self) -> Vec<String> {
        match self {
            Scope::Dead => vec!["dead".into()],
            Scope::Finished => vec!["dead".into(), "replayed".into()],
        }
    }
}

/// How many rows a filter matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Matched {
    /// Rows the command would act on.
    pub eligible: i64,
    /// Matching dead rows held back because the DLQ broker has not acknowledged them yet
    /// (purge only, unless told to include them).
    pub unpublished: i64,
}

/// One row of a dry run's sample.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub id: Uuid,
    pub consumer_group: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub state: String,
    /// The key as text, when it is valid UTF-8.
    pub key: Option<String>,
    pub attempts: i32,
    pub dead_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// A row named by `--id` that the command did not act on, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub id: Uuid,
    /// The row's state, or `None` when there is no such row.
    pub state: Option<String>,
}

impl Store {
    /// Counts the rows `filter` matches in `scope`. `with_unpublished`: whether dead rows not yet
    /// acknowledged by the DLQ broker are eligible.
    pub async fn count_matching(
        &self,
        scope: Scope,
        filter: &Filter,
        with_unpublished: bool,
    ) -> Result<Matched, StoreError> {
        let (ids, topics, groups, kinds) = filter.arrays();
        let r = sqlx::query!(
            r#"
            SELECT count(*) FILTER (WHERE $9 OR f.state <> 'dead' OR f.dlq_published_at IS NOT NULL) AS "eligible!",
                   count(*) FILTER (WHERE NOT ($9 OR f.state <> 'dead' OR f.dlq_published_at IS NOT NULL)) AS "unpublished!"
            FROM redrive.find($1, $2, $3, $4, $5, $6, $10, $7, $8) f
            "#,
            &scope.states(),
            ids as Option<&[Uuid]>,
            topics as Option<&[String]>,
            groups as Option<&[String]>,
            filter.key,
            filter.error_contains,
            filter.dead_since,
            filter.dead_before,
            with_unpublished,
            kinds as Option<&[String]>,
        )
        .fetch_one(self.pool())
        .await?;
        Ok(Matched {
            eligible: r.eligible,
            unpublished: r.unpublished,
        })
    }

    /// Up to `limit` of the eligible rows, oldest death first: what a dry run shows.
    pub async fn sample_matching(
        &self,
        scope: Scope,
        filter: &Filter,
        with_unpublished: bool,
        limit: i64,
    ) -> Result<Vec<Sample>, StoreError> {
        let (ids, topics, groups, kinds) = filter.arrays();
        let rows = sqlx::query_as!(
            Sample,
            r#"
            SELECT f.id AS "id!", f.consumer_group AS "consumer_group!", f.topic AS "topic!",
                   f."partition" AS "partition!", f.kafka_offset AS "offset!", f.state AS "state!",
                   redrive.utf8_or_null(f.key) AS key, f.attempts AS "attempts!", f.dead_at,
                   f.last_error
            FROM redrive.find_oldest($1, $2, $3, $4, $5, $6, $11, $7, $8, $9, $10) f
            ORDER BY f.dead_at, f.id
            "#,
            &scope.states(),
            ids as Option<&[Uuid]>,
            topics as Option<&[String]>,
            groups as Option<&[String]>,
            filter.key,
            filter.error_contains,
            filter.dead_since,
            filter.dead_before,
            with_unpublished,
            limit,
            kinds as Option<&[String]>,
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows)
    }

    /// The ids of the next `limit` eligible rows, oldest death first: one chunk of a command; and
    /// the death time of the newest of them, where the next chunk starts ([`Filter::start_at`]).
    pub(super) async fn next_chunk<'c>(
        &self,
        conn: impl sqlx::PgExecutor<'c>,
        scope: Scope,
        filter: &Filter,
        with_unpublished: bool,
        limit: i64,
    ) -> Result<(Vec<Uuid>, Option<DateTime<Utc>>), StoreError> {
        let (ids, topics, groups, kinds) = filter.arrays();
        let rows = sqlx::query!(
            r#"
            SELECT f.id AS "id!", f.dead_at
            FROM redrive.find_oldest($1, $2, $3, $4, $5, $6, $11, $7, $8, $9, $10) f
            ORDER BY f.dead_at, f.id
            "#,
            &scope.states(),
            ids as Option<&[Uuid]>,
            topics as Option<&[String]>,
            groups as Option<&[String]>,
            filter.key,
            filter.error_contains,
            filter.dead_since,
            filter.dead_before,
            with_unpublished,
            limit,
            kinds as Option<&[String]>,
        )
        .fetch_all(conn)
        .await?;
        let last_dead_at = rows.last().and_then(|r| r.dead_at);
        Ok((rows.into_iter().map(|r| r.id).collect(), last_dead_at))
    }

    /// Of `ids`, those not in `scope`'s states (or not in the table), with their state (`running`
    /// for a row being attempted): the rows a command names but must leave alone.
    pub async fn outside_scope(
        &self,
        scope: Scope,
        ids: &[Uuid],
    ) -> Result<Vec<Skipped>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query_as!(
            Skipped,
            r#"
            SELECT i.id AS "id!", coalesce(q.state, r.state) AS "state?"
            FROM unnest($1::uuid[]) AS i(id)
            LEFT JOIN redrive.retry_messages r ON r.id = i.id
            LEFT JOIN redrive.queue q ON q.id = i.id
            WHERE r.state IS NULL OR NOT r.state = ANY ($2)
            ORDER BY i.id
            "#,
            ids,
            &scope.states(),
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows)
    }
}
