//! The consumer on the real broker: offsets are committed only past durable outcomes (I1), also
//! while Postgres is away, and a crash before the commit redelivers without a second row (I2). On
//! librdkafka's mock cluster: a broker that stops answering does not hold shutdown up.

use crate::helpers::*;
use redrive::cli::RunArgs;
use redrive::handler::{Delivery, Handler, HandlerError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn consumer_only() -> RunArgs {
    RunArgs {
        no_workers: true,
        no_dlq: true,
        no_http: true,
        ..Default::default()
    }
}

/// 500 for bodies starting with "fail", 200 otherwise.
async fn fail_stub() -> Stub {
    Stub::start(|r| {
        (
            if r.body.starts_with(b"fail") {
                500
            } else {
                200
            },
            vec![],
        )
    })
    .await
}

#[tokio::test]
async fn offsets_stop_at_failures_while_postgres_is_unreachable_and_nothing_is_skipped() {
    let db = TestDb::new().await;
    let proxy = Proxy::start(postgres_addr()).await;
    let (topic, group) = (unique("outage"), unique("g"));
    create_topic(&topic, 1).await;
    let stub = fail_stub().await;
    let config = config(&proxy.url(&db.url), &[&topic], &group, Some(stub.addr), "");
    let failures_before = counter("redrive_store_write_failures_total{what=\"capture\"}");
    let (stop, app) = spawn_app(config, consumer_only());
    let p = producer(&kafka());

    produce(&p, &topic, None, Some(b"ok-0"), &[]).await;
    wait_for(
        "offset 1 to be committed",
        Duration::from_secs(60),
        || async { (committed(&group, &topic, 0) == Some(1)).then_some(()) },
    )
    .await;

    proxy.cut();
    for body in ["fail-1", "ok-2", "fail-3", "ok-4"] {
        produce(&p, &topic, None, Some(body.as_bytes()), &[]).await;
    }
    wait_for(
        "all four messages to reach the handler",
        Duration::from_secs(30),
        || async { (stub.count() == 5).then_some(()) },
    )
    .await;
    wait_for(
        "capture to fail against the unreachable database",
        Duration::from_secs(30),
        || async {
            (counter("redrive_store_write_failures_total{what=\"capture\"}")
                >= failures_before + 2.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        committed(&group, &topic, 0),
        Some(1),
        "no offset may pass a failure that is not stored"
    );

    proxy.restore();
    wait_for(
        "the failures to be captured and every offset committed",
        Duration::from_secs(60),
        || async { (committed(&group, &topic, 0) == Some(5)).then_some(()) },
    )
    .await;
    let offsets: Vec<i64> =
        sqlx::query_scalar("SELECT kafka_offset FROM redrive.retry_messages ORDER BY 1")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(
        offsets,
        vec![1, 3],
        "each failure is stored once, none skipped"
    );
    stop.cancel();
    app.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_crash_after_capture_redelivers_without_a_second_row() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("crash"), unique("g"));
    create_topic(&topic, 1).await;
    let stub = fail_stub().await;
    let text = |commit_ms: u32| {
        format!(
            "[postgres]\nurl = \"{}\"\n[kafka]\ntopics = [\"{topic}\"]\n\"bootstrap.servers\" = \"{}\"\n\
             \"group.id\" = \"{group}\"\n\"session.timeout.ms\" = 6000\n\"auto.commit.interval.ms\" = {commit_ms}\n\
             [handler]\nurl = \"http://{}/\"\n",
            db.url,
            kafka(),
            stub.addr
        )
    };
    let run =
        |file: &std::path::Path| spawn_redrive(file, &["--no-workers", "--no-dlq", "--no-http"]);
    produce(
        &producer(&kafka()),
        &topic,
        Some(b"k"),
        Some(b"fail-0"),
        &[],
    )
    .await;

    // The first process captures the failure but is killed before it commits anything.
    let slow_commits = write_config(&text(600_000));
    let mut first = run(&slow_commits.0);
    wait_for(
        "the failure to be captured",
        Duration::from_secs(60),
        || async { (db.count("true").await == 1).then_some(()) },
    )
    .await;
    first.kill().await.unwrap();
    assert_eq!(
        committed(&group, &topic, 0),
        None,
        "the killed process committed nothing"
    );

    let normal = write_config(&text(100));
    let mut second = run(&normal.0);
    wait_for(
        "the message to be redelivered and its offset committed",
        Duration::from_secs(90),
        || async { (stub.count() >= 2 && committed(&group, &topic, 0) == Some(1)).then_some(()) },
    )
    .await;
    assert_eq!(
        db.count("true").await,
        1,
        "the redelivered message must not create a second row"
    );
    assert_eq!(db.count("attempts = 1").await, 1);
    let status = terminate(&mut second).await;
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
}

/// Records each offset it handles; offset 0 takes longer than `max.poll.interval.ms`.
#[derive(Clone, Default)]
struct SlowFirst(Arc<Mutex<Vec<i64>>>);

impl Handler for SlowFirst {
    async fn handle(&self, d: Delivery<'_>) -> Result<(), HandlerError> {
        self.0.lock().unwrap().push(d.message.offset);
        if d.message.offset == 0 {
            // The scenario itself: a handler busy for longer than the group's poll interval.
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_busy_consumer_keeps_polling_and_stays_in_its_group() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("busy"), unique("g"));
    create_topic(&topic, 1).await;
    let mut config = config(&db.url, &[&topic], &group, None, "");
    config
        .kafka
        .properties
        .insert("max.poll.interval.ms".into(), "6000".into());
    config.consumer.max_in_flight = 1;
    config.handler.timeout = Duration::from_secs(60);
    let handler = SlowFirst::default();
    let stop = CancellationToken::new();
    let app = tokio::spawn(redrive::app::run(
        config,
        handler.clone(),
        consumer_only(),
        stop.clone(),
    ));
    let p = producer(&kafka());
    for body in ["slow", "b", "c"] {
        produce(&p, &topic, None, Some(body.as_bytes()), &[]).await;
    }
    wait_for(
        "all three offsets to be committed",
        Duration::from_secs(90),
        || async { (committed(&group, &topic, 0) == Some(3)).then_some(()) },
    )
    .await;
    stop.cancel();
    app.await.unwrap().unwrap();
    assert_eq!(
        *handler.0.lock().unwrap(),
        vec![0, 1, 2],
        "each message handled once, in order, no rebalance"
    );
}

#[tokio::test]
async fn shutdown_commits_the_stored_offsets() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("shutdown"), unique("g"));
    create_topic(&topic, 1).await;
    let stub = fail_stub().await;
    let mut config = config(&db.url, &[&topic], &group, Some(stub.addr), "");
    // No periodic commit: only the shutdown can commit (redrive's final commit, and librdkafka's
    // close, which commits what was stored).
    config
        .kafka
        .properties
        .insert("auto.commit.interval.ms".into(), "3600000".into());
    let (stop, app) = spawn_app(config, consumer_only());
    let p = producer(&kafka());
    for body in ["ok-0", "fail-1", "ok-2"] {
        produce(&p, &topic, None, Some(body.as_bytes()), &[]).await;
    }
    wait_for(
        "the failure to be captured",
        Duration::from_secs(60),
        || async { (stub.count() == 3 && db.count("true").await == 1).then_some(()) },
    )
    .await;
    assert_eq!(
        committed(&group, &topic, 0),
        None,
        "nothing is committed before shutdown"
    );
    stop.cancel();
    app.await.unwrap().unwrap();
    assert_eq!(committed(&group, &topic, 0), Some(3));
}

#[tokio::test]
async fn a_hung_first_delivery_times_out_alone_and_its_batch_carries_on() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("hung"), unique("g"));
    create_topic(&topic, 1).await;
    // Produced before the consumer starts, so the messages arrive, and are handled, together.
    let p = producer(&kafka());
    for i in 0..20 {
        produce(&p, &topic, None, Some(format!("m{i}").as_bytes()), &[]).await;
    }
    let mut config = config(&db.url, &[&topic], &group, None, "");
    // Offset 0 takes 10 s: far past this limit.
    config.handler.timeout = Duration::from_secs(3);
    let handler = SlowFirst::default();
    let stop = CancellationToken::new();
    let app = tokio::spawn(redrive::app::run(
        config,
        handler.clone(),
        consumer_only(),
        stop.clone(),
    ));
    wait_for(
        "every offset to be committed past the hung message",
        Duration::from_secs(90),
        || async { (committed(&group, &topic, 0) == Some(20)).then_some(()) },
    )
    .await;
    stop.cancel();
    app.await.unwrap().unwrap();
    let mut calls = handler.0.lock().unwrap().clone();
    calls.sort();
    assert_eq!(
        calls,
        (0..20).collect::<Vec<i64>>(),
        "each message called once"
    );
    let (offset, kind, error): (i64, String, String) =
        sqlx::query_as("SELECT kafka_offset, error_kind, last_error FROM redrive.retry_messages")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(
        (offset, kind.as_str()),
        (0, "timeout"),
        "only the hung message is a row"
    );
    assert!(error.contains("did not finish within 3s"), "{error}");
    assert_eq!(db.count("true").await, 1);
}

#[tokio::test]
async fn a_capture_write_that_waits_does_not_hold_back_the_next() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("inflight"), unique("g"));
    create_topic(&topic, 1).await;
    let stub = fail_stub().await;
    let config = config(&db.url, &[&topic], &group, Some(stub.addr), "");
    assert!(config.consumer.capture_in_flight > 1);
    // An open transaction holds offset 0's coordinates: the batch that captures offset 0 waits on it.
    let blocker = hold_offset_0(&db, &group, &topic).await;
    let (stop, app) = spawn_app(config, consumer_only());
    let p = producer(&kafka());
    produce(&p, &topic, None, Some(b"fail-0"), &[]).await;
    wait_for_capture_to_wait(&db).await;
    for i in 1..=3 {
        produce(&p, &topic, None, Some(format!("fail-{i}").as_bytes()), &[]).await;
    }
    wait_for(
        "offsets 1 to 3 to be captured while offset 0's write waits",
        Duration::from_secs(60),
        || async { (db.count("kafka_offset > 0").await == 3).then_some(()) },
    )
    .await;
    release_offset_0(blocker, &db, &group, &topic, 4).await;
    stop.cancel();
    app.await.unwrap().unwrap();
}

/// Waits until the handler has had `calls` calls, then while the capturer's writes are refused
/// three more times: long enough for any further message to have reached the handler, if one could.
async fn wait_while_the_capturer_retries(proxy: &Proxy, stub: &Stub, calls: usize) {
    wait_for(
        "the handler's calls up to the bounds",
        Duration::from_secs(60),
        || async { (stub.count() >= calls).then_some(()) },
    )
    .await;
    let refused = proxy.refused();
    wait_for(
        "three more refused connections to the unreachable database",
        Duration::from_secs(60),
        || async { (proxy.refused() >= refused + 3).then_some(()) },
    )
    .await;
}

/// While offset 0's capture waits on `blocker`, nothing is committed; once it rolls back, every
/// one of the 4 offsets is committed, with `rows` rows stored (one per failure).
async fn release_offset_0(
    blocker: sqlx::Transaction<'static, sqlx::Postgres>,
    db: &TestDb,
    group: &str,
    topic: &str,
    rows: i64,
) {
    assert_eq!(
        committed(group, topic, 0),
        None,
        "nothing is committed past offset 0, whose outcome is not durable"
    );
    blocker.rollback().await.unwrap();
    wait_for(
        "every offset to be committed once offset 0 is captured",
        Duration::from_secs(60),
        || async { (committed(group, topic, 0) == Some(4)).then_some(()) },
    )
    .await;
    assert_eq!(db.count("true").await, rows, "each failure is one row");
}

/// Waits until a capture statement waits on a lock (the row of [`hold_offset_0`]).
async fn wait_for_capture_to_wait(db: &TestDb) {
    wait_for(
        "the capture of offset 0 to wait on the open transaction",
        Duration::from_secs(60),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO redrive.retry_messages%'",
            )
            .fetch_one(db.pool())
            .await
            .unwrap();
            (waiting > 0).then_some(())
        },
    )
    .await;
}

/// A row in an open transaction at offset 0's coordinates, so the capture of offset 0 waits on it.
async fn hold_offset_0(
    db: &TestDb,
    group: &str,
    topic: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut blocker = db.pool().begin().await.unwrap();
    sqlx::query(
        "INSERT INTO redrive.retry_messages (id, consumer_group, topic, \"partition\", kafka_offset, \
         state, attempts, max_attempts, next_attempt_at) \
         VALUES (gen_random_uuid(), $1, $2, 0, 0, 'pending', 1, 3, now())",
    )
    .bind(group)
    .bind(topic)
    .execute(&mut *blocker)
    .await
    .unwrap();
    blocker
}

#[tokio::test]
async fn a_failure_waiting_for_its_row_gives_its_slot_to_the_next_message() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("handover"), unique("g"));
    create_topic(&topic, 1).await;
    let stub = fail_stub().await;
    let mut config = config(&db.url, &[&topic], &group, Some(stub.addr), "");
    // One slot: held until offset 0's row were durable, it would let nothing else be handled.
    config.consumer.max_in_flight = 1;
    let blocker = hold_offset_0(&db, &group, &topic).await;
    let (stop, app) = spawn_app(config, consumer_only());
    let p = producer(&kafka());
    produce(&p, &topic, None, Some(b"fail-0"), &[]).await;
    wait_for_capture_to_wait(&db).await;
    for body in ["ok-1", "fail-2", "ok-3"] {
        produce(&p, &topic, None, Some(body.as_bytes()), &[]).await;
    }
    wait_for(
        "offsets 1 to 3 to be handled, and offset 2 captured, while offset 0's write waits",
        Duration::from_secs(60),
        || async { (stub.count() == 4 && db.count("kafka_offset = 2").await == 1).then_some(()) },
    )
    .await;
    release_offset_0(blocker, &db, &group, &topic, 2).await;
    stop.cancel();
    app.await.unwrap().unwrap();
}

/// Cuts Postgres once a first message is committed, produces ten failures (`body` of each index),
/// and checks that while nothing can be stored the handler sees only `held` of them (`why` says
/// which), and that every one is stored once Postgres is back.
async fn failures_wait_at_the_capturers_bounds(
    name: &str,
    configure: impl FnOnce(&mut redrive::config::Config),
    body: impl Fn(usize) -> String,
    held: usize,
    why: &str,
) {
    let db = TestDb::new().await;
    let proxy = Proxy::start(postgres_addr()).await;
    let (topic, group) = (unique(name), unique("g"));
    create_topic(&topic, 1).await;
    let stub = fail_stub().await;
    let mut config = config(&proxy.url(&db.url), &[&topic], &group, Some(stub.addr), "");
    config.consumer.max_in_flight = 1;
    configure(&mut config);
    let (stop, app) = spawn_app(config, consumer_only());
    let p = producer(&kafka());
    produce(&p, &topic, None, Some(b"ok-0"), &[]).await;
    wait_for(
        "offset 1 to be committed",
        Duration::from_secs(60),
        || async { (committed(&group, &topic, 0) == Some(1)).then_some(()) },
    )
    .await;
    proxy.cut();
    for i in 1..=10 {
        produce(&p, &topic, None, Some(body(i).as_bytes()), &[]).await;
    }
    wait_while_the_capturer_retries(&proxy, &stub, 1 + held).await;
    assert_eq!(stub.count(), 1 + held, "{why}");
    assert_eq!(committed(&group, &topic, 0), Some(1));
    proxy.restore();
    wait_for(
        "every failure to be captured and every offset committed",
        Duration::from_secs(90),
        || async { (committed(&group, &topic, 0) == Some(11)).then_some(()) },
    )
    .await;
    assert_eq!(
        db.count("true").await,
        10,
        "each failure is one row, none skipped"
    );
    stop.cancel();
    app.await.unwrap().unwrap();
}

#[tokio::test]
async fn failures_the_capturer_cannot_store_stop_the_consumer_at_its_bounds() {
    // The capturer holds at most two batches of one (one being written, one filling); the consumer
    // one message in its handler slot.
    failures_wait_at_the_capturers_bounds(
        "bounds",
        |c| {
            c.consumer.capture_batch_size = 1;
            c.consumer.capture_in_flight = 1;
        },
        |i| format!("fail-{i}"),
        3,
        "while nothing can be stored, the handler sees the two failures the capturer holds and \
         the one whose hand-over waits in the consumer's only slot, and no more",
    )
    .await;
}

#[tokio::test]
async fn failures_the_capturer_holds_are_bounded_in_bytes() {
    // Each failure takes more than half of the bytes the capturer may hold, so it holds one; by
    // count it would hold a thousand.
    failures_wait_at_the_capturers_bounds(
        "bytes",
        |c| {
            c.consumer.capture_batch_bytes = 1000;
            c.consumer.capture_in_flight = 1;
        },
        |i| format!("fail-{i}-{}", "x".repeat(600)),
        2,
        "while nothing can be stored, the handler sees the failure the capturer holds and the one \
         whose hand-over waits for room, and no more",
    )
    .await;
}

/// Runs `redrive::app::run` on a runtime of its own, on a thread of its own, so that a shutdown
/// blocked in librdkafka fails a test at its deadline instead of blocking the test's runtime with
/// it. The receiver gets the result once the runtime is dropped too, as the binary's is when its
/// `main` returns: that waits for any `spawn_blocking` task still running.
fn run_apart(
    config: redrive::Config,
    parts: RunArgs,
    stop: CancellationToken,
) -> std::sync::mpsc::Receiver<Result<(), String>> {
    let (done, stopped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let handler = redrive::handler::http::HttpHandler::new(&config.handler).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let result = runtime.block_on(redrive::app::run(config, handler, parts, stop));
        drop(runtime);
        let _ = done.send(result.map_err(|e| format!("{e:#}")));
    });
    stopped
}

/// Waits, without blocking the test's runtime, for [`run_apart`]'s result, at most `limit`.
async fn stopped_within(stopped: std::sync::mpsc::Receiver<Result<(), String>>, limit: Duration) {
    tokio::task::spawn_blocking(move || stopped.recv_timeout(limit))
        .await
        .unwrap()
        .unwrap_or_else(|_| panic!("shutdown did not finish within {limit:?}"))
        .unwrap();
}

/// A topic of one partition (named after `name`) on a mock cluster of its own, the fail stub, and
/// the config of a `run` of a group of its own that consumes the topic and calls the stub.
async fn on_mock(
    db: &TestDb,
    name: &str,
    extra: &str,
) -> (
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
    Stub,
    redrive::Config,
) {
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    let (topic, group) = (unique(name), unique("g"));
    mock.create_topic(&topic, 1, 1).unwrap();
    let stub = fail_stub().await;
    let mut config = config(&db.url, &[&topic], &group, Some(stub.addr), extra);
    config
        .kafka
        .properties
        .insert("bootstrap.servers".into(), mock.bootstrap_servers());
    (mock, topic, stub, config)
}

/// A broker that stops answering (each request now takes two minutes) does not hold shutdown up:
/// the final commit and the leave of the group get `CLOSE_WITHIN`, on a thread of their own, and
/// the captured row stays. On librdkafka's mock cluster, whose round trip can be set.
#[tokio::test]
async fn shutdown_does_not_wait_on_a_broker_that_stopped_answering() {
    let db = TestDb::new().await;
    let (mock, topic, stub, config) = on_mock(&db, "stalled-broker", "").await;
    let drain = config.shutdown.timeout;
    let stop = CancellationToken::new();
    let stopped = run_apart(config, consumer_only(), stop.clone());
    let p = producer(&mock.bootstrap_servers());
    for body in ["ok-0", "fail-1", "ok-2"] {
        produce(&p, &topic, None, Some(body.as_bytes()), &[]).await;
    }
    wait_for(
        "the messages to be handled and the failure captured",
        Duration::from_secs(60),
        || async { (stub.count() == 3 && db.count("true").await == 1).then_some(()) },
    )
    .await;
    mock.broker_round_trip_time(1, Duration::from_secs(120))
        .unwrap();
    stop.cancel();
    let limit = drain + redrive::consumer::CLOSE_WITHIN + Duration::from_secs(10);
    stopped_within(stopped, limit).await;
    assert_eq!(db.count("true").await, 1, "the captured row stays");
}

/// The same with every part running, while the DLQ publisher waits on the stalled broker for a
/// dead row it is sending: the round ends at the supervisor's grace at the latest, the producer
/// is dropped without waiting for the broker, and the row stays in the outbox, dead and
/// unpublished, for a later round.
#[tokio::test]
async fn shutdown_does_not_wait_on_a_dlq_send_to_a_broker_that_stopped_answering() {
    let db = TestDb::new().await;
    // The send would wait out the stall: only the stop can end it.
    let extra = "[retry]\nmax_attempts = 2\ninitial_delay = \"1s\"\njitter = 0.0\n\
                 [dlq]\npublish_timeout = \"300s\"\n";
    let (mock, topic, _stub, config) = on_mock(&db, "stalled-dlq", extra).await;
    mock.create_topic(&format!("{topic}.dlq"), 1, 1).unwrap();
    let drain = config.shutdown.timeout;
    let stop = CancellationToken::new();
    let all = RunArgs {
        no_http: true,
        ..Default::default()
    };
    let stopped = run_apart(config, all, stop.clone());
    let p = producer(&mock.bootstrap_servers());
    for body in ["ok-0", "fail-1"] {
        produce(&p, &topic, None, Some(body.as_bytes()), &[]).await;
    }
    wait_for(
        "the failure to be captured",
        Duration::from_secs(60),
        || async { (db.count("state = 'pending'").await == 1).then_some(()) },
    )
    .await;
    // The retry fails as well, and the row is dead: its publishing round finds the broker stalled.
    mock.broker_round_trip_time(1, Duration::from_secs(120))
        .unwrap();
    wait_for(
        "the DLQ publisher to hold the dead row while it sends it",
        Duration::from_secs(60),
        || async {
            let free: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM (SELECT 1 FROM redrive.retry_messages WHERE state = 'dead' \
                 FOR UPDATE SKIP LOCKED) free",
            )
            .fetch_one(db.pool())
            .await
            .unwrap();
            (db.count("state = 'dead'").await == 1 && free == 0).then_some(())
        },
    )
    .await;
    stop.cancel();
    // The supervisor's grace (the drain and 10 s), then the consumer's close.
    let limit = drain * 2 + redrive::consumer::CLOSE_WITHIN + Duration::from_secs(20);
    stopped_within(stopped, limit).await;
    assert_eq!(
        db.count("state = 'dead' AND dlq_published_at IS NULL")
            .await,
        1,
        "the dead row stays in the outbox"
    );
}
