//! Which offset may be stored for each partition (I1).
//!
//! Messages are handled concurrently and finish in any order. An offset may be stored only when
//! every message below it has a durable outcome, so each partition keeps the offsets still in
//! flight: the committable position is the lowest in-flight offset, or one past the highest done.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Default)]
struct Partition {
    /// In-flight offsets and how many deliveries of each are running (a redelivery after a
    /// rebalance can overlap the first).
    in_flight: BTreeMap<i64, u32>,
    /// Highest offset whose outcome is durable.
    max_done: Option<i64>,
    /// The position last returned for storing.
    stored: Option<i64>,
}

/// Tracks in-flight offsets per (topic, partition).
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<(String, i32), Partition>,
}

impl OffsetTracker {
    /// Registers a message before its handler runs. Call in consumption order.
    pub fn begin(&mut self, topic: &str, partition: i32, offset: i64) {
        let p = self
            .partitions
            .entry((topic.to_string(), partition))
            .or_default();
        // The first message seen is where the group's committed position already is.
        p.stored.get_or_insert(offset);
        *p.in_flight.entry(offset).or_default() += 1;
    }

    /// Marks a message's outcome durable. Returns the next offset to consume when the committable
    /// position moved forward: everything below it is durable.
    pub fn done(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let p = self.partitions.get_mut(&(topic.to_string(), partition))?;
        match p.in_flight.get_mut(&offset) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                p.in_flight.remove(&offset);
            }
            None => return None,
        }
        p.max_done = Some(p.max_done.map_or(offset, |m| m.max(offset)));
        let position = match p.in_flight.keys().next() {
            Some(&lowest) => lowest,
            None => p.max_done? + 1,
        };
        if p.stored.is_some_and(|s| s >= position) {
            return None;
        }
        p.stored = Some(position);
        Some(position)
    }

    /// Messages registered and not yet done, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions
            .values()
            .map(|p| p.in_flight.values().sum::<u32>() as usize)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_waits_for_the_lowest_unfinished_offset() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            t.begin("t", 0, o);
        }
        assert_eq!(t.done("t", 0, 12), None, "10 and 11 are still running");
        assert_eq!(t.done("t", 0, 11), None);
        assert_eq!(t.done("t", 0, 10), Some(13));
        assert_eq!(t.done("t", 0, 14), None, "13 is still running");
        assert_eq!(t.done("t", 0, 13), Some(15));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::default();
        t.begin("t", 0, 0);
        t.begin("t", 1, 0);
        t.begin("u", 0, 5);
        assert_eq!(t.done("t", 1, 0), Some(1));
        assert_eq!(t.done("u", 0, 5), Some(6));
        assert_eq!(t.in_flight(), 1);
    }

    #[test]
    fn an_overlapping_redelivery_holds_the_position_until_both_finish() {
        let mut t = OffsetTracker::default();
        t.begin("t", 0, 3);
        t.begin("t", 0, 3);
        t.begin("t", 0, 4);
        assert_eq!(t.done("t", 0, 4), None);
        assert_eq!(
            t.done("t", 0, 3),
            None,
            "one delivery of 3 is still running"
        );
        assert_eq!(t.done("t", 0, 3), Some(5));
    }

    #[test]
    fn unknown_offsets_change_nothing() {
        let mut t = OffsetTracker::default();
        assert_eq!(t.done("t", 0, 1), None);
        t.begin("t", 0, 1);
        assert_eq!(t.done("t", 0, 2), None);
        assert_eq!(t.in_flight(), 1);
    }
}
