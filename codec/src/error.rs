//! The two ways the codec can fail, and what each failure means for the
//! connection.
//!
//! A [`DecodeError`] always means the connection must be closed: the byte
//! stream can no longer be trusted to be framed correctly. In MQTT 5 the broker
//! first tells the peer why, with the reason code from
//! [`DecodeError::reason_code`] (in a CONNACK if the failure is in CONNECT, in
//! a DISCONNECT otherwise); in MQTT 3.x it just closes.
//!
//! The variants follow the specification's own taxonomy (MQTT 5.0 section
//! 4.13): a *malformed packet* cannot be parsed as the spec describes it (bad
//! lengths, bad UTF-8, a reserved bit set, an unknown reason code), while a
//! *protocol error* parses fine but breaks a rule about what may be sent (a
//! duplicate property, a zero Receive Maximum, a SUBSCRIBE with no filters).
//!
//! An [`EncodeError`] means the value handed to the encoder has no valid wire
//! form in the requested version (a string over 65,535 bytes, AUTH in 3.x...).
//! Nothing is appended to the output buffer when encoding fails.

use crate::packet::PacketType;
use crate::reason::ReasonCode;

/// Why a byte stream could not be decoded into a packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The fixed header announces a packet larger than the connection allows.
    /// Detected from the fixed header alone, before the body is buffered.
    #[error("packet of {size} bytes exceeds the maximum packet size {max}")]
    PacketTooLarge { size: usize, max: usize },
    /// CONNECT with an unknown protocol name/level. The broker answers CONNACK
    /// 0x01 (3.x) / 0x84 (5.0) and then closes.
    #[error("unsupported protocol version (name {name:?}, level {level})")]
    UnsupportedProtocolVersion { name: String, level: u8 },
    /// The bytes do not follow the packet's grammar.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// The packet parses but breaks a protocol rule.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A PUBLISH (or will) topic name that is not a valid topic name.
    #[error("invalid topic name: {0}")]
    TopicNameInvalid(&'static str),
    /// A PUBLISH with Topic Alias 0 (MQTT-3.3.2-8).
    #[error("invalid topic alias: {0}")]
    TopicAliasInvalid(&'static str),
}

impl DecodeError {
    /// The MQTT 5 reason code to send (in CONNACK or DISCONNECT) before
    /// closing the connection.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            DecodeError::UnsupportedProtocolVersion { .. } => {
                ReasonCode::UnsupportedProtocolVersion
            }
            DecodeError::Malformed(_) => ReasonCode::MalformedPacket,
            DecodeError::Protocol(_) => ReasonCode::ProtocolError,
            DecodeError::TopicNameInvalid(_) => ReasonCode::TopicNameInvalid,
            DecodeError::TopicAliasInvalid(_) => ReasonCode::TopicAliasInvalid,
        }
    }
}

/// Why a packet value could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The remaining length would exceed 268,435,455 bytes, the largest value
    /// a four-byte Variable Byte Integer can hold. `size` is the whole packet.
    #[error("packet of {size} bytes is too large to encode")]
    PacketTooLarge { size: usize },
    /// A length-prefixed string or binary field is longer than 65,535 bytes.
    #[error("field too long: {0}")]
    FieldTooLong(&'static str),
    /// A numeric value outside its encodable range (e.g. a Subscription
    /// Identifier of 0 or above 268,435,455).
    #[error("value out of range: {0}")]
    ValueOutOfRange(&'static str),
    /// The packet or field cannot be expressed in this protocol version or
    /// combination (AUTH in 3.x, a QoS 1 PUBLISH without a packet id...).
    #[error("not allowed: {0}")]
    NotAllowed(&'static str),
    /// The reason code is not one the specification lists for this packet.
    #[error("reason code {code:?} is not valid in {packet:?}")]
    ReasonCodeNotAllowed {
        packet: PacketType,
        code: ReasonCode,
    },
}
