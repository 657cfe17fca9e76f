//! MQTT over WebSocket (RFC 6455; MQTT 5.0 section 6, MQTT 3.1.1 section 6).
//!
//! A WebSocket connection is only another byte stream: after the HTTP upgrade
//! this module hands [`connection::serve`] a reader and a writer, and the
//! whole protocol (CONNECT, keep alive, connect timeout, sessions, takeover
//! across transports, wills, fan-out) runs exactly as it does over TCP.
//!
//! ```text
//!           TcpStream
//!        ┌──────┴───────┐
//!   OwnedReadHalf   OwnedWriteHalf ◄── Out (Arc<Mutex>): control frames, frame state
//!        │                 ▲   ▲
//!   tungstenite ───────────┘   │ (pong, close reply: complete frames, queued in Out)
//!   (handshake, frame          │
//!    parsing, defragmenting)   │
//!        │                     │
//!    WsReader (AsyncRead)   WsWriter (AsyncWrite): one unmasked binary frame
//!        │                     │   per write batch, header + payload slices
//!        └──► connection::serve ◄┘   in one vectored write
//! ```
//!
//! **Handshake.** `tokio-tungstenite`'s `accept_hdr_async` runs the upgrade;
//! our callback refuses a path other than `listeners.ws_path` (HTTP 404) and
//! an upgrade whose `Sec-WebSocket-Protocol` offers neither `mqtt` nor
//! `mqttv3.1` (HTTP 400); otherwise it answers with the first of the two in
//! the client's order of preference. With `listeners.ws_trust_forwarded_for`
//! the first `X-Forwarded-For` address becomes the peer address in logs. The
//! upgrade must complete within the connect timeout.
//!
//! **Inbound.** tungstenite parses frames (payloads are `Bytes` slices of its
//! read buffer), unmasks them in place, joins fragmented messages, answers
//! pings and close frames, and enforces `limits.max_packet_size` as the
//! largest WebSocket frame and message. [`WsReader`] copies each binary
//! message into the connection's read buffer: the only copy. One read call
//! takes every message tungstenite already has (up to the buffer's room),
//! and waiting for input needs no buffer (`TransportRead::poll_readable`
//! takes the next message and keeps it), so idle connections hold none. WebSocket
//! message boundaries mean nothing to MQTT: one message may hold several
//! packets or part of one. A text message ends the connection with close
//! code 1003, an oversized one with 1009, a protocol error with 1002.
//!
//! **Outbound.** Server frames are not masked, so framing needs no copy:
//! [`WsWriter`] turns each vectored write from the connection's writer (one
//! batch of packets, [`MAX_OUT_FRAME`] at most) into one binary frame, writing
//! the 2-10 byte frame header and the caller's slices (PUBLISH payloads
//! straight from the shared message) in one vectored write. tungstenite never
//! writes to the socket itself: the frames it produces (pong, close reply,
//! the handshake response) are queued in [`Out`] and written between data
//! frames, never inside one.
//!
//! **Closing.** When [`connection::serve`] ends, the writer (or, for a
//! connection that never got as far as CONNACK, [`serve_ws`]) sends a close
//! frame (1000, or the code the reader recorded) unless the client closed
//! first, and shuts the TCP connection down. A client that vanishes without a
//! close frame is an ordinary end of stream: its will is published and the
//! registry counts it out, exactly as over TCP.

use std::io;
use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::Stream;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::broker::Broker;
use crate::connection;

/// WebSocket subprotocols MQTT clients offer: `mqtt` (3.1.1 and 5.0) and
/// `mqttv3.1` (MQTT 3.1).
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Largest payload of one outbound frame. A bigger write batch continues in
/// the next frame (MQTT allows a packet to span WebSocket messages); the cap
/// keeps frames within what common client libraries accept by default.
pub const MAX_OUT_FRAME: usize = 1024 * 1024;

/// tungstenite's read buffer per connection (its default, 128 KiB, is a lot
/// for a broker holding many idle connections).
const WS_READ_BUFFER: usize = 8 * 1024;

/// Time the final close frame and flush get once a connection is over.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// WebSocket close codes (RFC 6455 section 7.4.1).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_UNSUPPORTED_DATA: u16 = 1003;
const CLOSE_INVALID_PAYLOAD: u16 = 1007;
const CLOSE_TOO_BIG: u16 = 1009;

/// Accepts one TCP connection on a WebSocket listener: runs the upgrade, then
/// serves MQTT over it until it closes.
// The handshake callback's `Result<Response, ErrorResponse>` is tungstenite's.
#[allow(clippy::result_large_err)]
pub async fn serve_ws(broker: Arc<Broker>, mut stream: TcpStream, tcp_peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let tcp_peer = if broker.config.listeners.ws_proxy_protocol {
        let header = tokio::time::timeout(
            broker.config.connect_timeout(),
            crate::proxy_protocol::read_header(&mut stream),
        )
        .await;
        match header {
            Ok(Ok(Some(client))) => client,
            Ok(Ok(None)) => tcp_peer,
            Ok(Err(e)) => {
                tracing::info!(peer = %tcp_peer, error = %e, "connection refused");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %tcp_peer, "no PROXY protocol header in time");
                return;
            }
        }
    } else {
        tcp_peer
    };
    let (read, write) = stream.into_split();
    let out = Arc::new(Mutex::new(Out::new(write)));
    let transport = Transport {
        read,
        out: Arc::clone(&out),
    };
    let listeners = &broker.config.listeners;
    let max = broker.config.limits.max_packet_size as usize;
    let config = WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let mut forwarded: Option<IpAddr> = None;
    let callback = |request: &Request, response: Response| {
        let answer = check_upgrade(request, response, &listeners.ws_path);
        if answer.is_ok() && listeners.ws_trust_forwarded_for {
            forwarded = forwarded_for(request);
        }
        answer
    };
    let handshake = tokio::time::timeout(
        broker.config.connect_timeout(),
        tokio_tungstenite::accept_hdr_async_with_config(transport, callback, Some(config)),
    )
    .await;
    let ws = match handshake {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!(peer = %tcp_peer, error = %e, "WebSocket upgrade refused");
            if let WsError::Protocol(why) = &e {
                // Not a WebSocket upgrade at all (a plain GET, a missing
                // key ...): tungstenite answers nothing, so say why here.
                let body = format!("not a valid WebSocket upgrade: {why}\n");
                let head = format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let mut o = out.lock();
                o.control.extend_from_slice(head.as_bytes());
                o.control.extend_from_slice(body.as_bytes());
            }
            close_quietly(&out).await;
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %tcp_peer, "no WebSocket upgrade within the connect timeout");
            return;
        }
    };
    out.lock().upgraded = true;
    let peer = match forwarded {
        Some(ip) => {
            tracing::debug!(proxy = %tcp_peer, client = %ip, "client address from X-Forwarded-For");
            SocketAddr::new(ip, 0)
        }
        None => tcp_peer,
    };
    let reader = WsReader {
        ws,
        current: Bytes::new(),
        out: Arc::clone(&out),
        done: false,
        failed: None,
    };
    let writer = WsWriter {
        out: Arc::clone(&out),
    };
    connection::serve(broker, reader, writer, &peer).await;
    // The writer normally closed already; this covers connections that ended
    // before CONNACK (connect timeout, refused CONNECT, a text frame ...).
    close_quietly(&out).await;
}

/// The handshake callback: path and subprotocol.
#[allow(clippy::result_large_err)] // tungstenite's callback signature
fn check_upgrade(
    request: &Request,
    mut response: Response,
    path: &str,
) -> Result<Response, ErrorResponse> {
    if request.uri().path() != path {
        return Err(refusal(
            StatusCode::NOT_FOUND,
            format!("no MQTT WebSocket endpoint here; use {path}\n"),
        ));
    }
    let offered = request
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    let mut chosen = None;
    for protocol in offered {
        if let Some(p) = SUBPROTOCOLS.iter().find(|p| **p == protocol) {
            chosen = Some(*p);
            break;
        }
    }
    let Some(chosen) = chosen else {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Protocol must offer \"mqtt\" or \"mqttv3.1\"\n".to_owned(),
        ));
    };
    response
        .headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static(chosen));
    Ok(response)
}

fn refusal(status: StatusCode, body: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(body.clone()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("text/plain"));
    headers.insert("content-length", HeaderValue::from(body.len()));
    headers.insert("connection", HeaderValue::from_static("close"));
    response
}

/// The first address of an `X-Forwarded-For` header (`203.0.113.7`,
/// `203.0.113.7:5000`, `[2001:db8::1]:5000` or `2001:db8::1`).
fn forwarded_for(request: &Request) -> Option<IpAddr> {
    let header = request.headers().get("x-forwarded-for")?.to_str().ok()?;
    let first = header.split(',').next()?.trim();
    first
        .parse::<IpAddr>()
        .ok()
        .or_else(|| first.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            first
                .strip_prefix('[')
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse().ok())
        })
}

/// Sends the close frame if nobody did, flushes, shuts the socket down;
/// bounded by [`CLOSE_FLUSH`], errors ignored (the peer may be gone).
async fn close_quietly(out: &Mutex<Out>) {
    let _ = tokio::time::timeout(
        CLOSE_FLUSH,
        std::future::poll_fn(|cx| out.lock().poll_close(cx)),
    )
    .await;
}

/// The write side, shared by tungstenite (control frames) and [`WsWriter`]
/// (data frames). Locked only inside `poll_*` calls, never across an await.
struct Out {
    sock: OwnedWriteHalf,
    /// Complete frames (or the handshake response) from tungstenite, waiting
    /// until no data frame is half written.
    control: BytesMut,
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
    close_sent: bool,
    /// The client sent a close frame; tungstenite queues the reply.
    peer_closed: bool,
    /// Close code the reader chose for the close frame (default 1000).
    close_code: Option<u16>,
    /// The TCP write side has been shut down.
    shut: bool,
    /// The upgrade succeeded: the stream carries WebSocket frames (before
    /// that, or after a refused upgrade, a close frame would be garbage).
    upgraded: bool,
}

impl Out {
    fn new(sock: OwnedWriteHalf) -> Out {
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

    /// Writes the queued control frames; `Pending` while a data frame is
    /// half written (woken when it ends).
    fn poll_flush_control(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.control.is_empty() {
            return Poll::Ready(Ok(()));
        }
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
        Poll::Ready(Ok(()))
    }

    /// The end of the connection: a close frame (unless one was sent or the
    /// client closed first, in which case tungstenite's reply is queued),
    /// the flush, the TCP shutdown. A data frame cut off half way cannot be
    /// followed by anything, so then the socket is just shut down.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
fn frame_header(header: &mut [u8; 10], opcode: u8, len: usize) -> usize {
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

/// The stream tungstenite runs on: reads from the socket, writes into
/// [`Out::control`].
struct Transport {
    read: OwnedReadHalf,
    out: Arc<Mutex<Out>>,
}

impl AsyncRead for Transport {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut out = self.out.lock();
        // After our close frame nothing may follow (RFC 6455 section 5.5.1).
        if !out.close_sent {
            out.control.extend_from_slice(buf);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.out.lock().poll_flush_control(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.out.lock().poll_flush_control(cx)
    }
}

/// The MQTT byte stream in: binary messages, one copy each into the caller's
/// buffer.
struct WsReader {
    ws: WebSocketStream<Transport>,
    /// What is left of the current binary message.
    current: Bytes,
    out: Arc<Mutex<Out>>,
    /// The stream ended (or failed): nothing more is read from tungstenite.
    done: bool,
    /// An error still to be returned (after the bytes before it).
    failed: Option<io::Error>,
}

impl WsReader {
    /// Ends the stream with an error, and the close frame with `code`.
    fn fail(&mut self, code: u16, why: String) {
        self.done = true;
        self.out.lock().close_code.get_or_insert(code);
        self.failed = Some(io::Error::new(io::ErrorKind::InvalidData, why));
    }
}

impl WsReader {
    /// Drives tungstenite until there is binary data in `current`, or the
    /// stream ended or failed. Control messages are handled on the way.
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if !self.current.is_empty() || self.failed.is_some() || self.done {
                return Poll::Ready(());
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.current = data,
                Some(Ok(Message::Text(_))) => {
                    self.fail(CLOSE_UNSUPPORTED_DATA, "text WebSocket message".into());
                }
                // tungstenite queues the reply; the stream ends right after.
                Some(Ok(Message::Close(_))) => self.out.lock().peer_closed = true,
                // Pings are answered by tungstenite; pongs need nothing.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(WsError::Io(e))) => {
                    self.done = true;
                    self.failed = Some(e);
                }
                Some(Err(e)) => {
                    let code = match &e {
                        WsError::Capacity(_) => CLOSE_TOO_BIG,
                        WsError::Utf8 => CLOSE_INVALID_PAYLOAD,
                        _ => CLOSE_PROTOCOL_ERROR,
                    };
                    self.fail(code, format!("WebSocket: {e}"));
                }
                None => self.done = true,
            }
        }
    }
}

/// Readiness without a buffer: the next message is taken from tungstenite
/// (whose own buffer holds it) and kept, so an idle WebSocket connection
/// holds no read buffer from the pool either.
impl crate::transport::TransportRead for WsReader {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_message(cx));
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for WsReader {
    /// Copies binary messages into `buf` until it is full or tungstenite has
    /// nothing more without waiting, so a client sending one small packet per
    /// message costs one read call per batch, not one per packet.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let start = buf.filled().len();
        loop {
            if !this.current.is_empty() {
                let n = this.current.len().min(buf.remaining());
                buf.put_slice(&this.current[..n]);
                this.current.advance(n);
                if buf.remaining() == 0 {
                    return Poll::Ready(Ok(()));
                }
            }
            let filled = buf.filled().len() > start;
            if let Some(e) = this.failed.take() {
                // Deliver what came before the failure first.
                if filled {
                    this.failed = Some(e);
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(e));
            }
            if this.done {
                return Poll::Ready(Ok(()));
            }
            match this.poll_message(cx) {
                Poll::Ready(()) => {}
                Poll::Pending if filled => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The MQTT byte stream out: each write batch one binary frame.
struct WsWriter {
    out: Arc<Mutex<Out>>,
}

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

    fn request(path: &str, protocols: &[&str], xff: Option<&str>) -> Request {
        let mut b = Request::builder().uri(path);
        for p in protocols {
            b = b.header("Sec-WebSocket-Protocol", *p);
        }
        if let Some(x) = xff {
            b = b.header("X-Forwarded-For", x);
        }
        b.body(()).unwrap()
    }

    fn chosen(r: Result<Response, ErrorResponse>) -> Result<String, u16> {
        match r {
            Ok(resp) => Ok(resp.headers()["sec-websocket-protocol"]
                .to_str()
                .unwrap()
                .to_owned()),
            Err(e) => Err(e.status().as_u16()),
        }
    }

    #[test]
    fn subprotocol_follows_client_preference() {
        let ok = |p: &[&str]| {
            chosen(check_upgrade(
                &request("/mqtt", p, None),
                Response::new(()),
                "/mqtt",
            ))
        };
        assert_eq!(ok(&["mqtt"]), Ok("mqtt".into()));
        assert_eq!(ok(&["mqttv3.1"]), Ok("mqttv3.1".into()));
        assert_eq!(ok(&["mqttv3.1, mqtt"]), Ok("mqttv3.1".into()));
        assert_eq!(ok(&["foo", "mqtt,mqttv3.1"]), Ok("mqtt".into()));
        assert_eq!(ok(&["wamp, mqtt"]), Ok("mqtt".into()));
        assert_eq!(ok(&["MQTT"]), Err(400));
        assert_eq!(ok(&[]), Err(400));
        assert_eq!(ok(&["chat"]), Err(400));
    }

    #[test]
    fn wrong_path_is_404() {
        let r = check_upgrade(&request("/ws", &["mqtt"], None), Response::new(()), "/mqtt");
        assert_eq!(chosen(r), Err(404));
        let r = check_upgrade(
            &request("/mqtt?x=1", &["mqtt"], None),
            Response::new(()),
            "/mqtt",
        );
        assert_eq!(chosen(r), Ok("mqtt".into()));
    }

    #[test]
    fn forwarded_for_takes_the_first_address() {
        let ip = |x: &str| forwarded_for(&request("/mqtt", &[], Some(x)));
        assert_eq!(
            ip("203.0.113.7, 10.0.0.1"),
            Some("203.0.113.7".parse().unwrap())
        );
        assert_eq!(ip("203.0.113.7:4711"), Some("203.0.113.7".parse().unwrap()));
        assert_eq!(ip("2001:db8::1"), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(
            ip("[2001:db8::1]:80, x"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(ip("[2001:db8::1]"), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(ip("unknown"), None);
    }

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
