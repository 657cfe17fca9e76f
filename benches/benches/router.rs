//! Router matching: literal, `+` and `#` filters among 10k, 100k and 1M
//! subscriptions, cache hit and miss, and subscribe/unsubscribe churn.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tern_router::{Router, SubscriptionOptions};

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

criterion_group!(benches, matching, churn);
criterion_main!(benches);
