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
//! exceeded, or CONNACK 0x97 for a CONNECT), counted in
//! `incomplete_packets_refused`, which releases what it held. Both readers
//! count: the connection's (`Connection::count_incomplete`, its count kept
//! in the connection) and the handshake's (`handshake::read_packet`, an
//! [`IncompleteCount`] released when the read ends or the connect timeout
//! cancels it). Packets that arrive whole, or within a pooled buffer, are not
//! counted: their bytes are in the buffer every reading connection has
//! anyway, and counting them would cost every read an atomic operation.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::pool::BUFFER_SIZE;

/// Why a reader refused by the bound is closed (logged).
pub const OVER_INCOMPLETE_LIMIT: &str =
    "incomplete packets of all clients over limits.max_incomplete_bytes";

/// Bytes of incomplete packets held across all connections, against a
/// limit. Each reader records what its own incomplete packet holds
/// ([`IncompletePackets::record`]) and releases it when it ends.
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

    /// What a read buffer holding `buffered` bytes of one incomplete
    /// packet counts: nothing while it fits in a pooled buffer.
    fn counted(buffered: usize) -> u32 {
        if buffered > BUFFER_SIZE {
            // Less than `limits.max_packet_size`, which is a u32.
            u32::try_from(buffered).unwrap_or(u32::MAX)
        } else {
            0
        }
    }

    /// Records that a reader whose incomplete packet counted `*counted`
    /// now holds `buffered` bytes of one (and `*counted` becomes what that
    /// counts). Returns `false` when it grew and the total is now over the
    /// limit: the reader must close, and release `*counted` as it ends.
    /// An atomic operation only when the count changes.
    pub fn record(&self, counted: &mut u32, buffered: usize) -> bool {
        let now = Self::counted(buffered);
        let before = std::mem::replace(counted, now);
        let (now, before) = (now as usize, before as usize);
        if now > before {
            self.held.fetch_add(now - before, Ordering::Relaxed) + (now - before) <= self.limit
        } else {
            if now < before {
                self.held.fetch_sub(before - now, Ordering::Relaxed);
            }
            true
        }
    }

    /// Releases what an ending reader's incomplete packet counted.
    pub fn release(&self, counted: u32) {
        if counted > 0 {
            self.held.fetch_sub(counted as usize, Ordering::Relaxed);
        }
    }

    /// Bytes counted now, across all connections.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// The count of one reader that ends with its scope (a handshake's, which
/// a connect timeout may cancel anywhere): released when dropped.
#[derive(Debug)]
pub struct IncompleteCount<'a> {
    packets: &'a IncompletePackets,
    counted: u32,
}

impl<'a> IncompleteCount<'a> {
    /// A reader that holds nothing yet.
    pub fn new(packets: &'a IncompletePackets) -> Self {
        IncompleteCount {
            packets,
            counted: 0,
        }
    }

    /// [`IncompletePackets::record`] for this reader.
    pub fn record(&mut self, buffered: usize) -> bool {
        self.packets.record(&mut self.counted, buffered)
    }
}

impl Drop for IncompleteCount<'_> {
    fn drop(&mut self) {
        self.packets.release(self.counted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_packets_are_not_counted() {
        let incomplete = IncompletePackets::new(100_000);
        let mut counted = 0;
        assert!(incomplete.record(&mut counted, BUFFER_SIZE));
        assert_eq!((counted, incomplete.held()), (0, 0));
        assert!(incomplete.record(&mut counted, BUFFER_SIZE + 1));
        assert_eq!(counted as usize, BUFFER_SIZE + 1);
        assert_eq!(incomplete.held(), BUFFER_SIZE + 1);
    }

    #[test]
    fn a_packet_that_grows_beyond_the_limit_is_refused_and_the_others_go_on() {
        let incomplete = IncompletePackets::new(100_000);
        let (mut first, mut second, mut third) = (0, 0, 0);
        assert!(incomplete.record(&mut first, 60_000));
        assert!(incomplete.record(&mut second, 30_000));
        // The second one's packet grows over the total: refused.
        assert!(!incomplete.record(&mut second, 50_000));
        assert_eq!(incomplete.held(), 110_000);
        incomplete.release(second);
        // The first one's completes (counts nothing then), and a third can
        // grow to what is left.
        assert!(incomplete.record(&mut first, 0));
        assert!(incomplete.record(&mut third, 100_000));
        assert!(!incomplete.record(&mut third, 100_001));
        incomplete.release(third);
        assert_eq!(incomplete.held(), 0);
    }

    #[test]
    fn a_handshake_s_count_is_released_when_it_ends() {
        let incomplete = IncompletePackets::new(100_000);
        {
            let mut count = IncompleteCount::new(&incomplete);
            assert!(count.record(50_000));
            assert_eq!(incomplete.held(), 50_000);
        }
        assert_eq!(incomplete.held(), 0);
    }
}
