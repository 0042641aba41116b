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
        // A request to the group coordinator: off the async threads, and not one that a stop
        // would wait for.
        let consumer = self.consumer.clone();
        let asked = crate::kafka::on_own_thread("kafka-committed", move || {
            consumer.committed(Duration::from_secs(10))
        });
        let Ok(asked) = asked else {
            return reported; // no thread for it now: look again next time
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::GroupContext;
    use rdkafka::mocking::MockCluster;
    use rdkafka::TopicPartitionList;
    use std::collections::BTreeMap;
    use std::time::Instant;

    /// A guard over a consumer of librdkafka's mock cluster, assigned partition 0 of topic `t`,
    /// whose tracker says that partition stored position 1 a second ago and has nothing in flight:
    /// by now the group should have committed 1.
    fn guard(
        mock: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        runtime: &tokio::runtime::Runtime,
    ) -> Guard {
        mock.create_topic("t", 1, 1).unwrap();
        let props: BTreeMap<String, String> = [
            ("bootstrap.servers", mock.bootstrap_servers()),
            ("group.id", "g".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // A stream consumer is made inside a runtime.
        let consumer: KafkaConsumer = runtime.block_on(async {
            crate::kafka::consumer_config(&props)
                .unwrap()
                .create_with_context(GroupContext::new("g"))
                .unwrap()
        });
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition("t", 0);
        consumer.assign(&assignment).unwrap();
        let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
        let before = Instant::now() - Duration::from_secs(1);
        tracker.lock().unwrap().begin_at("t", 0, 0, 0, before);
        assert_eq!(
            tracker.lock().unwrap().done_at("t", 0, 0, 0, before),
            Some(1)
        );
        Guard {
            tracker,
            consumer: Arc::new(consumer),
            stall_after: Duration::from_secs(60),
            commit_within: Duration::ZERO,
        }
    }

    /// A partition whose commit never came is found, and its position stored again, so that the
    /// next commit carries it.
    #[test]
    fn a_partition_whose_commit_never_came_is_stored_again() {
        let mock = MockCluster::new(1).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let guard = guard(&mock, &runtime);
        let lagging = runtime.block_on(guard.commits(Vec::new()));
        assert_eq!(lagging, vec![("t".to_string(), 0, 1)]);
        guard
            .consumer
            .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
            .unwrap();
        let committed = guard.consumer.committed(Duration::from_secs(10)).unwrap();
        assert_eq!(
            committed.find_partition("t", 0).map(|e| e.offset()),
            Some(Offset::Offset(1))
        );
    }

    /// The check of committed offsets, started just before a stop while the broker takes two
    /// minutes to answer, does not hold the runtime's exit: its call, and its copy of the
    /// consumer, are on a thread the runtime does not wait for.
    #[test]
    fn a_stop_does_not_wait_for_the_check_of_committed_offsets() {
        let mock = MockCluster::new(1).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let guard = guard(&mock, &runtime);
        let consumer = guard.consumer.clone();
        mock.broker_round_trip_time(1, Duration::from_secs(120))
            .unwrap();
        runtime.block_on(async {
            let mut check = std::pin::pin!(guard.commits(Vec::new()));
            // One poll starts the request, which then waits on the broker.
            assert!(futures::poll!(check.as_mut()).is_pending());
        });
        let stopping = Instant::now();
        drop(runtime);
        let took = stopping.elapsed();
        // Had the runtime waited for the call (10 s at most), the call's copy would be gone.
        assert_eq!(
            Arc::strong_count(&consumer),
            3,
            "the runtime waited {took:?} for the check of committed offsets to end"
        );
        // The consumer's last drop waits on the stalled broker: not this test's to wait for.
        std::thread::spawn(move || drop((consumer, guard)));
    }
}
