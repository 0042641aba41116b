//! Dead rows and the DLQ topic: an outage never loses a row or stalls capture (I4, on librdkafka's
//! mock cluster), and bad input round-trips byte for byte (I8, on the real broker).

use crate::helpers::*;
use crate::store::message;
use rdkafka::message::{Headers, Message as _};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, Producer as _};
use redrive::cli::RunArgs;
use redrive::dlq::DlqPublisher;
use redrive::handler::HandlerError;
use redrive::store::capture::{Capture, InitialState};
use std::time::Duration;

fn dead(topic: &str, offset: i64) -> Capture {
    Capture {
        message: message(topic, offset, format!("dead-{offset}").as_bytes()),
        state: InitialState::Dead,
        max_attempts: 3,
        retry_in: Duration::ZERO,
        error: HandlerError::permanent("400 bad request"),
        line: None,
        trace: None,
    }
}

/// A publisher of group `g`'s dead rows to `{topic}.dlq` on `mock`, with a 2 s publish timeout.
fn mock_publisher(
    db: &TestDb,
    mock: &MockCluster<'_, impl rdkafka::ClientContext>,
) -> DlqPublisher {
    dlq_publisher(db, mock.bootstrap_servers(), Duration::from_secs(2))
}

#[tokio::test]
async fn a_dlq_outage_keeps_rows_unpublished_without_stalling_capture_then_publishes_all() {
    let db = TestDb::new().await;
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("orders.dlq", 1, 1).unwrap();
    let publisher = mock_publisher(&db, &mock);
    db.store
        .capture(
            "g",
            &[dead("orders", 0), dead("orders", 1), dead("orders", 2)],
        )
        .await
        .unwrap();

    mock.broker_down(1).unwrap();
    let round = publisher.run_once().await.unwrap();
    assert_eq!((round.published, round.failed), (0, 3));
    assert_eq!(
        db.store.outbox_backlog("g").await.unwrap(),
        3,
        "failed sends stay in the outbox"
    );

    // Capture goes on during the outage, while a publishing round holds its batch.
    let more = [
        dead("orders", 3),
        dead("orders", 4),
        crate::store::pending("orders", 5, Duration::ZERO, 3),
    ];
    let (round, captured) = tokio::join!(publisher.run_once(), db.store.capture("g", &more));
    assert_eq!(captured.unwrap(), 3);
    assert_eq!(round.unwrap().published, 0);
    assert_eq!(db.store.outbox_backlog("g").await.unwrap(), 5);
    assert_eq!(
        db.count("state = 'dead'").await,
        5,
        "dead rows are never dropped"
    );

    mock.broker_up(1).unwrap();
    Publishing::start(publisher)
        .stop_once_published(&db, Duration::from_secs(60))
        .await;
    let records = read_topic(
        &mock.bootstrap_servers(),
        "orders.dlq",
        5,
        Duration::from_secs(30),
    )
    .await;
    let mut offsets = origin_offsets(&records);
    offsets.sort();
    assert_eq!(offsets, ["0", "1", "2", "3", "4"]);
    assert_eq!(
        db.count("state = 'dead' AND dlq_topic = 'orders.dlq'")
            .await,
        5
    );
}

/// The source offset each DLQ record names in its origin header, in the records' order.
fn origin_offsets(records: &[rdkafka::message::OwnedMessage]) -> Vec<String> {
    records
        .iter()
        .map(|m| {
            let h = m.headers().unwrap();
            let origin = h
                .iter()
                .find(|x| x.key == redrive::dlq::headers::OFFSET)
                .unwrap();
            String::from_utf8(origin.value.unwrap().to_vec()).unwrap()
        })
        .collect()
}

/// A database with two dead rows of `orders`, a mock cluster with `orders.dlq`, and a publisher
/// to it.
async fn two_dead_rows_on_a_mock_cluster() -> (
    TestDb,
    MockCluster<'static, DefaultProducerContext>,
    DlqPublisher,
) {
    let db = TestDb::new().await;
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("orders.dlq", 1, 1).unwrap();
    let publisher = mock_publisher(&db, &mock);
    db.store
        .capture("g", &[dead("orders", 0), dead("orders", 1)])
        .await
        .unwrap();
    (db, mock, publisher)
}

#[tokio::test]
async fn a_dlq_producer_failed_for_good_is_replaced_and_no_dead_row_waits_for_a_restart() {
    let (db, mock, publisher) = two_dead_rows_on_a_mock_cluster().await;
    let round = publisher.run_once().await.unwrap();
    assert_eq!((round.published, round.failed), (2, 0));

    // librdkafka fails an idempotent producer for good when it can no longer keep its guarantee
    // (here through its own test hook); every later send through it is refused.
    let failed = publisher.producer();
    let reason = c"the broker lost the producer's sequence";
    // SAFETY: the pointer is the live client `failed` owns; librdkafka copies the reason.
    unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            failed.client().native_ptr(),
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        );
    }
    let (code, _) = failed.client().fatal_error().expect("the producer failed");
    let probe = message("orders", 9, b"x");
    let sent = redrive::kafka::produce(&failed, "orders.dlq", &probe, &[]).await;
    assert!(sent.is_err(), "a failed producer sends nothing");

    db.store
        .capture(
            "g",
            &[dead("orders", 2), dead("orders", 3), dead("orders", 4)],
        )
        .await
        .unwrap();
    let round = publisher.run_once().await.unwrap();
    assert_eq!(
        (round.published, round.failed),
        (3, 0),
        "the round after the producer failed ({code:?}) publishes through a new one"
    );
    assert_eq!(db.store.outbox_backlog("g").await.unwrap(), 0);
    assert!(publisher.producer().client().fatal_error().is_none());
    let records = read_topic(
        &mock.bootstrap_servers(),
        "orders.dlq",
        5,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(records.len(), 5);
}

#[tokio::test]
async fn a_dlq_producer_with_no_send_acknowledged_for_rounds_in_a_row_is_replaced() {
    let (db, mock, publisher) = two_dead_rows_on_a_mock_cluster().await;
    let first = publisher.producer().client().native_ptr();

    mock.broker_down(1).unwrap();
    for round in 1..=redrive::dlq::UNANSWERED_ROUNDS {
        let r = publisher.run_once().await.unwrap();
        assert_eq!((r.published, r.failed), (0, 2), "round {round}");
        let kept = publisher.producer().client().native_ptr();
        assert_eq!(kept, first, "the producer is kept through round {round}");
    }
    mock.broker_up(1).unwrap();
    let r = publisher.run_once().await.unwrap();
    let renewed = publisher.producer().client().native_ptr();
    assert_ne!(
        renewed,
        first,
        "a round after {} unanswered ones goes through a new producer",
        redrive::dlq::UNANSWERED_ROUNDS
    );
    assert_eq!((r.published, r.failed), (2, 0));
    assert_eq!(db.store.outbox_backlog("g").await.unwrap(), 0);
}

/// One record of bad input: key, value and headers.
type Record = (
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<(String, Option<Vec<u8>>)>,
);

#[tokio::test]
async fn bad_input_round_trips_byte_for_byte_through_the_table_into_the_dlq() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("bad-input"), unique("g"));
    let dlq = format!("{topic}.dlq");
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let stub = Stub::start(|_| (400, vec![])).await; // permanent: dead at once
    let (stop, app) = spawn_app(
        config(&db.url, &[&topic], &group, Some(stub.addr), ""),
        RunArgs::default(),
    );

    let big: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let inputs: Vec<Record> = vec![
        (Some(b"tombstone".to_vec()), None, vec![]),
        (Some(b"empty".to_vec()), Some(vec![]), vec![]),
        (
            Some(vec![0, 0xff, 0xfe, 1]),
            Some(vec![0xc3, 0x28, 0, 0xff]),
            vec![],
        ),
        (
            None,
            Some(b"header".to_vec()),
            vec![
                ("bin".into(), Some(vec![0xff, 0, 0xc3])),
                ("null".into(), None),
            ],
        ),
        (Some(b"big".to_vec()), Some(big), vec![]),
    ];
    let p = producer(&kafka());
    for (k, v, hs) in &inputs {
        let hs: Vec<(&str, Option<&[u8]>)> =
            hs.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        produce(&p, &topic, k.as_deref(), v.as_deref(), &hs).await;
    }

    let records = read_topic(&kafka(), &dlq, inputs.len(), Duration::from_secs(120)).await;
    stop.cancel();
    app.await.unwrap().unwrap();
    for m in &records {
        let hs = m.headers().unwrap();
        let origin = hs
            .iter()
            .find(|x| x.key == redrive::dlq::headers::OFFSET)
            .unwrap()
            .value
            .unwrap();
        let offset: usize = std::str::from_utf8(origin).unwrap().parse().unwrap();
        let (key, value, headers) = &inputs[offset];
        assert_eq!(m.key().map(<[u8]>::to_vec), *key, "key of record {offset}");
        assert_eq!(
            m.payload().map(<[u8]>::to_vec),
            *value,
            "value of record {offset}"
        );
        let original: Vec<(String, Option<Vec<u8>>)> = hs
            .iter()
            .filter(|x| !x.key.starts_with("redrive."))
            .map(|x| (x.key.to_string(), x.value.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(original, *headers, "headers of record {offset}");

        let (k, v): (Option<Vec<u8>>, Option<Vec<u8>>) = sqlx::query_as(
            "SELECT key, payload FROM redrive.retry_messages WHERE kafka_offset = $1",
        )
        .bind(offset as i64)
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!((&k, &v), (key, value), "table row {offset}");
    }
    assert_eq!(
        db.count("state = 'dead' AND dlq_published_at IS NOT NULL")
            .await,
        5
    );
}

#[tokio::test]
async fn the_outbox_is_read_through_its_own_index_while_most_dead_rows_are_published() {
    // 20,000 rows that died one a second, analyzed while none was published, as in a storm of
    // permanent errors or after a DLQ outage: the statistics say every dead row waits for the DLQ
    // broker. Then the oldest 19,900 are published, and vacuumed without a new analyze. The
    // publisher's round and the backlog's count read the 100 left through the outbox's index;
    // through any other index of dead rows, in death order, each would read the 19,900 published
    // rows first.
    let db = TestDb::new().await;
    sqlx::query(
        r#"
        INSERT INTO redrive.retry_messages (
            id, consumer_group, topic, "partition", kafka_offset, payload, state, attempts,
            max_attempts, next_attempt_at, last_error, error_kind, dead_at)
        SELECT gen_random_uuid(), 'g', 'orders', 0, i, '\x00'::bytea, 'dead', 1, 3, now(),
               '400 bad request', 'permanent', now() - (20000 - i) * interval '1 second'
        FROM generate_series(1, 20000) AS i
        "#,
    )
    .execute(db.pool())
    .await
    .unwrap();
    vacuum_until_all_visible(&db).await;
    sqlx::query(
        "UPDATE redrive.retry_messages SET dlq_published_at = now(), dlq_topic = 'orders.dlq'
         WHERE kafka_offset <= 19900",
    )
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query("VACUUM redrive.retry_messages")
        .execute(db.pool())
        .await
        .unwrap();

    let (flushed, store) = on_one_connection(&db).await;
    // The batch is let go (its rows unlocked) inside, so the one connection is free to be asked.
    let round = async {
        let batch = store.outbox_batch("g", 100, 16 << 20).await.unwrap();
        let mut offsets: Vec<i64> = batch.rows.iter().map(|r| r.message.offset).collect();
        offsets.sort();
        offsets
    };
    let (offsets, read) = read_by(&db, &flushed, round).await;
    assert_eq!(offsets, (19901..=20000).collect::<Vec<_>>());
    assert!(
        read.1 < 1000,
        "a round of the publisher read {} rows",
        read.1
    );
    let (backlog, read) = read_by(&db, &flushed, store.outbox_backlog("g")).await;
    assert_eq!(backlog.unwrap(), 100);
    assert!(read.1 < 1000, "the backlog's count read {} rows", read.1);
}

#[tokio::test]
async fn a_round_takes_rows_up_to_its_bytes_and_a_larger_row_alone() {
    // Seven dead rows in death order: five of 400 bytes of key and value, one of 3,000 and one of
    // 100. A round bounded to 1,000 bytes takes the oldest rows that fit in it, or one larger row
    // alone.
    let db = TestDb::new().await;
    sqlx::query(
        r#"
        INSERT INTO redrive.retry_messages (
            id, consumer_group, topic, "partition", kafka_offset, key, payload, state, attempts,
            max_attempts, next_attempt_at, last_error, error_kind, dead_at)
        SELECT gen_random_uuid(), 'g', 'orders', 0, i, convert_to(repeat('k', 100), 'UTF8'),
               convert_to(repeat('v', CASE WHEN i <= 5 THEN 300 WHEN i = 6 THEN 2900 ELSE 0 END),
                          'UTF8'),
               'dead', 1, 3, now(), '400 bad request', 'permanent', now() - (10 - i) * interval '1 second'
        FROM generate_series(1, 7) AS i
        "#,
    )
    .execute(db.pool())
    .await
    .unwrap();
    let round = async |rows, bytes| {
        let batch = db.store.outbox_batch("g", rows, bytes).await.unwrap();
        let offsets: Vec<i64> = batch.rows.iter().map(|r| r.message.offset).collect();
        let full = batch.full;
        let published: Vec<(uuid::Uuid, String)> = batch
            .rows
            .iter()
            .map(|r| (r.id, "orders.dlq".to_string()))
            .collect();
        batch.finish(&published, &[]).await.unwrap();
        (offsets, full)
    };
    // A bound of rows: the one oldest row.
    assert_eq!(round(1, 1 << 20).await, (vec![1], true));
    assert_eq!(round(100, 1000).await, (vec![2, 3], true));
    assert_eq!(round(100, 1000).await, (vec![4, 5], true));
    assert_eq!(round(100, 1000).await, (vec![6], true));
    // The last one is not full: the outbox ends there.
    assert_eq!(round(100, 1000).await, (vec![7], false));
    assert_eq!(round(100, 1000).await, (vec![], false));
    assert_eq!(db.count("dlq_published_at IS NOT NULL").await, 7);
}

#[tokio::test]
async fn rounds_in_flight_hold_their_batches_at_once_and_publish_every_row_once() {
    let db = TestDb::new().await;
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("orders.dlq", 1, 1).unwrap();
    let rows: Vec<Capture> = (0..1000).map(|offset| dead("orders", offset)).collect();
    for chunk in rows.chunks(500) {
        db.store.capture("g", chunk).await.unwrap();
    }
    // Every produce waits out the broker's round trip, so a round holds its batch at least that
    // long: long enough to see another round's batch held beside it.
    mock.broker_round_trip_time(1, Duration::from_millis(300))
        .unwrap();
    let publishing = Publishing::start(mock_publisher(&db, &mock).with_rounds_in_flight(2));
    wait_for(
        "two rounds holding their batches at once",
        Duration::from_secs(60),
        || async {
            let held: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND state = 'idle in transaction' AND query LIKE '%FOR UPDATE SKIP LOCKED%'",
            )
            .fetch_one(db.pool())
            .await
            .unwrap();
            (held >= 2).then_some(())
        },
    )
    .await;
    publishing
        .stop_once_published(&db, Duration::from_secs(60))
        .await;
    mock.broker_round_trip_time(1, Duration::ZERO).unwrap();
    let records = read_topic(
        &mock.bootstrap_servers(),
        "orders.dlq",
        1000,
        Duration::from_secs(30),
    )
    .await;
    let offsets: std::collections::BTreeSet<String> =
        origin_offsets(&records).into_iter().collect();
    assert_eq!(offsets.len(), 1000, "each dead row's record once");
    assert_eq!(
        db.count("state = 'dead' AND dlq_topic = 'orders.dlq'")
            .await,
        1000
    );
}
