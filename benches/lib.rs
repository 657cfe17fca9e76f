//! Benchmarks for Tern. The suites live in `benches/` and run with
//! `cargo bench -p tern-benches`; this library only holds what they share.

use bytes::{Bytes, BytesMut};
use tern_codec::{encode_packet, Packet, ProtocolVersion, Publish, QoS};

/// A PUBLISH of `payload_len` bytes on `topic`, encoded for `version`.
pub fn encoded_publish(
    topic: &str,
    payload_len: usize,
    qos: QoS,
    version: ProtocolVersion,
) -> Bytes {
    let mut out = BytesMut::new();
    encode_packet(
        &Packet::Publish(publish(topic, payload_len, qos)),
        version,
        &mut out,
    )
    .expect("a valid PUBLISH encodes");
    out.freeze()
}

/// A PUBLISH value of `payload_len` bytes on `topic`.
pub fn publish(topic: &str, payload_len: usize, qos: QoS) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        packet_id: (qos != QoS::AtMostOnce).then_some(1),
        properties: Default::default(),
        payload: Bytes::from(vec![0xA5; payload_len]),
    }
}
