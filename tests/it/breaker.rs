//! The circuit breaker (I13), through the consumer and the workers on the real broker: an outage's
//! backlog stays in Kafka, no row spends its budget while the breaker is open, and bad messages
//! never open it.

use crate::helpers::*;
use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::FutureRecord;
use rdkafka::ClientConfig;
use redrive::cli::RunArgs;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The group's members' ids, as the broker knows them.
fn members(group: &str) -> Vec<String> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let list = c
        .fetch_group_list(Some(group), Duration::from_secs(10))
        .unwrap();
    list.groups()
        .iter()
        .flat_map(|g| g.members().iter().map(|m| m.id().to_string()))
        .collect()
}

/// A breaker counter of `group`'s default breaker.
fn transitions(group: &str, from: &str, to: &str) -> f64 {
    counter(&format!(
        "redrive_breaker_transitions_total{{group=\"{group}\",breaker=\"default\",from=\"{from}\",to=\"{to}\"}}"
    ))
}

async fn produce_values(topic: &str, n: i64) {
    let p = producer(&kafka());
    let sends = (0..n).map(|v| {
        let payload = format!("{{\"value\":{v}}}");
        let key = format!("k{}", v % 64);
        let p = &p;
        async move {
            let record = FutureRecord::to(topic).key(&key).payload(&payload);
            p.send(record, Duration::from_secs(30)).await.unwrap();
        }
    });
    join_all(sends).await;
}

fn value(r: &Received) -> i64 {
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["value"].as_i64().unwrap()
}

/// A total outage: 10,000 messages while the handler answers 503. The breaker opens within its
/// window and the table holds only what was under way then; the rest waits in Kafka as lag, and
/// the consumer stays in its group past `max.poll.interval.ms`. Probes fail and it opens again.
/// No row spends an attempt while it is open (only a row that went as a probe does) and none dies,
/// though three attempts in all would kill a row within a second without the breaker. Once the service is
/// back, everything is delivered and the committed offsets reach the end.
#[tokio::test]
async fn a_total_outage_stays_in_kafka_and_costs_no_row_its_budget() {
    const N: i64 = 10_000;
    let db = TestDb::new().await;
    redrive::telemetry::metrics(); // the counters read below count from here
    let (topic, group) = (unique("outage"), unique("g"));
    create_topic(&topic, 2).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    let up = Arc::new(AtomicBool::new(false));
    // The values the handler took, once it is up.
    let took: Arc<Mutex<BTreeSet<i64>>> = Arc::default();
    let (u, t) = (up.clone(), took.clone());
    let stub = Stub::start(move |r| match u.load(Ordering::SeqCst) {
        true => {
            t.lock().unwrap().insert(value(r));
            (200, vec![])
        }
        false => (503, vec![]),
    })
    .await;
    let extra = "[retry]\nmax_attempts = 3\ninitial_delay = \"200ms\"\njitter = 0.0\n\
                 [breaker]\nopen_for = \"1s\"\nopen_max = \"2s\"\nprobes = 2\nramp = \"2s\"";
    let mut config = config(&db.url, &[&topic], &group, Some(stub.addr), extra);
    // librdkafka's least: the session timeout (6 s).
    config
        .kafka
        .properties
        .insert("max.poll.interval.ms".into(), "6000".into());
    let (stop, app) = spawn_app(config, RunArgs::default());
    produce_values(&topic, N).await;

    wait_for(
        "the breaker to open, and to open again after failed probes",
        Duration::from_secs(60),
        || async {
            let again = transitions(&group, "half_open", "open") >= 1.0;
            (transitions(&group, "closed", "open") >= 1.0 && again).then_some(())
        },
    )
    .await;
    let member = wait_for(
        "the consumer's membership",
        Duration::from_secs(30),
        || async {
            let m = members(&group);
            (m.len() == 1).then(|| m[0].clone())
        },
    )
    .await;
    // The outage itself: longer than max.poll.interval.ms, while the consumer delivers nothing.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let rows = db.count("true").await;
    assert!(rows > 0 && rows < N / 10, "{rows} rows for {N} messages");
    assert_eq!(db.count("state = 'dead'").await, 0, "no row died");
    // Only a row that went as a probe spent an attempt: at most one failed probe a half-open.
    let probed = db.count("attempts > 1").await as f64;
    assert!(
        probed <= transitions(&group, "open", "half_open"),
        "{probed} rows spent attempts"
    );
    assert_eq!(
        members(&group),
        [member],
        "the consumer stayed in its group"
    );
    let lag: i64 = (0..2)
        .map(|p| committed(&group, &topic, p).unwrap_or(0))
        .sum();
    assert!(lag < N / 2, "the backlog stays in Kafka: {lag} committed");

    // The service comes back: probes pass, the breaker closes and everything goes.
    up.store(true, Ordering::SeqCst);
    wait_for(
        "every offset committed and the retry table empty",
        Duration::from_secs(120),
        || async {
            let end = (0..2)
                .map(|p| committed(&group, &topic, p).unwrap_or(0))
                .sum::<i64>();
            (end == N && db.count("true").await == 0).then_some(())
        },
    )
    .await;
    assert_eq!(
        took.lock().unwrap().len() as i64,
        N,
        "the handler took every value"
    );
    assert!(transitions(&group, "half_open", "closed") >= 1.0);
    stop.cancel();
    app.await.unwrap().unwrap();
}

/// Permanent failures at a high rate are bad messages, not a bad service: the breaker stays
/// closed and they die at once, as before.
#[tokio::test]
async fn permanent_failures_never_open_the_breaker() {
    let db = TestDb::new().await;
    redrive::telemetry::metrics();
    let (topic, group) = (unique("refused"), unique("g"));
    create_topic(&topic, 1).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    let stub = Stub::start(|_| (400, vec![])).await;
    let extra = "[breaker]\nmin_calls = 5";
    let (stop, app) = spawn_app(
        config(&db.url, &[&topic], &group, Some(stub.addr), extra),
        RunArgs::default(),
    );
    produce_values(&topic, 300).await;
    wait_for(
        "every message dead and committed",
        Duration::from_secs(60),
        || async {
            let done = committed(&group, &topic, 0) == Some(300)
                && db.count("state = 'dead'").await == 300;
            done.then_some(())
        },
    )
    .await;
    assert_eq!(stub.count(), 300);
    assert_eq!(transitions(&group, "closed", "open"), 0.0);
    stop.cancel();
    app.await.unwrap().unwrap();
}

/// Retry rows that fail whatever the service does cannot hold the breaker open: as probes they
/// spend their attempts and die in their time. Then a new message goes as the probe, the breaker
/// closes and everything else is delivered.
#[tokio::test]
async fn bad_rows_cannot_hold_the_breaker_open() {
    let db = TestDb::new().await;
    redrive::telemetry::metrics();
    let (topic, group) = (unique("poison"), unique("g"));
    create_topic(&topic, 1).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    let up = Arc::new(AtomicBool::new(false));
    let u = up.clone();
    // Values under 10 fail every time; the others fail until the service is up.
    let stub = Stub::start(move |r| match u.load(Ordering::SeqCst) && value(r) >= 10 {
        true => (200, vec![]),
        false => (500, vec![]),
    })
    .await;
    let extra = "[retry]\nmax_attempts = 3\ninitial_delay = \"100ms\"\njitter = 0.0\n\
                 [breaker]\nmin_calls = 5\nopen_for = \"300ms\"\nopen_max = \"600ms\"\nprobes = 3";
    let (stop, app) = spawn_app(
        config(&db.url, &[&topic], &group, Some(stub.addr), extra),
        RunArgs::default(),
    );
    produce_values(&topic, 10).await;
    wait_for("the breaker to open", Duration::from_secs(60), || async {
        (transitions(&group, "closed", "open") >= 1.0).then_some(())
    })
    .await;
    up.store(true, Ordering::SeqCst);
    // Only bad rows are due: their probes fail, and they die.
    wait_for("the bad rows to die", Duration::from_secs(120), || async {
        (db.count("state = 'dead'").await == 10).then_some(())
    })
    .await;
    let p = producer(&kafka());
    for v in 10..30 {
        let payload = format!("{{\"value\":{v}}}");
        produce(&p, &topic, None, Some(payload.as_bytes()), &[]).await;
    }
    wait_for(
        "every new value to succeed",
        Duration::from_secs(120),
        || async {
            let done = committed(&group, &topic, 0) == Some(30) && db.count("true").await == 10;
            done.then_some(())
        },
    )
    .await;
    assert!(transitions(&group, "half_open", "closed") >= 1.0);
    stop.cancel();
    app.await.unwrap().unwrap();
}

/// An operator's hold, from the command line, is taken by a running process within seconds and
/// wins over the calls: held open, nothing is delivered and a due row keeps its attempt count;
/// released, everything goes; held closed, an outage does not open the breaker. `redrive breaker
/// status` and `redrive status` show the process's breakers, and a stopped process removes its
/// rows.
#[tokio::test]
async fn an_operators_hold_is_taken_by_running_processes() {
    use redrive::store::capture::{Capture, InitialState};
    let db = TestDb::new().await;
    redrive::telemetry::metrics();
    let (topic, group) = (unique("held"), unique("g"));
    create_topic(&topic, 1).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    let down = Arc::new(AtomicBool::new(false));
    let d = down.clone();
    let stub = Stub::start(move |_| match d.load(Ordering::SeqCst) {
        true => (503, vec![]),
        false => (200, vec![]),
    })
    .await;
    let extra = "[retry]\ninitial_delay = \"100ms\"\njitter = 0.0\n[breaker]\nmin_calls = 5";
    let (stop, app) = spawn_app(
        config(&db.url, &[&topic], &group, Some(stub.addr), extra),
        RunArgs::default(),
    );
    let ops = ops_config(&db.url);
    let g = ["--consumer-group", group.as_str()];
    wait_for("the process to report", Duration::from_secs(30), || async {
        let out = redrive(&ops.0, &["breaker", "status"]).await.ok().stdout;
        out.contains(&group).then_some(())
    })
    .await;

    // Held open: the command waits until the process says it took the hold.
    let held = redrive(
        &ops.0,
        &[&["breaker", "open", "--reason", "CHG-118"][..], &g].concat(),
    )
    .await
    .ok()
    .stdout;
    assert!(held.contains("1 running process(es) took it"), "{held}");
    let status = redrive(&ops.0, &["breaker", "status"]).await.ok().stdout;
    assert!(
        status.contains("open (held)") && status.contains("CHG-118"),
        "{status}"
    );
    let store = redrive::Store::from_pool(db.pool().clone());
    let due = Capture {
        message: redrive::Message {
            topic: topic.clone(),
            partition: 0,
            offset: 1_000_000,
            timestamp: None,
            key: None,
            payload: Some(b"{\"value\":-1}".to_vec()),
            headers: vec![],
        },
        state: InitialState::Pending,
        max_attempts: 3,
        retry_in: Duration::ZERO,
        error: redrive::HandlerError::retryable("HTTP 503"),
        line: None,
        trace: None,
    };
    store.capture(&group, &[due]).await.unwrap();
    produce_values(&topic, 20).await;
    // Without the hold, the row and the messages would go within milliseconds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(stub.count(), 0, "nothing was delivered while held open");
    assert_eq!(
        db.count("attempts = 1").await,
        1,
        "the due row kept its count"
    );
    assert_eq!(committed(&group, &topic, 0).unwrap_or(0), 0);

    // Released: everything goes.
    let released = redrive(&ops.0, &[&["breaker", "release"][..], &g].concat())
        .await
        .ok()
        .stdout;
    assert!(released.contains("lifted 1 hold(s)"), "{released}");
    wait_for("everything delivered", Duration::from_secs(60), || async {
        let done = committed(&group, &topic, 0) == Some(20) && db.count("true").await == 0;
        done.then_some(())
    })
    .await;
    assert_eq!(stub.count(), 21);

    // Held closed (for every group): an outage does not open it.
    let opened = transitions(&group, "closed", "open"); // the hold above counts once
    let closed = redrive(&ops.0, &["breaker", "close"]).await.ok().stdout;
    assert!(closed.contains("took it"), "{closed}");
    down.store(true, Ordering::SeqCst);
    produce_values(&topic, 30).await;
    wait_for("the failures captured", Duration::from_secs(60), || async {
        let done = committed(&group, &topic, 0) == Some(50) && db.count("true").await == 30;
        done.then_some(())
    })
    .await;
    assert_eq!(transitions(&group, "closed", "open"), opened);
    let status = redrive(&ops.0, &["status"]).await.ok().stdout;
    assert!(
        status.contains("Circuit breakers") && status.contains("closed (held)"),
        "{status}"
    );
    redrive(&ops.0, &["breaker", "release"]).await.ok();

    stop.cancel();
    app.await.unwrap().unwrap();
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM redrive.breaker_states WHERE consumer_group = $1")
            .bind(&group)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(left, 0, "a stopped process removes its rows");
}

/// How long each opening of `group`'s default breaker lasts, in seconds, in order, as the process
/// reports them to Postgres (it reports every change), until `n` have been seen.
async fn open_times(db: &TestDb, group: &str, n: usize) -> Vec<f64> {
    type Seen = Vec<(chrono::DateTime<chrono::Utc>, f64)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    wait_for(
        &format!("{n} openings of the breaker"),
        Duration::from_secs(90),
        || async {
            let row: Option<(chrono::DateTime<chrono::Utc>, f64)> = sqlx::query_as(
                "SELECT since, extract(epoch FROM open_until - since)::float8 \
                 FROM redrive.breaker_states \
                 WHERE consumer_group = $1 AND breaker = 'default' AND state = 'open'",
            )
            .bind(group)
            .fetch_optional(db.pool())
            .await
            .unwrap();
            let mut seen = seen.lock().unwrap();
            if let Some((since, secs)) = row {
                if seen.last().is_none_or(|(s, _)| *s != since) {
                    seen.push((since, secs));
                }
            }
            (seen.len() >= n).then_some(())
        },
    )
    .await;
    let seen = seen.lock().unwrap();
    seen.iter().map(|(_, secs)| *secs).collect()
}

fn roughly(actual: &[f64], expected: &[f64]) -> bool {
    actual.len() >= expected.len()
        && actual
            .iter()
            .zip(expected)
            .all(|(a, e)| (a - e).abs() <= 0.15)
}

/// A flapping service: every probe fails, so the breaker opens again each time, for twice as long
/// up to `open_max`; only the probes spend attempts.
#[tokio::test]
async fn a_failing_probe_reopens_it_for_longer_up_to_the_cap() {
    let db = TestDb::new().await;
    redrive::telemetry::metrics();
    let (topic, group) = (unique("flapping"), unique("g"));
    create_topic(&topic, 1).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    let stub = Stub::start(|_| (503, vec![])).await;
    let extra = "[retry]\nmax_attempts = 2\ninitial_delay = \"100ms\"\njitter = 0.0\n\
                 [breaker]\nmin_calls = 5\nopen_for = \"400ms\"\nopen_max = \"1600ms\"\nprobes = 1";
    let (stop, app) = spawn_app(
        config(&db.url, &[&topic], &group, Some(stub.addr), extra),
        RunArgs::default(),
    );
    produce_values(&topic, 200).await;
    let times = open_times(&db, &group, 5).await;
    assert!(
        roughly(&times, &[0.4, 0.8, 1.6, 1.6, 1.6]),
        "open for {times:?} s"
    );
    // Only probes spent attempts: at most one a half-open, as `probes = 1`.
    let spent: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(attempts - 1), 0)::int8 FROM redrive.retry_messages",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    let rounds = transitions(&group, "open", "half_open");
    assert!(
        spent as f64 <= rounds,
        "{spent} attempts spent in {rounds} rounds"
    );
    stop.cancel();
    app.await.unwrap().unwrap();
}

/// A `Retry-After` on the 503s that open the breaker keeps it open at least that long, beyond its
/// own `open_for`.
#[tokio::test]
async fn a_retry_after_keeps_it_open_at_least_that_long() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("retry-after"), unique("g"));
    create_topic(&topic, 1).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    let stub = Stub::start(|_| (503, vec![("retry-after", "3".to_string())])).await;
    let extra = "[breaker]\nmin_calls = 5\nopen_for = \"200ms\"\nopen_max = \"10s\"\nprobes = 1";
    let (stop, app) = spawn_app(
        config(&db.url, &[&topic], &group, Some(stub.addr), extra),
        RunArgs::default(),
    );
    produce_values(&topic, 50).await;
    let times = open_times(&db, &group, 2).await;
    assert!(roughly(&times, &[3.0, 3.0]), "open for {times:?} s");
    stop.cancel();
    app.await.unwrap().unwrap();
}

/// A process that runs only retry workers makes no first deliveries, so its breaker follows the
/// group's consuming processes through Postgres: open while theirs is, so that its rows spend no
/// attempts on the service that is down; then half-open, and its own probe closes it. (The
/// consumer, with no workers and no new message to probe with, stays half-open.)
#[tokio::test]
async fn a_workers_only_process_follows_the_consumers_breaker() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("split"), unique("g"));
    create_topic(&topic, 1).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    let up = Arc::new(AtomicBool::new(false));
    let u = up.clone();
    let stub = Stub::start(move |_| match u.load(Ordering::SeqCst) {
        true => (200, vec![]),
        false => (503, vec![]),
    })
    .await;
    // Rows come due 4 s after their failure: after the workers' process has followed (within 2 s).
    let extra = "[retry]\nmax_attempts = 3\ninitial_delay = \"4s\"\njitter = 0.0\n\
                 [breaker]\nmin_calls = 5\nopen_for = \"8s\"\nprobes = 1\nramp = \"1s\"";
    let config = || config(&db.url, &[&topic], &group, Some(stub.addr), extra);
    let consumer = RunArgs {
        no_workers: true,
        no_http: true,
        ..Default::default()
    };
    let workers = RunArgs {
        no_consumer: true,
        no_dlq: true,
        no_http: true,
        ..Default::default()
    };
    let (stop_c, app_c) = spawn_app(config(), consumer);
    let (stop_w, app_w) = spawn_app(config(), workers);
    produce_values(&topic, 200).await;

    let state = |decides: bool| {
        let pool = db.pool().clone();
        let group = group.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT state FROM redrive.breaker_states WHERE consumer_group = $1 AND decides = $2",
            )
            .bind(&group)
            .bind(decides)
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    };
    wait_for(
        "the workers' breaker to follow the consumer's open",
        Duration::from_secs(30),
        || async {
            let both = state(true).await.as_deref() == Some("open")
                && state(false).await.as_deref() == Some("open");
            both.then_some(())
        },
    )
    .await;
    let rows = db.count("true").await;
    assert!(rows > 0, "the failures under way were captured");
    // Every row comes due while the breaker is open: none is attempted.
    wait_for(
        "every row to be due for a second",
        Duration::from_secs(30),
        || async {
            let due = db
                .count("next_attempt_at < now() - interval '1 second'")
                .await;
            (due == rows).then_some(())
        },
    )
    .await;
    assert_eq!(state(false).await.as_deref(), Some("open"));
    assert_eq!(
        db.count("attempts = 1").await,
        rows,
        "no row spent an attempt"
    );
    let status = redrive(&ops_config(&db.url).0, &["breaker", "status"])
        .await
        .ok()
        .stdout;
    assert!(
        status.contains("following the group's consumers"),
        "{status}"
    );

    // Back: the consumer's probe passes and it closes, the workers follow and drain the rows.
    up.store(true, Ordering::SeqCst);
    wait_for("everything delivered", Duration::from_secs(90), || async {
        let done = committed(&group, &topic, 0) == Some(200) && db.count("true").await == 0;
        done.then_some(())
    })
    .await;
    assert_eq!(state(false).await.as_deref(), Some("closed"));
    stop_c.cancel();
    stop_w.cancel();
    app_c.await.unwrap().unwrap();
    app_w.await.unwrap().unwrap();
}
