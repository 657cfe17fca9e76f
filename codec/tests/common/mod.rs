//! Shared test support: proptest strategies producing random packets that are
//! expressible in a given protocol version (so that encode -> decode must give
//! back an equal value), plus small helpers.
#![allow(dead_code)]

pub mod fuzz_body;

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use tern_codec::properties::*;
use tern_codec::*;

pub const VERSIONS: [ProtocolVersion; 3] = [
    ProtocolVersion::V31,
    ProtocolVersion::V311,
    ProtocolVersion::V5,
];

/// Encodes with `encode_packet`, panicking on error.
pub fn encode(p: &Packet, v: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    encode_packet(p, v, &mut out).expect("encode");
    out
}

/// Decodes exactly one packet that must fill `bytes`.
pub fn decode_one(bytes: &[u8], v: ProtocolVersion) -> Result<Packet, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let p = decode_packet(&mut buf, v, usize::MAX)?.expect("complete packet");
    assert!(buf.is_empty(), "bytes left after the packet");
    Ok(p)
}

pub fn all_reason_codes() -> Vec<ReasonCode> {
    (0..=255u8).filter_map(ReasonCode::from_u8).collect()
}

pub fn codes_for(t: PacketType) -> Vec<ReasonCode> {
    all_reason_codes()
        .into_iter()
        .filter(|c| c.is_valid_for(t))
        .collect()
}

/// Text without U+0000, including multi-byte characters.
pub fn text() -> impl Strategy<Value = Bytes> {
    "[a-zA-Z0-9/ _é€😀-]{0,12}".prop_map(Bytes::from)
}

/// A topic name: non-empty, no wildcards.
pub fn topic() -> impl Strategy<Value = Bytes> {
    "[a-z0-9/é€ ]{1,12}".prop_map(Bytes::from)
}

/// A topic filter: non-empty, wildcards anywhere (the codec does not check placement).
pub fn filter() -> impl Strategy<Value = Bytes> {
    "[a-z0-9/+#é]{1,12}".prop_map(Bytes::from)
}

pub fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

pub fn user_props() -> impl Strategy<Value = Vec<UserProperty>> {
    vec((text(), text()), 0..3)
}

pub fn flag() -> impl Strategy<Value = Option<u8>> {
    option::of(0u8..=1)
}

pub fn nz16() -> impl Strategy<Value = Option<u16>> {
    option::of(1u16..)
}

pub fn nz32() -> impl Strategy<Value = Option<u32>> {
    option::of(1u32..)
}

pub fn subid() -> impl Strategy<Value = u32> {
    1u32..=268_435_455
}

pub fn qos() -> impl Strategy<Value = QoS> {
    select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
}

pub fn packet_id() -> impl Strategy<Value = u16> {
    1u16..
}

/// Authentication method and data; data only with a method.
pub fn auth() -> impl Strategy<Value = (Option<Bytes>, Option<Bytes>)> {
    option::of((text(), option::of(binary()))).prop_map(|a| match a {
        Some((m, d)) => (Some(m), d),
        None => (None, None),
    })
}

pub fn connect_properties() -> impl Strategy<Value = ConnectProperties> {
    (
        option::of(any::<u32>()),
        nz16(),
        nz32(),
        option::of(any::<u16>()),
        flag(),
        flag(),
        user_props(),
        auth(),
    )
        .prop_map(
            |(sei, rm, mps, tam, rri, rpi, up, (am, ad))| ConnectProperties {
                session_expiry_interval: sei,
                receive_maximum: rm,
                maximum_packet_size: mps,
                topic_alias_maximum: tam,
                request_response_information: rri,
                request_problem_information: rpi,
                user_properties: up,
                authentication_method: am,
                authentication_data: ad,
            },
        )
}

pub fn will_properties() -> impl Strategy<Value = WillProperties> {
    (
        option::of(any::<u32>()),
        flag(),
        option::of(any::<u32>()),
        option::of(text()),
        option::of(topic()),
        option::of(binary()),
        user_props(),
    )
        .prop_map(|(wdi, pfi, mei, ct, rt, cd, up)| WillProperties {
            will_delay_interval: wdi,
            payload_format_indicator: pfi,
            message_expiry_interval: mei,
            content_type: ct,
            response_topic: rt,
            correlation_data: cd,
            user_properties: up,
        })
}

pub fn connect(v: ProtocolVersion) -> impl Strategy<Value = Connect> {
    let v5 = v.is_v5();
    (
        any::<bool>(),
        any::<u16>(),
        text(),
        option::of((topic(), binary(), qos(), any::<bool>(), will_properties())),
        option::of(text()),
        option::of(binary()),
        connect_properties(),
    )
        .prop_map(move |(clean, ka, cid, will, user, mut pass, props)| {
            if !v5 && user.is_none() {
                pass = None;
            }
            Connect {
                protocol: v,
                clean_start: clean,
                keep_alive: ka,
                client_id: cid,
                will: will.map(|(topic, payload, qos, retain, props)| Will {
                    topic,
                    payload,
                    qos,
                    retain,
                    properties: if v5 { props } else { WillProperties::default() },
                }),
                username: user,
                password: pass,
                properties: if v5 {
                    props
                } else {
                    ConnectProperties::default()
                },
            }
        })
}

pub fn connack_properties() -> impl Strategy<Value = ConnAckProperties> {
    (
        (
            option::of(any::<u32>()),
            nz16(),
            flag(),
            flag(),
            nz32(),
            option::of(text()),
            option::of(any::<u16>()),
            option::of(text()),
        ),
        (
            user_props(),
            flag(),
            flag(),
            flag(),
            option::of(any::<u16>()),
            option::of(text()),
            option::of(text()),
            auth(),
        ),
    )
        .prop_map(
            |((sei, rm, mq, ra, mps, aci, tam, rs), (up, wsa, sia, ssa, ska, ri, sr, (am, ad)))| {
                ConnAckProperties {
                    session_expiry_interval: sei,
                    receive_maximum: rm,
                    maximum_qos: mq,
                    retain_available: ra,
                    maximum_packet_size: mps,
                    assigned_client_identifier: aci,
                    topic_alias_maximum: tam,
                    reason_string: rs,
                    user_properties: up,
                    wildcard_subscription_available: wsa,
                    subscription_identifiers_available: sia,
                    shared_subscription_available: ssa,
                    server_keep_alive: ska,
                    response_information: ri,
                    server_reference: sr,
                    authentication_method: am,
                    authentication_data: ad,
                }
            },
        )
}

pub fn connack(v: ProtocolVersion) -> BoxedStrategy<ConnAck> {
    if v.is_v5() {
        (
            any::<bool>(),
            select(codes_for(PacketType::ConnAck)),
            connack_properties(),
        )
            .prop_map(|(sp, code, properties)| ConnAck {
                session_present: sp,
                code,
                properties,
            })
            .boxed()
    } else {
        (any::<bool>(), 0u8..=5)
            .prop_map(|(sp, c)| ConnAck {
                session_present: sp,
                code: ReasonCode::from_connack_v3(c).unwrap(),
                properties: Default::default(),
            })
            .boxed()
    }
}

pub fn publish_properties() -> impl Strategy<Value = PublishProperties> {
    (
        flag(),
        option::of(any::<u32>()),
        nz16(),
        option::of(topic()),
        option::of(binary()),
        user_props(),
        vec(subid(), 0..3),
        option::of(text()),
    )
        .prop_map(|(pfi, mei, ta, rt, cd, up, si, ct)| PublishProperties {
            payload_format_indicator: pfi,
            message_expiry_interval: mei,
            topic_alias: ta,
            response_topic: rt,
            correlation_data: cd,
            user_properties: up,
            subscription_identifiers: si,
            content_type: ct,
        })
}

pub fn publish(v: ProtocolVersion) -> impl Strategy<Value = Publish> {
    let v5 = v.is_v5();
    (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic(),
        any::<bool>(),
        packet_id(),
        publish_properties(),
        vec(any::<u8>(), 0..64),
    )
        .prop_map(
            move |(dup, qos, retain, topic, empty_topic, id, props, payload)| {
                let properties = if v5 {
                    props
                } else {
                    PublishProperties::default()
                };
                let topic = if empty_topic && properties.topic_alias.is_some() {
                    Bytes::new()
                } else {
                    topic
                };
                let qos0 = qos == QoS::AtMostOnce;
                Publish {
                    dup: dup && !qos0,
                    qos,
                    retain,
                    topic,
                    packet_id: if qos0 { None } else { Some(id) },
                    // As decoded: none when empty.
                    properties: (!properties.is_empty()).then(|| Box::new(properties)),
                    payload: payload.into(),
                }
            },
        )
}

pub fn puback(v: ProtocolVersion, t: PacketType) -> BoxedStrategy<PubAck> {
    if v.is_v5() {
        (
            packet_id(),
            select(codes_for(t)),
            option::of(text()),
            user_props(),
        )
            .prop_map(|(id, code, rs, up)| PubAck {
                packet_id: id,
                code,
                properties: PubAckProperties {
                    reason_string: rs,
                    user_properties: up,
                },
            })
            .boxed()
    } else {
        packet_id().prop_map(PubAck::new).boxed()
    }
}

pub fn subscribe(v: ProtocolVersion) -> impl Strategy<Value = Subscribe> {
    let v5 = v.is_v5();
    let f = (
        filter(),
        qos(),
        any::<bool>(),
        any::<bool>(),
        select(vec![
            RetainHandling::SendAtSubscribe,
            RetainHandling::SendIfNew,
            RetainHandling::DoNotSend,
        ]),
    )
        .prop_map(move |(filter, qos, nl, rap, rh)| SubscribeFilter {
            filter,
            qos,
            no_local: nl && v5,
            retain_as_published: rap && v5,
            retain_handling: if v5 { rh } else { RetainHandling::default() },
        });
    (packet_id(), vec(f, 1..4), option::of(subid()), user_props()).prop_map(
        move |(id, filters, si, up)| Subscribe {
            packet_id: id,
            filters,
            properties: if v5 {
                SubscribeProperties {
                    subscription_identifier: si,
                    user_properties: up,
                }
            } else {
                Default::default()
            },
        },
    )
}

pub fn suback(v: ProtocolVersion) -> impl Strategy<Value = SubAck> {
    let v5 = v.is_v5();
    let codes = if v5 {
        codes_for(PacketType::SubAck)
    } else {
        vec![
            ReasonCode::Success,
            ReasonCode::GrantedQoS1,
            ReasonCode::GrantedQoS2,
            ReasonCode::UnspecifiedError,
        ]
    };
    (
        packet_id(),
        vec(select(codes), 1..5),
        option::of(text()),
        user_props(),
    )
        .prop_map(move |(id, codes, rs, up)| SubAck {
            packet_id: id,
            codes,
            properties: if v5 {
                SubAckProperties {
                    reason_string: rs,
                    user_properties: up,
                }
            } else {
                Default::default()
            },
        })
}

pub fn unsubscribe(v: ProtocolVersion) -> impl Strategy<Value = Unsubscribe> {
    let v5 = v.is_v5();
    (packet_id(), vec(filter(), 1..4), user_props()).prop_map(move |(id, filters, up)| {
        Unsubscribe {
            packet_id: id,
            filters,
            properties: UnsubscribeProperties {
                user_properties: if v5 { up } else { vec![] },
            },
        }
    })
}

pub fn unsuback(v: ProtocolVersion) -> impl Strategy<Value = UnsubAck> {
    let v5 = v.is_v5();
    (
        packet_id(),
        vec(select(codes_for(PacketType::UnsubAck)), 1..5),
        option::of(text()),
        user_props(),
    )
        .prop_map(move |(id, codes, rs, up)| {
            if v5 {
                UnsubAck {
                    packet_id: id,
                    codes,
                    properties: UnsubAckProperties {
                        reason_string: rs,
                        user_properties: up,
                    },
                }
            } else {
                UnsubAck {
                    packet_id: id,
                    codes: vec![],
                    properties: Default::default(),
                }
            }
        })
}

pub fn disconnect_v5() -> impl Strategy<Value = Disconnect> {
    (
        select(codes_for(PacketType::Disconnect)),
        option::of(any::<u32>()),
        option::of(text()),
        user_props(),
        option::of(text()),
    )
        .prop_map(|(code, sei, rs, up, sr)| Disconnect {
            code,
            properties: DisconnectProperties {
                session_expiry_interval: sei,
                reason_string: rs,
                user_properties: up,
                server_reference: sr,
            },
        })
}

pub fn auth_v5() -> impl Strategy<Value = Auth> {
    (
        select(codes_for(PacketType::Auth)),
        auth(),
        option::of(text()),
        user_props(),
    )
        .prop_map(|(code, (am, ad), rs, up)| Auth {
            code,
            properties: AuthProperties {
                authentication_method: am,
                authentication_data: ad,
                reason_string: rs,
                user_properties: up,
            },
        })
}

/// Any packet expressible in `v`.
pub fn packet(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let mut options: Vec<BoxedStrategy<Packet>> = vec![
        connect(v)
            .prop_map(|c| Packet::Connect(Box::new(c)))
            .boxed(),
        connack(v)
            .prop_map(|c| Packet::ConnAck(Box::new(c)))
            .boxed(),
        publish(v).prop_map(Packet::Publish).boxed(),
        puback(v, PacketType::PubAck)
            .prop_map(Packet::PubAck)
            .boxed(),
        puback(v, PacketType::PubRec)
            .prop_map(Packet::PubRec)
            .boxed(),
        puback(v, PacketType::PubRel)
            .prop_map(Packet::PubRel)
            .boxed(),
        puback(v, PacketType::PubComp)
            .prop_map(Packet::PubComp)
            .boxed(),
        subscribe(v).prop_map(Packet::Subscribe).boxed(),
        suback(v).prop_map(Packet::SubAck).boxed(),
        unsubscribe(v).prop_map(Packet::Unsubscribe).boxed(),
        unsuback(v).prop_map(Packet::UnsubAck).boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
    ];
    if v.is_v5() {
        options.push(disconnect_v5().prop_map(Packet::Disconnect).boxed());
        options.push(auth_v5().prop_map(|a| Packet::Auth(Box::new(a))).boxed());
    } else {
        options.push(Just(Packet::Disconnect(Disconnect::default())).boxed());
    }
    proptest::strategy::Union::new(options).boxed()
}

/// `n` packets for `v` from a deterministic generator (for fixed corpora).
pub fn sample(strategy: BoxedStrategy<Packet>, n: usize) -> Vec<Packet> {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}
