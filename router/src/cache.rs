//! The match cache: topic name -> shared match result.
//!
//! Lives inside the router's lock next to the trie, so it is always exactly
//! as fresh as the trie (see the invariants on [`crate::Router`]).
//!
//! * A hit is one hash lookup plus an `Arc` clone; nothing is allocated.
//! * The cache is bounded by a capacity (default [`DEFAULT_CACHE_CAPACITY`]).
//!   When full, an arbitrary [`EVICTION_DIVISOR`]th of the entries is dropped:
//!   "arbitrary" is the iteration order of a randomly seeded `HashMap`, which
//!   costs no bookkeeping on the hit path (unlike LRU) and avoids the
//!   recompute storm of clearing everything at once.
//! * A subscription change invalidates only the cached topics its filter
//!   matches, by scanning the (bounded) cache with [`filter_matches`].
//!
//! The map keeps std's randomly seeded SipHash: topics come from clients, and
//! a predictable hasher would let one client degrade every lookup.

use std::collections::HashMap;
use std::sync::Arc;

use crate::matches::Matches;
use crate::topic::filter_matches;

/// Default number of cached topics. Large enough to hold the hot set of a
/// typical broker; small enough that an invalidation scan (one
/// `filter_matches` per entry, under the write lock) stays around a hundred
/// microseconds.
pub const DEFAULT_CACHE_CAPACITY: usize = 4096;

/// When the cache is full, `1 / EVICTION_DIVISOR` of it is evicted, so
/// eviction work is amortised over many inserts.
pub const EVICTION_DIVISOR: usize = 4;

/// Topics longer than this are routed but not cached: caching them would let
/// a handful of clients pin `capacity * 64 KiB` of keys, and long topics are
/// rarely hot.
pub const MAX_CACHED_TOPIC_LEN: usize = 1024;

/// Removing more filters than this at once (e.g. a client with many
/// subscriptions disconnecting) clears the cache instead of scanning it once
/// per filter, bounding the write-lock hold time.
pub const BULK_INVALIDATION_LIMIT: usize = 16;

/// Bounded map from topic name to its current match result.
pub(crate) struct MatchCache<S> {
    entries: HashMap<Box<str>, Arc<Matches<S>>>,
    capacity: usize,
}

impl<S> MatchCache<S> {
    /// An empty cache holding at most `capacity` topics (0 disables caching).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity,
        }
    }

    /// The cached result for `topic`, if any. Allocation-free.
    pub(crate) fn get(&self, topic: &str) -> Option<&Arc<Matches<S>>> {
        self.entries.get(topic)
    }

    /// Caches `matches` for `topic` unless the topic is not cacheable, and
    /// returns the result to hand out: an entry already present wins (another
    /// reader computed it first), so every caller sees the same `Arc`.
    pub(crate) fn insert(&mut self, topic: &str, matches: Arc<Matches<S>>) -> Arc<Matches<S>> {
        if let Some(existing) = self.entries.get(topic) {
            return Arc::clone(existing);
        }
        if self.capacity == 0 || topic.len() > MAX_CACHED_TOPIC_LEN {
            return matches;
        }
        if self.entries.len() >= self.capacity {
            self.evict();
        }
        self.entries.insert(topic.into(), Arc::clone(&matches));
        matches
    }

    /// Drops an arbitrary `1 / EVICTION_DIVISOR` of the entries (at least one).
    fn evict(&mut self) {
        let mut to_evict = (self.entries.len() / EVICTION_DIVISOR).max(1);
        self.entries.retain(|_, _| {
            if to_evict == 0 {
                return true;
            }
            to_evict -= 1;
            false
        });
    }

    /// Forgets every cached topic that `filter` (non-shared form) matches.
    pub(crate) fn invalidate(&mut self, filter: &str) {
        self.entries
            .retain(|topic, _| !filter_matches(filter, topic));
    }

    /// Forgets every cached topic that any of `filters` matches, or
    /// everything if there are more than [`BULK_INVALIDATION_LIMIT`].
    pub(crate) fn invalidate_all_of<'a>(
        &mut self,
        filters: impl ExactSizeIterator<Item = &'a str> + Clone,
    ) {
        if filters.len() > BULK_INVALIDATION_LIMIT {
            self.entries.clear();
        } else {
            self.entries
                .retain(|topic, _| !filters.clone().any(|f| filter_matches(f, topic)));
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Arc<Matches<u32>> {
        Arc::new(Matches::default())
    }

    #[test]
    fn bounded_and_evicts_a_portion() {
        let mut cache = MatchCache::new(8);
        for i in 0..8 {
            cache.insert(&format!("t/{i}"), entry());
        }
        assert_eq!(cache.len(), 8);
        cache.insert("t/8", entry());
        assert_eq!(cache.len(), 8 - 8 / EVICTION_DIVISOR + 1);
        assert!(cache.get("t/8").is_some());
    }

    #[test]
    fn zero_capacity_and_long_topics_are_not_cached() {
        let mut cache = MatchCache::new(0);
        cache.insert("a", entry());
        assert_eq!(cache.len(), 0);
        let mut cache = MatchCache::new(4);
        cache.insert(&"x".repeat(MAX_CACHED_TOPIC_LEN + 1), entry());
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn first_insert_wins() {
        let mut cache = MatchCache::new(4);
        let first = cache.insert("a", entry());
        let second = cache.insert("a", entry());
        assert!(Arc::ptr_eq(&first, &second));
    }

    #[test]
    fn invalidation_is_selective() {
        let mut cache = MatchCache::new(16);
        for topic in ["a/b", "a/c", "b/c", "$SYS/a"] {
            cache.insert(topic, entry());
        }
        cache.invalidate("a/+");
        assert!(cache.get("a/b").is_none() && cache.get("a/c").is_none());
        assert!(cache.get("b/c").is_some() && cache.get("$SYS/a").is_some());
        cache.invalidate("#");
        assert_eq!(cache.len(), 1);
        cache.invalidate_all_of(["x", "$SYS/#"].into_iter());
        assert_eq!(cache.len(), 0);
    }
}
