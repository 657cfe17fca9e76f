//! Byte-exact vectors, malformed inputs, the early maximum-size check, and
//! zero-copy decoding.

mod common;

use bytes::{Bytes, BytesMut};
use common::{decode_one, encode};
use tern_codec::properties::*;
use tern_codec::*;

const V31: ProtocolVersion = ProtocolVersion::V31;
const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

/// Decodes `bytes` and checks re-encoding gives the same bytes.
fn exact(bytes: &[u8], v: ProtocolVersion) -> Packet {
    let p = decode_one(bytes, v).unwrap_or_else(|e| panic!("{bytes:02X?}: {e}"));
    assert_eq!(&encode(&p, v)[..], bytes, "{p:?}");
    p
}

fn err(bytes: &[u8], v: ProtocolVersion) -> DecodeError {
    let mut buf = BytesMut::from(bytes);
    match decode_packet(&mut buf, v, usize::MAX) {
        Err(e) => e,
        other => panic!("{bytes:02X?} decoded as {other:?}"),
    }
}

fn malformed(bytes: &[u8], v: ProtocolVersion) {
    let e = err(bytes, v);
    assert!(
        matches!(e, DecodeError::Malformed(_)),
        "{bytes:02X?}: {e:?}"
    );
    assert_eq!(e.reason_code(), ReasonCode::MalformedPacket);
}

fn protocol(bytes: &[u8], v: ProtocolVersion) {
    let e = err(bytes, v);
    assert!(matches!(e, DecodeError::Protocol(_)), "{bytes:02X?}: {e:?}");
    assert_eq!(e.reason_code(), ReasonCode::ProtocolError);
}

fn topic_invalid(bytes: &[u8], v: ProtocolVersion) {
    let e = err(bytes, v);
    assert!(
        matches!(e, DecodeError::TopicNameInvalid(_)),
        "{bytes:02X?}: {e:?}"
    );
    assert_eq!(e.reason_code(), ReasonCode::TopicNameInvalid);
}

// ---------------------------------------------------------------- vectors

#[test]
fn ping() {
    for v in common::VERSIONS {
        assert_eq!(exact(b"\xC0\x00", v), Packet::PingReq);
        assert_eq!(exact(b"\xD0\x00", v), Packet::PingResp);
    }
}

#[test]
fn disconnect_v5_short_forms() {
    assert_eq!(
        exact(b"\xE0\x00", V5),
        Packet::Disconnect(Disconnect::default())
    );
    assert_eq!(
        exact(b"\xE0\x01\x8E", V5),
        Packet::Disconnect(Disconnect::new(ReasonCode::SessionTakenOver))
    );
    // The long form of Success without properties decodes to the same value.
    assert_eq!(
        decode_one(b"\xE0\x02\x00\x00", V5).unwrap(),
        Packet::Disconnect(Disconnect::default())
    );
    // With a reason string.
    let p = exact(b"\xE0\x06\x8B\x04\x1F\x00\x01x", V5);
    let Packet::Disconnect(d) = p else { panic!() };
    assert_eq!(d.code, ReasonCode::ServerShuttingDown);
    assert_eq!(d.properties.reason_string.as_deref(), Some(&b"x"[..]));
}

#[test]
fn disconnect_v3_has_no_body() {
    assert_eq!(
        exact(b"\xE0\x00", V311),
        Packet::Disconnect(Disconnect::default())
    );
    let p = Packet::Disconnect(Disconnect::new(ReasonCode::SessionTakenOver));
    assert_eq!(&encode(&p, V311)[..], b"\xE0\x00");
    malformed(b"\xE0\x01\x00", V311);
}

#[test]
fn connect_mqisdp_v31() {
    let bytes = b"\x10\x11\x00\x06MQIsdp\x03\x02\x00\x3C\x00\x03abc";
    let Packet::Connect(c) = exact(bytes, V5) else {
        panic!()
    };
    assert_eq!(c.protocol, V31);
    assert!(c.clean_start);
    assert_eq!(c.keep_alive, 60);
    assert_eq!(c.client_id_str(), "abc");
    assert_eq!(c.will, None);
}

#[test]
fn connect_v5_with_properties() {
    let bytes = b"\x10\x1E\x00\x04MQTT\x05\xC2\x00\x0A\
                  \x08\x11\x00\x00\x00\x78\x21\x00\x14\
                  \x00\x02id\x00\x01u\x00\x02\x01\x02";
    // CONNECT decodes in its own version whatever the caller passes.
    let Packet::Connect(c) = exact(bytes, V311) else {
        panic!()
    };
    assert_eq!(c.protocol, V5);
    assert_eq!(c.keep_alive, 10);
    assert_eq!(c.properties.session_expiry_interval, Some(120));
    assert_eq!(c.properties.receive_maximum, Some(20));
    assert_eq!(c.client_id_str(), "id");
    assert_eq!(c.username.as_deref(), Some(&b"u"[..]));
    assert_eq!(c.password.as_deref(), Some(&[1u8, 2][..]));
}

#[test]
fn connect_v311_with_will() {
    let bytes = b"\x10\x1A\x00\x04MQTT\x04\x2E\x00\x00\x00\x01c\x00\x03a/b\x00\x03bye\x00\x01u";
    // flags 0x2E: will retain, will QoS 1, will, clean; no user name flag yet.
    let bytes = {
        let mut b = bytes.to_vec();
        b[9] = 0xAE; // add the user name flag
        b
    };
    let Packet::Connect(c) = exact(&bytes, V311) else {
        panic!()
    };
    let will = c.will.as_ref().unwrap();
    assert_eq!(
        (&will.topic[..], &will.payload[..]),
        (&b"a/b"[..], &b"bye"[..])
    );
    assert_eq!((will.qos, will.retain), (QoS::AtLeastOnce, true));
    assert_eq!(c.username.as_deref(), Some(&b"u"[..]));
}

#[test]
fn auth() {
    assert_eq!(exact(b"\xF0\x00", V5), Packet::Auth(Box::default()));
    let Packet::Auth(a) = exact(b"\xF0\x06\x18\x04\x15\x00\x01x", V5) else {
        panic!()
    };
    assert_eq!(a.code, ReasonCode::ContinueAuthentication);
    assert_eq!(
        a.properties.authentication_method.as_deref(),
        Some(&b"x"[..])
    );
    // AUTH is MQTT 5 only, both ways.
    malformed(b"\xF0\x00", V311);
    malformed(b"\xF0\x00", V31);
    let mut out = BytesMut::new();
    assert!(matches!(
        encode_packet(&Packet::Auth(Box::default()), V311, &mut out),
        Err(EncodeError::NotAllowed(_))
    ));
    assert!(out.is_empty());
}

#[test]
fn puback_forms() {
    assert_eq!(
        exact(b"\x40\x02\x00\x07", V5),
        Packet::PubAck(PubAck::new(7))
    );
    let Packet::PubRec(a) = exact(b"\x50\x03\x00\x07\x10", V5) else {
        panic!()
    };
    assert_eq!(a.code, ReasonCode::NoMatchingSubscribers);
    // Long form of Success without properties.
    assert_eq!(
        decode_one(b"\x40\x04\x00\x07\x00\x00", V5).unwrap(),
        Packet::PubAck(PubAck::new(7))
    );
    assert_eq!(
        exact(b"\x62\x02\x00\x07", V311),
        Packet::PubRel(PubAck::new(7))
    );
    // 3.x drops the reason code and properties.
    let failed = PubAck {
        packet_id: 7,
        code: ReasonCode::QuotaExceeded,
        properties: PubAckProperties {
            reason_string: Some(Bytes::from_static(b"full")),
            user_properties: vec![],
        },
    };
    assert_eq!(
        &encode(&Packet::PubAck(failed.clone()), V311)[..],
        b"\x40\x02\x00\x07"
    );
    assert_eq!(
        &encode(&Packet::PubAck(failed), V5)[..],
        b"\x40\x0B\x00\x07\x97\x07\x1F\x00\x04full"
    );
}

#[test]
fn publish_vectors() {
    let Packet::Publish(p) = exact(b"\x3D\x0A\x00\x03a/b\x00\x05\x00hi", V5) else {
        panic!()
    };
    assert!(p.dup && p.retain);
    assert_eq!(p.qos, QoS::ExactlyOnce);
    assert_eq!(p.topic_str(), "a/b");
    assert_eq!(p.packet_id, Some(5));
    assert_eq!(&p.payload[..], b"hi");
    let Packet::Publish(p) = exact(b"\x30\x07\x00\x03a/bhi", V311) else {
        panic!()
    };
    assert_eq!((p.qos, p.packet_id), (QoS::AtMostOnce, None));
    // v5: empty topic with a topic alias.
    let Packet::Publish(p) = exact(b"\x30\x06\x00\x00\x03\x23\x00\x09", V5) else {
        panic!()
    };
    assert_eq!(p.properties().topic_alias, Some(9));
    assert!(p.topic.is_empty() && p.payload.is_empty());
}

#[test]
fn connack_and_suback_v3_mapping() {
    assert_eq!(
        exact(b"\x20\x02\x01\x00", V311),
        Packet::ConnAck(Box::new(ConnAck {
            session_present: true,
            ..ConnAck::default()
        }))
    );
    let refused = Packet::ConnAck(Box::new(ConnAck {
        code: ReasonCode::Banned,
        ..ConnAck::default()
    }));
    assert_eq!(&encode(&refused, V311)[..], b"\x20\x02\x00\x05");
    assert_eq!(&encode(&refused, V5)[..], b"\x20\x03\x00\x8A\x00");
    malformed(b"\x20\x02\x00\x06", V311);
    malformed(b"\x20\x02\x02\x00", V311);
    malformed(b"\x20\x03\x00\x10\x00", V5); // 0x10 is not a CONNACK code

    let suback = Packet::SubAck(SubAck {
        packet_id: 1,
        codes: vec![ReasonCode::GrantedQoS1, ReasonCode::NotAuthorized],
        properties: SubAckProperties::default(),
    });
    assert_eq!(&encode(&suback, V311)[..], b"\x90\x04\x00\x01\x01\x80");
    assert_eq!(&encode(&suback, V5)[..], b"\x90\x05\x00\x01\x00\x01\x87");
    malformed(b"\x90\x03\x00\x01\x87", V311);
}

#[test]
fn subscribe_and_unsubscribe_vectors() {
    let Packet::Subscribe(s) = exact(b"\x82\x0A\x00\x01\x00\x00\x04a/+#\x2E", V5) else {
        panic!()
    };
    let f = &s.filters[0];
    assert_eq!(f.filter_str(), "a/+#"); // placement is not checked by the codec
    assert_eq!(f.qos, QoS::ExactlyOnce);
    assert!(f.no_local && f.retain_as_published);
    assert_eq!(f.retain_handling, RetainHandling::DoNotSend);
    let Packet::Subscribe(s) = exact(b"\x82\x08\x00\x01\x00\x03a/b\x01", V311) else {
        panic!()
    };
    assert_eq!(s.filters[0].qos, QoS::AtLeastOnce);
    let Packet::Unsubscribe(u) = exact(b"\xA2\x08\x00\x02\x00\x00\x03a/b", V5) else {
        panic!()
    };
    assert_eq!(u.filters, vec![Bytes::from_static(b"a/b")]);
    assert_eq!(
        exact(b"\xB0\x02\x00\x02", V311),
        Packet::UnsubAck(UnsubAck {
            packet_id: 2,
            codes: vec![],
            properties: Default::default(),
        })
    );
    let Packet::UnsubAck(u) = exact(b"\xB0\x05\x00\x02\x00\x00\x11", V5) else {
        panic!()
    };
    assert_eq!(
        u.codes,
        vec![ReasonCode::Success, ReasonCode::NoSubscriptionExisted]
    );
}

// ---------------------------------------------------------------- malformed

#[test]
fn fixed_header_flags() {
    malformed(b"\x00\x00", V5); // type 0
    malformed(b"\x41\x02\x00\x01", V5); // PUBACK with flags
    malformed(b"\x60\x02\x00\x01", V311); // PUBREL without 0b0010
    malformed(b"\x80\x06\x00\x01\x00\x01a\x00", V311); // SUBSCRIBE without 0b0010
    malformed(b"\xA0\x05\x00\x01\x00\x01a", V311); // UNSUBSCRIBE without 0b0010
    malformed(b"\xC1\x00", V311);
    malformed(b"\x12\x00", V311);
    // Refused from the first byte alone.
    malformed(b"\x36", V5); // PUBLISH QoS 3
    malformed(b"\x38", V5); // PUBLISH QoS 0 with DUP
    malformed(b"\x41", V5);
}

#[test]
fn remaining_length_of_five_bytes() {
    malformed(b"\x30\xFF\xFF\xFF\xFF\x01", V5);
    malformed(b"\x30\x80\x80\x80\x80", V311); // the 5th byte need not even arrive
}

#[test]
fn remaining_length_not_in_its_shortest_form() {
    // MQTT-1.5.5-1: PINGREQ with a remaining length of 0 in two bytes.
    malformed(b"\xC0\x80\x00", V311);
    malformed(b"\xC0\x80\x00", V5);
    // A property length of 0 in two bytes (DISCONNECT 0x00 with properties).
    malformed(b"\xE0\x03\x00\x80\x00", V5);
}

#[test]
fn trailing_and_missing_bytes() {
    malformed(b"\xC0\x01\x00", V5);
    malformed(b"\x40\x03\x00\x01\x00", V311);
    malformed(b"\x10\x12\x00\x06MQIsdp\x03\x02\x00\x3C\x00\x03abcX", V311);
    malformed(b"\x10\x10\x00\x06MQIsdp\x03\x02\x00\x3C\x00\x03ab", V311);
    malformed(b"\x82\x03\x00\x01\x00", V311); // filter cut
    malformed(b"\x82\x07\x00\x01\x00\x03a/b", V311); // options byte missing
    malformed(b"\x30\x01\x00", V5); // topic length cut
    malformed(b"\x32\x04\x00\x01a\x00", V5); // packet id cut
    malformed(b"\x30\x05\x00\x01a\x05\x01", V5); // property length past the end
    malformed(b"\xE0\x03\x00\x02\x1F", V5); // property cut
}

#[test]
fn strings() {
    malformed(b"\x30\x07\x00\x03a\x00bxy", V5); // U+0000 in a topic
    malformed(b"\x30\x06\x00\x02\xC3\x28xy", V311); // invalid UTF-8
    malformed(b"\x30\x05\x00\x03\xED\xA0\x80", V311); // UTF-16 surrogate
    malformed(b"\x10\x0F\x00\x04MQTT\x04\x00\x00\x00\x00\x03\xFFab", V311); // client id
    malformed(b"\x82\x06\x00\x01\x00\x01\xFF\x00", V311); // filter
    malformed(b"\xE0\x08\x00\x06\x26\x00\x01\x00\x00\x00", V5); // user property name U+0000
}

#[test]
fn properties() {
    protocol(b"\x30\x0A\x00\x01a\x06\x23\x00\x01\x23\x00\x02", V5); // duplicate topic alias
    malformed(b"\x30\x09\x00\x01a\x05\x11\x00\x00\x00\x01", V5); // session expiry not allowed in PUBLISH
    malformed(b"\x30\x06\x00\x01a\x02\x7F\x00", V5); // unknown property
                                                     // Topic alias 0: "Topic Alias invalid" (0x94).
    let e = err(b"\x30\x07\x00\x01a\x03\x23\x00\x00", V5);
    assert_eq!(e.reason_code(), ReasonCode::TopicAliasInvalid, "{e:?}");
    protocol(b"\x30\x06\x00\x01a\x02\x01\x02", V5); // payload format indicator 2
    protocol(b"\x30\x06\x00\x01a\x02\x0B\x00", V5); // subscription identifier 0
    protocol(b"\x30\x0A\x00\x01a\x06\x08\x00\x03a/#", V5); // response topic with wildcard
    protocol(b"\x82\x0B\x00\x01\x04\x0B\x01\x0B\x02\x00\x01a\x00", V5); // two subscription ids in SUBSCRIBE
    protocol(b"\x20\x06\x00\x00\x03\x21\x00\x00", V5); // receive maximum 0
    protocol(b"\x20\x05\x00\x00\x02\x24\x02", V5); // maximum QoS 2
    protocol(b"\x20\x07\x00\x00\x04\x16\x00\x01z", V5); // auth data without method
                                                        // A user property may repeat; a PUBLISH subscription identifier too.
    let Packet::Publish(p) = exact(
        b"\x30\x14\x00\x01a\x10\x26\x00\x01k\x00\x01v\x26\x00\x01k\x00\x01w\x0B\x05",
        V5,
    ) else {
        panic!()
    };
    assert_eq!(p.properties().user_properties.len(), 2);
    assert_eq!(p.properties().subscription_identifiers, vec![5]);
}

#[test]
fn reason_codes() {
    malformed(b"\x62\x03\x00\x01\x10", V5); // 0x10 is not a PUBREL code
    malformed(b"\xE0\x01\x03", V5); // 0x03 is no reason code
    malformed(b"\xE0\x01\x91", V5); // 0x91 is not a DISCONNECT code
    malformed(b"\xF0\x01\x04", V5); // not an AUTH code
    malformed(b"\x90\x04\x00\x01\x00\x04", V5);
    malformed(b"\xB0\x04\x00\x01\x00\x12", V5);
}

#[test]
fn packet_ids() {
    protocol(b"\x32\x05\x00\x01a\x00\x00", V311);
    protocol(b"\x40\x02\x00\x00", V311);
    protocol(b"\x82\x06\x00\x00\x00\x01a\x00", V311);
    protocol(b"\xA2\x05\x00\x00\x00\x01a", V311);
}

#[test]
fn publish_topics() {
    topic_invalid(b"\x30\x05\x00\x03a/+", V5);
    topic_invalid(b"\x30\x05\x00\x03a/#", V311);
    topic_invalid(b"\x30\x02\x00\x00", V311); // empty topic in 3.x
    protocol(b"\x30\x03\x00\x00\x00", V5); // empty topic without alias in v5
}

#[test]
fn subscribe_rules() {
    protocol(b"\x82\x02\x00\x01", V311); // no filter
    protocol(b"\x82\x03\x00\x01\x00", V5);
    protocol(b"\xA2\x02\x00\x01", V311);
    malformed(b"\x82\x05\x00\x01\x00\x00\x00", V311); // empty filter
    malformed(b"\x82\x06\x00\x01\x00\x01a\x03", V311); // QoS 3
    protocol(b"\x82\x07\x00\x01\x00\x00\x01a\x30", V5); // retain handling 3 (MQTT 5 3.8.3.1)
    malformed(b"\x82\x07\x00\x01\x00\x00\x01a\x40", V5); // reserved bit 6
    malformed(b"\x82\x06\x00\x01\x00\x01a\x04", V311); // no local does not exist in 3.x
    decode_one(b"\x82\x07\x00\x01\x00\x00\x01a\x04", V5).unwrap();
}

#[test]
fn connect_rules() {
    let e = err(b"\x10\x0C\x00\x04MQTT\x06\x02\x00\x00\x00\x00", V5);
    assert_eq!(
        e,
        DecodeError::UnsupportedProtocolVersion {
            name: "MQTT".into(),
            level: 6
        }
    );
    assert_eq!(e.reason_code(), ReasonCode::UnsupportedProtocolVersion);
    assert!(matches!(
        err(b"\x10\x0C\x00\x04MQIs\x03\x02\x00\x00\x00\x00", V5),
        DecodeError::UnsupportedProtocolVersion { level: 3, .. }
    ));
    assert!(matches!(
        err(b"\x10\x0E\x00\x06MQIsdp\x04\x02\x00\x00\x00\x00", V5),
        DecodeError::UnsupportedProtocolVersion { level: 4, .. }
    ));
    let ok = b"\x10\x0C\x00\x04MQTT\x04\x02\x00\x00\x00\x00";
    decode_one(ok, V311).unwrap();
    let with_flags = |flags: u8| {
        let mut b = ok.to_vec();
        b[9] = flags;
        b
    };
    malformed(&with_flags(0x03), V311); // reserved bit
    malformed(&with_flags(0x08), V311); // will QoS without will
    malformed(&with_flags(0x20), V311); // will retain without will
    malformed(&with_flags(0x1C), V311); // will QoS 3 (the will itself is missing, QoS is checked first)
    protocol(
        b"\x10\x10\x00\x04MQTT\x04\x40\x00\x00\x00\x00\x00\x02pw",
        V311,
    ); // password without user name
    let Packet::Connect(c) = exact(
        b"\x10\x11\x00\x04MQTT\x05\x40\x00\x00\x00\x00\x00\x00\x02pw",
        V5,
    ) else {
        panic!()
    };
    assert_eq!(
        (c.username, c.password.as_deref()),
        (None, Some(&b"pw"[..]))
    );
    topic_invalid(
        b"\x10\x13\x00\x04MQTT\x04\x06\x00\x00\x00\x00\x00\x03a/#\x00\x00",
        V311,
    );
}

// ---------------------------------------------------------------- size and framing

#[test]
fn max_packet_size_from_the_header_alone() {
    let mut buf = BytesMut::from(&b"\x30\xFF\xFF\xFF\x7F"[..]);
    assert_eq!(
        decode_packet(&mut buf, V5, 1 << 20),
        Err(DecodeError::PacketTooLarge {
            size: 1 + 4 + 268_435_455,
            max: 1 << 20
        })
    );
    assert_eq!(
        DecodeError::PacketTooLarge { size: 0, max: 0 }.reason_code(),
        ReasonCode::PacketTooLarge
    );
    // Remaining length 128 (2 bytes): the whole packet is 131 bytes.
    let mut buf = BytesMut::from(&b"\x30\x80\x01"[..]);
    assert!(matches!(
        decode_packet(&mut buf, V5, 130),
        Err(DecodeError::PacketTooLarge {
            size: 131,
            max: 130
        })
    ));
    let mut buf = BytesMut::from(&b"\x30\x80\x01"[..]);
    assert_eq!(decode_packet(&mut buf, V5, 131), Ok(None));
    // Exactly at the limit decodes.
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: Bytes::from_static(b"t"),
        packet_id: None,
        properties: None,
        payload: Bytes::from(vec![7; 124]),
    });
    let bytes = encode(&p, V5);
    assert_eq!(bytes.len(), 131);
    let mut buf = bytes.clone();
    assert_eq!(decode_packet(&mut buf, V5, 131).unwrap(), Some(p));
    let mut buf = bytes;
    assert!(decode_packet(&mut buf, V5, 130).is_err());
}

#[test]
fn partial_input_leaves_the_buffer_alone() {
    let bytes = b"\x10\x1E\x00\x04MQTT\x05\xC2\x00\x0A\x08\x11\x00\x00\x00\x78\x21\x00\x14\x00\x02id\x00\x01u\x00\x02\x01\x02";
    for n in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..n]);
        assert_eq!(
            decode_packet(&mut buf, V5, usize::MAX),
            Ok(None),
            "prefix {n}"
        );
        assert_eq!(&buf[..], &bytes[..n]);
    }
}

#[test]
fn back_to_back() {
    let mut buf = BytesMut::from(&b"\x30\x08\x00\x03a/b\x00hi\xC0\x00\xE0\x01\x8E\x40"[..]);
    assert!(matches!(
        decode_packet(&mut buf, V5, 1024),
        Ok(Some(Packet::Publish(_)))
    ));
    assert_eq!(decode_packet(&mut buf, V5, 1024), Ok(Some(Packet::PingReq)));
    assert!(matches!(
        decode_packet(&mut buf, V5, 1024),
        Ok(Some(Packet::Disconnect(_)))
    ));
    assert_eq!(decode_packet(&mut buf, V5, 1024), Ok(None));
    assert_eq!(&buf[..], b"\x40");
}

#[test]
fn zero_copy_publish() {
    let mut buf = BytesMut::with_capacity(4096);
    buf.extend_from_slice(b"\x32\x10\x00\x05a/b/c\x00\x01payload\xC0\x00");
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let Some(Packet::Publish(p)) = decode_packet(&mut buf, V311, usize::MAX).unwrap() else {
        panic!()
    };
    assert_eq!(&p.payload[..], b"payload");
    for field in [&p.topic, &p.payload] {
        let start = field.as_ptr() as usize;
        assert!(range.contains(&start) && range.contains(&(start + field.len() - 1)));
    }
    assert_eq!(p.topic.as_ptr() as usize, range.start + 4);
    assert_eq!(p.payload.as_ptr() as usize, range.start + 11);
    // The rest of the read buffer is still there, and still the same memory.
    assert_eq!(&buf[..], b"\xC0\x00");
    assert_eq!(buf.as_ptr() as usize, range.start + 18);
}

// ---------------------------------------------------------------- encode errors

#[test]
fn encode_errors_leave_out_untouched() {
    let mut out = BytesMut::from(&b"keep"[..]);
    let long = Bytes::from(vec![b'a'; 65_536]);
    let mut publish = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: long,
        packet_id: Some(1),
        properties: None,
        payload: Bytes::new(),
    };
    let p = Packet::Publish(publish.clone());
    assert!(matches!(
        encode_packet(&p, V5, &mut out),
        Err(EncodeError::FieldTooLong(_))
    ));
    assert!(matches!(
        encoded_len(&p, V5),
        Err(EncodeError::FieldTooLong(_))
    ));
    assert!(encode_publish_header(&publish, V5, &mut out).is_err());
    publish.topic = Bytes::from_static(b"t");
    publish.packet_id = None;
    assert!(matches!(
        encode_packet(&Packet::Publish(publish.clone()), V5, &mut out),
        Err(EncodeError::NotAllowed(_))
    ));
    publish.packet_id = Some(1);
    publish.properties_mut().subscription_identifiers = vec![0];
    assert!(matches!(
        encode_packet(&Packet::Publish(publish), V5, &mut out),
        Err(EncodeError::ValueOutOfRange(_))
    ));
    let bad = Packet::PubRel(PubAck {
        code: ReasonCode::NoMatchingSubscribers,
        ..PubAck::new(1)
    });
    assert_eq!(
        encode_packet(&bad, V5, &mut out),
        Err(EncodeError::ReasonCodeNotAllowed {
            packet: PacketType::PubRel,
            code: ReasonCode::NoMatchingSubscribers
        })
    );
    assert_eq!(&out[..], b"keep");
}

#[test]
fn qos0_publish_never_sets_dup() {
    let p = Publish {
        dup: true,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: Bytes::from_static(b"t"),
        packet_id: Some(9),
        properties: None,
        payload: Bytes::new(),
    };
    assert_eq!(&encode(&Packet::Publish(p), V311)[..], b"\x30\x03\x00\x01t");
}

#[test]
fn mqtt31_allows_dup_on_resent_pubrel_and_subscribe_but_311_does_not() {
    // PUBREL with DUP (0x6A), packet id 7.
    let mut buf = BytesMut::from(&b"\x6A\x02\x00\x07"[..]);
    let p = decode_packet(&mut buf, V31, usize::MAX).unwrap().unwrap();
    assert_eq!(p, Packet::PubRel(PubAck::new(7)));
    malformed(b"\x6A\x02\x00\x07", V311);
    // SUBSCRIBE with DUP (0x8A): packet id 1, filter "a", QoS 0.
    let mut buf = BytesMut::from(&b"\x8A\x06\x00\x01\x00\x01a\x00"[..]);
    assert!(matches!(
        decode_packet(&mut buf, V31, usize::MAX),
        Ok(Some(Packet::Subscribe(_)))
    ));
    malformed(b"\x8A\x06\x00\x01\x00\x01a\x00", V311);
}
