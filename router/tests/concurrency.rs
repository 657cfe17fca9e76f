//! Concurrency smoke tests: several std threads subscribing, unsubscribing,
//! matching and retaining at once, with consistent final counts.

use std::sync::Arc;
use std::thread;

use tern_router::{RetainedStore, Router, SubscriptionOptions};

const THREADS: u32 = 4;
const ROUNDS: u32 = 300;

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn types_are_send_and_sync() {
    assert_send_sync::<Router<String>>();
    assert_send_sync::<RetainedStore<Vec<u8>>>();
    assert_send_sync::<tern_router::Matches<String>>();
    assert_send_sync::<tern_router::SharedGroup<String>>();
}

#[test]
fn concurrent_subscribe_unsubscribe_match() {
    let router: Arc<Router<u32>> = Arc::new(Router::with_cache_capacity(64));
    // A subscriber present throughout: every match of "t/…" must see it.
    router
        .subscribe(&1000, "t/#", SubscriptionOptions::default())
        .unwrap();
    let handles: Vec<_> = (0..THREADS)
        .map(|id| {
            let router = Arc::clone(&router);
            thread::spawn(move || {
                for round in 0..ROUNDS {
                    let filter = format!("t/{}/+", round % 7);
                    let shared = format!("$share/g{}/t/{}/#", round % 3, round % 5);
                    router
                        .subscribe(&id, &filter, SubscriptionOptions::with_qos(1))
                        .unwrap();
                    router
                        .subscribe(&id, &shared, SubscriptionOptions::default())
                        .unwrap();
                    let m = router.matches(&format!("t/{}/x", round % 7));
                    assert!(m.clients.iter().any(|c| c.subscriber == 1000));
                    assert!(m.clients.iter().any(|c| c.subscriber == id));
                    if let Some(group) = m.shared.first() {
                        let _ = group.pick(|_| true);
                    }
                    if round % 2 == 0 {
                        assert!(router.unsubscribe(&id, &filter));
                    }
                    if round % 50 == 49 {
                        router.remove_subscriber(&id);
                    }
                }
                // Leave exactly one known subscription per thread.
                router.remove_subscriber(&id);
                router
                    .subscribe(&id, &format!("final/{id}"), SubscriptionOptions::default())
                    .unwrap();
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("worker panicked");
    }
    assert_eq!(router.subscription_count(), THREADS as usize + 1);
    assert_eq!(router.subscriber_count(), THREADS as usize + 1);
    for id in 0..THREADS {
        let m = router.matches(&format!("final/{id}"));
        assert_eq!(m.clients.len(), 1);
        assert_eq!(m.clients[0].subscriber, id);
        assert!(router.matches(&format!("t/{id}/x")).shared.is_empty());
    }
    for id in 0..THREADS {
        assert_eq!(router.remove_subscriber(&id), 1);
    }
    assert_eq!(router.remove_subscriber(&1000), 1);
    assert_eq!(router.node_count(), 0);
}

#[test]
fn concurrent_retained_store() {
    let store: Arc<RetainedStore<u32>> = Arc::new(RetainedStore::new());
    let handles: Vec<_> = (0..THREADS)
        .map(|id| {
            let store = Arc::clone(&store);
            thread::spawn(move || {
                for round in 0..ROUNDS {
                    let topic = format!("r/{id}/{}", round % 10);
                    store.insert(&topic, round);
                    assert!(store.get(&topic).is_some());
                    let _ = store.matching("r/+/#");
                    if round % 3 == 0 {
                        store.remove(&topic);
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("worker panicked");
    }
    assert_eq!(store.matching("#").len(), store.len());
    assert_eq!(store.matching("r/#").len(), store.len());
    store.retain(|_, _| false);
    assert!(store.is_empty());
    assert_eq!(store.node_count(), 0);
}
