//! MQTT 5 PUBLISH headers for a message a server forwards, each delivery
//! with properties of its own.
//!
//! A server forwards a message's properties unchanged except for three that
//! belong to one delivery (MQTT 5.0 section 3.3.2.3):
//! - the Message Expiry Interval, counted down by the time the message
//!   waited (MQTT-3.3.2-6);
//! - the Topic Alias, which belongs to one connection (MQTT-3.3.2-12);
//! - the Subscription Identifiers of the subscriptions the delivery is for
//!   (MQTT-3.3.4-3).
//!
//! [`encode_forwarded_properties`] encodes the rest once per message.
//! [`encode_forwarded_header`] then writes each delivery's header from
//! those bytes and the delivery's own three, so a message fanned out to many
//! subscribers has its User Properties encoded once, not once per delivery,
//! and nothing is allocated per delivery. Where the expiry is a delivery's
//! only property of its own, the whole header can be encoded once and the
//! expiry written over each copy ([`EXPIRY_AT_END`]).

use bytes::{Bytes, BytesMut};

use crate::encode::{packet_id, publish_first_byte, remaining_length};
use crate::error::EncodeError;
use crate::packet::QoS;
use crate::primitives::{measure, put_binary, put_varint, varint_len, Sink};
use crate::properties::PublishProperties;
use crate::property_codec::{encode_forwarded_body, encode_forwarded_by_delivery};

/// The message's own properties in a [`ForwardedHeader`].
#[derive(Debug, Clone, Copy)]
pub enum MessageProperties<'a> {
    /// As [`encode_forwarded_properties`] wrote them: copied as they are.
    Encoded(&'a [u8]),
    /// Encoded as the header is: for a message forwarded once, where
    /// encoding them ahead would cost an allocation and save nothing. Its
    /// Message Expiry Interval, Topic Alias and Subscription Identifiers
    /// are left out (the header's own are sent).
    Decoded(&'a PublishProperties),
}

/// The header of one forwarded PUBLISH, borrowed from its parts.
#[derive(Debug, Clone, Copy)]
pub struct ForwardedHeader<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty when `topic_alias` names a topic the client already knows.
    pub topic: &'a [u8],
    /// Required for QoS 1 and 2.
    pub packet_id: Option<u16>,
    pub message: MessageProperties<'a>,
    /// What is left of the message's lifetime, if it has one.
    pub message_expiry_interval: Option<u32>,
    pub topic_alias: Option<u16>,
    /// Each 1..=268,435,455.
    pub subscription_identifiers: &'a [u32],
    pub payload_len: usize,
}

/// A message's properties without its Message Expiry Interval, Topic Alias
/// and Subscription Identifiers, as a property list body (no length
/// prefix): the part of every [`ForwardedHeader`] that is the same for
/// every delivery. Empty when the message has no other property.
pub fn encode_forwarded_properties(props: &PublishProperties) -> Result<Bytes, EncodeError> {
    let len = measure(|c| encode_forwarded_body(props, c))?;
    let mut out = BytesMut::with_capacity(len);
    encode_forwarded_body(props, &mut out)?;
    Ok(out.freeze())
}

/// Bytes from the end of a [`ForwardedHeader`] with a Message Expiry
/// Interval but no Topic Alias and no Subscription Identifier to where the
/// interval's four bytes (big endian) start.
pub const EXPIRY_AT_END: usize = 4;

/// The size of the whole PUBLISH `header` describes, payload included: to
/// respect a client's Maximum Packet Size before encoding it.
pub fn forwarded_packet_len(header: &ForwardedHeader<'_>) -> Result<usize, EncodeError> {
    let (_, remaining) = lengths(header)?;
    Ok(1 + varint_len(remaining as u32) + remaining)
}

/// Appends `header`, as an MQTT 5 PUBLISH's fixed and variable header
/// (its Remaining Length counts the payload, which the caller writes after
/// it). On error nothing is appended.
///
/// A header with a Message Expiry Interval but no Topic Alias and no
/// Subscription Identifier ends with the interval's four bytes: a header
/// encoded once can be copied per delivery with the interval written over
/// them ([`EXPIRY_AT_END`]).
pub fn encode_forwarded_header(
    header: &ForwardedHeader<'_>,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let (properties_len, remaining) = lengths(header)?;
    let header_len = remaining - header.payload_len;
    out.reserve(1 + varint_len(remaining as u32) + header_len);
    out.put_u8(publish_first_byte(header.dup, header.qos, header.retain));
    put_varint(out, remaining, "remaining length")?;
    put_binary(out, header.topic, "topic name")?;
    if let Some(id) = header.packet_id.filter(|_| header.qos != QoS::AtMostOnce) {
        packet_id(id, out)?;
    }
    put_varint(out, properties_len, "property length")?;
    properties(header, out)
}

/// The property list's length and the Remaining Length, with every check
/// made, so that encoding cannot fail half way.
fn lengths(header: &ForwardedHeader<'_>) -> Result<(usize, usize), EncodeError> {
    if header.topic.is_empty() && header.topic_alias.is_none() {
        return Err(EncodeError::NotAllowed(
            "empty topic name without a topic alias",
        ));
    }
    if header.qos != QoS::AtMostOnce {
        let id = header.packet_id.ok_or(EncodeError::NotAllowed(
            "QoS 1 or 2 PUBLISH without a packet identifier",
        ))?;
        measure(|c| packet_id(id, c))?;
    }
    measure(|c| put_binary(c, header.topic, "topic name"))?;
    let properties_len = measure(|c| properties(header, c))?;
    measure(|c| put_varint(c, properties_len, "property length"))?;
    let header_len = 2
        + header.topic.len()
        + if header.qos == QoS::AtMostOnce { 0 } else { 2 }
        + varint_len(properties_len as u32)
        + properties_len;
    let remaining = remaining_length(header_len + header.payload_len)?;
    Ok((properties_len, remaining))
}

/// The property list's body: the message's, then the delivery's own, the
/// Message Expiry Interval first of those (see [`encode_forwarded_header`]).
fn properties<W: Sink>(header: &ForwardedHeader<'_>, w: &mut W) -> Result<(), EncodeError> {
    match header.message {
        MessageProperties::Encoded(bytes) => w.put_slice(bytes),
        MessageProperties::Decoded(props) => encode_forwarded_body(props, w)?,
    }
    encode_forwarded_by_delivery(
        header.message_expiry_interval,
        header.topic_alias,
        header.subscription_identifiers,
        w,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_packet, Packet, ProtocolVersion, Publish};

    fn every_property() -> PublishProperties {
        PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(3600),
            topic_alias: Some(9),
            response_topic: Some(Bytes::from_static(b"reply/here")),
            correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
            user_properties: vec![
                (Bytes::from_static(b"k"), Bytes::from_static(b"v")),
                (Bytes::from_static(b"k"), Bytes::from_static(b"again")),
            ],
            subscription_identifiers: vec![1, 2],
            content_type: Some(Bytes::from_static(b"text/plain")),
        }
    }

    /// Decodes one whole PUBLISH: `header` followed by `payload`.
    fn decode(header: &[u8], payload: &[u8]) -> Publish {
        let mut buf = BytesMut::from(header);
        buf.extend_from_slice(payload);
        match decode_packet(&mut buf, ProtocolVersion::V5, usize::MAX) {
            Ok(Some(Packet::Publish(p))) if buf.is_empty() => p,
            other => panic!("not one PUBLISH: {other:?}"),
        }
    }

    #[test]
    fn a_forwarded_header_carries_the_message_s_properties_and_the_delivery_s() {
        let message = every_property();
        let encoded = encode_forwarded_properties(&message).unwrap();
        let payload = b"payload bytes";
        for props in [
            MessageProperties::Encoded(&encoded),
            MessageProperties::Decoded(&message),
        ] {
            for (qos, packet_id) in [(QoS::AtMostOnce, None), (QoS::ExactlyOnce, Some(77))] {
                let header = ForwardedHeader {
                    dup: false,
                    qos,
                    retain: true,
                    topic: b"a/b",
                    packet_id,
                    message: props,
                    message_expiry_interval: Some(12),
                    topic_alias: Some(3),
                    subscription_identifiers: &[5, 268_435_455],
                    payload_len: payload.len(),
                };
                let mut out = BytesMut::new();
                encode_forwarded_header(&header, &mut out).unwrap();
                assert_eq!(
                    forwarded_packet_len(&header).unwrap(),
                    out.len() + payload.len()
                );
                let p = decode(&out, payload);
                assert_eq!((p.qos, p.retain, p.packet_id), (qos, true, packet_id));
                assert_eq!(&p.topic[..], b"a/b");
                assert_eq!(&p.payload[..], payload);
                let expected = PublishProperties {
                    message_expiry_interval: Some(12),
                    topic_alias: Some(3),
                    subscription_identifiers: vec![5, 268_435_455],
                    ..message.clone()
                };
                assert_eq!(p.properties(), &expected);
            }
        }
    }

    /// The expiry can be written over a copy of a header encoded once.
    #[test]
    fn the_expiry_ends_a_header_without_alias_or_identifiers() {
        let message = every_property();
        let encoded = encode_forwarded_properties(&message).unwrap();
        for props in [
            MessageProperties::Encoded(&encoded),
            MessageProperties::Decoded(&message),
        ] {
            let header = ForwardedHeader {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: b"t",
                packet_id: Some(9),
                message: props,
                message_expiry_interval: Some(0),
                topic_alias: None,
                subscription_identifiers: &[],
                payload_len: 3,
            };
            let mut out = BytesMut::new();
            encode_forwarded_header(&header, &mut out).unwrap();
            let at = out.len() - EXPIRY_AT_END;
            out[at..].copy_from_slice(&0x0102_0304u32.to_be_bytes());
            let p = decode(&out, b"abc");
            assert_eq!(p.properties().message_expiry_interval, Some(0x0102_0304));
            assert_eq!(p.properties().user_properties, message.user_properties);
        }
    }

    #[test]
    fn the_message_s_per_delivery_properties_are_not_forwarded() {
        let encoded = encode_forwarded_properties(&every_property()).unwrap();
        let header = ForwardedHeader {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: b"t",
            packet_id: None,
            message: MessageProperties::Encoded(&encoded),
            message_expiry_interval: None,
            topic_alias: None,
            subscription_identifiers: &[],
            payload_len: 0,
        };
        let mut out = BytesMut::new();
        encode_forwarded_header(&header, &mut out).unwrap();
        let p = decode(&out, b"");
        assert_eq!(p.properties().message_expiry_interval, None);
        assert_eq!(p.properties().topic_alias, None);
        assert!(p.properties().subscription_identifiers.is_empty());
        assert_eq!(p.properties().user_properties.len(), 2);
        // And a message with no other property encodes to nothing.
        let only_per_delivery = PublishProperties {
            message_expiry_interval: Some(1),
            topic_alias: Some(1),
            subscription_identifiers: vec![1],
            ..PublishProperties::default()
        };
        assert!(encode_forwarded_properties(&only_per_delivery)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn an_invalid_header_appends_nothing() {
        let valid = ForwardedHeader {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: b"t",
            packet_id: Some(1),
            message: MessageProperties::Encoded(b""),
            message_expiry_interval: None,
            topic_alias: None,
            subscription_identifiers: &[],
            payload_len: 0,
        };
        let invalid = [
            ForwardedHeader {
                topic: b"",
                ..valid
            },
            ForwardedHeader {
                packet_id: None,
                ..valid
            },
            ForwardedHeader {
                packet_id: Some(0),
                ..valid
            },
            ForwardedHeader {
                subscription_identifiers: &[0],
                ..valid
            },
            ForwardedHeader {
                subscription_identifiers: &[268_435_456],
                ..valid
            },
            ForwardedHeader {
                payload_len: 268_435_455,
                ..valid
            },
        ];
        for header in invalid {
            let mut out = BytesMut::from(&b"kept"[..]);
            assert!(encode_forwarded_header(&header, &mut out).is_err());
            assert!(forwarded_packet_len(&header).is_err());
            assert_eq!(&out[..], b"kept");
        }
        // An empty topic is fine with an alias.
        let aliased = ForwardedHeader {
            topic: b"",
            topic_alias: Some(2),
            ..valid
        };
        let mut out = BytesMut::new();
        encode_forwarded_header(&aliased, &mut out).unwrap();
        assert_eq!(decode(&out, b"").properties().topic_alias, Some(2));
    }
}
