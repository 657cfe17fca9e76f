//! MQTT 5 properties, one struct per packet type, holding exactly the
//! properties the specification (section 2.2.2.2) allows in that packet.
//!
//! The decoder refuses a property that is not allowed in the packet, or that
//! appears twice when it may appear only once (User Property and, in PUBLISH,
//! Subscription Identifier may repeat). Strings are kept as [`Bytes`] slices of
//! the read buffer, checked to be valid UTF-8 without U+0000. For MQTT 3.x
//! every struct stays at its default and nothing is encoded.

use bytes::Bytes;

/// A User Property: a UTF-8 string pair. Order and duplicates are preserved.
pub type UserProperty = (Bytes, Bytes);

/// Property identifiers (section 2.2.2.2).
pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// CONNECT properties.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConnectProperties {
    pub session_expiry_interval: Option<u32>,
    /// Never 0 (decode error).
    pub receive_maximum: Option<u16>,
    /// Never 0 (decode error).
    pub maximum_packet_size: Option<u32>,
    pub topic_alias_maximum: Option<u16>,
    /// 0 or 1.
    pub request_response_information: Option<u8>,
    /// 0 or 1.
    pub request_problem_information: Option<u8>,
    pub user_properties: Vec<UserProperty>,
    pub authentication_method: Option<Bytes>,
    pub authentication_data: Option<Bytes>,
}

/// Will properties (in the CONNECT payload).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WillProperties {
    pub will_delay_interval: Option<u32>,
    /// 0 or 1.
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<Bytes>,
    pub response_topic: Option<Bytes>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<UserProperty>,
}

/// CONNACK properties.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConnAckProperties {
    pub session_expiry_interval: Option<u32>,
    pub receive_maximum: Option<u16>,
    /// 0 or 1.
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub maximum_packet_size: Option<u32>,
    pub assigned_client_identifier: Option<Bytes>,
    pub topic_alias_maximum: Option<u16>,
    pub reason_string: Option<Bytes>,
    pub user_properties: Vec<UserProperty>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifiers_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
    pub server_keep_alive: Option<u16>,
    pub response_information: Option<Bytes>,
    pub server_reference: Option<Bytes>,
    pub authentication_method: Option<Bytes>,
    pub authentication_data: Option<Bytes>,
}

/// PUBLISH properties.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PublishProperties {
    /// 0 or 1.
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    /// Never 0 (decode error).
    pub topic_alias: Option<u16>,
    pub response_topic: Option<Bytes>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<UserProperty>,
    /// Server to client only: one per matching subscription, never 0. A client
    /// must not send one (the decoder accepts it; the broker refuses it as a
    /// protocol error).
    pub subscription_identifiers: Vec<u32>,
    pub content_type: Option<Bytes>,
}

impl PublishProperties {
    /// No property set: what a PUBLISH without properties reads as (see
    /// [`Publish::properties`](crate::Publish::properties)).
    pub const NONE: PublishProperties = PublishProperties {
        payload_format_indicator: None,
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
        subscription_identifiers: Vec::new(),
        content_type: None,
    };

    /// True when no property is set (the common case: encodes as one 0 byte).
    pub fn is_empty(&self) -> bool {
        *self == PublishProperties::NONE
    }

    /// A copy with bytes of its own, sharing nothing with the buffer the
    /// properties were decoded from (see [`crate::Will::into_owned`]).
    pub fn owned_copy(&self) -> PublishProperties {
        PublishProperties {
            response_topic: self.response_topic.as_deref().map(Bytes::copy_from_slice),
            correlation_data: self.correlation_data.as_deref().map(Bytes::copy_from_slice),
            user_properties: owned_pairs(&self.user_properties),
            subscription_identifiers: self.subscription_identifiers.clone(),
            content_type: self.content_type.as_deref().map(Bytes::copy_from_slice),
            ..*self
        }
    }
}

/// Copies of user properties that share nothing with their buffer: their
/// bytes copied into one allocation, each pair a slice of it (one allocation
/// for the lot, not two per pair).
pub(crate) fn owned_pairs(pairs: &[UserProperty]) -> Vec<UserProperty> {
    let total: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
    let mut all = bytes::BytesMut::with_capacity(total);
    for (k, v) in pairs {
        all.extend_from_slice(k);
        all.extend_from_slice(v);
    }
    let all = all.freeze();
    let mut at = 0;
    pairs
        .iter()
        .map(|(k, v)| {
            let key = all.slice(at..at + k.len());
            let value = all.slice(at + k.len()..at + k.len() + v.len());
            at += k.len() + v.len();
            (key, value)
        })
        .collect()
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP properties.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PubAckProperties {
    pub reason_string: Option<Bytes>,
    pub user_properties: Vec<UserProperty>,
}

/// SUBSCRIBE properties.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SubscribeProperties {
    /// 1..=268,435,455 (0 is a decode error).
    pub subscription_identifier: Option<u32>,
    pub user_properties: Vec<UserProperty>,
}

/// SUBACK properties.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SubAckProperties {
    pub reason_string: Option<Bytes>,
    pub user_properties: Vec<UserProperty>,
}

/// UNSUBSCRIBE properties.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UnsubscribeProperties {
    pub user_properties: Vec<UserProperty>,
}

/// UNSUBACK properties.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UnsubAckProperties {
    pub reason_string: Option<Bytes>,
    pub user_properties: Vec<UserProperty>,
}

/// DISCONNECT properties.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DisconnectProperties {
    pub session_expiry_interval: Option<u32>,
    pub reason_string: Option<Bytes>,
    pub user_properties: Vec<UserProperty>,
    pub server_reference: Option<Bytes>,
}

/// AUTH properties.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AuthProperties {
    pub authentication_method: Option<Bytes>,
    pub authentication_data: Option<Bytes>,
    pub reason_string: Option<Bytes>,
    pub user_properties: Vec<UserProperty>,
}
