//! Property tests: the trie-based `Router` and `RetainedStore` agree with a
//! naive model built on `filter_matches`, through random sequences of
//! subscribes, replaces, unsubscribes, subscriber removals and lookups.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use tern_router::{
    filter_matches, parse_shared, validate_filter, validate_topic_name, RetainedStore, Router,
    SubscribeOutcome, SubscriptionOptions,
};

/// A filter from a small alphabet, with `#` only ever as the last level.
fn filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![
        Just("a"),
        Just("b"),
        Just("c"),
        Just("$x"),
        Just(""),
        Just("+"),
        Just("#")
    ];
    prop::collection::vec(level, 1..5).prop_map(|levels| {
        let last = levels.len() - 1;
        levels
            .iter()
            .enumerate()
            .map(|(i, &l)| if l == "#" && i != last { "a" } else { l })
            .collect::<Vec<_>>()
            .join("/")
    })
}

/// A filter, shared (in group g or h) one time in three.
fn full_filter() -> impl Strategy<Value = String> {
    (
        filter(),
        prop_oneof![Just(None), Just(None), Just(Some("g")), Just(Some("h"))],
    )
        .prop_map(|(f, group)| match group {
            Some(g) => format!("$share/{g}/{f}"),
            None => f,
        })
}

fn topic() -> impl Strategy<Value = String> {
    let level = prop_oneof![Just("a"), Just("b"), Just("c"), Just("$x"), Just("")];
    prop::collection::vec(level, 1..5).prop_map(|levels| levels.join("/"))
}

#[derive(Debug, Clone)]
enum Op {
    Subscribe(u8, String, u8),
    Unsubscribe(u8, String),
    UnsubscribeExisting(usize),
    Remove(u8),
    Match(String),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4u8, full_filter(), 0..3u8).prop_map(|(s, f, q)| Op::Subscribe(s, f, q)),
        1 => (0..4u8, full_filter()).prop_map(|(s, f)| Op::Unsubscribe(s, f)),
        2 => any::<usize>().prop_map(Op::UnsubscribeExisting),
        1 => (0..4u8).prop_map(Op::Remove),
        4 => topic().prop_map(Op::Match),
    ]
}

/// (subscriber, full filter) -> options; each subscribe gets a fresh
/// subscription id so results can be traced back to subscriptions.
type Model = BTreeMap<(u8, String), SubscriptionOptions>;

type SharedKey = (String, String, BTreeSet<(u8, u32)>);

fn expected(model: &Model, topic: &str) -> (BTreeMap<u8, BTreeSet<u32>>, BTreeSet<SharedKey>) {
    let mut clients: BTreeMap<u8, BTreeSet<u32>> = BTreeMap::new();
    let mut groups: BTreeMap<(String, String), BTreeSet<(u8, u32)>> = BTreeMap::new();
    for ((s, f), o) in model {
        let id = o.subscription_id.unwrap_or(0);
        match parse_shared(f) {
            Some((g, inner)) if filter_matches(inner, topic) => {
                groups
                    .entry((g.to_string(), inner.to_string()))
                    .or_default()
                    .insert((*s, id));
            }
            Some(_) => {}
            None if filter_matches(f, topic) => {
                clients.entry(*s).or_default().insert(id);
            }
            None => {}
        }
    }
    let shared = groups.into_iter().map(|((g, f), m)| (g, f, m)).collect();
    (clients, shared)
}

fn actual(router: &Router<u8>, topic: &str) -> (BTreeMap<u8, BTreeSet<u32>>, BTreeSet<SharedKey>) {
    let m = router.matches(topic);
    let mut clients = BTreeMap::new();
    for c in &m.clients {
        assert!(!c.subscriptions.is_empty());
        let ids: BTreeSet<u32> = c
            .subscriptions
            .iter()
            .map(|o| o.subscription_id.unwrap_or(0))
            .collect();
        assert_eq!(
            ids.len(),
            c.subscriptions.len(),
            "duplicate subscription in a ClientMatch"
        );
        assert!(
            clients.insert(c.subscriber, ids).is_none(),
            "subscriber listed twice"
        );
    }
    let shared: BTreeSet<SharedKey> = m
        .shared
        .iter()
        .map(|g| {
            let members = g
                .members
                .iter()
                .map(|(s, o)| (*s, o.subscription_id.unwrap_or(0)))
                .collect();
            (g.group.to_string(), g.filter.to_string(), members)
        })
        .collect();
    assert_eq!(shared.len(), m.shared.len(), "shared group listed twice");
    (clients, shared)
}

fn check_counts(router: &Router<u8>, model: &Model) {
    assert_eq!(router.subscription_count(), model.len());
    let subscribers: BTreeSet<u8> = model.keys().map(|(s, _)| *s).collect();
    assert_eq!(router.subscriber_count(), subscribers.len());
    for s in 0..4u8 {
        let mine: Vec<(String, SubscriptionOptions)> = model
            .iter()
            .filter(|((owner, _), _)| *owner == s)
            .map(|((_, f), o)| (f.clone(), *o))
            .collect();
        assert_eq!(router.subscriptions_of(&s), mine);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn router_agrees_with_naive_matcher(ops in prop::collection::vec(op(), 1..80)) {
        // A tiny cache exercises eviction; the default one exercises invalidation.
        let routers = [Router::with_cache_capacity(3), Router::new()];
        let mut model = Model::new();
        let mut next_id = 1u32;
        for op in ops {
            match op {
                Op::Subscribe(s, f, qos) => {
                    let o = SubscriptionOptions { qos, subscription_id: Some(next_id), ..Default::default() };
                    next_id += 1;
                    let existed = model.contains_key(&(s, f.clone()));
                    for router in &routers {
                        let outcome = router.subscribe(&s, &f, o);
                        match validate_filter(&f) {
                            Ok(()) => prop_assert_eq!(outcome, Ok(if existed { SubscribeOutcome::Replaced } else { SubscribeOutcome::New })),
                            Err(e) => prop_assert_eq!(outcome, Err(e)),
                        }
                    }
                    if validate_filter(&f).is_ok() {
                        model.insert((s, f), o);
                    }
                }
                Op::Unsubscribe(s, f) => {
                    let existed = model.remove(&(s, f.clone())).is_some();
                    for router in &routers {
                        prop_assert_eq!(router.unsubscribe(&s, &f), existed);
                    }
                }
                Op::UnsubscribeExisting(i) => {
                    if let Some(key) = model.keys().nth(i % model.len().max(1)).cloned() {
                        model.remove(&key);
                        for router in &routers {
                            prop_assert!(router.unsubscribe(&key.0, &key.1));
                        }
                    }
                }
                Op::Remove(s) => {
                    let before = model.len();
                    model.retain(|(owner, _), _| *owner != s);
                    for router in &routers {
                        prop_assert_eq!(router.remove_subscriber(&s), before - model.len());
                    }
                }
                Op::Match(t) => {
                    if validate_topic_name(&t).is_ok() {
                        let want = expected(&model, &t);
                        for router in &routers {
                            // Twice: a miss, then (usually) a cache hit.
                            prop_assert_eq!(&actual(router, &t), &want);
                            prop_assert_eq!(&actual(router, &t), &want);
                        }
                    }
                }
            }
            for router in &routers {
                check_counts(router, &model);
            }
        }
        for router in &routers {
            for s in 0..4u8 {
                router.remove_subscriber(&s);
            }
            prop_assert_eq!(router.subscription_count(), 0);
            prop_assert_eq!(router.subscriber_count(), 0);
            prop_assert_eq!(router.node_count(), 0);
        }
    }

    #[test]
    fn filter_matches_is_total(f in filter(), t in topic()) {
        // Never panics, and '$' topics are never matched by a leading wildcard.
        let m = filter_matches(&f, &t);
        if t.starts_with('$') && (f.starts_with('+') || f.starts_with('#')) {
            prop_assert!(!m);
        }
    }

    #[test]
    fn validation_never_panics(s in ".{0,40}") {
        let _ = validate_filter(&s);
        let _ = validate_topic_name(&s);
        let _ = parse_shared(&s);
        let _ = filter_matches(&s, &s);
    }

    #[test]
    fn retained_agrees_with_naive_matcher(
        ops in prop::collection::vec((0..4u8, topic(), any::<u32>()), 1..60),
        filters in prop::collection::vec(filter(), 1..10),
    ) {
        let store = RetainedStore::new();
        let mut model: BTreeMap<String, u32> = BTreeMap::new();
        for (kind, t, v) in ops {
            if validate_topic_name(&t).is_err() {
                continue;
            }
            match kind {
                0 | 1 => prop_assert_eq!(store.insert(&t, v), model.insert(t.clone(), v)),
                2 => prop_assert_eq!(store.remove(&t), model.remove(&t)),
                _ => {
                    let before = model.len();
                    model.retain(|_, m| *m % 3 != 0);
                    prop_assert_eq!(store.retain(|_, m| *m % 3 != 0).len(), before - model.len());
                }
            }
            prop_assert_eq!(store.get(&t), model.get(&t).copied());
            prop_assert_eq!(store.len(), model.len());
        }
        for f in &filters {
            if validate_filter(f).is_err() {
                continue;
            }
            let mut got: Vec<(String, u32)> =
                store.matching(f).into_iter().map(|(t, m)| (t.to_string(), m)).collect();
            got.sort();
            let want: Vec<(String, u32)> = model
                .iter()
                .filter(|(t, _)| filter_matches(f, t))
                .map(|(t, m)| (t.clone(), *m))
                .collect();
            prop_assert_eq!(got, want, "filter {}", f);
        }
        prop_assert_eq!(store.retain(|_, _| false).len(), model.len());
        prop_assert!(store.is_empty());
        prop_assert_eq!(store.node_count(), 0);
    }
}
