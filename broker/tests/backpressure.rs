//! Broker-wide back-pressure: when queued outbound bytes pass
//! `limits.max_outbound_bytes`, the broker stops reading from publishers
//! instead of queueing without bound; it resumes when subscribers drain.

mod common;

use std::time::Duration;

use common::*;
use tern_codec::{Packet, ProtocolVersion, QoS};
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn publishers_are_slowed_when_the_budget_is_full_and_resume_after() {
    let server = start(|c| {
        c.limits.max_outbound_bytes = 64 * 1024;
        c.limits.max_client_outbound_bytes = 16 * 1024 * 1024;
    })
    .await;
    let broker = std::sync::Arc::clone(server.broker());
    let budget_limit = 64 * 1024;

    // A subscriber that does not read for now.
    let mut sub = RawClient::connected(addr(&server), "sleeper", ProtocolVersion::V311).await;
    sub.subscribe("bp", QoS::AtMostOnce).await;

    // A publisher that writes as fast as it can, 1 KiB payloads.
    let mut publisher =
        RawClient::connected(addr(&server), "firehose", ProtocolVersion::V311).await;
    let mut frame = bytes::BytesMut::new();
    tern_codec::encode_packet(
        &publish_packet("bp", &[0x55; 1024], QoS::AtMostOnce, None),
        ProtocolVersion::V311,
        &mut frame,
    )
    .unwrap();
    let mut sent = 0usize;
    let stalled = loop {
        let write = tokio::time::timeout(
            Duration::from_millis(500),
            publisher.stream.write_all(&frame),
        )
        .await;
        match write {
            Ok(Ok(())) => sent += 1,
            Ok(Err(e)) => panic!("publisher write failed: {e}"),
            Err(_) => break true,
        }
        if sent > 200_000 {
            break false;
        }
    };
    assert!(
        stalled,
        "the publisher was never slowed down ({sent} messages written)"
    );
    let queued = broker.registry.context().budget.queued();
    // The budget may be overshot by what was already read when it filled:
    // at most one read buffer's worth of messages.
    assert!(
        queued >= budget_limit && queued < budget_limit + 256 * 1024,
        "queued {queued}"
    );
    assert_eq!(broker.metrics.messages_dropped_qos0.get(), 0);

    // The subscriber reads: everything written so far arrives, none dropped.
    let mut received = 0usize;
    while received < sent {
        match sub.recv_within(Duration::from_secs(5)).await {
            Ok(Some(Packet::Publish(_))) => received += 1,
            other => panic!("after {received} of {sent}: {other:?}"),
        }
    }
    assert_eq!(received, sent);
    drop(sub);
    drop(publisher);
    eventually("budget released", || {
        broker.registry.context().budget.balance() == 0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_subscriber_loses_only_its_own_qos0_messages() {
    const MESSAGES: usize = 20_000;
    let server = start(|c| c.limits.max_client_outbound_bytes = 256 * 1024).await;
    let broker = std::sync::Arc::clone(server.broker());
    let mut slow = RawClient::connected(addr(&server), "slow", ProtocolVersion::V311).await;
    slow.subscribe("fan", QoS::AtMostOnce).await;
    let mut fast = RawClient::connected(addr(&server), "fast", ProtocolVersion::V311).await;
    fast.subscribe("fan", QoS::AtMostOnce).await;
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while n < MESSAGES {
            match fast.recv_within(Duration::from_secs(10)).await {
                Ok(Some(Packet::Publish(_))) => n += 1,
                other => panic!("fast subscriber after {n}: {other:?}"),
            }
        }
        n
    });
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V311).await;
    let mut frame = bytes::BytesMut::new();
    tern_codec::encode_packet(
        &publish_packet("fan", &[1; 1024], QoS::AtMostOnce, None),
        ProtocolVersion::V311,
        &mut frame,
    )
    .unwrap();
    for i in 0..MESSAGES {
        // A pace the reading subscriber keeps up with (about 20 MB/s).
        if i % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The publisher is never held up by the subscriber that does not read.
        tokio::time::timeout(Duration::from_secs(5), publisher.stream.write_all(&frame))
            .await
            .expect("publisher not blocked")
            .unwrap();
    }
    assert_eq!(
        reader.await.unwrap(),
        MESSAGES,
        "the fast subscriber got everything"
    );
    let dropped = broker.metrics.messages_dropped_qos0.get();
    assert!(dropped > 0, "the slow subscriber's queue is bounded");
    drop(slow);
    server.shutdown().await;
}

/// `stalled` subscribers to `flood` that never read, one publisher writing
/// `messages` QoS 0 messages of 1 KiB to it, each write bounded by 5 s (a
/// publisher held up longer fails the test); then a bystander's round trip
/// must work, the stalled subscribers must have lost messages, and once they
/// are gone the budget must balance to exactly 0.
async fn flood_past_stalled_subscribers(server: tern::Server, stalled: usize, messages: usize) {
    let broker = std::sync::Arc::clone(server.broker());
    let mut subscribers = Vec::new();
    for i in 0..stalled {
        let id = format!("stalled-{i}");
        let mut s = RawClient::connected(addr(&server), &id, ProtocolVersion::V311).await;
        s.subscribe("flood", QoS::AtMostOnce).await;
        subscribers.push(s);
    }
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V311).await;
    let mut frame = bytes::BytesMut::new();
    tern_codec::encode_packet(
        &publish_packet("flood", &[7; 1024], QoS::AtMostOnce, None),
        ProtocolVersion::V311,
        &mut frame,
    )
    .unwrap();
    for i in 0..messages {
        tokio::time::timeout(Duration::from_secs(5), publisher.stream.write_all(&frame))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the publisher was held up after {i} messages (budget {})",
                    broker.registry.context().budget.queued()
                )
            })
            .unwrap();
    }
    let mut bystander =
        RawClient::connected(addr(&server), "bystander", ProtocolVersion::V311).await;
    bystander.subscribe("other", QoS::AtMostOnce).await;
    let hello = publish_packet("other", b"still served", QoS::AtMostOnce, None);
    publisher.send(hello).await;
    assert_eq!(&bystander.recv_publish().await.payload[..], b"still served");
    assert!(broker.metrics.messages_dropped_qos0.get() > 0);
    drop(subscribers);
    eventually("budget released", || {
        broker.registry.context().budget.balance() == 0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_stalled_at_their_bound_cannot_pause_the_broker() {
    // Eight subscribers that never read, each bounded at 16 KiB of queued
    // messages: together more than the broker-wide budget of 64 KiB. Each
    // loses its own QoS 0 messages beyond its bound; the broker keeps
    // reading from everyone else. 16,000 messages: more than the sockets'
    // kernel buffers take, so every stalled queue reaches its bound.
    let server = start(|c| {
        c.limits.max_outbound_bytes = 64 * 1024;
        c.limits.max_client_outbound_bytes = 16 * 1024;
        // No grace for a full queue (each one would hold the publisher up
        // to a second, once): what is tested is the broker-wide budget.
        c.limits.queue_full_wait_ms = 0;
    })
    .await;
    flood_past_stalled_subscribers(server, 8, 16_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_stalled_below_their_bound_pause_the_broker_only_briefly() {
    // Four subscribers that never read fill the broker-wide budget (64 KiB)
    // long before their own bound (1 MiB): every reader pauses. A sweep
    // every queue_full_wait_ms (200) finds their queues untaken and stops
    // counting them, so readers resume; the stalled ones then fill to their
    // bound and lose their own QoS 0 messages.
    let server = start(|c| {
        c.limits.max_outbound_bytes = 64 * 1024;
        c.limits.max_client_outbound_bytes = 1024 * 1024;
        c.limits.queue_full_wait_ms = 200;
    })
    .await;
    flood_past_stalled_subscribers(server, 4, 20_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_qos1_subscriber_cannot_freeze_the_broker() {
    let server = start(|c| {
        c.limits.max_outbound_bytes = 256 * 1024;
        c.limits.max_client_outbound_bytes = 64 * 1024;
        c.limits.max_queued_messages = 100;
    })
    .await;
    let broker = std::sync::Arc::clone(server.broker());
    let mut stuck = RawClient::connected(addr(&server), "stuck", ProtocolVersion::V311).await;
    stuck.subscribe("big", QoS::AtLeastOnce).await;
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V311).await;
    for i in 0..300u16 {
        publisher
            .publish("big", &[9; 16 * 1024], QoS::AtLeastOnce, i + 1)
            .await;
    }
    // The stuck client holds at most its own share of the budget...
    let queued = broker.registry.context().budget.queued();
    assert!(queued < 256 * 1024, "queued {queued}");
    // ...so everyone else is still served.
    let mut bystander =
        RawClient::connected(addr(&server), "bystander", ProtocolVersion::V311).await;
    for _ in 0..3 {
        bystander.send(Packet::PingReq).await;
        assert!(matches!(bystander.recv().await, Some(Packet::PingResp)));
    }
    drop(stuck);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_is_paused_not_buffered() {
    let server = start(|_| {}).await;
    let broker = std::sync::Arc::clone(server.broker());
    let mut flooder = RawClient::connected(addr(&server), "flooder", ProtocolVersion::V311).await;
    // 2 MB of PINGREQ, never reading a PINGRESP.
    let pings = [0xC0u8, 0x00].repeat(1024 * 1024);
    let _ = tokio::time::timeout(Duration::from_secs(3), flooder.stream.write_all(&pings)).await;
    let session = broker.registry.get("flooder").expect("session");
    let mut backlog = 0;
    for _ in 0..10 {
        backlog = backlog.max(session.attached_control_backlog());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        backlog <= tern::connection::MAX_UNSENT_CONTROL_PACKETS + 4096,
        // (+ what one read may add before the check)
        "replies queued: {backlog}"
    );
    let mut other = RawClient::connected(addr(&server), "other", ProtocolVersion::V311).await;
    other.send(Packet::PingReq).await;
    assert!(matches!(other.recv().await, Some(Packet::PingResp)));
    drop(flooder);
    server.shutdown().await;
}

/// Fan-in: many QoS 1 publishers outrun one subscriber that keeps up. Its
/// queue fills, and instead of dropping messages already acknowledged to
/// their publishers, the broker stops reading from those publishers until
/// the queue has room: every acknowledged message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_wait_for_a_full_queue_that_drains_and_nothing_acknowledged_is_lost() {
    let server = start(|c| {
        c.limits.max_inflight = 4;
        c.limits.max_queued_messages = 10;
    })
    .await;
    fan_in(&server, rumqttc::QoS::AtLeastOnce, 4, 500, b"m").await;
    let dropped = &server.broker().metrics.messages_dropped_queue_full;
    assert_eq!(dropped.get(), 0);
    server.shutdown().await;
}

/// The same for QoS 0 and the connection's outbound bound: a subscriber
/// that keeps up slows its publishers down instead of losing messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_publishers_wait_for_a_subscriber_that_keeps_up() {
    let server = start(|c| c.limits.max_client_outbound_bytes = 8 * 1024).await;
    fan_in(&server, rumqttc::QoS::AtMostOnce, 4, 2000, &[7; 1024]).await;
    let dropped = &server.broker().metrics.messages_dropped_qos0;
    assert_eq!(dropped.get(), 0);
    server.shutdown().await;
}

/// `publishers` rumqttc clients publish `each` messages as fast as they can
/// to one rumqttc subscriber of `in/+`, which must receive every one.
async fn fan_in(
    server: &tern::Server,
    qos: rumqttc::QoS,
    publishers: usize,
    each: usize,
    filler: &[u8],
) {
    let port = addr(server).port();
    let mut options = rumqttc::MqttOptions::new("fan-in-sub", "127.0.0.1", port);
    options.set_inflight(100);
    let (sub, mut sub_rx) = run_rumqttc(options);
    sub.subscribe("in/+", qos).await.unwrap();
    loop {
        if let Some(rumqttc::Packet::SubAck(_)) = sub_rx.recv().await {
            break;
        }
    }
    let mut done = Vec::new();
    for p in 0..publishers {
        let mut options = rumqttc::MqttOptions::new(format!("fan-in-pub-{p}"), "127.0.0.1", port);
        options.set_inflight(100);
        let (client, mut rx) = run_rumqttc(options);
        let filler = filler.to_vec();
        tokio::spawn(async move {
            for i in 0..each {
                let mut payload = format!("{p}/{i}/").into_bytes();
                payload.extend_from_slice(&filler);
                client
                    .publish(format!("in/{p}"), qos, false, payload)
                    .await
                    .unwrap();
            }
            // The event loop ends with the last handle: keep it until the
            // subscriber has counted.
            std::future::pending::<()>().await;
        });
        // Reads the publisher's incoming packets (its event loop stops when
        // nobody does) and counts the PUBACKs.
        let acks = tokio::spawn(async move {
            let mut n = 0;
            while let Some(packet) = rx.recv().await {
                if let rumqttc::Packet::PubAck(_) = packet {
                    n += 1;
                    if n == each {
                        break;
                    }
                }
            }
            n
        });
        if qos != rumqttc::QoS::AtMostOnce {
            done.push(acks);
        }
    }
    for handle in done {
        let acked = tokio::time::timeout(Duration::from_secs(60), handle)
            .await
            .expect("every publish acknowledged")
            .unwrap();
        assert_eq!(acked, each);
    }
    let mut received = std::collections::HashSet::new();
    while received.len() < publishers * each {
        match tokio::time::timeout(Duration::from_secs(10), sub_rx.recv()).await {
            Ok(Some(rumqttc::Packet::Publish(p))) => {
                received.insert(p.payload);
            }
            Ok(Some(_)) => {}
            other => panic!("after {} messages: {other:?}", received.len()),
        }
    }
}

/// A subscriber that stops acknowledging holds its publishers up once, for
/// `queue_full_wait_ms`; then it counts as slow, and what overflows its
/// queue is dropped while the publisher runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_draining_holds_publishers_only_once() {
    let server = start(|c| {
        c.limits.max_inflight = 2;
        c.limits.max_queued_messages = 10;
        c.limits.queue_full_wait_ms = 200;
    })
    .await;
    let mut sub = RawClient::connected(addr(&server), "stalled", ProtocolVersion::V311).await;
    sub.subscribe("s", QoS::AtLeastOnce).await;
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V311).await;
    // Every PUBACK arrives: the publisher is never stuck for good.
    for i in 0..100u16 {
        publisher
            .publish("s", format!("{i}").as_bytes(), QoS::AtLeastOnce, i + 1)
            .await;
    }
    // Two in flight, ten queued, one taken beyond the bound while the
    // publisher waited; the other 87 dropped.
    let dropped = server.broker().metrics.messages_dropped_queue_full.get();
    assert_eq!(dropped, 87);
    // What the subscriber gets is a prefix of what was published.
    for i in 0..13u16 {
        let m = sub.recv_publish().await;
        assert_eq!(m.payload, format!("{i}").as_bytes());
        sub.send(Packet::PubAck(tern_codec::PubAck::new(
            m.packet_id.unwrap(),
        )))
        .await;
    }
    sub.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

/// However long `queue_full_wait_ms` is, a subscriber that takes nothing
/// (here: never acknowledges) holds its publishers up only for the stall
/// window (250 ms) per full-queue episode, not for the whole wait: a client
/// that subscribes widely and stops reading cannot freeze every publisher
/// of its topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_takes_nothing_holds_publishers_only_briefly() {
    let server = start(|c| {
        c.limits.max_inflight = 2;
        c.limits.max_queued_messages = 10;
        c.limits.queue_full_wait_ms = 60_000;
    })
    .await;
    let mut sub = RawClient::connected(addr(&server), "stalled", ProtocolVersion::V5).await;
    sub.subscribe("#", QoS::AtLeastOnce).await;
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V5).await;
    let dropped = &server.broker().metrics.messages_dropped_queue_full;
    for round in 0..2u16 {
        // Well under the 60 s the queue could make it wait.
        tokio::time::timeout(Duration::from_secs(20), async {
            for i in 0..100u16 {
                let id = round * 100 + i + 1;
                publisher
                    .publish("a/b", format!("{id}").as_bytes(), QoS::AtLeastOnce, id)
                    .await;
            }
        })
        .await
        .expect("the publisher is not held for queue_full_wait_ms");
        if round == 0 {
            // Two in flight, ten queued, one taken beyond the bound while
            // the publisher waited; the other 87 dropped.
            assert_eq!(dropped.get(), 87);
            // The subscriber takes its 13 and empties its queues: the
            // episode ends, and the next one is judged afresh.
            for _ in 0..13 {
                let m = sub.recv_publish().await;
                sub.send(Packet::PubAck(tern_codec::PubAck::new(
                    m.packet_id.unwrap(),
                )))
                .await;
            }
            sub.expect_silence(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(dropped.get(), 2 * 87);
    server.shutdown().await;
}

/// A subscriber that keeps acknowledging, if slower than its publisher,
/// is outpaced, not stalled: the publisher waits for it beyond the stall
/// window, for as long as it makes progress, and nothing is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_keeps_taking_holds_publishers_past_the_stall_window() {
    let server = start(|c| {
        c.limits.max_inflight = 2;
        c.limits.max_queued_messages = 10;
        c.limits.queue_full_wait_ms = 60_000;
    })
    .await;
    let mut sub = RawClient::connected(addr(&server), "steady", ProtocolVersion::V311).await;
    sub.subscribe("s", QoS::AtLeastOnce).await;
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V311).await;
    const MESSAGES: u16 = 40;
    let publishing = tokio::spawn(async move {
        for i in 1..=MESSAGES {
            publisher
                .publish("s", format!("{i}").as_bytes(), QoS::AtLeastOnce, i)
                .await;
        }
        publisher
    });
    // An acknowledgement every 50 ms: draining a full queue to half takes
    // about 300 ms, longer than the stall window.
    for i in 1..=MESSAGES {
        let m = sub.recv_publish().await;
        assert_eq!(m.payload, format!("{i}").as_bytes());
        tokio::time::sleep(Duration::from_millis(50)).await;
        sub.send(Packet::PubAck(tern_codec::PubAck::new(
            m.packet_id.unwrap(),
        )))
        .await;
    }
    publishing.await.unwrap();
    assert_eq!(server.broker().metrics.messages_dropped_queue_full.get(), 0);
    server.shutdown().await;
}

/// Messages queued for a subscriber that stopped reading keep their own
/// bytes, not the read buffers they came in. A publisher that sends one
/// small message per read gets its pooled buffer back after each read
/// (`transport::SMALL_READ`); before, each queued 64-byte message pinned a
/// 4 KiB buffer, and each read had to allocate a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_for_a_stalled_subscriber_do_not_pin_read_buffers() {
    let server = start(window_for_unread_backlog).await;
    let mut sleeper = RawClient::connected(addr(&server), "sleeper", ProtocolVersion::V5).await;
    sleeper.subscribe("feed", QoS::AtLeastOnce).await;
    // Its socket buffers and in-flight window full: what follows is queued.
    publish_unread_backlog(&server, "feed").await;

    let mut publisher = RawClient::connected(addr(&server), "trickle", ProtocolVersion::V5).await;
    let (_, misses_before) = server.broker().pool.stats();
    // One message per read: each waits for its PUBACK.
    for id in 1..=500 {
        publisher
            .publish("feed", &[9; 64], QoS::AtLeastOnce, id)
            .await;
    }
    let (_, misses) = server.broker().pool.stats();
    assert!(
        misses - misses_before < 50,
        "{} reads of 500 found no free read buffer",
        misses - misses_before
    );
    let (queued, _) = server
        .broker()
        .registry
        .get("sleeper")
        .unwrap()
        .queued_len();
    assert!(queued >= 500, "{queued} queued");
    drop(sleeper);
    server.shutdown().await;
}

/// Topics of each read in the stalled-queue tests: one for the stalled
/// subscriber (`feed/0`), the others for nobody.
const STREAM_TOPICS: usize = 32;

/// Reads measured once a queue is found stalled.
const READS_AFTER_STALL: u64 = 200;

/// One write (and read) of [`STREAM_TOPICS`] messages of 64 bytes to
/// `feed/0` ... `feed/31`, 2.5 KiB: more than `SMALL_READ`, so the messages
/// are slices of the pooled buffer. QoS 1 with packet ids from `next_id`.
fn stream_read(qos: QoS, next_id: &mut u16) -> bytes::BytesMut {
    let mut stream = bytes::BytesMut::new();
    for topic in 0..STREAM_TOPICS {
        let packet_id = (qos != QoS::AtMostOnce).then(|| {
            *next_id = *next_id % 60_000 + 1;
            *next_id
        });
        let publish = publish_packet(&format!("feed/{topic}"), &[5; 64], qos, packet_id);
        tern_codec::encode_packet(&publish, ProtocolVersion::V5, &mut stream).unwrap();
    }
    stream
}

/// Publishes [`stream_read`]s, one write each, until the broker has found a
/// queue stalled, then [`READS_AFTER_STALL`] more; returns how many of those
/// found no free read buffer in the pool.
async fn pool_misses_once_stalled(server: &tern::Server, qos: QoS) -> u64 {
    let broker = server.broker();
    let mut publisher = RawClient::connected(addr(server), "stream", ProtocolVersion::V5).await;
    let mut next_id = 0;
    let mut send_read = async |publisher: &mut RawClient| {
        publisher.send_bytes(&stream_read(qos, &mut next_id)).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.metrics.queues_stalled.get() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never found stalled"
        );
        send_read(&mut publisher).await;
    }
    let (_, misses_before) = broker.pool.stats();
    for _ in 0..READS_AFTER_STALL {
        send_read(&mut publisher).await;
    }
    // A PINGRESP: every read before it was handled.
    publisher.send(Packet::PingReq).await;
    loop {
        match publisher.recv().await {
            Some(Packet::PingResp) => break,
            Some(_) => {}
            None => panic!("the publisher's connection closed"),
        }
    }
    let (_, misses) = broker.pool.stats();
    misses - misses_before
}

/// A subscriber of one topic among many that stops reading: each read of
/// the publisher's stream carries one message for it among 31 for nobody.
/// Once its queue is found stalled (its writer took nothing for a quarter
/// of a second), what it holds, and what is queued for it after, is copied
/// out of the read buffers, so each read's buffer goes back to the pool.
/// Before, each queued message kept its whole buffer alive, and every read
/// had to allocate a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_held_for_a_stalled_subscriber_leave_the_read_buffers_they_came_in() {
    let server = start(|c| {
        window_for_unread_backlog(c);
        c.limits.max_client_outbound_bytes = 64 * 1024 * 1024;
        c.limits.max_outbound_bytes = 256 * 1024 * 1024;
    })
    .await;
    let mut sleeper = RawClient::connected(addr(&server), "sleeper", ProtocolVersion::V5).await;
    sleeper.subscribe("feed/0", QoS::AtLeastOnce).await;
    // Its socket buffers full, its writer stuck, and its queue far from its
    // bound: what follows is queued.
    publish_unread_backlog(&server, "feed/0").await;

    let misses = pool_misses_once_stalled(&server, QoS::AtMostOnce).await;
    assert!(
        misses < READS_AFTER_STALL / 4,
        "{misses} reads of {READS_AFTER_STALL} found no free read buffer"
    );
    let stalled = server.broker().metrics.queues_stalled.get();
    assert_eq!(stalled, 1, "found stalled once, until it takes again");
    drop(sleeper);
    server.shutdown().await;
}

/// The same for a QoS 1 subscriber that reads but acknowledges nothing:
/// its in-flight window full, what follows waits in its session queue,
/// which it no longer makes room in. Once that queue is found stalled, its
/// messages are copied out of the read buffers too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_queue_its_client_stopped_acknowledging_leaves_the_read_buffers() {
    let server = start(|c| c.limits.max_queued_messages = 10_000).await;
    let mut connect = connect_packet("silent", ProtocolVersion::V5);
    connect.properties.receive_maximum = Some(1);
    let (mut silent, _) = RawClient::connect(addr(&server), connect).await;
    silent.subscribe("feed/0", QoS::AtLeastOnce).await;

    let misses = pool_misses_once_stalled(&server, QoS::AtLeastOnce).await;
    assert!(
        misses < READS_AFTER_STALL / 4,
        "{misses} reads of {READS_AFTER_STALL} found no free read buffer"
    );
    let (queued, inflight) = server.broker().registry.get("silent").unwrap().queued_len();
    assert_eq!(inflight, 1);
    assert!(queued as u64 >= READS_AFTER_STALL, "{queued} queued");
    drop(silent);
    server.shutdown().await;
}
