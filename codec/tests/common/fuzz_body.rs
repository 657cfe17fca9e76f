//! The body shared by the `cargo fuzz` target (`fuzz/fuzz_targets/decode.rs`
//! includes this file) and the stable-Rust smoke test: decode arbitrary bytes
//! as a stream of packets in every protocol version, and check that each
//! packet decoded re-encodes into something that decodes back equal, with
//! `encoded_len` telling the right size. Any panic is a bug.

use bytes::BytesMut;
use tern_codec::{
    decode_packet, encode_packet, encode_publish_header, encoded_len, Packet, ProtocolVersion,
};

/// Returns how many packets were decoded (over the three versions).
pub fn check(data: &[u8]) -> usize {
    let mut decoded = 0;
    for version in [
        ProtocolVersion::V31,
        ProtocolVersion::V311,
        ProtocolVersion::V5,
    ] {
        let mut buf = BytesMut::from(data);
        // Keep the limit small enough to exercise PacketTooLarge too.
        while let Ok(Some(packet)) = decode_packet(&mut buf, version, 64 * 1024) {
            roundtrip(&packet, version);
            decoded += 1;
        }
    }
    decoded
}

fn roundtrip(packet: &Packet, version: ProtocolVersion) {
    let mut out = BytesMut::new();
    encode_packet(packet, version, &mut out).expect("a decoded packet must re-encode");
    assert_eq!(encoded_len(packet, version), Ok(out.len()));
    if let Packet::Publish(p) = packet {
        let mut header = BytesMut::new();
        encode_publish_header(p, version, &mut header).expect("publish header");
        header.extend_from_slice(&p.payload);
        assert_eq!(header, out);
    }
    let decode_version = match packet {
        Packet::Connect(c) => c.protocol,
        _ => version,
    };
    let again = decode_packet(&mut out, decode_version, usize::MAX)
        .expect("re-encoded packet must decode")
        .expect("re-encoded packet must be complete");
    assert!(out.is_empty());
    assert_eq!(&again, packet);
}
