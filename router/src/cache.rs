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
//! * A subscription change invalidates the cached topics its filter matches,
//!   and its cost under the write lock is bounded whatever the filter and
//!   whatever the cached topics:
//!   - a filter without wildcards matches only the topic equal to it: one
//!     hash removal, no scan;
//!   - a filter with a literal level longer than [`MAX_CACHED_TOPIC_LEN`]
//!     can match no cached topic: nothing to do;
//!   - a wildcard filter scans the cache with [`filter_matches`] only if an
//!     upper bound of that scan's work, kept up to date from running totals
//!     of the cached topics' levels and bytes, is within
//!     [`INVALIDATION_SCAN_BUDGET`]; otherwise the whole cache is cleared,
//!     which is always correct (a missing entry is recomputed on the next
//!     miss) and O(1) under the lock: the entries are freed after it is
//!     released.
//!
//!   So one filter change (or one `remove_subscriber`, whose at most
//!   [`BULK_INVALIDATION_LIMIT`] filters share one budget) does at most
//!   `INVALIDATION_SCAN_BUDGET` units of work under the write lock (about
//!   0.35 ms measured at the limit), or clears the cache in O(1) and frees
//!   its entries after the lock is released ([`Detached`]). A client can no
//!   longer make a SUBSCRIBE cost (cached topics) x (topic levels) by first
//!   filling the cache with deep topics: 4,096 topics of 500 levels made each
//!   deep wildcard filter a 26-39 ms scan under the write lock, stalling
//!   every publisher that long; the same filter now clears the cache, and a
//!   concurrent publisher's match waited at most 54 us. Clearing is no more
//!   than any client can already cause by subscribing to `#`.
//!
//! The map keeps std's randomly seeded SipHash: topics come from clients, and
//! a predictable hasher would let one client degrade every lookup.

use std::collections::HashMap;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::matches::Matches;
use crate::topic::filter_matches;

/// Default number of cached topics. Large enough to hold the hot set of a
/// typical broker; small enough that an invalidation scan of typical topics
/// (one `filter_matches` per entry, under the write lock) stays around a
/// hundred microseconds, and a clear about as much.
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

/// Most work units one invalidation (one filter change, or one
/// [`Router::remove_subscriber`](crate::Router::remove_subscriber)) may spend
/// scanning the cache under the write lock; beyond it the cache is cleared.
///
/// A unit is one (filter level, topic level) pair that [`filter_matches`]
/// may compare, plus one per cached topic visited, plus one per
/// [`SCAN_BYTES_PER_UNIT`] bytes of topic and filter it may read. Measured
/// (release build, 2-core machine, shared): a level costs 10-18 ns (deeper
/// topics are dearer: more cache misses), an entry about 30 ns, a 1 KiB
/// topic level 100-400 ns (memory-bound). The costliest scan within the
/// budget (4,096 topics of 6 levels, a 6-level filter that matches none:
/// about 30,400 units) took 0.29-0.42 ms. A full default cache of typical
/// topics (4,096 x `site/N/devM/temp`: about 22,700 units for a 4-level
/// filter) is still scanned selectively; deep or long cached topics (the
/// attack: 4,096 x 500 levels, over 2 million units) make a wildcard filter
/// clear the cache instead.
pub const INVALIDATION_SCAN_BUDGET: usize = 32_768;

/// Most work units scans may spend in all between two clears of the cache;
/// the scan that would go beyond clears it instead.
///
/// [`INVALIDATION_SCAN_BUDGET`] bounds one invalidation, but a SUBSCRIBE of
/// 10,000 wildcard filters is 10,000 invalidations: with a full cache of
/// topics none of them matches, each scanned it all again, and one packet
/// held the write lock for 10,000 x 0.35 ms in turns (measured: every
/// other client's deliveries stalled 1.1 s). A clear costs the publishers
/// at most one trie match per topic they publish to next, about what one
/// scan of the whole cache costs; once scans since the last clear add up to
/// a few whole scans, clearing is the cheaper answer. So however many
/// filters a packet carries, it scans at most this much between clears
/// (about 1.4 ms), and a cache that publishers refill is scanned afresh.
pub const SCAN_UNITS_BETWEEN_CLEARS: usize = 4 * INVALIDATION_SCAN_BUDGET;

/// Bytes of topic or filter that count as one work unit of a scan (see
/// [`INVALIDATION_SCAN_BUDGET`]): reading 64 bytes to find the next `/`
/// costs at most about what comparing one short level does.
pub const SCAN_BYTES_PER_UNIT: usize = 64;

/// Number of levels of a topic name or filter (one more than its `/`s).
fn level_count(s: &str) -> usize {
    s.bytes().filter(|&b| b == b'/').count() + 1
}

/// How an invalidation must treat one filter.
enum FilterKind {
    /// No wildcard: matches exactly the topic equal to it.
    Literal,
    /// A literal level longer than any cached topic: matches no cached topic.
    Unmatchable,
    /// Has a `+` or `#` level: needs a scan (of this many levels).
    Wildcard(usize),
}

fn classify(filter: &str) -> FilterKind {
    let mut levels = 0;
    let mut wildcard = false;
    for level in filter.split('/') {
        levels += 1;
        if level == "+" || level == "#" {
            wildcard = true;
        } else if level.len() > MAX_CACHED_TOPIC_LEN {
            return FilterKind::Unmatchable;
        }
    }
    if wildcard {
        FilterKind::Wildcard(levels)
    } else {
        FilterKind::Literal
    }
}

/// One cached result, with its topic's level count (for the running total).
struct Entry<S> {
    matches: Arc<Matches<S>>,
    levels: usize,
}

/// Entries a clear took out of the cache under the write lock, for the
/// caller to drop after releasing it: freeing a full cache (4,096 topic
/// strings and match results) took about 0.7 ms measured, which then no
/// longer stalls other clients. Dropping it under the lock is still correct.
#[must_use = "drop it after releasing the router's lock"]
pub(crate) struct Detached<S> {
    _entries: HashMap<Box<str>, Entry<S>>,
}

/// What invalidations did, for tests: proof that the work stays bounded.
#[cfg(test)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidationStats {
    /// Literal filters handled by one hash removal.
    pub(crate) keyed: usize,
    /// Scans of the cache.
    pub(crate) scans: usize,
    /// Clears of a non-empty cache (bulk or over budget).
    pub(crate) clears: usize,
    /// Largest number of (filter level, topic level) pairs one scan could
    /// have compared, counted per entry actually visited.
    pub(crate) max_scan_levels: usize,
}

/// Bounded map from topic name to its current match result.
pub(crate) struct MatchCache<S> {
    entries: HashMap<Box<str>, Entry<S>>,
    capacity: usize,
    /// Sum of the level counts of the cached topics.
    levels: usize,
    /// Sum of the lengths in bytes of the cached topics.
    bytes: usize,
    /// Work units scans spent since the last clear (see
    /// [`SCAN_UNITS_BETWEEN_CLEARS`]).
    scanned_since_clear: usize,
    #[cfg(test)]
    pub(crate) stats: InvalidationStats,
}

impl<S> MatchCache<S> {
    /// An empty cache holding at most `capacity` topics (0 disables caching).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity,
            levels: 0,
            bytes: 0,
            scanned_since_clear: 0,
            #[cfg(test)]
            stats: InvalidationStats::default(),
        }
    }

    /// The cached result for `topic`, if any. Allocation-free.
    pub(crate) fn get(&self, topic: &str) -> Option<&Arc<Matches<S>>> {
        self.entries.get(topic).map(|entry| &entry.matches)
    }

    /// Caches `matches` for `topic` unless the topic is not cacheable, and
    /// returns the result to hand out: an entry already present wins (another
    /// reader computed it first), so every caller sees the same `Arc`.
    pub(crate) fn insert(&mut self, topic: &str, matches: Arc<Matches<S>>) -> Arc<Matches<S>> {
        if let Some(existing) = self.entries.get(topic) {
            return Arc::clone(&existing.matches);
        }
        if self.capacity == 0 || topic.len() > MAX_CACHED_TOPIC_LEN {
            return matches;
        }
        if self.entries.len() >= self.capacity {
            self.evict();
        }
        let levels = level_count(topic);
        self.levels += levels;
        self.bytes += topic.len();
        let entry = Entry {
            matches: Arc::clone(&matches),
            levels,
        };
        self.entries.insert(topic.into(), entry);
        matches
    }

    /// Drops an arbitrary `1 / EVICTION_DIVISOR` of the entries (at least one).
    fn evict(&mut self) {
        let mut to_evict = (self.entries.len() / EVICTION_DIVISOR).max(1);
        let (mut levels, mut bytes) = (0, 0);
        self.entries.retain(|topic, entry| {
            if to_evict == 0 {
                return true;
            }
            to_evict -= 1;
            levels += entry.levels;
            bytes += topic.len();
            false
        });
        self.levels -= levels;
        self.bytes -= bytes;
    }

    /// Forgets everything in O(1): the entries are handed back to be freed
    /// outside the lock.
    fn clear(&mut self) -> Detached<S> {
        #[cfg(test)]
        if !self.entries.is_empty() {
            self.stats.clears += 1;
        }
        self.levels = 0;
        self.bytes = 0;
        self.scanned_since_clear = 0;
        Detached {
            _entries: std::mem::take(&mut self.entries),
        }
    }

    /// Nothing to free.
    fn nothing() -> Detached<S> {
        Detached {
            _entries: HashMap::new(),
        }
    }

    /// Forgets `topic` if cached.
    fn remove(&mut self, topic: &str) {
        if let Some(entry) = self.entries.remove(topic) {
            self.levels -= entry.levels;
            self.bytes -= topic.len();
        }
    }

    /// Upper bound, in units of [`INVALIDATION_SCAN_BUDGET`], of the work of
    /// matching a filter of `filter_levels` levels and `filter_len` bytes
    /// against every cached topic. `filter_matches` compares at most
    /// `min(topic levels, filter levels) + 1` pairs of levels, and reads at
    /// most the whole topic and the whole filter.
    fn scan_cost(&self, filter_levels: usize, filter_len: usize) -> usize {
        let n = self.entries.len();
        let pairs = self.levels.min(n.saturating_mul(filter_levels));
        let bytes = self.bytes.saturating_add(n.saturating_mul(filter_len));
        pairs
            .saturating_add(n)
            .saturating_add(bytes / SCAN_BYTES_PER_UNIT)
    }

    /// Forgets every cached topic that `filter` (non-shared form) matches,
    /// or everything if finding them would cost more than
    /// [`INVALIDATION_SCAN_BUDGET`]. What a clear took out is returned, to be
    /// dropped once the lock is released.
    pub(crate) fn invalidate(&mut self, filter: &str) -> Detached<S> {
        self.invalidate_all_of(std::iter::once(filter))
    }

    /// Forgets every cached topic that any of `filters` matches, or
    /// everything if there are more than [`BULK_INVALIDATION_LIMIT`] or if
    /// finding those topics would cost more than [`INVALIDATION_SCAN_BUDGET`]
    /// in all. What a clear took out is returned, to be dropped once the lock
    /// is released.
    pub(crate) fn invalidate_all_of<'a>(
        &mut self,
        filters: impl ExactSizeIterator<Item = &'a str>,
    ) -> Detached<S> {
        if self.entries.is_empty() {
            return Self::nothing();
        }
        if filters.len() > BULK_INVALIDATION_LIMIT {
            return self.clear();
        }
        let mut wildcards: SmallVec<[(&str, usize); BULK_INVALIDATION_LIMIT]> = SmallVec::new();
        let mut cost = 0usize;
        for filter in filters {
            match classify(filter) {
                FilterKind::Literal => {
                    #[cfg(test)]
                    {
                        self.stats.keyed += 1;
                    }
                    self.remove(filter);
                }
                FilterKind::Unmatchable => {}
                FilterKind::Wildcard(levels) => {
                    cost = cost.saturating_add(self.scan_cost(levels, filter.len()));
                    wildcards.push((filter, levels));
                }
            }
        }
        if wildcards.is_empty() {
            return Self::nothing();
        }
        if cost > INVALIDATION_SCAN_BUDGET
            || self.scanned_since_clear.saturating_add(cost) > SCAN_UNITS_BETWEEN_CLEARS
        {
            return self.clear();
        }
        self.scanned_since_clear += cost;
        #[cfg(test)]
        let mut scanned_levels = 0;
        let (mut levels, mut bytes) = (0, 0);
        self.entries.retain(|topic, entry| {
            #[cfg(test)]
            {
                scanned_levels += wildcards
                    .iter()
                    .map(|&(_, f)| entry.levels.min(f) + 1)
                    .sum::<usize>();
            }
            let stale = wildcards.iter().any(|&(f, _)| filter_matches(f, topic));
            if stale {
                levels += entry.levels;
                bytes += topic.len();
            }
            !stale
        });
        self.levels -= levels;
        self.bytes -= bytes;
        #[cfg(test)]
        {
            self.stats.scans += 1;
            self.stats.max_scan_levels = self.stats.max_scan_levels.max(scanned_levels);
        }
        Self::nothing()
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Every cached topic with its result. For tests.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &Arc<Matches<S>>)> {
        self.entries.iter().map(|(t, e)| (&**t, &e.matches))
    }

    /// Checks the running totals against the entries. For tests.
    #[cfg(test)]
    pub(crate) fn assert_totals(&self) {
        let levels: usize = self.entries.keys().map(|t| level_count(t)).sum();
        let bytes: usize = self.entries.keys().map(|t| t.len()).sum();
        assert_eq!((self.levels, self.bytes), (levels, bytes));
        assert!(self.entries.iter().all(|(t, e)| e.levels == level_count(t)));
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn entry() -> Arc<Matches<u32>> {
        Arc::new(Matches::default())
    }

    /// `topic` with `extra` more levels `/d` appended.
    fn deep(topic: &str, extra: usize) -> String {
        let mut deep = topic.to_string();
        for _ in 0..extra {
            deep.push_str("/d");
        }
        deep
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
        cache.assert_totals();
    }

    #[test]
    fn zero_capacity_and_long_topics_are_not_cached() {
        let mut cache = MatchCache::new(0);
        cache.insert("a", entry());
        assert_eq!(cache.len(), 0);
        let mut cache = MatchCache::new(4);
        cache.insert(&"x".repeat(MAX_CACHED_TOPIC_LEN + 1), entry());
        assert_eq!(cache.len(), 0);
        cache.assert_totals();
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
        drop(cache.invalidate("a/+"));
        assert!(cache.get("a/b").is_none() && cache.get("a/c").is_none());
        assert!(cache.get("b/c").is_some() && cache.get("$SYS/a").is_some());
        drop(cache.invalidate("#"));
        assert_eq!(cache.len(), 1);
        drop(cache.invalidate_all_of(["x", "$SYS/#"].into_iter()));
        assert_eq!(cache.len(), 0);
        assert_eq!(cache.stats.clears, 0);
        cache.assert_totals();
    }

    #[test]
    fn literal_and_unmatchable_filters_never_scan() {
        let mut cache = MatchCache::new(16);
        for topic in ["a/b", "a/b/c", "$SYS/a", "a//b"] {
            cache.insert(topic, entry());
        }
        drop(cache.invalidate("a/b"));
        drop(cache.invalidate("$SYS/a"));
        drop(cache.invalidate("a/b/c/d"));
        assert_eq!(cache.stats.keyed, 3);
        assert!(cache.get("a/b").is_none() && cache.get("$SYS/a").is_none());
        assert!(cache.get("a/b/c").is_some() && cache.get("a//b").is_some());
        // A literal level longer than any cacheable topic: nothing to do.
        let long = format!("+/{}/#", "x".repeat(MAX_CACHED_TOPIC_LEN + 1));
        drop(cache.invalidate(&long));
        assert_eq!(cache.len(), 2);
        assert_eq!((cache.stats.scans, cache.stats.clears), (0, 0));
        cache.assert_totals();
    }

    #[test]
    fn many_scans_that_find_nothing_end_in_a_clear() {
        // A SUBSCRIBE of many wildcard filters matching no cached topic:
        // each is one invalidation within the budget, but together they
        // scan at most SCAN_UNITS_BETWEEN_CLEARS before the cache is
        // cleared, and an empty cache costs nothing to invalidate.
        let mut cache = MatchCache::new(DEFAULT_CACHE_CAPACITY);
        for i in 0..DEFAULT_CACHE_CAPACITY {
            cache.insert(&format!("warm/{i}/x/y"), entry());
        }
        let one = cache.scan_cost(3, "w/+/0".len());
        assert!(one <= INVALIDATION_SCAN_BUDGET);
        for i in 0..10_000 {
            drop(cache.invalidate(&format!("w/+/{i}")));
        }
        assert_eq!(cache.stats.clears, 1);
        assert_eq!(cache.stats.scans, SCAN_UNITS_BETWEEN_CLEARS / one);
        assert!(cache.stats.scans * one <= SCAN_UNITS_BETWEEN_CLEARS);
        assert_eq!(cache.len(), 0);
        cache.assert_totals();
    }

    #[test]
    fn a_full_cache_of_typical_topics_is_still_scanned_selectively() {
        let mut cache = MatchCache::new(DEFAULT_CACHE_CAPACITY);
        for i in 0..DEFAULT_CACHE_CAPACITY {
            cache.insert(&format!("site/{}/dev{i}/temp", i % 100), entry());
        }
        for filter in ["site/+/dev7/temp", "site/3/#", "+/+/+/+/+/nomatch"] {
            drop(cache.invalidate(filter));
        }
        assert_eq!(cache.stats.scans, 3);
        assert_eq!(cache.stats.clears, 0);
        assert!(cache.stats.max_scan_levels <= INVALIDATION_SCAN_BUDGET);
        assert!(cache.get("site/7/dev7/temp").is_none());
        assert!(cache.get("site/3/dev103/temp").is_none());
        assert_eq!(cache.len(), DEFAULT_CACHE_CAPACITY - 1 - 41);
        cache.assert_totals();
    }

    /// The reported attack: a full cache of 500-level topics, then deep
    /// wildcard filters. The first clears the cache instead of scanning
    /// 2 million levels; the others find it empty.
    #[test]
    fn a_deep_filter_against_a_full_cache_of_deep_topics_clears_instead_of_scanning() {
        let mut cache = MatchCache::new(DEFAULT_CACHE_CAPACITY);
        for i in 0..DEFAULT_CACHE_CAPACITY {
            cache.insert(&deep(&format!("t{i}"), 499), entry());
        }
        assert_eq!(cache.len(), DEFAULT_CACHE_CAPACITY);
        let filter = format!("{}/nomatch/x", vec!["+"; 498].join("/"));
        for _ in 0..200 {
            drop(cache.invalidate(&filter));
        }
        assert_eq!(cache.len(), 0);
        assert_eq!(cache.stats.clears, 1);
        assert_eq!(cache.stats.scans, 0);
        assert_eq!(cache.stats.max_scan_levels, 0);
        cache.assert_totals();
        // Removing many filters at once shares one budget too.
        for i in 0..DEFAULT_CACHE_CAPACITY {
            cache.insert(&deep(&format!("t{i}"), 20), entry());
        }
        let filters: Vec<String> = (0..BULK_INVALIDATION_LIMIT)
            .map(|i| format!("+/{i}/+/+/+/+/+/+"))
            .collect();
        drop(cache.invalidate_all_of(filters.iter().map(|f| f.as_str())));
        assert_eq!((cache.stats.clears, cache.stats.scans), (2, 0));
    }

    fn level() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just("a"), Just("b"), Just("$x"), Just("")]
    }

    /// A topic of 1 to 4 short levels, made deep (hundreds of levels) more
    /// often than not, so that the scan budget is exceeded in some cases and
    /// not in others.
    fn topic() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(level(), 1..5),
            prop_oneof![2 => Just(0usize), 3 => 200..500usize],
        )
            .prop_map(|(levels, extra)| deep(&levels.join("/"), extra))
    }

    /// A filter of literal, `+` and `#` levels, sometimes deep too.
    fn filter() -> impl Strategy<Value = String> {
        let level = prop_oneof![level(), Just("+"), Just("+"), Just("d")];
        (
            prop::collection::vec(level, 1..5),
            prop_oneof![Just(0usize), Just(0), 1..500usize],
            any::<bool>(),
        )
            .prop_map(|(levels, extra, hash)| {
                let mut filter = levels.join("/");
                for _ in 0..extra {
                    filter.push_str("/+");
                }
                if hash {
                    filter.push_str("/#");
                }
                filter
            })
    }

    proptest! {
        /// Whatever the cached topics and filters: no topic a filter matches
        /// survives its invalidation, a scan keeps every other topic, and no
        /// scan visits more than the budget.
        #[test]
        fn invalidation_is_complete_and_bounded(
            topics in prop::collection::vec(topic(), 0..200),
            filters in prop::collection::vec(filter(), 1..4),
        ) {
            let mut cache = MatchCache::new(150);
            for topic in &topics {
                cache.insert(topic, entry());
            }
            let before: Vec<String> = cache.iter().map(|(t, _)| t.to_string()).collect();
            let (scans, clears) = (cache.stats.scans, cache.stats.clears);
            drop(cache.invalidate_all_of(filters.iter().map(|f| f.as_str())));
            cache.assert_totals();
            prop_assert!(cache.stats.max_scan_levels <= INVALIDATION_SCAN_BUDGET);
            let cleared = cache.stats.clears > clears;
            prop_assert!(!(cleared && cache.stats.scans > scans));
            for topic in &before {
                let stale = filters.iter().any(|f| filter_matches(f, topic));
                let kept = cache.get(topic).is_some();
                prop_assert!(!(stale && kept), "{topic} kept after {filters:?}");
                if !cleared {
                    prop_assert_eq!(kept, !stale, "{} dropped needlessly", topic);
                }
            }
        }
    }
}
