//! A bounded pool of read buffers shared by all connections.
//!
//! A connection takes a buffer when its socket has bytes to read and gives it
//! back once every complete packet in it has been decoded and nothing is left
//! over, so an idle connection holds no read buffer at all. Buffers of
//! departed connections are reused by new ones. The pool keeps at most
//! [`BufferPool::capacity`] buffers (the rest are freed) and counts its hits
//! and misses so the hit rate can be reported.
//!
//! A buffer whose allocation is still shared with decoded frames (a payload
//! a subscriber has not been sent yet) is not pooled: reusing it could not
//! reuse the memory anyway.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use parking_lot::Mutex;

/// Size of a pooled buffer: a typical read, and most packets whole.
pub const BUFFER_SIZE: usize = 4096;

/// Buffers larger than this (grown for one large packet) are freed rather
/// than pooled, so the pool's memory stays `capacity x BUFFER_SIZE`-ish.
const MAX_POOLED_CAPACITY: usize = 4 * BUFFER_SIZE;

/// Recycled `BytesMut` read buffers.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<BytesMut>>,
    capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl BufferPool {
    /// A pool keeping at most `capacity` idle buffers.
    pub fn new(capacity: usize) -> BufferPool {
        BufferPool {
            free: Mutex::new(Vec::new()),
            capacity,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// An empty buffer with at least [`BUFFER_SIZE`] bytes of capacity.
    pub fn take(&self) -> BytesMut {
        if let Some(buf) = self.free.lock().pop() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return buf;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        BytesMut::with_capacity(BUFFER_SIZE)
    }

    /// Returns a buffer. It is cleared and kept if the pool has room and the
    /// buffer owns a reusable allocation; otherwise it is freed.
    pub fn give(&self, mut buf: BytesMut) {
        buf.clear();
        // `try_reclaim` succeeds only when no frozen frame still shares the
        // allocation, so a pooled buffer is never aliased.
        if buf.capacity() > MAX_POOLED_CAPACITY || !buf.try_reclaim(BUFFER_SIZE) {
            return;
        }
        let mut free = self.free.lock();
        if free.len() < self.capacity {
            free.push(buf);
        }
    }

    /// The most idle buffers kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Buffers idle in the pool now.
    pub fn idle(&self) -> usize {
        self.free.lock().len()
    }

    /// (hits, misses) of [`take`](Self::take) so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_returned_buffers_up_to_capacity() {
        let pool = BufferPool::new(2);
        let a = pool.take();
        let b = pool.take();
        let c = pool.take();
        assert_eq!(pool.stats(), (0, 3));
        pool.give(a);
        pool.give(b);
        pool.give(c);
        assert_eq!(pool.idle(), 2, "bounded");
        let again = pool.take();
        assert!(again.is_empty() && again.capacity() >= BUFFER_SIZE);
        assert_eq!(pool.stats(), (1, 3));
    }

    #[test]
    fn a_buffer_still_shared_with_a_frame_is_not_pooled() {
        let pool = BufferPool::new(4);
        let mut buf = pool.take();
        buf.extend_from_slice(b"frame");
        let frame = buf.split_to(5).freeze();
        pool.give(buf);
        assert_eq!(pool.idle(), 0);
        drop(frame);
        let mut buf = pool.take();
        buf.extend_from_slice(b"x");
        pool.give(buf);
        assert_eq!(pool.idle(), 1);
    }
}
