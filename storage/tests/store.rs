//! The store contract, run against both implementations: round trips,
//! ordering, reference counting, atomicity, recovery, schema checks and the
//! admin operations.

mod common;

use bytes::Bytes;
use common::{entry, message, raw_sled, retained, session, subscription};
use tern_storage::{
    Batch, DeliveryState, MemoryStore, OnDamage, Op, QueueEntry, SessionRecord, SharedGroupRecord,
    SledStore, Store, StoreError, SCHEMA_VERSION,
};

/// Runs `f` against a fresh memory store and a fresh sled store.
fn both(f: impl Fn(&dyn Store)) {
    f(&MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    f(&SledStore::open(dir.path()).unwrap());
}

fn apply(store: &dyn Store, f: impl FnOnce(&mut Batch)) {
    let mut b = Batch::new();
    f(&mut b);
    store.apply(&b).unwrap();
}

#[test]
fn every_record_round_trips() {
    both(|s| {
        let mut no_will = session("bare");
        no_will.will = None;
        no_will.protocol_level = 4;
        no_will.connected = true;
        let mut sub_plain = subscription("c1", "b/#");
        sub_plain.subscription_id = None;
        sub_plain.no_local = false;
        sub_plain.retain_as_published = true;
        let mut m_plain = message(2, 0);
        m_plain.expires_at = None;
        m_plain.properties = Bytes::new();
        m_plain.retain = true;
        let mut inflight = entry("c1", 2, 2);
        inflight.packet_id = Some(65535);
        inflight.state = DeliveryState::AwaitingComp;
        inflight.dup = true;
        inflight.subscription_ids = vec![];
        inflight.qos = 2;
        inflight.weight = None;
        inflight.shared = Some(SharedGroupRecord {
            group: "workers".into(),
            filter: "jobs/+".into(),
        });
        apply(s, |b| {
            b.put_session(session("c1"))
                .put_session(no_will.clone())
                .put_subscription(subscription("c1", "a/+"))
                .put_subscription(sub_plain.clone())
                .put_message(message(1, 100))
                .put_message(m_plain.clone())
                .put_queue_entry(entry("c1", 1, 1))
                .put_queue_entry(inflight.clone())
                .add_incoming_qos2("c1", 7)
                .add_incoming_qos2("c1", 300)
                .put_retained(retained("r/x", 2));
        });
        assert_eq!(s.session("c1").unwrap(), Some(session("c1")));
        assert_eq!(s.session("bare").unwrap(), Some(no_will.clone()));
        assert_eq!(s.session("nobody").unwrap(), None);
        let sessions: Vec<_> = s.sessions().map(Result::unwrap).collect();
        assert_eq!(sessions, vec![no_will, session("c1")]);
        let subs: Vec<_> = s.subscriptions("c1").map(Result::unwrap).collect();
        assert_eq!(subs, vec![subscription("c1", "a/+"), sub_plain]);
        assert_eq!(s.message(1).unwrap(), Some(message(1, 100)));
        assert_eq!(s.message(2).unwrap(), Some(m_plain));
        let queue: Vec<_> = s.queue("c1", None).map(Result::unwrap).collect();
        assert_eq!(queue, vec![entry("c1", 1, 1), inflight]);
        assert_eq!(s.incoming_qos2("c1").unwrap(), vec![7, 300]);
        let ret: Vec<_> = s.retained("").map(Result::unwrap).collect();
        assert_eq!(ret, vec![retained("r/x", 2)]);
        assert_eq!(s.message_refs(2).unwrap(), 2);
        assert_eq!(s.last_message_id().unwrap(), Some(2));
        assert_eq!(s.last_seq("c1").unwrap(), Some(2));
        assert_eq!(s.last_seq("c2").unwrap(), None);
    });
}

#[test]
fn queue_iterates_in_seq_order_per_client_across_chunks() {
    both(|s| {
        // Seqs that sort differently as text than as numbers, more than one
        // scan chunk, and a client whose id is a prefix of another's.
        let seqs: Vec<u64> = (0..2500u64).map(|i| (i * 7919) % 2500 + 1).collect();
        let mut b = Batch::new();
        b.put_message(message(1, 10));
        for &seq in &seqs {
            b.put_queue_entry(entry("a", seq * 1000, 1));
        }
        b.put_queue_entry(entry("ab", 1, 1));
        s.apply(&b).unwrap();
        let got: Vec<u64> = s.queue("a", None).map(|e| e.unwrap().seq).collect();
        let want: Vec<u64> = (1..=2500).map(|i| i * 1000).collect();
        assert_eq!(got, want);
        let after: Vec<u64> = s
            .queue("a", Some(2_497_000))
            .map(|e| e.unwrap().seq)
            .collect();
        assert_eq!(after, vec![2_498_000, 2_499_000, 2_500_000]);
        assert_eq!(s.queue("ab", None).count(), 1);
        assert_eq!(s.message_refs(1).unwrap(), 2501);
    });
}

#[test]
fn a_message_is_stored_once_and_goes_with_its_last_reference() {
    both(|s| {
        apply(s, |b| {
            b.put_message(message(9, 1000))
                .put_queue_entry(entry("x", 1, 9))
                .put_queue_entry(entry("y", 1, 9));
        });
        assert_eq!(s.stats().unwrap().messages, 1);
        assert_eq!(s.message_refs(9).unwrap(), 2);
        // A state change (same message) keeps the count.
        let mut sent = entry("x", 1, 9);
        sent.state = DeliveryState::AwaitingAck;
        sent.packet_id = Some(1);
        apply(s, |b| {
            b.put_queue_entry(sent);
        });
        assert_eq!(s.message_refs(9).unwrap(), 2);
        apply(s, |b| {
            b.delete_queue_entry("x", 1);
        });
        assert_eq!(s.message_refs(9).unwrap(), 1);
        assert!(s.message(9).unwrap().is_some());
        // Deleting an absent entry is a no-op, not a second release.
        apply(s, |b| {
            b.delete_queue_entry("x", 1);
        });
        assert_eq!(s.message_refs(9).unwrap(), 1);
        apply(s, |b| {
            b.delete_queue_entry("y", 1);
        });
        assert_eq!(s.message(9).unwrap(), None);
        assert_eq!(s.message_refs(9).unwrap(), 0);
        let st = s.stats().unwrap();
        assert_eq!((st.messages, st.queue_entries), (0, 0));
        assert_eq!(st.keys, 2, "only the schema and commit keys are left");
    });
}

#[test]
fn a_message_referenced_once_stores_no_count() {
    both(|s| {
        // schema, commit, message and entry: no count key beside them.
        apply(s, |b| {
            b.put_message(message(9, 100))
                .put_queue_entry(entry("x", 1, 9));
        });
        assert_eq!(s.stats().unwrap().keys, 4);
        assert_eq!(s.message_refs(9).unwrap(), 1);
        apply(s, |b| {
            b.put_message(message(9, 100))
                .put_queue_entry(entry("y", 1, 9));
        });
        assert_eq!(
            s.stats().unwrap().keys,
            6,
            "the second reference is counted"
        );
        assert_eq!(s.message_refs(9).unwrap(), 2);
        apply(s, |b| {
            b.delete_queue_entry("y", 1);
        });
        assert_eq!(s.stats().unwrap().keys, 4, "back to one: the count goes");
        assert_eq!(s.message_refs(9).unwrap(), 1);
        apply(s, |b| {
            b.delete_queue_entry("x", 1);
        });
        assert_eq!(s.stats().unwrap().keys, 2);
        assert_eq!(s.message_refs(9).unwrap(), 0);
    });
}

#[test]
fn a_stored_message_is_never_rewritten() {
    both(|s| {
        apply(s, |b| {
            b.put_message(message(9, 100))
                .put_queue_entry(entry("x", 1, 9));
        });
        let mut other = message(9, 7);
        other.topic = Bytes::from_static(b"elsewhere");
        apply(s, |b| {
            b.put_message(other).put_queue_entry(entry("y", 1, 9));
        });
        assert_eq!(s.message(9).unwrap(), Some(message(9, 100)));
        assert_eq!(s.message_refs(9).unwrap(), 2);
    });
}

#[test]
fn retained_references_and_replacement() {
    both(|s| {
        apply(s, |b| {
            b.put_message(message(1, 10))
                .put_retained(retained("a/b", 1))
                .put_message(message(2, 10))
                .put_queue_entry(entry("c", 1, 2));
        });
        // Replacing the retained message releases the old one.
        apply(s, |b| {
            b.put_retained(retained("a/b", 2));
        });
        assert_eq!(s.message(1).unwrap(), None);
        assert_eq!(s.message_refs(2).unwrap(), 2);
        apply(s, |b| {
            b.put_message(message(3, 10))
                .put_retained(retained("a/c", 3))
                .put_message(message(4, 10))
                .put_retained(retained("b", 4));
        });
        let under_a: Vec<String> = s.retained("a/").map(|r| r.unwrap().topic).collect();
        assert_eq!(under_a, vec!["a/b", "a/c"]);
        apply(s, |b| {
            b.delete_retained("a/b").delete_queue_entry("c", 1);
        });
        assert_eq!(s.message(2).unwrap(), None);
        assert_eq!(s.retained("").count(), 2);
    });
}

#[test]
fn expiring_a_retained_message_clears_only_that_message() {
    both(|s| {
        apply(s, |b| {
            b.put_message(message(1, 10))
                .put_retained(retained("t", 1))
                .put_message(message(2, 10))
                .put_retained(retained("u", 2));
        });
        // "t" was replaced by message 3 before the sweep of message 1
        // reached the store: the sweep leaves message 3 alone.
        apply(s, |b| {
            b.put_message(message(3, 10)).put_retained(retained("t", 3));
        });
        apply(s, |b| {
            b.push(Op::ExpireRetained {
                topic: "t".into(),
                message_id: 1,
            })
            .push(Op::ExpireRetained {
                topic: "u".into(),
                message_id: 2,
            });
        });
        let left: Vec<(String, u64)> = s
            .retained("")
            .map(|r| r.map(|r| (r.topic, r.message_id)).unwrap())
            .collect();
        assert_eq!(left, vec![("t".to_string(), 3)]);
        assert_eq!(s.message(2).unwrap(), None, "its last reference released");
        assert_eq!(s.message_refs(3).unwrap(), 1);
    });
}

#[test]
fn an_unreferenced_message_is_not_kept() {
    both(|s| {
        apply(s, |b| {
            b.put_message(message(5, 10));
        });
        assert_eq!(s.message(5).unwrap(), None);
    });
}

#[test]
fn a_batch_is_all_or_nothing() {
    both(|s| {
        apply(s, |b| {
            b.put_session(session("keep"));
        });
        // Valid operations followed by one that references a missing message:
        // nothing of the batch may appear, including the deletion.
        let mut b = Batch::new();
        b.put_session(session("new"))
            .put_message(message(1, 10))
            .put_queue_entry(entry("new", 1, 1))
            .delete_session("keep")
            .put_queue_entry(entry("new", 2, 77));
        let err = s.apply(&b).unwrap_err();
        assert!(err.is_invalid_batch(), "{err}");
        assert_eq!(s.session("new").unwrap(), None);
        assert_eq!(s.message(1).unwrap(), None);
        assert_eq!(s.queue("new", None).count(), 0);
        assert!(s.session("keep").unwrap().is_some());
        // Later operations of a batch see the earlier ones.
        apply(s, |b| {
            b.put_message(message(2, 10))
                .put_queue_entry(entry("k", 1, 2))
                .put_queue_entry(entry("k", 2, 2))
                .delete_queue_entry("k", 1);
        });
        assert_eq!(s.message_refs(2).unwrap(), 1);
    });
}

#[test]
fn delete_session_removes_everything_it_references() {
    both(|s| {
        apply(s, |b| {
            b.put_session(session("gone"))
                .put_session(session("stays"))
                .put_subscription(subscription("gone", "a/#"))
                .put_subscription(subscription("stays", "a/#"))
                .put_message(message(1, 10))
                .put_message(message(2, 10))
                .put_queue_entry(entry("gone", 1, 1))
                .put_queue_entry(entry("gone", 2, 2))
                .put_queue_entry(entry("stays", 1, 2))
                .add_incoming_qos2("gone", 5);
        });
        let summary = s.session_summary("gone").unwrap().unwrap();
        assert_eq!(
            (summary.queue_depth, summary.inflight, summary.incoming_qos2),
            (2, 0, 1)
        );
        assert_eq!(summary.subscriptions.len(), 1);
        s.delete_session("gone").unwrap();
        assert_eq!(s.session_summary("gone").unwrap(), None);
        assert_eq!(s.subscriptions("gone").count(), 0);
        assert_eq!(s.queue("gone", None).count(), 0);
        assert!(s.incoming_qos2("gone").unwrap().is_empty());
        assert_eq!(s.message(1).unwrap(), None);
        assert_eq!(s.message_refs(2).unwrap(), 1);
        assert!(s.session("stays").unwrap().is_some());
        // Entries added earlier in the same batch go too.
        apply(s, |b| {
            b.put_queue_entry(entry("stays", 2, 2))
                .delete_session("stays");
        });
        assert_eq!(s.message(2).unwrap(), None);
        let st = s.stats().unwrap();
        // The schema and commit keys stay.
        assert_eq!((st.sessions, st.subscriptions, st.keys), (0, 0, 2));
    });
}

#[test]
fn stats_count_keys_and_bytes() {
    both(|s| {
        apply(s, |b| {
            b.put_session(session("s"))
                .put_subscription(subscription("s", "t"))
                .put_message(message(1, 4096))
                .put_queue_entry(entry("s", 1, 1))
                .put_retained(retained("t", 1));
        });
        let st = s.compact().unwrap();
        assert_eq!(
            (
                st.sessions,
                st.subscriptions,
                st.messages,
                st.queue_entries,
                st.retained
            ),
            (1, 1, 1, 1, 1)
        );
        // + the schema and commit keys and the reference count.
        assert_eq!(st.keys, 8);
        assert!(st.live_bytes > 4096);
    });
}

#[test]
fn client_ids_longer_than_mqtt_allows_are_refused() {
    both(|s| {
        let long = "x".repeat(70_000);
        let mut b = Batch::new();
        b.put_session(session(&long));
        assert!(s.apply(&b).unwrap_err().is_invalid_batch());
    });
}

#[test]
fn records_survive_drop_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SledStore::open(dir.path()).unwrap();
        let mut b = Batch::new();
        b.put_session(session("p"))
            .put_subscription(subscription("p", "x/#"))
            .put_message(message(1, 2000))
            .put_queue_entry(entry("p", 1, 1))
            .add_incoming_qos2("p", 3)
            .put_retained(retained("x/y", 1));
        s.apply(&b).unwrap();
        s.sync().unwrap();
    }
    let s = SledStore::open(dir.path()).unwrap();
    assert_eq!(s.session("p").unwrap(), Some(session("p")));
    assert_eq!(s.subscriptions("p").count(), 1);
    assert_eq!(s.message(1).unwrap(), Some(message(1, 2000)));
    assert_eq!(s.message_refs(1).unwrap(), 2);
    assert_eq!(
        s.queue("p", None).next().unwrap().unwrap(),
        entry("p", 1, 1)
    );
    assert_eq!(s.incoming_qos2("p").unwrap(), vec![3]);
    assert_eq!(s.retained("x/").count(), 1);
}

#[test]
fn a_second_open_of_the_same_directory_is_refused_as_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _s = SledStore::open(dir.path()).unwrap();
    match SledStore::open(dir.path()) {
        Err(StoreError::Locked { path }) => assert_eq!(path, dir.path()),
        other => panic!("expected Locked, got {other:?}"),
    }
}

#[test]
fn a_version_1_store_is_upgraded_and_its_sessions_read_as_not_connected() {
    let dir = tempfile::tempdir().unwrap();
    let ownerless = || SessionRecord {
        owner: None,
        ..session("old")
    };
    {
        let s = SledStore::open(dir.path()).unwrap();
        apply(&s, |b| {
            b.put_session(ownerless());
        });
    }
    {
        // What a version 1 broker wrote: neither the `connected` byte nor
        // the owner (version 3) at the end of the session record, and
        // schema version 1.
        let db = raw_sled(dir.path());
        let value = db.get(b"Sold").unwrap().expect("session record");
        assert_eq!(&value[value.len() - 2..], [0, 0], "not connected, no owner");
        db.insert(b"Sold", &value[..value.len() - 2]).unwrap();
        db.insert(b"\x00schema", &1u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    {
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.session("old").unwrap(), Some(ownerless()));
    }
    let db = raw_sled(dir.path());
    assert_eq!(
        db.get(b"\x00schema").unwrap().unwrap().as_ref(),
        SCHEMA_VERSION.to_be_bytes()
    );
}

#[test]
fn a_version_4_store_is_upgraded_and_its_queue_entries_read_without_trailer() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SledStore::open(dir.path()).unwrap();
        apply(&s, |b| {
            b.put_message(message(1, 10))
                .put_queue_entry(entry("old", 1, 1));
        });
    }
    {
        // What a version 4 broker wrote: the entry without the trailer
        // (which fields follow, and the weight), and schema version 4.
        let db = raw_sled(dir.path());
        let key = [b"Q\x00\x03old".as_slice(), &1u64.to_be_bytes()].concat();
        let value = db.get(&key).unwrap().expect("queue entry");
        let trailer = [[1u8].as_slice(), &1001u32.to_be_bytes()].concat();
        assert_eq!(value[value.len() - 5..], trailer, "a weight, no group");
        db.insert(&key, &value[..value.len() - 5]).unwrap();
        db.insert(b"\x00schema", &4u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    {
        // Opened only to be read, it is read as it is, not upgraded.
        let s = SledStore::open_with(dir.path(), OnDamage::Inspect).unwrap();
        assert_eq!(s.queue("old", None).count(), 1);
    }
    assert_eq!(
        raw_sled(dir.path())
            .get(b"\x00schema")
            .unwrap()
            .unwrap()
            .as_ref(),
        4u32.to_be_bytes()
    );
    {
        let s = SledStore::open(dir.path()).unwrap();
        let queue: Vec<_> = s.queue("old", None).map(Result::unwrap).collect();
        let unweighed = QueueEntry {
            weight: None,
            ..entry("old", 1, 1)
        };
        assert_eq!(queue, vec![unweighed]);
    }
    let db = raw_sled(dir.path());
    assert_eq!(
        db.get(b"\x00schema").unwrap().unwrap().as_ref(),
        SCHEMA_VERSION.to_be_bytes()
    );
}

#[test]
fn a_version_5_store_is_upgraded_and_its_counts_of_one_still_hold() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SledStore::open(dir.path()).unwrap();
        apply(&s, |b| {
            b.put_message(message(1, 10))
                .put_queue_entry(entry("x", 1, 1))
                .put_message(message(2, 10))
                .put_queue_entry(entry("y", 1, 2))
                .put_queue_entry(entry("z", 1, 2));
        });
    }
    {
        // What a version 5 broker wrote: a count key for every stored
        // message, 1 included, and schema version 5.
        let db = raw_sled(dir.path());
        let refs_1 = [b"R".as_slice(), &1u64.to_be_bytes()].concat();
        assert_eq!(db.get(&refs_1).unwrap(), None);
        db.insert(&refs_1, &1u32.to_be_bytes()).unwrap();
        db.insert(b"\x00schema", &5u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    {
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.message_refs(1).unwrap(), 1);
        assert_eq!(s.message_refs(2).unwrap(), 2);
        apply(&s, |b| {
            b.delete_queue_entry("x", 1).delete_queue_entry("y", 1);
        });
        assert_eq!(s.message(1).unwrap(), None, "its last reference went");
        assert_eq!(s.message_refs(2).unwrap(), 1);
        // schema, commit, message 2 and its entry: both count keys went.
        assert_eq!(s.stats().unwrap().keys, 4);
    }
    let db = raw_sled(dir.path());
    assert_eq!(
        db.get(b"\x00schema").unwrap().unwrap().as_ref(),
        SCHEMA_VERSION.to_be_bytes()
    );
}

#[test]
fn a_reference_to_a_message_lost_to_damage_is_refused_after_a_release_of_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SledStore::open(dir.path()).unwrap();
        apply(&s, |b| {
            b.put_message(message(5, 10))
                .put_queue_entry(entry("x", 1, 5))
                .put_queue_entry(entry("x", 2, 5));
        });
    }
    {
        // Damage: the message and its count are gone, its entries are not.
        let db = raw_sled(dir.path());
        db.remove([b"M".as_slice(), &5u64.to_be_bytes()].concat())
            .unwrap();
        db.remove([b"R".as_slice(), &5u64.to_be_bytes()].concat())
            .unwrap();
        db.flush().unwrap();
    }
    let s = SledStore::open(dir.path()).unwrap();
    // The release reads a count for message 5; that does not make it stored.
    let mut b = Batch::new();
    b.delete_queue_entry("x", 1)
        .insert_queue_entry(entry("y", 1, 5));
    assert!(matches!(s.apply(&b), Err(StoreError::InvalidBatch(_))));
    assert_eq!(s.queue("y", None).count(), 0);
    assert_eq!(
        s.queue("x", None).count(),
        2,
        "the refused batch wrote nothing"
    );
}

#[test]
fn a_newer_schema_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    drop(SledStore::open(dir.path()).unwrap());
    {
        let db = raw_sled(dir.path());
        db.insert(b"\x00schema", &(SCHEMA_VERSION + 1).to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let err = SledStore::open(dir.path()).unwrap_err();
    match &err {
        StoreError::NewerSchema { found, supported } => {
            assert_eq!((*found, *supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("expected NewerSchema, got {other:?}"),
    }
    assert!(err.to_string().contains("upgrade Tern"), "{err}");
    let db = raw_sled(dir.path());
    assert_eq!(
        db.get(b"\x00schema").unwrap().unwrap().as_ref(),
        (SCHEMA_VERSION + 1).to_be_bytes()
    );
}

#[test]
fn a_directory_with_foreign_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = raw_sled(dir.path());
        db.insert(b"hello", b"world").unwrap();
        db.flush().unwrap();
    }
    assert!(matches!(
        SledStore::open(dir.path()),
        Err(StoreError::NotATernStore)
    ));
}

#[test]
fn ops_are_plain_values() {
    // Batches can be built from a list of ops and compared (for the broker's
    // own tests).
    let b = Batch {
        ops: [Op::DeleteSession {
            client_id: "c".into(),
        }]
        .into_iter()
        .collect(),
    };
    let mut c = Batch::new();
    c.delete_session("c");
    assert_eq!(b, c);
}
