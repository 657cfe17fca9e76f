//! [`RecentDeletes`]: queue entry deletions (and replacements) that arrived
//! before their insertion, remembered for a moment so that the late
//! insertion is dropped.
//!
//! The broker hands a QoS 1 or 2 delivery to a connected subscriber under
//! the session's lock, but the delivery's [`Op::InsertQueueEntry`] reaches
//! the writer only when the publisher's connection submits its journal, a
//! little later. If the subscriber's writer was already running, the PUBLISH
//! can be on the wire, acknowledged, and its [`Op::DeleteQueueEntry`]
//! submitted before the insertion. Applied in submission order, the
//! deletion finds nothing and the insertion then leaves an entry nobody will
//! delete: the message would be sent again (with DUP) after the next
//! restart, and it would occupy the store until then.
//!
//! A replacement ([`Op::PutQueueEntry`]) can overtake the insertion the same
//! way: the subscriber's connection sends a delivery that waited in its
//! queue, or receives the PUBREC of a QoS 2 one, and submits the entry's new
//! state first. The broker puts the message in every batch that writes an
//! entry, so the replacement creates the entry; the late insertion would
//! turn it back to its first state, and if held, open a chain that the
//! entry's deletion would cancel, leaving the replacement's entry behind.
//!
//! So the writer remembers each deletion and each replacement that matched
//! nothing it holds, by client and seq, for [`REMEMBER_FOR`] (at most
//! [`MAX_REMEMBERED`] of them). An insertion of a remembered key is the late
//! half of such a pair: it is dropped, and the key is forgotten.
//!
//! Why this is safe: the broker never inserts a key again within a session
//! (seqs only grow), so an insertion of a key already deleted or replaced
//! can only be the late insertion of that same delivery. A session deletion
//! ([`Op::DeleteSession`]) starts a new session whose seqs count from 1
//! again: it forgets every remembered key of that client, and for
//! [`REMEMBER_FOR`] after it remembers none of that client (one could be
//! the old session's, racing its end, and must not cancel the new session's
//! entry of the same seq). In that second the rare stale entry can still
//! happen; a lost one cannot.
//!
//! [`Op::InsertQueueEntry`]: crate::Op::InsertQueueEntry
//! [`Op::DeleteQueueEntry`]: crate::Op::DeleteQueueEntry
//! [`Op::PutQueueEntry`]: crate::Op::PutQueueEntry
//! [`Op::DeleteSession`]: crate::Op::DeleteSession

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fxhash::{FxHashMap, FxHasher};

/// How long an unmatched deletion is remembered. The insertion it may
/// precede is submitted by the publisher's connection right after the read
/// that routed the message, while the deletion needs a round trip to the
/// subscriber first: the gap is microseconds, a few milliseconds on a
/// saturated machine. A second leaves a wide margin and bounds the memory.
pub const REMEMBER_FOR: Duration = Duration::from_secs(1);

/// Most deletions remembered at once (the oldest are forgotten first). A
/// deletion that matches nothing is common where queues drain from disk
/// (offline sessions reconnecting), so the bound keeps that case at a few
/// MiB; even at a million such deletions a second it still covers 65 ms,
/// far more than the gap above.
pub const MAX_REMEMBERED: usize = 65_536;

/// Deletions that matched no held insertion, oldest first.
#[derive(Default)]
pub(crate) struct RecentDeletes {
    /// By (hash of the client id, seq): the client id, to confirm a match,
    /// and when it was remembered.
    deleted: FxHashMap<(u64, u64), (Arc<str>, Instant, Settled)>,
    /// How many of `deleted` each client hash has (a session's end looks
    /// through `deleted` only when its client has some).
    per_client: FxHashMap<u64, u32>,
    /// (when, client hash, seq), in the order they were remembered.
    order: VecDeque<(Instant, u64, u64)>,
    /// When a session of each client hash last ended (kept for
    /// [`REMEMBER_FOR`]).
    ended: FxHashMap<u64, Instant>,
}

/// What reached the writer before an entry's insertion.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Settled {
    /// Its deletion: the entry is gone for good (keys are not reused
    /// within a session), so a later replacement of it is stale too.
    Deleted,
    /// A replacement, which created the entry.
    Replaced,
}

impl RecentDeletes {
    /// Remembers that `client_id`'s entry `seq` was deleted or replaced at
    /// `now`, forgetting what is too old first. A deletion stays a deletion.
    pub(crate) fn remember(&mut self, client_id: &Arc<str>, seq: u64, how: Settled, now: Instant) {
        self.expire(now);
        let hash = client_hash(client_id);
        if let Some(&at) = self.ended.get(&hash) {
            if at + REMEMBER_FOR > now {
                return;
            }
            self.ended.remove(&hash);
        }
        let key = (hash, seq);
        let how = match self.deleted.get(&key) {
            Some((c, _, Settled::Deleted)) if **c == **client_id => Settled::Deleted,
            _ => how,
        };
        let old = self.deleted.insert(key, (Arc::clone(client_id), now, how));
        if old.is_none() {
            *self.per_client.entry(hash).or_default() += 1;
        }
        self.order.push_back((now, hash, seq));
        if self.order.len() > MAX_REMEMBERED {
            self.forget_oldest();
        }
    }

    /// True when `client_id`'s entry `seq` was deleted a moment ago: a
    /// replacement of it now is stale (built before the deletion, submitted
    /// after it) and would bring the entry back.
    pub(crate) fn was_deleted(&self, client_id: &str, seq: u64) -> bool {
        !self.deleted.is_empty()
            && self
                .deleted
                .get(&(client_hash(client_id), seq))
                .is_some_and(|(c, _, how)| **c == *client_id && *how == Settled::Deleted)
    }

    /// True (and forgotten) when `client_id`'s entry `seq` was deleted or
    /// replaced before this insertion of it.
    pub(crate) fn take(&mut self, client_id: &str, seq: u64) -> bool {
        if self.deleted.is_empty() {
            return false;
        }
        let key = (client_hash(client_id), seq);
        if self
            .deleted
            .get(&key)
            .is_none_or(|(c, _, _)| **c != *client_id)
        {
            return false;
        }
        self.remove(key);
        // Its place in `order` stays; forgetting it later finds nothing.
        true
    }

    /// `client_id`'s session ended at `now` and the next one numbers its
    /// entries from 1 again: forgets its deletions, and remembers none of
    /// it for [`REMEMBER_FOR`].
    pub(crate) fn session_ended(&mut self, client_id: &str, now: Instant) {
        let hash = client_hash(client_id);
        if self.ended.len() >= MAX_REMEMBERED {
            self.ended.retain(|_, &mut at| at + REMEMBER_FOR > now);
        }
        self.ended.insert(hash, now);
        if !self.per_client.contains_key(&hash) {
            return;
        }
        let before = self.deleted.len();
        self.deleted
            .retain(|&(h, _), (c, _, _)| h != hash || **c != *client_id);
        let removed = (before - self.deleted.len()) as u32;
        if let Some(n) = self.per_client.get_mut(&hash) {
            *n -= removed.min(*n);
            if *n == 0 {
                self.per_client.remove(&hash);
            }
        }
    }

    /// Deletions remembered now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.deleted.len()
    }

    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|&(at, _, _)| at + REMEMBER_FOR <= now)
        {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        let Some((at, hash, seq)) = self.order.pop_front() else {
            return;
        };
        // Only the remembrance this place was made for (not one taken, or
        // remembered again later).
        if self
            .deleted
            .get(&(hash, seq))
            .is_some_and(|&(_, when, _)| when == at)
        {
            self.remove((hash, seq));
        }
    }

    fn remove(&mut self, key: (u64, u64)) {
        if self.deleted.remove(&key).is_some() {
            if let Some(n) = self.per_client.get_mut(&key.0) {
                *n -= 1;
                if *n == 0 {
                    self.per_client.remove(&key.0);
                }
            }
        }
    }
}

fn client_hash(client_id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = FxHasher::default();
    client_id.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_deletion_is_taken_once() {
        let mut d = RecentDeletes::default();
        let now = Instant::now();
        d.remember(&"a".into(), 1, Settled::Deleted, now);
        assert!(!d.take("a", 2));
        assert!(!d.take("b", 1));
        assert!(d.take("a", 1));
        assert!(!d.take("a", 1), "taken once");
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn a_session_deletion_forgets_the_client() {
        let mut d = RecentDeletes::default();
        let now = Instant::now();
        d.remember(&"a".into(), 1, Settled::Deleted, now);
        d.remember(&"b".into(), 1, Settled::Deleted, now);
        d.session_ended("a", now);
        assert!(!d.take("a", 1));
        assert!(d.take("b", 1));
        // A deletion racing the session's end is not remembered.
        d.remember(&"a".into(), 2, Settled::Deleted, now + REMEMBER_FOR / 2);
        assert!(!d.take("a", 2));
        d.remember(&"a".into(), 3, Settled::Deleted, now + REMEMBER_FOR);
        assert!(d.take("a", 3), "remembered again after a second");
    }

    #[test]
    fn old_deletions_are_forgotten() {
        let mut d = RecentDeletes::default();
        let now = Instant::now();
        d.remember(&"a".into(), 1, Settled::Deleted, now);
        d.remember(&"a".into(), 2, Settled::Deleted, now + REMEMBER_FOR / 2);
        d.remember(&"a".into(), 3, Settled::Deleted, now + REMEMBER_FOR);
        assert!(!d.take("a", 1), "a second old");
        assert!(d.take("a", 2));
        assert!(d.take("a", 3));
    }

    #[test]
    fn at_most_max_remembered_are_kept() {
        let mut d = RecentDeletes::default();
        let now = Instant::now();
        let a: Arc<str> = "a".into();
        for seq in 0..MAX_REMEMBERED as u64 + 10 {
            d.remember(&a, seq, Settled::Deleted, now);
        }
        assert_eq!(d.len(), MAX_REMEMBERED);
        assert!(!d.take("a", 9), "the oldest went first");
        assert!(d.take("a", 10));
    }
}
