//! Bounded soak of the whole broker on sled: a persistent subscriber goes
//! offline while a publisher queues QoS 1 messages for it, comes back and
//! drains them, over and over; the store's directory size is sampled after
//! every cycle and must plateau instead of growing with what was written.
//! Prints the series (run with `--nocapture`); `TERN_SOAK_SECS` makes it
//! longer (default 20 s).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{addr, persistent_connect, publish_packet, RawClient};
use tern::{Config, Server};
use tern_codec::{Packet, ProtocolVersion, PubAck, QoS, ReasonCode};
use tern_storage::{SledStore, Store};

/// Messages queued per offline period.
const PER_CYCLE: u16 = 500;
const PAYLOAD: usize = 1024;
const DEFAULT_SECS: u64 = 20;

/// Bytes of the files under `dir` (what `du --apparent-size` counts).
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            dir_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_stays_bounded_under_queue_and_drain_cycles() {
    let secs: u64 = std::env::var("TERN_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SECS);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let mut config = Config::default();
    config.listeners.tcp = vec!["127.0.0.1:0".parse().unwrap()];
    config.listeners.ws = vec![];
    config.admin.bind = None;
    config.storage.durability = tern::config::DurabilityMode::Fsync;
    let server = Server::start_with_store(config, Arc::clone(&store))
        .await
        .expect("broker starts");

    // The subscriber's session, offline.
    let (mut sub, _) = RawClient::connect(addr(&server), persistent_connect("soak", 3600)).await;
    assert_eq!(
        sub.subscribe("soak/#", QoS::AtLeastOnce).await,
        vec![ReasonCode::granted(QoS::AtLeastOnce)]
    );
    sub.send(Packet::Disconnect(Default::default())).await;
    sub.expect_closed().await;
    let (mut publisher, _) = RawClient::connect(
        addr(&server),
        common::connect_packet("soak-pub", ProtocolVersion::V311),
    )
    .await;

    let payload = vec![0x5a; PAYLOAD];
    let started = Instant::now();
    let mut samples: Vec<(usize, f64, u64)> = Vec::new();
    let mut cycle = 0;
    while started.elapsed() < Duration::from_secs(secs) || cycle < 4 {
        // Queue PER_CYCLE messages for the offline session, pipelined.
        for i in 1..=PER_CYCLE {
            publisher
                .send(publish_packet(
                    "soak/x",
                    &payload,
                    QoS::AtLeastOnce,
                    Some(i),
                ))
                .await;
        }
        for i in 1..=PER_CYCLE {
            match publisher.recv().await {
                Some(Packet::PubAck(a)) => assert_eq!(a.packet_id, i),
                other => panic!("cycle {cycle}: expected PUBACK {i}, got {other:?}"),
            }
        }
        // The subscriber comes back, drains them and leaves again.
        let (mut sub, ack) =
            RawClient::connect(addr(&server), persistent_connect("soak", 3600)).await;
        assert!(ack.session_present);
        for n in 0..PER_CYCLE {
            match sub.recv_within(Duration::from_secs(10)).await {
                Ok(Some(Packet::Publish(p))) => {
                    sub.send(Packet::PubAck(PubAck::new(p.packet_id.unwrap())))
                        .await
                }
                other => panic!("cycle {cycle}: message {n}: {other:?}"),
            }
        }
        sub.send(Packet::Disconnect(Default::default())).await;
        sub.expect_closed().await;
        cycle += 1;
        let written = cycle as f64 * f64::from(PER_CYCLE) * PAYLOAD as f64 / 1048576.0;
        samples.push((cycle, written, dir_bytes(dir.path())));
    }
    server.shutdown().await;
    let stats = store.stats().unwrap();

    eprintln!("cycle  payload_written_MiB  disk_KiB");
    let every = (samples.len() / 12).max(1);
    for (cycle, written, disk) in samples.iter().step_by(every).chain(samples.last()) {
        eprintln!("{cycle:5}  {written:19.1}  {:8}", disk / 1024);
    }
    eprintln!("end: {stats:?}");

    assert_eq!(stats.queue_entries, 0, "every message was acknowledged");
    assert_eq!(stats.messages, 0, "and deleted with its last reference");
    // Bounded: the second half of the run needs no more disk than the first
    // half did, give or take sled's segment rotation (a few segments).
    let half = samples.len() / 2;
    let first = samples[..half].iter().map(|s| s.2).max().unwrap();
    let second = samples[half..].iter().map(|s| s.2).max().unwrap();
    let slack = 16 * 1024 * 1024;
    assert!(
        second <= first + slack,
        "disk keeps growing: first half up to {first} bytes, second half {second}"
    );
}
