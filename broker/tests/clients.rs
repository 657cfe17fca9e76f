//! The broker driven by rumqttc, a third-party MQTT client, over MQTT 3.1.1
//! and 5.0.

mod common;

use std::time::Duration;

use common::*;
use tokio::sync::mpsc;

/// Runs a rumqttc 3.1.1 event loop in the background, forwarding incoming
/// packets.
fn spawn_v3(
    client_id: &str,
    port: u16,
    adjust: impl FnOnce(&mut rumqttc::MqttOptions),
) -> (
    rumqttc::AsyncClient,
    mpsc::UnboundedReceiver<rumqttc::Packet>,
) {
    let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    adjust(&mut options);
    run_rumqttc(options)
}

/// The same for rumqttc's MQTT 5 client.
fn spawn_v5(
    client_id: &str,
    port: u16,
    adjust: impl FnOnce(&mut rumqttc::v5::MqttOptions),
) -> (
    rumqttc::v5::AsyncClient,
    mpsc::UnboundedReceiver<rumqttc::v5::Incoming>,
) {
    let mut options = rumqttc::v5::MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    adjust(&mut options);
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::v5::Event::Incoming(p)) => {
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

/// A rumqttc 3.1.1 client with a clean session, once its CONNACK came.
async fn connected_v3(
    client_id: &str,
    port: u16,
) -> (
    rumqttc::AsyncClient,
    mpsc::UnboundedReceiver<rumqttc::Packet>,
) {
    let (client, mut rx) = spawn_v3(client_id, port, |_| {});
    next(&mut rx, |p| {
        matches!(p, rumqttc::Packet::ConnAck(_)).then_some(p)
    })
    .await;
    (client, rx)
}

/// Leaves a persistent rumqttc session `client_id` subscribed to `filter`
/// at QoS 1 and offline.
async fn leave_subscribed(server: &tern::Server, client_id: &str, filter: &str) {
    let (sub, mut rx) = spawn_v3(client_id, addr(server).port(), |o| {
        o.set_clean_session(false);
    });
    next(&mut rx, |p| {
        matches!(p, rumqttc::Packet::ConnAck(_)).then_some(p)
    })
    .await;
    sub.subscribe(filter, rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    next(&mut rx, |p| {
        matches!(p, rumqttc::Packet::SubAck(_)).then_some(p)
    })
    .await;
    sub.disconnect().await.unwrap();
    until_offline(server, client_id).await;
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, mut pick: impl FnMut(T) -> Option<T>) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            let p = rx.recv().await.expect("event loop alive");
            if let Some(p) = pick(p) {
                return p;
            }
        }
    })
    .await
    .expect("expected packet arrives")
}

async fn next_publish_v3(rx: &mut mpsc::UnboundedReceiver<rumqttc::Packet>) -> rumqttc::Publish {
    match next(rx, |p| {
        matches!(p, rumqttc::Packet::Publish(_)).then_some(p)
    })
    .await
    {
        rumqttc::Packet::Publish(p) => p,
        _ => unreachable!(),
    }
}

async fn next_publish_v5(
    rx: &mut mpsc::UnboundedReceiver<rumqttc::v5::Incoming>,
) -> rumqttc::v5::mqttbytes::v5::Publish {
    match next(rx, |p| {
        matches!(p, rumqttc::v5::Incoming::Publish(_)).then_some(p)
    })
    .await
    {
        rumqttc::v5::Incoming::Publish(p) => p,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn rumqttc_v311_all_qos_levels() {
    let server = start(|_| {}).await;
    let port = addr(&server).port();
    let (sub, mut sub_rx) = spawn_v3("sub", port, |_| {});
    next(&mut sub_rx, |p| {
        matches!(p, rumqttc::Packet::ConnAck(_)).then_some(p)
    })
    .await;
    sub.subscribe("sensors/+/temp", rumqttc::QoS::ExactlyOnce)
        .await
        .unwrap();
    match next(&mut sub_rx, |p| {
        matches!(p, rumqttc::Packet::SubAck(_)).then_some(p)
    })
    .await
    {
        rumqttc::Packet::SubAck(ack) => assert_eq!(
            ack.return_codes,
            vec![rumqttc::SubscribeReasonCode::Success(
                rumqttc::QoS::ExactlyOnce
            )]
        ),
        _ => unreachable!(),
    }
    let (publisher, mut pub_rx) = spawn_v3("pub", port, |_| {});
    next(&mut pub_rx, |p| {
        matches!(p, rumqttc::Packet::ConnAck(_)).then_some(p)
    })
    .await;
    for (i, qos) in [
        rumqttc::QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce,
    ]
    .into_iter()
    .enumerate()
    {
        let payload = vec![i as u8; 1000 * (i + 1)];
        publisher
            .publish(format!("sensors/{i}/temp"), qos, false, payload.clone())
            .await
            .unwrap();
        let got = next_publish_v3(&mut sub_rx).await;
        assert_eq!(got.qos, qos);
        assert_eq!(got.topic, format!("sensors/{i}/temp"));
        assert_eq!(&got.payload[..], &payload[..]);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn rumqttc_v311_persistent_session() {
    let server = start(|_| {}).await;
    let port = addr(&server).port();
    leave_subscribed(&server, "keeper", "jobs").await;
    let (publisher, _pub_rx) = connected_v3("producer", port).await;
    for i in 0..5 {
        publisher
            .publish("jobs", rumqttc::QoS::AtLeastOnce, false, format!("job-{i}"))
            .await
            .unwrap();
    }
    eventually("queued", || {
        server
            .broker()
            .registry
            .get("keeper")
            .unwrap()
            .queued_len()
            .0
            == 5
    })
    .await;

    let (_sub, mut rx) = spawn_v3("keeper", port, |o| {
        o.set_clean_session(false);
    });
    match next(&mut rx, |p| {
        matches!(p, rumqttc::Packet::ConnAck(_)).then_some(p)
    })
    .await
    {
        rumqttc::Packet::ConnAck(ack) => assert!(ack.session_present),
        _ => unreachable!(),
    }
    for i in 0..5 {
        let p = next_publish_v3(&mut rx).await;
        assert_eq!(&p.payload[..], format!("job-{i}").as_bytes());
    }
    server.shutdown().await;
}

/// Messages queued for an offline session own their bytes: a trickle of
/// publishes, each in a read of its own, leaves the read buffers free to go
/// back to the pool instead of pinning one per queued message.
#[tokio::test]
async fn an_offline_queue_keeps_no_read_buffers() {
    const MESSAGES: usize = 100;
    let server = start(|_| {}).await;
    let port = addr(&server).port();
    leave_subscribed(&server, "sleeper", "trickle").await;
    let (publisher, mut pub_rx) = connected_v3("trickler", port).await;
    let (_, misses_before) = server.broker().pool.stats();
    for i in 0..MESSAGES {
        publisher
            .publish(
                "trickle",
                rumqttc::QoS::AtLeastOnce,
                false,
                format!("m-{i}"),
            )
            .await
            .unwrap();
        // One at a time: each PUBLISH arrives in a read of its own.
        next(&mut pub_rx, |p| {
            matches!(p, rumqttc::Packet::PubAck(_)).then_some(p)
        })
        .await;
    }
    let queued = server
        .broker()
        .registry
        .get("sleeper")
        .unwrap()
        .queued_len()
        .0;
    assert_eq!(queued, MESSAGES);
    // A buffer still shared with a queued message cannot go back to the
    // pool, so every read would take a new one (a miss).
    let (_, misses_after) = server.broker().pool.stats();
    let misses = misses_after - misses_before;
    assert!(misses < 10, "{misses} pool misses for {MESSAGES} reads");

    let (_sub, mut rx) = spawn_v3("sleeper", port, |o| {
        o.set_clean_session(false);
    });
    for i in 0..MESSAGES {
        let p = next_publish_v3(&mut rx).await;
        assert_eq!(&p.payload[..], format!("m-{i}").as_bytes());
    }
    server.shutdown().await;
}

/// A message's properties reach each of its subscribers whole, beside each
/// delivery's own: its subscription's identifier and the expiry counted
/// down. Two subscribers, so that the broker encodes the message's
/// properties once and shares them.
#[tokio::test]
async fn rumqttc_v5_properties_pass_through_and_subscription_ids() {
    use rumqttc::v5::mqttbytes::v5::{PublishProperties, SubscribeProperties};
    use rumqttc::v5::mqttbytes::QoS;
    let server = start(|_| {}).await;
    let port = addr(&server).port();
    let mut subscribers = Vec::new();
    for (client_id, filter, id, qos) in [
        ("v5sub", "req/#", 42, QoS::AtLeastOnce),
        ("v5sub2", "req/+", 268_435_455, QoS::AtMostOnce),
    ] {
        let (sub, mut rx) = spawn_v5(client_id, port, |_| {});
        next(&mut rx, |p| {
            matches!(p, rumqttc::v5::Incoming::ConnAck(_)).then_some(p)
        })
        .await;
        let props = SubscribeProperties {
            id: Some(id),
            user_properties: vec![],
        };
        sub.subscribe_with_properties(filter, qos, props)
            .await
            .unwrap();
        next(&mut rx, |p| {
            matches!(p, rumqttc::v5::Incoming::SubAck(_)).then_some(p)
        })
        .await;
        subscribers.push((sub, rx, id));
    }

    let (publisher, mut prx) = spawn_v5("v5pub", port, |_| {});
    next(&mut prx, |p| {
        matches!(p, rumqttc::v5::Incoming::ConnAck(_)).then_some(p)
    })
    .await;
    let properties = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(600),
        content_type: Some("application/json".into()),
        response_topic: Some("resp/1".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"corr")),
        user_properties: vec![("k".into(), "v1".into()), ("k".into(), "v2".into())],
        ..Default::default()
    };
    publisher
        .publish_with_properties("req/a", QoS::AtLeastOnce, false, "{}", properties.clone())
        .await
        .unwrap();
    // And one only the first subscriber gets: its properties are encoded
    // with its header, not ahead.
    publisher
        .publish_with_properties("req/a/b", QoS::AtLeastOnce, false, "{}", properties)
        .await
        .unwrap();
    let received = [("req/a", 0), ("req/a", 1), ("req/a/b", 0)];
    for (topic, at) in received {
        let (_, rx, id) = &mut subscribers[at];
        let got = next_publish_v5(rx).await;
        let p = got.properties.expect("properties forwarded");
        assert_eq!(p.payload_format_indicator, Some(1));
        assert!(
            p.message_expiry_interval
                .is_some_and(|s| (590..=600).contains(&s)),
            "expiry counted down from 600: {:?}",
            p.message_expiry_interval
        );
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.response_topic.as_deref(), Some("resp/1"));
        assert_eq!(p.correlation_data.as_deref(), Some(&b"corr"[..]));
        assert_eq!(
            p.user_properties,
            vec![
                ("k".to_string(), "v1".to_string()),
                ("k".to_string(), "v2".to_string())
            ]
        );
        assert_eq!(p.subscription_identifiers, vec![*id]);
        assert_eq!(p.topic_alias, None);
        assert_eq!(&got.topic[..], topic.as_bytes());
    }
    server.shutdown().await;
}

/// A message with an expiry reaches subscribers that share its header
/// (MQTT 5 without subscription identifiers): each copy states the expiry
/// left and carries its own packet id and the message's properties; a
/// 3.1.1 subscriber gets the same message without properties.
#[tokio::test]
async fn rumqttc_subscribers_sharing_a_header_get_the_expiry_left() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS;
    let server = start(|_| {}).await;
    let port = addr(&server).port();
    let mut subscribers = Vec::new();
    for client_id in ["exp1", "exp2"] {
        let (sub, mut rx) = spawn_v5(client_id, port, |_| {});
        next(&mut rx, |p| {
            matches!(p, rumqttc::v5::Incoming::ConnAck(_)).then_some(p)
        })
        .await;
        sub.subscribe("exp/#", QoS::AtLeastOnce).await.unwrap();
        next(&mut rx, |p| {
            matches!(p, rumqttc::v5::Incoming::SubAck(_)).then_some(p)
        })
        .await;
        subscribers.push((sub, rx));
    }
    let (old, mut old_rx) = run_rumqttc(rumqttc::MqttOptions::new("exp3", "127.0.0.1", port));
    old.subscribe("exp/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    next_rumqttc(&mut old_rx, "SUBACK", |p| {
        matches!(p, rumqttc::Packet::SubAck(_)).then_some(())
    })
    .await;

    let (publisher, mut prx) = spawn_v5("exppub", port, |_| {});
    next(&mut prx, |p| {
        matches!(p, rumqttc::v5::Incoming::ConnAck(_)).then_some(p)
    })
    .await;
    let properties = PublishProperties {
        message_expiry_interval: Some(600),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    for i in 0..3 {
        publisher
            .publish_with_properties(
                format!("exp/{i}"),
                QoS::AtLeastOnce,
                false,
                format!("m-{i}"),
                properties.clone(),
            )
            .await
            .unwrap();
    }
    for (_sub, rx) in &mut subscribers {
        for i in 0..3 {
            let got = next_publish_v5(rx).await;
            assert_eq!(&got.topic[..], format!("exp/{i}").as_bytes());
            assert_eq!(&got.payload[..], format!("m-{i}").as_bytes());
            assert_eq!(got.qos, QoS::AtLeastOnce);
            assert_ne!(got.pkid, 0);
            let p = got.properties.expect("properties forwarded");
            assert!(
                p.message_expiry_interval
                    .is_some_and(|s| (590..=600).contains(&s)),
                "expiry counted down from 600: {:?}",
                p.message_expiry_interval
            );
            assert_eq!(p.user_properties, vec![("k".into(), "v".into())]);
            assert!(p.subscription_identifiers.is_empty());
        }
    }
    for i in 0..3 {
        let got = next_rumqttc(&mut old_rx, "PUBLISH", |p| match p {
            rumqttc::Packet::Publish(p) => Some(p),
            _ => None,
        })
        .await;
        assert_eq!(got.topic, format!("exp/{i}"));
        assert_eq!(&got.payload[..], format!("m-{i}").as_bytes());
    }
    server.shutdown().await;
}

#[tokio::test]
async fn rumqttc_v5_will_and_retained() {
    use rumqttc::v5::mqttbytes::v5::LastWill;
    use rumqttc::v5::mqttbytes::QoS;
    let server = start(|_| {}).await;
    let port = addr(&server).port();
    let (watcher, mut wrx) = spawn_v5("watcher", port, |_| {});
    next(&mut wrx, |p| {
        matches!(p, rumqttc::v5::Incoming::ConnAck(_)).then_some(p)
    })
    .await;
    watcher
        .subscribe("status/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    next(&mut wrx, |p| {
        matches!(p, rumqttc::v5::Incoming::SubAck(_)).then_some(p)
    })
    .await;

    let (device, mut drx) = spawn_v5("device", port, |o| {
        o.set_last_will(LastWill::new(
            "status/device",
            "offline",
            QoS::AtLeastOnce,
            true,
            None,
        ));
    });
    next(&mut drx, |p| {
        matches!(p, rumqttc::v5::Incoming::ConnAck(_)).then_some(p)
    })
    .await;
    device
        .publish("status/device", QoS::AtLeastOnce, true, "online")
        .await
        .unwrap();
    assert_eq!(&next_publish_v5(&mut wrx).await.payload[..], b"online");
    // Kill the device's connection without DISCONNECT.
    server
        .broker()
        .registry
        .get("device")
        .unwrap()
        .kick(tern_codec::ReasonCode::AdministrativeAction);
    let will = next_publish_v5(&mut wrx).await;
    assert_eq!(&will.payload[..], b"offline");
    drop(device);

    // The will was retained: a late subscriber sees it with RETAIN set.
    let (late, mut lrx) = spawn_v5("late", port, |_| {});
    next(&mut lrx, |p| {
        matches!(p, rumqttc::v5::Incoming::ConnAck(_)).then_some(p)
    })
    .await;
    late.subscribe("status/+", QoS::AtMostOnce).await.unwrap();
    let retained = next_publish_v5(&mut lrx).await;
    assert!(retained.retain);
    assert_eq!(&retained.payload[..], b"offline");
    server.shutdown().await;
}
