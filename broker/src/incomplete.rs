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
//! So read buffers grown for a packet larger than a pooled buffer are
//! counted across all connections ([`IncompletePackets`]), at the size of
//! their allocation (which doubles as it grows), against
//! `limits.max_incomplete_bytes`. A connection whose incomplete packet
//! grows while the total is over it is closed (5.0: DISCONNECT 0x97 Quota
//! exceeded, or CONNACK 0x97 for a CONNECT), counted in
//! `incomplete_packets_refused`; its count and its buffer are let go at
//! once. Clients still connecting have a bound of their own, of the same
//! size: clients that never authenticate cannot push out those that did.
//!
//! Both readers count: the connection's (`Connection::count_incomplete`,
//! its count kept in the connection) and the handshake's
//! (`handshake::read_packet`, an [`IncompleteCount`] released when the read
//! ends or the connect timeout cancels it). A packet is uncounted as soon
//! as it is decoded. What is left in a grown buffer after a large packet
//! (the start of the next one) moves to a pooled buffer
//! ([`shed_grown_buffer`]), so that a byte of it cannot keep the large
//! allocation alive uncounted.
//!
//! Packets that arrive within a pooled buffer are not counted: their bytes
//! are in the buffer every reading connection has anyway, and counting them
//! would cost every read an atomic operation.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;

use crate::pool::{BufferPool, BUFFER_SIZE};

/// Why a reader refused by the bound is closed (logged).
pub const OVER_INCOMPLETE_LIMIT: &str =
    "incomplete packets of all clients over limits.max_incomplete_bytes";

/// Bytes of read buffers grown for incomplete packets, across all
/// connections (or all those still connecting), against a limit. Each
/// reader records what its own buffer holds
/// ([`IncompletePackets::record`]) and releases it when its packet is
/// decoded or it ends.
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

    /// What a read buffer holding one incomplete packet counts: its
    /// allocation once the packet no longer fits in a pooled buffer, else
    /// nothing.
    fn counted(buf: &BytesMut) -> u32 {
        if buf.len() > BUFFER_SIZE {
            // At most twice `limits.max_packet_size`, which is below 2^29.
            u32::try_from(buf.capacity()).unwrap_or(u32::MAX)
        } else {
            0
        }
    }

    /// Records that a reader whose incomplete packet counted `*counted`
    /// now holds `buf`, one incomplete packet (and `*counted` becomes what
    /// that counts). Returns `false` when it grew and the total is now over
    /// the limit: the reader must close, and [`release`](Self::release)
    /// `*counted`. An atomic operation only when the count changes.
    pub fn record(&self, counted: &mut u32, buf: &BytesMut) -> bool {
        let now = Self::counted(buf);
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

    /// Releases what a reader counted (its packet was decoded, or it
    /// ends), and sets its count to 0.
    pub fn release(&self, counted: &mut u32) {
        let counted = std::mem::take(counted);
        if counted > 0 {
            self.held.fetch_sub(counted as usize, Ordering::Relaxed);
        }
    }

    /// Bytes counted now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// After a packet larger than a pooled buffer was decoded from `buf`: moves
/// what is left, if it fits, into a pooled buffer. The large allocation is
/// then held only by the decoded packet's message, as long as it lives, and
/// not by the start of the next packet, which would keep it uncounted
/// (a byte of it counts nothing).
pub fn shed_grown_buffer(buf: &mut BytesMut, pool: &BufferPool) {
    if !buf.is_empty() && buf.len() <= BUFFER_SIZE {
        let mut pooled = pool.take();
        pooled.extend_from_slice(buf);
        *buf = pooled;
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
    pub fn record(&mut self, buf: &BytesMut) -> bool {
        self.packets.record(&mut self.counted, buf)
    }
}

impl Drop for IncompleteCount<'_> {
    fn drop(&mut self) {
        self.packets.release(&mut self.counted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer of `len` bytes in an allocation of at least `capacity`.
    fn buffer(len: usize, capacity: usize) -> BytesMut {
        let mut buf = BytesMut::with_capacity(capacity);
        buf.resize(len, 7);
        buf
    }

    #[test]
    fn a_packet_within_a_pooled_buffer_is_not_counted_and_a_grown_one_is_at_its_allocation() {
        let incomplete = IncompletePackets::new(1 << 20);
        let mut counted = 0;
        assert!(incomplete.record(&mut counted, &buffer(BUFFER_SIZE, BUFFER_SIZE)));
        assert_eq!((counted, incomplete.held()), (0, 0));
        let grown = buffer(BUFFER_SIZE + 1, 64 * 1024);
        assert!(incomplete.record(&mut counted, &grown));
        assert_eq!(counted as usize, grown.capacity());
        assert_eq!(incomplete.held(), grown.capacity());
        incomplete.release(&mut counted);
        assert_eq!((counted, incomplete.held()), (0, 0));
    }

    #[test]
    fn a_packet_that_grows_beyond_the_limit_is_refused_and_the_others_go_on() {
        let incomplete = IncompletePackets::new(100_000);
        let (mut first, mut second, mut third) = (0, 0, 0);
        assert!(incomplete.record(&mut first, &buffer(60_000, 60_000)));
        assert!(incomplete.record(&mut second, &buffer(30_000, 30_000)));
        // The second one's packet grows over the total: refused.
        assert!(!incomplete.record(&mut second, &buffer(50_000, 50_000)));
        assert_eq!(incomplete.held(), 110_000);
        incomplete.release(&mut second);
        // The first one's is decoded, and a third can grow to what is
        // left.
        incomplete.release(&mut first);
        assert!(incomplete.record(&mut third, &buffer(100_000, 100_000)));
        assert!(!incomplete.record(&mut third, &buffer(100_001, 100_001)));
        incomplete.release(&mut third);
        assert_eq!(incomplete.held(), 0);
    }

    #[test]
    fn a_handshake_s_count_is_released_when_it_ends() {
        let incomplete = IncompletePackets::new(100_000);
        {
            let mut count = IncompleteCount::new(&incomplete);
            assert!(count.record(&buffer(50_000, 50_000)));
            assert_eq!(incomplete.held(), 50_000);
        }
        assert_eq!(incomplete.held(), 0);
    }

    /// The start of the next packet, left behind a large one, does not
    /// keep the large allocation: it moves to a pooled buffer.
    #[test]
    fn what_a_large_packet_leaves_moves_out_of_its_allocation() {
        let pool = BufferPool::new(4);
        let mut buf = buffer(1 << 20, 1 << 20);
        buf[(1 << 20) - 1] = 42;
        let allocation = buf.as_ptr() as usize..buf.as_ptr() as usize + (1 << 20);
        let packet = buf.split_to((1 << 20) - 1).freeze();
        drop(packet);
        shed_grown_buffer(&mut buf, &pool);
        assert_eq!(&buf[..], &[42]);
        assert!(
            !allocation.contains(&(buf.as_ptr() as usize)),
            "the byte left still holds the 1 MiB allocation"
        );
        // A large remainder stays where it is (it is counted).
        let mut large = buffer(BUFFER_SIZE + 1, 1 << 20);
        let before = large.as_ptr();
        shed_grown_buffer(&mut large, &pool);
        assert_eq!(large.as_ptr(), before);
    }
}
