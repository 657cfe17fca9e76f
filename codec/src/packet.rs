//! The MQTT control packets as Rust values.
//!
//! One type per packet, shared by MQTT 3.1, 3.1.1 and 5.0. Fields that only
//! exist in MQTT 5 (reason codes, properties) are present on every packet and
//! simply stay at their defaults for 3.x; the encoder omits them for 3.x.
//!
//! Byte fields that come from the wire (topic, payload, binary properties) are
//! [`Bytes`], so a decoded packet shares the connection's read buffer instead
//! of copying it. `topic` is guaranteed valid UTF-8 by the decoder.

use bytes::Bytes;

use crate::properties::{
    AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties, PubAckProperties,
    PublishProperties, SubAckProperties, SubscribeProperties, UnsubAckProperties,
    UnsubscribeProperties, WillProperties,
};
use crate::reason::ReasonCode;

/// The protocol level negotiated by CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolVersion {
    /// MQTT 3.1: protocol name `MQIsdp`, level 3.
    V31,
    /// MQTT 3.1.1: protocol name `MQTT`, level 4.
    V311,
    /// MQTT 5.0: protocol name `MQTT`, level 5.
    V5,
}

impl ProtocolVersion {
    /// True for MQTT 5.0.
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }

    /// The protocol level byte on the wire (3, 4 or 5).
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V31 => 3,
            ProtocolVersion::V311 => 4,
            ProtocolVersion::V5 => 5,
        }
    }
}

/// Quality of service of a PUBLISH or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum QoS {
    /// At most once.
    #[default]
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// Parses the two QoS bits; 3 is not a QoS.
    pub fn from_u8(value: u8) -> Option<QoS> {
        match value {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// The fifteen MQTT control packet types, by their 4-bit type code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
    Auth = 15,
}

/// A decoded (or to-be-encoded) MQTT control packet.
///
/// A packet moves by value from the decoder through a broker's handling,
/// and every move copies the whole enum: the rare packets with large
/// property sets (CONNECT, CONNACK, AUTH) are boxed so that it is the size
/// of a PUBLISH without properties, not of the largest (264 bytes before).
#[derive(Debug, Clone, PartialEq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(Box<ConnAck>),
    Publish(Publish),
    PubAck(PubAck),
    PubRec(PubAck),
    PubRel(PubAck),
    PubComp(PubAck),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Box<Auth>),
}

impl Packet {
    /// The packet's type code.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }
}

/// CONNECT: the first packet a client sends.
#[derive(Debug, Clone, PartialEq)]
pub struct Connect {
    pub protocol: ProtocolVersion,
    /// Clean session (3.x) / clean start (5.0).
    pub clean_start: bool,
    /// Keep alive in seconds; 0 disables it.
    pub keep_alive: u16,
    /// May be empty (the server then assigns one, if allowed).
    pub client_id: Bytes,
    pub will: Option<Will>,
    pub username: Option<Bytes>,
    /// Binary data: MQTT 5 allows any bytes here.
    pub password: Option<Bytes>,
    pub properties: ConnectProperties,
}

impl Connect {
    /// The client identifier as text (the decoder has checked it is UTF-8).
    pub fn client_id_str(&self) -> &str {
        std::str::from_utf8(&self.client_id).unwrap_or("")
    }
}

/// The will message carried in CONNECT.
#[derive(Debug, Clone, PartialEq)]
pub struct Will {
    /// Valid UTF-8 topic name without wildcards.
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: WillProperties,
}

impl Will {
    /// The same will with bytes of its own. A decoded will shares the buffer
    /// its CONNECT was read into; a broker keeps it for the connection's
    /// whole life, and a few bytes of topic and payload must not hold a
    /// whole read buffer (kilobytes, per client) with them.
    pub fn into_owned(self) -> Will {
        let own = |b: Bytes| Bytes::copy_from_slice(&b);
        let p = self.properties;
        Will {
            topic: own(self.topic),
            payload: own(self.payload),
            qos: self.qos,
            retain: self.retain,
            properties: WillProperties {
                content_type: p.content_type.map(own),
                response_topic: p.response_topic.map(own),
                correlation_data: p.correlation_data.map(own),
                user_properties: crate::properties::owned_pairs(&p.user_properties),
                ..p
            },
        }
    }
}

/// CONNACK.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConnAck {
    pub session_present: bool,
    /// For 3.x only the codes that map to a 3.x return code are encodable:
    /// Success (0), UnsupportedProtocolVersion (1), ClientIdentifierNotValid (2),
    /// ServerUnavailable (3), BadUserNameOrPassword (4), NotAuthorized (5); any
    /// other code is encoded as the closest 3.x return code.
    pub code: ReasonCode,
    pub properties: ConnAckProperties,
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Valid UTF-8, no wildcards. May be empty in MQTT 5 when a topic alias is set.
    pub topic: Bytes,
    /// Present iff qos > 0; never 0.
    pub packet_id: Option<u16>,
    /// MQTT 5 properties, `None` when there are none (every 3.x PUBLISH,
    /// most 5.0 ones); read them through [`properties`](Self::properties).
    /// Boxed: inline they were 160 of the packet's 232 bytes, copied at
    /// every move of every PUBLISH a broker reads.
    pub properties: Option<Box<PublishProperties>>,
    pub payload: Bytes,
}

impl Publish {
    /// The topic as text (the decoder has checked it is UTF-8).
    pub fn topic_str(&self) -> &str {
        std::str::from_utf8(&self.topic).unwrap_or("")
    }

    /// Its properties ([`PublishProperties::NONE`] when it has none).
    pub fn properties(&self) -> &PublishProperties {
        static NONE: PublishProperties = PublishProperties::NONE;
        self.properties.as_deref().unwrap_or(&NONE)
    }

    /// Its properties to change; empty ones are made if it had none (and
    /// the packet then compares unequal to one with `None`, though both
    /// encode alike: equality is structural, and the decoder gives `None`).
    pub fn properties_mut(&mut self) -> &mut PublishProperties {
        self.properties.get_or_insert_with(Default::default)
    }

    /// Sets its properties: `None` when `properties` is empty.
    pub fn set_properties(&mut self, properties: PublishProperties) {
        self.properties = (!properties.is_empty()).then(|| Box::new(properties));
    }
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share this shape.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PubAck {
    pub packet_id: u16,
    /// Success unless stated otherwise (MQTT 5 only).
    pub code: ReasonCode,
    pub properties: PubAckProperties,
}

impl PubAck {
    /// A success acknowledgement with no properties.
    pub fn new(packet_id: u16) -> PubAck {
        PubAck {
            packet_id,
            ..PubAck::default()
        }
    }
}

/// Retain handling option of a subscription (MQTT 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetainHandling {
    /// Send retained messages at the time of the subscribe.
    #[default]
    SendAtSubscribe = 0,
    /// Send retained messages only if the subscription did not exist.
    SendIfNew = 1,
    /// Never send retained messages on subscribe.
    DoNotSend = 2,
}

/// One topic filter of a SUBSCRIBE with its options.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeFilter {
    /// Valid UTF-8, non-empty; wildcard placement is NOT checked by the codec
    /// (an invalid filter is refused in SUBACK by the broker, not a decode error).
    pub filter: Bytes,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl SubscribeFilter {
    /// The filter as text (the decoder has checked it is UTF-8).
    pub fn filter_str(&self) -> &str {
        std::str::from_utf8(&self.filter).unwrap_or("")
    }
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscribe {
    pub packet_id: u16,
    /// At least one.
    pub filters: Vec<SubscribeFilter>,
    pub properties: SubscribeProperties,
}

/// SUBACK: one reason code per filter, in order. For 3.x the codes are
/// GrantedQoS0/1/2 or a failure (encoded as 0x80).
#[derive(Debug, Clone, PartialEq)]
pub struct SubAck {
    pub packet_id: u16,
    pub codes: Vec<ReasonCode>,
    pub properties: SubAckProperties,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    /// At least one; valid UTF-8.
    pub filters: Vec<Bytes>,
    pub properties: UnsubscribeProperties,
}

/// UNSUBACK. `codes` is empty for 3.x (which has no payload).
#[derive(Debug, Clone, PartialEq)]
pub struct UnsubAck {
    pub packet_id: u16,
    pub codes: Vec<ReasonCode>,
    pub properties: UnsubAckProperties,
}

/// DISCONNECT (3.x has no variable header: only `code == Success` with no
/// properties is meaningful there).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Disconnect {
    pub code: ReasonCode,
    pub properties: DisconnectProperties,
}

impl Disconnect {
    /// A DISCONNECT with this reason code and no properties.
    pub fn new(code: ReasonCode) -> Disconnect {
        Disconnect {
            code,
            properties: DisconnectProperties::default(),
        }
    }
}

/// AUTH (MQTT 5 only).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Auth {
    pub code: ReasonCode,
    pub properties: AuthProperties,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owned_will_shares_nothing_with_the_buffer_it_was_decoded_from() {
        let buffer = Bytes::from(vec![b'x'; 4096]);
        let will = Will {
            topic: buffer.slice(0..5),
            payload: buffer.slice(5..9),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: WillProperties {
                will_delay_interval: Some(7),
                content_type: Some(buffer.slice(9..12)),
                user_properties: vec![(buffer.slice(12..13), buffer.slice(13..14))],
                ..WillProperties::default()
            },
        };
        let owned = will.clone().into_owned();
        assert_eq!(owned, will);
        let range = buffer.as_ptr_range();
        let outside = |b: &Bytes| !range.contains(&b.as_ptr());
        assert!(outside(&owned.topic) && outside(&owned.payload));
        assert!(outside(owned.properties.content_type.as_ref().unwrap()));
        let (k, v) = &owned.properties.user_properties[0];
        assert!(outside(k) && outside(v));
    }
}
