//! MQTT over TLS and over WebSocket over TLS (`wss://`), with rumqttc's
//! TLS client (rustls) against the test certificates in tests/certs, and the
//! refusals a TLS listener owes to clients that do not speak TLS.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use tern_codec::{ProtocolVersion, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn certs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/certs")
}

/// A broker with one TLS listener on 127.0.0.1:0 besides its TCP one.
async fn start_tls(adjust: impl FnOnce(&mut tern::Config)) -> tern::Server {
    start(|c| {
        c.listeners.tls = vec!["127.0.0.1:0".parse().unwrap()];
        c.listeners.wss = vec!["127.0.0.1:0".parse().unwrap()];
        c.listeners.tls_cert = Some(certs().join("server.pem"));
        c.listeners.tls_key = Some(certs().join("server.key"));
        adjust(c);
    })
    .await
}

/// rumqttc over TLS (or over WebSocket over TLS), trusting the test CA.
fn tls_client_over(
    client_id: &str,
    server: &tern::Server,
    websocket: bool,
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
) {
    // rumqttc builds its rustls client from the process's default provider,
    // which it does not pick itself: the broker's, ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = std::fs::read(certs().join("ca.pem")).unwrap();
    // The certificate is for 127.0.0.1 and localhost: the name is checked.
    let mut options = if websocket {
        let port = server.wss_addrs()[0].port();
        let mut o =
            rumqttc::MqttOptions::new(client_id, format!("wss://localhost:{port}/mqtt"), port);
        o.set_transport(rumqttc::Transport::wss(ca, None, None));
        o
    } else {
        let port = server.tls_addrs()[0].port();
        let mut o = rumqttc::MqttOptions::new(client_id, "localhost", port);
        o.set_transport(rumqttc::Transport::tls(ca, None, None));
        o
    };
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(1 << 20, 1 << 20);
    run_rumqttc(options)
}

fn tls_client(
    client_id: &str,
    server: &tern::Server,
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
) {
    tls_client_over(client_id, server, false)
}

/// Subscribes and waits for the SUBACK.
async fn subscribed(
    client: &rumqttc::AsyncClient,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
    filter: &str,
    qos: rumqttc::QoS,
) {
    client.subscribe(filter, qos).await.unwrap();
    next_rumqttc(rx, "a SUBACK", |p| {
        matches!(p, rumqttc::Packet::SubAck(_)).then_some(())
    })
    .await;
}

async fn next_publish(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
) -> rumqttc::Publish {
    next_rumqttc(rx, "a PUBLISH", |p| match p {
        rumqttc::Packet::Publish(p) => Some(p),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn rumqttc_publishes_and_subscribes_over_tls() {
    let server = start_tls(|_| {}).await;
    let (sub, mut sub_rx) = tls_client("tls-sub", &server);
    subscribed(&sub, &mut sub_rx, "secure/#", rumqttc::QoS::AtLeastOnce).await;
    // From a TLS publisher ...
    let (publisher, _pub_rx) = tls_client("tls-pub", &server);
    publisher
        .publish(
            "secure/a",
            rumqttc::QoS::AtLeastOnce,
            false,
            vec![7u8; 20_000],
        )
        .await
        .unwrap();
    let p = next_publish(&mut sub_rx).await;
    assert_eq!(p.topic, "secure/a");
    assert_eq!(
        p.payload.len(),
        20_000,
        "a payload larger than one TLS record"
    );
    // ... and from a plain TCP one: one broker, whatever the transport.
    let mut plain = RawClient::connected(addr(&server), "plain-pub", ProtocolVersion::V311).await;
    plain
        .publish("secure/b", b"over tcp", QoS::AtLeastOnce, 1)
        .await;
    let p = next_publish(&mut sub_rx).await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("secure/b", &b"over tcp"[..])
    );
    assert_eq!(server.broker().registry.connection_count(), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn rumqttc_over_websocket_over_tls() {
    let server = start_tls(|_| {}).await;
    let (sub, mut sub_rx) = tls_client_over("wss-sub", &server, true);
    subscribed(&sub, &mut sub_rx, "wss/#", rumqttc::QoS::AtLeastOnce).await;
    let (publisher, _pub_rx) = tls_client_over("wss-pub", &server, true);
    // Larger than a TLS record and than one WebSocket frame's first read.
    let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    publisher
        .publish("wss/big", rumqttc::QoS::AtLeastOnce, false, payload.clone())
        .await
        .unwrap();
    let p = next_publish(&mut sub_rx).await;
    assert_eq!(p.topic, "wss/big");
    assert_eq!(&p.payload[..], &payload[..]);
    // A plain ws:// upgrade on the wss:// port is a failed TLS handshake.
    let mut stream = TcpStream::connect(server.wss_addrs()[0]).await.unwrap();
    stream
        .write_all(b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/1.1 101"),
        "no upgrade without TLS"
    );
    eventually("the failed handshake is counted", || {
        tern::metrics::Metrics::get(&server.broker().metrics.tls_handshakes_failed) == 1
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn plain_mqtt_on_the_tls_port_is_refused_and_counted() {
    let server = start_tls(|_| {}).await;
    let mut stream = TcpStream::connect(server.tls_addrs()[0]).await.unwrap();
    // A 3.1.1 CONNECT where a TLS ClientHello should be.
    stream
        .write_all(&[0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 0])
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection is closed");
    assert!(
        !answer.starts_with(&[0x20]),
        "no CONNACK: the bytes were not taken as MQTT ({answer:?})"
    );
    eventually("the failed handshake is counted", || {
        tern::metrics::Metrics::get(&server.broker().metrics.tls_handshakes_failed) == 1
    })
    .await;
    assert_eq!(
        tern::metrics::Metrics::get(&server.broker().metrics.connections_accepted),
        0,
        "no MQTT connection was started"
    );
    // The broker serves the next client.
    let (client, mut rx) = tls_client("after", &server);
    subscribed(&client, &mut rx, "x", rumqttc::QoS::AtMostOnce).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_silent_tls_client_is_closed_at_the_connect_timeout() {
    let server = start_tls(|c| c.limits.connect_timeout_secs = 1).await;
    let mut stream = TcpStream::connect(server.tls_addrs()[0]).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(4), stream.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "closed by the broker, within the connect timeout and a margin"
    );
    assert!(answer.is_empty());
    assert_eq!(
        tern::metrics::Metrics::get(&server.broker().metrics.tls_handshakes_failed),
        1
    );
    server.shutdown().await;
}

/// A bad certificate stops the start before the store is opened:
/// recovering the store may expire sessions, and a start that fails anyway
/// must leave it as it was.
#[tokio::test]
async fn a_bad_certificate_path_stops_the_start_with_its_name() {
    let data_dir = std::env::temp_dir().join(format!("tern-tls-bad-cert-{}", std::process::id()));
    let mut config = tern::Config::default();
    config.listeners.tcp = vec!["127.0.0.1:0".parse().unwrap()];
    config.listeners.ws = Vec::new();
    config.admin.bind = None;
    config.storage.durability = tern::config::DurabilityMode::Fsync;
    config.storage.data_dir = data_dir.clone();
    config.listeners.tls = vec!["127.0.0.1:0".parse().unwrap()];
    config.listeners.tls_cert = Some(certs().join("nope.pem"));
    config.listeners.tls_key = Some(certs().join("server.key"));
    let e = match tern::Server::start(config).await {
        Ok(_) => panic!("the broker started without its certificate"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("nope.pem"), "{e}");
    let opened = data_dir.exists();
    let _ = std::fs::remove_dir_all(&data_dir);
    assert!(
        !opened,
        "the store was opened before the certificate was read"
    );
}

/// An idle TLS reader is known to be idle without a read: a subscriber
/// whose task wakes for its writer (a delivery) takes no read buffer from
/// the pool. (Before, every wake-up took one and gave it back: two locks of
/// the shared pool per delivery.)
#[tokio::test]
async fn a_tls_subscriber_takes_no_read_buffer_per_delivery() {
    let server = start_tls(|_| {}).await;
    let (sub, mut sub_rx) = tls_client("tls-idle-sub", &server);
    subscribed(&sub, &mut sub_rx, "idle/t", rumqttc::QoS::AtMostOnce).await;
    let mut publisher =
        RawClient::connected(addr(&server), "idle-pub", ProtocolVersion::V311).await;
    let takes = || {
        let (hits, misses) = server.broker().pool.stats();
        hits + misses
    };
    let before = takes();
    const MESSAGES: u64 = 200;
    for i in 0..MESSAGES {
        // One at a time: each is its own read for the publisher and its own
        // wake-up for the subscriber's writer.
        publisher
            .publish("idle/t", &i.to_be_bytes(), QoS::AtMostOnce, 0)
            .await;
        let p = next_publish(&mut sub_rx).await;
        assert_eq!(&p.payload[..], &i.to_be_bytes());
    }
    let taken = takes() - before;
    // The publisher's reads take one each; the subscriber's side none.
    assert!(
        taken <= MESSAGES + MESSAGES / 10,
        "{taken} read buffers taken for {MESSAGES} messages"
    );
    server.shutdown().await;
}

/// rumqttc with a client certificate (or without one) on a broker that
/// requires them and allows no anonymous clients.
/// rumqttc options for the TLS listener, trusting the test CA, with a
/// client certificate and key from tests/certs if given.
fn certified_options(
    client_id: &str,
    server: &tern::Server,
    identity: Option<(&str, &str)>,
) -> rumqttc::MqttOptions {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = std::fs::read(certs().join("ca.pem")).unwrap();
    let auth = identity.map(|(cert, key)| {
        (
            std::fs::read(certs().join(cert)).unwrap(),
            std::fs::read(certs().join(key)).unwrap(),
        )
    });
    let port = server.tls_addrs()[0].port();
    let mut options = rumqttc::MqttOptions::new(client_id, "localhost", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(rumqttc::Transport::tls(ca, auth, None));
    options
}

fn certified_client(
    client_id: &str,
    server: &tern::Server,
    identity: Option<(&str, &str)>,
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
) {
    run_rumqttc(certified_options(client_id, server, identity))
}

/// The same over `wss://`.
fn certified_ws_client(
    client_id: &str,
    server: &tern::Server,
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |name: &str| std::fs::read(certs().join(name)).unwrap();
    let port = server.wss_addrs()[0].port();
    let url = format!("wss://localhost:{port}/mqtt");
    let mut options = rumqttc::MqttOptions::new(client_id, url, port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(rumqttc::Transport::wss(
        read("ca.pem"),
        Some((read("client.pem"), read("client.key"))),
        None,
    ));
    run_rumqttc(options)
}

/// The first thing the client's event loop reports: a CONNACK, or the end.
async fn connack_of(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
) -> Option<rumqttc::ConnAck> {
    loop {
        match tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("an outcome in time")
        {
            Some(rumqttc::Packet::ConnAck(ack)) => return Some(ack),
            Some(_) => {}
            None => return None,
        }
    }
}

#[tokio::test]
async fn a_client_certificate_authenticates_and_is_required() {
    let server = start_tls(|c| {
        c.listeners.tls_client_ca = Some(certs().join("ca.pem"));
        c.auth.allow_anonymous = false;
    })
    .await;
    // Signed by the CA: in, without a user name or password.
    let (_ok, mut rx) = certified_client("sensor-1", &server, Some(("client.pem", "client.key")));
    let ack = connack_of(&mut rx).await.expect("a CONNACK");
    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
    // No certificate, or one the CA did not sign: the handshake fails.
    let (_none, mut rx) = certified_client("no-cert", &server, None);
    assert!(
        connack_of(&mut rx).await.is_none(),
        "no certificate, no connection"
    );
    let (_rogue, mut rx) = certified_client("rogue", &server, Some(("rogue.pem", "rogue.key")));
    assert!(
        connack_of(&mut rx).await.is_none(),
        "a certificate from another CA"
    );
    eventually("both failed handshakes are counted", || {
        tern::metrics::Metrics::get(&server.broker().metrics.tls_handshakes_failed) == 2
    })
    .await;
    // Over wss:// the certificate is required but does not replace [auth]:
    // a browser would present it to any page that opens a WebSocket.
    let metrics = &server.broker().metrics;
    let accepted = tern::metrics::Metrics::get(&metrics.connections_accepted);
    let (_ws, mut rx) = certified_ws_client("sensor-ws", &server);
    let ack = connack_of(&mut rx).await;
    assert!(
        ack.as_ref()
            .is_none_or(|a| a.code != rumqttc::ConnectReturnCode::Success),
        "a certificate alone does not let a wss client in: {ack:?}"
    );
    // Refused by [auth], after a TLS handshake and an upgrade that worked.
    assert_eq!(
        tern::metrics::Metrics::get(&metrics.tls_handshakes_failed),
        2
    );
    assert_eq!(
        tern::metrics::Metrics::get(&metrics.connections_accepted),
        accepted + 1
    );
    // Plain TCP is not authenticated by anything: still no anonymous client.
    let (_plain, ack) = RawClient::connect(
        addr(&server),
        connect_packet("anonymous", ProtocolVersion::V311),
    )
    .await;
    assert_eq!(ack.code, tern_codec::ReasonCode::NotAuthorized);
    server.shutdown().await;
}

/// The SUBACK's code for one filter.
async fn granted(
    client: &rumqttc::AsyncClient,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
    filter: &str,
) -> rumqttc::SubscribeReasonCode {
    client
        .subscribe(filter, rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    next_rumqttc(rx, "a SUBACK", |p| match p {
        rumqttc::Packet::SubAck(ack) => Some(ack.return_codes[0]),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn a_certificate_common_name_is_the_acl_user_when_configured() {
    use tern::acl::{Access, AclRule, Permission};
    use tern::config::CertificateIdentity;
    let rules = || {
        vec![AclRule {
            user: Some("sensor-1".into()),
            client_id: None,
            topic: "devices/%u/#".into(),
            access: Access::All,
            permission: Permission::Allow,
        }]
    };
    let server = start_tls(|c| {
        c.listeners.tls_client_ca = Some(certs().join("ca.pem"));
        c.listeners.tls_client_identity = CertificateIdentity::CommonName;
        c.auth.acl = rules();
    })
    .await;
    let ok = rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce);
    // client.pem names sensor-1: its topics, whatever user name the CONNECT
    // claims.
    let identity = Some(("client.pem", "client.key"));
    let mut options = certified_options("c1", &server, identity);
    options.set_credentials("sensor-2", "anything");
    let (client, mut rx) = run_rumqttc(options);
    assert_eq!(granted(&client, &mut rx, "devices/sensor-1/#").await, ok);
    assert_eq!(
        granted(&client, &mut rx, "devices/sensor-2/#").await,
        rumqttc::SubscribeReasonCode::Failure,
        "the claimed user name is not the identity"
    );
    client
        .publish(
            "devices/sensor-1/t",
            rumqttc::QoS::AtLeastOnce,
            false,
            "21.5",
        )
        .await
        .unwrap();
    assert_eq!(next_publish(&mut rx).await.payload, "21.5");
    // A certificate from the CA that names no user, or two: refused.
    for file in ["nameless", "twonames"] {
        let (key, cert) = (format!("{file}.key"), format!("{file}.pem"));
        let options = certified_options(file, &server, Some((&cert, &key)));
        let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
        let refusal = tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .expect("an outcome in time");
        assert!(
            matches!(
                refusal,
                Err(rumqttc::ConnectionError::ConnectionRefused(
                    rumqttc::ConnectReturnCode::NotAuthorized
                ))
            ),
            "{file}: {refusal:?}"
        );
    }
    server.shutdown().await;

    // Without tls_client_identity the certificate names no user.
    let server = start_tls(|c| {
        c.listeners.tls_client_ca = Some(certs().join("ca.pem"));
        c.auth.acl = rules();
    })
    .await;
    let (client, mut rx) = certified_client("c1", &server, Some(("client.pem", "client.key")));
    assert_eq!(
        granted(&client, &mut rx, "devices/sensor-1/#").await,
        rumqttc::SubscribeReasonCode::Failure
    );
    let (_c, mut rx) = certified_client("c2", &server, Some(("nameless.pem", "nameless.key")));
    let ack = connack_of(&mut rx).await.expect("a CONNACK");
    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
    server.shutdown().await;
}

/// The certificate (DER) a TLS client is shown at `addr`.
async fn presented_certificate(addr: std::net::SocketAddr) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls::pki_types::CertificateDer::pem_file_iter(certs().join("ca.pem")).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = TcpStream::connect(addr).await.unwrap();
    let tls = tokio::time::timeout(WAIT, connector.connect(name, stream))
        .await
        .expect("a handshake in time")
        .expect("the handshake succeeds");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(certs().join(pem))
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn a_reload_serves_the_renewed_certificate_to_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(certs().join("server.pem"), &cert).unwrap();
    std::fs::copy(certs().join("server.key"), &key).unwrap();
    let server = start(|c| {
        c.listeners.tls = vec!["127.0.0.1:0".parse().unwrap()];
        c.listeners.tls_cert = Some(cert.clone());
        c.listeners.tls_key = Some(key.clone());
    })
    .await;
    let tls_addr = server.tls_addrs()[0];
    assert_eq!(presented_certificate(tls_addr).await, der_of("server.pem"));
    // A client connected before the renewal.
    let (sub, mut sub_rx) = tls_client("before-renewal", &server);
    subscribed(&sub, &mut sub_rx, "renewed/#", rumqttc::QoS::AtMostOnce).await;

    // The files are renewed, then the broker is told.
    std::fs::copy(certs().join("server2.pem"), &cert).unwrap();
    std::fs::copy(certs().join("server2.key"), &key).unwrap();
    assert_eq!(
        presented_certificate(tls_addr).await,
        der_of("server.pem"),
        "nothing changes before the reload"
    );
    server.reload_tls().expect("the renewed files load");
    assert_eq!(presented_certificate(tls_addr).await, der_of("server2.pem"));

    // A broken renewal is refused and the certificate in use stays.
    std::fs::write(&key, "not a key").unwrap();
    assert!(server.reload_tls().is_err());
    assert_eq!(presented_certificate(tls_addr).await, der_of("server2.pem"));

    // The connection from before the renewal still works.
    let mut publisher =
        RawClient::connected(addr(&server), "renewal-pub", ProtocolVersion::V311).await;
    publisher
        .publish("renewed/x", b"still here", QoS::AtMostOnce, 0)
        .await;
    assert_eq!(&next_publish(&mut sub_rx).await.payload[..], b"still here");
    server.shutdown().await;
}

/// Whether a client with certificate `name`.pem gets a CONNACK (it is
/// refused at the handshake otherwise).
async fn admitted(server: &tern::Server, name: &str) -> bool {
    let (cert, key) = (format!("{name}.pem"), format!("{name}.key"));
    let (_client, mut rx) = certified_client(name, server, Some((&cert, &key)));
    connack_of(&mut rx).await.is_some()
}

#[tokio::test]
async fn a_revoked_client_certificate_is_refused_from_the_reload_that_lists_it() {
    let dir = tempfile::tempdir().unwrap();
    let crl = dir.path().join("crl.pem");
    std::fs::copy(certs().join("crl-none.pem"), &crl).unwrap();
    let server = start_tls(|c| {
        c.listeners.tls_client_ca = Some(certs().join("ca.pem"));
        c.listeners.tls_client_crl = Some(crl.clone());
    })
    .await;
    assert!(admitted(&server, "revoked").await, "not revoked yet");
    // A client connected before the revocation.
    let (sub, mut sub_rx) =
        certified_client("sensor-9", &server, Some(("revoked.pem", "revoked.key")));
    subscribed(&sub, &mut sub_rx, "revocation/#", rumqttc::QoS::AtMostOnce).await;

    std::fs::copy(certs().join("crl.pem"), &crl).unwrap();
    server.reload_tls().expect("the new list loads");
    let failed = tern::metrics::Metrics::get(&server.broker().metrics.tls_handshakes_failed);
    assert!(!admitted(&server, "revoked").await, "revoked");
    assert!(
        admitted(&server, "client").await,
        "another certificate of the CA"
    );
    assert_eq!(
        tern::metrics::Metrics::get(&server.broker().metrics.tls_handshakes_failed),
        failed + 1
    );

    // A broken list is refused and the one in use stays.
    std::fs::write(&crl, "not a list").unwrap();
    assert!(server.reload_tls().is_err());
    assert!(!admitted(&server, "revoked").await);

    // The connection from before stays, as with a renewed certificate.
    let mut publisher =
        RawClient::connected(addr(&server), "revocation-pub", ProtocolVersion::V311).await;
    publisher
        .publish("revocation/x", b"still here", QoS::AtMostOnce, 0)
        .await;
    assert_eq!(&next_publish(&mut sub_rx).await.payload[..], b"still here");
    server.shutdown().await;
}

#[tokio::test]
async fn a_certificate_whose_issuer_has_no_revocation_list_is_refused() {
    // Two CAs trusted, the list is only the first one's.
    let dir = tempfile::tempdir().unwrap();
    let cas = dir.path().join("cas.pem");
    let mut both = std::fs::read(certs().join("ca.pem")).unwrap();
    both.extend(std::fs::read(certs().join("ca2.pem")).unwrap());
    std::fs::write(&cas, both).unwrap();
    for crl in [None, Some(certs().join("crl.pem"))] {
        let with_crl = crl.is_some();
        let server = start_tls(|c| {
            c.listeners.tls_client_ca = Some(cas.clone());
            c.listeners.tls_client_crl = crl;
        })
        .await;
        assert!(admitted(&server, "client").await);
        assert_eq!(
            admitted(&server, "ca2-client").await,
            !with_crl,
            "with a list: {with_crl}"
        );
        server.shutdown().await;
    }
}
