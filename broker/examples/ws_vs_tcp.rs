//! A first, rough throughput comparison of MQTT over TCP and over WebSocket.
//!
//! Starts a broker in this process (TCP and WebSocket on 127.0.0.1:0), then,
//! for each transport in turn: one subscriber and one publisher on that
//! transport, the publisher sends N QoS 0 PUBLISH packets (one MQTT packet
//! per WebSocket message, as browser clients do; writes batched on both
//! transports), and the run takes the time from the first send until the
//! subscriber has decoded the N-th message. Three runs per transport,
//! alternating; prints messages/s per run and the medians.
//!
//!     cargo run --release -p tern --example ws_vs_tcp -- [N] [PAYLOAD_BYTES]
//!
//! Clients and broker share the machine's cores; the WebSocket client also
//! pays for masking its frames. Treat the numbers as a rough ratio, not a
//! benchmark.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tern::{Config, Server};
use tern_codec::properties::ConnectProperties;
use tern_codec::{
    decode_packet, encode_packet, Connect, Packet, ProtocolVersion, Publish, QoS, Subscribe,
    SubscribeFilter,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const V: ProtocolVersion = ProtocolVersion::V311;
const BATCH: usize = 64;

fn packet_bytes(p: &Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_packet(p, V, &mut out).unwrap();
    out.to_vec()
}

fn connect(id: &str) -> Vec<u8> {
    packet_bytes(&Packet::Connect(Box::new(Connect {
        protocol: V,
        clean_start: true,
        keep_alive: 60,
        client_id: id.as_bytes().to_vec().into(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    })))
}

fn subscribe(filter: &str) -> Vec<u8> {
    packet_bytes(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![SubscribeFilter {
            filter: filter.as_bytes().to_vec().into(),
            qos: QoS::AtMostOnce,
            no_local: false,
            retain_as_published: false,
            retain_handling: Default::default(),
        }],
        properties: Default::default(),
    }))
}

fn publish(topic: &str, payload: usize) -> Vec<u8> {
    packet_bytes(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: topic.as_bytes().to_vec().into(),
        packet_id: None,
        properties: Default::default(),
        payload: vec![0x5A; payload].into(),
    }))
}

/// Counts decoded packets of one kind in `buf`; returns (publishes, others).
fn drain(buf: &mut BytesMut) -> (usize, usize) {
    let (mut pubs, mut other) = (0, 0);
    while let Some(p) = decode_packet(buf, V, 1 << 28).unwrap() {
        match p {
            Packet::Publish(_) => pubs += 1,
            _ => other += 1,
        }
    }
    (pubs, other)
}

trait Conn {
    async fn send(&mut self, bytes: &[u8]);
    async fn send_many(&mut self, packet: &[u8], n: usize);
    /// Reads more into `buf`.
    async fn read_more(&mut self, buf: &mut BytesMut);
}

struct Tcp(TcpStream);

impl Conn for Tcp {
    async fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).await.unwrap();
    }
    async fn send_many(&mut self, packet: &[u8], n: usize) {
        let mut batch = Vec::with_capacity(packet.len() * n);
        for _ in 0..n {
            batch.extend_from_slice(packet);
        }
        self.0.write_all(&batch).await.unwrap();
    }
    async fn read_more(&mut self, buf: &mut BytesMut) {
        buf.reserve(64 * 1024);
        assert!(self.0.read_buf(buf).await.unwrap() > 0, "closed");
    }
}

struct Ws(tokio_tungstenite::WebSocketStream<TcpStream>);

impl Ws {
    async fn open(addr: SocketAddr) -> Ws {
        let mut request = format!("ws://{addr}/mqtt").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        Ws(tokio_tungstenite::client_async(request, tcp)
            .await
            .unwrap()
            .0)
    }
}

impl Conn for Ws {
    async fn send(&mut self, bytes: &[u8]) {
        self.0
            .send(Message::Binary(bytes.to_vec().into()))
            .await
            .unwrap();
    }
    async fn send_many(&mut self, packet: &[u8], n: usize) {
        let packet = bytes::Bytes::copy_from_slice(packet);
        for _ in 0..n {
            self.0.feed(Message::Binary(packet.clone())).await.unwrap();
        }
        self.0.flush().await.unwrap();
    }
    async fn read_more(&mut self, buf: &mut BytesMut) {
        loop {
            match self.0.next().await {
                Some(Ok(Message::Binary(b))) => {
                    buf.extend_from_slice(&b);
                    return;
                }
                Some(Ok(_)) => {}
                other => panic!("websocket ended: {other:?}"),
            }
        }
    }
}

async fn handshake<C: Conn>(c: &mut C, id: &str, filter: Option<&str>) {
    let mut buf = BytesMut::new();
    c.send(&connect(id)).await;
    let mut expect = 1;
    if let Some(f) = filter {
        c.send(&subscribe(f)).await;
        expect = 2;
    }
    let mut got = 0;
    while got < expect {
        c.read_more(&mut buf).await;
        got += drain(&mut buf).1;
    }
}

async fn run<C: Conn>(mut sub: C, mut publisher: C, tag: &str, n: usize, payload: usize) -> f64 {
    let topic = format!("bench/{tag}");
    handshake(&mut sub, &format!("sub-{tag}"), Some(&topic)).await;
    handshake(&mut publisher, &format!("pub-{tag}"), None).await;
    let packet = publish(&topic, payload);
    let started = Instant::now();
    let receiver = async {
        let mut buf = BytesMut::new();
        let mut got = 0;
        while got < n {
            sub.read_more(&mut buf).await;
            got += drain(&mut buf).0;
        }
        started.elapsed()
    };
    let sender = async {
        let mut left = n;
        while left > 0 {
            let k = left.min(BATCH);
            publisher.send_many(&packet, k).await;
            left -= k;
        }
    };
    let (elapsed, ()) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(receiver, sender)
    })
    .await
    .expect("run finished within 120 s");
    n as f64 / elapsed.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(200_000, |s| s.parse().unwrap());
    let payload: usize = args.get(2).map_or(64, |s| s.parse().unwrap());
    let mut config = Config::default();
    config.listeners.tcp = vec!["127.0.0.1:0".parse().unwrap()];
    config.listeners.ws = vec!["127.0.0.1:0".parse().unwrap()];
    // QoS 0 overflow is dropped by design; the queue must hold a whole run.
    config.limits.max_queued_messages = n + 1000;
    // Transport comparison only: no store.
    config.storage.durability = tern::config::DurabilityMode::Memory;
    config.log.level = "warn".into();
    let server = Server::start(config).await.unwrap();
    let (tcp_addr, ws_addr) = (server.tcp_addrs()[0], server.ws_addrs()[0]);
    println!("{n} QoS 0 messages of {payload} bytes, one publisher -> one subscriber");
    let (mut tcp, mut ws) = (Vec::new(), Vec::new());
    for i in 0..3 {
        let s = Tcp(TcpStream::connect(tcp_addr).await.unwrap());
        let p = Tcp(TcpStream::connect(tcp_addr).await.unwrap());
        let rate = run(s, p, &format!("tcp{i}"), n, payload).await;
        println!("run {i}: tcp {rate:>10.0} msg/s");
        tcp.push(rate);
        let s = Ws::open(ws_addr).await;
        let p = Ws::open(ws_addr).await;
        let rate = run(s, p, &format!("ws{i}"), n, payload).await;
        println!("run {i}: ws  {rate:>10.0} msg/s");
        ws.push(rate);
    }
    let (t, w) = (median(tcp), median(ws));
    println!(
        "median: tcp {t:.0} msg/s, websocket {w:.0} msg/s, websocket/tcp = {:.2}",
        w / t
    );
    server.shutdown().await;
}
