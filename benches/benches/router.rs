//! Router matching: literal, `+` and `#` filters among 10k, 100k and 1M
//! subscriptions, cache hit and miss, and subscribe/unsubscribe churn; and
//! the retained store's lookups, what a SUBSCRIBE pays for the retained
//! messages its filter matches.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use tern_router::{RetainedStore, Router, SubscriptionOptions};

/// Subscribes `n` clients: most to literal device topics, some with `+` and `#`.
fn populated(n: usize) -> Router<u64> {
    let router = Router::new();
    let options = SubscriptionOptions::default();
    for i in 0..n as u64 {
        let filter = match i % 10 {
            0 => format!("site/{}/+/temp", i % 100),
            1 => format!("site/{}/#", i % 100),
            _ => format!("site/{}/dev{}/temp", i % 100, i),
        };
        router.subscribe(&i, &filter, options).unwrap();
    }
    router
}

fn matching(c: &mut Criterion) {
    let mut group = c.benchmark_group("match");
    for n in [10_000usize, 100_000, 1_000_000] {
        let router = populated(n);
        group.bench_with_input(BenchmarkId::new("cache_hit", n), &router, |b, r| {
            b.iter(|| black_box(r.matches(black_box("site/42/dev4242/temp"))))
        });
        let misses: Vec<String> = (0..4096)
            .map(|i| format!("site/{}/dev{}/temp", i % 100, i * 7919))
            .collect();
        let no_cache = Router::<u64>::with_cache_capacity(0);
        for (i, f) in (0..n as u64).zip(misses.iter().cycle()) {
            no_cache
                .subscribe(&i, f, SubscriptionOptions::default())
                .unwrap();
        }
        group.bench_with_input(BenchmarkId::new("uncached", n), &router, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % misses.len();
                black_box(no_cache.matches(&misses[i]))
            })
        });
    }
    group.finish();
}

fn churn(c: &mut Criterion) {
    let router = populated(100_000);
    c.bench_function("subscribe_unsubscribe_100k", |b| {
        let options = SubscriptionOptions::default();
        b.iter(|| {
            router
                .subscribe(&u64::MAX, "site/7/devX/temp", options)
                .unwrap();
            router.unsubscribe(&u64::MAX, "site/7/devX/temp")
        })
    });
}

/// `n` retained messages, one per device topic, each allocated on its own
/// as a broker's messages are (so that cloning a reference to each touches
/// as many cache lines as a SUBSCRIBE's lookup does).
fn retained_store(n: usize) -> RetainedStore<Arc<[u8]>> {
    let store = RetainedStore::new();
    for i in 0..n {
        let message: Arc<[u8]> = Arc::from(vec![7u8; 64]);
        store.insert(&format!("site/{}/dev{}/temp", i % 100, i), message);
    }
    store
}

/// A SUBSCRIBE's lookup: every match's reference cloned into a vector, as
/// `connection/subscribe.rs` collects them (reported per match for `#`).
fn retained(c: &mut Criterion) {
    let mut group = c.benchmark_group("retained");
    group.sample_size(20);
    for n in [10_000usize, 100_000] {
        let store = retained_store(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("hash_every_match", n), &store, |b, s| {
            // The references are dropped outside the timing, as the
            // broker drops them later, when each is delivered.
            b.iter_batched(
                Vec::new,
                |mut found: Vec<Arc<[u8]>>| {
                    s.for_each_matching_at_most("site/#", usize::MAX, |_, m| {
                        found.push(Arc::clone(m));
                    });
                    found
                },
                BatchSize::LargeInput,
            )
        });
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("plus_one_match", n), &store, |b, s| {
            b.iter(|| black_box(s.matching(black_box("site/+/dev4242/temp"))))
        });
        group.bench_with_input(BenchmarkId::new("get", n), &store, |b, s| {
            b.iter(|| black_box(s.get(black_box("site/42/dev4242/temp"))))
        });
    }
    group.finish();
}

criterion_group!(benches, matching, churn, retained);
criterion_main!(benches);
