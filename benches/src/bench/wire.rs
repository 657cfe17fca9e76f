//! What tern-bench puts on the wire and how it reads it back.
//!
//! Control packets (CONNECT, SUBSCRIBE, DISCONNECT) are encoded once with
//! `tern-codec`. PUBLISH packets are encoded once per publisher into a
//! [`PublishTemplate`] and copied into a batch buffer; only the packet id
//! and the send timestamp are patched per message. What arrives is framed
//! by [`next_frame`] without allocating, and PUBLISH bodies are split by
//! [`publish_payload`], so reading costs a few bytes of arithmetic per
//! message.

use bytes::{Bytes, BytesMut};
use tern_codec::properties::{ConnectProperties, PublishProperties, SubscribeProperties};
use tern_codec::{
    encode_packet, encode_publish_header, Connect, Packet, ProtocolVersion, Publish, QoS,
    RetainHandling, Subscribe, SubscribeFilter,
};

/// Bytes of the send timestamp at the front of every payload that is long
/// enough to carry one: nanoseconds since the run's epoch, little endian.
pub const STAMP_LEN: usize = 8;

/// Byte that fills the rest of every payload.
pub const FILL: u8 = 0xA5;

/// The bytes of CONNECT for an anonymous session: clean, or `persistent`
/// (3.1.1 clean session 0; MQTT 5 with a one-hour session expiry), which a
/// broker with a store keeps on disk.
pub fn connect(
    version: ProtocolVersion,
    client_id: &str,
    keep_alive: u16,
    persistent: bool,
) -> Vec<u8> {
    let properties = ConnectProperties {
        // Let the broker send as many QoS 1/2 messages to us as it likes:
        // the generator must never be the one that throttles.
        receive_maximum: version.is_v5().then_some(u16::MAX),
        session_expiry_interval: (persistent && version.is_v5()).then_some(3600),
        ..ConnectProperties::default()
    };
    encode(
        &Packet::Connect(Box::new(Connect {
            protocol: version,
            clean_start: !persistent,
            keep_alive,
            client_id: Bytes::copy_from_slice(client_id.as_bytes()),
            will: None,
            username: None,
            password: None,
            properties,
        })),
        version,
    )
}

/// The bytes of SUBSCRIBE for one filter, with a Subscription Identifier
/// when `subscription_id` is given (MQTT 5).
pub fn subscribe(
    version: ProtocolVersion,
    packet_id: u16,
    filter: &str,
    qos: QoS,
    subscription_id: Option<u32>,
) -> Vec<u8> {
    encode(
        &Packet::Subscribe(Subscribe {
            packet_id,
            filters: vec![SubscribeFilter {
                filter: Bytes::copy_from_slice(filter.as_bytes()),
                qos,
                no_local: false,
                retain_as_published: false,
                retain_handling: RetainHandling::SendAtSubscribe,
            }],
            properties: SubscribeProperties {
                subscription_identifier: subscription_id,
                ..SubscribeProperties::default()
            },
        }),
        version,
    )
}

/// DISCONNECT, normal disconnection, in both 3.1.1 and 5.0 form.
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// PINGREQ.
pub const PINGREQ: [u8; 2] = [0xC0, 0x00];

fn encode(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_packet(packet, version, &mut out).expect("tern-bench only encodes valid packets");
    out.to_vec()
}

/// An acknowledgement of `packet_id` in its short form (valid in 3.1.1 and,
/// as "Success without properties", in 5.0). `kind` is the first byte:
/// 0x40 PUBACK, 0x50 PUBREC, 0x62 PUBREL, 0x70 PUBCOMP.
pub fn put_ack(out: &mut Vec<u8>, kind: u8, packet_id: u16) {
    let [hi, lo] = packet_id.to_be_bytes();
    out.extend_from_slice(&[kind, 0x02, hi, lo]);
}

pub const PUBACK: u8 = 0x40;
pub const PUBREC: u8 = 0x50;
pub const PUBREL: u8 = 0x62;
pub const PUBCOMP: u8 = 0x70;

/// One PUBLISH encoded once, with the offsets of what changes per message.
#[derive(Debug, Clone)]
pub struct PublishTemplate {
    pub bytes: Vec<u8>,
    /// Offset of the 2-byte packet id (QoS 1 and 2 only).
    pub id_offset: Option<usize>,
    /// Offset of the first payload byte.
    pub payload_offset: usize,
    /// Whether the payload is long enough to carry a send timestamp.
    pub stamped: bool,
}

impl PublishTemplate {
    /// `properties` are encoded only for MQTT 5.
    pub fn new(
        version: ProtocolVersion,
        topic: &str,
        qos: QoS,
        payload_len: usize,
        properties: &PublishProperties,
    ) -> Self {
        let mut publish = Publish {
            dup: false,
            qos,
            retain: false,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            packet_id: (qos != QoS::AtMostOnce).then_some(1),
            properties: Default::default(),
            payload: Bytes::from(vec![FILL; payload_len]),
        };
        if version.is_v5() && !properties.is_empty() {
            publish.set_properties(properties.clone());
        }
        let mut header = BytesMut::new();
        encode_publish_header(&publish, version, &mut header)
            .expect("tern-bench only encodes valid packets");
        let payload_offset = header.len();
        // The packet id follows the first byte, the Remaining Length and the
        // topic (MQTT 5 properties come after it).
        let length_bytes = header[1..]
            .iter()
            .position(|b| b & 0x80 == 0)
            .expect("an encoded Remaining Length ends")
            + 1;
        let id_offset = (qos != QoS::AtMostOnce).then(|| 1 + length_bytes + 2 + topic.len());
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(&publish.payload);
        PublishTemplate {
            bytes,
            id_offset,
            payload_offset,
            stamped: payload_len >= STAMP_LEN,
        }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Writes packet id and timestamp into one copy of the template.
    pub fn patch(&self, packet: &mut [u8], packet_id: u16, stamp_ns: u64) {
        if let Some(at) = self.id_offset {
            packet[at..at + 2].copy_from_slice(&packet_id.to_be_bytes());
        }
        if self.stamped {
            write_stamp(&mut packet[self.payload_offset..], stamp_ns);
        }
    }
}

/// Writes the send timestamp at the front of `payload` (which must hold at
/// least [`STAMP_LEN`] bytes).
pub fn write_stamp(payload: &mut [u8], stamp_ns: u64) {
    payload[..STAMP_LEN].copy_from_slice(&stamp_ns.to_le_bytes());
}

/// The send timestamp carried by `payload`, if it is long enough.
pub fn read_stamp(payload: &[u8]) -> Option<u64> {
    let bytes: [u8; STAMP_LEN] = payload.get(..STAMP_LEN)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// The next packet id after `id`: 1..=65535, never 0.
pub fn next_packet_id(id: u16) -> u16 {
    if id == u16::MAX {
        1
    } else {
        id + 1
    }
}

/// One complete frame at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// First byte: packet type and flags.
    pub first: u8,
    /// Offset of the body (after the remaining length).
    pub body_start: usize,
    /// Length of the whole frame.
    pub len: usize,
}

impl Frame {
    pub fn packet_type(&self) -> u8 {
        self.first >> 4
    }
}

/// Why a byte stream cannot be framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// The frame at the front of `buf`: `Ok(None)` if it has not fully arrived.
pub fn next_frame(buf: &[u8]) -> Result<Option<Frame>, Malformed> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            let body_start = 2 + i;
            let len = body_start + remaining;
            if buf.len() < len {
                return Ok(None);
            }
            return Ok(Some(Frame {
                first,
                body_start,
                len,
            }));
        }
    }
    Err(Malformed)
}

/// Splits a PUBLISH body: its QoS, packet id (0 for QoS 0) and payload.
pub fn publish_payload(
    first: u8,
    body: &[u8],
    version: ProtocolVersion,
) -> Result<(u8, u16, &[u8]), Malformed> {
    let qos = (first >> 1) & 0x03;
    let topic_len = usize::from(u16::from_be_bytes(
        body.get(..2).ok_or(Malformed)?.try_into().unwrap(),
    ));
    let mut at = 2 + topic_len;
    let mut packet_id = 0;
    if qos > 0 {
        let id = body.get(at..at + 2).ok_or(Malformed)?;
        packet_id = u16::from_be_bytes([id[0], id[1]]);
        at += 2;
    }
    if version.is_v5() {
        let mut props_len = 0usize;
        let mut i = 0;
        loop {
            let b = *body.get(at + i).ok_or(Malformed)?;
            props_len |= usize::from(b & 0x7F) << (7 * i);
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            if i == 4 {
                return Err(Malformed);
            }
        }
        at += i + props_len;
    }
    let payload = body.get(at..).ok_or(Malformed)?;
    Ok((qos, packet_id, payload))
}

/// What a stand-in broker (`sink`, `relay`) answers to one frame `f` with
/// body `body`, appended to `out`: CONNACK (learning the protocol version
/// into `v5`), PUBACK or PUBREC, PUBCOMP, SUBACK granting QoS 0 to the one
/// filter tern-bench subscribes with, PINGRESP. False for DISCONNECT.
pub fn stand_in_reply(f: &Frame, body: &[u8], v5: &mut bool, out: &mut Vec<u8>) -> bool {
    match f.packet_type() {
        1 => {
            // Protocol name "MQTT" (2 + 4 bytes), then the level.
            *v5 = body.get(6) == Some(&5);
            out.extend_from_slice(if *v5 {
                &[0x20, 0x03, 0x00, 0x00, 0x00]
            } else {
                &[0x20, 0x02, 0x00, 0x00]
            });
        }
        3 => {
            let qos = (f.first >> 1) & 3;
            if qos > 0 {
                let topic_len = body
                    .get(..2)
                    .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
                if let Ok(id) = ack_packet_id(&body[(2 + topic_len).min(body.len())..]) {
                    put_ack(out, if qos == 1 { PUBACK } else { PUBREC }, id);
                }
            }
        }
        6 => {
            if let Ok(id) = ack_packet_id(body) {
                put_ack(out, PUBCOMP, id);
            }
        }
        8 => {
            if let Ok(id) = ack_packet_id(body) {
                let [hi, lo] = id.to_be_bytes();
                if *v5 {
                    out.extend_from_slice(&[0x90, 0x04, hi, lo, 0x00, 0x00]);
                } else {
                    out.extend_from_slice(&[0x90, 0x03, hi, lo, 0x00]);
                }
            }
        }
        12 => out.extend_from_slice(&[0xD0, 0x00]),
        14 => return false,
        _ => {}
    }
    true
}

/// The packet id of an acknowledgement body (PUBACK/PUBREC/PUBREL/PUBCOMP).
pub fn ack_packet_id(body: &[u8]) -> Result<u16, Malformed> {
    let id = body.get(..2).ok_or(Malformed)?;
    Ok(u16::from_be_bytes([id[0], id[1]]))
}

/// Moves the unconsumed bytes `buf[at..len]` to the front and returns the new
/// length; doubles the buffer when one frame fills it entirely.
pub fn compact(buf: &mut Vec<u8>, at: usize, len: usize) -> usize {
    buf.copy_within(at..len, 0);
    let len = len - at;
    if len == buf.len() {
        buf.resize(buf.len() * 2, 0);
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_codec::decode_packet;

    fn decode(bytes: &[u8], version: ProtocolVersion) -> Packet {
        let mut buf = BytesMut::from(bytes);
        let packet = decode_packet(&mut buf, version, usize::MAX)
            .unwrap()
            .unwrap();
        assert!(buf.is_empty());
        packet
    }

    #[test]
    fn template_patches_id_and_stamp_in_every_version_and_qos() {
        let with_properties = PublishProperties {
            message_expiry_interval: Some(60),
            user_properties: vec![(Bytes::from_static(b"k0"), Bytes::from_static(b"v")); 40],
            ..PublishProperties::default()
        };
        for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
            for (qos, properties) in [
                (QoS::AtMostOnce, PublishProperties::NONE),
                (QoS::AtLeastOnce, PublishProperties::NONE),
                (QoS::ExactlyOnce, PublishProperties::NONE),
                (QoS::AtMostOnce, with_properties.clone()),
                (QoS::AtLeastOnce, with_properties.clone()),
            ] {
                for payload_len in [0, 7, 8, 64, 300] {
                    let t = PublishTemplate::new(
                        version,
                        "bench/topic/7",
                        qos,
                        payload_len,
                        &properties,
                    );
                    let mut packet = t.bytes.clone();
                    t.patch(&mut packet, 0xBEEF, 0x0102_0304_0506_0708);
                    let Packet::Publish(p) = decode(&packet, version) else {
                        panic!("not a PUBLISH");
                    };
                    assert_eq!(p.qos, qos);
                    assert_eq!(p.topic_str(), "bench/topic/7");
                    if version.is_v5() {
                        assert_eq!(p.properties(), &properties);
                    } else {
                        assert!(p.properties().is_empty());
                    }
                    assert_eq!(p.payload.len(), payload_len);
                    if qos == QoS::AtMostOnce {
                        assert_eq!(p.packet_id, None);
                    } else {
                        assert_eq!(p.packet_id, Some(0xBEEF));
                    }
                    if payload_len >= STAMP_LEN {
                        assert_eq!(read_stamp(&p.payload), Some(0x0102_0304_0506_0708));
                        assert!(p.payload[STAMP_LEN..].iter().all(|&b| b == FILL));
                    } else {
                        assert_eq!(read_stamp(&p.payload), None);
                    }
                    // And our own reader agrees with the codec.
                    let f = next_frame(&packet).unwrap().unwrap();
                    assert_eq!(f.len, packet.len());
                    let (q, id, payload) =
                        publish_payload(f.first, &packet[f.body_start..f.len], version).unwrap();
                    assert_eq!(q, qos as u8);
                    assert_eq!(id, p.packet_id.unwrap_or(0));
                    assert_eq!(payload, &p.payload[..]);
                }
            }
        }
    }

    #[test]
    fn stamp_round_trips() {
        let mut payload = vec![FILL; 16];
        for ns in [0, 1, 999_999, u64::MAX] {
            write_stamp(&mut payload, ns);
            assert_eq!(read_stamp(&payload), Some(ns));
        }
        assert_eq!(read_stamp(&[1, 2, 3]), None);
    }

    #[test]
    fn framing_waits_for_whole_frames() {
        // A PUBACK split at every position.
        let mut bytes = Vec::new();
        put_ack(&mut bytes, PUBACK, 513);
        for cut in 0..bytes.len() {
            assert_eq!(next_frame(&bytes[..cut]), Ok(None));
        }
        let f = next_frame(&bytes).unwrap().unwrap();
        assert_eq!(f.packet_type(), 4);
        assert_eq!(ack_packet_id(&bytes[f.body_start..f.len]), Ok(513));
        // Multi-byte remaining length (200 = 0xC8 0x01).
        let mut big = vec![0x30, 0xC8, 0x01];
        big.extend(std::iter::repeat_n(0, 200));
        let f = next_frame(&big).unwrap().unwrap();
        assert_eq!((f.body_start, f.len), (3, 203));
        assert_eq!(
            next_frame(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            Err(Malformed)
        );
    }

    #[test]
    fn control_packets_decode() {
        for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
            let Packet::Connect(c) = decode(&connect(version, "tb-1", 0, false), version) else {
                panic!()
            };
            assert_eq!(c.client_id_str(), "tb-1");
            assert_eq!(c.protocol, version);
            assert!(c.clean_start);
            let Packet::Connect(p) = decode(&connect(version, "tb-2", 0, true), version) else {
                panic!()
            };
            assert!(!p.clean_start);
            let expiry = version.is_v5().then_some(3600);
            assert_eq!(p.properties.session_expiry_interval, expiry);
            let Packet::Subscribe(s) = decode(
                &subscribe(version, 9, "$share/g/a/+", QoS::AtLeastOnce, None),
                version,
            ) else {
                panic!()
            };
            assert_eq!(s.packet_id, 9);
            assert_eq!(s.filters[0].filter_str(), "$share/g/a/+");
            assert_eq!(s.properties.subscription_identifier, None);
            if version.is_v5() {
                let Packet::Subscribe(s) = decode(
                    &subscribe(version, 9, "a", QoS::AtMostOnce, Some(7)),
                    version,
                ) else {
                    panic!()
                };
                assert_eq!(s.properties.subscription_identifier, Some(7));
            }
            assert!(matches!(
                decode(&DISCONNECT, version),
                Packet::Disconnect(_)
            ));
        }
    }

    #[test]
    fn packet_ids_skip_zero() {
        assert_eq!(next_packet_id(1), 2);
        assert_eq!(next_packet_id(u16::MAX), 1);
    }
}
