//! The DLQ outbox's cases: `dlq` times redrive's publisher taking `n` dead rows to the DLQ topic,
//! and `produce-floor`, its reference, a producer with redrive's settings sending as many records
//! of the same size and headers, with no table behind it.

use super::{create_topic, delete_topic, seed, Run, Start, DEADLINE, PARTITIONS};
use redrive::store::capture::InitialState;
use redrive::Store;
use std::time::{Duration, Instant};

/// How many records the floor keeps unacknowledged at once: enough that the broker, not the
/// window, bounds it.
const FLOOR_WINDOW: usize = 10_000;

/// Fills the table with `n` dead rows that no DLQ broker has acknowledged, then times `redrive run`
/// with only its DLQ publisher until each row is on the DLQ topic and marked published.
pub async fn dlq(db: &str, kafka: &str, n: usize) -> anyhow::Result<Run> {
    let store = Store::from_pool(redrive::store::pool_options().connect(db).await?);
    seed(&store, n, InitialState::Dead, false).await?;
    sqlx::query("VACUUM ANALYZE redrive.retry_messages")
        .execute(store.pool())
        .await?;
    let topic = format!("bench.dlq.{}", chrono::Utc::now().timestamp_millis());
    create_topic(kafka, &topic, PARTITIONS).await?;
    let mut config = super::config(db, kafka, "bench", "bench", "http://127.0.0.1:1/")?;
    config.dlq.topic = topic.clone();
    if let Ok(rows) = std::env::var("BENCH_DLQ_BATCH") {
        config.dlq.batch_size = rows.parse()?;
    }
    if let Ok(rounds) = std::env::var("BENCH_DLQ_ROUNDS") {
        config.dlq.rounds_in_flight = Some(rounds.parse()?);
    }
    let parts = redrive::cli::RunArgs {
        no_consumer: true,
        no_workers: true,
        no_http: true,
        ..Default::default()
    };
    let on_topic = std::sync::Arc::new(Watermarks::new(kafka, &topic)?);
    let stop = tokio_util::sync::CancellationToken::new();
    let handler = super::Fixed::new(true);
    let started = Start::now();
    let task = tokio::spawn(redrive::app::run(config, handler, parts, stop.clone()));
    wait_published("dlq", n, &on_topic, &task, &store).await?;
    let run = started.finish(n);
    stop.cancel();
    task.await??;
    delete_topic(kafka, &topic).await?;
    Ok(run)
}

/// A storm of permanent errors: `n` messages produced first, then `redrive run` with its consumer
/// and its DLQ publisher, whose handler fails every call for good. Each message is captured as a
/// dead row while the publisher takes the dead rows to the DLQ topic and marks them: the two
/// share Postgres. Timed from the first handler call until every record is on the DLQ topic and
/// every row is marked published; when the last offset was committed is printed beside it.
pub async fn storm(db: &str, kafka: &str, n: usize) -> anyhow::Result<Run> {
    let stamp = chrono::Utc::now().timestamp_millis();
    let (topic, group) = (
        format!("bench.storm.{stamp}"),
        format!("bench-storm-{stamp}"),
    );
    let dlq = format!("{topic}.dlq");
    super::produce_keys(kafka, &topic, n, None, super::Payload::Small, false).await?;
    create_topic(kafka, &dlq, PARTITIONS).await?;
    let committed = super::Committed::new(kafka, &group, &topic)?;
    let mut config = super::config(db, kafka, &topic, &group, "http://127.0.0.1:1/")?;
    config.dlq.topic = dlq.clone();
    // As in `capture`: redrive's own messages in flight, and no breaker, which a storm of
    // failures would open.
    config.consumer.max_in_flight = redrive::config::ConsumerConfig::default().max_in_flight;
    config.breaker.default.enabled = false;
    if let Ok(rounds) = std::env::var("BENCH_DLQ_ROUNDS") {
        config.dlq.rounds_in_flight = Some(rounds.parse()?);
    }
    let parts = redrive::cli::RunArgs {
        no_workers: true,
        no_http: true,
        ..Default::default()
    };
    let store = Store::from_pool(redrive::store::pool_options().connect(db).await?);
    let on_topic = std::sync::Arc::new(Watermarks::new(kafka, &dlq)?);
    let stop = tokio_util::sync::CancellationToken::new();
    let handler = super::Fixed::permanent();
    let calls = handler.calls.clone();
    let task = tokio::spawn(redrive::app::run(config, handler, parts, stop.clone()));
    super::wait_calls("storm", &calls, n, &task).await?;
    committed.wait_all("storm", n).await?;
    let started = *calls.first.get().expect("n > 0 calls were made");
    let captured = started.at.elapsed().as_secs_f64();
    wait_published("storm", n, &on_topic, &task, &store).await?;
    let run = started.finish(n);
    eprintln!(
        "storm: every offset committed after {captured:.2} s ({:.0} msg/s), every row published \
         after {:.2} s",
        n as f64 / captured,
        run.secs
    );
    stop.cancel();
    task.await??;
    delete_topic(kafka, &topic).await?;
    delete_topic(kafka, &dlq).await?;
    Ok(run)
}

/// Waits until `n` records are on the DLQ topic and every row is marked published, or redrive's
/// `task` stops. The broker's high watermarks first, which ask nothing of Postgres; the outbox
/// itself only once every record is there, to see the last round's rows marked.
async fn wait_published<T>(
    case: &str,
    n: usize,
    on_topic: &std::sync::Arc<Watermarks>,
    task: &tokio::task::JoinHandle<T>,
    store: &Store,
) -> anyhow::Result<()> {
    super::wait_for(
        &format!("{case}: waiting for {n} records on {}", on_topic.topic),
        Duration::from_millis(20),
        || {
            let on_topic = on_topic.clone();
            let stopped = task.is_finished();
            async move {
                anyhow::ensure!(!stopped, "{case}: redrive stopped early");
                // A blocking call of librdkafka's: off the runtime's threads, which redrive uses.
                let got = tokio::task::spawn_blocking(move || on_topic.sum()).await??;
                Ok(got >= n as i64)
            }
        },
    )
    .await?;
    super::wait_for(
        &format!("{case}: waiting for the last rows to be marked published"),
        Duration::from_millis(20),
        || async {
            let left: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM redrive.retry_messages WHERE dlq_published_at IS NULL",
            )
            .fetch_one(store.pool())
            .await?;
            Ok(left == 0)
        },
    )
    .await
}

/// The reference for `dlq`: `n` records of 1 KiB, each with ten headers as long as a DLQ record's
/// origin headers, sent through a producer made as redrive makes its DLQ producer, up to
/// [`FLOOR_WINDOW`] unacknowledged at once, until the broker has acknowledged them all.
pub async fn produce_floor(kafka: &str, n: usize) -> anyhow::Result<Run> {
    use futures::stream::StreamExt;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let topic = format!("bench.produce.{}", chrono::Utc::now().timestamp_millis());
    create_topic(kafka, &topic, PARTITIONS).await?;
    let props = [("bootstrap.servers".to_string(), kafka.to_string())].into();
    let producer: FutureProducer =
        redrive::kafka::producer_config(&props, Duration::from_secs(30)).create()?;
    let payload = [b'x'; 1024];
    // Values of a DLQ record's origin headers: topic, partition, offset, timestamp, group,
    // attempts, first failure, last error, error kind, row id.
    let values = [
        "bench",
        "0",
        "123456",
        "",
        "bench",
        "1",
        "2026-12-07T17:00:00.000000+00:00",
        "seeded",
        "retryable",
        "0193a5b4-7f3e-7c1a-9d2b-4e5f6a7b8c9d",
    ];
    let started = Start::now();
    let sent = futures::stream::iter(0..n)
        .map(|i| {
            let key = i.to_string();
            let mut headers = OwnedHeaders::new_with_capacity(values.len());
            for (h, value) in values.iter().enumerate() {
                headers = headers.insert(Header {
                    key: HEADER_NAMES[h],
                    value: Some(value.as_bytes()),
                });
            }
            let record = FutureRecord::to(&topic)
                .key(key.as_bytes())
                .payload(&payload[..])
                .headers(headers);
            // Queued at once (the window is under librdkafka's queue); the future is its report.
            let queued = producer.send_result(record).map_err(|(e, _)| e);
            async move {
                match queued?.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e),
                    Err(_) => Err(rdkafka::error::KafkaError::Canceled),
                }
            }
        })
        .buffer_unordered(FLOOR_WINDOW)
        .fold(
            Ok::<usize, rdkafka::error::KafkaError>(0),
            |acc, r| async move { acc.and_then(|done| r.map(|()| done + 1)) },
        );
    let sent = tokio::time::timeout(DEADLINE, sent)
        .await
        .map_err(|_| anyhow::anyhow!("produce-floor: not acknowledged within {DEADLINE:?}"))??;
    let run = started.finish(sent);
    drop(producer);
    delete_topic(kafka, &topic).await?;
    Ok(run)
}

/// The DLQ record's origin header names (`redrive::dlq::headers`), so the floor's records are as long.
const HEADER_NAMES: [&str; 10] = [
    redrive::dlq::headers::TOPIC,
    redrive::dlq::headers::PARTITION,
    redrive::dlq::headers::OFFSET,
    redrive::dlq::headers::TIMESTAMP,
    redrive::dlq::headers::GROUP,
    redrive::dlq::headers::ATTEMPTS,
    redrive::dlq::headers::FIRST_FAILED_AT,
    redrive::dlq::headers::LAST_ERROR,
    redrive::dlq::headers::ERROR_KIND,
    redrive::dlq::headers::ID,
];

/// A topic's high watermarks, summed over its partitions: how many records it holds.
struct Watermarks {
    client: rdkafka::consumer::BaseConsumer,
    topic: String,
}

impl Watermarks {
    fn new(kafka: &str, topic: &str) -> anyhow::Result<Self> {
        let client = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka)
            .create()?;
        Ok(Self {
            client,
            topic: topic.to_string(),
        })
    }

    fn sum(&self) -> anyhow::Result<i64> {
        use rdkafka::consumer::Consumer as _;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut total = 0;
        for p in 0..PARTITIONS {
            let left = deadline.saturating_duration_since(Instant::now());
            let (_, high) = self.client.fetch_watermarks(&self.topic, p, left)?;
            total += high;
        }
        Ok(total)
    }
}
