//! Crash test: a child process (this test executable, re-run with an
//! environment variable) writes through the writer in fsync mode and prints
//! the id of every batch whose submission resolved; the parent SIGKILLs it at
//! a random moment, reopens the store and checks every acknowledged batch is
//! there and the reference counts are consistent. Several rounds reuse the
//! same directory.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::{entry, message, retained};
use tern_storage::{Batch, Durability, SledStore, Store, StoreWriter, WriterConfig};

const CHILD_ENV: &str = "TERN_STORAGE_CRASH_DIR";
const ROUNDS: usize = 4;
const WRITERS: u64 = 16;

/// The child's body; a no-op in a normal test run.
#[test]
fn crash_child_writer() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = Arc::new(SledStore::open(&dir).unwrap());
    let start = store.last_message_id().unwrap().unwrap_or(0) + 1;
    let writer = StoreWriter::spawn(
        store,
        WriterConfig {
            mode: Durability::Fsync,
            ..WriterConfig::default()
        },
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for lane in 0..WRITERS {
            let writer = writer.clone();
            tasks.push(tokio::spawn(async move {
                let mut id = start + lane;
                loop {
                    // One message, referenced by a queue entry and by the
                    // lane's retained topic (replacing the previous one).
                    let mut b = Batch::new();
                    b.put_message(message(id, 512))
                        .put_queue_entry(entry("crash", id, id))
                        .put_retained(retained(&format!("crash/{lane}"), id));
                    writer.submit(b).await.unwrap();
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ACK {id}").unwrap();
                    out.flush().unwrap();
                    id += WRITERS;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn acknowledged_batches_survive_sigkill() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked_total = 0;
    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args([
                "crash_child_writer",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut acked = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(id) = line.strip_prefix("ACK ") {
                    if acked.is_empty() {
                        let _ = tx.send(());
                    }
                    acked.push(id.parse::<u64>().unwrap());
                }
            }
            acked
        });
        // Wait for the child to be writing, then kill it at a random moment.
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the child acknowledged nothing");
        std::thread::sleep(Duration::from_millis(fastrand::u64(50..700)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let acked = reader.join().unwrap();
        assert!(!acked.is_empty());
        acked_total += acked.len();

        let store = SledStore::open(dir.path()).unwrap();
        for id in &acked {
            assert!(
                store.message(*id).unwrap().is_some(),
                "round {round}: acknowledged message {id} lost"
            );
        }
        let queued: HashMap<u64, u64> = store
            .queue("crash", None)
            .map(|e| {
                let e = e.unwrap();
                (e.seq, e.message_id)
            })
            .collect();
        for id in &acked {
            assert_eq!(
                queued.get(id),
                Some(id),
                "round {round}: queue entry {id} lost"
            );
        }
        // Reference counts agree with the references (batches were atomic).
        let mut refs: HashMap<u64, u32> = HashMap::new();
        for id in queued.values() {
            *refs.entry(*id).or_default() += 1;
        }
        for r in store.retained("crash/") {
            *refs.entry(r.unwrap().message_id).or_default() += 1;
        }
        for (id, n) in &refs {
            assert!(
                store.message(*id).unwrap().is_some(),
                "message {id} missing"
            );
            assert_eq!(store.message_refs(*id).unwrap(), *n, "refs of {id}");
        }
        let stats = store.stats().unwrap();
        assert_eq!(
            stats.messages,
            refs.len() as u64,
            "no unreferenced messages"
        );
        eprintln!(
            "round {round}: {} acknowledged, {} queued after restart",
            acked.len(),
            queued.len()
        );
    }
    eprintln!("{acked_total} acknowledged batches over {ROUNDS} kills, none lost");
}
