//! The delivery path of a session: admitting a delivery against the
//! session's bounds, queueing it (`pending`) or giving it a packet id and a
//! place in the in-flight window, and pushing what is sent to the link.

use super::*;
use crate::log_throttle::throttled;

/// How many times a retained message replaced while it waited in a
/// session for room (between a SUBSCRIBE's lookup and its turn) is looked
/// up again: each lookup finds the value of that moment, and only a topic
/// replaced that many times within the few microseconds between a lookup
/// and its check runs out (its newest value went to the subscription live
/// then).
const SUPERSEDED_RETRIES: usize = 4;

/// A retained message a SUBSCRIBE found, with the options of the
/// subscription that found it (the most QoS it is sent at, its
/// identifier), waiting in its session for room in the queues. It becomes
/// a delivery only when it is its turn: until then it costs its session 24
/// bytes, and its SUBSCRIBE nothing per message beyond finding it.
#[derive(Debug, Clone)]
pub struct WaitingRetained {
    pub message: Arc<Message>,
    pub options: SubscriptionOptions,
}

// What the type's documentation promises of its size (a SUBSCRIBE may
// leave `max_pending_retained` of them in a session).
const _: () = assert!(std::mem::size_of::<WaitingRetained>() <= 24);

impl WaitingRetained {
    /// Its delivery: at the lower of the message's QoS and the
    /// subscription's, flagged RETAIN (MQTT-3.3.1-8), with the
    /// subscription's identifier.
    fn into_delivery(self) -> Delivery {
        let granted = QoS::from_u8(self.options.qos).unwrap_or(QoS::AtMostOnce);
        let qos = self.message.qos.min(granted);
        let ids = self.options.subscription_id.into_iter().collect();
        Delivery::with_reference(self.message, qos, true, ids)
    }
}

impl Session {
    /// Hands a message to this session (its QoS already downgraded to the
    /// subscription's maximum). A durable session records a QoS 1/2
    /// delivery in `journal`.
    pub fn deliver(self: &Arc<Self>, delivery: Delivery, journal: &mut Journal) -> Admission {
        self.deliver_with(delivery, journal, true)
    }

    /// Takes the retained messages a SUBSCRIBE found, after its SUBACK, for
    /// the attached client: what the queues have room for now goes in at
    /// once, and the rest joins those waiting for room (at most
    /// `max_pending_retained` in the session and `max_waiting_retained` in
    /// the broker, the rest dropped and counted: retained_backlog.rs), to
    /// become deliveries as the client reads
    /// ([`refill_retained`](Self::refill_retained)). Under one lock, and
    /// without looking at the messages beyond those taken at once: a
    /// SUBSCRIBE that found 100,000 hands them over in one move (a copy
    /// only of those kept when a bound cut them), whether on its
    /// connection's worker or on the store's writer thread (a durable
    /// session's SUBACK waits for the store, and its retained messages
    /// follow from there).
    ///
    /// There is no publisher to slow down: what the queues cannot take
    /// waits here, never beyond their bounds. A client that left before
    /// its SUBACK went out finds the QoS 1/2 ones queued for it, as any
    /// delivery to an offline session, within the queue's bounds (the rest
    /// dropped and counted); QoS 0 ones are not kept for it.
    pub fn offer_retained(self: &Arc<Self>, found: Vec<WaitingRetained>, journal: &mut Journal) {
        if found.is_empty() {
            return;
        }
        let mut st = self.state.lock();
        if st.ended {
            return;
        }
        if st.link.is_none() {
            let mut now = LazyInstant::default();
            for next in found {
                if let Some(next) = self.still_retained(next, &mut now) {
                    let _ = self.deliver_locked(&mut st, next.into_delivery(), journal, false);
                }
            }
            return;
        }
        let waiting = st.retained_backlog.as_ref().map_or(0, |b| b.len());
        let room = self.context.max_pending_retained.saturating_sub(waiting);
        // The SUBSCRIBE's vector becomes the queue as it is.
        let mut found = VecDeque::from(found);
        let dropped = found.len().saturating_sub(room);
        let mut refused = 0;
        found.truncate(room);
        let mut now = LazyInstant::default();
        if waiting == 0 {
            // What the queues take now never waits, whatever the
            // broker-wide bound on waiting ones.
            self.move_retained_into_queues(&mut st, &mut found, &mut now, journal);
        }
        if !found.is_empty() {
            let budget = &self.context.waiting_retained;
            let backlog = st
                .retained_backlog
                .get_or_insert_with(|| Box::new(RetainedBacklog::new(Arc::clone(budget))));
            refused = backlog.admit(found);
            if backlog.is_empty() {
                st.retained_backlog = None;
            }
        }
        if waiting > 0 {
            // Those that waited before go first, and may find room now.
            self.refill_retained(&mut st, &mut now, journal);
        }
        drop(st);
        if refused > 0 {
            Metrics::add(
                &self.context.metrics.retained_waiting_refused,
                refused as u64,
            );
            throttled!(WARN, client_id = %self.client_id, refused, "retained messages left out: limits.max_waiting_retained reached");
        }
        Metrics::add(
            &self.context.metrics.messages_dropped_queue_full,
            (dropped + refused) as u64,
        );
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

    /// Whether a retained message that waited may move into the session's
    /// queues now: they have room for it, and for QoS 0 the connection's
    /// outbound queue holds less than [`RETAINED_REFILL_BYTES`] (the rest
    /// follows as the writer takes from it). QoS 1/2 ones are bounded by
    /// the in-flight window already.
    fn has_room_for_retained(&self, st: &SessionState, delivery: &Delivery) -> bool {
        if delivery.qos != QoS::AtMostOnce {
            return self.has_room_for(st, delivery);
        }
        st.link.as_ref().is_some_and(|l| {
            l.charged < RETAINED_REFILL_BYTES.min(self.context.max_client_outbound_bytes)
        })
    }

    /// Whether a QoS 1/2 delivery may go straight into the in-flight window:
    /// the connection has room, nothing waits before it, the window has a
    /// free place and no resend is due.
    fn window_open(&self, st: &SessionState) -> bool {
        self.link_has_room(st)
            && st.pending.is_empty()
            && st.backlog.is_none()
            && st.inflight.len() < usize::from(st.send_quota)
            && self.window_has_bytes(st)
            && !st.inflight.has_resend()
    }

    /// Whether the in-flight window holds less than `max_inflight_bytes`:
    /// it takes one more message, of any size, so a message larger than the
    /// bound is still sent, alone.
    fn window_has_bytes(&self, st: &SessionState) -> bool {
        st.inflight.used_bytes() < self.context.max_inflight_bytes
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
    /// [`offer_retained`](Self::offer_retained)) into the queues while they
    /// have room, in order, each made a delivery then.
    ///
    /// One that a newer publish replaced or cleared while it waited is not
    /// sent: the newer value went to the subscription live, and the older
    /// one must not follow it. The topic's value now takes its place,
    /// flagged RETAIN: the live copy may not have reached the client (a
    /// QoS 0 copy its full queue dropped, which a queue with retained
    /// messages waiting is likely to be, or No Local), and one that did
    /// reach it gets the value again after it. Checked under this session's
    /// lock, a value not yet replaced comes before any successor, whose
    /// live delivery needs the lock. One that expired, or that an ACL deny
    /// rule keeps from the client, is left out. `now` is read only for a
    /// message with an expiry.
    fn refill_retained(
        self: &Arc<Self>,
        st: &mut SessionState,
        now: &mut LazyInstant,
        journal: &mut Journal,
    ) {
        let Some(mut waiting) = st.retained_backlog.take() else {
            return;
        };
        waiting.take_with(|queue| self.move_retained_into_queues(st, queue, now, journal));
        if !waiting.is_empty() {
            st.retained_backlog = Some(waiting);
        }
    }

    /// Moves retained messages from the front of `queue` into the session's
    /// queues while they have room (see
    /// [`refill_retained`](Self::refill_retained)).
    fn move_retained_into_queues(
        self: &Arc<Self>,
        st: &mut SessionState,
        queue: &mut VecDeque<WaitingRetained>,
        now: &mut LazyInstant,
        journal: &mut Journal,
    ) {
        while let Some(next) = queue.pop_front() {
            let Some(next) = self.still_retained(next, now) else {
                continue;
            };
            let options = next.options;
            let delivery = next.into_delivery();
            if !self.has_room_for_retained(st, &delivery) {
                queue.push_front(WaitingRetained {
                    message: delivery.message,
                    options,
                });
                break;
            }
            // There is room: taken (or, expired meanwhile, counted).
            let _ = self.deliver_locked(st, delivery, journal, false);
        }
    }

    /// What of `found` is to be sent now: nothing if it expired or an ACL
    /// deny rule keeps it from the client; the topic's value now in its
    /// place if a newer publish replaced it (see
    /// [`refill_retained`](Self::refill_retained)).
    fn still_retained(
        &self,
        found: WaitingRetained,
        now: &mut LazyInstant,
    ) -> Option<WaitingRetained> {
        let message = &found.message;
        if (message.expires_at.is_some() && message.is_expired(now.get())) || self.denies(message) {
            return None;
        }
        if message.is_superseded() {
            return self.current_retained(&found);
        }
        Some(found)
    }

    /// The topic's retained value now, to wait or be sent in place of
    /// `stale`, which it replaced: `None` when the topic has none (cleared),
    /// it expired, or it was replaced again each of [`SUPERSEDED_RETRIES`]
    /// times it was looked up (its successor then went live).
    fn current_retained(&self, stale: &WaitingRetained) -> Option<WaitingRetained> {
        let topic = stale.message.topic_str();
        let now = Instant::now();
        for _ in 0..SUPERSEDED_RETRIES {
            let current = self.context.retained.get(topic)?;
            if current.is_expired(now) || self.denies(&current) {
                return None;
            }
            if current.is_superseded() {
                continue;
            }
            return Some(WaitingRetained {
                message: current,
                options: stale.options,
            });
        }
        None
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
    pub(super) fn note_progress(&self, st: &mut SessionState, now: Instant) {
        if let Some(overflow) = st.overflow.as_mut() {
            overflow.progress(now, self.context.queue_full_wait);
        }
    }

    /// Ends a full-queue episode once the queues have drained far enough:
    /// to half their bounds while publishers wait, to empty once the client
    /// counted as slow. Wakes the waiting publishers.
    fn note_drained(&self, st: &mut SessionState, now: &mut LazyInstant) {
        let wait = self.context.queue_full_wait;
        let Some(overflow) = st.overflow.as_mut() else {
            return;
        };
        let outpaced = overflow.outpaced(now.get(), wait);
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
    pub(super) fn queue_entry(
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
    pub(super) fn forget(&self, st: &SessionState, delivery: &Delivery, journal: &mut Journal) {
        if st.durable && delivery.seq != 0 {
            journal.push(Op::DeleteQueueEntry {
                client_id: Arc::clone(&self.client_id),
                seq: delivery.seq,
            });
        }
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
    pub(super) fn push_inflight_to_link(&self, st: &mut SessionState, index: usize) {
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
    pub(super) fn detached(&self, message: &Arc<Message>) -> Arc<Message> {
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
    /// `now` is read only if a pending message has an expiry or a full
    /// queue's episode is on.
    pub(super) fn fill_window(
        self: &Arc<Self>,
        st: &mut SessionState,
        now: &mut LazyInstant,
        journal: &mut Journal,
    ) {
        if st.retained_backlog.is_some() {
            self.refill_retained(st, now, journal);
        }
        while self.link_has_room(st)
            && st.inflight.used() < usize::from(st.send_quota)
            && self.window_has_bytes(st)
        {
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
            if delivery.message.expires_at.is_some() && delivery.message.is_expired(now.get()) {
                Metrics::inc(&self.context.metrics.messages_expired);
                self.forget(st, &delivery, journal);
                continue;
            }
            self.send_inflight(st, delivery, journal, false);
        }
        self.note_drained(st, now);
    }
}
