//! Opening MQTT connections: TCP connect, CONNECT/CONNACK, SUBSCRIBE/SUBACK;
//! the same over TLS (`--transport tls`: rustls, verifying the broker's
//! certificate), and, for `conn --transport ws`, over WebSocket.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tern_codec::{decode_packet, Packet, ProtocolVersion, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::wire;

/// An open, accepted MQTT connection.
pub struct Conn {
    pub stream: Stream,
    /// Bytes read after the last packet handled during setup.
    pub leftover: BytesMut,
    /// MQTT 5: the broker's Receive Maximum from CONNACK.
    pub receive_maximum: Option<u16>,
}

/// The byte stream under a connection: TCP, or TLS over TCP (boxed: rustls
/// keeps its buffers inline, and `conn` holds thousands of these).
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// The read half of a [`Stream`]: TCP's own halves need no lock.
pub enum ReadHalf {
    Tcp(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

/// The write half of a [`Stream`].
pub enum WriteHalf {
    Tcp(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

impl Stream {
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

/// Delegates the `AsyncRead` of each variant.
macro_rules! delegate_read {
    ($type:ident) => {
        impl AsyncRead for $type {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $type::Tcp(s) => Pin::new(s).poll_read(cx, buf),
                    $type::Tls(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
}

/// Delegates the `AsyncWrite` of each variant.
macro_rules! delegate_write {
    ($type:ident) => {
        impl AsyncWrite for $type {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $type::Tcp(s) => Pin::new(s).poll_write(cx, buf),
                    $type::Tls(s) => Pin::new(s).poll_write(cx, buf),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $type::Tcp(s) => Pin::new(s).poll_flush(cx),
                    $type::Tls(s) => Pin::new(s).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $type::Tcp(s) => Pin::new(s).poll_shutdown(cx),
                    $type::Tls(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}

delegate_read!(Stream);
delegate_write!(Stream);
delegate_read!(ReadHalf);
delegate_write!(WriteHalf);

impl Conn {
    /// Fixes the socket's send buffer at `bytes` (SO_SNDBUF, which turns
    /// off the kernel's autotuning for this socket).
    pub fn set_send_buffer(&self, bytes: usize) -> io::Result<()> {
        let size = libc::c_int::try_from(bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "send buffer too large"))?;
        // SAFETY: a valid socket fd and a c_int option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                self.stream.tcp().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Sends DISCONNECT if the socket takes it at once; never waits.
    pub fn try_disconnect(&mut self) {
        match &mut self.stream {
            Stream::Tcp(s) => {
                let _ = s.try_write(&wire::DISCONNECT);
            }
            Stream::Tls(s) => {
                let _ = s.write_all(&wire::DISCONNECT).now_or_never();
                let _ = s.flush().now_or_never();
            }
        }
    }
}

/// An open, accepted MQTT connection over WebSocket. The WebSocket side is
/// tungstenite's client, so the broker's upgrade and framing are measured
/// against an implementation that is not Tern's.
pub struct WsConn {
    ws: WebSocketStream<TcpStream>,
}

impl WsConn {
    /// Sends DISCONNECT in a binary message if the socket takes it at once;
    /// like `try_write` on TCP, never waits.
    pub fn try_disconnect(&mut self) {
        let _ = self
            .ws
            .send(Message::Binary(Bytes::from_static(&wire::DISCONNECT)))
            .now_or_never();
    }
}

/// Why a connection could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// TCP error, or no answer in time.
    Failed(String),
    /// The broker answered CONNACK with a failure, or closed the connection
    /// before answering.
    Refused(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Failed(e) => write!(f, "connection failed: {e}"),
            OpenError::Refused(e) => write!(f, "connection refused: {e}"),
        }
    }
}

/// Reads until one whole control packet has arrived.
async fn read_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    version: ProtocolVersion,
) -> io::Result<Option<Packet>> {
    loop {
        match decode_packet(buf, version, usize::MAX) {
            Ok(Some(p)) => return Ok(Some(p)),
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        }
        buf.reserve(4096);
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// The source address of connection `index` to `addr`: when the broker is
/// on IPv4 loopback, connections are spread over `spread` source addresses
/// 127.0.X.1 so that each has its own ephemeral port range. With tens of
/// thousands of connections per run (and as many in TIME_WAIT from the run
/// before), a single source address makes every connect() search a nearly
/// full port range, which shows up as connect times of a second.
pub fn source_for(addr: SocketAddr, index: usize, spread: usize) -> Option<IpAddr> {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_loopback() && spread > 0 => {
            let x = 1 + (index % spread.min(250)) as u8;
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, x, 1)))
        }
        _ => None,
    }
}

async fn tcp_connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(addr).await;
    };
    let socket = TcpSocket::new_v4()?;
    // Choose the port at connect time, from the whole 4-tuple, rather than
    // reserving one at bind time.
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// TCP connect (from `source` when given), CONNECT, and CONNACK, all within
/// `timeout`.
pub async fn open(
    addr: SocketAddr,
    source: Option<IpAddr>,
    version: ProtocolVersion,
    client_id: &str,
    keep_alive: u16,
    persistent: bool,
    timeout: Duration,
) -> Result<Conn, OpenError> {
    match tokio::time::timeout(
        timeout,
        open_inner(addr, source, version, client_id, keep_alive, persistent),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(OpenError::Failed(format!(
            "no CONNACK within {:.1} s",
            timeout.as_secs_f64()
        ))),
    }
}

async fn open_inner(
    addr: SocketAddr,
    source: Option<IpAddr>,
    version: ProtocolVersion,
    client_id: &str,
    keep_alive: u16,
    persistent: bool,
) -> Result<Conn, OpenError> {
    let mut stream = tcp_connect(addr, source)
        .await
        .map_err(|e| OpenError::Failed(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let refused = |e: io::Error| OpenError::Refused(e.to_string());
    stream
        .write_all(&wire::connect(version, client_id, keep_alive, persistent))
        .await
        .map_err(refused)?;
    let mut buf = BytesMut::with_capacity(64);
    match read_packet(&mut stream, &mut buf, version)
        .await
        .map_err(refused)?
    {
        Some(Packet::ConnAck(ack)) if ack.code.is_success() => Ok(Conn {
            stream: Stream::Tcp(stream),
            leftover: buf,
            receive_maximum: ack.properties.receive_maximum,
        }),
        Some(Packet::ConnAck(ack)) => Err(OpenError::Refused(format!("CONNACK {:?}", ack.code))),
        Some(other) => Err(OpenError::Refused(format!(
            "expected CONNACK, got {:?}",
            other.packet_type()
        ))),
        None => Err(OpenError::Refused("closed before CONNACK".into())),
    }
}

/// The TLS client of `--transport tls`: trusts the CAs in `ca_file`
/// and nothing else (ring provider, TLS 1.2 and 1.3). Session resumption is
/// off: every connection pays for a full handshake, as distinct devices do.
pub fn tls_connector(ca_file: &Path) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .and_then(|c| c.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--ca-file {}: {e}", ca_file.display()))?;
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| format!("--ca-file {}: {e}", ca_file.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The TLS client's settings: its connector and the name the broker's
/// certificate must carry.
#[derive(Clone)]
pub struct TlsClient {
    pub connector: tokio_rustls::TlsConnector,
    pub name: ServerName<'static>,
}

/// Like [`open`], over TLS: TCP connect, the TLS handshake, then CONNECT
/// and CONNACK.
#[expect(
    clippy::too_many_arguments,
    reason = "the arguments of `open` and the TLS client"
)]
pub async fn open_tls(
    addr: SocketAddr,
    source: Option<IpAddr>,
    tls: TlsClient,
    version: ProtocolVersion,
    client_id: &str,
    keep_alive: u16,
    persistent: bool,
    timeout: Duration,
) -> Result<Conn, OpenError> {
    let open = async {
        let stream = tcp_connect(addr, source)
            .await
            .map_err(|e| OpenError::Failed(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let refused = |e: io::Error| OpenError::Refused(e.to_string());
        let mut stream = tls
            .connector
            .connect(tls.name, stream)
            .await
            .map_err(|e| OpenError::Failed(format!("TLS handshake: {e}")))?;
        stream
            .write_all(&wire::connect(version, client_id, keep_alive, persistent))
            .await
            .map_err(refused)?;
        stream.flush().await.map_err(refused)?;
        let mut buf = BytesMut::with_capacity(64);
        match read_packet(&mut stream, &mut buf, version)
            .await
            .map_err(refused)?
        {
            Some(Packet::ConnAck(ack)) if ack.code.is_success() => Ok(Conn {
                stream: Stream::Tls(Box::new(stream)),
                leftover: buf,
                receive_maximum: ack.properties.receive_maximum,
            }),
            Some(Packet::ConnAck(ack)) => {
                Err(OpenError::Refused(format!("CONNACK {:?}", ack.code)))
            }
            Some(_) => Err(OpenError::Refused("expected CONNACK".into())),
            None => Err(OpenError::Refused("closed before CONNACK".into())),
        }
    };
    match tokio::time::timeout(timeout, open).await {
        Ok(r) => r,
        Err(_) => Err(OpenError::Failed(format!(
            "no CONNACK within {:.1} s",
            timeout.as_secs_f64()
        ))),
    }
}

/// Like [`open`], over WebSocket: TCP connect, the HTTP upgrade to `path`
/// offering subprotocol `mqtt`, then CONNECT and CONNACK in binary messages.
pub async fn open_ws(
    addr: SocketAddr,
    source: Option<IpAddr>,
    path: &str,
    version: ProtocolVersion,
    client_id: &str,
    keep_alive: u16,
    timeout: Duration,
) -> Result<WsConn, OpenError> {
    match tokio::time::timeout(
        timeout,
        open_ws_inner(addr, source, path, version, client_id, keep_alive),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(OpenError::Failed(format!(
            "no CONNACK within {:.1} s",
            timeout.as_secs_f64()
        ))),
    }
}

async fn open_ws_inner(
    addr: SocketAddr,
    source: Option<IpAddr>,
    path: &str,
    version: ProtocolVersion,
    client_id: &str,
    keep_alive: u16,
) -> Result<WsConn, OpenError> {
    let stream = tcp_connect(addr, source)
        .await
        .map_err(|e| OpenError::Failed(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let refused = |e: String| OpenError::Refused(e);
    let mut request = format!("ws://{addr}{path}")
        .into_client_request()
        .map_err(|e| refused(format!("bad WebSocket request: {e}")))?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let (mut ws, _response) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(|e| refused(format!("WebSocket upgrade: {e}")))?;
    let connect = wire::connect(version, client_id, keep_alive, false);
    ws.send(Message::Binary(connect.into()))
        .await
        .map_err(|e| refused(e.to_string()))?;
    let mut buf = BytesMut::new();
    loop {
        match decode_packet(&mut buf, version, usize::MAX) {
            Ok(Some(Packet::ConnAck(ack))) if ack.code.is_success() => return Ok(WsConn { ws }),
            Ok(Some(Packet::ConnAck(ack))) => {
                return Err(refused(format!("CONNACK {:?}", ack.code)))
            }
            Ok(Some(other)) => {
                return Err(refused(format!(
                    "expected CONNACK, got {:?}",
                    other.packet_type()
                )))
            }
            Ok(None) => {}
            Err(e) => return Err(refused(e.to_string())),
        }
        match ws.next().await {
            Some(Ok(Message::Binary(data))) => buf.extend_from_slice(&data),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(other)) => return Err(refused(format!("unexpected WebSocket {other:?}"))),
            Some(Err(e)) => return Err(refused(e.to_string())),
            None => return Err(refused("closed before CONNACK".into())),
        }
    }
}

impl Conn {
    /// SUBSCRIBE to one filter and wait for its SUBACK.
    pub async fn subscribe(
        &mut self,
        version: ProtocolVersion,
        filter: &str,
        qos: QoS,
        subscription_id: Option<u32>,
        timeout: Duration,
    ) -> io::Result<()> {
        self.stream
            .write_all(&wire::subscribe(version, 1, filter, qos, subscription_id))
            .await?;
        self.stream.flush().await?;
        let wait = async {
            loop {
                match read_packet(&mut self.stream, &mut self.leftover, version).await? {
                    Some(Packet::SubAck(ack)) if ack.packet_id == 1 => {
                        return match ack.codes.first() {
                            Some(code) if code.is_success() => Ok(()),
                            code => Err(io::Error::other(format!("SUBACK for {filter}: {code:?}"))),
                        };
                    }
                    Some(_) => continue,
                    None => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "closed before SUBACK",
                        ))
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no SUBACK")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_connections_spread_over_source_addresses() {
        let lo: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        assert_eq!(source_for(lo, 0, 64), Some("127.0.1.1".parse().unwrap()));
        assert_eq!(source_for(lo, 63, 64), Some("127.0.64.1".parse().unwrap()));
        assert_eq!(source_for(lo, 64, 64), source_for(lo, 0, 64));
        assert_eq!(source_for(lo, 5, 0), None);
        let remote: SocketAddr = "10.0.0.1:1883".parse().unwrap();
        assert_eq!(source_for(remote, 5, 64), None);
        let v6: SocketAddr = "[::1]:1883".parse().unwrap();
        assert_eq!(source_for(v6, 5, 64), None);
    }
}
