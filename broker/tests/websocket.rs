//! MQTT over WebSocket: rumqttc's WebSocket transport, and a raw
//! tokio-tungstenite client for framing cases a client library never
//! produces (several packets in one message, a packet split over messages,
//! continuation frames, text frames, vanishing without a close frame).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use futures_util::{SinkExt, StreamExt};
use tern::Server;
use tern_codec::{decode_packet, encode_packet, Packet, ProtocolVersion, QoS, ReasonCode, Will};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

fn ws_addr(server: &Server) -> SocketAddr {
    server.ws_addrs()[0]
}

/// Opens a WebSocket to `path` offering `protocols` (none: no header).
async fn ws_open(
    addr: SocketAddr,
    path: &str,
    protocols: Option<&str>,
) -> Result<WebSocketStream<TcpStream>, WsError> {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    if let Some(p) = protocols {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (ws, _response) = tokio_tungstenite::client_async(request, tcp).await?;
    Ok(ws)
}

fn encode(packet: &Packet, protocol: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_packet(packet, protocol, &mut out).unwrap();
    out.to_vec()
}

/// A raw MQTT-over-WebSocket client.
struct WsClient {
    ws: WebSocketStream<TcpStream>,
    buf: BytesMut,
    protocol: ProtocolVersion,
    /// The close frame the broker sent, once seen.
    close: Option<Option<CloseCode>>,
}

impl WsClient {
    async fn open(addr: SocketAddr, protocol: ProtocolVersion) -> WsClient {
        WsClient {
            ws: ws_open(addr, "/mqtt", Some("mqtt")).await.expect("upgrade"),
            buf: BytesMut::new(),
            protocol,
            close: None,
        }
    }

    async fn connected(addr: SocketAddr, client_id: &str, protocol: ProtocolVersion) -> WsClient {
        let mut c = WsClient::open(addr, protocol).await;
        c.send(&Packet::Connect(Box::new(connect_packet(
            client_id, protocol,
        ))))
        .await;
        match c.recv().await {
            Some(Packet::ConnAck(ack)) => assert_eq!(ack.code, ReasonCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        c
    }

    async fn send(&mut self, packet: &Packet) {
        let bytes = encode(packet, self.protocol);
        self.send_binary(bytes).await;
    }

    async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::Binary(bytes.into())).await.unwrap();
    }

    /// The next MQTT packet; `None` once the broker closed the WebSocket.
    async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(p) = decode_packet(&mut self.buf, self.protocol, 1 << 28).unwrap() {
                    return Some(p);
                }
                match self.ws.next().await {
                    Some(Ok(Message::Binary(b))) => self.buf.extend_from_slice(&b),
                    Some(Ok(Message::Close(frame))) => {
                        self.close = Some(frame.map(|f| f.code));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return None,
                }
            }
        })
        .await
        .expect("a packet or the close within the wait")
    }

    async fn recv_publish(&mut self) -> tern_codec::Publish {
        match self.recv().await {
            Some(Packet::Publish(p)) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Waits for the broker's close frame and the end of the stream.
    async fn expect_close(&mut self) -> Option<CloseCode> {
        if let Some(p) = self.recv().await {
            panic!("expected the close, got {p:?}");
        }
        self.close
            .expect("a close frame before the end of the stream")
    }
}

/// rumqttc over WebSocket, with its event loop in the background.
fn spawn_rumqttc_ws(
    client_id: &str,
    addr: SocketAddr,
) -> (
    rumqttc::AsyncClient,
    mpsc::UnboundedReceiver<rumqttc::Packet>,
) {
    let url = format!("ws://{addr}/mqtt");
    let mut options = rumqttc::MqttOptions::new(client_id, url, addr.port());
    options.set_transport(rumqttc::Transport::Ws);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(1 << 20, 1 << 20);
    run_rumqttc(options)
}

async fn next_publish(rx: &mut mpsc::UnboundedReceiver<rumqttc::Packet>) -> rumqttc::Publish {
    tokio::time::timeout(WAIT, async {
        loop {
            if let rumqttc::Packet::Publish(p) = rx.recv().await.expect("event loop alive") {
                return p;
            }
        }
    })
    .await
    .expect("a PUBLISH within the wait")
}

async fn next_suback(rx: &mut mpsc::UnboundedReceiver<rumqttc::Packet>) {
    tokio::time::timeout(WAIT, async {
        loop {
            if let rumqttc::Packet::SubAck(_) = rx.recv().await.expect("event loop alive") {
                return;
            }
        }
    })
    .await
    .expect("a SUBACK within the wait")
}

#[tokio::test]
async fn rumqttc_over_websocket_talks_to_tcp_clients() {
    let server = start(|_| {}).await;
    let (ws_client, mut ws_rx) = spawn_rumqttc_ws("ws-rumqttc", ws_addr(&server));
    ws_client
        .subscribe("both/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    next_suback(&mut ws_rx).await;

    let mut tcp = RawClient::connected(addr(&server), "tcp-peer", ProtocolVersion::V311).await;
    tcp.subscribe("both/from-ws", QoS::AtLeastOnce).await;

    // TCP -> WebSocket
    tcp.publish("both/from-tcp", b"hello ws", QoS::AtLeastOnce, 1)
        .await;
    let p = next_publish(&mut ws_rx).await;
    assert_eq!(p.topic, "both/from-tcp");
    assert_eq!(&p.payload[..], b"hello ws");

    // WebSocket -> TCP (and back to itself), QoS 1 and a payload needing the
    // 16-bit frame length.
    let big = vec![7u8; 40_000];
    ws_client
        .publish(
            "both/from-ws",
            rumqttc::QoS::AtLeastOnce,
            false,
            big.clone(),
        )
        .await
        .unwrap();
    let p = tcp.recv_publish().await;
    assert_eq!(&p.topic[..], b"both/from-ws");
    assert_eq!(&p.payload[..], &big[..]);
    let p = next_publish(&mut ws_rx).await;
    assert_eq!(&p.payload[..], &big[..]);

    ws_client.disconnect().await.unwrap();
    eventually("both clients counted", || {
        server.broker().registry.connection_count() == 1
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn several_packets_in_one_message() {
    let server = start(|_| {}).await;
    let mut c = WsClient::open(ws_addr(&server), ProtocolVersion::V311).await;
    let mut bytes = encode(
        &Packet::Connect(Box::new(connect_packet("batch", ProtocolVersion::V311))),
        ProtocolVersion::V311,
    );
    bytes.extend(encode(
        &subscribe_packet(1, "batch/t", QoS::AtMostOnce),
        ProtocolVersion::V311,
    ));
    bytes.extend(encode(
        &publish_packet("batch/t", b"one", QoS::AtMostOnce, None),
        ProtocolVersion::V311,
    ));
    bytes.extend(encode(&Packet::PingReq, ProtocolVersion::V311));
    c.send_binary(bytes).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(_))));
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    assert_eq!(&c.recv_publish().await.payload[..], b"one");
    assert!(matches!(c.recv().await, Some(Packet::PingResp)));
    server.shutdown().await;
}

#[tokio::test]
async fn one_packet_split_across_messages() {
    let server = start(|_| {}).await;
    let mut sub = RawClient::connected(addr(&server), "split-sub", ProtocolVersion::V5).await;
    sub.subscribe("split/#", QoS::AtMostOnce).await;

    let mut c = WsClient::open(ws_addr(&server), ProtocolVersion::V5).await;
    let connect = encode(
        &Packet::Connect(Box::new(connect_packet("split", ProtocolVersion::V5))),
        ProtocolVersion::V5,
    );
    // CONNECT one byte per message.
    for b in connect {
        c.send_binary(vec![b]).await;
    }
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(_))));
    // A PUBLISH in three messages, the cut through the fixed header.
    let payload = vec![0xAB; 3000];
    let publish = encode(
        &publish_packet("split/t", &payload, QoS::AtMostOnce, None),
        ProtocolVersion::V5,
    );
    c.send_binary(publish[..1].to_vec()).await;
    c.send_binary(publish[1..2000].to_vec()).await;
    c.send_binary(publish[2000..].to_vec()).await;
    let p = sub.recv_publish().await;
    assert_eq!(&p.topic[..], b"split/t");
    assert_eq!(&p.payload[..], &payload[..]);
    server.shutdown().await;
}

#[tokio::test]
async fn fragmented_message_with_continuation_frames() {
    let server = start(|_| {}).await;
    let mut sub = RawClient::connected(addr(&server), "frag-sub", ProtocolVersion::V311).await;
    sub.subscribe("frag/#", QoS::AtMostOnce).await;

    let mut c = WsClient::connected(ws_addr(&server), "frag", ProtocolVersion::V311).await;
    let publish = encode(
        &publish_packet("frag/t", b"fragmented payload", QoS::AtMostOnce, None),
        ProtocolVersion::V311,
    );
    // One message in three frames: binary (FIN=0), continuation, continuation
    // (FIN=1), with a ping between the fragments (control frames may interleave).
    let (a, rest) = publish.split_at(3);
    let (b, d) = rest.split_at(7);
    let frames = [
        Frame::message(Bytes::copy_from_slice(a), OpCode::Data(Data::Binary), false),
        Frame::message(
            Bytes::copy_from_slice(b),
            OpCode::Data(Data::Continue),
            false,
        ),
        Frame::ping(Bytes::from_static(b"mid")),
        Frame::message(
            Bytes::copy_from_slice(d),
            OpCode::Data(Data::Continue),
            true,
        ),
    ];
    for f in frames {
        c.ws.send(Message::Frame(f)).await.unwrap();
    }
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], b"fragmented payload");
    // The ping was answered.
    let pong = tokio::time::timeout(WAIT, async {
        loop {
            match c.ws.next().await {
                Some(Ok(Message::Pong(data))) => return data,
                Some(Ok(_)) => {}
                other => panic!("expected a pong, got {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&pong[..], b"mid");
    server.shutdown().await;
}

#[tokio::test]
async fn wrong_subprotocol_is_refused_with_400() {
    let server = start(|_| {}).await;
    for offer in [Some("chat"), Some("MQTT, wamp"), None] {
        match ws_open(ws_addr(&server), "/mqtt", offer).await {
            Err(WsError::Http(response)) => {
                assert_eq!(response.status(), 400, "offer {offer:?}");
                let body = String::from_utf8(response.body().clone().unwrap()).unwrap();
                assert!(body.contains("mqtt"), "{body}");
            }
            Err(other) => panic!("expected HTTP 400, got {other}"),
            Ok(_) => panic!("upgrade offering {offer:?} was accepted"),
        }
    }
    // Both MQTT subprotocols, answered in the client's order of preference.
    for (offer, expect) in [
        ("mqttv3.1, mqtt", "mqttv3.1"),
        ("mqtt, mqttv3.1", "mqtt"),
        ("chat, mqtt", "mqtt"),
    ] {
        let mut request = format!("ws://{}/mqtt", ws_addr(&server))
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", offer.parse().unwrap());
        let tcp = TcpStream::connect(ws_addr(&server)).await.unwrap();
        let (_ws, response) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
        assert_eq!(response.headers()["sec-websocket-protocol"], expect);
    }
    eventually("upgraded connections dropped", || {
        server.broker().registry.connection_count() == 0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn plain_http_request_gets_400() {
    let server = start(|_| {}).await;
    let mut tcp = TcpStream::connect(ws_addr(&server)).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut response),
    )
    .await
    .expect("answered and closed")
    .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
    assert!(response.contains("WebSocket"), "{response}");
    server.shutdown().await;
}

/// Sends `request` on a new connection to the WebSocket listener and returns
/// what the broker answered before it closed.
async fn raw_upgrade(server: &Server, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(ws_addr(server)).await.unwrap();
    // The broker may stop reading (and close) before the request is all
    // sent: a failed write is part of what is being tested.
    let _ = tokio::io::AsyncWriteExt::write_all(&mut tcp, request).await;
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut tcp, &mut chunk))
            .await
            .expect("answered and closed")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn oversized_upgrade_requests_get_431() {
    let server = start(|_| {}).await;
    let upgrade = "GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: mqtt\r\n";
    // A head over 64 KiB (one huge cookie), and one with 200 header fields.
    let huge = format!("{upgrade}Cookie: {}\r\n\r\n", "a".repeat(70_000));
    let mut many = upgrade.to_owned();
    for i in 0..200 {
        many.push_str(&format!("X-Field-{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    for request in [huge, many] {
        let response = raw_upgrade(&server, request.as_bytes()).await;
        assert!(
            response.starts_with("HTTP/1.1 431 "),
            "{}",
            &response[..response.len().min(200)]
        );
    }
    let refused = &server.broker().metrics.websocket_upgrades_refused;
    assert_eq!(tern::metrics::Metrics::get(refused), 2);
    // The listener still upgrades a normal client.
    let mut ws = ws_open(ws_addr(&server), "/mqtt", Some("mqtt"))
        .await
        .expect("a normal upgrade");
    drop(ws.close(None).await);
    server.shutdown().await;
}

#[tokio::test]
async fn wrong_path_is_refused_with_404() {
    let server = start(|_| {}).await;
    match ws_open(ws_addr(&server), "/", Some("mqtt")).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 404),
        Err(other) => panic!("expected HTTP 404, got {other}"),
        Ok(_) => panic!("upgrade on / was accepted"),
    }
    server.shutdown().await;

    // The path is configurable.
    let server = start(|c| c.listeners.ws_path = "/ws/v1".into()).await;
    assert!(ws_open(ws_addr(&server), "/mqtt", Some("mqtt"))
        .await
        .is_err());
    let mut ws = ws_open(ws_addr(&server), "/ws/v1", Some("mqtt"))
        .await
        .expect("upgrade on the configured path");
    let connect = encode(
        &Packet::Connect(Box::new(connect_packet("p", ProtocolVersion::V311))),
        ProtocolVersion::V311,
    );
    ws.send(Message::Binary(connect.into())).await.unwrap();
    match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], &[0x20, 2, 0, 0]),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn text_message_closes_with_1003() {
    let server = start(|_| {}).await;
    // Before CONNECT ...
    let mut c = WsClient::open(ws_addr(&server), ProtocolVersion::V311).await;
    c.ws.send(Message::text("CONNECT please")).await.unwrap();
    assert_eq!(c.expect_close().await, Some(CloseCode::Unsupported));
    // ... and after.
    let mut c = WsClient::connected(ws_addr(&server), "texter", ProtocolVersion::V5).await;
    c.ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(c.expect_close().await, Some(CloseCode::Unsupported));
    eventually("connections released", || {
        server.broker().registry.connection_count() == 0
    })
    .await;
    // Each counted as input that could not be decoded, as over TCP.
    eventually("both counted", || {
        server.broker().metrics.malformed_packets.get() == 2
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn message_larger_than_max_packet_size_closes_with_1009() {
    let server = start(|c| c.limits.max_packet_size = 1024).await;
    let mut c = WsClient::connected(ws_addr(&server), "big", ProtocolVersion::V311).await;
    c.send_binary(vec![0x30; 4096]).await;
    assert_eq!(c.expect_close().await, Some(CloseCode::Size));
    eventually("counted as oversized", || {
        server.broker().metrics.oversized_packets.get() == 1
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn client_vanishing_without_close_frame_publishes_will() {
    let server = start(|_| {}).await;
    let mut watcher = RawClient::connected(addr(&server), "watcher", ProtocolVersion::V311).await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;

    let mut connect = connect_packet("doomed", ProtocolVersion::V311);
    connect.will = Some(Will {
        topic: Bytes::from_static(b"wills/doomed"),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    let mut c = WsClient::open(ws_addr(&server), ProtocolVersion::V311).await;
    c.send(&Packet::Connect(Box::new(connect))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(_))));
    assert_eq!(server.broker().registry.connection_count(), 2);
    // Drop the TCP connection under the WebSocket: no close frame, no DISCONNECT.
    drop(c);
    let p = watcher.recv_publish().await;
    assert_eq!(&p.topic[..], b"wills/doomed");
    assert_eq!(&p.payload[..], b"gone");
    eventually("the vanished client is counted out", || {
        server.broker().registry.connection_count() == 1
    })
    .await;
    drop(watcher);
    eventually("no connection left", || {
        server.broker().registry.connection_count() == 0
    })
    .await;
    server.shutdown().await;
}

/// As over TCP (`mqtt5.rs::a_client_still_sending_after_the_broker_ended_it_reads_the_disconnect`):
/// a client that goes on sending after the broker ended its connection
/// still reads the DISCONNECT and the close frame, and its writes succeed
/// until it has: the broker reads (and drops) what it sends until its close
/// frame comes back, rather than resetting the connection under it.
#[tokio::test]
async fn a_websocket_client_still_sending_after_the_broker_ended_it_reads_the_disconnect() {
    let server = start(|c| c.limits.receive_maximum = 2).await;
    let mut c = WsClient::connected(ws_addr(&server), "ws-flood", ProtocolVersion::V5).await;
    let mut flood = Vec::new();
    for id in 1..=3u16 {
        let publish = publish_packet("q2", b"x", QoS::ExactlyOnce, Some(id));
        flood.extend(encode(&publish, ProtocolVersion::V5));
    }
    c.send_binary(flood).await;
    let mut seen = Vec::new();
    while let Some(packet) = c.recv().await {
        if let Packet::PubRec(a) = &packet {
            // Each released after the broker has closed its side.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let pubrel = encode(
                &Packet::PubRel(tern_codec::PubAck::new(a.packet_id)),
                ProtocolVersion::V5,
            );
            let sent = c.ws.send(Message::Binary(pubrel.into())).await;
            assert!(
                sent.is_ok(),
                "could not send PUBREL {}: {sent:?}",
                a.packet_id
            );
        }
        seen.push(packet);
    }
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.code == ReasonCode::ReceiveMaximumExceeded),
        "{seen:?}"
    );
    assert!(c.close.is_some(), "no close frame after {seen:?}");
    eventually("connection released", || {
        server.broker().registry.connection_count() == 0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn close_handshake_and_ping() {
    let server = start(|_| {}).await;
    let mut c = WsClient::connected(ws_addr(&server), "closer", ProtocolVersion::V311).await;
    c.ws.send(Message::Ping(Bytes::from_static(b"p1")))
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, c.ws.next()).await.unwrap() {
        Some(Ok(Message::Pong(data))) => assert_eq!(&data[..], b"p1"),
        other => panic!("expected a pong, got {other:?}"),
    }
    c.ws.close(None).await.unwrap();
    // The broker answers the close and ends the stream.
    let rest = tokio::time::timeout(WAIT, async {
        let mut seen = Vec::new();
        while let Some(m) = c.ws.next().await {
            match m {
                Ok(m) => seen.push(m),
                Err(_) => break,
            }
        }
        seen
    })
    .await
    .unwrap();
    assert!(
        rest.iter().any(|m| matches!(m, Message::Close(_))),
        "{rest:?}"
    );
    eventually("connection released", || {
        server.broker().registry.connection_count() == 0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn silent_websocket_client_hits_the_connect_timeout() {
    let server = start(|c| c.limits.connect_timeout_secs = 1).await;
    let mut c = WsClient::open(ws_addr(&server), ProtocolVersion::V311).await;
    let started = std::time::Instant::now();
    // Closed (with a close frame) without ever sending CONNECT.
    assert_eq!(c.expect_close().await, Some(CloseCode::Normal));
    assert!(started.elapsed() < Duration::from_secs(4));
    let timeouts = || server.broker().metrics.connect_timeouts.get();
    assert_eq!(timeouts(), 1);
    // A TCP connection that starts an upgrade and never finishes it is
    // dropped too, and counted alike.
    let mut tcp = TcpStream::connect(ws_addr(&server)).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET /mqtt HTTP/1.1\r\nHost: tern\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut tcp, &mut buf))
        .await
        .expect("closed within the connect timeout");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert_eq!(timeouts(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn websocket_client_takes_over_a_tcp_session() {
    let server = start(|_| {}).await;
    let mut connect = connect_packet("roamer", ProtocolVersion::V5);
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(300);
    let (mut tcp, ack) = RawClient::connect(addr(&server), connect.clone()).await;
    assert_eq!(ack.code, ReasonCode::Success);
    tcp.subscribe("roam/#", QoS::AtLeastOnce).await;

    let mut c = WsClient::open(ws_addr(&server), ProtocolVersion::V5).await;
    c.send(&Packet::Connect(Box::new(connect))).await;
    match c.recv().await {
        Some(Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, ReasonCode::Success);
            assert!(ack.session_present, "the TCP session carries over");
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    // The TCP connection is told (MQTT 5: DISCONNECT 0x8E) and closed.
    let seen = tcp.expect_closed().await;
    assert!(
        seen.iter()
            .any(|p| matches!(p, Packet::Disconnect(d) if d.code == ReasonCode::SessionTakenOver)),
        "{seen:?}"
    );
    // The subscription made over TCP now delivers over WebSocket.
    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V311).await;
    publisher
        .publish("roam/x", b"follow me", QoS::AtLeastOnce, 1)
        .await;
    let p = c.recv_publish().await;
    assert_eq!(&p.payload[..], b"follow me");
    eventually("one connection per client", || {
        server.broker().registry.connection_count() == 2
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn large_publish_to_websocket_subscriber() {
    // A payload above 64 KiB takes the 64-bit frame length; above the
    // outbound frame cap it continues in a second message.
    let server = start(|c| c.limits.max_packet_size = 4 * 1024 * 1024).await;
    let mut c = WsClient::connected(ws_addr(&server), "large", ProtocolVersion::V311).await;
    c.send(&subscribe_packet(1, "large/#", QoS::AtMostOnce))
        .await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    let mut publisher = RawClient::connected(addr(&server), "lp", ProtocolVersion::V311).await;
    for size in [100_000usize, 1_500_000] {
        let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
        publisher
            .publish("large/t", &payload, QoS::AtMostOnce, 0)
            .await;
        let p = c.recv_publish().await;
        assert_eq!(p.payload.len(), size);
        assert!(p.payload[..] == payload[..]);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn silent_websocket_client_hits_keep_alive() {
    let server = start(|_| {}).await;
    let mut connect = connect_packet("sleepy", ProtocolVersion::V311);
    connect.keep_alive = 1;
    let mut c = WsClient::open(ws_addr(&server), ProtocolVersion::V311).await;
    c.send(&Packet::Connect(Box::new(connect))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(_))));
    let started = std::time::Instant::now();
    // WebSocket pings are not MQTT traffic: they do not keep the session alive.
    c.ws.send(Message::Ping(Bytes::from_static(b"x")))
        .await
        .unwrap();
    assert_eq!(c.expect_close().await, Some(CloseCode::Normal));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1200) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    eventually("connection released", || {
        server.broker().registry.connection_count() == 0
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn proxy_protocol_header_when_configured() {
    let server = start(|c| c.listeners.ws_proxy_protocol = true).await;
    let addr = ws_addr(&server);
    let request = || {
        let mut r = format!("ws://{addr}/mqtt").into_client_request().unwrap();
        r.headers_mut()
            .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
        r
    };
    // With a v1 header in front, the upgrade and MQTT work as usual.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"PROXY TCP4 192.0.2.7 127.0.0.1 51234 8083\r\n")
        .await
        .unwrap();
    let (ws, _) = tokio_tungstenite::client_async(request(), tcp)
        .await
        .expect("upgrade");
    let mut c = WsClient {
        ws,
        buf: BytesMut::new(),
        protocol: ProtocolVersion::V311,
        close: None,
    };
    c.send(&Packet::Connect(Box::new(connect_packet(
        "proxied",
        ProtocolVersion::V311,
    ))))
    .await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.code == ReasonCode::Success));
    // Without one, the connection is refused.
    let tcp = TcpStream::connect(addr).await.unwrap();
    assert!(tokio_tungstenite::client_async(request(), tcp)
        .await
        .is_err());
    server.shutdown().await;
}

/// A client frame: FIN, binary, masked (as RFC 6455 requires of clients).
fn masked_binary_frame(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![0x82, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test]
async fn frames_sent_with_the_upgrade_request_are_read_first() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = start(|_| {}).await;
    // A client that does not wait for the 101: the upgrade, a CONNECT and a
    // PINGREQ in one write.
    let mut bytes = b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        .to_vec();
    let connect = encode(
        &Packet::Connect(Box::new(connect_packet("eager", ProtocolVersion::V311))),
        ProtocolVersion::V311,
    );
    bytes.extend(masked_binary_frame(&connect));
    bytes.extend(masked_binary_frame(&[0xC0, 0x00]));
    let mut stream = TcpStream::connect(ws_addr(&server)).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    // The 101, then CONNACK and PINGRESP, each in a binary frame.
    let mut got = Vec::new();
    let expected_tail = [0x82, 0x04, 0x20, 0x02, 0x00, 0x00, 0x82, 0x02, 0xD0, 0x00];
    let deadline = tokio::time::Instant::now() + WAIT;
    while !got.ends_with(&expected_tail) {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .expect("CONNACK and PINGRESP in time")
            .unwrap();
        assert!(n > 0, "closed; got {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101 "));
    server.shutdown().await;
}
