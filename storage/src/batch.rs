//! [`Batch`]: a list of operations applied atomically, in order.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::records::{
    MessageRecord, QueueEntry, RetainedRecord, SessionRecord, SubscriptionRecord,
};

/// One change to the store. Operations of a batch apply in order; later ones
/// see the effect of earlier ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Insert or replace a session.
    PutSession(SessionRecord),
    /// Delete a session and everything it owns: subscriptions, queue entries
    /// (releasing their message references) and incoming QoS 2 ids.
    DeleteSession {
        client_id: Arc<str>,
    },
    /// Insert or replace a subscription (keyed by client id and filter).
    PutSubscription(SubscriptionRecord),
    DeleteSubscription {
        client_id: Arc<str>,
        filter: String,
    },
    /// Store a message. It starts with no references: unless a queue entry
    /// or retained record references it by the end of the same batch, it is
    /// deleted again (see the crate docs). Putting an id the store holds
    /// changes nothing: a message record never changes once written, so the
    /// store keeps the one it has, and its references.
    PutMessage(MessageRecord),
    /// Insert or replace a queue entry (keyed by client id and seq). A new
    /// entry takes a reference on its message; a replacement that keeps the
    /// message id (a state change) does not touch the count.
    PutQueueEntry(QueueEntry),
    /// Insert a queue entry whose key does not exist yet (a new delivery;
    /// the broker never reuses a session's seq). Applied like
    /// [`PutQueueEntry`](Op::PutQueueEntry); the promise lets the writer net
    /// an insertion and the deletion of the same entry within one window
    /// away entirely (see `netting.rs`).
    InsertQueueEntry(QueueEntry),
    /// Delete a queue entry (acknowledged or expired) and release its
    /// message reference; the message goes with its last reference. Deleting
    /// an absent entry does nothing.
    DeleteQueueEntry {
        client_id: Arc<str>,
        seq: u64,
    },
    /// Remember an incoming QoS 2 packet id until PUBREL.
    AddIncomingQos2 {
        client_id: Arc<str>,
        packet_id: u16,
    },
    RemoveIncomingQos2 {
        client_id: Arc<str>,
        packet_id: u16,
    },
    /// Set the retained message of a topic, taking a reference on it and
    /// releasing the one it replaces.
    PutRetained(RetainedRecord),
    /// Clear the retained message of a topic, releasing its reference.
    DeleteRetained {
        topic: String,
    },
    /// Clear the retained message of a topic only if it is still
    /// `message_id`, releasing its reference: an expired message swept out
    /// of memory must not take with it a newer one whose batch reached the
    /// store first.
    ExpireRetained {
        topic: String,
        message_id: u64,
    },
}

/// How many operations a batch holds without a heap allocation: a QoS 1/2
/// publish to one durable subscriber is two (the message and its queue
/// entry), an acknowledgement one. Batches go from the broker's threads to
/// the writer's, so an allocation here would be freed on another thread
/// than it was made on, the expensive case for most allocators.
pub const INLINE_OPS: usize = 2;

/// Operations applied together: all of them or none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub ops: SmallVec<[Op; INLINE_OPS]>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn push(&mut self, op: Op) -> &mut Self {
        self.ops.push(op);
        self
    }

    /// Appends another batch's operations after this one's.
    pub fn append(&mut self, other: Batch) -> &mut Self {
        self.ops.extend(other.ops);
        self
    }

    pub fn put_session(&mut self, r: SessionRecord) -> &mut Self {
        self.push(Op::PutSession(r))
    }

    pub fn delete_session(&mut self, client_id: impl Into<Arc<str>>) -> &mut Self {
        self.push(Op::DeleteSession {
            client_id: client_id.into(),
        })
    }

    pub fn put_subscription(&mut self, r: SubscriptionRecord) -> &mut Self {
        self.push(Op::PutSubscription(r))
    }

    pub fn delete_subscription(
        &mut self,
        client_id: impl Into<Arc<str>>,
        filter: impl Into<String>,
    ) -> &mut Self {
        self.push(Op::DeleteSubscription {
            client_id: client_id.into(),
            filter: filter.into(),
        })
    }

    pub fn put_message(&mut self, r: MessageRecord) -> &mut Self {
        self.push(Op::PutMessage(r))
    }

    pub fn put_queue_entry(&mut self, r: QueueEntry) -> &mut Self {
        self.push(Op::PutQueueEntry(r))
    }

    pub fn insert_queue_entry(&mut self, r: QueueEntry) -> &mut Self {
        self.push(Op::InsertQueueEntry(r))
    }

    pub fn delete_queue_entry(&mut self, client_id: impl Into<Arc<str>>, seq: u64) -> &mut Self {
        self.push(Op::DeleteQueueEntry {
            client_id: client_id.into(),
            seq,
        })
    }

    pub fn add_incoming_qos2(
        &mut self,
        client_id: impl Into<Arc<str>>,
        packet_id: u16,
    ) -> &mut Self {
        self.push(Op::AddIncomingQos2 {
            client_id: client_id.into(),
            packet_id,
        })
    }

    pub fn remove_incoming_qos2(
        &mut self,
        client_id: impl Into<Arc<str>>,
        packet_id: u16,
    ) -> &mut Self {
        self.push(Op::RemoveIncomingQos2 {
            client_id: client_id.into(),
            packet_id,
        })
    }

    pub fn put_retained(&mut self, r: RetainedRecord) -> &mut Self {
        self.push(Op::PutRetained(r))
    }

    pub fn delete_retained(&mut self, topic: impl Into<String>) -> &mut Self {
        self.push(Op::DeleteRetained {
            topic: topic.into(),
        })
    }
}
