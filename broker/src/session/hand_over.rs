//! Shared subscriptions: a session that leaves hands the messages it holds
//! for a group to another member ([`HandOver`] marks one in progress).

use super::*;

impl Session {
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
    /// still queued, and those in the window that [`may_move`] allows.
    /// Returns copies; [`withdraw`](Self::withdraw) takes one out.
    pub fn shared_candidates(&self) -> Vec<Delivery> {
        let st = self.state.lock();
        let assigned = st.inflight.iter().filter(|i| may_move(i));
        let queued = st.pending.iter().filter(|d| d.shared.is_some());
        assigned
            .map(|i| i.delivery.clone())
            .chain(queued.cloned())
            .collect()
    }

    /// Takes out a delivery returned by
    /// [`shared_candidates`](Self::shared_candidates) if it is still here and
    /// unacknowledged; false if it is gone (acknowledged meanwhile). The
    /// removal goes into `journal`; a place it frees in the window of a
    /// client that is connected again is filled at once, with the store's
    /// changes for that committed here.
    pub fn withdraw(self: &Arc<Self>, delivery: &Delivery, journal: &mut Journal) -> bool {
        let mut refill = Journal::new();
        let withdrawn = {
            let mut st = self.state.lock();
            let same = |d: &Delivery| {
                Arc::ptr_eq(&d.message, &delivery.message) && d.shared == delivery.shared
            };
            let removed = if let Some(packet_id) = delivery.packet_id {
                let found = st.inflight.position_where(|i| {
                    i.packet_id == packet_id && may_move(i) && same(&i.delivery)
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
                    if d.packet_id.is_some() && st.link.is_some() {
                        self.fill_window(&mut st, &mut LazyInstant::default(), &mut refill);
                    }
                    true
                }
                None => false,
            }
        };
        self.commit(refill);
        withdrawn
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

/// Whether a delivery in the window, with its packet id, may still go to
/// another member of its shared group: a QoS 1 one until its PUBACK, sent
/// or not; a QoS 2 one only if it was never on the wire (its packet id
/// waiting to be durable, `Persisting`, or made durable while its client
/// was away, `Resend` without DUP: every other way into `Resend` sets DUP).
/// A QoS 2 message once sent stays with its client (MQTT-4.8.2-4, -5).
///
/// QoS 1 deliveries behind a QoS 2 one wait in `Persisting` too (the order
/// of a topic's messages holds across QoS levels): a departing member that
/// kept only its `Sent` ones lost those, although acknowledged to their
/// publisher.
fn may_move(i: &Inflight) -> bool {
    if i.delivery.shared.is_none() {
        return false;
    }
    match (i.delivery.qos, i.state()) {
        (QoS::AtLeastOnce, state) => state != InflightState::Released,
        (QoS::ExactlyOnce, InflightState::Persisting) => true,
        (QoS::ExactlyOnce, InflightState::Resend) => !i.delivery.dup,
        _ => false,
    }
}

/// The deliveries in memory, queued or in flight, that came through a
/// shared subscription.
pub(super) fn shared_deliveries(st: &SessionState) -> impl Iterator<Item = &Delivery> {
    let inflight = st.inflight.iter().map(|i| &i.delivery);
    st.pending
        .iter()
        .chain(inflight)
        .filter(|d| d.shared.is_some())
}
