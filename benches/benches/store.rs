//! The durable store as the broker's hot path sees it: the time from
//! handing a publish-shaped batch to the group-commit writer until it
//! resolves (what a PUBACK waits for), per durability mode, alone and with
//! 100 concurrent submitters (the group commit at work).
//!
//! A batch is what one QoS 1 publish to one durable subscriber costs: the
//! message (64-byte payload) and its queue entry, followed later by the
//! entry's deletion when the subscriber acknowledges it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tern_storage::{
    Batch, DeliveryState, Durability, MessageRecord, QueueEntry, SledStore, Store, StoreWriter,
    WriterConfig,
};

fn publish(id: u64) -> Batch {
    let mut b = Batch::new();
    b.put_message(MessageRecord {
        id,
        topic: Bytes::from_static(b"bench/topic"),
        payload: Bytes::from(vec![0xA5; 64]),
        qos: 1,
        retain: false,
        properties: Bytes::new(),
        expires_at: None,
    })
    .put_queue_entry(QueueEntry {
        client_id: format!("sub{}", id % 100).into(),
        seq: id,
        message_id: id,
        qos: 1,
        packet_id: None,
        state: DeliveryState::Pending,
        dup: false,
        retain: false,
        subscription_ids: Vec::new(),
        weight: Some(68),
        shared: None,
    });
    b
}

fn acknowledged(id: u64) -> Batch {
    let mut b = Batch::new();
    b.delete_queue_entry(format!("sub{}", id % 100), id);
    b
}

fn modes() -> [(&'static str, Durability); 3] {
    [
        ("memory_mode_on_sled", Durability::Memory),
        (
            "interval_100ms",
            Durability::Interval(Duration::from_millis(100)),
        ),
        ("fsync", Durability::Fsync),
    ]
}

fn writer(dir: &tempfile::TempDir, mode: Durability) -> StoreWriter {
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).expect("open sled"));
    StoreWriter::spawn(
        store,
        WriterConfig {
            mode,
            ..WriterConfig::default()
        },
    )
    .expect("writer")
}

/// One submitter: the latency of one publish (and, untimed, its ack).
fn alone(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("store_commit_alone");
    for (name, mode) in modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = writer(&dir, mode);
        let mut id = 0u64;
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    id += 1;
                    let start = Instant::now();
                    rt.block_on(w.submit(publish(id))).expect("stored");
                    spent += start.elapsed();
                    drop(w.submit(acknowledged(id)));
                }
                spent
            })
        });
    }
    group.finish();
}

/// 100 concurrent submitters, each waiting for its publish before the
/// next: the time per publish across all of them (1 / throughput).
fn concurrent(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("store_commit_100_submitters");
    group.sample_size(10);
    for (name, mode) in modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = writer(&dir, mode);
        let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                let per_task = iters.div_ceil(100).max(1);
                let start = Instant::now();
                rt.block_on(async {
                    let tasks: Vec<_> = (0..100)
                        .map(|_| {
                            let (w, next) = (w.clone(), Arc::clone(&next));
                            tokio::spawn(async move {
                                for _ in 0..per_task {
                                    let id =
                                        next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    w.submit(publish(id)).await.expect("stored");
                                    drop(w.submit(acknowledged(id)));
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.expect("task");
                    }
                });
                start
                    .elapsed()
                    .mul_f64(iters as f64 / (per_task * 100) as f64)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, alone, concurrent);
criterion_main!(benches);
