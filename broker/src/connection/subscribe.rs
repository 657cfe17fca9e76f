//! SUBSCRIBE and UNSUBSCRIBE: each filter checked, permitted and applied to
//! the router and the session's record, the SUBACK or UNSUBACK, and the
//! retained messages a new subscription matched.

use super::*;
use crate::session::WaitingRetained;

/// A retained store of at least this many messages makes a SUBSCRIBE with
/// a wildcard filter long work for its worker: each message it matches is
/// found and its reference cloned within the one poll, under the store's
/// read lock (a `#` over 100,000 takes a worker some 23 ms, most of it
/// cache misses; docs/performance.md).
/// Such a SUBSCRIBE hands its worker's other tasks to another thread first
/// ([`tokio::task::block_in_place`]), so that the connections which shared
/// the worker are served meanwhile, and is handled while its connection
/// holds one of the broker's `retained_walks` permits (the read loop takes
/// it), so that such walks cannot all run at once. Below it the hand-off
/// would cost more than the work (a thread wakes up for it).
const LARGE_RETAINED_STORE: usize = 10_000;

impl Connection {
    /// Whether `subscribe` walks a large retained store (see
    /// [`LARGE_RETAINED_STORE`]): a filter with a wildcard that may send
    /// retained messages (not a shared subscription's, and not one with
    /// Retain Handling 2).
    pub(super) fn walks_far(&self, subscribe: &Subscribe) -> bool {
        subscribe.filters.iter().any(|r| {
            let filter = r.filter_str();
            filter.contains(['+', '#'])
                && r.retain_handling != tern_codec::RetainHandling::DoNotSend
                && parse_shared(filter).is_none()
        }) && self.broker.retained.len() >= LARGE_RETAINED_STORE
    }

    pub(super) fn on_subscribe(
        &mut self,
        session: &Arc<Session>,
        subscribe: Subscribe,
    ) -> Result<(), Exit> {
        if self.walks_far(&subscribe) && on_multi_thread_worker() {
            tokio::task::block_in_place(|| self.subscribe(session, subscribe))
        } else {
            self.subscribe(session, subscribe)
        }
    }

    fn subscribe(&mut self, session: &Arc<Session>, subscribe: Subscribe) -> Result<(), Exit> {
        let v5 = self.protocol.is_v5();
        let subscriber = SessionRef(Arc::clone(session));
        let subscription_id = subscribe.properties.subscription_identifier;
        let durable = session.is_durable();
        let mut journal = Journal::new();
        let mut added = Vec::new();
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut retained: Vec<WaitingRetained> = Vec::new();
        let mut retained_filters: HashMap<&str, std::ops::Range<usize>> = HashMap::new();
        // More than the session may hold waiting would be dropped anyway.
        // The broker-wide bound (`max_waiting_retained`) is not applied
        // here: what the session's queues take at once never counts against
        // it, and the session keeps it when it takes the rest.
        let limits = &self.broker.config.limits;
        let retained_cap = limits
            .max_pending_retained
            .saturating_sub(session.retained_waiting());
        // MQTT-3.8.3-4, checked before any filter is applied: the packet is
        // refused whole, not after some of its filters took effect.
        if v5
            && subscribe
                .filters
                .iter()
                .any(|r| r.no_local && parse_shared(r.filter_str()).is_some())
        {
            return Err(self.protocol_error("No Local on a shared subscription"));
        }
        // MQTT 3.x: a filter that breaks the syntax rules (MQTT-4.7.1-2/3,
        // MQTT-4.7.3-1) is a protocol violation, and the connection closes
        // (MQTT-4.8.0-1), before any filter of the packet took effect. 5.0
        // refuses it alone in SUBACK (0x8F).
        if !v5 && any_invalid_filter(subscribe.filters.iter().map(|r| r.filter_str())) {
            return Err(self.invalid_filter_3x());
        }
        // A refused filter's SUBACK code: MQTT 3.x has only 0x80.
        let refused = |code| {
            if v5 {
                code
            } else {
                ReasonCode::UnspecifiedError
            }
        };
        let mut held = self.broker.router.subscription_count_of(&subscriber);
        let mut held_cost = self.broker.router.subscription_cost_of(&subscriber);
        let mut over_quota = 0usize;
        for request in &subscribe.filters {
            let filter = request.filter_str();
            let parsed = parse_shared(filter);
            let shared = parsed.is_some();
            let acl_filter = parsed.map_or(filter, |(_, f)| f);
            if limits.too_many_levels(acl_filter) {
                Metrics::inc(&self.broker.metrics.subscriptions_refused);
                codes.push(refused(ReasonCode::TopicFilterInvalid));
                continue;
            }
            if self.acl.as_deref().is_some_and(|acl| {
                tern_router::validate_filter(filter).is_ok() && !acl.may_subscribe(acl_filter)
            }) {
                Metrics::inc(&self.broker.metrics.subscriptions_denied);
                tracing::debug!(client_id = %session.client_id, filter, "subscription denied by the ACL");
                codes.push(refused(ReasonCode::NotAuthorized));
                continue;
            }
            let cost = tern_router::subscription_cost(filter);
            let over = held >= limits.max_subscriptions_per_client
                || held_cost + cost > limits.max_subscription_bytes_per_client;
            if over
                && tern_router::validate_filter(filter).is_ok()
                && !self.broker.router.is_subscribed(&subscriber, filter)
            {
                over_quota += 1;
                Metrics::inc(&self.broker.metrics.subscriptions_refused);
                codes.push(refused(ReasonCode::QuotaExceeded));
                continue;
            }
            let options = SubscriptionOptions {
                qos: request.qos as u8,
                no_local: request.no_local,
                retain_as_published: request.retain_as_published,
                retain_handling: request.retain_handling as u8,
                subscription_id,
            };
            match self.broker.router.subscribe(&subscriber, filter, options) {
                Ok(outcome) => {
                    if outcome == SubscribeOutcome::New {
                        held += 1;
                        held_cost += cost;
                    }
                    codes.push(ReasonCode::granted(request.qos));
                    if durable {
                        journal.push(Op::PutSubscription(subscription_record(
                            session, filter, &options,
                        )));
                        added.push(filter.to_owned());
                    }
                    let send_retained = match request.retain_handling {
                        tern_codec::RetainHandling::SendAtSubscribe => true,
                        tern_codec::RetainHandling::SendIfNew => outcome == SubscribeOutcome::New,
                        tern_codec::RetainHandling::DoNotSend => false,
                    };
                    // Retained messages are not sent to shared subscriptions.
                    // A filter repeated in this SUBSCRIBE gets them again,
                    // as a second SUBSCRIBE replacing the subscription would
                    // (MQTT-3.8.4-3, -4), with this occurrence's options:
                    // copied from its first occurrence, not looked up again,
                    // so that repeating a filter costs no more lookups.
                    if send_retained && !shared {
                        if let Some(range) = retained_filters.get(filter) {
                            let room = retained_cap.saturating_sub(retained.len());
                            let copied = range.len().min(room);
                            let start = retained.len();
                            retained.extend_from_within(range.start..range.start + copied);
                            for entry in &mut retained[start..] {
                                entry.options = options;
                            }
                            let beyond = range.len() - copied;
                            Metrics::add(
                                &self.broker.metrics.messages_dropped_queue_full,
                                beyond as u64,
                            );
                        } else {
                            let start = retained.len();
                            collect_retained(
                                &self.broker,
                                filter,
                                options,
                                &mut retained,
                                retained_cap,
                            );
                            retained_filters.insert(filter, start..retained.len());
                        }
                    }
                }
                Err(e) => {
                    Metrics::inc(&self.broker.metrics.subscriptions_refused);
                    tracing::debug!(client_id = %session.client_id, filter, error = %e, "subscription refused");
                    codes.push(refused(ReasonCode::TopicFilterInvalid));
                }
            }
        }
        if over_quota > 0 {
            throttled!(
                INFO,
                client_id = %session.client_id,
                refused = over_quota,
                held,
                held_bytes = held_cost,
                "subscriptions refused: limits.max_subscriptions_per_client or max_subscription_bytes_per_client reached"
            );
        }
        // A takeover with clean start may have ended this session while we
        // subscribed: its cleanup ran first, so undo ours (the session's
        // `ended` flag is set before its subscriptions are removed).
        if session.is_ended() {
            self.broker.router.remove_subscriber(&subscriber);
        }
        let suback = Packet::SubAck(SubAck {
            packet_id: subscribe.packet_id,
            codes,
            properties: SubAckProperties::default(),
        });
        // Retained messages follow the SUBACK. If the subscriptions could
        // not be stored the client was told so: they are removed again.
        let (broker, session) = (Arc::clone(&self.broker), Arc::clone(session));
        self.acknowledge_then(
            suback,
            journal,
            || true,
            move |stored| {
                if stored {
                    deliver_retained(&session, retained);
                } else {
                    let subscriber = SessionRef(Arc::clone(&session));
                    for filter in added {
                        broker.router.unsubscribe(&subscriber, &filter);
                    }
                }
            },
        );
        Ok(())
    }

    pub(super) fn on_unsubscribe(
        &mut self,
        session: &Arc<Session>,
        unsubscribe: Unsubscribe,
    ) -> Result<(), Exit> {
        // As in SUBSCRIBE: MQTT 3.x has no code to refuse one filter with.
        let filters = unsubscribe.filters.iter();
        if !self.protocol.is_v5()
            && any_invalid_filter(filters.map(|f| std::str::from_utf8(f).unwrap_or("")))
        {
            return Err(self.invalid_filter_3x());
        }
        let subscriber = SessionRef(Arc::clone(session));
        let durable = session.is_durable();
        let mut journal = Journal::new();
        let codes = unsubscribe
            .filters
            .iter()
            .map(|filter| {
                let filter = std::str::from_utf8(filter).unwrap_or("");
                if tern_router::validate_filter(filter).is_err() {
                    // As SUBSCRIBE answers it (no such subscription can exist).
                    return ReasonCode::TopicFilterInvalid;
                }
                if self.broker.router.unsubscribe(&subscriber, filter) {
                    if durable {
                        journal.push(Op::DeleteSubscription {
                            client_id: Arc::clone(&session.client_id),
                            filter: filter.to_owned(),
                        });
                    }
                    ReasonCode::Success
                } else {
                    ReasonCode::NoSubscriptionExisted
                }
            })
            .collect();
        let unsuback = Packet::UnsubAck(UnsubAck {
            packet_id: unsubscribe.packet_id,
            codes: if self.protocol.is_v5() {
                codes
            } else {
                Vec::new()
            },
            properties: UnsubAckProperties::default(),
        });
        self.acknowledge(unsuback, journal);
        Ok(())
    }

    /// An MQTT 3.x SUBSCRIBE or UNSUBSCRIBE with an invalid filter: the
    /// connection closes (3.x has no DISCONNECT to say why).
    fn invalid_filter_3x(&self) -> Exit {
        Metrics::inc(&self.broker.metrics.subscriptions_refused);
        Metrics::inc(&self.broker.metrics.protocol_errors);
        Exit::Error(
            ReasonCode::TopicFilterInvalid,
            "invalid topic filter (an MQTT 3.x protocol violation)".into(),
        )
    }
}

/// Whether this code runs on a runtime that can hand a worker's tasks to
/// another thread: tokio's multi-thread one (the binary's; a test may run
/// the broker on a current-thread runtime, where `block_in_place` panics).
fn on_multi_thread_worker() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// Adds the retained messages matching `filter` to `retained`, up to `cap`
/// in all; those beyond it are counted as dropped (a SUBSCRIBE of many
/// overlapping filters must not make the broker hold more than a session
/// can take). A filter that finds the cap reached is not matched at all,
/// and counts as one drop.
fn collect_retained(
    broker: &Broker,
    filter: &str,
    options: SubscriptionOptions,
    retained: &mut Vec<WaitingRetained>,
    cap: usize,
) {
    if retained.len() >= cap {
        Metrics::inc(&broker.metrics.messages_dropped_queue_full);
        return;
    }
    // Only as many as there is room for are collected, straight into
    // `retained`; the rest are counted as dropped.
    let beyond =
        broker
            .retained
            .for_each_matching_at_most(filter, cap - retained.len(), |_, message| {
                retained.push(WaitingRetained {
                    message: Arc::clone(message),
                    options,
                });
            });
    Metrics::add(&broker.metrics.messages_dropped_queue_full, beyond as u64);
}

/// Sends the retained messages a SUBACK promised, after it: the session
/// takes them all at once and makes each a delivery when its queues have
/// room (see [`Session::offer_retained`]). One that a newer publish
/// replaced since it was found gives way to the topic's value then, so
/// that a client the newer message did not reach (No Local, or a QoS 0
/// message its full queue dropped) still gets the topic's value.
fn deliver_retained(session: &Arc<Session>, retained: Vec<WaitingRetained>) {
    let mut journal = Journal::new();
    session.offer_retained(retained, &mut journal);
    session.commit(journal);
}

/// The durable record of a subscription.
fn subscription_record(
    session: &Session,
    filter: &str,
    options: &SubscriptionOptions,
) -> SubscriptionRecord {
    SubscriptionRecord {
        client_id: Arc::clone(&session.client_id),
        filter: filter.to_owned(),
        qos: options.qos,
        no_local: options.no_local,
        retain_as_published: options.retain_as_published,
        retain_handling: options.retain_handling,
        subscription_id: options.subscription_id,
    }
}

/// Whether any of `filters` breaks the topic filter syntax (an empty
/// filter, `#` not last or not alone in its level, `+` not alone in its
/// level, a malformed shared subscription).
fn any_invalid_filter<'f>(mut filters: impl Iterator<Item = &'f str>) -> bool {
    filters.any(|filter| tern_router::validate_filter(filter).is_err())
}
