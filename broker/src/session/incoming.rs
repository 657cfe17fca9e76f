//! Incoming QoS 2 flows: the packet ids a client published with QoS 2 and
//! has not released yet, so a retransmitted PUBLISH is acknowledged but not
//! routed twice.

use super::*;

impl Session {
    /// An incoming QoS 2 PUBLISH: returns true the first time `packet_id` is
    /// seen (route it), false for a retransmission before PUBREL (do not).
    /// `limit` bounds the number of QoS 2 flows the current connection has
    /// open (flows carried from an earlier one do not count, see
    /// incoming_qos2.rs); `Err` when exceeded. A durable session records the
    /// id in `journal`, so that a restart still recognises the
    /// retransmission.
    pub fn incoming_qos2(
        &self,
        packet_id: u16,
        limit: u16,
        journal: &mut Journal,
    ) -> Result<bool, ReceiveMaximumExceeded> {
        let mut st = self.state.lock();
        match st
            .incoming_qos2
            .get_or_insert_with(Box::default)
            .open(packet_id, limit)
        {
            Opened::New => {}
            Opened::Retransmission => return Ok(false),
            Opened::OverLimit => return Err(ReceiveMaximumExceeded),
        }
        if st.durable {
            journal.push(Op::AddIncomingQos2 {
                client_id: Arc::clone(&self.client_id),
                packet_id,
            });
        }
        Ok(true)
    }

    /// PUBREL received: forgets the packet id, recording that in `journal`
    /// for a durable session. Returns false if it was unknown.
    ///
    /// The PUBCOMP must wait for that journal: once the client has it, it
    /// may use the id for a new message, and a restart that still found
    /// the id open would take that message for a retransmission and drop
    /// it.
    pub fn pubrel(&self, packet_id: u16, journal: &mut Journal) -> bool {
        let mut st = self.state.lock();
        let known = st
            .incoming_qos2
            .as_mut()
            .is_some_and(|flows| flows.release(packet_id));
        if known && st.durable {
            journal.push(Op::RemoveIncomingQos2 {
                client_id: Arc::clone(&self.client_id),
                packet_id,
            });
        }
        known
    }

    /// Ends the QoS 2 flow `packet_id` opened by a PUBLISH whose batch
    /// could not be stored: its PUBREC carries an error (MQTT 5: the flow
    /// is over, and the client may use the id again) or the connection
    /// closes (MQTT 3.x: the client sends the PUBLISH again, and it must be
    /// stored then, not taken for a retransmission).
    ///
    /// The id is removed from the store as well: the failure may have been
    /// another batch the acknowledgement depended on (the retained
    /// message's, see `Journal::depend_on`) while the one that opened the
    /// flow was written. Called from that batch's completion, the removal
    /// is submitted after it.
    pub fn abandon_incoming_qos2(&self, packet_id: u16) {
        // What a PUBREL does, with nobody to answer.
        let mut journal = Journal::new();
        self.pubrel(packet_id, &mut journal);
        self.commit(journal);
    }

    /// Whether the QoS 2 flow `packet_id` is open.
    pub fn has_incoming_qos2(&self, packet_id: u16) -> bool {
        self.state
            .lock()
            .incoming_qos2
            .as_ref()
            .is_some_and(|flows| flows.is_open(packet_id))
    }
}
