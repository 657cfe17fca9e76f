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

/// Declares [`Metrics`]: one [`Counter`] per field, and
/// [`Metrics::counters`], which lists them with their names and docs (the
/// Prometheus endpoint's names and help texts; see prometheus.rs). One list,
/// so a counter added here is exported without a second edit.
macro_rules! counters {
    ($( $(#[doc = $doc:literal])+ $name:ident, )+) => {
        /// Monotonic counters, shared by every connection.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[doc = $doc])+ pub $name: Counter, )+
        }

        impl Metrics {
            /// Every counter: its field name, its doc comment (lines joined
            /// by spaces) and its value now, in declaration order.
            pub fn counters(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
                [ $( (stringify!($name), concat!($($doc),+), &self.$name), )+ ]
                    .into_iter()
                    .map(|(name, doc, counter)| (name, doc.trim(), counter.get()))
            }
        }
    };
}

counters! {
    /// Connections accepted by a listener (before the CONNECT is read).
    connections_accepted,
    /// Connections refused because `limits.max_connections` was reached
    /// (CONNACK "server unavailable" / "server busy"; a TLS connection is
    /// closed before its handshake).
    connections_refused,
    /// MQTT packets decoded from clients.
    packets_received,
    /// MQTT packets written to clients.
    packets_sent,
    /// Bytes read from clients.
    bytes_received,
    /// Bytes written to clients.
    bytes_sent,
    /// PUBLISH messages received (from clients, and wills).
    messages_received,
    /// Deliveries sent or queued to subscribers (one per subscriber per message; not those dropped).
    messages_delivered,
    /// QoS 0 deliveries dropped because the subscriber's queue was full.
    messages_dropped_qos0,
    /// QoS 1/2 messages dropped because a session's queue was full.
    messages_dropped_queue_full,
    /// Retained messages a SUBSCRIBE found that could not wait for room in
    /// their session: limits.max_waiting_retained was reached (also counted
    /// in messages_dropped_queue_full).
    retained_waiting_refused,
    /// Deliveries dropped because they exceeded the client's Maximum Packet Size.
    messages_dropped_oversized,
    /// Acknowledgements (SUBACK, UNSUBACK ...) and AUTH packets not sent
    /// because they exceeded the client's Maximum Packet Size
    /// (MQTT-3.1.2-24; an authentication that needs such an AUTH fails).
    acks_dropped_oversized,
    /// Messages not delivered because their expiry interval ran out.
    messages_expired,
    /// Queues of connected clients found stalled: holding messages their
    /// client took nothing of for a quarter of a second or more. What they
    /// hold is then copied out of the read buffers it arrived in.
    queues_stalled,
    /// Packets that could not be decoded.
    malformed_packets,
    /// Well-formed packets that broke a protocol rule.
    protocol_errors,
    /// Packets larger than the maximum packet size.
    oversized_packets,
    /// Connections closed because no packet arrived within 1.5 times the
    /// keep alive.
    keepalive_timeouts,
    /// Connections closed because no CONNECT arrived in time (on a
    /// WebSocket listener: or no complete PROXY header, or upgrade).
    connect_timeouts,
    /// Connections closed because their incomplete packet grew while the
    /// bytes of incomplete packets across all connections were over
    /// limits.max_incomplete_bytes.
    incomplete_packets_refused,
    /// WebSocket upgrade requests refused (not an upgrade, wrong path or
    /// subprotocol, a head too large).
    websocket_upgrades_refused,
    /// TLS handshakes that failed or did not finish within the connect
    /// timeout (not TLS, no common protocol version or cipher, a client
    /// that refused the certificate ...).
    tls_handshakes_failed,
    /// Connections closed because a new one took over their client id.
    session_takeovers,
    /// Will messages published.
    wills_published,
    /// PUBLISH packets refused: to a `$` topic, not allowed by the ACL, or
    /// with a payload that is not the UTF-8 its format indicator says.
    publishes_denied,
    /// Subscriptions refused by the ACL (`[[auth.acl]]`).
    subscriptions_denied,
    /// SUBSCRIBE filters refused for what they are or how many: not a valid
    /// filter, more than `limits.max_topic_levels` levels, or one beyond
    /// `limits.max_subscriptions_per_client` or
    /// `max_subscription_bytes_per_client`.
    subscriptions_refused,
    /// Sessions a client asked to resume that the ACL gave it a fresh one
    /// instead of: another user's, or holding subscriptions it may not make.
    sessions_not_resumed,
    /// Shared-subscription messages moved from a departing member to another.
    shared_redeliveries,
    /// Shared-subscription messages that ended with their member's session:
    /// no other member to take them, or QoS 2 messages already sent.
    shared_ended_with_session,
    /// Queued messages and sessions found expired (and purged) at start-up.
    recovery_purged,
    /// Retained messages not stored: `max_retained_messages` or
    /// `max_retained_bytes` reached (the message was still delivered).
    retained_refused,
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
