//! The consumer: reads the configured topics in a consumer group, calls the handler for each
//! message, and stores a partition's offset only up to where every outcome is durable (I1).
//!
//! A message's outcome is durable when the handler succeeded, or when the capturer committed its
//! retry or dead row. Messages are handled concurrently (up to `max_in_flight`), so one failing or
//! slow message never blocks the others; [`OffsetTracker`] keeps the stored offsets in order.
//!
//! Each message is tagged with its partition's epoch when it is received. A partition revoked in a
//! rebalance gets a new epoch ([`crate::kafka::GroupContext`]), so a message received before, still
//! held or still running, stores no offset for it (I11). A partition whose commits wait on one
//! message for longer than a handler call and a capture should take is logged and counted.

use crate::capturer::CaptureHandle;
use crate::config::{Config, RetryConfig};
use crate::guard::Guard;
use crate::handler::{call_with_timeout, Delivery, Handler};
use crate::kafka::{self, GroupContext};
use crate::message::Message;
use crate::offsets::OffsetTracker;
use crate::store::capture::Capture;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::TopicPartitionList;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long every slot must stay busy before the partitions are paused; far below librdkafka's
/// default `max.poll.interval.ms` of five minutes.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// On top of the handler timeout, how long a capture may take (Postgres retries included) before
/// a partition whose lowest unfinished offset has not moved counts as stalled.
pub const STALL_GRACE: Duration = Duration::from_secs(60);

/// On top of three auto-commit intervals, how long after a store its commit may take before the
/// guard counts the partition's commit as lost.
const COMMIT_GRACE: Duration = Duration::from_secs(10);

/// The librdkafka consumer type redrive uses.
pub type KafkaConsumer = StreamConsumer<GroupContext>;

/// A received message and its partition's epoch at that moment.
type Received = (Message, u64);

/// What every message task needs.
struct Shared<H> {
    consumer: Arc<KafkaConsumer>,
    handler: Arc<H>,
    capture: CaptureHandle,
    tracker: Arc<Mutex<OffsetTracker>>,
    retry: RetryConfig,
    group: String,
    timeout: Duration,
}

/// Consumes and dispatches first deliveries.
pub struct Consumer<H> {
    shared: Arc<Shared<H>>,
    max_in_flight: usize,
    /// How long after a store the commit must have arrived before the guard steps in.
    commit_within: Duration,
}

impl<H: Handler> Consumer<H> {
    /// Wraps a subscribed consumer.
    pub fn new(
        consumer: Arc<KafkaConsumer>,
        handler: Arc<H>,
        capture: CaptureHandle,
        config: &Config,
    ) -> Self {
        Self {
            max_in_flight: config.consumer.max_in_flight,
            commit_within: COMMIT_GRACE + kafka::commit_interval(&config.kafka.properties) * 3,
            shared: Arc::new(Shared {
                group: config.kafka.group_id().to_string(),
                consumer: consumer.clone(),
                handler,
                capture,
                tracker: consumer.context().tracker.clone(),
                retry: config.retry.clone(),
                timeout: config.handler.timeout,
            }),
        }
    }

    /// Runs until `shutdown`, then stops polling, gives in-flight messages `drain` to finish and
    /// commits the stored offsets. Messages that did not finish are redelivered after a restart.
    /// A fatal error of the Kafka client (this member fenced by another with its
    /// `group.instance.id`, say) stops it the same way, and is returned.
    pub async fn run(self, shutdown: CancellationToken, drain: Duration) -> anyhow::Result<()> {
        let slots = Arc::new(Semaphore::new(self.max_in_flight));
        let mut tasks = JoinSet::new();
        let mut held = VecDeque::new();
        let guard = Guard {
            tracker: self.shared.tracker.clone(),
            consumer: self.shared.consumer.clone(),
            stall_after: self.shared.timeout + STALL_GRACE,
            commit_within: self.commit_within,
        };
        let guard = tokio::spawn(guard.run(shutdown.clone()));
        let mut failure = None;
        loop {
            let permit = match self.next_slot(&slots, &mut held, &shutdown).await {
                Ok(Some(permit)) => permit,
                Ok(None) => break,
                Err(fatal) => {
                    failure = Some(fatal);
                    break;
                }
            };
            let message = match held.pop_front() {
                Some(m) => m,
                None => {
                    let received = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        m = self.shared.consumer.recv() => m,
                    };
                    match received {
                        Ok(m) => self.shared.received(Message::from_kafka(&m)),
                        Err(e) => match self.fatal(&e) {
                            Some(fatal) => {
                                failure = Some(fatal);
                                break;
                            }
                            None => {
                                log_consume_error(&e);
                                continue;
                            }
                        },
                    }
                }
            };
            while tasks.try_join_next().is_some() {}
            self.start(&mut tasks, message, permit);
        }
        guard.abort();
        self.drain(tasks, drain).await;
        failure.map_or(Ok(()), Err)
    }

    /// The client's fatal error, when `e` is one: librdkafka consumes nothing after it.
    fn fatal(&self, e: &KafkaError) -> Option<anyhow::Error> {
        let KafkaError::MessageConsumptionFatal(code) = e else {
            return None;
        };
        let (code, reason) = self
            .shared
            .consumer
            .client()
            .fatal_error()
            .unwrap_or((*code, e.to_string()));
        let hint = match code {
            RDKafkaErrorCode::FencedInstanceId => {
                ": another consumer joined the group with this process's `group.instance.id`; \
                 every process needs an id of its own"
            }
            _ => "",
        };
        Some(anyhow::anyhow!(
            "the Kafka consumer stopped on a fatal error: {reason}{hint}"
        ))
    }

    /// Waits for a free slot. While every slot stays busy (a slow handler, or captures waiting for
    /// Postgres), the assigned partitions are paused and the consumer keeps polling, so it stays in
    /// its group however long that lasts (`max.poll.interval.ms`). A message fetched before the
    /// pause took effect is held, in order, for the next free slot. `None` on shutdown; the
    /// client's fatal error, if it has one.
    async fn next_slot(
        &self,
        slots: &Arc<Semaphore>,
        held: &mut VecDeque<Received>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<OwnedSemaphorePermit>> {
        // Under load a slot frees within milliseconds. Pausing purges librdkafka's fetch queue, so
        // it is kept for slots that stay busy.
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            p = slots.clone().acquire_owned() => return Ok(p.ok()),
            _ = tokio::time::sleep(PAUSE_AFTER) => {}
        }
        let mut paused = self.pause();
        let permit = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(None),
                p = slots.clone().acquire_owned() => break Ok(p.ok()),
                m = self.shared.consumer.recv() => match m {
                    Ok(m) => {
                        held.push_back(self.shared.received(Message::from_kafka(&m)));
                        // A rebalance may have assigned partitions that are not paused yet.
                        paused = self.pause().or(paused);
                    }
                    Err(e) => match self.fatal(&e) {
                        Some(fatal) => break Err(fatal),
                        None => log_consume_error(&e),
                    },
                },
            }
        };
        if let Some(partitions) = paused {
            if let Err(e) = self.shared.consumer.resume(&partitions) {
                tracing::debug!("resuming partitions: {e}");
            }
        }
        permit
    }

    /// Pauses every assigned partition; returns what was paused.
    fn pause(&self) -> Option<TopicPartitionList> {
        let assignment = self.shared.consumer.assignment().ok()?;
        match self.shared.consumer.pause(&assignment) {
            Ok(()) => {
                tracing::debug!(
                    in_flight = self.max_in_flight,
                    "every slot is busy: partitions paused"
                );
                Some(assignment)
            }
            Err(e) => {
                tracing::warn!("pausing partitions failed: {e}");
                None
            }
        }
    }

    /// Registers the message with the offset tracker (in consumption order) and handles it. A
    /// message of a partition revoked since it was received is dropped: its new owner has it.
    fn start(
        &self,
        tasks: &mut JoinSet<()>,
        (message, epoch): Received,
        permit: OwnedSemaphorePermit,
    ) {
        let (topic, partition, offset) = (&message.topic, message.partition, message.offset);
        if !self
            .shared
            .lock_tracker()
            .begin(topic, partition, offset, epoch)
        {
            tracing::debug!(
                topic,
                partition,
                offset,
                "partition revoked since the message arrived: dropped"
            );
            return;
        }
        metrics::counter!("redrive_messages_consumed_total").increment(1);
        let shared = self.shared.clone();
        let span = tracing::info_span!("message", topic = %message.topic, partition = message.partition, offset = message.offset);
        tasks.spawn(
            async move {
                shared.process(message, epoch).await;
                drop(permit);
            }
            .instrument(span),
        );
    }

    async fn drain(self, mut tasks: JoinSet<()>, limit: Duration) {
        while tasks.try_join_next().is_some() {}
        let waiting = tasks.len();
        tracing::info!(
            in_flight = waiting,
            "consumer stopping: finishing in-flight messages"
        );
        let finished =
            tokio::time::timeout(limit, async { while tasks.join_next().await.is_some() {} }).await;
        if finished.is_err() {
            tracing::warn!(
                abandoned = tasks.len(),
                "drain timeout: unfinished messages will be redelivered"
            );
            tasks.abort_all();
        }
        match self.shared.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => tracing::info!("committed stored offsets"),
            Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => {}
            Err(e) => {
                tracing::warn!("final offset commit failed (the messages will be redelivered): {e}")
            }
        }
    }
}

impl<H: Handler> Shared<H> {
    fn lock_tracker(&self) -> std::sync::MutexGuard<'_, OffsetTracker> {
        // A panic while holding this lock leaves only counters behind; keep going with them.
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tags a message with its partition's epoch on arrival.
    fn received(&self, message: Message) -> Received {
        let epoch = self.lock_tracker().epoch(&message.topic, message.partition);
        (message, epoch)
    }

    /// Handles one message to a durable outcome, then lets its offset be stored, unless the
    /// partition was revoked meanwhile (the epoch moved on).
    async fn process(&self, message: Message, epoch: u64) {
        let delivery = Delivery {
            message: &message,
            attempt: 1,
            group: &self.group,
        };
        let result = call_with_timeout(self.handler.as_ref(), delivery, self.timeout).await;
        let (topic, partition, offset) = (message.topic.clone(), message.partition, message.offset);
        match result {
            Ok(()) => {
                metrics::counter!("redrive_deliveries_total", "outcome" => "succeeded").increment(1)
            }
            Err(error) => {
                metrics::counter!("redrive_deliveries_total", "outcome" => error.kind.as_str())
                    .increment(1);
                tracing::debug!("first delivery failed: {error}");
                let policy = self.retry.for_topic(&topic);
                if !self
                    .capture
                    .capture(Capture::first_failure(message, policy, error))
                    .await
                {
                    return; // not durable: the offset stays unstored
                }
            }
        }
        // The position is stored while the tracker's lock is held: positions then reach
        // librdkafka in the order the tracker computed them. Stored after the lock was released,
        // a task could store an older position over a newer one, and at the end of a stream
        // nothing would store past it again: the partition's commit would stay short for good.
        let mut tracker = self.lock_tracker();
        if let Some(next) = tracker.done(&topic, partition, offset, epoch) {
            store_position(&self.consumer, &topic, partition, next);
        }
    }
}

/// Stores `next` (the next offset to consume) for the auto-commit. Call with the tracker's lock
/// held, so positions reach librdkafka in the order the tracker computed them.
pub(crate) fn store_position(consumer: &KafkaConsumer, topic: &str, partition: i32, next: i64) {
    // librdkafka stores `offset + 1`, the next message to read.
    if let Err(e) = consumer.store_offset(topic, partition, next - 1) {
        // Work for revoked partitions never gets here (the epoch moved on), so this is a
        // partition librdkafka no longer counts as ours: its next owner redelivers.
        tracing::warn!(topic, partition, offset = next, "offset not stored: {e}");
    }
}

fn log_consume_error(e: &KafkaError) {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
            tracing::error!("consuming failed: a subscribed topic does not exist: {e}")
        }
        _ => tracing::warn!("consuming failed: {e}"),
    }
}
