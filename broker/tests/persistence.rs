//! Durable state through the broker: acknowledgements wait for the store,
//! a failing store is reported with the reason code the specification
//! names, and a broker restarted on the same store carries on where the
//! last one stopped (sessions, queues, in-flight QoS 2, retained messages).
//!
//! These run in-process over `MemoryStore` / `FailingStore` (the same
//! engine as sled behind the same trait); SIGKILL crash tests of the real
//! binary on sled are in `tests/interop/test_persistence.py`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    addr, each_puback_lets_one_more_through, eventually, offline_subscriber, persistent_connect,
    publish_packet, publish_weighed, until_ended, RawClient,
};
use tern::{Config, Server};
use tern_codec::{Packet, ProtocolVersion, PubAck, QoS, ReasonCode};
use tern_storage::{FailingStore, MemoryStore, Store};

fn durable(config: &mut Config) {
    config.listeners.tcp = vec!["127.0.0.1:0".parse().unwrap()];
    config.listeners.ws = vec![];
    config.admin.bind = None;
    config.storage.durability = tern::config::DurabilityMode::Fsync;
}

async fn start_on(store: Arc<dyn Store>) -> Server {
    start_configured(store, |_| {}).await
}

async fn start_configured(store: Arc<dyn Store>, configure: impl FnOnce(&mut Config)) -> Server {
    let mut config = Config::default();
    durable(&mut config);
    configure(&mut config);
    Server::start_with_store(config, store)
        .await
        .expect("broker starts")
}

/// A broker over a `FailingStore`, its writer holding a queue entry's
/// insertion for its deletion for `hold` (`None`: the default).
async fn start_failing(hold: Option<Duration>) -> (Arc<FailingStore<MemoryStore>>, Server) {
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let shared = Arc::clone(&store) as Arc<dyn Store>;
    let server = match hold {
        Some(hold) => start_holding(shared, hold).await,
        None => start_on(shared).await,
    };
    (store, server)
}

/// `publish` (a PUBLISH) as a client sends it again: DUP set.
fn sent_again(mut publish: Packet) -> Packet {
    if let Packet::Publish(p) = &mut publish {
        p.dup = true;
    }
    publish
}

/// `publish` (a PUBLISH) with RETAIN set.
fn retained(mut publish: Packet) -> Packet {
    if let Packet::Publish(p) = &mut publish {
        p.retain = true;
    }
    publish
}

async fn expect_ack(c: &mut RawClient) -> Packet {
    c.recv().await.expect("an acknowledgement")
}

#[tokio::test]
async fn a_full_disk_is_reported_and_nothing_is_acknowledged_as_stored() {
    let (store, server) = start_failing(None).await;
    offline_subscriber(&server, "keeper", "t/#", QoS::AtLeastOnce).await;

    let mut v5 = RawClient::connected(addr(&server), "pub5", ProtocolVersion::V5).await;
    v5.send(publish_packet("t/1", b"one", QoS::AtLeastOnce, Some(1)))
        .await;
    assert!(
        matches!(expect_ack(&mut v5).await, Packet::PubAck(a) if a.code == ReasonCode::Success)
    );

    let (mut sub, _) = RawClient::connect(addr(&server), persistent_connect("late", 3600)).await;
    settle(&server).await;

    store.disk_full(true);
    // A message an offline durable session must keep: refused, 0x97.
    v5.send(publish_packet("t/2", b"two", QoS::AtLeastOnce, Some(2)))
        .await;
    match expect_ack(&mut v5).await {
        Packet::PubAck(a) => {
            assert_eq!((a.packet_id, a.code), (2, ReasonCode::QuotaExceeded))
        }
        other => panic!("expected PUBACK 0x97, got {other:?}"),
    }
    // QoS 2: PUBREC 0x97.
    v5.send(publish_packet("t/3", b"three", QoS::ExactlyOnce, Some(3)))
        .await;
    match expect_ack(&mut v5).await {
        Packet::PubRec(a) => assert_eq!(a.code, ReasonCode::QuotaExceeded),
        other => panic!("expected PUBREC 0x97, got {other:?}"),
    }
    // A message nobody durable wants touches no store: served as usual.
    v5.send(publish_packet("elsewhere", b"x", QoS::AtLeastOnce, Some(4)))
        .await;
    assert!(
        matches!(expect_ack(&mut v5).await, Packet::PubAck(a) if a.code == ReasonCode::Success)
    );

    // A retained message is stored in a journal of its own, ahead of the
    // publisher's: its failure is reported all the same.
    let retained = retained(publish_packet(
        "elsewhere",
        b"kept",
        QoS::AtLeastOnce,
        Some(6),
    ));
    v5.send(retained).await;
    match expect_ack(&mut v5).await {
        Packet::PubAck(a) => {
            assert_eq!((a.packet_id, a.code), (6, ReasonCode::QuotaExceeded))
        }
        other => panic!("expected PUBACK 0x97, got {other:?}"),
    }

    // MQTT 3.1.1 has no error code in PUBACK: the connection is closed
    // without one, so the client sends the message again later.
    let mut v3 = RawClient::connected(addr(&server), "pub3", ProtocolVersion::V311).await;
    v3.send(publish_packet("t/4", b"four", QoS::AtLeastOnce, Some(9)))
        .await;
    let seen = v3.expect_closed().await;
    assert!(
        !seen.iter().any(|p| matches!(p, Packet::PubAck(_))),
        "{seen:?}"
    );

    // A durable session's SUBSCRIBE: SUBACK 0x97, and the subscription is
    // not kept (nothing published to it arrives).
    assert_eq!(
        sub.subscribe("late/#", QoS::AtLeastOnce).await,
        vec![ReasonCode::QuotaExceeded]
    );
    store.disk_full(false);
    v5.send(publish_packet("late/x", b"x", QoS::AtMostOnce, None))
        .await;
    sub.expect_silence(Duration::from_millis(200)).await;

    // The disk has room again: acknowledged as stored, and the subscriber
    // gets exactly the messages that were.
    v5.send(publish_packet("t/5", b"five", QoS::AtLeastOnce, Some(5)))
        .await;
    assert!(
        matches!(expect_ack(&mut v5).await, Packet::PubAck(a) if a.code == ReasonCode::Success)
    );
    let persistence = server.broker().persistence.as_ref().expect("a store");
    assert!(persistence.writer_stats().failed >= 3);

    let (mut keeper, ack) =
        RawClient::connect(addr(&server), persistent_connect("keeper", 3600)).await;
    assert!(ack.session_present);
    let mut got = Vec::new();
    while let Ok(Some(Packet::Publish(p))) = keeper.recv_within(Duration::from_millis(300)).await {
        keeper
            .send(Packet::PubAck(PubAck::new(p.packet_id.unwrap())))
            .await;
        got.push(p.payload);
    }
    // In memory the refused messages were still routed (the store failing
    // never corrupts what is in memory); what was acknowledged as stored is
    // there in any case.
    assert!(got.contains(&bytes::Bytes::from_static(b"one")), "{got:?}");
    assert!(got.contains(&bytes::Bytes::from_static(b"five")), "{got:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_restarted_broker_resumes_sessions_queues_and_retained_messages() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let server = start_on(Arc::clone(&store)).await;
    offline_subscriber(&server, "reader", "q/#", QoS::ExactlyOnce).await;

    let (mut publisher, _) =
        RawClient::connect(addr(&server), persistent_connect("writer", 3600)).await;
    for i in 0..5u16 {
        let qos = if i % 2 == 0 {
            QoS::AtLeastOnce
        } else {
            QoS::ExactlyOnce
        };
        publisher
            .publish("q/a", format!("m{i}").as_bytes(), qos, 100 + i)
            .await;
    }
    let retained = retained(publish_packet(
        "ret/x",
        b"kept",
        QoS::AtLeastOnce,
        Some(200),
    ));
    publisher.send(retained).await;
    assert!(matches!(
        expect_ack(&mut publisher).await,
        Packet::PubAck(_)
    ));
    // An incoming QoS 2 message whose PUBREL has not come yet.
    publisher
        .send(publish_packet("q/b", b"once", QoS::ExactlyOnce, Some(7)))
        .await;
    assert!(matches!(expect_ack(&mut publisher).await, Packet::PubRec(a) if a.packet_id == 7));
    drop(publisher);
    server.shutdown().await;

    let server = start_on(Arc::clone(&store)).await;
    // The publisher resends the unfinished QoS 2 message (DUP): it is
    // recognised, acknowledged, and not routed a second time.
    let (mut publisher, ack) =
        RawClient::connect(addr(&server), persistent_connect("writer", 3600)).await;
    assert!(ack.session_present);
    let again = sent_again(publish_packet("q/b", b"once", QoS::ExactlyOnce, Some(7)));
    publisher.send(again).await;
    assert!(matches!(expect_ack(&mut publisher).await, Packet::PubRec(a) if a.packet_id == 7));
    publisher.send(Packet::PubRel(PubAck::new(7))).await;
    assert!(
        matches!(expect_ack(&mut publisher).await, Packet::PubComp(a) if a.code == ReasonCode::Success)
    );

    let (mut reader, ack) =
        RawClient::connect(addr(&server), persistent_connect("reader", 3600)).await;
    assert!(ack.session_present, "the session survived the restart");
    let mut got = Vec::new();
    while let Ok(Some(packet)) = reader.recv_within(Duration::from_millis(300)).await {
        match packet {
            Packet::Publish(p) => {
                let id = p.packet_id.unwrap();
                match p.qos {
                    QoS::AtLeastOnce => reader.send(Packet::PubAck(PubAck::new(id))).await,
                    _ => reader.send(Packet::PubRec(PubAck::new(id))).await,
                }
                got.push(String::from_utf8(p.payload.to_vec()).unwrap());
            }
            Packet::PubRel(r) => reader.send(Packet::PubComp(PubAck::new(r.packet_id))).await,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4", "once"]);

    // Retained messages came back too.
    let mut fresh = RawClient::connected(addr(&server), "fresh", ProtocolVersion::V5).await;
    fresh
        .send(common::subscribe_packet(1, "ret/#", QoS::AtMostOnce))
        .await;
    assert!(matches!(fresh.recv().await, Some(Packet::SubAck(_))));
    let p = fresh.recv_publish().await;
    assert_eq!(
        (&p.topic[..], &p.payload[..], p.retain),
        (&b"ret/x"[..], &b"kept"[..], true)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn unfinished_outgoing_flows_resume_after_a_restart() {
    unfinished_outgoing_flows_resume(false).await;
}

/// Their messages expired while the broker was down: their delivery had
/// started, so the flows still resume (MQTT-4.4.0-1), the QoS 1 message
/// with an interval of 1.
#[tokio::test]
async fn unfinished_outgoing_flows_of_expired_messages_resume_after_a_restart() {
    unfinished_outgoing_flows_resume(true).await;
}

async fn unfinished_outgoing_flows_resume(expiring: bool) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let server = start_on(Arc::clone(&store)).await;
    let (mut reader, _) = RawClient::connect(addr(&server), persistent_connect("r", 3600)).await;
    reader.subscribe("f/#", QoS::ExactlyOnce).await;
    let mut publisher = RawClient::connected(addr(&server), "p", ProtocolVersion::V5).await;
    let properties = tern_codec::properties::PublishProperties {
        message_expiry_interval: expiring.then_some(1),
        ..Default::default()
    };
    publisher
        .publish_with("f/1", b"two", QoS::ExactlyOnce, 1, properties.clone())
        .await;
    publisher
        .publish_with("f/2", b"one", QoS::AtLeastOnce, 2, properties)
        .await;

    // QoS 2: PUBLISH, PUBREC, then the PUBREL (sent once its state is
    // stored), left without PUBCOMP. QoS 1: received, never acknowledged.
    let first = reader.recv_publish().await;
    assert_eq!(first.qos, QoS::ExactlyOnce);
    let second = reader.recv_publish().await;
    assert_eq!(second.qos, QoS::AtLeastOnce);
    let q2_id = first.packet_id.unwrap();
    reader.send(Packet::PubRec(PubAck::new(q2_id))).await;
    assert!(matches!(reader.recv().await, Some(Packet::PubRel(r)) if r.packet_id == q2_id));
    drop(reader);
    drop(publisher);
    server.shutdown().await;
    if expiring {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }

    let server = start_on(Arc::clone(&store)).await;
    let (mut reader, ack) = RawClient::connect(addr(&server), persistent_connect("r", 3600)).await;
    assert!(ack.session_present);
    let mut seen = Vec::new();
    while let Ok(Some(packet)) = reader.recv_within(Duration::from_millis(300)).await {
        seen.push(packet);
    }
    // The QoS 2 message is NOT sent again (that would be a duplicate): its
    // PUBREL is. The unacknowledged QoS 1 message comes again with DUP and
    // its packet id.
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen.iter()
            .any(|p| matches!(p, Packet::PubRel(r) if r.packet_id == q2_id)),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|p| matches!(p, Packet::Publish(p)
            if p.dup && p.packet_id == second.packet_id && &p.payload[..] == b"one"
                && (!expiring || p.properties().message_expiry_interval == Some(1)))),
        "{seen:?}"
    );
    server.shutdown().await;
}

async fn start_holding(store: Arc<dyn Store>, hold: Duration) -> Server {
    let mut config = Config::default();
    durable(&mut config);
    config.storage.batch_max_delay_us = hold.as_micros() as u64;
    Server::start_with_store(config, store)
        .await
        .expect("broker starts")
}

/// An online durable session subscribed to `filter` at QoS 1 that
/// acknowledges by hand.
async fn online_subscriber(server: &Server, client_id: &str, filter: &str) -> RawClient {
    let (mut c, ack) = RawClient::connect(addr(server), persistent_connect(client_id, 3600)).await;
    assert_eq!(ack.code, ReasonCode::Success);
    assert_eq!(
        c.subscribe(filter, QoS::AtLeastOnce).await,
        vec![ReasonCode::granted(QoS::AtLeastOnce)]
    );
    c
}

#[tokio::test]
async fn a_delivery_acknowledged_before_it_is_written_never_reaches_the_disk() {
    // A hold far longer than the test: the PUBACK can only come early.
    let (store, server) = start_failing(Some(Duration::from_secs(60))).await;
    let mut sub = online_subscriber(&server, "online", "n/#").await;
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V5).await;
    let (applies, syncs) = (store.applies(), store.syncs());

    publisher
        .send(publish_packet("n/1", b"one", QoS::AtLeastOnce, Some(1)))
        .await;
    let delivered = sub.recv_publish().await;
    assert_eq!(&delivered.payload[..], b"one");
    // Neither durable nor acknowledged by the subscriber yet: no PUBACK.
    publisher.expect_silence(Duration::from_millis(300)).await;

    sub.send(Packet::PubAck(PubAck::new(
        delivered.packet_id.expect("QoS 1 has an id"),
    )))
    .await;
    match tokio::time::timeout(Duration::from_secs(10), publisher.recv()).await {
        Ok(Some(Packet::PubAck(a))) => assert_eq!((a.packet_id, a.code), (1, ReasonCode::Success)),
        other => panic!("expected the PUBACK once the subscriber acknowledged, got {other:?}"),
    }
    assert_eq!(
        (store.applies(), store.syncs()),
        (applies, syncs),
        "the message, its queue entry and the entry's deletion netted away"
    );
    assert_eq!(store.inner().queue("online", None).count(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_delivery_not_acknowledged_within_the_hold_is_stored_before_the_puback() {
    let (store, server) = start_failing(Some(Duration::from_millis(100))).await;
    let mut sub = online_subscriber(&server, "slow", "s/#").await;
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V5).await;
    publisher
        .send(publish_packet("s/1", b"one", QoS::AtLeastOnce, Some(1)))
        .await;
    let delivered = sub.recv_publish().await;
    // The subscriber sits on it: the PUBACK comes after the hold, once the
    // delivery is durable.
    match tokio::time::timeout(Duration::from_secs(10), publisher.recv()).await {
        Ok(Some(Packet::PubAck(a))) => assert_eq!((a.packet_id, a.code), (1, ReasonCode::Success)),
        other => panic!("expected the PUBACK after the hold, got {other:?}"),
    }
    let stored: Vec<_> = store
        .inner()
        .queue("slow", None)
        .map(Result::unwrap)
        .collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].packet_id, delivered.packet_id);
    // Its acknowledgement is then written as a deletion.
    sub.send(Packet::PubAck(PubAck::new(delivered.packet_id.unwrap())))
        .await;
    common::eventually("the entry is deleted", || {
        store.inner().queue("slow", None).count() == 0
    })
    .await;
    server.shutdown().await;
}

/// A read of a stored backlog that panics (sled does on some damaged
/// records) fails like a read that returns an error: it is retried, and the
/// messages arrive once the store reads again. Before, the panic ended the
/// read and the session waited for its backlog for ever.
#[tokio::test]
async fn a_backlog_read_that_panics_is_retried() {
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let server = start_on(Arc::clone(&store) as Arc<dyn Store>).await;
    offline_subscriber(&server, "b", "b/#", QoS::AtLeastOnce).await;
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V5).await;
    for i in 1..=3u16 {
        publisher
            .publish("b/x", format!("m{i}").as_bytes(), QoS::AtLeastOnce, i)
            .await;
    }
    drop(publisher);
    server.shutdown().await;

    let server = start_on(Arc::clone(&store) as Arc<dyn Store>).await;
    store.panic_reads(true);
    let (mut reader, ack) = RawClient::connect(addr(&server), persistent_connect("b", 3600)).await;
    assert!(ack.session_present);
    common::eventually("a read of the backlog panicked", || store.panics() > 0).await;
    reader.expect_silence(Duration::from_millis(300)).await;
    store.panic_reads(false);
    let mut got = Vec::new();
    while got.len() < 3 {
        match reader.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::Publish(p))) => {
                reader
                    .send(Packet::PubAck(PubAck::new(p.packet_id.unwrap())))
                    .await;
                got.push(String::from_utf8(p.payload.to_vec()).unwrap());
            }
            other => panic!("after {got:?}: {other:?}"),
        }
    }
    assert_eq!(got, ["m1", "m2", "m3"]);
    server.shutdown().await;
}

#[tokio::test]
async fn a_restart_leaves_queued_messages_in_the_store_until_the_client_drains_them() {
    const STORED: usize = 700;
    // Smaller than what is stored, so that the bound below says something.
    const WINDOW: u16 = 128;
    let window = |c: &mut Config| c.limits.max_inflight = WINDOW;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let server = start_configured(Arc::clone(&store), window).await;
    offline_subscriber(&server, "big", "b/#", QoS::AtLeastOnce).await;
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V311).await;
    for i in 0..STORED {
        publisher
            .publish(
                "b/x",
                format!("m{i}").as_bytes(),
                QoS::AtLeastOnce,
                1 + (i % 60000) as u16,
            )
            .await;
    }
    drop(publisher);
    server.shutdown().await;

    let server = start_configured(Arc::clone(&store), window).await;
    let session = server.broker().registry.get("big").expect("restored");
    assert_eq!(
        session.stored_backlog(),
        STORED,
        "no payload read at start-up"
    );
    assert_eq!(session.queued_len(), (STORED, 0));
    // Queued after the restart: behind the stored ones.
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V311).await;
    for i in 0..5u16 {
        publisher
            .publish("b/x", format!("n{i}").as_bytes(), QoS::AtLeastOnce, 1 + i)
            .await;
    }
    assert_eq!(session.queued_len(), (STORED + 5, 0));

    let (mut reader, ack) =
        RawClient::connect(addr(&server), persistent_connect("big", 3600)).await;
    assert!(ack.session_present);
    let mut got = Vec::new();
    let mut most_in_memory = 0;
    while got.len() < STORED + 5 {
        let p = match reader.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::Publish(p))) => p,
            other => panic!("after {} messages: {other:?}", got.len()),
        };
        let (queued, inflight) = session.queued_len();
        most_in_memory = most_in_memory.max(queued - session.stored_backlog() + inflight);
        reader
            .send(Packet::PubAck(PubAck::new(p.packet_id.unwrap())))
            .await;
        got.push(String::from_utf8(p.payload.to_vec()).unwrap());
    }
    let expected: Vec<String> = (0..STORED)
        .map(|i| format!("m{i}"))
        .chain((0..5).map(|i| format!("n{i}")))
        .collect();
    assert_eq!(got, expected, "in order, each once");
    reader.expect_silence(Duration::from_millis(200)).await;
    // A chunk waiting, a window in flight, and the five queued since.
    assert!(
        most_in_memory <= tern::session::BACKLOG_CHUNK + usize::from(WINDOW) + 5,
        "at most a chunk and a window in memory at once: {most_in_memory}"
    );
    common::eventually("the stored queue is empty", || {
        store.queue("big", None).count() == 0
    })
    .await;
    server.shutdown().await;
}

/// Messages left unacknowledged before a restart are sent again within the
/// window's byte bound of the broker that restarted, not all at once.
#[tokio::test]
async fn a_restored_window_is_sent_again_within_the_byte_bound() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let server = start_on(Arc::clone(&store)).await;
    let connect = persistent_connect("w", 3600);
    let (mut sub, _) = RawClient::connect(addr(&server), connect.clone()).await;
    sub.subscribe("w", QoS::AtLeastOnce).await;
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V311).await;
    // 1 + 400 bytes each; all five sent, none acknowledged.
    publish_weighed(&mut publisher, "w", 5, QoS::AtLeastOnce).await;
    for _ in 0..5 {
        sub.recv_publish().await;
    }
    drop((sub, publisher));
    server.shutdown().await;

    let server = start_configured(Arc::clone(&store), |c| {
        c.limits.max_inflight_bytes = 1024;
    })
    .await;
    let (mut sub, ack) = RawClient::connect(addr(&server), connect).await;
    assert!(ack.session_present);
    // Three make 1203 bytes: the fourth waits for an acknowledgement.
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(sub.recv_publish().await);
    }
    sub.expect_silence(Duration::from_millis(200)).await;
    each_puback_lets_one_more_through(&mut sub, &mut got, 2).await;
    assert!(got.iter().all(|m| m.dup), "each a redelivery");
    let first_bytes: Vec<u8> = got.iter().map(|m| m.payload[0]).collect();
    assert_eq!(first_bytes, b"01234", "in order");
    server.shutdown().await;
}

/// A queue left in the store by a restart counts against
/// `max_queued_bytes` before it is read: 40 stored messages of about 1 KB
/// leave room for 25 more under a 64 KiB bound, not 64.
#[tokio::test]
async fn a_restored_backlog_counts_against_the_queue_byte_bound() {
    restored_backlog_against_the_byte_bound(false).await;
}

/// The same for entries queued by a build that stored no weight with them
/// (schema version 4): the restart weighs them from their messages.
#[tokio::test]
async fn a_restored_backlog_without_weights_is_weighed_from_its_messages() {
    restored_backlog_against_the_byte_bound(true).await;
}

async fn restored_backlog_against_the_byte_bound(unweighed: bool) {
    const BOUND: usize = 64 * 1024;
    const STORED: usize = 40;
    let payload = [7u8; 1000];
    let weight = "b/x".len() + payload.len();
    let fit_after = (BOUND - STORED * weight) / weight;
    let bounded = |c: &mut Config| c.limits.max_queued_bytes = BOUND;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let server = start_configured(Arc::clone(&store), bounded).await;
    offline_subscriber(&server, "big", "b/#", QoS::AtLeastOnce).await;
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V311).await;
    for i in 0..STORED as u16 {
        publisher
            .publish("b/x", &payload, QoS::AtLeastOnce, 1 + i)
            .await;
    }
    drop(publisher);
    server.shutdown().await;
    let entries: Vec<_> = store.queue("big", None).map(Result::unwrap).collect();
    assert_eq!(entries.len(), STORED);
    assert!(entries.iter().all(|e| e.weight == Some(weight as u32)));
    if unweighed {
        let mut batch = tern_storage::Batch::new();
        for entry in entries {
            batch.put_queue_entry(tern_storage::QueueEntry {
                weight: None,
                ..entry
            });
        }
        store.apply(&batch).unwrap();
    }

    let server = start_configured(Arc::clone(&store), bounded).await;
    let session = server.broker().registry.get("big").expect("restored");
    assert_eq!(session.stored_backlog(), STORED);
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V311).await;
    for i in 0..STORED as u16 {
        publisher
            .publish("b/x", &payload, QoS::AtLeastOnce, 1 + i)
            .await;
    }
    let dropped = server.broker().metrics.messages_dropped_queue_full.get();
    assert_eq!(dropped as usize, STORED - fit_after, "over the bound");
    assert_eq!(session.queued_len(), (STORED + fit_after, 0));

    // What was kept is delivered: the stored ones, then those that fit.
    let (mut reader, ack) =
        RawClient::connect(addr(&server), persistent_connect("big", 3600)).await;
    assert!(ack.session_present);
    for n in 0..STORED + fit_after {
        match reader.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::Publish(p))) => {
                reader
                    .send(Packet::PubAck(PubAck::new(p.packet_id.unwrap())))
                    .await
            }
            other => panic!("after {n} messages: {other:?}"),
        }
    }
    reader.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(session.stored_backlog(), 0);
    server.shutdown().await;
}

/// A retained message whose Message Expiry Interval has passed is removed
/// by itself, from memory and from the store, without a publish to make
/// it happen; one without an expiry stays.
#[tokio::test]
async fn an_expired_retained_message_leaves_memory_and_the_store() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let server = start_on(Arc::clone(&store)).await;
    let mut p = RawClient::connected(addr(&server), "p", ProtocolVersion::V5).await;
    for (id, topic, expiry) in [(1, "r/brief", Some(1)), (2, "r/lasting", None)] {
        let mut packet = publish_packet(topic, b"v", QoS::AtLeastOnce, Some(id));
        if let Packet::Publish(publish) = &mut packet {
            publish.retain = true;
            publish.properties_mut().message_expiry_interval = expiry;
        }
        p.send(packet).await;
        assert!(matches!(expect_ack(&mut p).await, Packet::PubAck(_)));
    }
    let stored = || -> Vec<String> {
        let records = store.retained("").map(|r| r.unwrap().topic);
        records.collect()
    };
    assert_eq!(stored().len(), 2);
    let broker = server.broker();
    common::eventually("the expired retained message removed", || {
        broker.retained_count() == 1 && stored().len() == 1
    })
    .await;
    assert_eq!(stored(), ["r/lasting"]);
    server.shutdown().await;
}

/// A start that fails part-way (here the admin endpoint's address is taken,
/// after the MQTT listener and the background tasks have started) lets go
/// of everything it started: nothing keeps accepting on the listener it
/// bound, and the store is released, so a caller can fix the configuration
/// and start again on the same data directory.
#[tokio::test]
async fn a_start_that_fails_part_way_lets_go_of_its_store_and_listeners() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let store = Arc::new(MemoryStore::new());
    let mut config = Config::default();
    durable(&mut config);
    config.admin.bind = Some(taken.local_addr().unwrap());
    let shared: Arc<dyn Store> = Arc::clone(&store) as Arc<dyn Store>;
    match Server::start_with_store(config, shared).await {
        Ok(_) => panic!("the broker started on a taken admin address"),
        Err(e) => assert!(e.to_string().contains("cannot listen on"), "{e}"),
    }
    common::eventually("the failed start released the store", || {
        Arc::strong_count(&store) == 1
    })
    .await;
}

/// A shut-down server lets go of its store even while sessions wait to
/// expire or to publish a delayed will: their timers stop with it. (Left
/// running, they kept the broker and its store alive until they fired, and
/// then ended sessions and published wills into a store a restart had
/// taken over.)
#[tokio::test]
async fn a_shutdown_lets_go_of_its_store_with_session_timers_pending() {
    let store = Arc::new(MemoryStore::new());
    let server = start_on(Arc::clone(&store) as Arc<dyn Store>).await;
    offline_subscriber(&server, "expiring", "a/#", QoS::AtLeastOnce).await;
    let mut delayed = persistent_connect("delayed-will", 3600);
    delayed.will = Some(will_to("wills/delayed", Some(600)));
    let (mut online, _) = RawClient::connect(addr(&server), delayed).await;
    server.shutdown().await;
    online
        .expect_disconnect(ReasonCode::ServerShuttingDown)
        .await;
    common::eventually("the shut-down server released the store", || {
        Arc::strong_count(&store) == 1
    })
    .await;
}

/// Waits until everything submitted so far is written, so that a fault
/// injected next hits what the test does after.
async fn settle(server: &Server) {
    let persistence = server.broker().persistence.as_ref().expect("a store");
    persistence.sync().await.expect("the store syncs");
}

/// A durable publisher's QoS 2 PUBLISH with `packet_id`, answered PUBREC.
async fn open_qos2_flow(publisher: &mut RawClient, topic: &str, payload: &[u8], packet_id: u16) {
    publisher
        .send(publish_packet(
            topic,
            payload,
            QoS::ExactlyOnce,
            Some(packet_id),
        ))
        .await;
    match expect_ack(publisher).await {
        Packet::PubRec(a) => assert_eq!((a.packet_id, a.code), (packet_id, ReasonCode::Success)),
        other => panic!("expected PUBREC, got {other:?}"),
    }
}

/// The payloads a durable session `client_id` is sent on reconnecting,
/// each acknowledged, until it has been quiet for 300 ms.
async fn drain_session(server: &Server, client_id: &str) -> Vec<String> {
    let (mut c, ack) = RawClient::connect(addr(server), persistent_connect(client_id, 3600)).await;
    assert!(ack.session_present, "{client_id} kept its session");
    let mut got = Vec::new();
    while let Ok(Some(packet)) = c.recv_within(Duration::from_millis(300)).await {
        match packet {
            Packet::Publish(p) => {
                let id = p.packet_id.expect("QoS 1 or 2");
                match p.qos {
                    QoS::AtLeastOnce => c.send(Packet::PubAck(PubAck::new(id))).await,
                    _ => c.send(Packet::PubRec(PubAck::new(id))).await,
                }
                got.push(String::from_utf8(p.payload.to_vec()).unwrap());
            }
            Packet::PubRel(r) => c.send(Packet::PubComp(PubAck::new(r.packet_id))).await,
            other => panic!("unexpected {other:?}"),
        }
    }
    got
}

#[tokio::test]
async fn a_pubcomp_leaves_only_once_the_end_of_the_flow_is_stored() {
    // Once it has the PUBCOMP, a client may use the packet id for a new
    // message. Were the flow still open in the store, a crash would bring
    // it back, and that new message would be taken for a retransmission
    // and dropped.
    let (store, server) = start_failing(None).await;
    let (mut publisher, _) =
        RawClient::connect(addr(&server), persistent_connect("closer", 3600)).await;
    open_qos2_flow(&mut publisher, "x/1", b"one", 7).await;
    assert_eq!(store.inner().incoming_qos2("closer").unwrap(), [7]);

    store.stall(true);
    publisher.send(Packet::PubRel(PubAck::new(7))).await;
    let early = publisher.recv_within(Duration::from_millis(300)).await;
    store.stall(false);
    assert!(early.is_err(), "answered while the store lagged: {early:?}");
    match expect_ack(&mut publisher).await {
        Packet::PubComp(a) => assert_eq!((a.packet_id, a.code), (7, ReasonCode::Success)),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    assert!(store.inner().incoming_qos2("closer").unwrap().is_empty());
    server.shutdown().await;
}

/// A clean start that discards a stored session tells its client so
/// (CONNACK, session present 0) only once the deletion is stored: a crash
/// right after that CONNACK must not bring the old session back, with its
/// subscriptions and queued messages.
#[tokio::test]
async fn a_discarded_session_is_gone_from_the_store_before_the_connack_says_so() {
    let (store, server) = start_failing(None).await;
    offline_subscriber(&server, "cleaner", "cl/#", QoS::AtLeastOnce).await;
    assert!(store.inner().session("cleaner").unwrap().is_some());

    store.stall(true);
    let mut c = RawClient::open(addr(&server), ProtocolVersion::V311).await;
    let clean = common::connect_packet("cleaner", ProtocolVersion::V311);
    c.send(Packet::Connect(Box::new(clean))).await;
    let early = c.recv_within(Duration::from_millis(300)).await;
    store.stall(false);
    assert!(early.is_err(), "answered while the store lagged: {early:?}");
    match c.recv().await {
        Some(Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, ReasonCode::Success);
            assert!(!ack.session_present);
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert!(store.inner().session("cleaner").unwrap().is_none());
    server.shutdown().await;
}

/// Stalls `store`, sends PUBREL `packet_id`, and returns once the end of
/// the flow is being written: its PUBCOMP waits until the store is
/// unstalled.
async fn release_while_the_store_lags(
    store: &FailingStore<MemoryStore>,
    client: &mut RawClient,
    packet_id: u16,
) {
    store.stall(true);
    let applies = store.applies();
    client.send(Packet::PubRel(PubAck::new(packet_id))).await;
    eventually("the end of the flow is being written", || {
        store.applies() > applies
    })
    .await;
}

/// A shutdown that begins while a PUBCOMP waits for the store still sends
/// it before the DISCONNECT: the flow's end is stored, and a client left
/// without its PUBCOMP sends the PUBREL again after the restart and is told
/// 0x92 (packet identifier not found) for a message it delivered.
#[tokio::test]
async fn a_shutdown_still_sends_the_pubcomp_that_waited_for_the_store() {
    let (store, server) = start_failing(None).await;
    let (mut publisher, _) =
        RawClient::connect(addr(&server), persistent_connect("leaver", 3600)).await;
    open_qos2_flow(&mut publisher, "x/1", b"one", 7).await;

    release_while_the_store_lags(&store, &mut publisher, 7).await;
    let shutdown = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    store.stall(false);
    let seen = publisher.expect_closed().await;
    shutdown.await.unwrap();
    assert!(
        matches!(seen.first(), Some(Packet::PubComp(a)) if (a.packet_id, a.code) == (7, ReasonCode::Success)),
        "{seen:?}"
    );
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.code == ReasonCode::ServerShuttingDown),
        "{seen:?}"
    );
    assert!(store.inner().incoming_qos2("leaver").unwrap().is_empty());
}

#[tokio::test]
async fn a_qos2_publish_the_store_refused_is_stored_when_sent_again() {
    let (store, server) = start_failing(None).await;
    offline_subscriber(&server, "keeper", "t/#", QoS::ExactlyOnce).await;
    let (mut v5, _) = RawClient::connect(addr(&server), persistent_connect("pub5", 3600)).await;
    let mut v3_connect = common::connect_packet("pub3", ProtocolVersion::V311);
    v3_connect.clean_start = false;
    let (mut v3, _) = RawClient::connect(addr(&server), v3_connect.clone()).await;
    assert_eq!(
        v5.subscribe("mine/#", QoS::AtMostOnce).await,
        [ReasonCode::Success]
    );

    store.disk_full(true);
    v5.send(publish_packet("t/a", b"refused", QoS::ExactlyOnce, Some(3)))
        .await;
    match expect_ack(&mut v5).await {
        Packet::PubRec(a) => assert_eq!((a.packet_id, a.code), (3, ReasonCode::QuotaExceeded)),
        other => panic!("expected PUBREC 0x97, got {other:?}"),
    }
    // MQTT 3.1.1 has no way to say so: the connection is closed.
    v3.send(publish_packet("t/b", b"b", QoS::ExactlyOnce, Some(4)))
        .await;
    v3.expect_closed().await;
    // UNSUBACK has no "quota exceeded": 0x83, but an answer.
    v5.send(Packet::Unsubscribe(tern_codec::Unsubscribe {
        packet_id: 6,
        filters: vec![bytes::Bytes::from_static(b"mine/#")],
        properties: Default::default(),
    }))
    .await;
    match expect_ack(&mut v5).await {
        Packet::UnsubAck(a) => assert_eq!(
            (a.packet_id, a.codes),
            (6, vec![ReasonCode::ImplementationSpecificError])
        ),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    store.disk_full(false);

    // MQTT 5: the refused flow is over, and the id is free for a new
    // message. MQTT 3.1.1: the client sends the same PUBLISH again.
    open_qos2_flow(&mut v5, "t/a", b"reused", 3).await;
    let (mut v3, ack) = RawClient::connect(addr(&server), v3_connect).await;
    assert!(ack.session_present);
    let again = sent_again(publish_packet("t/b", b"b", QoS::ExactlyOnce, Some(4)));
    v3.send(again).await;
    assert!(matches!(expect_ack(&mut v3).await, Packet::PubRec(a) if a.packet_id == 4));
    drop((v5, v3));

    // What the store kept is what was acknowledged as stored.
    server.shutdown().await;
    let server = start_on(Arc::clone(&store) as Arc<dyn Store>).await;
    assert_eq!(drain_session(&server, "keeper").await, ["reused", "b"]);
    server.shutdown().await;
}

#[tokio::test]
async fn a_qos2_publish_sent_again_on_a_new_connection_waits_for_the_first_copy() {
    let (store, server) = start_failing(None).await;
    offline_subscriber(&server, "keeper", "t/#", QoS::ExactlyOnce).await;
    let (mut publisher, _) =
        RawClient::connect(addr(&server), persistent_connect("resender", 3600)).await;

    // The first copy's batch waits for a lagging disk; the client gives up
    // on the connection and sends the PUBLISH again on a new one.
    settle(&server).await;
    store.stall(true);
    publisher
        .send(publish_packet("t/1", b"once", QoS::ExactlyOnce, Some(9)))
        .await;
    publisher.expect_silence(Duration::from_millis(100)).await;
    drop(publisher);
    let (mut publisher, ack) =
        RawClient::connect(addr(&server), persistent_connect("resender", 3600)).await;
    assert!(ack.session_present);
    let again = sent_again(publish_packet("t/1", b"once", QoS::ExactlyOnce, Some(9)));
    publisher.send(again).await;
    let early = publisher.recv_within(Duration::from_millis(300)).await;
    store.stall(false);
    assert!(
        early.is_err(),
        "acknowledged before it was stored: {early:?}"
    );
    assert!(matches!(expect_ack(&mut publisher).await, Packet::PubRec(a) if a.packet_id == 9));
    assert_eq!(store.inner().incoming_qos2("resender").unwrap(), [9]);
    assert_eq!(store.inner().queue("keeper", None).count(), 1);
    drop(publisher);
    server.shutdown().await;
}

#[tokio::test]
async fn a_qos2_publish_sent_again_is_refused_when_the_first_copy_was() {
    let (store, server) = start_failing(None).await;
    offline_subscriber(&server, "keeper", "t/#", QoS::ExactlyOnce).await;
    let (mut publisher, _) =
        RawClient::connect(addr(&server), persistent_connect("unlucky", 3600)).await;

    // The first copy waits for the disk, which then fails to write it, and
    // only it (after what the connections wrote before).
    settle(&server).await;
    store.stall(true);
    store.fail_next_applies(1);
    publisher
        .send(publish_packet("t/1", b"lost", QoS::ExactlyOnce, Some(9)))
        .await;
    publisher.expect_silence(Duration::from_millis(100)).await;
    drop(publisher);
    let (mut publisher, _) =
        RawClient::connect(addr(&server), persistent_connect("unlucky", 3600)).await;
    let again = sent_again(publish_packet("t/1", b"lost", QoS::ExactlyOnce, Some(9)));
    publisher.send(again).await;
    publisher.expect_silence(Duration::from_millis(100)).await;
    store.stall(false);
    // Its own batch is empty, and written: only the first copy failed.
    match expect_ack(&mut publisher).await {
        Packet::PubRec(a) => {
            assert_eq!(a.packet_id, 9);
            assert!(a.code.as_u8() >= 0x80, "{:?}", a.code);
        }
        other => panic!("expected a refusing PUBREC, got {other:?}"),
    }
    drop(publisher);
    server.shutdown().await;
}

#[tokio::test]
async fn a_shared_delivery_moved_to_another_member_is_stored_before_the_puback() {
    // The member that got the message leaves before acknowledging it; it
    // goes to the other member. The publisher's PUBACK must not leave
    // before one of the two entries is durable: moving the delivery may
    // not cancel the first entry while the writer still holds it (for its
    // deletion) and leave the second one waiting.
    let (store, server) = start_failing(Some(Duration::from_millis(800))).await;
    let mut first = online_subscriber(&server, "first", "$share/g/jobs").await;
    let mut second = online_subscriber(&server, "second", "$share/g/jobs").await;
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V5).await;
    publisher
        .send(publish_packet("jobs", b"job", QoS::AtLeastOnce, Some(1)))
        .await;
    // The group's first pick is its first member.
    assert_eq!(&first.recv_publish().await.payload[..], b"job");
    first.send(Packet::Disconnect(Default::default())).await;
    first.expect_closed().await;
    assert_eq!(&second.recv_publish().await.payload[..], b"job");

    match tokio::time::timeout(Duration::from_secs(10), publisher.recv()).await {
        Ok(Some(Packet::PubAck(a))) => assert_eq!((a.packet_id, a.code), (1, ReasonCode::Success)),
        other => panic!("expected the PUBACK, got {other:?}"),
    }
    let stored = |id: &str| store.inner().queue(id, None).count();
    assert!(
        stored("first") + stored("second") > 0,
        "acknowledged while stored for no member"
    );
    common::eventually("the delivery moved in the store", || {
        (stored("first"), stored("second")) == (0, 1)
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn shared_messages_a_restart_left_in_the_store_go_to_another_member_when_their_session_expires(
) {
    shared_messages_of_a_restored_member_go_to_another(false).await;
}

/// The same for a session that expired while the broker was down: it is
/// not purged with its messages at the restart, but handed over first.
#[tokio::test]
async fn shared_messages_of_a_session_that_expired_while_the_broker_was_down_go_to_another_member()
{
    shared_messages_of_a_restored_member_go_to_another(true).await;
}

/// Both members offline, each with half the messages queued. After a
/// restart those halves are stored backlogs, not read; when A's session
/// expires (after the restart, or `while_down`), its half is read and goes
/// to B.
async fn shared_messages_of_a_restored_member_go_to_another(while_down: bool) {
    let expiry_a = if while_down { 600 } else { 3 };
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let server = start_on(Arc::clone(&store)).await;
    common::offline_member(&server, "member-a", expiry_a).await;
    common::offline_member(&server, "member-b", 600).await;
    common::publish_four_jobs(&server).await;
    server.shutdown().await;
    let stored: Vec<_> = store.queue("member-a", None).map(Result::unwrap).collect();
    assert_eq!(stored.len(), 2);
    let group = tern_storage::SharedGroupRecord {
        group: "workers".into(),
        filter: "jobs".into(),
    };
    assert!(stored.iter().all(|e| e.shared.as_ref() == Some(&group)));
    if while_down {
        // Last seen long enough ago that the restart finds it expired.
        let mut record = store.session("member-a").unwrap().unwrap();
        record.last_seen -= 1000;
        let mut batch = tern_storage::Batch::new();
        batch.put_session(record);
        store.apply(&batch).unwrap();
    }

    let server = start_on(Arc::clone(&store)).await;
    if !while_down {
        let a = server.broker().registry.get("member-a").unwrap();
        assert_eq!(a.stored_backlog(), 2, "restored, not read");
    }
    common::until_ended(&server, "member-a").await;
    // A's half went to B.
    let mut b = common::member_b_takes_four_jobs(&server).await;
    b.expect_silence(Duration::from_millis(200)).await;
    common::eventually("A's entries left the store", || {
        store.queue("member-a", None).count() == 0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn the_store_keeps_the_retained_message_memory_has_whatever_order_publishers_commit_in() {
    // Two publishers of one topic: the first replaces the retained message
    // first but, slower to route, commits its journal last. A restart must
    // serve what the broker served before it: the second message.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let server = start_on(Arc::clone(&store)).await;
    let broker = server.broker();
    let retained = |payload: &'static [u8]| {
        tern::message::Message::new(
            bytes::Bytes::from_static(b"state/door"),
            bytes::Bytes::from_static(payload),
            QoS::AtLeastOnce,
            true,
            Default::default(),
            0,
        )
    };
    let (first, second) = (retained(b"open"), retained(b"closed"));
    let (mut slow, mut fast) = (
        tern::persistence::Journal::new(),
        tern::persistence::Journal::new(),
    );
    let _ = broker.publish(&first, &mut slow);
    let _ = broker.publish(&second, &mut fast);
    broker.commit(fast);
    broker.commit(slow);
    settle(&server).await;
    server.shutdown().await;

    let server = start_on(Arc::clone(&store)).await;
    let mut fresh = RawClient::connected(addr(&server), "fresh", ProtocolVersion::V5).await;
    fresh
        .send(common::subscribe_packet(1, "state/#", QoS::AtMostOnce))
        .await;
    assert!(matches!(fresh.recv().await, Some(Packet::SubAck(_))));
    assert_eq!(&fresh.recv_publish().await.payload[..], b"closed");
    server.shutdown().await;
}

/// A durable session's SUBACK waits for its subscription to be stored, and
/// the retained messages the SUBSCRIBE found follow the SUBACK; the
/// subscription is live meanwhile. Subscribes `subscriber` (`no_local` as
/// given) to `state/#` with the store stalled, has `publisher` replace the
/// retained "open" of `state/door` with "closed" (QoS 0), and returns what
/// the subscriber got until the SUBACK, then after it.
async fn replaced_while_the_suback_waits(
    no_local: bool,
    same_client: bool,
) -> (Vec<Packet>, Vec<Packet>) {
    let (store, server) = start_failing(None).await;
    let mut first = RawClient::connected(addr(&server), "publisher", ProtocolVersion::V5).await;
    first
        .send(retained(publish_packet(
            "state/door",
            b"open",
            QoS::AtLeastOnce,
            Some(1),
        )))
        .await;
    assert!(matches!(expect_ack(&mut first).await, Packet::PubAck(_)));
    let (mut subscriber, ack) =
        RawClient::connect(addr(&server), persistent_connect("late", 3600)).await;
    assert_eq!(ack.code, ReasonCode::Success);
    settle(&server).await;
    store.stall(true);
    let mut subscribe = common::subscribe_packet(1, "state/#", QoS::AtMostOnce);
    if let Packet::Subscribe(s) = &mut subscribe {
        s.filters[0].no_local = no_local;
    }
    subscriber.send(subscribe).await;
    let router = &server.broker().router;
    eventually("the subscription is live", || {
        router.subscription_count() == 1
    })
    .await;
    let closed = retained(publish_packet(
        "state/door",
        b"closed",
        QoS::AtMostOnce,
        None,
    ));
    if same_client {
        subscriber.send(closed).await;
    } else {
        first.send(closed).await;
    }
    let retained_store = &server.broker().retained;
    eventually("the newer value is retained", || {
        retained_store
            .get("state/door")
            .is_some_and(|m| &m.payload[..] == b"closed")
    })
    .await;
    let mut before = Vec::new();
    if !same_client {
        // The newer value, live, while the SUBACK waits.
        before.push(subscriber.recv().await.expect("a packet"));
    }
    store.stall(false);
    let mut after = Vec::new();
    while let Ok(Some(packet)) = subscriber.recv_within(Duration::from_millis(300)).await {
        after.push(packet);
    }
    server.shutdown().await;
    (before, after)
}

/// The payload and RETAIN flag of a PUBLISH, or the packet's type.
fn shown(packets: &[Packet]) -> Vec<String> {
    packets
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => format!(
                "{} retain={}",
                String::from_utf8_lossy(&p.payload),
                p.retain
            ),
            other => format!("{:?}", other.packet_type()),
        })
        .collect()
}

#[tokio::test]
async fn a_retained_message_replaced_before_its_suback_does_not_follow_its_successor() {
    // The newer value reaches the subscriber live; the older one, found
    // before it, must not come after it (MQTT-4.6.0-5): the client would
    // end with the stale one as the topic's state. The value now is sent
    // in its place, flagged RETAIN.
    let (before, after) = replaced_while_the_suback_waits(false, false).await;
    assert_eq!(shown(&before), ["closed retain=false"]);
    assert_eq!(shown(&after), ["SubAck", "closed retain=true"]);
}

#[tokio::test]
async fn a_retained_message_replaced_by_the_subscriber_itself_under_no_local_gives_the_new_value() {
    // No Local keeps the subscriber's own publish from it: the value it
    // replaced is still not sent, and the topic's value now, its own, comes
    // as a retained message, as it would have had it subscribed a moment
    // later.
    let (before, after) = replaced_while_the_suback_waits(true, true).await;
    assert!(before.is_empty());
    assert_eq!(shown(&after), ["SubAck", "closed retain=true"]);
}

#[tokio::test]
async fn a_durable_session_whose_record_cannot_be_stored_is_disconnected() {
    // Whatever the connection went on to have acknowledged would belong to
    // a session a restart does not know: it is closed instead, and its
    // record is written when the client is back and the disk has room.
    let (store, server) = start_failing(None).await;
    store.disk_full(true);
    let (mut c, ack) =
        RawClient::connect(addr(&server), persistent_connect("unstored", 3600)).await;
    assert_eq!(ack.code, ReasonCode::Success);
    c.expect_disconnect(ReasonCode::QuotaExceeded).await;
    assert!(store.inner().session("unstored").unwrap().is_none());

    store.disk_full(false);
    let (_c, ack) = RawClient::connect(addr(&server), persistent_connect("unstored", 3600)).await;
    assert_eq!(ack.code, ReasonCode::Success);
    settle(&server).await;
    assert!(store.inner().session("unstored").unwrap().is_some());
    server.shutdown().await;
}

#[tokio::test]
async fn a_qos2_flow_refused_for_its_retained_copy_is_not_left_open_in_the_store() {
    // The PUBREC of a retained QoS 2 message depends on two batches: the
    // retained message's and the publisher's own, which opens the flow.
    // When only the first fails, the flow ends (the client is told, and may
    // use the id again), in the store as well: a restart must not take a
    // new message with that id for a retransmission.
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let mut config = Config::default();
    durable(&mut config);
    // One batch per write: the two fail or succeed on their own.
    config.storage.batch_max_ops = 1;
    let server = Server::start_with_store(config, Arc::clone(&store) as Arc<dyn Store>)
        .await
        .expect("broker starts");
    let (mut publisher, _) =
        RawClient::connect(addr(&server), persistent_connect("retainer", 3600)).await;
    settle(&server).await;

    store.fail_next_applies(1);
    let state = retained(publish_packet("state/x", b"on", QoS::ExactlyOnce, Some(5)));
    publisher.send(state).await;
    match expect_ack(&mut publisher).await {
        Packet::PubRec(a) => assert_eq!(
            (a.packet_id, a.code),
            (5, ReasonCode::ImplementationSpecificError)
        ),
        other => panic!("expected a refusing PUBREC, got {other:?}"),
    }
    settle(&server).await;
    assert!(store.inner().incoming_qos2("retainer").unwrap().is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn a_moved_shared_delivery_never_deletes_an_entry_of_the_next_session() {
    // The departing member's deletion goes to the store only once the new
    // member's entry is stored. A session that ends (DISCONNECT with
    // expiry 0) waits for that too, and so does its client coming back
    // with a new session, whose entries count from 1 again: no deletion of
    // the old session may remove the new session's first entry.
    let (store, server) = start_failing(Some(Duration::from_millis(200))).await;
    let mut first = online_subscriber(&server, "first", "$share/g/jobs").await;
    let _second = online_subscriber(&server, "second", "$share/g/jobs").await;
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V5).await;
    publisher
        .send(publish_packet("jobs", b"job", QoS::AtLeastOnce, Some(1)))
        .await;
    assert_eq!(&first.recv_publish().await.payload[..], b"job");
    assert!(matches!(
        expect_ack(&mut publisher).await,
        Packet::PubAck(_)
    ));
    settle(&server).await;

    // The move waits for a lagging disk while the session ends and its
    // client comes back, subscribes and is sent its first message. The
    // session ends only once the move is stored, and the client's return
    // waits for that.
    store.stall(true);
    let mut bye = tern_codec::Disconnect::default();
    bye.properties.session_expiry_interval = Some(0);
    first.send(Packet::Disconnect(bye)).await;
    first.expect_closed().await;
    let returning = tokio::spawn(RawClient::connect(
        addr(&server),
        persistent_connect("first", 3600),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !returning.is_finished(),
        "connected before the move was stored"
    );
    store.stall(false);
    let (mut again, ack) = returning.await.unwrap();
    assert!(!ack.session_present);
    again
        .send(common::subscribe_packet(1, "direct", QoS::AtLeastOnce))
        .await;
    common::eventually("subscribed", || {
        server.broker().router.subscription_count() == 2
    })
    .await;
    publisher
        .send(publish_packet("direct", b"mine", QoS::AtLeastOnce, Some(2)))
        .await;
    let mut got = Vec::new();
    while got.len() < 2 {
        match expect_ack(&mut again).await {
            Packet::SubAck(_) => got.push("suback".to_owned()),
            Packet::Publish(p) => got.push(String::from_utf8(p.payload.to_vec()).unwrap()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got.contains(&"mine".to_owned()), "{got:?}");
    assert!(matches!(expect_ack(&mut publisher).await, Packet::PubAck(a) if a.packet_id == 2));
    settle(&server).await;
    assert_eq!(
        store.inner().queue("first", None).count(),
        1,
        "the new session's unacknowledged entry is stored"
    );
    server.shutdown().await;
}

/// The stored queue entries of `client_id`: (packet id, state).
fn stored_states(
    store: &FailingStore<MemoryStore>,
    client_id: &str,
) -> Vec<(Option<u16>, tern_storage::DeliveryState)> {
    store
        .inner()
        .queue(client_id, None)
        .map(Result::unwrap)
        .map(|e| (e.packet_id, e.state))
        .collect()
}

/// Sends `packet` while the store refuses every write, checks that nothing
/// answers it then (for longer than a retry takes), frees the store, and
/// returns what comes next.
async fn sent_while_the_disk_is_full(
    store: &FailingStore<MemoryStore>,
    client: &mut RawClient,
    packet: Packet,
) -> Option<Packet> {
    store.disk_full(true);
    client.send(packet).await;
    let early = client.recv_within(Duration::from_millis(1500)).await;
    assert!(early.is_err(), "answered before it was stored: {early:?}");
    store.disk_full(false);
    match tokio::time::timeout(Duration::from_secs(5), client.recv()).await {
        Ok(next) => next,
        Err(_) => panic!("nothing once the store took writes again"),
    }
}

/// A durable session subscribed to `filter` at QoS 2.
async fn qos2_subscriber(server: &Server, client_id: &str, filter: &str) -> RawClient {
    let (mut c, _) = RawClient::connect(addr(server), persistent_connect(client_id, 3600)).await;
    assert_eq!(
        c.subscribe(filter, QoS::ExactlyOnce).await,
        vec![ReasonCode::granted(QoS::ExactlyOnce)]
    );
    c
}

/// A broker on a failing store, and a durable session "receiver" that was
/// sent one QoS 2 message it has not answered yet: the store, the broker,
/// the receiver and the message's packet id.
async fn one_qos2_delivery() -> (Arc<FailingStore<MemoryStore>>, Server, RawClient, u16) {
    let (store, server) = start_failing(None).await;
    let mut sub = qos2_subscriber(&server, "receiver", "q/#").await;
    let mut publisher = RawClient::connected(addr(&server), "sender", ProtocolVersion::V5).await;
    publisher.publish("q/1", b"once", QoS::ExactlyOnce, 1).await;
    let packet_id = match sub.recv().await {
        Some(Packet::Publish(p)) => p.packet_id.unwrap(),
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    (store, server, sub, packet_id)
}

#[tokio::test]
async fn a_pubrel_the_store_refused_waits_until_a_retry_stores_it() {
    // A PUBREL sent while the store still says "awaiting PUBREC" lets a
    // crash bring the PUBLISH back, and the client, which released the
    // packet id when it had the PUBREL, takes it for a new message.
    let (store, server, mut sub, packet_id) = one_qos2_delivery().await;

    let answer =
        sent_while_the_disk_is_full(&store, &mut sub, Packet::PubRec(PubAck::new(packet_id))).await;
    match answer {
        Some(Packet::PubRel(r)) => assert_eq!(r.packet_id, packet_id),
        other => panic!("expected the PUBREL once stored, got {other:?}"),
    }
    assert_eq!(
        stored_states(&store, "receiver"),
        [(Some(packet_id), tern_storage::DeliveryState::AwaitingComp)]
    );
    sub.send(Packet::PubComp(PubAck::new(packet_id))).await;
    common::eventually("the flow's entry is deleted", || {
        stored_states(&store, "receiver").is_empty()
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_qos2_publish_whose_packet_id_the_store_refused_waits_until_a_retry_stores_it() {
    // The second message waits in the queue behind a window of one; the
    // PUBCOMP of the first gives it a packet id, and the store refuses
    // that. Sent anyway, a crash would bring it back from the store as a
    // new message: the client would get it twice.
    let (store, server) = start_failing(None).await;
    let mut connect = persistent_connect("receiver", 3600);
    connect.properties.receive_maximum = Some(1);
    let (mut sub, _) = RawClient::connect(addr(&server), connect).await;
    assert_eq!(
        sub.subscribe("q/#", QoS::ExactlyOnce).await,
        vec![ReasonCode::granted(QoS::ExactlyOnce)]
    );
    let mut publisher = RawClient::connected(addr(&server), "sender", ProtocolVersion::V5).await;
    publisher
        .publish("q/1", b"first", QoS::ExactlyOnce, 1)
        .await;
    publisher
        .publish("q/2", b"second", QoS::ExactlyOnce, 2)
        .await;
    let first = match sub.recv().await {
        Some(Packet::Publish(p)) => p.packet_id.unwrap(),
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    sub.send(Packet::PubRec(PubAck::new(first))).await;
    match sub.recv().await {
        Some(Packet::PubRel(r)) => assert_eq!(r.packet_id, first),
        other => panic!("expected PUBREL, got {other:?}"),
    }

    let answer =
        sent_while_the_disk_is_full(&store, &mut sub, Packet::PubComp(PubAck::new(first))).await;
    let second = match answer {
        Some(Packet::Publish(p)) => {
            assert_eq!(&p.payload[..], b"second");
            p.packet_id.unwrap()
        }
        other => panic!("expected the PUBLISH once stored, got {other:?}"),
    };
    // On the wire only with its packet id in the store: a restart sends it
    // again with that id (DUP), never as a new message.
    let stored = stored_states(&store, "receiver");
    assert!(
        stored.contains(&(Some(second), tern_storage::DeliveryState::AwaitingAck)),
        "{stored:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_pubrel_waiting_for_the_store_goes_once_the_session_is_no_longer_stored() {
    // Resumed with session expiry 0, the session is no longer kept in the
    // store: its PUBREL waits for nothing any more.
    let (store, server, mut sub, packet_id) = one_qos2_delivery().await;
    store.fail_apply(true);
    sub.send(Packet::PubRec(PubAck::new(packet_id))).await;
    sub.expect_silence(Duration::from_millis(300)).await;
    drop(sub);
    common::until_offline(&server, "receiver").await;

    store.fail_apply(false);
    let (mut again, ack) =
        RawClient::connect(addr(&server), persistent_connect("receiver", 0)).await;
    assert!(ack.session_present);
    match tokio::time::timeout(Duration::from_secs(5), again.recv()).await {
        Ok(Some(Packet::PubRel(r))) => assert_eq!(r.packet_id, packet_id),
        other => panic!("expected the PUBREL, got {other:?}"),
    }
    server.shutdown().await;
}

/// The same for a PUBREL that arrives as the shutdown begins: whether its
/// reader handles it before the close, after it (while the writer is
/// already told to close: the writer waits for the reader's last
/// acknowledgements), or not at all, the client has its PUBCOMP exactly
/// when the store no longer holds the flow; otherwise it sends the PUBREL
/// again after the restart. The timing is left to chance, so the case runs
/// several times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubrel_arriving_as_the_shutdown_begins_is_acknowledged_exactly_when_stored() {
    for run in 0..8 {
        let store = Arc::new(MemoryStore::new());
        let server = start_on(Arc::clone(&store) as Arc<dyn Store>).await;
        let (mut publisher, _) =
            RawClient::connect(addr(&server), persistent_connect("leaver", 3600)).await;
        open_qos2_flow(&mut publisher, "x/1", b"one", 7).await;
        publisher.send(Packet::PubRel(PubAck::new(7))).await;
        let shutdown = tokio::spawn(server.shutdown());
        let seen = publisher.expect_closed().await;
        shutdown.await.unwrap();
        let completed = matches!(seen.first(), Some(Packet::PubComp(a)) if a.packet_id == 7);
        let stored = store.incoming_qos2("leaver").unwrap();
        assert_eq!(
            completed,
            stored.is_empty(),
            "run {run}: {seen:?}, stored {stored:?}"
        );
        assert!(
            matches!(seen.last(), Some(Packet::Disconnect(d)) if d.code == ReasonCode::ServerShuttingDown),
            "run {run}: {seen:?}"
        );
    }
}

/// A closing connection waits for the acknowledgements still waiting for
/// the store for one second in all, then sends its DISCONNECT: deliveries
/// that keep waking its writer meanwhile do not extend the wait past the
/// connection's close grace, which would lose the DISCONNECT.
#[tokio::test]
async fn a_lagging_store_delays_the_disconnect_by_a_second_at_most() {
    let (store, server) = start_failing(None).await;
    let (mut client, _) =
        RawClient::connect(addr(&server), persistent_connect("stuck", 3600)).await;
    client.subscribe("feed", QoS::AtMostOnce).await;
    open_qos2_flow(&mut client, "x/1", b"one", 7).await;

    release_while_the_store_lags(&store, &mut client, 7).await;
    let mut feeder = RawClient::connected(addr(&server), "feeder", ProtocolVersion::V5).await;
    let feeding = tokio::spawn(async move {
        loop {
            feeder.publish("feed", b"tick", QoS::AtMostOnce, 0).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    // A protocol error: the broker closes the connection.
    client.send(Packet::PingResp).await;
    let seen = client.expect_closed().await;
    feeding.abort();
    store.stall(false);
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.code == ReasonCode::ProtocolError),
        "{seen:?}"
    );
    server.shutdown().await;
}

/// A will with `delay` seconds of Will Delay Interval, to `topic`, QoS 1,
/// retained.
fn will_to(topic: &'static str, delay: Option<u32>) -> tern_codec::Will {
    let properties = tern_codec::properties::WillProperties {
        will_delay_interval: delay,
        ..Default::default()
    };
    tern_codec::Will {
        topic: bytes::Bytes::from_static(topic.as_bytes()),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties,
    }
}

/// A shutdown closes its clients' connections without their DISCONNECT, so
/// their wills go out (MQTT-3.1.2-8), as after a crash: at once to the
/// durable sessions and the retained store, which outlive the restart; a
/// delayed one after the restart, unless its client is back within the
/// delay.
#[tokio::test]
async fn a_shutdown_publishes_the_wills_of_the_clients_it_disconnects() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let server = start_on(Arc::clone(&store)).await;
    offline_subscriber(&server, "keeper", "wills/#", QoS::AtLeastOnce).await;
    let mut at_once = common::connect_packet("at-once", ProtocolVersion::V5);
    at_once.will = Some(will_to("wills/at-once", None));
    let mut delayed = persistent_connect("delayed", 3600);
    delayed.will = Some(will_to("wills/delayed", Some(1)));
    let mut back_in_time = persistent_connect("back-in-time", 3600);
    back_in_time.will = Some(will_to("wills/back-in-time", Some(30)));
    let mut clients = Vec::new();
    for connect in [at_once, delayed, back_in_time.clone()] {
        clients.push(RawClient::connect(addr(&server), connect).await.0);
    }
    server.shutdown().await;
    for mut c in clients {
        c.expect_disconnect(ReasonCode::ServerShuttingDown).await;
    }

    let server = start_on(Arc::clone(&store)).await;
    let (_back, ack) = RawClient::connect(addr(&server), back_in_time).await;
    assert!(ack.session_present);
    let (mut keeper, ack) =
        RawClient::connect(addr(&server), persistent_connect("keeper", 3600)).await;
    assert!(ack.session_present);
    let mut got = Vec::new();
    while let Ok(Some(Packet::Publish(p))) = keeper.recv_within(Duration::from_millis(2500)).await {
        got.push(String::from_utf8_lossy(&p.topic).into_owned());
        if let Some(id) = p.packet_id {
            keeper.send(Packet::PubAck(PubAck::new(id))).await;
        }
    }
    assert_eq!(got, ["wills/at-once", "wills/delayed"]);
    let mut late = RawClient::connected(addr(&server), "late", ProtocolVersion::V5).await;
    late.subscribe("wills/at-once", QoS::AtLeastOnce).await;
    assert_eq!(&late.recv_publish().await.payload[..], b"gone", "retained");
    server.shutdown().await;
}

/// A broker over a store that lags from now on (stalled), a persistent
/// subscriber `client_id` (session expiry `expiry`) of `filter` at QoS 2,
/// and a publisher, both connected before the store stalled.
async fn qos2_subscriber_over_a_lagging_store(
    client_id: &str,
    expiry: u32,
    filter: &str,
) -> (Arc<FailingStore<MemoryStore>>, Server, RawClient, RawClient) {
    let (store, server) = start_failing(None).await;
    let (mut sub, _) =
        RawClient::connect(addr(&server), persistent_connect(client_id, expiry)).await;
    assert_eq!(
        sub.subscribe(filter, QoS::ExactlyOnce).await,
        vec![ReasonCode::granted(QoS::ExactlyOnce)]
    );
    let publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V5).await;
    settle(&server).await;
    store.stall(true);
    (store, server, sub, publisher)
}

/// A member whose shared deliveries still wait for the store: a QoS 2 one
/// waits for its packet id to be durable before it is sent, and a QoS 1
/// one queued behind it waits too (the order of the topic's messages).
/// Neither was ever on the wire, so both may go to another member.
///
/// Returns the lagging store, the broker, the publisher and the member.
/// `expiry`: the member's session expiry.
async fn shared_deliveries_waiting_for_the_store(
    expiry: u32,
) -> (Arc<FailingStore<MemoryStore>>, Server, RawClient, RawClient) {
    let (store, server, mut leaving, mut publisher) =
        qos2_subscriber_over_a_lagging_store("leaving", expiry, "$share/g/jobs/#").await;
    publisher
        .send(publish_packet("jobs/2", b"two", QoS::ExactlyOnce, Some(1)))
        .await;
    publisher
        .send(publish_packet("jobs/1", b"one", QoS::AtLeastOnce, Some(2)))
        .await;
    // Neither leaves before the store has its packet id.
    leaving.expect_silence(Duration::from_millis(300)).await;
    (store, server, publisher, leaving)
}

/// Sends DISCONNECT (with session expiry 0 if `ends_now`) and waits for
/// the close.
async fn leave(mut member: RawClient, ends_now: bool) {
    let mut bye = tern_codec::Disconnect::default();
    if ends_now {
        bye.properties.session_expiry_interval = Some(0);
    }
    member.send(Packet::Disconnect(bye)).await;
    member.expect_closed().await;
}

/// The other member: a session of its own (not stored), subscribed.
async fn staying_member(server: &Server) -> RawClient {
    let mut staying = RawClient::connected(addr(server), "staying", ProtocolVersion::V5).await;
    assert_eq!(
        staying.subscribe("$share/g/jobs/#", QoS::ExactlyOnce).await,
        vec![ReasonCode::granted(QoS::ExactlyOnce)]
    );
    staying
}

/// Receives two PUBLISHes, completing their flows; their payloads, sorted.
async fn take_both(c: &mut RawClient) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    while got.len() < 2 {
        match c.recv().await {
            Some(Packet::Publish(p)) => {
                assert!(!p.dup, "never sent before, yet DUP: {p:?}");
                let id = p.packet_id.expect("QoS 1 or 2");
                c.send(match p.qos {
                    QoS::ExactlyOnce => Packet::PubRec(PubAck::new(id)),
                    _ => Packet::PubAck(PubAck::new(id)),
                })
                .await;
                got.push(p.payload.to_vec());
            }
            Some(Packet::PubRel(r)) => c.send(Packet::PubComp(PubAck::new(r.packet_id))).await,
            other => panic!("expected a PUBLISH, got {other:?}"),
        }
    }
    got.sort();
    got
}

#[tokio::test]
async fn shared_deliveries_that_wait_for_the_store_go_to_another_member_when_theirs_ends() {
    // DISCONNECT with session expiry 0: the session ends at once, after
    // handing over what it holds.
    let (store, server, mut publisher, leaving) =
        shared_deliveries_waiting_for_the_store(3600).await;
    let mut staying = staying_member(&server).await;
    leave(leaving, true).await;
    store.stall(false);
    assert_eq!(
        take_both(&mut staying).await,
        [b"one".to_vec(), b"two".to_vec()]
    );
    for _ in 0..2 {
        assert!(matches!(
            expect_ack(&mut publisher).await,
            Packet::PubRec(_) | Packet::PubAck(_)
        ));
    }
    until_ended(&server, "leaving").await;
    let metrics = &server.broker().metrics;
    assert_eq!(metrics.shared_ended_with_session.get(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn shared_deliveries_made_durable_while_their_member_was_away_go_to_another_when_it_expires()
{
    // The session stays for 2 s after its client left; the store catches
    // up meanwhile, with nobody to send the two deliveries to. They were
    // never sent when the session expires.
    let (store, server, mut publisher, leaving) = shared_deliveries_waiting_for_the_store(2).await;
    leave(leaving, false).await;
    store.stall(false);
    for _ in 0..2 {
        assert!(matches!(
            expect_ack(&mut publisher).await,
            Packet::PubRec(_) | Packet::PubAck(_)
        ));
    }
    let mut staying = staying_member(&server).await;
    assert_eq!(
        take_both(&mut staying).await,
        [b"one".to_vec(), b"two".to_vec()]
    );
    until_ended(&server, "leaving").await;
    let metrics = &server.broker().metrics;
    assert_eq!(metrics.shared_ended_with_session.get(), 0);
    server.shutdown().await;
}

/// A QoS 2 delivery waits for its packet id to be stored before it is sent.
/// Its client leaving meanwhile, it is sent when the client is back, and
/// for the first time: DUP 0 (MQTT-3.3.1-1), not as a retransmission.
#[tokio::test]
async fn a_delivery_made_durable_while_its_client_was_away_is_first_sent_without_dup() {
    let (store, server, mut sub, mut publisher) =
        qos2_subscriber_over_a_lagging_store("away", 3600, "d/#").await;
    publisher
        .send(publish_packet("d/1", b"one", QoS::ExactlyOnce, Some(1)))
        .await;
    sub.expect_silence(Duration::from_millis(300)).await;
    sub.send(Packet::Disconnect(Default::default())).await;
    sub.expect_closed().await;
    store.stall(false);
    assert!(matches!(
        expect_ack(&mut publisher).await,
        Packet::PubRec(_)
    ));
    settle(&server).await;

    let (mut back, ack) = RawClient::connect(addr(&server), persistent_connect("away", 3600)).await;
    assert!(ack.session_present);
    let publish = back.recv_publish().await;
    assert_eq!(&publish.payload[..], b"one");
    assert!(
        !publish.dup,
        "sent for the first time, yet DUP: {publish:?}"
    );
    server.shutdown().await;
}
