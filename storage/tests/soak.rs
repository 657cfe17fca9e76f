//! Bounded soak of enqueue/ack churn on the sled store: a steady live set
//! while many times its size is written and deleted; disk size is sampled
//! over time and must stay bounded. Prints the figures (run with
//! `--nocapture`); `TERN_SOAK_ROUNDS` scales it up for a longer manual run.

mod common;

use std::collections::VecDeque;
use std::time::Instant;

use common::{entry, message};
use tern_storage::{Batch, SledStore, Store};

/// Sessions receiving every message (one stored copy, many references).
const SUBSCRIBERS: usize = 4;
/// Messages each queue holds in steady state.
const LIVE_PER_QUEUE: usize = 500;
const PAYLOAD: usize = 1024;
/// Publishes per round; one sync per round.
const PER_ROUND: usize = 100;
const DEFAULT_ROUNDS: usize = 600;
const SAMPLES: usize = 12;

#[test]
fn soak_enqueue_ack_churn_keeps_disk_bounded() {
    let rounds: usize = std::env::var("TERN_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS);
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let started = Instant::now();
    let mut live: VecDeque<u64> = VecDeque::new();
    let mut next_id = 1u64;
    let mut written: u64 = 0;
    let mut samples = Vec::new();
    let mut max_disk = 0;
    for round in 0..rounds {
        for _ in 0..PER_ROUND {
            let id = next_id;
            next_id += 1;
            let mut b = Batch::new();
            b.put_message(message(id, PAYLOAD));
            for s in 0..SUBSCRIBERS {
                b.put_queue_entry(entry(&format!("client-{s}"), id, id));
            }
            live.push_back(id);
            if live.len() > LIVE_PER_QUEUE {
                let old = live.pop_front().unwrap();
                for s in 0..SUBSCRIBERS {
                    b.delete_queue_entry(format!("client-{s}"), old);
                }
            }
            store.apply(&b).unwrap();
            written += PAYLOAD as u64;
        }
        store.sync().unwrap();
        if (round + 1) % (rounds / SAMPLES).max(1) == 0 || round + 1 == rounds {
            let st = store.stats().unwrap();
            max_disk = max_disk.max(st.disk_bytes);
            samples.push((
                round + 1,
                written,
                st.live_bytes,
                st.disk_bytes,
                st.messages,
            ));
        }
    }
    let end = store.compact().unwrap();
    let elapsed = started.elapsed();

    eprintln!("round  payload_written_MiB  live_KiB  disk_KiB  amplification  messages");
    for (round, written, live, disk, messages) in &samples {
        eprintln!(
            "{round:5}  {:19.1}  {:8}  {:8}  {:13.1}  {messages:8}",
            *written as f64 / 1048576.0,
            live / 1024,
            disk / 1024,
            *disk as f64 / *live as f64
        );
    }
    eprintln!(
        "after compact(): live {} KiB, disk {} KiB, amplification {:.1}; max disk {} KiB; {:?}",
        end.live_bytes / 1024,
        end.disk_bytes / 1024,
        end.space_amplification().unwrap(),
        max_disk / 1024,
        elapsed
    );

    assert_eq!(end.messages, LIVE_PER_QUEUE as u64);
    assert_eq!(end.queue_entries, (LIVE_PER_QUEUE * SUBSCRIBERS) as u64);
    // Bounded: disk must not grow with what was written. The live set is
    // ~0.7 MiB; the bound is generous (sled's segments are 512 KiB each and
    // it keeps several open) but far below the total written.
    let bound = 64 * 1024 * 1024;
    assert!(max_disk < bound, "disk grew to {max_disk} bytes");
    assert!(
        max_disk < written / 2 || written < 2 * bound,
        "disk tracks bytes written"
    );
}
