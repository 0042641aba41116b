//! The retry workers: claim due rows in batches, call the handler, and pass each outcome to the
//! completer.
//!
//! A dispatcher never attempts a row before its `next_attempt_at` (the claim compares with the
//! database clock) and wakes promptly once one is due (I7): on a `redrive_pending` NOTIFY, on a
//! timer set to the earliest due row or lease expiry, and at the latest after `max_idle`.

use crate::completer::CompleteHandle;
use crate::config::{RetryConfig, WorkersConfig};
use crate::handler::{call_with_timeout, Delivery, ErrorKind, Handler, HandlerError};
use crate::store::claim::{Claimed, Unreadable};
use crate::store::complete::{Completion, Outcome};
use crate::store::Store;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// NOTIFY channel for rows that became pending.
pub const PENDING_CHANNEL: &str = "redrive_pending";

/// Retry workers for one consumer group.
pub struct Dispatcher<H> {
    store: Store,
    handler: Arc<H>,
    complete: CompleteHandle,
    group: Arc<str>,
    worker: String,
    retry: Arc<RetryConfig>,
    config: WorkersConfig,
    timeout: Duration,
}

/// Attempts in flight, by task, with the claim (row id, claim token) each holds.
type Running = (JoinSet<()>, HashMap<Id, (Uuid, Uuid)>);

impl<H: Handler> Dispatcher<H> {
    /// Creates the workers; `timeout` bounds each handler call.
    pub fn new(
        store: Store,
        handler: Arc<H>,
        complete: CompleteHandle,
        group: &str,
        retry: RetryConfig,
        config: WorkersConfig,
        timeout: Duration,
    ) -> Self {
        Self {
            store,
            handler,
            complete,
            group: group.into(),
            worker: worker_id(),
            retry: Arc::new(retry),
            config,
            timeout,
        }
    }

    /// Claims and attempts rows until `shutdown`; then in-flight attempts get `drain` to finish and
    /// the claims of the rest are released.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        drain: Duration,
    ) -> Result<(), crate::store::StoreError> {
        let mut listener = self.store.listen(PENDING_CHANNEL).await?;
        let mut running: Running = (JoinSet::new(), HashMap::new());
        // Whether rows may be due now: at the start, after a full claim, on a NOTIFY and when the
        // timer fires. A finished attempt alone makes nothing due, so it costs no statement.
        let mut due = true;
        let mut look_at = tokio::time::Instant::now();
        while !shutdown.is_cancelled() {
            if due {
                if let Some(wait) = self.run_once(&mut running).await {
                    due = wait.is_zero();
                    look_at = tokio::time::Instant::now() + wait;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(done) = running.0.join_next_with_id(), if !running.0.is_empty() => {
                    forget(&mut running.1, done);
                }
                _ = listener.wait() => due = true,
                _ = tokio::time::sleep_until(look_at), if !due => due = true,
            }
        }
        self.drain(running, drain).await;
        Ok(())
    }

    /// Claims due rows into the free slots and starts their attempts, once enough slots are free
    /// for a worthwhile batch (half a batch) or nothing runs. Returns how long to wait before
    /// looking again when nothing else wakes the loop (zero: more may be due now), or `None` when
    /// it is waiting for slots and claimed nothing.
    pub async fn run_once(&self, running: &mut Running) -> Option<Duration> {
        // Finished attempts still sit in the set until joined; reap them so the count is true.
        while let Some(done) = running.0.try_join_next_with_id() {
            forget(&mut running.1, done);
        }
        let free = self.config.concurrency.saturating_sub(running.0.len());
        let batch = self.config.claim_batch_size.min(self.config.concurrency);
        if free == 0 || (free < batch.div_ceil(2) && !running.0.is_empty()) {
            return None;
        }
        let asked = free.min(self.config.claim_batch_size);
        let claimed = match self
            .store
            .claim(&self.group, asked as i64, self.config.lease, &self.worker)
            .await
        {
            Ok(claim) => claim,
            Err(e) => {
                tracing::error!("claiming due rows failed: {e}");
                return Some(Duration::from_secs(1));
            }
        };
        let got = claimed.len();
        for bad in claimed.unreadable {
            self.fail_unreadable(bad).await;
        }
        for row in claimed.rows {
            let claim = (row.id, row.token);
            // A span per attempt only when someone reads it.
            let span = if tracing::enabled!(tracing::Level::DEBUG) {
                tracing::debug_span!("attempt", id = %row.id, attempt = row.attempt,
                    topic = %row.message.topic, partition = row.message.partition,
                    offset = row.message.offset)
            } else {
                tracing::Span::none()
            };
            let task = self.attempt(row).instrument(span);
            let handle = running.0.spawn(task);
            running.1.insert(handle.id(), claim);
        }
        if got == asked {
            return Some(Duration::ZERO); // there may be more due right now
        }
        Some(self.until_next_wake().await)
    }

    /// A row whose stored message cannot be read is dead at once, without a handler call: only
    /// that row fails, and it stays in the table for an operator (I10).
    async fn fail_unreadable(&self, bad: Unreadable) {
        tracing::error!(id = %bad.id, "a claimed row cannot be read; it is dead: {}", bad.problem);
        metrics::counter!("redrive_attempts_total", "outcome" => "unreadable").increment(1);
        let completion = Completion {
            id: bad.id,
            attempt: bad.attempt,
            token: bad.token,
            outcome: Outcome::Dead {
                error: HandlerError::permanent(bad.problem),
            },
        };
        self.complete.send(completion).await;
    }

    async fn until_next_wake(&self) -> Duration {
        let wake = match self.store.next_wake(&self.group).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("reading the next due time failed: {e}");
                return Duration::from_secs(1);
            }
        };
        let Some(wait) = wake else {
            return self.config.max_idle;
        };
        // A few milliseconds late rather than early: the claim compares with the database clock.
        let wait = wait + Duration::from_millis(5);
        wait.clamp(Duration::from_millis(10), self.config.max_idle)
    }

    fn attempt(&self, row: Claimed) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (handler, complete, retry, group) = (
            self.handler.clone(),
            self.complete.clone(),
            self.retry.clone(),
            self.group.clone(),
        );
        let timeout = self.timeout;
        async move {
            let attempt = u32::try_from(row.attempt).unwrap_or(u32::MAX);
            let delivery = Delivery {
                message: &row.message,
                attempt,
                group: &group,
            };
            let result = call_with_timeout(handler.as_ref(), delivery, timeout).await;
            let outcome = match result {
                Ok(()) => Outcome::Succeeded,
                Err(error)
                    if error.kind == ErrorKind::Permanent || row.attempt >= row.max_attempts =>
                {
                    tracing::info!("attempt failed, row is dead: {error}");
                    Outcome::Dead { error }
                }
                Err(error) => {
                    let policy = retry.for_topic(&row.message.topic);
                    let delay =
                        policy
                            .backoff()
                            .delay(attempt, rand::random::<f64>(), error.retry_after);
                    tracing::debug!(retry_in = ?delay, "attempt failed: {error}");
                    Outcome::Retry {
                        retry_in: delay,
                        error,
                    }
                }
            };
            let label = match &outcome {
                Outcome::Succeeded => "succeeded",
                Outcome::Retry { .. } => "retry",
                Outcome::Dead { .. } => "dead",
            };
            metrics::counter!("redrive_attempts_total", "outcome" => label).increment(1);
            complete
                .send(Completion {
                    id: row.id,
                    attempt: row.attempt,
                    token: row.token,
                    outcome,
                })
                .await;
        }
    }

    async fn drain(self, (mut tasks, mut claims): Running, limit: Duration) {
        tracing::info!(
            in_flight = tasks.len(),
            "retry workers stopping: finishing in-flight attempts"
        );
        let _ = tokio::time::timeout(limit, async {
            while let Some(done) = tasks.join_next_with_id().await {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                };
                claims.remove(&id);
            }
        })
        .await;
        tasks.abort_all();
        let unfinished: Vec<(Uuid, Uuid)> = claims.into_values().collect();
        if unfinished.is_empty() {
            return;
        }
        match self.store.release(&unfinished).await {
            Ok(n) => tracing::info!(released = n, "released the claims of unfinished attempts"),
            Err(e) => {
                tracing::warn!("releasing claims failed; their leases will expire instead: {e}")
            }
        }
    }
}

/// Drops the claim of a finished attempt task (finished normally, panicked or aborted).
fn forget(claims: &mut HashMap<Id, (Uuid, Uuid)>, done: Result<(Id, ()), tokio::task::JoinError>) {
    let id = match done {
        Ok((id, ())) => id,
        Err(e) => e.id(),
    };
    claims.remove(&id);
}

/// `host-pid`, recorded in `locked_by` so operators can see who holds a row.
pub fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "redrive".to_string());
    format!("{host}-{}", std::process::id())
}
