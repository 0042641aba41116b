//! `redrive run`: connects, checks the schema and the topics, starts the services and owns their
//! shutdown. Library users call [`run`] with their own [`Handler`].
//!
//! Shutdown order keeps I1: the consumer stops polling and drains (its tasks wait for the capturer),
//! then commits; the retry workers drain and release unfinished claims; the completer and capturer
//! flush what they hold. Whatever misses the deadline is redelivered or rescued, never lost.

use crate::capturer::capturer;
use crate::cli::RunArgs;
use crate::completer::completer;
use crate::config::Config;
use crate::consumer::{Consumer, KafkaConsumer};
use crate::dispatcher::Dispatcher;
use crate::dlq::DlqPublisher;
use crate::handler::Handler;
use crate::kafka::{self, LoggingContext};
use crate::store::Store;
use anyhow::Context;
use rdkafka::consumer::Consumer as _;
use rdkafka::producer::{FutureProducer, Producer as _};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long startup waits for the Kafka cluster to describe a topic.
const METADATA_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs the selected services until `shutdown` is cancelled or one of them fails.
pub async fn run<H: Handler>(
    config: Config,
    handler: H,
    parts: RunArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = Store::connect(&config.postgres, &shutdown).await?;
    store.check_schema().await?;
    let group = config.kafka.group_id().to_string();
    tracing::info!(group, topics = ?config.kafka.topics, kafka = %kafka::describe(&config.kafka.properties), "starting");
    let handler = Arc::new(handler);
    let drain = config.shutdown.timeout;
    // Every startup check (topics, clients) runs before any service starts.
    let consumer = (!parts.no_consumer)
        .then(|| subscribe(&config))
        .transpose()?;
    let publisher = (!parts.no_dlq)
        .then(|| dlq_publisher(&config, store.clone()))
        .transpose()?;
    let mut services: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();

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
        let (completer, complete) = completer(store.clone(), &config.workers);
        let dispatcher = Dispatcher::new(
            store.clone(),
            handler.clone(),
            complete,
            &group,
            config.retry.clone(),
            config.workers.clone(),
            config.handler.timeout,
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
            &group,
            handler.clone(),
            capture,
            config.retry.clone(),
            &config.consumer,
            config.handler.timeout,
        );
        let token = shutdown.clone();
        services.spawn(async move {
            let capturing = tokio::spawn(capturer.run());
            consumer.run(token, drain).await;
            finish("capturer", capturing, drain).await; // every capture handle is gone
            ("consumer", Ok(()))
        });
    }
    if !parts.no_http {
        let (listen, store, token) = (config.http.listen, store.clone(), shutdown.clone());
        services.spawn(async move {
            (
                "http listener",
                crate::http_server::serve(listen, store, token).await,
            )
        });
    }
    supervise(services, shutdown, drain).await
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

/// Creates the consumer, checks that every topic exists, and subscribes.
fn subscribe(config: &Config) -> anyhow::Result<Arc<KafkaConsumer>> {
    let consumer: KafkaConsumer = kafka::consumer_config(&config.kafka.properties)?
        .create_with_context(LoggingContext)
        .context("creating the Kafka consumer (check the [kafka] properties)")?;
    kafka::ensure_topics(
        consumer.client(),
        &config.kafka.topics,
        "source",
        METADATA_TIMEOUT,
    )?;
    let topics: Vec<&str> = config.kafka.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .context("subscribing to the topics")?;
    Ok(Arc::new(consumer))
}

/// Creates the DLQ producer and checks that every DLQ topic exists.
fn dlq_publisher(config: &Config, store: Store) -> anyhow::Result<DlqPublisher> {
    let props = config.dlq_kafka_properties()?;
    let producer: FutureProducer = kafka::producer_config(&props, config.dlq.publish_timeout)
        .create()
        .context("creating the DLQ producer (check [kafka] and [dlq.kafka])")?;
    let publisher = DlqPublisher::new(
        store,
        producer.clone(),
        config.kafka.group_id(),
        &config.dlq.topic,
        config.dlq.batch_size,
    );
    let dlq_topics: Vec<String> = config
        .kafka
        .topics
        .iter()
        .map(|t| publisher.topic_for(t))
        .collect();
    kafka::ensure_topics(producer.client(), &dlq_topics, "DLQ", METADATA_TIMEOUT)?;
    Ok(publisher)
}
