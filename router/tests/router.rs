//! Behavioural tests of `Router` through its public API: MQTT matching cases,
//! per-subscriber aggregation, shared groups, removal and the match cache.

use std::collections::BTreeSet;
use std::sync::Arc;

use tern_router::{Matches, Router, SubscribeOutcome, SubscriptionOptions, TopicError};

fn opts(qos: u8, id: u32) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        subscription_id: Some(id),
        ..Default::default()
    }
}

fn clients(m: &Matches<&'static str>) -> BTreeSet<&'static str> {
    m.clients.iter().map(|c| c.subscriber).collect()
}

#[test]
fn spec_matching_cases() {
    let cases: &[(&str, &str, bool)] = &[
        ("sport/#", "sport", true),
        (
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon",
            true,
        ),
        ("+/+", "/finance", true),
        ("/+", "/finance", true),
        ("+", "/finance", false),
        ("#", "$SYS/x", false),
        ("$SYS/#", "$SYS/x", true),
        ("+/monitor/Clients", "$SYS/monitor/Clients", false),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
        ("sport/tennis/+", "sport/tennis/player1/ranking", false),
        ("sport/+", "sport", false),
        ("sport/+", "sport/", true),
    ];
    for &(filter, topic, expected) in cases {
        let router = Router::new();
        router.subscribe(&"c", filter, opts(0, 1)).unwrap();
        assert_eq!(
            !router.matches(topic).is_empty(),
            expected,
            "{filter} vs {topic}"
        );
        // The same through a shared subscription's inner filter.
        let shared = Router::new();
        shared
            .subscribe(&"c", &format!("$share/g/{filter}"), opts(0, 1))
            .unwrap();
        let m = shared.matches(topic);
        assert!(m.clients.is_empty());
        assert_eq!(
            m.shared.len(),
            usize::from(expected),
            "$share/g/{filter} vs {topic}"
        );
    }
}

#[test]
fn invalid_filters_are_rejected_and_store_nothing() {
    let router = Router::new();
    for filter in [
        "",
        "sport/tennis#",
        "sport+",
        "a/#/b",
        "$share//x",
        "$share/g",
        "$share/g+/x",
    ] {
        assert!(
            router.subscribe(&"c", filter, opts(0, 1)).is_err(),
            "{filter:?}"
        );
    }
    assert_eq!(
        router.subscribe(&"c", "a\0", opts(0, 1)),
        Err(TopicError::NullCharacter)
    );
    assert_eq!(router.subscription_count(), 0);
    assert_eq!(router.node_count(), 0);
}

#[test]
fn overlapping_subscriptions_aggregate_per_client() {
    let router = Router::new();
    router.subscribe(&"a", "sport/#", opts(0, 1)).unwrap();
    router.subscribe(&"a", "sport/+", opts(2, 2)).unwrap();
    router.subscribe(&"a", "other", opts(1, 3)).unwrap();
    router.subscribe(&"b", "sport/tennis", opts(1, 4)).unwrap();
    let m = router.matches("sport/tennis");
    assert_eq!(m.clients.len(), 2);
    let a = m.clients.iter().find(|c| c.subscriber == "a").unwrap();
    let mut ids: Vec<_> = a.subscription_ids().collect();
    ids.sort_unstable();
    assert_eq!(ids, [1, 2]);
    assert_eq!(a.max_qos(), 2);
    let b = m.clients.iter().find(|c| c.subscriber == "b").unwrap();
    assert_eq!(b.subscriptions.as_slice(), [opts(1, 4)]);
}

#[test]
fn replace_keeps_one_subscription() {
    let router = Router::new();
    assert_eq!(
        router.subscribe(&"a", "x/+", opts(0, 1)),
        Ok(SubscribeOutcome::New)
    );
    assert_eq!(
        router.subscribe(&"a", "x/+", opts(2, 9)),
        Ok(SubscribeOutcome::Replaced)
    );
    assert_eq!(router.subscription_count(), 1);
    let m = router.matches("x/y");
    assert_eq!(m.clients[0].subscriptions.as_slice(), [opts(2, 9)]);
}

#[test]
fn shared_group_round_robin() {
    let router = Router::new();
    router
        .subscribe(&"a", "$share/g/jobs/+", opts(1, 1))
        .unwrap();
    router
        .subscribe(&"b", "$share/g/jobs/+", opts(1, 2))
        .unwrap();
    router
        .subscribe(&"c", "$share/h/jobs/#", opts(0, 3))
        .unwrap();
    let m = router.matches("jobs/1");
    assert_eq!(m.shared.len(), 2);
    let g = m.shared.iter().find(|g| &*g.group == "g").unwrap();
    assert_eq!(&*g.filter, "jobs/+");
    let picks: Vec<_> = (0..4).map(|_| g.pick(|_| true).unwrap().0).collect();
    assert_eq!(picks, ["a", "b", "a", "b"]);
    // Ineligible members are skipped.
    assert_eq!(g.pick(|s| *s != "a").unwrap().0, "b");
    assert_eq!(g.pick(|s| *s != "a").unwrap().0, "b");
    assert!(g.pick(|_| false).is_none());
    let h = m.shared.iter().find(|g| &*g.group == "h").unwrap();
    assert_eq!(h.members, [("c", opts(0, 3))]);
}

#[test]
fn leaving_a_group_does_not_reset_the_cursor() {
    let router = Router::new();
    for s in ["a", "b", "c"] {
        router.subscribe(&s, "$share/g/t", opts(0, 0)).unwrap();
    }
    let before = router.matches("t");
    assert_eq!(before.shared[0].pick(|_| true).unwrap().0, "a");
    assert_eq!(before.shared[0].pick(|_| true).unwrap().0, "b");
    assert!(router.unsubscribe(&"a", "$share/g/t"));
    let after = router.matches("t");
    assert!(!Arc::ptr_eq(&before, &after));
    // Members are now [b, c]; the rotation continues with c, not back at b.
    assert_eq!(after.shared[0].members.len(), 2);
    assert_eq!(after.shared[0].pick(|_| true).unwrap().0, "c");
    assert_eq!(after.shared[0].pick(|_| true).unwrap().0, "b");
    // The old snapshot handed out earlier is unchanged.
    assert_eq!(before.shared[0].members.len(), 3);
    // Joining keeps the rotation too: members [b, c, d], next is c.
    router.subscribe(&"d", "$share/g/t", opts(0, 0)).unwrap();
    let joined = router.matches("t");
    assert_eq!(joined.shared[0].pick(|_| true).unwrap().0, "c");
    assert_eq!(joined.shared[0].pick(|_| true).unwrap().0, "d");
    assert_eq!(joined.shared[0].pick(|_| true).unwrap().0, "b");
}

#[test]
fn remove_subscriber_removes_all_and_only_its_subscriptions() {
    let router = Router::new();
    let a_filters = ["a/b", "a/+", "#", "$share/g/a/b", "$share/h/#", "x/y/z"];
    for (i, f) in a_filters.iter().enumerate() {
        router.subscribe(&"a", f, opts(0, i as u32)).unwrap();
    }
    router.subscribe(&"b", "a/b", opts(1, 10)).unwrap();
    router.subscribe(&"b", "$share/g/a/b", opts(1, 11)).unwrap();
    assert_eq!(router.subscription_count(), 8);
    assert_eq!(router.subscriber_count(), 2);

    assert_eq!(router.remove_subscriber(&"a"), a_filters.len());
    assert_eq!(router.subscription_count(), 2);
    assert_eq!(router.subscriber_count(), 1);
    assert!(router.subscriptions_of(&"a").is_empty());
    assert_eq!(router.subscriptions_of(&"b").len(), 2);
    let m = router.matches("a/b");
    assert_eq!(clients(&m), BTreeSet::from(["b"]));
    assert_eq!(m.shared.len(), 1);
    assert_eq!(m.shared[0].members, [("b", opts(1, 11))]);
    assert!(router.matches("x/y/z").is_empty());
    // Only "a/b" remains in the trie: two nodes.
    assert_eq!(router.node_count(), 2);

    assert_eq!(router.remove_subscriber(&"b"), 2);
    assert_eq!(router.subscription_count(), 0);
    assert_eq!(router.subscriber_count(), 0);
    assert_eq!(router.node_count(), 0);
    assert!(router.matches("a/b").is_empty());
}

#[test]
fn cached_match_is_shared_and_invalidated_selectively() {
    let router = Router::new();
    router.subscribe(&"a", "sport/+", opts(0, 1)).unwrap();
    let first = router.matches("sport/tennis");
    let second = router.matches("sport/tennis");
    assert!(Arc::ptr_eq(&first, &second));

    // Unrelated filter: the cached entry survives.
    router.subscribe(&"b", "news/#", opts(0, 2)).unwrap();
    assert!(Arc::ptr_eq(&first, &router.matches("sport/tennis")));

    // A filter matching the topic: invalidated, and the new result sees it.
    router.subscribe(&"b", "sport/#", opts(0, 3)).unwrap();
    let third = router.matches("sport/tennis");
    assert!(!Arc::ptr_eq(&first, &third));
    assert_eq!(clients(&third), BTreeSet::from(["a", "b"]));

    // Unsubscribe and replace invalidate too.
    router.subscribe(&"b", "sport/#", opts(2, 3)).unwrap();
    let fourth = router.matches("sport/tennis");
    assert!(!Arc::ptr_eq(&third, &fourth));
    assert!(router.unsubscribe(&"b", "sport/#"));
    assert_eq!(
        clients(&router.matches("sport/tennis")),
        BTreeSet::from(["a"])
    );

    // Shared subscriptions invalidate by their inner filter.
    let before = router.matches("sport/tennis");
    router
        .subscribe(&"c", "$share/g/other", opts(0, 4))
        .unwrap();
    assert!(Arc::ptr_eq(&before, &router.matches("sport/tennis")));
    router
        .subscribe(&"c", "$share/g/sport/tennis", opts(0, 5))
        .unwrap();
    assert_eq!(router.matches("sport/tennis").shared.len(), 1);

    // remove_subscriber invalidates.
    router.remove_subscriber(&"c");
    assert!(router.matches("sport/tennis").shared.is_empty());
}

#[test]
fn empty_results_are_cached_and_cache_is_bounded() {
    let router: Router<u32> = Router::with_cache_capacity(8);
    let a = router.matches("nobody/home");
    assert!(a.is_empty());
    assert!(Arc::ptr_eq(&a, &router.matches("nobody/home")));
    for i in 0..100 {
        router.matches(&format!("t/{i}"));
        assert!(router.cached_topics() <= 8);
    }
    let uncached: Router<u32> = Router::with_cache_capacity(0);
    uncached.matches("x");
    assert_eq!(uncached.cached_topics(), 0);
    let default: Router<u32> = Router::default();
    assert!(default.matches("x").is_empty());
}

#[test]
fn many_subscriptions_of_one_client_clear_the_cache_on_removal() {
    let router = Router::new();
    for i in 0..40 {
        router
            .subscribe(&1u32, &format!("f/{i}"), opts(0, i))
            .unwrap();
    }
    router.subscribe(&2u32, "g", opts(0, 0)).unwrap();
    router.matches("g");
    router.matches("f/3");
    assert_eq!(router.remove_subscriber(&1), 40);
    assert!(router.matches("f/3").is_empty());
    assert_eq!(router.matches("g").clients.len(), 1);
    assert_eq!(router.node_count(), 1);
}
