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
//! A topic with `ordering = "key"` keeps each key's order (I12): one message of a key is under way
//! at a time, and the messages of a key whose line in the retry table holds a row are parked
//! behind it instead of delivered; [`crate::lines`] decides which message goes next.
//!
//! While a topic's breaker is not closed (I13), its messages are not delivered: those received are
//! held back in order, its partitions are paused (the consumer keeps polling, so it stays in its
//! group) and the backlog stays in Kafka. A half-open breaker may take one of them as a probe. When
//! the breaker closes they go first, and the consumer ramps up to `max_in_flight` over the
//! breaker's `ramp`. Every call's outcome is counted by its topic's breaker, once per batch.
//!
//! Each message is stamped with the offset tracker's generation when it is received. A revoke in a
//! rebalance advances the generation ([`crate::kafka::GroupContext`]), so a message of a revoked
//! partition received before, still held or still running, stores no offset for it (I11). A
//! partition whose commits wait on one message for longer than a handler call and a capture should
//! take is logged and counted.

use crate::breaker::{Breakers, Shared as Breaker, State, Tally};
use crate::capturer::CaptureHandle;
use crate::config::{Config, RetryConfig};
use crate::guard::Guard;
use crate::handler::{caught, timeout_error, Delivery, ErrorKind, Handler, HandlerError};
use crate::kafka::{self, GroupContext};
use crate::lines::{Item, KeyHash, Lines, Ordered, Outcome, Work};
use crate::message::Message;
use crate::offsets::OffsetTracker;
use crate::store::capture::{Capture, InitialState, OnDead};
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
use tokio_util::task::TaskTracker;
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

/// How long shutdown waits for the final offset commit and the consumer's leave of its group. A
/// broker that answers takes milliseconds; one that is down or stalled would hold librdkafka's
/// blocking calls for minutes.
pub const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// The librdkafka consumer type redrive uses.
pub type KafkaConsumer = StreamConsumer<GroupContext>;

/// A received message and the tracker's generation at that moment (its stamp).
type Received = (Message, u64);

/// At most this many messages are handled by one task.
const BATCH_MAX: usize = 256;

/// Received messages and one slot for each.
struct Batch {
    messages: Vec<Received>,
    /// How each message of a topic that keeps key order is ordered; empty when there is none.
    lines: Vec<Option<Ordered>>,
    /// Their slots: one each, except for messages of a key that were parked and came back open
    /// (they go one at a time, after their slots went back with the hand-over).
    slots: Option<OwnedSemaphorePermit>,
    /// The breaker whose probe this one message is (I13).
    probe: Option<Arc<Breaker>>,
}

impl Batch {
    /// The messages of ordered topics that go now, each with its own slot.
    fn of(items: Vec<Item>) -> Option<Batch> {
        let mut slots: Option<OwnedSemaphorePermit> = None;
        let mut messages = Vec::with_capacity(items.len());
        let mut lines = Vec::with_capacity(items.len());
        for item in items {
            merge(&mut slots, item.slot);
            messages.push((item.message, item.stamp));
            lines.push(Some(item.order));
        }
        if messages.is_empty() {
            return None;
        }
        Some(Batch {
            messages,
            lines,
            slots,
            probe: None,
        })
    }
}

/// Messages held back, in the order received, while their topic's breaker is not closed (I13),
/// and whether partitions are paused for a breaker.
#[derive(Default)]
struct Stalled {
    messages: VecDeque<Received>,
    paused: bool,
}

impl Stalled {
    /// Whether a breaker's change must be watched for.
    fn waiting(&self) -> bool {
        self.paused || !self.messages.is_empty()
    }
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
    /// Keys under way, queued and blocked, when a topic keeps key order (I12).
    lines: Option<Arc<Mutex<Lines>>>,
    /// Tasks that go on with a key's next messages, and read partitions' key lines.
    continuations: TaskTracker,
    /// The handler's breakers, shared with the workers (I13).
    breakers: Arc<Breakers>,
    /// `redrive_handler_duration_seconds{path="first"}` by outcome, taken once.
    first_durations: FirstDurations,
    /// `redrive_deliveries_total` by outcome, each taken on its first use.
    deliveries: Deliveries,
    /// `redrive_end_to_end_seconds{path="first"}`, taken once.
    first_end_to_end: Arc<crate::telemetry::Durations>,
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
        breakers: Arc<Breakers>,
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
                lines: config
                    .retry
                    .any_ordered()
                    .then(|| consumer.context().lines.clone()),
                continuations: TaskTracker::new(),
                breakers,
                first_durations: FirstDurations::new(config.kafka.group_id()),
                deliveries: Deliveries::default(),
                first_end_to_end: crate::telemetry::end_to_end(config.kafka.group_id(), "first"),
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
        let counting = tokio::spawn(count_in_flight(
            slots.clone(),
            self.max_in_flight,
            self.shared.group.clone(),
        ));
        let mut failure = None;
        let mut stalled = Stalled::default();
        let mut breakers = self.shared.breakers.watch();
        let mut probes = self.shared.breakers.watch_probes();
        let mut ramping: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            if stalled.waiting() {
                if let Some(ramp) = self.unstall(&mut stalled, &mut held, &slots, &mut tasks) {
                    ramping.take().inspect(|r| r.abort());
                    ramping = Some(ramp);
                }
            }
            let permit = match self.next_slot(&slots, &mut held, &shutdown).await {
                Ok(Some(permit)) => permit,
                Ok(None) => break,
                Err(fatal) => {
                    failure = Some(fatal);
                    break;
                }
            };
            if stalled.waiting() {
                // A resume after busy slots let the held-back topics' partitions go again.
                self.steer(&mut stalled);
            }
            let first = match held.pop_front() {
                Some(m) => m,
                None => {
                    let reopen = match stalled.waiting() {
                        true => self.shared.breakers.next_change(),
                        false => None,
                    };
                    let received = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        m = self.shared.consumer.recv() => m,
                        // A breaker changed, or may turn half-open: look at the stalled messages.
                        _ = breakers.changed(), if stalled.waiting() => continue,
                        _ = probes.changed(), if stalled.waiting() => continue,
                        _ = tokio::time::sleep_until(reopen.map_or_else(
                                tokio::time::Instant::now, tokio::time::Instant::from_std)),
                            if reopen.is_some() => continue,
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
                lines: Vec::new(),
                slots: Some(permit),
                probe: None,
            };
            if let Err(fatal) = self.fill(&mut batch, &slots, &mut held) {
                failure = Some(fatal);
            }
            while tasks.try_join_next().is_some() {}
            if !self.shared.breakers.all_closed() {
                self.stall(&mut batch, &mut stalled);
            }
            self.start(&mut tasks, batch);
            if failure.is_some() {
                break;
            }
        }
        ramping.inspect(|r| r.abort());
        guard.abort();
        counting.abort();
        let _ = guard.await; // its copy of the consumer goes with it
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
            if let Some(slots) = batch.slots.as_mut() {
                slots.merge(used);
            }
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

    /// Takes the messages of topics whose breaker is not closed out of a batch, in order, with
    /// their slots, and pauses those topics' partitions.
    fn stall(&self, batch: &mut Batch, stalled: &mut Stalled) {
        let breakers = &self.shared.breakers;
        let before = batch.messages.len();
        let mut kept = Vec::with_capacity(before);
        for m in batch.messages.drain(..) {
            match breakers.for_topic(&m.0.topic).closed() {
                true => kept.push(m),
                false => stalled.messages.push_back(m),
            }
        }
        batch.messages = kept;
        if batch.messages.len() < before {
            if let Some(slots) = batch.slots.as_mut() {
                drop(slots.split(before - batch.messages.len()));
            }
            self.steer(stalled);
        }
    }

    /// Lets held-back messages go: those of topics whose breaker closed, in order, ahead of what
    /// is held; and one as the probe of a half-open breaker, if it lets one go and a slot is free.
    /// Then pauses and resumes partitions to match. Returns the ramp of a breaker that closed.
    fn unstall(
        &self,
        stalled: &mut Stalled,
        held: &mut VecDeque<Received>,
        slots: &Arc<Semaphore>,
        tasks: &mut JoinSet<()>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let breakers = &self.shared.breakers;
        let mut free: Vec<Received> = Vec::new();
        let mut rest = VecDeque::with_capacity(stalled.messages.len());
        for m in stalled.messages.drain(..) {
            let breaker = breakers.for_topic(&m.0.topic);
            match breaker.state() {
                State::Closed => free.push(m),
                State::HalfOpen if !rest.iter().any(|r: &Received| r.0.topic == m.0.topic) => {
                    // The first held-back message of a half-open topic may go as its probe.
                    match slots.clone().try_acquire_owned() {
                        Ok(slot) if breaker.take_probe() => {
                            let batch = Batch {
                                messages: vec![m],
                                lines: Vec::new(),
                                slots: Some(slot),
                                probe: Some(breaker.clone()),
                            };
                            self.start(tasks, batch);
                        }
                        _ => rest.push_back(m),
                    }
                }
                _ => rest.push_back(m),
            }
        }
        stalled.messages = rest;
        let (was_paused, freed) = (stalled.paused, !free.is_empty());
        for m in free.into_iter().rev() {
            held.push_front(m);
        }
        self.steer(stalled);
        if !freed && !was_paused {
            return None;
        }
        let breaker = breakers
            .all()
            .find(|b| b.seen() == State::Closed && b.share() < 1.0)?
            .clone();
        tracing::info!(
            breaker = breaker.name(),
            "breaker closed: the consumer resumes, ramping up"
        );
        Some(tokio::spawn(crate::breaker::ramp(
            slots.clone(),
            self.max_in_flight,
            breaker,
        )))
    }

    /// Pauses the assigned partitions of topics whose breaker is open, or half-open with a message
    /// held back for its probe; resumes the others, so that a half-open breaker with nothing held
    /// back gets a message to probe with, and a closed one its backlog.
    fn steer(&self, stalled: &mut Stalled) {
        let breakers = &self.shared.breakers;
        let Ok(assignment) = self.shared.consumer.assignment() else {
            return;
        };
        let (mut pause, mut resume) = (TopicPartitionList::new(), TopicPartitionList::new());
        for e in assignment.elements() {
            let hold = match breakers.for_topic(e.topic()).seen() {
                State::Closed => false,
                State::Open => true,
                State::HalfOpen => stalled.messages.iter().any(|m| m.0.topic == e.topic()),
            };
            let list = if hold { &mut pause } else { &mut resume };
            list.add_partition(e.topic(), e.partition());
        }
        if pause.count() > 0 {
            if let Err(e) = self.shared.consumer.pause(&pause) {
                tracing::warn!("pausing the partitions of a failing handler failed: {e}");
            }
        }
        if stalled.paused && resume.count() > 0 {
            if let Err(e) = self.shared.consumer.resume(&resume) {
                tracing::debug!("resuming partitions: {e}");
            }
        }
        stalled.paused = !breakers.all_closed();
        for b in breakers.all() {
            let topics = stalled.messages.iter().map(|m| &m.0.topic);
            b.set_fresh(
                topics
                    .into_iter()
                    .any(|t| Arc::ptr_eq(breakers.for_topic(t), b)),
            );
        }
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
    /// it. A message of a topic that keeps key order goes only when its key lets it (I12).
    fn start(&self, tasks: &mut JoinSet<()>, mut batch: Batch) {
        let now = Instant::now();
        let mut work = Work::default();
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
            // The slots of dropped messages go back.
            if let Some(slots) = batch.slots.as_mut() {
                drop(slots.split(slots.num_permits() - batch.messages.len()));
            }
        }
        if batch.messages.is_empty() {
            // A probe that was dropped with its partition was not made.
            if let Some(breaker) = batch.probe {
                breaker.return_probe();
            }
            return;
        }
        metrics::counter!("redrive_messages_consumed_total").increment(batch.messages.len() as u64);
        if let Some(lines) = &self.shared.lines {
            work = self.shared.order(lines, &mut batch);
        }
        self.shared.execute(work);
        if batch.messages.is_empty() {
            return;
        }
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
        self.shared.continuations.close();
        let finished = tokio::time::timeout(limit, async {
            while tasks.join_next().await.is_some() {}
            self.shared.continuations.wait().await;
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                abandoned = tasks.len(),
                "drain timeout: unfinished messages will be redelivered"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        let consumer = self.shared.consumer.clone();
        drop(self);
        close(consumer, CLOSE_WITHIN).await;
    }
}

/// Commits the stored offsets and leaves the group, on a thread of its own: librdkafka blocks in
/// both until the broker answers, which a broker that is down or stalled makes minutes, and a
/// blocked runtime thread would keep the process from stopping. Waits up to `within`, then goes on
/// without them: what was not committed is redelivered (I1), and the group gives the partitions to
/// another member after its session timeout.
async fn close(consumer: Arc<KafkaConsumer>, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    // The consumer leaves its group when its last holder drops it: let that be the thread below.
    // A task that outlived the drain still holds it; the wait for it is bounded too.
    while Arc::strong_count(&consumer) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let closing = std::thread::Builder::new()
        .name("kafka-close".into())
        .spawn(move || {
            let _ = tx.send(consumer.commit_consumer_state(CommitMode::Sync));
            drop(consumer);
            drop(tx);
        });
    if let Err(e) = closing {
        tracing::warn!("could not start the thread that closes the Kafka consumer: {e}");
        return;
    }
    match tokio::time::timeout_at(deadline, rx.recv()).await {
        Ok(Some(Ok(()))) => tracing::info!("committed stored offsets"),
        Ok(Some(Err(e))) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => {}
        Ok(Some(Err(e))) => {
            tracing::warn!("final offset commit failed (the messages will be redelivered): {e}")
        }
        Ok(None) => {}
        Err(_) => {
            tracing::warn!(
                "the final offset commit had no answer from the broker within {within:?}: stopping \
                 without it (the messages since the last commit will be redelivered)"
            );
            return;
        }
    }
    // The channel closes once the thread has dropped the consumer.
    if tokio::time::timeout_at(deadline, rx.recv()).await.is_err() {
        tracing::warn!(
            "the consumer did not leave its group within {within:?}: stopping without it (the \
             group gives its partitions to another member after its session timeout)"
        );
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

    /// Takes the batch's messages of topics that keep key order and whose key must wait out of
    /// it: they wait for their key, or are parked (I12). Those that go now stay.
    fn order(&self, lines: &Mutex<Lines>, batch: &mut Batch) -> Work {
        let mut lines = lock(lines);
        let mut orders = Vec::with_capacity(batch.messages.len());
        // Whether each message waits; most go now, and stay where they are.
        let mut waits = Vec::new();
        for (i, (message, stamp)) in batch.messages.iter().enumerate() {
            let order = match (
                self.retry.for_topic(&message.topic).ordered(),
                message.key.as_deref(),
            ) {
                (Some(on_dead), Some(key)) => Ordered {
                    key: KeyHash::of(key),
                    on_dead,
                },
                // A record without a key has no order to keep.
                _ => {
                    orders.push(None);
                    continue;
                }
            };
            if !lines.start_now(message, *stamp, order) {
                waits.resize(batch.messages.len(), false);
                waits[i] = true;
            }
            orders.push(Some(order));
        }
        batch.lines = orders;
        if waits.is_empty() {
            return Work::default();
        }
        let mut waiting = Vec::new();
        let messages = std::mem::take(&mut batch.messages);
        let orders = std::mem::take(&mut batch.lines);
        for (((message, stamp), order), waits) in messages.into_iter().zip(orders).zip(waits) {
            match order {
                Some(order) if waits => waiting.push(Item {
                    slot: batch.slots.as_mut().and_then(|s| s.split(1)),
                    message,
                    stamp,
                    order,
                }),
                _ => {
                    batch.messages.push((message, stamp));
                    batch.lines.push(order);
                }
            }
        }
        let mut work = lines.admit(waiting);
        for item in work.run.drain(..) {
            merge(&mut batch.slots, item.slot);
            batch.messages.push((item.message, item.stamp));
            batch.lines.push(Some(item.order));
        }
        work
    }

    /// Starts what a key's turn calls for: delivering its next messages, parking them, or reading
    /// a partition's blocked keys.
    fn execute(self: &Arc<Self>, work: Work) {
        if work.is_empty() {
            return;
        }
        let Work { run, park, load } = work;
        if let Some(batch) = Batch::of(run) {
            let me = self.clone();
            self.continuations
                .spawn(async move { me.process(batch).await });
        }
        for group in park {
            let me = self.clone();
            self.continuations
                .spawn(async move { me.park(group).await });
        }
        for (topic, partition, since) in load {
            let me = self.clone();
            self.continuations.spawn(async move {
                let blocked = me.capture.lines_of(&topic, partition).await;
                tracing::debug!(
                    topic,
                    partition,
                    blocked = blocked.len(),
                    "read the partition's blocked keys"
                );
                let lines = me.lines.as_ref().expect("keys are ordered");
                let work = lock(lines).loaded(&topic, partition, since, blocked);
                me.execute(work);
            });
        }
    }

    /// Parks messages of a blocked key behind its row, in one statement (I12). Those that find
    /// the line empty come back, and are delivered next.
    async fn park(self: Arc<Self>, group: Vec<Item>) {
        let policy = self.retry.for_topic(&group[0].message.topic);
        let captures = group
            .iter()
            .map(|item| {
                let line = item.order.line(&item.message);
                Capture::parked(item.message.clone(), policy, line)
            })
            .collect();
        let Some(pending) = self.capture.hand_over_all(captures).await else {
            return;
        };
        // Taken: the capturer's bounds hold the parked messages now, as they hold failures, and
        // their slots go back so the consumer goes on reading. Those that come back open go one
        // at a time, slot or not.
        let mut group = group;
        for item in &mut group {
            item.slot = None;
        }
        // A park the capturer could not finish (it stopped) is never done: no offset is stored.
        let Some(open) = pending.outcome().await else {
            return;
        };
        let (key, stamp) = (group[0].order.key, group[0].stamp);
        let first = group[0].message.clone();
        let (open, stored): (Vec<Item>, Vec<Item>) = group
            .into_iter()
            .partition(|item| open.contains(&item.message.offset));
        if !stored.is_empty() {
            self.deliveries.parked(stored.len() as u64);
        }
        self.done_under(
            &mut self.lock_tracker(),
            stored.iter().map(|item| (&item.message, item.stamp)),
        );
        let lines = self.lines.as_ref().expect("keys are ordered");
        let outcome = Outcome::Parked {
            open,
            stored: !stored.is_empty(),
        };
        let work = lock(lines).finish(&first, stamp, key, outcome);
        // The stored messages' slots go back.
        drop(stored);
        self.execute(work);
    }

    /// Handles a batch: every message's handler call runs at once, under one deadline, and a
    /// failure is captured. As outcomes become durable they are marked done, those ready together
    /// under one lock with one stored position per partition, and their slots are freed. A message
    /// whose failure could not be made durable (the capturer is gone: shutting down) stays in
    /// flight, so its offset is never stored. A message of a key line lets its key go on once its
    /// outcome is durable.
    async fn process(self: &Arc<Self>, batch: Batch) {
        let Batch {
            messages,
            lines,
            slots: mut held_slots,
            probe,
        } = batch;
        let mut tally = Tally::new(&self.breakers);
        let line = |i: usize| lines.get(i).copied().flatten();
        let (messages, stamps): (Vec<Message>, Vec<u64>) = messages.into_iter().unzip();
        // The batch's calls start together: each one's duration is counted from here.
        let started = std::time::Instant::now();
        // The calls' spans, kept when traces are exported: a failure's row keeps its context, and
        // its capture is its child. A success's goes when its call ends.
        let traced = crate::telemetry::traces_on();
        let mut spans: Vec<tracing::Span> = Vec::new();
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
                // A span only when traces are exported or debug logs read it.
                let span = crate::telemetry::process_span(message, &self.group, 1, None, None);
                if traced {
                    spans.push(span.clone());
                }
                call.map(move |r| (i, r)).instrument(span)
            })
            .collect();
        let mut answered = vec![false; messages.len()];
        // Failures being handed over to the capturer, then waiting for their rows.
        let mut captures = FuturesUnordered::new();
        let mut done: Vec<usize> = Vec::with_capacity(messages.len());
        // Messages of key lines whose outcome is durable, and what it was.
        let mut finished: Vec<(usize, Outcome)> = Vec::new();
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
                    // Every call ready now is taken, so they are marked done together, and
                    // counted as taking the same time: one clock read for them all.
                    let took = started.elapsed();
                    let now = chrono::Utc::now();
                    let mut since_record = crate::telemetry::Tally::default();
                    let mut ok = 0;
                    let mut next = Some(first);
                    while let Some((i, result)) = next {
                        answered[i] = true;
                        let result = caught(result);
                        match &probe {
                            Some(breaker) => breaker.record(&result, true),
                            None => tally.add(&messages[i].topic, &result),
                        }
                        match result {
                            Ok(()) => {
                                ok += 1;
                                if let Some(span) = spans.get_mut(i) {
                                    *span = tracing::Span::none();
                                }
                                if let Some(d) = crate::telemetry::since_record(
                                    messages[i].timestamp,
                                    now,
                                ) {
                                    since_record.add(d);
                                }
                                succeeded += 1;
                                free += 1;
                                done.push(i);
                                if line(i).is_some() {
                                    finished.push((i, Outcome::Delivered));
                                }
                            }
                            Err(error) => {
                                self.first_durations.failed(error.kind).record(took);
                                failed.push((i, error));
                            }
                        }
                        next = calls.next().now_or_never().flatten();
                    }
                    self.first_durations.succeeded.record_many(took, ok);
                    self.first_end_to_end.add(&since_record);
                }
                Some(first) = captures.next(), if !captures.is_empty() => {
                    let mut next = Some(first);
                    while let Some((i, durable, blocks)) = next {
                        if durable {
                            done.push(i);
                            if line(i).is_some() {
                                finished.push((i, Outcome::Failed { blocks }));
                            }
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
                    self.first_durations
                        .failed(ErrorKind::Timeout)
                        .record_many(self.timeout, failed.len() as u64);
                    for (i, error) in &failed {
                        let result = Err(error.clone());
                        match &probe {
                            Some(breaker) => breaker.record(&result, true),
                            None => tally.add(&messages[*i].topic, &result),
                        }
                    }
                }
            }
            tally.flush();
            for (i, error) in failed {
                let message = messages[i].clone();
                let slot = held_slots.as_mut().and_then(|s| s.split(1));
                let order = line(i);
                let mut capture = self.failure(message, error, order);
                let process = spans.get_mut(i).map_or_else(tracing::Span::none, |s| {
                    std::mem::replace(s, tracing::Span::none())
                });
                capture.trace = crate::telemetry::context_text(&process);
                let capture_span = crate::telemetry::capture_span(&process, capture.state.as_str());
                // Whether the row holds its key's line: all but a dead one with the skip policy.
                let blocks = !(capture.state == InitialState::Dead
                    && order.is_some_and(|o| o.on_dead == OnDead::Skip));
                let capture = self.capture.hand_over(capture);
                captures.push(
                    async move {
                        // A failure the capturer could not take (it stopped) is never done: its
                        // offset is not stored.
                        let Some(pending) = capture.await else {
                            return (i, false, blocks);
                        };
                        drop(slot);
                        (i, pending.durable().await, blocks)
                    }
                    .instrument(capture_span),
                );
            }
            if !done.is_empty() || !finished.is_empty() {
                self.settle(&messages, &stamps, &lines, &mut done, &mut finished);
            }
            if free > 0 {
                drop(held_slots.as_mut().and_then(|s| s.split(free)));
                free = 0;
            }
        }
        if succeeded > 0 {
            self.deliveries.succeeded(succeeded);
        }
    }

    /// The row for a failed first delivery, in its key's line if it has one.
    fn failure(&self, message: Message, error: HandlerError, order: Option<Ordered>) -> Capture {
        self.deliveries.failed(error.kind);
        tracing::debug!(
            topic = message.topic,
            partition = message.partition,
            offset = message.offset,
            "first delivery failed: {error}"
        );
        let policy = self.retry.for_topic(&message.topic);
        Capture {
            line: order.map(|o| o.line(&message)),
            ..Capture::first_failure(message, policy, error)
        }
    }

    /// Marks messages done, and lets the keys of those in key lines go on.
    fn settle(
        self: &Arc<Self>,
        messages: &[Message],
        stamps: &[u64],
        lines: &[Option<Ordered>],
        done: &mut Vec<usize>,
        finished: &mut Vec<(usize, Outcome)>,
    ) {
        if !done.is_empty() {
            self.done_under(
                &mut self.lock_tracker(),
                done.drain(..).map(|i| (&messages[i], stamps[i])),
            );
        }
        if finished.is_empty() {
            return;
        }
        let mut work = Work::default();
        lock(self.lines.as_ref().expect("keys are ordered")).finish_all(
            finished.drain(..).map(|(i, outcome)| {
                let key = lines[i].expect("a message of a key line").key;
                (&messages[i], stamps[i], key, outcome)
            }),
            &mut work,
        );
        self.execute(work);
    }

    /// Marks messages done and stores each partition's new position once. Each message is marked
    /// once: when its call succeeded, or when its row is durable.
    fn done_under<'m>(
        &self,
        tracker: &mut OffsetTracker,
        done: impl Iterator<Item = (&'m Message, u64)>,
    ) {
        // The position is stored while the tracker's lock is held: positions then reach
        // librdkafka in the order the tracker computed them. Stored after the lock was released,
        // a task could store an older position over a newer one, and at the end of a stream
        // nothing would store past it again: the partition's commit would stay short for good.
        let now = Instant::now();
        let mut positions: Vec<(&str, i32, i64)> = Vec::new();
        for (m, stamp) in done {
            if let Some(next) = tracker.done_at(&m.topic, m.partition, m.offset, stamp, now) {
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
    }
}

/// The first deliveries' handler-duration histograms, one per outcome.
struct FirstDurations {
    succeeded: Arc<crate::telemetry::Durations>,
    retryable: Arc<crate::telemetry::Durations>,
    permanent: Arc<crate::telemetry::Durations>,
    timeout: Arc<crate::telemetry::Durations>,
}

impl FirstDurations {
    fn new(group: &str) -> Self {
        let of = |outcome| crate::telemetry::handler_durations(group, "first", outcome);
        Self {
            succeeded: of("succeeded"),
            retryable: of(ErrorKind::Retryable.as_str()),
            permanent: of(ErrorKind::Permanent.as_str()),
            timeout: of(ErrorKind::Timeout.as_str()),
        }
    }

    fn failed(&self, kind: ErrorKind) -> &crate::telemetry::Durations {
        match kind {
            ErrorKind::Retryable => &self.retryable,
            ErrorKind::Permanent => &self.permanent,
            ErrorKind::Timeout => &self.timeout,
        }
    }
}

/// The first deliveries' outcomes, `redrive_deliveries_total`: succeeded, parked, then the
/// handler's errors in the order of [`Deliveries::failed`].
struct Deliveries(crate::telemetry::OutcomeCounters<5>);

impl Default for Deliveries {
    fn default() -> Self {
        Deliveries(crate::telemetry::OutcomeCounters::new(
            "redrive_deliveries_total",
        ))
    }
}

impl Deliveries {
    fn succeeded(&self, n: u64) {
        self.0.add(0, "succeeded", n);
    }

    fn parked(&self, n: u64) {
        self.0.add(1, "parked", n);
    }

    fn failed(&self, kind: ErrorKind) {
        let at = match kind {
            ErrorKind::Retryable => 2,
            ErrorKind::Permanent => 3,
            ErrorKind::Timeout => 4,
        };
        self.0.add(at, kind.as_str(), 1);
    }
}

/// Sets `redrive_in_flight_messages{group}` each second: the messages handed to the handler, or
/// waiting on their key, and not yet finished. Read from the slots, so the hot path pays nothing;
/// the one slot the loop holds for the record it waits for is not a message.
async fn count_in_flight(slots: Arc<Semaphore>, max: usize, group: String) {
    let gauge = metrics::gauge!("redrive_in_flight_messages", "group" => group);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        gauge.set(max.saturating_sub(slots.available_permits() + 1) as f64);
    }
}

/// Adds a message's slot, if it has one, to a batch's.
fn merge(slots: &mut Option<OwnedSemaphorePermit>, slot: Option<OwnedSemaphorePermit>) {
    match (slots.as_mut(), slot) {
        (Some(s), Some(slot)) => s.merge(slot),
        (None, slot) => *slots = slot,
        (Some(_), None) => {}
    }
}

/// The key lines' state, whatever a panic elsewhere left in its lock.
fn lock(lines: &Mutex<Lines>) -> std::sync::MutexGuard<'_, Lines> {
    lines.lock().unwrap_or_else(|e| e.into_inner())
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
