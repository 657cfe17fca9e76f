//! What the connection code needs from a byte stream beyond `AsyncRead`: a
//! way to wait until bytes are there *without* lending it a buffer, so an
//! idle connection holds no read buffer (see [`crate::pool`]).
//!
//! TCP and WebSocket both answer with the socket's readiness (WebSocket
//! frames are decoded in the read buffer itself, see `websocket/inbound.rs`).
//! A transport that cannot tell uses the default, "ready now", and the
//! connection then waits inside `read_buf` with a buffer in hand, as any
//! tokio reader would. A read that finds nothing for the caller after all
//! gives the buffer back before it waits.

use std::future::Future;
use std::io;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::tcp::ReadHalf;

use crate::pool::{BufferPool, BUFFER_SIZE};

/// The read side of a client connection.
pub trait TransportRead: AsyncRead + Unpin + Send {
    /// Ready once a read would find bytes (or the end of the stream).
    fn poll_readable(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The certificate the client proved itself with during the TLS
    /// handshake (`listeners.tls_client_ca`), if it did.
    fn client_certificate(&self) -> Option<&ClientCertificate> {
        None
    }
}

/// A client certificate the TLS handshake verified against
/// `listeners.tls_client_ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The user it names, per `listeners.tls_client_identity`: `None` when
    /// that asks for none, or when the certificate does not name exactly
    /// one.
    pub identity: Option<Box<str>>,
}

impl TransportRead for ReadHalf<'_> {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }
}

/// Waits for bytes, then reads them into `buf`, taking a buffer from the
/// pool first if `buf` has none. Cancel-safe: nothing is lost if the future
/// is dropped before it completes.
///
/// One `poll_fn` whose only state is its three references (it waits in
/// every idle connection's task): the read itself is a fresh `read_buf` per
/// poll, which keeps nothing between polls.
pub fn read_pooled<'a, R: TransportRead>(
    reader: &'a mut R,
    buf: &'a mut BytesMut,
    pool: &'a BufferPool,
) -> impl Future<Output = io::Result<usize>> + 'a {
    std::future::poll_fn(move |cx| {
        std::task::ready!(reader.poll_readable(cx))?;
        if buf.capacity() == 0 {
            *buf = pool.take();
        }
        if buf.capacity() - buf.len() < BUFFER_SIZE / 4 {
            buf.reserve(BUFFER_SIZE);
        }
        let read = std::pin::pin!(reader.read_buf(&mut *buf)).poll(cx);
        if read.is_pending() && buf.is_empty() {
            // Readiness that brought no bytes for the caller (a spurious
            // wake-up, or only a WebSocket control frame): wait without the
            // buffer.
            pool.give(std::mem::take(buf));
        }
        read
    })
}
