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
use std::cell::Cell;
use std::collections::VecDeque;

use bytes::Bytes;
use common::attached_subscriber;
use tern::broker::{SessionRef, StagedFanout};
use tern::message::Message;
use tern::persistence::Journal;
use tern::session::Outbound;
use tern::{Broker, Config};
use tern_codec::QoS;
use tern_router::RecentMatch;

/// Counts the allocations of the thread that asks, while it asks: the
/// test harness allocates on its own threads while a test runs (reporting
/// a result, starting the next test), and the publish path counted here
/// runs on the test's thread alone.
struct Counting;

thread_local! {
    /// Allocations this thread made since it began counting; `None` while
    /// it does not count.
    static ALLOCATIONS: Cell<Option<usize>> = const { Cell::new(None) };
}

fn count_one() {
    let _ = ALLOCATIONS.try_with(|a| a.set(a.get().map(|n| n + 1)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
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
    /// [`Client`](Path::Client) with [`READ`] messages staged, as one read of
    /// a fast publisher brings them: they go to each subscriber as a batch.
    ClientRead,
}

/// Messages in one read for [`Path::ClientRead`].
const READ: usize = 8;

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
    // The allocations of the runs counted.
    let mut made = 0;
    let mut run = |count: bool| {
        if count {
            ALLOCATIONS.with(|a| a.set(Some(0)));
        }
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
            Path::ClientRead => {
                for _ in 0..READ {
                    let _ = broker.publish_from_client(
                        &message,
                        &mut journal,
                        &mut recent,
                        &mut staged,
                    );
                }
                let _ = broker.deliver_staged(&mut staged);
            }
        }
        assert!(!journal.has_changes());
        made += ALLOCATIONS.with(Cell::take).unwrap_or(0);
        // The writers would drain the queues; do it outside the count.
        for s in &sessions {
            drained.clear();
            s.drain_outbound_any(&mut drained);
        }
    };
    for _ in 0..10 {
        run(false);
    }
    for _ in 0..10 {
        run(true);
    }
    made / 10
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

/// A read of several messages allocates the batch its subscribers share
/// (and the staging room it took), however many subscribers there are.
#[test]
fn a_read_s_batch_is_allocated_once_for_all_subscribers() {
    let few = allocations_per_publish(10, Path::ClientRead);
    let many = allocations_per_publish(1000, Path::ClientRead);
    assert_eq!(
        few, many,
        "allocations grew with subscribers: {few} for 10, {many} for 1000"
    );
    assert!(
        many <= 2,
        "{many} allocations for a read of {READ} messages"
    );
}
