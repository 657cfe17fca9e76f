//! Acknowledgements of outgoing QoS 1/2 flows (PUBACK, PUBREC, PUBCOMP):
//! each frees the in-flight window and, for a durable session, records the
//! new state in the store before the next packet of the flow is sent.

use super::*;

impl Session {
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
                let mut now = LazyInstant::default();
                if st.overflow.is_some() {
                    self.note_progress(&mut st, now.get());
                }
                self.forget(&st, &done.delivery, &mut journal);
                self.fill_window(&mut st, &mut now, &mut journal);
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
                    self.fill_window(&mut st, &mut LazyInstant::default(), &mut journal);
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
    pub(super) fn store_before_sending(
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
    pub(super) fn store_inflight_again(self: &Arc<Self>) {
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
    pub(super) fn send_pubrel(&self, packet_id: u16) {
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
    pub(super) fn release(&self, packet_id: u16, seq: u64) {
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
                self.fill_window(&mut st, &mut LazyInstant::default(), &mut journal);
            }
        }
        self.commit(journal);
    }
}

/// A PUBREL without properties.
pub(super) fn pubrel(packet_id: u16, code: ReasonCode) -> Outbound {
    Outbound::Ack(AckKind::PubRel, packet_id, code)
}
