//! [`Router`]: the subscription trie, the per-subscriber index and the match
//! cache, all behind one `parking_lot::RwLock`.
//!
//! Reads (`matches` hits, `subscriptions_of`, counts) share the read lock.
//! A cache miss computes its result under the read lock, then briefly takes
//! the write lock to cache it (the NATS sublist pattern); a generation
//! counter stops it caching a result that a concurrent change made stale.
//!
//! Every change bounds what it does to the cache under the write lock: a
//! literal filter removes one entry, a wildcard filter scans the cache only
//! within [`INVALIDATION_SCAN_BUDGET`](crate::INVALIDATION_SCAN_BUDGET) units
//! of work (about 0.35 ms), and all scans between two clears within
//! [`SCAN_UNITS_BETWEEN_CLEARS`](crate::SCAN_UNITS_BETWEEN_CLEARS), else
//! clears it in O(1) and frees the old entries after releasing the lock. So
//! no SUBSCRIBE, UNSUBSCRIBE or disconnect, however many filters it
//! carries, stalls other clients' matches for long, whatever topics
//! clients have made the cache hold.
//!
//! A publisher that keeps publishing to one topic need not take the lock at
//! all: [`Router::matches_recent`] keeps the last result in the caller's
//! [`RecentMatch`] and reuses it while the generation, readable without the
//! lock, has not moved. (Even a shared read lock is one atomic write to one
//! cache line that every publishing thread fights over: on 8 worker threads
//! and 500 publishers it was the largest item of the broker's profile.)

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::cache::{MatchCache, DEFAULT_CACHE_CAPACITY, MAX_CACHED_TOPIC_LEN};
use crate::matches::Matches;
use crate::options::SubscriptionOptions;
use crate::topic::{parse_shared, validate_filter, TopicError};
use crate::tree::Tree;

/// Whether [`Router::subscribe`] created a subscription or replaced the
/// options of an existing one (same subscriber, same filter string).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeOutcome {
    /// The subscriber had no subscription with this filter.
    New,
    /// The subscriber already had this filter; its options were replaced.
    Replaced,
}

/// Topic router: who is subscribed to what, and who receives a given topic.
///
/// `S` identifies a subscriber (typically a client id or a session handle);
/// it is cloned into the trie, so it should be cheap to clone.
///
/// # Invariants
///
/// The write lock must be held for any change to the trie, the index, the
/// counters or the cache, and every change keeps these true when it releases
/// the lock:
///
/// 1. **Index = trie.** `(subscriber, filter)` is in the per-subscriber
///    index iff the trie holds it (at the node of the filter, or of its inner
///    filter in the named group for `$share/...`), with the same options.
/// 2. `subscriptions` equals the number of `(subscriber, filter)` pairs in
///    the index, and no subscriber maps to an empty set of filters; each
///    subscriber's `cost` is the sum of [`subscription_cost`] over its
///    filters.
/// 3. **Cache = trie.** Every cached result equals what the trie would
///    compute now: a change invalidates every cached topic that its filter
///    matches (or the whole cache, when finding them would cost more than
///    the scan budget) before releasing the lock, and bumps `generation` so
///    that a result computed under an earlier read lock is not cached
///    afterwards.
/// 4. No trie node other than the root is empty.
pub struct Router<S> {
    state: RwLock<State<S>>,
    /// Copy of the cache's capacity, readable without the lock, so that an
    /// uncacheable miss never takes the write lock.
    cache_capacity: usize,
    /// Copy of `State::generation`, readable without the lock; stored (with
    /// the write lock held) by every change that bumps it.
    generation: AtomicU64,
}

/// The last match result a publisher used, for [`Router::matches_recent`].
pub struct RecentMatch<S> {
    topic: Box<str>,
    generation: u64,
    matches: Arc<Matches<S>>,
}

impl<S> RecentMatch<S> {
    /// The topic this is the result for.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

/// Everything guarded by the router's lock.
struct State<S> {
    tree: Tree<S>,
    /// Subscriber -> (full filter as given, including `$share/...`) -> options.
    /// Lets `remove_subscriber` visit only that subscriber's filters.
    index: HashMap<S, Filters>,
    /// Total subscriptions, shared ones included.
    subscriptions: usize,
    cache: MatchCache<S>,
    /// Bumped by every change to the trie.
    generation: u64,
}

/// One subscriber's entry in the index.
#[derive(Default)]
struct Filters {
    /// Full filter as given -> options.
    options: HashMap<Box<str>, SubscriptionOptions>,
    /// The sum of [`subscription_cost`] over `options`' filters.
    cost: usize,
}

/// What a subscription to `filter` (as given, `$share/...` included) costs
/// the router in memory, at most: its entry in the subscriber's index (the
/// filter's text and options), its place among the subscribers of its
/// filter's node, and a node for each level of the filter in the trie, as
/// if no other filter shared one (levels.rs; router/tests/memory.rs checks
/// it). A bound on the sum over a client's subscriptions
/// ([`Router::subscription_cost_of`]) bounds what the client can make the
/// router hold, however deep its filters.
pub fn subscription_cost(filter: &str) -> usize {
    let levels = trie_filter(filter).split('/').count();
    filter.len() + SUBSCRIPTION_OVERHEAD + levels * SUBSCRIPTION_LEVEL_COST
}

/// [`subscription_cost`] of a level: a node of the subscription trie and
/// its key. A level of a chain is one allocation of some 56 bytes and its
/// key's; a child among more than `levels::FEW` sits in a hash map's
/// bucket, at worst just after the map grew to twice what it needs, some
/// 110.
const SUBSCRIPTION_LEVEL_COST: usize = 112;

/// [`subscription_cost`] beside the filter's text and levels: its index
/// entry, its node's box of subscriptions and an entry there, with the
/// buckets a hash map may hold spare.
const SUBSCRIPTION_OVERHEAD: usize = 256;

/// The filter that goes into the trie: the inner filter of a shared one.
fn trie_filter(filter: &str) -> &str {
    parse_shared(filter).map_or(filter, |(_, inner)| inner)
}

impl<S: Clone + Eq + Hash + Send + Sync + 'static> Router<S> {
    /// An empty router with a cache of [`DEFAULT_CACHE_CAPACITY`] topics.
    pub fn new() -> Self {
        Self::with_cache_capacity(DEFAULT_CACHE_CAPACITY)
    }

    /// An empty router caching the results of at most `capacity` topics
    /// (0 disables the cache).
    pub fn with_cache_capacity(capacity: usize) -> Self {
        Self {
            state: RwLock::new(State {
                tree: Tree::new(),
                index: HashMap::new(),
                subscriptions: 0,
                cache: MatchCache::new(capacity),
                generation: 0,
            }),
            cache_capacity: capacity,
            generation: AtomicU64::new(0),
        }
    }

    /// Adds or replaces (same subscriber + same filter string => replace
    /// options) a subscription.
    ///
    /// `filter` may be a shared filter `$share/{group}/{filter}`; it is
    /// validated with [`validate_filter`]. Invalidates the cached topics the
    /// filter matches, and only those, unless finding them would cost more
    /// than [`INVALIDATION_SCAN_BUDGET`](crate::INVALIDATION_SCAN_BUDGET):
    /// then the whole cache is cleared (see the module doc of the cache).
    pub fn subscribe(
        &self,
        subscriber: &S,
        filter: &str,
        options: SubscriptionOptions,
    ) -> Result<SubscribeOutcome, TopicError> {
        validate_filter(filter)?;
        let mut guard = self.state.write();
        let state = &mut *guard;
        let (replaced, inner) = match parse_shared(filter) {
            Some((group, inner)) => (
                state.tree.insert_shared(group, inner, subscriber, options),
                inner,
            ),
            None => (
                state.tree.insert(filter, subscriber, options).is_some(),
                filter,
            ),
        };
        let filters = match state.index.get_mut(subscriber) {
            Some(filters) => filters,
            None => state.index.entry(subscriber.clone()).or_default(),
        };
        if filters.options.insert(filter.into(), options).is_none() {
            filters.cost += subscription_cost(filter);
        }
        if !replaced {
            state.subscriptions += 1;
        }
        let detached = state.cache.invalidate(inner);
        self.bump(state);
        drop(guard);
        drop(detached);
        Ok(if replaced {
            SubscribeOutcome::Replaced
        } else {
            SubscribeOutcome::New
        })
    }

    /// Removes the subscription of `subscriber` to exactly `filter` (as given
    /// to `subscribe`). Returns whether it existed.
    pub fn unsubscribe(&self, subscriber: &S, filter: &str) -> bool {
        let mut guard = self.state.write();
        let state = &mut *guard;
        let Some(filters) = state.index.get_mut(subscriber) else {
            return false;
        };
        if filters.options.remove(filter).is_none() {
            return false;
        }
        filters.cost -= subscription_cost(filter);
        if filters.options.is_empty() {
            state.index.remove(subscriber);
        }
        state.subscriptions -= 1;
        let inner = match parse_shared(filter) {
            Some((group, inner)) => {
                state.tree.remove_shared(group, inner, subscriber);
                inner
            }
            None => {
                state.tree.remove(filter, subscriber);
                filter
            }
        };
        let detached = state.cache.invalidate(inner);
        self.bump(state);
        drop(guard);
        drop(detached);
        true
    }

    /// Removes every subscription of `subscriber`; returns how many there were.
    ///
    /// Costs O(its own subscriptions): it walks that subscriber's entry in
    /// the index, never the whole trie. (Leaving a shared group also rebuilds
    /// that group's snapshot, O(group members).)
    pub fn remove_subscriber(&self, subscriber: &S) -> usize {
        let mut guard = self.state.write();
        let state = &mut *guard;
        let Some(Filters {
            options: filters, ..
        }) = state.index.remove(subscriber)
        else {
            return 0;
        };
        for filter in filters.keys() {
            match parse_shared(filter) {
                Some((group, inner)) => state.tree.remove_shared(group, inner, subscriber),
                None => state.tree.remove(filter, subscriber),
            };
        }
        state.subscriptions -= filters.len();
        let detached = state
            .cache
            .invalidate_all_of(filters.keys().map(|filter| trie_filter(filter)));
        self.bump(state);
        drop(guard);
        drop(detached);
        filters.len()
    }

    /// How many subscriptions `subscriber` holds.
    pub fn subscription_count_of(&self, subscriber: &S) -> usize {
        self.state
            .read()
            .index
            .get(subscriber)
            .map_or(0, |filters| filters.options.len())
    }

    /// What the subscriptions of `subscriber` cost the router in memory,
    /// at most: the sum of their [`subscription_cost`].
    pub fn subscription_cost_of(&self, subscriber: &S) -> usize {
        self.state
            .read()
            .index
            .get(subscriber)
            .map_or(0, |filters| filters.cost)
    }

    /// Whether `subscriber` holds a subscription to exactly `filter` (as
    /// given to `subscribe`).
    pub fn is_subscribed(&self, subscriber: &S, filter: &str) -> bool {
        self.state
            .read()
            .index
            .get(subscriber)
            .is_some_and(|filters| filters.options.contains_key(filter))
    }

    /// The subscriptions of `subscriber`: filters exactly as given (including
    /// `$share/...`), sorted by filter.
    pub fn subscriptions_of(&self, subscriber: &S) -> Vec<(String, SubscriptionOptions)> {
        let state = self.state.read();
        let mut subscriptions: Vec<_> = state
            .index
            .get(subscriber)
            .into_iter()
            .flat_map(|filters| &filters.options)
            .map(|(filter, options)| (filter.to_string(), *options))
            .collect();
        subscriptions.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        subscriptions
    }

    /// The subscribers whose filters match `topic` (a valid topic name).
    ///
    /// Returns a shared immutable snapshot. A cache hit is a hash lookup plus
    /// an `Arc` clone under the read lock and allocates nothing.
    pub fn matches(&self, topic: &str) -> Arc<Matches<S>> {
        self.matches_at(topic).0
    }

    /// The subscribers of `topic`, like [`matches`](Self::matches), reusing
    /// `recent` when it holds the result for the same topic and no
    /// subscription has changed since: then no lock is taken and nothing is
    /// shared with other threads but one read of the generation. Otherwise
    /// `recent` is replaced by the result for `topic`.
    pub fn matches_recent<'a>(
        &self,
        topic: &str,
        recent: &'a mut Option<RecentMatch<S>>,
    ) -> &'a Arc<Matches<S>> {
        let now = self.generation.load(Ordering::Acquire);
        let fresh = matches!(recent, Some(r) if r.generation == now && *r.topic == *topic);
        if !fresh {
            *recent = None;
        }
        let recent = recent.get_or_insert_with(|| {
            let (matches, generation) = self.matches_at(topic);
            RecentMatch {
                topic: topic.into(),
                generation,
                matches,
            }
        });
        &recent.matches
    }

    /// [`matches`](Self::matches), with the generation the result is valid at.
    fn matches_at(&self, topic: &str) -> (Arc<Matches<S>>, u64) {
        let (computed, generation) = {
            let state = self.state.read();
            if let Some(hit) = state.cache.get(topic) {
                return (Arc::clone(hit), state.generation);
            }
            (Arc::new(state.tree.matches(topic)), state.generation)
        };
        (self.cache_if_fresh(topic, computed, generation), generation)
    }

    /// Records a change to the trie (write lock held).
    fn bump(&self, state: &mut State<S>) {
        state.generation = state.generation.wrapping_add(1);
        self.generation.store(state.generation, Ordering::Release);
    }

    /// Second half of a cache miss: caches `computed` (made under the read
    /// lock at `generation`) unless the trie has changed since, and returns
    /// what to hand out.
    fn cache_if_fresh(
        &self,
        topic: &str,
        computed: Arc<Matches<S>>,
        generation: u64,
    ) -> Arc<Matches<S>> {
        if self.cache_capacity == 0 || topic.len() > MAX_CACHED_TOPIC_LEN {
            return computed;
        }
        let mut state = self.state.write();
        if state.generation != generation {
            // The trie changed since we computed: the result was correct when
            // computed (so fine to return), but must not be cached.
            return computed;
        }
        state.cache.insert(topic, computed)
    }

    /// Total number of subscriptions, shared ones included.
    pub fn subscription_count(&self) -> usize {
        self.state.read().subscriptions
    }

    /// Number of distinct subscribers with at least one subscription.
    pub fn subscriber_count(&self) -> usize {
        self.state.read().index.len()
    }

    /// Number of trie nodes, root excluded; 0 when there are no subscriptions.
    /// For tests: walks the whole trie.
    #[doc(hidden)]
    pub fn node_count(&self) -> usize {
        self.state.read().tree.node_count()
    }

    /// Number of cached topics. For tests.
    #[doc(hidden)]
    pub fn cached_topics(&self) -> usize {
        self.state.read().cache.len()
    }
}

impl<S: Clone + Eq + Hash + Send + Sync + 'static> Default for Router<S> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;
    use crate::cache::INVALIDATION_SCAN_BUDGET;
    use crate::topic::filter_matches;

    fn opts(qos: u8, id: u32) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            subscription_id: Some(id),
            ..Default::default()
        }
    }

    #[test]
    fn send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Router<String>>();
        assert_send_sync::<Arc<Matches<String>>>();
    }

    #[test]
    fn index_and_counts() {
        let router = Router::new();
        assert_eq!(
            router.subscribe(&1u32, "a/b", opts(0, 1)),
            Ok(SubscribeOutcome::New)
        );
        assert_eq!(
            router.subscribe(&1, "a/b", opts(1, 2)),
            Ok(SubscribeOutcome::Replaced)
        );
        assert_eq!(
            router.subscribe(&1, "$share/g/a/b", opts(2, 3)),
            Ok(SubscribeOutcome::New)
        );
        assert_eq!(
            router.subscribe(&1, "$share/g/a/b", opts(1, 4)),
            Ok(SubscribeOutcome::Replaced)
        );
        assert_eq!(router.subscription_count(), 2);
        assert_eq!(router.subscriber_count(), 1);
        assert_eq!(
            router.subscriptions_of(&1),
            vec![
                ("$share/g/a/b".to_string(), opts(1, 4)),
                ("a/b".to_string(), opts(1, 2)),
            ]
        );
        assert_eq!(
            router.subscribe(&1, "a/#/b", opts(0, 0)),
            Err(TopicError::InvalidMultiLevelWildcard)
        );
        assert!(!router.unsubscribe(&1, "a/#/b"));
        assert!(!router.unsubscribe(&2, "a/b"));
        assert!(router.unsubscribe(&1, "$share/g/a/b"));
        assert!(!router.unsubscribe(&1, "$share/g/a/b"));
        assert_eq!(router.remove_subscriber(&1), 1);
        assert_eq!(router.remove_subscriber(&1), 0);
        assert_eq!(router.subscription_count(), 0);
        assert_eq!(router.subscriber_count(), 0);
        assert_eq!(router.node_count(), 0);
    }

    #[test]
    fn stale_results_are_not_cached() {
        let router = Router::new();
        router.subscribe(&1u32, "a", opts(0, 1)).unwrap();
        // A reader computes under the read lock...
        let (computed, generation) = {
            let state = router.state.read();
            (Arc::new(state.tree.matches("a")), state.generation)
        };
        // ...a writer changes the trie before the reader takes the write lock...
        router.subscribe(&2, "a", opts(0, 2)).unwrap();
        // ...so the reader's (now stale) result is returned but not cached.
        let returned = router.cache_if_fresh("a", computed, generation);
        assert_eq!(returned.clients.len(), 1);
        assert_eq!(router.cached_topics(), 0);
        assert_eq!(router.matches("a").clients.len(), 2);
        assert_eq!(router.cached_topics(), 1);
    }

    fn subscribers(m: &Matches<u32>) -> Vec<u32> {
        let mut v: Vec<u32> = m.clients.iter().map(|c| c.subscriber).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn a_recent_match_is_reused_until_a_subscription_changes() {
        let router = Router::new();
        router.subscribe(&1u32, "a/+", opts(0, 1)).unwrap();
        let mut recent = None;
        let first = Arc::clone(router.matches_recent("a/b", &mut recent));
        assert_eq!(subscribers(&first), vec![1]);
        // Same topic, nothing changed: the very same result, no new lookup.
        assert!(Arc::ptr_eq(
            router.matches_recent("a/b", &mut recent),
            &first
        ));
        // Another topic replaces it.
        assert!(router.matches_recent("a/c", &mut recent).clients.len() == 1);
        assert_eq!(
            subscribers(router.matches_recent("a/b", &mut recent)),
            vec![1]
        );
        // Any change, even to a filter that does not match, makes it stale:
        // new subscribers are seen at once...
        router.subscribe(&2, "a/b", opts(0, 2)).unwrap();
        assert_eq!(
            subscribers(router.matches_recent("a/b", &mut recent)),
            vec![1, 2]
        );
        router.subscribe(&3, "z", opts(0, 3)).unwrap();
        let again = Arc::clone(router.matches_recent("a/b", &mut recent));
        assert_eq!(subscribers(&again), vec![1, 2]);
        // ...and departed ones are gone at once.
        assert!(router.unsubscribe(&1, "a/+"));
        assert_eq!(
            subscribers(router.matches_recent("a/b", &mut recent)),
            vec![2]
        );
        assert_eq!(router.remove_subscriber(&2), 1);
        assert!(router.matches_recent("a/b", &mut recent).clients.is_empty());
    }

    /// A match set in a comparable form: subscriber -> options of its
    /// matching subscriptions, and (group, filter, members) per shared group.
    type Normal = (
        BTreeMap<u32, BTreeSet<(u8, Option<u32>)>>,
        BTreeSet<(String, String, BTreeSet<(u32, Option<u32>)>)>,
    );

    fn normal(m: &Matches<u32>) -> Normal {
        let clients = m
            .clients
            .iter()
            .map(|c| {
                let options = c
                    .subscriptions
                    .iter()
                    .map(|o| (o.qos, o.subscription_id))
                    .collect();
                (c.subscriber, options)
            })
            .collect();
        let shared = m
            .shared
            .iter()
            .map(|g| {
                let members = g
                    .members
                    .iter()
                    .map(|(s, o)| (*s, o.subscription_id))
                    .collect();
                (g.group.to_string(), g.filter.to_string(), members)
            })
            .collect();
        (clients, shared)
    }

    /// Invariant 3: every cached result is what the trie computes now.
    fn assert_cache_fresh(router: &Router<u32>) {
        let state = router.state.read();
        state.cache.assert_totals();
        for (topic, cached) in state.cache.iter() {
            assert_eq!(
                normal(cached),
                normal(&state.tree.matches(topic)),
                "stale cached result for {topic:?}"
            );
        }
    }

    /// Caches `topics`, then checks each one's result after `change`:
    /// equal to the trie's, and listing `subscriber` iff `expect` says so.
    fn check_after(
        router: &Router<u32>,
        topics: &[String],
        change: impl FnOnce(),
        expect: impl Fn(&str) -> bool,
        subscriber: u32,
    ) {
        for topic in topics {
            router.matches(topic);
        }
        change();
        assert_cache_fresh(router);
        for topic in topics {
            let got = router.matches(topic);
            let truth = router.state.read().tree.matches(topic);
            assert_eq!(normal(&got), normal(&truth), "{topic:?}");
            let listed = got.clients.iter().any(|c| c.subscriber == subscriber)
                || got.shared.iter().any(|g| g.contains(&subscriber));
            assert_eq!(listed, expect(topic), "{topic:?}");
        }
    }

    /// Subscribe, replace, unsubscribe and remove a subscriber, with filters
    /// of every kind, each after caching every topic: no cached result is
    /// stale afterwards. `depth` extra levels on some topics decide whether
    /// wildcard filters are invalidated by scanning or by clearing.
    fn every_filter_kind_keeps_the_cache_fresh(extra: usize) -> InvalidationCounts {
        let router = Router::new();
        router.subscribe(&100, "a/#", opts(1, 100)).unwrap();
        router.subscribe(&101, "+/b", opts(0, 101)).unwrap();
        router
            .subscribe(&102, "$share/g/a/+", opts(0, 102))
            .unwrap();
        let mut topics: Vec<String> = [
            "a", "a/b", "a/b/c", "a/c", "b/b", "$SYS/a", "$SYS/a/b", "/", "a//b", "/b",
        ]
        .iter()
        .map(|t| t.to_string())
        .collect();
        let mut deep = "a/b".to_string();
        for _ in 0..extra {
            deep.push_str("/d");
        }
        // Enough deep topics to push the cost of a deep wildcard filter's
        // scan over the budget when `extra` is large.
        topics.extend((0..128).map(|i| format!("{deep}/{i}")));
        let mut filters: Vec<String> = [
            "a/b",
            "$SYS/a",
            "/",
            "a//b",
            "+",
            "+/b",
            "a/+",
            "+/+/+",
            "#",
            "a/#",
            "$SYS/#",
            "+/#",
            "a/b/d/#",
            "$share/g/a/+",
            "$share/h/#",
            "$share/h/$SYS/a",
        ]
        .iter()
        .map(|f| f.to_string())
        .collect();
        // Deep filters of each kind, matching the deep topics.
        filters.push(format!("{deep}/5"));
        filters.push(format!("a/b{}/+", "/+".repeat(extra)));
        filters.push(format!("+/+{}/#", "/d".repeat(extra)));
        filters.push(format!("$share/g/+/b{}/7", "/+".repeat(extra)));
        for (i, filter) in filters.iter().enumerate() {
            let id = i as u32;
            let inner = trie_filter(filter);
            let matches = |t: &str| filter_matches(inner, t);
            let subscribe = || {
                router.subscribe(&id, filter, opts(0, id)).unwrap();
            };
            check_after(&router, &topics, subscribe, matches, id);
            let replace = || {
                router.subscribe(&id, filter, opts(2, id + 1000)).unwrap();
            };
            check_after(&router, &topics, replace, matches, id);
            let unsubscribe = || assert!(router.unsubscribe(&id, filter));
            check_after(&router, &topics, unsubscribe, |_| false, id);
            router.subscribe(&id, filter, opts(1, id)).unwrap();
        }
        // Removing a subscriber with several filters (under the bulk limit).
        let remove = || assert_eq!(router.remove_subscriber(&100), 1);
        check_after(&router, &topics, remove, |_| false, 100);
        for extra_filter in ["x/+", "a/b/c", "$share/g/+/c"] {
            router.subscribe(&101, extra_filter, opts(0, 7)).unwrap();
        }
        let remove = || assert_eq!(router.remove_subscriber(&101), 4);
        check_after(&router, &topics, remove, |_| false, 101);
        let stats = router.state.read().cache.stats;
        assert!(stats.max_scan_levels <= INVALIDATION_SCAN_BUDGET);
        InvalidationCounts {
            keyed: stats.keyed,
            scans: stats.scans,
            clears: stats.clears,
        }
    }

    #[derive(Debug)]
    struct InvalidationCounts {
        keyed: usize,
        scans: usize,
        clears: usize,
    }

    #[test]
    fn every_filter_kind_keeps_the_cache_fresh_by_scanning() {
        let counts = every_filter_kind_keeps_the_cache_fresh(0);
        assert!(counts.keyed > 0 && counts.scans > 0, "{counts:?}");
        assert_eq!(counts.clears, 0);
    }

    #[test]
    fn every_filter_kind_keeps_the_cache_fresh_by_clearing() {
        // 128 topics of 500 levels: 64,000 cached levels, over budget for
        // the deep wildcard filters.
        let counts = every_filter_kind_keeps_the_cache_fresh(497);
        assert!(counts.keyed > 0 && counts.clears > 0, "{counts:?}");
    }

    /// The reported attack through the public API: a full cache of
    /// 500-level topics, then a SUBSCRIBE of 200 deep wildcard filters. The
    /// first clears the cache, the others find it empty: no scan at all.
    #[test]
    fn deep_filters_against_a_full_cache_of_deep_topics_do_not_scan() {
        let router = Router::new();
        router.subscribe(&1u32, "t7/#", opts(0, 1)).unwrap();
        let tail = "/a".repeat(499);
        for i in 0..DEFAULT_CACHE_CAPACITY {
            router.matches(&format!("t{i}{tail}"));
        }
        assert_eq!(router.cached_topics(), DEFAULT_CACHE_CAPACITY);
        let deep_filter = format!("{}/nomatch/x", vec!["+"; 498].join("/"));
        for i in 0..200 {
            let filter = format!("{deep_filter}{i}");
            router.subscribe(&2, &filter, opts(0, 2)).unwrap();
        }
        let stats = router.state.read().cache.stats;
        assert_eq!(
            (stats.clears, stats.scans, stats.max_scan_levels),
            (1, 0, 0)
        );
        assert_eq!(router.cached_topics(), 0);
        assert_eq!(subscribers(&router.matches(&format!("t7{tail}"))), vec![1]);
        assert_cache_fresh(&router);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Subscribe(u32, String),
        Unsubscribe(u32, String),
        UnsubscribeExisting(u32, usize),
        Remove(u32),
        Match(String),
    }

    fn level() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just("a"), Just("b"), Just("$x"), Just("")]
    }

    /// Short topics, and deep ones (hundreds of levels) that make some
    /// invalidations exceed the scan budget.
    fn topic() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(level(), 1..4),
            prop_oneof![2 => Just(0usize), 1 => 300..500usize],
        )
            .prop_map(|(levels, extra)| {
                let mut topic = levels.join("/");
                for _ in 0..extra {
                    topic.push_str("/a");
                }
                topic
            })
    }

    /// Literal, `+` and `#` filters, shared one time in four, some deep.
    fn filter() -> impl Strategy<Value = String> {
        let level = prop_oneof![level(), Just("+")];
        (
            prop::collection::vec(level, 1..4),
            prop_oneof![3 => Just(0usize), 1 => 300..500usize],
            any::<bool>(),
            prop_oneof![3 => Just(false), 1 => Just(true)],
        )
            .prop_map(|(levels, extra, hash, shared)| {
                let mut filter = levels.join("/");
                for _ in 0..extra {
                    filter.push_str("/+");
                }
                if hash {
                    filter.push_str("/#");
                }
                if shared {
                    filter = format!("$share/g/{filter}");
                }
                filter
            })
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..4u32, filter()).prop_map(|(s, f)| Op::Subscribe(s, f)),
            1 => (0..4u32, filter()).prop_map(|(s, f)| Op::Unsubscribe(s, f)),
            2 => (0..4u32, any::<usize>()).prop_map(|(s, i)| Op::UnsubscribeExisting(s, i)),
            1 => (0..4u32).prop_map(Op::Remove),
            4 => topic().prop_map(Op::Match),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Through random subscribes, replaces, unsubscribes, removals and
        /// matches over short and deep topics, every cached result stays
        /// equal to the trie's, and no invalidation scans over budget.
        #[test]
        fn the_cache_never_holds_a_stale_result(
            fill in prop_oneof![Just(0usize), Just(100)],
            ops in prop::collection::vec(op(), 1..60),
        ) {
            let router = Router::with_cache_capacity(128);
            // Sometimes 100 cached topics of 400 levels first, so that deep
            // filters exceed the scan budget (and later inserts evict).
            let tail = "/a".repeat(399);
            for i in 0..fill {
                router.matches(&format!("{}{tail}", ["a", "b", "$x", ""][i % 4]));
                router.matches(&format!("f{i}{tail}"));
            }
            let mut seen: Vec<String> = Vec::new();
            for op in ops {
                match op {
                    Op::Subscribe(s, f) => {
                        let result = router.subscribe(&s, &f, opts(s as u8 % 3, s));
                        prop_assert_eq!(result.is_ok(), validate_filter(&f).is_ok());
                    }
                    Op::Unsubscribe(s, f) => {
                        router.unsubscribe(&s, &f);
                    }
                    Op::UnsubscribeExisting(s, i) => {
                        let mine = router.subscriptions_of(&s);
                        if !mine.is_empty() {
                            prop_assert!(router.unsubscribe(&s, &mine[i % mine.len()].0));
                        }
                    }
                    Op::Remove(s) => {
                        router.remove_subscriber(&s);
                    }
                    Op::Match(t) => {
                        let got = router.matches(&t);
                        let truth = router.state.read().tree.matches(&t);
                        prop_assert_eq!(normal(&got), normal(&truth));
                        seen.push(t);
                    }
                }
                assert_cache_fresh(&router);
                let stats = router.state.read().cache.stats;
                prop_assert!(stats.max_scan_levels <= INVALIDATION_SCAN_BUDGET);
            }
            for t in &seen {
                let truth = router.state.read().tree.matches(t);
                prop_assert_eq!(normal(&router.matches(t)), normal(&truth));
            }
        }
    }
}
