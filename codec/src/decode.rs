//! Decoding: from the connection's read buffer to [`Packet`] values.
//!
//! [`decode_packet`] works in two steps:
//!
//! 1. **Framing**, on the possibly incomplete buffer. The first byte (type and
//!    flags) is validated as soon as it arrives, then the Remaining Length
//!    (1 to 4 bytes). As soon as that is known, the size of the whole packet is
//!    checked against the connection's maximum, so an oversized packet is
//!    refused from its first 2-5 bytes, before its body is waited for or
//!    buffered. Until the whole frame is there the buffer is left untouched
//!    and `Ok(None)` is returned.
//! 2. **Parsing**, on the complete frame, which is split off the read buffer
//!    and frozen (`split_to(len).freeze()`, no copy). Every field is read
//!    through a bounds-checked [`Reader`]; topic, payload, strings and binary
//!    fields are slices of the frozen frame, so a PUBLISH payload is never
//!    copied from the socket buffer to the subscribers' write queues. Vectors
//!    (filters, reason codes, user properties) grow one element per element
//!    actually read, never from a count the peer claims.
//!
//! The packet's fields must consume the frame exactly; bytes left over, or a
//! field running past the end, make the packet malformed. Any error means the
//! connection must be closed (the buffer's contents are then unspecified).

use bytes::{Buf, BytesMut};

use crate::error::DecodeError;
use crate::packet::*;
use crate::primitives::{peek_varint, Reader, VarintError};
use crate::property_codec::{decode_properties, PropertySet};
use crate::reason::ReasonCode;

/// Decodes one packet from the front of `buf`.
///
/// `Ok(None)`: not enough bytes yet (buf untouched). `Ok(Some(p))`: the
/// frame's bytes were removed from buf (`split_to(frame_len).freeze()`;
/// topic/payload/binary fields are slices of that frozen frame). `Err`: the
/// connection must be closed (with `e.reason_code()` in v5).
///
/// `version` is the connection's negotiated version, used for every packet
/// except CONNECT, which carries its own (before CONNECT, callers pass any
/// version; CONNECT decodes regardless).
///
/// `max_packet_size` is the maximum size of a whole packet (fixed header +
/// remaining length); it is checked as soon as the remaining length is known
/// (possibly from only the first 2-5 bytes), before the body has arrived.
pub fn decode_packet(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let packet_type = packet_type(first, version)?;
    let (remaining, len_len) = match peek_varint(&buf[1..]) {
        Ok(v) => v,
        Err(VarintError::Incomplete) => return Ok(None),
        Err(VarintError::TooLong) => {
            return Err(DecodeError::Malformed(
                "remaining length longer than 4 bytes",
            ))
        }
        Err(VarintError::NotMinimal) => {
            return Err(DecodeError::Malformed(
                "remaining length not in its shortest form",
            ))
        }
    };
    let frame_len = 1 + len_len + remaining as usize;
    if frame_len > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size: frame_len,
            max: max_packet_size,
        });
    }
    if buf.len() < frame_len {
        return Ok(None);
    }
    // From here on the frame is consumed whatever the outcome: an error
    // closes the connection, so the buffer no longer matters.
    let mut frame = buf.split_to(frame_len).freeze();
    frame.advance(1 + len_len);
    let mut r = Reader::new(frame);
    let flags = first & 0x0F;
    let packet = match packet_type {
        PacketType::Connect => Packet::Connect(Box::new(connect(&mut r)?)),
        PacketType::ConnAck => Packet::ConnAck(Box::new(connack(&mut r, version)?)),
        PacketType::Publish => Packet::Publish(publish(flags, &mut r, version)?),
        PacketType::PubAck => Packet::PubAck(puback(PacketType::PubAck, &mut r, version)?),
        PacketType::PubRec => Packet::PubRec(puback(PacketType::PubRec, &mut r, version)?),
        PacketType::PubRel => Packet::PubRel(puback(PacketType::PubRel, &mut r, version)?),
        PacketType::PubComp => Packet::PubComp(puback(PacketType::PubComp, &mut r, version)?),
        PacketType::Subscribe => Packet::Subscribe(subscribe(&mut r, version)?),
        PacketType::SubAck => Packet::SubAck(suback(&mut r, version)?),
        PacketType::Unsubscribe => Packet::Unsubscribe(unsubscribe(&mut r, version)?),
        PacketType::UnsubAck => Packet::UnsubAck(unsuback(&mut r, version)?),
        PacketType::PingReq => Packet::PingReq,
        PacketType::PingResp => Packet::PingResp,
        PacketType::Disconnect => {
            let (code, properties) = code_and_properties(PacketType::Disconnect, &mut r, version)?;
            Packet::Disconnect(Disconnect { code, properties })
        }
        PacketType::Auth => {
            let (code, properties) = code_and_properties(PacketType::Auth, &mut r, version)?;
            Packet::Auth(Box::new(Auth { code, properties }))
        }
    };
    r.finish()?;
    Ok(Some(packet))
}

/// Validates the first byte of the fixed header: a known type, and the
/// flags the specification fixes for it (MQTT 5.0 section 2.1.3).
fn packet_type(first: u8, version: ProtocolVersion) -> Result<PacketType, DecodeError> {
    use PacketType as P;
    let flags = first & 0x0F;
    let t = match first >> 4 {
        1 => P::Connect,
        2 => P::ConnAck,
        3 => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(DecodeError::Malformed("PUBLISH with QoS 3"));
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(DecodeError::Malformed("QoS 0 PUBLISH with DUP set"));
            }
            return Ok(P::Publish);
        }
        4 => P::PubAck,
        5 => P::PubRec,
        6 => P::PubRel,
        7 => P::PubComp,
        8 => P::Subscribe,
        9 => P::SubAck,
        10 => P::Unsubscribe,
        11 => P::UnsubAck,
        12 => P::PingReq,
        13 => P::PingResp,
        14 => P::Disconnect,
        15 if version.is_v5() => P::Auth,
        15 => {
            return Err(DecodeError::Malformed(
                "packet type 15 (AUTH) is MQTT 5 only",
            ))
        }
        _ => return Err(DecodeError::Malformed("packet type 0 is reserved")),
    };
    let expected = match t {
        P::PubRel | P::Subscribe | P::Unsubscribe => 0b0010,
        _ => 0,
    };
    // MQTT 3.1 let a client set DUP when it resent PUBREL, SUBSCRIBE or
    // UNSUBSCRIBE (3.1 section 2.1); 3.1.1 fixed those flags to 0b0010.
    let v31_dup = version == ProtocolVersion::V31 && expected != 0 && flags == expected | 0b1000;
    if flags != expected && !v31_dup {
        return Err(DecodeError::Malformed("invalid fixed header flags"));
    }
    Ok(t)
}

fn properties<P: PropertySet>(r: &mut Reader, version: ProtocolVersion) -> Result<P, DecodeError> {
    if version.is_v5() {
        decode_properties(r)
    } else {
        Ok(P::default())
    }
}

/// A PUBLISH's properties, boxed, or `None` when there are none: in 3.x,
/// and in 5.0 when their length is 0 (a single byte, read without making
/// an empty set to compare).
fn publish_properties(
    r: &mut Reader,
    version: ProtocolVersion,
) -> Result<Option<Box<crate::properties::PublishProperties>>, DecodeError> {
    if !version.is_v5() {
        return Ok(None);
    }
    if r.peek_u8() == Some(0) {
        r.u8()?;
        return Ok(None);
    }
    let properties: crate::properties::PublishProperties = decode_properties(r)?;
    Ok((!properties.is_empty()).then(|| Box::new(properties)))
}

fn packet_id(r: &mut Reader) -> Result<u16, DecodeError> {
    match r.u16()? {
        0 => Err(DecodeError::Protocol("packet identifier 0")),
        id => Ok(id),
    }
}

fn reason_code(packet: PacketType, byte: u8) -> Result<ReasonCode, DecodeError> {
    ReasonCode::from_u8(byte)
        .filter(|c| c.is_valid_for(packet))
        .ok_or(DecodeError::Malformed(
            "invalid reason code for this packet",
        ))
}

/// A topic name (PUBLISH or will): no wildcards. Emptiness is checked by the
/// caller, since MQTT 5 allows an empty PUBLISH topic with a topic alias.
fn check_topic_name(topic: &[u8]) -> Result<(), DecodeError> {
    if topic.iter().any(|&b| b == b'+' || b == b'#') {
        return Err(DecodeError::TopicNameInvalid("wildcard in a topic name"));
    }
    Ok(())
}

fn connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.binary()?;
    let level = r.u8()?;
    let protocol = match (&name[..], level) {
        (b"MQTT", 4) => ProtocolVersion::V311,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQIsdp", 3) => ProtocolVersion::V31,
        _ => {
            return Err(DecodeError::UnsupportedProtocolVersion {
                name: String::from_utf8_lossy(&name[..name.len().min(64)]).into_owned(),
                level,
            })
        }
    };
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("reserved CONNECT flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed(
            "will QoS or retain set without a will",
        ));
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::Malformed("will QoS 3"))?;
    if password_flag && !username_flag && !protocol.is_v5() {
        return Err(DecodeError::Protocol("password without user name"));
    }
    let keep_alive = r.u16()?;
    let connect_props = properties(r, protocol)?;
    let client_id = r.string()?;
    let will = if will_flag {
        let properties = properties(r, protocol)?;
        let topic = r.string()?;
        check_topic_name(&topic)?;
        if topic.is_empty() {
            return Err(DecodeError::TopicNameInvalid("empty will topic"));
        }
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.string()?)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties: connect_props,
    })
}

fn connack(r: &mut Reader, version: ProtocolVersion) -> Result<ConnAck, DecodeError> {
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(DecodeError::Malformed("reserved CONNACK flag set"));
    }
    let byte = r.u8()?;
    let code = if version.is_v5() {
        reason_code(PacketType::ConnAck, byte)?
    } else {
        ReasonCode::from_connack_v3(byte)
            .ok_or(DecodeError::Malformed("invalid CONNACK return code"))?
    };
    Ok(ConnAck {
        session_present: flags & 0x01 != 0,
        code,
        properties: properties(r, version)?,
    })
}

fn publish(flags: u8, r: &mut Reader, version: ProtocolVersion) -> Result<Publish, DecodeError> {
    // QoS 3 and QoS 0 with DUP were refused by `packet_type`.
    let qos =
        QoS::from_u8((flags >> 1) & 0b11).ok_or(DecodeError::Malformed("PUBLISH with QoS 3"))?;
    let topic = r.string()?;
    check_topic_name(&topic)?;
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(packet_id(r)?)
    };
    let properties = publish_properties(r, version)?;
    if topic.is_empty() {
        if !version.is_v5() {
            return Err(DecodeError::TopicNameInvalid("empty topic name"));
        }
        if properties.as_ref().is_none_or(|p| p.topic_alias.is_none()) {
            return Err(DecodeError::Protocol(
                "empty topic name without a topic alias",
            ));
        }
    }
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        packet_id,
        properties,
        payload: r.rest(),
    })
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP. In MQTT 5 the reason code and the
/// properties may be omitted (remaining length 2: Success, no properties;
/// 3: no properties).
fn puback(
    packet: PacketType,
    r: &mut Reader,
    version: ProtocolVersion,
) -> Result<PubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    let mut ack = PubAck::new(packet_id);
    if version.is_v5() && !r.is_empty() {
        ack.code = reason_code(packet, r.u8()?)?;
        if !r.is_empty() {
            ack.properties = decode_properties(r)?;
        }
    }
    Ok(ack)
}

/// DISCONNECT and AUTH bodies. In MQTT 5 an empty body means Success and no
/// properties, a single byte a reason code and no properties. In 3.x
/// DISCONNECT has no body (AUTH does not exist).
fn code_and_properties<P: PropertySet>(
    packet: PacketType,
    r: &mut Reader,
    version: ProtocolVersion,
) -> Result<(ReasonCode, P), DecodeError> {
    if !version.is_v5() || r.is_empty() {
        return Ok((ReasonCode::Success, P::default()));
    }
    let code = reason_code(packet, r.u8()?)?;
    let props = if r.is_empty() {
        P::default()
    } else {
        decode_properties(r)?
    };
    Ok((code, props))
}

/// A topic filter: a non-empty UTF-8 string (wildcard placement is the
/// broker's business, answered in SUBACK).
fn filter(r: &mut Reader) -> Result<bytes::Bytes, DecodeError> {
    let f = r.string()?;
    if f.is_empty() {
        return Err(DecodeError::Malformed("empty topic filter"));
    }
    Ok(f)
}

fn subscribe(r: &mut Reader, version: ProtocolVersion) -> Result<Subscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = properties(r, version)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = filter(r)?;
        let options = r.u8()?;
        let reserved = if version.is_v5() { 0xC0 } else { 0xFC };
        if options & reserved != 0 {
            return Err(DecodeError::Malformed(
                "reserved subscription option bits set",
            ));
        }
        let qos =
            QoS::from_u8(options & 0b11).ok_or(DecodeError::Malformed("subscription QoS 3"))?;
        let retain_handling = match (options >> 4) & 0b11 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            // MQTT 5 3.8.3.1 names it a Protocol Error, unlike QoS 3.
            _ => return Err(DecodeError::Protocol("retain handling 3")),
        };
        filters.push(SubscribeFilter {
            filter,
            qos,
            no_local: options & 0b0100 != 0,
            retain_as_published: options & 0b1000 != 0,
            retain_handling,
        });
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("SUBSCRIBE without a topic filter"));
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

fn suback(r: &mut Reader, version: ProtocolVersion) -> Result<SubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = properties(r, version)?;
    let mut codes = Vec::new();
    while !r.is_empty() {
        let byte = r.u8()?;
        let code = if version.is_v5() {
            reason_code(PacketType::SubAck, byte)?
        } else {
            match byte {
                0x00..=0x02 | 0x80 => ReasonCode::from_u8(byte).unwrap_or_default(),
                _ => return Err(DecodeError::Malformed("invalid SUBACK return code")),
            }
        };
        codes.push(code);
    }
    if codes.is_empty() {
        return Err(DecodeError::Protocol("SUBACK without a return code"));
    }
    Ok(SubAck {
        packet_id,
        codes,
        properties,
    })
}

fn unsubscribe(r: &mut Reader, version: ProtocolVersion) -> Result<Unsubscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = properties(r, version)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(filter(r)?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("UNSUBSCRIBE without a topic filter"));
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

fn unsuback(r: &mut Reader, version: ProtocolVersion) -> Result<UnsubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = properties(r, version)?;
    let mut codes = Vec::new();
    if version.is_v5() {
        while !r.is_empty() {
            codes.push(reason_code(PacketType::UnsubAck, r.u8()?)?);
        }
        if codes.is_empty() {
            return Err(DecodeError::Protocol("UNSUBACK without a reason code"));
        }
    }
    Ok(UnsubAck {
        packet_id,
        codes,
        properties,
    })
}
