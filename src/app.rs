//! `redrive run`: connects, checks the schema and the topics, starts the services and owns their
//! shutdown. Library users call [`run`] with their own [`Handler`].
//!
//! Shutdown order keeps I1: the consumer stops polling and drains (its tasks wait for the capturer),
//! then commits; the retry workers drain and release unfinished claims; the completer and capturer
//! flush what they hold. Whatever misses the deadline is redelivered or rescued, never lost.

use crate::breaker::Breakers;
use crate::capturer::capturer;
use crate::cli::RunArgs;
use crate::completer::completer;
use crate::config::Config;
use crate::consumer::{Consumer, KafkaConsumer};
use crate::dispatcher::Dispatcher;
use crate::dlq::DlqPublisher;
use crate::handler::Handler;
use crate::kafka::{self, GroupContext};
use crate::store::{Store, StoreError};
use anyhow::Context;
use rdkafka::consumer::Consumer as _;
use rdkafka::producer::Producer as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long startup waits for the Kafka cluster to describe a topic before it logs and tries again.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the selected services until `shutdown` is cancelled or one of them fails.
pub async fn run<H: Handler>(
    config: Config,
    handler: H,
    parts: RunArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    check_connection_budget(&config, &parts)?;
    // The recorder first: metric handles taken before it is installed would record nothing.
    crate::telemetry::metrics();
    let store = match Store::connect(&config.postgres, &shutdown).await {
        Ok(store) => store,
        // A stop asked for while Postgres was still away is a clean exit, not a failure.
        Err(StoreError::Cancelled(at)) => {
            tracing::info!("stopped before postgres at {at} answered");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    store.check_schema().await?;
    let group = config.kafka.group_id().to_string();
    tracing::info!(group, topics = ?config.kafka.topics, kafka = %kafka::describe(&config.kafka.properties), "starting");
    let handler = Arc::new(handler);
    let drain = config.shutdown.timeout;
    // Every startup check (topics, clients) runs before any service starts. A stop asked for while
    // the Kafka cluster is still away is a clean exit.
    let consumer = match parts.no_consumer {
        true => None,
        false => match subscribe(&config, &shutdown).await? {
            Some(c) => Some(c),
            None => return Ok(()),
        },
    };
    let publisher = match parts.no_dlq {
        true => None,
        false => match dlq_publisher(&config, store.clone(), &shutdown).await? {
            Some(p) => Some(p),
            None => return Ok(()),
        },
    };
    let mut services: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
    // The consumer and the workers call the same handler, so they share its breakers (I13).
    let breakers = Arc::new(Breakers::new(&config.breaker, &group));
    if !(parts.no_consumer && parts.no_workers) {
        // An operator's hold is taken before the first message is handed over.
        let (process, decides) = (process_name(), !parts.no_consumer);
        let holds = crate::breaker_sync::apply_holds(&store, &breakers, &group, &process, decides);
        if let Err(e) = holds.await {
            tracing::warn!(
                "reading the breaker holds failed ({e}); trying again every {:?}",
                crate::breaker_sync::EVERY
            );
        }
        let (store, breakers, group) = (store.clone(), breakers.clone(), group.clone());
        let token = shutdown.clone();
        services.spawn(async move {
            crate::breaker_sync::run(store, breakers, group, process, decides, token).await;
            ("breaker holds and states", Ok(()))
        });
    }

    if let Some(publisher) = publisher {
        let token = shutdown.clone();
        services.spawn(async move {
            (
                "dlq publisher",
                publisher.run(token).await.map_err(Into::into),
            )
        });
    }
    if !parts.no_workers {
        let (completer, complete) = completer(store.clone(), &group, &config.workers);
        let dispatcher = Dispatcher::new(
            store.clone(),
            handler.clone(),
            complete,
            &group,
            config.retry.clone(),
            config.workers.clone(),
            config.handler.timeout,
            breakers.clone(),
        );
        let token = shutdown.clone();
        services.spawn(async move {
            let completing = tokio::spawn(completer.run());
            let result = dispatcher.run(token, drain).await;
            finish("completer", completing, drain).await; // the dispatcher dropped its handle
            ("retry workers", result.map_err(Into::into))
        });
    }
    if let Some(consumer) = consumer {
        let (capturer, capture) = capturer(store.clone(), &group, &config.consumer);
        let consumer = Consumer::new(
            consumer,
            handler.clone(),
            capture,
            &config,
            breakers.clone(),
        );
        let token = shutdown.clone();
        services.spawn(async move {
            let capturing = tokio::spawn(capturer.run());
            let result = consumer.run(token, drain).await;
            finish("capturer", capturing, drain).await; // every capture handle is gone
            ("consumer", result)
        });
    }
    {
        let (store, group, token) = (store.clone(), group.clone(), shutdown.clone());
        services.spawn(async move {
            crate::lockwatch::run(store, group, token).await;
            ("lock watch", Ok(()))
        });
    }
    if !config.telemetry.sample_every.is_zero() {
        let (store, every, token) = (
            store.clone(),
            config.telemetry.sample_every,
            shutdown.clone(),
        );
        services.spawn(async move {
            crate::sampler::run(store, every, token).await;
            ("row gauges", Ok(()))
        });
    }
    if !parts.no_http {
        let (listen, store, token) = (config.http.listen, store.clone(), shutdown.clone());
        let breakers = breakers.clone();
        services.spawn(async move {
            (
                "http listener",
                crate::http_server::serve(listen, store, breakers, token).await,
            )
        });
    }
    supervise(services, shutdown, drain).await
}

/// The DLQ publisher's rounds in flight when `dlq.rounds_in_flight` is not set, where the pool has
/// room for them (see [`dlq_rounds`]).
const DLQ_ROUNDS: usize = 2;

/// Connections of the pool that capture, claims and completions need at least, between them,
/// beside the DLQ publisher's.
const WORKING_CONNECTIONS: usize = 1;

/// The DLQ publisher's rounds in flight: `dlq.rounds_in_flight`, or else [`DLQ_ROUNDS`], or fewer
/// when the pool has no room for them beside [`WORKING_CONNECTIONS`] (but always one).
fn dlq_rounds(config: &Config) -> usize {
    config.dlq.rounds_in_flight.unwrap_or_else(|| {
        let max = config.postgres.max_connections as usize;
        max.saturating_sub(WORKING_CONNECTIONS).clamp(1, DLQ_ROUNDS)
    })
}

/// Refuses a pool too small for what `run` holds (I10). The LISTEN connections of the workers and
/// the DLQ publisher are their own, outside the pool; inside it, each of the publisher's rounds in
/// flight holds one connection while the broker acknowledges its batch (up to
/// `dlq.publish_timeout`), and capture, claims and completions need at least one more between them.
fn check_connection_budget(config: &Config, parts: &RunArgs) -> anyhow::Result<()> {
    let held = match parts.no_dlq {
        true => 0,
        false => dlq_rounds(config),
    };
    let needed = held + WORKING_CONNECTIONS;
    let max = config.postgres.max_connections as usize;
    if max < needed {
        let rounds = match held {
            1 => "one while the broker acknowledges a batch".to_string(),
            n => format!(
                "one for each of its {n} rounds in flight (`dlq.rounds_in_flight`) while the \
                 broker acknowledges their batches"
            ),
        };
        anyhow::bail!(
            "invalid configuration: `postgres.max_connections` is {max}, but this `redrive run` needs at \
             least {needed}: the DLQ publisher holds {rounds}, and capture, claims and completions \
             need one more"
        );
    }
    Ok(())
}

/// The name this `run` reports its breakers under: `host-pid`, and a number after it for a second
/// `run` in the same process (tests, an embedding application).
fn process_name() -> String {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    match RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
        0 => crate::dispatcher::worker_id(),
        n => format!("{}-{}", crate::dispatcher::worker_id(), n + 1),
    }
}

/// Waits for shutdown, or for a service to end by itself (which shuts the others down).
async fn supervise(
    mut services: JoinSet<(&'static str, anyhow::Result<()>)>,
    shutdown: CancellationToken,
    drain: Duration,
) -> anyhow::Result<()> {
    let mut failure = None;
    let grace = drain + Duration::from_secs(10);
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let next = tokio::select! {
            n = services.join_next() => n,
            _ = shutdown.cancelled(), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + grace);
                continue;
            }
            _ = sleep_until_opt(deadline) => {
                tracing::warn!(services = services.len(), "shutdown deadline passed: stopping the rest");
                services.abort_all();
                continue;
            }
        };
        let Some(joined) = next else { break };
        let (name, result) = match joined {
            Ok(r) => r,
            Err(e) if e.is_cancelled() => continue,
            Err(e) => ("a service", Err(anyhow::anyhow!("panicked: {e}"))),
        };
        if !shutdown.is_cancelled() {
            tracing::error!(service = name, "stopped unexpectedly; shutting down");
            shutdown.cancel();
        }
        if let Err(e) = result {
            failure.get_or_insert(e.context(format!("{name} failed")));
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Lets a batching writer flush what it holds, within `limit`; a writer still retrying against an
/// unreachable Postgres then is stopped, and what it held is redelivered or rescued later.
async fn finish(name: &str, task: tokio::task::JoinHandle<()>, limit: Duration) {
    let abort = task.abort_handle();
    if tokio::time::timeout(limit, task).await.is_err() {
        tracing::warn!("{name} could not flush within {limit:?}; its batch is left to redelivery");
        abort.abort();
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// How long `run` keeps checking for a topic the cluster says does not exist before it stops on
/// that error: a topic created just before redrive starts (by the same deploy) may take a moment
/// to reach the metadata of the broker that answers, longer on a broker that has just restarted.
pub const MISSING_TOPIC_GRACE: Duration = Duration::from_secs(10);

/// Runs a topic check until the Kafka cluster answers it. A cluster that does not answer (down,
/// unreachable) is retried with backoff and a log line, as an unreachable Postgres is. A missing
/// topic is checked again every second for [`MISSING_TOPIC_GRACE`], with a log line, and is then
/// an error; any other failure is an error at once. `false` when shutdown came first.
async fn until_kafka_answers(
    bootstrap: &str,
    check: impl Fn() -> anyhow::Result<()> + Send + Sync + 'static,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let check = Arc::new(check);
    let (mut delay, mut attempt) = (Duration::from_secs(1), 0u64);
    let mut missing_since: Option<tokio::time::Instant> = None;
    loop {
        attempt += 1;
        // The metadata request blocks for up to its timeout.
        let c = check.clone();
        let rx = kafka::on_own_thread("kafka-check", move || c())
            .context("starting the Kafka topic check")?;
        let result = tokio::select! {
            r = rx => r.context("the Kafka topic check stopped without an answer")?,
            _ = shutdown.cancelled() => return Ok(false),
        };
        let wait = match result {
            Ok(()) => return Ok(true),
            Err(e) if e.downcast_ref::<kafka::Unreachable>().is_some() => {
                tracing::warn!(kafka = bootstrap, attempt, retry_in = %humantime::format_duration(delay),
                    "kafka is unreachable, retrying: {e:#}");
                let wait = delay;
                delay = (delay * 2).min(Duration::from_secs(30));
                wait
            }
            Err(e) => match e.downcast_ref::<kafka::Missing>() {
                Some(missing)
                    if missing_since.is_none_or(|t| t.elapsed() < MISSING_TOPIC_GRACE) =>
                {
                    if missing_since.is_none() {
                        tracing::info!(kafka = bootstrap, topic = %missing.topic,
                            "topic not in the cluster's metadata; checking again every second for up to {} in case it was just created",
                            humantime::format_duration(MISSING_TOPIC_GRACE));
                        missing_since = Some(tokio::time::Instant::now());
                    }
                    tracing::debug!(topic = %missing.topic, attempt, "topic still missing");
                    Duration::from_secs(1)
                }
                _ => return Err(e),
            },
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The configured `bootstrap.servers`, for log lines.
fn bootstrap(config: &Config) -> String {
    let servers = config.kafka.properties.get("bootstrap.servers");
    servers.cloned().unwrap_or_default()
}

/// Creates the consumer, checks that every topic exists, and subscribes. `None` on shutdown.
async fn subscribe(
    config: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Arc<KafkaConsumer>>> {
    let consumer: KafkaConsumer = kafka::consumer_config(&config.kafka.properties)?
        .create_with_context(GroupContext::new(config.kafka.group_id()))
        .context("creating the Kafka consumer (check the [kafka] properties)")?;
    let consumer = Arc::new(consumer);
    let (c, topics) = (consumer.clone(), config.kafka.topics.clone());
    let check = move || kafka::ensure_topics(c.client(), &topics, "source", METADATA_TIMEOUT);
    if !until_kafka_answers(&bootstrap(config), check, shutdown).await? {
        return Ok(None);
    }
    let topics: Vec<&str> = config.kafka.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .context("subscribing to the topics")?;
    Ok(Some(consumer))
}

/// Creates the DLQ producer and checks that every DLQ topic exists. `None` on shutdown.
async fn dlq_publisher(
    config: &Config,
    store: Store,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<DlqPublisher>> {
    let props = config.dlq_kafka_properties()?;
    let publisher = DlqPublisher::new(
        store,
        kafka::producer_config(&props, config.dlq.publish_timeout),
        config.kafka.group_id(),
        &config.dlq.topic,
        config.dlq.batch_size,
        config.dlq.batch_bytes,
    )
    .context("creating the DLQ producer (check [kafka] and [dlq.kafka])")?
    .with_rounds_in_flight(dlq_rounds(config));
    let producer = publisher.producer();
    let dlq_topics: Vec<String> = config
        .kafka
        .topics
        .iter()
        .map(|t| publisher.topic_for(t))
        .collect();
    let check =
        move || kafka::ensure_topics(producer.client(), &dlq_topics, "DLQ", METADATA_TIMEOUT);
    if !until_kafka_answers(&bootstrap(config), check, shutdown).await? {
        return Ok(None);
    }
    Ok(Some(publisher))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_toml(&format!(
            "[postgres]\nurl = \"postgres://r@127.0.0.1/r\"\n{extra}\n[kafka]\ntopics = [\"orders\"]\n\
             \"bootstrap.servers\" = \"127.0.0.1:9092\"\n\"group.id\" = \"g1\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn the_dlq_publisher_keeps_two_rounds_in_flight_where_the_pool_has_room() {
        assert_eq!(dlq_rounds(&config("")), 2);
        // A pool of two leaves room for one round beside capture, claims and completions.
        let small = config("max_connections = 2");
        assert_eq!(dlq_rounds(&small), 1);
        check_connection_budget(&small, &RunArgs::default()).unwrap();
        // Set, it is kept, and the pool must have room for it.
        let set = config("max_connections = 3\n[dlq]\nrounds_in_flight = 3");
        assert_eq!(dlq_rounds(&set), 3);
        let e = check_connection_budget(&set, &RunArgs::default()).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("`postgres.max_connections` is 3"), "{e}");
        assert!(e.contains("needs at least 4"), "{e}");
        assert!(e.contains("`dlq.rounds_in_flight`"), "{e}");
        let no_dlq = RunArgs {
            no_dlq: true,
            ..Default::default()
        };
        check_connection_budget(&set, &no_dlq).unwrap();
    }
}
