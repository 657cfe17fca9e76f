//! Counters an operator reads to see what the broker is doing and what it
//! refused.
//!
//! Each counter is independent, monotonic, and read only for reporting.
//! Gauges that describe state (connections, sessions, subscriptions) are NOT
//! kept here: they are derived from the registry and the router, the single
//! sources of truth, so they can never drift.
//!
//! A [`Counter`] is split into cache-line-sized shards, one per thread slot:
//! the hot counters move with every packet on every worker thread, and one
//! shared atomic would bounce its cache line between all the cores (a single
//! atomic per counter, all in one struct, cost a visible share of a 500-pair
//! run on 8 worker threads). Adding touches the thread's own shard; reading
//! sums them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Shards per counter: enough that up to this many worker threads never
/// share one.
const SHARDS: usize = 16;

/// One shard, alone on its cache line (128 bytes: adjacent-line prefetch
/// pairs 64-byte lines on x86).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(AtomicU64);

/// A monotonic counter that threads add to without contending.
#[derive(Default)]
pub struct Counter {
    shards: [Shard; SHARDS],
}

/// The shard this thread adds to, chosen round-robin at its first use.
fn thread_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SLOT.with(|s| *s)
}

impl Counter {
    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.shards[thread_slot()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// The total so far.
    pub fn get(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.get())
    }
}

/// Monotonic counters, shared by every connection.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_accepted: Counter,
    pub connections_refused: Counter,
    pub packets_received: Counter,
    pub packets_sent: Counter,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    pub messages_received: Counter,
    pub messages_delivered: Counter,
    /// QoS 0 deliveries dropped because the subscriber's queue was full.
    pub messages_dropped_qos0: Counter,
    /// QoS 1/2 messages dropped because a session's queue was full.
    pub messages_dropped_queue_full: Counter,
    /// Deliveries dropped because they exceeded the client's Maximum Packet Size.
    pub messages_dropped_oversized: Counter,
    /// Messages not delivered because their expiry interval ran out.
    pub messages_expired: Counter,
    /// Packets that could not be decoded.
    pub malformed_packets: Counter,
    /// Well-formed packets that broke a protocol rule.
    pub protocol_errors: Counter,
    /// Packets larger than the maximum packet size.
    pub oversized_packets: Counter,
    pub keepalive_timeouts: Counter,
    pub connect_timeouts: Counter,
    /// WebSocket upgrade requests refused (not an upgrade, wrong path or
    /// subprotocol, a head too large).
    pub websocket_upgrades_refused: Counter,
    pub session_takeovers: Counter,
    pub wills_published: Counter,
    pub publishes_denied: Counter,
    /// Shared-subscription messages moved from a departing member to another.
    pub shared_redeliveries: Counter,
    /// Queued messages and sessions found expired (and purged) at start-up.
    pub recovery_purged: Counter,
    /// Retained messages not stored: `max_retained_messages` or
    /// `max_retained_bytes` reached (the message was still delivered).
    pub retained_refused: Counter,
}

impl Metrics {
    /// Adds one to a counter.
    #[inline]
    pub fn inc(counter: &Counter) {
        counter.add(1);
    }

    /// Adds `n` to a counter.
    #[inline]
    pub fn add(counter: &Counter, n: u64) {
        counter.add(n);
    }

    /// Reads a counter.
    pub fn get(counter: &Counter) -> u64 {
        counter.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_sums_what_every_thread_added() {
        let c = Counter::default();
        std::thread::scope(|s| {
            for _ in 0..(SHARDS + 4) {
                s.spawn(|| {
                    for _ in 0..1000 {
                        c.add(1);
                    }
                    c.add(5);
                });
            }
        });
        assert_eq!(c.get(), (SHARDS as u64 + 4) * 1005);
    }
}
