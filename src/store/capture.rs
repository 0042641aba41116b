//! Capture: failed messages become rows, many per statement.
//!
//! The insert is idempotent on `(consumer_group, topic, partition, kafka_offset)` (I2): a message
//! that Kafka redelivers after a crash finds its row already there and adds nothing. Only after
//! this statement commits may the consumer store the messages' offsets (I1).
//!
//! A message of a topic that keeps key order carries its [`Line`]: the statement that stores it
//! decides, under the line's lock, whether it waits behind an earlier row of its key (I12).

use super::{Store, StoreError};
use crate::handler::HandlerError;
use crate::message::{HeadersJson, Message};
use chrono::{DateTime, Utc};
use std::time::Duration;
use uuid::Uuid;

/// Where a captured row starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialState {
    /// Retry at `next_attempt_at`.
    Pending,
    /// Out of attempts already, or a permanent error: straight to the DLQ outbox.
    Dead,
    /// Not delivered, because an earlier message of its key has a row (I12): it waits in its
    /// [`Line`], without an attempt or an error. Should the line be empty by the time the row is
    /// stored, it is not stored at all, and the capture says it is open.
    Parked,
}

impl InitialState {
    /// The value sent to the capture statements (`waiting` for a parked row).
    pub fn as_str(self) -> &'static str {
        match self {
            InitialState::Pending => "pending",
            InitialState::Dead => "dead",
            InitialState::Parked => "waiting",
        }
    }
}

/// What a dead row does to the rows behind it in its key's line.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum OnDead {
    /// The line waits for an operator: replaying the dead row, or purging it, lets it go on.
    #[default]
    Block,
    /// The next row of the line goes on.
    Skip,
}

impl OnDead {
    /// The value stored in the `order_on_dead` column.
    pub fn as_str(self) -> &'static str {
        match self {
            OnDead::Block => "block",
            OnDead::Skip => "skip",
        }
    }
}

/// A row's key line (I12): the rows of one key of one partition, attempted one at a time in
/// offset order. Stored as `order_key`, the key's SHA-256, so a key of any size has a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Line {
    /// SHA-256 of the Kafka key.
    pub key: [u8; 32],
    /// What a dead row of this line does to the rows behind it.
    pub on_dead: OnDead,
}

impl Line {
    /// The line of a message with this key.
    pub fn of(key: &[u8], on_dead: OnDead) -> Self {
        use sha2::Digest;
        Line {
            key: sha2::Sha256::digest(key).into(),
            on_dead,
        }
    }
}

/// What a capture statement did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Captured {
    /// Rows that were new.
    pub inserted: u64,
    /// Parked messages (topic, partition, offset) that found their key's line empty, so were not
    /// stored: no earlier message of their key has a row, and they are to be delivered.
    pub open: Vec<(String, i32, i64)>,
}

impl std::ops::AddAssign for Captured {
    fn add_assign(&mut self, other: Captured) {
        self.inserted += other.inserted;
        self.open.extend(other.open);
    }
}

/// A failed first delivery, ready to be stored.
#[derive(Debug, Clone)]
pub struct Capture {
    /// The message, byte for byte.
    pub message: Message,
    /// Pending or dead.
    pub state: InitialState,
    /// The policy's attempt budget for this topic.
    pub max_attempts: i32,
    /// How long after the capture commits the first retry is due (ignored for dead rows). The
    /// database adds it to its own `now()`, so a worker's clock never decides a due time (I11).
    pub retry_in: Duration,
    /// Why the first delivery failed (not stored for a parked row).
    pub error: HandlerError,
    /// The key's line, for a topic that keeps key order and a message with a key.
    pub line: Option<Line>,
    /// The trace context of the span that handled the first delivery, when traces are exported:
    /// its `traceparent`, and its `tracestate` after a newline when there is one. Each retry's span
    /// and the DLQ publish are its children (schema V15).
    pub trace: Option<String>,
}

impl Store {
    /// Inserts the batch in one statement; rows that already exist are left as they are (I2).
    /// Returns how many rows were new.
    ///
    /// A message whose coordinates are taken by a row of a *different* message (the topic was
    /// deleted and recreated, or its log truncated, so offsets were reused) is not a redelivery: it
    /// is captured too, as the next `incarnation` of those coordinates, so it is never lost.
    pub async fn capture(&self, group: &str, batch: &[Capture]) -> Result<u64, StoreError> {
        Ok(self.capture_rows(group, batch).await?.inserted)
    }

    /// [`Store::capture`], saying also which parked messages found their line empty (I12).
    pub async fn capture_rows(
        &self,
        group: &str,
        batch: &[Capture],
    ) -> Result<Captured, StoreError> {
        if batch
            .iter()
            .any(|c| c.line.is_some() || c.state == InitialState::Parked)
        {
            return self.capture_in_lines(group, batch).await;
        }
        self.capture_plain(group, batch)
            .await
            .map(|inserted| Captured {
                inserted,
                open: Vec::new(),
            })
    }

    /// [`Store::capture`] of a batch without key lines.
    async fn capture_plain(&self, group: &str, batch: &[Capture]) -> Result<u64, StoreError> {
        let rows: Vec<&Capture> = batch.iter().collect();
        let c = Columns::of(&rows);
        // Nearly always every row is new: a plain INSERT costs Postgres a fifth less than one
        // with ON CONFLICT. Only a redelivery (after a crash or a rebalance) makes it fail, and
        // the batch then goes through the statement that sorts the new rows from the known ones.
        match self.insert_new(group, &c).await {
            Err(StoreError::Sql(e)) if is_source_key_violation(&e) => {}
            done => return done,
        }
        let inserted = sqlx::query_scalar!(
            r#"
            INSERT INTO redrive.retry_messages (
                id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp, key, payload,
                headers, state, attempts, max_attempts, next_attempt_at, last_error, error_kind,
                error_history, first_failed_at, updated_at, dead_at, trace_context)
            SELECT t.id, $1, t.topic, t.part, t.off, t.ts, t.key, t.payload,
                   t.headers, t.state, 1, t.max_attempts, now() + make_interval(secs => t.retry_in),
                   t.err, t.kind,
                   to_jsonb(ARRAY[ROW(now(), 1, t.kind, t.err)::redrive.history_entry]),
                   now(), now(), CASE WHEN t.state = 'dead' THEN now() END, t.trace
            FROM UNNEST($2::uuid[], $3::text[], $4::int4[], $5::int8[], $6::timestamptz[],
                        $7::bytea[], $8::bytea[], $9::jsonb[], $10::text[], $11::int4[],
                        $12::float8[], $13::text[], $14::text[], $15::text[])
                 AS t(id, topic, part, off, ts, key, payload, headers, state, max_attempts,
                      retry_in, err, kind, trace)
            ON CONFLICT (consumer_group, topic, "partition", kafka_offset, incarnation) DO NOTHING
            RETURNING id
            "#,
            group,
            &c.ids,
            &c.topics as &[&str],
            &c.partitions,
            &c.offsets,
            // The casts let the macro accept NULL elements (a record without key or value).
            &c.timestamps as &[Option<DateTime<Utc>>],
            &c.keys as &[Option<&[u8]>],
            &c.payloads as &[Option<&[u8]>],
            &c.headers as &[sqlx::types::Json<HeadersJson<'_>>],
            &c.states as &[&str],
            &c.max_attempts,
            &c.retry_in,
            &c.errors,
            &c.kinds as &[&str],
            &c.traces as &[Option<&str>],
        )
        .fetch_all(self.pool())
        .await?;
        if inserted.len() == batch.len() {
            return Ok(inserted.len() as u64);
        }
        let taken: Vec<&Capture> = rows
            .into_iter()
            .zip(&c.ids)
            .filter(|(_, id)| !inserted.contains(id))
            .map(|(row, _)| row)
            .collect();
        let reused = self.capture_reused(group, &taken).await?;
        Ok((inserted.len() + reused) as u64)
    }

    /// The batch of [`Store::capture`] when rows of it have key lines (I12), in one statement
    /// (`redrive.capture_in_lines`): the lines' locks first, then a statement that sees every
    /// line as its last writer left it. A row waits when its line already holds a row (one that
    /// is pending, paused, waiting, or dead with the `block` policy), or an earlier row of the
    /// batch, not itself parked, that will hold it; a dead row stays dead in its place, never
    /// attempted. A parked row whose line turns out empty is not stored: it is
    /// [`Captured::open`], and its message is the caller's to deliver, in order, as the line has
    /// no row left.
    async fn capture_in_lines(
        &self,
        group: &str,
        batch: &[Capture],
    ) -> Result<Captured, StoreError> {
        let rows: Vec<&Capture> = batch.iter().collect();
        let c = Columns::of(&rows);
        let e = Entries::of(&c);
        let lines: Vec<Option<&[u8]>> = rows
            .iter()
            .map(|r| r.line.as_ref().map(|l| &l.key[..]))
            .collect();
        let on_dead: Vec<Option<&str>> = rows
            .iter()
            .map(|r| r.line.map(|l| l.on_dead.as_str()))
            .collect();
        // One statement (schema V21): the lines' locks, then the capture, planned once per
        // connection.
        let outcomes = sqlx::query!(
            r#"
            SELECT captured_id AS "id!", line_open AS "open!"
            FROM redrive.capture_in_lines($1, $2::uuid[], $3::text[], $4::int4[], $5::int8[],
                                          $6::timestamptz[], $7::bytea[], $8::bytea[], $9::jsonb[],
                                          $10::text[], $11::int4[], $12::float8[], $13::text[],
                                          $14::text[], $15::bytea[], $16::text[], $17::text[],
                                          $18::text[], $19::text[], $20::int4[])
            "#,
            group,
            &c.ids,
            &c.topics as &[&str],
            &c.partitions,
            &c.offsets,
            &c.timestamps as &[Option<DateTime<Utc>>],
            &c.keys as &[Option<&[u8]>],
            &c.payloads as &[Option<&[u8]>],
            &c.headers as &[sqlx::types::Json<HeadersJson<'_>>],
            &c.states as &[&str],
            &c.max_attempts,
            &c.retry_in,
            &c.errors,
            &c.kinds as &[&str],
            &lines as &[Option<&[u8]>],
            &on_dead as &[Option<&str>],
            &c.traces as &[Option<&str>],
            &e.kinds as &[&str],
            &e.errors as &[&str],
            &e.of_row,
        )
        .fetch_all(self.pool())
        .await?;
        let mut captured = Captured::default();
        // The parked rows' messages by id, made only when some came back open.
        let mut by_id = None;
        for o in &outcomes {
            if o.open {
                let by_id = by_id.get_or_insert_with(|| {
                    c.ids
                        .iter()
                        .zip(&rows)
                        .collect::<std::collections::HashMap<_, _>>()
                });
                let m = &by_id[&o.id].message;
                captured.open.push((m.topic.clone(), m.partition, m.offset));
            } else {
                captured.inserted += 1;
            }
        }
        if outcomes.len() == batch.len() {
            return Ok(captured);
        }
        // Offsets that already have rows: redeliveries add nothing. A different message at a
        // reused offset is kept as a new incarnation, outside any line (its offsets no longer
        // say where it stands in one).
        let answered: std::collections::HashSet<Uuid> = outcomes.iter().map(|o| o.id).collect();
        let taken: Vec<Capture> = rows
            .into_iter()
            .zip(&c.ids)
            .filter(|(_, id)| !answered.contains(id))
            .map(|(row, _)| Capture {
                state: match row.state {
                    InitialState::Parked => InitialState::Pending,
                    s => s,
                },
                line: None,
                ..row.clone()
            })
            .collect();
        let taken: Vec<&Capture> = taken.iter().collect();
        captured.inserted += self.capture_reused(group, &taken).await? as u64;
        Ok(captured)
    }

    /// The lines of a partition that hold a row (I12): each one's Kafka key (from a row that
    /// has it; a row kept in its safe form has none) and its [`Line::key`]. A message of one of
    /// them must wait behind that row. Read when the consumer is assigned the partition, before it
    /// delivers any of its messages. The group is compared under the "C" collation, as the lines'
    /// index holds it (schema V22), so that index alone can answer.
    pub async fn lines_of(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
    ) -> Result<Vec<(Option<Vec<u8>>, [u8; 32])>, StoreError> {
        let lines = sqlx::query!(
            r#"
            SELECT order_key AS "line!", (array_agg(key) FILTER (WHERE key IS NOT NULL))[1] AS key
            FROM redrive.retry_messages
            WHERE consumer_group = $1 COLLATE "C" AND topic = $2 AND "partition" = $3
              AND order_key IS NOT NULL
              AND (state IN ('pending', 'paused', 'waiting')
                   OR (state = 'dead' AND order_on_dead = 'block'))
            GROUP BY order_key
            "#,
            group,
            topic,
            partition,
        )
        .fetch_all(self.pool())
        .await?;
        Ok(lines
            .into_iter()
            .filter_map(|l| Some((l.key, <[u8; 32]>::try_from(l.line.as_slice()).ok()?)))
            .collect())
    }

    /// Inserts every row of the batch, or none: fails on the source key when any row exists.
    /// The error history's first entry is `to_jsonb` of a `redrive.history_entry` (schema V10):
    /// `jsonb_build_object` looked up the type of each of its arguments on every row. It is made
    /// once per distinct error of the batch, in an init plan, and each row takes its own by its
    /// place (see [`Entries`]): made for every row, it cost a tenth of the statement.
    async fn insert_new(&self, group: &str, c: &Columns<'_>) -> Result<u64, StoreError> {
        let e = Entries::of(c);
        let inserted = sqlx::query!(
            r#"
            INSERT INTO redrive.retry_messages (
                id, consumer_group, topic, "partition", kafka_offset, kafka_timestamp, key, payload,
                headers, state, attempts, max_attempts, next_attempt_at, last_error, error_kind,
                error_history, first_failed_at, updated_at, dead_at, trace_context)
            SELECT t.id, $1, t.topic, t.part, t.off, t.ts, t.key, t.payload,
                   t.headers, t.state, 1, t.max_attempts, now() + make_interval(secs => t.retry_in),
                   t.err, t.kind,
                   (SELECT array_agg(to_jsonb(ARRAY[ROW(now(), 1, e.kind, e.err)::redrive.history_entry])
                                     ORDER BY e.n)
                    FROM UNNEST($16::text[], $17::text[]) WITH ORDINALITY AS e(kind, err, n))[t.entry],
                   now(), now(), CASE WHEN t.state = 'dead' THEN now() END, t.trace
            FROM UNNEST($2::uuid[], $3::text[], $4::int4[], $5::int8[], $6::timestamptz[],
                        $7::bytea[], $8::bytea[], $9::jsonb[], $10::text[], $11::int4[],
                        $12::float8[], $13::text[], $14::text[], $15::text[], $18::int4[])
                 AS t(id, topic, part, off, ts, key, payload, headers, state, max_attempts,
                      retry_in, err, kind, trace, entry)
            "#,
            group,
            &c.ids,
            &c.topics as &[&str],
            &c.partitions,
            &c.offsets,
            &c.timestamps as &[Option<DateTime<Utc>>],
            &c.keys as &[Option<&[u8]>],
            &c.payloads as &[Option<&[u8]>],
            &c.headers as &[sqlx::types::Json<HeadersJson<'_>>],
            &c.states as &[&str],
            &c.max_attempts,
            &c.retry_in,
            &c.errors,
            &c.kinds as &[&str],
            &c.traces as &[Option<&str>],
            &e.kinds as &[&str],
            &e.errors as &[&str],
            &e.of_row,
        )
        .execute(self.pool())
        .await?;
        Ok(inserted.rows_affected())
    }

    /// The rows whose coordinates were taken: a redelivery matches a stored row's timestamp and
    /// value and adds nothing; any other message is a new one at a reused offset, inserted as the
    /// next incarnation. Returns how many were inserted.
    async fn capture_reused(&self, group: &str, rows: &[&Capture]) -> Result<usize, StoreError> {
        let c = Columns::of(rows);
        let reused = sqlx::query!(
            r#"
            INSERT INTO redrive.retry_messages (
                id, consumer_group, topic, "partition", kafka_offset, incarnation, kafka_timestamp,
                key, payload, headers, state, attempts, max_attempts, next_attempt_at, last_error,
                error_kind, error_history, first_failed_at, updated_at, dead_at, trace_context)
            SELECT t.id, $1, t.topic, t.part, t.off, prior.next, t.ts, t.key, t.payload,
                   t.headers, t.state, 1, t.max_attempts, now() + make_interval(secs => t.retry_in),
                   t.err, t.kind,
                   to_jsonb(ARRAY[ROW(now(), 1, t.kind, t.err)::redrive.history_entry]),
                   now(), now(), CASE WHEN t.state = 'dead' THEN now() END, t.trace
            FROM UNNEST($2::uuid[], $3::text[], $4::int4[], $5::int8[], $6::timestamptz[],
                        $7::bytea[], $8::bytea[], $9::jsonb[], $10::text[], $11::int4[],
                        $12::float8[], $13::text[], $14::text[], $15::text[])
                 AS t(id, topic, part, off, ts, key, payload, headers, state, max_attempts,
                      retry_in, err, kind, trace)
            CROSS JOIN LATERAL (
                SELECT coalesce(max(r.incarnation), -1) + 1 AS next,
                       bool_or(r.kafka_timestamp IS NOT DISTINCT FROM t.ts
                               AND r.payload IS NOT DISTINCT FROM t.payload) AS same
                FROM redrive.retry_messages r
                WHERE r.consumer_group = $1 AND r.topic = t.topic AND r."partition" = t.part
                  AND r.kafka_offset = t.off) AS prior
            WHERE prior.same IS NOT TRUE
            ON CONFLICT (consumer_group, topic, "partition", kafka_offset, incarnation) DO NOTHING
            RETURNING kafka_offset, "partition", topic, incarnation
            "#,
            group,
            &c.ids,
            &c.topics as &[&str],
            &c.partitions,
            &c.offsets,
            &c.timestamps as &[Option<DateTime<Utc>>],
            &c.keys as &[Option<&[u8]>],
            &c.payloads as &[Option<&[u8]>],
            &c.headers as &[sqlx::types::Json<HeadersJson<'_>>],
            &c.states as &[&str],
            &c.max_attempts,
            &c.retry_in,
            &c.errors,
            &c.kinds as &[&str],
            &c.traces as &[Option<&str>],
        )
        .fetch_all(self.pool())
        .await?;
        for r in &reused {
            metrics::counter!("redrive_reused_offsets_total").increment(1);
            tracing::warn!(topic = r.topic, partition = r.partition, offset = r.kafka_offset,
                incarnation = r.incarnation,
                "a different message at an offset that already has a row (topic recreated, or its log truncated?): captured as a new incarnation");
        }
        Ok(reused.len())
    }
}

/// Whether a statement failed because a row with the same source coordinates exists.
fn is_source_key_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.constraint() == Some("retry_messages_source_key"))
}

/// One array per column, for the UNNEST of the capture statements. The arrays borrow from the
/// batch: a value is copied once, into the statement.
struct Columns<'a> {
    ids: Vec<Uuid>,
    topics: Vec<&'a str>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    timestamps: Vec<Option<DateTime<Utc>>>,
    keys: Vec<Option<&'a [u8]>>,
    payloads: Vec<Option<&'a [u8]>>,
    headers: Vec<sqlx::types::Json<HeadersJson<'a>>>,
    states: Vec<&'static str>,
    max_attempts: Vec<i32>,
    retry_in: Vec<f64>,
    errors: Vec<String>,
    kinds: Vec<&'static str>,
    traces: Vec<Option<&'a str>>,
}

/// The distinct errors of a batch, each a (kind, text) pair, in the order first seen, and each
/// row's place among them, from 1 (Postgres arrays count from 1).
struct Entries<'c> {
    kinds: Vec<&'static str>,
    errors: Vec<&'c str>,
    of_row: Vec<i32>,
}

impl<'c> Entries<'c> {
    fn of(c: &'c Columns<'_>) -> Self {
        let mut seen = std::collections::HashMap::new();
        let mut e = Entries {
            kinds: Vec::new(),
            errors: Vec::new(),
            of_row: Vec::with_capacity(c.kinds.len()),
        };
        for (&kind, error) in c.kinds.iter().zip(&c.errors) {
            let place = *seen.entry((kind, error.as_str())).or_insert_with(|| {
                e.kinds.push(kind);
                e.errors.push(error);
                e.kinds.len() as i32
            });
            e.of_row.push(place);
        }
        e
    }
}

impl<'a> Columns<'a> {
    fn of(batch: &[&'a Capture]) -> Self {
        Columns {
            ids: batch.iter().map(|_| Uuid::now_v7()).collect(),
            topics: batch.iter().map(|c| c.message.topic.as_str()).collect(),
            partitions: batch.iter().map(|c| c.message.partition).collect(),
            offsets: batch.iter().map(|c| c.message.offset).collect(),
            timestamps: batch.iter().map(|c| c.message.timestamp).collect(),
            keys: batch.iter().map(|c| c.message.key.as_deref()).collect(),
            payloads: batch.iter().map(|c| c.message.payload.as_deref()).collect(),
            headers: batch
                .iter()
                .map(|c| sqlx::types::Json(HeadersJson(&c.message.headers)))
                .collect(),
            states: batch.iter().map(|c| c.state.as_str()).collect(),
            max_attempts: batch.iter().map(|c| c.max_attempts).collect(),
            retry_in: batch.iter().map(|c| c.retry_in.as_secs_f64()).collect(),
            errors: batch
                .iter()
                .map(|c| super::safe::error_text(&c.error.message))
                .collect(),
            kinds: batch.iter().map(|c| c.error.kind.as_str()).collect(),
            traces: batch.iter().map(|c| c.trace.as_deref()).collect(),
        }
    }
}
