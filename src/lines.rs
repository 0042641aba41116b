//! Key order in the consumer (I12): for a topic with `ordering = "key"`, which message of a key
//! goes next, and whether it is delivered or parked.
//!
//! Within a partition, one message of a key is under way at a time: delivered, or its failure
//! being stored, or parked. The key's later messages queue here, in offset order, each holding its
//! slot. A key is *blocked* when its line in the retry table holds a row: its messages are then
//! parked behind that row rather than delivered, several in one statement. The statement decides
//! under the line's lock (see [`crate::store::capture`]); when it finds the line empty (the row
//! ahead succeeded, or was purged), the parked messages come back *open* and are delivered here,
//! in order, and the key is no longer blocked. This set is therefore only ever too cautious: a key
//! it thinks blocked costs a statement, never the order.
//!
//! A partition's blocked keys are read from the table when the partition's first message arrives,
//! and its messages wait until they are known. A revoke ends a partition's state (its queued
//! messages belong to the next owner; [`crate::kafka::GroupContext`] calls [`Lines::revoke`]);
//! the outcomes of its work still under way, stamped before the state began, are then ignored.

use crate::message::Message;
use crate::offsets::ByPartition;
use crate::store::capture::{Line, OnDead};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher as _;
use tokio::sync::OwnedSemaphorePermit;

/// At most this many messages of one key are parked in one statement.
const PARK_MAX: usize = 256;

/// A message's key in this process: two fast 64-bit hashes of its bytes, with different seeds.
/// Keys that shared one would share their state here, a blocked key's with a free one's; at 128
/// bits that is not expected in any partition's lifetime. The table's lines are by SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(u64, u64);

impl KeyHash {
    pub fn of(key: &[u8]) -> Self {
        KeyHash(
            foldhash::fast::FixedState::with_seed(0x7265_6472_6976_6531).hash_one(key),
            foldhash::fast::FixedState::with_seed(0x7265_6472_6976_6532).hash_one(key),
        )
    }
}

/// How a message of a topic that keeps key order is ordered: its key, and its topic's dead-row
/// policy. Its [`Line`] in the table is worked out only when it gets a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ordered {
    pub key: KeyHash,
    pub on_dead: OnDead,
}

impl Ordered {
    /// The line of `message` (which has a key) in the table.
    pub fn line(&self, message: &Message) -> Line {
        Line::of(message.key.as_deref().unwrap_or_default(), self.on_dead)
    }
}

/// A received message of a topic that keeps key order, with its stamp and its slot (none once
/// it was parked: the capturer's bounds hold it then).
#[derive(Debug)]
pub struct Item {
    pub message: Message,
    pub stamp: u64,
    pub slot: Option<OwnedSemaphorePermit>,
    pub order: Ordered,
}

/// What to do next with messages of ordered topics.
#[derive(Debug, Default)]
pub struct Work {
    /// Deliver these; each is the only message of its key under way.
    pub run: Vec<Item>,
    /// Park these, one group per key in offset order, each group in one statement.
    pub park: Vec<Vec<Item>>,
    /// Read the blocked keys of these partitions (topic, partition, the state's stamp), then hand
    /// them to [`Lines::loaded`].
    pub load: Vec<(String, i32, u64)>,
}

impl Work {
    pub fn is_empty(&self) -> bool {
        self.run.is_empty() && self.park.is_empty() && self.load.is_empty()
    }
}

/// How a key's message under way ended.
#[derive(Debug)]
pub enum Outcome {
    /// The handler succeeded.
    Delivered,
    /// Its failure is stored; `blocks` unless the row is dead and its line skips dead rows.
    Failed { blocks: bool },
    /// Parked: the messages in `open` found the line empty and were not stored (they go next, in
    /// order); `stored` says whether any of the group was.
    Parked { open: Vec<Item>, stored: bool },
}

#[derive(Debug, Default)]
struct Key {
    /// A message of the key is under way.
    busy: bool,
    /// The key's line holds a row.
    blocked: bool,
    /// Its next messages, in offset order. Empty while the key is not busy (but for the moment
    /// an admission queues a blocked key's messages before they park).
    queue: VecDeque<Item>,
}

#[derive(Debug)]
struct Part {
    /// The stamp of the message that began this state: a revoke after it ends it.
    since: u64,
    /// Whether the blocked keys are read.
    loaded: bool,
    /// Messages received before they were, in order.
    early: Vec<Item>,
    keys: Keys,
    /// Blocked keys known only by their line (a row kept without its key, I10): a message whose
    /// key's SHA-256 is here is blocked.
    opaque: HashSet<[u8; 32]>,
}

type Keys = HashMap<KeyHash, Key, foldhash::fast::RandomState>;

/// A partition's blocked keys as read from the table: each line's key, when a row of it has one,
/// and the line.
pub type Blocked = Vec<(Option<Vec<u8>>, [u8; 32])>;

impl Part {
    fn new(since: u64) -> Self {
        Part {
            since,
            loaded: false,
            early: Vec::new(),
            keys: HashMap::default(),
            opaque: HashSet::new(),
        }
    }
}

/// The consumer's keys under way, queued and blocked, per partition. Where both are locked, the
/// offset tracker is locked first.
#[derive(Debug, Default)]
pub struct Lines {
    parts: ByPartition<Part>,
    /// The stamp each partition's last revoke began: a message stamped before it is the next
    /// owner's, and is dropped here.
    revoked_at: ByPartition<u64>,
}

impl Lines {
    /// The common case, without moving the message: its partition's lines are known, and its key
    /// has nothing under way and no row. The key is then marked busy and `true` returned: the
    /// message goes now. Otherwise nothing changes, and the message goes to [`Lines::admit`].
    pub fn start_now(&mut self, message: &Message, stamp: u64, order: Ordered) -> bool {
        let (topic, partition) = (message.topic.as_str(), message.partition);
        let Some(part) = self.parts.get_mut(topic, partition) else {
            return false;
        };
        // A message from before the state began goes the slow way, which drops it.
        if !part.loaded || !part.opaque.is_empty() || stamp < part.since {
            return false;
        }
        match part.keys.entry(order.key) {
            Entry::Occupied(_) => false,
            Entry::Vacant(v) => {
                v.insert(Key {
                    busy: true,
                    ..Key::default()
                });
                true
            }
        }
    }

    /// Takes received messages, in consumption order, and says which go now.
    pub fn admit(&mut self, items: Vec<Item>) -> Work {
        let mut work = Work::default();
        // Blocked keys that were idle: they park once the whole admission is queued, so their
        // messages of it park in one statement.
        let mut kicks = Vec::new();
        for item in items {
            self.admit_one(item, &mut work, &mut kicks);
        }
        for (topic, partition, key) in kicks {
            if let Some(part) = self.parts.get_mut(&topic, partition) {
                next(&mut part.keys, key, &mut work);
            }
        }
        work
    }

    /// The blocked keys of a partition are read: its waiting messages go on.
    pub fn loaded(&mut self, topic: &str, partition: i32, since: u64, blocked: Blocked) -> Work {
        let Some(part) = self.parts.get_mut(topic, partition) else {
            return Work::default();
        };
        if part.since != since || part.loaded {
            return Work::default();
        }
        for (key, line) in blocked {
            match key {
                Some(key) => part.keys.entry(KeyHash::of(&key)).or_default().blocked = true,
                None => {
                    part.opaque.insert(line);
                }
            }
        }
        part.loaded = true;
        let early = std::mem::take(&mut part.early);
        self.admit(early)
    }

    /// A key's message under way (received with `stamp`) is done: its next message, if any, goes.
    pub fn finish(
        &mut self,
        message: &Message,
        stamp: u64,
        key: KeyHash,
        outcome: Outcome,
    ) -> Work {
        let mut work = Work::default();
        self.finish_into(message, stamp, key, outcome, &mut work);
        work
    }

    /// [`Lines::finish`] of many messages, into `work`.
    pub fn finish_all<'m>(
        &mut self,
        finished: impl IntoIterator<Item = (&'m Message, u64, KeyHash, Outcome)>,
        work: &mut Work,
    ) {
        for (message, stamp, key, outcome) in finished {
            self.finish_into(message, stamp, key, outcome, work);
        }
    }

    fn finish_into(
        &mut self,
        message: &Message,
        stamp: u64,
        key: KeyHash,
        outcome: Outcome,
        work: &mut Work,
    ) {
        let Some(part) = self.parts.get_mut(&message.topic, message.partition) else {
            return;
        };
        if stamp < part.since {
            // Work of an earlier assignment of the partition.
            return;
        }
        let Entry::Occupied(mut entry) = part.keys.entry(key) else {
            return;
        };
        let k = entry.get_mut();
        k.busy = false;
        match outcome {
            Outcome::Delivered if k.queue.is_empty() && !k.blocked => {
                // The common case: nothing more of the key.
                entry.remove();
                return;
            }
            Outcome::Delivered => {}
            Outcome::Failed { blocks } => k.blocked |= blocks,
            Outcome::Parked { open, stored } => {
                k.blocked = stored;
                for item in open.into_iter().rev() {
                    k.queue.push_front(item);
                }
            }
        }
        next(&mut part.keys, key, work);
    }

    /// The partition is revoked, and `generation` is the offset tracker's generation after it:
    /// its queued messages are dropped (their slots go back), messages received before are
    /// dropped when they arrive here, and the outcomes of its work under way are ignored.
    pub fn revoke(&mut self, topic: &str, partition: i32, generation: u64) {
        self.parts.remove(topic, partition);
        *self.revoked_at.get_or_insert_with(topic, partition, || 0) = generation;
    }

    fn admit_one(&mut self, item: Item, work: &mut Work, kicks: &mut Vec<(String, i32, KeyHash)>) {
        let (topic, partition) = (item.message.topic.as_str(), item.message.partition);
        if self
            .revoked_at
            .get(topic, partition)
            .is_some_and(|&at| at > item.stamp)
        {
            // Received before the partition was revoked: its next owner has it.
            return;
        }
        let mut fresh = false;
        let part = self.parts.get_or_insert_with(topic, partition, || {
            fresh = true;
            Part::new(item.stamp)
        });
        if fresh {
            work.load.push((topic.to_string(), partition, part.since));
        }
        if !part.loaded {
            part.early.push(item);
            return;
        }
        if !part.opaque.is_empty() {
            // A key known only by its line: its SHA-256 says whether this is it.
            let line = item.order.line(&item.message);
            if part.opaque.remove(&line.key) {
                part.keys.entry(item.order.key).or_default().blocked = true;
            }
        }
        let key = part.keys.entry(item.order.key).or_default();
        if key.busy {
            key.queue.push_back(item);
        } else if key.blocked {
            if key.queue.is_empty() {
                kicks.push((topic.to_string(), partition, item.order.key));
            }
            key.queue.push_back(item);
        } else {
            key.busy = true;
            work.run.push(item);
        }
    }
}

/// A key that is not busy: its next message goes, or the key is forgotten once it has nothing
/// queued and no row.
fn next(keys: &mut Keys, k: KeyHash, work: &mut Work) {
    let Some(key) = keys.get_mut(&k) else {
        return;
    };
    if key.busy {
        return;
    }
    if key.queue.is_empty() {
        if !key.blocked {
            keys.remove(&k);
        }
        return;
    }
    key.busy = true;
    if key.blocked {
        let n = key.queue.len().min(PARK_MAX);
        work.park.push(key.queue.drain(..n).collect());
    } else {
        work.run.extend(key.queue.pop_front());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: &str, offset: i64, stamp: u64) -> Item {
        Item {
            message: Message {
                topic: "t".into(),
                partition: 0,
                offset,
                timestamp: None,
                key: Some(key.as_bytes().to_vec()),
                payload: None,
                headers: Vec::new(),
            },
            stamp,
            slot: None,
            order: Ordered {
                key: KeyHash::of(key.as_bytes()),
                on_dead: OnDead::Block,
            },
        }
    }

    fn offsets(items: &[Item]) -> Vec<i64> {
        items.iter().map(|i| i.message.offset).collect()
    }

    /// Lines with partition t/0 read, `blocked` blocked.
    fn loaded(blocked: &[&str]) -> Lines {
        let mut lines = Lines::default();
        let work = lines.admit(vec![item("first", 0, 0)]);
        assert_eq!(work.load, [("t".to_string(), 0, 0)]);
        let blocked = blocked
            .iter()
            .map(|k| {
                (
                    Some(k.as_bytes().to_vec()),
                    Line::of(k.as_bytes(), OnDead::Block).key,
                )
            })
            .collect();
        let work = lines.loaded("t", 0, 0, blocked);
        assert_eq!(offsets(&work.run), [0], "what waited for the read goes");
        lines
    }

    #[test]
    fn a_key_goes_one_message_at_a_time_and_a_failure_parks_the_rest() {
        let mut lines = loaded(&[]);
        let work = lines.admit(vec![item("k", 1, 0), item("k", 2, 0), item("j", 3, 0)]);
        assert_eq!(offsets(&work.run), [1, 3]);
        let done = item("k", 1, 0);
        let work = lines.finish(&done.message, 0, done.order.key, Outcome::Delivered);
        assert_eq!(
            offsets(&work.run),
            [2],
            "the next of the key goes once the first succeeded"
        );
        lines.admit(vec![item("k", 4, 0), item("k", 5, 0)]);
        let failed = item("k", 2, 0);
        let work = lines.finish(
            &failed.message,
            0,
            failed.order.key,
            Outcome::Failed { blocks: true },
        );
        assert!(work.run.is_empty());
        assert_eq!(work.park.len(), 1);
        assert_eq!(
            offsets(&work.park[0]),
            [4, 5],
            "the rest park together, in order"
        );
        // A message that comes while they are parked waits for the park.
        assert!(lines.admit(vec![item("k", 6, 0)]).is_empty());
        let work = lines.finish(
            &failed.message,
            0,
            failed.order.key,
            Outcome::Parked {
                open: Vec::new(),
                stored: true,
            },
        );
        assert_eq!(
            offsets(&work.park[0]),
            [6],
            "still blocked: the next one parks too"
        );
        // The line emptied meanwhile: the park comes back open, and the key flows again.
        let work = lines.finish(
            &failed.message,
            0,
            failed.order.key,
            Outcome::Parked {
                open: vec![item("k", 6, 0)],
                stored: false,
            },
        );
        assert_eq!(offsets(&work.run), [6]);
        let work = lines.finish(&failed.message, 0, failed.order.key, Outcome::Delivered);
        assert!(work.is_empty());
        assert_eq!(offsets(&lines.admit(vec![item("k", 7, 0)]).run), [7]);
    }

    #[test]
    fn a_partitions_blocked_keys_are_known_before_its_messages_go() {
        let mut lines = Lines::default();
        let work = lines.admit(vec![item("k", 1, 0), item("j", 2, 0), item("k", 3, 0)]);
        assert!(
            work.run.is_empty() && work.park.is_empty(),
            "nothing goes before the read"
        );
        let blocked = vec![(Some(b"k".to_vec()), Line::of(b"k", OnDead::Block).key)];
        let work = lines.loaded("t", 0, 0, blocked);
        assert_eq!(offsets(&work.run), [2]);
        assert_eq!(work.park.len(), 1);
        assert_eq!(offsets(&work.park[0]), [1, 3]);
        // A line known only by its SHA-256 (its rows lost their key) blocks its key all the same.
        let mut lines = Lines::default();
        lines.admit(vec![item("x", 1, 0)]);
        let work = lines.loaded("t", 0, 0, vec![(None, Line::of(b"x", OnDead::Block).key)]);
        assert_eq!(offsets(&work.park[0]), [1]);
    }

    #[test]
    fn a_revoke_ends_the_partitions_state_and_drops_what_came_before_it() {
        let mut lines = loaded(&[]);
        lines.admit(vec![item("k", 1, 0), item("k", 2, 0)]);
        lines.revoke("t", 0, 1);
        // Received before the revoke: the next owner's.
        let work = lines.admit(vec![item("k", 3, 0)]);
        assert!(work.is_empty());
        // Assigned again: read again, and the old key's outcome is ignored.
        let work = lines.admit(vec![item("k", 4, 1)]);
        assert_eq!(work.load, [("t".to_string(), 0, 1)]);
        let work = lines.loaded("t", 0, 1, Vec::new());
        assert_eq!(offsets(&work.run), [4]);
        let old = item("k", 1, 0);
        let work = lines.finish(&old.message, 0, old.order.key, Outcome::Delivered);
        assert!(work.is_empty());
        assert!(
            lines.admit(vec![item("k", 5, 1)]).run.is_empty(),
            "k is still under way"
        );
    }
}
