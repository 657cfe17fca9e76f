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
//!
//! # Layout
//!
//! This file holds the session's state and its life: attach, detach, the
//! will, expiry and the durable record. `Session`'s methods for each flow
//! live beside it, one file a flow, all under the one lock above:
//!
//! - `delivery.rs`: what is queued ([`Delivery`], [`Outbound`]) and
//!   [`Admission`];
//! - `deliver.rs`: admitting a delivery, `pending`, the in-flight window;
//! - `acks.rs`: PUBACK, PUBREC and PUBCOMP of outgoing flows;
//! - `incoming.rs`: incoming QoS 2 flows until PUBREL;
//! - `link.rs`: the attached connection ([`ConnectionControl`], `Link`) and
//!   what its writer drains;
//! - `backlog.rs`: restoring a session, and the stored queue it reads in
//!   chunks;
//! - `hand_over.rs`: shared-subscription messages handed to another member;
//! - `store_retries.rs`: in-flight states the store refused, written again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use smallvec::SmallVec;
use tern_codec::{Packet, ProtocolVersion, PubAck, QoS, ReasonCode, Will};
use tern_router::{RetainedStore, SubscriptionOptions};
use tern_storage::{DeliveryState, Op, QueueEntry, SessionRecord, SharedGroupRecord, StoreError};
use tokio::sync::Notify;

use crate::acl::DeniedTopics;
use crate::auth_rules::Login;
use crate::budget::{OutboundBudget, HEADER_ALLOWANCE};
use crate::clock::{CoarseClock, LazyInstant};
use crate::incoming_qos2::{IncomingQos2, Opened};
use crate::inflight::{Inflight, InflightState, InflightWindow};
use crate::keep_alive::SWEEP_INTERVAL_MS;
use crate::message::Message;
use crate::message_batch::BatchDelivery;
use crate::metrics::Metrics;
use crate::overflow::Overflow;
use crate::persistence::{unix_secs, will_record, Journal, Persistence};
use crate::signal::Signal;
use crate::stall::{StallWatch, Waiting};

pub use crate::subscription_ids::SubscriptionIds;

mod acks;
mod backlog;
mod deliver;
mod delivery;
mod hand_over;
mod incoming;
mod link;
mod retained_backlog;
mod store_retries;

pub use backlog::BACKLOG_CHUNK;
pub use deliver::WaitingRetained;
pub use delivery::{AckKind, Admission, Delivery, Outbound, SharedOrigin};
pub use hand_over::HandOver;
pub use link::{ConnectionControl, WRITE_BATCH_BYTES};
pub use retained_backlog::{WaitingRetainedBudget, RETAINED_REFILL_BYTES};
pub use store_retries::{StoreRetries, STORE_RETRY};

use backlog::Backlog;
use delivery::{queued_batch_cost, queued_cost};
use hand_over::shared_deliveries;
use link::Link;
use retained_backlog::RetainedBacklog;

/// A client sent more QoS 2 messages awaiting PUBREL than Receive Maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("receive maximum exceeded")]
pub struct ReceiveMaximumExceeded;

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
    /// Bound of each session's in-flight window in bytes of
    /// `Message::weight` (its bound in messages is `send_quota`).
    pub max_inflight_bytes: usize,
    /// Retained messages a session may hold waiting for room in its queues.
    pub max_pending_retained: usize,
    /// Retained messages waiting in all sessions, against
    /// `limits.max_waiting_retained`.
    pub waiting_retained: Arc<WaitingRetainedBudget>,
    pub metrics: Arc<Metrics>,
    pub budget: Arc<OutboundBudget>,
    /// The durable store; `None` in memory mode.
    pub persistence: Option<Arc<Persistence>>,
    pub store_retries: StoreRetries,
    /// The broker's coarse clock (stall.rs reads it per queued message).
    pub clock: Arc<CoarseClock>,
    /// The broker's retained messages: a retained message replaced while
    /// it waited for room is replaced by the topic's value then
    /// (`Session::refill_retained`). Its lock is taken under a session's
    /// (a read, only for such a message); nothing takes a session's lock
    /// under it. That read may wait for a retained publish queued behind the
    /// expiry sweep's scan, with the session's lock held.
    pub retained: Arc<RetainedStore<Arc<Message>>>,
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
    /// for yet (see [`Session::offer_retained`]): they go in as the queues
    /// drain. Boxed (8 bytes in every session instead of 40: almost none
    /// has one) and made at the first; at most `max_pending_retained`;
    /// dropped when the client leaves.
    retained_backlog: Option<Box<RetainedBacklog>>,
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
        // allows (MQTT-3.3.4-9), nor more bytes than the window's bound; the
        // rest follow as acknowledgements come.
        let quota = usize::from(st.send_quota);
        let (mut resent, mut resent_bytes) = st
            .inflight
            .iter()
            .filter(|i| {
                matches!(
                    i.state(),
                    InflightState::Released | InflightState::Persisting | InflightState::Releasing
                )
            })
            .fold((0, 0), |(n, bytes), i| (n + 1, bytes + i.weight()));
        for index in 0..st.inflight.len() {
            let state = st.inflight.get(index).state();
            // Sent before, so DUP from now on. A `Resend` without DUP never
            // was: its packet id became durable while its client was away
            // (`release`), and its first sending has DUP 0 (MQTT-3.3.1-1).
            if state == InflightState::Sent {
                st.inflight.set_dup(index);
            }
            match state {
                InflightState::Sent | InflightState::Resend
                    if resent < quota && resent_bytes < self.context.max_inflight_bytes =>
                {
                    resent += 1;
                    resent_bytes += st.inflight.get(index).weight();
                    st.inflight.set_state(index, InflightState::Sent);
                    let d = st.inflight.get(index).delivery.clone();
                    outbound.push_back(Outbound::Publish(d));
                }
                InflightState::Sent | InflightState::Resend => {
                    st.inflight.set_state(index, InflightState::Resend);
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
        self.fill_window(&mut st, &mut LazyInstant::default(), journal);
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

    /// The check a broker over its budget makes of every session (see
    /// `Broker::exempt_stalled_queues`): a connection's queue whose writer
    /// has taken nothing for `wait_ms` stops counting towards the budget,
    /// as a full one does (`Link::exempt`). `now_ms` is the coarse clock,
    /// which is up to one sweep interval behind real time, as the stamp of
    /// the last take may be: the span must reach `wait_ms` plus that
    /// interval, so that the real one is never shorter than `wait_ms`. Subscribers that never read would otherwise hold
    /// the budget over its limit, and every reader paused, whenever they
    /// stall before reaching their own bound. Returns whether it exempted
    /// this session's queue.
    pub fn exempt_if_stalled(&self, now_ms: u64, wait_ms: u64) -> bool {
        let mut st = self.state.lock();
        let Some(link) = st.link.as_mut() else {
            return false;
        };
        let queued = if link.exempt { 0 } else { link.charged };
        let writing = if link.writing_exempt { 0 } else { link.writing };
        if queued + writing == 0 || link.stall.idle_ms(now_ms) < wait_ms + SWEEP_INTERVAL_MS {
            return false;
        }
        // Neither queued nor being written counts any more: a writer stuck
        // in a write to a client that stopped reading holds its batch as
        // long as the client does. Both stay in the exempt bytes until the
        // writer or the link lets go of them.
        link.budget.add_exempt(queued + writing);
        link.exempt = true;
        link.writing_exempt = true;
        link.budget.release(queued + writing);
        true
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

    /// Closes the attached connection, if any, with this reason; true if
    /// this closed it (it was not closing already).
    pub fn kick(&self, reason: ReasonCode) -> bool {
        let st = self.state.lock();
        st.link
            .as_ref()
            .is_some_and(|link| link.control.close(Some(reason)))
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
}

/// The bytes a queued delivery counts against `max_queued_bytes`.
pub(crate) fn queued_size(delivery: &Delivery) -> usize {
    delivery.message.weight() + delivery.subscription_ids.heap_bytes()
}

fn push_pending(st: &mut SessionState, delivery: Delivery) {
    st.pending_bytes += queued_size(&delivery);
    st.pending.push_back(delivery);
}

fn remove_pending(st: &mut SessionState, index: usize) -> Option<Delivery> {
    let delivery = st.pending.remove(index)?;
    st.pending_bytes -= queued_size(&delivery);
    Some(delivery)
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
