//! Bad data never stalls a pipeline (I10): text Postgres refuses, header names that are not UTF-8,
//! bursts of large records, a row or a completion Postgres refuses, a panicking handler, a DLQ
//! record the broker refuses, a stored row that cannot be read. Each fails alone, is kept, and lets
//! the rest flow.

use crate::helpers::*;
use crate::store::{message, pending};
use redrive::capturer::capturer;
use redrive::cli::RunArgs;
use redrive::config::ConsumerConfig;
use redrive::handler::{Delivery, Handler, HandlerError};
use redrive::message::Header;
use redrive::store::capture::{Capture, InitialState};
use redrive::store::status::Limits;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn only(consumer: bool, workers: bool, dlq: bool) -> RunArgs {
    RunArgs {
        no_consumer: !consumer,
        no_workers: !workers,
        no_dlq: !dlq,
        no_http: true,
    }
}

/// Fast retries, three attempts in all.
const FAST_RETRIES: &str = "[retry]\nmax_attempts = 3\ninitial_delay = \"50ms\"\njitter = 0.0\n";

async fn rows_where(db: &TestDb, filter: &str, wanted: i64, limit: Duration) {
    wait_for(&format!("{wanted} rows where {filter}"), limit, || async {
        (db.count(filter).await == wanted).then_some(())
    })
    .await;
}

async fn committed_to(group: &str, topic: &str, offset: i64) {
    wait_for(
        &format!("offset {offset} committed"),
        Duration::from_secs(60),
        || async { (committed(group, topic, 0) == Some(offset)).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_nul_in_an_error_body_is_stored_escaped_through_capture_completion_and_history() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("nul"), unique("g"));
    create_topic(&topic, 1).await;
    let stub = Stub::start_with_body(|_| (500, vec![], b"bad\0thing".to_vec())).await;
    let config = config(&db.url, &[&topic], &group, Some(stub.addr), FAST_RETRIES);
    let (stop, app) = spawn_app(config, only(true, true, false));
    produce(&producer(&kafka()), &topic, None, Some(b"x"), &[]).await;

    committed_to(&group, &topic, 1).await;
    rows_where(
        &db,
        "state = 'dead' AND attempts = 3",
        1,
        Duration::from_secs(60),
    )
    .await;
    let (last, history): (String, Vec<String>) = sqlx::query_as(
        "SELECT last_error, ARRAY(SELECT e ->> 'error' FROM jsonb_array_elements(error_history) e)
         FROM redrive.retry_messages",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(last.ends_with(r"answered 500: bad\0thing"), "{last}");
    assert_eq!(history.len(), 3, "capture and both retries: {history:?}");
    assert!(
        history.iter().all(|e| e.contains(r"bad\0thing")),
        "{history:?}"
    );
    stop.cancel();
    app.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_header_name_that_is_not_utf8_is_kept_and_dead_lettered_byte_for_byte() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("hdr"), unique("g"));
    create_topic(&topic, 1).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    let stub = Stub::start(|_| (400, vec![])).await;
    let config = config(&db.url, &[&topic], &group, Some(stub.addr), "");
    let (stop, app) = spawn_app(config, only(true, false, true));
    let headers = vec![
        Header {
            key: vec![0xff, 0xfe, b'k'],
            value: Some(b"odd name".to_vec()),
        },
        Header::new("plain", Some(vec![0, 1, 2])),
    ];
    let mut record = message(&topic, 0, b"payload");
    record.headers = headers.clone();
    redrive::kafka::produce(&producer(&kafka()), &topic, &record, &[])
        .await
        .unwrap();

    committed_to(&group, &topic, 1).await;
    let dlq = read_topic_raw(&format!("{topic}.dlq"), 1, Duration::from_secs(60)).await;
    let kept: Vec<Header> = dlq[0]
        .headers
        .iter()
        .filter(|h| !h.key.starts_with(b"redrive."))
        .cloned()
        .collect();
    assert_eq!(kept, headers, "names and values byte for byte");
    assert_eq!(dlq[0].payload.as_deref(), Some(&b"payload"[..]));
    stop.cancel();
    app.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_burst_of_large_failures_is_captured_in_statements_postgres_accepts() {
    let db = TestDb::new().await;
    redrive::telemetry::metrics(); // the counters read below count from here
    let group = unique("g");
    let (capturer, handle) = capturer(db.store.clone(), &group, &ConsumerConfig::default());
    let writer = tokio::spawn(capturer.run());
    // 256 failures of 4 MiB: as one statement, 1 GiB, more than Postgres takes in one message.
    let waits: Vec<_> = (0..256)
        .map(|i| {
            let mut m = message("big", i, &[]);
            m.payload = Some(vec![i as u8; 4 << 20]);
            let row = Capture {
                message: m,
                state: InitialState::Pending,
                max_attempts: 3,
                retry_in: Duration::ZERO,
                error: HandlerError::retryable("500"),
                line: None,
                trace: None,
            };
            let handle = handle.clone();
            tokio::spawn(async move { handle.capture(row).await })
        })
        .collect();
    drop(handle);
    let all = tokio::time::timeout(Duration::from_secs(180), async {
        let mut durable = 0;
        for w in waits {
            durable += usize::from(w.await.unwrap());
        }
        durable
    })
    .await
    .expect("the burst is captured within 3 minutes");
    assert_eq!(all, 256, "every failure durable");
    writer.await.unwrap();
    assert_eq!(db.count("octet_length(payload) = 4194304").await, 256);
    let label = format!("{{what=\"capture\",group=\"{group}\"}}");
    assert_eq!(
        counter(&format!("redrive_batch_splits_total{label}")),
        0.0,
        "no statement was refused: batches are bounded by bytes"
    );
}

#[tokio::test]
async fn a_row_postgres_refuses_is_isolated_kept_dead_and_its_offset_committed() {
    let db = TestDb::new().await;
    redrive::telemetry::metrics(); // the counters read below count from here
                                   // A rule of the database's own that this one message breaks.
    sqlx::query(
        "ALTER TABLE redrive.retry_messages ADD CONSTRAINT no_poison
         CHECK (payload IS DISTINCT FROM 'poison'::bytea)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let (topic, group) = (unique("refused"), unique("g"));
    create_topic(&topic, 1).await;
    let stub = Stub::start(|_| (500, vec![])).await;
    let config = config(&db.url, &[&topic], &group, Some(stub.addr), "");
    let (stop, app) = spawn_app(config, only(true, false, false));
    let p = producer(&kafka());
    for body in ["a", "b", "c", "poison", "d", "e"] {
        produce(&p, &topic, None, Some(body.as_bytes()), &[]).await;
    }

    committed_to(&group, &topic, 6).await;
    assert_eq!(
        db.count("state = 'pending' AND payload IS NOT NULL").await,
        5
    );
    let (offset, payload, error): (i64, Option<Vec<u8>>, String) = sqlx::query_as(
        "SELECT kafka_offset, payload, last_error FROM redrive.retry_messages WHERE state = 'dead'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!((offset, payload), (3, None), "kept in a safe form, dead");
    assert!(
        error.contains("no_poison"),
        "names the database error: {error}"
    );
    let label = format!("{{what=\"capture\",group=\"{group}\"}}");
    assert_eq!(counter(&format!("redrive_rows_isolated_total{label}")), 1.0);
    stop.cancel();
    app.await.unwrap().unwrap();
}

/// Succeeds, except for payloads "refuse-me" (a retryable error of that text) and "panic".
struct Picky;

impl Handler for Picky {
    async fn handle(&self, d: Delivery<'_>) -> Result<(), HandlerError> {
        match d.message.payload.as_deref() {
            Some(b"refuse-me") => Err(HandlerError::retryable("refuse-me")),
            Some(b"panic") => panic!("boom at offset {}", d.message.offset),
            _ => Ok(()),
        }
    }
}

fn run_with(
    config: redrive::Config,
    parts: RunArgs,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let stop = CancellationToken::new();
    let app = tokio::spawn(redrive::app::run(config, Picky, parts, stop.clone()));
    (stop, app)
}

#[tokio::test]
async fn a_completion_postgres_refuses_is_isolated_and_the_row_kept_dead() {
    let db = TestDb::new().await;
    redrive::telemetry::metrics(); // the counters read below count from here
    sqlx::query(
        "ALTER TABLE redrive.retry_messages ADD CONSTRAINT no_refuse_me
         CHECK (strpos(coalesce(last_error, ''), 'refuse-me') = 0)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let group = unique("g");
    let rows: Vec<Capture> = ["ok-0", "ok-1", "refuse-me", "ok-3"]
        .iter()
        .enumerate()
        .map(|(i, body)| {
            let mut c = pending("t", i as i64, Duration::ZERO, 5);
            c.message.payload = Some(body.as_bytes().to_vec());
            c
        })
        .collect();
    db.store.capture(&group, &rows).await.unwrap();
    let (stop, app) = run_with(
        config(&db.url, &["t"], &group, None, ""),
        only(false, true, false),
    );

    rows_where(&db, "true", 1, Duration::from_secs(60)).await;
    rows_where(
        &db,
        "state = 'dead' AND kafka_offset = 2",
        1,
        Duration::from_secs(30),
    )
    .await;
    let error: String = sqlx::query_scalar("SELECT last_error FROM redrive.retry_messages")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(error.contains("no_refuse_me"), "{error}");
    let label = format!("{{what=\"completion\",group=\"{group}\"}}");
    assert_eq!(counter(&format!("redrive_rows_isolated_total{label}")), 1.0);
    stop.cancel();
    app.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_panicking_handler_fails_only_its_message() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("panic"), unique("g"));
    create_topic(&topic, 1).await;
    let (stop, app) = run_with(
        config(&db.url, &[&topic], &group, None, ""),
        only(true, false, false),
    );
    let p = producer(&kafka());
    for body in ["ok", "panic", "ok"] {
        produce(&p, &topic, None, Some(body.as_bytes()), &[]).await;
    }

    committed_to(&group, &topic, 3).await;
    let (state, kind, error): (String, String, String) = sqlx::query_as(
        "SELECT state, error_kind, last_error FROM redrive.retry_messages WHERE kafka_offset = 1",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!((state.as_str(), kind.as_str()), ("dead", "permanent"));
    assert_eq!(error, "handler panicked: boom at offset 1");
    assert_eq!(db.count("true").await, 1);
    stop.cancel();
    app.await.unwrap().unwrap();
}

#[tokio::test]
async fn poison_dlq_records_are_marked_and_the_publisher_moves_on() {
    let db = TestDb::new().await;
    let topic = unique("poison");
    let dlq = format!("{topic}.dlq");
    create_topic_with(&dlq, 1, &[("max.message.bytes", "4096")]).await;
    // 120 records too large for the DLQ topic die first, then 5 that fit.
    let big: Vec<Capture> = (0..120).map(|o| dead(&topic, o, 16 << 10)).collect();
    db.store.capture("g", &big).await.unwrap();
    let small: Vec<Capture> = (120..125).map(|o| dead(&topic, o, 10)).collect();
    db.store.capture("g", &small).await.unwrap();
    let publisher = dlq_publisher(&db, kafka(), Duration::from_secs(10));
    let stop = CancellationToken::new();
    let running = tokio::spawn(publisher.run(stop.clone()));

    // Publishing at one batch per 30 s would take a minute to reach them.
    let got = read_topic_raw(&dlq, 5, Duration::from_secs(25)).await;
    assert!(got.iter().all(|m| m.payload.as_ref().unwrap().len() == 10));
    rows_where(
        &db,
        "dlq_refused_at IS NOT NULL",
        120,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        db.count("dlq_error LIKE '%refused the record for%' AND state = 'dead'")
            .await,
        120
    );
    assert_eq!(db.count("dlq_published_at IS NOT NULL").await, 5);
    let status = db
        .store
        .status(Duration::from_secs(3600), 5, Limits::DEFAULT)
        .await
        .unwrap();
    assert_eq!(
        (status.groups[0].dlq_refused, status.groups[0].dlq_backlog),
        (120, 0)
    );
    stop.cancel();
    running.await.unwrap().unwrap();
    // The operators' recipe puts them back in the outbox.
    sqlx::query(&crate::operators::recipe("republish-refused"))
        .execute(db.pool())
        .await
        .unwrap();
    assert_eq!(db.store.outbox_backlog("g").await.unwrap(), 120);
}

#[tokio::test]
async fn one_poison_dlq_record_in_a_round_is_found_by_halves_and_the_others_go_through() {
    let db = TestDb::new().await;
    let topic = unique("poison-one");
    let dlq = format!("{topic}.dlq");
    // The topic takes batches of up to 512 KiB: the 99 small records together, never the large one.
    create_topic_with(&dlq, 1, &[("max.message.bytes", "524288")]).await;
    let rows: Vec<Capture> = (0..100)
        .map(|o| dead(&topic, o, if o == 37 { 600 << 10 } else { 10 }))
        .collect();
    db.store.capture("g", &rows).await.unwrap();
    let publisher = dlq_publisher(&db, kafka(), Duration::from_secs(10));

    // One round takes the 100 rows (the helper's batch size); its first send puts them all in one
    // produce batch, which the broker refuses whole.
    let round = publisher.run_once().await.unwrap();
    assert_eq!(
        (round.fetched, round.published, round.refused, round.failed),
        (100, 99, 1, 0)
    );
    // Halving 100 records down to the large one alone is 7 halvings of two sends each; one record
    // at a time would be 100 sends, one after another.
    assert!(
        round.resent_groups <= 14,
        "{} groups sent again",
        round.resent_groups
    );
    let (offset, error): (i64, String) = sqlx::query_as(
        "SELECT kafka_offset, dlq_error FROM redrive.retry_messages WHERE dlq_refused_at IS NOT NULL",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(offset, 37);
    assert!(error.contains("refused the record for"), "{error}");
    let got = read_topic_raw(&dlq, 99, Duration::from_secs(30)).await;
    let expected: Vec<i64> = (0..100).filter(|o| *o != 37).collect();
    assert_eq!(
        origin_offsets(&got),
        expected,
        "each record that fits, once"
    );
    assert_eq!(db.store.outbox_backlog("g").await.unwrap(), 0);
}

/// A dead row of `topic` at `offset`, not yet published, with a payload of `size` bytes.
fn dead(topic: &str, offset: i64, size: usize) -> Capture {
    let mut c = pending(topic, offset, Duration::ZERO, 1);
    c.state = InitialState::Dead;
    c.message.payload = Some(vec![b'x'; size]);
    c
}

/// The origin offsets of DLQ records, in order.
fn origin_offsets(records: &[redrive::Message]) -> Vec<i64> {
    let mut offsets: Vec<i64> = records
        .iter()
        .map(|m| {
            let h = m.header(redrive::dlq::headers::OFFSET).unwrap();
            std::str::from_utf8(h.value.as_ref().unwrap())
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    offsets.sort();
    offsets
}

/// Two rounds in flight send through one producer. A record sent again to learn whether the broker
/// refuses it alone must not share a produce batch with the other round's records: the broker
/// refuses a batch whole, and a record that fits would be marked refused for the other's size.
#[tokio::test]
async fn a_record_sent_again_alone_is_not_refused_for_another_rounds_record() {
    let db = TestDb::new().await;
    let topic = unique("poison-rounds");
    let dlq = format!("{topic}.dlq");
    create_topic_with(&dlq, 1, &[("max.message.bytes", "524288")]).await;
    // 400 dead rows, every 25th too large for the DLQ topic: each round of 100 holds four, and
    // while one round sends its refused records again, the other sends its first batch.
    let large = |offset: i64| offset % 25 == 12;
    let rows: Vec<Capture> = (0..400)
        .map(|o| dead(&topic, o, if large(o) { 600 << 10 } else { 10 }))
        .collect();
    for chunk in rows.chunks(100) {
        db.store.capture("g", chunk).await.unwrap();
    }
    // The producer lingers 50 ms before it sends a batch: a record sent again while the other
    // round's first records wait to go would join their batch.
    let bootstrap = kafka();
    let publisher = dlq_publisher_with(
        &db,
        &[("bootstrap.servers", &bootstrap), ("linger.ms", "50")],
        Duration::from_secs(10),
    )
    .with_rounds_in_flight(2);
    Publishing::start(publisher)
        .stop_once_published(&db, Duration::from_secs(120))
        .await;

    let refused: Vec<i64> = sqlx::query_scalar(
        "SELECT kafka_offset FROM redrive.retry_messages WHERE dlq_refused_at IS NOT NULL \
         ORDER BY kafka_offset",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let expected: Vec<i64> = (0..400).filter(|o| large(*o)).collect();
    assert_eq!(refused, expected, "refused: exactly the records too large");
    assert_eq!(db.count("dlq_published_at IS NOT NULL").await, 384);
    let got = read_topic_raw(&dlq, 384, Duration::from_secs(30)).await;
    let expected: Vec<i64> = (0..400).filter(|o| !large(*o)).collect();
    assert_eq!(
        origin_offsets(&got),
        expected,
        "each record that fits, once"
    );
}

#[tokio::test]
async fn a_stored_row_that_cannot_be_read_fails_alone() {
    let db = TestDb::new().await;
    let topic = unique("unreadable");
    create_topic(&topic, 1).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    let group = unique("g");
    let rows: Vec<Capture> = (0..4)
        .map(|o| pending(&topic, o, Duration::ZERO, 3))
        .collect();
    db.store.capture(&group, &rows).await.unwrap();
    sqlx::query(
        "UPDATE redrive.retry_messages SET headers = '[{\"key\": 5}]' WHERE kafka_offset = 1",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let (stop, app) = run_with(
        config(&db.url, &[&topic], &group, None, ""),
        only(false, true, true),
    );

    rows_where(&db, "true", 1, Duration::from_secs(60)).await;
    rows_where(
        &db,
        "kafka_offset = 1 AND state = 'dead' AND dlq_refused_at IS NOT NULL",
        1,
        Duration::from_secs(60),
    )
    .await;
    let (error, dlq_error): (String, String) =
        sqlx::query_as("SELECT last_error, dlq_error FROM redrive.retry_messages")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(error.contains("stored headers cannot be read"), "{error}");
    assert!(
        dlq_error.contains("stored headers cannot be read"),
        "{dlq_error}"
    );
    stop.cancel();
    app.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_listen_connection_that_died_silently_is_replaced() {
    let db = TestDb::new().await;
    let proxy = Proxy::start(postgres_addr()).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&proxy.url(&db.url))
        .await
        .unwrap();
    let store = redrive::Store::from_pool(pool);
    let mut listener = store.listen("redrive_pending").await.unwrap();
    let notify = || sqlx::query("SELECT pg_notify('redrive_pending', '')").execute(db.pool());
    notify().await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), listener.wait())
        .await
        .expect("a NOTIFY wakes the listener");

    // The connection goes half-open: nothing arrives, nothing fails.
    proxy.freeze_existing();
    notify().await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), listener.wait())
        .await
        .expect("the silent connection is found dead and replaced, which wakes the listener");
    notify().await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), listener.wait())
        .await
        .expect("the new connection hears NOTIFY");
}
