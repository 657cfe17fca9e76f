//! What subscriptions and retained messages hold in memory, measured with a
//! global allocator that counts live bytes: a client that subscribes or
//! retains within the broker's limits makes it hold about what it sent, not
//! a thousand times that (levels.rs); and replacing a retained message,
//! counted in allocations, costs none.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::Mutex;

use tern_router::{subscription_cost, RetainedStore, Router, SubscriptionOptions};

struct Counting;

/// Bytes allocated and not yet freed, by every thread of this test binary.
static LIVE: AtomicIsize = AtomicIsize::new(0);

/// Allocations made (growing reallocations included), ever.
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

/// The tests run one at a time: the count is process-wide.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// How many filters or topics each test adds.
const COUNT: usize = 1_000;

/// Levels of each: the broker's default `max_topic_levels`.
const LEVELS: usize = 128;

/// A topic (or filter) of [`LEVELS`] levels whose first level is its own:
/// nothing of its path is shared with the others.
fn deep(i: usize) -> String {
    let mut topic = format!("k{i}");
    for _ in 1..LEVELS {
        topic.push_str("/a");
    }
    topic
}

/// Holds the count to this test alone, with the [`COUNT`] names to add,
/// made before the count starts.
fn one_at_a_time_with_deep_names() -> (std::sync::MutexGuard<'static, ()>, Vec<String>) {
    let one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    (one, (0..COUNT).map(deep).collect())
}

#[test]
fn a_deep_filter_costs_tens_of_bytes_a_level() {
    let (_one, filters) = one_at_a_time_with_deep_names();
    let router: Router<u32> = Router::new();
    let before = live();
    for filter in &filters {
        router
            .subscribe(&7, filter, SubscriptionOptions::default())
            .unwrap();
    }
    let held = (live() - before) as usize;
    // What the broker counts for them against the client's bound.
    let counted: usize = filters.iter().map(|f| subscription_cost(f)).sum();
    assert_eq!(router.subscription_cost_of(&7), counted);
    assert!(
        held <= counted,
        "{} bytes per filter of {LEVELS} levels (counted: {})",
        held / COUNT,
        counted / COUNT
    );
    assert!(router.unsubscribe(&7, &filters[0]));
    assert_eq!(
        router.subscription_cost_of(&7),
        counted - subscription_cost(&filters[0])
    );
    assert_eq!(router.remove_subscriber(&7), COUNT - 1);
    assert_eq!(router.subscription_cost_of(&7), 0);
    assert!(
        live() - before <= 4096,
        "{} bytes left after every subscription went",
        live() - before
    );
}

#[test]
fn a_retained_message_on_a_deep_topic_costs_tens_of_bytes_a_level() {
    let (_one, topics) = one_at_a_time_with_deep_names();
    let store: RetainedStore<u64> = RetainedStore::new();
    let before = live();
    for (i, topic) in topics.iter().enumerate() {
        store.insert(topic, i as u64);
    }
    let per_topic = (live() - before) as usize / COUNT;
    // What the broker counts for it against `max_retained_bytes`.
    let bound = RetainedStore::<u64>::entry_cost(&topics[0]);
    assert!(
        per_topic <= bound,
        "{per_topic} bytes per retained topic of {LEVELS} levels (at most {bound})"
    );
    let removed = store.retain(|_, _| false);
    assert_eq!(removed.len(), COUNT);
    drop(removed);
    assert!(
        live() - before <= 4096,
        "{} bytes left after every message went",
        live() - before
    );
}

/// Replacing a retained message allocates nothing, whether the levels of
/// its topic sit among few siblings (a slice) or many (a hash map): the
/// path is only looked up.
#[test]
fn replacing_a_retained_message_allocates_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let store = RetainedStore::<u64>::new();
    // `wide/*` has a hundred children: a hash map; `narrow/*` three.
    for i in 0..100 {
        store.insert(&format!("wide/{i}/leaf"), i);
    }
    for i in 0..3 {
        store.insert(&format!("narrow/{i}/leaf"), i);
    }
    for topic in ["wide/42/leaf", "narrow/1/leaf"] {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let replaced = store.insert(topic, 1000);
        let made = ALLOCATIONS.load(Ordering::Relaxed) - before;
        assert!(replaced.is_some(), "{topic} was there");
        assert_eq!(made, 0, "allocations replacing {topic}");
    }
    assert_eq!(store.get("wide/42/leaf"), Some(1000));
}
