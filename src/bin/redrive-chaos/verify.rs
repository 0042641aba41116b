//! What a chaos run must end with, checked once the system has settled:
//! - every message was acknowledged by the handler, or is dead in the table (nothing lost);
//! - every dead row is in the DLQ topic byte for byte, except the records too large for it, which
//!   are marked refused;
//! - no row is left pending, running or paused, and the queue is empty;
//! - the committed offsets equal the end offsets;
//! - no retry came before its backoff had passed (outside the windows of the faults, where a
//!   rescued lease or a released claim makes a row due at once);
//! - no process exited on its own.
//!
//! Duplicates (deliveries acknowledged more than once) are reported as a rate, not failed on.

use crate::stub::{self, Call, Class};
use crate::workers::Fault;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use redrive::message::Message;
use sqlx::{PgPool, Row};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// What the checks read.
pub struct Inputs<'a> {
    pub db_url: &'a str,
    pub kafka: &'a str,
    pub topic: &'a str,
    /// (partition, offset) of each message, by index.
    pub produced: &'a [(i32, i64)],
    pub calls: &'a [Call],
    pub faults: &'a [Fault],
    pub exits: &'a [String],
    pub settled: bool,
    pub settle_time: Duration,
    pub peak_rss: u64,
    /// The workers kept key order: check it.
    pub key_order: bool,
}

/// The outcome of a run.
pub struct Report {
    pub messages: usize,
    pub faults: Vec<String>,
    pub lost: usize,
    pub dead: usize,
    pub refused: usize,
    /// Records in the DLQ topic: above the published dead rows when a publisher was killed
    /// between the broker's acknowledgement and marking the row (the outbox is at least once).
    pub dlq_records: usize,
    pub duplicates: usize,
    /// Of those, the repeats of a first delivery (redelivered from Kafka after a crash or a
    /// rebalance); the rest repeat a retry (a worker's completion that never reached Postgres).
    pub duplicates_first: usize,
    /// Duplicates by the kind of the fault that caused them: the first one still under way or
    /// begun after the earlier delivery was answered ("none" if no fault came in between).
    pub duplicates_after: BTreeMap<&'static str, usize>,
    /// One line per duplicate, as CSV with a header: which message, when each delivery came
    /// (seconds from the first call) and the fault it is put down to.
    pub duplicates_csv: String,
    pub settle_time: Duration,
    pub peak_rss: u64,
    pub failures: Vec<String>,
}

impl Report {
    pub fn summary(&self) -> String {
        format!(
            "chaos: {} messages, {} faults, lost {}, dead {} ({} refused by the DLQ topic, {} DLQ records), duplicates {} ({:.2} %; {} of first deliveries), settled in {:.1} s, peak RSS {} MiB, {} check(s) failed",
            self.messages,
            self.faults.len(),
            self.lost,
            self.dead,
            self.refused,
            self.dlq_records,
            self.duplicates,
            100.0 * self.duplicates as f64 / self.messages.max(1) as f64,
            self.duplicates_first,
            self.settle_time.as_secs_f64(),
            self.peak_rss >> 20,
            self.failures.len()
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "messages": self.messages, "faults": self.faults, "lost": self.lost, "dead": self.dead,
            "refused": self.refused, "dlq_records": self.dlq_records, "duplicates": self.duplicates,
            "duplicates_first": self.duplicates_first,
            "duplicates_after": self.duplicates_after,
            "settle_seconds": self.settle_time.as_secs_f64(), "peak_rss_bytes": self.peak_rss,
            "failures": self.failures,
        })
    }
}

/// Waits until every offset is committed, no row is left to attempt or to publish, and the handler
/// was not called since the look before, which found the same; `false` if that did not happen
/// within `limit`. Looks once a second, and calls `watch` each time.
///
/// Committed offsets equal to the end offsets do not mean no delivery is under way: a partition's
/// new owner may redeliver a message its old owner committed a moment later. Such a duplicate of
/// a message that failed is captured again as a new row, so the system is settled only once a whole
/// look's interval passed without a call.
pub async fn settle(
    db_url: &str,
    kafka: &str,
    topic: &str,
    calls: &stub::Calls,
    limit: Duration,
    mut watch: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<bool> {
    let pool = PgPool::connect(db_url).await?;
    let deadline = Instant::now() + limit;
    let mut quiet_since: Option<usize> = None;
    while Instant::now() < deadline {
        watch()?;
        let called = calls.lock().unwrap().len();
        // Offsets first: once they are all committed, every failed first delivery is in the table.
        let committed = lagging(kafka, topic).is_ok_and(|l| l.is_empty());
        let open: i64 = if committed {
            sqlx::query_scalar(
                "SELECT count(*) FROM redrive.retry_messages WHERE state IN ('pending', 'paused', 'waiting')
                    OR (state = 'dead' AND dlq_published_at IS NULL AND dlq_refused_at IS NULL)",
            )
            .fetch_one(&pool)
            .await
            .unwrap_or(i64::MAX)
        } else {
            i64::MAX
        };
        if open == 0 && quiet_since == Some(called) {
            return Ok(true);
        }
        quiet_since = (open == 0).then_some(called);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(false)
}

/// Partitions whose committed offset is not their end offset: (partition, committed, end). The
/// workers' group is named after the run's topic, so no two runs share a group (or its static
/// members).
fn lagging(kafka: &str, topic: &str) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", topic)
        .create()?;
    let partitions = partition_count(&c, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(10))?;
    let mut out = Vec::new();
    for p in 0..partitions {
        let (_, end) = c.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        let at = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        };
        if at != end {
            out.push((p, at, end));
        }
    }
    Ok(out)
}

/// Runs every check.
pub async fn check(i: Inputs<'_>) -> anyhow::Result<Report> {
    let mut failures = Vec::new();
    if !i.settled {
        failures.push("the system did not settle in time".to_string());
    }
    failures.extend(i.exits.iter().cloned());
    let pool = PgPool::connect(i.db_url).await?;
    // A row being attempted is pending in the table (and running in the queue).
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM redrive.retry_messages WHERE state IN ('pending', 'paused', 'waiting')",
    )
    .fetch_one(&pool)
    .await?;
    if open > 0 {
        failures.push(format!(
            "{open} rows are still pending, running or paused: {}",
            open_rows(&pool, i.calls).await?
        ));
    }
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM redrive.queue")
        .fetch_one(&pool)
        .await?;
    if queued > open {
        failures.push(format!(
            "{queued} rows in the queue, but {open} rows still to attempt"
        ));
    }
    for (p, at, end) in lagging(i.kafka, i.topic)? {
        failures.push(format!("partition {p}: committed {at}, end {end}"));
    }
    let by_position: HashMap<(i32, i64), usize> = i
        .produced
        .iter()
        .enumerate()
        .map(|(n, pos)| (*pos, n))
        .collect();
    let dead = dead_rows(&pool, &by_position).await?;
    let mut first_ack: Vec<Option<&Call>> = vec![None; i.produced.len()];
    let (mut duplicates, mut duplicates_first) = (0, 0);
    let mut duplicates_after = BTreeMap::new();
    let start = i.calls.iter().map(|c| c.arrived).min();
    let secs = |at: Instant| start.map_or(0.0, |s| (at - s).as_secs_f64());
    let mut duplicates_csv =
        "index,partition,offset,attempt,first_answered_s,again_arrived_s,cause\n".to_string();
    for c in i.calls.iter().filter(|c| (200..300).contains(&c.status)) {
        let Some(first) = first_ack[c.index] else {
            first_ack[c.index] = Some(c);
            continue;
        };
        duplicates += 1;
        duplicates_first += usize::from(c.attempt <= 1);
        let cause = fault_between(i.faults, first.answered, c.arrived).map_or("none", |f| f.kind);
        *duplicates_after.entry(cause).or_insert(0) += 1;
        let (partition, offset) = i.produced[c.index];
        duplicates_csv += &format!(
            "{},{partition},{offset},{},{:.3},{:.3},{cause}\n",
            c.index,
            c.attempt,
            secs(first.answered),
            secs(c.arrived)
        );
    }
    let lost: Vec<usize> = (0..i.produced.len())
        .filter(|n| first_ack[*n].is_none() && !dead.contains_key(n))
        .collect();
    if !lost.is_empty() {
        failures.push(format!(
            "{} messages lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        ));
    }
    let refused = dead.values().filter(|d| d.refused).count();
    let (dlq_records, dlq_failures) = check_dlq(i.kafka, i.topic, &dead).await?;
    failures.extend(dlq_failures);
    failures.extend(early_attempts(i.calls, i.faults));
    if i.key_order {
        failures.extend(out_of_key_order(&first_ack));
    }
    Ok(Report {
        messages: i.produced.len(),
        faults: i.faults.iter().map(|f| f.what.clone()).collect(),
        lost: lost.len(),
        dead: dead.len(),
        refused,
        dlq_records,
        duplicates,
        duplicates_first,
        duplicates_after,
        duplicates_csv,
        settle_time: i.settle_time,
        peak_rss: i.peak_rss,
        failures,
    })
}

/// Messages of a key (`stub::key_of`) that first succeeded after a later message of their key had:
/// with key order, a key's messages first succeed in the order they were produced.
fn out_of_key_order(first_ack: &[Option<&Call>]) -> Vec<String> {
    let mut by_key: BTreeMap<usize, Vec<(Instant, usize)>> = BTreeMap::new();
    for (n, call) in first_ack.iter().enumerate() {
        if let Some(c) = call {
            by_key
                .entry(stub::key_of(n))
                .or_default()
                .push((c.arrived, n));
        }
    }
    let mut out = Vec::new();
    for (key, mut firsts) in by_key {
        firsts.sort();
        if let Some(w) = firsts.windows(2).find(|w| w[1].1 < w[0].1) {
            out.push(format!(
                "key k{key}: message {} first succeeded after message {} of its key",
                w[1].1, w[0].1
            ));
        }
    }
    out
}

/// The rows still to attempt, up to five, each with the calls its message had: what a failure of
/// the check needs to be traced.
async fn open_rows(pool: &PgPool, calls: &[Call]) -> anyhow::Result<String> {
    let rows = sqlx::query(
        "SELECT \"partition\", kafka_offset, state, attempts, payload,
                round(extract(epoch FROM now() - first_failed_at)::numeric, 1)::float8 AS age
         FROM redrive.retry_messages WHERE state IN ('pending', 'paused')
         ORDER BY first_failed_at LIMIT 5",
    )
    .fetch_all(pool)
    .await?;
    let mut out = Vec::new();
    for r in rows {
        let payload: Option<Vec<u8>> = r.try_get("payload")?;
        let index = payload.as_deref().and_then(stub::index_of);
        let had: Vec<String> = calls
            .iter()
            .filter(|c| Some(c.index) == index)
            .map(|c| format!("attempt {} -> {}", c.attempt, c.status))
            .collect();
        out.push(format!(
            "partition {} offset {} ({}, {} attempts, first failed {} s ago; message {index:?}, calls [{}])",
            r.try_get::<i32, _>("partition")?,
            r.try_get::<i64, _>("kafka_offset")?,
            r.try_get::<String, _>("state")?,
            r.try_get::<i32, _>("attempts")?,
            r.try_get::<f64, _>("age")?,
            had.join(", ")
        ));
    }
    Ok(out.join("; "))
}

struct Dead {
    id: uuid::Uuid,
    published: bool,
    refused: bool,
}

/// Dead rows by message index.
async fn dead_rows(
    pool: &PgPool,
    by_position: &HashMap<(i32, i64), usize>,
) -> anyhow::Result<HashMap<usize, Dead>> {
    let rows = sqlx::query(
        "SELECT id, \"partition\", kafka_offset, dlq_published_at IS NOT NULL AS published,
                dlq_refused_at IS NOT NULL AS refused
         FROM redrive.retry_messages WHERE state = 'dead'",
    )
    .fetch_all(pool)
    .await?;
    let mut out = HashMap::new();
    for r in rows {
        let position = (
            r.get::<i32, _>("partition"),
            r.get::<i64, _>("kafka_offset"),
        );
        if let Some(n) = by_position.get(&position) {
            out.insert(
                *n,
                Dead {
                    id: r.get("id"),
                    published: r.get("published"),
                    refused: r.get("refused"),
                },
            );
        }
    }
    Ok(out)
}

/// Every published dead row is in the DLQ topic as it was produced, byte for byte; exactly the
/// records too large for the topic are refused.
async fn check_dlq(
    kafka: &str,
    topic: &str,
    dead: &HashMap<usize, Dead>,
) -> anyhow::Result<(usize, Vec<String>)> {
    let mut failures = Vec::new();
    for (n, d) in dead {
        let big = Class::of(*n) == Class::Big;
        if big != d.refused || (!big && !d.published) {
            failures.push(format!(
                "message {n}: published {}, refused {}",
                d.published, d.refused
            ));
        }
    }
    let records = read_all(kafka, &format!("{topic}.dlq")).await?;
    let count = records.len();
    let by_id: HashMap<String, Message> = records
        .into_iter()
        .filter_map(|m| {
            let id = m.header(redrive::dlq::headers::ID)?.value.clone()?;
            Some((String::from_utf8_lossy(&id).into_owned(), m))
        })
        .collect();
    for (n, d) in dead.iter().filter(|(_, d)| d.published) {
        let want = stub::message(topic, *n);
        let Some(got) = by_id.get(&d.id.to_string()) else {
            failures.push(format!(
                "message {n}: dead and published, but not in the DLQ topic"
            ));
            continue;
        };
        let own: Vec<_> = got
            .headers
            .iter()
            .filter(|h| !h.key.starts_with(b"redrive."))
            .cloned()
            .collect();
        if (got.key.as_ref(), got.payload.as_ref(), &own)
            != (want.key.as_ref(), want.payload.as_ref(), &want.headers)
        {
            failures.push(format!(
                "message {n}: the DLQ record differs from what was produced"
            ));
        }
    }
    Ok((count, failures))
}

/// Reads a topic from its start to its end offsets as they are now, for at most a minute. (The
/// outbox is at least once: a record produced again after a crash makes the topic longer than
/// the number of dead rows.)
async fn read_all(kafka: &str, topic: &str) -> anyhow::Result<Vec<Message>> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", format!("chaos-reader-{}", uuid::Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    let partitions = partition_count(&c, topic)?;
    let mut remaining = HashMap::new();
    for p in 0..partitions {
        let (low, high) = c.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if high > low {
            remaining.insert(p, high);
        }
    }
    c.subscribe(&[topic])?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !remaining.is_empty() {
        let m = match tokio::time::timeout_at(deadline, c.recv()).await {
            Ok(m) => Message::from_kafka(&m?),
            Err(_) => anyhow::bail!("{topic} could not be read to its end within a minute"),
        };
        if remaining
            .get(&m.partition)
            .is_some_and(|high| m.offset + 1 >= *high)
        {
            remaining.remove(&m.partition);
        }
        out.push(m);
    }
    Ok(out)
}

/// A retry that came before `initial × 2^(attempt−1)` after the first failure of the attempt
/// before it was answered, with no fault in between. The first failure: a redelivered first
/// delivery (its process was killed before the commit) fails again later, but the row's backoff
/// runs from the capture of the earlier one.
fn early_attempts(calls: &[Call], faults: &[Fault]) -> Vec<String> {
    let mut by_message: HashMap<usize, Vec<&Call>> = HashMap::new();
    for c in calls {
        by_message.entry(c.index).or_default().push(c);
    }
    let mut out = Vec::new();
    for (n, mut list) in by_message {
        list.sort_by_key(|c| c.arrived);
        for (i, b) in list.iter().enumerate().filter(|(_, b)| b.attempt >= 2) {
            let failed_before = list[..i].iter().find(|a| {
                a.attempt + 1 == b.attempt && !(200..300).contains(&a.status) && a.status != 400
            });
            let Some(a) = failed_before else { continue };
            let faulted = faults
                .iter()
                .any(|f| f.from <= b.arrived && f.to >= a.answered);
            let delay = Duration::from_millis(stub::INITIAL_DELAY_MS << (a.attempt.max(1) - 1));
            if !faulted && b.arrived < a.answered + delay {
                out.push(format!(
                    "message {n}: attempt {} came {:?} after attempt {} failed, before its {delay:?} backoff",
                    b.attempt,
                    b.arrived - a.answered,
                    a.attempt
                ));
            }
        }
    }
    out
}

/// The first fault that was under way at `answered`, or began after it, and began before `again`:
/// what kept a delivery answered at `answered` from being committed before it came `again`.
fn fault_between(faults: &[Fault], answered: Instant, again: Instant) -> Option<&Fault> {
    faults
        .iter()
        .filter(|f| f.to >= answered && f.from <= again)
        .min_by_key(|f| f.from)
}

/// How many partitions the broker reports for `topic`.
fn partition_count(c: &impl Consumer, topic: &str) -> anyhow::Result<i32> {
    let metadata = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len()) as i32)
}
