//! The completer: finishes claimed attempts in batches, as River's completer does. Successes are
//! deleted, failures rescheduled or marked dead, each fenced on its claimed attempt (I3), so a late
//! completion from a worker that lost its lease changes nothing.

use crate::batch;
use crate::config::WorkersConfig;
use crate::store::complete::Completion;
use crate::store::Store;
use std::time::Duration;
use tokio::sync::mpsc;

/// Sends finished attempts to the completer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CompleteHandle {
    tx: mpsc::Sender<(Completion, Urgency)>,
}

/// Whether something waits on a completion being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// It may wait in its batch for `complete_linger`.
    Batched,
    /// The next row of its key line waits for it (I12): written without the linger, with what
    /// is queued already. A line drains one row at a time, so each row's linger would add up.
    LineWaits,
}

/// The batching writer; run it with [`Completer::run`].
pub struct Completer {
    store: Store,
    group: String,
    rx: mpsc::Receiver<(Completion, Urgency)>,
    limits: batch::Limits,
}

/// Most bytes of error text in one completion statement.
const COMPLETE_BATCH_BYTES: usize = 16 << 20;

/// Creates a completer and the handle that feeds it.
pub fn completer(store: Store, group: &str, config: &WorkersConfig) -> (Completer, CompleteHandle) {
    let (tx, rx) = mpsc::channel(config.complete_batch_size * 2);
    let completer = Completer {
        store,
        group: group.to_string(),
        rx,
        limits: batch::Limits {
            max: config.complete_batch_size,
            max_bytes: COMPLETE_BATCH_BYTES,
            linger: config.complete_linger,
        },
    };
    (completer, CompleteHandle { tx })
}

impl CompleteHandle {
    /// Queues a completion; `false` when the completer has stopped (the lease then runs out and
    /// the row is attempted again).
    pub async fn send(&self, completion: Completion) -> bool {
        self.send_with(completion, Urgency::Batched).await
    }

    /// [`CompleteHandle::send`], saying whether something waits on it.
    pub async fn send_with(&self, completion: Completion, urgency: Urgency) -> bool {
        self.tx.send((completion, urgency)).await.is_ok()
    }
}

impl Completer {
    /// Writes batches until every handle is dropped and the queue is empty.
    pub async fn run(mut self) {
        // Until when the batches skip rows held elsewhere without waiting first: a transaction
        // that holds one row of a batch often holds many (an UPDATE of a whole topic's rows).
        let mut around_until: Option<std::time::Instant> = None;
        // The completions left to the side, tried again by one task.
        let (to_side, side) = mpsc::unbounded_channel();
        let on_the_side = tokio::spawn(complete_held(self.store.clone(), side));
        loop {
            let collected = batch::collect_until(
                &mut self.rx,
                self.limits,
                |(c, _)| c.size(),
                |(_, u)| *u == Urgency::LineWaits,
            );
            let Some(batch) = collected.await else { break };
            let batch: Vec<Completion> = batch.into_iter().map(|(c, _)| c).collect();
            let store = &self.store;
            let wait = around_until.is_none_or(|until| std::time::Instant::now() >= until);
            let finished = batch::write_isolating(
                "completion",
                &self.group,
                &batch,
                |chunk| store.complete_around_held(chunk, wait),
                |c, error| {
                    let safe = c.safe_form(&error);
                    async move {
                        store
                            .complete_around_held(std::slice::from_ref(&safe), wait)
                            .await
                    }
                },
            )
            .await;
            count(finished.done);
            if !finished.held.is_empty() {
                around_until = Some(std::time::Instant::now() + GO_AROUND_FOR);
                held(&finished.held);
                // Tried again on the side, so the completions after them go on meanwhile.
                let _ = to_side.send(finished.held);
            }
        }
        // One last try for what is still held; past it, their leases run out.
        drop(to_side);
        let _ = on_the_side.await;
    }
}

/// How long, after a batch found a row that another session holds, the batches go around held rows
/// at once (`SKIP LOCKED` first, a few statements more) instead of waiting for one first.
pub const GO_AROUND_FOR: Duration = Duration::from_secs(60);

/// How often completions whose rows another session holds locked are tried again.
pub const HELD_RETRY: Duration = Duration::from_secs(5);

/// Tries the completions it is sent again every [`HELD_RETRY`], without waiting for any lock,
/// until each is written; once the completer stops, tries once more and ends. What is still held
/// then is left to the fence: the rows are attempted again once their leases run out.
async fn complete_held(store: Store, mut incoming: mpsc::UnboundedReceiver<Vec<Completion>>) {
    let mut held: Vec<Completion> = Vec::new();
    let mut open = true;
    loop {
        if held.is_empty() {
            match incoming.recv().await {
                Some(more) => held = more,
                None => return,
            }
        }
        let next = tokio::time::Instant::now() + HELD_RETRY;
        while open {
            tokio::select! {
                more = incoming.recv() => match more {
                    Some(more) => held.extend(more),
                    None => open = false,
                },
                _ = tokio::time::sleep_until(next) => break,
            }
        }
        match store.complete_unheld(&held).await {
            Ok(finished) => {
                count(finished.done);
                if finished.held.len() < held.len() {
                    tracing::info!(
                        written = held.len() - finished.held.len(),
                        still_held = finished.held.len(),
                        "completions whose rows another session held are written"
                    );
                }
                held = finished.held;
            }
            Err(e) if e.is_transient() || crate::store::complete::is_lock_timeout(&e) => {
                tracing::warn!("completions held by another session's lock: trying again: {e}");
            }
            Err(e) => {
                tracing::error!(
                    rows = held.len(),
                    "completions held by another session's lock could not be written; their rows are attempted again once their leases run out: {e}"
                );
                held.clear();
            }
        }
        if !open {
            if !held.is_empty() {
                tracing::warn!(
                    rows = held.len(),
                    "stopping with completions still held by another session's lock: their rows are attempted again once their leases run out"
                );
            }
            return;
        }
    }
}

fn held(held: &[Completion]) {
    let ids: Vec<String> = held.iter().map(|c| c.id.to_string()).collect();
    tracing::warn!(
        rows = ?ids,
        "completions wait for rows that another session holds locked (a transaction left open?); \
         the other completions go on, and these are tried again every {}s until that \
         transaction ends",
        HELD_RETRY.as_secs()
    );
}

fn count(done: crate::store::complete::Completed) {
    metrics::counter!("redrive_completions_total", "result" => "deleted").increment(done.deleted);
    metrics::counter!("redrive_completions_total", "result" => "rescheduled")
        .increment(done.rescheduled);
    metrics::counter!("redrive_completions_total", "result" => "dead").increment(done.dead);
    metrics::counter!("redrive_completions_total", "result" => "rejected").increment(done.rejected);
    if done.rejected > 0 {
        tracing::warn!(
            rejected = done.rejected,
            "late completions refused: their leases had been taken over"
        );
    }
}
