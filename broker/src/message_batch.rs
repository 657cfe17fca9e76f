//! QoS 0 messages that one read of a publisher sent to the same
//! subscribers, queued for each subscriber as a single entry.
//!
//! A publisher's read of small messages to one topic brings dozens of them
//! at once (`broker::StagedFanout`). Queued one by one, each of them costs
//! every subscriber a queue slot, a reference to the message taken on the
//! publisher's core and given back on the subscriber's writer's, and the
//! admission checks. Fanned out to a hundred subscribers, those reference
//! counts and slots were half of the broker's time. A [`MessageBatch`]
//! holds the read's messages once; each subscriber's queue takes one
//! [`BatchDelivery`]: one reference, one slot, one admission for all of
//! them. The writer encodes the messages one by one, as it would have.
//!
//! The batch also keeps its messages' PUBLISH packets, encoded once per
//! shape ([`frames`](MessageBatch::frames): protocol, and whether RETAIN is
//! kept) by the first writer that needs them: every other subscriber's
//! writer then sends the same bytes, one I/O vector for the whole batch,
//! copying and encoding nothing.
//!
//! Everything that differs between the deliveries of one subscriber is
//! decided once per batch, which is sound because the messages share all
//! the inputs of that decision: they have one topic (so one set of
//! matching subscriptions and the same ACL verdict), one publisher (No
//! Local) and QoS 0. Only the RETAIN flag is the message's own; the
//! delivery keeps whether the subscriber wants it as published.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::budget::HEADER_ALLOWANCE;
use crate::message::{Message, MESSAGE_COST};
use crate::subscription_ids::SubscriptionIds;

/// The messages of one read to the same subscribers, shared by every
/// subscriber's queue.
#[derive(Debug)]
pub struct MessageBatch {
    messages: Box<[Arc<Message>]>,
    /// What the batch weighs in a queue beside its memory: each message's
    /// weight and the header it needs.
    weight: usize,
    /// Set once a queue counts the batch's memory (see
    /// [`claim_cost`](Self::claim_cost)).
    cost_claimed: AtomicBool,
    /// The largest payload of its messages.
    largest_payload: usize,
    /// Whether any message has a RETAIN flag, a Message Expiry Interval.
    any_retained: bool,
    any_expiry: bool,
    /// The encoded packets, by [`frames_slot`]: made by the first writer
    /// that sends the batch in that shape, then shared. Not counted on
    /// their own: a writer makes them only for a batch that other queues
    /// hold too, and each of those counts the messages' bytes, which the
    /// buffer holds once, so a shape's frames (those bytes and their
    /// headers) are within what is counted.
    frames: [OnceLock<Frames>; 4],
}

/// A batch's PUBLISH packets, one after the other, as written to a
/// subscriber.
#[derive(Debug, Default)]
pub struct Frames {
    pub bytes: Bytes,
    /// The size of the largest packet (for a client's Maximum Packet Size).
    pub largest: usize,
}

/// Where the frames of a shape are kept in [`MessageBatch::frames`].
fn frames_slot(v5: bool, retain: bool) -> usize {
    usize::from(v5) * 2 + usize::from(retain)
}

impl MessageBatch {
    /// A batch of `messages`, all QoS 0 to one topic (see the module's
    /// documentation).
    pub fn new(messages: Box<[Arc<Message>]>) -> Arc<MessageBatch> {
        debug_assert!(messages.windows(2).all(|m| m[0].topic == m[1].topic));
        let weight = messages.iter().map(|m| m.weight() + HEADER_ALLOWANCE).sum();
        let largest_payload = messages.iter().map(|m| m.payload.len()).max();
        Arc::new(MessageBatch {
            weight,
            cost_claimed: AtomicBool::new(false),
            largest_payload: largest_payload.unwrap_or(0),
            any_retained: messages.iter().any(|m| m.retain),
            any_expiry: messages.iter().any(|m| m.expires_at.is_some()),
            frames: Default::default(),
            messages,
        })
    }

    /// The largest payload of its messages.
    pub fn largest_payload(&self) -> usize {
        self.largest_payload
    }

    /// Whether any of its messages has a Message Expiry Interval (whose
    /// remaining time each delivery states: no shared frames then).
    pub fn any_expiry(&self) -> bool {
        self.any_expiry
    }

    /// Whether its messages are sent with their RETAIN flags to `delivery`'s
    /// subscriber: the shape of the frames it takes.
    pub fn keeps_retain(&self, delivery: &BatchDelivery) -> bool {
        delivery.retain_as_published && self.any_retained
    }

    /// The batch's packets for MQTT 5 (`v5`) or 3.x clients, with RETAIN
    /// flags kept (`retain`) or cleared, encoding them with `encode` the
    /// first time. `None` if encoding failed.
    pub fn frames(
        &self,
        v5: bool,
        retain: bool,
        encode: impl FnOnce() -> Option<Frames>,
    ) -> Option<&Frames> {
        let frames =
            self.frames[frames_slot(v5, retain)].get_or_init(|| encode().unwrap_or_default());
        (!frames.bytes.is_empty()).then_some(frames)
    }

    /// The messages, in the order they were published.
    pub fn messages(&self) -> &[Arc<Message>] {
        &self.messages
    }

    /// How many messages the batch holds.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// True for a batch of no message.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// What the batch counts for in every queue that holds it: the
    /// messages' weights and their headers.
    pub fn weight(&self) -> usize {
        self.weight
    }

    /// What the batch costs in memory beside its messages' bytes: the
    /// shared messages, their references here and the batch itself. Counted
    /// by one queue only, as [`MESSAGE_COST`] is for a single message. The
    /// same for a batch and its [`copied`](Self::copied) one: a queue gives
    /// back what it charged.
    pub fn cost(&self) -> usize {
        std::mem::size_of::<MessageBatch>()
            + 2 * std::mem::size_of::<usize>()
            + self.messages.len() * (std::mem::size_of::<Arc<Message>>() + MESSAGE_COST)
    }

    /// True for the first caller only: the queue that will count
    /// [`cost`](Self::cost). A load first, so that the other subscribers
    /// do not each write the shared cache line.
    pub fn claim_cost(&self) -> bool {
        !self.cost_claimed.load(Ordering::Relaxed)
            && !self.cost_claimed.swap(true, Ordering::Relaxed)
    }

    /// A batch of `copy` applied to each message: for one subscriber whose
    /// queue stalled, the copies that own their bytes (stall.rs).
    pub fn copied(&self, copy: impl FnMut(&Arc<Message>) -> Arc<Message>) -> Arc<MessageBatch> {
        MessageBatch::new(self.messages.iter().map(copy).collect())
    }
}

/// A [`MessageBatch`] queued for one subscriber: what the subscriber's
/// deliveries of its messages have in common.
#[derive(Debug, Clone)]
pub struct BatchDelivery {
    pub batch: Arc<MessageBatch>,
    /// Each message keeps its RETAIN flag (a subscription asked for
    /// Retain As Published), or none does.
    pub retain_as_published: bool,
    pub subscription_ids: SubscriptionIds,
    /// Set by the queue that took it when it counts the batch's
    /// [`cost`](MessageBatch::cost).
    pub(crate) carries_cost: bool,
}

impl BatchDelivery {
    /// A delivery of `batch` with these options.
    pub fn new(
        batch: Arc<MessageBatch>,
        retain_as_published: bool,
        subscription_ids: SubscriptionIds,
    ) -> BatchDelivery {
        BatchDelivery {
            batch,
            retain_as_published,
            subscription_ids,
            carries_cost: false,
        }
    }

    /// The RETAIN flag `message` (one of the batch's) is sent with.
    pub fn retain(&self, message: &Message) -> bool {
        self.retain_as_published && message.retain
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tern_codec::QoS;

    fn message(payload: &'static [u8], retain: bool) -> Arc<Message> {
        Message::new(
            Bytes::from_static(b"t"),
            Bytes::from_static(payload),
            QoS::AtMostOnce,
            retain,
            Default::default(),
            0,
        )
    }

    #[test]
    fn a_batch_weighs_its_messages_and_its_cost_is_claimed_once() {
        let messages = vec![message(b"abc", false), message(b"defgh", true)];
        let weights: usize = messages.iter().map(|m| m.weight()).sum();
        let batch = MessageBatch::new(messages.into());
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.weight(), weights + 2 * HEADER_ALLOWANCE);
        assert!(batch.cost() >= 2 * MESSAGE_COST);
        assert!(batch.claim_cost());
        assert!(!batch.claim_cost());

        let plain = BatchDelivery::new(Arc::clone(&batch), false, SubscriptionIds::new());
        let as_published = BatchDelivery::new(Arc::clone(&batch), true, SubscriptionIds::new());
        let flags = |d: &BatchDelivery| -> Vec<bool> {
            batch.messages().iter().map(|m| d.retain(m)).collect()
        };
        assert_eq!(flags(&plain), [false, false]);
        assert_eq!(flags(&as_published), [false, true]);
    }
}
