//! Which offset may be stored for each partition (I1, I11).
//!
//! Messages are handled concurrently and finish in any order. An offset may be stored only when
//! every message below it has a durable outcome, so each partition keeps the offsets still in
//! flight: the committable position is the lowest in-flight offset, or one past the highest done.
//!
//! Ownership: a partition's state lives for one assignment. Every revoke advances the tracker's
//! generation, and the partition remembers the generation of its last revoke. A message is stamped
//! with the generation when it is received (an atomic read, no lock); work whose stamp is older
//! than its partition's last revoke stores nothing, so a partition that moves A→B→A never sees A
//! store an offset behind what B committed.
//!
//! The tracker also notices a partition whose lowest unfinished offset has not moved for a long
//! time ([`OffsetTracker::stalled`]): its commits are stuck behind that one message. And it tells
//! which idle partitions should by now have their last stored position committed
//! ([`OffsetTracker::idle`]), so the consumer can check that the commit really arrived.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Partition {
    /// In-flight offsets and how many deliveries of each are running (a redelivery can overlap
    /// the first).
    in_flight: BTreeMap<i64, u32>,
    /// Highest offset whose outcome is durable.
    max_done: Option<i64>,
    /// The position last returned for storing.
    stored: Option<i64>,
    /// When `stored` last changed.
    stored_at: Instant,
    /// The lowest in-flight offset, and since when it has been the lowest.
    lowest: Option<(i64, Instant)>,
}

/// A fast hash: the keys are this consumer's own topics and partitions.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Values by topic, then partition: looked up by `&str`, so the per-message path allocates
/// nothing.
#[derive(Debug)]
pub(crate) struct ByPartition<T>(FastMap<String, FastMap<i32, T>>);

impl<T> Default for ByPartition<T> {
    fn default() -> Self {
        Self(FastMap::default())
    }
}

impl<T> ByPartition<T> {
    pub(crate) fn get(&self, topic: &str, partition: i32) -> Option<&T> {
        self.0.get(topic)?.get(&partition)
    }

    pub(crate) fn get_mut(&mut self, topic: &str, partition: i32) -> Option<&mut T> {
        self.0.get_mut(topic)?.get_mut(&partition)
    }

    pub(crate) fn get_or_insert_with(
        &mut self,
        topic: &str,
        partition: i32,
        new: impl FnOnce() -> T,
    ) -> &mut T {
        if !self.0.contains_key(topic) {
            self.0.insert(topic.to_string(), FastMap::default());
        }
        let by_partition = self.0.get_mut(topic).expect("inserted above");
        by_partition.entry(partition).or_insert_with(new)
    }

    pub(crate) fn remove(&mut self, topic: &str, partition: i32) -> Option<T> {
        self.0.get_mut(topic)?.remove(&partition)
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &T> {
        self.0.values().flat_map(|ps| ps.values())
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, i32, &T)> {
        self.0
            .iter()
            .flat_map(|(t, ps)| ps.iter().map(move |(p, v)| (t.as_str(), *p, v)))
    }
}

/// Tracks in-flight offsets per (topic, partition).
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: ByPartition<Partition>,
    /// How many revokes there have been; read without the lock by [`OffsetTracker::stamps`].
    generation: Arc<AtomicU64>,
    /// The generation of each partition's last revoke. Kept after the state is dropped.
    revoked_at: ByPartition<u64>,
}

/// A partition whose commits wait on one message for longer than expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stalled {
    pub topic: String,
    pub partition: i32,
    /// The unfinished offset everything waits for.
    pub offset: i64,
    /// How long it has been the lowest unfinished offset.
    pub for_: Duration,
}

impl OffsetTracker {
    /// The source of stamps: read it (`load`) when a message is received, and pass the value to
    /// [`OffsetTracker::begin_at`] and [`OffsetTracker::done_at`]. Reading it takes no lock.
    pub fn stamps(&self) -> Arc<AtomicU64> {
        self.generation.clone()
    }

    /// The stamp a message received now gets.
    pub fn stamp(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Whether the partition was revoked after work stamped `stamp` was received.
    fn revoked_since(&self, topic: &str, partition: i32, stamp: u64) -> bool {
        self.revoked_at
            .get(topic, partition)
            .is_some_and(|&at| at > stamp)
    }

    /// Registers a message before its handler runs. Call in consumption order, with the stamp the
    /// message got when it was received, and the time (read once for a batch). `false` when the
    /// partition was revoked since: the message belongs to its new owner and must not be handled
    /// here.
    pub fn begin_at(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        stamp: u64,
        now: Instant,
    ) -> bool {
        if self.revoked_since(topic, partition, stamp) {
            return false;
        }
        let p = self
            .partitions
            .get_or_insert_with(topic, partition, || Partition {
                in_flight: BTreeMap::new(),
                max_done: None,
                stored: None,
                stored_at: now,
                lowest: None,
            });
        // The first message of an assignment is where the group's committed position already is.
        p.stored.get_or_insert(offset);
        *p.in_flight.entry(offset).or_default() += 1;
        p.note_lowest(now);
        true
    }

    /// Marks a message's outcome durable. Returns the next offset to consume when the committable
    /// position moved forward: everything below it is durable. `None` as well for work received
    /// before the partition's last revoke: its offsets are not ours to store. `now` is read once
    /// for a batch.
    pub fn done_at(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        stamp: u64,
        now: Instant,
    ) -> Option<i64> {
        if self.revoked_since(topic, partition, stamp) {
            return None;
        }
        let p = self.partitions.get_mut(topic, partition)?;
        match p.in_flight.get_mut(&offset) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                p.in_flight.remove(&offset);
            }
            None => return None,
        }
        p.note_lowest(now);
        p.max_done = Some(p.max_done.map_or(offset, |m| m.max(offset)));
        let position = match p.in_flight.keys().next() {
            Some(&lowest) => lowest,
            None => p.max_done? + 1,
        };
        if p.stored.is_some_and(|s| s >= position) {
            return None;
        }
        p.stored = Some(position);
        p.stored_at = now;
        Some(position)
    }

    /// Forgets a revoked partition: its in-flight work, and work received before now, will store
    /// nothing. Returns how many deliveries were in flight.
    pub fn revoke(&mut self, topic: &str, partition: i32) -> usize {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        *self.revoked_at.get_or_insert_with(topic, partition, || 0) = generation;
        self.partitions
            .remove(topic, partition)
            .map_or(0, |p| p.in_flight.values().sum::<u32>() as usize)
    }

    /// Messages registered and not yet done, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions
            .values()
            .map(|p| p.in_flight.values().sum::<u32>() as usize)
            .sum()
    }

    /// Partitions whose lowest unfinished offset has not moved for longer than `limit`.
    pub fn stalled(&self, limit: Duration) -> Vec<Stalled> {
        self.stalled_at(Instant::now(), limit)
    }

    /// Partitions with nothing in flight whose position was stored more than `quiet` ago, with
    /// that position: by now their committed offset should be exactly it.
    pub fn idle(&self, quiet: Duration) -> Vec<(String, i32, i64)> {
        self.idle_at(Instant::now(), quiet)
    }

    fn idle_at(&self, now: Instant, quiet: Duration) -> Vec<(String, i32, i64)> {
        let mut out: Vec<_> = self
            .partitions
            .iter()
            .filter(|(_, _, p)| {
                p.in_flight.is_empty() && now.saturating_duration_since(p.stored_at) > quiet
            })
            .filter_map(|(topic, partition, p)| Some((topic.to_string(), partition, p.stored?)))
            .collect();
        out.sort();
        out
    }

    /// The stored position of a partition with nothing in flight, if it is still `position`: the
    /// guard's check that re-storing it cannot go behind newer work.
    pub fn still_idle_at(&self, topic: &str, partition: i32, position: i64) -> bool {
        self.partitions
            .get(topic, partition)
            .is_some_and(|p| p.in_flight.is_empty() && p.stored == Some(position))
    }

    fn stalled_at(&self, now: Instant, limit: Duration) -> Vec<Stalled> {
        let mut out: Vec<Stalled> = self
            .partitions
            .iter()
            .filter_map(|(topic, partition, p)| {
                let (offset, since) = p.lowest?;
                let for_ = now.saturating_duration_since(since);
                (for_ > limit).then(|| Stalled {
                    topic: topic.to_string(),
                    partition,
                    offset,
                    for_,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        out
    }
}

impl Partition {
    /// Restarts the stall clock whenever the lowest in-flight offset changes.
    fn note_lowest(&mut self, now: Instant) {
        let lowest = self.in_flight.keys().next().copied();
        match (lowest, self.lowest) {
            (None, _) => self.lowest = None,
            (Some(o), Some((was, _))) if o == was => {}
            (Some(o), _) => self.lowest = Some((o, now)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl OffsetTracker {
        fn begin(&mut self, topic: &str, partition: i32, offset: i64, stamp: u64) -> bool {
            self.begin_at(topic, partition, offset, stamp, Instant::now())
        }

        fn done(&mut self, topic: &str, partition: i32, offset: i64, stamp: u64) -> Option<i64> {
            self.done_at(topic, partition, offset, stamp, Instant::now())
        }
    }

    #[test]
    fn position_waits_for_the_lowest_unfinished_offset() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            assert!(t.begin("t", 0, o, 0));
        }
        assert_eq!(t.done("t", 0, 12, 0), None, "10 and 11 are still running");
        assert_eq!(t.done("t", 0, 11, 0), None);
        assert_eq!(t.done("t", 0, 10, 0), Some(13));
        assert_eq!(t.done("t", 0, 14, 0), None, "13 is still running");
        assert_eq!(t.done("t", 0, 13, 0), Some(15));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::default();
        t.begin("t", 0, 0, 0);
        t.begin("t", 1, 0, 0);
        t.begin("u", 0, 5, 0);
        assert_eq!(t.done("t", 1, 0, 0), Some(1));
        assert_eq!(t.done("u", 0, 5, 0), Some(6));
        assert_eq!(t.in_flight(), 1);
    }

    #[test]
    fn an_overlapping_redelivery_holds_the_position_until_both_finish() {
        let mut t = OffsetTracker::default();
        t.begin("t", 0, 3, 0);
        t.begin("t", 0, 3, 0);
        t.begin("t", 0, 4, 0);
        assert_eq!(t.done("t", 0, 4, 0), None);
        assert_eq!(
            t.done("t", 0, 3, 0),
            None,
            "one delivery of 3 is still running"
        );
        assert_eq!(t.done("t", 0, 3, 0), Some(5));
    }

    #[test]
    fn unknown_offsets_change_nothing() {
        let mut t = OffsetTracker::default();
        assert_eq!(t.done("t", 0, 1, 0), None);
        t.begin("t", 0, 1, 0);
        assert_eq!(t.done("t", 0, 2, 0), None);
        assert_eq!(t.in_flight(), 1);
    }

    #[test]
    fn work_of_a_revoked_assignment_stores_nothing_when_the_partition_comes_back() {
        let mut t = OffsetTracker::default();
        let first = t.stamp();
        t.begin("t", 0, 10, first); // slow: still running when the partition moves away
        t.begin("t", 0, 11, first);
        assert_eq!(t.revoke("t", 0), 2);
        // Another member handled 10..=49 and committed 50; the partition is back.
        let second = t.stamp();
        assert_ne!(first, second);
        assert!(t.begin("t", 0, 50, second));
        assert_eq!(
            t.done("t", 0, 10, first),
            None,
            "10 must not store 11 over 50"
        );
        assert_eq!(t.done("t", 0, 50, second), Some(51));
        assert!(
            !t.begin("t", 0, 12, first),
            "a message held from before is not handled"
        );
    }

    #[test]
    fn a_revoke_leaves_the_work_of_other_partitions_alone() {
        let mut t = OffsetTracker::default();
        let before = t.stamp();
        assert!(t.begin("t", 0, 7, before));
        assert!(t.begin("t", 1, 3, before));
        t.revoke("t", 1);
        assert!(t.stamp() > before);
        assert_eq!(
            t.done("t", 0, 7, before),
            Some(8),
            "partition 0 stayed ours"
        );
        assert!(
            t.begin("t", 0, 8, before),
            "received before another partition's revoke"
        );
        assert_eq!(t.done("t", 1, 3, before), None);
        assert!(!t.begin("t", 1, 4, before));
        assert!(t.begin("t", 1, 9, t.stamp()), "received after it came back");
    }

    #[test]
    fn idle_partitions_are_listed_with_their_stored_position() {
        let mut t = OffsetTracker::default();
        t.begin("t", 0, 5, 0);
        t.begin("t", 1, 9, 0);
        assert_eq!(t.done("t", 0, 5, 0), Some(6));
        let later = Instant::now() + Duration::from_secs(30);
        assert_eq!(
            t.idle_at(later, Duration::from_secs(10)),
            vec![("t".into(), 0, 6)]
        );
        assert!(
            t.idle_at(Instant::now(), Duration::from_secs(10))
                .is_empty(),
            "too recent"
        );
        assert!(t.still_idle_at("t", 0, 6));
        t.begin("t", 0, 6, 0);
        assert!(!t.still_idle_at("t", 0, 6), "new work in flight");
    }

    #[test]
    fn a_lowest_offset_that_does_not_move_is_reported() {
        let mut t = OffsetTracker::default();
        t.begin("t", 3, 7, 0);
        t.begin("t", 3, 8, 0);
        assert_eq!(t.done("t", 3, 8, 0), None);
        let later = Instant::now() + Duration::from_secs(90);
        let stalled = t.stalled_at(later, Duration::from_secs(60));
        assert_eq!(stalled.len(), 1);
        assert_eq!((stalled[0].partition, stalled[0].offset), (3, 7));
        assert!(t.stalled_at(later, Duration::from_secs(120)).is_empty());
        t.done("t", 3, 7, 0);
        assert!(t.stalled_at(later, Duration::ZERO).is_empty(), "it moved");
    }
}
