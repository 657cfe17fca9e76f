//! The broker: the shared state every connection works against, and the
//! routing of a message to the sessions that want it.
//!
//! [`Broker`] owns the router (who subscribed to what), the retained store,
//! the session registry and the metrics. Connections call
//! [`Broker::publish`] with a decoded message; it updates the retained store,
//! asks the router for the matching subscribers (a cached, shared snapshot)
//! and hands each subscriber's session one reference to the same message.
//!
//! Delivery rules applied here (MQTT 5 section 3.3.4, 4.8):
//! - overlapping subscriptions of one client give ONE copy at the highest
//!   granted QoS, carrying every matching subscription identifier;
//! - the QoS is the minimum of the published QoS and the granted QoS;
//! - No Local subscriptions skip the publisher's own messages;
//! - RETAIN is cleared on forwarded messages unless Retain As Published;
//! - a shared group delivers to one member, preferring online members.
//!
//! Nothing here awaits: routing is synchronous bookkeeping so that it can run
//! from any task, and from `Drop` (a will published when a task dies). What
//! must be durable (queue entries of durable sessions, retained messages) is
//! written to the caller's [`Journal`]; the caller commits it and decides
//! what waits for it (the PUBACK).

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_codec::properties::PublishProperties;
use tern_codec::{QoS, ReasonCode, Will};
use tokio::sync::{oneshot, watch};

use crate::auth_rules::{AuthRules, Login, Revocation};
use crate::budget::OutboundBudget;
use crate::config::{AuthConfig, Config};
use crate::keep_alive::KeepAlive;
use crate::log_throttle::throttled;
use crate::message::{Message, ReservedReferences};
use crate::message_batch::{BatchDelivery, MessageBatch};
use crate::metrics::Metrics;
use crate::persistence::{Journal, Persistence};
use crate::pool::BufferPool;
use crate::registry::SessionRegistry;
use crate::retained_order::RetainedOrder;
use crate::session::{
    Admission, Delivery, PendingWill, Session, SessionContext, SharedOrigin, SubscriptionIds,
};
use tern_router::{
    ClientMatch, Matches, RecentMatch, RetainedStore, Router, SharedGroup, SubscriptionOptions,
};

/// Idle read buffers kept for reuse: enough to absorb a burst of reconnects
/// without allocating, small enough (16 MiB at 4 KiB each) not to matter.
pub const READ_BUFFER_POOL_CAPACITY: usize = 4096;

/// A session as a router key: identity is the session object, so a fresh
/// session under the same client id never inherits the old one's entries.
#[derive(Clone, Debug)]
pub struct SessionRef(pub Arc<Session>);

impl PartialEq for SessionRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SessionRef {}

impl Hash for SessionRef {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.id.hash(state);
    }
}

/// Least time between two sweeps of expired retained messages (see
/// `Broker::expire_retained`): a sweep visits every retained message (up to
/// `max_retained_messages`, under the store's read lock), so it runs only
/// when one is due, or when the store is at its limits.
pub const RETAINED_SWEEP_EVERY_MS: u64 = 1000;

/// Retained messages a periodic sweep may visit per second, on average: the
/// least time between two sweeps grows with the store (1M retained
/// messages, one sweep per 10 s at most), so that messages expiring at
/// every moment cannot keep a core busy scanning. An expired message is
/// never delivered; the sweep only frees its place.
const RETAINED_SWEEP_VISITS_PER_S: u64 = 100_000;

/// Removes expired retained messages as they fall due (see
/// [`Broker::expire_retained`]), until the task is aborted (at shutdown).
/// The sweep visits every retained message: it runs on the blocking pool,
/// not on a worker that connections need.
pub async fn expire_retained_when_due(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(Duration::from_millis(RETAINED_SWEEP_EVERY_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if broker.retained_expiry_due() {
            let broker = Arc::clone(&broker);
            // A sweep that panicked is logged by the runtime; the next tick
            // tries again.
            let _ = tokio::task::spawn_blocking(move || broker.expire_retained()).await;
        }
    }
}

/// Writes again, every [`STORE_RETRY`](crate::session::STORE_RETRY), the
/// in-flight states the store refused (`session::StoreRetries`), until the
/// task is aborted (at shutdown). Nothing to do without a store, or while
/// the store takes every write.
pub async fn store_refused_states_again(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(crate::session::STORE_RETRY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        broker.registry.context().store_retries.retry();
    }
}

/// Whether the caller may run a periodic chore now: at least `period_ms`
/// since the last run recorded in `last_ms`, and no other thread claimed
/// this turn first (the time is swapped in). Lets any of many callers run a
/// sweep, at most once per period.
fn claim_turn(last_ms: &AtomicU64, now_ms: u64, period_ms: u64) -> bool {
    let last = last_ms.load(Ordering::Relaxed);
    now_ms.saturating_sub(last) >= period_ms
        && last_ms
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Shared broker state. One per server.
pub struct Broker {
    pub config: Config,
    pub router: Router<SessionRef>,
    pub retained: RetainedStore<Arc<Message>>,
    /// `Message::weight` of every retained message, against
    /// `limits.max_retained_bytes`.
    retained_bytes: AtomicUsize,
    /// `$SYS` topics among the retained messages (outside the limits).
    system_retained: AtomicUsize,
    /// Orders each topic's retained changes in the store as in memory.
    retained_order: RetainedOrder,
    /// When expired retained messages were last swept (keep alive clock).
    last_retained_sweep_ms: AtomicU64,
    /// The earliest expiry among the retained messages since the last sweep
    /// (`None`: none of them expires): when the next sweep is due.
    retained_expiry: parking_lot::Mutex<Option<Instant>>,
    /// When queues were last swept for stalled writers (keep alive clock).
    last_stall_sweep_ms: AtomicU64,
    pub registry: SessionRegistry,
    pub metrics: Arc<Metrics>,
    /// The `[auth]` rules in force: users, anonymous, enhanced
    /// authentication, ACL (auth_rules.rs). Swapped whole by `reload_auth`;
    /// read once per CONNECT.
    auth_rules: parking_lot::RwLock<Arc<AuthRules>>,
    /// Held by a reload for its swap and sweep: two reloads at once would
    /// judge clients against the wrong pair of rules.
    auth_reload: parking_lot::Mutex<()>,
    /// Read buffers, lent to connections while they have bytes to decode.
    pub pool: BufferPool,
    /// The durable store; `None` in memory mode.
    pub persistence: Option<Arc<Persistence>>,
    /// The keep alive clock and the connections it watches.
    pub keep_alive: KeepAlive,
    /// When this broker was made (uptime, for `/metrics` and `$SYS`).
    started: Instant,
    /// The TLS listeners' certificate and key (MQTT over TLS and WebSocket
    /// over TLS), set at start when either is configured and replaced by a
    /// reload (`tls::reload`). Read once per handshake.
    pub tls: parking_lot::RwLock<Option<tokio_rustls::TlsAcceptor>>,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

impl Broker {
    /// A broker with no sessions, subscriptions or retained messages, and
    /// no store (memory mode).
    pub fn new(config: Config) -> Arc<Broker> {
        Broker::with_store(config, Arc::new(Metrics::default()), None)
    }

    /// A broker that keeps durable state in `persistence` (opened with the
    /// same `metrics`). Recovery fills it before the listeners open.
    pub fn with_store(
        config: Config,
        metrics: Arc<Metrics>,
        persistence: Option<Arc<Persistence>>,
    ) -> Arc<Broker> {
        let keep_alive = KeepAlive::default();
        let registry = SessionRegistry::new(
            config.limits.max_connections,
            config.limits.max_sessions,
            SessionContext {
                max_queued: config.limits.max_queued_messages,
                max_queued_bytes: config.limits.max_queued_bytes,
                queue_full_wait: Duration::from_millis(config.limits.queue_full_wait_ms),
                max_client_outbound_bytes: config.limits.max_client_outbound_bytes,
                max_pending_retained: config.limits.max_pending_retained,
                metrics: Arc::clone(&metrics),
                budget: Arc::new(OutboundBudget::new(config.limits.max_outbound_bytes)),
                persistence: persistence.clone(),
                store_retries: Default::default(),
                clock: Arc::clone(keep_alive.clock()),
            },
        );
        Arc::new(Broker {
            auth_rules: parking_lot::RwLock::new(Arc::new(AuthRules::new(&config.auth))),
            auth_reload: parking_lot::Mutex::new(()),
            pool: BufferPool::new(READ_BUFFER_POOL_CAPACITY),
            config,
            router: Router::new(),
            retained: RetainedStore::new(),
            retained_bytes: AtomicUsize::new(0),
            system_retained: AtomicUsize::new(0),
            retained_order: RetainedOrder::new(),
            last_retained_sweep_ms: AtomicU64::new(0),
            retained_expiry: parking_lot::Mutex::new(None),
            last_stall_sweep_ms: AtomicU64::new(0),
            registry,
            metrics,
            persistence,
            keep_alive,
            started: Instant::now(),
            tls: parking_lot::RwLock::new(None),
            shutdown: watch::channel(false).0,
        })
    }

    /// Time since this broker was made.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Retained messages held, the broker's own `$SYS` topics excluded.
    pub fn retained_count(&self) -> usize {
        self.retained
            .len()
            .saturating_sub(self.system_retained.load(Ordering::Relaxed))
    }

    /// Stores `message` as the retained message of a `$SYS` topic: in
    /// memory only, and outside `max_retained_messages` and
    /// `max_retained_bytes` (a fixed handful of topics, see sys_topics.rs).
    pub fn retain_system(&self, topic: &str, message: Arc<Message>) {
        debug_assert!(topic.starts_with("$SYS/"));
        if self.retained.insert(topic, message).is_none() {
            self.system_retained.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `Message::weight` of all retained messages together (`$SYS` excluded).
    pub fn retained_bytes(&self) -> usize {
        self.retained_bytes.load(Ordering::Relaxed)
    }

    /// A receiver that turns `true` when the broker shuts down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Tells every connection and listener to stop. A connection that
    /// attaches to its session after this looks at
    /// [`is_shutting_down`](Self::is_shutting_down) and closes itself.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
        for session in self.registry.all() {
            session.kick(ReasonCode::ServerShuttingDown);
        }
    }

    /// True once shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Publishes a message: retained store first, then every matching
    /// subscriber. Durable changes go to `journal`. Returns a subscriber
    /// whose full queue took the message beyond its bound, if any: the
    /// publisher should wait for it ([`Session::wait_for_room`]).
    pub fn publish(&self, message: &Arc<Message>, journal: &mut Journal) -> Option<Arc<Session>> {
        self.retain(message, journal);
        self.route(message, journal)
    }

    /// [`publish`](Self::publish) for a client's connection: `recent` is the
    /// connection's last match result, reused while its topic and the
    /// router's subscriptions are unchanged (see
    /// [`Router::matches_recent`]).
    ///
    /// A QoS 0 message (to no shared group) is not delivered at once but
    /// added to `staged`, the connection's QoS 0 messages of this read to
    /// the same subscribers; [`deliver_staged`](Self::deliver_staged) then
    /// delivers them subscriber by subscriber, one lock per subscriber for
    /// all of them. Anything else delivers what is staged first, so each
    /// subscriber still gets this client's messages in order.
    pub fn publish_from_client(
        &self,
        message: &Arc<Message>,
        journal: &mut Journal,
        recent: &mut Option<RecentMatch<SessionRef>>,
        staged: &mut StagedFanout,
    ) -> Option<Arc<Session>> {
        self.retain(message, journal);
        let matches = self.router.matches_recent(message.topic_str(), recent);
        let stageable = message.qos == QoS::AtMostOnce
            && matches.shared.is_empty()
            && !matches.clients.is_empty();
        // The same match result is that of the same topic; the topics are
        // compared too, because a batch's messages must share theirs
        // (message_batch.rs).
        let same = staged
            .matches
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(m, matches))
            && staged
                .messages
                .first()
                .is_some_and(|first| first.topic == message.topic);
        let full = if same && stageable {
            None
        } else {
            self.deliver_staged(staged)
        };
        if stageable {
            if staged.matches.is_none() {
                staged.matches = Some(Arc::clone(matches));
            }
            staged.messages.push(Arc::clone(message));
            return full;
        }
        let now = self.deliver_to(matches, message, journal);
        full.or(now)
    }

    /// Delivers what `staged` holds (see
    /// [`publish_from_client`](Self::publish_from_client)); returns a
    /// subscriber whose queue took some of it beyond its bound.
    ///
    /// Several messages go to each subscriber as one batch
    /// (message_batch.rs): one queue entry and one reference for all of
    /// them, at most [`StagedFanout::MAX_BATCH_BYTES`] of them. A message
    /// alone goes as a delivery of its own, which costs no allocation.
    pub fn deliver_staged(&self, staged: &mut StagedFanout) -> Option<Arc<Session>> {
        let matches = staged.matches.take()?;
        let mut delivered = 0;
        let mut full = None;
        let mut start = 0;
        while start < staged.messages.len() {
            let run = StagedFanout::batch_len(&staged.messages[start..]);
            let (count, beyond) = if run == 1 {
                self.deliver_staged_message(&matches, &staged.messages[start])
            } else if run == staged.messages.len() {
                // All of them: moved, not counted again; the staging
                // vector keeps its room for the next read.
                let messages = staged.messages.drain(..).collect();
                self.deliver_staged_batch(&matches, messages)
            } else {
                let messages = staged.messages[start..start + run].into();
                self.deliver_staged_batch(&matches, messages)
            };
            start += run;
            delivered += count;
            full = full.or(beyond);
        }
        staged.messages.clear();
        Metrics::add(&self.metrics.messages_delivered, delivered);
        full
    }

    /// [`deliver_staged`](Self::deliver_staged) of one message; returns the
    /// deliveries made and a subscriber whose queue went beyond its bound.
    fn deliver_staged_message(
        &self,
        matches: &Matches<SessionRef>,
        message: &Arc<Message>,
    ) -> (u64, Option<Arc<Session>>) {
        deliver_reserved(matches, message, |client, references| {
            let (qos, retain_as_published, ids) = client_delivery_options(client, message)?;
            let retain = retain_as_published && message.retain;
            let delivery = Delivery::with_reference(references.take()?, qos, retain, ids);
            let admission = client
                .subscriber
                .0
                .deliver_at_most_once(std::iter::once(delivery));
            Some((1, admission))
        })
    }

    /// [`deliver_staged`](Self::deliver_staged) of several messages to one
    /// topic: a batch each subscriber takes whole.
    fn deliver_staged_batch(
        &self,
        matches: &Matches<SessionRef>,
        messages: Box<[Arc<Message>]>,
    ) -> (u64, Option<Arc<Session>>) {
        let batch = MessageBatch::new(messages);
        let Some(first) = batch.messages().first() else {
            return (0, None);
        };
        deliver_reserved(matches, &batch, |client, references| {
            // The same for every message of the batch (message_batch.rs).
            let (_, retain_as_published, ids) = client_delivery_options(client, first)?;
            let delivery = BatchDelivery::new(references.take()?, retain_as_published, ids);
            let admission = client.subscriber.0.deliver_batch(delivery);
            Some((batch.len() as u64, admission))
        })
    }

    /// Counts a received message and, if it has the RETAIN flag, stores it
    /// as (or removes) the topic's retained message. Topics beginning with
    /// `$` are the broker's own (`retain_system`): never retained here (no
    /// client or will may publish there; this keeps the `$SYS` accounting
    /// out of reach whatever calls it).
    fn retain(&self, message: &Arc<Message>, journal: &mut Journal) {
        Metrics::inc(&self.metrics.messages_received);
        if !message.retain {
            return;
        }
        let topic = message.topic_str();
        if topic.starts_with('$') {
            return;
        }
        let fits = message.payload.is_empty()
            || self.retained_fits(topic, message)
            || (self.sweep_expired_retained(journal) && self.retained_fits(topic, message));
        let over_limit = !fits;
        if over_limit {
            Metrics::inc(&self.metrics.retained_refused);
            tracing::debug!(
                topic,
                "not retained: limits.max_retained_messages or max_retained_bytes reached"
            );
        }
        // The change in memory and in the store, in one step per topic
        // (retained_order.rs); `journal`, the publisher's, reports a failure
        // to store it.
        let _in_order = self.retained_order.lock(topic);
        let mut change = Journal::new();
        if message.payload.is_empty() || over_limit {
            // Cleared, or (over a limit) not replaced by a newer value it
            // could not store: an older value must not be served as current.
            if let Some(old) = self.retained.remove(topic) {
                self.retained_bytes
                    .fetch_sub(retained_cost(&old), Ordering::Relaxed);
            }
            if self.persistence.is_some() {
                change.push(tern_storage::Op::DeleteRetained {
                    topic: topic.to_owned(),
                });
            }
        } else {
            if let Some(p) = &self.persistence {
                let message_id = change.reference(p, message);
                change.push(tern_storage::Op::PutRetained(
                    tern_storage::RetainedRecord {
                        topic: topic.to_owned(),
                        message_id,
                    },
                ));
            }
            // Compacted (after `reference`, so the copy keeps the store id):
            // the retained message outlives the read buffer it arrived in.
            self.insert_retained(topic, message.compacted());
        }
        if let Some(p) = &self.persistence {
            journal.depend_on(p.commit_tracked(change));
        }
    }

    /// Stores `message` as the retained message of `topic`, keeping the
    /// byte total (recovery uses it too, without the limits: a store holds
    /// what an earlier configuration allowed).
    pub fn insert_retained(&self, topic: &str, message: Arc<Message>) {
        let expires_at = message.expires_at;
        self.retained_bytes
            .fetch_add(retained_cost(&message), Ordering::Relaxed);
        if let Some(old) = self.retained.insert(topic, message) {
            self.retained_bytes
                .fetch_sub(retained_cost(&old), Ordering::Relaxed);
        }
        // After the insert: a sweep that began before it either sees the
        // message or reset the due time before this note.
        if let Some(at) = expires_at {
            self.note_retained_expiry(at);
        }
    }

    /// The `[auth]` rules in force.
    pub fn auth_rules(&self) -> Arc<AuthRules> {
        Arc::clone(&self.auth_rules.read())
    }

    /// Puts `auth` in force (on SIGHUP, see auth_rules.rs): new connections
    /// use it at once, and every connected client it would not let in with
    /// the same credentials, or would give other permissions, is
    /// disconnected (0x87) to reconnect under it. Returns how many were.
    pub fn reload_auth(&self, auth: &AuthConfig) -> usize {
        let _one_at_a_time = self.auth_reload.lock();
        let next = Arc::new(AuthRules::new(auth));
        let previous = std::mem::replace(&mut *self.auth_rules.write(), Arc::clone(&next));
        let mut closed = 0;
        for session in self.registry.all() {
            let Some((login, control)) = session.attached_login() else {
                continue;
            };
            let Some(why) = previous.revoked_by(&next, &login, &session.client_id) else {
                continue;
            };
            tracing::info!(client_id = %session.client_id, "disconnected by the reloaded [auth]: {why}");
            match why {
                Revocation::Credentials => control.close_withholding(ReasonCode::NotAuthorized),
                Revocation::Permissions => control.close(Some(ReasonCode::NotAuthorized)),
            }
            closed += 1;
        }
        closed
    }

    /// Whether a connection let in under `used` as `login` must close
    /// because the rules were reloaded meanwhile (a handshake that ran
    /// beside [`reload_auth`](Self::reload_auth) and attached after
    /// its sweep of the connected clients).
    pub fn revoked_since(&self, used: &Arc<AuthRules>, login: &Login, client_id: &str) -> bool {
        let now = self.auth_rules();
        !Arc::ptr_eq(used, &now) && used.revoked_by(&now, login, client_id).is_some()
    }

    /// While the outbound budget is over its limit, readers call this once
    /// per `queue_full_wait_ms` (at most one sweep runs per half period,
    /// whoever calls): each connection's queue is marked, and one still
    /// marked (its writer took nothing since) stops counting towards the
    /// budget (`Session::exempt_if_stalled`). O(sessions), only while the
    /// broker is over its budget.
    pub fn exempt_stalled_queues(&self) {
        let half = self.config.limits.queue_full_wait_ms.max(100) / 2;
        if !claim_turn(&self.last_stall_sweep_ms, self.keep_alive.now_ms(), half) {
            return;
        }
        let exempted = self
            .registry
            .all()
            .iter()
            .filter(|s| s.exempt_if_stalled())
            .count();
        if exempted > 0 {
            tracing::info!(
                exempted,
                "over the outbound budget: queues of connections that took nothing for {} ms no longer count towards it",
                self.config.limits.queue_full_wait_ms.max(100)
            );
        }
    }

    /// Removes the expired retained messages if one is due to expire (they
    /// are never delivered, but hold their place under the limits and in
    /// the store until removed). Called every [`RETAINED_SWEEP_EVERY_MS`];
    /// sweeps at most once per that, or per [`RETAINED_SWEEP_VISITS_PER_S`]
    /// of retained messages if longer. Returns how many it removed.
    pub fn expire_retained(&self) -> usize {
        if !self.retained_expiry_due() {
            return 0;
        }
        let count = self.retained.len() as u64;
        let period_ms = RETAINED_SWEEP_EVERY_MS.max(count * 1000 / RETAINED_SWEEP_VISITS_PER_S);
        if !claim_turn(
            &self.last_retained_sweep_ms,
            self.keep_alive.now_ms(),
            period_ms,
        ) {
            return 0;
        }
        let mut journal = Journal::new();
        let removed = self.remove_expired_retained(&mut journal);
        self.commit(journal);
        if removed > 0 {
            tracing::debug!(removed, "expired retained messages removed");
        }
        removed
    }

    /// Removes the expired retained messages for a retained message that
    /// finds the store at its limits, at most once per
    /// [`RETAINED_SWEEP_EVERY_MS`]. Returns whether it removed any.
    fn sweep_expired_retained(&self, journal: &mut Journal) -> bool {
        let now_ms = self.keep_alive.now_ms();
        if !claim_turn(
            &self.last_retained_sweep_ms,
            now_ms,
            RETAINED_SWEEP_EVERY_MS,
        ) {
            return false;
        }
        self.remove_expired_retained(journal) > 0
    }

    /// The sweep: removes every expired retained message (and, with a
    /// store, its record), and notes when the next one expires.
    fn remove_expired_retained(&self, journal: &mut Journal) -> usize {
        let now = Instant::now();
        // Taken before the scan: a message retained during it either is
        // seen by it or notes its own expiry after this.
        self.retained_expiry.lock().take();
        let mut next: Option<Instant> = None;
        let removed = self.retained.retain(|_, m| match m.expires_at {
            Some(at) if now >= at => false,
            Some(at) => {
                next = Some(next.map_or(at, |n| n.min(at)));
                true
            }
            None => true,
        });
        if let Some(at) = next {
            self.note_retained_expiry(at);
        }
        let freed: usize = removed.iter().map(|(_, m)| retained_cost(m)).sum();
        self.retained_bytes.fetch_sub(freed, Ordering::Relaxed);
        if self.persistence.is_some() {
            for (topic, m) in &removed {
                // Only the record of this message: a newer one the topic's
                // publisher submitted before this journal must stay.
                if let Some(&message_id) = m.store_id.get() {
                    journal.push(tern_storage::Op::ExpireRetained {
                        topic: topic.to_string(),
                        message_id,
                    });
                }
            }
        }
        removed.len()
    }

    /// Whether a retained message has expired since the last sweep.
    pub fn retained_expiry_due(&self) -> bool {
        self.retained_expiry
            .lock()
            .is_some_and(|at| Instant::now() >= at)
    }

    /// A retained message expires at `at`: the next sweep is due by then.
    fn note_retained_expiry(&self, at: Instant) {
        let mut due = self.retained_expiry.lock();
        *due = Some(due.map_or(at, |d| d.min(at)));
    }

    /// Whether `message` may become `topic`'s retained message within
    /// `limits.max_retained_messages` and `max_retained_bytes` (checked
    /// without a lock: concurrent publishers may pass them by a few).
    fn retained_fits(&self, topic: &str, message: &Message) -> bool {
        let limits = &self.config.limits;
        let old = self.retained.get(topic);
        let others = self
            .retained_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(old.as_deref().map_or(0, retained_cost));
        let count_ok = old.is_some() || self.retained_count() < limits.max_retained_messages;
        count_ok && others + retained_cost(message) <= limits.max_retained_bytes
    }

    /// Publishes a message the broker makes itself (a will) and commits its
    /// durable changes; nobody waits for them, nor for a full queue.
    pub fn publish_and_commit(&self, message: &Arc<Message>) {
        let mut journal = Journal::new();
        let _full = self.publish(message, &mut journal);
        self.commit(journal);
    }

    /// Hands `journal` to the store, if there is one.
    pub fn commit(&self, journal: Journal) {
        if let Some(p) = &self.persistence {
            p.commit(journal);
        }
    }

    /// Delivers a message to the matching subscribers; returns one whose
    /// queue took it beyond its bound (see [`publish`](Self::publish)).
    pub fn route(&self, message: &Arc<Message>, journal: &mut Journal) -> Option<Arc<Session>> {
        let matches = self.router.matches(message.topic_str());
        self.deliver_to(&matches, message, journal)
    }

    /// Delivers a message to `matches`, the router's subscribers of its
    /// topic; returns one whose queue took it beyond its bound.
    fn deliver_to(
        &self,
        matches: &Matches<SessionRef>,
        message: &Arc<Message>,
        journal: &mut Journal,
    ) -> Option<Arc<Session>> {
        let mut delivered = 0u64;
        let mut full = None;
        let mut note = |session: &Arc<Session>, admission: Admission| {
            if admission == Admission::BeyondBound && full.is_none() {
                full = Some(Arc::clone(session));
            }
        };
        for client in &matches.clients {
            if let Some(delivery) = client_delivery(client, message) {
                let session = &client.subscriber.0;
                note(session, session.deliver(delivery, journal));
                delivered += 1;
            }
        }
        for group in &matches.shared {
            // A member an ACL deny rule keeps from the topic is passed over.
            // Offline members last, and not one whose session is ending
            // (handing its shared messages over).
            let picked = group
                .pick(|s| s.0.is_online_and_staying() && !s.0.denies(message))
                .or_else(|| group.pick(|s| !s.0.denies(message) && !s.0.is_handing_over()));
            if let Some((member, options)) = picked {
                let session = &member.0;
                note(
                    session,
                    session.deliver(shared_delivery(message, group, options), journal),
                );
                delivered += 1;
            }
        }
        Metrics::add(&self.metrics.messages_delivered, delivered);
        full
    }

    /// Moves the unacknowledged messages a departing member of shared groups
    /// holds to other members of the same groups (MQTT 5 4.8.2: a shared
    /// message should not be lost because one member left): online members
    /// only, or for a session about to end, any other (`takers`). Those
    /// with no member to go to stay where they are.
    ///
    /// In the store, a move is two journals: the new members' entries, and
    /// once those are durable, the departing member's deletions. Within
    /// one journal, a deletion would cancel the departing entry's insertion
    /// if the writer still held it (`tern-storage`'s netting takes a
    /// deletion for an acknowledgement), and the publisher's PUBACK would
    /// leave while the new entry still waited to be written. In two, the
    /// stored message never has zero references in between either; a crash
    /// between them leaves both entries, a duplicate that QoS 1 allows.
    ///
    /// Returns, when something moved and there is a store, a receiver that
    /// resolves once the new entries are written (or failed): a session
    /// that ends must wait for it before its end deletes what it holds, or
    /// a crash in between could lose a message both held.
    fn redistribute_shared(
        &self,
        departing: &Arc<Session>,
        takers: Takers,
    ) -> Option<oneshot::Receiver<()>> {
        let mut moved_in = Journal::new();
        let mut moved_out = Journal::new();
        for delivery in departing.shared_candidates() {
            let Some(origin) = &delivery.shared else {
                continue;
            };
            let matches = self.router.matches(delivery.message.topic_str());
            let Some(group) = matches
                .shared
                .iter()
                .find(|g| g.group == origin.group && g.filter == origin.filter)
            else {
                continue;
            };
            let other =
                |s: &SessionRef| !Arc::ptr_eq(&s.0, departing) && !s.0.denies(&delivery.message);
            let picked = group
                .pick(|s| other(s) && s.0.is_online_and_staying())
                .or_else(|| match takers {
                    Takers::Online => None,
                    Takers::Any => group.pick(|s| other(s) && !s.0.is_handing_over()),
                });
            let Some((member, options)) = picked else {
                continue;
            };
            // Withdrawn only once a taker is known; what finds none stays, with
            // its packet id, for the member's return.
            if departing.withdraw(&delivery, &mut moved_out) {
                Metrics::inc(&self.metrics.shared_redeliveries);
                // Nobody publishes here, so nobody waits for a full queue.
                let _ = member.0.deliver(
                    shared_delivery(&delivery.message, group, options),
                    &mut moved_in,
                );
            }
        }
        let persistence = self.persistence.as_ref()?;
        let mut written = None;
        if moved_out.has_changes() {
            // If the new entries could not be stored, the departing ones
            // stay: the message goes to the departing member again after a
            // restart rather than to nobody. If the departing session ended
            // meanwhile, its end deleted them.
            let departing = Arc::clone(departing);
            let (done, receiver) = oneshot::channel();
            written = Some(receiver);
            moved_in.after(move |stored| {
                if stored.is_ok() {
                    departing.commit_unless_ended(moved_out);
                }
                let _ = done.send(());
            });
        }
        persistence.commit(moved_in);
        written
    }

    /// Before `session` ends (its expiry ran out, or a client replaces it
    /// with Clean Start), what it holds from shared subscriptions goes to
    /// other members of their groups, offline ones included (MQTT 5 4.8.2:
    /// "If the Client's Session terminates before the Client reconnects,
    /// the Server SHOULD send the Application Message to another Client
    /// that is subscribed to the same Shared Subscription"). A backlog a
    /// restart left in the store is read in first, whole, if any of it came
    /// through a shared subscription (what one session may queue is
    /// bounded, `max_queued_*`). `due` says whether the session is still
    /// about to end; it is asked again after the read. The caller holds the
    /// session's [`HandOver`](crate::session::HandOver) guard from before
    /// this until the session has ended, so that neither a shared group
    /// nor a connecting client takes the session meanwhile.
    ///
    /// Should the session live on after all (its client returned), it does
    /// so without what was handed over: each message still reaches one
    /// member.
    pub async fn hand_over_shared_before_end(
        &self,
        session: &Arc<Session>,
        due: impl Fn(&Session) -> bool,
    ) {
        if !due(session) {
            return;
        }
        if let Some(persistence) = &self.persistence {
            match session.begin_backlog_read() {
                Some((after, end)) => {
                    let (store, reader) = (Arc::clone(persistence.store()), Arc::clone(session));
                    // The chunk goes back to the session on the blocking
                    // thread, even if this task is aborted meanwhile (a
                    // client resumed the session, cancelling its expiry):
                    // the read it began must end, or no other could start.
                    let _ = tokio::task::spawn_blocking(move || {
                        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            crate::recovery::read_backlog_if_shared(
                                store.as_ref(),
                                &reader,
                                after,
                                end,
                            )
                        }));
                        let chunk = match read {
                            Ok(Ok(chunk)) => chunk,
                            Ok(Err(e)) => {
                                tracing::warn!(client_id = %reader.client_id, error = %e, "reading a stored queue before its session ends failed; its shared messages end with it");
                                Default::default()
                            }
                            Err(_) => {
                                tracing::warn!(client_id = %reader.client_id, "reading a stored queue before its session ends panicked; its shared messages end with it");
                                Default::default()
                            }
                        };
                        // An empty chunk only ends the read: the backlog
                        // stays as it was.
                        reader.backlog_read(Ok(chunk));
                    })
                    .await;
                }
                None if session.stored_backlog() > 0 => {
                    tracing::warn!(client_id = %session.client_id, "a read of the stored queue was under way as its session ended; its shared messages still in the store end with it");
                }
                None => {}
            }
        }
        // Again while something moves: a delivery that reached the session
        // just before it was marked as handing over moves in a next round.
        for _ in 0..HAND_OVER_ROUNDS {
            if !due(session) {
                break;
            }
            let Some(written) = self.redistribute_shared(session, Takers::Any) else {
                break;
            };
            let _ = written.await;
        }
    }

    /// Ends `session`, whose connection closed with session expiry 0,
    /// unless a client is attached again, and publishes the connection's
    /// `will` (due at once: the session ends).
    fn end_closed_session(&self, session: &Arc<Session>, will: Option<Will>) {
        let ended = self.registry.end_if(
            session,
            |s| !s.is_online(),
            |s| {
                self.router.remove_subscriber(&SessionRef(Arc::clone(s)));
            },
        );
        if let Some(pending) = ended {
            self.finish_session(pending, session);
        }
        if let Some(will) = will {
            self.publish_will(&will, session);
        }
    }

    /// Ends `session`, whose expiry interval ran out while it was offline,
    /// unless a client attached since `generation`; what it holds from
    /// shared subscriptions goes to other members first.
    pub async fn expire_session(self: &Arc<Self>, session: &Arc<Session>, generation: u64) {
        let due = |s: &Session| !s.is_online() && s.generation() == generation;
        let _handing_over = session.begin_hand_over();
        self.hand_over_shared_before_end(session, due).await;
        let ended = self.registry.end_if(session, due, |s| {
            self.router.remove_subscriber(&SessionRef(Arc::clone(s)));
        });
        if let Some(pending) = ended {
            self.finish_session(pending, session);
        }
    }

    /// Publishes a will message now.
    pub fn publish_will(&self, will: &Will, session: &Session) {
        let owner = session.owner();
        self.publish_will_of(will, session.id, &session.client_id, owner.as_deref());
    }

    /// Publishes the will of the client `client_id` whose session (`origin`,
    /// 0 for one that ended before a restart) belonged to `owner`, if the
    /// rules in force still let that client publish there: they may have
    /// been reloaded since its CONNECT.
    pub fn publish_will_of(&self, will: &Will, origin: u64, client_id: &str, owner: Option<&str>) {
        let topic = std::str::from_utf8(&will.topic).unwrap_or("");
        let allowed = self
            .auth_rules()
            .client_acl(owner, client_id)
            .is_none_or(|acl| acl.may_publish(topic));
        if !allowed {
            Metrics::inc(&self.metrics.publishes_denied);
            throttled!(
                INFO,
                client_id,
                topic,
                "will not published: the rules in force deny its topic"
            );
            return;
        }
        Metrics::inc(&self.metrics.wills_published);
        let p = &will.properties;
        let properties = PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            content_type: p.content_type.clone(),
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.clone(),
            user_properties: p.user_properties.clone(),
            ..PublishProperties::default()
        };
        let message = Message::new(
            will.topic.clone(),
            will.payload.clone(),
            will.qos,
            will.retain,
            properties,
            origin,
        );
        self.publish_and_commit(&message);
    }

    /// Ends a session: removes its subscriptions (O(its own subscriptions))
    /// and publishes its pending will. Used when its expiry ran out.
    fn finish_session(&self, will: Option<PendingWill>, session: &Arc<Session>) {
        if let Some(pending) = will {
            self.publish_will(&pending.will, session);
        }
    }

    /// Everything that happens when a connection's task ends, whatever the
    /// reason. `will` is the connection's will when it must be published
    /// (abnormal close), `None` after a normal DISCONNECT; `new_expiry` is a
    /// session expiry interval set by the client's DISCONNECT.
    ///
    /// - Taken over (another connection is attached now): the will goes now,
    ///   unless it has a delay and the session was resumed (MQTT 5 3.1.3.2.2).
    /// - Session expiry 0: the session ends now, and the will goes now; a
    ///   session that may hold shared subscriptions' messages first hands
    ///   them to other members, and ends once that is stored.
    /// - Otherwise the session stays; the will goes after its delay unless the
    ///   client is back by then; the session ends when its expiry runs out.
    pub fn connection_closed(
        self: &Arc<Self>,
        session: &Arc<Session>,
        connection_id: u64,
        generation: u64,
        will: Option<Will>,
        new_expiry: Option<u32>,
    ) {
        self.keep_alive.unwatch(connection_id);
        let still_attached = session.detach(connection_id, new_expiry);
        if still_attached && session.expiry_interval() != 0 {
            // The session stays: what it kept from shared subscriptions
            // goes to online members now, the rest waits for its client.
            let _ = self.redistribute_shared(session, Takers::Online);
        }
        let will_delay = will
            .as_ref()
            .and_then(|w| w.properties.will_delay_interval)
            .unwrap_or(0);
        if !still_attached {
            if let Some(will) = will {
                if will_delay == 0 || session.is_ended() {
                    self.publish_will(&will, session);
                }
            }
            return;
        }
        let expiry = session.expiry_interval();
        if expiry == 0 {
            let shared = session.holds_shared_or_backlog();
            let runtime = tokio::runtime::Handle::try_current();
            match runtime {
                Ok(runtime) if shared && !self.is_shutting_down() => {
                    // What it kept from shared subscriptions goes to other
                    // members first, and the session ends once that is
                    // stored.
                    // Marked before the task runs, so that a client taking
                    // the client id over meanwhile waits for it.
                    let handing_over = session.begin_hand_over();
                    let (broker, session) = (Arc::clone(self), Arc::clone(session));
                    runtime.spawn(async move {
                        let due = |s: &Session| !s.is_online();
                        broker.hand_over_shared_before_end(&session, due).await;
                        broker.end_closed_session(&session, will);
                        drop(handing_over);
                    });
                }
                _ => {
                    // Nothing to wait on (or for: a shutdown's final sync
                    // writes the moves ahead of the end): handed over at
                    // once, what is in memory.
                    if shared {
                        let _ = self.redistribute_shared(session, Takers::Any);
                    }
                    self.end_closed_session(session, will);
                }
            }
            return;
        }
        let will = will.and_then(|will| {
            if will_delay == 0 {
                self.publish_will(&will, session);
                None
            } else {
                Some((will, Duration::from_secs(u64::from(will_delay.min(expiry)))))
            }
        });
        let expiry = (expiry != u32::MAX).then(|| Duration::from_secs(u64::from(expiry)));
        self.schedule_offline(session, will, expiry, generation);
        session.record_offline();
    }

    /// Arms the timers of an offline session: its will after `will`'s delay
    /// and its end after `expiry` (`None`: never), both cancelled if a client
    /// attaches first (the session's `generation` changes).
    ///
    /// Timers hold the session until they fire; their handles are kept in
    /// the session so a reconnect (or the end of the session) cancels them
    /// instead of leaving one sleeping task per disconnect.
    pub fn schedule_offline(
        self: &Arc<Self>,
        session: &Arc<Session>,
        will: Option<(Will, Duration)>,
        expiry: Option<Duration>,
        generation: u64,
    ) {
        // A shutdown stops every timer (`Server::shutdown`) and arms none
        // for a connection that closes during it: the will is only kept,
        // for the store's record of the session, from which a restart arms
        // both again.
        let runtime = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|_| !self.is_shutting_down());
        if let Some((will, delay)) = will {
            let pending = Box::new(PendingWill {
                will,
                publish_at: Instant::now() + delay,
            });
            if let Err(ended) = session.set_pending_will(pending) {
                self.publish_will(&ended.will, session);
                return;
            }
            let Some(runtime) = &runtime else {
                return;
            };
            let (broker, owner) = (Arc::clone(self), Arc::clone(session));
            let timer = runtime.spawn(async move {
                tokio::time::sleep(delay).await;
                if let Some(pending) = owner.take_pending_will(generation) {
                    broker.publish_will(&pending.will, &owner);
                    owner.record_will_published();
                }
            });
            session.add_timer(timer.abort_handle());
        }
        if let (Some(expiry), Some(runtime)) = (expiry, &runtime) {
            let (broker, owner) = (Arc::clone(self), Arc::clone(session));
            let timer = runtime.spawn(async move {
                tokio::time::sleep(expiry).await;
                broker.expire_session(&owner, generation).await;
            });
            session.add_timer(timer.abort_handle());
        }
    }
}

/// Rounds of [`Broker::hand_over_shared_before_end`]: the first moves
/// nearly everything; later ones only what raced the session's marking, so
/// a few are plenty, and the bound keeps a session that somehow keeps
/// receiving from holding its end back.
const HAND_OVER_ROUNDS: usize = 4;

/// Which members a departing member's shared messages may go to (see
/// [`Broker::redistribute_shared`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Takers {
    /// Online members only: the departing session stays, and what finds no
    /// taker waits for its client's return.
    Online,
    /// Any other member, online ones first: the departing session ends, and
    /// what it kept would be lost with it.
    Any,
}

/// QoS 0 messages a connection published in one read to the same
/// subscribers, not yet delivered (see [`Broker::publish_from_client`]).
#[derive(Default)]
pub struct StagedFanout {
    matches: Option<Arc<Matches<SessionRef>>>,
    messages: Vec<Arc<Message>>,
}

impl StagedFanout {
    /// Messages staged before they are delivered anyway: bounds the delay
    /// and what an idle connection keeps (the vector's capacity, 512 bytes
    /// for a publisher that sent a burst). 64 covers a whole 4 KiB read of
    /// small messages: against 32, a 1 -> 100 fan-out delivered 5% more per
    /// broker CPU-second (docs/performance.md).
    pub const MAX_MESSAGES: usize = 64;

    /// The most a batch of staged messages weighs ([`Message::weight`]):
    /// a batch reaches each subscriber whole, taken or dropped at once
    /// (message_batch.rs), so this bounds how far it takes a queue past its
    /// bound (with the per-message overhead a queue counts, about 76 KiB
    /// for 64 small messages). A message this large goes alone. Batching
    /// saves a fixed cost per delivery, which matters for small messages:
    /// 64 KiB holds a whole read of them.
    pub const MAX_BATCH_BYTES: usize = 64 * 1024;

    /// How many of `messages`, from the first, go in one batch: those
    /// within [`MAX_BATCH_BYTES`](Self::MAX_BATCH_BYTES), and at least one.
    fn batch_len(messages: &[Arc<Message>]) -> usize {
        let mut bytes = 0;
        messages
            .iter()
            .take_while(|m| {
                bytes += m.weight();
                bytes <= Self::MAX_BATCH_BYTES
            })
            .count()
            .max(1)
    }

    /// True when it is time to deliver: [`MAX_MESSAGES`](Self::MAX_MESSAGES)
    /// messages. Not sooner for many subscribers: the staged messages reach
    /// each of them as one queue entry (message_batch.rs), so what
    /// delivering them costs, and what the wake batch counts, grows with
    /// the subscribers and not with the messages.
    pub fn is_due(&self) -> bool {
        self.messages.len() >= Self::MAX_MESSAGES
    }
}

/// Hands `shared` (a message or a batch) to each client of `matches`:
/// `deliver` queues one client's delivery with one of the references
/// counted before the first (see `ReservedReferences`; those No Local or an
/// ACL leaves unused are given back at the end), and returns the messages
/// it delivered and how they were admitted, or `None` for a client that
/// gets none. Returns the messages delivered and a subscriber whose queue
/// took some beyond its bound.
fn deliver_reserved<T>(
    matches: &Matches<SessionRef>,
    shared: &Arc<T>,
    mut deliver: impl FnMut(
        &ClientMatch<SessionRef>,
        &mut ReservedReferences<T>,
    ) -> Option<(u64, Admission)>,
) -> (u64, Option<Arc<Session>>) {
    let mut references = ReservedReferences::new(shared, matches.clients.len());
    let mut delivered = 0;
    let mut full = None;
    for client in &matches.clients {
        let Some((count, admission)) = deliver(client, &mut references) else {
            continue;
        };
        delivered += count;
        if admission == Admission::BeyondBound && full.is_none() {
            full = Some(Arc::clone(&client.subscriber.0));
        }
    }
    (delivered, full)
}

/// The delivery of `message` to one matching client, combining its
/// matching subscriptions (highest QoS, RETAIN if any asks for it as
/// published, each subscription identifier once); `None` when No Local leaves
/// none of them, or an ACL deny rule keeps the client from the topic.
fn client_delivery(client: &ClientMatch<SessionRef>, message: &Arc<Message>) -> Option<Delivery> {
    let (qos, retain_as_published, ids) = client_delivery_options(client, message)?;
    Some(Delivery::new(
        message,
        qos,
        retain_as_published && message.retain,
        ids,
    ))
}

/// What [`client_delivery`] decides: the QoS, whether a subscription asks
/// for RETAIN as published, and the subscription identifiers of the
/// delivery. It depends on the message's topic, publisher and QoS only (a
/// batch's deliveries share it, message_batch.rs).
fn client_delivery_options(
    client: &ClientMatch<SessionRef>,
    message: &Message,
) -> Option<(QoS, bool, SubscriptionIds)> {
    if client.subscriber.0.denies(message) {
        return None;
    }
    let mut qos: Option<QoS> = None;
    let mut retain_as_published = false;
    let mut ids = SubscriptionIds::new();
    for options in &client.subscriptions {
        if options.no_local && client.subscriber.0.id == message.origin {
            continue;
        }
        let granted = QoS::from_u8(options.qos).unwrap_or(QoS::AtMostOnce);
        let q = message.qos.min(granted);
        qos = Some(qos.map_or(q, |prev| prev.max(q)));
        retain_as_published |= options.retain_as_published;
        if let Some(id) = options.subscription_id {
            ids.push(id);
        }
    }
    ids.dedup();
    qos.map(|qos| (qos, retain_as_published, ids))
}

/// The delivery of `message` to a member of a shared group.
fn shared_delivery(
    message: &Arc<Message>,
    group: &SharedGroup<SessionRef>,
    options: &SubscriptionOptions,
) -> Delivery {
    let granted = QoS::from_u8(options.qos).unwrap_or(QoS::AtMostOnce);
    let ids = options.subscription_id.into_iter().collect();
    let retain = options.retain_as_published && message.retain;
    let mut delivery = Delivery::new(message, message.qos.min(granted), retain, ids);
    delivery.shared = Some(Box::new(SharedOrigin {
        group: Arc::clone(&group.group),
        filter: Arc::clone(&group.filter),
    }));
    delivery
}

/// What a retained message counts against `limits.max_retained_bytes`:
/// what it holds in memory, at most. Its bytes (topic, payload and
/// properties), the shared message, and the store's entry and nodes for its
/// topic (`RetainedStore::entry_cost`), so that a limit in bytes bounds the
/// memory of deep topics too: a 128-level topic costs the store some 6 KB
/// beside its bytes.
fn retained_cost(message: &Message) -> usize {
    message.weight()
        + crate::message::MESSAGE_COST
        + RetainedStore::<Arc<Message>>::entry_cost(message.topic_str())
}
