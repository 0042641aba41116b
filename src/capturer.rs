//! The capturer: turns failed first deliveries into retry rows, a batch per INSERT.
//!
//! Each consumer task hands its failure over and waits; the capturer replies only after the batch's
//! transaction committed, so the task can then let its offset be stored (I1). Up to
//! `capture_in_flight` batches are written at once, so Postgres works on one while the next fills;
//! the offsets are tracked per message, so batches may commit in any order.
//!
//! Once the capturer has taken a failure, its message gives back its handler slot (it waits for
//! its row, not for a call): the consumer goes on handling messages while their failures are
//! written, so the batches fill. The failures taken and not yet durable are bounded in number by
//! `capture_batch_size` × (`capture_in_flight` + 1), the batches being written and one filling,
//! and in bytes by `capture_batch_bytes` (keys, values and headers). Their room comes back a whole
//! batch at a time, when it is written. While Postgres is unreachable the capturer keeps retrying;
//! once a bound is reached, hand-overs wait, the slots stay busy, and the consumer stops at
//! `max_in_flight`: nothing is skipped.

use crate::batch;
use crate::config::{ConsumerConfig, RetryPolicy};
use crate::handler::{ErrorKind, HandlerError};
use crate::message::Message;
use crate::store::capture::{Capture, InitialState, Line};
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// Failures handed over together (one, or the parked messages of one key, which are stored in one
/// statement and in order), who waits for their rows, and their room among the failures the
/// capturer may hold (their number, and their share of the bytes).
type Request = (
    Vec<Capture>,
    oneshot::Sender<Vec<i64>>,
    [OwnedSemaphorePermit; 2],
);

/// Sends failures to the capturer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CaptureHandle {
    tx: mpsc::Sender<Request>,
    /// How many failures are taken and not yet durable, at most one batch more than are written.
    count: Arc<Semaphore>,
    /// Their bytes, at most `capture_batch_bytes`.
    bytes: Arc<Semaphore>,
    max_bytes: usize,
    /// The count's permits in all.
    count_max: usize,
    /// Where the rows go, for reading a partition's key lines.
    store: Store,
    group: Arc<str>,
}

/// Failures the capturer has taken; [`Pending::durable`] waits for their rows.
#[derive(Debug)]
pub struct Pending(oneshot::Receiver<Vec<i64>>);

impl Pending {
    /// `true` once the rows are durable; `false` if the capturer stopped first (the messages are
    /// then redelivered: their offsets are never stored).
    pub async fn durable(self) -> bool {
        self.0.await.is_ok()
    }

    /// Once the rows are durable, the offsets of the parked messages that found their key's line
    /// empty and were not stored (I12): those are the caller's to deliver. `None` if the capturer
    /// stopped first.
    pub async fn outcome(self) -> Option<Vec<i64>> {
        self.0.await.ok()
    }
}

/// The batching writer; run it with [`Capturer::run`].
pub struct Capturer {
    store: Store,
    group: String,
    rx: mpsc::Receiver<Request>,
    limits: batch::Limits,
    in_flight: usize,
}

/// Creates a capturer for `group` and the handle that feeds it.
pub fn capturer(store: Store, group: &str, config: &ConsumerConfig) -> (Capturer, CaptureHandle) {
    // The count's permits bound the queue; its own capacity never makes a sender wait.
    let most = config
        .capture_batch_size
        .saturating_mul(config.capture_in_flight.saturating_add(1))
        .clamp(1, Semaphore::MAX_PERMITS);
    let (tx, rx) = mpsc::channel(most);
    let capturer = Capturer {
        store,
        group: group.to_string(),
        rx,
        limits: batch::Limits {
            max: config.capture_batch_size,
            max_bytes: config.capture_batch_bytes,
            linger: config.capture_linger,
        },
        in_flight: config.capture_in_flight,
    };
    let max_bytes = config
        .capture_batch_bytes
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let handle = CaptureHandle {
        tx,
        count: Arc::new(Semaphore::new(most)),
        bytes: Arc::new(Semaphore::new(max_bytes)),
        max_bytes,
        count_max: most,
        store: capturer.store.clone(),
        group: group.into(),
    };
    (capturer, handle)
}

impl Capture {
    /// The row for a message whose first delivery failed: dead at once for a permanent error or a
    /// one-attempt policy, otherwise pending until the policy's first delay has passed.
    pub fn first_failure(message: Message, policy: &RetryPolicy, error: HandlerError) -> Self {
        let dead = error.kind == ErrorKind::Permanent || policy.max_attempts <= 1;
        let delay = policy
            .backoff()
            .delay(1, rand::random::<f64>(), error.retry_after);
        Capture {
            message,
            state: if dead {
                InitialState::Dead
            } else {
                InitialState::Pending
            },
            max_attempts: policy.max_attempts.min(i32::MAX as u32) as i32,
            retry_in: delay,
            error,
            line: None,
            trace: None,
        }
    }
}

impl Capture {
    /// The row for a message that is not delivered because an earlier message of its key has a
    /// row (I12): it waits in its line and is attempted, as its first delivery, when its turn
    /// comes.
    pub fn parked(message: Message, policy: &RetryPolicy, line: Line) -> Self {
        Capture {
            message,
            state: InitialState::Parked,
            max_attempts: policy.max_attempts.min(i32::MAX as u32) as i32,
            retry_in: Duration::ZERO,
            error: HandlerError::retryable("parked behind an earlier message of its key"),
            line: Some(line),
            trace: None,
        }
    }

    /// Bytes this row carries into the statement, for the batch's byte limit.
    pub fn size(&self) -> usize {
        let m = &self.message;
        let headers: usize = m
            .headers
            .iter()
            .map(|h| h.key.len() + h.value.as_ref().map_or(0, Vec::len))
            .sum();
        m.key.as_ref().map_or(0, Vec::len)
            + m.payload.as_ref().map_or(0, Vec::len)
            + headers
            + self.error.message.len()
    }

    /// The row kept when Postgres refuses this one: the source coordinates and timestamp, dead at
    /// once, with the database's error; no key, value or headers, which stay readable in the
    /// source topic at those coordinates. The message is never lost (I10).
    pub fn safe_form(&self, db_error: &str) -> Capture {
        let m = &self.message;
        Capture {
            message: Message {
                topic: m.topic.clone(),
                partition: m.partition,
                offset: m.offset,
                timestamp: m.timestamp,
                key: None,
                payload: None,
                headers: Vec::new(),
            },
            state: InitialState::Dead,
            max_attempts: self.max_attempts.max(1),
            retry_in: self.retry_in,
            error: HandlerError {
                kind: self.error.kind,
                // Only the database's error: the handler's own text may be what was refused.
                message: format!(
                    "postgres refused this message's row, so it is kept without key, value and headers \
                     (read them from the topic at this offset): {db_error}"
                ),
                retry_after: None,
            },
            // A row kept dead in its safe form still holds its line, as any dead row does.
            line: self.line,
            trace: self.trace.clone(),
        }
    }
}

impl CaptureHandle {
    /// Hands a failure over; returns once the capturer has taken it, which waits while the
    /// failures it holds are at their bounds. `None` when the capturer is gone (shutting down):
    /// the outcome is then not durable and the offset must not be stored.
    pub async fn hand_over(&self, capture: Capture) -> Option<Pending> {
        self.hand_over_all(vec![capture]).await
    }

    /// Hands over messages that are written in one statement, in the order given: the parked
    /// messages of one key (I12), which must not be split over statements that may commit in any
    /// order. As [`CaptureHandle::hand_over`] otherwise.
    pub async fn hand_over_all(&self, captures: Vec<Capture>) -> Option<Pending> {
        // A record larger than the whole bound takes all of it, and waits until it is alone.
        let size: usize = captures.iter().map(Capture::size).sum();
        let share = size.clamp(1, self.max_bytes) as u32;
        let most = self.count_max;
        let count = captures.len().clamp(1, most) as u32;
        let count = self.count.clone().acquire_many_owned(count).await.ok()?;
        let bytes = self.bytes.clone().acquire_many_owned(share).await.ok()?;
        let (done, durable) = oneshot::channel();
        self.tx.send((captures, done, [count, bytes])).await.ok()?;
        Some(Pending(durable))
    }

    /// The lines of a partition that hold a row (I12), read until Postgres answers.
    pub async fn lines_of(&self, topic: &str, partition: i32) -> crate::lines::Blocked {
        batch::until_written("reading a partition's key lines", || {
            self.store.lines_of(&self.group, topic, partition)
        })
        .await
    }

    /// Hands a failure over and waits until its row is durable. `false` when the capturer is gone.
    pub async fn capture(&self, capture: Capture) -> bool {
        match self.hand_over(capture).await {
            Some(pending) => pending.durable().await,
            None => false,
        }
    }
}

impl Capturer {
    /// Writes batches until every handle is dropped and the queue is empty. Dropping this future
    /// (the capturer aborted at shutdown) aborts the writes in flight: their messages are then not
    /// durable, and their offsets are never stored.
    pub async fn run(mut self) {
        let slots = Arc::new(Semaphore::new(self.in_flight));
        let mut writes = JoinSet::new();
        loop {
            // A batch is collected only once it can be written at once: while every write is busy,
            // failures queue and the next batch takes them all. A row in a key line does not wait
            // out the linger: its key's next messages wait for it, holding their handler slots,
            // and a key's rows go one statement at a time (I12).
            let slot = slots.clone().acquire_owned().await.expect("never closed");
            let Some(requests) = batch::collect_until(
                &mut self.rx,
                self.limits,
                |(c, _, _)| c.iter().map(Capture::size).sum(),
                |(c, _, _)| c.iter().any(|r| r.line.is_some()),
            )
            .await
            else {
                break;
            };
            let (store, group) = (self.store.clone(), self.group.clone());
            writes.spawn(async move {
                write(&store, &group, requests).await;
                drop(slot);
            });
            while let Some(done) = writes.try_join_next() {
                rethrow(done);
            }
        }
        while let Some(done) = writes.join_next().await {
            rethrow(done);
        }
    }
}

/// Writes one batch, and tells each waiting task once its row is durable.
async fn write(store: &Store, group: &str, requests: Vec<Request>) {
    let mut rows = Vec::with_capacity(requests.len());
    // Who waits, and how many of the rows are theirs.
    let mut waiting = Vec::with_capacity(requests.len());
    // The requests' room goes back once the batch is written, all of it at once.
    let mut shares = Vec::with_capacity(requests.len());
    for (captures, done, share) in requests {
        waiting.push((done, captures.len()));
        rows.extend(captures);
        shares.push(share);
    }
    let captured = batch::write_isolating(
        "capture",
        group,
        &rows,
        |chunk| store.capture_rows(group, chunk),
        |row, error| {
            let safe = row.safe_form(&error);
            async move { store.capture_rows(group, std::slice::from_ref(&safe)).await }
        },
    )
    .await;
    let inserted = captured.inserted;
    let count = |state| rows.iter().filter(|r| r.state == state).count() as u64;
    let (dead, parked) = (count(InitialState::Dead), count(InitialState::Parked));
    metrics::counter!("redrive_captured_total", "state" => "pending")
        .increment(rows.len() as u64 - dead - parked);
    metrics::counter!("redrive_captured_total", "state" => "dead").increment(dead);
    // Parked messages that found their line empty were not stored: they are delivered.
    metrics::counter!("redrive_captured_total", "state" => "waiting")
        .increment(parked - captured.open.len() as u64);
    tracing::debug!(rows = rows.len(), inserted, "captured failed messages");
    drop(shares);
    let open: std::collections::HashSet<(&str, i32, i64)> = captured
        .open
        .iter()
        .map(|(t, p, o)| (t.as_str(), *p, *o))
        .collect();
    let mut rows = rows.iter();
    for (w, n) in waiting {
        let opened = rows
            .by_ref()
            .take(n)
            .map(|r| &r.message)
            .filter(|m| open.contains(&(m.topic.as_str(), m.partition, m.offset)))
            .map(|m| m.offset)
            .collect();
        // The task may have been aborted at shutdown; its message is then redelivered.
        let _ = w.send(opened);
    }
}

/// A write that panicked panics the capturer too, so the supervisor sees it; its waiting tasks
/// were told nothing, so their offsets are never stored.
fn rethrow(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}
