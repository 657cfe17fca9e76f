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
//!
//! # Layout
//!
//! This file holds [`Broker`], its construction and what connections ask
//! of it (auth rules, shutdown, the budget's sweep); its work, one file a
//! concern:
//!
//! - `route.rs`: [`Broker::publish`], [`Broker::route`] and the delivery
//!   rules above, and [`StagedFanout`];
//! - `retained.rs`: the retained messages, their limits and expiry;
//! - `session_end.rs`: a connection's close, wills, session expiry, and the
//!   shared messages a departing member hands over.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_codec::properties::PublishProperties;
use tern_codec::{QoS, ReasonCode, Will};
use tokio::sync::{oneshot, watch, Semaphore};

use crate::auth_rules::{AuthRules, Login, Revocation};
use crate::budget::OutboundBudget;
use crate::config::{AuthConfig, Config};
use crate::incomplete::IncompletePackets;
use crate::keep_alive::{KeepAlive, SWEEP_INTERVAL_MS};
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
    WaitingRetainedBudget,
};
use tern_router::{
    ClientMatch, Matches, RecentMatch, RetainedStore, Router, SharedGroup, SubscriptionOptions,
};

mod retained;
mod route;
mod session_end;

pub use retained::{expire_retained_when_due, RETAINED_SWEEP_EVERY_MS};
pub use route::StagedFanout;

use route::shared_delivery;

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

/// The shortest wait before a queue that takes nothing stops counting
/// towards the outbound budget, whatever `queue_full_wait_ms` says (0 there
/// means "drop at once" for full queues, not "exempt every queue at once").
pub const MIN_STALL_WAIT_MS: u64 = 100;

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
    /// Shared with the sessions (`SessionContext::retained`).
    pub retained: Arc<RetainedStore<Arc<Message>>>,
    /// `Message::weight` of every retained message, against
    /// `limits.max_retained_bytes`.
    retained_bytes: AtomicUsize,
    /// `$SYS` topics among the retained messages (outside the limits).
    system_retained: AtomicUsize,
    /// Orders each topic's retained changes in the store as in memory.
    retained_order: RetainedOrder,
    /// Walks of a large retained store by wildcard SUBSCRIBEs that may run
    /// at once (`retained::retained_walks_at_once`): a connection takes a
    /// permit before such a SUBSCRIBE and holds it while it is handled.
    pub retained_walks: Arc<Semaphore>,
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
    /// Read buffers grown for incomplete packets across all connections,
    /// against `limits.max_incomplete_bytes` (incomplete.rs).
    pub incomplete: IncompletePackets,
    /// The same for clients still connecting (before CONNACK), against a
    /// bound of its own of the same size.
    pub incomplete_connecting: IncompletePackets,
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
        let retained = Arc::new(RetainedStore::new());
        let registry = SessionRegistry::new(
            config.limits.max_connections,
            config.limits.max_sessions,
            SessionContext {
                max_queued: config.limits.max_queued_messages,
                max_queued_bytes: config.limits.max_queued_bytes,
                queue_full_wait: Duration::from_millis(config.limits.queue_full_wait_ms),
                max_client_outbound_bytes: config.limits.max_client_outbound_bytes,
                max_inflight_bytes: config.limits.max_inflight_bytes,
                max_pending_retained: config.limits.max_pending_retained,
                waiting_retained: Arc::new(WaitingRetainedBudget::new(
                    config.limits.max_waiting_retained,
                )),
                metrics: Arc::clone(&metrics),
                budget: Arc::new(OutboundBudget::new(config.limits.max_outbound_bytes)),
                persistence: persistence.clone(),
                store_retries: Default::default(),
                clock: Arc::clone(keep_alive.clock()),
                retained: Arc::clone(&retained),
            },
        );
        Arc::new(Broker {
            auth_rules: parking_lot::RwLock::new(Arc::new(AuthRules::new(&config.auth))),
            auth_reload: parking_lot::Mutex::new(()),
            pool: BufferPool::new(READ_BUFFER_POOL_CAPACITY),
            incomplete: IncompletePackets::new(config.limits.max_incomplete_bytes),
            incomplete_connecting: IncompletePackets::new(config.limits.max_incomplete_bytes),
            config,
            router: Router::new(),
            retained,
            retained_bytes: AtomicUsize::new(0),
            system_retained: AtomicUsize::new(0),
            retained_order: RetainedOrder::new(),
            retained_walks: Arc::new(Semaphore::new(retained::retained_walks_at_once())),
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
        match self.retained.insert(topic, message) {
            Some(old) => old.supersede(),
            None => {
                self.system_retained.fetch_add(1, Ordering::Relaxed);
            }
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
                Revocation::Permissions => {
                    control.close(Some(ReasonCode::NotAuthorized));
                }
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

    /// While the outbound budget is over its limit, a reader calls this
    /// when it pauses for it, and the keep alive sweep every
    /// [`SWEEP_INTERVAL`](crate::keep_alive::SWEEP_INTERVAL) (at most one
    /// sweep runs per interval, whoever calls): each connection's queue
    /// whose writer has taken nothing for `queue_full_wait_ms` (at least
    /// [`MIN_STALL_WAIT_MS`]) stops counting towards the budget
    /// (`Session::exempt_if_stalled`). Subscribers that stopped reading
    /// thus pause the broker's readers for at most that wait after they
    /// stopped, plus two intervals (the clock's steps and the sweep's).
    /// O(sessions), only while the broker is over its budget.
    pub fn exempt_stalled_queues(&self) {
        let now_ms = self.keep_alive.now_ms();
        if !claim_turn(&self.last_stall_sweep_ms, now_ms, SWEEP_INTERVAL_MS) {
            return;
        }
        let wait_ms = self.config.limits.queue_full_wait_ms.max(MIN_STALL_WAIT_MS);
        let exempted = self
            .registry
            .all()
            .iter()
            .filter(|s| s.exempt_if_stalled(now_ms, wait_ms))
            .count();
        if exempted > 0 {
            tracing::info!(
                exempted,
                "over the outbound budget: queues of connections that took nothing for {wait_ms} ms no longer count towards it"
            );
        }
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
}
