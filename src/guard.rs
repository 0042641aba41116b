//! The consumer's guards over its commits (I1, I11). Every few seconds:
//! - a partition whose lowest unfinished offset has not moved for longer than a handler call and a
//!   capture should take is logged, once, and counted in `redrive_stalled_partitions`: its commits
//!   wait on that one message;
//! - a partition with nothing in flight whose last stored position is not what the group has
//!   committed, long after the auto-commit should have sent it, is logged, once, counted in
//!   `redrive_uncommitted_partitions`, and its position stored again. Nothing else would move
//!   such a partition's commit at the end of a stream.

use crate::consumer::KafkaConsumer;
use crate::offsets::OffsetTracker;
use rdkafka::consumer::Consumer as _;
use rdkafka::Offset;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the guards look.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// What the guards watch, and their limits.
pub struct Guard {
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub consumer: Arc<KafkaConsumer>,
    /// How long a lowest unfinished offset may stand still.
    pub stall_after: Duration,
    /// How long after a partition's last store its commit must have arrived.
    pub commit_within: Duration,
}

impl Guard {
    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let (mut stalls, mut lags) = (Vec::new(), Vec::new());
        // Exported from the start, not from the first check.
        metrics::gauge!("redrive_stalled_partitions").set(0.0);
        metrics::gauge!("redrive_uncommitted_partitions").set(0.0);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
            stalls = self.stalls(stalls);
            lags = self.commits(lags).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OffsetTracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reports partitions whose lowest unfinished offset stands still; returns them.
    fn stalls(&self, reported: Vec<(String, i32, i64)>) -> Vec<(String, i32, i64)> {
        let stalled = self.lock().stalled(self.stall_after);
        metrics::gauge!("redrive_stalled_partitions").set(stalled.len() as f64);
        for s in stalled.iter() {
            if !reported.contains(&(s.topic.clone(), s.partition, s.offset)) {
                tracing::error!(topic = s.topic, partition = s.partition, offset = s.offset,
                    waiting = %humantime::format_duration(Duration::from_secs(s.for_.as_secs())),
                    "partition stalled: its commits wait on this offset, which has not finished");
            }
        }
        stalled
            .into_iter()
            .map(|s| (s.topic, s.partition, s.offset))
            .collect()
    }

    /// Compares idle partitions' stored positions with the group's committed offsets; stores a
    /// lagging one again. Returns the lagging ones.
    async fn commits(&self, reported: Vec<(String, i32, i64)>) -> Vec<(String, i32, i64)> {
        let idle = self.lock().idle(self.commit_within);
        if idle.is_empty() {
            metrics::gauge!("redrive_uncommitted_partitions").set(0.0);
            return Vec::new();
        }
        // A request to the group coordinator: off the async threads.
        let consumer = self.consumer.clone();
        let asked =
            tokio::task::spawn_blocking(move || consumer.committed(Duration::from_secs(10)));
        let Ok(Ok(committed)) = asked.await else {
            return reported; // the coordinator did not answer: look again next time
        };
        let lagging: Vec<(String, i32, i64)> = idle
            .into_iter()
            .filter(|(topic, partition, stored)| {
                match committed
                    .find_partition(topic, *partition)
                    .map(|e| e.offset())
                {
                    Some(Offset::Offset(c)) => c < *stored,
                    _ => true,
                }
            })
            .collect();
        metrics::gauge!("redrive_uncommitted_partitions").set(lagging.len() as f64);
        for (topic, partition, stored) in &lagging {
            if !reported.contains(&(topic.clone(), *partition, *stored)) {
                tracing::error!(topic, partition, offset = stored,
                    "partition's commit is behind its durable position long after the auto-commit: storing it again");
            }
            let tracker = self.lock();
            if tracker.still_idle_at(topic, *partition, *stored) {
                crate::consumer::store_position(&self.consumer, topic, *partition, *stored);
            }
        }
        lagging
    }
}
