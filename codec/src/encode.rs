//! Encoding: from [`Packet`] values to bytes appended to a write buffer.
//!
//! Every packet body is written by one function generic over
//! [`Sink`](crate::primitives::Sink). Encoding runs it twice: once into a
//! byte counter, which yields the Remaining Length (and validates everything,
//! so an error leaves `out` untouched), then into the buffer after the fixed
//! header. [`encoded_len`] is the first pass alone.
//!
//! PUBLISH payloads can be large and are shared between many subscribers, so
//! [`encode_publish_header`] writes everything *but* the payload; the caller
//! sends the header and `publish.payload` with a vectored write, and the
//! payload bytes are never copied.
//!
//! Version rules: MQTT 3.x has no properties and few reason codes, so for 3.x
//! properties are omitted, acknowledgements carry only the packet id,
//! DISCONNECT is `E0 00`, CONNACK uses the closest 3.x return code and SUBACK
//! failure codes become 0x80. In MQTT 5 the short forms the specification
//! allows are used (a Success acknowledgement without properties has no
//! reason code or property length). CONNECT is always encoded in its own
//! `protocol` version. AUTH cannot be encoded for 3.x.

use bytes::BytesMut;

use crate::error::EncodeError;
use crate::packet::*;
use crate::primitives::{measure, put_binary, put_varint, varint_len, Sink, VARINT_MAX};
use crate::properties::PublishProperties;
use crate::property_codec::{encode_properties, is_empty, PropertySet};
use crate::reason::ReasonCode;

/// Appends the encoded packet to `out`. For 3.x, properties and reason codes
/// that have no 3.x form are omitted (PUBACK etc. are just the packet id;
/// DISCONNECT is E0 00; SUBACK codes >= 0x80 become 0x80; CONNACK uses
/// `connack_v3`). In v5, acks with Success and no properties use the short
/// forms the spec allows. CONNECT is encoded in `connect.protocol`, whatever
/// `version` says. On error nothing is appended.
pub fn encode_packet(
    packet: &Packet,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let body_len = measure(|c| body(packet, version, c))?;
    let remaining = remaining_length(body_len)?;
    out.reserve(1 + varint_len(remaining as u32) + body_len);
    out.put_u8(first_byte(packet));
    put_varint(out, remaining, "remaining length")?;
    body(packet, version, out)
}

/// Appends everything of a PUBLISH except its payload: fixed header (whose
/// remaining length includes `payload.len()`), topic, packet id, properties
/// (v5). The caller then writes `publish.payload` after it (vectored write),
/// so the payload is never copied. On error nothing is appended.
pub fn encode_publish_header(
    publish: &Publish,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    encode_publish_header_of(&PublishHeader::of(publish), version, out)
}

/// What the header of a PUBLISH is made of, borrowed: a caller that holds
/// a message's topic, properties and payload length elsewhere encodes its
/// header without building a [`Publish`] (whose `Bytes` it would have to
/// clone, and drop again).
#[derive(Debug, Clone, Copy)]
pub struct PublishHeader<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: &'a [u8],
    pub packet_id: Option<u16>,
    pub properties: &'a PublishProperties,
    pub payload_len: usize,
}

impl<'a> PublishHeader<'a> {
    /// The header of `publish`.
    pub fn of(publish: &'a Publish) -> PublishHeader<'a> {
        PublishHeader {
            dup: publish.dup,
            qos: publish.qos,
            retain: publish.retain,
            topic: &publish.topic,
            packet_id: publish.packet_id,
            properties: publish.properties(),
            payload_len: publish.payload.len(),
        }
    }
}

/// [`encode_publish_header`] from borrowed parts.
pub fn encode_publish_header_of(
    header: &PublishHeader<'_>,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let header_len = measure(|c| publish_header(header, version, c))?;
    let remaining = remaining_length(header_len + header.payload_len)?;
    out.reserve(1 + varint_len(remaining as u32) + header_len);
    out.put_u8(publish_first_byte(header.dup, header.qos, header.retain));
    put_varint(out, remaining, "remaining length")?;
    publish_header(header, version, out)
}

/// Size in bytes of the whole encoded packet (fixed header, body and
/// payload), e.g. to respect a client's Maximum Packet Size before encoding.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    let body_len = measure(|c| body(packet, version, c))?;
    let remaining = remaining_length(body_len)?;
    Ok(1 + varint_len(remaining as u32) + remaining)
}

pub(crate) fn remaining_length(len: usize) -> Result<usize, EncodeError> {
    if len > VARINT_MAX as usize {
        return Err(EncodeError::PacketTooLarge {
            size: len.saturating_add(5),
        });
    }
    Ok(len)
}

pub(crate) fn publish_first_byte(dup: bool, qos: QoS, retain: bool) -> u8 {
    // DUP is meaningless for QoS 0 and must then be 0 (MQTT-3.3.1-2).
    let dup = dup && qos != QoS::AtMostOnce;
    0x30 | (u8::from(dup) << 3) | ((qos as u8) << 1) | u8::from(retain)
}

fn first_byte(packet: &Packet) -> u8 {
    match packet {
        Packet::Publish(p) => publish_first_byte(p.dup, p.qos, p.retain),
        Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => {
            ((packet.packet_type() as u8) << 4) | 0b0010
        }
        _ => (packet.packet_type() as u8) << 4,
    }
}

fn body<W: Sink>(packet: &Packet, version: ProtocolVersion, w: &mut W) -> Result<(), EncodeError> {
    match packet {
        Packet::Connect(c) => connect(c, w),
        Packet::ConnAck(c) => connack(c, version, w),
        Packet::Publish(p) => {
            publish_header(&PublishHeader::of(p), version, w)?;
            w.put_slice(&p.payload);
            Ok(())
        }
        Packet::PubAck(a) => puback(PacketType::PubAck, a, version, w),
        Packet::PubRec(a) => puback(PacketType::PubRec, a, version, w),
        Packet::PubRel(a) => puback(PacketType::PubRel, a, version, w),
        Packet::PubComp(a) => puback(PacketType::PubComp, a, version, w),
        Packet::Subscribe(s) => subscribe(s, version, w),
        Packet::SubAck(s) => suback(s, version, w),
        Packet::Unsubscribe(u) => unsubscribe(u, version, w),
        Packet::UnsubAck(u) => unsuback(u, version, w),
        Packet::PingReq | Packet::PingResp => Ok(()),
        Packet::Disconnect(d) => {
            if version.is_v5() {
                short_code_and_properties(PacketType::Disconnect, d.code, &d.properties, w)?;
            }
            Ok(())
        }
        Packet::Auth(a) => {
            if !version.is_v5() {
                return Err(EncodeError::NotAllowed("AUTH in MQTT 3.x"));
            }
            if a.code == ReasonCode::Success && is_empty(&a.properties) {
                return Ok(());
            }
            check_code(PacketType::Auth, a.code)?;
            w.put_u8(a.code.as_u8());
            encode_properties(w, &a.properties)
        }
    }
}

fn check_code(packet: PacketType, code: ReasonCode) -> Result<(), EncodeError> {
    if code.is_valid_for(packet) {
        Ok(())
    } else {
        Err(EncodeError::ReasonCodeNotAllowed { packet, code })
    }
}

pub(crate) fn packet_id<W: Sink>(id: u16, w: &mut W) -> Result<(), EncodeError> {
    if id == 0 {
        return Err(EncodeError::NotAllowed("packet identifier 0"));
    }
    w.put_u16(id);
    Ok(())
}

fn properties<W: Sink, P: PropertySet>(
    props: &P,
    version: ProtocolVersion,
    w: &mut W,
) -> Result<(), EncodeError> {
    if version.is_v5() {
        encode_properties(w, props)?;
    }
    Ok(())
}

/// MQTT 5 reason code and properties, each omitted when it can be: nothing
/// for Success without properties, the code alone without properties.
fn short_code_and_properties<W: Sink, P: PropertySet>(
    packet: PacketType,
    code: ReasonCode,
    props: &P,
    w: &mut W,
) -> Result<(), EncodeError> {
    check_code(packet, code)?;
    let no_props = is_empty(props);
    if code == ReasonCode::Success && no_props {
        return Ok(());
    }
    w.put_u8(code.as_u8());
    if !no_props {
        encode_properties(w, props)?;
    }
    Ok(())
}

fn connect<W: Sink>(c: &Connect, w: &mut W) -> Result<(), EncodeError> {
    let version = c.protocol;
    let name: &[u8] = match version {
        ProtocolVersion::V31 => b"MQIsdp",
        ProtocolVersion::V311 | ProtocolVersion::V5 => b"MQTT",
    };
    put_binary(w, name, "protocol name")?;
    w.put_u8(version.level());
    if c.password.is_some() && c.username.is_none() && !version.is_v5() {
        return Err(EncodeError::NotAllowed(
            "password without user name in MQTT 3.x",
        ));
    }
    let mut flags = 0u8;
    if c.clean_start {
        flags |= 0x02;
    }
    if let Some(will) = &c.will {
        flags |= 0x04 | ((will.qos as u8) << 3);
        if will.retain {
            flags |= 0x20;
        }
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    w.put_u8(flags);
    w.put_u16(c.keep_alive);
    properties(&c.properties, version, w)?;
    put_binary(w, &c.client_id, "client identifier")?;
    if let Some(will) = &c.will {
        properties(&will.properties, version, w)?;
        put_binary(w, &will.topic, "will topic")?;
        put_binary(w, &will.payload, "will payload")?;
    }
    if let Some(username) = &c.username {
        put_binary(w, username, "user name")?;
    }
    if let Some(password) = &c.password {
        put_binary(w, password, "password")?;
    }
    Ok(())
}

fn connack<W: Sink>(c: &ConnAck, version: ProtocolVersion, w: &mut W) -> Result<(), EncodeError> {
    w.put_u8(u8::from(c.session_present));
    if version.is_v5() {
        check_code(PacketType::ConnAck, c.code)?;
        w.put_u8(c.code.as_u8());
        encode_properties(w, &c.properties)
    } else {
        w.put_u8(c.code.connack_v3());
        Ok(())
    }
}

fn publish_header<W: Sink>(
    p: &PublishHeader<'_>,
    version: ProtocolVersion,
    w: &mut W,
) -> Result<(), EncodeError> {
    if p.topic.is_empty() && (!version.is_v5() || p.properties.topic_alias.is_none()) {
        return Err(EncodeError::NotAllowed(
            "empty topic name without a topic alias",
        ));
    }
    put_binary(w, p.topic, "topic name")?;
    if p.qos != QoS::AtMostOnce {
        let id = p.packet_id.ok_or(EncodeError::NotAllowed(
            "QoS 1 or 2 PUBLISH without a packet identifier",
        ))?;
        packet_id(id, w)?;
    }
    properties(p.properties, version, w)
}

fn puback<W: Sink>(
    packet: PacketType,
    a: &PubAck,
    version: ProtocolVersion,
    w: &mut W,
) -> Result<(), EncodeError> {
    packet_id(a.packet_id, w)?;
    if version.is_v5() {
        short_code_and_properties(packet, a.code, &a.properties, w)?;
    }
    Ok(())
}

fn subscribe<W: Sink>(
    s: &Subscribe,
    version: ProtocolVersion,
    w: &mut W,
) -> Result<(), EncodeError> {
    packet_id(s.packet_id, w)?;
    properties(&s.properties, version, w)?;
    if s.filters.is_empty() {
        return Err(EncodeError::NotAllowed("SUBSCRIBE without a topic filter"));
    }
    for f in &s.filters {
        put_binary(w, &f.filter, "topic filter")?;
        let mut options = f.qos as u8;
        if version.is_v5() {
            options |= (u8::from(f.no_local) << 2)
                | (u8::from(f.retain_as_published) << 3)
                | ((f.retain_handling as u8) << 4);
        }
        w.put_u8(options);
    }
    Ok(())
}

fn suback<W: Sink>(s: &SubAck, version: ProtocolVersion, w: &mut W) -> Result<(), EncodeError> {
    packet_id(s.packet_id, w)?;
    properties(&s.properties, version, w)?;
    for &code in &s.codes {
        if version.is_v5() {
            check_code(PacketType::SubAck, code)?;
            w.put_u8(code.as_u8());
        } else {
            w.put_u8(match code {
                ReasonCode::Success | ReasonCode::GrantedQoS1 | ReasonCode::GrantedQoS2 => {
                    code.as_u8()
                }
                c if !c.is_success() => 0x80,
                code => {
                    return Err(EncodeError::ReasonCodeNotAllowed {
                        packet: PacketType::SubAck,
                        code,
                    })
                }
            });
        }
    }
    Ok(())
}

fn unsubscribe<W: Sink>(
    u: &Unsubscribe,
    version: ProtocolVersion,
    w: &mut W,
) -> Result<(), EncodeError> {
    packet_id(u.packet_id, w)?;
    properties(&u.properties, version, w)?;
    if u.filters.is_empty() {
        return Err(EncodeError::NotAllowed(
            "UNSUBSCRIBE without a topic filter",
        ));
    }
    for f in &u.filters {
        put_binary(w, f, "topic filter")?;
    }
    Ok(())
}

fn unsuback<W: Sink>(u: &UnsubAck, version: ProtocolVersion, w: &mut W) -> Result<(), EncodeError> {
    packet_id(u.packet_id, w)?;
    if version.is_v5() {
        encode_properties(w, &u.properties)?;
        for &code in &u.codes {
            check_code(PacketType::UnsubAck, code)?;
            w.put_u8(code.as_u8());
        }
    }
    Ok(())
}
