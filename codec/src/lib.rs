//! Tern's MQTT codec: the wire format of MQTT 3.1, 3.1.1 and 5.0, all fifteen
//! packet types, every MQTT 5 property and reason code.
//!
//! # What this crate owns
//!
//! Only the wire format: turning bytes into [`Packet`] values
//! ([`decode_packet`]) and packet values into bytes ([`encode_packet`],
//! [`encode_publish_header`], [`encoded_len`]), with every structural rule of
//! the specifications enforced on the way in. It never does I/O, is not
//! async, and knows nothing of sessions, subscriptions, topic aliases or
//! authentication: rules that need connection state (is this packet id in
//! use, is this alias known, is this the first CONNECT) belong to the broker.
//!
//! # Invariants
//!
//! - **Zero copy on decode.** A complete frame is split off the read buffer
//!   with `split_to(len).freeze()`; topics, payloads, strings and binary
//!   fields of the decoded packet are [`bytes::Bytes`] slices of that frame.
//! - **No allocation from claimed lengths.** Lengths read from the wire are
//!   only used to slice bytes that have already arrived; collections grow one
//!   element per element actually parsed.
//! - **Size limit before buffering.** The maximum packet size is checked from
//!   the fixed header alone (the first 2-5 bytes), before the body is waited
//!   for, so a peer cannot make the broker buffer an oversized packet.
//! - **No panics.** Any byte sequence yields `Ok(None)`, a packet, or a
//!   [`DecodeError`] telling which reason code to close the connection with.
//!
//! # Modules
//!
//! - `packet`: the packet types; [`properties`]: the MQTT 5 property structs;
//!   `reason`: [`ReasonCode`].
//! - `primitives`: integers, Variable Byte Integers, strings, binary data.
//! - `property_codec`: property lists, generated from one table per packet.
//! - `decode` and `encode`: the packets; `error`: what can go wrong.
//! - [`forward`]: PUBLISH headers a server writes per delivery of a message
//!   whose properties it encoded once.

mod decode;
mod encode;
mod error;
pub mod forward;
mod packet;
mod primitives;
pub mod properties;
mod property_codec;
mod reason;

pub use decode::decode_packet;
pub use encode::{
    encode_packet, encode_publish_header, encode_publish_header_of, encoded_len, PublishHeader,
};
pub use error::{DecodeError, EncodeError};
pub use packet::*;
pub use property_codec::{
    decode_publish_properties, decode_will_properties, encode_publish_properties,
    encode_will_properties,
};
pub use reason::ReasonCode;
