//! The MQTT byte stream in, from a client's WebSocket frames (RFC 6455
//! section 5).
//!
//! MQTT needs only the payloads of the client's binary frames, unmasked and
//! in order; WebSocket message boundaries mean nothing to it (one message may
//! hold several packets or part of one). So [`WsReader`] reads the socket
//! straight into the connection's pooled read buffer, and [`FrameDecoder`]
//! rewrites what was read in place: frame headers are dropped, payloads are
//! unmasked and moved up against the bytes before them, and the buffer is
//! left holding MQTT bytes alone. That is the only copy, and it stays within
//! the buffer.
//!
//! A read may end anywhere inside a frame. A payload split by a read is
//! decoded as far as it goes (the decoder keeps the frame's remaining length
//! and its position in the mask); a header split by a read is kept in the
//! decoder (at most [`MAX_HEADER`] bytes), as is the payload of a control
//! frame until it is whole (at most [`MAX_CONTROL_PAYLOAD`]). Nothing else
//! is kept between reads, so an idle WebSocket connection holds no read
//! buffer, exactly like a TCP one: readiness is the socket's, and the
//! buffer is taken from the pool only when there is something to read.
//!
//! Control frames are answered here: a ping with a pong carrying its
//! payload, a close frame with a close frame carrying its code, after which
//! the stream ends. The replies are queued in [`Out`] and go out between
//! data frames. A violation ends the stream with an error, after the bytes
//! before it, and sets the close code the broker's close frame carries
//! (RFC 6455 section 7.4.1): 1002 for a protocol error (an unmasked frame,
//! reserved bits or opcodes, a fragmented or oversized control frame, a
//! continuation outside a message, a bad close code), 1003 for a text
//! frame, 1007 for a close reason that is not UTF-8, 1009 for a frame or a
//! fragmented message larger than `limits.max_packet_size`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, ReadBuf};

use super::outbound::{frame_header, Out};
use super::socket::SocketRead;
use super::{CLOSE_INVALID_PAYLOAD, CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG, CLOSE_UNSUPPORTED_DATA};

/// Longest header of a client frame: 2 bytes, 8 of extended length, 4 of
/// mask.
pub const MAX_HEADER: usize = 14;

/// Largest payload of a control frame (RFC 6455 section 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Replies (pongs) waiting to be written beyond which the reader stops
/// reading (the replies to the read that crossed it come on top: at most
/// that read's size). A client that pings without reading its socket is
/// then pushed back by TCP instead of growing the broker's queue of pongs:
/// about 30 full-size pongs, far more than any client keeps unanswered.
pub const MAX_CONTROL_BACKLOG: usize = 4096;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Why the client's frames cannot be read any further: the close code for
/// the broker's close frame, and a line for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

fn protocol_error(reason: &'static str) -> Violation {
    Violation {
        code: CLOSE_PROTOCOL_ERROR,
        reason,
    }
}

/// What one call to [`FrameDecoder::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// MQTT bytes now at the start of the decoded region.
    pub data: usize,
    /// The stream ends after those bytes: the client's close frame
    /// (`Ok`), or a violation.
    pub end: Option<Result<(), Violation>>,
}

/// The frame whose payload is being read.
#[derive(Debug, Clone, Copy)]
struct Frame {
    opcode: u8,
    fin: bool,
    mask: [u8; 4],
    /// Payload bytes already unmasked, modulo 4: where in the mask the next
    /// byte falls.
    phase: u8,
    /// Payload bytes still to come.
    left: u64,
}

/// Turns the bytes of a client's frames into the MQTT bytes they carry, in
/// place, one read at a time. Sans I/O: [`WsReader`] feeds it.
///
/// It lives in every WebSocket connection's task, so it is kept small
/// (about 56 bytes): what only control frames need is boxed and made when
/// one arrives.
#[derive(Debug)]
pub struct FrameDecoder {
    /// Largest frame, and largest fragmented message, accepted (MQTT's
    /// maximum packet size is a `u32` too).
    max_size: u32,
    /// The header being gathered (`head_len` bytes of it so far).
    head_len: u8,
    head: [u8; MAX_HEADER],
    /// The frame being read, once its header is complete.
    frame: Option<Frame>,
    /// Payload bytes so far of the binary message being read, while its
    /// final frame has not been seen (never over `max_size`).
    message: Option<u32>,
    /// Control frames in and out; `None` while there are none.
    control: Option<Box<ControlFrames>>,
}

/// What control frames need, made on the first one and freed once its
/// replies are taken.
#[derive(Debug, Default)]
struct ControlFrames {
    /// The payload of the control frame being read.
    payload: Vec<u8>,
    /// Control frames to send back (pongs, the close reply), complete.
    replies: Vec<u8>,
}

impl FrameDecoder {
    pub fn new(max_size: usize) -> FrameDecoder {
        FrameDecoder {
            max_size: u32::try_from(max_size).unwrap_or(u32::MAX),
            head_len: 0,
            head: [0; MAX_HEADER],
            frame: None,
            message: None,
            control: None,
        }
    }

    /// Decodes `raw`, bytes just read from the socket: on return its first
    /// `data` bytes are the MQTT bytes they carried. After an `end`, the
    /// decoder must not be used again.
    pub fn decode(&mut self, raw: &mut [u8]) -> Decoded {
        let (mut r, mut w) = (0, 0);
        while r < raw.len() {
            let Some(frame) = self.frame.as_mut() else {
                r += match self.gather_header(&raw[r..]) {
                    Ok(used) => used,
                    Err(v) => {
                        return Decoded {
                            data: w,
                            end: Some(Err(v)),
                        }
                    }
                };
                if let Some(f) = self.frame {
                    if f.left == 0 {
                        if let Some(end) = self.end_frame() {
                            return Decoded {
                                data: w,
                                end: Some(end),
                            };
                        }
                    }
                }
                continue;
            };
            let n = frame.left.min((raw.len() - r) as u64) as usize;
            let chunk = &mut raw[r..r + n];
            unmask(chunk, frame.mask, frame.phase);
            frame.phase = ((usize::from(frame.phase) + n) % 4) as u8;
            frame.left -= n as u64;
            if frame.opcode >= OP_CLOSE {
                self.control
                    .get_or_insert_with(Default::default)
                    .payload
                    .extend_from_slice(chunk);
            } else {
                raw.copy_within(r..r + n, w);
                w += n;
            }
            r += n;
            if self.frame.is_some_and(|f| f.left == 0) {
                if let Some(end) = self.end_frame() {
                    return Decoded {
                        data: w,
                        end: Some(end),
                    };
                }
            }
        }
        Decoded { data: w, end: None }
    }

    /// There are control frames to send back.
    pub fn has_replies(&self) -> bool {
        self.control.as_ref().is_some_and(|c| !c.replies.is_empty())
    }

    /// Control frames to send back, taken (and the decoder's copy freed,
    /// with everything control frames needed unless one is half read).
    pub fn take_replies(&mut self) -> Vec<u8> {
        let Some(control) = self.control.as_mut() else {
            return Vec::new();
        };
        let replies = std::mem::take(&mut control.replies);
        if control.payload.is_empty() {
            self.control = None;
        }
        replies
    }

    /// Adds header bytes from `input`; returns how many it used. Starts the
    /// frame once its header is complete.
    fn gather_header(&mut self, input: &[u8]) -> Result<usize, Violation> {
        let mut used = 0;
        loop {
            let have = usize::from(self.head_len);
            let need = if have < 2 {
                2
            } else {
                if self.head[1] & 0x80 == 0 {
                    return Err(protocol_error("unmasked client frame"));
                }
                2 + match self.head[1] & 0x7F {
                    126 => 2,
                    127 => 8,
                    _ => 0,
                } + 4
            };
            if have == need {
                self.start_frame(need)?;
                return Ok(used);
            }
            let take = (need - have).min(input.len() - used);
            if take == 0 {
                return Ok(used);
            }
            self.head[have..have + take].copy_from_slice(&input[used..used + take]);
            self.head_len += take as u8; // at most MAX_HEADER
            used += take;
        }
    }

    /// Checks the complete header (`len` bytes) and starts its frame.
    fn start_frame(&mut self, len: usize) -> Result<(), Violation> {
        let h = &self.head;
        self.head_len = 0;
        if h[0] & 0x70 != 0 {
            return Err(protocol_error(
                "reserved bits set (no extension was agreed)",
            ));
        }
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0F;
        let payload = match h[1] & 0x7F {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            n => u64::from(n),
        };
        if payload >> 63 != 0 {
            return Err(protocol_error("frame length with its top bit set"));
        }
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&h[len - 4..len]);
        let too_big = Violation {
            code: CLOSE_TOO_BIG,
            reason: "WebSocket message larger than the maximum packet size",
        };
        match opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin {
                    return Err(protocol_error("fragmented control frame"));
                }
                if payload > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(protocol_error("control frame over 125 bytes"));
                }
            }
            OP_BINARY => {
                if self.message.is_some() {
                    return Err(protocol_error("new message inside a fragmented one"));
                }
                if payload > u64::from(self.max_size) {
                    return Err(too_big);
                }
                self.message = Some(payload as u32); // at most max_size
            }
            OP_CONTINUATION => {
                let Some(so_far) = self.message else {
                    return Err(protocol_error("continuation frame outside a message"));
                };
                let total = u64::from(so_far) + payload;
                if total > u64::from(self.max_size) {
                    return Err(too_big);
                }
                self.message = Some(total as u32); // at most max_size
            }
            OP_TEXT => {
                return Err(Violation {
                    code: CLOSE_UNSUPPORTED_DATA,
                    reason: "text WebSocket message",
                })
            }
            _ => return Err(protocol_error("reserved opcode")),
        }
        self.frame = Some(Frame {
            opcode,
            fin,
            mask,
            phase: 0,
            left: payload,
        });
        Ok(())
    }

    /// The current frame's payload is complete: ends a message, answers a
    /// control frame. `Some` when the stream ends here.
    fn end_frame(&mut self) -> Option<Result<(), Violation>> {
        let frame = self.frame.take()?;
        let payload = self
            .control
            .as_mut()
            .map(|c| std::mem::take(&mut c.payload))
            .unwrap_or_default();
        match frame.opcode {
            OP_PING => {
                self.reply(0x8A, &payload);
                None
            }
            OP_CLOSE => Some(self.close(&payload)),
            OP_PONG => None,
            _ => {
                if frame.fin {
                    self.message = None;
                }
                None
            }
        }
    }

    /// The client's close frame: checks it and queues the reply, which
    /// carries the client's code (none if it gave none).
    fn close(&mut self, payload: &[u8]) -> Result<(), Violation> {
        match payload {
            [] => {
                self.reply(0x88, &[]);
                Ok(())
            }
            [_] => Err(protocol_error("close frame with a one-byte payload")),
            [hi, lo, reason @ ..] => {
                let code = u16::from_be_bytes([*hi, *lo]);
                // Codes an endpoint may send (RFC 6455 section 7.4, and the
                // IANA registry's 1012-1014); 1004-1006 and 1015 are not.
                if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                    return Err(protocol_error("invalid close code"));
                }
                if std::str::from_utf8(reason).is_err() {
                    return Err(Violation {
                        code: CLOSE_INVALID_PAYLOAD,
                        reason: "close reason is not UTF-8",
                    });
                }
                self.reply(0x88, &code.to_be_bytes());
                Ok(())
            }
        }
    }

    fn reply(&mut self, opcode: u8, payload: &[u8]) {
        let mut header = [0u8; 10];
        let n = frame_header(&mut header, opcode, payload.len());
        let replies = &mut self.control.get_or_insert_with(Default::default).replies;
        replies.extend_from_slice(&header[..n]);
        replies.extend_from_slice(payload);
    }
}

/// XORs `data` with `mask`, starting `phase` bytes into it.
fn unmask(data: &mut [u8], mask: [u8; 4], phase: u8) {
    let mut m = [0u8; 8];
    for (i, b) in m.iter_mut().enumerate() {
        *b = mask[(usize::from(phase) + i) % 4];
    }
    let word = u64::from_ne_bytes(m);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes(c.try_into().expect("8 bytes")) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (b, k) in chunks.into_remainder().iter_mut().zip(m) {
        *b ^= k;
    }
}

/// The MQTT byte stream in: the socket read into the caller's buffer and
/// decoded there.
pub(super) struct WsReader {
    read: SocketRead,
    decoder: FrameDecoder,
    out: Arc<Mutex<Out>>,
    /// Bytes that arrived with the upgrade request (a client may send its
    /// first frames without waiting for the response); read first. Rare,
    /// hence behind one thin pointer (a `Box<[u8]>` would be 16 bytes of
    /// every WebSocket connection's task).
    #[expect(
        clippy::box_collection,
        reason = "one thin pointer in every task, the Vec only for the rare client"
    )]
    early: Option<Box<Vec<u8>>>,
    /// Replies are queued in `out` but not yet written.
    replies_queued: bool,
    /// More than [`MAX_CONTROL_BACKLOG`] bytes of them: read nothing until
    /// they are written.
    backlogged: bool,
    /// The stream ended (the client's close frame, or the end of TCP).
    done: bool,
    /// An error still to be returned (after the bytes before it).
    failed: Option<io::Error>,
}

impl WsReader {
    pub(super) fn new(
        read: SocketRead,
        early: Vec<u8>,
        max_size: usize,
        out: Arc<Mutex<Out>>,
    ) -> WsReader {
        WsReader {
            read,
            decoder: FrameDecoder::new(max_size),
            out,
            early: (!early.is_empty()).then(|| Box::new(early)),
            replies_queued: false,
            backlogged: false,
            done: false,
            failed: None,
        }
    }

    /// Queues the decoder's replies in `out` (unless the broker's own close
    /// frame went out: nothing may follow it) and tries to write them.
    fn send_replies(&mut self, cx: &mut Context<'_>) {
        let replies = self.decoder.take_replies();
        let mut out = self.out.lock();
        if !replies.is_empty() && !out.close_sent {
            out.control.extend_from_slice(&replies);
        }
        // Pending while a data frame is half written (the writer wakes this
        // task when it ends) or the socket is full (its write readiness
        // does); the next poll tries again. An error shows up again in the
        // next read or write.
        self.replies_queued = matches!(out.poll_flush_control(cx), Poll::Pending);
        self.backlogged = self.replies_queued && out.control.len() > MAX_CONTROL_BACKLOG;
    }

    /// Applies the end [`FrameDecoder::decode`] reported.
    fn end(&mut self, end: Result<(), Violation>) {
        self.done = true;
        let mut out = self.out.lock();
        match end {
            Ok(()) => out.peer_closed = true,
            Err(v) => {
                out.close_code.get_or_insert(v.code);
                // The kinds `transport::peer_violation` counts.
                let kind = if v.code == CLOSE_TOO_BIG {
                    io::ErrorKind::FileTooLarge
                } else {
                    io::ErrorKind::InvalidData
                };
                self.failed = Some(io::Error::new(kind, v.reason));
            }
        }
    }
}

/// Readiness without a buffer: the socket's, so an idle WebSocket
/// connection holds no read buffer from the pool.
impl crate::transport::TransportRead for WsReader {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.replies_queued {
            self.send_replies(cx);
            if self.backlogged {
                // Woken when the replies can be written.
                return Poll::Pending;
            }
        }
        if self.early.is_some() || self.done || self.failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        self.read.poll_read_ready(cx)
    }
}

impl AsyncRead for WsReader {
    /// Reads what the socket has into `buf` and decodes it there. A read
    /// that carried no MQTT bytes (a control frame, part of a header) is
    /// followed by another, so `Ready` with nothing added means the end.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(e) = this.failed.take() {
                return Poll::Ready(Err(e));
            }
            if this.done || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.backlogged {
                // Nothing was added to `buf` in this call yet (a read that
                // adds bytes returns): wait until the replies are written.
                this.send_replies(cx);
                if this.backlogged {
                    return Poll::Pending;
                }
            }
            let start = buf.filled().len();
            if let Some(early) = this.early.as_mut() {
                let n = early.len().min(buf.remaining());
                buf.put_slice(&early[..n]);
                early.drain(..n);
                if early.is_empty() {
                    this.early = None;
                }
            } else {
                ready!(Pin::new(&mut this.read).poll_read(cx, buf))?;
                if buf.filled().len() == start {
                    this.done = true;
                    return Poll::Ready(Ok(()));
                }
            }
            let decoded = this.decoder.decode(&mut buf.filled_mut()[start..]);
            buf.set_filled(start + decoded.data);
            if this.decoder.has_replies() {
                this.send_replies(cx);
            }
            if let Some(end) = decoded.end {
                this.end(end);
                if decoded.data > 0 {
                    // The bytes before the end first; the error (if any)
                    // comes with the next read.
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if decoded.data > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use std::time::Duration;

    /// A client frame: FIN as given, `opcode`, masked with `mask`.
    fn frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn binary(payload: &[u8]) -> Vec<u8> {
        frame(true, OP_BINARY, payload, [0x37, 0xFA, 0x21, 0x3D])
    }

    /// Decodes `wire` split into reads at `cuts`; the MQTT bytes, the
    /// replies, and the end.
    fn decode_in_reads(
        d: &mut FrameDecoder,
        wire: &[u8],
        cuts: &[usize],
    ) -> (Vec<u8>, Vec<u8>, Option<Result<(), Violation>>) {
        let mut data = Vec::new();
        let mut replies = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&wire.len())) {
            let mut read = wire[at..cut].to_vec();
            at = cut;
            let decoded = d.decode(&mut read);
            data.extend_from_slice(&read[..decoded.data]);
            replies.extend(d.take_replies());
            if decoded.end.is_some() {
                return (data, replies, decoded.end);
            }
        }
        (data, replies, None)
    }

    #[test]
    fn payloads_of_several_frames_in_one_read() {
        let mut wire = binary(b"\x30\x05\x00\x01t");
        wire.extend(binary(b"hi"));
        wire.extend(binary(&[7u8; 300]));
        let mut d = FrameDecoder::new(1 << 20);
        let (data, replies, end) = decode_in_reads(&mut d, &wire, &[]);
        let mut expected = b"\x30\x05\x00\x01thi".to_vec();
        expected.extend_from_slice(&[7u8; 300]);
        assert_eq!(data, expected);
        assert!(replies.is_empty());
        assert_eq!(end, None);
    }

    #[test]
    fn reads_may_end_anywhere() {
        // A ping between two fragments of one message, a 70,000-byte frame
        // (64-bit length), a close: cut at every offset in turn.
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = frame(false, OP_BINARY, b"abc", [1, 2, 3, 4]);
        wire.extend(frame(true, OP_PING, b"ping!", [9, 8, 7, 6]));
        wire.extend(frame(true, OP_CONTINUATION, b"defg", [5, 5, 5, 5]));
        wire.extend(binary(&big));
        wire.extend(frame(true, OP_CLOSE, &1000u16.to_be_bytes(), [1, 1, 1, 1]));
        let mut expected = b"abcdefg".to_vec();
        expected.extend_from_slice(&big);
        for cut in (0..wire.len()).step_by(7).chain(0..40) {
            let mut d = FrameDecoder::new(1 << 20);
            let (data, replies, end) = decode_in_reads(&mut d, &wire, &[cut]);
            assert_eq!(data, expected, "cut at {cut}");
            assert_eq!(
                replies,
                [&[0x8A, 5][..], b"ping!", &[0x88, 2, 0x03, 0xE8]].concat(),
                "cut at {cut}"
            );
            assert_eq!(end, Some(Ok(())), "cut at {cut}");
        }
        // One byte per read.
        let mut d = FrameDecoder::new(1 << 20);
        let cuts: Vec<usize> = (1..wire.len()).collect();
        let (data, _, end) = decode_in_reads(&mut d, &wire, &cuts);
        assert_eq!(data, expected);
        assert_eq!(end, Some(Ok(())));
    }

    #[test]
    fn close_frames() {
        let close = |payload: &[u8]| {
            let mut d = FrameDecoder::new(1024);
            let mut wire = binary(b"x");
            wire.extend(frame(true, OP_CLOSE, payload, [3, 1, 4, 1]));
            wire.extend(binary(b"after the close"));
            decode_in_reads(&mut d, &wire, &[])
        };
        // No code: an empty close back; nothing after the close is read.
        assert_eq!(close(&[]), (b"x".to_vec(), vec![0x88, 0], Some(Ok(()))));
        let mut going_away = 1001u16.to_be_bytes().to_vec();
        going_away.extend_from_slice(b"bye");
        assert_eq!(
            close(&going_away),
            (b"x".to_vec(), vec![0x88, 2, 0x03, 0xE9], Some(Ok(())))
        );
        let code = |c: u16| close(&c.to_be_bytes()).2.unwrap().err().map(|v| v.code);
        assert_eq!(code(4000), None);
        assert_eq!(code(1005), Some(CLOSE_PROTOCOL_ERROR));
        assert_eq!(code(999), Some(CLOSE_PROTOCOL_ERROR));
        assert_eq!(code(2000), Some(CLOSE_PROTOCOL_ERROR));
        assert_eq!(
            close(&[3]).2.unwrap().unwrap_err().code,
            CLOSE_PROTOCOL_ERROR
        );
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.extend_from_slice(&[0xFF, 0xFE]);
        let (data, _, end) = close(&bad_reason);
        assert_eq!(data, b"x", "the bytes before the violation are kept");
        assert_eq!(end.unwrap().unwrap_err().code, CLOSE_INVALID_PAYLOAD);
    }

    #[test]
    fn violations_end_the_stream_with_their_close_code() {
        // The close code; the MQTT bytes before the violation must have
        // come through, and nothing else.
        let code_after = |wire: Vec<u8>, max: usize, before: &[u8]| {
            let mut d = FrameDecoder::new(max);
            let mut all = binary(b"ok");
            all.extend(wire);
            let (data, _, end) = decode_in_reads(&mut d, &all, &[]);
            assert_eq!(data, [&b"ok"[..], before].concat());
            end.expect("an end").expect_err("a violation").code
        };
        let code = |wire: Vec<u8>, max: usize| code_after(wire, max, b"");
        let m = [1, 2, 3, 4];
        let mut unmasked = binary(b"abc");
        unmasked[1] &= 0x7F;
        assert_eq!(code(unmasked, 100), CLOSE_PROTOCOL_ERROR);
        let mut rsv = binary(b"abc");
        rsv[0] |= 0x40;
        assert_eq!(code(rsv, 100), CLOSE_PROTOCOL_ERROR);
        assert_eq!(code(frame(true, 0x3, b"", m), 100), CLOSE_PROTOCOL_ERROR);
        assert_eq!(
            code(frame(true, OP_TEXT, b"hi", m), 100),
            CLOSE_UNSUPPORTED_DATA
        );
        assert_eq!(
            code(frame(false, OP_PING, b"", m), 100),
            CLOSE_PROTOCOL_ERROR
        );
        assert_eq!(
            code(frame(true, OP_PING, &[0; 126], m), 1000),
            CLOSE_PROTOCOL_ERROR
        );
        assert_eq!(
            code(frame(true, OP_CONTINUATION, b"x", m), 100),
            CLOSE_PROTOCOL_ERROR
        );
        let mut two_starts = frame(false, OP_BINARY, b"a", m);
        two_starts.extend(frame(true, OP_BINARY, b"b", m));
        assert_eq!(code_after(two_starts, 100, b"a"), CLOSE_PROTOCOL_ERROR);
        // Larger than the maximum: one frame, or a message's fragments together.
        assert_eq!(code(binary(&[0; 101]), 100), CLOSE_TOO_BIG);
        let mut fragments = frame(false, OP_BINARY, &[0; 60], m);
        fragments.extend(frame(true, OP_CONTINUATION, &[0; 60], m));
        assert_eq!(code_after(fragments, 100, &[0; 60]), CLOSE_TOO_BIG);
        // A length the client merely claims is refused from the header,
        // before any of it arrives.
        let mut claim = vec![0x82, 0x80 | 127];
        claim.extend_from_slice(&(1u64 << 40).to_be_bytes());
        claim.extend_from_slice(&m);
        assert_eq!(code(claim, 1 << 20), CLOSE_TOO_BIG);
        let mut top_bit = vec![0x82, 0x80 | 127];
        top_bit.extend_from_slice(&u64::MAX.to_be_bytes());
        top_bit.extend_from_slice(&m);
        assert_eq!(code(top_bit, 1 << 20), CLOSE_PROTOCOL_ERROR);
    }

    #[test]
    fn empty_frames_and_pongs_carry_nothing() {
        let mut d = FrameDecoder::new(100);
        let mut wire = frame(false, OP_BINARY, b"", [1, 1, 1, 1]);
        wire.extend(frame(true, OP_PONG, b"unsolicited", [2, 2, 2, 2]));
        wire.extend(frame(true, OP_CONTINUATION, b"", [1, 1, 1, 1]));
        wire.extend(binary(b"z"));
        assert_eq!(
            decode_in_reads(&mut d, &wire, &[]),
            (b"z".to_vec(), vec![], None)
        );
    }

    /// A client that sends pings and never reads the pongs: the reader
    /// stops reading once [`MAX_CONTROL_BACKLOG`] bytes of pongs wait, and
    /// goes on when the client reads them.
    #[tokio::test]
    async fn unread_pongs_push_back_on_the_client() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const PINGS: usize = 60_000; // 7.7 MB of pongs: more than the kernel buffers hold

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(4096).unwrap();
        let client = client
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (read, write) = crate::websocket::socket::split_tcp(server);
        let out = Arc::new(Mutex::new(Out::new(write)));
        out.lock().upgraded = true;
        let mut reader = WsReader::new(read, Vec::new(), 1 << 20, Arc::clone(&out));
        let (mut client_read, mut client_write) = client.into_split();
        let sender = tokio::spawn(async move {
            let ping = frame(true, OP_PING, &[b'p'; MAX_CONTROL_PAYLOAD], [1, 2, 3, 4]);
            for _ in 0..PINGS {
                client_write.write_all(&ping).await.unwrap();
            }
            client_write
                .write_all(&binary(b"after the pings"))
                .await
                .unwrap();
            client_write
        });

        let mut buf = BytesMut::with_capacity(4096);
        let stalled = tokio::time::timeout(Duration::from_secs(2), reader.read_buf(&mut buf)).await;
        assert!(
            stalled.is_err(),
            "no MQTT bytes can arrive before the pings end"
        );
        let queued = out.lock().control.len();
        assert!(
            // The replies to one read come on top (a pong is never longer
            // than its ping).
            queued <= MAX_CONTROL_BACKLOG + buf.capacity(),
            "{queued} bytes of pongs queued"
        );
        assert!(!sender.is_finished(), "the client is pushed back");

        // The client reads its pongs: everything flows again.
        let pongs = tokio::spawn(async move {
            let pong_len = 2 + MAX_CONTROL_PAYLOAD;
            let mut total = 0;
            let mut chunk = vec![0u8; 64 * 1024];
            while total < PINGS * pong_len {
                let n = client_read.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed after {total} bytes");
                total += n;
            }
            total / pong_len
        });
        let read = tokio::time::timeout(Duration::from_secs(30), async {
            while buf.len() < b"after the pings".len() {
                reader.read_buf(&mut buf).await.unwrap();
            }
        })
        .await;
        assert!(read.is_ok(), "the reader goes on once the pongs are read");
        assert_eq!(&buf[..], b"after the pings");
        assert_eq!(pongs.await.unwrap(), PINGS, "every ping answered");
        drop(sender.await.unwrap());
    }

    /// One piece of a client's stream in the property tests below.
    #[derive(Debug, Clone)]
    enum Piece {
        /// A binary message, in as many fragments as the payload is cut.
        Message(Vec<u8>, Vec<usize>, [u8; 4]),
        Ping(Vec<u8>, [u8; 4]),
        Pong(Vec<u8>, [u8; 4]),
    }

    fn piece() -> impl proptest::strategy::Strategy<Value = Piece> {
        use proptest::prelude::*;
        let mask = any::<[u8; 4]>();
        prop_oneof![
            4 => (
                proptest::collection::vec(any::<u8>(), 0..300),
                proptest::collection::vec(0usize..300, 0..4),
                mask
            )
                .prop_map(|(p, cuts, m)| Piece::Message(p, cuts, m)),
            1 => (proptest::collection::vec(any::<u8>(), 0..=125), mask)
                .prop_map(|(p, m)| Piece::Ping(p, m)),
            1 => (proptest::collection::vec(any::<u8>(), 0..=125), mask)
                .prop_map(|(p, m)| Piece::Pong(p, m)),
        ]
    }

    proptest::proptest! {
        /// Whatever the frames and wherever the reads end, the MQTT bytes
        /// are the binary payloads in order and every ping is answered.
        #[test]
        fn any_frames_in_any_reads(
            pieces in proptest::collection::vec(piece(), 0..12),
            read_cuts in proptest::collection::vec(0usize..4000, 0..8),
        ) {
            let (mut wire, mut data, mut pongs) = (Vec::new(), Vec::new(), Vec::new());
            for p in &pieces {
                match p {
                    Piece::Message(payload, cuts, m) => {
                        let mut cuts: Vec<usize> =
                            cuts.iter().map(|c| c % (payload.len() + 1)).collect();
                        cuts.sort_unstable();
                        let mut at = 0;
                        for (i, &c) in cuts.iter().chain([&payload.len()]).enumerate() {
                            let op = if i == 0 { OP_BINARY } else { OP_CONTINUATION };
                            wire.extend(frame(i == cuts.len(), op, &payload[at..c], *m));
                            at = c;
                        }
                        data.extend_from_slice(payload);
                    }
                    Piece::Ping(payload, m) => {
                        wire.extend(frame(true, OP_PING, payload, *m));
                        pongs.extend_from_slice(&[0x8A, payload.len() as u8]);
                        pongs.extend_from_slice(payload);
                    }
                    Piece::Pong(payload, m) => wire.extend(frame(true, OP_PONG, payload, *m)),
                }
            }
            let mut cuts: Vec<usize> =
                read_cuts.iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.sort_unstable();
            let mut d = FrameDecoder::new(1 << 20);
            let (got, replies, end) = decode_in_reads(&mut d, &wire, &cuts);
            proptest::prop_assert_eq!(got, data);
            proptest::prop_assert_eq!(replies, pongs);
            proptest::prop_assert_eq!(end, None);
        }

        /// Arbitrary bytes never panic, and the decoder never claims more
        /// MQTT bytes than it was given.
        #[test]
        fn garbage_is_refused_not_trusted(
            wire in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000),
            cut in 0usize..2000,
        ) {
            let mut d = FrameDecoder::new(512);
            let cut = cut % (wire.len() + 1);
            let (got, replies, _) = decode_in_reads(&mut d, &wire, &[cut]);
            proptest::prop_assert!(got.len() <= wire.len());
            proptest::prop_assert!(replies.len() <= wire.len());
        }
    }

    #[test]
    fn unmask_at_any_phase() {
        let mask = [0xA1, 0xB2, 0xC3, 0xD4];
        let plain: Vec<u8> = (0..37).collect();
        for phase in 0..4 {
            let mut data: Vec<u8> = plain
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[(phase + i) % 4])
                .collect();
            unmask(&mut data, mask, phase as u8);
            assert_eq!(data, plain, "phase {phase}");
        }
    }
}
