//! The completer: finishes claimed attempts in batches, as River's completer does. Successes are
//! deleted, failures rescheduled or marked dead, each fenced on its claimed attempt (I3), so a late
//! completion from a worker that lost its lease changes nothing.

use crate::batch;
use crate::config::WorkersConfig;
use crate::store::complete::Completion;
use crate::store::Store;
use tokio::sync::mpsc;

/// Sends finished attempts to the completer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CompleteHandle {
    tx: mpsc::Sender<Completion>,
}

/// The batching writer; run it with [`Completer::run`].
pub struct Completer {
    store: Store,
    rx: mpsc::Receiver<Completion>,
    batch_size: usize,
    linger: std::time::Duration,
}

/// Creates a completer and the handle that feeds it.
pub fn completer(store: Store, config: &WorkersConfig) -> (Completer, CompleteHandle) {
    let (tx, rx) = mpsc::channel(config.complete_batch_size * 2);
    let completer = Completer {
        store,
        rx,
        batch_size: config.complete_batch_size,
        linger: config.complete_linger,
    };
    (completer, CompleteHandle { tx })
}

impl CompleteHandle {
    /// Queues a completion; `false` when the completer has stopped (the lease then runs out and
    /// the row is attempted again).
    pub async fn send(&self, completion: Completion) -> bool {
        self.tx.send(completion).await.is_ok()
    }
}

impl Completer {
    /// Writes batches until every handle is dropped and the queue is empty.
    pub async fn run(mut self) {
        while let Some(batch) = batch::collect(&mut self.rx, self.batch_size, self.linger).await {
            let done = batch::until_written("completion", || self.store.complete(&batch)).await;
            metrics::counter!("redrive_completions_total", "result" => "deleted")
                .increment(done.deleted);
            metrics::counter!("redrive_completions_total", "result" => "rescheduled")
                .increment(done.rescheduled);
            metrics::counter!("redrive_completions_total", "result" => "dead").increment(done.dead);
            metrics::counter!("redrive_completions_total", "result" => "rejected")
                .increment(done.rejected);
            if done.rejected > 0 {
                tracing::warn!(
                    rejected = done.rejected,
                    "late completions refused: their leases had been taken over"
                );
            }
        }
    }
}
