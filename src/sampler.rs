//! The row gauges: what the table holds, read every `telemetry.sample_every` by one process of the
//! database at a time, so that a dozen `redrive run`s do not read the same rows a dozen times.
//!
//! The process that holds a session advisory lock on a connection of its own reads
//! [`Store::status`] (indexes, and a sample of pages for what is too large to count: cheap at 10M
//! rows) and exports:
//! - `redrive_rows{group, topic, state}`: pending, running, paused, waiting, dead, replayed;
//! - `redrive_due_rows{group}` and `redrive_oldest_due_age_seconds{group}`: how far behind the
//!   workers are;
//! - `redrive_dlq_backlog_rows{group}` and `redrive_dlq_oldest_unpublished_age_seconds{group}`;
//! - `redrive_dlq_refused_rows{group}`;
//! - `redrive_topic_paused{group, topic}`: 1 while the topic's retries are paused (`*` for every
//!   group);
//! - `redrive_rows_sampler{}`: 1 in the process that reads them, 0 in the others.
//!
//! The other processes export the sampler gauge only. A process that loses the lock (its
//! connection broke) sets what it exported to 0, so `max by (…)` over every process gives the
//! reader's values.

use crate::store::status::Limits;
use crate::store::Store;
use sqlx::Connection;
use std::collections::HashSet;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The advisory lock's key: one sampler per database.
const LOCK: i64 = 0x7265_6472_6976_6501; // "redrive" 01

type Labels = Vec<(&'static str, String)>;

/// Reads the gauges every `every` while this process holds the lock, until `shutdown`.
pub async fn run(store: Store, every: Duration, shutdown: CancellationToken) {
    let mut leader: Option<sqlx::PgConnection> = None;
    let mut exported: HashSet<(&'static str, Labels)> = HashSet::new();
    let role = metrics::gauge!("redrive_rows_sampler");
    role.set(0.0);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if leader.is_none() {
            leader = lead(&store).await;
            if leader.is_some() {
                tracing::info!("reading the row gauges every {every:?} for the database");
            }
        } else if let Some(conn) = leader.as_mut() {
            if conn.ping().await.is_err() {
                tracing::warn!(
                    "the row gauges' connection broke; another process may read them now"
                );
                leader = None;
                for (name, labels) in exported.drain() {
                    metrics::gauge!(name, &labels).set(0.0);
                }
            }
        }
        role.set(if leader.is_some() { 1.0 } else { 0.0 });
        if leader.is_none() {
            continue;
        }
        match store
            .status(Duration::from_secs(3600), 0, Limits::DEFAULT)
            .await
        {
            Ok(status) => {
                let now = exported_now(&status);
                for key in exported.difference(&now.iter().map(|(k, _)| k.clone()).collect()) {
                    metrics::gauge!(key.0, &key.1).set(0.0);
                }
                exported.clear();
                for ((name, labels), value) in now {
                    metrics::gauge!(name, &labels).set(value);
                    exported.insert((name, labels));
                }
            }
            Err(e) => tracing::warn!("reading the row gauges failed: {e}"),
        }
    }
    if let Some(conn) = leader {
        let _ = conn.close().await;
    }
}

/// A connection holding the sampler's lock, or `None` when another process holds it.
async fn lead(store: &Store) -> Option<sqlx::PgConnection> {
    let conn = store.pool().acquire().await.ok()?;
    let mut conn = conn.detach();
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK)
        .fetch_one(&mut conn)
        .await
        .ok()?;
    if got {
        Some(conn)
    } else {
        let _ = conn.close().await;
        None
    }
}

/// Every gauge of a status, with its labels and value.
fn exported_now(s: &crate::store::status::Status) -> Vec<((&'static str, Labels), f64)> {
    let mut out = Vec::new();
    let age = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or(0.0, |t| {
            ((s.at - t).num_milliseconds() as f64 / 1000.0).max(0.0)
        })
    };
    for t in &s.topics {
        for (state, n) in [
            ("pending", t.pending),
            ("running", t.running),
            ("paused", t.paused),
            ("waiting", t.waiting),
            ("dead", t.dead),
            ("replayed", t.replayed),
        ] {
            let labels = vec![
                ("group", t.consumer_group.clone()),
                ("topic", t.topic.clone()),
                ("state", state.to_string()),
            ];
            out.push((("redrive_rows", labels), n as f64));
        }
    }
    for g in &s.groups {
        let labels = || vec![("group", g.consumer_group.clone())];
        out.push((("redrive_due_rows", labels()), g.due as f64));
        out.push((
            ("redrive_oldest_due_age_seconds", labels()),
            age(g.oldest_due_at),
        ));
        out.push((("redrive_dlq_backlog_rows", labels()), g.dlq_backlog as f64));
        out.push((
            ("redrive_dlq_oldest_unpublished_age_seconds", labels()),
            age(g.dlq_oldest_dead_at),
        ));
        out.push((("redrive_dlq_refused_rows", labels()), g.dlq_refused as f64));
    }
    for p in &s.paused_topics {
        let labels = vec![
            ("group", p.consumer_group.clone()),
            ("topic", p.topic.clone()),
        ];
        out.push((("redrive_topic_paused", labels), 1.0));
    }
    out
}
