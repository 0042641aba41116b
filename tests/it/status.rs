//! `redrive status` on a table too large to count row by row: small pairs are exact, the rest is
//! estimated from a sample of the table's pages and marked so; `Limits::EXACT` reads every row.

use crate::helpers::*;
use redrive::store::status::{Limits, Status, TopicCounts};
use std::time::Duration;

/// Adds `n` rows of one pair in `state` (pending rows are due; dead rows unpublished), each with a
/// 1 KiB payload so that the table spans hundreds of pages.
async fn load(db: &TestDb, group: &str, topic: &str, state: &str, n: i64) {
    sqlx::query(
        r#"
        INSERT INTO redrive.retry_messages (
            id, consumer_group, topic, "partition", kafka_offset, payload, state, attempts,
            max_attempts, next_attempt_at, last_error, error_kind, error_history, dead_at)
        SELECT gen_random_uuid(), $1, $2, 0, i, convert_to(repeat('x', 1024), 'UTF8'), $3, 1, 5,
               now() - interval '1 minute', 'boom ' || $2, 'retryable',
               jsonb_build_array(jsonb_build_object('at', now(), 'attempt', 1,
                                                    'kind', 'retryable', 'error', 'boom ' || $2)),
               CASE WHEN $3 = 'dead' THEN now() END
        FROM generate_series(1, $4) AS i
        "#,
    )
    .bind(group)
    .bind(topic)
    .bind(state)
    .bind(n)
    .execute(db.pool())
    .await
    .unwrap();
}

/// Three pairs: 3,000 due rows, 1,500 unpublished dead rows and a small pair of 20 dead rows.
async fn table() -> (TestDb, i64) {
    let db = TestDb::new().await;
    load(&db, "g1", "big", "pending", 3000).await;
    load(&db, "g1", "small", "dead", 20).await;
    load(&db, "g2", "backlog", "dead", 1500).await;
    let pages = table_pages(db.pool()).await;
    assert!(pages > 400, "the table should span pages: {pages}");
    (db, pages)
}

async fn status(db: &TestDb, limits: Limits) -> Status {
    db.store
        .status(Duration::from_secs(3600), 10, limits)
        .await
        .unwrap()
}

fn pair<'a>(s: &'a Status, topic: &str) -> &'a TopicCounts {
    s.topics.iter().find(|t| t.topic == topic).unwrap()
}

/// Whether `estimate` is within half of `truth` either way: the sample reads half the pages, so
/// its estimates err by a few percent, and this bound by many standard deviations.
fn near(estimate: i64, truth: i64) -> bool {
    (truth / 2..=truth * 3 / 2).contains(&estimate)
}

#[tokio::test]
async fn a_large_table_is_estimated_from_a_sample_and_says_so() {
    let (db, pages) = table().await;
    let limits = Limits {
        pair_rows: 100,
        pair_budget: 1000,
        index_rows: 50,
        error_rows: 50,
        sample_pages: pages / 2,
        key_lines: 10,
    };
    let s = status(&db, limits).await;
    let sample = s.sample.expect("the status says it estimated");
    assert!((40.0..60.0).contains(&sample.percent), "{sample:?}");
    assert_eq!(sample.table_pages, pages);
    let pairs: Vec<_> = s
        .topics
        .iter()
        .map(|t| (t.consumer_group.as_str(), t.topic.as_str()))
        .collect();
    assert_eq!(pairs, [("g1", "big"), ("g1", "small"), ("g2", "backlog")]);
    // The small pair is counted row by row.
    let small = pair(&s, "small");
    assert_eq!((small.dead, small.pending, small.estimated), (20, 0, false));
    let big = pair(&s, "big");
    assert!(big.estimated && near(big.pending, 3000), "{big:?}");
    assert_eq!((big.dead, big.running), (0, 0));
    let backlog = pair(&s, "backlog");
    assert!(backlog.estimated && near(backlog.dead, 1500), "{backlog:?}");
    // Counts past the index limit are estimated; the times are exact all the same.
    let g1 = &s.groups[0];
    assert!(g1.estimated && near(g1.due, 3000), "{g1:?}");
    assert!(g1.oldest_due_at.is_some());
    let g2 = &s.groups[1];
    assert!(g2.estimated && near(g2.dlq_backlog, 1500), "{g2:?}");
    assert!(g2.dlq_oldest_dead_at.is_some());
    assert_eq!(g2.dlq_refused, 0);
    // 4,520 rows failed within the hour: more than the error limit, so the sample's.
    assert!(s.top_errors_estimated);
    let first = &s.top_errors[0];
    assert_eq!(first.error.as_deref(), Some("boom big"));
    assert!(near(first.failures, 3000), "{first:?}");
    // Both reads of the sample read the same pages: each big row has one error in the window.
    assert_eq!(
        (first.failures, first.rows),
        (big.pending, big.pending),
        "{first:?} {big:?}"
    );
    // And so does the next status on the unchanged table.
    let again = status(&db, limits).await;
    assert_eq!((&again.topics, &again.groups), (&s.topics, &s.groups));
    assert_eq!(again.top_errors, s.top_errors);
    let text = redrive::ops::status::render(&s, "db");
    assert!(
        text.contains("~") && text.contains("estimated from a random"),
        "{text}"
    );
}

#[tokio::test]
async fn exact_reads_every_row_and_a_small_table_needs_no_sample() {
    let (db, _) = table().await;
    for limits in [Limits::EXACT, Limits::DEFAULT] {
        let s = status(&db, limits).await;
        assert!(s.sample.is_none() && !s.top_errors_estimated, "{limits:?}");
        let counts: Vec<_> = s
            .topics
            .iter()
            .map(|t| (t.topic.as_str(), t.pending, t.dead, t.estimated))
            .collect();
        assert_eq!(
            counts,
            [
                ("big", 3000, 0, false),
                ("small", 0, 20, false),
                ("backlog", 0, 1500, false)
            ]
        );
        let groups: Vec<_> = s
            .groups
            .iter()
            .map(|g| (g.due, g.dlq_backlog, g.estimated))
            .collect();
        assert_eq!(groups, [(3000, 20, false), (0, 1500, false)]);
        let errors: Vec<_> = s
            .top_errors
            .iter()
            .map(|e| (e.error.as_deref().unwrap(), e.failures))
            .collect();
        assert_eq!(
            errors,
            [
                ("boom big", 3000),
                ("boom backlog", 1500),
                ("boom small", 20)
            ]
        );
    }
}

const COUNT: &str = "SELECT count(*) FROM redrive.retry_messages";

/// The sample is read on a connection of its own, beside the status's transaction, in that
/// transaction's snapshot: rows committed after the status began are not in it, and the reader
/// cannot write.
#[tokio::test]
async fn a_reader_in_another_transactions_snapshot_sees_what_that_transaction_sees() {
    let db = TestDb::new().await;
    load(&db, "g", "before", "dead", 10).await;
    let (tx, seen, snapshot) = exporting(db.pool()).await;
    load(&db, "g", "after", "dead", 5).await;

    let mut reader = db.store.snapshot_reader(&snapshot).await.unwrap();
    let read: i64 = sqlx::query_scalar(COUNT)
        .fetch_one(&mut reader)
        .await
        .unwrap();
    let now: i64 = sqlx::query_scalar(COUNT)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!((seen, read, now), (10, 10, 15));
    let write = sqlx::query("DELETE FROM redrive.retry_messages")
        .execute(&mut reader)
        .await
        .expect_err("the reader's transaction is read-only");
    assert!(write.to_string().contains("read-only"), "{write}");

    // Once the transaction that exported it has ended, the snapshot is gone, and the error says so.
    tx.commit().await.unwrap();
    let gone = db
        .store
        .snapshot_reader(&snapshot)
        .await
        .expect_err("the snapshot's transaction has ended")
        .to_string();
    assert!(gone.contains("snapshot"), "{gone}");
    // Only an id goes into the statement that imports it.
    let bad = db
        .store
        .snapshot_reader("0-1'; SELECT 1; --")
        .await
        .expect_err("not a snapshot id")
        .to_string();
    assert!(bad.contains("is not a snapshot id"), "{bad}");
}

/// A reader beside a transaction does not queue for a lock behind a request that waits for that
/// transaction (a migration's ALTER TABLE, say), which would hold all three up while the
/// transaction waits for the reader: it fails at once, and the transaction goes on.
#[tokio::test]
async fn a_reader_beside_a_transaction_does_not_wait_behind_a_lock_queued_for_it() {
    let db = TestDb::new().await;
    load(&db, "g", "t", "dead", 10).await;
    let (mut tx, seen, snapshot) = exporting(db.pool()).await;
    // Another session asks for the whole table, and waits for `tx`.
    let pool = db.pool().clone();
    let whole = tokio::spawn(async move {
        let mut other = pool.begin().await.unwrap();
        sqlx::query("LOCK TABLE redrive.retry_messages IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *other)
            .await
            .unwrap();
        other.commit().await.unwrap();
    });
    wait_for(
        "the other session to wait for its lock",
        Duration::from_secs(10),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks \
             WHERE relation = 'redrive.retry_messages'::regclass AND NOT granted",
            )
            .fetch_one(db.pool())
            .await
            .unwrap();
            (waiting > 0).then_some(())
        },
    )
    .await;

    let mut reader = db.store.snapshot_reader(&snapshot).await.unwrap();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        sqlx::query_scalar::<_, i64>(COUNT).fetch_one(&mut reader),
    )
    .await
    .expect("the reader queued for the lock")
    .expect_err("the reader cannot have the lock before the other session");
    assert!(read.to_string().contains("lock timeout"), "{read}");
    // The transaction that holds the lock reads on, and the other session has it once it ends.
    let again: i64 = sqlx::query_scalar(COUNT).fetch_one(&mut *tx).await.unwrap();
    assert_eq!((seen, again), (10, 10));
    tx.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), whole)
        .await
        .expect("the other session got its lock")
        .unwrap();
}
