//! Test support: an in-process broker on an ephemeral port, and a raw MQTT
//! client for byte-level checks (it frames packets with tern-codec, but every
//! assertion is about what travels on the socket).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tern::{Config, Server};
use tern_codec::properties::ConnectProperties;
use tern_codec::{
    decode_packet, encode_packet, ConnAck, Connect, Packet, ProtocolVersion, PubAck, Publish, QoS,
    Subscribe, SubscribeFilter,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest any single expectation waits.
pub const WAIT: Duration = Duration::from_secs(5);

/// Starts a broker on 127.0.0.1:0 with the defaults, adjusted by `adjust`.
///
/// The broker keeps its state in memory unless `TERN_TEST_DURABILITY` says
/// `fsync` or `interval`: then every test runs against a fresh store in the
/// system's temporary directory (the whole protocol suite over the durable
/// path; the directories are left for inspection).
pub async fn start(adjust: impl FnOnce(&mut Config)) -> Server {
    let mut config = Config::default();
    config.listeners.tcp = vec!["127.0.0.1:0".parse().unwrap()];
    // WebSocket is on by default at a fixed port; parallel tests must not collide.
    config.listeners.ws = vec!["127.0.0.1:0".parse().unwrap()];
    config.admin.bind = Some("127.0.0.1:0".parse().unwrap());
    config.storage.durability = match std::env::var("TERN_TEST_DURABILITY").as_deref() {
        Ok("fsync") => tern::config::DurabilityMode::Fsync,
        Ok("interval") => tern::config::DurabilityMode::Interval,
        _ => tern::config::DurabilityMode::Memory,
    };
    static STORES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    config.storage.data_dir = std::env::temp_dir().join(format!(
        "tern-test-{}-{}",
        std::process::id(),
        STORES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    adjust(&mut config);
    Server::start(config).await.expect("broker starts")
}

/// The first TCP address of a server.
pub fn addr(server: &Server) -> SocketAddr {
    server.tcp_addrs()[0]
}

/// Waits until `cond` holds, polling; panics with `what` after [`WAIT`].
pub async fn eventually(what: &str, cond: impl FnMut() -> bool) {
    eventually_within(WAIT, what, cond).await;
}

/// [`eventually`] with a bound of its own, for a wait that includes the
/// broker's own delays (a closed connection's linger, for one).
pub async fn eventually_within(bound: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + bound;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {bound:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A CONNECT with the given id and version, clean start, keep alive 60.
pub fn connect_packet(client_id: &str, protocol: ProtocolVersion) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive: 60,
        client_id: Bytes::copy_from_slice(client_id.as_bytes()),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

/// An MQTT 5 CONNECT resuming (or creating) a session that outlives the
/// connection by `expiry` seconds.
pub fn persistent_connect(client_id: &str, expiry: u32) -> Connect {
    let mut connect = connect_packet(client_id, ProtocolVersion::V5);
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(expiry);
    connect
}

/// Leaves behind an offline durable session `client_id` (session expiry
/// one hour) subscribed to `filter` at `qos`.
pub async fn offline_subscriber(server: &Server, client_id: &str, filter: &str, qos: QoS) {
    let (mut c, ack) = RawClient::connect(addr(server), persistent_connect(client_id, 3600)).await;
    assert_eq!(ack.code, tern_codec::ReasonCode::Success);
    assert_eq!(
        c.subscribe(filter, qos).await,
        vec![tern_codec::ReasonCode::granted(qos)]
    );
    c.send(Packet::Disconnect(Default::default())).await;
    c.expect_closed().await;
    until_offline(server, client_id).await;
}

/// Waits until `client_id` has no session any more (it ended).
pub async fn until_ended(server: &Server, client_id: &str) {
    eventually(&format!("{client_id}'s session ended"), || {
        server.broker().registry.get(client_id).is_none()
    })
    .await;
}

/// Waits until `client_id`'s session is offline (its connection closed
/// and detached).
pub async fn until_offline(server: &Server, client_id: &str) {
    eventually(&format!("{client_id} offline"), || {
        server
            .broker()
            .registry
            .get(client_id)
            .is_some_and(|s| !s.is_online())
    })
    .await;
}

/// A SUBSCRIBE for one filter.
pub fn subscribe_packet(packet_id: u16, filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        filters: vec![SubscribeFilter {
            filter: Bytes::copy_from_slice(filter.as_bytes()),
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: Default::default(),
        }],
        properties: Default::default(),
    })
}

/// A PUBLISH.
pub fn publish_packet(topic: &str, payload: &[u8], qos: QoS, packet_id: Option<u16>) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        packet_id,
        properties: Default::default(),
        payload: Bytes::copy_from_slice(payload),
    })
}

/// A raw MQTT connection.
pub struct RawClient {
    pub stream: TcpStream,
    pub buf: BytesMut,
    pub protocol: ProtocolVersion,
}

impl RawClient {
    /// Opens a TCP connection without sending anything.
    pub async fn open(addr: SocketAddr, protocol: ProtocolVersion) -> RawClient {
        RawClient {
            stream: TcpStream::connect(addr).await.expect("tcp connect"),
            buf: BytesMut::new(),
            protocol,
        }
    }

    /// Opens, sends CONNECT and returns the CONNACK.
    pub async fn connect(addr: SocketAddr, connect: Connect) -> (RawClient, ConnAck) {
        let mut c = RawClient::open(addr, connect.protocol).await;
        c.send(Packet::Connect(Box::new(connect))).await;
        match c.recv().await {
            Some(Packet::ConnAck(ack)) => (c, *ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects with a plain CONNECT and asserts success.
    pub async fn connected(
        addr: SocketAddr,
        client_id: &str,
        protocol: ProtocolVersion,
    ) -> RawClient {
        let (c, ack) = RawClient::connect(addr, connect_packet(client_id, protocol)).await;
        assert_eq!(ack.code, tern_codec::ReasonCode::Success);
        c
    }

    pub async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        encode_packet(&packet, self.protocol, &mut out).expect("encodes");
        self.send_bytes(&out).await;
    }

    /// Sends, ignoring a connection the broker already closed (for churn).
    pub async fn try_send(&mut self, packet: Packet) -> bool {
        let mut out = BytesMut::new();
        encode_packet(&packet, self.protocol, &mut out).expect("encodes");
        self.stream.write_all(&out).await.is_ok()
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// The next packet, or `None` when the broker closed the connection.
    /// Panics if nothing arrives within [`WAIT`].
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(WAIT)
            .await
            .expect("a packet or close within the wait")
    }

    /// `Err(())` when nothing arrived in `wait`.
    pub async fn recv_within(&mut self, wait: Duration) -> Result<Option<Packet>, ()> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(p) = decode_packet(&mut self.buf, self.protocol, 1 << 28)
                .expect("broker sent a valid packet")
            {
                return Ok(Some(p));
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await;
            match read {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Asserts that nothing arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Ok(p) = self.recv_within(wait).await {
            panic!("expected nothing, got {p:?}");
        }
    }

    /// Next PUBLISH (skipping nothing: anything else is a failure).
    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv().await {
            Some(Packet::Publish(p)) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Subscribes and returns the SUBACK codes.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<tern_codec::ReasonCode> {
        self.send(subscribe_packet(1, filter, qos)).await;
        match self.recv().await {
            Some(Packet::SubAck(ack)) => ack.codes,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Unsubscribes from one filter and returns the UNSUBACK codes.
    pub async fn unsubscribe(&mut self, filter: &str) -> Vec<tern_codec::ReasonCode> {
        self.send(Packet::Unsubscribe(tern_codec::Unsubscribe {
            packet_id: 2,
            filters: vec![Bytes::copy_from_slice(filter.as_bytes())],
            properties: Default::default(),
        }))
        .await;
        match self.recv().await {
            Some(Packet::UnsubAck(ack)) => ack.codes,
            other => panic!("expected UNSUBACK, got {other:?}"),
        }
    }

    /// Publishes and waits for the acknowledgement flow to complete.
    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, packet_id: u16) {
        self.publish_with(topic, payload, qos, packet_id, Default::default())
            .await;
    }

    /// [`publish`](Self::publish) with MQTT 5 properties.
    pub async fn publish_with(
        &mut self,
        topic: &str,
        payload: &[u8],
        qos: QoS,
        packet_id: u16,
        properties: tern_codec::properties::PublishProperties,
    ) {
        let id = (qos != QoS::AtMostOnce).then_some(packet_id);
        let mut packet = publish_packet(topic, payload, qos, id);
        if let Packet::Publish(p) = &mut packet {
            p.set_properties(properties);
        }
        self.send(packet).await;
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => match self.recv().await {
                Some(Packet::PubAck(a)) => assert_eq!(a.packet_id, packet_id),
                other => panic!("expected PUBACK, got {other:?}"),
            },
            QoS::ExactlyOnce => {
                match self.recv().await {
                    Some(Packet::PubRec(a)) => assert_eq!(a.packet_id, packet_id),
                    other => panic!("expected PUBREC, got {other:?}"),
                }
                self.send(Packet::PubRel(PubAck::new(packet_id))).await;
                match self.recv().await {
                    Some(Packet::PubComp(a)) => assert_eq!(a.packet_id, packet_id),
                    other => panic!("expected PUBCOMP, got {other:?}"),
                }
            }
        }
    }

    /// Waits until the broker closes the connection and asserts that the
    /// last packet before the close was DISCONNECT with `code` (MQTT 5).
    pub async fn expect_disconnect(&mut self, code: tern_codec::ReasonCode) {
        let seen = self.expect_closed().await;
        assert!(
            matches!(seen.last(), Some(Packet::Disconnect(d)) if d.code == code),
            "expected DISCONNECT {code:?}, got {seen:?}"
        );
    }

    /// Waits until the broker closes the connection (draining packets);
    /// returns what arrived before the close.
    pub async fn expect_closed(&mut self) -> Vec<Packet> {
        let mut seen = Vec::new();
        loop {
            match self.recv().await {
                Some(p) => seen.push(p),
                None => return seen,
            }
        }
    }
}

/// The first packet from `run_rumqttc`'s channel that `pick` takes (it
/// returns `Some`), skipping the others; panics, naming `what`, when none
/// comes within [`WAIT`] or the client stops.
pub async fn next_rumqttc<T>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
    what: &str,
    mut pick: impl FnMut(rumqttc::Packet) -> Option<T>,
) -> T {
    loop {
        let packet = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
            .unwrap_or_else(|| panic!("the client stopped before {what}"));
        if let Some(picked) = pick(packet) {
            return picked;
        }
    }
}

/// Runs a rumqttc 3.1.1 client's event loop in the background, forwarding
/// every incoming packet.
pub fn run_rumqttc(
    options: rumqttc::MqttOptions,
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
) {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(p)) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    (client, rx)
}

/// A session of `broker` for `client_id` with a connection attached (whose
/// writer never runs: the test drains the queue itself), subscribed to
/// `filter`, and the id of that connection. For in-process tests of the
/// publish path.
pub fn attached_subscriber(
    broker: &tern::Broker,
    client_id: &str,
    filter: &str,
) -> (std::sync::Arc<tern::session::Session>, u64) {
    use std::sync::Arc;
    let opened = broker
        .registry
        .open(client_id, true, None, |_| true, |_| {})
        .expect("within limits.max_sessions");
    let connection_id = broker.registry.next_id();
    opened
        .session
        .attach(
            tern::session::AttachParams {
                connection_id,
                protocol: ProtocolVersion::V311,
                send_quota: 16,
                expiry_interval: 0,
                owner: None,
                login: Default::default(),
            },
            Arc::new(tern::session::ConnectionControl::default()),
            None,
        )
        .expect("a fresh session attaches");
    broker
        .router
        .subscribe(
            &tern::broker::SessionRef(Arc::clone(&opened.session)),
            filter,
            tern_router::SubscriptionOptions::default(),
        )
        .unwrap();
    (opened.session, connection_id)
}

/// Deliveries put in flight by [`publish_unread_backlog`]: 640 of 32 KiB,
/// 20 MiB in all, more than the sockets' buffers hold, so most of it stays
/// queued in the broker while its subscriber does not read. The broker needs
/// an in-flight window that takes them all: see
/// [`window_for_unread_backlog`].
pub const UNREAD_BACKLOG: u16 = 640;

/// Sets the in-flight window to take all of [`UNREAD_BACKLOG`], in messages
/// and in bytes, so that all of it goes towards the connection and a test
/// can tell how much of it left the broker.
pub fn window_for_unread_backlog(c: &mut Config) {
    c.limits.max_inflight = UNREAD_BACKLOG;
    c.limits.max_inflight_bytes = 64 << 20;
}

/// Publishes [`UNREAD_BACKLOG`] QoS 1 messages to `topic`, each acknowledged
/// by the broker, from a publisher of its own.
pub async fn publish_unread_backlog(server: &Server, topic: &str) {
    let payload = vec![7u8; 32 * 1024];
    let mut publisher =
        RawClient::connected(addr(server), "backlog-feeder", ProtocolVersion::V5).await;
    for id in 1..=UNREAD_BACKLOG {
        publisher
            .publish(topic, &payload, QoS::AtLeastOnce, id)
            .await;
    }
}

/// Asserts that a connection's close (`seen`, as [`RawClient::expect_closed`]
/// returns it) ended with DISCONNECT `code` and that not all of the
/// [`UNREAD_BACKLOG`] was written before it: only what had left the broker.
pub fn assert_backlog_withheld(seen: &[Packet], code: tern_codec::ReasonCode) {
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.code == code),
        "expected a close with DISCONNECT {code:?}"
    );
    let sent = seen.len() - 1;
    assert!(
        sent < usize::from(UNREAD_BACKLOG),
        "only what had left the broker: {sent} of {UNREAD_BACKLOG}"
    );
}

/// Leaves an offline session `client_id` that expires `expiry` seconds
/// after it disconnects, a member of `$share/workers/jobs` at QoS 1.
pub async fn offline_member(server: &Server, client_id: &str, expiry: u32) {
    let (mut c, _) = RawClient::connect(addr(server), persistent_connect(client_id, expiry)).await;
    c.subscribe("$share/workers/jobs", QoS::AtLeastOnce).await;
    c.send(Packet::Disconnect(Default::default())).await;
    c.expect_closed().await;
    until_offline(server, client_id).await;
}

/// Receives and acknowledges `n` messages; their payloads' first bytes,
/// sorted.
pub async fn take_jobs(c: &mut RawClient, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    for _ in 0..n {
        let m = c.recv_publish().await;
        c.send(Packet::PubAck(PubAck::new(m.packet_id.unwrap())))
            .await;
        got.push(m.payload[0]);
    }
    got.sort();
    got
}

/// Publishes jobs 0 to 3 on `jobs` at QoS 1, from a client of its own.
pub async fn publish_four_jobs(server: &Server) {
    let mut p = RawClient::connected(addr(server), "p", ProtocolVersion::V5).await;
    for i in 0..4u8 {
        p.publish("jobs", &[i], QoS::AtLeastOnce, u16::from(i) + 1)
            .await;
    }
}

/// Member B comes back to its session and takes all four jobs.
pub async fn member_b_takes_four_jobs(server: &Server) -> RawClient {
    let (mut b, ack) = RawClient::connect(addr(server), persistent_connect("member-b", 600)).await;
    assert!(ack.session_present);
    assert_eq!(take_jobs(&mut b, 4).await, vec![0, 1, 2, 3]);
    b
}

/// Publishes `count` messages to `topic` that each weigh `topic.len() + 400`
/// bytes against the broker's byte bounds: message `i` is 400 bytes of the
/// digit `i`, with packet id `i + 1` at QoS 1/2.
pub async fn publish_weighed(publisher: &mut RawClient, topic: &str, count: u16, qos: QoS) {
    for i in 0..count {
        let payload = [b'0' + (i % 10) as u8; 400];
        publisher.publish(topic, &payload, qos, i + 1).await;
    }
}

/// Acknowledges the first `acks` of `got` (QoS 1) one at a time, checking
/// that each PUBACK lets exactly one more PUBLISH through, which is added
/// to `got`.
pub async fn each_puback_lets_one_more_through(
    sub: &mut RawClient,
    got: &mut Vec<Publish>,
    acks: usize,
) {
    for i in 0..acks {
        let packet_id = got[i].packet_id.expect("a QoS 1 PUBLISH");
        sub.send(Packet::PubAck(PubAck::new(packet_id))).await;
        got.push(sub.recv_publish().await);
        sub.expect_silence(Duration::from_millis(100)).await;
    }
}
