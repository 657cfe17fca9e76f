//! MQTT 5 features, checked on the wire.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use tern_codec::properties::PublishProperties;
use tern_codec::{
    Packet, ProtocolVersion, PubAck, Publish, QoS, ReasonCode, RetainHandling, Subscribe,
    SubscribeFilter,
};

const V5: ProtocolVersion = ProtocolVersion::V5;

fn sub_filter(filter: &str, qos: QoS) -> SubscribeFilter {
    SubscribeFilter {
        filter: Bytes::copy_from_slice(filter.as_bytes()),
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: RetainHandling::SendAtSubscribe,
    }
}

async fn subscribe_with(c: &mut RawClient, filters: Vec<SubscribeFilter>, id: Option<u32>) {
    let mut s = Subscribe {
        packet_id: 11,
        filters,
        properties: Default::default(),
    };
    s.properties.subscription_identifier = id;
    c.send(Packet::Subscribe(s)).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
}

/// Sends one SUBSCRIBE of `filters` and returns its SUBACK's codes.
async fn suback_codes(c: &mut RawClient, filters: Vec<SubscribeFilter>) -> Vec<ReasonCode> {
    c.send(Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters,
        properties: Default::default(),
    }))
    .await;
    match c.recv().await {
        Some(Packet::SubAck(ack)) => ack.codes,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

fn publish_with(
    topic: &str,
    payload: &[u8],
    qos: QoS,
    id: Option<u16>,
    props: PublishProperties,
    retain: bool,
) -> Packet {
    let mut p = publish_packet(topic, payload, qos, id);
    if let Packet::Publish(ref mut x) = p {
        x.set_properties(props);
        x.retain = retain;
    }
    p
}

#[tokio::test]
async fn outbound_topic_aliases_when_the_client_allows_them() {
    let server = start(|_| {}).await;
    let mut connect = connect_packet("aliased", V5);
    connect.properties.topic_alias_maximum = Some(1);
    let (mut sub, _) = RawClient::connect(addr(&server), connect).await;
    sub.subscribe("long/topic/name/#", QoS::AtMostOnce).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    for t in [
        "long/topic/name/a",
        "long/topic/name/a",
        "long/topic/name/b",
        "long/topic/name/b",
    ] {
        p.publish(t, b"x", QoS::AtMostOnce, 0).await;
    }
    let a1 = sub.recv_publish().await;
    assert_eq!(
        (&a1.topic[..], a1.properties().topic_alias),
        (&b"long/topic/name/a"[..], Some(1))
    );
    let a2 = sub.recv_publish().await;
    assert_eq!(
        (&a2.topic[..], a2.properties().topic_alias),
        (&b""[..], Some(1))
    );
    let b1 = sub.recv_publish().await;
    assert_eq!(
        (&b1.topic[..], b1.properties().topic_alias),
        (&b"long/topic/name/b"[..], Some(1))
    );
    let b2 = sub.recv_publish().await;
    assert_eq!(
        (&b2.topic[..], b2.properties().topic_alias),
        (&b""[..], Some(1))
    );

    // A client that allows none gets full topics.
    let mut plain = RawClient::connected(addr(&server), "plain", V5).await;
    plain.subscribe("long/#", QoS::AtMostOnce).await;
    p.publish("long/topic/name/a", b"x", QoS::AtMostOnce, 0)
        .await;
    let m = plain.recv_publish().await;
    assert_eq!(m.properties().topic_alias, None);
    assert_eq!(&m.topic[..], b"long/topic/name/a");
    server.shutdown().await;
}

#[tokio::test]
async fn response_information_and_server_keep_alive() {
    let server = start(|c| c.limits.max_keepalive_secs = 30).await;
    let mut connect = connect_packet("asker", V5);
    connect.properties.request_response_information = Some(1);
    connect.keep_alive = 600;
    let (_c, ack) = RawClient::connect(addr(&server), connect).await;
    assert_eq!(
        ack.properties.response_information.as_deref(),
        Some(&b"response/asker"[..])
    );
    assert_eq!(ack.properties.server_keep_alive, Some(30));
    let (_c, ack) = RawClient::connect(addr(&server), connect_packet("quiet", V5)).await;
    assert_eq!(ack.properties.response_information, None);
    server.shutdown().await;
}

#[tokio::test]
async fn request_response_properties_pass_through() {
    let server = start(|_| {}).await;
    let mut responder = RawClient::connected(addr(&server), "responder", V5).await;
    responder.subscribe("svc/req", QoS::AtLeastOnce).await;
    let mut requester = RawClient::connected(addr(&server), "requester", V5).await;
    let props = PublishProperties {
        response_topic: Some(Bytes::from_static(b"svc/resp/requester")),
        correlation_data: Some(Bytes::from_static(&[1, 2, 3])),
        content_type: Some(Bytes::from_static(b"text/plain")),
        payload_format_indicator: Some(1),
        user_properties: vec![
            (Bytes::from_static(b"b"), Bytes::from_static(b"2")),
            (Bytes::from_static(b"a"), Bytes::from_static(b"1")),
            (Bytes::from_static(b"b"), Bytes::from_static(b"3")),
        ],
        ..Default::default()
    };
    requester
        .send(publish_with(
            "svc/req",
            b"ping",
            QoS::AtLeastOnce,
            Some(1),
            props.clone(),
            false,
        ))
        .await;
    assert!(matches!(requester.recv().await, Some(Packet::PubAck(_))));
    let got = responder.recv_publish().await;
    assert_eq!(got.properties().response_topic, props.response_topic);
    assert_eq!(got.properties().correlation_data, props.correlation_data);
    assert_eq!(got.properties().content_type, props.content_type);
    assert_eq!(got.properties().payload_format_indicator, Some(1));
    assert_eq!(
        got.properties().user_properties,
        props.user_properties,
        "order and duplicates kept"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_utf8_with_format_indicator_is_refused() {
    let server = start(|_| {}).await;
    let mut sub = RawClient::connected(addr(&server), "sub", V5).await;
    sub.subscribe("f", QoS::AtMostOnce).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        ..Default::default()
    };
    p.send(publish_with(
        "f",
        &[0xFF, 0xFE],
        QoS::AtLeastOnce,
        Some(3),
        props.clone(),
        false,
    ))
    .await;
    match p.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.code, ReasonCode::PayloadFormatInvalid),
        other => panic!("{other:?}"),
    }
    sub.expect_silence(Duration::from_millis(200)).await;
    p.send(publish_with(
        "f",
        &[0xFF],
        QoS::AtMostOnce,
        None,
        props,
        false,
    ))
    .await;
    p.expect_disconnect(ReasonCode::PayloadFormatInvalid).await;
    server.shutdown().await;
}

/// A Response Topic is a topic name, which has at least one character
/// (MQTT-3.3.2-13, MQTT-4.7.3-1): an empty one ends the connection with a
/// Protocol Error, and the message goes nowhere; in a will, CONNACK refuses
/// it.
#[tokio::test]
async fn an_empty_response_topic_is_a_protocol_error() {
    let server = start(|_| {}).await;
    let mut sub = RawClient::connected(addr(&server), "sub", V5).await;
    sub.subscribe("req", QoS::AtMostOnce).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    let empty = PublishProperties {
        response_topic: Some(Bytes::new()),
        ..Default::default()
    };
    p.send(publish_with(
        "req",
        b"x",
        QoS::AtLeastOnce,
        Some(1),
        empty,
        false,
    ))
    .await;
    p.expect_disconnect(ReasonCode::ProtocolError).await;
    sub.expect_silence(Duration::from_millis(200)).await;

    let mut connect = connect_packet("willing", V5);
    connect.will = Some(tern_codec::Will {
        topic: Bytes::from_static(b"wills/x"),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: tern_codec::properties::WillProperties {
            response_topic: Some(Bytes::new()),
            ..Default::default()
        },
    });
    let (_c, ack) = RawClient::connect(addr(&server), connect).await;
    assert_eq!(ack.code, ReasonCode::ProtocolError);
    server.shutdown().await;
}

/// A will is checked as a PUBLISH is: one whose payload its indicator says
/// is UTF-8, and is not, is refused at CONNECT (0x99) and never published;
/// with the check off it is accepted.
#[tokio::test]
async fn a_will_whose_payload_is_not_the_utf8_it_claims_is_refused() {
    let mislabelled = |client_id: &str| {
        let mut connect = connect_packet(client_id, V5);
        connect.will = Some(tern_codec::Will {
            topic: Bytes::from_static(b"wills/x"),
            payload: Bytes::from_static(&[0xC3, 0x28]),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: tern_codec::properties::WillProperties {
                payload_format_indicator: Some(1),
                ..Default::default()
            },
        });
        connect
    };
    let server = start(|_| {}).await;
    let (_c, ack) = RawClient::connect(addr(&server), mislabelled("checked")).await;
    assert_eq!(ack.code, ReasonCode::PayloadFormatInvalid);
    let mut plain = mislabelled("plain");
    if let Some(will) = plain.will.as_mut() {
        will.properties.payload_format_indicator = None;
    }
    let (_c, ack) = RawClient::connect(addr(&server), plain).await;
    assert_eq!(ack.code, ReasonCode::Success, "no indicator, no check");
    server.shutdown().await;

    let server = start(|c| c.mqtt.check_payload_format = false).await;
    let (_c, ack) = RawClient::connect(addr(&server), mislabelled("unchecked")).await;
    assert_eq!(ack.code, ReasonCode::Success);
    server.shutdown().await;
}

#[tokio::test]
async fn server_reference_redirects_v5_clients_only() {
    let server = start(|c| c.mqtt.server_reference = Some("other.example:1883".into())).await;
    let (_c, ack) = RawClient::connect(addr(&server), connect_packet("v5", V5)).await;
    assert_eq!(ack.code, ReasonCode::UseAnotherServer);
    assert_eq!(
        ack.properties.server_reference.as_deref(),
        Some(&b"other.example:1883"[..])
    );
    let (_c, ack) =
        RawClient::connect(addr(&server), connect_packet("v3", ProtocolVersion::V311)).await;
    assert_eq!(ack.code, ReasonCode::Success);
    server.shutdown().await;
}

#[tokio::test]
async fn one_copy_carries_every_matching_subscription_identifier() {
    let server = start(|_| {}).await;
    let mut sub = RawClient::connected(addr(&server), "sub", V5).await;
    subscribe_with(
        &mut sub,
        vec![sub_filter("ids/+", QoS::AtMostOnce)],
        Some(1),
    )
    .await;
    // Two more, under one identifier: it is carried once.
    subscribe_with(
        &mut sub,
        vec![
            sub_filter("ids/#", QoS::AtLeastOnce),
            sub_filter("+/x", QoS::AtMostOnce),
        ],
        Some(2),
    )
    .await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    p.publish("ids/x", b"1", QoS::AtLeastOnce, 1).await;
    let got = sub.recv_publish().await;
    let mut ids = got.properties().subscription_identifiers.clone();
    ids.sort();
    assert_eq!(ids, vec![1, 2]);
    assert_eq!(got.qos, QoS::AtLeastOnce);
    sub.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn no_local_and_retain_as_published() {
    let server = start(|_| {}).await;
    let mut c = RawClient::connected(addr(&server), "self", V5).await;
    let mut f = sub_filter("loop/#", QoS::AtMostOnce);
    f.no_local = true;
    let mut g = sub_filter("rap/#", QoS::AtMostOnce);
    g.retain_as_published = true;
    subscribe_with(&mut c, vec![f, g], None).await;
    c.send(publish_with(
        "loop/a",
        b"mine",
        QoS::AtMostOnce,
        None,
        Default::default(),
        false,
    ))
    .await;
    c.expect_silence(Duration::from_millis(200)).await;
    let mut other = RawClient::connected(addr(&server), "other", V5).await;
    other
        .send(publish_with(
            "loop/a",
            b"theirs",
            QoS::AtMostOnce,
            None,
            Default::default(),
            false,
        ))
        .await;
    assert_eq!(&c.recv_publish().await.payload[..], b"theirs");
    other
        .send(publish_with(
            "rap/a",
            b"kept",
            QoS::AtMostOnce,
            None,
            Default::default(),
            true,
        ))
        .await;
    let got = c.recv_publish().await;
    assert!(
        got.retain,
        "Retain As Published keeps the flag on a live message"
    );
    server.shutdown().await;
}

/// Several QoS 0 messages in one read reach each subscriber together (one
/// queue entry for all of them), yet each is still sent as it would be
/// alone: its own RETAIN flag for Retain As Published, the subscriber's
/// subscription identifier on every one, none back to a No Local publisher,
/// in order.
#[tokio::test]
async fn messages_of_one_read_keep_their_own_flags_and_options() {
    let server = start(|_| {}).await;
    let mut publisher = RawClient::connected(addr(&server), "burst-p", V5).await;
    let mut own = sub_filter("burst/t", QoS::AtMostOnce);
    own.no_local = true;
    subscribe_with(&mut publisher, vec![own], None).await;
    let mut rap = RawClient::connected(addr(&server), "burst-rap", V5).await;
    let mut f = sub_filter("burst/t", QoS::AtMostOnce);
    f.retain_as_published = true;
    subscribe_with(&mut rap, vec![f], Some(9)).await;
    let mut plain = RawClient::connected(addr(&server), "burst-plain", ProtocolVersion::V311).await;
    plain.subscribe("burst/t", QoS::AtMostOnce).await;

    // Eight publishes written at once, so read at once.
    let mut bytes = bytes::BytesMut::new();
    let sent: Vec<(Vec<u8>, bool)> = (0..8u8).map(|i| (vec![b'0' + i], i % 3 == 0)).collect();
    for (payload, retain) in &sent {
        let packet = publish_with(
            "burst/t",
            payload,
            QoS::AtMostOnce,
            None,
            Default::default(),
            *retain,
        );
        tern_codec::encode_packet(&packet, V5, &mut bytes).unwrap();
    }
    publisher.send_bytes(&bytes).await;

    for (payload, retain) in &sent {
        let got = rap.recv_publish().await;
        assert_eq!((&got.payload[..], got.retain), (&payload[..], *retain));
        assert_eq!(got.properties().subscription_identifiers, vec![9]);
        let got = plain.recv_publish().await;
        assert_eq!((&got.payload[..], got.retain), (&payload[..], false));
    }
    publisher.expect_silence(Duration::from_millis(200)).await;
    rap.expect_silence(Duration::from_millis(100)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn retain_handling_options() {
    let server = start(|_| {}).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    p.send(publish_with(
        "rh/t",
        b"r",
        QoS::AtMostOnce,
        None,
        Default::default(),
        true,
    ))
    .await;
    p.send(publish_with(
        "rh/t",
        b"sync",
        QoS::AtLeastOnce,
        Some(1),
        Default::default(),
        false,
    ))
    .await;
    p.recv().await;
    let mut c = RawClient::connected(addr(&server), "c", V5).await;
    let mut never = sub_filter("rh/#", QoS::AtMostOnce);
    never.retain_handling = RetainHandling::DoNotSend;
    subscribe_with(&mut c, vec![never], None).await;
    c.expect_silence(Duration::from_millis(200)).await;
    let mut if_new = sub_filter("rh/+", QoS::AtMostOnce);
    if_new.retain_handling = RetainHandling::SendIfNew;
    subscribe_with(&mut c, vec![if_new.clone()], None).await;
    assert_eq!(&c.recv_publish().await.payload[..], b"r");
    // Same subscription again: it exists, so nothing is sent.
    subscribe_with(&mut c, vec![if_new], None).await;
    c.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn message_expiry_while_queued_and_when_retained() {
    let server = start(|_| {}).await;
    offline_subscriber(&server, "offline", "exp/#", QoS::AtLeastOnce).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    let short = PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    let long = PublishProperties {
        message_expiry_interval: Some(100),
        ..Default::default()
    };
    p.send(publish_with(
        "exp/short",
        b"s",
        QoS::AtLeastOnce,
        Some(1),
        short.clone(),
        false,
    ))
    .await;
    p.recv().await;
    p.send(publish_with(
        "exp/long",
        b"l",
        QoS::AtLeastOnce,
        Some(2),
        long,
        false,
    ))
    .await;
    p.recv().await;
    p.send(publish_with(
        "exp/retained",
        b"r",
        QoS::AtMostOnce,
        None,
        short,
        true,
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (mut s, ack) = RawClient::connect(addr(&server), persistent_connect("offline", 60)).await;
    assert!(ack.session_present);
    let got = s.recv_publish().await;
    assert_eq!(
        &got.payload[..],
        b"l",
        "the expired message is never delivered"
    );
    ack_with_interval_reduced(&mut s, got).await;
    let mut late = RawClient::connected(addr(&server), "late", V5).await;
    late.subscribe("exp/#", QoS::AtMostOnce).await;
    late.expect_silence(Duration::from_millis(200)).await;
    assert!(server.broker().metrics.messages_expired.get() >= 1);
    server.shutdown().await;
}

/// Checks that `got`, sent with Message Expiry Interval 100, came with the
/// interval reduced by a wait of one to three seconds, acknowledges it, and
/// checks nothing else comes.
async fn ack_with_interval_reduced(s: &mut RawClient, got: Publish) {
    let left = got.properties().message_expiry_interval.unwrap();
    assert!(
        (97..100).contains(&left),
        "interval reduced by the wait: {left}"
    );
    s.send(Packet::PubAck(PubAck::new(got.packet_id.unwrap())))
        .await;
    s.expect_silence(Duration::from_millis(200)).await;
}

/// A QoS 1 message sent and not acknowledged before its client went away
/// is sent again when the session resumes, with DUP, even if it expired
/// meanwhile: its delivery had started (MQTT-3.3.2-5 deletes only a copy
/// whose delivery has not), and every unacknowledged PUBLISH is sent again
/// (MQTT-4.4.0-1). The expired one carries an interval of 1, the least
/// there is; one still alive its interval reduced by the wait.
#[tokio::test]
async fn an_unacknowledged_message_is_sent_again_even_if_it_expired() {
    let server = start(|_| {}).await;
    let (mut s, _) = RawClient::connect(addr(&server), persistent_connect("forgetful", 60)).await;
    s.subscribe("exp/#", QoS::AtLeastOnce).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    for (id, (topic, interval)) in [("exp/short", 1), ("exp/long", 100)]
        .into_iter()
        .enumerate()
    {
        let properties = PublishProperties {
            message_expiry_interval: Some(interval),
            ..Default::default()
        };
        let id = id as u16 + 1;
        p.send(publish_with(
            topic,
            b"m",
            QoS::AtLeastOnce,
            Some(id),
            properties,
            false,
        ))
        .await;
        p.recv().await;
        // Received, never acknowledged.
        assert_eq!(s.recv_publish().await.topic, topic.as_bytes());
    }
    drop(s);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (mut s, ack) = RawClient::connect(addr(&server), persistent_connect("forgetful", 60)).await;
    assert!(ack.session_present);
    let expired = s.recv_publish().await;
    assert_eq!(expired.topic, &b"exp/short"[..], "sent again, in order");
    assert!(expired.dup);
    assert_eq!(expired.properties().message_expiry_interval, Some(1));
    s.send(Packet::PubAck(PubAck::new(expired.packet_id.unwrap())))
        .await;
    let alive = s.recv_publish().await;
    assert_eq!(alive.topic, &b"exp/long"[..]);
    assert!(alive.dup);
    ack_with_interval_reduced(&mut s, alive).await;
    server.shutdown().await;
}

/// A Message Expiry Interval of 0 is a lifetime that ends on arrival: the
/// message reaches the subscribers it can be handed to at once, at any QoS,
/// forwarded with an interval of 0, and waits for nobody.
#[tokio::test]
async fn a_message_expiry_interval_of_0_reaches_connected_subscribers_only() {
    let server = start(|_| {}).await;
    offline_subscriber(&server, "away", "now/#", QoS::AtLeastOnce).await;
    let mut here = RawClient::connected(addr(&server), "here", V5).await;
    here.subscribe("now/#", QoS::AtLeastOnce).await;

    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    let zero = PublishProperties {
        message_expiry_interval: Some(0),
        ..Default::default()
    };
    p.send(publish_with(
        "now/0",
        b"q0",
        QoS::AtMostOnce,
        None,
        zero.clone(),
        false,
    ))
    .await;
    p.send(publish_with(
        "now/1",
        b"q1",
        QoS::AtLeastOnce,
        Some(1),
        zero,
        true,
    ))
    .await;
    assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    for expected in [&b"q0"[..], b"q1"] {
        let got = here.recv_publish().await;
        assert_eq!(&got.payload[..], expected);
        assert_eq!(got.properties().message_expiry_interval, Some(0));
        if let Some(id) = got.packet_id {
            here.send(Packet::PubAck(PubAck::new(id))).await;
        }
    }

    let (mut s, ack) = RawClient::connect(addr(&server), persistent_connect("away", 60)).await;
    assert!(ack.session_present);
    s.expect_silence(Duration::from_millis(200)).await;
    let mut late = RawClient::connected(addr(&server), "late", V5).await;
    late.subscribe("now/#", QoS::AtMostOnce).await;
    late.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn client_receive_maximum_limits_inflight() {
    let server = start(|_| {}).await;
    let mut connect = connect_packet("slow", V5);
    connect.properties.receive_maximum = Some(1);
    let (mut sub, _) = RawClient::connect(addr(&server), connect).await;
    sub.subscribe("rm", QoS::AtLeastOnce).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    for i in 1..=3u16 {
        p.publish("rm", &[i as u8], QoS::AtLeastOnce, i).await;
    }
    for i in 1..=3u8 {
        let m = sub.recv_publish().await;
        assert_eq!(&m.payload[..], &[i]);
        sub.expect_silence(Duration::from_millis(150)).await;
        sub.send(Packet::PubAck(PubAck::new(m.packet_id.unwrap())))
            .await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn exceeding_our_receive_maximum_is_0x93() {
    let server = start(|c| c.limits.receive_maximum = 2).await;
    let (mut p, ack) = RawClient::connect(addr(&server), connect_packet("flood", V5)).await;
    assert_eq!(ack.properties.receive_maximum, Some(2));
    for id in 1..=3u16 {
        p.send(publish_packet("q2", b"x", QoS::ExactlyOnce, Some(id)))
            .await;
    }
    p.expect_disconnect(ReasonCode::ReceiveMaximumExceeded)
        .await;
    server.shutdown().await;
}

/// MQTT 3.1.1 has no Receive Maximum the broker could announce: a client
/// with more QoS 2 flows open than `limits.receive_maximum` (MQTT.js opens
/// as many as it publishes) is not disconnected. Each gets its PUBREC, and
/// each message is routed once.
#[tokio::test]
async fn an_mqtt_3_client_may_open_more_qos_2_flows_than_our_receive_maximum() {
    let server = start(|c| c.limits.receive_maximum = 2).await;
    let mut s = RawClient::connected(addr(&server), "q2-sub", ProtocolVersion::V311).await;
    s.subscribe("q2", QoS::AtMostOnce).await;
    let mut p = RawClient::connected(addr(&server), "q2-flood", ProtocolVersion::V311).await;
    for id in 1..=20u16 {
        p.send(publish_packet("q2", b"x", QoS::ExactlyOnce, Some(id)))
            .await;
    }
    for id in 1..=20u16 {
        match p.recv().await {
            Some(Packet::PubRec(a)) => assert_eq!(a.packet_id, id),
            other => panic!("expected PUBREC {id}, got {other:?}"),
        }
    }
    for _ in 1..=20 {
        assert_eq!(&s.recv_publish().await.payload[..], b"x");
    }
    for id in 1..=20u16 {
        p.send(Packet::PubRel(tern_codec::PubAck::new(id))).await;
        match p.recv().await {
            Some(Packet::PubComp(a)) => assert_eq!(a.packet_id, id),
            other => panic!("expected PUBCOMP {id}, got {other:?}"),
        }
    }
    s.expect_silence(Duration::from_millis(100)).await;
    server.shutdown().await;
}

/// A client the broker ended (a PINGRESP from a client is a protocol
/// error), once it has read the DISCONNECT.
async fn ended_by_a_protocol_error(server: &tern::Server) -> RawClient {
    let mut c = RawClient::connected(addr(server), "erring", V5).await;
    c.send(Packet::PingResp).await;
    match c.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, ReasonCode::ProtocolError),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    c
}

/// While the broker lingers on a connection it ended (`transport::LINGER`),
/// the socket still counts as a connection: against `max_connections`, and
/// for a shutdown, which waits for it. It stops counting once the linger
/// is over.
#[tokio::test]
async fn a_connection_the_broker_ended_counts_until_its_socket_is_closed() {
    let server = start(|_| {}).await;
    let count = || server.broker().registry.connection_count();
    let mut c = ended_by_a_protocol_error(&server).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(count(), 1, "still lingering on the client's socket");
    eventually("the linger over", || count() == 0).await;
    assert!(c.expect_closed().await.is_empty());
    server.shutdown().await;
}

/// Over TCP, an MQTT 5 client the broker ended reads the DISCONNECT and
/// closes first: the broker sends no end of stream behind the DISCONNECT
/// (a client still reading it, in two threads, might take one for the
/// middle of a packet), and lets the socket go as soon as the client has
/// closed it.
#[tokio::test]
async fn an_mqtt5_client_the_broker_ended_closes_first() {
    let server = start(|_| {}).await;
    let count = || server.broker().registry.connection_count();
    let mut c = ended_by_a_protocol_error(&server).await;
    assert_eq!(
        c.recv_within(Duration::from_millis(300)).await,
        Err(()),
        "no end of stream behind the DISCONNECT"
    );
    drop(c);
    eventually("the socket let go", || count() == 0).await;
    server.shutdown().await;
}

/// A client that keeps sending after the broker ended its connection (here
/// it releases each QoS 2 flow it was answered, as the Paho test of this
/// case does) can still write for a moment and reads the DISCONNECT: the
/// broker keeps reading, and discarding, after its DISCONNECT
/// (`transport::LINGER`). Closed with those bytes unread, the socket was
/// reset, and the client's next write failed before it read why.
#[tokio::test]
async fn a_client_still_sending_after_the_broker_ended_it_reads_the_disconnect() {
    let server = start(|c| c.limits.receive_maximum = 2).await;
    let (mut p, _) = RawClient::connect(addr(&server), connect_packet("flood", V5)).await;
    let mut flood = bytes::BytesMut::new();
    for id in 1..=3u16 {
        let publish = publish_packet("q2", b"x", QoS::ExactlyOnce, Some(id));
        tern_codec::encode_packet(&publish, V5, &mut flood).unwrap();
    }
    p.send_bytes(&flood).await;
    let mut seen = Vec::new();
    loop {
        match p.recv().await {
            Some(Packet::PubRec(a)) => {
                // Each released after the broker has closed its side.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let sent = p.try_send(Packet::PubRel(PubAck::new(a.packet_id))).await;
                assert!(
                    sent,
                    "could not send PUBREL {} (seen {seen:?})",
                    a.packet_id
                );
                seen.push(Packet::PubRec(a));
            }
            Some(other) => {
                seen.push(other);
                break;
            }
            None => break,
        }
    }
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.code == ReasonCode::ReceiveMaximumExceeded),
        "{seen:?}"
    );
    server.shutdown().await;
}

/// QoS 2 flows left open by an earlier connection (PUBREC received,
/// PUBREL not yet sent) do not count against the resumed connection's
/// Receive Maximum: the client's send quota starts afresh (MQTT 5 4.9) and
/// the PUBRELs it sends again take none of it. Its own flows still do.
#[tokio::test]
async fn flows_carried_over_a_reconnect_leave_the_receive_maximum_to_the_new_connection() {
    let server = start(|c| c.limits.receive_maximum = 2).await;
    let (mut first, _) = RawClient::connect(addr(&server), persistent_connect("carrier", 60)).await;
    for id in 1..=2u16 {
        first
            .send(publish_packet("q2", b"x", QoS::ExactlyOnce, Some(id)))
            .await;
        assert!(matches!(first.recv().await, Some(Packet::PubRec(a)) if a.packet_id == id));
    }
    drop(first);
    let (mut again, ack) =
        RawClient::connect(addr(&server), persistent_connect("carrier", 60)).await;
    assert!(ack.session_present);
    for id in 3..=4u16 {
        again
            .send(publish_packet("q2", b"x", QoS::ExactlyOnce, Some(id)))
            .await;
        assert!(matches!(again.recv().await, Some(Packet::PubRec(a)) if a.packet_id == id));
    }
    // Releasing a carried flow frees nothing of the new connection's quota.
    again.send(Packet::PubRel(PubAck::new(1))).await;
    assert!(matches!(again.recv().await, Some(Packet::PubComp(a)) if a.packet_id == 1));
    again
        .send(publish_packet("q2", b"x", QoS::ExactlyOnce, Some(5)))
        .await;
    again
        .expect_disconnect(ReasonCode::ReceiveMaximumExceeded)
        .await;
    server.shutdown().await;
}

#[tokio::test]
async fn deliveries_larger_than_the_client_maximum_are_dropped() {
    let server = start(|_| {}).await;
    let mut connect = connect_packet("small", V5);
    connect.properties.maximum_packet_size = Some(64);
    let (mut sub, _) = RawClient::connect(addr(&server), connect).await;
    sub.subscribe("m", QoS::AtLeastOnce).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    p.publish("m", &[0u8; 200], QoS::AtLeastOnce, 1).await;
    p.publish("m", b"fits", QoS::AtLeastOnce, 2).await;
    let got = sub.recv_publish().await;
    assert_eq!(&got.payload[..], b"fits");
    assert_eq!(server.broker().metrics.messages_dropped_oversized.get(), 1);
    server.shutdown().await;
}

/// MQTT-3.1.2-24 covers the CONNACK too: for a client that takes only small
/// packets, the broker leaves out what it may (availabilities that default to
/// 1, the Response Information asked for) and keeps the assigned identifier.
#[tokio::test]
async fn a_connack_fits_the_client_maximum_packet_size() {
    let server = start(|_| {}).await;
    let small = |max| {
        let mut connect = connect_packet("", V5);
        connect.properties.maximum_packet_size = Some(max);
        connect.properties.request_response_information = Some(1);
        connect
    };
    let (_roomy, full) = RawClient::connect(addr(&server), small(1024)).await;
    let full_len = tern_codec::encoded_len(&Packet::ConnAck(Box::new(full.clone())), V5).unwrap();
    assert!(full.properties.response_information.is_some());
    assert_eq!(full.properties.retain_available, Some(1));

    let max = 50;
    assert!(full_len > max as usize, "{full_len}");
    let (mut c, ack) = RawClient::connect(addr(&server), small(max)).await;
    assert_eq!(ack.code, ReasonCode::Success);
    let len = tern_codec::encoded_len(&Packet::ConnAck(Box::new(ack.clone())), V5).unwrap();
    assert!(
        len <= max as usize,
        "CONNACK of {len} bytes, client maximum {max}"
    );
    let assigned = ack
        .properties
        .assigned_client_identifier
        .expect("assigned id");
    assert_eq!(
        assigned.len(),
        full.properties.assigned_client_identifier.unwrap().len()
    );
    assert_eq!(
        ack.properties.maximum_packet_size,
        full.properties.maximum_packet_size
    );
    assert_eq!(ack.properties.retain_available, None);
    // The connection goes on as any other.
    assert_eq!(
        c.subscribe("s", QoS::AtMostOnce).await,
        vec![ReasonCode::Success]
    );
    // Smaller still: the Topic Alias Maximum goes too (the client then
    // uses no aliases); the limits the client must keep to stay.
    let max = 37;
    let (_tiny, ack) = RawClient::connect(addr(&server), small(max)).await;
    let len = tern_codec::encoded_len(&Packet::ConnAck(Box::new(ack.clone())), V5).unwrap();
    assert!(
        len <= max as usize,
        "CONNACK of {len} bytes, client maximum {max}"
    );
    assert_eq!(ack.properties.topic_alias_maximum, None);
    assert!(ack.properties.receive_maximum.is_some());
    assert!(ack.properties.maximum_packet_size.is_some());
    server.shutdown().await;
}

/// A SUBACK or UNSUBACK larger than the client's Maximum Packet Size is not
/// sent (MQTT-3.1.2-24, -25) and counted; the subscriptions still apply,
/// and the connection goes on.
#[tokio::test]
async fn an_acknowledgement_larger_than_the_client_maximum_is_not_sent() {
    let server = start(|_| {}).await;
    let mut connect = connect_packet("small-acks", V5);
    connect.properties.maximum_packet_size = Some(30);
    let (mut c, _) = RawClient::connect(addr(&server), connect).await;
    let filters: Vec<String> = (0..40).map(|i| format!("f/{i}")).collect();
    let mut subscribe = subscribe_packet(1, &filters[0], QoS::AtMostOnce);
    if let Packet::Subscribe(s) = &mut subscribe {
        let first = s.filters[0].clone();
        for f in &filters[1..] {
            let mut request = first.clone();
            request.filter = Bytes::from(f.clone());
            s.filters.push(request);
        }
    }
    c.send(subscribe).await;
    c.send(Packet::Unsubscribe(tern_codec::Unsubscribe {
        packet_id: 2,
        filters: filters[..30]
            .iter()
            .map(|f| Bytes::from(f.clone()))
            .collect(),
        properties: Default::default(),
    }))
    .await;
    // Neither 45-byte SUBACK nor 35-byte UNSUBACK comes; the PINGRESP does.
    c.send(Packet::PingReq).await;
    assert!(matches!(c.recv().await, Some(Packet::PingResp)));
    assert_eq!(server.broker().metrics.acks_dropped_oversized.get(), 2);
    // An UNSUBACK that fits is sent; the subscriptions not removed deliver.
    c.unsubscribe("f/30").await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    for topic in ["f/0", "f/30", "f/39"] {
        p.publish(topic, b"x", QoS::AtMostOnce, 0).await;
    }
    assert_eq!(c.recv_publish().await.topic, &b"f/39"[..]);
    c.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

/// The largest Maximum Packet Size the configuration takes (the largest
/// packet MQTT allows, 268,435,460 bytes) is advertised as 268,435,455:
/// clients refuse a CONNACK with more, and could not connect at all.
#[tokio::test]
async fn the_largest_maximum_packet_size_is_advertised_as_clients_take_it() {
    let server = start(|c| c.limits.max_packet_size = 268_435_460).await;
    let (_c, ack) = RawClient::connect(addr(&server), connect_packet("big", V5)).await;
    assert_eq!(ack.properties.maximum_packet_size, Some(268_435_455));
    server.shutdown().await;
}

/// MQTT-3.1.2-24 counts the whole packet as sent: a Topic Alias the broker
/// adds (3 bytes) can take a PUBLISH that fits without it over the limit.
#[tokio::test]
async fn a_topic_alias_counts_towards_the_client_maximum_packet_size() {
    let server = start(|_| {}).await;
    let mut connect = connect_packet("small", V5);
    connect.properties.maximum_packet_size = Some(100);
    connect.properties.topic_alias_maximum = Some(10);
    let (mut sub, _) = RawClient::connect(addr(&server), connect).await;
    sub.subscribe("t/#", QoS::AtMostOnce).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    // 100 bytes as published (8 bytes of header for "t/x"), 103 with an alias.
    let exact = publish_packet("t/x", &[b'P'; 92], QoS::AtMostOnce, None);
    assert_eq!(tern_codec::encoded_len(&exact, V5).unwrap(), 100);
    p.send(exact).await;
    p.send(publish_packet("t/x", b"fits", QoS::AtMostOnce, None))
        .await;
    let got = sub.recv_publish().await;
    assert_eq!(&got.payload[..], b"fits");
    assert!(got.properties().topic_alias.is_some());
    let size = tern_codec::encoded_len(&Packet::Publish(got), V5).unwrap();
    assert!(size <= 100, "{size}");
    assert_eq!(server.broker().metrics.messages_dropped_oversized.get(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn disconnect_may_change_session_expiry() {
    let server = start(|_| {}).await;
    let mut connect = connect_packet("changer", V5);
    connect.properties.session_expiry_interval = Some(300);
    let (mut c, _) = RawClient::connect(addr(&server), connect).await;
    let mut d = tern_codec::Disconnect::default();
    d.properties.session_expiry_interval = Some(0);
    c.send(Packet::Disconnect(d)).await;
    c.expect_closed().await;
    eventually("session gone", || {
        server.broker().registry.session_count() == 0
    })
    .await;

    // Raising it from 0 is a protocol error.
    let (mut c, _) = RawClient::connect(addr(&server), connect_packet("zero", V5)).await;
    let mut d = tern_codec::Disconnect::default();
    d.properties.session_expiry_interval = Some(10);
    c.send(Packet::Disconnect(d)).await;
    c.expect_disconnect(ReasonCode::ProtocolError).await;
    server.shutdown().await;
}

/// MQTT-3.14.2-2 is about the CONNECT's value: a client that asked for an
/// expiry the broker capped to 0 has not broken the rule by asking again at
/// DISCONNECT. Its normal disconnection stands (no will), and the cap still
/// holds (the session ends).
#[tokio::test]
async fn an_expiry_the_broker_capped_to_0_may_be_asked_for_again_at_disconnect() {
    let server = start(|c| c.limits.max_session_expiry_secs = 0).await;
    let mut watcher = RawClient::connected(addr(&server), "watcher", V5).await;
    watcher.subscribe("wills/#", QoS::AtMostOnce).await;
    let mut connect = connect_packet("capped", V5);
    connect.properties.session_expiry_interval = Some(100);
    connect.will = Some(tern_codec::Will {
        topic: Bytes::from_static(b"wills/capped"),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
    });
    let (mut c, connack) = RawClient::connect(addr(&server), connect).await;
    assert_eq!(connack.properties.session_expiry_interval, Some(0));
    let mut d = tern_codec::Disconnect::default();
    d.properties.session_expiry_interval = Some(10);
    c.send(Packet::Disconnect(d)).await;
    let seen = c.expect_closed().await;
    assert!(seen.is_empty(), "closed without a DISCONNECT: {seen:?}");
    eventually("session gone", || {
        server.broker().registry.session_count() == 1
    })
    .await;
    watcher.expect_silence(Duration::from_millis(300)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn shared_messages_of_a_departing_member_go_to_another_member() {
    let server = start(|_| {}).await;
    let connect_a = persistent_connect("member-a", 60);
    let (mut a, _) = RawClient::connect(addr(&server), connect_a).await;
    let mut b = RawClient::connected(addr(&server), "member-b", V5).await;
    a.subscribe("$share/workers/tasks", QoS::AtLeastOnce).await;
    b.subscribe("$share/workers/tasks", QoS::AtLeastOnce).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    for i in 0..4u8 {
        p.publish("tasks", &[i], QoS::AtLeastOnce, u16::from(i) + 1)
            .await;
    }
    // Each member got two; A acknowledges nothing and goes away.
    let mut got_a = Vec::new();
    for _ in 0..2 {
        got_a.push(a.recv_publish().await.payload[0]);
    }
    let mut got_b = Vec::new();
    for _ in 0..2 {
        let m = b.recv_publish().await;
        b.send(Packet::PubAck(PubAck::new(m.packet_id.unwrap())))
            .await;
        got_b.push(m.payload[0]);
    }
    drop(a);
    for _ in 0..2 {
        let m = b.recv_publish().await;
        b.send(Packet::PubAck(PubAck::new(m.packet_id.unwrap())))
            .await;
        got_b.push(m.payload[0]);
    }
    got_b.sort();
    assert_eq!(
        got_b,
        vec![0, 1, 2, 3],
        "A's unacknowledged share went to B"
    );
    assert_eq!(server.broker().metrics.shared_redeliveries.get(), 2);
    // Retained messages are not sent to shared subscriptions.
    p.send(publish_with(
        "tasks",
        b"r",
        QoS::AtMostOnce,
        None,
        Default::default(),
        true,
    ))
    .await;
    b.recv_publish().await;
    let mut c = RawClient::connected(addr(&server), "member-c", V5).await;
    c.subscribe("$share/workers/tasks", QoS::AtLeastOnce).await;
    c.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

/// A member's in-flight message that a hand-over takes away
/// (`Session::withdraw`, as the broker does while the member's session
/// ends, here called while the member is connected, as when it comes back
/// during the hand-over) frees its place in the window at once: the next
/// waiting message is sent, not held until another acknowledgement.
#[tokio::test]
async fn withdrawing_an_inflight_shared_message_lets_the_next_one_go() {
    let server = start(|c| c.limits.max_inflight = 1).await;
    let mut a = RawClient::connected(addr(&server), "member-a", V5).await;
    a.subscribe("$share/workers/tasks", QoS::AtLeastOnce).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    for i in 0..2u8 {
        p.publish("tasks", &[i], QoS::AtLeastOnce, u16::from(i) + 1)
            .await;
    }
    assert_eq!(a.recv_publish().await.payload[0], 0);
    a.expect_silence(Duration::from_millis(200)).await;
    let session = server.broker().registry.get("member-a").unwrap();
    let sent = session
        .shared_candidates()
        .into_iter()
        .find(|d| d.packet_id.is_some())
        .expect("the message in flight");
    let mut journal = tern::persistence::Journal::new();
    assert!(session.withdraw(&sent, &mut journal));
    assert_eq!(a.recv_publish().await.payload[0], 1);
    server.shutdown().await;
}

#[tokio::test]
async fn shared_messages_of_a_member_whose_session_expires_go_to_another_member() {
    // Both members offline: each queues half. When A's session expires,
    // its half goes to B, offline as it is, instead of ending with A.
    let server = start(|_| {}).await;
    offline_member(&server, "member-a", 1).await;
    offline_member(&server, "member-b", 600).await;
    publish_four_jobs(&server).await;
    until_ended(&server, "member-a").await;
    assert_eq!(server.broker().metrics.shared_redeliveries.get(), 2);
    assert_eq!(server.broker().metrics.shared_ended_with_session.get(), 0);
    let mut b = member_b_takes_four_jobs(&server).await;
    b.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn shared_messages_of_the_last_member_end_with_its_session_and_are_counted() {
    let server = start(|_| {}).await;
    offline_member(&server, "member-a", 1).await;
    publish_four_jobs(&server).await;
    until_ended(&server, "member-a").await;
    let metrics = &server.broker().metrics;
    assert_eq!(metrics.shared_redeliveries.get(), 0, "no other member");
    assert_eq!(metrics.shared_ended_with_session.get(), 4);
    server.shutdown().await;
}

#[tokio::test]
async fn shared_messages_of_a_member_that_leaves_with_expiry_0_go_to_an_offline_member() {
    // A is the only member online, so it gets all four; it leaves without
    // acknowledging them, and its session ends with its connection. They go
    // to B, offline but with a session to keep them.
    let server = start(|_| {}).await;
    offline_member(&server, "member-b", 600).await;
    let mut a = RawClient::connected(addr(&server), "member-a", V5).await;
    a.subscribe("$share/workers/jobs", QoS::AtLeastOnce).await;
    publish_four_jobs(&server).await;
    for _ in 0..4 {
        a.recv_publish().await;
    }
    a.send(Packet::Disconnect(Default::default())).await;
    a.expect_closed().await;
    until_ended(&server, "member-a").await;
    assert_eq!(server.broker().metrics.shared_redeliveries.get(), 4);
    let mut b = member_b_takes_four_jobs(&server).await;
    b.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn shared_messages_of_a_session_replaced_with_clean_start_go_to_another_member() {
    let server = start(|_| {}).await;
    offline_member(&server, "member-a", 600).await;
    offline_member(&server, "member-b", 600).await;
    publish_four_jobs(&server).await;
    // A comes back asking for a new session: its old one ends, and the
    // half it queued goes to B rather than with it.
    let mut fresh = persistent_connect("member-a", 600);
    fresh.clean_start = true;
    let (mut a, ack) = RawClient::connect(addr(&server), fresh).await;
    assert!(!ack.session_present);
    assert_eq!(server.broker().metrics.shared_redeliveries.get(), 2);
    let mut b = member_b_takes_four_jobs(&server).await;
    b.expect_silence(Duration::from_millis(200)).await;
    a.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn topic_alias_zero_is_0x94() {
    let server = start(|_| {}).await;
    let mut p = RawClient::connected(addr(&server), "zero", V5).await;
    // PUBLISH QoS 0, topic "a", properties: Topic Alias = 0.
    p.send_bytes(&[0x30, 0x07, 0x00, 0x01, b'a', 0x03, 0x23, 0x00, 0x00])
        .await;
    p.expect_disconnect(ReasonCode::TopicAliasInvalid).await;
    server.shutdown().await;
}

#[tokio::test]
async fn redelivery_on_reconnect_respects_the_new_receive_maximum() {
    let server = start(|_| {}).await;
    let mut connect = persistent_connect("shrinking", 60);
    let (mut sub, _) = RawClient::connect(addr(&server), connect.clone()).await;
    sub.subscribe("rr", QoS::AtLeastOnce).await;
    let mut p = RawClient::connected(addr(&server), "p", V5).await;
    for i in 1..=5u16 {
        p.publish("rr", &[i as u8], QoS::AtLeastOnce, i).await;
    }
    let mut first_ids = Vec::new();
    for _ in 0..5 {
        first_ids.push(sub.recv_publish().await.packet_id.unwrap());
    }
    drop(sub); // nothing acknowledged
    until_offline(&server, "shrinking").await;
    connect.properties.receive_maximum = Some(2);
    let (mut sub, ack) = RawClient::connect(addr(&server), connect).await;
    assert!(ack.session_present);
    let mut got = Vec::new();
    for round in 0..5 {
        let m = sub.recv_publish().await;
        assert!(m.dup, "a redelivery carries DUP");
        got.push((m.packet_id.unwrap(), m.payload[0]));
        if round < 1 {
            // Two may be outstanding: the second arrives without an ack.
            continue;
        }
        if round < 4 {
            sub.expect_silence(Duration::from_millis(150)).await;
        }
        sub.send(Packet::PubAck(PubAck::new(got[round - 1].0)))
            .await;
    }
    let ids: Vec<u16> = got.iter().map(|g| g.0).collect();
    assert_eq!(ids, first_ids, "the original packet identifiers, in order");
    let payloads: Vec<u8> = got.iter().map(|g| g.1).collect();
    assert_eq!(payloads, vec![1, 2, 3, 4, 5]);
    server.shutdown().await;
}

#[tokio::test]
async fn reconnecting_cancels_the_previous_expiry_timer() {
    let server = start(|_| {}).await;
    let connect = persistent_connect("cycler", 3600);
    for _ in 0..50 {
        let (c, _) = RawClient::connect(addr(&server), connect.clone()).await;
        drop(c);
        until_offline(&server, "cycler").await;
    }
    // One sleeping expiry timer for the last disconnect, not fifty.
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert!(tasks < 10, "{tasks} tasks alive");
    server.shutdown().await;
}

#[tokio::test]
async fn user_properties_count_against_the_queue_bound() {
    // Messages of an empty payload and 1000 user properties each weigh what
    // they hold (about 66 KB each in memory), so an offline session's queue
    // bound of 256 KiB takes three of them, not all.
    let server = start(|c| c.limits.max_queued_bytes = 256 * 1024).await;
    let (mut sub, _) = RawClient::connect(addr(&server), persistent_connect("offline", 60)).await;
    sub.subscribe("props", QoS::AtLeastOnce).await;
    sub.send(Packet::Disconnect(Default::default())).await;
    sub.expect_closed().await;

    let mut publisher = RawClient::connected(addr(&server), "heavy", V5).await;
    for i in 0..20u16 {
        let mut packet = publish_packet("props", b"", QoS::AtLeastOnce, Some(i + 1));
        if let Packet::Publish(p) = &mut packet {
            p.set_properties(PublishProperties {
                user_properties: (0..1000)
                    .map(|_| (Bytes::from_static(b"k"), Bytes::from_static(b"v")))
                    .collect(),
                ..Default::default()
            });
        }
        publisher.send(packet).await;
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    }
    assert_eq!(
        server.broker().metrics.messages_dropped_queue_full.get(),
        17
    );
    let (mut sub, ack) = RawClient::connect(addr(&server), persistent_connect("offline", 60)).await;
    assert!(ack.session_present);
    for _ in 0..3 {
        let p = sub.recv_publish().await;
        assert_eq!(p.properties().user_properties.len(), 1000);
        sub.send(Packet::PubAck(PubAck::new(p.packet_id.unwrap())))
            .await;
    }
    sub.expect_silence(Duration::from_millis(300)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn unsuback_reason_codes() {
    // 0x00 for a subscription removed, 0x11 when none existed, 0x8F for a
    // filter that is not valid (as SUBACK answers it).
    let server = start(|_| {}).await;
    let mut c = RawClient::connected(addr(&server), "unsub", V5).await;
    c.subscribe("ok/t", QoS::AtMostOnce).await;
    c.send(Packet::Unsubscribe(tern_codec::Unsubscribe {
        packet_id: 9,
        filters: ["a/#/b", "never/subscribed", "ok/t", "$share/g"]
            .into_iter()
            .map(|f| Bytes::from_static(f.as_bytes()))
            .collect(),
        properties: Default::default(),
    }))
    .await;
    match c.recv().await {
        Some(Packet::UnsubAck(ack)) => {
            assert_eq!(ack.packet_id, 9);
            assert_eq!(
                ack.codes,
                [
                    ReasonCode::TopicFilterInvalid,
                    ReasonCode::NoSubscriptionExisted,
                    ReasonCode::Success,
                    ReasonCode::TopicFilterInvalid
                ]
            );
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    server.shutdown().await;
}

/// `max_subscription_bytes_per_client` bounds what a client's
/// subscriptions cost the router: 64 KiB holds a handful of filters of 128
/// levels and thousands of short ones. A filter beyond it is refused with
/// 0x97, and one removed makes room.
#[tokio::test]
async fn subscriptions_beyond_the_per_client_memory_are_refused() {
    let server = start(|c| c.limits.max_subscription_bytes_per_client = 64 * 1024).await;
    let mut c = RawClient::connected(addr(&server), "deep", V5).await;
    let deep: Vec<String> = (0..8).map(|i| format!("{i}{}", "/a".repeat(127))).collect();
    let all = deep
        .iter()
        .map(|f| sub_filter(f, QoS::AtMostOnce))
        .collect();
    let codes = suback_codes(&mut c, all).await;
    let taken = codes.iter().filter(|c| **c == ReasonCode::Success).count();
    assert!(
        (1..8).contains(&taken),
        "{taken} of 8 deep filters taken: {codes:?}"
    );
    assert!(codes[taken..]
        .iter()
        .all(|c| *c == ReasonCode::QuotaExceeded));
    let broker = server.broker();
    assert!(broker.metrics.subscriptions_refused.get() >= 1);
    // Short filters still fit beside them, up to the bound.
    assert_eq!(
        c.subscribe("x", QoS::AtMostOnce).await,
        [ReasonCode::Success]
    );
    c.unsubscribe(&deep[0]).await;
    assert_eq!(
        c.subscribe(&deep[taken], QoS::AtMostOnce).await,
        [ReasonCode::Success]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn subscriptions_beyond_the_per_client_limit_are_refused() {
    let server = start(|c| c.limits.max_subscriptions_per_client = 3).await;
    let mut c = RawClient::connected(addr(&server), "many", V5).await;
    let filters = ["a", "b", "c", "d", "e"];
    let all = filters
        .iter()
        .map(|f| sub_filter(f, QoS::AtMostOnce))
        .collect();
    assert_eq!(
        suback_codes(&mut c, all).await,
        [
            ReasonCode::Success,
            ReasonCode::Success,
            ReasonCode::Success,
            ReasonCode::QuotaExceeded,
            ReasonCode::QuotaExceeded
        ]
    );
    // At the limit, a subscription held may still be replaced, and one
    // removed makes room.
    assert_eq!(
        c.subscribe("a", QoS::AtLeastOnce).await,
        [ReasonCode::GrantedQoS1]
    );
    assert_eq!(
        c.subscribe("d", QoS::AtMostOnce).await,
        [ReasonCode::QuotaExceeded]
    );
    c.unsubscribe("b").await;
    assert_eq!(
        c.subscribe("d", QoS::AtMostOnce).await,
        [ReasonCode::Success]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn no_local_on_a_shared_subscription_refuses_the_whole_subscribe() {
    // MQTT-3.8.3-4: a Protocol Error. The filters before the offending one
    // in the same packet must not stay subscribed either: the client never
    // got a SUBACK for them.
    let server = start(|_| {}).await;
    let (mut c, _) = RawClient::connect(addr(&server), persistent_connect("mixed", 60)).await;
    let mut shared = sub_filter("$share/g/jobs", QoS::AtLeastOnce);
    shared.no_local = true;
    c.send(Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![sub_filter("plain/#", QoS::AtLeastOnce), shared],
        properties: Default::default(),
    }))
    .await;
    c.expect_disconnect(ReasonCode::ProtocolError).await;
    assert_eq!(server.broker().router.subscription_count(), 0);
    server.shutdown().await;
}

/// Every level of a subscription or a retained topic is a node of the
/// broker's trees: a filter of 65,535 slashes would cost tens of MB for
/// 64 KiB on the wire. More than `limits.max_topic_levels` is refused.
#[tokio::test]
async fn topics_and_filters_deeper_than_the_limit_are_refused() {
    let server = start(|_| {}).await;
    let deep = |levels: usize| vec!["l"; levels].join("/");
    let limit = server.broker().config.limits.max_topic_levels;
    assert_eq!(limit, 128, "the default");

    let mut c = RawClient::connected(addr(&server), "deep", V5).await;
    let filters = vec![
        sub_filter(&deep(limit), QoS::AtMostOnce),
        sub_filter(&deep(limit + 1), QoS::AtMostOnce),
        sub_filter(&format!("$share/g/{}", deep(limit)), QoS::AtMostOnce),
        sub_filter(&format!("{}/#", deep(limit)), QoS::AtMostOnce),
    ];
    assert_eq!(
        suback_codes(&mut c, filters).await,
        [
            ReasonCode::Success,
            ReasonCode::TopicFilterInvalid,
            ReasonCode::Success,
            ReasonCode::TopicFilterInvalid,
        ]
    );
    assert_eq!(server.broker().metrics.subscriptions_refused.get(), 2);
    assert_eq!(server.broker().router.subscription_count(), 2);

    c.send(publish_packet(&deep(limit), b"fits", QoS::AtMostOnce, None))
        .await;
    assert_eq!(&c.recv_publish().await.payload[..], b"fits");
    c.send(publish_packet(
        &deep(limit + 1),
        b"deep",
        QoS::AtMostOnce,
        None,
    ))
    .await;
    c.expect_disconnect(ReasonCode::TopicNameInvalid).await;

    let mut connect = connect_packet("will", V5);
    connect.will = Some(tern_codec::Will {
        topic: Bytes::from(deep(limit + 1)),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
    });
    let (_w, ack) = RawClient::connect(addr(&server), connect).await;
    assert_eq!(ack.code, ReasonCode::TopicNameInvalid);
    server.shutdown().await;
}
