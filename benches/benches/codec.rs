//! Codec throughput: PUBLISH decode and split-header encode by payload size.
//! Decoding must cost the same for every payload size (the payload is a
//! slice of the frame, never copied).

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tern_benches::{encoded_publish, publish};
use tern_codec::{decode_packet, encode_publish_header, ProtocolVersion, QoS};

const PAYLOADS: [usize; 4] = [16, 1024, 16 * 1024, 64 * 1024];

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_publish");
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        for size in PAYLOADS {
            let frame = encoded_publish(
                "sensors/kitchen/temperature",
                size,
                QoS::AtLeastOnce,
                version,
            );
            group.throughput(Throughput::Elements(1));
            group.bench_with_input(
                BenchmarkId::new(format!("{version:?}"), size),
                &frame,
                |b, frame| {
                    // One buffer holding many frames, as a socket read would.
                    let mut buf = BytesMut::with_capacity(frame.len() * 64);
                    b.iter(|| {
                        if buf.is_empty() {
                            for _ in 0..64 {
                                buf.extend_from_slice(frame);
                            }
                        }
                        black_box(decode_packet(&mut buf, version, usize::MAX).unwrap())
                    });
                },
            );
        }
    }
    group.finish();
}

fn encode_header(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode_publish_header");
    for size in PAYLOADS {
        let p = publish("sensors/kitchen/temperature", size, QoS::AtLeastOnce);
        group.bench_with_input(BenchmarkId::from_parameter(size), &p, |b, p| {
            let mut out = BytesMut::with_capacity(64);
            b.iter(|| {
                out.clear();
                encode_publish_header(black_box(p), ProtocolVersion::V5, &mut out).unwrap();
                black_box(out.len())
            });
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode_header);
criterion_main!(benches);
