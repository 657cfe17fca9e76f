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
//! from any task, and from `Drop` (a will published when a task dies).

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_codec::properties::PublishProperties;
use tern_codec::{QoS, Will};
use tokio::sync::watch;

use crate::auth::Authenticator;
use crate::budget::OutboundBudget;
use crate::config::Config;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::pool::BufferPool;
use crate::registry::SessionRegistry;
use crate::session::{
    Delivery, PendingWill, Session, SessionContext, SharedOrigin, SubscriptionIds,
};
use tern_router::{RetainedStore, Router, SharedGroup, SubscriptionOptions};

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

/// Shared broker state. One per server.
pub struct Broker {
    pub config: Config,
    pub router: Router<SessionRef>,
    pub retained: RetainedStore<Arc<Message>>,
    pub registry: SessionRegistry,
    pub metrics: Arc<Metrics>,
    pub authenticator: Authenticator,
    /// Read buffers, lent to connections while they have bytes to decode.
    pub pool: BufferPool,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

impl Broker {
    /// A broker with no sessions, subscriptions or retained messages.
    pub fn new(config: Config) -> Arc<Broker> {
        let metrics = Arc::new(Metrics::default());
        let registry = SessionRegistry::new(
            config.limits.max_connections,
            SessionContext {
                max_queued: config.limits.max_queued_messages,
                max_client_outbound_bytes: config.limits.max_client_outbound_bytes,
                metrics: Arc::clone(&metrics),
                budget: Arc::new(OutboundBudget::new(config.limits.max_outbound_bytes)),
            },
        );
        Arc::new(Broker {
            authenticator: Authenticator::from_config(&config.auth),
            pool: BufferPool::new(READ_BUFFER_POOL_CAPACITY),
            config,
            router: Router::new(),
            retained: RetainedStore::new(),
            registry,
            metrics,
            shutdown: watch::channel(false).0,
        })
    }

    /// A receiver that turns `true` when the broker shuts down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Tells every connection and listener to stop.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// True once shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Publishes a message: retained store first, then every matching
    /// subscriber.
    pub fn publish(&self, message: &Arc<Message>) {
        Metrics::inc(&self.metrics.messages_received);
        if message.retain {
            if message.payload.is_empty() {
                self.retained.remove(message.topic_str());
            } else {
                self.retained
                    .insert(message.topic_str(), Arc::clone(message));
            }
        }
        self.route(message);
    }

    /// Delivers a message to the matching subscribers.
    pub fn route(&self, message: &Arc<Message>) {
        let matches = self.router.matches(message.topic_str());
        let mut delivered = 0u64;
        for client in &matches.clients {
            let mut qos: Option<QoS> = None;
            let mut retain = false;
            let mut ids = SubscriptionIds::new();
            for options in &client.subscriptions {
                if options.no_local && client.subscriber.0.id == message.origin {
                    continue;
                }
                let granted = QoS::from_u8(options.qos).unwrap_or(QoS::AtMostOnce);
                let q = message.qos.min(granted);
                qos = Some(qos.map_or(q, |prev| prev.max(q)));
                retain |= options.retain_as_published && message.retain;
                if let Some(id) = options.subscription_id {
                    ids.push(id);
                }
            }
            if let Some(qos) = qos {
                client
                    .subscriber
                    .0
                    .deliver(Delivery::new(message, qos, retain, ids));
                delivered += 1;
            }
        }
        for group in &matches.shared {
            let picked = group
                .pick(|s| s.0.is_online())
                .or_else(|| group.pick(|_| true));
            if let Some((member, options)) = picked {
                member.0.deliver(shared_delivery(message, group, options));
                delivered += 1;
            }
        }
        Metrics::add(&self.metrics.messages_delivered, delivered);
    }

    /// Moves the unacknowledged messages a departing member of shared groups
    /// holds to other online members of the same groups (MQTT 5 4.8.2: a
    /// shared message should not be lost because one member left). Those
    /// with no online member to go to stay where they are.
    fn redistribute_shared(&self, departing: &Arc<Session>) {
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
            let Some((member, options)) =
                group.pick(|s| !Arc::ptr_eq(&s.0, departing) && s.0.is_online())
            else {
                continue;
            };
            // Withdrawn only once a taker is known; what finds none stays, with
            // its packet id, for the member's return.
            if departing.withdraw(&delivery) {
                Metrics::inc(&self.metrics.shared_redeliveries);
                member
                    .0
                    .deliver(shared_delivery(&delivery.message, group, options));
            }
        }
    }

    /// Publishes a will message now.
    pub fn publish_will(&self, will: &Will, origin: u64) {
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
        self.publish(&message);
    }

    /// Ends a session: removes its subscriptions (O(its own subscriptions))
    /// and publishes its pending will. Used when its expiry ran out.
    fn finish_session(&self, will: Option<PendingWill>, session: &Arc<Session>) {
        if let Some(pending) = will {
            self.publish_will(&pending.will, session.id);
        }
    }

    /// Everything that happens when a connection's task ends, whatever the
    /// reason. `will` is the connection's will when it must be published
    /// (abnormal close), `None` after a normal DISCONNECT; `new_expiry` is a
    /// session expiry interval set by the client's DISCONNECT.
    ///
    /// - Taken over (another connection is attached now): the will goes now,
    ///   unless it has a delay and the session was resumed (MQTT 5 3.1.3.2.2).
    /// - Session expiry 0: the session ends now, and the will goes now.
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
        let still_attached = session.detach(connection_id, new_expiry);
        if still_attached {
            self.redistribute_shared(session);
        }
        let will_delay = will
            .as_ref()
            .and_then(|w| w.properties.will_delay_interval)
            .unwrap_or(0);
        if !still_attached {
            if let Some(will) = will {
                if will_delay == 0 || session.is_ended() {
                    self.publish_will(&will, session.id);
                }
            }
            return;
        }
        let expiry = session.expiry_interval();
        if expiry == 0 {
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
                self.publish_will(&will, session.id);
            }
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Timers hold the session until they fire; their handles are kept in
        // the session so a reconnect (or the end of the session) cancels
        // them instead of leaving one sleeping task per disconnect.
        if let Some(will) = will {
            if will_delay == 0 {
                self.publish_will(&will, session.id);
            } else {
                let delay = Duration::from_secs(u64::from(will_delay.min(expiry)));
                session.set_pending_will(PendingWill {
                    will,
                    publish_at: Instant::now() + delay,
                });
                let (broker, owner) = (Arc::clone(self), Arc::clone(session));
                let timer = runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Some(pending) = owner.take_pending_will(generation) {
                        broker.publish_will(&pending.will, owner.id);
                    }
                });
                session.add_timer(timer.abort_handle());
            }
        }
        if expiry != u32::MAX {
            let (broker, owner) = (Arc::clone(self), Arc::clone(session));
            let timer = runtime.spawn(async move {
                tokio::time::sleep(Duration::from_secs(u64::from(expiry))).await;
                let ended = broker.registry.end_if(
                    &owner,
                    |s| !s.is_online() && s.generation() == generation,
                    |s| {
                        broker.router.remove_subscriber(&SessionRef(Arc::clone(s)));
                    },
                );
                if let Some(pending) = ended {
                    broker.finish_session(pending, &owner);
                }
            });
            session.add_timer(timer.abort_handle());
        }
    }
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
    delivery.shared = Some(SharedOrigin {
        group: Arc::clone(&group.group),
        filter: Arc::clone(&group.filter),
    });
    delivery
}
