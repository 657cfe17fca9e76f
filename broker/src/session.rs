//! A session: the state the MQTT specification says outlives a network
//! connection, and the queue of what the broker still has to send.
//!
//! A [`Session`] is created by the [`SessionRegistry`](crate::registry) when a
//! client connects with a client identifier it does not know (or with clean
//! start), and lives until its expiry interval runs out after the last
//! connection closed. While a connection is attached, it owns a [`Link`]:
//! the outbound queue its writer drains.
//!
//! # Flows
//!
//! - Outgoing QoS 0 goes straight to the outbound queue (not queued for an
//!   offline client).
//! - Outgoing QoS 1/2 takes a packet identifier and a place in the in-flight
//!   window (`inflight.rs`; the smaller of our `max_inflight` and the
//!   client's Receive Maximum); when the window is full or the client is
//!   offline it waits in `pending`, in order, bounded by
//!   `max_queued_messages` and `max_queued_bytes` (`Message::weight`).
//!   Acknowledgements free the window and pull the next pending message.
//! - A delivery that finds its bound reached (`pending` for QoS 1/2, the
//!   outbound queue's `max_client_outbound_bytes` for QoS 0) is taken anyway
//!   while the client is connected and outpaced, not slow (overflow.rs:
//!   full for less than `queue_full_wait`, and still taking something);
//!   [`deliver`](Session::deliver) then answers [`Admission::BeyondBound`]
//!   and the publisher's reader waits in
//!   [`wait_for_room`](Session::wait_for_room) until the queues have drained
//!   to half. Otherwise (offline, or slow) it is dropped and counted.
//! - On reconnect with the session resumed, every unacknowledged PUBLISH is
//!   sent again with DUP set and every PUBREL is sent again, before anything new.
//! - Incoming QoS 2 packet identifiers are remembered until PUBREL, so a
//!   retransmitted PUBLISH is acknowledged but not routed twice.
//!
//! # Durable sessions
//!
//! When the broker has a store and the session's expiry interval is not 0,
//! the session is *durable*: every change above is also written to the
//! [`Journal`] of the action that caused it (see `persistence.rs`). Each
//! QoS 1/2 delivery then has a `seq`, its key in the stored queue. Two rules
//! keep a crash from duplicating a QoS 2 message: a QoS 2 PUBLISH goes on
//! the wire only once its packet id is durable (state `Persisting` until
//! then), and a PUBREL only once the PUBREC that precedes it is (state
//! `Releasing`). When the store refuses such a state (a full disk), the
//! PUBLISH or PUBREL waits: the session is put on [`StoreRetries`], and
//! the state is written again every [`STORE_RETRY`] until it is stored.
//!
//! # Locking
//!
//! One `parking_lot::Mutex` per session guards all of its state. It is held
//! only for short, non-blocking bookkeeping: never across an `.await`, never
//! while taking the registry or router locks (lock order: registry, then
//! router or session; a session lock is always the innermost).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use smallvec::SmallVec;
use tern_codec::{Packet, ProtocolVersion, PubAck, QoS, ReasonCode, Will};
use tern_storage::{DeliveryState, Op, QueueEntry, SessionRecord, SharedGroupRecord, StoreError};
use tokio::sync::Notify;

use crate::acl::DeniedTopics;
use crate::auth_rules::Login;
use crate::budget::{OutboundBudget, HEADER_ALLOWANCE};
use crate::clock::CoarseClock;
use crate::incoming_qos2::{IncomingQos2, Opened};
use crate::inflight::{Inflight, InflightState, InflightWindow};
use crate::message::Message;
use crate::message_batch::BatchDelivery;
use crate::metrics::Metrics;
use crate::overflow::Overflow;
use crate::persistence::{unix_secs, will_record, Journal, Persistence};
use crate::signal::Signal;
use crate::stall::{StallWatch, Waiting};

pub use crate::subscription_ids::SubscriptionIds;

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
    carries_message_cost: bool,
}

/// What a delivery counts for in an outbound queue (`Link::charged`): the
/// message's bytes, its subscription identifiers beyond one, the header it
/// needs, its queue slot, and, for the delivery that claimed it, the
/// message itself.
fn queued_cost(delivery: &Delivery) -> usize {
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
fn queued_batch_cost(delivery: &BatchDelivery) -> usize {
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
    fn publish_cost(&self) -> Option<usize> {
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

/// A client sent more QoS 2 messages awaiting PUBREL than Receive Maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("receive maximum exceeded")]
pub struct ReceiveMaximumExceeded;

/// Signals shared by a connection's reader, its writer and whoever needs to
/// close it (a takeover, shutdown).
#[derive(Debug, Default)]
pub struct ConnectionControl {
    /// Woken when the outbound queue has something new.
    pub wake_writer: Signal,
    /// Woken when the connection must close.
    pub wake_reader: Signal,
    /// Woken each time the writer takes the queue.
    pub drained: Signal,
    /// Set once the connection is closing; the reason goes in the final
    /// DISCONNECT for MQTT 5 clients.
    closing: AtomicBool,
    close_reason: Mutex<Option<ReasonCode>>,
    /// Set with `closing` when the client is sent nothing more but its
    /// DISCONNECT (see [`close_withholding`](Self::close_withholding)).
    withholding: AtomicBool,
    /// Set once the reader has stopped: everything it received has been
    /// handled (a takeover waits for this, see `SessionRegistry::take_over`).
    reader_finished: AtomicBool,
    /// When a read last decoded a packet, on the keep alive clock (see
    /// keep_alive.rs).
    last_packet_ms: AtomicU64,
    /// The reader holds an incomplete packet (see keep_alive.rs).
    incomplete: AtomicBool,
    /// Acknowledgements the reader has decided that wait for the store
    /// (`Connection::acknowledge_then`). A closing writer waits for them
    /// (within the close grace): a PUBACK or PUBCOMP whose effect is
    /// durable must reach the client, or after a restart it is told 0x92
    /// for a flow the broker completed.
    acks_awaiting_store: AtomicUsize,
}

impl ConnectionControl {
    /// An acknowledgement now waits for the store.
    pub fn ack_awaits_store(&self) {
        self.acks_awaiting_store.fetch_add(1, Ordering::AcqRel);
    }

    /// An acknowledgement that waited for the store was queued (or its
    /// refusal was): after the last, a closing writer may finish.
    pub fn ack_released(&self) {
        if self.acks_awaiting_store.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wake_writer.raise();
        }
    }

    /// Acknowledgements waiting for the store now.
    pub fn acks_awaiting_store(&self) -> usize {
        self.acks_awaiting_store.load(Ordering::Acquire)
    }

    /// Asks the connection to close; the first reason given wins.
    pub fn close(&self, reason: Option<ReasonCode>) {
        {
            let mut r = self.close_reason.lock();
            if !self.closing.swap(true, Ordering::AcqRel) {
                *r = reason;
            }
        }
        self.wake_reader.raise();
        self.wake_writer.raise();
    }

    /// Closes the connection of a client whose credentials are no longer
    /// accepted: its writer stops taking what is queued for it and sends
    /// only the DISCONNECT (MQTT 5). What was queued stays with the session
    /// (QoS 1 and 2 go out again if its user resumes it; QoS 0 is dropped
    /// with the connection). A batch the writer is in the middle of writing
    /// is finished. Takes effect whatever reason a close gave before.
    pub fn close_withholding(&self, reason: ReasonCode) {
        self.withholding.store(true, Ordering::Release);
        self.close(Some(reason));
    }

    /// True once [`close_withholding`](Self::close_withholding) was called.
    pub fn is_withholding(&self) -> bool {
        self.withholding.load(Ordering::Acquire)
    }

    /// True once [`close`](Self::close) was called.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// The reason given to [`close`](Self::close).
    pub fn close_reason(&self) -> Option<ReasonCode> {
        *self.close_reason.lock()
    }

    /// Stamps the arrival of a packet (keep alive).
    pub fn packet_received(&self, now_ms: u64) {
        self.last_packet_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Records whether what the reader has read ends in an incomplete
    /// packet. A stretch of incomplete reads is timed from its start at the
    /// latest, not from a packet the client sent long before.
    pub fn set_incomplete(&self, incomplete: bool, now_ms: u64) {
        if incomplete {
            self.packet_received(now_ms);
        }
        self.incomplete.store(incomplete, Ordering::Relaxed);
    }

    /// See [`set_incomplete`](Self::set_incomplete).
    pub fn is_incomplete(&self) -> bool {
        self.incomplete.load(Ordering::Relaxed)
    }

    /// The last stamp of [`packet_received`](Self::packet_received).
    pub fn last_packet_ms(&self) -> u64 {
        self.last_packet_ms.load(Ordering::Relaxed)
    }

    /// Records that the reader has stopped (see `SessionRegistry::reader_finished`,
    /// which also wakes whoever waits for it).
    pub fn mark_reader_finished(&self) {
        // SeqCst: see `SessionRegistry::reader_finished`.
        self.reader_finished.store(true, Ordering::SeqCst);
    }

    /// True once [`mark_reader_finished`](Self::mark_reader_finished) was called.
    pub fn is_reader_finished(&self) -> bool {
        self.reader_finished.load(Ordering::SeqCst)
    }
}

/// The attachment of a live connection to a session.
#[derive(Debug)]
struct Link {
    connection_id: u64,
    control: Arc<ConnectionControl>,
    outbound: VecDeque<Outbound>,
    /// Bytes of PUBLISHes in `outbound` (the connection's bound applies to
    /// them), charged to the broker's budget unless `exempt`: the sum of
    /// their [`queued_cost`], as `push_publish` added it.
    charged: usize,
    /// Set once `charged` reached the connection's bound: its bytes no
    /// longer count against the broker-wide budget, since the bound limits
    /// them already. Otherwise a few subscribers that stop reading would
    /// fill the budget with queues that never drain, and the broker would
    /// stop reading from every client for as long as they stay connected.
    /// Cleared when the writer takes from the queue (what is left then
    /// counts again).
    exempt: bool,
    /// Budget bytes of the batch the writer took last: it may still be
    /// writing them. Released when it comes back for the next batch (having
    /// written this one) or with the link; exempted from the budget, like
    /// the queue, when a sweep finds it stalled (`writing_exempt`).
    writing: usize,
    /// Set by a sweep of a broker over its budget, cleared when the writer
    /// takes the queue: a queue still marked at the next sweep has not been
    /// drained for a whole sweep period (see [`Session::exempt_if_stalled`]).
    stall_mark: bool,
    /// `writing` no longer counts against the budget but among the exempt
    /// bytes: a sweep found the writer stuck with it.
    writing_exempt: bool,
    /// Items of `outbound` that are not PUBLISH (acks, PINGRESP ...).
    controls: usize,
    /// Whether the writer still takes the PUBLISHes queued (stall.rs).
    stall: StallWatch,
    budget: Arc<OutboundBudget>,
    /// How its client was let in (`AttachParams::login`).
    login: Login,
}

impl Link {
    /// Queues a PUBLISH; `bound` is the connection's outbound bound
    /// (`max_client_outbound_bytes`).
    fn push_publish(&mut self, mut delivery: Delivery, bound: usize) {
        delivery.carries_message_cost = delivery.message.claim_cost();
        let size = queued_cost(&delivery);
        self.push_charged(Outbound::Publish(delivery), size, bound);
    }

    /// [`push_publish`](Self::push_publish) for a batch.
    fn push_batch(&mut self, mut delivery: BatchDelivery, bound: usize) {
        delivery.carries_cost = delivery.batch.claim_cost();
        let size = queued_batch_cost(&delivery);
        self.push_charged(Outbound::Batch(delivery), size, bound);
    }

    /// Queues a PUBLISH or a batch that counts `size` bytes against the
    /// connection's `bound` and the broker's budget.
    fn push_charged(&mut self, item: Outbound, size: usize, bound: usize) {
        self.charge(size, bound);
        self.push(item);
    }

    /// Counts `size` more bytes of what the queue holds against the
    /// connection's `bound` and the broker's budget.
    fn charge(&mut self, size: usize, bound: usize) {
        self.charged += size;
        if self.exempt {
            self.budget.add_exempt(size);
        } else {
            crate::wake_batch::charge(&self.budget, size);
            if self.charged >= bound {
                // Charges deferred to the end of the read are released here
                // too: the budget is signed, the two cancel out.
                self.exempt = true;
                self.budget.release(self.charged);
                self.budget.add_exempt(self.charged);
            }
        }
    }

    /// Releases the batch the writer took last (see `writing`): written, or
    /// gone with the link.
    fn release_writing(&mut self) {
        release(&self.budget, &mut self.writing, &mut self.writing_exempt);
    }

    /// Releases what `charged` holds of the broker's budget.
    fn release_charged(&mut self) {
        release(&self.budget, &mut self.charged, &mut self.exempt);
    }

    /// What a PUBLISH queued now waits behind (stall.rs): acks and
    /// PINGRESPs pin no read buffer, so only PUBLISHes count.
    #[inline]
    fn publish_waits(&mut self, clock: &CoarseClock) -> Waiting {
        let ahead = self.outbound.len() - self.controls;
        self.stall.queued(ahead, || clock.now_ms())
    }

    /// Queues an item, waking the writer only when the queue was empty: the
    /// writer takes the whole queue each time it runs, so one wake-up per
    /// batch is enough (and a wake-up costs more than the push). Inside a
    /// [`WakeBatch`](crate::wake_batch::WakeBatch) the wake-up waits for
    /// the end of the publisher's read.
    fn push(&mut self, item: Outbound) {
        if !matches!(item, Outbound::Publish(_) | Outbound::Batch(_)) {
            self.controls += 1;
        }
        let was_empty = self.outbound.is_empty();
        self.outbound.push_back(item);
        crate::wake_batch::queued(&self.control, was_empty);
    }

    /// Hands the queue to the writer, at most [`WRITE_BATCH_BYTES`] of
    /// PUBLISHes at a time: by swapping it with the writer's empty one when
    /// it all fits (no copying; the two allocations take turns), else item
    /// by item. What the writer took stops counting against the
    /// connection's bound but stays charged to the broker's budget, as
    /// `writing`, until the writer comes back for more (it has written the
    /// batch then) or the link ends. What it left still counts.
    /// Returns the bytes of PUBLISHes it took.
    fn drain_into(&mut self, out: &mut VecDeque<Outbound>, now_ms: u64) -> usize {
        self.stall_mark = false;
        self.stall.taken(now_ms);
        self.release_writing();
        let taken = if self.charged <= WRITE_BATCH_BYTES {
            if out.is_empty() {
                std::mem::swap(&mut self.outbound, out);
            } else {
                out.extend(self.outbound.drain(..));
            }
            self.controls = 0;
            self.charged
        } else {
            let mut taken = 0;
            while taken < WRITE_BATCH_BYTES {
                let Some(item) = self.outbound.pop_front() else {
                    break;
                };
                match item.publish_cost() {
                    Some(cost) => taken += cost,
                    None => self.controls -= 1,
                }
                out.push_back(item);
            }
            taken
        };
        self.charged -= taken;
        self.writing = taken;
        if self.exempt {
            self.budget.remove_exempt(self.charged);
            // The writer takes from it again: not stalled, and what is left
            // counts again (a queue back at its bound is exempted by its
            // next push). What it took was released from the budget when it
            // was exempted: it stays among the exempt bytes until written.
            self.exempt = false;
            self.writing_exempt = true;
            self.budget.charge(self.charged);
        }
        self.control.drained.raise();
        taken
    }
}

/// Takes `bytes` out of the broker's budget, or out of its exempt bytes if
/// `exempt`, and clears both.
fn release(budget: &OutboundBudget, bytes: &mut usize, exempt: &mut bool) {
    let bytes = std::mem::take(bytes);
    if std::mem::take(exempt) {
        budget.remove_exempt(bytes);
    } else {
        budget.release(bytes);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // A detached or replaced connection's queue is dropped with it. Its
        // writer's batch stops counting now, though the writer may hold it
        // until its last write ends (at most the close grace).
        self.release_charged();
        self.release_writing();
    }
}

/// What every session of a broker shares: limits, counters, the budget.
#[derive(Debug)]
pub struct SessionContext {
    /// Bound of each session's QoS 1/2 queue, in messages.
    pub max_queued: usize,
    /// Bound of each session's QoS 1/2 queue, in bytes of `Message::weight`.
    pub max_queued_bytes: usize,
    /// How long a connected client's full queue makes its publishers wait
    /// before the client counts as slow (see [`Session::wait_for_room`]);
    /// zero: never wait, drop at once.
    pub queue_full_wait: Duration,
    /// Bound of the bytes waiting to be written to one connection; a QoS 0
    /// delivery beyond it is dropped.
    pub max_client_outbound_bytes: usize,
    /// Retained messages a session may hold waiting for room in its queues.
    pub max_pending_retained: usize,
    pub metrics: Arc<Metrics>,
    pub budget: Arc<OutboundBudget>,
    /// The durable store; `None` in memory mode.
    pub persistence: Option<Arc<Persistence>>,
    pub store_retries: StoreRetries,
    /// The broker's coarse clock (stall.rs reads it per queued message).
    pub clock: Arc<CoarseClock>,
}

/// How often an in-flight state the store refused is written again (see
/// [`StoreRetries`]): a full disk is not freed in milliseconds, and each
/// try writes the message again.
pub const STORE_RETRY: Duration = Duration::from_secs(1);

/// Sessions with an in-flight state the store refused: a QoS 2 PUBLISH
/// whose packet id, or a PUBREL whose PUBREC, is not durable. Sending
/// either before it is would let a crash bring back an earlier state, and
/// the client would get the message twice. The broker's maintenance task
/// calls [`retry`](Self::retry) every [`STORE_RETRY`].
///
/// Keyed by the session's address, which its `Weak` keeps from being
/// reused while it waits here.
#[derive(Debug, Default)]
pub struct StoreRetries(Mutex<HashMap<usize, Weak<Session>>>);

impl StoreRetries {
    fn add(&self, session: &Arc<Session>) {
        let key = Arc::as_ptr(session) as usize;
        self.0
            .lock()
            .entry(key)
            .or_insert_with(|| Arc::downgrade(session));
    }

    /// Writes the refused states again; each session whose write fails
    /// again is put back by its completion.
    pub fn retry(&self) {
        let waiting = std::mem::take(&mut *self.0.lock());
        for session in waiting.values().filter_map(Weak::upgrade) {
            session.store_inflight_again();
        }
    }
}

/// A will waiting for its delay (or the end of its session) to pass.
#[derive(Debug, Clone)]
pub struct PendingWill {
    pub will: Will,
    pub publish_at: Instant,
}

/// Parameters of the connection being attached.
#[derive(Debug, Clone)]
pub struct AttachParams {
    pub connection_id: u64,
    pub protocol: ProtocolVersion,
    /// The in-flight window: min(max_inflight, client's Receive Maximum).
    pub send_quota: u16,
    /// Session expiry interval in seconds (0: ends with the connection).
    pub expiry_interval: u32,
    /// The user the client proved (see `acl.rs`), kept as the session's
    /// owner.
    pub owner: Option<Arc<str>>,
    /// How the client was let in, for a reload of `[auth]` (auth_rules.rs).
    pub login: Login,
}

struct SessionState {
    link: Option<Link>,
    /// Incremented by every attach; lets delayed work notice a reconnect.
    generation: u64,
    protocol: ProtocolVersion,
    expiry_interval: u32,
    /// Hand-overs of its shared messages under way (see
    /// [`Session::begin_hand_over`]).
    handing_over: u32,
    send_quota: u16,
    inflight: InflightWindow,
    pending: VecDeque<Delivery>,
    /// Topic + payload bytes of `pending`.
    pending_bytes: usize,
    /// Whether the connected client still makes room for `pending` (by
    /// acknowledging, or reading what its connection queued), stall.rs.
    pending_stall: StallWatch,
    /// QoS 2 packet ids received and not yet released (PUBREL), and which
    /// of them the current connection opened (incoming_qos2.rs). Boxed and
    /// made at the first one: most clients never publish with QoS 2.
    incoming_qos2: Option<Box<IncomingQos2>>,
    /// Boxed: few sessions have one, and inline it would be 232 bytes of
    /// every session.
    pending_will: Option<Box<PendingWill>>,
    /// Will-delay and expiry timers armed when the last connection closed.
    timers: SmallVec<[tokio::task::AbortHandle; 2]>,
    ended: bool,
    /// True while the session is kept in the store (a store exists and the
    /// expiry interval is not 0).
    durable: bool,
    /// The next durable queue key (0 is never used: it means "not stored").
    next_seq: u64,
    /// Unix seconds the session was created (kept in its record).
    created_at: u64,
    /// The user its last client proved (kept in its record): with topic
    /// permissions, only that user resumes it.
    owner: Option<Arc<str>>,
    /// Unix seconds its last connection closed (the `last_seen` of its
    /// offline record): the expiry interval counts from here.
    offline_since: u64,
    /// After a restart: queued deliveries still only in the store. Boxed:
    /// only restored sessions have one, until it is read.
    backlog: Option<Box<Backlog>>,
    /// The episode since the queue of the connected client last reached
    /// its bound and took a delivery beyond it (overflow.rs); ended when it
    /// drains to half (or, once the client counts as slow, to empty) or the
    /// client leaves.
    /// Boxed: made per episode, and inline it would be 40 bytes of every
    /// session.
    overflow: Option<Box<Overflow>>,
    /// Retained messages its SUBSCRIBEs matched that its queues had no room
    /// for yet (see [`Session::deliver_retained`]): they go in as the queues
    /// drain. Boxed and made at the first; at most
    /// `max_pending_retained`; dropped when the client leaves.
    #[expect(
        clippy::box_collection,
        reason = "8 bytes in every session instead of 32: almost none has one"
    )]
    retained_backlog: Option<Box<VecDeque<Delivery>>>,
}

/// Deliveries of a restored session that were queued but not sent: they
/// stay in the store (pending entries with a seq in `after..end`) and are
/// read [`BACKLOG_CHUNK`] at a time when the in-flight window drains to
/// them, so a restart never loads every queued payload at once. Deliveries
/// queued since the restart have seqs from `end` on and wait behind it.
#[derive(Debug)]
struct Backlog {
    /// Every entry up to this seq was read.
    after: u64,
    end: u64,
    /// Entries left in the store.
    count: usize,
    /// What they count against `max_queued_bytes` (their stored weights).
    bytes: usize,
    /// A read is under way.
    reading: bool,
    /// Reads failed in a row (the retry waits longer after each).
    failures: u32,
}

/// Backlog deliveries read from the store at a time: enough to refill an
/// in-flight window several times over, small enough that a connected
/// client with a large stored queue holds little of it in memory.
pub const BACKLOG_CHUNK: usize = 256;

/// Bytes of PUBLISHes (as `Link::charged` counts them) a writer takes from
/// its queue at a time. What it took no longer counts against the
/// connection's bound or the broker's budget while it is encoded and
/// written, so one batch is what a connection may hold beyond them: a
/// quarter of the 4 MiB default bound. (Taking everything let a slow TLS
/// subscriber hold its bound twice over; 256 KiB measured slower in the
/// 1 -> 100 fan-out, where subscribers' queues often hold more.)
pub const WRITE_BATCH_BYTES: usize = 1024 * 1024;

/// Wait before reading a backlog chunk again after a failed read: the store
/// is failing, so retry slowly rather than spin on the blocking pool. The
/// wait doubles with each failure in a row, up to [`BACKLOG_RETRY_MAX`]: a
/// damaged record fails every time, and a session retrying it every second
/// for hours would fill the log and the blocking pool's time for nothing.
const BACKLOG_RETRY: Duration = Duration::from_secs(1);
const BACKLOG_RETRY_MAX: Duration = Duration::from_secs(60);

/// The wait before the next read after `failures` failed reads in a row.
fn backlog_retry_wait(failures: u32) -> Duration {
    BACKLOG_RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(6))
        .min(BACKLOG_RETRY_MAX)
}

/// One client's session. See the module documentation.
pub struct Session {
    /// Unique per session object (a new clean session gets a new id).
    pub id: u64,
    pub client_id: Arc<str>,
    /// What its client may not receive (`[[auth.acl]]` deny rules, see
    /// acl.rs); `None` for nearly every session. Fixed for its life.
    denied: Option<Box<DeniedTopics>>,
    /// Limits, counters and the store, shared by every session: one
    /// pointer instead of a copy in each.
    context: Arc<SessionContext>,
    state: Mutex<SessionState>,
    /// Woken when a full queue has drained to half its bound, or the client
    /// left: publishers waiting in [`wait_for_room`](Self::wait_for_room).
    room: Notify,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A new, unattached session; `denied`: what its client may not
    /// receive.
    pub fn new(
        id: u64,
        client_id: Arc<str>,
        denied: Option<Box<DeniedTopics>>,
        context: &Arc<SessionContext>,
    ) -> Session {
        Session {
            id,
            client_id,
            denied,
            context: Arc::clone(context),
            state: Mutex::new(SessionState {
                link: None,
                generation: 0,
                protocol: ProtocolVersion::V311,
                expiry_interval: 0,
                send_quota: 1,
                inflight: InflightWindow::default(),
                pending: VecDeque::new(),
                pending_bytes: 0,
                pending_stall: StallWatch::default(),
                incoming_qos2: None,
                pending_will: None,
                timers: SmallVec::new(),
                ended: false,
                durable: false,
                next_seq: 1,
                created_at: unix_secs(),
                owner: None,
                offline_since: 0,
                backlog: None,
                overflow: None,
                retained_backlog: None,
                handing_over: 0,
            }),
            room: Notify::new(),
        }
    }

    /// Attaches a connection. When the session is resumed, queues the
    /// retransmissions (DUP PUBLISH, PUBREL) and then whatever was pending.
    /// Cancels a pending will (the client came back in time). Returns the new
    /// generation.
    ///
    /// Returns `None` if the session has ended meanwhile (another connection
    /// with clean start replaced it): the caller then closes its connection.
    ///
    /// A durable session's record is (re)written with `will`, the will of
    /// the connection, kept in case the broker stops without a clean close.
    /// Nobody waits for it, but if it cannot be stored the connection is
    /// closed (0x97 on a full disk, else 0x83): what it would go on to have
    /// acknowledged (subscriptions, messages queued for it) would belong
    /// to a session a restart does not know. Its close writes the record
    /// again.
    pub fn attach(
        self: &Arc<Self>,
        params: AttachParams,
        control: Arc<ConnectionControl>,
        will: Option<&Will>,
    ) -> Option<u64> {
        let mut journal = Journal::new();
        let generation = self.attach_locked(params, Arc::clone(&control), will, &mut journal)?;
        if journal.has_changes() {
            journal.after(move |result| {
                if let Err(e) = result {
                    control.close(Some(if e.is_disk_full() {
                        ReasonCode::QuotaExceeded
                    } else {
                        ReasonCode::ImplementationSpecificError
                    }));
                }
            });
        }
        self.commit(journal);
        Some(generation)
    }

    fn attach_locked(
        self: &Arc<Self>,
        params: AttachParams,
        control: Arc<ConnectionControl>,
        will: Option<&Will>,
        journal: &mut Journal,
    ) -> Option<u64> {
        let mut st = self.state.lock();
        if st.ended {
            return None;
        }
        if let Some(previous) = st.link.take() {
            // Two connections resumed the same session at once: the later
            // attach wins, as a takeover would.
            previous.control.close(Some(ReasonCode::SessionTakenOver));
        }
        st.generation += 1;
        cancel_timers(&mut st);
        if st.overflow.take().is_some() {
            // A new connection starts with no verdict of the old one.
            self.room.notify_waiters();
        }
        if let Some(flows) = st.incoming_qos2.as_mut() {
            // Their PUBRELs come again, outside the new connection's quota.
            flows.carry_over();
        }
        st.protocol = params.protocol;
        st.expiry_interval = params.expiry_interval;
        st.owner = params.owner;
        st.send_quota = params.send_quota.max(1);
        st.pending_will = None;
        self.update_durability(&mut st, will, journal);
        let mut outbound = VecDeque::new();
        // Unacknowledged PUBLISHes are sent again with their packet ids, but
        // no more of them than the (possibly smaller) new Receive Maximum
        // allows (MQTT-3.3.4-9); the rest follow as acknowledgements come.
        let quota = usize::from(st.send_quota);
        let mut resent = st
            .inflight
            .iter()
            .filter(|i| {
                matches!(
                    i.state(),
                    InflightState::Released | InflightState::Persisting | InflightState::Releasing
                )
            })
            .count();
        for index in 0..st.inflight.len() {
            match st.inflight.get(index).state() {
                InflightState::Sent | InflightState::Resend if resent < quota => {
                    resent += 1;
                    st.inflight.set_state(index, InflightState::Sent);
                    st.inflight.set_dup(index);
                    let d = st.inflight.get(index).delivery.clone();
                    outbound.push_back(Outbound::Publish(d));
                }
                InflightState::Sent | InflightState::Resend => {
                    st.inflight.set_state(index, InflightState::Resend);
                    st.inflight.set_dup(index);
                }
                InflightState::Released => {
                    outbound.push_back(Outbound::Ack(
                        AckKind::PubRel,
                        st.inflight.get(index).packet_id,
                        ReasonCode::Success,
                    ));
                }
                // Sent by `release` once its packet id is durable, and by
                // `send_pubrel` once its PUBREC is.
                InflightState::Persisting | InflightState::Releasing => {}
            }
        }
        let now_ms = self.context.clock.now_ms();
        st.pending_stall.taken(now_ms);
        let mut link = Link {
            connection_id: params.connection_id,
            control,
            outbound: VecDeque::new(),
            charged: 0,
            exempt: false,
            writing: 0,
            stall_mark: false,
            writing_exempt: false,
            controls: 0,
            stall: StallWatch::new(now_ms),
            budget: Arc::clone(&self.context.budget),
            login: params.login,
        };
        for item in outbound {
            match item {
                Outbound::Publish(d) => {
                    link.push_publish(d, self.context.max_client_outbound_bytes)
                }
                other => link.push(other),
            }
        }
        st.link = Some(link);
        self.fill_window(&mut st, Instant::now(), journal);
        if let Some(link) = &st.link {
            link.control.wake_writer.raise();
        }
        Some(st.generation)
    }

    /// Starts, keeps or stops storing this session after a connection
    /// attached with its expiry interval: durable when a store exists and the
    /// interval is not 0.
    fn update_durability(&self, st: &mut SessionState, will: Option<&Will>, journal: &mut Journal) {
        let durable = self.context.persistence.is_some() && st.expiry_interval != 0;
        if durable {
            journal.push(Op::PutSession(self.record(st, will, true)));
        } else if st.durable {
            journal.push(Op::DeleteSession {
                client_id: Arc::clone(&self.client_id),
            });
        }
        st.durable = durable;
    }

    /// The session's durable record, last seen now; `connected` while a
    /// connection is attached (see `SessionRecord::connected`).
    fn record(&self, st: &SessionState, will: Option<&Will>, connected: bool) -> SessionRecord {
        SessionRecord {
            client_id: Arc::clone(&self.client_id),
            protocol_level: st.protocol.level(),
            expiry_interval: st.expiry_interval,
            will: will.map(will_record),
            created_at: st.created_at,
            last_seen: unix_secs(),
            connected,
            owner: st.owner.clone(),
        }
    }

    /// Writes the record of a durable session that just went offline: its
    /// expiry (possibly changed by DISCONNECT) counts from now, and a will
    /// still waiting for its delay is kept so a restart can publish it.
    pub fn record_offline(&self) {
        let mut journal = Journal::new();
        {
            let mut st = self.state.lock();
            if !st.durable || st.ended || st.link.is_some() {
                return;
            }
            let will = st.pending_will.as_ref().map(|p| &p.will);
            let record = self.record(&st, will, false);
            st.offline_since = record.last_seen;
            journal.push(Op::PutSession(record));
        }
        self.commit(journal);
    }

    /// Rewrites the record of a durable offline session whose delayed will
    /// was just published, without it: a restart must not publish it again
    /// (MQTT-3.1.2-10). Its expiry still counts from when it went offline.
    pub fn record_will_published(&self) {
        let mut journal = Journal::new();
        {
            let st = self.state.lock();
            if !st.durable || st.ended || st.link.is_some() || st.pending_will.is_some() {
                return;
            }
            let mut record = self.record(&st, None, false);
            record.last_seen = st.offline_since;
            journal.push(Op::PutSession(record));
        }
        self.commit(journal);
    }

    /// True while the session is kept in the store.
    pub fn is_durable(&self) -> bool {
        self.state.lock().durable
    }

    /// Hands `journal` to the store, if there is one. Must be called with
    /// no session lock held: completions may take it.
    pub fn commit(&self, journal: Journal) {
        if let Some(p) = &self.context.persistence {
            p.commit(journal);
        }
    }

    /// The store, when the broker has one.
    pub fn persistence(&self) -> Option<&Arc<Persistence>> {
        self.context.persistence.as_ref()
    }

    /// Claims the session for a connection about to attach: called by the
    /// registry under its lock when the session is resumed, so that an expiry
    /// or will-delay timer firing before the attach sees a new generation
    /// and leaves the session (and its will) alone.
    pub fn reserve(&self) {
        let mut st = self.state.lock();
        st.generation += 1;
        st.pending_will = None;
        cancel_timers(&mut st);
    }

    /// Keeps a timer's handle so that a reconnect or the end of the session
    /// cancels it.
    pub fn add_timer(&self, timer: tokio::task::AbortHandle) {
        let mut st = self.state.lock();
        if st.ended || st.link.is_some() {
            // Already moot: the session ended or a client is back.
            timer.abort();
        } else {
            st.timers.push(timer);
        }
    }

    /// Stops the session's timers (will delay, expiry) without ending it:
    /// the broker is shutting down, and a restart arms them again from the
    /// store.
    pub fn stop_timers(&self) {
        cancel_timers(&mut self.state.lock());
    }

    /// Detaches `connection_id` if it is still the attached connection and
    /// returns true; false when another connection took the session over.
    /// `new_expiry` (from the client's DISCONNECT) is applied in the same
    /// step, so a late DISCONNECT cannot change a session another connection
    /// has taken over.
    pub fn detach(&self, connection_id: u64, new_expiry: Option<u32>) -> bool {
        let mut st = self.state.lock();
        match &st.link {
            Some(link) if link.connection_id == connection_id => {
                st.link = None;
                if st.overflow.take().is_some() {
                    self.room.notify_waiters();
                }
                if let Some(waiting) = st.retained_backlog.take() {
                    // Retained messages are for the client that subscribed,
                    // while it is there; a new SUBSCRIBE sends them again.
                    Metrics::add(
                        &self.context.metrics.messages_dropped_queue_full,
                        waiting.len() as u64,
                    );
                }
                if let Some(secs) = new_expiry {
                    st.expiry_interval = secs;
                }
                true
            }
            _ => false,
        }
    }

    /// Sets the session expiry interval that a DISCONNECT of the attached
    /// connection `connection_id` asked for, at once rather than when the
    /// connection is closed down: a client reconnecting right after its
    /// DISCONNECT must find the session as that DISCONNECT left it (MQTT 5
    /// 3.14.2.2.2). Ignored when another connection owns the session.
    pub fn set_expiry_at_disconnect(&self, connection_id: u64, secs: u32) {
        let mut st = self.state.lock();
        if st.link.as_ref().map(|l| l.connection_id) == Some(connection_id) {
            st.expiry_interval = secs;
        }
    }

    /// One step of the sweep a broker over its budget makes (see
    /// `Broker::exempt_stalled_queues`): a connection's queue that its
    /// writer has not taken since the previous step stops counting towards
    /// the budget, as a full one does (`Link::exempt`); the others are
    /// marked for the next step. Subscribers that never read would
    /// otherwise hold the budget over its limit, and every reader paused,
    /// whenever they stall before reaching their own bound. Returns whether
    /// it exempted this session's queue.
    pub fn exempt_if_stalled(&self) -> bool {
        let mut st = self.state.lock();
        let Some(link) = st.link.as_mut() else {
            return false;
        };
        let queued = if link.exempt { 0 } else { link.charged };
        let writing = if link.writing_exempt { 0 } else { link.writing };
        if queued + writing == 0 {
            return false;
        }
        if link.stall_mark {
            // Neither queued nor being written counts any more: a writer
            // stuck in a write to a client that stopped reading holds its
            // batch as long as the client does. Both stay in the exempt
            // bytes until the writer or the link lets go of them.
            link.budget.add_exempt(queued + writing);
            link.exempt = true;
            link.writing_exempt = true;
            link.budget.release(queued + writing);
            true
        } else {
            link.stall_mark = true;
            false
        }
    }

    /// How the attached connection's client was let in, with its controls.
    pub fn attached_login(&self) -> Option<(Login, Arc<ConnectionControl>)> {
        let st = self.state.lock();
        let link = st.link.as_ref()?;
        Some((link.login.clone(), Arc::clone(&link.control)))
    }

    /// The controls of the attached connection, if any.
    pub fn attached_control(&self) -> Option<Arc<ConnectionControl>> {
        self.state
            .lock()
            .link
            .as_ref()
            .map(|l| Arc::clone(&l.control))
    }

    /// Closes the attached connection, if any, with this reason.
    pub fn kick(&self, reason: ReasonCode) {
        let st = self.state.lock();
        if let Some(link) = &st.link {
            link.control.close(Some(reason));
        }
    }

    /// True while a connection is attached.
    pub fn is_online(&self) -> bool {
        self.state.lock().link.is_some()
    }

    /// The current attach generation.
    pub fn generation(&self) -> u64 {
        self.state.lock().generation
    }

    /// The protocol version of the last connection.
    pub fn protocol(&self) -> ProtocolVersion {
        self.state.lock().protocol
    }

    /// The session expiry interval in seconds.
    pub fn expiry_interval(&self) -> u32 {
        self.state.lock().expiry_interval
    }

    /// Whether `message` may not be delivered to this session (an ACL deny
    /// rule on its topic, see acl.rs): the broker skips it as it skips a
    /// subscription's No Local. Without deny rules, one pointer test.
    #[inline]
    pub fn denies(&self, message: &Message) -> bool {
        match &self.denied {
            None => false,
            Some(denied) => denied.contains(message.topic_str()),
        }
    }

    /// What its client may not receive (fixed for the session's life).
    pub fn denied_topics(&self) -> Option<&DeniedTopics> {
        self.denied.as_deref()
    }

    /// The user its last client proved (see `acl.rs`).
    pub fn owner(&self) -> Option<Arc<str>> {
        self.state.lock().owner.clone()
    }

    /// Marks the session ended: nothing more is queued for it, and its
    /// pending will (if any) is handed back to be published now.
    pub fn end(&self) -> Option<PendingWill> {
        let (will, durable) = {
            let mut st = self.state.lock();
            st.ended = true;
            cancel_timers(&mut st);
            // A connection that attached after the registry decided to end
            // the session (they do not share a lock) must not stay on a dead
            // session.
            if let Some(link) = &st.link {
                link.control.close(Some(ReasonCode::SessionTakenOver));
            }
            // What its shared groups gave it and nobody took over ends here.
            let orphaned = shared_deliveries(&st).count();
            Metrics::add(
                &self.context.metrics.shared_ended_with_session,
                orphaned as u64,
            );
            st.pending.clear();
            st.pending_bytes = 0;
            st.retained_backlog = None;
            st.backlog = None;
            st.inflight.clear();
            if st.overflow.take().is_some() {
                self.room.notify_waiters();
            }
            (
                st.pending_will.take().map(|w| *w),
                std::mem::take(&mut st.durable),
            )
        };
        if durable {
            let mut journal = Journal::new();
            journal.push(Op::DeleteSession {
                client_id: Arc::clone(&self.client_id),
            });
            self.commit(journal);
        }
        will
    }

    /// True once [`end`](Self::end) ran.
    pub fn is_ended(&self) -> bool {
        self.state.lock().ended
    }

    /// Stores a will to publish later, unless the session is attached again
    /// before then. A session that has ended already (a takeover with clean
    /// start while the connection was still closing) keeps nothing: the
    /// will comes back, to be published now (MQTT-3.1.2-8: the will goes
    /// when the delay has passed or the session has ended).
    pub fn set_pending_will(&self, will: Box<PendingWill>) -> Result<(), Box<PendingWill>> {
        let mut st = self.state.lock();
        if st.ended {
            return Err(will);
        }
        st.pending_will = Some(will);
        Ok(())
    }

    /// Takes the pending will if `generation` is still current (no reconnect).
    pub fn take_pending_will(&self, generation: u64) -> Option<PendingWill> {
        let mut st = self.state.lock();
        if st.generation == generation && st.link.is_none() {
            st.pending_will.take().map(|w| *w)
        } else {
            None
        }
    }

    /// Queues a control packet for the attached connection (`connection_id`).
    /// Returns false if that connection is no longer attached.
    pub fn send_control(&self, connection_id: u64, packet: Packet) -> bool {
        let mut st = self.state.lock();
        match &mut st.link {
            Some(link) if link.connection_id == connection_id => {
                link.push(Outbound::from_packet(packet));
                true
            }
            _ => false,
        }
    }

    /// Closes the connection `connection_id` if it is still attached.
    pub fn close_connection(&self, connection_id: u64, reason: Option<ReasonCode>) {
        let st = self.state.lock();
        if let Some(link) = st
            .link
            .as_ref()
            .filter(|l| l.connection_id == connection_id)
        {
            link.control.close(reason);
        }
    }

    /// Sets what a restart restores of an offline durable session: its
    /// protocol level, expiry interval, creation time, the next free queue
    /// key and its owner. Deliveries follow with [`restore_delivery`](Self::restore_delivery).
    pub fn restore(
        &self,
        protocol: ProtocolVersion,
        expiry_interval: u32,
        created_at: u64,
        offline_since: u64,
        next_seq: u64,
        owner: Option<Arc<str>>,
    ) {
        let mut st = self.state.lock();
        st.protocol = protocol;
        st.expiry_interval = expiry_interval;
        st.created_at = created_at;
        st.owner = owner;
        st.offline_since = offline_since;
        st.next_seq = next_seq.max(1);
        st.durable = self.context.persistence.is_some();
    }

    /// Puts back a stored delivery, in queue order: not yet sent ones wait
    /// in `pending`; sent ones are sent again with DUP when the client is
    /// back; those whose PUBREL was sent get their PUBREL again.
    pub fn restore_delivery(&self, mut delivery: Delivery, state: DeliveryState) {
        let mut st = self.state.lock();
        let (packet_id, inflight_state) = match (state, delivery.packet_id) {
            (DeliveryState::AwaitingAck, Some(id)) => (id, InflightState::Resend),
            (DeliveryState::AwaitingComp, Some(id)) => (id, InflightState::Released),
            _ => {
                delivery.packet_id = None;
                push_pending(&mut st, delivery);
                return;
            }
        };
        if st.inflight.position(packet_id).is_some() {
            // Two stored entries with one packet id: send the later one anew.
            delivery.packet_id = None;
            push_pending(&mut st, delivery);
            return;
        }
        delivery.dup = true;
        st.inflight.restore(packet_id, delivery, inflight_state);
    }

    /// Puts back an incoming QoS 2 packet id awaiting PUBREL.
    pub fn restore_incoming_qos2(&self, packet_id: u16) {
        self.state
            .lock()
            .incoming_qos2
            .get_or_insert_with(Box::default)
            .restore(packet_id);
    }

    /// Notes `count` queued, unsent deliveries left in the store, all with
    /// seqs below `end` (see [`Backlog`]).
    pub fn restore_backlog(&self, count: usize, bytes: usize, end: u64) {
        self.state.lock().backlog = Some(Box::new(Backlog {
            after: 0,
            end,
            count,
            bytes,
            reading: false,
            failures: 0,
        }));
    }

    /// Starts reading the next chunk of the backlog off the async threads,
    /// after `delay` (a retry after a failed read).
    fn read_backlog(self: &Arc<Self>, after: u64, end: u64, delay: Duration) {
        let Some(p) = &self.context.persistence else {
            return;
        };
        let (session, store) = (Arc::clone(self), Arc::clone(p.store()));
        p.spawn_read(delay, move || {
            // sled panics on some damaged records: a read that panics fails
            // like one that returns an error, so that it is logged and
            // retried instead of leaving the backlog waiting for ever.
            let chunk = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                crate::recovery::read_backlog(store.as_ref(), &session, after, end, BACKLOG_CHUNK)
            }))
            .unwrap_or_else(|_| Err(StoreError::Engine("the store panicked reading it".into())));
            session.backlog_read(chunk);
        });
    }

    /// Marks the stored backlog as being read by the caller, who hands the
    /// chunk to [`backlog_read`](Self::backlog_read), and returns the seqs
    /// it spans (after, end). `None` without a backlog, or while a read is
    /// under way already.
    pub(crate) fn begin_backlog_read(&self) -> Option<(u64, u64)> {
        let mut st = self.state.lock();
        let backlog = st.backlog.as_mut().filter(|b| !b.reading)?;
        backlog.reading = true;
        Some((backlog.after, backlog.end))
    }

    /// Puts a chunk read from the backlog at the head of the queue and
    /// fills the window from it.
    pub(crate) fn backlog_read(
        self: &Arc<Self>,
        chunk: Result<crate::recovery::BacklogChunk, StoreError>,
    ) {
        let mut journal = Journal::new();
        {
            let mut st = self.state.lock();
            if st.ended {
                return;
            }
            let Some(backlog) = st.backlog.as_mut() else {
                return;
            };
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    // Still reading: the same chunk again, a moment later
                    // (nothing else would wake a client whose window is
                    // empty). Logged at the 1st, 2nd, 4th, 8th... failure.
                    backlog.failures += 1;
                    let failures = backlog.failures;
                    if failures.is_power_of_two() {
                        tracing::warn!(client_id = %self.client_id, error = %e, failures, "reading a stored queue failed; retrying");
                    }
                    let (after, end) = (backlog.after, backlog.end);
                    self.read_backlog(after, end, backlog_retry_wait(failures));
                    return;
                }
            };
            if std::mem::take(&mut backlog.failures) > 0 {
                tracing::info!(client_id = %self.client_id, "reading a stored queue works again");
            }
            backlog.reading = false;
            backlog.after = backlog.after.max(chunk.last_seq);
            backlog.count = backlog
                .count
                .saturating_sub(chunk.deliveries.len() + chunk.gone.len());
            backlog.bytes = backlog.bytes.saturating_sub(chunk.bytes);
            if chunk.exhausted || backlog.count == 0 {
                st.backlog = None;
            }
            for seq in chunk.gone {
                Metrics::inc(&self.context.metrics.messages_expired);
                journal.push(Op::DeleteQueueEntry {
                    client_id: Arc::clone(&self.client_id),
                    seq,
                });
            }
            for delivery in chunk.deliveries.into_iter().rev() {
                st.pending_bytes += queued_size(&delivery);
                st.pending.push_front(delivery);
            }
            self.fill_window(&mut st, Instant::now(), &mut journal);
        }
        self.commit(journal);
    }

    /// Hands a message to this session (its QoS already downgraded to the
    /// subscription's maximum). A durable session records a QoS 1/2
    /// delivery in `journal`.
    pub fn deliver(self: &Arc<Self>, delivery: Delivery, journal: &mut Journal) -> Admission {
        self.deliver_with(delivery, journal, true)
    }

    /// Hands a retained message to this session after its SUBSCRIBE: as
    /// [`deliver`](Self::deliver), but a queue at its bound drops it at once
    /// (counted): there is no publisher to slow down, so no grace beyond
    /// the bound, and a SUBSCRIBE matching many retained messages cannot
    /// queue more than the session's bounds.
    pub fn deliver_retained(
        self: &Arc<Self>,
        delivery: Delivery,
        journal: &mut Journal,
    ) -> Admission {
        let mut st = self.state.lock();
        if st.ended || (delivery.qos == QoS::AtMostOnce && st.link.is_none()) {
            return Admission::Dropped;
        }
        let waiting = st.retained_backlog.as_ref().map_or(0, |b| b.len());
        if waiting == 0 && self.has_room_for(&st, &delivery) {
            return self.deliver_locked(&mut st, delivery, journal, false);
        }
        if waiting >= self.context.max_pending_retained {
            Metrics::inc(&self.context.metrics.messages_dropped_queue_full);
            return Admission::Dropped;
        }
        st.retained_backlog
            .get_or_insert_with(Default::default)
            .push_back(delivery);
        Admission::Taken
    }

    /// Retained messages waiting for room in the session's queues (at most
    /// `limits.max_pending_retained`): a SUBSCRIBE collects no more than
    /// the rest of that bound.
    pub fn retained_waiting(&self) -> usize {
        self.state
            .lock()
            .retained_backlog
            .as_ref()
            .map_or(0, |b| b.len())
    }

    /// Whether `delivery` fits in the session's queues now, within their
    /// bounds: the connection's outbound bound for QoS 0, the in-flight
    /// window or the session queue for QoS 1/2.
    fn has_room_for(&self, st: &SessionState, delivery: &Delivery) -> bool {
        if delivery.qos == QoS::AtMostOnce {
            return st
                .link
                .as_ref()
                .is_some_and(|l| l.charged < self.context.max_client_outbound_bytes);
        }
        self.window_open(st) || !self.queue_full(st, delivery)
    }

    /// Whether a QoS 1/2 delivery may go straight into the in-flight window:
    /// the connection has room, nothing waits before it, the window has a
    /// free place and no resend is due.
    fn window_open(&self, st: &SessionState) -> bool {
        self.link_has_room(st)
            && st.pending.is_empty()
            && st.backlog.is_none()
            && st.inflight.len() < usize::from(st.send_quota)
            && !st.inflight.has_resend()
    }

    /// Whether the session queue is at its bound for `delivery`
    /// (`max_queued_messages` or `max_queued_bytes`, each counting a stored
    /// backlog).
    fn queue_full(&self, st: &SessionState, delivery: &Delivery) -> bool {
        let (backlog, backlog_bytes) = st.backlog.as_ref().map_or((0, 0), |b| (b.count, b.bytes));
        st.pending.len() + backlog >= self.context.max_queued
            || st.pending_bytes + backlog_bytes + queued_size(delivery)
                > self.context.max_queued_bytes
    }

    /// Moves retained messages waiting for room (see
    /// [`deliver_retained`](Self::deliver_retained)) into the queues while
    /// they have room, in order.
    fn refill_retained(self: &Arc<Self>, st: &mut SessionState, journal: &mut Journal) {
        let Some(mut waiting) = st.retained_backlog.take() else {
            return;
        };
        while let Some(delivery) = waiting.front() {
            if !self.has_room_for(st, delivery) {
                break;
            }
            if let Some(delivery) = waiting.pop_front() {
                // There is room: taken (or, expired meanwhile, counted).
                let _ = self.deliver_locked(st, delivery, journal, false);
            }
        }
        if !waiting.is_empty() {
            st.retained_backlog = Some(waiting);
        }
    }

    /// [`deliver`](Self::deliver); `grace`: a queue at its bound may take
    /// the delivery anyway while the client is not yet slow (see
    /// [`takes_beyond_bound`](Self::takes_beyond_bound)).
    fn deliver_with(
        self: &Arc<Self>,
        delivery: Delivery,
        journal: &mut Journal,
        grace: bool,
    ) -> Admission {
        let mut st = self.state.lock();
        if st.ended {
            return Admission::Dropped;
        }
        self.deliver_locked(&mut st, delivery, journal, grace)
    }

    /// [`deliver_with`](Self::deliver_with) under the session's lock.
    fn deliver_locked(
        self: &Arc<Self>,
        st: &mut SessionState,
        mut delivery: Delivery,
        journal: &mut Journal,
        grace: bool,
    ) -> Admission {
        if delivery.qos == QoS::AtMostOnce {
            return self.admit_at_most_once(st, delivery, grace);
        }
        let window_open = self.window_open(st);
        if !window_open && delivery.message.expires_on_arrival() {
            // Its lifetime ended as it arrived: it waits for nobody.
            Metrics::inc(&self.context.metrics.messages_expired);
            return Admission::Dropped;
        }
        let over_bound = !window_open && self.queue_full(st, &delivery);
        if over_bound && !(grace && self.takes_beyond_bound(st)) {
            Metrics::inc(&self.context.metrics.messages_dropped_queue_full);
            return Admission::Dropped;
        }
        if st.durable {
            delivery.seq = st.next_seq;
            st.next_seq += 1;
        }
        if window_open {
            self.send_inflight(st, delivery, journal, true);
        } else {
            let persistence = self.context.persistence.as_ref().filter(|_| st.durable);
            if st.link.is_none() {
                // Waits for the client to come back, maybe for hours: not
                // on the read buffer the message arrived in. The copy has
                // the message's store id (see `detached`), so both are one
                // stored record, and it is the copy that goes into the
                // journal (the buffer is free once the read is done).
                delivery.message = self.detached(&delivery.message);
            }
            if let Some(p) = persistence {
                let message_id = journal.reference(p, &delivery.message);
                let entry = self.queue_entry(&delivery, message_id, None, DeliveryState::Pending);
                // Queued behind a full window of a connected client that
                // keeps up (less than a window waiting), a QoS 1 delivery
                // is usually sent and acknowledged within milliseconds:
                // insert it so the writer may hold it and net it away. A
                // client that stalls does not hold up everybody's acks.
                let soon = st.link.is_some()
                    && delivery.qos == QoS::AtLeastOnce
                    && st.pending.len() < usize::from(st.send_quota);
                journal.push(if soon {
                    Op::InsertQueueEntry(entry)
                } else {
                    Op::PutQueueEntry(entry)
                });
            }
            if st.link.is_some() {
                let clock = &self.context.clock;
                let waiting = st.pending_stall.queued(st.pending.len(), || clock.now_ms());
                if waiting != Waiting::Briefly {
                    delivery.message = self.detached_for_stalled(st, &delivery.message, waiting);
                }
            }
            push_pending(st, delivery);
        }
        if over_bound {
            Admission::BeyondBound
        } else {
            Admission::Taken
        }
    }

    /// Delivers several QoS 0 deliveries under one lock, in order (see
    /// `Broker::deliver_staged`); returns `BeyondBound` if any went beyond
    /// the connection's bound.
    pub fn deliver_at_most_once(&self, deliveries: impl Iterator<Item = Delivery>) -> Admission {
        let mut st = self.state.lock();
        let mut worst = Admission::Dropped;
        for delivery in deliveries {
            if st.ended {
                break;
            }
            match (self.admit_at_most_once(&mut st, delivery, true), worst) {
                (Admission::BeyondBound, _) => worst = Admission::BeyondBound,
                (Admission::Taken, Admission::Dropped) => worst = Admission::Taken,
                _ => {}
            }
        }
        worst
    }

    /// Delivers a batch of QoS 0 messages (message_batch.rs) as
    /// [`deliver_at_most_once`](Self::deliver_at_most_once) would deliver
    /// each of them, but taken or dropped whole: the connection's bound is
    /// checked once, before it, as it would have been before the first.
    pub fn deliver_batch(&self, delivery: BatchDelivery) -> Admission {
        let mut st = self.state.lock();
        if st.ended {
            return Admission::Dropped;
        }
        let Some(charged) = st.link.as_ref().map(|l| l.charged) else {
            return Admission::Dropped;
        };
        let admission = if charged < self.context.max_client_outbound_bytes {
            Admission::Taken
        } else if self.takes_beyond_bound(&mut st) {
            Admission::BeyondBound
        } else {
            Metrics::add(
                &self.context.metrics.messages_dropped_qos0,
                delivery.batch.len() as u64,
            );
            return Admission::Dropped;
        };
        let Some(link) = st.link.as_mut() else {
            return Admission::Dropped;
        };
        match link.publish_waits(&self.context.clock) {
            Waiting::Briefly => link.push_batch(delivery, self.context.max_client_outbound_bytes),
            waiting => self.push_detached_batch(&mut st, delivery, waiting),
        }
        admission
    }

    /// [`deliver_batch`](Self::deliver_batch) to a stalled queue: the batch
    /// is copied for it (see [`detach_held`](Self::detach_held)).
    #[cold]
    fn push_detached_batch(
        &self,
        st: &mut SessionState,
        mut delivery: BatchDelivery,
        waiting: Waiting,
    ) {
        if waiting == Waiting::NewlyStalled {
            self.detach_held(st);
        }
        delivery.batch = delivery.batch.copied(|m| self.detached(m));
        if let Some(link) = st.link.as_mut() {
            link.push_batch(delivery, self.context.max_client_outbound_bytes);
        }
    }

    /// A QoS 0 delivery: queued for the connection, or dropped (counted)
    /// when the client is offline or its connection's queue is full.
    fn admit_at_most_once(
        &self,
        st: &mut SessionState,
        delivery: Delivery,
        grace: bool,
    ) -> Admission {
        // Offline clients do not get QoS 0 messages queued.
        let Some(charged) = st.link.as_ref().map(|l| l.charged) else {
            return Admission::Dropped;
        };
        let admission = if charged < self.context.max_client_outbound_bytes {
            Admission::Taken
        } else if grace && self.takes_beyond_bound(st) {
            Admission::BeyondBound
        } else {
            Metrics::inc(&self.context.metrics.messages_dropped_qos0);
            return Admission::Dropped;
        };
        self.push_to_link(st, delivery, None);
        admission
    }

    /// Whether a delivery that finds its queue at the bound (the session
    /// queue for QoS 1/2, the connection's outbound queue for QoS 0) is
    /// taken anyway (and its publisher asked to wait): only for a connected
    /// client that is outpaced, not slow (overflow.rs: full for less than
    /// `queue_full_wait`, and taking something at least every
    /// [`STALL_WINDOW`](crate::overflow::STALL_WINDOW)). What a slow client
    /// cannot take is dropped, so it holds no publisher up for longer than
    /// that per episode.
    fn takes_beyond_bound(&self, st: &mut SessionState) -> bool {
        if st.link.is_none() || self.context.queue_full_wait.is_zero() {
            return false;
        }
        let now = Instant::now();
        st.overflow
            .get_or_insert_with(|| Box::new(Overflow::begin(now)))
            .outpaced(now, self.context.queue_full_wait)
    }

    /// The client took something at `now` (a PUBACK, PUBREC or PUBCOMP for
    /// a delivery, or its writer came back for PUBLISHes): progress for a
    /// full-queue episode (overflow.rs).
    fn note_progress(&self, st: &mut SessionState, now: Instant) {
        if let Some(overflow) = st.overflow.as_mut() {
            overflow.progress(now, self.context.queue_full_wait);
        }
    }

    /// Ends a full-queue episode once the queues have drained far enough:
    /// to half their bounds while publishers wait, to empty once the client
    /// counted as slow. Wakes the waiting publishers.
    fn note_drained(&self, st: &mut SessionState, now: Instant) {
        let wait = self.context.queue_full_wait;
        let Some(overflow) = st.overflow.as_mut() else {
            return;
        };
        let outpaced = overflow.outpaced(now, wait);
        let (backlog, backlog_bytes) = st.backlog.as_ref().map_or((0, 0), |b| (b.count, b.bytes));
        let queued = st.pending.len() + backlog;
        let unwritten = st.link.as_ref().map_or(0, |l| l.charged);
        let drained = if outpaced {
            queued <= self.context.max_queued / 2
                && st.pending_bytes + backlog_bytes <= self.context.max_queued_bytes / 2
                && unwritten <= self.context.max_client_outbound_bytes / 2
        } else {
            queued == 0 && unwritten == 0
        };
        if drained {
            st.overflow = None;
            self.room.notify_waiters();
        }
    }

    /// Waits while this session's queue is beyond its bound after a
    /// delivery from the caller (see [`Admission::BeyondBound`]): until it
    /// has drained to half, the client left, or it counts as slow (full for
    /// `queue_full_wait`, or taking nothing for
    /// [`STALL_WINDOW`](crate::overflow::STALL_WINDOW): a slow client no
    /// longer holds anyone up). The publisher's connection stops reading
    /// meanwhile, so TCP slows it down.
    pub async fn wait_for_room(&self) {
        let wait = self.context.queue_full_wait;
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = {
                let mut st = self.state.lock();
                if st.link.is_none() || st.ended {
                    return;
                }
                let Some(overflow) = st.overflow.as_mut() else {
                    return;
                };
                if !overflow.outpaced(Instant::now(), wait) {
                    return;
                }
                overflow.deadline(wait)
            };
            // At the deadline, the loop looks again: progress since may
            // have moved it on.
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
    }

    /// The durable queue entry of a delivery.
    fn queue_entry(
        &self,
        delivery: &Delivery,
        message_id: u64,
        packet_id: Option<u16>,
        state: DeliveryState,
    ) -> QueueEntry {
        QueueEntry {
            client_id: Arc::clone(&self.client_id),
            seq: delivery.seq,
            message_id,
            qos: delivery.qos as u8,
            packet_id,
            state,
            dup: delivery.dup,
            retain: delivery.retain,
            subscription_ids: delivery.subscription_ids.to_vec(),
            weight: Some(u32::try_from(queued_size(delivery)).unwrap_or(u32::MAX)),
            shared: delivery.shared.as_ref().map(|origin| SharedGroupRecord {
                group: Arc::clone(&origin.group),
                filter: Arc::clone(&origin.filter),
            }),
        }
    }

    /// Records in `journal` that a stored delivery is gone (acknowledged,
    /// expired, moved to another session).
    fn forget(&self, st: &SessionState, delivery: &Delivery, journal: &mut Journal) {
        if st.durable && delivery.seq != 0 {
            journal.push(Op::DeleteQueueEntry {
                client_id: Arc::clone(&self.client_id),
                seq: delivery.seq,
            });
        }
    }

    /// Marks a hand-over of this session's shared messages to other members
    /// as under way until the guard drops (see
    /// `Broker::hand_over_shared_before_end`): meanwhile shared groups do
    /// not fall back to it when it is offline, and a connection about to
    /// end it waits ([`hand_overs_done`](Self::hand_overs_done)).
    pub fn begin_hand_over(self: &Arc<Self>) -> HandOver {
        self.state.lock().handing_over += 1;
        HandOver(Arc::clone(self))
    }

    /// True while a hand-over of its shared messages is under way.
    pub fn is_handing_over(&self) -> bool {
        self.state.lock().handing_over > 0
    }

    /// Online and not handing its shared messages over (one lock): what a
    /// shared group's first pick asks of a member.
    pub fn is_online_and_staying(&self) -> bool {
        let st = self.state.lock();
        st.link.is_some() && st.handing_over == 0
    }

    /// Waits until at most `own` hand-overs of this session's shared
    /// messages are under way (the caller's own, still held), woken through
    /// `room`, whose other waiters check their own condition again.
    pub async fn hand_overs_done(&self, own: u32) {
        loop {
            let notified = self.room.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so an end in between wakes it.
            notified.as_mut().enable();
            if self.state.lock().handing_over <= own {
                return;
            }
            notified.await;
        }
    }

    /// Whether the session may hold deliveries that came through shared
    /// subscriptions: some in memory, or a stored backlog not read yet
    /// (which may hold some).
    pub fn holds_shared_or_backlog(&self) -> bool {
        let st = self.state.lock();
        st.backlog.is_some() || shared_deliveries(&st).next().is_some()
    }

    /// The deliveries that came through shared subscriptions and may go to
    /// another member of their group instead (MQTT 5 section 4.8.2): those
    /// still queued (never sent), and QoS 1 ones sent but not acknowledged.
    /// A QoS 2 message once sent stays with this client (MQTT-4.8.2-4, -5).
    /// Returns copies; [`withdraw`](Self::withdraw) takes one out.
    pub fn shared_candidates(&self) -> Vec<Delivery> {
        let st = self.state.lock();
        let sent = st.inflight.iter().filter(|i| {
            i.delivery.shared.is_some()
                && i.delivery.qos == QoS::AtLeastOnce
                && i.state() != InflightState::Released
        });
        let queued = st.pending.iter().filter(|d| d.shared.is_some());
        sent.map(|i| i.delivery.clone())
            .chain(queued.cloned())
            .collect()
    }

    /// Takes out a delivery returned by
    /// [`shared_candidates`](Self::shared_candidates) if it is still here and
    /// unacknowledged; false if it is gone (acknowledged meanwhile).
    pub fn withdraw(&self, delivery: &Delivery, journal: &mut Journal) -> bool {
        let mut st = self.state.lock();
        let same = |d: &Delivery| {
            Arc::ptr_eq(&d.message, &delivery.message) && d.shared == delivery.shared
        };
        let removed = if let Some(packet_id) = delivery.packet_id {
            let found = st.inflight.position_where(|i| {
                i.packet_id == packet_id && i.state() == InflightState::Sent && same(&i.delivery)
            });
            found
                .and_then(|i| st.inflight.remove(i))
                .map(|i| i.delivery)
        } else {
            let found = st.pending.iter().position(same);
            found.and_then(|i| remove_pending(&mut st, i))
        };
        match removed {
            Some(d) => {
                self.forget(&st, &d, journal);
                true
            }
            None => false,
        }
    }

    /// PUBACK received. Returns false if no QoS 1 message waited for it.
    pub fn puback(self: &Arc<Self>, packet_id: u16) -> bool {
        self.complete(packet_id, |i| {
            i.delivery.qos == QoS::AtLeastOnce && i.state() != InflightState::Persisting
        })
    }

    /// Removes the in-flight message `packet_id` if `expected` holds for it,
    /// and lets the next pending message take its place in the window.
    fn complete(self: &Arc<Self>, packet_id: u16, expected: impl Fn(&Inflight) -> bool) -> bool {
        let mut journal = Journal::new();
        let found = {
            let mut st = self.state.lock();
            let removed = match st.inflight.position(packet_id) {
                Some(i) if expected(st.inflight.get(i)) => st.inflight.remove(i),
                _ => None,
            };
            if let Some(done) = &removed {
                let now = Instant::now();
                self.note_progress(&mut st, now);
                self.forget(&st, &done.delivery, &mut journal);
                self.fill_window(&mut st, now, &mut journal);
            }
            removed.is_some()
        };
        self.commit(journal);
        found
    }

    /// PUBREC received with this reason code on `connection_id`. Queues
    /// the PUBREL (for a durable session, once the new state is durable, so
    /// a restart never sends the PUBLISH again after its PUBREL), or forgets
    /// the message when the PUBREC reported an error. An unknown packet id
    /// is answered with PUBREL 0x92.
    pub fn pubrec(self: &Arc<Self>, connection_id: u64, packet_id: u16, code: ReasonCode) {
        let mut journal = Journal::new();
        {
            let mut st = self.state.lock();
            let index = st.inflight.position(packet_id).filter(|&i| {
                st.inflight.get(i).delivery.qos == QoS::ExactlyOnce
                    && matches!(
                        st.inflight.get(i).state(),
                        InflightState::Sent | InflightState::Resend
                    )
            });
            if index.is_some() && st.overflow.is_some() {
                self.note_progress(&mut st, Instant::now());
            }
            match index {
                Some(i) if code.is_success() => {
                    let delivery = &st.inflight.get(i).delivery;
                    let stored = delivery.message.store_id.get().copied();
                    if let Some(message_id) = stored.filter(|_| st.durable && delivery.seq != 0) {
                        st.inflight.set_state(i, InflightState::Releasing);
                        self.store_before_sending(st.inflight.get(i), message_id, &mut journal);
                    } else {
                        st.inflight.set_state(i, InflightState::Released);
                        push_to(
                            &mut st,
                            connection_id,
                            pubrel(packet_id, ReasonCode::Success),
                        );
                    }
                }
                Some(i) => {
                    if let Some(done) = st.inflight.remove(i) {
                        self.forget(&st, &done.delivery, &mut journal);
                    }
                    self.fill_window(&mut st, Instant::now(), &mut journal);
                }
                None => {
                    // A PUBREC again for a message already released: its
                    // PUBREL goes again (MQTT 5 4.3.3), or is on its way
                    // once the store has the PUBREC (`Releasing`).
                    let released = st
                        .inflight
                        .position(packet_id)
                        .map(|i| st.inflight.get(i).state());
                    let code = match released {
                        Some(InflightState::Released) => Some(ReasonCode::Success),
                        Some(InflightState::Releasing) => None,
                        _ => Some(ReasonCode::PacketIdentifierNotFound),
                    };
                    if let Some(code) = code {
                        push_to(&mut st, connection_id, pubrel(packet_id, code));
                    }
                }
            }
        }
        self.commit(journal);
    }

    /// Records in `journal` what `sent` waits for to be durable before it
    /// goes on the wire: its packet id (`Persisting`, then the PUBLISH is
    /// sent) or its PUBREC (`Releasing`, then the PUBREL). A refused write
    /// puts the session on [`StoreRetries`].
    fn store_before_sending(
        self: &Arc<Self>,
        sent: &Inflight,
        message_id: u64,
        journal: &mut Journal,
    ) {
        let releasing = sent.state() == InflightState::Releasing;
        journal.push(Op::PutQueueEntry(self.queue_entry(
            &sent.delivery,
            message_id,
            Some(sent.packet_id),
            if releasing {
                DeliveryState::AwaitingComp
            } else {
                DeliveryState::AwaitingAck
            },
        )));
        let (session, packet_id, seq) = (Arc::clone(self), sent.packet_id, sent.delivery.seq);
        journal.after(move |stored| match stored {
            Ok(()) if releasing => session.send_pubrel(packet_id),
            Ok(()) => session.release(packet_id, seq),
            Err(_) => session.context.store_retries.add(&session),
        });
    }

    /// Writes again the in-flight states the store refused (see
    /// [`StoreRetries`]): packet ids of PUBLISHes not sent yet, PUBRECs
    /// whose PUBREL waits.
    fn store_inflight_again(self: &Arc<Self>) {
        let Some(p) = &self.context.persistence else {
            return;
        };
        let mut journal = Journal::new();
        let mut unstored = Vec::new();
        {
            let st = self.state.lock();
            if st.ended {
                return;
            }
            let waiting = st.inflight.iter().filter(|sent| {
                matches!(
                    sent.state(),
                    InflightState::Persisting | InflightState::Releasing
                )
            });
            for sent in waiting {
                if st.durable {
                    // The message again too: the refused batch may have
                    // been the one that stored it.
                    let message_id = journal.reference(p, &sent.delivery.message);
                    self.store_before_sending(sent, message_id, &mut journal);
                } else {
                    // Resumed with expiry 0 meanwhile: nothing is kept in
                    // the store any more, so nothing is waited for.
                    let releasing = sent.state() == InflightState::Releasing;
                    unstored.push((sent.packet_id, sent.delivery.seq, releasing));
                }
            }
        }
        for (packet_id, seq, releasing) in unstored {
            if releasing {
                self.send_pubrel(packet_id);
            } else {
                self.release(packet_id, seq);
            }
        }
        self.commit(journal);
    }

    /// Sends the PUBREL of `packet_id` once its PUBREC is durable; offline
    /// meanwhile, the next attach sends it.
    fn send_pubrel(&self, packet_id: u16) {
        let mut st = self.state.lock();
        let Some(i) = st
            .inflight
            .position(packet_id)
            .filter(|&i| st.inflight.get(i).state() == InflightState::Releasing)
        else {
            return;
        };
        st.inflight.set_state(i, InflightState::Released);
        if let Some(link) = &mut st.link {
            link.push(pubrel(packet_id, ReasonCode::Success));
        }
    }

    /// Puts a PUBLISH that waited in `Persisting` on the wire once its
    /// packet id is durable.
    fn release(&self, packet_id: u16, seq: u64) {
        let mut st = self.state.lock();
        let Some(i) = st.inflight.position_where(|i| {
            i.packet_id == packet_id
                && i.delivery.seq == seq
                && i.state() == InflightState::Persisting
        }) else {
            return;
        };
        if st.link.is_some() {
            st.inflight.set_state(i, InflightState::Sent);
            self.push_inflight_to_link(&mut st, i);
        } else {
            // Offline meanwhile: the next attach sends it.
            st.inflight.set_state(i, InflightState::Resend);
        }
    }

    /// PUBCOMP received. Returns false if no PUBREL waited for it.
    pub fn pubcomp(self: &Arc<Self>, packet_id: u16) -> bool {
        self.complete(packet_id, |i| i.state() == InflightState::Released)
    }

    /// Forgets an in-flight message that will never be sent (it exceeded the
    /// client's Maximum Packet Size): the spec says to act as if it completed.
    pub fn discard_inflight(self: &Arc<Self>, packet_id: Option<u16>) {
        let Some(packet_id) = packet_id else {
            return;
        };
        let mut journal = Journal::new();
        {
            let mut st = self.state.lock();
            if let Some(done) = st
                .inflight
                .position(packet_id)
                .and_then(|i| st.inflight.remove(i))
            {
                self.forget(&st, &done.delivery, &mut journal);
                self.fill_window(&mut st, Instant::now(), &mut journal);
            }
        }
        self.commit(journal);
    }

    /// An incoming QoS 2 PUBLISH: returns true the first time `packet_id` is
    /// seen (route it), false for a retransmission before PUBREL (do not).
    /// `limit` bounds the number of QoS 2 flows the current connection has
    /// open (flows carried from an earlier one do not count, see
    /// incoming_qos2.rs); `Err` when exceeded. A durable session records the
    /// id in `journal`, so that a restart still recognises the
    /// retransmission.
    pub fn incoming_qos2(
        &self,
        packet_id: u16,
        limit: u16,
        journal: &mut Journal,
    ) -> Result<bool, ReceiveMaximumExceeded> {
        let mut st = self.state.lock();
        match st
            .incoming_qos2
            .get_or_insert_with(Box::default)
            .open(packet_id, limit)
        {
            Opened::New => {}
            Opened::Retransmission => return Ok(false),
            Opened::OverLimit => return Err(ReceiveMaximumExceeded),
        }
        if st.durable {
            journal.push(Op::AddIncomingQos2 {
                client_id: Arc::clone(&self.client_id),
                packet_id,
            });
        }
        Ok(true)
    }

    /// PUBREL received: forgets the packet id, recording that in `journal`
    /// for a durable session. Returns false if it was unknown.
    ///
    /// The PUBCOMP must wait for that journal: once the client has it, it
    /// may use the id for a new message, and a restart that still found
    /// the id open would take that message for a retransmission and drop
    /// it.
    pub fn pubrel(&self, packet_id: u16, journal: &mut Journal) -> bool {
        let mut st = self.state.lock();
        let known = st
            .incoming_qos2
            .as_mut()
            .is_some_and(|flows| flows.release(packet_id));
        if known && st.durable {
            journal.push(Op::RemoveIncomingQos2 {
                client_id: Arc::clone(&self.client_id),
                packet_id,
            });
        }
        known
    }

    /// Ends the QoS 2 flow `packet_id` opened by a PUBLISH whose batch
    /// could not be stored: its PUBREC carries an error (MQTT 5: the flow
    /// is over, and the client may use the id again) or the connection
    /// closes (MQTT 3.x: the client sends the PUBLISH again, and it must be
    /// stored then, not taken for a retransmission).
    ///
    /// The id is removed from the store as well: the failure may have been
    /// another batch the acknowledgement depended on (the retained
    /// message's, see `Journal::depend_on`) while the one that opened the
    /// flow was written. Called from that batch's completion, the removal
    /// is submitted after it.
    pub fn abandon_incoming_qos2(&self, packet_id: u16) {
        // What a PUBREL does, with nobody to answer.
        let mut journal = Journal::new();
        self.pubrel(packet_id, &mut journal);
        self.commit(journal);
    }

    /// Commits `journal` unless the session has ended, under the session's
    /// lock: a journal that changes this session's entries then reaches the
    /// store before the deletion of the session by an end that comes after
    /// it, never after (a new session of the same client numbers its
    /// entries from 1 again, and a late deletion could remove one of
    /// those). `journal` must have no completions (they could run at once,
    /// on this thread, under the lock).
    pub fn commit_unless_ended(&self, journal: Journal) {
        let st = self.state.lock();
        if !st.ended {
            self.commit(journal);
        }
    }

    /// Whether the QoS 2 flow `packet_id` is open.
    pub fn has_incoming_qos2(&self, packet_id: u16) -> bool {
        self.state
            .lock()
            .incoming_qos2
            .as_ref()
            .is_some_and(|flows| flows.is_open(packet_id))
    }

    /// Moves what is queued for `connection_id` into `out`, a batch of at
    /// most [`WRITE_BATCH_BYTES`] of PUBLISHes, which count against the
    /// broker's budget until the writer calls again (see `Link::writing`).
    /// Returns false when that connection is no longer attached (taken over
    /// or detached).
    pub fn drain_outbound(
        self: &Arc<Self>,
        connection_id: u64,
        out: &mut VecDeque<Outbound>,
    ) -> bool {
        let mut journal = Journal::new();
        let attached = {
            let mut st = self.state.lock();
            match &mut st.link {
                Some(link) if link.connection_id == connection_id => {
                    let now = Instant::now();
                    if link.drain_into(out, self.context.clock.now_ms()) > 0 {
                        // The writer wrote its last batch and came back for
                        // PUBLISHes: the client is reading.
                        self.note_progress(&mut st, now);
                    }
                    // The queue has room again: messages that waited for
                    // it may go now.
                    self.fill_window(&mut st, now, &mut journal);
                    true
                }
                _ => false,
            }
        };
        self.commit(journal);
        attached
    }

    /// Moves a batch queued for whichever connection is attached into
    /// `out`, as if written at once (for inspection and tests; the writer
    /// uses [`drain_outbound`](Self::drain_outbound)).
    pub fn drain_outbound_any(&self, out: &mut VecDeque<Outbound>) {
        let mut st = self.state.lock();
        if let Some(link) = &mut st.link {
            link.drain_into(out, self.context.clock.now_ms());
            link.release_writing();
        }
    }

    /// Replies queued for `connection_id` and not yet taken by its writer.
    pub fn control_backlog(&self, connection_id: u64) -> usize {
        match &self.state.lock().link {
            Some(link) if link.connection_id == connection_id => link.controls,
            _ => 0,
        }
    }

    /// Replies queued for whichever connection is attached (for inspection).
    pub fn attached_control_backlog(&self) -> usize {
        self.state.lock().link.as_ref().map_or(0, |l| l.controls)
    }

    /// Number of messages waiting in this session: (queued, in flight).
    /// Queued counts a stored backlog not read yet.
    pub fn queued_len(&self) -> (usize, usize) {
        let st = self.state.lock();
        let backlog = st.backlog.as_ref().map_or(0, |b| b.count);
        (st.pending.len() + backlog, st.inflight.len())
    }

    /// Queued deliveries still only in the store after a restart (for
    /// inspection; see [`Backlog`]).
    pub fn stored_backlog(&self) -> usize {
        self.state.lock().backlog.as_ref().map_or(0, |b| b.count)
    }

    /// Gives `delivery` a packet id and a place in the in-flight window, and
    /// sends it, except a durable QoS 2 delivery: that one waits until its
    /// packet id is durable (see [`release`](Self::release)). `new_entry`:
    /// the delivery has no stored queue entry yet.
    fn send_inflight(
        self: &Arc<Self>,
        st: &mut SessionState,
        delivery: Delivery,
        journal: &mut Journal,
        new_entry: bool,
    ) {
        let store = self
            .context
            .persistence
            .as_ref()
            .filter(|_| st.durable && delivery.seq != 0)
            .filter(|_| new_entry || delivery.message.store_id.get().is_some());
        // Later deliveries wait behind a waiting one: the order of a
        // topic's messages holds across QoS levels.
        let state = match store {
            Some(_) if delivery.qos == QoS::ExactlyOnce || st.inflight.has_persisting() => {
                InflightState::Persisting
            }
            _ => InflightState::Sent,
        };
        let packet_id = match st.inflight.assign(delivery, state) {
            Ok(packet_id) => packet_id,
            Err(delivery) => {
                // Every packet id is held (only when the client's window is
                // all 65,535): it waits for one to come free.
                st.pending_bytes += queued_size(&delivery);
                st.pending.push_front(delivery);
                return;
            }
        };
        let Some(sent) = st.inflight.last() else {
            return;
        };
        // Also for an entry that exists: the message goes with the
        // replacement (see `Journal::reference`).
        let message_id = store.map(|p| journal.reference(p, &sent.delivery.message));
        if let Some(message_id) = message_id {
            if state == InflightState::Persisting {
                self.store_before_sending(sent, message_id, journal);
            } else {
                // A new entry whose PUBLISH leaves now is likely forgotten
                // one round trip later: inserting it lets the writer net the
                // pair away (tern-storage's `netting.rs`).
                let entry = self.queue_entry(
                    &sent.delivery,
                    message_id,
                    Some(packet_id),
                    DeliveryState::AwaitingAck,
                );
                journal.push(if new_entry {
                    Op::InsertQueueEntry(entry)
                } else {
                    Op::PutQueueEntry(entry)
                });
            }
        }
        if state == InflightState::Sent && st.link.is_some() {
            let index = st.inflight.len() - 1;
            self.push_inflight_to_link(st, index);
        }
    }

    /// Queues the PUBLISH of in-flight entry `index` for the attached
    /// connection (see [`push_to_link`](Self::push_to_link)).
    fn push_inflight_to_link(&self, st: &mut SessionState, index: usize) {
        let delivery = st.inflight.get(index).delivery.clone();
        self.push_to_link(st, delivery, Some(index));
    }

    /// Queues a PUBLISH for the attached connection. If the connection's
    /// queue is stalled (stall.rs), the message is detached from its read
    /// buffer first, with the in-flight entry `inflight` the delivery is a
    /// copy of; the first time, so is everything else held for the client.
    #[inline]
    fn push_to_link(&self, st: &mut SessionState, delivery: Delivery, inflight: Option<usize>) {
        let Some(link) = st.link.as_mut() else {
            return;
        };
        match link.publish_waits(&self.context.clock) {
            Waiting::Briefly => link.push_publish(delivery, self.context.max_client_outbound_bytes),
            waiting => self.push_detached_to_link(st, delivery, inflight, waiting),
        }
    }

    /// [`push_to_link`](Self::push_to_link) for a stalled queue.
    #[cold]
    fn push_detached_to_link(
        &self,
        st: &mut SessionState,
        mut delivery: Delivery,
        inflight: Option<usize>,
        waiting: Waiting,
    ) {
        let message = self.detached_for_stalled(st, &delivery.message, waiting);
        if let Some(index) = inflight {
            st.inflight.delivery_mut(index).message = Arc::clone(&message);
        }
        delivery.message = message;
        if let Some(link) = st.link.as_mut() {
            link.push_publish(delivery, self.context.max_client_outbound_bytes);
        }
    }

    /// The copy of `message` a stalled queue takes (stall.rs); a queue found
    /// stalled just now first has everything held for its client detached.
    fn detached_for_stalled(
        &self,
        st: &mut SessionState,
        message: &Arc<Message>,
        waiting: Waiting,
    ) -> Arc<Message> {
        if waiting == Waiting::NewlyStalled {
            self.detach_held(st);
        }
        self.detached(message)
    }

    /// `message`, detached from its read buffer (`Message::detached`), once
    /// it has its store id when there is a store: the copy then stays one
    /// stored record with it, whichever session copies it first, durable
    /// or not (a copy made without the id would be shared, without it, by
    /// a durable session that detaches the message later). Every detach of
    /// a queued delivery goes through here.
    fn detached(&self, message: &Arc<Message>) -> Arc<Message> {
        if let Some(p) = &self.context.persistence {
            p.store_id(message);
        }
        message.detached()
    }

    /// A queue of the connected client is found stalled (stall.rs): every
    /// message held for it (its connection's queue, the in-flight window,
    /// the QoS 1/2 queue) is replaced by its detached copy, so what the
    /// client does not take keeps no read buffer alive.
    ///
    /// A copy in the connection's queue is counted as one queued now would
    /// be (`push_detached_batch`, `push_detached_to_link`): a batch's copy is
    /// this queue's own, so the queue counts its memory; a message's copy is
    /// counted by the first queue that holds it and did not count the
    /// original. A copy shared by several stalled queues may so be counted
    /// more than once, never less.
    fn detach_held(&self, st: &mut SessionState) {
        Metrics::inc(&self.context.metrics.queues_stalled);
        let mut detach = |delivery: &mut Delivery| {
            delivery.message = self.detached(&delivery.message);
        };
        if let Some(link) = st.link.as_mut() {
            let mut copies = 0;
            for item in &mut link.outbound {
                let before = item.publish_cost().unwrap_or(0);
                match item {
                    Outbound::Publish(delivery) => {
                        detach(delivery);
                        // Claimed by a queue that counted the original too,
                        // so that no other queue counts the copy again.
                        let claimed = delivery.message.claim_cost();
                        delivery.carries_message_cost |= claimed;
                    }
                    Outbound::Batch(delivery) => {
                        delivery.batch = delivery.batch.copied(|m| self.detached(m));
                        delivery.carries_cost = delivery.batch.claim_cost();
                    }
                    _ => {}
                }
                copies += item.publish_cost().unwrap_or(0) - before;
            }
            link.charge(copies, self.context.max_client_outbound_bytes);
        }
        st.inflight.deliveries_mut().for_each(&mut detach);
        st.pending.iter_mut().for_each(&mut detach);
    }

    /// True when a connection is attached and its unwritten bytes are under
    /// `max_client_outbound_bytes`: QoS 1/2 messages beyond that wait in
    /// `pending` (bounded by `max_queued`), so a client that stops reading
    /// holds at most that much of the broker-wide budget.
    fn link_has_room(&self, st: &SessionState) -> bool {
        st.link
            .as_ref()
            .is_some_and(|l| l.charged < self.context.max_client_outbound_bytes)
    }

    /// Moves pending messages into the in-flight window while it has room.
    fn fill_window(self: &Arc<Self>, st: &mut SessionState, now: Instant, journal: &mut Journal) {
        if st.retained_backlog.is_some() {
            self.refill_retained(st, journal);
        }
        while self.link_has_room(st) && st.inflight.used() < usize::from(st.send_quota) {
            // Messages from an earlier connection go first, in order.
            // Sent again even if its message expired since: its delivery
            // has started (MQTT-3.3.2-5 deletes only what has not), and an
            // unacknowledged PUBLISH is sent again (MQTT-4.4.0-1), with an
            // interval of at least 1 (`Message::remaining_expiry`).
            if let Some(i) = st.inflight.first_resend() {
                st.inflight.set_state(i, InflightState::Sent);
                self.push_inflight_to_link(st, i);
                continue;
            }
            if let Some(backlog) = st.backlog.as_mut() {
                // The stored backlog goes before what was queued since.
                if st.pending.front().is_none_or(|d| d.seq >= backlog.end) {
                    if !backlog.reading {
                        backlog.reading = true;
                        self.read_backlog(backlog.after, backlog.end, Duration::ZERO);
                    }
                    break;
                }
            }
            let Some(delivery) = remove_pending(st, 0) else {
                break;
            };
            st.pending_stall.taken(self.context.clock.now_ms());
            if delivery.message.is_expired(now) {
                Metrics::inc(&self.context.metrics.messages_expired);
                self.forget(st, &delivery, journal);
                continue;
            }
            self.send_inflight(st, delivery, journal, false);
        }
        self.note_drained(st, now);
    }
}

/// A hand-over of a session's shared messages under way: ends when dropped
/// (see [`Session::begin_hand_over`]), also when the task that held it is
/// aborted.
pub struct HandOver(Arc<Session>);

impl Drop for HandOver {
    fn drop(&mut self) {
        self.0.state.lock().handing_over -= 1;
        // Waiters may wait for a count above 0 (`hand_overs_done`).
        self.0.room.notify_waiters();
    }
}

/// The bytes a queued delivery counts against `max_queued_bytes`.
pub(crate) fn queued_size(delivery: &Delivery) -> usize {
    delivery.message.weight() + delivery.subscription_ids.heap_bytes()
}

fn push_pending(st: &mut SessionState, delivery: Delivery) {
    st.pending_bytes += queued_size(&delivery);
    st.pending.push_back(delivery);
}

/// The deliveries in memory, queued or in flight, that came through a
/// shared subscription.
fn shared_deliveries(st: &SessionState) -> impl Iterator<Item = &Delivery> {
    let inflight = st.inflight.iter().map(|i| &i.delivery);
    st.pending
        .iter()
        .chain(inflight)
        .filter(|d| d.shared.is_some())
}

fn remove_pending(st: &mut SessionState, index: usize) -> Option<Delivery> {
    let delivery = st.pending.remove(index)?;
    st.pending_bytes -= queued_size(&delivery);
    Some(delivery)
}

/// A PUBREL without properties.
fn pubrel(packet_id: u16, code: ReasonCode) -> Outbound {
    Outbound::Ack(AckKind::PubRel, packet_id, code)
}

/// Queues `item` for `connection_id` if it is still the attached connection.
fn push_to(st: &mut SessionState, connection_id: u64, item: Outbound) {
    if let Some(link) = st
        .link
        .as_mut()
        .filter(|l| l.connection_id == connection_id)
    {
        link.push(item);
    }
}

fn cancel_timers(st: &mut SessionState) {
    for timer in st.timers.drain(..) {
        timer.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_backlog_read_is_retried_ever_more_slowly_up_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|n| backlog_retry_wait(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backlog_retry_wait(u32::MAX), BACKLOG_RETRY_MAX);
    }

    /// A delivery sits in a queue slot of every subscriber it goes to, and
    /// a fan-out writes one per subscriber: its size is memory traffic on
    /// the hot path (80 bytes before the shared origin was boxed and the
    /// subscription identifiers made 16 bytes).
    #[test]
    fn a_queued_delivery_is_at_most_48_bytes() {
        assert!(
            std::mem::size_of::<Delivery>() <= 48,
            "{}",
            std::mem::size_of::<Delivery>()
        );
        assert!(
            std::mem::size_of::<Outbound>() <= 48,
            "{}",
            std::mem::size_of::<Outbound>()
        );
    }
}
