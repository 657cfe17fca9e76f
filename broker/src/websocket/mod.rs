//! MQTT over WebSocket (RFC 6455; MQTT 5.0 section 6, MQTT 3.1.1 section 6).
//!
//! A WebSocket connection is only another byte stream: after the HTTP upgrade
//! this module hands [`connection::serve`] a reader and a writer, and the
//! whole protocol (CONNECT, keep alive, connect timeout, sessions, takeover
//! across transports, wills, fan-out) runs exactly as it does over TCP.
//!
//! ```text
//!          TcpStream, or TLS over it (wss://, socket.rs)
//!        ┌────────────┴─────────────┐
//!   SocketRead                  SocketWrite ◄───── Out (Arc<Mutex>): control
//!        │                          ▲   ▲          frames, data frame state
//!   UpgradeStream ── tungstenite ───┘   │ (the HTTP upgrade only)
//!        │                              │
//!   WsReader (inbound.rs):          WsWriter (outbound.rs): one unmasked
//!   frames decoded in the           binary frame per write batch, header
//!   connection's read buffer;       + payload slices in one vectored write
//!   pongs and close replies ──► Out
//!        │                              │
//!        └────► connection::serve ◄─────┘
//! ```
//!
//! **Handshake.** tungstenite runs the upgrade (`accept_hdr_async`) over an
//! [`UpgradeStream`] that hands it the request and nothing after it; our
//! callback refuses a path other than `listeners.ws_path` (HTTP 404) and an
//! upgrade whose `Sec-WebSocket-Protocol` offers neither `mqtt` nor
//! `mqttv3.1` (HTTP 400); otherwise it answers with the first of the two in
//! the client's order of preference. With `listeners.ws_trust_forwarded_for`
//! the first `X-Forwarded-For` address becomes the peer address in logs. The
//! upgrade must complete within the connect timeout. Then tungstenite is
//! done: the read half, and any frames that came with the request, go to
//! [`WsReader`]. The upgrade is one boxed future, freed when it is done: it
//! is needed once, and inline it would make every WebSocket connection's
//! task as large as tungstenite's handshake for the connection's life.
//!
//! **Inbound** ([`inbound`]). The client's frames are decoded in place in
//! the connection's pooled read buffer (unmasked, headers dropped), so an
//! idle WebSocket connection holds no read buffer, like a TCP one. Pings
//! are answered (and the reader stops reading while too many pongs wait to
//! be written), a close frame is answered and ends the stream; a text
//! message ends the connection with close code 1003, a frame or message
//! larger than `limits.max_packet_size` with 1009, a protocol error with
//! 1002.
//!
//! **Outbound** ([`outbound`]). Server frames are not masked, so framing
//! needs no copy: each vectored write from the connection's writer becomes
//! one binary frame ([`MAX_OUT_FRAME`] at most), its header and the
//! caller's slices (PUBLISH payloads straight from the shared message) in
//! one vectored write. Control frames wait in [`Out`] until no data frame
//! is half written.
//!
//! **Closing.** When [`connection::serve`] ends, the writer (or, for a
//! connection that never got as far as CONNACK, [`serve_ws`]) sends a close
//! frame (1000, or the code the reader recorded) unless the client closed
//! first, and shuts the TCP connection down. A client that vanishes without a
//! close frame is an ordinary end of stream: its will is published and the
//! registry counts it out, exactly as over TCP.

mod inbound;
mod outbound;
mod socket;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::broker::Broker;
use crate::connection;
use crate::log_throttle::throttled;
use crate::metrics::Metrics;
use inbound::WsReader;
use outbound::{Out, WsWriter};
use socket::SocketRead;

/// WebSocket subprotocols MQTT clients offer: `mqtt` (3.1.1 and 5.0) and
/// `mqttv3.1` (MQTT 3.1).
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Largest payload of one outbound frame. A bigger write batch continues in
/// the next frame (MQTT allows a packet to span WebSocket messages); the cap
/// keeps frames within what common client libraries accept by default.
pub const MAX_OUT_FRAME: usize = 1024 * 1024;

/// Time the final close frame and flush get once a connection is over.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// tungstenite's limits on the upgrade request (fixed in tungstenite, not
/// configurable): bytes of request head, and header fields. A request over
/// either is answered 431 ([`unanswered_refusal`]).
const MAX_UPGRADE_HEAD: usize = 65_536;
const MAX_UPGRADE_HEADERS: usize = 124;

/// WebSocket close codes (RFC 6455 section 7.4.1).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_UNSUPPORTED_DATA: u16 = 1003;
const CLOSE_INVALID_PAYLOAD: u16 = 1007;
const CLOSE_TOO_BIG: u16 = 1009;

/// Accepts one TCP connection on a WebSocket listener: runs the upgrade, then
/// serves MQTT over it until it closes.
pub fn serve_ws(
    broker: Arc<Broker>,
    stream: TcpStream,
    tcp_peer: SocketAddr,
) -> impl Future<Output = ()> + Send {
    serve_websocket::<false>(broker, stream, tcp_peer)
}

/// Accepts one TCP connection on a WebSocket-over-TLS (`wss://`) listener:
/// the TLS handshake with `Broker::tls`, then as [`serve_ws`].
pub fn serve_wss(
    broker: Arc<Broker>,
    stream: TcpStream,
    tcp_peer: SocketAddr,
) -> impl Future<Output = ()> + Send {
    serve_websocket::<true>(broker, stream, tcp_peer)
}

/// [`serve_ws`] and [`serve_wss`]; `TLS` is a constant, so a plain
/// WebSocket connection's task carries nothing for TLS.
///
/// An `async move` block, not an `async fn`, for the reason given at
/// [`connection::serve_tcp`]: this is the connection's task for its whole
/// life.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
fn serve_websocket<const TLS: bool>(
    broker: Arc<Broker>,
    stream: TcpStream,
    tcp_peer: SocketAddr,
) -> impl Future<Output = ()> + Send {
    async move {
        // Boxed: the upgrade (a PROXY header, tungstenite's handshake) is
        // needed once, and inline it would be part of every WebSocket
        // connection's task for the connection's whole life.
        let (peer, out, mut reader);
        let serving = {
            // Scoped, so that what the upgrade returned is not kept beside
            // the connection's future across its await (measured: 8 bytes
            // of the task; see broker/tests/footprint.rs).
            let Some(upgraded) = Box::pin(upgrade(&broker, stream, tcp_peer, TLS)).await else {
                return;
            };
            let Upgraded {
                reader: ws_reader,
                writer,
                peer: client,
            } = upgraded;
            peer = client;
            reader = ws_reader;
            out = Arc::clone(&writer.out);
            connection::serve(broker, &mut reader, writer, &peer)
        };
        // As over TCP (`connection::serve_tcp`): a connection the broker
        // ended reads what its client still sends (its close frame ends
        // that) before the socket is dropped, so that unread bytes do not
        // make TCP reset it under the DISCONNECT and the close frame.
        let lingering = serving
            .await
            .map(|permit| Box::pin(connection::linger_counted(&mut reader, permit)));
        if let Some(lingering) = lingering {
            lingering.await;
        }
        // The writer normally closed already; this covers connections that
        // ended before CONNACK (connect timeout, refused CONNECT, a text
        // frame ...).
        close_quietly(&out).await;
    }
}

/// A connection after its upgrade: MQTT bytes in and out, and the client's
/// address for logs.
struct Upgraded {
    reader: WsReader,
    writer: WsWriter,
    peer: SocketAddr,
}

/// The upgrade: an optional PROXY protocol header, the TLS handshake for
/// `wss://`, then tungstenite's HTTP handshake with our checks, all within
/// one connect timeout. `None` when the connection is refused or closed
/// before it completes (answered and logged here).
// The handshake callback's `Result<Response, ErrorResponse>` is tungstenite's.
#[allow(clippy::result_large_err)]
async fn upgrade(
    broker: &Broker,
    mut stream: TcpStream,
    tcp_peer: SocketAddr,
    tls: bool,
) -> Option<Upgraded> {
    let _ = stream.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + broker.config.connect_timeout();
    // A proxy's PROXY header comes before TLS (HAProxy's send-proxy on a
    // TLS pass-through).
    let tcp_peer = if broker.config.listeners.ws_proxy_protocol {
        let header =
            tokio::time::timeout_at(deadline, crate::proxy_protocol::read_header(&mut stream))
                .await;
        match header {
            Ok(Ok(Some(client))) => client,
            Ok(Ok(None)) => tcp_peer,
            Ok(Err(e)) => {
                throttled!(INFO, peer = %tcp_peer, error = %e, "connection refused");
                return None;
            }
            Err(_) => {
                Metrics::inc(&broker.metrics.connect_timeouts);
                throttled!(INFO, peer = %tcp_peer, "closed: no PROXY protocol header within the connect timeout");
                return None;
            }
        }
    } else {
        tcp_peer
    };
    let (read, write) = if tls {
        let stream = crate::tls::handshake(broker, stream, tcp_peer, deadline).await?;
        socket::split_tls(stream)
    } else {
        socket::split_tcp(stream)
    };
    let out = Arc::new(Mutex::new(Out::new(write)));
    let transport = UpgradeStream {
        read: Some(read),
        out: Arc::clone(&out),
        matched: 0,
        after_request: Vec::new(),
    };
    let listeners = &broker.config.listeners;
    // tungstenite only runs the upgrade: no buffers for frames.
    let config = WebSocketConfig::default()
        .read_buffer_size(0)
        .write_buffer_size(0);
    let mut forwarded: Option<IpAddr> = None;
    let callback = |request: &Request, response: Response| {
        let answer = check_upgrade(request, response, &listeners.ws_path);
        if answer.is_ok() && listeners.ws_trust_forwarded_for {
            forwarded = forwarded_for(request);
        }
        answer
    };
    let handshake = tokio::time::timeout_at(
        deadline,
        tokio_tungstenite::accept_hdr_async_with_config(transport, callback, Some(config)),
    )
    .await;
    let mut ws = match handshake {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) if gone_during_upgrade(&e) => {
            // A health check's connect-and-close, a client that went away.
            tracing::debug!(peer = %tcp_peer, error = %e, "closed during the WebSocket upgrade");
            return None;
        }
        Ok(Err(e)) => {
            Metrics::inc(&broker.metrics.websocket_upgrades_refused);
            throttled!(INFO, peer = %tcp_peer, error = %e, "WebSocket upgrade refused");
            if let Some((status, why)) = unanswered_refusal(&e) {
                let body = format!("{why}\n");
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let mut o = out.lock();
                o.control.extend_from_slice(head.as_bytes());
                o.control.extend_from_slice(body.as_bytes());
            }
            close_quietly(&out).await;
            return None;
        }
        Err(_) => {
            Metrics::inc(&broker.metrics.connect_timeouts);
            throttled!(INFO, peer = %tcp_peer, "closed: no WebSocket upgrade within the connect timeout");
            return None;
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
    let stream = ws.get_mut();
    let read = stream.read.take()?;
    let early = std::mem::take(&mut stream.after_request);
    drop(ws);
    let max = broker.config.limits.max_packet_size as usize;
    Some(Upgraded {
        reader: WsReader::new(read, early, max, Arc::clone(&out)),
        writer: WsWriter { out },
        peer,
    })
}

/// Whether the upgrade failed because the connection did (nothing to
/// answer, nothing the client did wrong).
fn gone_during_upgrade(e: &WsError) -> bool {
    matches!(
        e,
        WsError::Io(_)
            | WsError::ConnectionClosed
            | WsError::AlreadyClosed
            | WsError::Protocol(ProtocolError::HandshakeIncomplete)
    )
}

/// The answer to an upgrade that tungstenite refused without answering:
/// the status line and why, or `None` when there is nobody to answer (the
/// connection failed) or tungstenite already answered (our callback's
/// refusals, [`check_upgrade`]).
fn unanswered_refusal(e: &WsError) -> Option<(&'static str, String)> {
    match e {
        // Not a WebSocket upgrade at all (a plain GET, a missing key ...).
        WsError::Protocol(why) => Some((
            "400 Bad Request",
            format!("not a valid WebSocket upgrade: {why}"),
        )),
        // tungstenite reads at most 64 KiB of request head, in pieces of
        // 128 bytes on average, with at most 124 header fields.
        WsError::AttackAttempt | WsError::Capacity(_) => Some((
            "431 Request Header Fields Too Large",
            format!(
                "the upgrade request's head is over {MAX_UPGRADE_HEAD} bytes, has over \
                 {MAX_UPGRADE_HEADERS} header fields, or came in too many small pieces"
            ),
        )),
        _ => None,
    }
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

/// The stream tungstenite runs the upgrade on. It reads from the socket but
/// hands tungstenite the request only, up to its blank line: bytes after it
/// (frames of a client that did not wait for the response) are kept in
/// `after_request` for the [`WsReader`]. What tungstenite writes (the
/// response, or a refusal) is queued in [`Out`].
struct UpgradeStream {
    /// `None` once taken for the reader.
    read: Option<SocketRead>,
    out: Arc<Mutex<Out>>,
    /// How much of the request's final `\r\n\r\n` has been seen (4: all).
    matched: u8,
    after_request: Vec<u8>,
}

impl UpgradeStream {
    /// Finds the end of the request in `read`, bytes following what was
    /// scanned before; returns how many of them belong to the request.
    fn request_part(&mut self, read: &[u8]) -> usize {
        for (i, &b) in read.iter().enumerate() {
            self.matched = match (self.matched, b) {
                (0 | 2, b'\r') | (1 | 3, b'\n') => self.matched + 1,
                (_, b'\r') => 1,
                _ => 0,
            };
            if self.matched == 4 {
                return i + 1;
            }
        }
        read.len()
    }
}

impl AsyncRead for UpgradeStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.matched == 4 {
            // The request is complete: tungstenite has what it needs.
            return Poll::Ready(Ok(()));
        }
        let Some(read) = this.read.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        let start = buf.filled().len();
        ready!(Pin::new(read).poll_read(cx, buf))?;
        let end = start + this.request_part(&buf.filled()[start..]);
        this.after_request.extend_from_slice(&buf.filled()[end..]);
        buf.set_filled(end);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for UpgradeStream {
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
}
