//! One client cannot keep the others waiting by sending faster than the
//! broker decodes: a connection's reader lets the other tasks of its
//! worker run between turns of bounded work (`DECODE_BYTES_PER_TURN` in
//! connection/mod.rs), even when its socket never runs dry.

mod common;

use std::io::Cursor;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use common::*;
use tern::transport::{TransportRead, TransportWrite};
use tern::{Broker, Config};
use tern_codec::{encode_packet, Packet, ProtocolVersion, QoS};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A client whose bytes are all there at once: every read finds more, as
/// from a socket that a fast sender keeps full. Unlike a socket, it never
/// spends tokio's cooperative budget, so nothing but the reader itself
/// makes it let others run.
struct AlwaysReadable(Cursor<Vec<u8>>);

impl AsyncRead for AlwaysReadable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl TransportRead for AlwaysReadable {}

/// A client that takes whatever the broker writes.
struct Discard;

impl AsyncWrite for Discard {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl TransportWrite for Discard {}

/// On a single thread, a client sending 8 MiB of PUBLISHes without a pause
/// is read in turns, and a task beside it runs between them. Without the
/// turns, its reader decodes all of it in one poll and the task beside it
/// runs once, after.
#[tokio::test(flavor = "current_thread")]
async fn a_client_that_never_stops_sending_does_not_keep_other_tasks_waiting() {
    const PACKETS: usize = 128;
    const PAYLOAD: usize = 64 * 1024;
    let v = ProtocolVersion::V311;
    let mut bytes = BytesMut::new();
    encode_packet(
        &Packet::Connect(Box::new(connect_packet("firehose", v))),
        v,
        &mut bytes,
    )
    .unwrap();
    for _ in 0..PACKETS {
        encode_packet(
            &publish_packet("busy", &[7; PAYLOAD], QoS::AtMostOnce, None),
            v,
            &mut bytes,
        )
        .unwrap();
    }
    encode_packet(&Packet::Disconnect(Default::default()), v, &mut bytes).unwrap();

    let turns = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let beside = tokio::spawn({
        let (turns, done) = (Arc::clone(&turns), Arc::clone(&done));
        async move {
            while !done.load(Ordering::Relaxed) {
                turns.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    });

    let broker = Broker::new(Config::default());
    let peer: SocketAddr = "127.0.0.1:1883".parse().unwrap();
    let reader = AlwaysReadable(Cursor::new(bytes.to_vec()));
    tern::connection::serve(Arc::clone(&broker), reader, Discard, &peer).await;
    let during = turns.load(Ordering::Relaxed);
    done.store(true, Ordering::Relaxed);
    beside.await.unwrap();

    assert_eq!(
        broker.metrics.packets_received.get(),
        PACKETS as u64 + 2,
        "the CONNECT, every PUBLISH and the DISCONNECT were read"
    );
    // 8 MiB in turns of 512 KiB: 16 turns, less what other awaits of the
    // connection merged.
    assert!(
        during >= 8,
        "the task beside the connection ran {during} times while it read 8 MiB"
    );
}
