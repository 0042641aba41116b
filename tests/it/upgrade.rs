//! Upgrades: a database that an older redrive filled, migrated the rest of the way, keeps every row,
//! and this redrive goes on from where the older one stopped. Rows due are retried (a claim whose
//! worker is gone among them), rows not due wait, dead rows reach the DLQ once, and the operator
//! commands work on them.

use crate::helpers::*;
use rdkafka::message::{Headers, Message as _};
use redrive::cli::RunArgs;
use std::collections::BTreeMap;
use std::time::Duration;
use uuid::Uuid;

/// A fresh database left at schema `version`, filled by `rows` (SQL of that version, where
/// `{group}` and `{topic}` stand for the test's own), then migrated to this build's schema.
async fn upgraded(version: i32, rows: &str, group: &str, topic: &str) -> TestDb {
    let db = TestDb::empty().await;
    let applied = redrive::store::migrate::run_to(&db.url.clone().into(), Some(version))
        .await
        .unwrap();
    assert_eq!(applied.last().map(|m| m.version), Some(version));
    let rows = rows.replace("{group}", group).replace("{topic}", topic);
    sqlx::raw_sql(&rows).execute(db.pool()).await.unwrap();
    let applied = redrive::store::migrate::run(&db.url.clone().into())
        .await
        .unwrap();
    assert_eq!(
        applied.first().map(|m| m.version),
        Some(version + 1),
        "the rest of the migrations"
    );
    assert_eq!(
        applied.last().map(|m| m.version),
        Some(redrive::store::migrate::required_version())
    );
    db
}

/// Each row's state as the views show it (`running` for a row being attempted), by payload; a dead
/// row the DLQ broker acknowledged is `dead, published`.
async fn states(db: &TestDb) -> BTreeMap<String, String> {
    sqlx::query_as(
        "SELECT payload_text, state || CASE WHEN dlq_published_at IS NOT NULL \
                THEN ', published' ELSE '' END FROM redrive.messages",
    )
    .fetch_all(db.pool())
    .await
    .unwrap()
    .into_iter()
    .collect()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Runs the retry workers and the DLQ publisher of this build on an upgraded database, with a
/// handler that succeeds, until `done` holds; returns the payloads the handler received, each with
/// its attempt number and when it came, in payload order.
async fn run_until(
    db: &TestDb,
    group: &str,
    topic: &str,
    what: &str,
    done: impl Fn(&BTreeMap<String, String>) -> bool,
) -> Vec<(String, u32, chrono::DateTime<chrono::Utc>)> {
    let stub = Stub::start(|_| (200, vec![])).await;
    let parts = RunArgs {
        no_consumer: true,
        no_http: true,
        ..RunArgs::default()
    };
    let (stop, app) = spawn_app(config(&db.url, &[topic], group, Some(stub.addr), ""), parts);
    wait_for(what, Duration::from_secs(60), || async {
        done(&states(db).await).then_some(())
    })
    .await;
    stop.cancel();
    app.await.unwrap().unwrap();
    let mut got: Vec<_> = stub
        .all()
        .iter()
        .map(|r| {
            (
                String::from_utf8_lossy(&r.body).into_owned(),
                r.attempt(),
                r.at,
            )
        })
        .collect();
    got.sort();
    got
}

/// The payloads and attempt numbers of what the handler received.
fn attempts(received: &[(String, u32, chrono::DateTime<chrono::Utc>)]) -> Vec<(&str, u32)> {
    received.iter().map(|(p, n, _)| (p.as_str(), *n)).collect()
}

/// Reads the DLQ topic's records: payload and `redrive.id` header of each.
async fn dlq_records(topic: &str, n: usize) -> Vec<(String, String)> {
    read_topic(
        &kafka(),
        &format!("{topic}.dlq"),
        n,
        Duration::from_secs(60),
    )
    .await
    .iter()
    .map(|m| {
        let id = m
            .headers()
            .unwrap()
            .iter()
            .find(|h| h.key == redrive::dlq::headers::ID)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        (
            String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            id,
        )
    })
    .collect()
}

#[tokio::test]
async fn a_database_filled_by_the_first_schema_keeps_every_row_and_goes_on() {
    let (group, topic) = (unique("g"), unique("upgrade-v1"));
    create_topic(&format!("{topic}.dlq"), 1).await;
    let dead = Uuid::now_v7();
    let history =
        r#"[{"at": "2026-01-01T00:00:00Z", "attempt": 1, "kind": "retryable", "error": "503"}]"#;
    // Schema V1: states pending, running (the lease on the row) and dead.
    let rows = format!(
        r#"
        INSERT INTO redrive.retry_messages (id, consumer_group, topic, "partition", kafka_offset,
            kafka_timestamp, key, payload, state, attempts, max_attempts, next_attempt_at,
            lease_expires_at, locked_by, last_error, error_kind, error_history, dead_at,
            dlq_published_at, dlq_topic)
        VALUES
          ('{due}', '{{group}}', '{{topic}}', 0, 10, now(), 'k', 'due', 'pending', 1, 5,
           now() - interval '1 second', NULL, NULL, '503', 'retryable', '{history}', NULL, NULL, NULL),
          ('{later}', '{{group}}', '{{topic}}', 0, 11, now(), 'k', 'later', 'pending', 1, 5,
           now() + interval '1 hour', NULL, NULL, '503', 'retryable', '{history}', NULL, NULL, NULL),
          ('{claimed}', '{{group}}', '{{topic}}', 1, 10, now(), NULL, 'claimed', 'running', 2, 5,
           now() - interval '1 minute', now() - interval '1 second', 'a worker of the old build',
           '503', 'retryable', '{history}', NULL, NULL, NULL),
          ('{dead}', '{{group}}', '{{topic}}', 1, 11, now(), NULL, 'dead', 'dead', 3, 3,
           now(), NULL, NULL, '400', 'permanent', '[]', now(), NULL, NULL),
          ('{sent}', '{{group}}', '{{topic}}', 1, 12, now(), NULL, 'sent', 'dead', 3, 3,
           now(), NULL, NULL, '400', 'permanent', '[]', now() - interval '1 day',
           now() - interval '1 day', '{{topic}}.dlq');
        "#,
        due = Uuid::now_v7(),
        later = Uuid::now_v7(),
        claimed = Uuid::now_v7(),
        sent = Uuid::now_v7(),
    );
    let db = upgraded(1, &rows, &group, &topic).await;

    assert_eq!(
        states(&db).await,
        map(&[
            ("due", "pending"),
            ("later", "pending"),
            ("claimed", "running"),
            ("dead", "dead"),
            ("sent", "dead, published"),
        ]),
        "every row kept, the claim still running"
    );
    db.assert_queue_in_step().await;
    let kept: (String, serde_json::Value, i32) = sqlx::query_as(
        "SELECT last_error, error_history, incarnation FROM redrive.retry_messages \
         WHERE payload = 'due'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(
        (kept.0.as_str(), kept.1, kept.2),
        ("503", serde_json::from_str(history).unwrap(), 0)
    );

    let received = run_until(
        &db,
        &group,
        &topic,
        "the due rows retried and the dead one published",
        |s| {
            *s == map(&[
                ("later", "pending"),
                ("dead", "dead, published"),
                ("sent", "dead, published"),
            ])
        },
    )
    .await;
    // The claim whose worker is gone was rescued, its lease having run out, and attempted again.
    assert_eq!(attempts(&received), [("claimed", 3), ("due", 2)]);
    assert_eq!(
        dlq_records(&topic, 1).await,
        vec![("dead".to_string(), dead.to_string())],
        "the unpublished dead row, once; the published one not again"
    );
    // The operator commands of this build on the old rows.
    let ops = ops_config(&db.url);
    let status = redrive(&ops.0, &["status"]).await.ok();
    assert!(status.stdout.contains(&topic), "{}", status.stdout);
    let replay = redrive(
        &ops.0,
        &["replay", "--topic", &topic, "--reason", "after the upgrade"],
    )
    .await
    .ok();
    assert!(
        replay.stdout.contains("replayed 2 row"),
        "{}",
        replay.stdout
    );
    let received = run_until(&db, &group, &topic, "the replayed rows delivered", |s| {
        *s == map(&[("later", "pending")])
    })
    .await;
    assert_eq!(
        attempts(&received),
        [("dead", 1), ("sent", 1)],
        "a replay starts a fresh budget"
    );
    db.assert_queue_in_step().await;
}

#[tokio::test]
async fn a_database_filled_before_the_queue_keeps_its_claims_pauses_and_dead_rows() {
    let (group, topic) = (unique("g"), unique("upgrade-v7"));
    create_topic(&format!("{topic}.dlq"), 1).await;
    // Schema V7, the last before the queue: the lease on the row, pauses, replayed rows, refused
    // DLQ records and incarnations. Columns left out take their defaults.
    let rows = r#"
        INSERT INTO redrive.retry_messages (id, consumer_group, topic, "partition", kafka_offset,
            incarnation, payload, state, attempts, max_attempts, next_attempt_at, lease_expires_at,
            locked_by, claim_token, last_error, error_kind, dead_at, dlq_published_at, dlq_topic,
            dlq_error, dlq_refused_at, replay_count, replayed_to_topic)
        VALUES
          (gen_random_uuid(), '{group}', '{topic}', 0, 20, 0, 'first', 'dead', 3, 3, now(), NULL,
           NULL, NULL, '400', 'permanent', now() - interval '1 day', now() - interval '1 day',
           '{topic}.dlq', NULL, NULL, 0, NULL),
          (gen_random_uuid(), '{group}', '{topic}', 0, 20, 1, 'again', 'pending', 1, 5,
           now() - interval '1 second', NULL, NULL, NULL, '503', 'retryable', NULL, NULL, NULL,
           NULL, NULL, 0, NULL),
          (gen_random_uuid(), '{group}', '{topic}', 0, 21, 0, 'live', 'running', 1, 5,
           now() - interval '1 minute', now() + interval '3 seconds', 'a worker of the old build',
           gen_random_uuid(), '503', 'retryable', NULL, NULL, NULL, NULL, NULL, 0, NULL),
          (gen_random_uuid(), '{group}', '{topic}-paused', 0, 0, 0, 'held', 'paused', 1, 5,
           now() - interval '1 second', NULL, NULL, NULL, '503', 'retryable', NULL, NULL, NULL,
           NULL, NULL, 0, NULL),
          (gen_random_uuid(), '{group}', '{topic}', 0, 22, 0, 'unsent', 'dead', 3, 3, now(), NULL,
           NULL, NULL, '400', 'permanent', now(), NULL, NULL, NULL, NULL, 0, NULL),
          (gen_random_uuid(), '{group}', '{topic}', 0, 23, 0, 'refused', 'dead', 3, 3, now(), NULL,
           NULL, NULL, '400', 'permanent', now(), NULL, NULL, 'Broker: Message size too large',
           now(), 0, NULL),
          (gen_random_uuid(), '{group}', '{topic}', 0, 24, 0, 'replayed', 'replayed', 3, 3, now(),
           NULL, NULL, NULL, '400', 'permanent', now(), now(), '{topic}.dlq', NULL, NULL, 1,
           '{topic}.fixed');
        INSERT INTO redrive.paused_topics (consumer_group, topic, reason)
        VALUES ('*', '{topic}-paused', 'maintenance');
    "#;
    let db = upgraded(7, rows, &group, &topic).await;

    assert_eq!(
        states(&db).await,
        map(&[
            ("first", "dead, published"),
            ("again", "pending"),
            ("live", "running"),
            ("held", "paused"),
            ("unsent", "dead"),
            ("refused", "dead"),
            ("replayed", "replayed, published"),
        ]),
        "every row kept, the live claim still running"
    );
    db.assert_queue_in_step().await;
    let lease: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "SELECT q.lease_expires_at FROM redrive.queue q JOIN redrive.retry_messages r USING (id) \
         WHERE r.payload = 'live' AND q.state = 'running'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();

    let received = run_until(
        &db,
        &group,
        &topic,
        "the due rows retried and the unsent dead row published",
        |s| {
            *s == map(&[
                ("first", "dead, published"),
                ("held", "paused"),
                ("unsent", "dead, published"),
                ("refused", "dead"),
                ("replayed", "replayed, published"),
            ])
        },
    )
    .await;
    assert_eq!(attempts(&received), [("again", 2), ("live", 2)]);
    let live = received.iter().find(|r| r.0 == "live").unwrap().2;
    assert!(
        live >= lease,
        "the old build's claim was kept until its lease ran out ({lease}), attempted at {live}"
    );
    assert_eq!(
        dlq_records(&topic, 1).await[0].0,
        "unsent",
        "the DLQ's record; the refused row waits for an operator"
    );

    let resumed: i64 = sqlx::query_scalar("SELECT redrive.resume($1)")
        .bind(format!("{topic}-paused"))
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(resumed, 1);
    let received = run_until(&db, &group, &topic, "the resumed row retried", |s| {
        !s.contains_key("held")
    })
    .await;
    assert_eq!(attempts(&received), [("held", 2)]);
    db.assert_queue_in_step().await;
}

/// An order event of about `lines` × 62 bytes, as JSON: repeated field names, numbers that differ.
fn event(lines: usize) -> Vec<u8> {
    let lines: Vec<String> = (0..lines)
        .map(|i| {
            format!(
                r#"{{"line":{i},"sku":"SKU-{:012X}","quantity":{},"gift_wrap":{}}}"#,
                (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16,
                i % 9 + 1,
                i.is_multiple_of(3)
            )
        })
        .collect();
    format!(r#"{{"order":"ord-1","lines":[{}]}}"#, lines.join(",")).into_bytes()
}

/// Whether this Postgres was built with lz4: only then does schema V27 take it.
async fn has_lz4(db: &TestDb) -> bool {
    let mut c = db.pool().acquire().await.unwrap();
    match sqlx::query("CREATE TEMP TABLE lz4_probe (b bytea COMPRESSION lz4)")
        .execute(&mut *c)
        .await
    {
        Ok(_) => true,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("0A000") => false,
        Err(e) => panic!("probing for lz4: {e}"),
    }
}

#[tokio::test]
async fn large_values_stored_before_and_after_lz4_read_back_alike() {
    // Group "g", the one `TestDb::seed` and `TestDb::claim` use.
    let topic = unique("upgrade-v26");
    // A row of schema V26, its payload over the TOAST threshold: compressed with pglz.
    let rows = r#"
        INSERT INTO redrive.retry_messages (id, consumer_group, topic, "partition", kafka_offset,
            payload, state, attempts, max_attempts, next_attempt_at, last_error, error_kind)
        SELECT gen_random_uuid(), 'g', '{topic}', 0, 1, convert_to(repeat('{"sku": "SKU-1", ', 1000)
            || '0}', 'UTF8'), 'pending', 1, 5, now() - interval '1 second', '503', 'retryable';
    "#;
    let db = upgraded(26, rows, "g", &topic).await;
    let lz4 = has_lz4(&db).await;

    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT attname::text, attcompression::text FROM pg_attribute \
         WHERE attrelid = 'redrive.retry_messages'::regclass AND attcompression <> '' \
         ORDER BY attname",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let expected: Vec<(String, String)> = match lz4 {
        true => ["error_history", "headers", "key", "last_error", "payload"]
            .iter()
            .map(|c| (c.to_string(), "l".to_string()))
            .collect(),
        // Without lz4 the migration leaves every column to Postgres's default.
        false => vec![],
    };
    assert_eq!(columns, expected, "the columns V27 compresses with lz4");

    // A row of this build: a large payload, key, headers and error.
    let payload = event(200);
    let key = event(40);
    let headers = vec![
        redrive::Header::new("ce-type", Some(event(30))),
        redrive::Header::new("trace", None),
        redrive::Header {
            key: vec![0xff, 0x00, b'x'],
            value: Some(event(30)),
        },
    ];
    let error = String::from_utf8(event(40)).unwrap();
    db.seed(&[redrive::store::capture::Capture {
        message: redrive::Message {
            topic: topic.clone(),
            partition: 0,
            offset: 2,
            timestamp: Some(chrono::Utc::now()),
            key: Some(key.clone()),
            payload: Some(payload.clone()),
            headers: headers.clone(),
        },
        retry_in: Duration::ZERO,
        error: redrive::handler::HandlerError::retryable(error.clone()),
        ..crate::store::pending(&topic, 2, Duration::ZERO, 5)
    }])
    .await;

    let methods: BTreeMap<i64, Option<String>> = sqlx::query_as(
        "SELECT kafka_offset, pg_column_compression(payload) FROM redrive.retry_messages \
         WHERE topic = $1",
    )
    .bind(&topic)
    .fetch_all(db.pool())
    .await
    .unwrap()
    .into_iter()
    .collect();
    let now = if lz4 { "lz4" } else { "pglz" };
    assert_eq!(
        methods,
        BTreeMap::from([(1, Some("pglz".into())), (2, Some(now.into()))]),
        "the row stored before V27 keeps pglz; the new one takes {now}"
    );
    let (errors, history): (String, String) = sqlx::query_as(
        "SELECT last_error, error_history::text FROM redrive.retry_messages WHERE kafka_offset = 2 \
         AND topic = $1",
    )
    .bind(&topic)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(errors.contains(r#""line":39"#), "the error kept whole");
    assert!(history.contains(r#"\"line\":39"#), "the history kept whole");

    // Both are claimed and read back byte for byte.
    let claimed = db.claim(Duration::from_secs(30)).await;
    let by_offset: BTreeMap<i64, redrive::Message> = claimed
        .into_iter()
        .map(|c| (c.message.offset, c.message))
        .collect();
    assert_eq!(by_offset.len(), 2, "both rows claimed: {by_offset:?}");
    let old = &by_offset[&1];
    let mut old_payload = r#"{"sku": "SKU-1", "#.repeat(1000).into_bytes();
    old_payload.extend_from_slice(b"0}");
    assert_eq!(old.payload.as_deref(), Some(&old_payload[..]));
    let new = &by_offset[&2];
    assert_eq!(new.payload.as_deref(), Some(&payload[..]));
    assert_eq!(new.key.as_deref(), Some(&key[..]));
    assert_eq!(new.headers, headers);
}
