//! [`RetainedOrder`]: keeps the store's retained messages in step with
//! memory's.
//!
//! A publisher replaces a topic's retained message in memory first, then
//! routes the message, then commits what it changed. Two publishers of the
//! same topic can finish routing in the other order than they replaced the
//! value, and their journals would reach the store in that other order: the
//! store would keep the older value, which a restart would then serve. So
//! the retained change goes to the writer in a journal of its own, handed
//! over under a lock of its topic together with the change in memory; the
//! writer applies journals in the order it receives them.
//!
//! Invariant: a topic's retained value changes in memory only with its
//! shard's lock held, and its store operation is committed before the lock
//! is released. Nothing else is done under the lock (no routing, no await).

use std::hash::{Hash, Hasher};

use parking_lot::{Mutex, MutexGuard};

/// Shards of the lock: publishers of different topics seldom wait for each
/// other (a device fleet that publishes its state retained, many topics at
/// once, would otherwise queue on one lock), and 64 empty mutexes cost 64
/// bytes.
const SHARDS: usize = 64;

/// The per-topic ordering of retained changes; see the module documentation.
pub struct RetainedOrder {
    shards: [Mutex<()>; SHARDS],
}

impl RetainedOrder {
    pub fn new() -> RetainedOrder {
        RetainedOrder {
            shards: std::array::from_fn(|_| Mutex::new(())),
        }
    }

    /// Held while `topic`'s retained value changes in memory and its store
    /// operation is committed.
    pub fn lock(&self, topic: &str) -> MutexGuard<'_, ()> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        topic.hash(&mut hasher);
        self.shards[(hasher.finish() % SHARDS as u64) as usize].lock()
    }
}

impl Default for RetainedOrder {
    fn default() -> RetainedOrder {
        RetainedOrder::new()
    }
}
