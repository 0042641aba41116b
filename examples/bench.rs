//! Throughput benchmarks for BENCHMARKS.md, on the real broker and Postgres (`make bench`).
//!
//! - happy:    every handler call succeeds; messages/s until every offset is committed.
//! - capture:  every handler call fails; messages/s until every failure is a row and committed.
//! - dispatch: due rows in the table, the handler succeeds; rows/s until the table is empty.
//! - replay:   dead rows in the table; rows/s of `redrive replay --all` (chunks of 1,000).
//! - purge:    dead rows in the table; rows/s of `redrive purge` (chunks of 1,000).
//!
//! The handler is an in-process `Handler` (redrive's own cost), and for `happy-http` the HTTP
//! handler against a local endpoint. Usage:
//! `bench [happy|happy-http|capture|dispatch|replay|purge|all] [N]`.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use redrive::cli::RunArgs;
use redrive::handler::{Delivery, Handler, HandlerError};
use redrive::store::capture::{Capture, InitialState};
use redrive::{Config, Store};
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 4;

#[derive(Clone, Copy)]
struct Fixed(bool);

impl Handler for Fixed {
    async fn handle(&self, _d: Delivery<'_>) -> Result<(), HandlerError> {
        if self.0 {
            Ok(())
        } else {
            Err(HandlerError::retryable("benchmark failure"))
        }
    }
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    redrive::telemetry::init_tracing();
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map(String::as_str).unwrap_or("all");
    let n: usize = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000);
    let kafka = env("REDRIVE_TEST_KAFKA", "127.0.0.1:9092");
    let admin_url = env(
        "REDRIVE_TEST_DATABASE_URL",
        "postgres://redrive:redrive@127.0.0.1:5432/redrive",
    );
    println!("| benchmark | messages | seconds | per second |\n|---|---|---|---|");
    for case in [
        "happy",
        "happy-http",
        "capture",
        "dispatch",
        "replay",
        "purge",
    ] {
        if which == "all" || which == case {
            let db = fresh_db(&admin_url).await?;
            let (secs, count) = match case {
                "dispatch" => dispatch(&db, n).await?,
                "replay" | "purge" => operate(case, &db, n).await?,
                _ => consume(case, &db, &kafka, n).await?,
            };
            println!(
                "| {case} | {count} | {secs:.2} | {:.0} |",
                count as f64 / secs
            );
        }
    }
    Ok(())
}

async fn fresh_db(admin_url: &str) -> anyhow::Result<String> {
    let url = redrive::support::recreate_database(admin_url, "redrive_bench").await?;
    redrive::store::migrate::run(&url.clone().into()).await?;
    Ok(url)
}

fn config(
    db: &str,
    kafka: &str,
    topic: &str,
    group: &str,
    handler: &str,
) -> anyhow::Result<Config> {
    Config::from_toml(&format!(
        "[postgres]\nurl = \"{db}\"\nmax_connections = 20\n[kafka]\ntopics = [\"{topic}\"]\n\
         \"bootstrap.servers\" = \"{kafka}\"\n\"group.id\" = \"{group}\"\n\"auto.commit.interval.ms\" = 200\n\
         [consumer]\nmax_in_flight = 2000\n[workers]\nconcurrency = 200\nclaim_batch_size = 100\n\
         [retry]\ninitial_delay = \"1h\"\nmax_delay = \"2h\"\n[handler]\nurl = \"{handler}\"\n"
    ))
    .map_err(Into::into)
}

async fn produce(kafka: &str, topic: &str, n: usize) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()?;
    let t = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1));
    admin.create_topics(&[t], &AdminOptions::new()).await?;
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("linger.ms", "20")
        .create()?;
    let payload = vec![b'x'; 1024];
    let sends = (0..n).map(|i| {
        let key = i.to_string();
        let p = p.clone();
        let payload = payload.clone();
        let topic = topic.to_string();
        async move {
            p.send(
                FutureRecord::to(&topic).key(&key).payload(&payload),
                Duration::from_secs(60),
            )
            .await
            .map(|_| ())
        }
    });
    for r in futures::future::join_all(sends).await {
        r.map_err(|(e, _)| e)?;
    }
    Ok(())
}

fn committed_total(kafka: &str, group: &str, topic: &str) -> i64 {
    committed_by_partition(kafka, group, topic).iter().sum()
}

/// Each partition's committed offset (0 where none is committed yet).
fn committed_by_partition(kafka: &str, group: &str, topic: &str) -> Vec<i64> {
    let c: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", group)
        .create()
    {
        Ok(c) => c,
        Err(_) => return vec![],
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let Ok(got) = c.committed_offsets(tpl, Duration::from_secs(10)) else {
        return vec![];
    };
    got.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .collect()
}

/// Produces `n` messages first, then times redrive consuming them all to committed offsets.
async fn consume(case: &str, db: &str, kafka: &str, n: usize) -> anyhow::Result<(f64, usize)> {
    let stamp = chrono::Utc::now().timestamp_millis();
    let (topic, group) = (
        format!("bench.{case}.{stamp}"),
        format!("bench-{case}-{stamp}"),
    );
    produce(kafka, &topic, n).await?;
    let stub = start_stub().await?;
    let config = config(db, kafka, &topic, &group, &format!("http://{stub}/"))?;
    let parts = RunArgs {
        no_workers: true,
        no_dlq: true,
        no_http: true,
        ..Default::default()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let task = match case {
        "happy-http" => {
            let h = redrive::handler::http::HttpHandler::new(&config.handler)?;
            tokio::spawn(redrive::app::run(config, h, parts, stop.clone()))
        }
        _ => tokio::spawn(redrive::app::run(
            config,
            Fixed(case == "happy"),
            parts,
            stop.clone(),
        )),
    };
    let deadline = started + Duration::from_secs(600);
    while committed_total(kafka, &group, &topic) < n as i64 {
        anyhow::ensure!(!task.is_finished(), "redrive stopped early");
        anyhow::ensure!(
            Instant::now() < deadline,
            "{case}: not every offset was committed within 10 minutes; committed by partition: {:?}",
            committed_by_partition(kafka, &group, &topic)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    stop.cancel();
    task.await??;
    Ok((secs, n))
}

/// `n` rows of 1 KiB in `state`, in batches of 1,000.
async fn seed(store: &Store, n: usize, state: InitialState) -> anyhow::Result<()> {
    for start in (0..n).step_by(1000) {
        let batch: Vec<Capture> = (start..(start + 1000).min(n))
            .map(|i| Capture {
                message: redrive::Message {
                    topic: "bench".into(),
                    partition: 0,
                    offset: i as i64,
                    timestamp: None,
                    key: Some(i.to_string().into_bytes()),
                    payload: Some(vec![b'x'; 1024]),
                    headers: vec![],
                },
                state,
                max_attempts: 5,
                retry_in: Duration::ZERO,
                error: HandlerError::retryable("seeded"),
            })
            .collect();
        store.capture("bench", &batch).await?;
    }
    Ok(())
}

/// Fills the table with `n` due rows, then times the retry workers emptying it.
async fn dispatch(db: &str, n: usize) -> anyhow::Result<(f64, usize)> {
    let store = Store::from_pool(sqlx::PgPool::connect(db).await?);
    seed(&store, n, InitialState::Pending).await?;
    let config = config(db, "127.0.0.1:1", "bench", "bench", "http://127.0.0.1:1/")?;
    let parts = RunArgs {
        no_consumer: true,
        no_dlq: true,
        no_http: true,
        ..Default::default()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(redrive::app::run(config, Fixed(true), parts, stop.clone()));
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM redrive.retry_messages")
            .fetch_one(store.pool())
            .await?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    stop.cancel();
    task.await??;
    Ok((secs, n))
}

/// Replays, or purges, `n` dead rows in chunks of 1,000, as the commands do.
async fn operate(case: &str, db: &str, n: usize) -> anyhow::Result<(f64, usize)> {
    let store = Store::from_pool(sqlx::PgPool::connect(db).await?);
    seed(&store, n, InitialState::Dead).await?;
    sqlx::query("VACUUM ANALYZE redrive.retry_messages")
        .execute(store.pool())
        .await?;
    let (filter, audit) = (
        redrive::store::find::Filter::default(),
        redrive::store::replay::Audit {
            by: "bench".into(),
            reason: None,
        },
    );
    let started = Instant::now();
    let mut done = 0;
    loop {
        let chunk = match case {
            "replay" => store.replay_chunk(&filter, 1000, &audit, None).await?,
            _ => store.purge_chunk(&filter, true, 1000).await?,
        };
        if chunk.selected == 0 {
            break;
        }
        done += chunk.changed as usize;
    }
    Ok((started.elapsed().as_secs_f64(), done))
}

async fn start_stub() -> anyhow::Result<std::net::SocketAddr> {
    use axum::routing::post;
    let app = axum::Router::new().route("/", post(|| async { "" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}
