//! What a session queues for its connection: a [`Delivery`] (one PUBLISH
//! to one subscriber: the shared message and this subscriber's QoS, packet
//! id and flags), the [`Outbound`] items a writer drains, and what
//! [`Session::deliver`](super::Session::deliver) answers ([`Admission`]).

use super::*;

/// One PUBLISH to write to a subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub dup: bool,
    pub packet_id: Option<u16>,
    pub subscription_ids: SubscriptionIds,
    /// Set when the message reached this session through a shared
    /// subscription, so it can go to another member if this one leaves.
    /// Boxed: rare, and a delivery sits in a queue slot of every subscriber.
    pub shared: Option<Box<SharedOrigin>>,
    /// The delivery's key in the durable queue of its session; 0 when it is
    /// not stored (QoS 0, or a session that is not durable).
    pub seq: u64,
    /// Set by the outbound queue that took it when it counts the message's
    /// [`MESSAGE_COST`](crate::message::MESSAGE_COST) (see [`queued_cost`]).
    pub(super) carries_message_cost: bool,
}

/// What a delivery counts for in an outbound queue (`Link::charged`): the
/// message's bytes, its subscription identifiers beyond one, the header it
/// needs, its queue slot, and, for the delivery that claimed it, the
/// message itself.
pub(super) fn queued_cost(delivery: &Delivery) -> usize {
    let message = if delivery.carries_message_cost {
        crate::message::MESSAGE_COST
    } else {
        0
    };
    delivery.message.weight()
        + delivery.subscription_ids.heap_bytes()
        + HEADER_ALLOWANCE
        + std::mem::size_of::<Outbound>()
        + message
}

/// [`queued_cost`] for a batch: its messages' weights and headers, its
/// subscription identifiers, its queue slot, and, for the queue that claimed
/// it, the batch's memory.
pub(super) fn queued_batch_cost(delivery: &BatchDelivery) -> usize {
    let batch = if delivery.carries_cost {
        delivery.batch.cost()
    } else {
        0
    };
    delivery.batch.weight()
        + delivery.subscription_ids.heap_bytes()
        + std::mem::size_of::<Outbound>()
        + batch
}

/// What became of a delivery handed to [`Session::deliver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Admission {
    /// Sent, or queued within the session's bounds.
    Taken,
    /// Queued beyond the bound of a connected client's full queue: the
    /// publisher should wait for room ([`Session::wait_for_room`]) before
    /// sending more, so an acknowledged message is not dropped merely
    /// because many publishers outrun one subscriber that keeps up.
    BeyondBound,
    /// Not queued: the session ended, a QoS 0 message for an offline client
    /// or a slow connection, a full queue of an offline or slow client
    /// (counted in the metrics).
    Dropped,
}

/// The shared subscription a delivery came through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedOrigin {
    pub group: Arc<str>,
    pub filter: Arc<str>,
}

impl Delivery {
    /// A first delivery (no packet id yet, DUP clear).
    pub fn new(
        message: &Arc<Message>,
        qos: QoS,
        retain: bool,
        subscription_ids: SubscriptionIds,
    ) -> Delivery {
        Delivery::with_reference(Arc::clone(message), qos, retain, subscription_ids)
    }

    /// [`new`](Self::new) with a reference to the message already made.
    pub fn with_reference(
        message: Arc<Message>,
        qos: QoS,
        retain: bool,
        subscription_ids: SubscriptionIds,
    ) -> Delivery {
        Delivery {
            message,
            qos,
            retain,
            dup: false,
            packet_id: None,
            subscription_ids,
            shared: None,
            seq: 0,
            carries_message_cost: false,
        }
    }
}

/// An item in a connection's outbound queue. The frequent items are small
/// and inline; rare, large packets are boxed so they do not make every queue
/// slot larger.
#[derive(Debug)]
pub enum Outbound {
    /// A PUBLISH (the payload is written from the shared message).
    Publish(Delivery),
    /// A PUBLISH of each message of a batch (message_batch.rs).
    Batch(BatchDelivery),
    /// PUBACK, PUBREC, PUBREL or PUBCOMP without properties.
    Ack(AckKind, u16, ReasonCode),
    /// PINGRESP.
    PingResp,
    /// Any other packet (CONNACK, SUBACK, UNSUBACK, DISCONNECT ...).
    Control(Box<Packet>),
}

/// Which acknowledgement an [`Outbound::Ack`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    PubAck,
    PubRec,
    PubRel,
    PubComp,
}

impl Outbound {
    /// What a PUBLISH or a batch counts for in its queue (see
    /// [`queued_cost`]); `None` for the other items.
    pub(super) fn publish_cost(&self) -> Option<usize> {
        match self {
            Outbound::Publish(d) => Some(queued_cost(d)),
            Outbound::Batch(b) => Some(queued_batch_cost(b)),
            _ => None,
        }
    }

    /// The queue item for a packet, using the compact forms where they fit.
    pub fn from_packet(packet: Packet) -> Outbound {
        let ack = |kind, a: &PubAck| {
            if a.properties == Default::default() {
                Some(Outbound::Ack(kind, a.packet_id, a.code))
            } else {
                None
            }
        };
        let compact = match &packet {
            Packet::PubAck(a) => ack(AckKind::PubAck, a),
            Packet::PubRec(a) => ack(AckKind::PubRec, a),
            Packet::PubRel(a) => ack(AckKind::PubRel, a),
            Packet::PubComp(a) => ack(AckKind::PubComp, a),
            Packet::PingResp => Some(Outbound::PingResp),
            _ => None,
        };
        compact.unwrap_or_else(|| Outbound::Control(Box::new(packet)))
    }
}
