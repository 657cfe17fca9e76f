//! Tern's topic router: who receives a message published to a topic, and which
//! retained messages a new subscription must be sent.
//!
//! # What this crate owns
//!
//! * **Topic validation** ([`topic`]): the MQTT 5.0 rules for topic names,
//!   topic filters and shared filters `$share/{group}/{filter}`, plus
//!   [`filter_matches`], the reference matcher every structure here agrees with.
//! * **The subscription trie** ([`Router`]): one node per filter level, with
//!   dedicated `+` and `#` slots, holding each subscription at the node its
//!   filter ends at; and a per-subscriber index of that subscriber's filters.
//! * **The match cache**: topic -> `Arc<Matches>`, bounded, kept under the same
//!   lock as the trie and invalidated selectively (only the topics a changed
//!   filter matches), unless finding those topics would cost more than
//!   [`INVALIDATION_SCAN_BUDGET`], or scans since the last clear would add
//!   up to more than [`SCAN_UNITS_BETWEEN_CLEARS`]: then it is cleared, so
//!   no filter change, nor a packet of many, holds the lock long whatever
//!   the cached topics.
//! * **Shared subscription groups** ([`SharedGroup`]): immutable snapshots,
//!   rebuilt on membership change, with a round-robin cursor that survives
//!   rebuilds.
//! * **The retained store** ([`RetainedStore`]): last retained message per
//!   topic, in its own trie so wildcard lookups visit only matching branches.
//!
//! # Invariants
//!
//! * The trie, the per-subscriber index, the counters and the match cache
//!   always agree whenever the router's lock is released (details on
//!   [`Router`]); a cached result is never stale.
//! * Matching obeys MQTT 4.7 exactly, including the `$` rule: a filter whose
//!   first level is `+` or `#` never matches a topic starting with `$`, and
//!   this applies to the inner filter of shared subscriptions too.
//! * A subscriber appears at most once in [`Matches::clients`], with the
//!   options of every one of its matching subscriptions.
//! * No empty trie node outlives the removal that emptied it.
//! * `Router<S>` and `RetainedStore<M>` are `Send + Sync` when `S` / `M` are.
//!
//! # What it must never do
//!
//! * **No I/O, no async, no threads**: pure data structures behind
//!   `parking_lot` locks. The broker owns sessions, sockets and delivery.
//! * **Never allocate proportional to the subscriber count on a cached
//!   match**: a hit is a hash lookup and an `Arc` clone under a read lock.
//! * **Never scan the trie to remove a client**: [`Router::remove_subscriber`]
//!   costs O(that client's own subscriptions), through the index.
//! * **Never panic on client input**: every function accepts any `&str`;
//!   invalid input is a [`TopicError`], and all trie walks are iterative, so
//!   even a 65535-level filter cannot overflow the stack.
//!
//! # Example
//!
//! ```
//! use tern_router::{Router, SubscriptionOptions};
//!
//! let router: Router<&str> = Router::new();
//! router.subscribe(&"alice", "sport/#", SubscriptionOptions::with_qos(1)).unwrap();
//! router.subscribe(&"bob", "$share/workers/sport/+", SubscriptionOptions::default()).unwrap();
//!
//! let matches = router.matches("sport/tennis");
//! assert_eq!(matches.clients[0].subscriber, "alice");
//! let (worker, _options) = matches.shared[0].pick(|_| true).unwrap();
//! assert_eq!(*worker, "bob");
//! ```

mod cache;
mod levels;
mod matches;
mod options;
mod retained;
mod router;
mod shared;
pub mod topic;
mod tree;

pub use cache::{
    BULK_INVALIDATION_LIMIT, DEFAULT_CACHE_CAPACITY, EVICTION_DIVISOR, INVALIDATION_SCAN_BUDGET,
    MAX_CACHED_TOPIC_LEN, SCAN_BYTES_PER_UNIT, SCAN_UNITS_BETWEEN_CLEARS,
};
pub use matches::{ClientMatch, Matches};
pub use options::SubscriptionOptions;
pub use retained::RetainedStore;
pub use router::{subscription_cost, RecentMatch, Router, SubscribeOutcome};
pub use shared::SharedGroup;
pub use topic::{
    filter_covers, filter_matches, parse_shared, topic_levels, validate_filter,
    validate_topic_name, TopicError, MAX_TOPIC_LEN, SHARE_PREFIX,
};
