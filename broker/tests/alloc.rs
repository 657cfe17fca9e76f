//! The publish hot path allocates nothing per subscriber.
//!
//! A counting global allocator measures one QoS 0 message fanned out to
//! many attached sessions, after a warm-up that lets queues reach their
//! steady-state capacity and the router cache its match: through
//! `Broker::route` (the broker's own messages) and through the path a
//! client's connection takes (`Broker::publish_from_client`, the publisher's
//! recent match, the read's staged deliveries).
//! The count must not grow with the number of subscribers (lesson: the
//! fan-out must not copy the subscriber list or the payload per delivery).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use common::attached_subscriber;
use tern::broker::{SessionRef, StagedFanout};
use tern::message::Message;
use tern::persistence::Journal;
use tern::session::Outbound;
use tern::{Broker, Config};
use tern_codec::QoS;
use tern_router::RecentMatch;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// How the message is published.
#[derive(Clone, Copy)]
enum Path {
    /// `Broker::route`.
    Route,
    /// `Broker::publish_from_client`, then `Broker::deliver_staged`.
    Client,
}

/// Allocations made by publishing one message to `subscribers` sessions,
/// measured in steady state.
fn allocations_per_publish(subscribers: usize, path: Path) -> usize {
    let broker = Broker::new(Config::default());
    let mut sessions = Vec::new();
    for i in 0..subscribers {
        sessions.push(attached_subscriber(&broker, &format!("s{i}"), "fan/out").0);
    }
    let message = Message::new(
        Bytes::from_static(b"fan/out"),
        Bytes::from(vec![7u8; 1024]),
        QoS::AtMostOnce,
        false,
        Default::default(),
        0,
    );
    let mut drained: VecDeque<Outbound> = VecDeque::with_capacity(64);
    let mut recent: Option<RecentMatch<SessionRef>> = None;
    let mut staged = StagedFanout::default();
    let mut run = |count: bool| {
        COUNTING.store(count, Ordering::SeqCst);
        // Memory mode: the journal stays empty and allocates nothing.
        let mut journal = Journal::new();
        match path {
            Path::Route => {
                let _ = broker.route(&message, &mut journal);
            }
            Path::Client => {
                let _ =
                    broker.publish_from_client(&message, &mut journal, &mut recent, &mut staged);
                let _ = broker.deliver_staged(&mut staged);
            }
        }
        assert!(!journal.has_changes());
        COUNTING.store(false, Ordering::SeqCst);
        // The writers would drain the queues; do it outside the count.
        for s in &sessions {
            drained.clear();
            s.drain_outbound_any(&mut drained);
        }
    };
    for _ in 0..10 {
        run(false);
    }
    ALLOCATIONS.store(0, Ordering::SeqCst);
    for _ in 0..10 {
        run(true);
    }
    ALLOCATIONS.load(Ordering::SeqCst) / 10
}

#[test]
fn qos0_fan_out_allocates_nothing_per_delivery() {
    for path in [Path::Route, Path::Client] {
        let few = allocations_per_publish(10, path);
        let many = allocations_per_publish(1000, path);
        assert_eq!(
            few, many,
            "allocations grew with subscribers: {few} for 10, {many} for 1000"
        );
        assert_eq!(many, 0, "a cached QoS 0 fan-out allocates nothing");
    }
}
