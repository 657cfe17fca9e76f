//! Hostile input after a valid CONNECT: random bytes and bit-flipped valid
//! packet streams, each on its own connection. The broker must close (or
//! keep) each connection without panicking, keep serving other clients, and
//! count every connection out.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::*;
use tern_codec::{encode_packet, Packet, ProtocolVersion, PubAck, QoS};

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A stream of valid packets a client may send, to be mutated.
fn valid_stream(protocol: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    let packets = [
        subscribe_packet(1, "g/+/x", QoS::ExactlyOnce),
        subscribe_packet(2, "$share/grp/g/#", QoS::AtLeastOnce),
        publish_packet("g/a/x", b"payload", QoS::AtLeastOnce, Some(3)),
        publish_packet("g/b/x", b"two", QoS::ExactlyOnce, Some(4)),
        Packet::PubRel(PubAck::new(4)),
        Packet::PubAck(PubAck::new(1)),
        Packet::PingReq,
        publish_packet("g/c/x", &[0xAB; 300], QoS::AtMostOnce, None),
    ];
    for p in packets {
        encode_packet(&p, protocol, &mut out).unwrap();
    }
    out.to_vec()
}

static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_mutated_input_never_takes_the_broker_down() {
    // A panic inside a broker task would be caught by tokio and only
    // printed: count them.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        default_hook(info);
    }));
    let server = start(|c| c.limits.max_packet_size = 64 * 1024).await;
    let mut watcher = RawClient::connected(addr(&server), "watcher", ProtocolVersion::V5).await;
    watcher.subscribe("health", QoS::AtMostOnce).await;
    let mut rng = Rng(0x7E57_0000_C0DE_0001);
    let mut tasks = Vec::new();
    for round in 0..400 {
        let protocol = match round % 3 {
            0 => ProtocolVersion::V311,
            1 => ProtocolVersion::V5,
            _ => ProtocolVersion::V31,
        };
        let mut bytes = valid_stream(protocol);
        if round % 2 == 0 {
            // Flip a few bits of a valid stream.
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(bytes.len());
                bytes[i] ^= 1 << rng.below(8);
            }
        } else {
            // Plain noise, sometimes after a valid prefix.
            let keep = rng.below(bytes.len());
            bytes.truncate(keep);
            for _ in 0..rng.below(512) {
                bytes.push(rng.next() as u8);
            }
        }
        let address = addr(&server);
        let id = format!("fuzz-{round}");
        tasks.push(tokio::spawn(async move {
            let mut c = RawClient::connected(address, &id, protocol).await;
            let _ = c.stream.try_write(&bytes);
            // Whatever the broker answers, read until it closes or goes quiet.
            let _ = tokio::time::timeout(Duration::from_millis(300), async {
                loop {
                    let mut buf = [0u8; 4096];
                    match tokio::io::AsyncReadExt::read(&mut c.stream, &mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    // Still serving.
    let mut p = RawClient::connected(addr(&server), "after", ProtocolVersion::V311).await;
    p.publish("health", b"ok", QoS::AtLeastOnce, 1).await;
    assert_eq!(&watcher.recv_publish().await.payload[..], b"ok");
    drop(p);
    drop(watcher);
    eventually("every connection counted out", || {
        server.broker().registry.connection_count() == 0
    })
    .await;
    let metrics = &server.broker().metrics;
    let rejected = metrics.malformed_packets.get() + metrics.protocol_errors.get();
    assert!(rejected > 50, "bad input was seen and counted ({rejected})");
    assert_eq!(
        PANICS.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no task panicked"
    );
    server.shutdown().await;
}

/// Packets left incomplete count against `limits.max_incomplete_bytes`
/// across all clients, at the size their read buffers grew to: the client
/// whose packet grows over it is closed with 0x97, and the others, the one
/// still sending a large packet among them, go on. Clients still
/// connecting have a bound of their own.
#[tokio::test]
async fn incomplete_packets_of_all_clients_are_bounded_together() {
    const PACKET: usize = 60_000;
    let server = start(|c| {
        c.limits.max_packet_size = 64 * 1024;
        c.limits.max_incomplete_bytes = 100 * 1024;
    })
    .await;
    let broker = std::sync::Arc::clone(server.broker());
    let v5 = ProtocolVersion::V5;
    let mut sub = RawClient::connected(addr(&server), "sub", v5).await;
    sub.subscribe("big", QoS::AtMostOnce).await;
    let mut frame = BytesMut::new();
    let payload = vec![9u8; PACKET - 10];
    encode_packet(
        &publish_packet("big", &payload, QoS::AtMostOnce, None),
        v5,
        &mut frame,
    )
    .unwrap();

    // A client sends most of a large packet, and holds it: its buffer, at
    // least what it sent, is counted.
    let mut first = RawClient::connected(addr(&server), "first", v5).await;
    first.send_bytes(&frame[..50_000]).await;
    eventually("the first packet counted", || {
        broker.incomplete.held() >= 50_000
    })
    .await;
    let first_held = broker.incomplete.held();

    // Two clients still connecting, each with most of a large CONNECT:
    // the second one's takes their own bound over, and gets CONNACK 0x97.
    // The connected clients' bound is not theirs.
    let mut connect = connect_packet("connecting", v5);
    connect.password = Some(vec![b'p'; PACKET].into());
    let mut connect_frame = BytesMut::new();
    encode_packet(&Packet::Connect(Box::new(connect)), v5, &mut connect_frame).unwrap();
    let mut connecting = RawClient::open(addr(&server), v5).await;
    connecting.send_bytes(&connect_frame[..55_000]).await;
    eventually("the first CONNECT counted", || {
        broker.incomplete_connecting.held() >= 55_000
    })
    .await;
    let mut refused = RawClient::open(addr(&server), v5).await;
    refused.send_bytes(&connect_frame[..55_000]).await;
    let seen = refused.expect_closed().await;
    assert!(
        matches!(&seen[..], [Packet::ConnAck(ack)] if ack.code == tern_codec::ReasonCode::QuotaExceeded),
        "{seen:?}"
    );
    assert_eq!(broker.metrics.incomplete_packets_refused.get(), 1);
    assert_eq!(broker.incomplete.held(), first_held);
    drop(connecting);
    eventually("the CONNECTs released", || {
        broker.incomplete_connecting.held() == 0
    })
    .await;

    // A second connected client's packet would take the total over
    // 100 KiB: refused, with DISCONNECT 0x97, and released at once.
    let mut second = RawClient::connected(addr(&server), "second", v5).await;
    second.send_bytes(&frame[..55_000]).await;
    second
        .expect_disconnect(tern_codec::ReasonCode::QuotaExceeded)
        .await;
    assert_eq!(broker.metrics.incomplete_packets_refused.get(), 2);
    assert_eq!(broker.incomplete.held(), first_held);

    // The first completes its packet, which is delivered, and nothing is
    // counted any more.
    first.send_bytes(&frame[50_000..]).await;
    let delivered = sub.recv_publish().await;
    assert_eq!(&delivered.payload[..], &payload[..]);
    eventually("nothing incomplete", || broker.incomplete.held() == 0).await;
    server.shutdown().await;
}
