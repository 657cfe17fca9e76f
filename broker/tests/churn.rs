//! Connection churn: thousands of connect / abort / takeover cycles from
//! several tasks at once. Afterwards nothing of the departed clients may be
//! left: no connection counted, no session, no subscription.

mod common;

use common::*;
use tern_codec::{Packet, ProtocolVersion, QoS};

const TASKS: usize = 8;
const CYCLES_PER_TASK: usize = 1250; // 10,000 cycles in all
/// Client ids are drawn from a small pool so that takeovers are frequent.
const ID_POOL: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_cycles_leave_nothing_behind() {
    let server = start(|_| {}).await;
    let address = addr(&server);
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        tasks.push(tokio::spawn(async move {
            let mut held: Option<RawClient> = None;
            for i in 0..CYCLES_PER_TASK {
                let id = format!("churn-{}", (t * CYCLES_PER_TASK + i) % ID_POOL);
                let protocol = if i % 2 == 0 {
                    ProtocolVersion::V5
                } else {
                    ProtocolVersion::V311
                };
                let mut c = RawClient::open(address, protocol).await;
                c.try_send(Packet::Connect(Box::new(connect_packet(&id, protocol))))
                    .await;
                // Another task may take the id over at any moment, closing
                // this connection: that is the point of the test.
                match c.recv().await {
                    Some(Packet::ConnAck(ack)) => assert!(ack.code.is_success()),
                    Some(other) => panic!("expected CONNACK, got {other:?}"),
                    None => continue,
                }
                c.try_send(subscribe_packet(
                    1,
                    &format!("churn/{t}/+"),
                    QoS::AtLeastOnce,
                ))
                .await;
                match i % 4 {
                    // Abort: the socket just goes away.
                    0 => drop(c),
                    // Normal DISCONNECT.
                    1 => {
                        c.try_send(Packet::Disconnect(Default::default())).await;
                        drop(c);
                    }
                    // Keep it open; a later cycle (possibly with the same id
                    // from another task) takes it over or it is dropped.
                    2 => held = Some(c),
                    // Drop the held one mid-way through its life.
                    _ => {
                        held.take();
                        drop(c);
                    }
                }
            }
            drop(held);
        }));
    }
    for t in tasks {
        t.await.expect("churn task");
    }
    let broker = server.broker();
    eventually("every connection uncounted", || {
        broker.registry.connection_count() == 0
    })
    .await;
    eventually("every clean session ended", || {
        broker.registry.session_count() == 0
    })
    .await;
    eventually("every subscription removed", || {
        broker.router.subscription_count() == 0
    })
    .await;
    assert_eq!(broker.router.subscriber_count(), 0);
    let accepted = broker.metrics.connections_accepted.get();
    assert_eq!(accepted, (TASKS * CYCLES_PER_TASK) as u64);
    server.shutdown().await;
}
