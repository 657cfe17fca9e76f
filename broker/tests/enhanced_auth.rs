//! MQTT 5 enhanced authentication with SCRAM-SHA-256, driven by the
//! independent `scram` crate's client.

mod common;

use bytes::Bytes;
use common::*;
use tern::config::UserEntry;
use tern::metrics::Metrics;
use tern_codec::properties::AuthProperties;
use tern_codec::{Auth, Packet, ProtocolVersion, ReasonCode};

const METHOD: &str = "SCRAM-SHA-256";

async fn server() -> tern::Server {
    start(|c| {
        c.auth.users = vec![
            UserEntry {
                name: "alice".into(),
                password: "wonderland".into(),
            },
            UserEntry {
                name: "bob".into(),
                password: "builder".into(),
            },
        ]
    })
    .await
}

fn auth(code: ReasonCode, data: &str) -> Packet {
    Packet::Auth(Box::new(Auth {
        code,
        properties: AuthProperties {
            authentication_method: Some(Bytes::from_static(METHOD.as_bytes())),
            authentication_data: Some(Bytes::copy_from_slice(data.as_bytes())),
            ..Default::default()
        },
    }))
}

fn data_of(props: &AuthProperties) -> String {
    assert_eq!(
        props.authentication_method.as_deref(),
        Some(METHOD.as_bytes())
    );
    String::from_utf8(props.authentication_data.clone().unwrap().to_vec()).unwrap()
}

/// Runs the SCRAM exchange through CONNECT; returns the client and CONNACK.
async fn scram_connect(
    server: &tern::Server,
    user: &str,
    password: &str,
) -> (RawClient, tern_codec::ConnAck) {
    scram_connect_with_max(server, user, password, None).await
}

/// [`scram_connect`] with the client's Maximum Packet Size `max`.
async fn scram_connect_with_max(
    server: &tern::Server,
    user: &str,
    password: &str,
    max: Option<u32>,
) -> (RawClient, tern_codec::ConnAck) {
    let client = scram::ScramClient::new(user, password, None);
    let (server_first_state, client_first) = client.client_first();
    let mut connect = connect_packet("scram-client", ProtocolVersion::V5);
    connect.properties.authentication_method = Some(Bytes::from_static(METHOD.as_bytes()));
    connect.properties.authentication_data = Some(Bytes::from(client_first));
    connect.properties.maximum_packet_size = max;
    let mut c = RawClient::open(addr(server), ProtocolVersion::V5).await;
    c.send(Packet::Connect(Box::new(connect))).await;
    let server_first = match c.recv().await {
        Some(Packet::Auth(a)) => {
            assert_eq!(a.code, ReasonCode::ContinueAuthentication);
            data_of(&a.properties)
        }
        other => panic!("expected AUTH, got {other:?}"),
    };
    let client_final_state = server_first_state
        .handle_server_first(&server_first)
        .unwrap();
    let (server_final_state, client_final) = client_final_state.client_final();
    c.send(auth(ReasonCode::ContinueAuthentication, &client_final))
        .await;
    let ack = match c.recv().await {
        Some(Packet::ConnAck(ack)) => ack,
        other => panic!("expected CONNACK, got {other:?}"),
    };
    if ack.code == ReasonCode::Success {
        let server_final =
            String::from_utf8(ack.properties.authentication_data.clone().unwrap().to_vec())
                .unwrap();
        server_final_state
            .handle_server_final(&server_final)
            .expect("the client verifies the server's signature");
    }
    (c, *ack)
}

/// Starts a re-authentication as `user`: sends the client's first message,
/// reads the broker's challenge (AUTH 0x18), and returns the client's final
/// message with the state that checks the broker's last answer.
async fn reauth_challenge(
    c: &mut RawClient,
    user: &str,
    password: &str,
) -> (scram::client::ServerFinal, String) {
    let (state, first) = scram::ScramClient::new(user, password, None).client_first();
    c.send(auth(ReasonCode::ReAuthenticate, &first)).await;
    let server_first = match c.recv().await {
        Some(Packet::Auth(a)) if a.code == ReasonCode::ContinueAuthentication => {
            data_of(&a.properties)
        }
        other => panic!("expected AUTH 0x18, got {other:?}"),
    };
    state
        .handle_server_first(&server_first)
        .expect("a well-formed challenge")
        .client_final()
}

#[tokio::test]
async fn scram_sha256_succeeds_with_the_right_password() {
    let server = server().await;
    let (mut c, ack) = scram_connect(&server, "alice", "wonderland").await;
    assert_eq!(ack.code, ReasonCode::Success);
    assert_eq!(
        ack.properties.authentication_method.as_deref(),
        Some(METHOD.as_bytes())
    );
    // The connection is usable.
    assert_eq!(
        c.subscribe("a", tern_codec::QoS::AtMostOnce).await,
        vec![ReasonCode::Success]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn scram_sha256_refuses_a_wrong_password_and_an_unknown_user() {
    let server = server().await;
    let (_c, ack) = scram_connect(&server, "alice", "looking-glass").await;
    assert_eq!(ack.code, ReasonCode::NotAuthorized);
    let (_c, ack) = scram_connect(&server, "mallory", "wonderland").await;
    assert_eq!(ack.code, ReasonCode::NotAuthorized);
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_method_is_0x8c() {
    let server = server().await;
    let mut connect = connect_packet("k", ProtocolVersion::V5);
    connect.properties.authentication_method = Some(Bytes::from_static(b"KERBEROS"));
    let (_c, ack) = RawClient::connect(addr(&server), connect).await;
    assert_eq!(ack.code, ReasonCode::BadAuthenticationMethod);
    server.shutdown().await;
}

#[tokio::test]
async fn reauthentication_after_connect() {
    let server = server().await;
    let (mut c, ack) = scram_connect(&server, "alice", "wonderland").await;
    assert_eq!(ack.code, ReasonCode::Success);
    let (state, last) = reauth_challenge(&mut c, "alice", "wonderland").await;
    c.send(auth(ReasonCode::ContinueAuthentication, &last))
        .await;
    match c.recv().await {
        Some(Packet::Auth(a)) => {
            assert_eq!(a.code, ReasonCode::Success);
            state.handle_server_final(&data_of(&a.properties)).unwrap();
        }
        other => panic!("{other:?}"),
    }
    // A failed re-authentication closes the connection with 0x87.
    let (_, last) = reauth_challenge(&mut c, "alice", "wrong").await;
    c.send(auth(ReasonCode::ContinueAuthentication, &last))
        .await;
    c.expect_disconnect(ReasonCode::NotAuthorized).await;
    server.shutdown().await;
}

/// One connection is one user, with or without topic permissions: a
/// re-authentication that proves another user ends the connection (0x87).
#[tokio::test]
async fn reauthentication_as_another_user_is_refused() {
    let server = server().await;
    let (mut c, ack) = scram_connect(&server, "alice", "wonderland").await;
    assert_eq!(ack.code, ReasonCode::Success);
    let (_, last) = reauth_challenge(&mut c, "bob", "builder").await;
    c.send(auth(ReasonCode::ContinueAuthentication, &last))
        .await;
    c.expect_disconnect(ReasonCode::NotAuthorized).await;
    server.shutdown().await;
}

/// A handshake under way when `[auth]` is reloaded is judged by the new
/// rules before it opens anything: a user removed while its SCRAM exchange
/// ran gets CONNACK 0x87, though the exchange itself succeeded.
#[tokio::test]
async fn a_user_removed_during_its_exchange_is_refused() {
    let server = server().await;
    let client = scram::ScramClient::new("bob", "builder", None);
    let (state, client_first) = client.client_first();
    let mut connect = connect_packet("straddler", ProtocolVersion::V5);
    connect.properties.authentication_method = Some(Bytes::from_static(METHOD.as_bytes()));
    connect.properties.authentication_data = Some(Bytes::from(client_first));
    let mut c = RawClient::open(addr(&server), ProtocolVersion::V5).await;
    c.send(Packet::Connect(Box::new(connect))).await;
    let server_first = match c.recv().await {
        Some(Packet::Auth(a)) => data_of(&a.properties),
        other => panic!("expected AUTH, got {other:?}"),
    };
    let mut auth_config = server.broker().config.auth.clone();
    auth_config.users.retain(|u| u.name != "bob");
    assert_eq!(
        server.reload_auth(&auth_config),
        0,
        "bob was not connected yet"
    );
    let (_, client_final) = state
        .handle_server_first(&server_first)
        .unwrap()
        .client_final();
    c.send(auth(ReasonCode::ContinueAuthentication, &client_final))
        .await;
    match c.recv().await {
        Some(Packet::ConnAck(ack)) => assert_eq!(ack.code, ReasonCode::NotAuthorized),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert_eq!(
        server.broker().registry.session_count(),
        0,
        "nothing opened"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn auth_without_a_method_in_connect_is_a_protocol_error() {
    let server = server().await;
    let mut c = RawClient::connected(addr(&server), "plain", ProtocolVersion::V5).await;
    c.send(auth(ReasonCode::ReAuthenticate, "n,,n=alice,r=abc"))
        .await;
    c.expect_disconnect(ReasonCode::ProtocolError).await;
    server.shutdown().await;
}

/// The ACL knows a SCRAM client by the user it proved, not by a CONNECT
/// user name (it sent none).
#[tokio::test]
async fn the_acl_sees_the_user_scram_proved() {
    use tern::acl::{Access, AclRule, Permission};
    let server = start(|c| {
        c.auth.users = vec![UserEntry {
            name: "alice".into(),
            password: "wonderland".into(),
        }];
        c.auth.acl = vec![AclRule {
            user: None,
            client_id: None,
            topic: "home/%u/#".into(),
            access: Access::All,
            permission: Permission::Allow,
        }];
    })
    .await;
    let (mut c, ack) = scram_connect(&server, "alice", "wonderland").await;
    assert_eq!(ack.code, ReasonCode::Success);
    assert_eq!(
        c.subscribe("home/alice/#", tern_codec::QoS::AtMostOnce)
            .await,
        vec![ReasonCode::Success]
    );
    assert_eq!(
        c.subscribe("home/bob/#", tern_codec::QoS::AtMostOnce).await,
        vec![ReasonCode::NotAuthorized]
    );
    server.shutdown().await;
}

/// A re-authentication that fails ends the connection with nothing more
/// written to it than the DISCONNECT: deliveries queued for it and not yet
/// written stay with the session (the client that failed to prove itself
/// is not sent them during the close).
#[tokio::test]
async fn a_failed_reauthentication_is_sent_nothing_it_had_queued() {
    let server = start(|c| {
        c.auth.users = vec![UserEntry {
            name: "alice".into(),
            password: "wonderland".into(),
        }];
        window_for_unread_backlog(c);
    })
    .await;
    let (mut c, ack) = scram_connect(&server, "alice", "wonderland").await;
    assert_eq!(ack.code, ReasonCode::Success);
    assert_eq!(
        c.subscribe("feed", tern_codec::QoS::AtLeastOnce).await,
        [ReasonCode::GrantedQoS1]
    );
    let (_, last) = reauth_challenge(&mut c, "alice", "wrong").await;
    publish_unread_backlog(&server, "feed").await;
    c.send(auth(ReasonCode::ContinueAuthentication, &last))
        .await;
    assert_backlog_withheld(&c.expect_closed().await, ReasonCode::NotAuthorized);
    server.shutdown().await;
}

/// A CONNECT starting a SCRAM exchange whose client nonce is `nonce`, with
/// the client's Maximum Packet Size `max`.
fn scram_connect_packet(nonce: &str, max: Option<u32>) -> Packet {
    let mut connect = connect_packet("scram-sized", ProtocolVersion::V5);
    connect.properties.authentication_method = Some(Bytes::from_static(METHOD.as_bytes()));
    connect.properties.authentication_data = Some(Bytes::from(format!("n,,n=alice,r={nonce}")));
    connect.properties.maximum_packet_size = max;
    Packet::Connect(Box::new(connect))
}

/// The broker never sends a packet larger than the client's Maximum Packet
/// Size (MQTT-3.1.2-24), AUTH included: an exchange whose challenge the
/// client could not take is refused with CONNACK 0x87 (which fits), the
/// challenge never sent. A client that takes it goes on.
#[tokio::test]
async fn an_exchange_whose_challenge_the_client_cannot_take_is_refused() {
    let server = server().await;
    let nonce = "n".repeat(100);
    let mut c = RawClient::open(addr(&server), ProtocolVersion::V5).await;
    c.send(scram_connect_packet(&nonce, Some(120))).await;
    let seen = c.expect_closed().await;
    assert!(
        matches!(&seen[..], [Packet::ConnAck(ack)] if ack.code == ReasonCode::NotAuthorized),
        "{seen:?}"
    );
    let mut c = RawClient::open(addr(&server), ProtocolVersion::V5).await;
    c.send(scram_connect_packet(&nonce, Some(1000))).await;
    match c.recv().await {
        Some(Packet::Auth(a)) => assert_eq!(a.code, ReasonCode::ContinueAuthentication),
        other => panic!("expected AUTH, got {other:?}"),
    }
    server.shutdown().await;
}

/// A client may end an exchange with DISCONNECT (MQTT-3.1.2-30): the
/// connection is closed without a CONNACK, not refused as a protocol error.
#[tokio::test]
async fn a_disconnect_during_the_exchange_closes_without_a_connack() {
    let server = server().await;
    let mut c = RawClient::open(addr(&server), ProtocolVersion::V5).await;
    c.send(scram_connect_packet("abcdefgh", None)).await;
    assert!(matches!(c.recv().await, Some(Packet::Auth(_))));
    c.send(Packet::Disconnect(Default::default())).await;
    let seen = c.expect_closed().await;
    assert!(seen.is_empty(), "{seen:?}");
    assert_eq!(Metrics::get(&server.broker().metrics.protocol_errors), 0);
    server.shutdown().await;
}

/// A re-authentication whose challenge the client could not take fails
/// (DISCONNECT 0x87) rather than waiting for an answer to an AUTH that was
/// never sent.
#[tokio::test]
async fn a_reauthentication_whose_challenge_the_client_cannot_take_fails() {
    let server = server().await;
    let (mut c, ack) = scram_connect_with_max(&server, "alice", "wonderland", Some(200)).await;
    assert_eq!(ack.code, ReasonCode::Success);
    // A client nonce of 150 bytes makes the challenge larger than 200.
    let long_first = format!("n,,n=alice,r={}", "n".repeat(150));
    c.send(auth(ReasonCode::ReAuthenticate, &long_first)).await;
    c.expect_disconnect(ReasonCode::NotAuthorized).await;
    server.shutdown().await;
}
