//! Routing: a message to the sessions whose subscriptions match it, by the
//! delivery rules in the module documentation above; a connection's QoS 0
//! publishes of one read staged and delivered together ([`StagedFanout`]).

use super::*;

impl Broker {
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
    ///
    /// A message with RETAIN is never staged, and what is staged is
    /// delivered before it goes into the retained store: a SUBSCRIBE that
    /// finds it there sends it at once, and a message this client published
    /// before it, still staged for that subscriber's earlier subscription,
    /// would follow it (MQTT 4.6: a topic's messages in the order they were
    /// published).
    pub fn publish_from_client(
        &self,
        message: &Arc<Message>,
        journal: &mut Journal,
        recent: &mut Option<RecentMatch<SessionRef>>,
        staged: &mut StagedFanout,
    ) -> Option<Arc<Session>> {
        let before_retained = if message.retain {
            self.deliver_staged(staged)
        } else {
            None
        };
        self.retain(message, journal);
        let matches = self.router.matches_recent(message.topic_str(), recent);
        let stageable = message.qos == QoS::AtMostOnce
            && !message.retain
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
            before_retained
        } else {
            self.deliver_staged(staged).or(before_retained)
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
        let (mut delivered, mut full) = deliver_reserved(matches, message, |client, references| {
            let (qos, retain_as_published, ids) = client_delivery_options(client, message)?;
            let retain = retain_as_published && message.retain;
            let delivery = Delivery::with_reference(references.take()?, qos, retain, ids);
            Some((1, client.subscriber.0.deliver(delivery, journal)))
        });
        let mut note = |session: &Arc<Session>, admission: Admission| {
            if admission == Admission::BeyondBound && full.is_none() {
                full = Some(Arc::clone(session));
            }
        };
        for group in &matches.shared {
            // A member an ACL deny rule keeps from the topic is passed over.
            // Offline members last, and not one whose session is ending
            // (handing its shared messages over).
            let picked = group
                .pick(|s| s.0.is_online_and_staying() && !s.0.denies(message))
                .or_else(|| group.pick(|s| !s.0.denies(message) && !s.0.is_handing_over()));
            if let Some((member, options)) = picked {
                let session = &member.0;
                let admission = session.deliver(shared_delivery(message, group, options), journal);
                if admission != Admission::Dropped {
                    delivered += 1;
                }
                note(session, admission);
            }
        }
        Metrics::add(&self.metrics.messages_delivered, delivered);
        full
    }
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
/// it handed over and how they were admitted, or `None` for a client that
/// gets none. Returns the messages delivered (queued or sent, not those
/// the session dropped) and a subscriber whose queue took some beyond its
/// bound.
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
        match admission {
            Admission::Dropped => continue,
            Admission::BeyondBound if full.is_none() => {
                full = Some(Arc::clone(&client.subscriber.0));
            }
            _ => {}
        }
        delivered += count;
    }
    (delivered, full)
}

/// How `message` goes to one matching client, combining its matching
/// subscriptions: the highest QoS, whether a subscription asks for RETAIN
/// as published, and each subscription identifier once; `None` when No
/// Local leaves none of them, or an ACL deny rule keeps the client from the
/// topic. It depends on the message's topic, publisher and QoS only (a
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
pub(super) fn shared_delivery(
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
