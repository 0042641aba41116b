//! Key lines in the store (I12): the rows of one key wait behind the first one, in offset order,
//! and each goes on when the one before it leaves the line.

use crate::helpers::*;
use crate::store::message;
use redrive::handler::HandlerError;
use redrive::store::capture::{Capture, InitialState, Line, OnDead};
use redrive::store::claim::Claimed;
use redrive::store::complete::{Completion, Outcome};
use std::time::Duration;

const LEASE: Duration = Duration::from_secs(30);

/// A message of `key` at `offset` whose first delivery failed, in its key's line.
fn failed(topic: &str, key: &str, offset: i64, on_dead: OnDead) -> Capture {
    first(topic, key, offset, InitialState::Pending, on_dead)
}

/// A message of `key` at `offset` that was not delivered: it waits behind its key's rows.
fn parked(topic: &str, key: &str, offset: i64, on_dead: OnDead) -> Capture {
    first(topic, key, offset, InitialState::Parked, on_dead)
}

fn first(topic: &str, key: &str, offset: i64, state: InitialState, on_dead: OnDead) -> Capture {
    let mut m = message(topic, offset, format!("{key}@{offset}").as_bytes());
    m.key = Some(key.as_bytes().to_vec());
    Capture {
        message: m,
        state,
        max_attempts: 5,
        retry_in: Duration::ZERO,
        error: if state == InitialState::Dead {
            HandlerError::permanent("HTTP 400")
        } else {
            HandlerError::retryable("HTTP 503")
        },
        line: Some(Line::of(key.as_bytes(), on_dead)),
        trace: None,
    }
}

/// The state of the row at `offset` of `topic` (`running` while a worker holds it).
async fn state_at(db: &TestDb, topic: &str, offset: i64) -> String {
    sqlx::query_scalar(
        "SELECT state FROM redrive.messages WHERE consumer_group = 'g' AND topic = $1 AND kafka_offset = $2",
    )
    .bind(topic)
    .bind(offset)
    .fetch_optional(db.pool())
    .await
    .unwrap()
    .unwrap_or_else(|| "gone".into())
}

async fn states(db: &TestDb, topic: &str, offsets: &[i64]) -> Vec<String> {
    let mut out = Vec::new();
    for &o in offsets {
        out.push(state_at(db, topic, o).await);
    }
    out
}

fn offsets(claimed: &[Claimed]) -> Vec<i64> {
    let mut o: Vec<i64> = claimed.iter().map(|c| c.message.offset).collect();
    o.sort();
    o
}

async fn complete(db: &TestDb, claimed: &[Claimed], outcome: Outcome) {
    let batch: Vec<Completion> = claimed
        .iter()
        .map(|c| Completion {
            id: c.id,
            attempt: c.attempt,
            token: c.token,
            outcome: outcome.clone(),
        })
        .collect();
    db.store.complete(&batch).await.unwrap();
}

/// A permanent failure of the attempt.
fn dead() -> Outcome {
    Outcome::Dead {
        error: HandlerError::permanent("HTTP 400"),
    }
}

#[tokio::test]
async fn a_key_line_is_attempted_one_row_at_a_time_in_offset_order() {
    let db = TestDb::new().await;
    let block = OnDead::Block;
    db.seed(&[failed("t", "k1", 1, block), failed("t", "k2", 3, block)])
        .await;
    db.seed(&[parked("t", "k1", 2, block), parked("t", "k1", 4, block)])
        .await;
    assert_eq!(
        states(&db, "t", &[1, 2, 3, 4]).await,
        ["pending", "waiting", "pending", "waiting"]
    );
    db.assert_queue_in_step().await;
    // A waiting row was never delivered: no attempt and no error yet.
    assert_eq!(
        db.count("kafka_offset IN (2, 4) AND attempts = 0 AND last_error IS NULL AND error_history = '[]'")
            .await,
        2
    );

    // Only the first row of each line is claimed; the other key is not held up.
    let claimed = db.claim(LEASE).await;
    assert_eq!(offsets(&claimed), [1, 3]);
    complete(&db, &claimed, Outcome::Succeeded).await;
    assert_eq!(
        states(&db, "t", &[1, 2, 3, 4]).await,
        ["gone", "pending", "gone", "waiting"]
    );
    db.assert_queue_in_step().await;

    // The released row is due at once, and its first attempt is attempt 1.
    let claimed = db.claim(LEASE).await;
    assert_eq!(offsets(&claimed), [2]);
    assert_eq!(claimed[0].attempt, 1);
    // A retry keeps the line: the row behind still waits.
    complete(
        &db,
        &claimed,
        Outcome::Retry {
            retry_in: Duration::ZERO,
            error: HandlerError::retryable("HTTP 503"),
        },
    )
    .await;
    assert_eq!(states(&db, "t", &[2, 4]).await, ["pending", "waiting"]);
    let claimed = db.claim(LEASE).await;
    assert_eq!(offsets(&claimed), [2]);
    complete(&db, &claimed, Outcome::Succeeded).await;
    let claimed = db.claim(LEASE).await;
    assert_eq!(offsets(&claimed), [4]);
    complete(&db, &claimed, Outcome::Succeeded).await;
    assert_eq!(db.count("true").await, 0);
    db.assert_queue_in_step().await;
}

#[tokio::test]
async fn a_batch_parks_its_own_later_rows_behind_its_failure() {
    let db = TestDb::new().await;
    let block = OnDead::Block;
    // One batch: the failure of k@1, then k@2 and k@3 parked behind it, and a message without a
    // key line (unordered) that is not held by anything.
    let mut unordered = failed("t", "k", 4, block);
    unordered.line = None;
    db.seed(&[
        failed("t", "k", 1, block),
        parked("t", "k", 2, block),
        parked("t", "k", 3, block),
        unordered,
    ])
    .await;
    assert_eq!(
        states(&db, "t", &[1, 2, 3, 4]).await,
        ["pending", "waiting", "waiting", "pending"]
    );
    // A parked message whose line is empty when it is stored is not stored: it is open, for the
    // consumer to deliver, as nothing of its key is ahead of it.
    let captured = db
        .store
        .capture_rows("g", &[parked("t", "other", 9, block)])
        .await
        .unwrap();
    assert_eq!(captured.inserted, 0);
    assert_eq!(captured.open, [("t".to_string(), 0, 9)]);
    assert_eq!(state_at(&db, "t", 9).await, "gone");
    db.assert_queue_in_step().await;
}

#[tokio::test]
async fn a_dead_row_blocks_its_line_until_an_operator_lets_it_go() {
    let db = TestDb::new().await;
    let block = OnDead::Block;
    // Dead at once (a permanent error), then the next message of the key is parked behind it.
    db.seed(&[first("t", "k", 1, InitialState::Dead, block)])
        .await;
    db.seed(&[parked("t", "k", 2, block), parked("t", "k", 3, block)])
        .await;
    assert_eq!(
        states(&db, "t", &[1, 2, 3]).await,
        ["dead", "waiting", "waiting"]
    );
    assert!(db.claim(LEASE).await.is_empty());

    // Replayed, the dead row is the line's first again, and the others still wait for it.
    let id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM redrive.retry_messages WHERE kafka_offset = 1")
            .fetch_one(db.pool())
            .await
            .unwrap();
    sqlx::query("SELECT redrive.replay(ARRAY[$1])")
        .bind(id)
        .execute(db.pool())
        .await
        .unwrap();
    assert_eq!(
        states(&db, "t", &[1, 2, 3]).await,
        ["pending", "waiting", "waiting"]
    );
    let claimed = db.claim(LEASE).await;
    assert_eq!(offsets(&claimed), [1]);
    // It dies again; an operator purges it, and the next row goes on.
    complete(&db, &claimed, dead()).await;
    assert_eq!(states(&db, "t", &[1, 2]).await, ["dead", "waiting"]);
    sqlx::query("DELETE FROM redrive.retry_messages WHERE kafka_offset = 1")
        .execute(db.pool())
        .await
        .unwrap();
    assert_eq!(states(&db, "t", &[2, 3]).await, ["pending", "waiting"]);
    db.assert_queue_in_step().await;
}

#[tokio::test]
async fn with_the_skip_policy_a_dead_row_lets_its_line_go_on() {
    let db = TestDb::new().await;
    let skip = OnDead::Skip;
    // Dead at capture: it holds nothing, so the next message of the key is open.
    db.seed(&[first("t", "k", 1, InitialState::Dead, skip)])
        .await;
    let captured = db
        .store
        .capture_rows("g", &[parked("t", "k", 2, skip)])
        .await
        .unwrap();
    assert_eq!(captured.open, [("t".to_string(), 0, 2)]);
    // Delivered, it fails, and the next one waits behind it.
    db.seed(&[failed("t", "k", 2, skip), parked("t", "k", 3, skip)])
        .await;
    assert_eq!(
        states(&db, "t", &[1, 2, 3]).await,
        ["dead", "pending", "waiting"]
    );
    // Dead after its attempts: the row behind it is released.
    let claimed = db.claim(LEASE).await;
    assert_eq!(offsets(&claimed), [2]);
    complete(&db, &claimed, dead()).await;
    assert_eq!(states(&db, "t", &[2, 3]).await, ["dead", "pending"]);
    db.assert_queue_in_step().await;
}

/// A redelivered message of a key line finds its row and adds nothing (I2): not a second row, and
/// not a row parked behind its own.
#[tokio::test]
async fn a_redelivered_message_of_a_line_keeps_one_row() {
    let db = TestDb::new().await;
    let block = OnDead::Block;
    let head = failed("t", "k", 1, block);
    let behind = parked("t", "k", 2, block);
    db.seed(&[head.clone(), behind.clone()]).await;
    assert_eq!(db.store.capture("g", &[head, behind]).await.unwrap(), 0);
    assert_eq!(db.count("true").await, 2);
    assert_eq!(states(&db, "t", &[1, 2]).await, ["pending", "waiting"]);
    db.assert_queue_in_step().await;
}

/// A batch in key lines stores records as odd as any other batch does (I10): a tombstone with no
/// timestamp, a key that is not UTF-8, a header name with a NUL byte, an error with a NUL
/// character, and a value that is not UTF-8 parked behind them. Nothing is lost or changed but the
/// error text, made safe.
#[tokio::test]
async fn odd_records_in_a_key_line_are_stored_byte_for_byte() {
    use redrive::message::Header;
    let db = TestDb::new().await;
    let key = vec![0xff, 0x00, 0xfe];
    let line = Some(Line::of(&key, OnDead::Block));
    let mut head = failed("t", "x", 1, OnDead::Block);
    head.message.key = Some(key.clone());
    head.message.payload = None;
    head.message.timestamp = None;
    head.message.headers = vec![Header {
        key: b"a\0b".to_vec(),
        value: None,
    }];
    head.error = HandlerError::retryable("bad\0byte");
    head.line = line;
    let mut behind = parked("t", "x", 2, OnDead::Block);
    behind.message.key = Some(key.clone());
    behind.message.payload = Some(vec![0, 0x9f, 0x92, 0x96]);
    behind.line = line;
    let captured = db
        .store
        .capture_rows("g", &[head.clone(), behind.clone()])
        .await
        .unwrap();
    assert_eq!((captured.inserted, captured.open.len()), (2, 0));
    // Offset, state, key, value, error, and whether the timestamp is missing.
    type Stored = (
        i64,
        String,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        Option<String>,
        bool,
    );
    let rows: Vec<Stored> = sqlx::query_as(
        "SELECT kafka_offset, state, key, payload, last_error, kafka_timestamp IS NULL
             FROM redrive.retry_messages ORDER BY kafka_offset",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            (
                1,
                "pending".to_string(),
                Some(key.clone()),
                None,
                Some("bad\\0byte".to_string()),
                true
            ),
            (
                2,
                "waiting".to_string(),
                Some(key.clone()),
                behind.message.payload.clone(),
                None,
                false
            ),
        ]
    );
    let headers: serde_json::Value =
        sqlx::query_scalar("SELECT headers FROM redrive.retry_messages WHERE kafka_offset = 1")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(headers, head.message.headers_json());
}

/// A parked message stored while the row ahead of it succeeds, from two connections at once: the
/// parked row is never left waiting behind a line that has emptied. Either it waits, and the
/// success releases it, or it finds the line empty and comes back open, unstored.
#[tokio::test]
async fn parking_and_a_success_at_once_never_strand_a_row() {
    let db = TestDb::new().await;
    let block = OnDead::Block;
    let mut opened_after_success = 0;
    for i in 0..60_i64 {
        let key = format!("k{i}");
        db.seed(&[failed("t", &key, i * 10, block)]).await;
        let claimed = db.claim(LEASE).await;
        assert_eq!(offsets(&claimed), [i * 10]);
        let later = parked("t", &key, i * 10 + 1, block);
        let (captured, ()) = tokio::join!(
            db.store.capture_rows("g", std::slice::from_ref(&later)),
            complete(&db, &claimed, Outcome::Succeeded),
        );
        let captured = captured.unwrap();
        if captured.inserted == 1 {
            assert_eq!(
                states(&db, "t", &[i * 10, i * 10 + 1]).await,
                ["gone", "pending"],
                "iteration {i}: the parked row waits behind nothing"
            );
            let claimed = db.claim(LEASE).await;
            assert_eq!(offsets(&claimed), [i * 10 + 1]);
            complete(&db, &claimed, Outcome::Succeeded).await;
        } else {
            opened_after_success += 1;
            assert_eq!(captured.open, [("t".to_string(), 0, i * 10 + 1)]);
            assert_eq!(
                states(&db, "t", &[i * 10, i * 10 + 1]).await,
                ["gone", "gone"],
                "iteration {i}: an open message is not stored"
            );
        }
    }
    tracing::debug!(opened_after_success, "parks that found the line empty");
    db.assert_queue_in_step().await;
}

/// `redrive status` and `redrive.key_lines` show which keys wait, behind what, and which need an
/// operator.
#[tokio::test]
async fn status_and_the_key_lines_view_show_what_waits_behind_what() {
    let db = TestDb::new().await;
    let block = OnDead::Block;
    db.seed(&[
        first("t", "stuck", 1, InitialState::Dead, block),
        parked("t", "stuck", 2, block),
        parked("t", "stuck", 3, block),
        failed("t", "retrying", 4, block),
        parked("t", "retrying", 5, block),
    ])
    .await;
    let s = db
        .store
        .status(
            Duration::from_secs(3600),
            5,
            redrive::store::status::Limits::DEFAULT,
        )
        .await
        .unwrap();
    assert_eq!(s.topics[0].waiting, 3);
    assert_eq!(s.topics[0].pending, 1);
    assert_eq!(s.key_lines_total, 2);
    assert_eq!(
        key_lines_shown(&s.key_lines),
        [
            ("stuck", 1, "dead", true, 2),
            ("retrying", 4, "pending", false, 1)
        ]
    );
    let text = redrive::ops::status::render(&s, "db");
    assert!(text.contains("dead: replay or purge it"), "{text}");
    // Each waiting row finds its head in the view.
    let behind: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT w.kafka_offset, l.head_offset FROM redrive.retry_messages w \
         JOIN redrive.key_lines l USING (consumer_group, topic, \"partition\", order_key) \
         WHERE w.state = 'waiting' ORDER BY 1",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(behind, [(2, 1), (3, 1), (5, 4)]);
}

/// Replaying a row its line had skipped keeps the line's order: while the line has a row under
/// way, the replayed row waits, and goes first once that row leaves.
#[tokio::test]
async fn a_replayed_skipped_row_waits_for_the_row_under_way_then_goes_first() {
    let db = TestDb::new().await;
    let skip = OnDead::Skip;
    db.seed(&[first("t", "k", 1, InitialState::Dead, skip)])
        .await;
    db.seed(&[failed("t", "k", 2, skip), parked("t", "k", 3, skip)])
        .await;
    let replay = |offsets: &'static [i64]| {
        let pool = db.pool().clone();
        async move {
            sqlx::query(
                "SELECT redrive.replay(array_agg(id)) FROM redrive.retry_messages \
                 WHERE kafka_offset = ANY($1)",
            )
            .bind(offsets)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    replay(&[1]).await;
    assert_eq!(
        states(&db, "t", &[1, 2, 3]).await,
        ["waiting", "pending", "waiting"]
    );
    let claimed = db.claim(LEASE).await;
    assert_eq!(
        offsets(&claimed),
        [2],
        "only the row under way is attempted"
    );
    complete(&db, &claimed, Outcome::Succeeded).await;
    assert_eq!(states(&db, "t", &[1, 3]).await, ["pending", "waiting"]);
    let claimed = db.claim(LEASE).await;
    assert_eq!(offsets(&claimed), [1]);
    complete(&db, &claimed, dead()).await;
    assert_eq!(states(&db, "t", &[1, 3]).await, ["dead", "pending"]);
    let claimed = db.claim(LEASE).await;
    complete(&db, &claimed, dead()).await;

    // Two skipped rows of a line with nothing under way, replayed together: the lower goes first.
    replay(&[1, 3]).await;
    assert_eq!(states(&db, "t", &[1, 3]).await, ["pending", "waiting"]);
    let claimed = db.claim(LEASE).await;
    assert_eq!(offsets(&claimed), [1]);
    complete(&db, &claimed, Outcome::Succeeded).await;
    assert_eq!(state_at(&db, "t", 3).await, "pending");
    db.assert_queue_in_step().await;
}

/// An operator's replay or purge of a key's dead head, from another connection while the next
/// message of the key is parked, in a loop: the parked message is never lost, never strands
/// behind nothing, and never goes ahead of a replayed head.
#[tokio::test]
async fn replay_and_purge_of_a_dead_head_racing_a_park_keep_the_line() {
    let db = TestDb::new().await;
    let block = OnDead::Block;
    for i in 0..60_i64 {
        let (key, head, next) = (format!("k{i}"), i * 10, i * 10 + 1);
        db.seed(&[first("t", &key, head, InitialState::Dead, block)])
            .await;
        let id: uuid::Uuid =
            sqlx::query_scalar("SELECT id FROM redrive.retry_messages WHERE kafka_offset = $1")
                .bind(head)
                .fetch_one(db.pool())
                .await
                .unwrap();
        let replaying = i % 2 == 0;
        let operator = async {
            let sql = if replaying {
                "SELECT redrive.replay(ARRAY[$1])"
            } else {
                "DELETE FROM redrive.retry_messages WHERE id = $1"
            };
            sqlx::query(sql).bind(id).execute(db.pool()).await.unwrap();
        };
        let later = parked("t", &key, next, block);
        let (captured, ()) = tokio::join!(
            db.store.capture_rows("g", std::slice::from_ref(&later)),
            operator,
        );
        let captured = captured.unwrap();
        let got = states(&db, "t", &[head, next]).await;
        if replaying {
            // The head is the line's first again: the parked row waits behind it, whichever
            // came first.
            assert_eq!(got, ["pending", "waiting"], "iteration {i}");
            assert!(captured.open.is_empty(), "iteration {i}");
            let claimed = db.claim(LEASE).await;
            assert_eq!(offsets(&claimed), [head], "iteration {i}");
            complete(&db, &claimed, Outcome::Succeeded).await;
        } else if captured.open.is_empty() {
            // Parked first, then released by the purge.
            assert_eq!(got, ["gone", "pending"], "iteration {i}");
        } else {
            // Purged first: the line was empty, the message comes back to be delivered.
            assert_eq!(got, ["gone", "gone"], "iteration {i}");
            continue;
        }
        let claimed = db.claim(LEASE).await;
        assert_eq!(offsets(&claimed), [next], "iteration {i}");
        complete(&db, &claimed, Outcome::Succeeded).await;
    }
    assert_eq!(db.count("true").await, 0);
    db.assert_queue_in_step().await;
}
