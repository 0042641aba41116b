//! The consumer: reads the configured topics in a consumer group, calls the handler for each
//! message, and stores a partition's offset only up to where every outcome is durable (I1).
//!
//! A message's outcome is durable when the handler succeeded, or when the capturer committed its
//! retry or dead row. Messages are handled concurrently (up to `max_in_flight`), so one failing or
//! slow message never blocks the others; [`OffsetTracker`] keeps the stored offsets in order.
//!
//! What is already received when a slot frees is taken as one batch (up to 256): one task, one
//! deadline for its handler calls, one tracker update and one stored offset per partition for the
//! outcomes that are ready together. A slow or failing message in a batch holds only its own slot
//! and, as always, its own partition's commits. A failed message gives its slot back once the
//! capturer has taken it, and waits for its row outside the slots: the next messages are handled
//! while the failures are written, so the capture batches fill. The capturer bounds what it takes
//! (see [`crate::capturer`]); at those bounds a hand-over waits in its slot.
//!
//! Each message is stamped with the offset tracker's generation when it is received. A revoke in a
//! rebalance advances the generation ([`crate::kafka::GroupContext`]), so a message of a revoked
//! partition received before, still held or still running, stores no offset for it (I11). A
//! partition whose commits wait on one message for longer than a handler call and a capture should
//! take is logged and counted.

use crate::capturer::{CaptureHandle, Pending};
use crate::config::{Config, RetryConfig};
use crate::guard::Guard;
use crate::handler::{caught, timeout_error, Delivery, Handler, HandlerError};
use crate::kafka::{self, GroupContext};
use crate::message::Message;
use crate::offsets::OffsetTracker;
use crate::store::capture::Capture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt as _};
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::TopicPartitionList;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
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

/// A received message and the tracker's generation at that moment (its stamp).
type Received = (Message, u64);

/// At most this many messages are handled by one task.
const BATCH_MAX: usize = 256;

/// Received messages and one slot for each.
struct Batch {
    messages: Vec<Received>,
    slots: OwnedSemaphorePermit,
}

/// What every message task needs.
struct Shared<H> {
    consumer: Arc<KafkaConsumer>,
    handler: Arc<H>,
    capture: CaptureHandle,
    tracker: Arc<Mutex<OffsetTracker>>,
    /// The tracker's generation, read on arrival of each message.
    stamps: Arc<AtomicU64>,
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
                stamps: consumer.context().lock_tracker().stamps(),
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
            let first = match held.pop_front() {
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
            let mut batch = Batch {
                messages: vec![first],
                slots: permit,
            };
            if let Err(fatal) = self.fill(&mut batch, &slots, &mut held) {
                failure = Some(fatal);
            }
            while tasks.try_join_next().is_some() {}
            self.start(&mut tasks, batch);
            if failure.is_some() {
                break;
            }
        }
        guard.abort();
        self.drain(tasks, drain).await;
        failure.map_or(Ok(()), Err)
    }

    /// Adds to a batch what is already received, while slots are free: under load one task, one
    /// tracker update and one stored offset per partition then serve many messages. Never waits.
    fn fill(
        &self,
        batch: &mut Batch,
        slots: &Arc<Semaphore>,
        held: &mut VecDeque<Received>,
    ) -> anyhow::Result<()> {
        let room = slots
            .available_permits()
            .min(BATCH_MAX - batch.messages.len());
        let Ok(mut more) = slots.clone().try_acquire_many_owned(room as u32) else {
            return Ok(());
        };
        let result = loop {
            if batch.messages.len() - 1 == room {
                break Ok(());
            }
            let message = match held.pop_front() {
                Some(m) => m,
                // `recv` is cancellation safe: a message not ready now stays queued.
                None => match self.shared.consumer.recv().now_or_never() {
                    None => break Ok(()),
                    Some(Ok(m)) => self.shared.received(Message::from_kafka(&m)),
                    Some(Err(e)) => match self.fatal(&e) {
                        Some(fatal) => break Err(fatal),
                        None => {
                            log_consume_error(&e);
                            break Ok(());
                        }
                    },
                },
            };
            batch.messages.push(message);
        };
        // The slots taken for messages that were not there go back when `more` is dropped.
        if let Some(used) = more.split(batch.messages.len() - 1) {
            batch.slots.merge(used);
        }
        result
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

    /// Registers a batch with the offset tracker (in consumption order) and handles it in one
    /// task. A message of a partition revoked since it was received is dropped: its new owner has
    /// it.
    fn start(&self, tasks: &mut JoinSet<()>, mut batch: Batch) {
        let now = Instant::now();
        {
            let mut tracker = self.shared.lock_tracker();
            batch.messages.retain(|(message, stamp)| {
                let (topic, partition, offset) =
                    (&message.topic, message.partition, message.offset);
                let begun = tracker.begin_at(topic, partition, offset, *stamp, now);
                if !begun {
                    tracing::debug!(
                        topic,
                        partition,
                        offset,
                        "partition revoked since the message arrived: dropped"
                    );
                }
                begun
            });
        }
        // The slots of dropped messages go back.
        drop(
            batch
                .slots
                .split(batch.slots.num_permits() - batch.messages.len()),
        );
        if batch.messages.is_empty() {
            return;
        }
        metrics::counter!("redrive_messages_consumed_total").increment(batch.messages.len() as u64);
        let shared = self.shared.clone();
        tasks.spawn(async move { shared.process(batch).await });
    }

    async fn drain(self, mut tasks: JoinSet<()>, limit: Duration) {
        while tasks.try_join_next().is_some() {}
        let waiting = self.shared.lock_tracker().in_flight();
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

    /// Stamps a message with the tracker's generation on arrival (no lock).
    fn received(&self, message: Message) -> Received {
        (message, self.stamps.load(Ordering::SeqCst))
    }

    /// Handles a batch: every message's handler call runs at once, under one deadline, and a
    /// failure is captured. As outcomes become durable they are marked done, those ready together
    /// under one lock with one stored position per partition, and their slots are freed. A message
    /// whose failure could not be made durable (the capturer is gone: shutting down) stays in
    /// flight, so its offset is never stored.
    async fn process(&self, batch: Batch) {
        let Batch {
            messages,
            slots: mut held_slots,
        } = batch;
        let (messages, stamps): (Vec<Message>, Vec<u64>) = messages.into_iter().unzip();
        let mut calls: FuturesUnordered<_> = messages
            .iter()
            .enumerate()
            .map(|(i, message)| {
                let delivery = Delivery {
                    message,
                    attempt: 1,
                    group: &self.group,
                };
                let call = AssertUnwindSafe(self.handler.handle(delivery)).catch_unwind();
                let span = if tracing::enabled!(tracing::Level::DEBUG) {
                    tracing::debug_span!("message", topic = %message.topic,
                        partition = message.partition, offset = message.offset)
                } else {
                    tracing::Span::none()
                };
                call.map(move |r| (i, r)).instrument(span)
            })
            .collect();
        let mut answered = vec![false; messages.len()];
        // Failures being handed over to the capturer, then waiting for their rows.
        let mut captures = FuturesUnordered::new();
        let mut done: Vec<usize> = Vec::with_capacity(messages.len());
        // Successes whose slots go back once they are marked done. A failure carries its own slot
        // and gives it back once the capturer has taken it.
        let mut free = 0;
        let mut succeeded = 0;
        let timer = tokio::time::sleep(self.timeout);
        tokio::pin!(timer);
        while !calls.is_empty() || !captures.is_empty() {
            let mut failed = Vec::new();
            tokio::select! {
                biased;
                Some(first) = calls.next(), if !calls.is_empty() => {
                    // Every call ready now is taken, so they are marked done together.
                    let mut next = Some(first);
                    while let Some((i, result)) = next {
                        answered[i] = true;
                        match caught(result) {
                            Ok(()) => {
                                succeeded += 1;
                                free += 1;
                                done.push(i);
                            }
                            Err(error) => failed.push((i, error)),
                        }
                        next = calls.next().now_or_never().flatten();
                    }
                }
                Some(first) = captures.next(), if !captures.is_empty() => {
                    let mut next = Some(first);
                    while let Some((i, durable)) = next {
                        if durable {
                            done.push(i);
                        }
                        next = captures.next().now_or_never().flatten();
                    }
                }
                () = &mut timer, if !calls.is_empty() => {
                    // Dropping the calls still running cancels them: they ran out of time.
                    calls.clear();
                    let error = timeout_error(self.timeout);
                    failed.extend(answered.iter().enumerate().filter(|(_, a)| !**a)
                        .map(|(i, _)| (i, error.clone())));
                }
            }
            for (i, error) in failed {
                let message = messages[i].clone();
                let slot = held_slots.split(1);
                let capture = self.hand_over(message, error);
                captures.push(async move {
                    // A failure the capturer could not take (it stopped) is never done: its offset
                    // is not stored.
                    let Some(pending) = capture.await else {
                        return (i, false);
                    };
                    drop(slot);
                    (i, pending.durable().await)
                });
            }
            if !done.is_empty() {
                self.mark_done(&messages, &stamps, &mut done);
            }
            if free > 0 {
                drop(held_slots.split(free));
                free = 0;
            }
        }
        if succeeded > 0 {
            metrics::counter!("redrive_deliveries_total", "outcome" => "succeeded")
                .increment(succeeded);
        }
    }

    /// Hands a failed first delivery over to the capturer; `None` if it is gone.
    async fn hand_over(&self, message: Message, error: HandlerError) -> Option<Pending> {
        metrics::counter!("redrive_deliveries_total", "outcome" => error.kind.as_str())
            .increment(1);
        tracing::debug!(
            topic = message.topic,
            partition = message.partition,
            offset = message.offset,
            "first delivery failed: {error}"
        );
        let policy = self.retry.for_topic(&message.topic);
        self.capture
            .hand_over(Capture::first_failure(message, policy, error))
            .await
    }

    /// Marks messages done and stores each partition's new position once. Each message is in
    /// `done` once: when its call succeeded, or when its capture is durable.
    fn mark_done(&self, messages: &[Message], stamps: &[u64], done: &mut Vec<usize>) {
        // The position is stored while the tracker's lock is held: positions then reach
        // librdkafka in the order the tracker computed them. Stored after the lock was released,
        // a task could store an older position over a newer one, and at the end of a stream
        // nothing would store past it again: the partition's commit would stay short for good.
        let now = Instant::now();
        let mut tracker = self.lock_tracker();
        let mut positions: Vec<(&str, i32, i64)> = Vec::new();
        for i in done.drain(..) {
            let m = &messages[i];
            if let Some(next) = tracker.done_at(&m.topic, m.partition, m.offset, stamps[i], now) {
                match positions
                    .iter_mut()
                    .find(|(t, p, _)| *p == m.partition && *t == m.topic)
                {
                    Some(position) => position.2 = position.2.max(next),
                    None => positions.push((&m.topic, m.partition, next)),
                }
            }
        }
        for (topic, partition, next) in positions {
            store_position(&self.consumer, topic, partition, next);
        }
        drop(tracker);
    }
}

/// Stores `next` (the next offset to consume) for the auto-commit. Call with the tracker's lock
/// held, so positions reach librdkafka in the order the tracker computed them.
pub(crate) fn store_position(consumer: &KafkaConsumer, topic: &str, partition: i32, next: i64) {
    // librdkafka stores `offset + 1`, the next message to read.
    if let Err(e) = consumer.store_offset(topic, partition, next - 1) {
        // Work for revoked partitions never gets here (their stamps are older than the revoke), so this is a
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
