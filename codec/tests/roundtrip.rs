//! Property tests: random packets of every type, for each version (only
//! fields expressible in that version), survive encode -> decode unchanged;
//! `encoded_len` is exact; `encode_publish_header` + payload equals
//! `encode_packet`; a forwarded MQTT 5 header (`forward.rs`) built from a
//! PUBLISH's parts is that PUBLISH; every proper prefix of an encoding is
//! "not yet".

mod common;

use bytes::BytesMut;
use proptest::prelude::*;
use tern_codec::*;

fn check_roundtrip(p: &Packet, v: ProtocolVersion) -> Result<(), TestCaseError> {
    let bytes = common::encode(p, v);
    prop_assert_eq!(encoded_len(p, v).unwrap(), bytes.len());
    let decoded = common::decode_one(&bytes, v)
        .map_err(|e| TestCaseError::fail(format!("{e}: {bytes:02X?}")))?;
    prop_assert_eq!(&decoded, p);
    if let Packet::Publish(publish) = p {
        let mut header = BytesMut::new();
        encode_publish_header(publish, v, &mut header).unwrap();
        prop_assert_eq!(header.len() + publish.payload.len(), bytes.len());
        header.extend_from_slice(&publish.payload);
        prop_assert_eq!(&header, &bytes);
    }
    Ok(())
}

fn check_prefixes(p: &Packet, v: ProtocolVersion) -> Result<(), TestCaseError> {
    let bytes = common::encode(p, v);
    for n in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..n]);
        prop_assert_eq!(decode_packet(&mut buf, v, usize::MAX), Ok(None));
        prop_assert_eq!(&buf[..], &bytes[..n]);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn roundtrip_v31(p in common::packet(ProtocolVersion::V31)) {
        check_roundtrip(&p, ProtocolVersion::V31)?;
    }

    #[test]
    fn roundtrip_v311(p in common::packet(ProtocolVersion::V311)) {
        check_roundtrip(&p, ProtocolVersion::V311)?;
    }

    #[test]
    fn roundtrip_v5(p in common::packet(ProtocolVersion::V5)) {
        check_roundtrip(&p, ProtocolVersion::V5)?;
    }

    #[test]
    fn back_to_back_v5(a in common::packet(ProtocolVersion::V5), b in common::packet(ProtocolVersion::V5)) {
        let v = ProtocolVersion::V5;
        let mut buf = common::encode(&a, v);
        buf.extend_from_slice(&common::encode(&b, v));
        prop_assert_eq!(decode_packet(&mut buf, v, usize::MAX).unwrap(), Some(a));
        prop_assert_eq!(decode_packet(&mut buf, v, usize::MAX).unwrap(), Some(b));
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decode_packet(&mut buf, v, usize::MAX), Ok(None));
    }
}

/// A forwarded header (`tern_codec::forward`) built from a PUBLISH's parts,
/// the message's properties encoded ahead or in place and the three per
/// delivery given beside them, is that PUBLISH: it decodes to it, and
/// `forwarded_packet_len` is its size.
fn check_forwarded(publish: &Publish) -> Result<(), TestCaseError> {
    use tern_codec::forward::*;
    let props = publish.properties();
    let encoded = encode_forwarded_properties(props).unwrap();
    for message in [
        MessageProperties::Encoded(&encoded),
        MessageProperties::Decoded(props),
    ] {
        let header = ForwardedHeader {
            dup: publish.dup,
            qos: publish.qos,
            retain: publish.retain,
            topic: &publish.topic,
            packet_id: publish.packet_id,
            message,
            message_expiry_interval: props.message_expiry_interval,
            topic_alias: props.topic_alias,
            subscription_identifiers: &props.subscription_identifiers,
            payload_len: publish.payload.len(),
        };
        let mut bytes = BytesMut::new();
        encode_forwarded_header(&header, &mut bytes).unwrap();
        bytes.extend_from_slice(&publish.payload);
        prop_assert_eq!(forwarded_packet_len(&header).unwrap(), bytes.len());
        let decoded = common::decode_one(&bytes, ProtocolVersion::V5)
            .map_err(|e| TestCaseError::fail(format!("{e}: {bytes:02X?}")))?;
        prop_assert_eq!(&decoded, &Packet::Publish(publish.clone()));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn forwarded_headers_are_the_publish(p in common::publish(ProtocolVersion::V5)) {
        check_forwarded(&p)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn prefixes_v31(p in common::packet(ProtocolVersion::V31)) {
        check_prefixes(&p, ProtocolVersion::V31)?;
    }

    #[test]
    fn prefixes_v5(p in common::packet(ProtocolVersion::V5)) {
        check_prefixes(&p, ProtocolVersion::V5)?;
    }

    #[test]
    fn prefixes_v311(p in common::packet(ProtocolVersion::V311)) {
        check_prefixes(&p, ProtocolVersion::V311)?;
    }
}

#[test]
fn stored_properties_round_trip() {
    use tern_codec::properties::{PublishProperties, WillProperties};
    let publish = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(30),
        content_type: Some(bytes::Bytes::from_static(b"text/plain")),
        response_topic: Some(bytes::Bytes::from_static(b"reply/here")),
        correlation_data: Some(bytes::Bytes::from_static(b"\x00\x01")),
        user_properties: vec![
            (
                bytes::Bytes::from_static(b"k"),
                bytes::Bytes::from_static(b"v1"),
            ),
            (
                bytes::Bytes::from_static(b"k"),
                bytes::Bytes::from_static(b"v2"),
            ),
        ],
        ..PublishProperties::default()
    };
    let bytes = tern_codec::encode_publish_properties(&publish).unwrap();
    assert_eq!(
        tern_codec::decode_publish_properties(bytes).unwrap(),
        publish
    );
    let will = WillProperties {
        will_delay_interval: Some(5),
        ..WillProperties::default()
    };
    let bytes = tern_codec::encode_will_properties(&will).unwrap();
    assert_eq!(tern_codec::decode_will_properties(bytes).unwrap(), will);
    assert!(tern_codec::decode_publish_properties(bytes::Bytes::from_static(b"\x05\x01")).is_err());
}
