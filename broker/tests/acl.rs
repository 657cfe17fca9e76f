//! Topic permissions (`[[auth.acl]]`): what a client may publish and
//! subscribe to, checked on the wire with a raw MQTT 5 client (reason
//! codes) and rumqttc (MQTT 3.1.1, with a user name).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use tern::acl::{Access, AclRule, Permission};
use tern::config::UserEntry;
use tern_codec::properties::WillProperties;
use tern_codec::{Packet, ProtocolVersion, QoS, ReasonCode, Will};

fn rule(user: Option<&str>, topic: &str, access: Access) -> AclRule {
    AclRule {
        user: user.map(str::to_owned),
        client_id: None,
        topic: topic.to_owned(),
        access,
        permission: Permission::Allow,
    }
}

/// A broker where devices publish under their own client id, the user
/// `ops` (password `secret`) reads every device, and everyone shares
/// `public/#`. Anonymous clients are allowed.
async fn start_with_rules() -> tern::Server {
    start(|c| {
        c.auth.users = vec![UserEntry {
            name: "ops".into(),
            password: "secret".into(),
        }];
        c.auth.acl = vec![
            rule(None, "public/#", Access::All),
            rule(None, "devices/%c/#", Access::Publish),
            rule(Some("ops"), "devices/#", Access::Subscribe),
        ];
    })
    .await
}

/// rumqttc 3.1.1 as user `ops`, client id `console`.
fn ops_client(
    server: &tern::Server,
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
) {
    let mut options = rumqttc::MqttOptions::new("console", "127.0.0.1", addr(server).port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_credentials("ops", "secret");
    run_rumqttc(options)
}

async fn next_packet(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
) -> rumqttc::Packet {
    next_rumqttc(rx, "a packet after CONNACK", |p| {
        (!matches!(p, rumqttc::Packet::ConnAck(_))).then_some(p)
    })
    .await
}

#[tokio::test]
async fn publish_and_subscribe_are_allowed_only_where_a_rule_says() {
    let server = start_with_rules().await;
    let (ops, mut ops_rx) = ops_client(&server);
    ops.subscribe("devices/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    ops.subscribe("#", rumqttc::QoS::AtLeastOnce).await.unwrap();
    ops.subscribe("public/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut granted = Vec::new();
    while granted.len() < 3 {
        if let rumqttc::Packet::SubAck(ack) = next_packet(&mut ops_rx).await {
            granted.push(ack.return_codes[0]);
        }
    }
    assert_eq!(
        granted,
        [
            rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce),
            rumqttc::SubscribeReasonCode::Failure,
            rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce),
        ],
        "devices/# and public/# for ops, not # (3.1.1: 0x80)"
    );

    let mut device = RawClient::connected(addr(&server), "d1", ProtocolVersion::V5).await;
    // Its own topics: yes, and ops receives them.
    assert_eq!(
        puback_code(&mut device, "devices/d1/temp", 1).await,
        ReasonCode::Success
    );
    match next_packet(&mut ops_rx).await {
        rumqttc::Packet::Publish(p) => assert_eq!(p.topic, "devices/d1/temp"),
        other => panic!("{other:?}"),
    }
    // Another device's: PUBACK 0x87, and nobody receives it.
    assert_eq!(
        puback_code(&mut device, "devices/d2/temp", 2).await,
        ReasonCode::NotAuthorized
    );
    // Subscriptions: public/+ yes; devices/#, and the same as a shared
    // subscription, no (SUBACK 0x87).
    assert_eq!(
        device.subscribe("public/+", QoS::AtMostOnce).await,
        [ReasonCode::Success]
    );
    assert_eq!(
        device.subscribe("devices/#", QoS::AtMostOnce).await,
        [ReasonCode::NotAuthorized]
    );
    assert_eq!(
        device
            .subscribe("$share/g/devices/#", QoS::AtMostOnce)
            .await,
        [ReasonCode::NotAuthorized]
    );
    // A public message reaches both, and is the next thing ops receives:
    // d2's topic never reached it.
    device
        .send(publish_packet("public/news", b"hi", QoS::AtMostOnce, None))
        .await;
    assert_eq!(&device.recv_publish().await.payload[..], b"hi");
    loop {
        if let rumqttc::Packet::Publish(p) = next_packet(&mut ops_rx).await {
            assert_eq!(p.topic, "public/news", "d2's message was never delivered");
            break;
        }
    }
    let metrics = &server.broker().metrics;
    assert_eq!(tern::metrics::Metrics::get(&metrics.publishes_denied), 1);
    assert_eq!(
        tern::metrics::Metrics::get(&metrics.subscriptions_denied),
        3
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_will_where_the_client_may_not_publish_is_refused_at_connect() {
    let server = start_with_rules().await;
    for (topic, expected) in [
        ("devices/d1/status", ReasonCode::Success),
        ("devices/d2/status", ReasonCode::NotAuthorized),
    ] {
        let mut connect = connect_packet("d1", ProtocolVersion::V5);
        connect.will = Some(Will {
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: WillProperties::default(),
        });
        let (_client, ack) = RawClient::connect(addr(&server), connect).await;
        assert_eq!(ack.code, expected, "{topic}");
    }
    server.shutdown().await;
}

/// A session whose subscriptions its new client may not make is not
/// resumed: neither those subscriptions nor what they queued while it was
/// offline reach the new client.
#[tokio::test]
async fn a_session_with_subscriptions_the_new_client_may_not_make_is_not_resumed() {
    let server = start_with_rules().await;
    // ops subscribes to every device in a persistent session, then leaves.
    let mut ops = ops_reading_devices(&server).await;
    ops.send(Packet::Disconnect(tern_codec::Disconnect::new(
        ReasonCode::Success,
    )))
    .await;
    ops.expect_closed().await;
    // A reading is queued for the offline session.
    let mut device = RawClient::connected(addr(&server), "d1", ProtocolVersion::V5).await;
    device
        .publish("devices/d1/temp", b"21", QoS::AtLeastOnce, 1)
        .await;

    // Someone else, under the same client id, without being ops.
    let (mut other, ack) =
        RawClient::connect(addr(&server), persistent_connect("console", 600)).await;
    assert_eq!(ack.code, ReasonCode::Success);
    assert!(!ack.session_present, "not resumed");
    other.expect_silence(Duration::from_millis(300)).await;
    device
        .publish("devices/d1/temp", b"22", QoS::AtLeastOnce, 2)
        .await;
    other.expect_silence(Duration::from_millis(200)).await;
    drop(other);
    let metrics = &server.broker().metrics;
    assert_eq!(
        tern::metrics::Metrics::get(&metrics.sessions_not_resumed),
        1
    );

    // ops itself resumes what it may hold (the session above was replaced,
    // so it starts a new one here; its own subscription then works).
    let mut ops = ops_reading_devices(&server).await;
    device
        .publish("devices/d1/temp", b"23", QoS::AtLeastOnce, 3)
        .await;
    assert_eq!(&ops.recv_publish().await.payload[..], b"23");
    // And a client the session's subscriptions are allowed to resumes it,
    // with what was queued meanwhile.
    ops.send(Packet::Disconnect(tern_codec::Disconnect::new(
        ReasonCode::Success,
    )))
    .await;
    ops.expect_closed().await;
    device
        .publish("devices/d1/temp", b"24", QoS::AtLeastOnce, 4)
        .await;
    let (mut ops, ack) = RawClient::connect(addr(&server), ops_connect()).await;
    assert!(ack.session_present, "resumed");
    // 23 was never acknowledged: sent again (DUP), then 24.
    let again = ops.recv_publish().await;
    assert_eq!((&again.payload[..], again.dup), (&b"23"[..], true));
    assert_eq!(&ops.recv_publish().await.payload[..], b"24");
    server.shutdown().await;
}

/// Publishes at QoS 1 and returns the PUBACK's reason code.
async fn puback_code(client: &mut RawClient, topic: &str, packet_id: u16) -> ReasonCode {
    client
        .send(publish_packet(
            topic,
            b"x",
            QoS::AtLeastOnce,
            Some(packet_id),
        ))
        .await;
    match client.recv().await {
        Some(Packet::PubAck(ack)) => ack.code,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// ops, connected in its persistent session and subscribed to `devices/#`.
async fn ops_reading_devices(server: &tern::Server) -> RawClient {
    let (mut ops, ack) = RawClient::connect(addr(server), ops_connect()).await;
    assert_eq!(ack.code, ReasonCode::Success);
    assert_eq!(
        ops.subscribe("devices/#", QoS::AtLeastOnce).await,
        [ReasonCode::GrantedQoS1]
    );
    ops
}

/// ops's persistent CONNECT, client id `console`.
fn ops_connect() -> tern_codec::Connect {
    let mut connect = persistent_connect("console", 600);
    connect.username = Some(Bytes::from_static(b"ops"));
    connect.password = Some(Bytes::from_static(b"secret"));
    connect
}

/// A user name no password was checked against proves nothing: `user` and
/// `%u` rules do not apply to it.
#[tokio::test]
async fn a_user_name_without_a_checked_password_gets_no_user_rules() {
    let server = start(|c| {
        // No [[auth.users]]: any user name is accepted, and proves nothing.
        c.auth.acl = vec![rule(Some("ops"), "devices/#", Access::Subscribe)];
    })
    .await;
    let mut connect = connect_packet("claims-ops", ProtocolVersion::V5);
    connect.username = Some(Bytes::from_static(b"ops"));
    let (mut c, ack) = RawClient::connect(addr(&server), connect).await;
    assert_eq!(ack.code, ReasonCode::Success);
    assert_eq!(
        c.subscribe("devices/#", QoS::AtMostOnce).await,
        [ReasonCode::NotAuthorized]
    );
    server.shutdown().await;
}

/// A session is its owner's even with no subscription left: what it still
/// holds (a delivery never acknowledged, sent again on resume) must not
/// reach another user that takes its client id.
#[tokio::test]
async fn another_user_cannot_resume_a_session_even_after_it_unsubscribed() {
    let server = start_with_rules().await;
    let mut ops = ops_reading_devices(&server).await;
    let mut device = RawClient::connected(addr(&server), "d1", ProtocolVersion::V5).await;
    device
        .publish("devices/d1/secret", b"s3cr3t", QoS::AtLeastOnce, 1)
        .await;
    // Received, never acknowledged: in flight, sent again on resume.
    assert_eq!(&ops.recv_publish().await.payload[..], b"s3cr3t");
    ops.unsubscribe("devices/#").await;
    drop(ops);

    // Anonymous, same client id, asking to resume: a fresh session.
    let (mut other, ack) =
        RawClient::connect(addr(&server), persistent_connect("console", 600)).await;
    assert!(!ack.session_present);
    other.expect_silence(Duration::from_millis(300)).await;
    server.shutdown().await;
}

/// The owner is kept in the session's record: after a restart, only ops
/// resumes its session.
#[tokio::test]
async fn the_owner_of_a_session_survives_a_restart() {
    let store: std::sync::Arc<dyn tern_storage::Store> =
        std::sync::Arc::new(tern_storage::MemoryStore::new());
    let start_on = |store: std::sync::Arc<dyn tern_storage::Store>| async move {
        let mut config = tern::Config::default();
        config.listeners.tcp = vec!["127.0.0.1:0".parse().unwrap()];
        config.listeners.ws = vec![];
        config.admin.bind = None;
        config.storage.durability = tern::config::DurabilityMode::Fsync;
        config.auth.users = vec![UserEntry {
            name: "ops".into(),
            password: "secret".into(),
        }];
        config.auth.acl = vec![rule(Some("ops"), "devices/#", Access::Subscribe)];
        tern::Server::start_with_store(config, store).await.unwrap()
    };
    let server = start_on(store.clone()).await;
    drop(ops_reading_devices(&server).await);
    server.shutdown().await;

    let server = start_on(store.clone()).await;
    let (_other, ack) = RawClient::connect(addr(&server), persistent_connect("console", 600)).await;
    assert!(!ack.session_present, "not another user's after a restart");
    server.shutdown().await;

    // The refused resume replaced the session: ops starts afresh too, and
    // keeps what it makes now across the next restart.
    let server = start_on(store.clone()).await;
    drop(ops_reading_devices(&server).await);
    server.shutdown().await;
    let server = start_on(store).await;
    let (_ops, ack) = RawClient::connect(addr(&server), ops_connect()).await;
    assert!(
        ack.session_present,
        "ops resumes its own session after a restart"
    );
    server.shutdown().await;
}

fn deny(client_id: Option<&str>, topic: &str, access: Access) -> AclRule {
    AclRule {
        client_id: client_id.map(str::to_owned),
        permission: Permission::Deny,
        ..rule(None, topic, access)
    }
}

/// Everything is allowed but what deny rules take back: nobody receives
/// `test/nosubscribe` (the rule Paho's interoperability suite asks for) or
/// touches `secret/#`, and the client `m1` never receives `jobs/private`.
fn allow_all_but(c: &mut tern::Config) {
    c.auth.acl = vec![
        deny(None, "test/nosubscribe", Access::Subscribe),
        rule(None, "#", Access::All),
        deny(None, "secret/#", Access::All),
        deny(Some("m1"), "jobs/private", Access::Subscribe),
    ];
}

#[tokio::test]
async fn a_deny_rule_refuses_what_it_covers_and_withholds_what_it_overlaps() {
    let server = start(allow_all_but).await;
    // rumqttc (3.1.1) subscribes to everything, then to the denied topic.
    let mut options = rumqttc::MqttOptions::new("reader", "127.0.0.1", addr(&server).port());
    options.set_keep_alive(Duration::from_secs(30));
    let (reader, mut reader_rx) = run_rumqttc(options);
    reader
        .subscribe("#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    reader
        .subscribe("test/nosubscribe", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut granted = Vec::new();
    while granted.len() < 2 {
        if let rumqttc::Packet::SubAck(ack) = next_packet(&mut reader_rx).await {
            granted.push(ack.return_codes[0]);
        }
    }
    assert_eq!(
        granted,
        [
            rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce),
            rumqttc::SubscribeReasonCode::Failure,
        ],
        "# is allowed; the denied topic itself is refused (3.1.1: 0x80)"
    );

    let mut client = RawClient::connected(addr(&server), "watcher", ProtocolVersion::V5).await;
    for (filter, code) in [
        ("test/nosubscribe", ReasonCode::NotAuthorized),
        ("$share/g/test/nosubscribe", ReasonCode::NotAuthorized),
        ("secret/+/x", ReasonCode::NotAuthorized),
        ("test/+", ReasonCode::Success),
    ] {
        assert_eq!(
            client.subscribe(filter, QoS::AtMostOnce).await,
            [code],
            "{filter}"
        );
    }
    // Publishing to the subscribe-denied topic is allowed; to secret/ not.
    let mut writer = RawClient::connected(addr(&server), "writer", ProtocolVersion::V5).await;
    assert_eq!(
        puback_code(&mut writer, "test/nosubscribe", 1).await,
        ReasonCode::Success
    );
    assert_eq!(
        puback_code(&mut writer, "secret/plans", 2).await,
        ReasonCode::NotAuthorized
    );
    assert_eq!(
        puback_code(&mut writer, "test/open", 3).await,
        ReasonCode::Success
    );
    // Neither `#` nor `test/+` receives the denied topic: the next message
    // each gets is test/open.
    assert_eq!(client.recv_publish().await.topic, "test/open");
    loop {
        if let rumqttc::Packet::Publish(p) = next_packet(&mut reader_rx).await {
            assert_eq!(p.topic, "test/open", "test/nosubscribe was withheld");
            break;
        }
    }

    // Retained messages: the denied one is withheld from a new subscriber.
    writer
        .send(retained_publish("test/nosubscribe", b"kept"))
        .await;
    writer.send(retained_publish("test/r", b"kept")).await;
    let mut late = RawClient::connected(addr(&server), "late", ProtocolVersion::V5).await;
    assert_eq!(
        late.subscribe("test/#", QoS::AtMostOnce).await,
        [ReasonCode::Success]
    );
    assert_eq!(late.recv_publish().await.topic, "test/r");
    late.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

fn retained_publish(topic: &str, payload: &[u8]) -> Packet {
    let mut packet = publish_packet(topic, payload, QoS::AtMostOnce, None);
    if let Packet::Publish(p) = &mut packet {
        p.retain = true;
    }
    packet
}

#[tokio::test]
async fn a_shared_group_passes_over_a_member_denied_the_topic() {
    let server = start(allow_all_but).await;
    let mut m1 = RawClient::connected(addr(&server), "m1", ProtocolVersion::V5).await;
    let mut m2 = RawClient::connected(addr(&server), "m2", ProtocolVersion::V5).await;
    for m in [&mut m1, &mut m2] {
        assert_eq!(
            m.subscribe("$share/g/jobs/+", QoS::AtLeastOnce).await,
            [ReasonCode::GrantedQoS1]
        );
    }
    let mut publisher = RawClient::connected(addr(&server), "p", ProtocolVersion::V5).await;
    for id in 1..=4 {
        publisher
            .publish("jobs/private", &[id as u8], QoS::AtLeastOnce, id)
            .await;
    }
    // All four reach m2, none is lost on m1's turns.
    for id in 1..=4u8 {
        let p = m2.recv_publish().await;
        assert_eq!(
            (&p.topic[..], &p.payload[..]),
            (&b"jobs/private"[..], &[id][..])
        );
        m2.send(Packet::PubAck(tern_codec::PubAck::new(
            p.packet_id.unwrap(),
        )))
        .await;
    }
    m1.expect_silence(Duration::from_millis(200)).await;
    // Other topics still alternate between both.
    for id in 5..=6 {
        publisher
            .publish("jobs/open", &[id as u8], QoS::AtLeastOnce, id)
            .await;
    }
    assert_eq!(m1.recv_publish().await.topic, "jobs/open");
    assert_eq!(m2.recv_publish().await.topic, "jobs/open");
    server.shutdown().await;
}

/// Rules change with a restart: a deny rule added then withholds what a
/// stored session queued before it, and what is published after.
#[tokio::test]
async fn a_deny_rule_added_at_a_restart_withholds_what_was_queued_before() {
    let store: std::sync::Arc<dyn tern_storage::Store> =
        std::sync::Arc::new(tern_storage::MemoryStore::new());
    let start_on = |store: std::sync::Arc<dyn tern_storage::Store>, rules: Vec<AclRule>| async move {
        let mut config = tern::Config::default();
        config.listeners.tcp = vec!["127.0.0.1:0".parse().unwrap()];
        config.listeners.ws = vec![];
        config.admin.bind = None;
        config.storage.durability = tern::config::DurabilityMode::Fsync;
        config.auth.acl = rules;
        tern::Server::start_with_store(config, store).await.unwrap()
    };
    let server = start_on(store.clone(), vec![rule(None, "#", Access::All)]).await;
    let (mut worker, _) = RawClient::connect(addr(&server), persistent_connect("w", 600)).await;
    assert_eq!(
        worker.subscribe("jobs/#", QoS::AtLeastOnce).await,
        [ReasonCode::GrantedQoS1]
    );
    drop(worker);
    let mut publisher = RawClient::connected(addr(&server), "p", ProtocolVersion::V5).await;
    for (id, topic) in [(1, "jobs/a"), (2, "jobs/private"), (3, "jobs/b")] {
        publisher.publish(topic, b"x", QoS::AtLeastOnce, id).await;
    }
    server.shutdown().await;

    let rules = vec![
        rule(None, "#", Access::All),
        deny(None, "jobs/private", Access::Subscribe),
    ];
    let server = start_on(store, rules).await;
    let mut publisher = RawClient::connected(addr(&server), "p", ProtocolVersion::V5).await;
    publisher
        .publish("jobs/private", b"x", QoS::AtLeastOnce, 4)
        .await;
    publisher.publish("jobs/c", b"x", QoS::AtLeastOnce, 5).await;
    let (mut worker, ack) = RawClient::connect(addr(&server), persistent_connect("w", 600)).await;
    assert!(ack.session_present, "jobs/# is still allowed");
    let mut topics = Vec::new();
    for _ in 0..3 {
        let p = worker.recv_publish().await;
        topics.push(p.topic.clone());
        worker
            .send(Packet::PubAck(tern_codec::PubAck::new(
                p.packet_id.unwrap(),
            )))
            .await;
    }
    assert_eq!(topics, ["jobs/a", "jobs/b", "jobs/c"]);
    worker.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

/// Reloading `[auth]` (what `tern serve` does on SIGHUP): new connections
/// get the new rules at once; a connected client is disconnected (0x87)
/// only if the new rules would not let it in with its credentials or would
/// give it other permissions; and a session made under other deny rules is
/// not resumed, so nothing it holds slips past the new ones.
#[tokio::test]
async fn a_reload_of_auth_disconnects_only_the_clients_it_changes() {
    let server = start_with_rules().await;
    let mut ops = ops_reading_devices(&server).await;
    let mut device = RawClient::connected(addr(&server), "d1", ProtocolVersion::V5).await;
    let mut auth = server.broker().config.auth.clone();

    // ops's password changes; the anonymous device's standing does not.
    auth.users[0].password = "renewed".into();
    assert_eq!(server.reload_auth(&auth), 1);
    ops.expect_disconnect(ReasonCode::NotAuthorized).await;
    assert_eq!(
        puback_code(&mut device, "devices/d1/temp", 1).await,
        ReasonCode::Success
    );
    let (_, refused) = RawClient::connect(addr(&server), ops_connect()).await;
    assert_eq!(refused.code, ReasonCode::BadUserNameOrPassword);
    let mut renewed = ops_connect();
    renewed.password = Some(Bytes::from_static(b"renewed"));
    let (mut ops, ack) = RawClient::connect(addr(&server), renewed.clone()).await;
    assert_eq!(ack.code, ReasonCode::Success);
    assert!(ack.session_present, "same permissions: the session resumes");
    assert_eq!(&ops.recv_publish().await.payload[..], b"x");

    // A deny rule for everyone changes everyone's permissions.
    auth.acl.push(deny(None, "devices/+/secret", Access::All));
    assert_eq!(server.reload_auth(&auth), 2);
    ops.expect_disconnect(ReasonCode::NotAuthorized).await;
    device.expect_disconnect(ReasonCode::NotAuthorized).await;
    let (mut ops, ack) = RawClient::connect(addr(&server), renewed).await;
    assert_eq!(ack.code, ReasonCode::Success);
    assert!(
        !ack.session_present,
        "made under other deny rules: not resumed"
    );
    assert_eq!(
        ops.subscribe("devices/#", QoS::AtLeastOnce).await,
        [ReasonCode::GrantedQoS1]
    );
    let mut device = RawClient::connected(addr(&server), "d1", ProtocolVersion::V5).await;
    assert_eq!(
        puback_code(&mut device, "devices/d1/secret", 2).await,
        ReasonCode::NotAuthorized
    );
    assert_eq!(
        puback_code(&mut device, "devices/d1/temp", 3).await,
        ReasonCode::Success
    );
    assert_eq!(&ops.recv_publish().await.payload[..], b"x");
    ops.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}

/// A will is checked against the rules in force when it is published: a
/// client disconnected by a reload that denies its will's topic leaves no
/// will behind.
#[tokio::test]
async fn a_will_the_reloaded_rules_deny_is_not_published() {
    let server = start_with_rules().await;
    let mut ops = ops_reading_devices(&server).await;
    let mut connect = connect_packet("d1", ProtocolVersion::V5);
    connect.will = Some(Will {
        topic: Bytes::from_static(b"devices/d1/status"),
        payload: Bytes::from_static(b"offline"),
        qos: QoS::AtMostOnce,
        retain: true,
        properties: WillProperties::default(),
    });
    let (mut device, ack) = RawClient::connect(addr(&server), connect).await;
    assert_eq!(ack.code, ReasonCode::Success);

    let mut auth = server.broker().config.auth.clone();
    auth.acl
        .push(deny(Some("d1"), "devices/+/status", Access::Publish));
    let metrics = &server.broker().metrics;
    let denied_before = tern::metrics::Metrics::get(&metrics.publishes_denied);
    // The device's permissions changed (ops's did not).
    assert_eq!(server.reload_auth(&auth), 1);
    device.expect_disconnect(ReasonCode::NotAuthorized).await;
    ops.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(
        tern::metrics::Metrics::get(&metrics.publishes_denied),
        denied_before + 1
    );
    assert_eq!(server.broker().retained_count(), 0, "no retained will");
    server.shutdown().await;
}

/// A session belongs to the user its client proved even where no rules
/// were in force: once rules come (a reload or a restart), its user resumes
/// it and another user does not.
#[tokio::test]
async fn a_session_made_before_any_rule_still_belongs_to_its_user() {
    let server = start(|c| {
        c.auth.users = vec![
            UserEntry {
                name: "alice".into(),
                password: "a".into(),
            },
            UserEntry {
                name: "bob".into(),
                password: "b".into(),
            },
        ];
    })
    .await;
    let as_user = |user: &'static str, password: &'static str| {
        let mut connect = persistent_connect("shared-id", 600);
        connect.username = Some(Bytes::from_static(user.as_bytes()));
        connect.password = Some(Bytes::from_static(password.as_bytes()));
        connect
    };
    let (mut alice, _) = RawClient::connect(addr(&server), as_user("alice", "a")).await;
    assert_eq!(
        alice.subscribe("public/#", QoS::AtLeastOnce).await,
        [ReasonCode::GrantedQoS1]
    );
    alice
        .send(Packet::Disconnect(tern_codec::Disconnect::new(
            ReasonCode::Success,
        )))
        .await;
    alice.expect_closed().await;

    let mut auth = server.broker().config.auth.clone();
    auth.acl = vec![rule(None, "public/#", Access::All)];
    server.reload_auth(&auth);
    let (mut alice, ack) = RawClient::connect(addr(&server), as_user("alice", "a")).await;
    assert!(ack.session_present, "her own session, under the rules");
    alice
        .send(Packet::Disconnect(tern_codec::Disconnect::new(
            ReasonCode::Success,
        )))
        .await;
    alice.expect_closed().await;
    let (_bob, ack) = RawClient::connect(addr(&server), as_user("bob", "b")).await;
    assert!(!ack.session_present, "alice's session is not bob's");
    server.shutdown().await;
}

/// A client whose credentials a reload no longer accepts is sent nothing
/// more than its DISCONNECT: the deliveries queued for it and not yet
/// written stay with its session (before, the close grace wrote all of them
/// first), and its user, logging in again with the new password, gets every
/// one of them.
#[tokio::test]
async fn a_client_whose_credentials_a_reload_revokes_is_sent_nothing_it_had_queued() {
    let server = start(|c| {
        c.auth.users = vec![UserEntry {
            name: "ops".into(),
            password: "secret".into(),
        }];
        window_for_unread_backlog(c);
    })
    .await;
    let (mut ops, ack) = RawClient::connect(addr(&server), ops_connect()).await;
    assert_eq!(ack.code, ReasonCode::Success);
    assert_eq!(
        ops.subscribe("feed", QoS::AtLeastOnce).await,
        [ReasonCode::GrantedQoS1]
    );
    publish_unread_backlog(&server, "feed").await;

    let mut auth = server.broker().config.auth.clone();
    auth.users[0].password = "renewed".into();
    assert_eq!(server.reload_auth(&auth), 1);
    assert_backlog_withheld(&ops.expect_closed().await, ReasonCode::NotAuthorized);

    let mut renewed = ops_connect();
    renewed.password = Some(Bytes::from_static(b"renewed"));
    let (mut ops, ack) = RawClient::connect(addr(&server), renewed).await;
    assert_eq!(ack.code, ReasonCode::Success);
    assert!(ack.session_present);
    let mut ids = Vec::new();
    for _ in 0..UNREAD_BACKLOG {
        let p = ops.recv_publish().await;
        let id = p.packet_id.expect("QoS 1");
        ids.push(id);
        ops.send(Packet::PubAck(tern_codec::PubAck::new(id))).await;
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        usize::from(UNREAD_BACKLOG),
        "every delivery, once"
    );
    ops.expect_silence(Duration::from_millis(200)).await;
}

/// A session that another user's CONNECT replaces (it may not resume it)
/// ends as one replaced with Clean Start does: what it kept of a shared
/// subscription goes to another member, not with it (MQTT 5 4.8.2).
#[tokio::test]
async fn a_shared_member_replaced_by_another_user_hands_its_messages_over() {
    let server = start_with_rules().await;
    // Member A is ops's session, member B anonymous; both offline.
    let mut as_ops = persistent_connect("member-a", 600);
    as_ops.username = Some(Bytes::from_static(b"ops"));
    as_ops.password = Some(Bytes::from_static(b"secret"));
    for connect in [as_ops, persistent_connect("member-b", 600)] {
        let client_id = String::from_utf8(connect.client_id.to_vec()).unwrap();
        let (mut c, ack) = RawClient::connect(addr(&server), connect).await;
        assert_eq!(ack.code, ReasonCode::Success);
        let granted = c.subscribe("$share/workers/public/jobs", QoS::AtLeastOnce);
        assert_eq!(granted.await, [ReasonCode::GrantedQoS1]);
        c.send(Packet::Disconnect(Default::default())).await;
        c.expect_closed().await;
        until_offline(&server, &client_id).await;
    }
    let mut p = RawClient::connected(addr(&server), "p", ProtocolVersion::V5).await;
    for i in 0..4u8 {
        p.publish("public/jobs", &[i], QoS::AtLeastOnce, u16::from(i) + 1)
            .await;
    }
    // An anonymous client takes A's client id and asks to resume: ops's
    // session is not its to resume, so it ends, and its half goes to B.
    let (mut a, ack) = RawClient::connect(addr(&server), persistent_connect("member-a", 600)).await;
    assert!(!ack.session_present);
    assert_eq!(server.broker().metrics.shared_redeliveries.get(), 2);
    let (mut b, ack) = RawClient::connect(addr(&server), persistent_connect("member-b", 600)).await;
    assert!(ack.session_present);
    assert_eq!(take_jobs(&mut b, 4).await, vec![0, 1, 2, 3]);
    b.expect_silence(Duration::from_millis(200)).await;
    a.expect_silence(Duration::from_millis(200)).await;
    server.shutdown().await;
}
