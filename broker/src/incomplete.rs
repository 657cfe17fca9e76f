//! The broker-wide bound on memory held by packets still arriving.
//!
//! A packet is decoded once it is whole; until then its bytes wait in its
//! connection's read buffer. One connection holds at most
//! `limits.max_packet_size` so (a larger packet is refused from its fixed
//! header), and one without keep alive holds it for at most
//! `limits.incomplete_packet_timeout_secs`. But connections that each send
//! all but the last bytes of a packet that large hold that much each:
//! 20,000 of them, 20 GB at the default of 1 MiB.
//!
//! So the bytes of incomplete packets larger than a pooled read buffer are
//! counted across all connections ([`IncompletePackets`]), against
//! `limits.max_incomplete_bytes`. A connection whose incomplete packet
//! grows while the total is over it is closed (5.0: DISCONNECT 0x97 Quota
//! exceeded), counted in `incomplete_packets_refused`, which releases what
//! it held. Packets that arrive whole, or within a pooled buffer, are not
//! counted: their bytes are in the buffer every reading connection has
//! anyway, and counting them would cost every read an atomic operation.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::pool::BUFFER_SIZE;

/// Bytes of incomplete packets held across all connections, against a
/// limit. Each connection records what its own incomplete packet holds
/// ([`IncompletePackets::update`]) and releases it when it ends.
#[derive(Debug)]
pub struct IncompletePackets {
    held: AtomicUsize,
    limit: usize,
}

impl IncompletePackets {
    /// A bound of `limit` bytes.
    pub fn new(limit: usize) -> IncompletePackets {
        IncompletePackets {
            held: AtomicUsize::new(0),
            limit,
        }
    }

    /// What a connection whose read buffer holds `buffered` bytes of one
    /// incomplete packet counts: nothing while it fits in a pooled buffer.
    pub fn counted(buffered: usize) -> usize {
        if buffered > BUFFER_SIZE {
            buffered
        } else {
            0
        }
    }

    /// Records that a connection's incomplete packet counts `now` bytes
    /// where it counted `before` (both as [`counted`](Self::counted) gives
    /// them). Returns `false` when it grew and the total is now over the
    /// limit: the connection must close, and release `now` as it ends.
    pub fn update(&self, before: usize, now: usize) -> bool {
        if now > before {
            let total = self.held.fetch_add(now - before, Ordering::Relaxed) + (now - before);
            total <= self.limit
        } else {
            self.held.fetch_sub(before - now, Ordering::Relaxed);
            true
        }
    }

    /// Releases what an ending connection's incomplete packet counted.
    pub fn release(&self, counted: usize) {
        if counted > 0 {
            self.held.fetch_sub(counted, Ordering::Relaxed);
        }
    }

    /// Bytes counted now, across all connections.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_packets_are_not_counted() {
        assert_eq!(IncompletePackets::counted(BUFFER_SIZE), 0);
        assert_eq!(IncompletePackets::counted(BUFFER_SIZE + 1), BUFFER_SIZE + 1);
    }

    #[test]
    fn a_packet_that_grows_beyond_the_limit_is_refused_and_the_others_go_on() {
        let incomplete = IncompletePackets::new(100_000);
        assert!(incomplete.update(0, 60_000));
        assert!(incomplete.update(0, 30_000));
        // The second connection's packet grows over the total: refused.
        assert!(!incomplete.update(30_000, 50_000));
        assert_eq!(incomplete.held(), 110_000);
        incomplete.release(50_000);
        // The first one's completes (counts nothing then), and a third can
        // grow to what is left.
        assert!(incomplete.update(60_000, 0));
        assert!(incomplete.update(0, 100_000));
        assert!(!incomplete.update(100_000, 100_001));
        incomplete.release(100_001);
        assert_eq!(incomplete.held(), 0);
    }
}
