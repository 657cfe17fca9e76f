//! What an operator reads from a running broker: `/metrics` (Prometheus text)
//! and `/health` on the admin endpoint, in memory mode too, after traffic
//! from rumqttc and a raw client that sends garbage.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tern_codec::{ProtocolVersion, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One GET: (status, the Content-Type header, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("admin endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: tern\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("the endpoint answers")
        .expect("a UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or_default()
        .to_owned();
    (status, content_type, body.to_owned())
}

/// The value of sample `name` (a metric without labels).
fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
        .parse::<f64>()
        .expect("a number") as u64
}

#[tokio::test]
async fn metrics_count_traffic_and_refusals_and_health_answers() {
    let server = start(|c| {
        c.storage.durability = tern::config::DurabilityMode::Memory;
    })
    .await;
    let admin = server
        .admin_addr()
        .expect("the admin endpoint runs in memory mode");

    let (status, content_type, text) = get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert_eq!(sample(&text, "tern_connections"), 0);
    assert_eq!(sample(&text, "tern_messages_received_total"), 0);

    // A rumqttc subscriber and publisher: 5 messages, each delivered once.
    let mut options = rumqttc::MqttOptions::new("metrics-sub", "127.0.0.1", addr(&server).port());
    options.set_keep_alive(Duration::from_secs(30));
    let (sub, mut sub_rx) = run_rumqttc(options);
    sub.subscribe("m/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut publisher =
        RawClient::connected(addr(&server), "metrics-pub", ProtocolVersion::V311).await;
    next_rumqttc(&mut sub_rx, "a SUBACK", |p| {
        matches!(p, rumqttc::Packet::SubAck(_)).then_some(())
    })
    .await;
    for i in 0..5u16 {
        publisher
            .publish("m/x", b"hello", QoS::AtLeastOnce, i + 1)
            .await;
    }
    for _ in 0..5 {
        next_rumqttc(&mut sub_rx, "a PUBLISH", |p| {
            matches!(p, rumqttc::Packet::Publish(_)).then_some(())
        })
        .await;
    }

    // Garbage: a packet type 0 is malformed; the connection is closed.
    let mut garbage =
        RawClient::connected(addr(&server), "metrics-bad", ProtocolVersion::V311).await;
    garbage.send_bytes(&[0x00, 0x00]).await;
    garbage.expect_closed().await;

    let (_, _, text) = get(admin, "/metrics").await;
    assert_eq!(sample(&text, "tern_messages_received_total"), 5);
    assert_eq!(sample(&text, "tern_messages_delivered_total"), 5);
    assert_eq!(sample(&text, "tern_malformed_packets_total"), 1);
    assert_eq!(sample(&text, "tern_subscriptions"), 1);
    assert_eq!(sample(&text, "tern_connections_accepted_total"), 3);
    // 3 CONNACKs (written before a connection's writer exists, counted too),
    // 1 SUBACK, 5 PUBACKs, 5 deliveries.
    assert_eq!(sample(&text, "tern_packets_sent_total"), 14);
    assert!(sample(&text, "tern_bytes_received_total") > 5 * 5);
    eventually("the bad connection is gone from the gauge", || {
        server.broker().registry.connection_count() == 2
    })
    .await;
    let (_, _, text) = get(admin, "/metrics").await;
    assert_eq!(sample(&text, "tern_connections"), 2);
    assert_eq!(sample(&text, "tern_sessions"), 2);

    let (status, content_type, body) = get(admin, "/health").await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/json");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "serving");
    assert_eq!(health["connections"], 2);
    assert_eq!(health["durability"], "memory");
    assert!(health.get("store_failures").is_none(), "{body}");

    // No store in memory mode: the store's views say so.
    let (status, _, body) = get(admin, "/v1/sessions").await;
    assert_eq!(status, 404);
    assert!(body.contains("no store is served here"), "{body}");
    server.shutdown().await;
}

/// `messages_delivered` counts what reached a subscriber's queue or
/// socket: not QoS 0 for an offline client, not what a full queue dropped,
/// through a shared subscription as well.
#[tokio::test]
async fn deliveries_that_were_dropped_are_not_counted_as_delivered() {
    let server = start(|c| {
        c.storage.durability = tern::config::DurabilityMode::Memory;
        c.limits.max_queued_messages = 3;
    })
    .await;
    let metrics = &server.broker().metrics;
    let count = |counter: &tern::metrics::Counter| tern::metrics::Metrics::get(counter);
    offline_subscriber(&server, "away", "d/#", QoS::AtLeastOnce).await;
    offline_member(&server, "member", 3600).await;

    let mut publisher = RawClient::connected(addr(&server), "pub", ProtocolVersion::V5).await;
    for i in 0..5u16 {
        publisher.publish("d/q0", b"x", QoS::AtMostOnce, 0).await;
        publisher
            .publish("d/q1", b"x", QoS::AtLeastOnce, i + 1)
            .await;
        publisher
            .publish("jobs", b"x", QoS::AtLeastOnce, i + 10)
            .await;
    }
    // 3 of the 5 QoS 1 messages for each: the rest found a full queue.
    assert_eq!(count(&metrics.messages_received), 15);
    assert_eq!(count(&metrics.messages_delivered), 6);
    assert_eq!(count(&metrics.messages_dropped_queue_full), 4);

    // What was counted is what arrives.
    let (mut away, _) = RawClient::connect(addr(&server), persistent_connect("away", 3600)).await;
    for _ in 0..3 {
        assert_eq!(away.recv_publish().await.topic_str(), "d/q1");
    }
    away.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

/// Every connection another one takes over is counted once, whether the
/// takeover waited for it to finish (the usual case) or not.
#[tokio::test]
async fn each_takeover_is_counted() {
    let server = start(|c| {
        c.storage.durability = tern::config::DurabilityMode::Memory;
    })
    .await;
    let mut previous = RawClient::connected(addr(&server), "same", ProtocolVersion::V5).await;
    for _ in 0..3 {
        let next = RawClient::connected(addr(&server), "same", ProtocolVersion::V5).await;
        previous
            .expect_disconnect(tern_codec::ReasonCode::SessionTakenOver)
            .await;
        previous = next;
    }
    let metrics = &server.broker().metrics;
    assert_eq!(tern::metrics::Metrics::get(&metrics.session_takeovers), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn a_broker_with_a_store_reports_its_writer() {
    let dir = std::env::temp_dir().join(format!("tern-metrics-{}", std::process::id()));
    let server = start(|c| {
        c.storage.durability = tern::config::DurabilityMode::Fsync;
        c.storage.data_dir = dir.clone();
        c.admin.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = server.admin_addr().expect("admin endpoint");
    // A persistent session: its subscription is stored before the SUBACK.
    let (mut client, _) =
        RawClient::connect(addr(&server), persistent_connect("metrics-durable", 60)).await;
    client.subscribe("d/#", QoS::AtLeastOnce).await;

    let (_, _, text) = get(admin, "/metrics").await;
    assert!(sample(&text, "tern_store_syncs_total") >= 1, "{text}");
    assert_eq!(sample(&text, "tern_store_failures_total"), 0);
    let (status, _, body) = get(admin, "/health").await;
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["durability"], "fsync");
    assert_eq!(health["store_failures"], 0);
    let (status, _, _) = get(admin, "/v1/sessions/metrics-durable").await;
    assert_eq!(status, 200);

    // The metrics listener serves the counts, never the store.
    let metrics = server.metrics_addr().expect("metrics listener");
    let (status, _, text) = get(metrics, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(sample(&text, "tern_sessions"), 1);
    let (status, _, _) = get(metrics, "/health").await;
    assert_eq!(status, 200);
    let (status, _, body) = get(metrics, "/v1/sessions/metrics-durable").await;
    assert_eq!(status, 404, "{body}");
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn sys_topics_are_retained_updated_and_hidden_from_wildcards() {
    let server = start(|c| c.mqtt.sys_interval_secs = 1).await;
    let port = addr(&server).port();
    eventually("the first $SYS round", || {
        server
            .broker()
            .retained
            .get("$SYS/broker/version")
            .is_some()
    })
    .await;

    // A rumqttc client subscribed to $SYS/# gets the retained figures at once.
    let mut options = rumqttc::MqttOptions::new("sys-reader", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (reader, mut rx) = run_rumqttc(options);
    reader
        .subscribe("$SYS/#", rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();
    // A subscriber to # must never see them (MQTT-4.7.2-1).
    let mut everything =
        RawClient::connected(addr(&server), "sys-wild", ProtocolVersion::V311).await;
    assert_eq!(
        everything.subscribe("#", QoS::AtMostOnce).await,
        vec![tern_codec::ReasonCode::Success]
    );

    let mut retained_version = None;
    let mut connected = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut third = None;
    // Wait for the version (retained) and for clients/connected to count
    // the third connection made below.
    while connected.last().map(String::as_str) != Some("3") {
        let packet = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("$SYS updates arrive")
            .unwrap();
        let rumqttc::Packet::Publish(p) = packet else {
            continue;
        };
        let text = String::from_utf8(p.payload.to_vec()).unwrap();
        match p.topic.as_str() {
            "$SYS/broker/version" => retained_version = Some((text, p.retain)),
            "$SYS/broker/clients/connected" => {
                connected.push(text);
                if third.is_none() {
                    third = Some(
                        RawClient::connected(addr(&server), "sys-third", ProtocolVersion::V5).await,
                    );
                }
            }
            _ => {}
        }
    }
    let (version, retain) = retained_version.expect("the version was sent");
    assert_eq!(version, format!("tern {}", env!("CARGO_PKG_VERSION")));
    assert!(retain, "sent as a retained message on subscription");
    everything.expect_silence(Duration::from_millis(300)).await;
    server.shutdown().await;
}

/// A store writer stopped by a panic in the store (sled panics on some
/// damaged files) leaves a broker that can change no durable state:
/// `/health` says so with 503, for a supervisor to restart it.
#[tokio::test]
async fn health_reports_a_stopped_store_writer() {
    let store = std::sync::Arc::new(tern_storage::FailingStore::new(
        tern_storage::MemoryStore::new(),
    ));
    let mut config = tern::config::Config::default();
    config.listeners.tcp = vec!["127.0.0.1:0".parse().unwrap()];
    config.listeners.ws = vec![];
    config.admin.bind = Some("127.0.0.1:0".parse().unwrap());
    config.storage.durability = tern::config::DurabilityMode::Fsync;
    let server = tern::server::Server::start_with_store(config, store.clone())
        .await
        .expect("broker starts");
    let admin = server.admin_addr().expect("admin endpoint");
    let (status, _, body) = get(admin, "/health").await;
    assert_eq!(
        (status, body.contains("\"serving\"")),
        (200, true),
        "{body}"
    );

    store.panic_apply(true);
    // A durable session's CONNECT writes its record.
    let (_client, _) = RawClient::connect(addr(&server), persistent_connect("p", 3600)).await;
    let mut last = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        let (status, _, body) = get(admin, "/health").await;
        if status == 503 {
            let health: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(health["status"], "store_stopped");
            let (_, _, text) = get(admin, "/metrics").await;
            assert_eq!(sample(&text, "tern_store_writer_running"), 0, "{text}");
            return;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("/health still answers {last}");
}
