//! Differential tests against `mqttbytes` 0.6, an independent MQTT 3.1.1
//! codec (its MQTT 5 side has known bugs, so only 3.1.1 is compared).
//!
//! For each generated 3.1.1 packet `p` that mqttbytes can represent:
//! - mqttbytes encodes `to_mb(p)` and we decode those bytes back to `p`;
//! - we encode `p` and mqttbytes decodes it to `to_mb(p)`;
//! - both encodings are byte-identical (3.1.1 encodings are canonical).

mod common;

use bytes::{Bytes, BytesMut};
use mqttbytes::v4 as mb;
use proptest::prelude::*;
use tern_codec::*;

const V: ProtocolVersion = ProtocolVersion::V311;

fn mb_qos(q: QoS) -> mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => mqttbytes::QoS::ExactlyOnce,
    }
}

fn s(b: &Bytes) -> String {
    String::from_utf8(b.to_vec()).unwrap()
}

/// The mqttbytes value for `p`, or None where mqttbytes cannot represent it
/// (its Login treats an empty user name or password as absent and needs a
/// UTF-8 password).
fn to_mb(p: &Packet) -> Option<mb::Packet> {
    Some(match p {
        Packet::Connect(c) => {
            let login = match (&c.username, &c.password) {
                (None, None) => None,
                (Some(u), None) if !u.is_empty() => Some(mb::Login::new(s(u), String::new())),
                (Some(u), Some(pw)) if !u.is_empty() && !pw.is_empty() => {
                    Some(mb::Login::new(s(u), String::from_utf8(pw.to_vec()).ok()?))
                }
                _ => return None,
            };
            mb::Packet::Connect(mb::Connect {
                protocol: mqttbytes::Protocol::V4,
                keep_alive: c.keep_alive,
                client_id: s(&c.client_id),
                clean_session: c.clean_start,
                last_will: c.will.as_ref().map(|w| mb::LastWill {
                    topic: s(&w.topic),
                    message: w.payload.clone(),
                    qos: mb_qos(w.qos),
                    retain: w.retain,
                }),
                login,
            })
        }
        Packet::ConnAck(c) => mb::Packet::ConnAck(mb::ConnAck {
            session_present: c.session_present,
            code: match c.code.connack_v3() {
                0 => mb::ConnectReturnCode::Success,
                1 => mb::ConnectReturnCode::RefusedProtocolVersion,
                2 => mb::ConnectReturnCode::BadClientId,
                3 => mb::ConnectReturnCode::ServiceUnavailable,
                4 => mb::ConnectReturnCode::BadUserNamePassword,
                _ => mb::ConnectReturnCode::NotAuthorized,
            },
        }),
        Packet::Publish(p) => mb::Packet::Publish(mb::Publish {
            dup: p.dup,
            qos: mb_qos(p.qos),
            retain: p.retain,
            topic: s(&p.topic),
            pkid: p.packet_id.unwrap_or(0),
            payload: p.payload.clone(),
        }),
        Packet::PubAck(a) => mb::Packet::PubAck(mb::PubAck::new(a.packet_id)),
        Packet::PubRec(a) => mb::Packet::PubRec(mb::PubRec::new(a.packet_id)),
        Packet::PubRel(a) => mb::Packet::PubRel(mb::PubRel::new(a.packet_id)),
        Packet::PubComp(a) => mb::Packet::PubComp(mb::PubComp::new(a.packet_id)),
        Packet::Subscribe(sub) => mb::Packet::Subscribe(mb::Subscribe {
            pkid: sub.packet_id,
            filters: sub
                .filters
                .iter()
                .map(|f| mb::SubscribeFilter::new(s(&f.filter), mb_qos(f.qos)))
                .collect(),
        }),
        Packet::SubAck(a) => mb::Packet::SubAck(mb::SubAck::new(
            a.packet_id,
            a.codes
                .iter()
                .map(|c| match c {
                    ReasonCode::Success => {
                        mb::SubscribeReasonCode::Success(mqttbytes::QoS::AtMostOnce)
                    }
                    ReasonCode::GrantedQoS1 => {
                        mb::SubscribeReasonCode::Success(mqttbytes::QoS::AtLeastOnce)
                    }
                    ReasonCode::GrantedQoS2 => {
                        mb::SubscribeReasonCode::Success(mqttbytes::QoS::ExactlyOnce)
                    }
                    _ => mb::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Packet::Unsubscribe(u) => mb::Packet::Unsubscribe(mb::Unsubscribe {
            pkid: u.packet_id,
            topics: u.filters.iter().map(s).collect(),
        }),
        Packet::UnsubAck(u) => mb::Packet::UnsubAck(mb::UnsubAck::new(u.packet_id)),
        Packet::PingReq => mb::Packet::PingReq,
        Packet::PingResp => mb::Packet::PingResp,
        Packet::Disconnect(_) => mb::Packet::Disconnect,
        Packet::Auth(_) => return None,
    })
}

fn mb_write(p: &mb::Packet) -> BytesMut {
    let mut out = BytesMut::new();
    match p {
        mb::Packet::Connect(x) => x.write(&mut out),
        mb::Packet::ConnAck(x) => x.write(&mut out),
        mb::Packet::Publish(x) => x.write(&mut out),
        mb::Packet::PubAck(x) => x.write(&mut out),
        mb::Packet::PubRec(x) => x.write(&mut out),
        mb::Packet::PubRel(x) => x.write(&mut out),
        mb::Packet::PubComp(x) => x.write(&mut out),
        mb::Packet::Subscribe(x) => x.write(&mut out),
        mb::Packet::SubAck(x) => x.write(&mut out),
        mb::Packet::Unsubscribe(x) => x.write(&mut out),
        mb::Packet::UnsubAck(x) => x.write(&mut out),
        mb::Packet::PingReq => mb::PingReq.write(&mut out),
        mb::Packet::PingResp => mb::PingResp.write(&mut out),
        mb::Packet::Disconnect => mb::Disconnect.write(&mut out),
    }
    .expect("mqttbytes encode");
    out
}

fn compare(p: &Packet) -> Result<bool, TestCaseError> {
    let Some(theirs) = to_mb(p) else {
        return Ok(false);
    };
    // mqttbytes -> us
    let their_bytes = mb_write(&theirs);
    let ours = common::decode_one(&their_bytes, V).map_err(|e| {
        TestCaseError::fail(format!("we refuse mqttbytes' {their_bytes:02X?}: {e}"))
    })?;
    prop_assert_eq!(&ours, p);
    // us -> mqttbytes
    let our_bytes = common::encode(p, V);
    let mut buf = our_bytes.clone();
    let decoded = mb::read(&mut buf, usize::MAX).map_err(|e| {
        TestCaseError::fail(format!("mqttbytes refuses our {our_bytes:02X?}: {e:?}"))
    })?;
    prop_assert_eq!(decoded, theirs);
    prop_assert_eq!(our_bytes, their_bytes);
    Ok(true)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn differential_v311(p in common::packet(V)) {
        compare(&p)?;
    }
}

/// A fixed, deterministic set: every packet type, a few hundred packets.
#[test]
fn deterministic_corpus() {
    let mut compared = 0;
    for p in common::sample(common::packet(V), 400) {
        if compare(&p).unwrap() {
            compared += 1;
        }
    }
    assert!(compared > 300, "only {compared} comparable");
}

/// Packets both codecs must refuse.
#[test]
fn both_refuse() {
    for bad in [
        &b"\x36\x05\x00\x01a\x00\x01"[..], // QoS 3
        b"\x30\xFF\xFF\xFF\xFF\x01",       // 5-byte remaining length
    ] {
        let mut buf = BytesMut::from(bad);
        assert!(mb::read(&mut buf, 1 << 20).is_err(), "{bad:02X?}");
        let mut buf = BytesMut::from(bad);
        assert!(decode_packet(&mut buf, V, 1 << 20).is_err(), "{bad:02X?}");
    }
}
