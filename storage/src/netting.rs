//! [`HeldQueue`]: the submissions the writer holds before writing them, and
//! the netting that removes operations which cancel out.
//!
//! A QoS 1 message published to an online persistent subscriber is stored
//! (its record and a new queue entry) and, one round trip later, forgotten
//! again: the subscriber's PUBACK deletes the entry, and the message goes
//! with its last reference. Written as they come, that is about six key
//! writes and reads in the engine for a net change of nothing. So in fsync
//! mode the writer holds a submission that inserts such an entry until the
//! entry's deletion arrives or `max_delay` passes, whichever is first, and
//! nets each submission against the held ones as it arrives:
//!
//! 1. A queue entry inserted with [`Op::InsertQueueEntry`] (a delivery the
//!    broker expects to be acknowledged soon; the key did not exist before)
//!    and deleted by a later held operation vanishes, together with every
//!    replacement of it in between.
//! 2. When a batch is written, a [`Op::PutMessage`] that no surviving
//!    operation of the same batch references is left out. The broker puts
//!    the message in every batch that adds a reference to it, so the put is
//!    either a rewrite of an already stored, immutable record or a message
//!    the store would drop at the end of the batch for want of references.
//!
//! A session deletion cancels the open chains of its client (it would have
//! deleted their entries as well), so that a later session, whose seqs
//! count from 1 again, never continues them.
//!
//! Netting never changes what the store holds once the held batches are
//! written: the remaining operations leave it in the state all of them
//! would have. A chain whose insertion was written can no longer cancel: a
//! later deletion is written as usual.
//!
//! One exception to "never changes": a deletion or a replacement can reach
//! the writer before the insertion of the same entry (the subscriber was
//! sent the delivery, or even acknowledged it, before its publisher's
//! journal was submitted). Written in that order, a deleted entry would
//! come back and stay forever, and a replaced one would go back to its
//! first state; the writer drops such a late insertion instead
//! (`recent_deletes.rs`), which leaves the state the broker meant.
//!
//! Submissions leave in the order they came (batches apply in submission
//! order, and completions run in that order), so a held submission also
//! holds back the younger ones behind it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fxhash::{FxHashMap, FxHasher};
use smallvec::{smallvec, SmallVec};

use crate::batch::{Batch, Op};
use crate::recent_deletes::{RecentDeletes, Settled};
use crate::records::DeliveryState;

/// A submission waiting to be written.
pub(crate) struct Held<R> {
    /// `None`: a sync barrier (never held).
    batch: Option<Batch>,
    reply: R,
    /// When it was submitted.
    at: Instant,
    /// Indexes of its operations that cancelled out.
    dead: SmallVec<[u32; 4]>,
    /// Its insertions that may still cancel (their chain is open).
    open_inserts: u32,
}

impl<R> Held<R> {
    fn ops(&self) -> usize {
        self.batch.as_ref().map_or(0, |b| b.len() - self.dead.len())
    }
}

/// Where an operation sits: the submission's number and the op's index.
type Position = (u64, u32);

/// The FIFO of held submissions, netted as they arrive.
pub(crate) struct HeldQueue<R> {
    queue: VecDeque<Held<R>>,
    /// Number of the submission at the front of `queue`.
    front_no: u64,
    /// Open chains by queue entry key (hash of the client id, seq): the
    /// insertion first, then the replacements since. Keys are hashed to
    /// avoid copying client ids; a match is confirmed on the operation.
    chains: FxHashMap<(u64, u64), SmallVec<[Position; 2]>>,
    /// Number of the youngest sync barrier held, if any: everything up to
    /// it is due at once.
    last_barrier: Option<u64>,
    /// Deletions and replacements that matched no open chain, in case
    /// their insertion is still to come (see `recent_deletes.rs`).
    recent_deletes: RecentDeletes,
    /// Operations removed so far.
    netted: u64,
    /// Insertions dropped because their deletion or a replacement came
    /// first, and replacements dropped because their deletion did.
    late_inserts: u64,
}

impl<R> HeldQueue<R> {
    pub(crate) fn new() -> HeldQueue<R> {
        HeldQueue {
            queue: VecDeque::new(),
            front_no: 0,
            chains: FxHashMap::default(),
            last_barrier: None,
            recent_deletes: RecentDeletes::default(),
            netted: 0,
            late_inserts: 0,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Operations removed by netting since the queue was created.
    pub(crate) fn netted(&self) -> u64 {
        self.netted
    }

    /// Insertions dropped since the queue was created because the deletion
    /// of the same entry had come first (a delivery acknowledged before
    /// its publisher's journal reached the writer).
    pub(crate) fn late_inserts(&self) -> u64 {
        self.late_inserts
    }

    /// When the front submission's hold ends (`None` when empty).
    pub(crate) fn front_hold_ends(&self, hold: Duration) -> Option<Instant> {
        self.queue.front().map(|h| h.at + hold)
    }

    /// Adds a submission at the back, netting its operations against the
    /// held ones (and each other).
    pub(crate) fn push(&mut self, batch: Option<Batch>, reply: R, at: Instant) {
        let no = self.front_no + self.queue.len() as u64;
        if batch.is_none() {
            self.last_barrier = Some(no);
        }
        self.queue.push_back(Held {
            batch,
            reply,
            at,
            dead: SmallVec::new(),
            open_inserts: 0,
        });
        let n = self
            .queue
            .back()
            .and_then(|h| h.batch.as_ref())
            .map_or(0, Batch::len);
        for i in 0..n {
            self.net_op((no, i as u32), at);
        }
    }

    fn held_mut(&mut self, no: u64) -> Option<&mut Held<R>> {
        self.queue
            .get_mut(usize::try_from(no.checked_sub(self.front_no)?).ok()?)
    }

    fn net_op(&mut self, at: Position, now: Instant) {
        /// What an operation does to the chains.
        enum Step {
            Open((u64, u64)),
            Extend((u64, u64)),
            Close((u64, u64)),
            /// An insertion whose deletion or replacement came first, or a
            /// replacement whose deletion did (`recent_deletes.rs`).
            Late,
        }
        let step = match op_at(&self.queue, self.front_no, at) {
            Some(Op::InsertQueueEntry(e)) => {
                if self.recent_deletes.take(&e.client_id, e.seq) {
                    Step::Late
                } else {
                    Step::Open(entry_key(&e.client_id, e.seq))
                }
            }
            Some(Op::PutQueueEntry(e)) => {
                let key = entry_key(&e.client_id, e.seq);
                if self.chain_matches(key, &e.client_id) {
                    Step::Extend(key)
                } else if e.state == DeliveryState::Pending {
                    // A delivery's first write (queued behind a full
                    // window). Replaced or deleted already, the entry was
                    // sent (or even acknowledged) by the subscriber's
                    // connection before the publisher's batch came: written
                    // now, it would turn a QoS 2 delivery whose packet id is
                    // stored back to "not sent", and a restart would send it
                    // again as a new message.
                    if self.recent_deletes.take(&e.client_id, e.seq) {
                        Step::Late
                    } else {
                        return;
                    }
                } else if self.recent_deletes.was_deleted(&e.client_id, e.seq) {
                    // Built before the entry's deletion, submitted after
                    // it: written, it would bring the entry back.
                    Step::Late
                } else {
                    // Either the entry is stored already, or this
                    // replacement overtook the entry's insertion and
                    // creates it (it carries the message): a late
                    // insertion would overwrite it with older state, and
                    // open a chain the entry's deletion would then cancel,
                    // leaving this replacement's entry behind.
                    self.recent_deletes
                        .remember(&e.client_id, e.seq, Settled::Replaced, now);
                    return;
                }
            }
            Some(Op::DeleteQueueEntry { client_id, seq }) => {
                let key = entry_key(client_id, *seq);
                if !self.chain_matches(key, client_id) {
                    self.recent_deletes
                        .remember(client_id, *seq, Settled::Deleted, now);
                    return;
                }
                Step::Close(key)
            }
            Some(Op::DeleteSession { client_id }) => {
                let client_id = Arc::clone(client_id);
                self.recent_deletes.session_ended(&client_id, now);
                self.end_chains_of(&client_id);
                return;
            }
            _ => return,
        };
        match step {
            Step::Late => {
                self.late_inserts += 1;
                self.kill(at);
            }
            Step::Open(key) => {
                if let Some(old) = self.chains.insert(key, smallvec![at]) {
                    // A hash collision (the broker never reuses a key):
                    // the older chain just stops netting.
                    self.release_head(old[0]);
                }
                if let Some(h) = self.held_mut(at.0) {
                    h.open_inserts += 1;
                }
            }
            Step::Extend(key) => {
                if let Some(chain) = self.chains.get_mut(&key) {
                    chain.push(at);
                }
            }
            Step::Close(key) => {
                let chain = self.chains.remove(&key).unwrap_or_default();
                if let Some(&head) = chain.first() {
                    self.release_head(head);
                }
                for p in chain.into_iter().chain([at]) {
                    self.kill(p);
                }
            }
        }
    }

    /// A session deletion: the client's open chains vanish (the deletion
    /// removes their entries anyway), so that a later session, whose seqs
    /// count from 1 again, never continues them.
    fn end_chains_of(&mut self, client_id: &str) {
        if self.chains.is_empty() {
            return;
        }
        let (hash, _) = entry_key(client_id, 0);
        let mut ended: SmallVec<[SmallVec<[Position; 2]>; 4]> = SmallVec::new();
        let (queue, front_no) = (&self.queue, self.front_no);
        self.chains.retain(|&(h, _), chain| {
            let ends = h == hash
                && op_at(queue, front_no, chain[0]).is_some_and(
                    |op| matches!(op, Op::InsertQueueEntry(e) if *e.client_id == *client_id),
                );
            if ends {
                ended.push(std::mem::take(chain));
            }
            !ends
        });
        for chain in ended {
            self.release_head(chain[0]);
            for p in chain {
                self.kill(p);
            }
        }
    }

    /// The chain headed by the insertion at `head` is closed.
    fn release_head(&mut self, head: Position) {
        if let Some(h) = self.held_mut(head.0) {
            h.open_inserts = h.open_inserts.saturating_sub(1);
        }
    }

    /// True when the open chain under `key` is really `client_id`'s (not a
    /// hash collision).
    fn chain_matches(&self, key: (u64, u64), client_id: &str) -> bool {
        self.chains
            .get(&key)
            .and_then(|chain| op_at(&self.queue, self.front_no, chain[0]))
            .is_some_and(|op| matches!(op, Op::InsertQueueEntry(e) if *e.client_id == *client_id))
    }

    fn kill(&mut self, (no, i): Position) {
        if let Some(h) = self.held_mut(no) {
            h.dead.push(i);
            self.netted += 1;
        }
    }

    /// How many of the oldest submissions form the next window: each one
    /// whose hold is over (`hold` passed, or none of its insertions can
    /// still cancel), all up to a sync barrier, or all when `flush`; at most
    /// `max_ops` operations but at least one submission when one is due.
    pub(crate) fn ready(&self, now: Instant, hold: Duration, max_ops: usize, flush: bool) -> usize {
        let (mut n, mut ops) = (0, 0);
        for (i, h) in self.queue.iter().enumerate() {
            let no = self.front_no + i as u64;
            let due = flush
                || self.last_barrier.is_some_and(|b| no <= b)
                || h.open_inserts == 0
                || h.at + hold <= now;
            if !due || (n > 0 && ops + h.ops() > max_ops) {
                break;
            }
            ops += h.ops();
            n += 1;
        }
        n
    }

    /// Readies the `n` oldest submissions to be written: their cancelled
    /// operations and unreferenced message puts are removed where they lie
    /// (a submission is a few hundred bytes; moving each one more time cost
    /// the writer a tenth of its time), and their open chains close: what
    /// they inserted is about to be written. Read them with
    /// [`front`](Self::front), then remove them with
    /// [`drain_front`](Self::drain_front).
    pub(crate) fn prepare(&mut self, n: usize) {
        let n = n.min(self.queue.len());
        let last_no = self.front_no + n as u64;
        self.chains.retain(|_, chain| chain[0].0 >= last_no);
        for held in self.queue.range_mut(..n) {
            if let Some(batch) = &mut held.batch {
                strip(batch, &held.dead, &mut self.netted);
            }
        }
    }

    /// The batches of the `n` oldest submissions (`None`: a sync barrier).
    pub(crate) fn front(&self, n: usize) -> impl Iterator<Item = Option<&Batch>> {
        self.queue.iter().take(n).map(|h| h.batch.as_ref())
    }

    /// Removes the `n` oldest submissions (prepared), yielding for each
    /// whether it was a batch (not a sync barrier) and its reply.
    pub(crate) fn drain_front(&mut self, n: usize) -> impl Iterator<Item = (bool, R)> + '_ {
        let n = n.min(self.queue.len());
        self.front_no += n as u64;
        self.queue
            .drain(..n)
            .map(|held| (held.batch.is_some(), held.reply))
    }

    /// [`prepare`](Self::prepare)s the `n` oldest submissions and removes
    /// them.
    #[cfg(test)]
    pub(crate) fn take(&mut self, n: usize) -> Vec<(Option<Batch>, R)> {
        self.prepare(n);
        let n = n.min(self.queue.len());
        self.front_no += n as u64;
        self.queue
            .drain(..n)
            .map(|held| (held.batch, held.reply))
            .collect()
    }
}

/// The operation at a position, with the queue borrowed on its own.
fn op_at<R>(queue: &VecDeque<Held<R>>, front_no: u64, (no, i): Position) -> Option<&Op> {
    let held = queue.get(usize::try_from(no.checked_sub(front_no)?).ok()?)?;
    held.batch.as_ref()?.ops.get(i as usize)
}

fn entry_key(client_id: &str, seq: u64) -> (u64, u64) {
    use std::hash::{Hash, Hasher};
    let mut h = FxHasher::default();
    client_id.hash(&mut h);
    (h.finish(), seq)
}

/// Removes `batch`'s `dead` operations and the message puts that no
/// surviving operation references (counted into `netted`).
fn strip(batch: &mut Batch, dead: &[u32], netted: &mut u64) {
    if dead.is_empty() {
        return;
    }
    let mut i = 0;
    batch.ops.retain(|_| {
        let keep = !dead.contains(&i);
        i += 1;
        keep
    });
    let referenced: SmallVec<[u64; 4]> = batch
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::InsertQueueEntry(e) | Op::PutQueueEntry(e) => Some(e.message_id),
            Op::PutRetained(r) => Some(r.message_id),
            _ => None,
        })
        .collect();
    let before = batch.ops.len();
    batch
        .ops
        .retain(|op| !matches!(op, Op::PutMessage(m) if !referenced.contains(&m.id)));
    *netted += (before - batch.ops.len()) as u64;
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::HeldQueue;
    use crate::{
        Batch, DeliveryState, MemoryStore, MessageRecord, Op, QueueEntry, RetainedRecord, Store,
    };

    fn message(id: u64) -> MessageRecord {
        MessageRecord {
            id,
            topic: format!("t/{id}").into(),
            payload: vec![7; 16].into(),
            qos: 1,
            retain: false,
            properties: Default::default(),
            expires_at: None,
        }
    }

    fn entry(client: &str, seq: u64, message_id: u64, state: DeliveryState) -> QueueEntry {
        QueueEntry {
            client_id: client.into(),
            seq,
            message_id,
            qos: 1,
            packet_id: Some(seq as u16),
            state,
            dup: false,
            retain: false,
            subscription_ids: Vec::new(),
            weight: Some(100),
            shared: None,
        }
    }

    /// A publish to `client`'s online session: the message and an in-flight
    /// entry.
    fn publish(client: &str, seq: u64, id: u64) -> Batch {
        let mut b = Batch::new();
        b.put_message(message(id)).insert_queue_entry(entry(
            client,
            seq,
            id,
            DeliveryState::AwaitingAck,
        ));
        b
    }

    fn ack(client: &str, seq: u64) -> Batch {
        let mut b = Batch::new();
        b.delete_queue_entry(client, seq);
        b
    }

    fn queue_of(batches: Vec<Batch>) -> HeldQueue<usize> {
        let mut q = HeldQueue::new();
        let at = Instant::now();
        for (i, b) in batches.into_iter().enumerate() {
            q.push(Some(b), i, at);
        }
        q
    }

    fn take_all(q: &mut HeldQueue<usize>) -> Vec<Batch> {
        let n = q.queue.len();
        q.take(n).into_iter().filter_map(|(b, _)| b).collect()
    }

    #[test]
    fn an_insertion_and_its_deletion_cancel_with_the_message() {
        let mut q = queue_of(vec![publish("a", 1, 10), ack("a", 1)]);
        let out = take_all(&mut q);
        assert!(out.iter().all(Batch::is_empty), "{out:?}");
        assert_eq!(q.netted(), 3);
    }

    #[test]
    fn replacements_between_cancel_too() {
        let mut put = Batch::new();
        put.put_queue_entry(entry("a", 1, 10, DeliveryState::AwaitingComp));
        let mut q = queue_of(vec![publish("a", 1, 10), put, ack("a", 1)]);
        assert!(take_all(&mut q).iter().all(Batch::is_empty));
    }

    #[test]
    fn a_message_another_entry_references_is_kept() {
        let mut b = publish("a", 1, 10);
        b.insert_queue_entry(entry("b", 1, 10, DeliveryState::AwaitingAck));
        let mut q = queue_of(vec![b, ack("a", 1)]);
        let out = take_all(&mut q);
        assert_eq!(out[0].ops.len(), 2, "{:?}", out[0]);
        assert!(matches!(out[0].ops[0], Op::PutMessage(_)));
        assert!(out[1].is_empty());
    }

    #[test]
    fn a_written_insertion_no_longer_cancels() {
        let mut q = queue_of(vec![publish("a", 1, 10)]);
        let first = q.take(1);
        assert_eq!(first[0].0.as_ref().unwrap().len(), 2);
        q.push(Some(ack("a", 1)), 1, Instant::now());
        let out = take_all(&mut q);
        assert_eq!(out[0].len(), 1, "the deletion is written");
    }

    #[test]
    fn a_session_deletion_in_between_leaves_only_itself() {
        let mut del = Batch::new();
        del.delete_session("a");
        let mut q = queue_of(vec![publish("a", 1, 10), del, ack("a", 1)]);
        let out = take_all(&mut q);
        // The insertion went with the session; the deletion after it could
        // belong to the next session, so it is written (and finds nothing).
        assert!(out[0].is_empty(), "{out:?}");
        assert_eq!(out[1].len() + out[2].len(), 2, "{out:?}");
    }

    #[test]
    fn an_insertion_after_its_own_deletion_is_dropped() {
        // The subscriber's PUBACK overtook the publisher's journal.
        let mut q = queue_of(vec![ack("a", 1), publish("a", 1, 10)]);
        let out = take_all(&mut q);
        assert_eq!(
            out[0].len(),
            1,
            "the deletion is written (it finds nothing)"
        );
        assert!(out[1].is_empty(), "no entry, no message: {:?}", out[1]);
        assert_eq!(q.late_inserts(), 1);
        // Not held: nothing waits for an acknowledgement.
        let q = queue_of(vec![ack("a", 1), publish("a", 1, 10)]);
        assert_eq!(
            q.ready(Instant::now(), Duration::from_secs(60), 100, false),
            2
        );
        // Also when the deletion was written in an earlier window.
        let mut q = queue_of(vec![ack("a", 1)]);
        q.take(1);
        q.push(Some(publish("a", 1, 10)), 1, Instant::now());
        assert!(take_all(&mut q)[0].is_empty());
    }

    /// The subscriber's connection sent the delivery from its queue (or
    /// got its PUBREC) and submitted the entry's new state, with the
    /// message, before the publisher's journal inserted it.
    fn replace(client: &str, seq: u64, id: u64) -> Batch {
        let mut b = Batch::new();
        b.put_message(message(id)).put_queue_entry(entry(
            client,
            seq,
            id,
            DeliveryState::AwaitingComp,
        ));
        b
    }

    #[test]
    fn an_insertion_after_a_replacement_of_it_is_dropped() {
        let store = MemoryStore::new();
        let mut q = queue_of(vec![replace("a", 1, 10), publish("a", 1, 10)]);
        for b in take_all(&mut q) {
            store.apply(&b).unwrap();
        }
        let entries: Vec<_> = store.queue("a", None).map(Result::unwrap).collect();
        assert_eq!(entries.len(), 1);
        assert_eq!(
            entries[0].state,
            DeliveryState::AwaitingComp,
            "the newer state stays"
        );
        assert_eq!(store.message_refs(10).unwrap(), 1);
        assert_eq!(q.late_inserts(), 1);

        // Then acknowledged: nothing is left, neither entry nor message.
        let store = MemoryStore::new();
        let mut q = queue_of(vec![replace("a", 1, 10), publish("a", 1, 10), ack("a", 1)]);
        for b in take_all(&mut q) {
            store.apply(&b).unwrap();
        }
        assert_eq!(store.queue("a", None).count(), 0);
        assert!(store.message(10).unwrap().is_none());

        // A replacement built before the entry's deletion and submitted
        // after it is dropped too: it would bring the entry back.
        let store = MemoryStore::new();
        store.apply(&publish("a", 1, 10)).unwrap();
        let mut q = queue_of(vec![ack("a", 1), replace("a", 1, 10)]);
        for b in take_all(&mut q) {
            store.apply(&b).unwrap();
        }
        assert_eq!(store.queue("a", None).count(), 0);
        assert!(store.message(10).unwrap().is_none());

        // A first write of a queued delivery (pending) is not remembered.
        let mut pending = Batch::new();
        pending
            .put_message(message(11))
            .put_queue_entry(entry("a", 2, 11, DeliveryState::Pending));
        let mut q = queue_of(vec![pending]);
        take_all(&mut q);
        assert_eq!(q.recent_deletes.len(), 0);

        // A replacement that follows its insertion still nets away with it.
        let mut q = queue_of(vec![publish("a", 1, 10), replace("a", 1, 10), ack("a", 1)]);
        assert!(take_all(&mut q).iter().all(Batch::is_empty));
        assert_eq!(q.late_inserts(), 0);
    }

    #[test]
    fn a_first_write_after_the_entry_was_sent_is_dropped() {
        // The subscriber's connection sent a queued QoS 2 delivery and
        // stored its packet id before the publisher's batch with the
        // delivery's first (pending) write came: that write is dropped, and
        // the entry keeps its packet id.
        let store = MemoryStore::new();
        let mut sent = Batch::new();
        sent.put_message(message(10)).put_queue_entry(entry(
            "a",
            1,
            10,
            DeliveryState::AwaitingAck,
        ));
        let mut first = Batch::new();
        first
            .put_message(message(10))
            .put_queue_entry(entry("a", 1, 10, DeliveryState::Pending));
        let mut q = queue_of(vec![sent, first]);
        for b in take_all(&mut q) {
            store.apply(&b).unwrap();
        }
        assert_eq!(q.late_inserts(), 1);
        let kept: Vec<_> = store.queue("a", None).map(Result::unwrap).collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].state, DeliveryState::AwaitingAck);
        assert_eq!(kept[0].packet_id, Some(1));
        assert_eq!(q.recent_deletes.len(), 0, "the key is forgotten");
    }

    #[test]
    fn a_new_session_reuses_seqs_without_losing_entries() {
        let mut del = Batch::new();
        del.delete_session("a");
        let mut q = queue_of(vec![ack("a", 1), del, publish("a", 1, 10)]);
        let out = take_all(&mut q);
        assert_eq!(out[2].len(), 2, "the new session's entry is kept: {out:?}");
        assert_eq!(q.late_inserts(), 0);
        let mut q = queue_of(vec![ack("b", 1), publish("a", 1, 10)]);
        assert_eq!(take_all(&mut q)[1].len(), 2, "another client's entry");
    }

    #[test]
    fn a_held_insertion_is_due_once_deleted_or_after_the_hold() {
        let hold = Duration::from_secs(60);
        let now = Instant::now();
        let mut q: HeldQueue<usize> = HeldQueue::new();
        q.push(Some(publish("a", 1, 10)), 0, now);
        let mut other = Batch::new();
        other.add_incoming_qos2("b", 1);
        q.push(Some(other), 1, now);
        assert_eq!(q.ready(now, hold, 100, false), 0, "held for its ack");
        assert_eq!(q.ready(now + hold, hold, 100, false), 2, "hold over");
        assert_eq!(q.ready(now, hold, 100, true), 2, "flushing");
        q.push(None, 2, now);
        assert_eq!(q.ready(now, hold, 100, false), 3, "a barrier is not held");
        let mut q: HeldQueue<usize> = HeldQueue::new();
        q.push(Some(publish("a", 1, 10)), 0, now);
        q.push(Some(ack("a", 1)), 1, now);
        assert_eq!(q.ready(now, hold, 100, false), 2, "acknowledged");
        let mut q: HeldQueue<usize> = HeldQueue::new();
        q.push(Some(ack("a", 1)), 0, now);
        q.push(Some(ack("a", 2)), 1, now);
        assert_eq!(q.ready(now, hold, 1, false), 1, "max_ops bounds a window");
    }

    /// Whatever the operations, writing the held batches netted leaves the
    /// store as writing them whole does, except that an insertion whose
    /// deletion came first is not written.
    #[test]
    fn netting_never_changes_the_resulting_state() {
        for round in 0..300u64 {
            let mut rng = fastrand::Rng::with_seed(round);
            let clients = ["a", "b", "c"];
            let mut next_seq = [1u64; 3];
            let mut live: Vec<(usize, u64, u64)> = Vec::new();
            let mut next_id = 1u64;
            let mut batches = Vec::new();
            // What the broker meant: the same, without the insertions whose
            // deletion was submitted first (see `recent_deletes.rs`).
            let mut meant = Vec::new();
            // Per client, a seq deleted before its insertion was submitted.
            let mut early: [Option<u64>; 3] = [None; 3];
            // Per client, a seq (and message id) replaced before its
            // insertion was submitted.
            let mut early_put: [Option<(u64, u64)>; 3] = [None; 3];
            // Clients whose session ended (all batches share one instant,
            // so their early deletions are never remembered).
            let mut ended = [false; 3];
            for _ in 0..rng.usize(1..40) {
                let mut b = Batch::new();
                let mut m = Batch::new();
                for _ in 0..rng.usize(1..4) {
                    let c = rng.usize(0..clients.len());
                    let ops_before = b.len();
                    match rng.u8(0..11) {
                        0..=3 => {
                            let seq = next_seq[c];
                            let state = DeliveryState::AwaitingAck;
                            if let Some((early_seq, id)) = early_put[c] {
                                if early_seq == seq {
                                    // The late insertion of an entry
                                    // replaced first: dropped, the message
                                    // with it.
                                    early_put[c] = None;
                                    next_seq[c] += 1;
                                    b.put_message(message(id));
                                    b.insert_queue_entry(entry(clients[c], seq, id, state));
                                    m.put_message(message(id));
                                    continue;
                                }
                            }
                            let id = next_id;
                            next_id += 1;
                            b.put_message(message(id));
                            next_seq[c] += 1;
                            if early[c] == Some(seq) && !ended[c] {
                                // The late insertion of an acknowledged
                                // delivery: meant never to exist.
                                early[c] = None;
                                b.insert_queue_entry(entry(clients[c], seq, id, state));
                                m.put_message(message(id));
                                continue;
                            }
                            if rng.bool() {
                                b.insert_queue_entry(entry(clients[c], seq, id, state));
                            } else {
                                b.put_queue_entry(entry(clients[c], seq, id, state));
                            }
                            live.push((c, seq, id));
                            if rng.u8(0..4) == 0 {
                                b.put_retained(RetainedRecord {
                                    topic: format!("r/{}", rng.u8(0..3)),
                                    message_id: id,
                                });
                            }
                        }
                        4..=6 if !live.is_empty() => {
                            let (c, seq, _) = live.swap_remove(rng.usize(0..live.len()));
                            b.delete_queue_entry(clients[c], seq);
                        }
                        7 if !live.is_empty() => {
                            let (c, seq, id) = live[rng.usize(0..live.len())];
                            b.put_queue_entry(entry(
                                clients[c],
                                seq,
                                id,
                                DeliveryState::AwaitingComp,
                            ));
                        }
                        8 if rng.u8(0..4) == 0 => {
                            b.delete_session(clients[c]);
                            live.retain(|(lc, _, _)| *lc != c);
                            // A new session starts its seqs again.
                            next_seq[c] = 1;
                            early[c] = None;
                            early_put[c] = None;
                            ended[c] = true;
                        }
                        9 if early[c].is_none() && early_put[c].is_none() && !ended[c] => {
                            // The next delivery sent (or its PUBREC
                            // received) before its insertion was submitted:
                            // the replacement carries the message. (Not
                            // after a session end: remembered, it could
                            // cancel a new session's entry.)
                            let (seq, id) = (next_seq[c], next_id);
                            next_id += 1;
                            early_put[c] = Some((seq, id));
                            b.put_message(message(id));
                            b.put_queue_entry(entry(
                                clients[c],
                                seq,
                                id,
                                DeliveryState::AwaitingComp,
                            ));
                            live.push((c, seq, id));
                        }
                        10 if early[c].is_none() && early_put[c].is_none() => {
                            // The acknowledgement of the next delivery,
                            // submitted before the delivery's insertion.
                            early[c] = Some(next_seq[c]);
                            b.delete_queue_entry(clients[c], next_seq[c]);
                        }
                        _ => {
                            b.delete_retained(format!("r/{}", rng.u8(0..3)));
                        }
                    }
                    for op in &b.ops[ops_before..] {
                        m.push(op.clone());
                    }
                }
                batches.push(b);
                meant.push(m);
            }
            let whole = MemoryStore::new();
            let netted = MemoryStore::new();
            for b in &meant {
                whole.apply(b).unwrap();
            }
            // Netted, written in windows of random sizes.
            let mut q = queue_of(batches);
            while !q.is_empty() {
                let n = rng.usize(1..=q.queue.len());
                for (b, _) in q.take(n) {
                    netted.apply(&b.unwrap()).unwrap();
                }
            }
            assert_eq!(
                dump(&whole, next_id),
                dump(&netted, next_id),
                "round {round}"
            );
        }
    }

    fn dump(store: &MemoryStore, ids: u64) -> String {
        let mut out = String::new();
        for c in ["a", "b", "c"] {
            for e in store.queue(c, None) {
                out += &format!("{:?}\n", e.unwrap());
            }
        }
        for id in 1..ids {
            let m = store.message(id).unwrap().map(|m| m.id);
            out += &format!("{id}: {m:?} refs {}\n", store.message_refs(id).unwrap());
        }
        for r in store.retained("") {
            out += &format!("{:?}\n", r.unwrap());
        }
        out
    }
}
