//! The store's statements: idempotent capture (I2), leased claims with fenced completion (I3),
//! deletion only on success (I5).

use crate::helpers::*;
use chrono::Utc;
use redrive::handler::HandlerError;
use redrive::message::Message;
use redrive::store::capture::{Capture, InitialState, Line, OnDead};
use redrive::store::complete::{Completion, Outcome};
use sqlx::Connection;
use std::time::Duration;

pub fn message(topic: &str, offset: i64, payload: &[u8]) -> Message {
    Message {
        topic: topic.into(),
        partition: 0,
        offset,
        timestamp: Some(Utc::now()),
        key: Some(b"k".to_vec()),
        payload: Some(payload.to_vec()),
        headers: vec![],
    }
}

pub fn pending(topic: &str, offset: i64, due_in: Duration, max_attempts: i32) -> Capture {
    Capture {
        message: message(topic, offset, b"p"),
        state: InitialState::Pending,
        max_attempts,
        retry_in: due_in,
        error: HandlerError::retryable("first delivery failed"),
        line: None,
        trace: None,
    }
}

#[tokio::test]
async fn capturing_the_same_message_twice_keeps_one_row() {
    let db = TestDb::new().await;
    let c = pending("orders", 7, Duration::ZERO, 3);
    assert_eq!(
        db.store
            .capture("g", std::slice::from_ref(&c))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        db.store
            .capture("g", &[c.clone(), pending("orders", 8, Duration::ZERO, 3)])
            .await
            .unwrap(),
        1
    );
    assert_eq!(db.count("topic = 'orders' AND kafka_offset = 7").await, 1);
    // Another group consuming the same topic has its own row.
    assert_eq!(db.store.capture("other", &[c]).await.unwrap(), 1);
    assert_first_errors_recorded(&db, 3).await;
}

/// Every one of the `rows` rows holds its first failure as the one entry of its error history,
/// at the time it was first captured.
async fn assert_first_errors_recorded(db: &TestDb, rows: i64) {
    let expected = "jsonb_build_array(jsonb_build_object('at', first_failed_at, 'attempt', 1, \
                    'kind', error_kind, 'error', last_error))";
    let recorded = db
        .count(&format!(
            "error_history = {expected} AND error_kind = 'retryable' \
             AND last_error = 'first delivery failed'"
        ))
        .await;
    assert_eq!(
        recorded, rows,
        "rows whose error history holds their first failure"
    );
}

/// A batch's rows with different errors each get their own first entry, though the statement
/// makes one entry per distinct (kind, text) pair: two texts, and one text under two kinds. The
/// same holds for the statement of rows in key lines.
#[tokio::test]
async fn each_row_of_a_batch_gets_the_history_entry_of_its_own_error() {
    let db = TestDb::new().await;
    for (topic, lined) in [("orders", false), ("lined", true)] {
        let failed = |offset: i64, error: HandlerError| {
            let mut c = pending(topic, offset, Duration::ZERO, 3);
            if error.kind == redrive::handler::ErrorKind::Permanent {
                c.state = InitialState::Dead;
            }
            if lined {
                // A line of its own, so the row heads it and keeps its state.
                let key = format!("k{offset}");
                c.line = Some(redrive::store::capture::Line::of(
                    key.as_bytes(),
                    redrive::store::capture::OnDead::Block,
                ));
            }
            c.error = error;
            c
        };
        let batch = [
            failed(1, HandlerError::retryable("timed out")),
            failed(2, HandlerError::retryable("503 Service Unavailable")),
            failed(3, HandlerError::retryable("timed out")),
            failed(4, HandlerError::permanent("timed out")),
            failed(5, HandlerError::retryable("503 Service Unavailable")),
        ];
        assert_eq!(db.store.capture("g", &batch).await.unwrap(), 5);
        let rows: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT kafka_offset, error_kind, last_error FROM redrive.retry_messages \
             WHERE topic = $1 AND (order_key IS NOT NULL) = $2 \
               AND error_history = jsonb_build_array(jsonb_build_object('at', first_failed_at, \
                   'attempt', 1, 'kind', error_kind, 'error', last_error)) \
             ORDER BY kafka_offset",
        )
        .bind(topic)
        .bind(lined)
        .fetch_all(db.pool())
        .await
        .unwrap();
        let got: Vec<(i64, &str, &str)> = rows
            .iter()
            .map(|(o, k, e)| (*o, k.as_str(), e.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (1, "retryable", "timed out"),
                (2, "retryable", "503 Service Unavailable"),
                (3, "retryable", "timed out"),
                (4, "permanent", "timed out"),
                (5, "retryable", "503 Service Unavailable"),
            ],
            "{topic}: every row's one history entry is its own first failure"
        );
    }
}

#[tokio::test]
async fn an_expired_lease_is_claimable_again_and_the_late_completion_is_refused() {
    let db = TestDb::new().await;
    db.seed(&[pending("orders", 1, Duration::ZERO, 5)]).await;
    let first = db.claim(Duration::from_millis(500)).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].attempt, 2, "the capture was attempt 1");
    assert!(
        db.claim(Duration::from_secs(30)).await.is_empty(),
        "leased rows are not claimable"
    );

    // Nobody completes: once the lease runs out another worker gets the row.
    let second = wait_for(
        "the expired lease to be claimable",
        Duration::from_secs(30),
        || async {
            let rows = db.claim(Duration::from_secs(30)).await;
            (!rows.is_empty()).then_some(rows)
        },
    )
    .await;
    assert_eq!(second[0].id, first[0].id);
    assert_eq!(second[0].attempt, 3);

    let late = Completion {
        id: first[0].id,
        attempt: first[0].attempt,
        token: first[0].token,
        outcome: Outcome::Succeeded,
    };
    let done = db.store.complete(&[late]).await.unwrap();
    assert_eq!(
        (done.deleted, done.rejected),
        (0, 1),
        "the old claim must not complete the newer attempt"
    );
    assert_eq!(db.count("state = 'running'").await, 1);

    let current = Completion {
        id: second[0].id,
        attempt: second[0].attempt,
        token: second[0].token,
        outcome: Outcome::Succeeded,
    };
    assert_eq!(db.store.complete(&[current]).await.unwrap().deleted, 1);
    assert_eq!(
        db.count("true").await,
        0,
        "a successful retry deletes the row"
    );
}

#[tokio::test]
async fn a_different_message_at_a_reused_offset_is_captured_and_a_redelivery_is_not() {
    let db = TestDb::new().await;
    let old = pending("orders", 5, Duration::ZERO, 3);
    db.seed(std::slice::from_ref(&old)).await;
    // The topic was recreated: offset 5 now holds another message.
    let mut new = pending("orders", 5, Duration::ZERO, 3);
    new.message.payload = Some(b"another message".to_vec());
    new.message.timestamp = old.message.timestamp.map(|t| t + chrono::Duration::days(1));
    assert_eq!(db.store.capture("g", &[new.clone()]).await.unwrap(), 1);
    // Redeliveries of either add nothing (I2), alone or in a batch with a new row.
    let fresh = pending("orders", 6, Duration::ZERO, 3);
    assert_eq!(
        db.store
            .capture("g", &[new.clone(), old.clone(), fresh])
            .await
            .unwrap(),
        1
    );
    let rows: Vec<(i64, i32, Vec<u8>)> = sqlx::query_as(
        "SELECT kafka_offset, incarnation, payload FROM redrive.retry_messages ORDER BY 1, 2",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (5, 0, b"p".to_vec()),
            (5, 1, b"another message".to_vec()),
            (6, 0, b"p".to_vec())
        ]
    );
    assert_first_errors_recorded(&db, 3).await;
}

/// Marks a row's lease as run out, as a worker cut off from Postgres would leave it.
async fn expire_leases(db: &TestDb) {
    sqlx::query(
        "UPDATE redrive.queue SET lease_expires_at = now() - interval '1s' WHERE state = 'running'",
    )
    .execute(db.pool())
    .await
    .unwrap();
}

/// The completion of claimed row `c` with `outcome`.
pub fn done(c: &redrive::store::claim::Claimed, outcome: Outcome) -> Completion {
    Completion {
        id: c.id,
        attempt: c.attempt,
        token: c.token,
        outcome,
    }
}

#[tokio::test]
async fn a_completion_held_back_across_a_replay_is_refused_though_its_attempt_number_matches() {
    let db = TestDb::new().await;
    db.seed(&[pending("orders", 1, Duration::ZERO, 2)]).await;
    // Claim → lease expiry: the worker is cut off, holding its completion of attempt 2.
    let held = db.claim(Duration::from_secs(30)).await.remove(0);
    assert_eq!(held.attempt, 2);
    expire_leases(&db).await;
    assert!(
        db.claim(Duration::from_secs(30)).await.is_empty(),
        "rescued: dead"
    );
    // → replay → new claims, until the row is at attempt 2 again.
    sqlx::query("SELECT redrive.replay(ARRAY(SELECT id FROM redrive.dead_messages))")
        .execute(db.pool())
        .await
        .unwrap();
    let first = db.claim(Duration::from_secs(30)).await.remove(0);
    let retry = Outcome::Retry {
        retry_in: Duration::ZERO,
        error: HandlerError::retryable("again"),
    };
    assert_eq!(
        db.store
            .complete(&[done(&first, retry)])
            .await
            .unwrap()
            .rescheduled,
        1
    );
    let current = db.claim(Duration::from_secs(30)).await.remove(0);
    assert_eq!(
        current.attempt, held.attempt,
        "the same attempt number, another claim"
    );

    // → the old completion arrives.
    let late = db
        .store
        .complete(&[done(&held, Outcome::Succeeded)])
        .await
        .unwrap();
    assert_eq!(
        (late.deleted, late.rejected),
        (0, 1),
        "fenced by its claim token"
    );
    let failed = Outcome::Dead {
        error: HandlerError::permanent("late"),
    };
    let late = db.store.complete(&[done(&held, failed)]).await.unwrap();
    assert_eq!(
        (late.dead, late.rejected),
        (0, 1),
        "fenced by its claim token"
    );
    assert_eq!(db.store.release(&[(held.id, held.token)]).await.unwrap(), 0);
    assert_eq!(db.count("state = 'running'").await, 1);
    let now = db
        .store
        .complete(&[done(&current, Outcome::Succeeded)])
        .await
        .unwrap();
    assert_eq!(now.deleted, 1);
}

#[tokio::test]
async fn a_lease_that_expires_on_the_last_attempt_makes_the_row_dead() {
    let db = TestDb::new().await;
    db.seed(&[pending("orders", 1, Duration::ZERO, 2)]).await;
    let claimed = db.claim(Duration::from_millis(200)).await;
    assert_eq!(claimed[0].attempt, 2);
    wait_for(
        "the rescue to mark the row dead",
        Duration::from_secs(30),
        || async {
            assert!(db.claim(Duration::from_secs(30)).await.is_empty());
            (db.count(
                "state = 'dead' AND dead_at IS NOT NULL AND last_error LIKE 'lease expired%'",
            )
            .await
                == 1)
                .then_some(())
        },
    )
    .await;
}

/// Claims the one due row and fails its attempt with `error`, to be retried at once.
async fn fail_once(db: &TestDb, error: &str) {
    let c = db.claim(Duration::from_secs(30)).await.remove(0);
    let outcome = Outcome::Retry {
        retry_in: Duration::ZERO,
        error: HandlerError::retryable(error),
    };
    let done = db
        .store
        .complete(&[Completion {
            id: c.id,
            attempt: c.attempt,
            token: c.token,
            outcome,
        }])
        .await
        .unwrap();
    assert_eq!(done.rescheduled, 1);
}

#[tokio::test]
async fn failures_reschedule_or_kill_and_keep_a_bounded_error_history() {
    let db = TestDb::new().await;
    db.seed(&[pending("orders", 1, Duration::ZERO, 30)]).await;
    for n in 0..12 {
        fail_once(&db, &format!("boom {n}")).await;
    }
    let (history, attempts): (Vec<String>, Vec<i32>) = sqlx::query_as(
        "SELECT array_agg(e->>'error' ORDER BY n), array_agg((e->>'attempt')::int ORDER BY n) \
         FROM redrive.retry_messages, jsonb_array_elements(error_history) WITH ORDINALITY AS h(e, n)",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    // The capture's entry and 12 failures: the last 10, oldest first.
    let expected: Vec<String> = (2..12).map(|n| format!("boom {n}")).collect();
    assert_eq!(history, expected);
    assert_eq!(attempts, (4..14).collect::<Vec<i32>>());

    // A history an operator rewrote into something that is not a list still gets the entry.
    sqlx::query("UPDATE redrive.retry_messages SET error_history = '{\"note\": \"cleared\"}'")
        .execute(db.pool())
        .await
        .unwrap();
    fail_once(&db, "boom 12").await;
    let history: serde_json::Value =
        sqlx::query_scalar("SELECT error_history FROM redrive.retry_messages")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(history[0]["note"], "cleared", "{history}");
    assert_eq!(history[1]["error"], "boom 12", "{history}");

    let c = db.claim(Duration::from_secs(30)).await.remove(0);
    let outcome = Outcome::Dead {
        error: HandlerError::permanent("bad request"),
    };
    assert_eq!(
        db.store
            .complete(&[Completion {
                id: c.id,
                attempt: c.attempt,
                token: c.token,
                outcome
            }])
            .await
            .unwrap()
            .dead,
        1
    );
    assert_eq!(
        db.count("state = 'dead' AND error_kind = 'permanent' AND dlq_published_at IS NULL")
            .await,
        1
    );
    assert!(
        db.claim(Duration::from_secs(30)).await.is_empty(),
        "dead rows are never claimed"
    );
}

#[tokio::test]
async fn rows_are_not_claimed_before_they_are_due() {
    let db = TestDb::new().await;
    db.seed(&[pending("orders", 1, Duration::from_secs(3600), 3)])
        .await;
    assert!(db.claim(Duration::from_secs(30)).await.is_empty());
    let wait = db
        .store
        .next_wake("g", Duration::ZERO)
        .await
        .unwrap()
        .expect("a row is waiting");
    assert!(
        wait > Duration::from_secs(3590) && wait <= Duration::from_secs(3600),
        "the wait is the database's own due time less its own now(): {wait:?}"
    );
    let early = db
        .store
        .next_wake("g", Duration::from_secs(600))
        .await
        .unwrap()
        .expect("a row is waiting");
    assert!(
        early > Duration::from_secs(2990) && early <= Duration::from_secs(3000),
        "a worker that claims ahead wakes that much earlier: {early:?}"
    );
}

#[tokio::test]
async fn with_nothing_due_the_workers_wake_when_the_first_lease_expires() {
    let db = TestDb::new().await;
    db.seed(&[
        pending("orders", 1, Duration::ZERO, 3),
        pending("orders", 2, Duration::ZERO, 3),
    ])
    .await;
    for lease in [120, 30] {
        let claim = db
            .store
            .claim("g", 1, Duration::from_secs(lease), "w")
            .await
            .unwrap();
        assert_eq!(claim.rows.len(), 1);
    }
    let wait = db
        .store
        .next_wake("g", Duration::ZERO)
        .await
        .unwrap()
        .expect("two leases are running");
    assert!(
        wait > Duration::from_secs(20) && wait <= Duration::from_secs(30),
        "the wake-up is the earlier of the two leases' expiry, by the database's clock: {wait:?}"
    );
}

/// What a statement of this transaction read of the queue: rows read by sequential scans, and rows
/// fetched through its indexes.
async fn queue_reads(c: &mut sqlx::PgConnection) -> (i64, i64) {
    sqlx::query_as(
        "SELECT seq_tup_read, idx_tup_fetch FROM pg_stat_xact_user_tables \
         WHERE relid = 'redrive.queue'::regclass",
    )
    .fetch_one(c)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_claim_and_the_wake_up_read_what_they_return_after_the_queue_outgrew_its_statistics() {
    // `migrate` analyzes the queue while it is empty, and the claim and the wake-up are planned
    // then, on this connection. The queue then grows by 20,000 rows that are not due, which no
    // ANALYZE sees: a plan for an empty table would read every one of them on each call.
    let db = TestDb::new().await;
    let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let claim = "SELECT count(*) FROM redrive.claim('g', 100, 60, 'w', 0.04)";
    let wake = "SELECT redrive.next_wake('g', 0.02)";
    for _ in 0..6 {
        let claimed: i64 = sqlx::query_scalar(claim).fetch_one(&mut c).await.unwrap();
        assert_eq!(claimed, 0);
        let wait: Option<f64> = sqlx::query_scalar(wake).fetch_one(&mut c).await.unwrap();
        assert_eq!(wait, None, "nothing is waiting yet");
    }
    sqlx::query(
        "INSERT INTO redrive.retry_messages (id, consumer_group, topic, \"partition\", \
         kafka_offset, payload, state, attempts, max_attempts, next_attempt_at) \
         SELECT gen_random_uuid(), 'g', 'orders', 0, i, '\\x00', 'pending', 1, 5, \
                now() + interval '1 hour' + i * interval '1 ms' \
         FROM generate_series(1, 20000) AS i",
    )
    .execute(&mut c)
    .await
    .unwrap();

    let mut tx = c.begin().await.unwrap();
    let claimed: i64 = sqlx::query_scalar(claim).fetch_one(&mut *tx).await.unwrap();
    assert_eq!(claimed, 0, "no row is due");
    let (seq, fetched) = queue_reads(&mut tx).await;
    assert!(
        seq == 0 && fetched < 10,
        "a claim that takes nothing reads no rows: {seq} by sequential scans, {fetched} by index"
    );
    tx.rollback().await.unwrap();

    let mut tx = c.begin().await.unwrap();
    let wait: f64 = sqlx::query_scalar(wake).fetch_one(&mut *tx).await.unwrap();
    assert!(
        (3590.0..=3600.0).contains(&wait),
        "the wake-up is the first row's due time, less its lead: {wait}"
    );
    let (seq, fetched) = queue_reads(&mut tx).await;
    assert!(
        seq == 0 && fetched < 10,
        "the wake-up reads the first row of its index: {seq} rows by sequential scans, {fetched} by index"
    );
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn redrives_sessions_plan_each_statement_for_its_values_and_compile_none() {
    let db = TestDb::new().await;
    let (plans, jit): (String, String) =
        sqlx::query_as("SELECT current_setting('plan_cache_mode'), current_setting('jit')")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!((plans.as_str(), jit.as_str()), ("force_custom_plan", "off"));
}

#[tokio::test]
async fn a_round_of_capture_claim_and_completion_reads_its_rows_after_the_tables_outgrew_their_statistics(
) {
    // `migrate` analyzes the tables while they are empty. One connection completes its first
    // batches while the tables hold a few rows, so their statements are planned for tables that
    // small and kept on it: the failures' UPDATE after five calls, the queue trigger's statements
    // at once. The tables then grow by 20,000 rows that no ANALYZE sees, and a plan made for a few
    // rows reads every one of them on each completion. A paused topic makes each capture look
    // for its rows to hold too.
    let db = TestDb::new().await;
    sqlx::query("SELECT redrive.pause('elsewhere', 'g')")
        .execute(db.pool())
        .await
        .unwrap();
    let (pool, store) = on_one_connection(&db).await;
    let retry = || Outcome::Retry {
        retry_in: Duration::ZERO,
        error: HandlerError::retryable("still failing"),
    };
    let mut offset = 0;
    let mut round = async || {
        // Each round two new rows come: one succeeds and one dies. Two others fail, due again at
        // once.
        offset += 2;
        store
            .capture(
                "g",
                &[
                    pending("orders", offset - 1, Duration::ZERO, 100),
                    pending("orders", offset, Duration::ZERO, 100),
                ],
            )
            .await
            .unwrap();
        let rows = store
            .claim("g", 10, Duration::from_secs(60), "w")
            .await
            .unwrap()
            .rows;
        let batch: Vec<Completion> = rows
            .iter()
            .map(
                |c| match (c.message.topic.as_str(), c.message.offset == offset) {
                    ("orders", true) => done(c, Outcome::Succeeded),
                    ("orders", false) => done(
                        c,
                        Outcome::Dead {
                            error: HandlerError::permanent("refused"),
                        },
                    ),
                    _ => done(c, retry()),
                },
            )
            .collect();
        let completed = store.complete(&batch).await.unwrap();
        (
            rows.len(),
            completed.deleted,
            completed.rescheduled,
            completed.dead,
        )
    };
    // The first completion comes while the queue is empty: one for a row that is gone.
    let gone = Completion {
        id: uuid::Uuid::now_v7(),
        attempt: 1,
        token: uuid::Uuid::now_v7(),
        outcome: Outcome::Dead {
            error: HandlerError::permanent("refused"),
        },
    };
    assert_eq!(store.complete(&[gone]).await.unwrap().rejected, 1);
    store
        .capture(
            "g",
            &[
                pending("failing", 1, Duration::ZERO, 100),
                pending("failing", 2, Duration::ZERO, 100),
            ],
        )
        .await
        .unwrap();
    for _ in 0..6 {
        assert_eq!(round().await, (4, 1, 2, 1));
    }
    sqlx::query(
        "INSERT INTO redrive.retry_messages (id, consumer_group, topic, \"partition\", \
         kafka_offset, payload, state, attempts, max_attempts, next_attempt_at) \
         SELECT gen_random_uuid(), 'g', 'later', 0, i, '\\x00', 'pending', 1, 5, \
                now() + interval '1 hour' \
         FROM generate_series(1, 20000) AS i",
    )
    .execute(db.pool())
    .await
    .unwrap();

    let (rounded, read) = read_by(&db, &pool, round()).await;
    assert_eq!(rounded, (4, 1, 2, 1));
    assert!(
        read.0 < 100 && read.1 < 100,
        "a round of four rows read {} rows of the queue and {} of the message table",
        read.0,
        read.1
    );
}

#[tokio::test]
async fn a_key_lines_release_reads_its_rows_after_the_table_outgrew_its_statistics() {
    // A success of a line's first row lets the next one go: the queue's trigger calls
    // `redrive.release_lines`, which keeps one plan per connection (V20), as do the completion
    // itself and the capture in key lines (`redrive.capture_in_lines`, V21), which asks whether
    // each row's line holds one already. One connection makes those plans here, while the table
    // holds a few rows and its statistics are those of `migrate` (empty). The table then grows by
    // 20,000 rows of other lines of the same partition, at offsets before the next round's, that
    // no ANALYZE sees; a capture and a release must still read their line alone.
    let db = TestDb::new().await;
    let (pool, store) = on_one_connection(&db).await;
    let in_line = |offset: i64, key: &str| {
        let mut c = pending("lined", offset, Duration::ZERO, 3);
        c.line = Some(Line::of(key.as_bytes(), OnDead::Block));
        c
    };
    let round = async |first: i64| {
        // Two messages of a new key: the second waits behind the first. The first succeeds, which
        // releases the second, and then the second succeeds.
        let key = format!("k{first}");
        let both = [in_line(first, &key), in_line(first + 1, &key)];
        assert_eq!(store.capture("g", &both).await.unwrap(), 2);
        let mut claimed_and_deleted = Vec::new();
        for _ in 0..2 {
            let rows = store
                .claim("g", 10, Duration::from_secs(60), "w")
                .await
                .unwrap()
                .rows;
            let batch: Vec<Completion> = rows.iter().map(|c| done(c, Outcome::Succeeded)).collect();
            let deleted = store.complete(&batch).await.unwrap().deleted;
            claimed_and_deleted.push((rows.len(), deleted));
        }
        claimed_and_deleted
    };
    for first in (1..12).step_by(2) {
        assert_eq!(round(first).await, [(1, 1), (1, 1)]);
    }
    sqlx::query(
        "INSERT INTO redrive.retry_messages (id, consumer_group, topic, \"partition\", \
         kafka_offset, payload, state, attempts, max_attempts, next_attempt_at, order_key, \
         order_on_dead) \
         SELECT gen_random_uuid(), 'g', 'lined', 0, 100 + i, '\\x00', 'waiting', 0, 3, now(), \
                decode(md5((i / 2)::text), 'hex'), 'block' \
         FROM generate_series(1, 20000) AS i",
    )
    .execute(db.pool())
    .await
    .unwrap();

    let (rounded, read) = read_by(&db, &pool, round(1_000_000)).await;
    assert_eq!(rounded, [(1, 1), (1, 1)]);
    assert!(
        read.0 < 100 && read.1 < 100,
        "a round of two rows in a key line read {} rows of the queue and {} of the message table",
        read.0,
        read.1
    );
}

#[tokio::test]
async fn a_key_lines_statements_planned_on_a_table_grown_past_its_statistics_read_their_lines() {
    // The test before this one makes its plans while the table is small. Here the table first
    // grows by 22,000 rows in lines, over four partitions, that no ANALYZE sees (`migrate`
    // analyzed it empty), and only then does a connection plan the capture in key lines and the
    // release of a line. The lines' index and the source key both begin with the group, topic and
    // partition; without statistics the planner estimated one row either way and, at this size,
    // took the source key, whose plan reads every row of the partition for each line it asks
    // about. Since V22 only the lines' index can answer.
    let db = TestDb::new().await;
    sqlx::query("ALTER TABLE redrive.retry_messages SET (autovacuum_enabled = off)")
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO redrive.retry_messages (id, consumer_group, topic, \"partition\", \
         kafka_offset, payload, state, attempts, max_attempts, next_attempt_at, order_key, \
         order_on_dead) \
         SELECT gen_random_uuid(), 'g', 'lined', i % 4, i, convert_to(repeat('x', 1024), 'UTF8'), \
                'pending', 1, 5, now() + interval '1 hour', decode(md5(i::text), 'hex'), 'block' \
         FROM generate_series(1, 22000) AS i",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let (pool, store) = on_one_connection(&db).await;
    let in_line = |offset: i64, key: &str| {
        let mut c = pending("lined", offset, Duration::ZERO, 3);
        c.line = Some(Line::of(key.as_bytes(), OnDead::Block));
        c
    };
    // A hundred failures of new keys, each the first row of its line, and two of one key, whose
    // second waits behind its first.
    let mut batch: Vec<Capture> = (0..100)
        .map(|i| in_line(100_000 + i, &format!("new{i}")))
        .collect();
    batch.extend([in_line(100_100, "pair"), in_line(100_101, "pair")]);
    let (captured, read) = read_by(&db, &pool, store.capture("g", &batch)).await;
    assert_eq!(captured.unwrap(), 102);
    assert!(
        read.1 < 1_000,
        "a capture of 102 rows in key lines read {} rows of the message table",
        read.1
    );
    // Their successes release each line once: one has a row left, which becomes due.
    let rows = store
        .claim("g", 200, Duration::from_secs(60), "w")
        .await
        .unwrap()
        .rows;
    assert_eq!(rows.len(), 101, "the waiting row is not due yet");
    let batch: Vec<Completion> = rows.iter().map(|c| done(c, Outcome::Succeeded)).collect();
    let (completed, read) = read_by(&db, &pool, store.complete(&batch)).await;
    assert_eq!(completed.unwrap().deleted, 101);
    assert!(
        read.1 < 1_000,
        "a completion of 101 rows in key lines, which releases their lines, read {} rows of the \
         message table",
        read.1
    );
    let released = store
        .claim("g", 200, Duration::from_secs(60), "w")
        .await
        .unwrap()
        .rows;
    assert_eq!(
        released
            .iter()
            .map(|c| c.message.offset)
            .collect::<Vec<_>>(),
        [100_101],
        "the line's second row is released"
    );
}

#[tokio::test]
async fn the_key_lines_status_lists_read_the_heads_they_show_and_not_every_line() {
    // 20,000 lines of one row each (1 KiB payloads), beside three that need attention: one whose
    // head is dead on a `block` topic, with a row behind it, and two with rows waiting behind a
    // pending head. The table is vacuumed and analyzed, as autovacuum keeps a table in service.
    // `redrive status` lists the three first, and counts the lines, from the lines' index; it
    // reads only the heads it lists from the table.
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO redrive.retry_messages (id, consumer_group, topic, \"partition\", \
         kafka_offset, key, payload, state, attempts, max_attempts, next_attempt_at, order_key, \
         order_on_dead, dead_at) \
         SELECT gen_random_uuid(), 'g', 'lined', 0, o, convert_to(k, 'UTF8'), \
                convert_to(repeat('x', 1024), 'UTF8'), \
                s, CASE WHEN s = 'waiting' THEN 0 ELSE 1 END, 5, now() + interval '1 hour', \
                decode(md5(k), 'hex'), 'block', CASE WHEN s = 'dead' THEN now() END \
         FROM (SELECT i AS o, 'k' || i AS k, 'pending' AS s FROM generate_series(1, 20000) AS i \
               UNION ALL VALUES (100001, 'dead-head', 'dead'), (100002, 'dead-head', 'waiting'), \
                                (100003, 'two', 'pending'), (100004, 'two', 'waiting'), \
                                (100005, 'two', 'waiting'), (100006, 'one', 'pending'), \
                                (100007, 'one', 'waiting')) AS r(o, k, s)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    vacuum_until_all_visible(&db).await;
    let (pool, store) = on_one_connection(&db).await;
    let (listed, read) = read_by(&db, &pool, store.key_lines(3)).await;
    let (lines, total) = listed.unwrap();
    assert_eq!(total, 20_003);
    assert_eq!(
        key_lines_shown(&lines),
        [
            ("dead-head", 100_001, "dead", true, 1),
            ("two", 100_003, "pending", false, 2),
            ("one", 100_006, "pending", false, 1),
        ]
    );
    assert!(
        read.1 < 100,
        "listing 3 of 20,003 key lines read {} rows of the message table",
        read.1
    );
}

#[tokio::test]
async fn a_queue_row_holds_a_claim_token_only_while_it_runs() {
    // The completions are fenced on the token alone (V19): a row that is not running must not
    // hold one.
    let db = TestDb::new().await;
    db.seed(&[pending("orders", 1, Duration::ZERO, 3)]).await;
    let refused = sqlx::query(
        "UPDATE redrive.queue SET claim_token = gen_random_uuid() WHERE state = 'pending'",
    )
    .execute(db.pool())
    .await
    .expect_err("a pending row took a claim token");
    assert!(
        refused
            .to_string()
            .contains("queue_token_only_while_running"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_completion_reads_its_rows_however_many_others_are_running() {
    // `migrate` analyzes the queue while nothing runs. 3,000 rows are then claimed and stay
    // running, which no ANALYZE sees, beside 20,000 that are not due. A completion names its
    // rows by id and claim token: read through the lease index instead, it would read every
    // running row of every group on each call, and read whole, the queue.
    let db = TestDb::new().await;
    let (pool, store) = on_one_connection(&db).await;
    sqlx::query(
        "INSERT INTO redrive.retry_messages (id, consumer_group, topic, \"partition\", \
         kafka_offset, payload, state, attempts, max_attempts, next_attempt_at) \
         SELECT gen_random_uuid(), 'g', 'orders', 0, i, '\\x00', 'pending', 1, 5, \
                CASE WHEN i <= 3000 THEN now() ELSE now() + interval '1 hour' END \
         FROM generate_series(1, 23000) AS i",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let mut held = Vec::new();
    while held.len() < 3000 {
        let rows = store
            .claim("g", 500, Duration::from_secs(600), "w")
            .await
            .unwrap()
            .rows;
        assert!(!rows.is_empty(), "{} of 3,000 rows claimed", held.len());
        held.extend(rows);
    }
    // Batches as large as a claim's, each of one kind: successes, failures due again, deaths,
    // and a release at shutdown. Each reads its rows once in each table, and the queue's once
    // more through the trigger that keeps it in step.
    let mut batches = held.chunks(100);
    let retry = Outcome::Retry {
        retry_in: Duration::ZERO,
        error: HandlerError::retryable("still failing"),
    };
    let dead = Outcome::Dead {
        error: HandlerError::permanent("refused"),
    };
    for (outcome, kind) in [
        (Outcome::Succeeded, "successes"),
        (retry, "failures"),
        (dead, "deaths"),
    ] {
        let batch: Vec<Completion> = batches
            .next()
            .unwrap()
            .iter()
            .map(|c| done(c, outcome.clone()))
            .collect();
        let (completed, read) = read_by(&db, &pool, store.complete(&batch)).await;
        let completed = completed.unwrap();
        assert_eq!(
            completed.deleted + completed.rescheduled + completed.dead,
            100,
            "{kind}: {completed:?}"
        );
        assert!(
            read.0 <= 200 && read.1 <= 200,
            "a completion of 100 {kind} among 3,000 running read {} rows of the queue and {} of \
             the message table",
            read.0,
            read.1
        );
    }
    let claims: Vec<_> = batches
        .next()
        .unwrap()
        .iter()
        .map(|c| (c.id, c.token))
        .collect();
    let (released, read) = read_by(&db, &pool, store.release(&claims)).await;
    assert_eq!(released.unwrap(), 100);
    assert!(
        read.0 <= 200 && read.1 <= 200,
        "a release of 100 rows among 3,000 running read {} rows of the queue and {} of the \
         message table",
        read.0,
        read.1
    );
    let running: i64 =
        sqlx::query_scalar("SELECT count(*) FROM redrive.queue WHERE state = 'running'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(running, 2600, "the other claims still run");
}

#[tokio::test]
async fn a_claim_ahead_takes_rows_due_soon_with_their_wait_and_leaves_the_rest() {
    let db = TestDb::new().await;
    db.seed(&[
        pending("orders", 1, Duration::from_secs(20), 3),
        pending("orders", 2, Duration::from_secs(3600), 3),
        pending("orders", 3, Duration::ZERO, 3),
    ])
    .await;
    let lease = Duration::from_secs(30);
    let claim = db
        .store
        .claim_ahead("g", 10, lease, "w", Duration::from_secs(60))
        .await
        .unwrap();
    let mut got: Vec<(i64, Duration)> = claim
        .rows
        .iter()
        .map(|r| (r.message.offset, r.wait))
        .collect();
    got.sort_unstable();
    assert_eq!(
        got.len(),
        2,
        "the due row and the one due within a minute: {got:?}"
    );
    assert_eq!(got[0].0, 1);
    assert!(
        got[0].1 > Duration::from_secs(10) && got[0].1 <= Duration::from_secs(20),
        "the row due in 20 s says how long until it is due: {:?}",
        got[0].1
    );
    assert_eq!(got[1], (3, Duration::ZERO), "the due row has no wait");
    // Its lease runs from its due time, not from the claim.
    assert_eq!(
        db.count(
            "kafka_offset = 1 AND state = 'running' \
             AND lease_expires_at >= next_attempt_at + interval '30 seconds'"
        )
        .await,
        1
    );
    // Given back at shutdown, it keeps its due time: released, it is not due early.
    let held = claim
        .rows
        .iter()
        .find(|r| r.message.offset == 1)
        .expect("row 1 was claimed");
    assert_eq!(db.store.release(&[(held.id, held.token)]).await.unwrap(), 1);
    assert!(db.claim(lease).await.is_empty(), "nothing is due yet");
    assert_eq!(
        db.count(
            "kafka_offset = 1 AND state = 'pending' \
             AND next_attempt_at > now() + interval '10 seconds'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn a_claims_unflushed_commit_leaves_its_connection_committing_as_before() {
    let db = TestDb::new().await;
    db.seed(&[pending("orders", 1, Duration::ZERO, 3)]).await;
    // One connection, so the statement after the claim runs where the claim ran.
    let (pool, store) = on_one_connection(&db).await;
    let claim = store
        .claim("g", 10, Duration::from_secs(30), "w")
        .await
        .unwrap();
    assert_eq!(claim.rows.len(), 1);
    let setting: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        setting, "on",
        "only the claim's own transaction skips the flush: a capture on this connection must \
         wait for it, or a crash could lose a row whose offset was committed (I1)"
    );
}

/// The queue holds exactly the rows the table says are pending, through every path that changes a
/// row: capture, claims, completions of each kind, the release, the rescue, and an operator's SQL.
#[tokio::test]
async fn the_queue_follows_every_change_of_a_rows_state() {
    let db = TestDb::new().await;
    let mut dead = pending("orders", 9, Duration::ZERO, 1);
    dead.state = InitialState::Dead;
    db.seed(&[
        pending("orders", 1, Duration::ZERO, 5),
        pending("orders", 2, Duration::ZERO, 5),
        pending("orders", 3, Duration::ZERO, 5),
        pending("orders", 4, Duration::ZERO, 5),
        pending("orders", 5, Duration::ZERO, 2),
        pending("orders", 6, Duration::from_secs(3600), 5),
        dead,
    ])
    .await;
    db.assert_queue_in_step().await;
    assert_eq!(db.count("state = 'pending'").await, 6);

    let claimed = db.claim(Duration::from_secs(30)).await;
    assert_eq!(claimed.len(), 5);
    db.assert_queue_in_step().await;
    assert_eq!(db.count("state = 'running' AND locked_by = 'w'").await, 5);
    let row = |offset: i64| claimed.iter().find(|c| c.message.offset == offset).unwrap();
    let failed = |c| {
        done(
            c,
            Outcome::Retry {
                retry_in: Duration::from_secs(60),
                error: HandlerError::retryable("503"),
            },
        )
    };
    let done_now = db
        .store
        .complete(&[
            done(row(1), Outcome::Succeeded),
            failed(row(2)),
            done(
                row(3),
                Outcome::Dead {
                    error: HandlerError::permanent("400"),
                },
            ),
        ])
        .await
        .unwrap();
    assert_eq!(
        (done_now.deleted, done_now.rescheduled, done_now.dead),
        (1, 1, 1)
    );
    db.assert_queue_in_step().await;
    assert_eq!(db.count("kafka_offset = 1").await, 0);
    assert_eq!(
        db.count("kafka_offset = 2 AND state = 'pending' AND attempts = 2")
            .await,
        1
    );
    assert_eq!(
        db.count("kafka_offset = 3 AND state = 'dead' AND attempts = 2")
            .await,
        1
    );

    // The release gives the attempt back; the rescue counts it, and kills a row on its last one.
    assert_eq!(
        db.store
            .release(&[(row(4).id, row(4).token)])
            .await
            .unwrap(),
        1
    );
    db.assert_queue_in_step().await;
    assert_eq!(
        db.count("kafka_offset = 4 AND state = 'pending' AND attempts = 1")
            .await,
        1
    );
    expire_leases(&db).await;
    let four = db.claim(Duration::from_secs(30)).await;
    assert_eq!(
        four.iter().map(|c| c.message.offset).collect::<Vec<_>>(),
        [4]
    );
    db.assert_queue_in_step().await;
    let gone = db
        .store
        .complete(&[done(&four[0], Outcome::Succeeded)])
        .await
        .unwrap();
    assert_eq!(gone.deleted, 1);
    assert_eq!(
        db.count("kafka_offset = 5 AND state = 'dead' AND error_kind = 'timeout'")
            .await,
        1
    );

    // An operator's SQL on the table: a row paused, resumed, rescheduled, replayed and deleted.
    let shared = &db;
    let by_hand = move |sql: &'static str| async move {
        sqlx::query(sql).execute(shared.pool()).await.unwrap();
        shared.assert_queue_in_step().await;
    };
    by_hand("UPDATE redrive.retry_messages SET state = 'paused' WHERE kafka_offset = 6").await;
    assert_eq!(db.count("kafka_offset = 6 AND state = 'paused'").await, 1);
    by_hand("UPDATE redrive.retry_messages SET state = 'pending' WHERE kafka_offset = 6").await;
    by_hand("UPDATE redrive.retry_messages SET next_attempt_at = now() - interval '1s' WHERE kafka_offset = 6").await;
    by_hand(
        "SELECT redrive.replay(ARRAY(SELECT id FROM redrive.retry_messages WHERE state = 'dead'))",
    )
    .await;
    assert_eq!(db.count("state = 'pending' AND attempts = 0").await, 3);
    let again = db.claim(Duration::from_secs(30)).await;
    assert_eq!(again.len(), 4);
    // Pausing a row by hand while it is attempted takes its claim away, as before the queue: its
    // completion is refused.
    let six = again.iter().find(|c| c.message.offset == 6).unwrap();
    by_hand("UPDATE redrive.retry_messages SET state = 'paused' WHERE kafka_offset = 6").await;
    let refused = db
        .store
        .complete(&[done(six, Outcome::Succeeded)])
        .await
        .unwrap();
    assert_eq!(refused.rejected, 1);
    by_hand("DELETE FROM redrive.retry_messages WHERE kafka_offset = 2").await;
    assert_eq!(db.count("true").await, 4);
}

/// A failure's completion reschedules its rows in the queue itself and tells the queue's trigger so
/// (schema V24), once: a later statement of the same transaction that makes a row pending still
/// gets its queue row.
#[tokio::test]
async fn a_failures_completion_leaves_the_later_statements_of_its_transaction_queued() {
    let db = TestDb::new().await;
    let mut dead = pending("orders", 2, Duration::ZERO, 5);
    dead.state = InitialState::Dead;
    db.seed(&[pending("orders", 1, Duration::ZERO, 5), dead])
        .await;
    let claimed = db.claim(Duration::from_secs(30)).await;
    assert_eq!(claimed.len(), 1);
    let c = &claimed[0];

    let mut tx = db.pool().begin().await.unwrap();
    let states: Vec<String> = sqlx::query_scalar(
        "SELECT redrive.fail_attempts(ARRAY[$1::uuid], ARRAY[$2::uuid], ARRAY[$3::int4], \
         ARRAY['pending'], ARRAY[60::float8], ARRAY['503'], ARRAY['retryable'])",
    )
    .bind(c.id)
    .bind(c.token)
    .bind(c.attempt)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert_eq!(states, ["pending"]);
    sqlx::query("UPDATE redrive.retry_messages SET state = 'pending', dead_at = NULL WHERE kafka_offset = 2")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    db.assert_queue_in_step().await;
    assert_eq!(
        db.count(
            "kafka_offset = 1 AND state = 'pending' AND next_attempt_at > now() + interval '50 s'"
        )
        .await,
        1
    );
    assert_eq!(db.count("kafka_offset = 2 AND state = 'pending'").await, 1);
}

/// A deadlock aborts a statement that succeeds when it runs again, so it is transient: a batch that
/// meets one is retried whole. (Taken for a bad row, it split the batch down to one row and wrote
/// that row in its safe form, without its key and value: key lines lock in more than one order, and
/// the long fault run with key order found DLQ records that had lost their message.)
#[tokio::test]
async fn a_deadlock_is_transient() {
    let db = TestDb::new().await;
    let pool = db.pool();
    for sql in [
        "CREATE TABLE deadlock_test (id int PRIMARY KEY)",
        "INSERT INTO deadlock_test VALUES (1), (2)",
    ] {
        sqlx::query(sql).execute(pool).await.unwrap();
    }
    let (mut a, mut b) = (pool.begin().await.unwrap(), pool.begin().await.unwrap());
    let lock = |id: i32| sqlx::query("UPDATE deadlock_test SET id = id WHERE id = $1").bind(id);
    lock(1).execute(&mut *a).await.unwrap();
    lock(2).execute(&mut *b).await.unwrap();
    let (ra, rb) = tokio::join!(lock(2).execute(&mut *a), lock(1).execute(&mut *b));
    let e = ra.err().or(rb.err()).expect("Postgres broke the deadlock");
    let code = e
        .as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.to_string());
    assert_eq!(code.as_deref(), Some("40P01"));
    assert!(redrive::store::StoreError::Sql(e).is_transient());
}

/// A pooled connection that the server closed while it sat idle (a restart, a proxy's idle
/// timeout) is not handed to a statement: it is pinged first, and the statement gets a new one.
#[tokio::test]
async fn a_connection_closed_while_idle_is_replaced_before_a_statement_uses_it() {
    let db = TestDb::empty().await;
    let config = redrive::config::PostgresConfig {
        url: db.url.clone().into(),
        max_connections: 1,
        connect_timeout: Duration::from_secs(5),
    };
    let store =
        redrive::store::Store::connect(&config, &tokio_util::sync::CancellationToken::new())
            .await
            .unwrap();
    let pid = |pool: &sqlx::PgPool| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                .fetch_one(&pool)
                .await
        }
    };
    let first = pid(store.pool()).await.unwrap();
    // The pool pings a connection as it comes back, in a task of its own; its idle time counts
    // from when it is back.
    wait_for(
        "the connection to be back in the pool",
        Duration::from_secs(30),
        || async { (store.pool().num_idle() == 1).then_some(()) },
    )
    .await;
    let idle_since = tokio::time::Instant::now();
    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    assert!(ended, "backend {first} was terminated");
    wait_for(
        "the backend to be gone",
        Duration::from_secs(30),
        || async {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
                    .bind(first)
                    .fetch_one(db.store.pool())
                    .await
                    .ok()?;
            (left == 0).then_some(())
        },
    )
    .await;
    // The pool's one connection is now closed at the server's end and has been idle for as long
    // as the pool lets a connection go unchecked.
    tokio::time::sleep_until(idle_since + redrive::store::RECHECK_IDLE).await;
    let second = pid(store.pool())
        .await
        .expect("the statement ran on a new connection");
    assert_ne!(first, second);
}

/// Rows of `lines` key lines of group `g`, topic `lined`, over four partitions: each line's first
/// row due in an hour, and a second row waiting behind it.
async fn two_row_lines(db: &TestDb, lines: i64) {
    sqlx::query(
        "INSERT INTO redrive.retry_messages (id, consumer_group, topic, \"partition\", \
         kafka_offset, payload, state, attempts, max_attempts, next_attempt_at, order_key, \
         order_on_dead) \
         SELECT gen_random_uuid(), 'g', 'lined', (i / 2) % 4, i, '\\x00', \
                CASE WHEN i % 2 = 0 THEN 'pending' ELSE 'waiting' END, 1, 5, \
                now() + interval '1 hour', decode(md5((i / 2)::text), 'hex'), 'skip' \
         FROM generate_series(0, 2 * $1 - 1) AS i",
    )
    .bind(lines)
    .execute(db.pool())
    .await
    .unwrap();
}

#[tokio::test]
async fn an_operators_delete_of_the_first_rows_of_40000_key_lines_releases_every_line() {
    // Postgres's lock table holds about 6,400 locks for all its sessions (max_locks_per_transaction
    // × max_connections); a lock per line gave this statement "out of shared memory". Since V23 a
    // change to more than 1,000 lines locks their partitions instead.
    let db = TestDb::new().await;
    two_row_lines(&db, 40_000).await;
    let deleted = sqlx::query(
        "DELETE FROM redrive.retry_messages WHERE topic = 'lined' AND state = 'pending'",
    )
    .execute(db.pool())
    .await
    .expect("one statement may change any number of key lines")
    .rows_affected();
    assert_eq!(deleted, 40_000);
    assert_eq!(db.count("state = 'waiting'").await, 0);
    assert_eq!(
        db.count("state = 'pending' AND next_attempt_at <= now()")
            .await,
        40_000,
        "each line's second row is released, due now"
    );
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM redrive.queue")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(queued, 40_000);
}

/// `redrive.lock_lines` for `n` lines of group `g`, topic `lined`, partition 0 (keys `k0`, `k1`,
/// …), in `tx`.
async fn lock_lines(tx: &mut sqlx::PgConnection, n: usize) {
    let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("k{i}").into_bytes()).collect();
    sqlx::query("SELECT redrive.lock_lines($1, $2, $3, $4)")
        .bind(vec!["g"; n])
        .bind(vec!["lined"; n])
        .bind(vec![0i32; n])
        .bind(keys)
        .execute(tx)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_change_to_many_key_lines_and_a_change_to_one_of_them_wait_for_each_other() {
    // Whichever way each of two writers of a line locks it (one lock per line, or one per
    // partition for a change to more than 1,000 lines), the second waits for the first to commit,
    // so it sees what the first did to the line (I12).
    let db = TestDb::new().await;
    let waiting = || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
             WHERE d.datname = current_database() AND l.locktype = 'advisory' AND NOT l.granted",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        (n > 0).then_some(())
    };
    for (first, second) in [(1_001, 1), (1, 1_001), (1_001, 1_001)] {
        let mut holder = db.pool().begin().await.unwrap();
        lock_lines(&mut holder, first).await;
        let pool = db.pool().clone();
        let other = tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            lock_lines(&mut tx, second).await;
            tx.commit().await.unwrap();
        });
        wait_for(
            &format!("a change to {second} line(s) to wait for one to {first}"),
            Duration::from_secs(30),
            waiting,
        )
        .await;
        assert!(!other.is_finished(), "{second} after {first}");
        holder.commit().await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), other)
            .await
            .expect("the second change goes on once the first committed")
            .unwrap();
    }
}
