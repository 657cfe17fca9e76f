//! What subscriptions and retained messages hold in memory, measured with a
//! global allocator that counts live bytes: a client that subscribes or
//! retains within the broker's limits makes it hold about what it sent, not
//! a thousand times that (levels.rs); and replacing a retained message,
//! counted in allocations, costs none.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use tern_router::{subscription_cost, RetainedStore, Router, SubscriptionOptions};

/// Counts what the thread that allocates asks for, in that thread's own
/// counters: the test harness allocates on its threads while a test runs
/// (reporting a result, starting the next test), and those must not show
/// up in the test's figures. Everything a test measures is allocated and
/// freed on its own thread: the router does no I/O and starts no threads.
struct Counting;

thread_local! {
    /// Bytes this thread allocated and has not yet freed.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// Allocations this thread made (growing reallocations included), ever.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

/// Adds to this thread's counters; nothing once they are torn down.
fn count(allocations: usize, bytes: isize) {
    let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + allocations));
    let _ = LIVE.try_with(|l| l.set(l.get() + bytes));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(1, layout.size() as isize);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(0, -(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let grew = usize::from(new_size > layout.size());
        count(grew, new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes this thread holds.
fn live() -> isize {
    LIVE.with(Cell::get)
}

/// Allocations this thread has made.
fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
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

/// The [`COUNT`] names to add, made before the count starts.
fn deep_names() -> Vec<String> {
    (0..COUNT).map(deep).collect()
}

#[test]
fn a_deep_filter_costs_tens_of_bytes_a_level() {
    let filters = deep_names();
    let router: Router<u32> = Router::new();
    let before = live();
    for filter in &filters {
        router
            .subscribe(&7, filter, SubscriptionOptions::default())
            .unwrap();
    }
    let held = (live() - before) as usize;
    assert!(held >= COUNT * LEVELS, "the count sees the router's nodes");
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
    let topics = deep_names();
    let store: RetainedStore<u64> = RetainedStore::new();
    let before = live();
    for (i, topic) in topics.iter().enumerate() {
        store.insert(topic, i as u64);
    }
    let per_topic = (live() - before) as usize / COUNT;
    assert!(per_topic >= LEVELS, "the count sees the store's nodes");
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
    let store = RetainedStore::<u64>::new();
    // `wide/*` has a hundred children: a hash map; `narrow/*` three.
    for i in 0..100 {
        store.insert(&format!("wide/{i}/leaf"), i);
    }
    for i in 0..3 {
        store.insert(&format!("narrow/{i}/leaf"), i);
    }
    for topic in ["wide/42/leaf", "narrow/1/leaf"] {
        let before = allocations();
        let replaced = store.insert(topic, 1000);
        let made = allocations() - before;
        assert!(replaced.is_some(), "{topic} was there");
        assert_eq!(made, 0, "allocations replacing {topic}");
    }
    assert_eq!(store.get("wide/42/leaf"), Some(1000));
    // A topic not there yet does allocate: the count sees the store.
    let before = allocations();
    assert!(store.insert("wide/new/leaf", 1).is_none());
    assert!(allocations() > before, "a new topic's nodes were counted");
}
