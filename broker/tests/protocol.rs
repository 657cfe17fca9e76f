//! Byte-level protocol behaviour: what the broker puts on the wire for the
//! cases a client library would not let us express.

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use tern_codec::properties::{ConnectProperties, WillProperties};
use tern_codec::{encode_packet, Packet, ProtocolVersion, PubAck, QoS, ReasonCode, Will};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V311;

#[tokio::test]
async fn connack_bytes_for_311_and_assigned_id_for_v5() {
    let server = start(|_| {}).await;
    let mut c = RawClient::open(addr(&server), V311).await;
    // CONNECT 3.1.1, clean session, keep alive 60, client id "a".
    c.send_bytes(&[
        0x10, 0x0D, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'a',
    ])
    .await;
    let mut raw = [0u8; 4];
    tokio::io::AsyncReadExt::read_exact(&mut c.stream, &mut raw)
        .await
        .unwrap();
    assert_eq!(raw, [0x20, 0x02, 0x00, 0x00]);

    let (_c, ack) = RawClient::connect(addr(&server), connect_packet("", V5)).await;
    assert_eq!(ack.code, ReasonCode::Success);
    let assigned = ack
        .properties
        .assigned_client_identifier
        .as_ref()
        .expect("assigned id");
    assert!(!assigned.is_empty());
    // Every optional feature is said to be available, not left implied.
    let p = &ack.properties;
    assert_eq!(
        [
            p.retain_available,
            p.wildcard_subscription_available,
            p.subscription_identifiers_available,
            p.shared_subscription_available,
        ],
        [Some(1); 4]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn mqtt31_connects_and_empty_id_without_clean_session_is_refused() {
    let server = start(|_| {}).await;
    let mut c = RawClient::connected(addr(&server), "old-client", ProtocolVersion::V31).await;
    assert_eq!(
        c.subscribe("x", QoS::AtLeastOnce).await,
        vec![ReasonCode::GrantedQoS1]
    );

    let mut connect = connect_packet("", V311);
    connect.clean_start = false;
    let (mut c, ack) = RawClient::connect(addr(&server), connect).await;
    assert_eq!(ack.code, ReasonCode::ClientIdentifierNotValid);
    assert!(c.expect_closed().await.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn unsupported_protocol_level_gets_connack_1() {
    let server = start(|_| {}).await;
    let mut c = RawClient::open(addr(&server), V311).await;
    c.send_bytes(&[
        0x10, 0x0D, 0, 4, b'M', b'Q', b'T', b'T', 9, 0x02, 0, 60, 0, 1, b'a',
    ])
    .await;
    let mut raw = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut c.stream, &mut raw)
        .await
        .unwrap();
    assert_eq!(raw, vec![0x20, 0x02, 0x00, 0x01]);
    server.shutdown().await;
}

/// A client that says level 5 under another protocol name reads the
/// refusal in the format it expects: a 5.0 CONNACK with 0x84.
#[tokio::test]
async fn a_level_5_connect_with_another_protocol_name_gets_connack_0x84() {
    let server = start(|_| {}).await;
    let mut c = RawClient::open(addr(&server), V5).await;
    c.send_bytes(&[0x10, 0x0C, 0, 2, b'h', b'j', 5, 0x02, 0, 60, 0, 0, 1, b'a'])
        .await;
    let mut raw = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut c.stream, &mut raw)
        .await
        .unwrap();
    assert_eq!(raw, vec![0x20, 0x03, 0x00, 0x84, 0x00]);
    server.shutdown().await;
}

#[tokio::test]
async fn first_packet_must_be_connect() {
    let server = start(|_| {}).await;
    let mut c = RawClient::open(addr(&server), V311).await;
    c.send_bytes(&[0xC0, 0x00]).await; // PINGREQ
    assert!(c.expect_closed().await.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn connect_timeout_closes_silent_connection() {
    let server = start(|c| c.limits.connect_timeout_secs = 1).await;
    let mut c = RawClient::open(addr(&server), V311).await;
    let started = std::time::Instant::now();
    assert!(c.expect_closed().await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(900));
    let metrics = &server.broker().metrics;
    assert_eq!(metrics.connect_timeouts.get(), 1);
    eventually("connection uncounted", || {
        server.broker().registry.connection_count() == 0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_packet_closes_only_that_connection() {
    let server = start(|_| {}).await;
    let mut sub = RawClient::connected(addr(&server), "sub", V5).await;
    sub.subscribe("t", QoS::AtMostOnce).await;

    let mut bad = RawClient::connected(addr(&server), "bad", V5).await;
    // PUBLISH QoS 0 with DUP set: malformed (MQTT-3.3.1-2).
    bad.send_bytes(&[0x38, 0x04, 0, 1, b't', 0]).await;
    bad.expect_disconnect(ReasonCode::MalformedPacket).await;
    assert_eq!(server.broker().metrics.malformed_packets.get(), 1);

    let mut publisher = RawClient::connected(addr(&server), "pub", V5).await;
    publisher
        .publish("t", b"still serving", QoS::AtMostOnce, 0)
        .await;
    assert_eq!(&sub.recv_publish().await.payload[..], b"still serving");
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_packet_refused_from_its_header() {
    let server = start(|c| c.limits.max_packet_size = 1024).await;
    let mut c = RawClient::connected(addr(&server), "big", V5).await;
    // A PUBLISH claiming 256 MB; the body never comes.
    c.send_bytes(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]).await;
    c.expect_disconnect(ReasonCode::PacketTooLarge).await;
    assert_eq!(server.broker().metrics.oversized_packets.get(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn keep_alive_timeout_publishes_will() {
    let server = start(|_| {}).await;
    let mut watcher = RawClient::connected(addr(&server), "watcher", V311).await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;

    let mut connect = connect_packet("sleepy", V311);
    connect.keep_alive = 1;
    connect.will = Some(Will {
        topic: Bytes::from_static(b"wills/sleepy"),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties::default(),
    });
    let (mut sleepy, ack) = RawClient::connect(addr(&server), connect).await;
    assert_eq!(ack.code, ReasonCode::Success);
    // Silent for 1.5 x keep alive: closed, and the will goes out.
    let will = watcher.recv_publish().await;
    assert_eq!(&will.topic[..], b"wills/sleepy");
    assert_eq!(&will.payload[..], b"gone");
    assert!(sleepy.expect_closed().await.is_empty());
    assert_eq!(server.broker().metrics.keepalive_timeouts.get(), 1);
    server.shutdown().await;
}

/// A second CONNECT is a Protocol Error (MQTT-3.1.0-2), one naming a
/// protocol level the broker does not speak too: an MQTT 5 client is told
/// so with DISCONNECT 0x82 before the close.
#[tokio::test]
async fn a_second_connect_is_a_protocol_error_whatever_protocol_it_names() {
    let server = start(|_| {}).await;
    let mut again = RawClient::connected(addr(&server), "again", V5).await;
    again
        .send(Packet::Connect(Box::new(connect_packet("again", V5))))
        .await;
    again.expect_disconnect(ReasonCode::ProtocolError).await;
    let mut other = RawClient::connected(addr(&server), "other", V5).await;
    // CONNECT, protocol "MQTT" level 6, clean start, keep alive 60.
    other
        .send_bytes(b"\x10\x12\x00\x04MQTT\x06\x02\x00\x3c\x00\x00\x05other")
        .await;
    other.expect_disconnect(ReasonCode::ProtocolError).await;
    server.shutdown().await;
}

/// Keep alive 0 turns the keep alive off, but a client without it cannot
/// hold an incomplete packet (and the read buffer under it) for ever.
#[tokio::test]
async fn without_keep_alive_an_incomplete_packet_is_timed_out() {
    let server = start(|c| c.limits.incomplete_packet_timeout_secs = 1).await;
    let connect = |id: &str| {
        let mut connect = connect_packet(id, V5);
        connect.keep_alive = 0;
        connect
    };
    let (mut stalled, _) = RawClient::connect(addr(&server), connect("stalled")).await;
    let (mut idle, _) = RawClient::connect(addr(&server), connect("idle")).await;
    let (mut late, _) = RawClient::connect(addr(&server), connect("late")).await;
    // All of a QoS 1 PUBLISH but its last byte.
    let mut publish = BytesMut::new();
    let packet = publish_packet("t", b"payload", QoS::AtLeastOnce, Some(1));
    encode_packet(&packet, V5, &mut publish).unwrap();
    let (head, last) = publish.split_at(publish.len() - 1);
    stalled.send_bytes(head).await;
    let started = std::time::Instant::now();
    stalled
        .expect_disconnect(ReasonCode::KeepAliveTimeout)
        .await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(1), "{waited:?}");
    assert_eq!(server.broker().metrics.keepalive_timeouts.get(), 1);

    // Silent on a packet boundary for longer than the timeout: still served.
    idle.send(Packet::PingReq).await;
    assert!(matches!(idle.recv().await, Some(Packet::PingResp)));
    // An incomplete packet begun after a long silence is timed from its
    // start, not from the client's last packet: completed within the
    // timeout, it is handled.
    late.send_bytes(head).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    late.send_bytes(last).await;
    assert!(matches!(late.recv().await, Some(Packet::PubAck(_))));
    assert_eq!(server.broker().metrics.keepalive_timeouts.get(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn will_not_published_after_normal_disconnect() {
    let server = start(|_| {}).await;
    let mut watcher = RawClient::connected(addr(&server), "watcher", V5).await;
    watcher.subscribe("wills/#", QoS::AtMostOnce).await;
    for (id, normal) in [("polite", true), ("rude", false)] {
        let mut connect = connect_packet(id, V5);
        connect.will = Some(Will {
            topic: Bytes::from(format!("wills/{id}")),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: WillProperties::default(),
        });
        let (mut c, _) = RawClient::connect(addr(&server), connect).await;
        if normal {
            c.send(Packet::Disconnect(Default::default())).await;
            assert!(c.expect_closed().await.is_empty());
        } else {
            drop(c);
        }
    }
    let will = watcher.recv_publish().await;
    assert_eq!(&will.topic[..], b"wills/rude");
    watcher.expect_silence(Duration::from_millis(300)).await;
    server.shutdown().await;
}

/// A connection of `id` with a QoS 0 will on `wills/{id}`.
fn connect_with_will(id: &str, protocol: ProtocolVersion) -> tern_codec::Connect {
    with_will(connect_packet(id, protocol))
}

/// `connect` with a QoS 0 will ("bye") on `wills/{client id}`.
fn with_will(mut connect: tern_codec::Connect) -> tern_codec::Connect {
    connect.will = Some(Will {
        topic: Bytes::from(format!("wills/{}", connect.client_id_str())),
        payload: Bytes::from_static(b"bye"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties::default(),
    });
    connect
}

/// [`with_will`], the will published `delay` seconds after the connection
/// is lost.
fn with_delayed_will(connect: tern_codec::Connect, delay: u32) -> tern_codec::Connect {
    let mut connect = with_will(connect);
    if let Some(will) = &mut connect.will {
        will.properties.will_delay_interval = Some(delay);
    }
    connect
}

#[tokio::test]
async fn disconnect_with_an_error_code_keeps_the_will() {
    // MQTT-3.1.2-8: only reason 0x00 deletes the will.
    let server = start(|_| {}).await;
    let mut watcher = RawClient::connected(addr(&server), "watcher", V5).await;
    watcher.subscribe("wills/#", QoS::AtMostOnce).await;
    for code in [
        ReasonCode::DisconnectWithWillMessage,
        ReasonCode::UnspecifiedError,
        ReasonCode::ProtocolError,
        ReasonCode::MessageRateTooHigh,
    ] {
        let id = format!("client-{:02x}", code as u8);
        let (mut c, _) = RawClient::connect(addr(&server), connect_with_will(&id, V5)).await;
        c.send(Packet::Disconnect(tern_codec::Disconnect::new(code)))
            .await;
        assert!(c.expect_closed().await.is_empty());
        let will = watcher.recv_publish().await;
        assert_eq!(will.topic, format!("wills/{id}").as_bytes(), "{code:?}");
    }
    server.shutdown().await;
}

/// Sends DISCONNECT on `c`, closes it and at once connects again as `next`,
/// without waiting for the broker to see the close: a client library's
/// `disconnect(); connect()`.
async fn disconnect_and_reconnect(
    server: &tern::Server,
    mut c: RawClient,
    disconnect: tern_codec::Disconnect,
    next: tern_codec::Connect,
) -> (RawClient, tern_codec::ConnAck) {
    c.send(Packet::Disconnect(disconnect)).await;
    drop(c);
    RawClient::connect(addr(server), next).await
}

// Two worker threads: the old connection's reader and the new connection
// run in parallel, as in a broker serving real clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_just_before_a_reconnect_discards_the_will() {
    // MQTT-3.14.4-3: the DISCONNECT (0x00) reached the broker before the new
    // CONNECT, so the old connection's will is discarded, even though the
    // new connection takes over a connection the broker had not closed yet.
    let server = start(|_| {}).await;
    let mut watcher = RawClient::connected(addr(&server), "watcher", V5).await;
    watcher.subscribe("wills/#", QoS::AtMostOnce).await;
    for protocol in [V311, V5] {
        let (mut c, _) =
            RawClient::connect(addr(&server), connect_with_will("quick", protocol)).await;
        for _ in 0..30 {
            let next = connect_with_will("quick", protocol);
            (c, _) = disconnect_and_reconnect(&server, c, Default::default(), next).await;
        }
        c.send(Packet::Disconnect(Default::default())).await;
    }
    watcher.expect_silence(Duration::from_millis(300)).await;
    server.shutdown().await;
}

// Two worker threads: the old connection's reader and the new connection
// run in parallel, as in a broker serving real clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_expiry_of_0_at_disconnect_holds_for_an_immediate_reconnect() {
    // MQTT 5 3.14.2.2.2: DISCONNECT set the expiry to 0, so the session ends
    // with that connection; the reconnect that follows at once finds none.
    let server = start(|_| {}).await;
    let (mut c, ack) = RawClient::connect(addr(&server), persistent_connect("brief", 300)).await;
    assert!(!ack.session_present);
    c.subscribe("brief/topic", QoS::AtLeastOnce).await;
    for round in 0..30 {
        let mut end_now = tern_codec::Disconnect::default();
        end_now.properties.session_expiry_interval = Some(0);
        let ack;
        (c, ack) =
            disconnect_and_reconnect(&server, c, end_now, persistent_connect("brief", 300)).await;
        assert!(
            !ack.session_present,
            "round {round}: the session was resumed"
        );
    }
    // And the session that did end took its subscription with it.
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    p.publish("brief/topic", b"x", QoS::AtLeastOnce, 1).await;
    c.expect_silence(Duration::from_millis(300)).await;
    server.shutdown().await;
}

/// Stores `n` retained messages `ret/0` .. `ret/{n-1}` at `qos`.
async fn store_retained(server: &tern::Server, n: u16, qos: QoS) {
    let mut p = RawClient::connected(addr(server), "retainer", V5).await;
    for i in 0..n {
        let mut packet = publish_packet(&format!("ret/{i}"), b"kept", qos, Some(i + 1));
        if let Packet::Publish(publish) = &mut packet {
            publish.retain = true;
            if qos == QoS::AtMostOnce {
                publish.packet_id = None;
            }
        }
        p.send(packet).await;
        if qos != QoS::AtMostOnce {
            assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
        }
    }
    p.send(Packet::Disconnect(Default::default())).await;
    p.expect_closed().await;
}

/// A SUBSCRIBE that repeats a filter is handled as that many SUBSCRIBEs
/// (MQTT-3.8.4-4), each replacing the subscription and sending its retained
/// messages again (MQTT-3.8.4-3), with the options of its own occurrence;
/// all of them within `max_pending_retained` per SUBSCRIBE, the rest
/// dropped and counted.
#[tokio::test]
async fn a_filter_repeated_in_one_subscribe_gets_its_retained_messages_each_time() {
    let server = start(|c| c.limits.max_pending_retained = 250).await;
    store_retained(&server, 3, QoS::AtLeastOnce).await;
    let mut c = RawClient::connected(addr(&server), "repeater", V5).await;
    let mut subscribe = subscribe_packet(1, "ret/#", QoS::AtMostOnce);
    if let Packet::Subscribe(s) = &mut subscribe {
        let first = s.filters[0].clone();
        s.filters.extend(std::iter::repeat_n(first, 99));
        // The last occurrence asks for QoS 1.
        s.filters[99].qos = QoS::AtLeastOnce;
    }
    let dropped_before = server.broker().metrics.messages_dropped_queue_full.get();
    c.send(subscribe).await;
    match c.recv().await {
        Some(Packet::SubAck(ack)) => assert_eq!(ack.codes.len(), 100),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // 99 x 3 at QoS 0 would be 297: the first 83 occurrences' 249 and the
    // first of the 84th's fit in 250; none of the last (QoS 1) occurrence's.
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..250 {
        let p = c.recv_publish().await;
        assert!(p.retain);
        assert_eq!(p.qos, QoS::AtMostOnce);
        *counts
            .entry(String::from_utf8(p.topic.to_vec()).unwrap())
            .or_insert(0) += 1;
    }
    let mut each: Vec<u32> = counts.values().copied().collect();
    each.sort();
    assert_eq!(
        each,
        [83, 83, 84],
        "each occurrence sends them again: {counts:?}"
    );
    c.expect_silence(Duration::from_millis(300)).await;
    let dropped = server.broker().metrics.messages_dropped_queue_full.get() - dropped_before;
    assert_eq!(dropped, 300 - 250);
    server.shutdown().await;
}

/// The last occurrence of a repeated filter gets its own options.
#[tokio::test]
async fn a_repeated_filter_sends_its_retained_messages_with_its_own_options() {
    let server = start(|_| {}).await;
    store_retained(&server, 1, QoS::AtLeastOnce).await;
    let mut c = RawClient::connected(addr(&server), "repeater", V5).await;
    let mut subscribe = subscribe_packet(1, "ret/#", QoS::AtMostOnce);
    if let Packet::Subscribe(s) = &mut subscribe {
        let mut second = s.filters[0].clone();
        second.qos = QoS::AtLeastOnce;
        s.filters.push(second);
    }
    c.send(subscribe).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    let first = c.recv_publish().await;
    let second = c.recv_publish().await;
    assert_eq!((first.qos, second.qos), (QoS::AtMostOnce, QoS::AtLeastOnce));
    assert_eq!(first.topic, second.topic);
    c.send(Packet::PubAck(PubAck::new(second.packet_id.unwrap())))
        .await;
    c.expect_silence(Duration::from_millis(300)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn retained_messages_beyond_the_session_bounds_wait_for_room() {
    // A subscription matching more retained messages than the session's
    // queues hold (in-flight window 5 + queue 10, QoS 1; 2 KiB of outbound
    // bytes, QoS 0) gets them as it reads, up to max_pending_retained (60)
    // per SUBSCRIBE; the rest are dropped and counted.
    let server = start(|c| {
        c.limits.max_inflight = 5;
        c.limits.max_queued_messages = 10;
        c.limits.max_client_outbound_bytes = 2048;
        c.limits.max_pending_retained = 60;
    })
    .await;
    store_retained(&server, 100, QoS::AtLeastOnce).await;
    for (qos, granted) in [
        (QoS::AtLeastOnce, ReasonCode::GrantedQoS1),
        (QoS::AtMostOnce, ReasonCode::Success),
    ] {
        let before = server.broker().metrics.messages_dropped_queue_full.get();
        let mut c = RawClient::connected(addr(&server), "greedy", V5).await;
        assert_eq!(c.subscribe("ret/#", qos).await, vec![granted]);
        let mut got = std::collections::BTreeSet::new();
        while let Ok(Some(packet)) = c.recv_within(Duration::from_millis(300)).await {
            let Packet::Publish(p) = packet else {
                panic!("unexpected {packet:?}");
            };
            assert!(p.retain);
            if let Some(id) = p.packet_id {
                c.send(Packet::PubAck(PubAck::new(id))).await;
            }
            assert!(
                got.insert(p.topic),
                "{qos:?}: a retained message came twice"
            );
        }
        let dropped = server.broker().metrics.messages_dropped_queue_full.get() - before;
        assert_eq!((got.len(), dropped), (60, 40), "{qos:?}");
    }
    server.shutdown().await;
}

/// Reads `n` retained QoS 1 messages, acknowledging each (each must come
/// once), and then nothing more for 300 ms.
async fn read_retained(c: &mut RawClient, n: usize) {
    let mut got = std::collections::BTreeSet::new();
    while got.len() < n {
        let p = c.recv_publish().await;
        assert!(p.retain);
        c.send(Packet::PubAck(PubAck::new(p.packet_id.unwrap())))
            .await;
        assert!(got.insert(p.topic), "a retained message came twice");
    }
    c.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn retained_messages_waiting_in_all_sessions_stay_within_max_waiting_retained() {
    // Each session's queues take 15 QoS 1 messages at once (in-flight
    // window 5, queue 10); beyond that, at most 30 wait in all sessions
    // together. A client that never reads holds all 30: the next gets only
    // what its queues take, until the first leaves.
    let server = start(|c| {
        c.limits.max_inflight = 5;
        c.limits.max_queued_messages = 10;
        c.limits.max_waiting_retained = 30;
    })
    .await;
    store_retained(&server, 100, QoS::AtLeastOnce).await;
    let broker = server.broker();
    let waiting = || broker.registry.context().waiting_retained.waiting();
    let refused = || broker.metrics.retained_waiting_refused.get();
    let mut idle = RawClient::connected(addr(&server), "idle", V5).await;
    assert_eq!(
        idle.subscribe("ret/#", QoS::AtLeastOnce).await,
        vec![ReasonCode::GrantedQoS1]
    );
    eventually("the idle client's 30 wait", || waiting() == 30).await;
    assert_eq!(refused(), 55);
    let mut reader = RawClient::connected(addr(&server), "reader", V5).await;
    assert_eq!(
        reader.subscribe("ret/#", QoS::AtLeastOnce).await,
        vec![ReasonCode::GrantedQoS1]
    );
    read_retained(&mut reader, 15).await;
    assert_eq!((waiting(), refused()), (30, 55 + 85));
    // The idle client leaves, and its session with it (clean start, no
    // expiry): its 30 places are free again.
    idle.send(Packet::Disconnect(Default::default())).await;
    eventually("the idle client's places freed", || waiting() == 0).await;
    // A SUBSCRIBE again sends the retained messages again (MQTT-3.8.4-3).
    assert_eq!(
        reader.subscribe("ret/#", QoS::AtLeastOnce).await,
        vec![ReasonCode::GrantedQoS1]
    );
    read_retained(&mut reader, 45).await;
    assert_eq!(waiting(), 0, "all taken");
    server.shutdown().await;
}

/// A client subscribed to a topic subscribes to it again while another
/// client publishes retained values of it: what the new SUBSCRIBE finds in
/// the store must not come before the values published ahead of it, which
/// reach the client through its earlier subscription (MQTT 4.6: a topic's
/// messages in the order they were published). QoS 0 messages of one read
/// used to be delivered at its end, while the store already held the
/// newest: a SUBSCRIBE handled meanwhile sent that first. A race, so tried
/// many times, on two workers; without the fix it lost in about one try of
/// ten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_value_found_by_a_subscribe_does_not_overtake_older_live_ones() {
    const TRIES: u32 = 200;
    const VALUES: u32 = 40;
    let server = start(|_| {}).await;
    let mut publisher = RawClient::connected(addr(&server), "publisher", V5).await;
    let mut subscriber = RawClient::connected(addr(&server), "again", V5).await;
    assert_eq!(
        subscriber.subscribe("r/#", QoS::AtMostOnce).await,
        vec![ReasonCode::Success]
    );
    let mut next = 0u32;
    for _ in 0..TRIES {
        let mut publishes = BytesMut::new();
        for _ in 0..VALUES {
            next += 1;
            let mut publish = publish_packet("r/0", &next.to_be_bytes(), QoS::AtMostOnce, None);
            if let Packet::Publish(p) = &mut publish {
                p.retain = true;
            }
            encode_packet(&publish, V5, &mut publishes).unwrap();
        }
        let mut again = BytesMut::new();
        let unsubscribe = Packet::Unsubscribe(tern_codec::Unsubscribe {
            packet_id: 2,
            filters: vec![Bytes::from_static(b"r/#")],
            properties: Default::default(),
        });
        encode_packet(&unsubscribe, V5, &mut again).unwrap();
        encode_packet(&subscribe_packet(3, "r/#", QoS::AtMostOnce), V5, &mut again).unwrap();
        tokio::join!(
            publisher.send_bytes(&publishes),
            subscriber.send_bytes(&again)
        );

        // Values never go back, until the last one, live or retained.
        let mut last = 0;
        let mut acks = 0;
        while acks < 2 || last != next {
            match subscriber.recv().await {
                Some(Packet::Publish(p)) => {
                    let value = u32::from_be_bytes(p.payload[..4].try_into().unwrap());
                    assert!(value >= last, "{value} (retain {}) after {last}", p.retain);
                    last = value;
                }
                Some(Packet::UnsubAck(_) | Packet::SubAck(_)) => acks += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        // A retained copy of the last value may follow its live one.
        while let Ok(Some(packet)) = subscriber.recv_within(Duration::from_millis(5)).await {
            match packet {
                Packet::Publish(p) => assert!(p.retain && p.payload[..4] == next.to_be_bytes()),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_waiting_retained_message_replaced_meanwhile_does_not_follow_its_successor() {
    // A retained message that finds the session's queues full waits for
    // room. A newer value of its topic goes to the subscription live, into
    // the queue ahead of it; when room comes, the older value is left out
    // rather than sent after the newer one (MQTT-4.6.0-5). The topic's
    // value now takes its place, flagged RETAIN, as a SUBSCRIBE would send
    // it: a live copy may not have reached the client (see
    // outbound_bound.rs::a_waiting_retained_message_replaced_by_a_dropped_one_is_still_offered).
    let server = start(|c| {
        c.limits.max_inflight = 1;
        c.limits.max_queued_messages = 1;
    })
    .await;
    let mut publisher = RawClient::connected(addr(&server), "publisher", V5).await;
    let retained = |payload: &[u8], qos, id| {
        let mut packet = publish_packet("state/door", payload, qos, id);
        if let Packet::Publish(p) = &mut packet {
            p.retain = true;
        }
        packet
    };
    publisher
        .send(retained(b"open", QoS::AtLeastOnce, Some(1)))
        .await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    let mut c = RawClient::connected(addr(&server), "busy", V5).await;
    c.subscribe("work", QoS::AtLeastOnce).await;
    // One in flight, one queued: the session's queues are full.
    publisher.publish("work", b"1", QoS::AtLeastOnce, 2).await;
    publisher.publish("work", b"2", QoS::AtLeastOnce, 3).await;
    let first = c.recv_publish().await;
    assert_eq!(&first.payload[..], b"1");
    assert_eq!(
        c.subscribe("state/#", QoS::AtLeastOnce).await,
        vec![ReasonCode::GrantedQoS1]
    );
    // The newer value: taken beyond the queue's bound while the client
    // keeps taking (its PUBACK waits for room).
    publisher
        .send(retained(b"closed", QoS::AtLeastOnce, Some(4)))
        .await;
    // Routed (retained first, then delivered) before any room is made.
    let broker = server.broker();
    eventually("the newer value is retained", || {
        broker
            .retained
            .get("state/door")
            .is_some_and(|m| &m.payload[..] == b"closed")
    })
    .await;
    let mut got = Vec::new();
    let mut next = first;
    loop {
        c.send(Packet::PubAck(PubAck::new(next.packet_id.unwrap())))
            .await;
        got.push((next.topic.clone(), next.payload.clone(), next.retain));
        match c.recv_within(Duration::from_millis(300)).await {
            Ok(Some(Packet::Publish(p))) => next = p,
            Ok(None) | Err(()) => break,
            Ok(Some(other)) => panic!("unexpected {other:?}"),
        }
    }
    let got: Vec<(&str, &[u8], bool)> = got
        .iter()
        .map(|(t, p, r)| (std::str::from_utf8(t).unwrap(), &p[..], *r))
        .collect();
    assert_eq!(
        got,
        [
            ("work", &b"1"[..], false),
            ("work", &b"2"[..], false),
            ("state/door", &b"closed"[..], false),
            ("state/door", &b"closed"[..], true),
        ]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn many_retained_messages_all_reach_a_client_that_reads() {
    // Within max_pending_retained, nothing is dropped however small the
    // session's queues are: 500 retained messages through a window of 5.
    let server = start(|c| {
        c.limits.max_inflight = 5;
        c.limits.max_queued_messages = 10;
    })
    .await;
    store_retained(&server, 500, QoS::AtLeastOnce).await;
    let mut c = RawClient::connected(addr(&server), "reader", V5).await;
    c.subscribe("ret/#", QoS::AtLeastOnce).await;
    let mut got = 0;
    while let Ok(Some(packet)) = c.recv_within(Duration::from_millis(300)).await {
        let Packet::Publish(p) = packet else {
            panic!("unexpected {packet:?}");
        };
        c.send(Packet::PubAck(PubAck::new(p.packet_id.unwrap())))
            .await;
        got += 1;
    }
    assert_eq!(got, 500);
    assert_eq!(server.broker().metrics.messages_dropped_queue_full.get(), 0);
    server.shutdown().await;
}

/// A wildcard SUBSCRIBE over a retained store of at least
/// `LARGE_RETAINED_STORE` (10,000) messages runs with its worker's other
/// tasks handed to another thread, where the runtime can: the SUBACK, then
/// every retained message once, on either kind of runtime.
async fn a_wildcard_subscribe_over_a_large_retained_store_gets_it_all() {
    const STORED: u16 = 10_050;
    let server = start(|_| {}).await;
    store_retained(&server, STORED, QoS::AtMostOnce).await;
    assert_eq!(server.broker().retained_count(), usize::from(STORED));
    let mut c = RawClient::connected(addr(&server), "reader", V5).await;
    c.send(subscribe_packet(1, "ret/+", QoS::AtMostOnce)).await;
    assert!(
        matches!(c.recv().await, Some(Packet::SubAck(ack)) if ack.packet_id == 1),
        "the SUBACK comes first"
    );
    let mut seen = vec![false; usize::from(STORED)];
    for _ in 0..STORED {
        let p = c.recv_publish().await;
        assert!(p.retain, "a retained message is flagged so");
        let topic = std::str::from_utf8(&p.topic).unwrap();
        let i: usize = topic.strip_prefix("ret/").unwrap().parse().unwrap();
        assert!(!std::mem::replace(&mut seen[i], true), "{topic} came twice");
    }
    c.expect_silence(Duration::from_millis(100)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_large_retained_lookup_on_a_current_thread_runtime() {
    a_wildcard_subscribe_over_a_large_retained_store_gets_it_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_retained_lookup_on_a_multi_thread_runtime() {
    a_wildcard_subscribe_over_a_large_retained_store_gets_it_all().await;
}

/// A wildcard SUBSCRIBE over a large retained store is handled only with
/// one of the broker's walk permits (`Broker::retained_walks`): while none
/// is free it waits, and the packets read after it wait behind it, while
/// other clients are served; once one is free it is handled as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_retained_walk_waits_for_a_permit_with_what_follows_it() {
    const STORED: u16 = 10_050;
    let server = start(|_| {}).await;
    store_retained(&server, STORED, QoS::AtMostOnce).await;
    let walks = std::sync::Arc::clone(&server.broker().retained_walks);
    let all = u32::try_from(walks.available_permits()).unwrap();
    let held = walks.acquire_many(all).await.unwrap();
    let mut c = RawClient::connected(addr(&server), "reader", V5).await;
    // The SUBSCRIBE and a PINGREQ in one write: read together.
    let mut bytes = BytesMut::new();
    for packet in [
        subscribe_packet(1, "ret/#", QoS::AtMostOnce),
        Packet::PingReq,
    ] {
        encode_packet(&packet, V5, &mut bytes).unwrap();
    }
    c.send_bytes(&bytes).await;
    c.expect_silence(Duration::from_millis(300)).await;
    let mut other = RawClient::connected(addr(&server), "other", V5).await;
    assert_eq!(
        other.subscribe("ret/7", QoS::AtMostOnce).await,
        vec![ReasonCode::Success],
        "a SUBSCRIBE that does not walk the store is not held up"
    );
    assert_eq!(other.recv_publish().await.topic, "ret/7");
    drop(held);
    assert!(
        matches!(c.recv().await, Some(Packet::SubAck(ack)) if ack.packet_id == 1),
        "the SUBACK comes first"
    );
    let (mut retained, mut pong) = (0, false);
    while retained < STORED || !pong {
        match c.recv().await {
            Some(Packet::Publish(p)) if p.retain => retained += 1,
            Some(Packet::PingResp) if !pong => pong = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    c.expect_silence(Duration::from_millis(100)).await;
    server.shutdown().await;
}

/// A connection waiting for a walk permit still ends when the broker closes
/// it: a client taking its session over is not held up by it, and the
/// SUBSCRIBE that waited is not applied to the session it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_waiting_for_a_walk_permit_can_be_taken_over() {
    let server = start(|_| {}).await;
    store_retained(&server, 10_050, QoS::AtMostOnce).await;
    let walks = std::sync::Arc::clone(&server.broker().retained_walks);
    let all = u32::try_from(walks.available_permits()).unwrap();
    let _held = walks.acquire_many(all).await.unwrap();
    let (mut old, _) = RawClient::connect(addr(&server), persistent_connect("same", 60)).await;
    old.send(subscribe_packet(1, "ret/#", QoS::AtMostOnce))
        .await;
    old.expect_silence(Duration::from_millis(200)).await;
    let (_new, ack) = RawClient::connect(addr(&server), persistent_connect("same", 60)).await;
    assert!(ack.session_present, "the session is resumed");
    old.expect_disconnect(ReasonCode::SessionTakenOver).await;
    assert_eq!(
        server.broker().router.subscription_count(),
        0,
        "the SUBSCRIBE that waited was not applied"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn takeover_sends_0x8e_to_the_old_connection() {
    let server = start(|_| {}).await;
    let mut old = RawClient::connected(addr(&server), "same", V5).await;
    let _new = RawClient::connected(addr(&server), "same", V5).await;
    old.expect_disconnect(ReasonCode::SessionTakenOver).await;
    assert_eq!(server.broker().registry.session_count(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_one_copy_at_highest_qos() {
    let server = start(|_| {}).await;
    let mut sub = RawClient::connected(addr(&server), "sub", V5).await;
    sub.subscribe("a/+", QoS::AtMostOnce).await;
    sub.subscribe("a/#", QoS::ExactlyOnce).await;
    sub.subscribe("a/b", QoS::AtLeastOnce).await;
    let mut publisher = RawClient::connected(addr(&server), "pub", V5).await;
    publisher.publish("a/b", b"once", QoS::ExactlyOnce, 7).await;
    let p = sub.recv_publish().await;
    assert_eq!(p.qos, QoS::ExactlyOnce);
    assert_eq!(&p.payload[..], b"once");
    sub.send(Packet::PubRec(PubAck::new(p.packet_id.unwrap())))
        .await;
    assert!(matches!(sub.recv().await, Some(Packet::PubRel(_))));
    sub.expect_silence(Duration::from_millis(300)).await;
    server.shutdown().await;
}

/// A PUBREC repeated for a message whose PUBREL was sent (the client lost
/// track of it) is answered with that PUBREL again, Success: the packet id is
/// still in use, waiting for PUBCOMP (MQTT 5 4.3.3). An id the broker holds
/// nothing for gets 0x92.
#[tokio::test]
async fn a_repeated_pubrec_gets_the_pubrel_again() {
    let server = start(|_| {}).await;
    let mut sub = RawClient::connected(addr(&server), "sub", V5).await;
    sub.subscribe("twice", QoS::ExactlyOnce).await;
    let mut publisher = RawClient::connected(addr(&server), "pub", V5).await;
    publisher.publish("twice", b"x", QoS::ExactlyOnce, 1).await;
    let id = sub.recv_publish().await.packet_id.unwrap();
    for _ in 0..2 {
        sub.send(Packet::PubRec(PubAck::new(id))).await;
        match sub.recv().await {
            Some(Packet::PubRel(r)) => assert_eq!((r.packet_id, r.code), (id, ReasonCode::Success)),
            other => panic!("expected PUBREL, got {other:?}"),
        }
    }
    sub.send(Packet::PubComp(PubAck::new(id))).await;
    sub.send(Packet::PubRec(PubAck::new(id))).await;
    match sub.recv().await {
        Some(Packet::PubRel(r)) => assert_eq!(r.code, ReasonCode::PacketIdentifierNotFound),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn qos_is_downgraded_to_the_subscription_maximum() {
    let server = start(|_| {}).await;
    let mut sub = RawClient::connected(addr(&server), "sub", V311).await;
    sub.subscribe("q", QoS::AtLeastOnce).await;
    let mut publisher = RawClient::connected(addr(&server), "pub", V311).await;
    publisher.publish("q", b"2", QoS::ExactlyOnce, 1).await;
    let p = sub.recv_publish().await;
    assert_eq!(p.qos, QoS::AtLeastOnce);
    server.shutdown().await;
}

/// MQTT 5 refuses an invalid filter alone, in SUBACK (0x8F), and the
/// connection stays.
#[tokio::test]
async fn invalid_filter_refused_in_suback_connection_stays() {
    let server = start(|_| {}).await;
    let mut c5 = RawClient::connected(addr(&server), "c5", V5).await;
    assert_eq!(
        c5.subscribe("a+", QoS::AtMostOnce).await,
        vec![ReasonCode::TopicFilterInvalid]
    );
    assert_eq!(
        c5.subscribe("ok/#", QoS::AtMostOnce).await,
        vec![ReasonCode::Success]
    );
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    p.publish("ok/x", b"hi", QoS::AtLeastOnce, 3).await;
    assert_eq!(&c5.recv_publish().await.payload[..], b"hi");
    server.shutdown().await;
}

/// MQTT 3.1.1 has no code for an invalid filter: it is a protocol
/// violation (MQTT-4.7.1-2, MQTT-4.8.0-1), so a SUBSCRIBE or UNSUBSCRIBE
/// carrying one closes the connection without an answer, and none of the
/// SUBSCRIBE's filters takes effect, not even the valid one before it.
#[tokio::test]
async fn an_invalid_filter_closes_an_mqtt_3_connection() {
    let server = start(|_| {}).await;
    let session = || {
        let mut connect = connect_packet("c3", V311);
        connect.clean_start = false;
        connect
    };
    let (mut c3, _) = RawClient::connect(addr(&server), session()).await;
    let Packet::Subscribe(mut subscribe) = subscribe_packet(1, "ok/#", QoS::AtMostOnce) else {
        unreachable!()
    };
    let mut invalid = subscribe.filters[0].clone();
    invalid.filter = Bytes::from_static(b"a/#/b");
    subscribe.filters.push(invalid);
    c3.send(Packet::Subscribe(subscribe)).await;
    assert!(c3.expect_closed().await.is_empty(), "no SUBACK");

    let (mut c3, ack) = RawClient::connect(addr(&server), session()).await;
    assert!(ack.session_present);
    let mut p = RawClient::connected(addr(&server), "p", V311).await;
    p.publish("ok/x", b"hi", QoS::AtLeastOnce, 3).await;
    c3.expect_silence(Duration::from_millis(200)).await;

    c3.send(Packet::Unsubscribe(tern_codec::Unsubscribe {
        packet_id: 2,
        filters: vec![Bytes::from_static(b"a+")],
        properties: Default::default(),
    }))
    .await;
    assert!(c3.expect_closed().await.is_empty(), "no UNSUBACK");
    server.shutdown().await;
}

#[tokio::test]
async fn dollar_topics_cannot_be_published_by_clients() {
    let server = start(|_| {}).await;
    let mut sub = RawClient::connected(addr(&server), "sub", V5).await;
    // The forged topic itself ($SYS/# would also bring the broker's own
    // retained figures).
    sub.subscribe("$SYS/fake", QoS::AtMostOnce).await;
    let mut c = RawClient::connected(addr(&server), "pub", V5).await;
    c.send(publish_packet("$SYS/fake", b"x", QoS::AtLeastOnce, Some(5)))
        .await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.code, ReasonCode::NotAuthorized),
        other => panic!("{other:?}"),
    }
    sub.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn wildcards_do_not_match_dollar_topics() {
    let server = start(|_| {}).await;
    let broker = std::sync::Arc::clone(server.broker());
    let mut sub = RawClient::connected(addr(&server), "sub", V311).await;
    sub.subscribe("#", QoS::AtMostOnce).await;
    let msg = tern::message::Message::new(
        Bytes::from_static(b"$SYS/uptime"),
        Bytes::from_static(b"1"),
        QoS::AtMostOnce,
        false,
        Default::default(),
        0,
    );
    broker.publish_and_commit(&msg);
    sub.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn retained_set_replace_delete() {
    let server = start(|_| {}).await;
    let mut p = RawClient::connected(addr(&server), "pub", V311).await;
    let retained = |payload: &'static [u8]| {
        let mut pkt = publish_packet("r/t", payload, QoS::AtLeastOnce, Some(9));
        if let Packet::Publish(ref mut x) = pkt {
            x.retain = true;
        }
        pkt
    };
    p.send(retained(b"one")).await;
    p.recv().await;
    p.send(retained(b"two")).await;
    p.recv().await;
    let mut s = RawClient::connected(addr(&server), "s1", V311).await;
    s.subscribe("r/#", QoS::AtLeastOnce).await;
    let got = s.recv_publish().await;
    assert!(got.retain);
    assert_eq!(&got.payload[..], b"two");
    s.send(Packet::PubAck(PubAck::new(got.packet_id.unwrap())))
        .await;
    // A live publish with RETAIN is forwarded with RETAIN cleared (3.1.1).
    p.send(retained(b"three")).await;
    p.recv().await;
    let live = s.recv_publish().await;
    assert!(!live.retain);
    // Empty payload deletes.
    p.send(retained(b"")).await;
    p.recv().await;
    let mut s2 = RawClient::connected(addr(&server), "s2", V311).await;
    s2.subscribe("r/#", QoS::AtLeastOnce).await;
    s2.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(server.broker().retained_count(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn persistent_session_queues_and_redelivers_with_dup() {
    let server = start(|_| {}).await;
    let mut connect = connect_packet("durable", V311);
    connect.clean_start = false;
    let (mut s, ack) = RawClient::connect(addr(&server), connect.clone()).await;
    assert!(!ack.session_present);
    s.subscribe("d/#", QoS::ExactlyOnce).await;
    let mut p = RawClient::connected(addr(&server), "pub", V311).await;
    p.publish("d/1", b"m1", QoS::AtLeastOnce, 1).await;
    let first = s.recv_publish().await;
    assert!(!first.dup);
    drop(s); // never acknowledged
    until_offline(&server, "durable").await;
    p.publish("d/2", b"m2", QoS::ExactlyOnce, 2).await;
    p.publish("d/3", b"m3", QoS::AtMostOnce, 0).await; // QoS 0 is not queued offline

    let (mut s, ack) = RawClient::connect(addr(&server), connect).await;
    assert!(ack.session_present);
    let again = s.recv_publish().await;
    assert!(again.dup, "redelivery carries DUP");
    assert_eq!(again.packet_id, first.packet_id);
    assert_eq!(&again.payload[..], b"m1");
    let queued = s.recv_publish().await;
    assert_eq!(&queued.payload[..], b"m2");
    assert_eq!(queued.qos, QoS::ExactlyOnce);
    s.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn incoming_qos2_retransmission_is_not_routed_twice() {
    let server = start(|_| {}).await;
    let mut sub = RawClient::connected(addr(&server), "sub", V311).await;
    sub.subscribe("x", QoS::AtMostOnce).await;
    let mut p = RawClient::connected(addr(&server), "pub", V311).await;
    p.send(publish_packet("x", b"once", QoS::ExactlyOnce, Some(4)))
        .await;
    assert!(matches!(p.recv().await, Some(Packet::PubRec(_))));
    let mut dup = publish_packet("x", b"once", QoS::ExactlyOnce, Some(4));
    if let Packet::Publish(ref mut x) = dup {
        x.dup = true;
    }
    p.send(dup).await;
    assert!(matches!(p.recv().await, Some(Packet::PubRec(_))));
    p.send(Packet::PubRel(PubAck::new(4))).await;
    assert!(matches!(p.recv().await, Some(Packet::PubComp(_))));
    assert_eq!(&sub.recv_publish().await.payload[..], b"once");
    sub.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn inflight_window_and_queue_overflow() {
    let server = start(|c| {
        c.limits.max_inflight = 2;
        c.limits.max_queued_messages = 3;
        // Drop at once: no wait for the (never acknowledging) subscriber.
        c.limits.queue_full_wait_ms = 0;
    })
    .await;
    let mut sub = RawClient::connected(addr(&server), "sub", V311).await;
    sub.subscribe("w", QoS::AtLeastOnce).await;
    let mut p = RawClient::connected(addr(&server), "pub", V311).await;
    for i in 0..8u16 {
        p.publish("w", format!("{i}").as_bytes(), QoS::AtLeastOnce, i + 1)
            .await;
    }
    // Two in flight, three queued, three dropped.
    let a = sub.recv_publish().await;
    let b = sub.recv_publish().await;
    sub.expect_silence(Duration::from_millis(200)).await;
    let dropped = server.broker().metrics.messages_dropped_queue_full.get();
    assert_eq!(dropped, 3);
    let mut got = vec![a.payload.clone(), b.payload.clone()];
    sub.send(Packet::PubAck(PubAck::new(a.packet_id.unwrap())))
        .await;
    sub.send(Packet::PubAck(PubAck::new(b.packet_id.unwrap())))
        .await;
    for _ in 0..3 {
        let m = sub.recv_publish().await;
        sub.send(Packet::PubAck(PubAck::new(m.packet_id.unwrap())))
            .await;
        got.push(m.payload);
    }
    let got: Vec<&[u8]> = got.iter().map(|b| &b[..]).collect();
    assert_eq!(
        got,
        vec![&b"0"[..], b"1", b"2", b"3", b"4"],
        "order preserved"
    );
    server.shutdown().await;
}

/// The window takes a message while it holds less than
/// `max_inflight_bytes` unacknowledged; so one message larger than the
/// bound still goes, alone.
#[tokio::test]
async fn the_inflight_window_is_bounded_in_bytes() {
    let server = start(|c| c.limits.max_inflight_bytes = 1024).await;
    let mut sub = RawClient::connected(addr(&server), "sub", V311).await;
    sub.subscribe("w", QoS::AtLeastOnce).await;
    let mut p = RawClient::connected(addr(&server), "pub", V311).await;
    // 1 + 400 bytes each: after three the window holds 1203 bytes.
    publish_weighed(&mut p, "w", 5, QoS::AtLeastOnce).await;
    let mut sent = Vec::new();
    for _ in 0..3 {
        sent.push(sub.recv_publish().await);
    }
    sub.expect_silence(Duration::from_millis(200)).await;
    each_puback_lets_one_more_through(&mut sub, &mut sent, 2).await;
    let first_bytes: Vec<u8> = sent.iter().map(|m| m.payload[0]).collect();
    assert_eq!(first_bytes, b"01234", "order preserved");
    for m in &sent[2..] {
        sub.send(Packet::PubAck(PubAck::new(m.packet_id.unwrap())))
            .await;
    }
    // Larger than the bound: sent into an empty window, and what follows
    // waits for its acknowledgement.
    p.publish("w", &[b'L'; 3000], QoS::AtLeastOnce, 6).await;
    p.publish("w", b"small", QoS::AtLeastOnce, 7).await;
    let large = sub.recv_publish().await;
    assert_eq!(large.payload.len(), 3000);
    sub.expect_silence(Duration::from_millis(200)).await;
    sub.send(Packet::PubAck(PubAck::new(large.packet_id.unwrap())))
        .await;
    assert_eq!(sub.recv_publish().await.payload, &b"small"[..]);
    assert_eq!(server.broker().metrics.messages_dropped_queue_full.get(), 0);
    server.shutdown().await;
}

/// A QoS 2 message holds its place in the window's bytes until PUBCOMP, not
/// only until PUBREC.
#[tokio::test]
async fn a_qos2_message_counts_in_the_window_bytes_until_pubcomp() {
    let server = start(|c| c.limits.max_inflight_bytes = 1024).await;
    let mut sub = RawClient::connected(addr(&server), "sub", V311).await;
    sub.subscribe("w", QoS::ExactlyOnce).await;
    let mut p = RawClient::connected(addr(&server), "pub", V311).await;
    publish_weighed(&mut p, "w", 4, QoS::ExactlyOnce).await;
    let mut sent = Vec::new();
    for _ in 0..3 {
        sent.push(sub.recv_publish().await);
    }
    let first = sent[0].packet_id.unwrap();
    sub.send(Packet::PubRec(PubAck::new(first))).await;
    match sub.recv_within(Duration::from_secs(5)).await {
        Ok(Some(Packet::PubRel(rel))) => assert_eq!(rel.packet_id, first),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    sub.expect_silence(Duration::from_millis(200)).await;
    sub.send(Packet::PubComp(PubAck::new(first))).await;
    assert_eq!(sub.recv_publish().await.payload[0], b'3');
    server.shutdown().await;
}

#[tokio::test]
async fn an_offline_queue_is_bounded_in_bytes() {
    let server = start(|c| c.limits.max_queued_bytes = 1024).await;
    let (mut sub, _) = RawClient::connect(addr(&server), persistent_connect("bytes", 600)).await;
    sub.subscribe("b/x", QoS::AtLeastOnce).await;
    drop(sub);
    until_offline(&server, "bytes").await;
    let mut p = RawClient::connected(addr(&server), "pub", V311).await;
    // 3 + 300 bytes each: three fit in 1024, the fourth and fifth do not.
    for i in 0..5u16 {
        let payload = vec![b'0' + i as u8; 300];
        p.publish("b/x", &payload, QoS::AtLeastOnce, i + 1).await;
    }
    let dropped = &server.broker().metrics.messages_dropped_queue_full;
    assert_eq!(dropped.get(), 2);
    let (mut sub, ack) = RawClient::connect(addr(&server), persistent_connect("bytes", 600)).await;
    assert!(ack.session_present);
    for i in 0..3u8 {
        let m = sub.recv_publish().await;
        assert_eq!(m.payload[0], b'0' + i);
        sub.send(Packet::PubAck(PubAck::new(m.packet_id.unwrap())))
            .await;
    }
    sub.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn shared_subscription_round_robin() {
    let server = start(|_| {}).await;
    let mut a = RawClient::connected(addr(&server), "a", V5).await;
    let mut b = RawClient::connected(addr(&server), "b", V5).await;
    a.subscribe("$share/g/jobs/#", QoS::AtMostOnce).await;
    b.subscribe("$share/g/jobs/#", QoS::AtMostOnce).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    for i in 0..4 {
        p.publish("jobs/x", format!("{i}").as_bytes(), QoS::AtMostOnce, 0)
            .await;
    }
    let mut total = 0;
    for c in [&mut a, &mut b] {
        let mut n = 0;
        while let Ok(Some(Packet::Publish(_))) = c.recv_within(Duration::from_millis(300)).await {
            n += 1;
        }
        assert_eq!(n, 2, "each member gets half");
        total += n;
    }
    assert_eq!(total, 4);
    server.shutdown().await;
}

#[tokio::test]
async fn v5_session_expiry_ends_session() {
    let server = start(|_| {}).await;
    let mut connect = connect_packet("brief", V5);
    connect.clean_start = false;
    connect.properties = ConnectProperties {
        session_expiry_interval: Some(1),
        ..Default::default()
    };
    let (mut c, _) = RawClient::connect(addr(&server), connect).await;
    c.subscribe("e", QoS::AtLeastOnce).await;
    assert_eq!(server.broker().router.subscription_count(), 1);
    drop(c);
    eventually("session expired", || {
        server.broker().registry.session_count() == 0
            && server.broker().router.subscription_count() == 0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn v5_will_delay_cancelled_by_reconnect() {
    let server = start(|_| {}).await;
    let mut watcher = RawClient::connected(addr(&server), "watcher", V5).await;
    watcher.subscribe("wills/#", QoS::AtMostOnce).await;
    let connect = with_delayed_will(persistent_connect("flaky", 60), 1);
    let (c, _) = RawClient::connect(addr(&server), connect.clone()).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (c, ack) = RawClient::connect(addr(&server), connect).await;
    assert!(ack.session_present);
    watcher.expect_silence(Duration::from_millis(1500)).await;
    // Now go away for longer than the delay: the will fires.
    drop(c);
    let will = watcher.recv_publish().await;
    assert_eq!(&will.payload[..], b"bye");
    server.shutdown().await;
}

/// The old connection is still closing (its writer is stuck on a backlog
/// its client does not read) when a new one with clean start ends the
/// session: the session is over, so its will goes now, not after the delay
/// (MQTT-3.1.2-8).
#[tokio::test]
async fn v5_delayed_will_goes_when_a_clean_start_takeover_ends_the_session() {
    let server = start(window_for_unread_backlog).await;
    let mut watcher = RawClient::connected(addr(&server), "watcher", V5).await;
    watcher.subscribe("wills/#", QoS::AtMostOnce).await;
    let connect = with_delayed_will(persistent_connect("replaced", 60), 30);
    let (mut old, _) = RawClient::connect(addr(&server), connect.clone()).await;
    old.subscribe("feed", QoS::AtLeastOnce).await;
    publish_unread_backlog(&server, "feed").await;

    let mut fresh = connect;
    fresh.clean_start = true;
    fresh.will = None;
    let (_new, ack) = RawClient::connect(addr(&server), fresh).await;
    assert!(!ack.session_present);
    match watcher.recv_within(Duration::from_secs(5)).await {
        Ok(Some(Packet::Publish(p))) => assert_eq!(&p.payload[..], b"bye"),
        other => panic!("expected the will long before its delay, got {other:?}"),
    }
    drop(old);
    server.shutdown().await;
}

#[tokio::test]
async fn v5_zero_session_expiry_sends_will_at_disconnect_despite_delay() {
    let server = start(|_| {}).await;
    let mut watcher = RawClient::connected(addr(&server), "watcher", V5).await;
    watcher.subscribe("wills/#", QoS::AtMostOnce).await;
    let connect = with_delayed_will(connect_packet("eph", V5), 30);
    let (c, _) = RawClient::connect(addr(&server), connect).await;
    drop(c);
    let will = watcher
        .recv_within(Duration::from_secs(2))
        .await
        .expect("will before the delay");
    assert!(matches!(will, Some(Packet::Publish(_))));
    server.shutdown().await;
}

#[tokio::test]
async fn a_new_session_beyond_max_sessions_is_refused_and_resuming_is_not() {
    // Offline sessions count: a client that connects again and again with
    // new client ids would otherwise grow the broker without end.
    let server = start(|c| c.limits.max_sessions = 2).await;
    let (_a, ack) = RawClient::connect(addr(&server), persistent_connect("a", 60)).await;
    assert_eq!(ack.code, ReasonCode::Success);
    let (b, ack) = RawClient::connect(addr(&server), persistent_connect("b", 60)).await;
    assert_eq!(ack.code, ReasonCode::Success);
    drop(b);
    until_offline(&server, "b").await;

    let (mut c, ack) = RawClient::connect(addr(&server), persistent_connect("c", 60)).await;
    assert_eq!(ack.code, ReasonCode::QuotaExceeded);
    assert!(c.expect_closed().await.is_empty());
    let (_c3, ack) = RawClient::connect(addr(&server), connect_packet("c3", V311)).await;
    assert_eq!(ack.code, ReasonCode::ServerUnavailable, "3.x: 0x03");
    assert_eq!(server.broker().registry.session_count(), 2);

    let (_b, ack) = RawClient::connect(addr(&server), persistent_connect("b", 60)).await;
    assert_eq!(ack.code, ReasonCode::Success);
    assert!(ack.session_present, "resuming is not limited");
    server.shutdown().await;
}

#[tokio::test]
async fn max_connections_refuses_with_connack() {
    let server = start(|c| c.limits.max_connections = 1).await;
    let _first = RawClient::connected(addr(&server), "one", V5).await;
    let (mut second, ack) = RawClient::connect(addr(&server), connect_packet("two", V5)).await;
    assert_eq!(ack.code, ReasonCode::ServerBusy);
    assert!(second.expect_closed().await.is_empty());
    eventually("refused connection uncounted", || {
        server.broker().registry.connection_count() == 1
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_sends_0x8b() {
    let server = start(|_| {}).await;
    let mut c = RawClient::connected(addr(&server), "c", V5).await;
    let shutdown = tokio::spawn(server.shutdown());
    match c.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, ReasonCode::ServerShuttingDown),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    drop(c);
    shutdown.await.unwrap();
}

/// A subscriber behind on reading what it was sent when the shutdown
/// begins, acknowledging as it goes, reads all of it and then the
/// DISCONNECT: the connection is not reset under it after a second (the
/// linger of a connection the broker ends, which its PUBACKs outlast).
#[tokio::test]
async fn a_shutdown_lets_a_slow_subscriber_read_its_backlog_and_the_disconnect() {
    const MESSAGES: u16 = 150;
    let server = start(|c| {
        c.storage.durability = tern::config::DurabilityMode::Memory;
    })
    .await;
    let mut sub = RawClient::connected(addr(&server), "slow", V5).await;
    sub.subscribe("s/#", QoS::AtLeastOnce).await;
    let mut publisher = RawClient::connected(addr(&server), "pub", V5).await;
    for id in 1..=MESSAGES {
        publisher
            .publish("s/1", &id.to_be_bytes(), QoS::AtLeastOnce, id)
            .await;
    }
    let shutdown = tokio::spawn(server.shutdown());
    // About 1.5 s of reading, one message each 10 ms.
    for id in 1..=MESSAGES {
        let publish = sub.recv_publish().await;
        assert_eq!(&publish.payload[..], &id.to_be_bytes());
        sub.send(Packet::PubAck(PubAck::new(publish.packet_id.unwrap())))
            .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match sub.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, ReasonCode::ServerShuttingDown),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    // Closing, as a client that reads the DISCONNECT does, ends the wait.
    drop((sub, publisher));
    shutdown.await.unwrap();
}

#[tokio::test]
async fn topic_alias_from_client() {
    let server = start(|_| {}).await;
    let mut sub = RawClient::connected(addr(&server), "sub", V5).await;
    sub.subscribe("alias/t", QoS::AtMostOnce).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    let mut first = publish_packet("alias/t", b"1", QoS::AtMostOnce, None);
    let mut second = publish_packet("", b"2", QoS::AtMostOnce, None);
    for pkt in [&mut first, &mut second] {
        if let Packet::Publish(ref mut x) = pkt {
            x.properties_mut().topic_alias = Some(1);
        }
    }
    p.send(first).await;
    p.send(second).await;
    assert_eq!(&sub.recv_publish().await.payload[..], b"1");
    let two = sub.recv_publish().await;
    assert_eq!(&two.topic[..], b"alias/t");
    assert_eq!(&two.payload[..], b"2");
    // An alias above the maximum is a protocol violation: 0x94.
    let mut bad = publish_packet("alias/t", b"3", QoS::AtMostOnce, None);
    if let Packet::Publish(ref mut x) = bad {
        x.properties_mut().topic_alias = Some(u16::MAX);
    }
    p.send(bad).await;
    p.expect_disconnect(ReasonCode::TopicAliasInvalid).await;
    server.shutdown().await;
}

#[tokio::test]
async fn takeover_of_a_non_persistent_session_does_not_resume_it() {
    for protocol in [V311, V5] {
        let server = start(|_| {}).await;
        let mut a = RawClient::connected(addr(&server), "tk", protocol).await;
        a.subscribe("tk/t", QoS::AtLeastOnce).await;
        let mut connect = connect_packet("tk", protocol);
        connect.clean_start = false;
        if protocol == V5 {
            connect.properties.session_expiry_interval = Some(60);
        }
        let (mut b, ack) = RawClient::connect(addr(&server), connect).await;
        assert!(
            !ack.session_present,
            "{protocol:?}: the old session had expiry 0"
        );
        a.expect_closed().await;
        let mut p = RawClient::connected(addr(&server), "p", protocol).await;
        p.publish("tk/t", b"x", QoS::AtLeastOnce, 1).await;
        b.expect_silence(Duration::from_millis(200)).await;
        assert_eq!(server.broker().router.subscription_count(), 0);
        server.shutdown().await;
    }
}

#[tokio::test]
async fn a_will_may_not_publish_under_dollar_topics() {
    let server = start(|_| {}).await;
    for protocol in [V311, V5] {
        let mut connect = connect_packet("sneaky", protocol);
        connect.will = Some(Will {
            topic: Bytes::from_static(b"$SYS/forged"),
            payload: Bytes::from_static(b"fake"),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: WillProperties::default(),
        });
        let (_c, ack) = RawClient::connect(addr(&server), connect).await;
        assert_eq!(ack.code, ReasonCode::NotAuthorized, "{protocol:?}");
    }
    assert!(server.broker().retained.get("$SYS/forged").is_none());
    assert_eq!(server.broker().retained_count(), 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_with_one_client_id_leave_one_connection() {
    let server = start(|_| {}).await;
    let address = addr(&server);
    for _round in 0..30 {
        let mut tasks = Vec::new();
        for i in 0..6 {
            tasks.push(tokio::spawn(async move {
                let mut connect = connect_packet("contended", V311);
                connect.clean_start = i % 2 == 0;
                let mut c = RawClient::open(address, V311).await;
                c.try_send(Packet::Connect(Box::new(connect))).await;
                // Keep the connection (if the broker does) for the check below.
                let _ = c.recv_within(Duration::from_millis(500)).await;
                c
            }));
        }
        let mut clients = Vec::new();
        for t in tasks {
            clients.push(t.await.unwrap());
        }
        // Every connection but one is closed by the broker: each taken-over
        // one after lingering for its client's close (1 s, which these
        // clients never do), so a loaded machine gets a wider bound.
        let count = || server.broker().registry.connection_count();
        eventually_within(3 * WAIT, "one connection per client id", || count() == 1).await;
        drop(clients);
        eventually("all gone", || {
            server.broker().registry.connection_count() == 0
        })
        .await;
    }
    server.shutdown().await;
}

/// The QoS 0 publishes of one read are delivered subscriber by subscriber
/// at the end of the read; a QoS 1 publish in between, and the end of the
/// read on a malformed packet, must not change what each subscriber gets
/// or its order.
#[tokio::test]
async fn publishes_of_one_read_arrive_in_order_whatever_their_qos() {
    let server = start(|_| {}).await;
    let mut subs = Vec::new();
    for i in 0..3 {
        let mut s = RawClient::connected(addr(&server), &format!("order-sub{i}"), V311).await;
        s.subscribe("order/t", QoS::AtLeastOnce).await;
        subs.push(s);
    }
    let mut p = RawClient::connected(addr(&server), "order-pub", V311).await;
    let mut bytes = bytes::BytesMut::new();
    let sequence: [(&[u8], QoS, Option<u16>); 6] = [
        (b"a", QoS::AtMostOnce, None),
        (b"b", QoS::AtMostOnce, None),
        (b"c", QoS::AtLeastOnce, Some(1)),
        (b"d", QoS::AtMostOnce, None),
        (b"e", QoS::AtLeastOnce, Some(2)),
        (b"f", QoS::AtMostOnce, None),
    ];
    for (payload, qos, id) in sequence {
        let packet = publish_packet("order/t", payload, qos, id);
        tern_codec::encode_packet(&packet, V311, &mut bytes).unwrap();
    }
    // Then a packet type a client may not send: the connection closes,
    // after what it published before.
    bytes.extend_from_slice(&[0xF0, 0x00]);
    p.send_bytes(&bytes).await;
    for s in &mut subs {
        let mut got = Vec::new();
        for _ in 0..sequence.len() {
            let m = s.recv_publish().await;
            if let Some(id) = m.packet_id {
                s.send(Packet::PubAck(PubAck::new(id))).await;
            }
            got.push(m.payload[0]);
        }
        assert_eq!(got, b"abcdef");
    }
    server.shutdown().await;
}

/// The retained messages a new subscriber to `#` receives: (topic, payload).
async fn retained_set(server: &tern::Server) -> Vec<(String, Vec<u8>)> {
    let mut c = RawClient::connected(addr(server), "looker", V5).await;
    c.subscribe("#", QoS::AtMostOnce).await;
    let mut got = Vec::new();
    while let Ok(Some(Packet::Publish(p))) = c.recv_within(Duration::from_millis(300)).await {
        got.push((
            String::from_utf8(p.topic.to_vec()).unwrap(),
            p.payload.to_vec(),
        ));
    }
    got.sort();
    got
}

#[tokio::test]
async fn retained_messages_beyond_the_limits_are_delivered_but_not_stored() {
    let server = start(|c| {
        c.limits.max_retained_messages = 2;
        c.limits.max_retained_bytes = 1024;
    })
    .await;
    let mut live = RawClient::connected(addr(&server), "live", V5).await;
    live.subscribe("r/#", QoS::AtMostOnce).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    let retain = |topic: &str, payload: &[u8]| {
        let mut packet = publish_packet(topic, payload, QoS::AtMostOnce, None);
        if let Packet::Publish(publish) = &mut packet {
            publish.retain = true;
        }
        packet
    };
    p.send(retain("r/a", b"1")).await;
    p.send(retain("r/b", b"2")).await;
    // A third topic: over max_retained_messages.
    p.send(retain("r/c", b"3")).await;
    for want in ["r/a", "r/b", "r/c"] {
        assert_eq!(
            live.recv_publish().await.topic,
            want.as_bytes(),
            "delivered live"
        );
    }
    let one = |t: &str, v: &[u8]| (t.to_owned(), v.to_vec());
    assert_eq!(
        retained_set(&server).await,
        [one("r/a", b"1"), one("r/b", b"2")]
    );
    assert_eq!(server.broker().metrics.retained_refused.get(), 1);
    // Replacing one stays within the count; clearing one makes room.
    p.send(retain("r/a", b"1bis")).await;
    p.send(retain("r/b", b"")).await;
    p.send(retain("r/c", b"3")).await;
    assert_eq!(
        retained_set(&server).await,
        [one("r/a", b"1bis"), one("r/c", b"3")]
    );
    // A value over max_retained_bytes does not replace the old one, and
    // the old one is not kept as if current.
    p.send(retain("r/a", &[b'x'; 1024])).await;
    assert_eq!(retained_set(&server).await, [one("r/c", b"3")]);
    assert_eq!(server.broker().metrics.retained_refused.get(), 2);
    server.shutdown().await;
}

/// `max_retained_bytes` bounds what retained messages hold in memory, the
/// store's node for each level of their topics included: ten retained
/// messages of one byte on topics of 128 levels each cost more than
/// 64 KiB, though their topics and payloads are 2.6 KB.
#[tokio::test]
async fn retained_messages_on_deep_topics_count_their_levels_against_the_byte_limit() {
    let server = start(|c| c.limits.max_retained_bytes = 64 * 1024).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    for i in 0..10 {
        let topic = format!("{i}{}", "/a".repeat(127));
        let mut packet = publish_packet(&topic, b"x", QoS::AtLeastOnce, Some(i + 1));
        if let Packet::Publish(publish) = &mut packet {
            publish.retain = true;
        }
        p.send(packet).await;
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    let broker = server.broker();
    let refused = broker.metrics.retained_refused.get();
    assert!(
        (1..10).contains(&refused),
        "{refused} of 10 deep retained messages refused within 64 KiB"
    );
    assert!(broker.retained_bytes() <= 64 * 1024);
    server.shutdown().await;
}

#[tokio::test]
async fn an_invalid_v5_connect_gets_a_connack_with_the_reason() {
    let server = start(|_| {}).await;
    // MQTT 5 CONNECT with Receive Maximum 0 (a protocol error, MQTT 5
    // 3.1.2.11.3), then one with a duplicate Session Expiry Interval.
    for (props, code) in [
        (&[0x21, 0x00, 0x00][..], 0x82),
        (&[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2][..], 0x82),
    ] {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60];
        body.push(props.len() as u8);
        body.extend_from_slice(props);
        body.extend_from_slice(&[0, 1, b'a']);
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend_from_slice(&body);
        let mut c = RawClient::open(addr(&server), V5).await;
        c.send_bytes(&packet).await;
        let mut raw = Vec::new();
        tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_to_end(&mut c.stream, &mut raw),
        )
        .await
        .expect("answered and closed")
        .unwrap();
        assert_eq!(raw, [0x20, 0x03, 0x00, code, 0x00], "{props:02x?}");
    }
    // The same broken CONNECT in 3.1.1 (a reserved flag bit set): closed
    // without a CONNACK, which has no code for it.
    let mut c = RawClient::open(addr(&server), V311).await;
    c.send_bytes(&[
        0x10, 0x0D, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x03, 0, 60, 0, 1, b'a',
    ])
    .await;
    assert!(c.expect_closed().await.is_empty());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_behind_a_paused_read_still_counts_at_a_takeover() {
    // A client's read held 40 QoS 0 publishes and a DISCONNECT; the
    // publishes found their subscriber's queue full, so the reader paused
    // with the DISCONNECT still undecoded in its buffer. The same client
    // then connects again: the DISCONNECT is still honoured, so no will.
    let server = start(|c| {
        c.limits.max_client_outbound_bytes = 1024;
        c.limits.queue_full_wait_ms = 10_000;
    })
    .await;
    let mut watcher = RawClient::connected(addr(&server), "watcher", V5).await;
    watcher.subscribe("wills/#", QoS::AtMostOnce).await;
    let mut sleeper = RawClient::connected(addr(&server), "sleeper", V5).await;
    sleeper.subscribe("busy", QoS::AtMostOnce).await;
    let frames = |n: usize, disconnect: bool| {
        let mut bytes = bytes::BytesMut::new();
        for _ in 0..n {
            let packet = publish_packet("busy", &[0; 512], QoS::AtMostOnce, None);
            tern_codec::encode_packet(&packet, V5, &mut bytes).unwrap();
        }
        if disconnect {
            let packet = Packet::Disconnect(Default::default());
            tern_codec::encode_packet(&packet, V5, &mut bytes).unwrap();
        }
        bytes
    };
    // Another publisher fills the sleeper's socket buffers and its queue.
    let mut filler = RawClient::connected(addr(&server), "filler", V5).await;
    let fill = frames(20_000, false);
    let filling = tokio::spawn(async move {
        let _ = tokio::io::AsyncWriteExt::write_all(&mut filler.stream, &fill).await;
        filler
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut c, _) = RawClient::connect(addr(&server), connect_with_will("paused", V5)).await;
    c.send_bytes(&frames(40, true)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_again, ack) = RawClient::connect(addr(&server), connect_packet("paused", V5)).await;
    assert_eq!(ack.code, ReasonCode::Success);
    watcher.expect_silence(Duration::from_millis(500)).await;
    filling.abort();
    drop(sleeper);
    server.shutdown().await;
}

#[tokio::test]
async fn expired_retained_messages_make_room_under_the_limits() {
    let server = start(|c| c.limits.max_retained_messages = 2).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    for topic in ["r/short-1", "r/short-2"] {
        let mut packet = publish_packet(topic, b"brief", QoS::AtMostOnce, None);
        if let Packet::Publish(publish) = &mut packet {
            publish.retain = true;
            publish.properties_mut().message_expiry_interval = Some(1);
        }
        p.send(packet).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut packet = publish_packet("r/lasting", b"kept", QoS::AtMostOnce, None);
    if let Packet::Publish(publish) = &mut packet {
        publish.retain = true;
    }
    p.send(packet).await;
    let one = |t: &str, v: &[u8]| (t.to_owned(), v.to_vec());
    assert_eq!(retained_set(&server).await, [one("r/lasting", b"kept")]);
    assert_eq!(server.broker().metrics.retained_refused.get(), 0);
    server.shutdown().await;
}

/// A will is kept for the connection's whole life, and each of its user
/// properties takes 64 bytes of memory for as few as 5 on the wire: one
/// that would hold more than `limits.max_packet_size` is refused (0x95),
/// though its CONNECT was within that size.
#[tokio::test]
async fn a_will_that_would_take_more_memory_than_a_packet_may_is_refused() {
    let server = start(|_| {}).await;
    let empty_pairs = |n: usize| {
        let mut connect = with_will(connect_packet("heavy", ProtocolVersion::V5));
        if let Some(will) = &mut connect.will {
            will.properties.user_properties = vec![(Bytes::new(), Bytes::new()); n];
        }
        connect
    };
    // 30,000 pairs: 150 KB on the wire, about 1.9 MB in memory.
    let (_refused, ack) = RawClient::connect(addr(&server), empty_pairs(30_000)).await;
    assert_eq!(ack.code, ReasonCode::PacketTooLarge);
    let (_accepted, ack) = RawClient::connect(addr(&server), empty_pairs(100)).await;
    assert_eq!(ack.code, ReasonCode::Success);
    server.shutdown().await;
}
