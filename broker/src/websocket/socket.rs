//! The byte stream under a WebSocket: plain TCP (`ws://`) or TLS
//! (`wss://`), split into the read half the reader owns and the write half
//! [`Out`](super::outbound::Out) owns.
//!
//! Two variants rather than a type parameter: the WebSocket code is written
//! once, and an enum costs each connection 8 bytes where a generic would
//! make a second copy of every WebSocket function.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::tls::TlsRead;

/// The read half. TLS is boxed: inline, its readiness state would make
/// every WebSocket connection's task larger (see broker/tests/footprint.rs).
pub(super) enum SocketRead {
    Tcp(OwnedReadHalf),
    Tls(Box<TlsRead>),
}

/// The write half.
pub(super) enum SocketWrite {
    Tcp(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream<TcpStream>>),
}

/// Splits a plain TCP connection.
pub(super) fn split_tcp(stream: TcpStream) -> (SocketRead, SocketWrite) {
    let (read, write) = stream.into_split();
    (SocketRead::Tcp(read), SocketWrite::Tcp(write))
}

/// Splits a TLS connection.
///
/// A client certificate never stands in for `[auth]` here: a browser sends
/// the certificate it picked for a host whatever page opens the WebSocket,
/// so any site the user visits could connect as them (the upgrade's
/// `Origin` is not checked). Over `wss://` the certificate is required (the
/// listeners share the TLS settings) but the user name and password are
/// checked as over `ws://`.
pub(super) fn split_tls(stream: TlsStream<TcpStream>) -> (SocketRead, SocketWrite) {
    let (read, write) = tokio::io::split(stream);
    (
        SocketRead::Tls(Box::new(TlsRead::new(read, None))),
        SocketWrite::Tls(write),
    )
}

impl SocketRead {
    /// Ready once a read may find bytes (see `tls::TlsRead` for TLS).
    pub(super) fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            SocketRead::Tcp(read) => read.as_ref().poll_read_ready(cx),
            SocketRead::Tls(read) => read.poll_idle_over(cx),
        }
    }
}

impl AsyncRead for SocketRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SocketRead::Tcp(read) => Pin::new(read).poll_read(cx, buf),
            SocketRead::Tls(read) => Pin::new(&mut **read).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SocketWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SocketWrite::Tcp(write) => Pin::new(write).poll_write(cx, buf),
            SocketWrite::Tls(write) => Pin::new(write).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SocketWrite::Tcp(write) => Pin::new(write).poll_write_vectored(cx, bufs),
            SocketWrite::Tls(write) => Pin::new(write).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            SocketWrite::Tcp(write) => write.is_write_vectored(),
            SocketWrite::Tls(write) => write.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SocketWrite::Tcp(write) => Pin::new(write).poll_flush(cx),
            SocketWrite::Tls(write) => Pin::new(write).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SocketWrite::Tcp(write) => Pin::new(write).poll_shutdown(cx),
            SocketWrite::Tls(write) => Pin::new(write).poll_shutdown(cx),
        }
    }
}
