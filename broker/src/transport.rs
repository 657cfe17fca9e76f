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
//!
//! Also here: how a connection the broker ends lets its client's last bytes
//! in ([`linger`]), and which read errors are the client's fault
//! ([`peer_violation`]).

use std::future::Future;
use std::io;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;

use crate::metrics::Metrics;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
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

/// The write side of a client connection.
pub trait TransportWrite: AsyncWrite + Unpin + Send {
    /// Whether an MQTT 5 connection the broker ends with a DISCONNECT is
    /// left open, without its FIN, while the broker [`linger`]s, and closed
    /// when the client closes or the linger ends. The client then reads the
    /// DISCONNECT and closes first, as MQTT 5 expects of it: an end of
    /// stream right behind the DISCONNECT can reach a client still in the
    /// middle of reading it (one whose threads share the socket, such as
    /// the Paho test client, then loops on the end of stream for ever).
    /// Plain TCP only: TLS must send its `close_notify` as it shuts down,
    /// and a WebSocket its close frame.
    const CLOSES_AFTER_LINGER: bool = false;
}

impl TransportWrite for tokio::net::tcp::WriteHalf<'_> {
    const CLOSES_AFTER_LINGER: bool = true;
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

/// A borrowed reader reads as its owner does: a caller that needs the
/// reader after `connection::serve` (to [`linger`]) lends it.
impl<T: TransportRead + ?Sized> TransportRead for &mut T {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_readable(cx)
    }

    fn client_certificate(&self) -> Option<&ClientCertificate> {
        (**self).client_certificate()
    }
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
        let was_empty = buf.is_empty();
        let read = std::pin::pin!(reader.read_buf(&mut *buf)).poll(cx);
        if read.is_pending() && buf.is_empty() {
            // Readiness that brought no bytes for the caller (a spurious
            // wake-up, or only a WebSocket control frame): wait without the
            // buffer.
            pool.give(std::mem::take(buf));
        } else if was_empty && !buf.is_empty() && buf.len() <= SMALL_READ {
            // A few bytes in a whole pooled buffer: their packets go on in
            // an allocation of their own size, and the buffer goes back.
            let small = BytesMut::from(&buf[..]);
            pool.give(std::mem::replace(buf, small));
        }
        read
    })
}

/// Counts a read error that the client caused, and says whether it was one:
/// a WebSocket frame that breaks RFC 6455 (websocket/inbound.rs, which has
/// sent its close code already; over the maximum size, `FileTooLarge`) or
/// TLS records that do not decode (`InvalidData`, as rustls reports them).
/// Other errors (a reset, a broken pipe) are the network's.
pub fn peer_violation(metrics: &Metrics, e: &io::Error) -> bool {
    match e.kind() {
        io::ErrorKind::FileTooLarge => Metrics::inc(&metrics.oversized_packets),
        io::ErrorKind::InvalidData => Metrics::inc(&metrics.malformed_packets),
        _ => return false,
    }
    true
}

/// How long a connection the broker ended keeps reading, and discarding,
/// what its client still sends after the final DISCONNECT. Closing a
/// socket that holds unread bytes makes TCP reset the connection, and a
/// client still sending (acknowledgements of what it was just sent, the
/// rest of a pipeline) then fails to write, or loses the DISCONNECT and its
/// reason code before it reads it. A client that reads the DISCONNECT
/// closes at once, which ends the wait. Over plain TCP an MQTT 5 client
/// gets its end of stream only then ([`TransportWrite`]), so this is also
/// how long it has to read the DISCONNECT and close first: a second, far
/// more than a client on a working link needs.
pub const LINGER: Duration = Duration::from_secs(1);

/// Reads and discards until the client closes its side, a read fails,
/// [`LINGER`] passes without a byte from it, or `most` has passed. Reads
/// into a small buffer of its own: nothing read is kept.
///
/// `most` is [`LINGER`] too, except in a shutdown: a client still reading
/// what was flushed to it, and acknowledging it as it goes, keeps its
/// connection until it gets to the DISCONNECT, instead of having it reset
/// (the acknowledgements arriving after the close) with the rest unread.
pub async fn linger<R: TransportRead>(reader: &mut R, most: Duration) {
    let mut scratch = [0u8; 512];
    let drain = async {
        while let Ok(Ok(1..)) = tokio::time::timeout(LINGER, reader.read(&mut scratch)).await {}
    };
    let _ = tokio::time::timeout(most, drain).await;
}

/// Largest read whose bytes are moved out of the pooled buffer they were
/// read into. A decoded PUBLISH's topic and payload are slices of the
/// buffer it was read into, and live as long as a subscriber's queue holds
/// them: a client that sends one small packet per read would otherwise pin
/// a whole buffer ([`BUFFER_SIZE`]) per queued message. A queue of 10,000
/// such 64-byte messages to a client that stopped reading held 40 MB while
/// its bound counted 4 MiB. Copying a read this small costs less than the
/// buffer the pool would otherwise have to allocate anew; a larger read
/// pins at most four times its size.
pub const SMALL_READ: usize = BUFFER_SIZE / 4;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWriteExt, DuplexStream};

    impl TransportRead for DuplexStream {}

    /// A pool, the two ends of a connection, and the server end's read
    /// buffer, empty.
    fn connection() -> (BufferPool, DuplexStream, DuplexStream, BytesMut) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        (BufferPool::new(4), client, server, BytesMut::new())
    }

    /// Splits `len` bytes off `buf` as decoding a frame does.
    fn frame(buf: &mut BytesMut, len: usize) -> bytes::Bytes {
        buf.split_to(len).freeze()
    }

    #[tokio::test]
    async fn a_small_read_leaves_the_pooled_buffer_free_for_the_next() {
        let (pool, mut client, mut server, mut buf) = connection();
        client.write_all(&[7; 70]).await.unwrap();
        assert_eq!(read_pooled(&mut server, &mut buf, &pool).await.unwrap(), 70);
        let small = frame(&mut buf, 70);
        assert_eq!(&small[..], &[7; 70][..]);
        // The frame lives on (queued for a subscriber), the buffer is back.
        assert_eq!(pool.idle(), 1);

        // A larger read is not copied: its frames slice the pooled buffer.
        client.write_all(&[8; SMALL_READ + 1]).await.unwrap();
        assert_eq!(
            read_pooled(&mut server, &mut buf, &pool).await.unwrap(),
            SMALL_READ + 1
        );
        assert_eq!(
            pool.stats(),
            (1, 1),
            "the second read took the pooled buffer"
        );
        let large = frame(&mut buf, SMALL_READ + 1);
        pool.give(std::mem::take(&mut buf));
        assert_eq!(pool.idle(), 0, "still shared with the frame");
        drop(large);
        assert_eq!(&small[..], &[7; 70][..]);
    }

    #[tokio::test]
    async fn a_small_read_after_an_incomplete_packet_stays_with_it() {
        let (pool, mut client, mut server, mut buf) = connection();
        client.write_all(&[1; 10]).await.unwrap();
        read_pooled(&mut server, &mut buf, &pool).await.unwrap();
        client.write_all(&[2; 10]).await.unwrap();
        read_pooled(&mut server, &mut buf, &pool).await.unwrap();
        // Both reads are one packet's bytes, in order.
        assert_eq!(&buf[..10], &[1; 10][..]);
        assert_eq!(&buf[10..], &[2; 10][..]);
    }
}
