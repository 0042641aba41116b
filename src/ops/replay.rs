//! `redrive replay`: dead rows back to pending (the default), or their records back to Kafka.

use super::{chunked, connect, dry_run, explain, plan, print_skipped, Finished};
use crate::cli::ReplayArgs;
use crate::config::{Config, PostgresConfig};
use crate::kafka;
use crate::message::Message;
use crate::store::find::{Filter, Scope};
use crate::store::purge::Chunk;
use crate::store::replay::Audit;
use crate::store::Store;
use anyhow::{bail, Context};
use rdkafka::producer::{FutureProducer, Producer};
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The header a record produced by `replay --to-topic` carries: the id of the row it came from.
pub const REPLAY_OF_HEADER: &str = "redrive.replay.of";

/// Where the configuration for a replay comes from: `[postgres]` always, `[kafka]` for --to-topic.
pub enum Target {
    /// Re-enqueue rows; only Postgres is needed.
    Requeue(PostgresConfig),
    /// Produce records back to Kafka with the `[kafka]` properties of this configuration.
    Kafka(Box<Config>),
}

/// Runs `redrive replay`. Stops between chunks when `stop` is cancelled.
pub async fn run(
    target: Target,
    args: &ReplayArgs,
    stop: &CancellationToken,
) -> anyhow::Result<Finished> {
    let filter = Filter::from(&args.filter);
    if filter.is_empty() && !args.all {
        bail!("replay needs a filter (--id, --topic, --consumer-group, --key, --error-contains, --error-kind, --dead-since, --dead-before), or --all to replay every dead row");
    }
    let postgres = match &target {
        Target::Requeue(p) => p,
        Target::Kafka(c) => &c.postgres,
    };
    let store = connect(postgres).await?;
    let plan = plan(&store, Scope::Dead, &filter, true, &args.filter).await?;
    if args.filter.dry_run {
        dry_run(&store, Scope::Dead, &filter, true, &plan, "would replay").await?;
        print_skipped(&plan.skipped, "dead");
        return Ok(Finished::default());
    }
    let total = plan.total;
    let audit = Audit {
        by: args.by.clone().unwrap_or_else(os_user),
        reason: args.reason.clone(),
    };
    let finished = match &target {
        Target::Requeue(_) => {
            chunked("replay", total, &args.filter, &filter, stop, |n, from| {
                let (store, audit) = (&store, &audit);
                async move {
                    store
                        .replay_chunk(&from, n, audit, args.max_attempts)
                        .await
                        .map_err(|e| explain(e, "replay"))
                }
            })
            .await?
        }
        Target::Kafka(config) => {
            let to = ToTopic::new(config, args.to_topic.as_deref().unwrap_or_default())?;
            chunked("replay", total, &args.filter, &filter, stop, |n, from| {
                let (to, store, audit) = (&to, &store, &audit);
                async move { to.chunk(store, &from, n, audit).await }
            })
            .await?
        }
    };
    let how = match &target {
        Target::Requeue(_) => "re-enqueued: pending and due now",
        Target::Kafka(_) => "produced back to Kafka and marked replayed",
    };
    if finished.interrupted {
        println!(
            "interrupted: {} of {total} row(s) {how}; the rest are still dead. Run the same command again to continue.",
            finished.done
        );
    } else {
        println!("replayed {} row(s), {how}", finished.done);
    }
    print_skipped(&plan.skipped, "dead");
    Ok(finished)
}

/// The operating-system user, for `last_replayed_by`.
fn os_user() -> String {
    whoami::username().unwrap_or_else(|_| "unknown".into())
}

/// Produces dead rows' records back to Kafka (`replay --to-topic`, and the console's).
pub struct ToTopic {
    producer: FutureProducer,
    /// The named topic, or empty for each row's original topic.
    topic: String,
    /// Topics known to exist.
    checked: Mutex<HashSet<String>>,
    timeout: Duration,
}

impl ToTopic {
    /// A producer from `[kafka]`, to `topic`, or to each row's own topic when it is empty.
    pub fn new(config: &Config, topic: &str) -> anyhow::Result<Self> {
        let producer: FutureProducer =
            kafka::producer_config(&config.kafka.properties, config.dlq.publish_timeout)
                .create()
                .context("creating the Kafka producer from [kafka]")?;
        Ok(Self {
            producer,
            topic: topic.to_string(),
            checked: Mutex::default(),
            timeout: config.dlq.publish_timeout,
        })
    }

    fn topic_for<'a>(&'a self, m: &'a Message) -> &'a str {
        if self.topic.is_empty() {
            &m.topic
        } else {
            &self.topic
        }
    }

    /// Locks a chunk, produces its records, and marks those the broker acknowledged. Any send
    /// that fails ends the replay with an error; its rows stay dead.
    pub async fn chunk(
        &self,
        store: &Store,
        filter: &Filter,
        limit: i64,
        audit: &Audit,
    ) -> anyhow::Result<Chunk> {
        let chunk = store
            .to_topic_chunk(filter, limit)
            .await
            .map_err(|e| explain(e, "replay"))?;
        if chunk.rows.is_empty() {
            return Ok(Chunk::default());
        }
        for (_, m) in &chunk.rows {
            self.ensure_topic(self.topic_for(m))?;
        }
        let sends = (chunk.rows.iter().zip(&chunk.traces))
            .map(|((id, m), t)| self.send(*id, m, t.as_deref()));
        let results = futures::future::join_all(sends).await;
        let mut produced = Vec::new();
        let mut failures = Vec::new();
        for ((id, m), result) in chunk.rows.iter().zip(results) {
            match result {
                Ok(()) => produced.push((*id, self.topic_for(m).to_string())),
                Err(e) => failures.push(format!("{id}: {e}")),
            }
        }
        let selected = chunk.rows.len() as u64;
        let last_dead_at = chunk.last_dead_at;
        let changed = chunk
            .finish(&produced, audit)
            .await
            .map_err(|e| explain(e, "marking rows replayed"))?;
        if !failures.is_empty() {
            bail!(
                "Kafka did not acknowledge {} record(s), so their rows are still dead and nothing was lost (first: {}); {} row(s) of this chunk were replayed",
                failures.len(),
                failures[0],
                changed
            );
        }
        Ok(Chunk {
            selected,
            changed,
            last_dead_at,
        })
    }

    fn ensure_topic(&self, topic: &str) -> anyhow::Result<()> {
        if self.checked.lock().expect("not poisoned").contains(topic) {
            return Ok(());
        }
        kafka::ensure_topics(
            self.producer.client(),
            &[topic.to_string()],
            "replay",
            self.timeout,
        )?;
        self.checked
            .lock()
            .expect("not poisoned")
            .insert(topic.to_string());
        Ok(())
    }

    /// Produces a dead row's record again. One that carried no `traceparent` of its own gets the
    /// context its row keeps, so the replay goes on in the message's trace.
    async fn send(
        &self,
        id: Uuid,
        m: &Message,
        trace: Option<&str>,
    ) -> Result<(), rdkafka::error::KafkaError> {
        let mut extra = vec![(REPLAY_OF_HEADER, id.to_string())];
        if let Some(trace) = trace.filter(|_| m.header("traceparent").is_none()) {
            extra.extend(crate::telemetry::stored_headers(trace));
        }
        kafka::produce(&self.producer, self.topic_for(m), m, &extra)
            .await
            .map(|_| ())
    }
}
