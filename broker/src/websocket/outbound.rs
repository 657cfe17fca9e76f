//! The MQTT byte stream out, as WebSocket frames.
//!
//! Server frames are not masked, so framing needs no copy: [`WsWriter`]
//! turns each vectored write from the connection's writer (one batch of
//! packets, [`MAX_OUT_FRAME`] at most) into one binary frame, writing the
//! 2-10 byte frame header and the caller's slices (PUBLISH payloads straight
//! from the shared message) in one vectored write. Control frames (the
//! upgrade response, pongs, close frames) are queued whole in [`Out`] and
//! written between data frames, never inside one.
//!
//! Invariant: while a data frame is partly on the wire (`Out::in_frame`),
//! nothing but its remaining payload may be written.

use std::io;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use tokio::io::AsyncWrite;

use super::socket::SocketWrite;
use super::{CLOSE_NORMAL, MAX_OUT_FRAME};

/// The write side, shared by the reader (control frames: pongs, the close
/// reply), tungstenite during the upgrade (its response) and [`WsWriter`]
/// (data frames). Locked only inside `poll_*` calls, never across an await.
pub(super) struct Out {
    sock: SocketWrite,
    /// Complete control frames (or the handshake response), waiting until no
    /// data frame is half written.
    pub(super) control: BytesMut,
    /// The header of the data frame being written; `header_pos` of its
    /// `header_len` bytes are on the wire.
    header: [u8; 10],
    header_len: usize,
    header_pos: usize,
    /// Payload bytes the data frame being written still owes.
    frame_left: usize,
    /// The reader, waiting to flush a control frame until a data frame ends.
    control_waiter: Option<Waker>,
    /// We sent (or queued) a close frame: later control frames are dropped.
    pub(super) close_sent: bool,
    /// The client sent a close frame; the reader queued the reply.
    pub(super) peer_closed: bool,
    /// Close code the reader chose for the close frame (default 1000).
    pub(super) close_code: Option<u16>,
    /// The TCP write side has been shut down.
    shut: bool,
    /// The upgrade succeeded: the stream carries WebSocket frames (before
    /// that, or after a refused upgrade, a close frame would be garbage).
    pub(super) upgraded: bool,
}

impl Out {
    pub(super) fn new(sock: SocketWrite) -> Out {
        Out {
            sock,
            control: BytesMut::new(),
            header: [0; 10],
            header_len: 0,
            header_pos: 0,
            frame_left: 0,
            control_waiter: None,
            close_sent: false,
            peer_closed: false,
            close_code: None,
            shut: false,
            upgraded: false,
        }
    }

    /// A data frame is partly on the wire: nothing else may be written.
    fn in_frame(&self) -> bool {
        self.header_pos < self.header_len || self.frame_left > 0
    }

    /// Starts a binary frame (FIN set, unmasked) with `len` payload bytes.
    fn begin_frame(&mut self, len: usize) {
        self.header_len = frame_header(&mut self.header, 0x82, len);
        self.header_pos = 0;
        self.frame_left = len;
    }

    /// Writes the queued control frames, then flushes the socket (a no-op
    /// on TCP; TLS holds records until flushed); `Pending` while a data
    /// frame is half written (woken when it ends).
    pub(super) fn poll_flush_control(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.control.is_empty() {
            if self.in_frame() {
                self.control_waiter = Some(cx.waker().clone());
                return Poll::Pending;
            }
            while !self.control.is_empty() {
                let n = ready!(Pin::new(&mut self.sock).poll_write(cx, &self.control))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.control.advance(n);
            }
            // Control frames are rare (the upgrade response, a pong): an idle
            // connection keeps no buffer for them.
            self.control = BytesMut::new();
        }
        Pin::new(&mut self.sock).poll_flush(cx)
    }

    /// The end of the connection: a close frame (unless one was sent or the
    /// client closed first, in which case the reader's reply is queued),
    /// the flush, the TCP shutdown. A data frame cut off half way cannot be
    /// followed by anything, so then the socket is just shut down.
    pub(super) fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.in_frame() {
            if self.upgraded && !self.close_sent && !self.peer_closed {
                let code = self.close_code.unwrap_or(CLOSE_NORMAL);
                let mut header = [0u8; 10];
                let n = frame_header(&mut header, 0x88, 2);
                self.control.extend_from_slice(&header[..n]);
                self.control.extend_from_slice(&code.to_be_bytes());
            }
            self.close_sent = true;
            ready!(self.poll_flush_control(cx))?;
        }
        if !self.shut {
            ready!(Pin::new(&mut self.sock).poll_shutdown(cx))?;
            self.shut = true;
        }
        Poll::Ready(Ok(()))
    }
}

/// Writes a server frame header (FIN + `opcode`, no mask) for `len` payload
/// bytes into `header`; returns its length.
pub(super) fn frame_header(header: &mut [u8; 10], opcode: u8, len: usize) -> usize {
    header[0] = opcode;
    if len < 126 {
        header[1] = len as u8;
        2
    } else if len <= usize::from(u16::MAX) {
        header[1] = 126;
        header[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// The MQTT byte stream out: each write batch one binary frame.
pub(super) struct WsWriter {
    pub(super) out: Arc<Mutex<Out>>,
}

/// Shuts down with its close frame (`poll_shutdown`), at once.
impl crate::transport::TransportWrite for WsWriter {}

impl AsyncWrite for WsWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let mut guard = self.out.lock();
        let out = &mut *guard;
        if out.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if !out.in_frame() {
            // Control frames (a pong, say) go out between data frames.
            ready!(out.poll_flush_control(cx))?;
            out.begin_frame(total.min(MAX_OUT_FRAME));
        }
        loop {
            let mut iov: smallvec::SmallVec<[IoSlice<'_>; 16]> = smallvec::SmallVec::new();
            if out.header_pos < out.header_len {
                iov.push(IoSlice::new(&out.header[out.header_pos..out.header_len]));
            }
            let mut budget = out.frame_left;
            for b in bufs {
                if budget == 0 {
                    break;
                }
                let take = b.len().min(budget);
                if take > 0 {
                    iov.push(IoSlice::new(&b[..take]));
                }
                budget -= take;
            }
            let n = ready!(Pin::new(&mut out.sock).poll_write_vectored(cx, &iov))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let header = n.min(out.header_len - out.header_pos);
            out.header_pos += header;
            let payload = n - header;
            out.frame_left -= payload;
            if !out.in_frame() {
                if let Some(waiter) = out.control_waiter.take() {
                    waiter.wake();
                }
            }
            if payload > 0 {
                return Poll::Ready(Ok(payload));
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut out = self.out.lock();
        if out.in_frame() {
            // The caller still owes payload bytes; data is never buffered here.
            return Poll::Ready(Ok(()));
        }
        out.poll_flush_control(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.out.lock().poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_headers() {
        let mut h = [0u8; 10];
        assert_eq!(frame_header(&mut h, 0x82, 5), 2);
        assert_eq!(&h[..2], &[0x82, 5]);
        assert_eq!(frame_header(&mut h, 0x82, 126), 4);
        assert_eq!(&h[..4], &[0x82, 126, 0, 126]);
        assert_eq!(frame_header(&mut h, 0x82, 65536), 10);
        assert_eq!(&h[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }
}
