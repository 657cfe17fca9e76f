//! In-process fan-out: one QoS 0 message from a client's connection to N
//! attached subscribers, through the same calls a connection makes
//! (`Broker::publish_from_client`, then `Broker::deliver_staged` at the end
//! of the read), plus each subscriber's writer taking its queue. No sockets
//! and no encoding: what is left is the broker's own cost per delivery.
//!
//! Throughput is in deliveries, so criterion's "time per element" is the
//! cost of one delivery. `fanout_qos0/N` varies the subscribers (64-byte
//! payload); `fanout_payload/BYTES` varies the payload for 100 subscribers,
//! and must stay flat: the payload is shared, never copied per subscriber.
//! `fanout_read/N` publishes a read of [`READ`] messages at a time, as a
//! fast publisher's connection does: they reach each subscriber as one
//! batch (message_batch.rs).

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tern::broker::{SessionRef, StagedFanout};
use tern::message::Message;
use tern::persistence::Journal;
use tern::session::{AttachParams, ConnectionControl, Outbound, Session};
use tern::{Broker, Config};
use tern_codec::{ProtocolVersion, QoS};
use tern_router::{RecentMatch, SubscriptionOptions};

const TOPIC: &str = "fan/out";

/// Messages per read in `fanout_read`.
const READ: usize = 16;

/// A broker with `n` attached sessions subscribed to [`TOPIC`].
fn subscribed(n: usize) -> (Arc<Broker>, Vec<Arc<Session>>) {
    let broker = Broker::new(Config::default());
    let sessions = (0..n)
        .map(|i| {
            let opened = broker
                .registry
                .open(&format!("s{i}"), true, None, |_| true, |_| {})
                .expect("within limits.max_sessions");
            let params = AttachParams {
                connection_id: broker.registry.next_id(),
                protocol: ProtocolVersion::V311,
                send_quota: 16,
                expiry_interval: 0,
                owner: None,
                login: Default::default(),
            };
            let control = Arc::new(ConnectionControl::default());
            opened
                .session
                .attach(params, control, None)
                .expect("a fresh session attaches");
            let subscriber = SessionRef(Arc::clone(&opened.session));
            broker
                .router
                .subscribe(&subscriber, TOPIC, SubscriptionOptions::default())
                .expect("a valid filter");
            opened.session
        })
        .collect();
    (broker, sessions)
}

/// Publishes `message` as a client's connection does and lets every
/// subscriber's writer take its queue.
struct Publisher {
    broker: Arc<Broker>,
    sessions: Vec<Arc<Session>>,
    recent: Option<RecentMatch<SessionRef>>,
    staged: StagedFanout,
    taken: VecDeque<Outbound>,
}

impl Publisher {
    fn new(n: usize) -> Publisher {
        let (broker, sessions) = subscribed(n);
        Publisher {
            broker,
            sessions,
            recent: None,
            staged: StagedFanout::default(),
            taken: VecDeque::with_capacity(64),
        }
    }

    fn publish(&mut self, message: &Arc<Message>) {
        self.publish_read(message, 1);
    }

    /// Publishes `message` `count` times in one read.
    fn publish_read(&mut self, message: &Arc<Message>, count: usize) {
        let mut journal = Journal::new();
        for _ in 0..count {
            let full = self.broker.publish_from_client(
                message,
                &mut journal,
                &mut self.recent,
                &mut self.staged,
            );
            black_box(full);
        }
        black_box(self.broker.deliver_staged(&mut self.staged));
        for s in &self.sessions {
            self.taken.clear();
            s.drain_outbound_any(&mut self.taken);
        }
    }
}

fn message(payload: usize) -> Arc<Message> {
    Message::new(
        Bytes::from_static(TOPIC.as_bytes()),
        Bytes::from(vec![7u8; payload]),
        QoS::AtMostOnce,
        false,
        Default::default(),
        0,
    )
}

fn by_subscribers(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout_qos0");
    let m = message(64);
    for n in [1usize, 10, 100, 1_000, 10_000] {
        let mut p = Publisher::new(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::from_parameter(n), |b| b.iter(|| p.publish(&m)));
    }
    group.finish();
}

fn by_payload(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout_payload");
    let mut p = Publisher::new(100);
    for bytes in [16usize, 1024, 65_536] {
        let m = message(bytes);
        group.throughput(Throughput::Elements(100));
        group.bench_function(BenchmarkId::from_parameter(bytes), |b| {
            b.iter(|| p.publish(&m))
        });
    }
    group.finish();
}

fn by_read(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout_read");
    let m = message(64);
    for n in [10usize, 100, 1_000] {
        let mut p = Publisher::new(n);
        group.throughput(Throughput::Elements((n * READ) as u64));
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| p.publish_read(&m, READ))
        });
    }
    group.finish();
}

criterion_group!(benches, by_subscribers, by_payload, by_read);
criterion_main!(benches);
