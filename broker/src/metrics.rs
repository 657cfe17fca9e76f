//! Counters an operator reads to see what the broker is doing and what it
//! refused.
//!
//! Plain relaxed atomics: each counter is independent, monotonic, and read
//! only for reporting. Gauges that describe state (connections, sessions,
//! subscriptions) are NOT kept here: they are derived from the registry and
//! the router, the single sources of truth, so they can never drift.

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters, shared by every connection.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub packets_received: AtomicU64,
    pub packets_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_delivered: AtomicU64,
    /// QoS 0 deliveries dropped because the subscriber's queue was full.
    pub messages_dropped_qos0: AtomicU64,
    /// QoS 1/2 messages dropped because a session's queue was full.
    pub messages_dropped_queue_full: AtomicU64,
    /// Deliveries dropped because they exceeded the client's Maximum Packet Size.
    pub messages_dropped_oversized: AtomicU64,
    /// Messages not delivered because their expiry interval ran out.
    pub messages_expired: AtomicU64,
    /// Packets that could not be decoded.
    pub malformed_packets: AtomicU64,
    /// Well-formed packets that broke a protocol rule.
    pub protocol_errors: AtomicU64,
    /// Packets larger than the maximum packet size.
    pub oversized_packets: AtomicU64,
    pub keepalive_timeouts: AtomicU64,
    pub connect_timeouts: AtomicU64,
    pub session_takeovers: AtomicU64,
    pub wills_published: AtomicU64,
    pub publishes_denied: AtomicU64,
    /// Shared-subscription messages moved from a departing member to another.
    pub shared_redeliveries: AtomicU64,
    /// Queued messages and sessions found expired (and purged) at start-up.
    pub recovery_purged: AtomicU64,
}

impl Metrics {
    /// Adds one to a counter.
    #[inline]
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
