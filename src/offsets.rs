//! Which offset may be stored for each partition (I1, I11).
//!
//! Messages are handled concurrently and finish in any order. An offset may be stored only when
//! every message below it has a durable outcome, so each partition keeps the offsets still in
//! flight: the committable position is the lowest in-flight offset, or one past the highest done.
//!
//! Ownership: a partition's state lives for one assignment. When the partition is revoked its
//! state is dropped and its epoch goes up; work begun under an older epoch then stores nothing, so
//! a partition that moves A→B→A never sees A store an offset behind what B committed.
//!
//! The tracker also notices a partition whose lowest unfinished offset has not moved for a long
//! time ([`OffsetTracker::stalled`]): its commits are stuck behind that one message. And it tells
//! which idle partitions should by now have their last stored position committed
//! ([`OffsetTracker::idle`]), so the consumer can check that the commit really arrived.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Partition {
    /// The epoch this state belongs to.
    epoch: u64,
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

/// Tracks in-flight offsets per (topic, partition).
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<(String, i32), Partition>,
    /// How often each partition was revoked: its current epoch. Kept after the state is dropped.
    epochs: HashMap<(String, i32), u64>,
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
    /// The partition's current epoch: take it when a message is received, and pass it to
    /// [`OffsetTracker::begin`].
    pub fn epoch(&self, topic: &str, partition: i32) -> u64 {
        let key = (topic.to_string(), partition);
        self.epochs.get(&key).copied().unwrap_or(0)
    }

    /// Registers a message before its handler runs. Call in consumption order, with the epoch of
    /// the partition when the message was received. `false` when the partition was revoked since:
    /// the message belongs to its new owner and must not be handled here.
    pub fn begin(&mut self, topic: &str, partition: i32, offset: i64, epoch: u64) -> bool {
        if epoch != self.epoch(topic, partition) {
            return false;
        }
        let p = self
            .partitions
            .entry((topic.to_string(), partition))
            .or_insert_with(|| Partition {
                epoch,
                in_flight: BTreeMap::new(),
                max_done: None,
                stored: None,
                stored_at: Instant::now(),
                lowest: None,
            });
        // The first message of an assignment is where the group's committed position already is.
        p.stored.get_or_insert(offset);
        *p.in_flight.entry(offset).or_default() += 1;
        p.note_lowest();
        true
    }

    /// Marks a message's outcome durable. Returns the next offset to consume when the committable
    /// position moved forward: everything below it is durable. `None` as well for work begun under
    /// an older epoch: the partition has been revoked since, and its offsets are not ours to store.
    pub fn done(&mut self, topic: &str, partition: i32, offset: i64, epoch: u64) -> Option<i64> {
        let p = self.partitions.get_mut(&(topic.to_string(), partition))?;
        if p.epoch != epoch {
            return None;
        }
        match p.in_flight.get_mut(&offset) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                p.in_flight.remove(&offset);
            }
            None => return None,
        }
        p.note_lowest();
        p.max_done = Some(p.max_done.map_or(offset, |m| m.max(offset)));
        let position = match p.in_flight.keys().next() {
            Some(&lowest) => lowest,
            None => p.max_done? + 1,
        };
        if p.stored.is_some_and(|s| s >= position) {
            return None;
        }
        p.stored = Some(position);
        p.stored_at = Instant::now();
        Some(position)
    }

    /// Forgets a revoked partition: its in-flight work will store nothing. Returns how many
    /// deliveries were in flight.
    pub fn revoke(&mut self, topic: &str, partition: i32) -> usize {
        let key = (topic.to_string(), partition);
        *self.epochs.entry(key.clone()).or_default() += 1;
        self.partitions
            .remove(&key)
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
            .filter(|(_, p)| {
                p.in_flight.is_empty() && now.saturating_duration_since(p.stored_at) > quiet
            })
            .filter_map(|((topic, partition), p)| Some((topic.clone(), *partition, p.stored?)))
            .collect();
        out.sort();
        out
    }

    /// The stored position of a partition with nothing in flight, if it is still `position`: the
    /// guard's check that re-storing it cannot go behind newer work.
    pub fn still_idle_at(&self, topic: &str, partition: i32, position: i64) -> bool {
        self.partitions
            .get(&(topic.to_string(), partition))
            .is_some_and(|p| p.in_flight.is_empty() && p.stored == Some(position))
    }

    fn stalled_at(&self, now: Instant, limit: Duration) -> Vec<Stalled> {
        let mut out: Vec<Stalled> = self
            .partitions
            .iter()
            .filter_map(|((topic, partition), p)| {
                let (offset, since) = p.lowest?;
                let for_ = now.saturating_duration_since(since);
                (for_ > limit).then(|| Stalled {
                    topic: topic.clone(),
                    partition: *partition,
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
    fn note_lowest(&mut self) {
        let lowest = self.in_flight.keys().next().copied();
        match (lowest, self.lowest) {
            (None, _) => self.lowest = None,
            (Some(o), Some((was, _))) if o == was => {}
            (Some(o), _) => self.lowest = Some((o, Instant::now())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let first = t.epoch("t", 0);
        t.begin("t", 0, 10, first); // slow: still running when the partition moves away
        t.begin("t", 0, 11, first);
        assert_eq!(t.revoke("t", 0), 2);
        // Another member handled 10..=49 and committed 50; the partition is back.
        let second = t.epoch("t", 0);
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
