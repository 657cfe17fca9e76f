//! What happens when a connection closes or a session ends: wills (at
//! once or after their delay), session expiry, and the shared-subscription
//! messages a departing member hands to the others.

use super::*;

impl Broker {
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
            Some(Box::new(properties)),
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
