//! The application message as the broker holds it between a publisher and its
//! subscribers.
//!
//! One [`Message`] is built per incoming PUBLISH and shared (`Arc`) by every
//! delivery: topic and payload are the `Bytes` slices the codec cut from the
//! publisher's read buffer, so fan-out never copies them. What differs per
//! subscriber (QoS, packet id, DUP, RETAIN, subscription identifiers) lives in
//! the delivery, not here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_codec::properties::PublishProperties;
use tern_codec::QoS;

/// An application message in flight through the broker.
#[derive(Debug)]
pub struct Message {
    /// Valid UTF-8 topic name (aliases already resolved).
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: QoS,
    /// The RETAIN flag as published.
    pub retain: bool,
    /// MQTT 5 properties forwarded to subscribers (topic alias and
    /// subscription identifiers removed; they are per hop); `None` when
    /// there are none, as for most messages: boxed, they cost a pointer
    /// instead of 160 bytes per message (see [`properties`](Self::properties)).
    properties: Option<Box<PublishProperties>>,
    /// When the Message Expiry Interval runs out, if one was set.
    pub expires_at: Option<Instant>,
    /// The session that published it (for No Local); 0 for wills published
    /// after their session ended and other broker-made messages.
    pub origin: u64,
    /// What its deliveries share of their encoding. Boxed, and made with
    /// the first delivery that needs any: a message with one subscriber (a
    /// fan-in's, a pair's) or sent in a batch's frames never has one, and
    /// inline the slots were half of every message.
    encoded: OnceLock<Box<SharedEncoding>>,
    /// The message's id in the durable store, once a durable session queued
    /// it or it was retained (see `persistence::Journal::reference`).
    pub store_id: OnceLock<u64>,
    /// The copy that owns its bytes, made by the first offline session that
    /// queues the message and shared by the others (see
    /// [`detached`](Message::detached)).
    detached: OnceLock<Arc<Message>>,
    /// What the message weighs against queue bounds and the outbound
    /// budget (see [`weight`](Message::weight)).
    weight: usize,
    /// Set once a delivery carries [`MESSAGE_COST`] (see
    /// [`claim_cost`](Message::claim_cost)).
    cost_claimed: AtomicBool,
    /// Set once the retained store no longer holds this message as its
    /// topic's retained message (replaced or cleared; see
    /// [`supersede`](Message::supersede)).
    superseded: AtomicBool,
    /// Topic, payload and properties are allocations of their own (a copy,
    /// or read back from the store), not slices of a read buffer: there is
    /// nothing to detach.
    owns_bytes: bool,
}

/// What a message costs in memory beside its bytes: the shared `Message`
/// and its `Arc` counts. An outbound queue counts it with the first
/// delivery of the message it takes ([`Message::claim_cost`]): a message
/// sent to one subscriber (a device's own topic) costs several times its
/// bytes, and counting only the bytes would let a queue of small messages
/// hold five times its bound; a message sent to many is counted once, not
/// once per subscriber.
pub const MESSAGE_COST: usize = std::mem::size_of::<Message>() + 2 * std::mem::size_of::<usize>();

// Every message that waits in a queue costs this much beside its bytes (456
// before the properties were boxed, 320 before the shared headers were);
// docs/configuration.md quotes it for `max_client_outbound_bytes`. A field
// that grows `Message` must come out of somewhere else, or the docs change
// with it.
const _: () = assert!(MESSAGE_COST <= 176);

/// Bytes a message's properties weigh in queues: their contents, plus what
/// each user property costs in memory beyond its bytes (its entry in the
/// list). A PUBLISH of a million tiny user properties weighs what it holds,
/// not the 4 bytes of its topic and payload.
fn properties_weight(p: &PublishProperties) -> usize {
    let len = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len);
    len(&p.response_topic)
        + len(&p.correlation_data)
        + len(&p.content_type)
        + p.user_properties
            .iter()
            .map(|(k, v)| k.len() + v.len() + std::mem::size_of::<(Bytes, Bytes)>())
            .sum::<usize>()
}

/// What the deliveries of one message share of their encoding: each part
/// encoded by the first delivery that needs it, then copied per delivery.
#[derive(Debug, Default)]
struct SharedEncoding {
    /// Whole PUBLISH headers, indexed by [`header_slot`], for deliveries
    /// of the message's own properties: only the flags, the packet id and
    /// an MQTT 5 message's remaining expiry are patched per delivery.
    headers: [OnceLock<Bytes>; 4],
    /// The message's properties as MQTT 5 deliveries with properties of
    /// their own (a Subscription Identifier, a topic alias) forward them (see [`tern_codec::forward`]); `None` if
    /// they cannot be encoded.
    forwarded_properties: OnceLock<Option<Bytes>>,
}

/// The slot of a cached header: MQTT 5 or 3.x, with or without a packet id.
fn header_slot(v5: bool, with_packet_id: bool) -> usize {
    usize::from(v5) * 2 + usize::from(with_packet_id)
}

impl Message {
    /// Builds a message, stamping the expiry deadline from the properties
    /// (`None`: it has none, as a decoded [`Publish`](tern_codec::Publish)
    /// without any carries them).
    pub fn new(
        topic: Bytes,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: Option<Box<PublishProperties>>,
        origin: u64,
    ) -> Arc<Message> {
        Arc::new(Message::unshared(
            topic, payload, qos, retain, properties, origin,
        ))
    }

    /// A message read back from the durable store after a restart: its
    /// expiry deadline is the stored one, not recomputed from the interval.
    pub fn restored(
        topic: Bytes,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: Option<Box<PublishProperties>>,
        expires_at: Option<Instant>,
        store_id: u64,
    ) -> Arc<Message> {
        let mut message = Message::unshared(topic, payload, qos, retain, properties, 0);
        message.expires_at = expires_at;
        message.store_id = OnceLock::from(store_id);
        message.owns_bytes = true;
        Arc::new(message)
    }

    /// A copy whose bytes are its own. A decoded message's topic, payload
    /// and properties are slices of the buffer it was read into, which is
    /// right while it is delivered; a message kept for long (a retained one)
    /// must not keep that whole buffer (kilobytes) alive for a few bytes.
    pub fn compacted(&self) -> Arc<Message> {
        Arc::new(Message {
            topic: Bytes::copy_from_slice(&self.topic),
            payload: Bytes::copy_from_slice(&self.payload),
            qos: self.qos,
            retain: self.retain,
            properties: self.properties.as_deref().map(|p| Box::new(p.owned_copy())),
            expires_at: self.expires_at,
            origin: self.origin,
            encoded: OnceLock::new(),
            store_id: self.store_id.clone(),
            detached: OnceLock::new(),
            weight: self.weight,
            cost_claimed: AtomicBool::new(false),
            superseded: AtomicBool::new(false),
            owns_bytes: true,
        })
    }

    /// The message for a queue that may wait long (an offline session's, or
    /// one its client stopped taking from: stall.rs): a compacted copy,
    /// made once and shared by every such queue, so that queued deliveries
    /// never keep the read buffers their messages came in alive (a trickle
    /// of one message per read would otherwise pin a whole pooled buffer
    /// per queued message). A message that owns its bytes already is its
    /// own. The copy keeps the store id the message had when it was made:
    /// give the message its id first (`Persistence::store_id`), so that the
    /// copy and the message are one stored record.
    pub fn detached(self: &Arc<Self>) -> Arc<Message> {
        if self.owns_bytes {
            return Arc::clone(self);
        }
        Arc::clone(self.detached.get_or_init(|| self.compacted()))
    }

    fn unshared(
        topic: Bytes,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        mut properties: Option<Box<PublishProperties>>,
        origin: u64,
    ) -> Message {
        if let Some(p) = properties.as_deref_mut() {
            p.topic_alias = None;
            p.subscription_identifiers.clear();
        }
        let properties = properties.filter(|p| !p.is_empty());
        let (expires_at, properties_weight) = match properties.as_deref() {
            Some(p) => (
                p.message_expiry_interval
                    .map(|secs| Instant::now() + Duration::from_secs(u64::from(secs))),
                properties_weight(p),
            ),
            None => (None, 0),
        };
        let weight = topic.len() + payload.len() + properties_weight;
        Message {
            topic,
            payload,
            qos,
            retain,
            properties,
            expires_at,
            origin,
            encoded: OnceLock::new(),
            store_id: OnceLock::new(),
            detached: OnceLock::new(),
            weight,
            cost_claimed: AtomicBool::new(false),
            superseded: AtomicBool::new(false),
            owns_bytes: false,
        }
    }

    /// True for the first caller only: the delivery that will carry
    /// [`MESSAGE_COST`] in its queue. A load first, so that a fan-out's
    /// other deliveries do not each write the shared cache line.
    pub fn claim_cost(&self) -> bool {
        !self.cost_claimed.load(Ordering::Relaxed)
            && !self.cost_claimed.swap(true, Ordering::Relaxed)
    }

    /// Marks a retained message that its topic's retained store no longer
    /// holds: a newer publish replaced or cleared it. That publish went to
    /// every subscription live when it was retained, so a SUBSCRIBE's copy
    /// of the older one that has not reached its session's queues yet must
    /// not follow it there (MQTT-4.6.0-5: a subscriber would end with the
    /// older value). Called before the newer message is routed.
    pub fn supersede(&self) {
        self.superseded.store(true, Ordering::Release);
    }

    /// Whether [`supersede`](Self::supersede) was called. Asked under the
    /// subscriber's session lock, which the newer message's delivery takes
    /// after the mark: it sees the mark, or its delivery comes later.
    pub fn is_superseded(&self) -> bool {
        self.superseded.load(Ordering::Acquire)
    }

    /// The MQTT 5 properties forwarded to subscribers (empty for most).
    pub fn properties(&self) -> &PublishProperties {
        static NONE: PublishProperties = PublishProperties::NONE;
        self.properties.as_deref().unwrap_or(&NONE)
    }

    /// Bytes the message counts for in a session's queue
    /// (`max_queued_bytes`), a connection's outbound queue and the broker's
    /// outbound budget: topic, payload and properties.
    pub fn weight(&self) -> usize {
        self.weight
    }

    /// The PUBLISH header (everything but the payload) for deliveries of this
    /// shape, encoding it with `encode` the first time. Deliveries patch the
    /// first byte (DUP, QoS, RETAIN), the packet id and, in MQTT 5, the
    /// remaining expiry of a message that has one (whether it has one never
    /// changes, so every header of a slot ends alike). `None` if encoding
    /// failed.
    pub fn shared_header(
        &self,
        v5: bool,
        with_packet_id: bool,
        encode: impl FnOnce() -> Option<Bytes>,
    ) -> Option<&Bytes> {
        let encoded = self.encoded.get_or_init(Default::default);
        let header = encoded.headers[header_slot(v5, with_packet_id)]
            .get_or_init(|| encode().unwrap_or_default());
        (!header.is_empty()).then_some(header)
    }

    /// The message's properties as a forwarded MQTT 5 PUBLISH carries them
    /// beside a delivery's own (see [`tern_codec::forward`]): encoded by the
    /// first delivery that asks, shared by the others. `None` if they cannot
    /// be encoded.
    pub fn forwarded_properties(&self) -> Option<&Bytes> {
        let encoded = self.encoded.get_or_init(Default::default);
        encoded
            .forwarded_properties
            .get_or_init(|| {
                tern_codec::forward::encode_forwarded_properties(self.properties()).ok()
            })
            .as_ref()
    }

    /// The topic as text (checked UTF-8 by the codec).
    pub fn topic_str(&self) -> &str {
        std::str::from_utf8(&self.topic).unwrap_or("")
    }

    /// True once the Message Expiry Interval has passed.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    /// True for a Message Expiry Interval of 0: a lifetime that ends on
    /// arrival. The message reaches the subscribers whose onward delivery
    /// starts at once (a connected client, handed the copy as it is routed,
    /// with room in its window for QoS 1 and 2) and waits for nobody (not
    /// queued, not retained); it is forwarded with an interval of 0.
    pub fn expires_on_arrival(&self) -> bool {
        self.properties
            .as_ref()
            .is_some_and(|p| p.message_expiry_interval == Some(0))
    }

    /// The Message Expiry Interval to send now: the original interval less the
    /// time the message has waited in the broker (MQTT-3.3.2-6), at least 1
    /// unless it was 0.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        if self.expires_on_arrival() {
            return Some(0);
        }
        self.expires_at.map(|at| {
            let left = at.saturating_duration_since(now).as_secs_f64().ceil();
            (left as u32).max(1)
        })
    }
}

/// References to one shared value (a message, or a batch of messages)
/// counted in advance, one per delivery a fan-out is about to make, and
/// handed out one by one ([`take`](Self::take)).
///
/// Every delivery owns an `Arc<Message>` (or an `Arc<MessageBatch>`), so a
/// message fanned out to 1,000 subscribers has its reference count raised
/// 1,000 times. Staged deliveries (`Broker::deliver_staged`) go subscriber
/// by subscriber, so those raises were spread over the whole fan-out, while
/// the writers of subscribers already served were dropping their references
/// on other cores: every raise then fetched the count's cache line from
/// another core. Raised here in one run, the line stays on the publisher's
/// core while it does (1 -> 1000 fan-out on 2 cores: 10% more deliveries
/// per broker CPU-second).
///
/// Invariant: `shared` came from [`Arc::into_raw`], and this value owns
/// exactly `left` of its strong references; it hands each one to an `Arc`
/// in `take`, and gives back those it still owns when dropped.
pub struct ReservedReferences<T> {
    shared: *const T,
    left: usize,
}

impl<T> ReservedReferences<T> {
    /// `count` references to `shared`.
    pub fn new(shared: &Arc<T>, count: usize) -> ReservedReferences<T> {
        let raw = Arc::into_raw(Arc::clone(shared));
        for _ in 1..count {
            // SAFETY: `raw` came from `Arc::into_raw`, and the reference it
            // was made with is still owned here, so the count is at least 1.
            unsafe { Arc::increment_strong_count(raw) };
        }
        let reserved = ReservedReferences {
            shared: raw,
            left: count,
        };
        if count == 0 {
            // The reference `raw` was made with is not one of the `count`.
            // SAFETY: it is owned here and handed to no one else.
            drop(unsafe { Arc::from_raw(raw) });
        }
        reserved
    }

    /// One of the references, as an `Arc`; `None` once all were taken.
    pub fn take(&mut self) -> Option<Arc<T>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // SAFETY: one of the references this value owned (the invariant),
        // now owned by the returned `Arc` alone.
        Some(unsafe { Arc::from_raw(self.shared) })
    }
}

impl<T> Drop for ReservedReferences<T> {
    fn drop(&mut self) {
        while self.take().is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message decoded from `read_buffer`: topic, payload and properties
    /// are slices of it, and it has store id 42.
    fn decoded(read_buffer: &Bytes) -> Arc<Message> {
        let properties = PublishProperties {
            correlation_data: Some(read_buffer.slice(20..24)),
            user_properties: vec![(read_buffer.slice(24..25), read_buffer.slice(25..26))],
            ..PublishProperties::default()
        };
        let message = Message::new(
            read_buffer.slice(0..10),
            read_buffer.slice(10..20),
            QoS::AtLeastOnce,
            true,
            Some(Box::new(properties)),
            7,
        );
        message.store_id.set(42).unwrap();
        message
    }

    #[test]
    fn a_compacted_message_owns_its_bytes_and_keeps_its_store_id() {
        let read_buffer = Bytes::from(vec![b'a'; 4096]);
        let message = decoded(&read_buffer);
        let copy = message.compacted();
        assert_eq!(copy.topic, message.topic);
        assert_eq!(copy.payload, message.payload);
        assert_eq!(copy.properties(), message.properties());
        assert_eq!(
            (copy.qos, copy.retain, copy.origin),
            (QoS::AtLeastOnce, true, 7)
        );
        assert_eq!(copy.store_id.get(), Some(&42));
        let range = read_buffer.as_ptr_range();
        let outside = |b: &Bytes| !range.contains(&b.as_ptr());
        assert!(outside(&copy.topic) && outside(&copy.payload));
        assert!(outside(
            copy.properties().correlation_data.as_ref().unwrap()
        ));
        let (k, v) = &copy.properties().user_properties[0];
        assert!(outside(k) && outside(v));
    }

    #[test]
    fn the_detached_copy_is_made_once_and_shared() {
        let read_buffer = Bytes::from(vec![b'a'; 4096]);
        let message = decoded(&read_buffer);
        let first = message.detached();
        let second = message.detached();
        assert!(Arc::ptr_eq(&first, &second), "one copy for every queue");
        assert_eq!(first.store_id.get(), Some(&42), "one stored record");
        assert_eq!(first.payload, message.payload);
        assert!(!read_buffer.as_ptr_range().contains(&first.payload.as_ptr()));
        drop(message);
        assert_eq!(Arc::strong_count(&first), 2, "outlives the original");
    }

    #[test]
    fn a_message_that_owns_its_bytes_is_not_copied_again() {
        let read_buffer = Bytes::from(vec![b'a'; 4096]);
        let copy = decoded(&read_buffer).detached();
        assert!(Arc::ptr_eq(&copy.detached(), &copy));
        let restored = Message::restored(
            Bytes::from_static(b"t"),
            Bytes::from_static(b"p"),
            QoS::AtLeastOnce,
            false,
            None,
            None,
            9,
        );
        assert!(Arc::ptr_eq(&restored.detached(), &restored));
    }

    #[test]
    fn reserved_references_are_handed_out_once_each_and_the_rest_released() {
        let message = Message::new(
            Bytes::from_static(b"t"),
            Bytes::from_static(b"p"),
            QoS::AtMostOnce,
            false,
            None,
            0,
        );
        let mut reserved = ReservedReferences::new(&message, 3);
        assert_eq!(Arc::strong_count(&message), 4);
        let taken = [reserved.take().unwrap(), reserved.take().unwrap()];
        assert!(taken.iter().all(|t| Arc::ptr_eq(t, &message)));
        assert_eq!(Arc::strong_count(&message), 4);
        drop(reserved);
        assert_eq!(Arc::strong_count(&message), 3);
        drop(taken);
        assert_eq!(Arc::strong_count(&message), 1);

        let mut none = ReservedReferences::new(&message, 0);
        assert!(none.take().is_none());
        drop(none);
        let mut all = ReservedReferences::new(&message, 2);
        let (a, b) = (all.take().unwrap(), all.take().unwrap());
        assert!(all.take().is_none());
        drop(all);
        assert_eq!(Arc::strong_count(&message), 3);
        drop((a, b));
        assert_eq!(Arc::strong_count(&message), 1);
    }
}
