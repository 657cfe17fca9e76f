//! The group-commit writer: merging, durability modes, ordering and errors.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{entry, message, session};
use tern_storage::{
    Batch, Durability, FailingStore, MemoryStore, SledStore, Store, StoreError, StoreWriter,
    WriterConfig,
};

fn config(mode: Durability) -> WriterConfig {
    WriterConfig {
        mode,
        ..WriterConfig::default()
    }
}

fn publish(id: u64) -> Batch {
    let mut b = Batch::new();
    b.put_message(message(id, 64))
        .put_queue_entry(entry("sub", id, id));
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_share_syncs() {
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    // A slow sync (as fsync is) so submissions pile up behind it.
    let slow = Arc::new(SlowSync {
        inner: Arc::clone(&store),
        delay: Duration::from_millis(5),
    });
    let writer = StoreWriter::spawn(slow, config(Durability::Fsync)).unwrap();
    let mut tasks = Vec::new();
    for id in 1..=100u64 {
        let w = writer.clone();
        tasks.push(tokio::spawn(async move { w.submit(publish(id)).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let stats = writer.stats();
    assert_eq!(stats.submitted, 100);
    assert_eq!(stats.failed, 0);
    assert!(
        store.syncs() <= 20,
        "100 concurrent submissions took {} syncs",
        store.syncs()
    );
    assert_eq!(stats.syncs, store.syncs());
    eprintln!("100 concurrent submissions: {} syncs", store.syncs());
    assert_eq!(store.inner().queue("sub", None).count(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_mode_on_sled_resolves_after_sync_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(SledStore::open(dir.path()).unwrap()));
    let writer = StoreWriter::spawn(store.clone(), config(Durability::Fsync)).unwrap();
    let futures: Vec<_> = (1..=200u64).map(|id| writer.submit(publish(id))).collect();
    for f in futures {
        f.await.unwrap();
    }
    assert!(store.syncs() < 200 / 4, "syncs: {}", store.syncs());
    assert!(store.syncs() >= 1);
    drop(writer);
    assert_eq!(store.inner().queue("sub", None).count(), 200);
}

#[tokio::test]
async fn batches_apply_in_submission_order() {
    let store = Arc::new(MemoryStore::new());
    let writer = StoreWriter::spawn(store.clone(), config(Durability::Memory)).unwrap();
    // Put, then delete, of the same entry, submitted back to back and awaited
    // in reverse: the delete must still come second.
    let put = writer.submit(publish(1));
    let mut del = Batch::new();
    del.delete_queue_entry("sub", 1);
    let del = writer.submit(del);
    del.await.unwrap();
    put.await.unwrap();
    assert_eq!(store.queue("sub", None).count(), 0);
    assert_eq!(store.message(1).unwrap(), None);
    assert_eq!(writer.stats().syncs, 0, "memory mode never syncs");
}

#[tokio::test]
async fn interval_mode_acknowledges_before_syncing_then_syncs() {
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let writer = StoreWriter::spawn(
        store.clone(),
        config(Durability::Interval(Duration::from_millis(200))),
    )
    .unwrap();
    let started = Instant::now();
    writer.submit(publish(1)).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(150));
    assert_eq!(store.syncs(), 0, "resolved before any sync");
    assert_eq!(store.inner().queue("sub", None).count(), 1);
    // The periodic sync follows within the interval (generous bound).
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.syncs() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.syncs(), 1);
    // Nothing new: no more syncs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(store.syncs(), 1);
    // An explicit barrier syncs at once.
    writer.submit(publish(2)).await.unwrap();
    writer.sync().await.unwrap();
    assert_eq!(store.syncs(), 2);
}

#[tokio::test]
async fn a_failing_apply_fails_every_submission_of_the_window_and_the_writer_goes_on() {
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let writer = StoreWriter::spawn(store.clone(), config(Durability::Fsync)).unwrap();
    store.disk_full(true);
    let futures: Vec<_> = (1..=10u64).map(|id| writer.submit(publish(id))).collect();
    for f in futures {
        let err = f.await.unwrap_err();
        assert!(err.is_disk_full(), "{err}");
    }
    assert_eq!(store.inner().queue("sub", None).count(), 0);
    store.disk_full(false);
    writer.submit(publish(11)).await.unwrap();
    assert_eq!(store.inner().queue("sub", None).count(), 1);
    assert_eq!(writer.stats().failed, 10);
}

#[tokio::test]
async fn a_panic_in_the_store_stops_the_writer_and_everything_after_it_fails() {
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let writer = StoreWriter::spawn(store.clone(), config(Durability::Fsync)).unwrap();
    writer.submit(publish(1)).await.unwrap();
    assert!(writer.is_running());
    store.panic_apply(true);
    assert!(matches!(
        writer.submit(publish(2)).await,
        Err(StoreError::WriterClosed)
    ));
    assert!(!writer.is_running());
    // The store would write again; the writer is gone all the same.
    store.panic_apply(false);
    assert!(matches!(
        writer.submit(publish(3)).await,
        Err(StoreError::WriterClosed)
    ));
    assert_eq!(store.inner().queue("sub", None).count(), 1);
}

#[tokio::test]
async fn a_failing_sync_fails_the_submissions_waiting_on_it() {
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let writer = StoreWriter::spawn(store.clone(), config(Durability::Fsync)).unwrap();
    store.fail_sync(true);
    let err = writer.submit(publish(1)).await.unwrap_err();
    assert!(matches!(err, StoreError::Injected("sync")), "{err}");
    assert!(writer.sync().await.is_err());
    store.fail_sync(false);
    writer.submit(publish(2)).await.unwrap();
    writer.sync().await.unwrap();
}

#[tokio::test]
async fn an_invalid_batch_fails_alone_when_merged_with_others() {
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let writer = StoreWriter::spawn(store.clone(), config(Durability::Fsync)).unwrap();
    // The writer is held in the apply of a first window, so that the three
    // below are all waiting when it comes back for more: one window, however
    // the threads are scheduled.
    store.stall(true);
    let mut gate = Batch::new();
    gate.put_message(message(50, 64));
    let gate = writer.submit(gate);
    while store.applies() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let good1 = writer.submit(publish(1));
    let mut bad = Batch::new();
    bad.put_queue_entry(entry("sub", 99, 12345));
    let bad = writer.submit(bad);
    let good2 = writer.submit(publish(2));
    store.stall(false);
    gate.await.unwrap();
    good1.await.unwrap();
    assert!(bad.await.unwrap_err().is_invalid_batch());
    good2.await.unwrap();
    let seqs: Vec<u64> = store
        .inner()
        .queue("sub", None)
        .map(|e| e.unwrap().seq)
        .collect();
    assert_eq!(seqs, vec![1, 2]);
    assert_eq!(
        writer.stats().windows,
        2,
        "the gate, then the three as one window"
    );
}

#[tokio::test]
async fn dropping_the_last_handle_drains_and_syncs() {
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let writer = StoreWriter::spawn(
        store.clone(),
        config(Durability::Interval(Duration::from_secs(3600))),
    )
    .unwrap();
    let mut b = Batch::new();
    b.put_session(session("s"));
    writer.submit(b).await.unwrap();
    drop(writer);
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.syncs() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.syncs(), 1);
}

#[tokio::test]
async fn max_ops_bounds_a_window() {
    let store = Arc::new(MemoryStore::new());
    let writer = StoreWriter::spawn(
        store.clone(),
        WriterConfig {
            max_ops: 4,
            max_delay: Duration::from_millis(20),
            mode: Durability::Memory,
        },
    )
    .unwrap();
    // Each batch has 2 ops: at most 2 batches per window.
    let futures: Vec<_> = (1..=10u64).map(|id| writer.submit(publish(id))).collect();
    for f in futures {
        f.await.unwrap();
    }
    assert!(writer.stats().windows >= 5, "{:?}", writer.stats());
}

/// A store whose sync takes a while, as an fsync does.
struct SlowSync<S> {
    inner: Arc<S>,
    delay: Duration,
}

impl<S: Store> Store for SlowSync<S> {
    fn apply_all(&self, batches: &[&Batch]) -> Result<(), StoreError> {
        self.inner.apply_all(batches)
    }
    fn sync(&self) -> Result<(), StoreError> {
        std::thread::sleep(self.delay);
        self.inner.sync()
    }
    fn session(&self, c: &str) -> Result<Option<tern_storage::SessionRecord>, StoreError> {
        self.inner.session(c)
    }
    fn sessions(&self) -> tern_storage::RecordIter<'_, tern_storage::SessionRecord> {
        self.inner.sessions()
    }
    fn subscriptions(
        &self,
        c: &str,
    ) -> tern_storage::RecordIter<'_, tern_storage::SubscriptionRecord> {
        self.inner.subscriptions(c)
    }
    fn queue(
        &self,
        c: &str,
        after: Option<u64>,
    ) -> tern_storage::RecordIter<'_, tern_storage::QueueEntry> {
        self.inner.queue(c, after)
    }
    fn incoming_qos2(&self, c: &str) -> Result<Vec<u16>, StoreError> {
        self.inner.incoming_qos2(c)
    }
    fn message(&self, id: u64) -> Result<Option<tern_storage::MessageRecord>, StoreError> {
        self.inner.message(id)
    }
    fn message_refs(&self, id: u64) -> Result<u32, StoreError> {
        self.inner.message_refs(id)
    }
    fn last_message_id(&self) -> Result<Option<u64>, StoreError> {
        self.inner.last_message_id()
    }
    fn last_seq(&self, c: &str) -> Result<Option<u64>, StoreError> {
        self.inner.last_seq(c)
    }
    fn retained(&self, p: &str) -> tern_storage::RecordIter<'_, tern_storage::RetainedRecord> {
        self.inner.retained(p)
    }
    fn session_summary(&self, c: &str) -> Result<Option<tern_storage::SessionSummary>, StoreError> {
        self.inner.session_summary(c)
    }
    fn stats(&self) -> Result<tern_storage::StoreStats, StoreError> {
        self.inner.stats()
    }
    fn compact(&self) -> Result<tern_storage::StoreStats, StoreError> {
        self.inner.compact()
    }
}

#[test]
fn completions_run_in_submission_order_after_the_sync() {
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let writer = StoreWriter::spawn(
        Arc::clone(&store) as Arc<dyn Store>,
        config(Durability::Fsync),
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for id in 1..=200u64 {
        let tx = tx.clone();
        let store = Arc::clone(&store);
        // An empty batch too: it orders its completion behind the others.
        let batch = if id % 10 == 0 {
            Batch::new()
        } else {
            publish(id)
        };
        writer.submit_then(
            batch,
            Box::new(move |result| {
                let _ = tx.send((id, result.is_ok(), store.syncs()));
            }),
        );
    }
    drop(tx);
    let seen: Vec<_> = rx.iter().collect();
    assert_eq!(seen.len(), 200);
    assert!(seen.iter().all(|&(_, ok, _)| ok));
    let ids: Vec<u64> = seen.iter().map(|&(id, _, _)| id).collect();
    assert_eq!(ids, (1..=200).collect::<Vec<_>>(), "completion order");
    assert!(
        seen.iter().all(|&(_, _, syncs)| syncs >= 1),
        "ran before a sync"
    );

    // Memory mode resolves without a sync.
    drop(writer);
    let writer =
        StoreWriter::spawn(Arc::new(MemoryStore::new()), config(Durability::Memory)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    writer.submit_then(
        publish(1),
        Box::new(move |r| {
            let _ = tx.send(r.is_ok());
        }),
    );
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(true));
}

/// A delivery on its way to an online subscriber: the message and an
/// in-flight entry.
fn inflight_publish(seq: u64) -> Batch {
    let mut e = entry("sub", seq, seq);
    e.state = tern_storage::DeliveryState::AwaitingAck;
    e.packet_id = Some(seq as u16);
    let mut b = Batch::new();
    b.put_message(message(seq, 64)).insert_queue_entry(e);
    b
}

/// The subscriber's acknowledgement of `inflight_publish(seq)`.
fn inflight_ack(seq: u64) -> Batch {
    let mut b = Batch::new();
    b.delete_queue_entry("sub", seq);
    b
}

/// A writer in `mode` that holds in-flight insertions for `hold`, over a
/// store that counts its syncs.
fn holding_writer(
    mode: Durability,
    hold: Duration,
) -> (Arc<FailingStore<MemoryStore>>, StoreWriter) {
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let writer = StoreWriter::spawn(
        Arc::clone(&store) as Arc<dyn Store>,
        WriterConfig {
            max_delay: hold,
            ..config(mode)
        },
    )
    .unwrap();
    (store, writer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_mode_holds_an_inflight_insertion_until_its_deletion_nets_it_away() {
    let (store, writer) = holding_writer(Durability::Fsync, Duration::from_secs(30));
    let published = writer.submit(inflight_publish(1));
    let published = tokio::spawn(published);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!published.is_finished(), "held for the acknowledgement");
    let started = Instant::now();
    writer.submit(inflight_ack(1)).await.unwrap();
    published.await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "released early");
    let stats = writer.stats();
    assert_eq!(stats.netted, 3, "message, entry and deletion: {stats:?}");
    assert_eq!(
        store.syncs(),
        0,
        "nothing reached the engine, nothing to sync"
    );
    assert_eq!(store.inner().queue("sub", None).count(), 0);
    assert_eq!(store.inner().message(1).unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_insertion_is_written_after_the_hold() {
    let (store, writer) = holding_writer(Durability::Fsync, Duration::from_millis(50));
    let started = Instant::now();
    writer.submit(inflight_publish(1)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(store.syncs(), 1);
    assert_eq!(store.inner().queue("sub", None).count(), 1);
    assert!(store.inner().message(1).unwrap().is_some());
    // A later acknowledgement is written as a deletion.
    writer.submit(inflight_ack(1)).await.unwrap();
    assert_eq!(store.inner().queue("sub", None).count(), 0);
    assert_eq!(store.inner().message(1).unwrap(), None);
    assert_eq!(writer.stats().netted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_mode_holds_and_nets_without_syncing() {
    let (store, writer) = holding_writer(
        Durability::Interval(Duration::from_secs(3600)),
        Duration::from_millis(50),
    );
    // Acknowledged within the hold: nothing reaches the engine.
    let publish = writer.submit(inflight_publish(1));
    let ack = writer.submit(inflight_ack(1));
    publish.await.unwrap();
    ack.await.unwrap();
    assert_eq!(writer.stats().netted, 3);
    // Not acknowledged: written once the hold is over, and resolved
    // without a sync (the interval is an hour).
    let started = Instant::now();
    writer.submit(inflight_publish(2)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(store.inner().queue("sub", None).count(), 1);
    assert_eq!(store.syncs(), 0);
}
