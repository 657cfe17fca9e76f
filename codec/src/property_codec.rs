//! Decoding and encoding of the MQTT 5 property structs of
//! [`crate::properties`] (MQTT 5.0 section 2.2.2).
//!
//! On the wire a property list is a Variable Byte Integer length followed by
//! that many bytes of `identifier, value` pairs. Each packet allows its own
//! set of identifiers; the table for each struct is written once below, in the
//! [`property_set!`] invocations, and both the decoder and the encoder are
//! generated from it, so they cannot drift apart.
//!
//! The decoder enforces, per the specification:
//! - an identifier not allowed in this packet is a Malformed Packet;
//! - a property given twice is a Protocol Error, except User Property (and
//!   Subscription Identifier in PUBLISH), which may repeat;
//! - out-of-range values are Protocol Errors: a 0 Receive Maximum, Maximum
//!   Packet Size, Topic Alias or Subscription Identifier, a byte property
//!   other than 0 or 1, Authentication Data without Authentication Method, a
//!   Response Topic with wildcards;
//! - strings are valid UTF-8 without U+0000; the property length matches.
//!
//! Property values are appended to `Vec`s one at a time as they are read, so
//! memory grows only with bytes actually received.

use bytes::Bytes;

use crate::error::{DecodeError, EncodeError};
use crate::primitives::{measure, put_binary, put_varint, Reader, Sink};
use crate::properties::*;

/// A struct holding the properties of one packet type.
pub(crate) trait PropertySet: Default {
    /// Reads the value of property `id` (already consumed) into `self`.
    fn decode_one(&mut self, id: u8, r: &mut Reader) -> Result<(), DecodeError>;
    /// Writes every property that is set, without the length prefix.
    fn encode_body<W: Sink>(&self, w: &mut W) -> Result<(), EncodeError>;
    /// Rules that involve more than one property.
    fn validate(&self) -> Result<(), DecodeError> {
        Ok(())
    }
}

/// Reads a property length and the properties it covers.
pub(crate) fn decode_properties<P: PropertySet>(r: &mut Reader) -> Result<P, DecodeError> {
    let len = r.varint()? as usize;
    let mut pr = Reader::new(r.take(len)?);
    let mut props = P::default();
    while !pr.is_empty() {
        let id = pr.varint()?;
        let id =
            u8::try_from(id).map_err(|_| DecodeError::Malformed("unknown property identifier"))?;
        props.decode_one(id, &mut pr)?;
    }
    props.validate()?;
    Ok(props)
}

/// Writes a property length and the properties.
pub(crate) fn encode_properties<W: Sink, P: PropertySet>(
    w: &mut W,
    props: &P,
) -> Result<(), EncodeError> {
    let len = measure(|c| props.encode_body(c))?;
    put_varint(w, len, "property length")?;
    props.encode_body(w)
}

/// A PUBLISH's properties as a self-contained property list (length, then
/// the properties), for keeping a message outside a packet (the broker's
/// durable store). [`decode_publish_properties`] reads it back.
pub fn encode_publish_properties(props: &PublishProperties) -> Result<Bytes, EncodeError> {
    let mut out = bytes::BytesMut::new();
    encode_properties(&mut out, props)?;
    Ok(out.freeze())
}

/// Reads what [`encode_publish_properties`] wrote, with the decoder's checks.
pub fn decode_publish_properties(bytes: Bytes) -> Result<PublishProperties, DecodeError> {
    decode_properties(&mut Reader::new(bytes))
}

/// A PUBLISH's properties but for the three a server sets per delivery
/// (Message Expiry Interval, Topic Alias, Subscription Identifiers), without
/// a length prefix: see [`crate::forward`].
pub(crate) fn encode_forwarded_body<W: Sink>(
    props: &PublishProperties,
    w: &mut W,
) -> Result<(), EncodeError> {
    // Named one by one, so that a property added to the struct does not
    // compile here until it is sorted into the message's or the delivery's.
    let PublishProperties {
        payload_format_indicator,
        message_expiry_interval: _,
        topic_alias: _,
        response_topic,
        correlation_data,
        user_properties,
        subscription_identifiers: _,
        content_type,
    } = props;
    kind::flag::encode(payload_format_indicator, id::PAYLOAD_FORMAT_INDICATOR, w)?;
    kind::response_topic::encode(response_topic, id::RESPONSE_TOPIC, w)?;
    kind::binary::encode(correlation_data, id::CORRELATION_DATA, w)?;
    kind::user::encode(user_properties, id::USER_PROPERTY, w)?;
    kind::string::encode(content_type, id::CONTENT_TYPE, w)
}

/// The three PUBLISH properties a server sets per delivery; see
/// [`encode_forwarded_body`].
pub(crate) fn encode_forwarded_by_delivery<W: Sink>(
    message_expiry_interval: Option<u32>,
    topic_alias: Option<u16>,
    subscription_identifiers: &[u32],
    w: &mut W,
) -> Result<(), EncodeError> {
    kind::int32::encode(&message_expiry_interval, id::MESSAGE_EXPIRY_INTERVAL, w)?;
    kind::alias16::encode(&topic_alias, id::TOPIC_ALIAS, w)?;
    kind::subids::encode(subscription_identifiers, id::SUBSCRIPTION_IDENTIFIER, w)
}

/// A will's properties as a self-contained property list; see
/// [`encode_publish_properties`].
pub fn encode_will_properties(props: &WillProperties) -> Result<Bytes, EncodeError> {
    let mut out = bytes::BytesMut::new();
    encode_properties(&mut out, props)?;
    Ok(out.freeze())
}

/// Reads what [`encode_will_properties`] wrote.
pub fn decode_will_properties(bytes: Bytes) -> Result<WillProperties, DecodeError> {
    decode_properties(&mut Reader::new(bytes))
}

fn set_once<T>(slot: &mut Option<T>, value: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::Protocol("property included more than once"));
    }
    *slot = Some(value);
    Ok(())
}

fn auth_data_needs_method(method: &Option<Bytes>, data: &Option<Bytes>) -> Result<(), DecodeError> {
    if data.is_some() && method.is_none() {
        return Err(DecodeError::Protocol(
            "authentication data without authentication method",
        ));
    }
    Ok(())
}

/// One module per value kind: how it is read (with its range rule) and written.
mod kind {
    use super::*;

    /// A byte that must be 0 or 1 (every single-byte property is one).
    pub mod flag {
        use super::*;
        pub fn decode(slot: &mut Option<u8>, r: &mut Reader) -> Result<(), DecodeError> {
            let v = r.u8()?;
            if v > 1 {
                return Err(DecodeError::Protocol("byte property other than 0 or 1"));
            }
            set_once(slot, v)
        }
        pub fn encode<W: Sink>(v: &Option<u8>, id: u8, w: &mut W) -> Result<(), EncodeError> {
            if let Some(v) = v {
                w.put_u8(id);
                w.put_u8(*v);
            }
            Ok(())
        }
    }

    /// Two Byte Integer.
    pub mod int16 {
        use super::*;
        pub fn decode(slot: &mut Option<u16>, r: &mut Reader) -> Result<(), DecodeError> {
            let v = r.u16()?;
            set_once(slot, v)
        }
        pub fn encode<W: Sink>(v: &Option<u16>, id: u8, w: &mut W) -> Result<(), EncodeError> {
            if let Some(v) = v {
                w.put_u8(id);
                w.put_u16(*v);
            }
            Ok(())
        }
    }

    /// Two Byte Integer that must not be 0.
    pub mod nonzero16 {
        use super::*;
        pub fn decode(slot: &mut Option<u16>, r: &mut Reader) -> Result<(), DecodeError> {
            let v = r.u16()?;
            if v == 0 {
                return Err(DecodeError::Protocol("property value 0 is not allowed"));
            }
            set_once(slot, v)
        }
        pub use super::int16::encode;
    }

    /// Topic Alias: a Two Byte Integer that must not be 0; a 0 is "Topic
    /// Alias invalid" (0x94), as an alias above the maximum is.
    pub mod alias16 {
        use super::*;
        pub fn decode(slot: &mut Option<u16>, r: &mut Reader) -> Result<(), DecodeError> {
            let v = r.u16()?;
            if v == 0 {
                return Err(DecodeError::TopicAliasInvalid("topic alias 0"));
            }
            set_once(slot, v)
        }
        pub use super::int16::encode;
    }

    /// Four Byte Integer.
    pub mod int32 {
        use super::*;
        pub fn decode(slot: &mut Option<u32>, r: &mut Reader) -> Result<(), DecodeError> {
            let v = r.u32()?;
            set_once(slot, v)
        }
        pub fn encode<W: Sink>(v: &Option<u32>, id: u8, w: &mut W) -> Result<(), EncodeError> {
            if let Some(v) = v {
                w.put_u8(id);
                w.put_u32(*v);
            }
            Ok(())
        }
    }

    /// Four Byte Integer that must not be 0.
    pub mod nonzero32 {
        use super::*;
        pub fn decode(slot: &mut Option<u32>, r: &mut Reader) -> Result<(), DecodeError> {
            let v = r.u32()?;
            if v == 0 {
                return Err(DecodeError::Protocol("property value 0 is not allowed"));
            }
            set_once(slot, v)
        }
        pub use super::int32::encode;
    }

    /// UTF-8 Encoded String.
    pub mod string {
        use super::*;
        pub fn decode(slot: &mut Option<Bytes>, r: &mut Reader) -> Result<(), DecodeError> {
            let v = r.string()?;
            set_once(slot, v)
        }
        pub fn encode<W: Sink>(v: &Option<Bytes>, id: u8, w: &mut W) -> Result<(), EncodeError> {
            if let Some(v) = v {
                w.put_u8(id);
                put_binary(w, v, "string property")?;
            }
            Ok(())
        }
    }

    /// Response Topic: a string used as a topic name, so no wildcards.
    pub mod response_topic {
        use super::*;
        pub fn decode(slot: &mut Option<Bytes>, r: &mut Reader) -> Result<(), DecodeError> {
            let v = r.string()?;
            if v.iter().any(|&b| b == b'+' || b == b'#') {
                return Err(DecodeError::Protocol("response topic contains a wildcard"));
            }
            set_once(slot, v)
        }
        pub use super::string::encode;
    }

    /// Binary Data.
    pub mod binary {
        use super::*;
        pub fn decode(slot: &mut Option<Bytes>, r: &mut Reader) -> Result<(), DecodeError> {
            let v = r.binary()?;
            set_once(slot, v)
        }
        pub fn encode<W: Sink>(v: &Option<Bytes>, id: u8, w: &mut W) -> Result<(), EncodeError> {
            if let Some(v) = v {
                w.put_u8(id);
                put_binary(w, v, "binary property")?;
            }
            Ok(())
        }
    }

    /// User Property: a string pair, may repeat.
    pub mod user {
        use super::*;
        pub fn decode(slot: &mut Vec<UserProperty>, r: &mut Reader) -> Result<(), DecodeError> {
            let k = r.string()?;
            let v = r.string()?;
            slot.push((k, v));
            Ok(())
        }
        pub fn encode<W: Sink>(v: &[UserProperty], id: u8, w: &mut W) -> Result<(), EncodeError> {
            for (k, v) in v {
                w.put_u8(id);
                put_binary(w, k, "user property name")?;
                put_binary(w, v, "user property value")?;
            }
            Ok(())
        }
    }

    fn read_subid(r: &mut Reader) -> Result<u32, DecodeError> {
        let v = r.varint()?;
        if v == 0 {
            return Err(DecodeError::Protocol("subscription identifier 0"));
        }
        Ok(v)
    }

    fn write_subid<W: Sink>(v: u32, id: u8, w: &mut W) -> Result<(), EncodeError> {
        if v == 0 {
            return Err(EncodeError::ValueOutOfRange("subscription identifier 0"));
        }
        w.put_u8(id);
        put_varint(w, v as usize, "subscription identifier")
    }

    /// Subscription Identifier in SUBSCRIBE: once, 1..=268,435,455.
    pub mod subid {
        use super::*;
        pub fn decode(slot: &mut Option<u32>, r: &mut Reader) -> Result<(), DecodeError> {
            let v = read_subid(r)?;
            set_once(slot, v)
        }
        pub fn encode<W: Sink>(v: &Option<u32>, id: u8, w: &mut W) -> Result<(), EncodeError> {
            match v {
                Some(v) => write_subid(*v, id, w),
                None => Ok(()),
            }
        }
    }

    /// Subscription Identifiers in PUBLISH: may repeat.
    pub mod subids {
        use super::*;
        pub fn decode(slot: &mut Vec<u32>, r: &mut Reader) -> Result<(), DecodeError> {
            slot.push(read_subid(r)?);
            Ok(())
        }
        pub fn encode<W: Sink>(v: &[u32], id: u8, w: &mut W) -> Result<(), EncodeError> {
            v.iter().try_for_each(|v| write_subid(*v, id, w))
        }
    }
}

/// Implements [`PropertySet`] for a struct from its table of
/// `IDENTIFIER => field: kind`.
macro_rules! property_set {
    ($ty:ty { $($pid:ident => $field:ident : $kind:ident),* $(,)? } $(validate($s:ident) $check:block)?) => {
        impl PropertySet for $ty {
            fn decode_one(&mut self, pid: u8, r: &mut Reader) -> Result<(), DecodeError> {
                match pid {
                    $( id::$pid => kind::$kind::decode(&mut self.$field, r), )*
                    _ => Err(DecodeError::Malformed("property not allowed in this packet")),
                }
            }
            fn encode_body<W: Sink>(&self, w: &mut W) -> Result<(), EncodeError> {
                $( kind::$kind::encode(&self.$field, id::$pid, w)?; )*
                Ok(())
            }
            $(fn validate(&self) -> Result<(), DecodeError> {
                let $s = self;
                $check
            })?
        }
    };
}

property_set!(ConnectProperties {
    SESSION_EXPIRY_INTERVAL => session_expiry_interval: int32,
    RECEIVE_MAXIMUM => receive_maximum: nonzero16,
    MAXIMUM_PACKET_SIZE => maximum_packet_size: nonzero32,
    TOPIC_ALIAS_MAXIMUM => topic_alias_maximum: int16,
    REQUEST_RESPONSE_INFORMATION => request_response_information: flag,
    REQUEST_PROBLEM_INFORMATION => request_problem_information: flag,
    USER_PROPERTY => user_properties: user,
    AUTHENTICATION_METHOD => authentication_method: string,
    AUTHENTICATION_DATA => authentication_data: binary,
} validate(p) { auth_data_needs_method(&p.authentication_method, &p.authentication_data) });

property_set!(WillProperties {
    WILL_DELAY_INTERVAL => will_delay_interval: int32,
    PAYLOAD_FORMAT_INDICATOR => payload_format_indicator: flag,
    MESSAGE_EXPIRY_INTERVAL => message_expiry_interval: int32,
    CONTENT_TYPE => content_type: string,
    RESPONSE_TOPIC => response_topic: response_topic,
    CORRELATION_DATA => correlation_data: binary,
    USER_PROPERTY => user_properties: user,
});

property_set!(ConnAckProperties {
    SESSION_EXPIRY_INTERVAL => session_expiry_interval: int32,
    RECEIVE_MAXIMUM => receive_maximum: nonzero16,
    MAXIMUM_QOS => maximum_qos: flag,
    RETAIN_AVAILABLE => retain_available: flag,
    MAXIMUM_PACKET_SIZE => maximum_packet_size: nonzero32,
    ASSIGNED_CLIENT_IDENTIFIER => assigned_client_identifier: string,
    TOPIC_ALIAS_MAXIMUM => topic_alias_maximum: int16,
    REASON_STRING => reason_string: string,
    USER_PROPERTY => user_properties: user,
    WILDCARD_SUBSCRIPTION_AVAILABLE => wildcard_subscription_available: flag,
    SUBSCRIPTION_IDENTIFIER_AVAILABLE => subscription_identifiers_available: flag,
    SHARED_SUBSCRIPTION_AVAILABLE => shared_subscription_available: flag,
    SERVER_KEEP_ALIVE => server_keep_alive: int16,
    RESPONSE_INFORMATION => response_information: string,
    SERVER_REFERENCE => server_reference: string,
    AUTHENTICATION_METHOD => authentication_method: string,
    AUTHENTICATION_DATA => authentication_data: binary,
} validate(p) { auth_data_needs_method(&p.authentication_method, &p.authentication_data) });

property_set!(PublishProperties {
    PAYLOAD_FORMAT_INDICATOR => payload_format_indicator: flag,
    MESSAGE_EXPIRY_INTERVAL => message_expiry_interval: int32,
    TOPIC_ALIAS => topic_alias: alias16,
    RESPONSE_TOPIC => response_topic: response_topic,
    CORRELATION_DATA => correlation_data: binary,
    USER_PROPERTY => user_properties: user,
    SUBSCRIPTION_IDENTIFIER => subscription_identifiers: subids,
    CONTENT_TYPE => content_type: string,
});

property_set!(PubAckProperties {
    REASON_STRING => reason_string: string,
    USER_PROPERTY => user_properties: user,
});

property_set!(SubscribeProperties {
    SUBSCRIPTION_IDENTIFIER => subscription_identifier: subid,
    USER_PROPERTY => user_properties: user,
});

property_set!(SubAckProperties {
    REASON_STRING => reason_string: string,
    USER_PROPERTY => user_properties: user,
});

property_set!(UnsubscribeProperties {
    USER_PROPERTY => user_properties: user,
});

property_set!(UnsubAckProperties {
    REASON_STRING => reason_string: string,
    USER_PROPERTY => user_properties: user,
});

property_set!(DisconnectProperties {
    SESSION_EXPIRY_INTERVAL => session_expiry_interval: int32,
    REASON_STRING => reason_string: string,
    USER_PROPERTY => user_properties: user,
    SERVER_REFERENCE => server_reference: string,
});

property_set!(AuthProperties {
    AUTHENTICATION_METHOD => authentication_method: string,
    AUTHENTICATION_DATA => authentication_data: binary,
    REASON_STRING => reason_string: string,
    USER_PROPERTY => user_properties: user,
} validate(p) { auth_data_needs_method(&p.authentication_method, &p.authentication_data) });

/// True when the struct has no property set (encodes as a single 0 byte).
pub(crate) fn is_empty<P: PropertySet>(props: &P) -> bool {
    matches!(measure(|c| props.encode_body(c)), Ok(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode<P: PropertySet>(bytes: &'static [u8]) -> Result<P, DecodeError> {
        let mut r = Reader::new(Bytes::from_static(bytes));
        let p = decode_properties(&mut r)?;
        r.finish()?;
        Ok(p)
    }

    #[test]
    fn connect_properties_roundtrip() {
        let p: ConnectProperties =
            decode(b"\x0E\x11\x00\x00\x00\x0A\x21\x00\x05\x26\x00\x01k\x00\x00").unwrap();
        assert_eq!(p.session_expiry_interval, Some(10));
        assert_eq!(p.receive_maximum, Some(5));
        assert_eq!(p.user_properties.len(), 1);
        let mut out = bytes::BytesMut::new();
        encode_properties(&mut out, &p).unwrap();
        assert_eq!(
            &out[..],
            b"\x0E\x11\x00\x00\x00\x0A\x21\x00\x05\x26\x00\x01k\x00\x00"
        );
    }

    #[test]
    fn duplicate_and_not_allowed() {
        assert_eq!(
            decode::<PubAckProperties>(b"\x06\x1F\x00\x00\x1F\x00\x00"),
            Err(DecodeError::Protocol("property included more than once"))
        );
        assert_eq!(
            decode::<PubAckProperties>(b"\x03\x23\x00\x01"),
            Err(DecodeError::Malformed(
                "property not allowed in this packet"
            ))
        );
        // User Property and PUBLISH Subscription Identifier may repeat.
        let p: PublishProperties = decode(b"\x04\x0B\x01\x0B\x02").unwrap();
        assert_eq!(p.subscription_identifiers, vec![1, 2]);
        assert!(decode::<SubscribeProperties>(b"\x04\x0B\x01\x0B\x02").is_err());
    }

    #[test]
    fn ranges() {
        for bad in [
            &b"\x03\x21\x00\x00"[..],    // receive maximum 0
            b"\x05\x27\x00\x00\x00\x00", // maximum packet size 0
            b"\x02\x17\x02",             // request problem information 2
            b"\x02\x19\x02",             // request response information 2
            b"\x03\x16\x00\x00",         // authentication data without method
        ] {
            let mut r = Reader::new(Bytes::from_static(bad));
            let e = decode_properties::<ConnectProperties>(&mut r).unwrap_err();
            assert!(matches!(e, DecodeError::Protocol(_)), "{bad:?}: {e:?}");
        }
        assert!(matches!(
            decode::<PublishProperties>(b"\x03\x23\x00\x00"),
            Err(DecodeError::TopicAliasInvalid(_))
        ));
        assert!(matches!(
            decode::<PublishProperties>(b"\x02\x0B\x00"),
            Err(DecodeError::Protocol(_))
        ));
        assert!(matches!(
            decode::<PublishProperties>(b"\x02\x01\x02"),
            Err(DecodeError::Protocol(_))
        ));
        assert!(matches!(
            decode::<ConnAckProperties>(b"\x02\x24\x02"),
            Err(DecodeError::Protocol(_))
        ));
        // Property length longer than the packet, or cutting a value.
        assert!(matches!(
            decode::<PubAckProperties>(b"\x09\x1F\x00"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode::<PubAckProperties>(b"\x02\x1F\x00\x00"),
            Err(DecodeError::Malformed(_))
        ));
    }
}
