//! The QoS 2 flows a client has opened towards the broker: packet ids that
//! got a PUBREC and await their PUBREL.
//!
//! The ids outlive a connection with the session, so that a PUBLISH the
//! client sends again after a reconnect (it never saw the PUBREC) is
//! acknowledged but not routed twice. They count against the broker's
//! Receive Maximum only on the connection that opened them: MQTT 5 (4.9)
//! starts the client's send quota afresh on every connection, and a PUBREL
//! it sends again for an older flow takes none of it. Counting the carried
//! flows would refuse (0x93) a client that does exactly what the
//! specification asks.

use std::collections::HashSet;

/// A session may hold this many times Receive Maximum of open flows, carried
/// and new together. A client resends every PUBREL first thing after a
/// reconnect (MQTT-4.4.0-1), so the carried flows close at once; one that
/// instead reconnects and opens new flows again and again would otherwise
/// grow its session (and its stored record) up to all 65,535 packet ids.
pub const CARRIED_LIMITS: usize = 2;

/// Open incoming QoS 2 flows of one session. See the module documentation.
#[derive(Debug, Default)]
pub struct IncomingQos2 {
    /// Every open flow.
    ids: HashSet<u16>,
    /// Those of `ids` that an earlier connection (or the broker before a
    /// restart) opened.
    carried: HashSet<u16>,
}

/// What [`IncomingQos2::open`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// A new flow: route the message.
    New,
    /// The id is open already: a retransmission, acknowledged, not routed.
    Retransmission,
    /// The current connection already has `limit` flows open.
    OverLimit,
}

impl IncomingQos2 {
    /// A PUBLISH with `packet_id` on the current connection, which may have
    /// at most `limit` flows of its own open, and the session at most
    /// [`CARRIED_LIMITS`] x `limit` in all.
    pub fn open(&mut self, packet_id: u16, limit: u16) -> Opened {
        if self.ids.contains(&packet_id) {
            return Opened::Retransmission;
        }
        let limit = usize::from(limit);
        if self.ids.len() - self.carried.len() >= limit || self.ids.len() >= CARRIED_LIMITS * limit
        {
            return Opened::OverLimit;
        }
        self.ids.insert(packet_id);
        Opened::New
    }

    /// Whether `packet_id` is open.
    pub fn is_open(&self, packet_id: u16) -> bool {
        self.ids.contains(&packet_id)
    }

    /// A flow opened before a restart, from the store.
    pub fn restore(&mut self, packet_id: u16) {
        self.ids.insert(packet_id);
        self.carried.insert(packet_id);
    }

    /// PUBREL: closes the flow. False if `packet_id` was not open.
    pub fn release(&mut self, packet_id: u16) -> bool {
        self.carried.remove(&packet_id);
        self.ids.remove(&packet_id)
    }

    /// A new connection resumes the session: every open flow is carried.
    pub fn carry_over(&mut self) {
        self.carried.clone_from(&self.ids);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_counts_only_the_flows_it_opened() {
        let mut flows = IncomingQos2::default();
        assert_eq!(flows.open(1, 2), Opened::New);
        assert_eq!(flows.open(2, 2), Opened::New);
        assert_eq!(flows.open(3, 2), Opened::OverLimit);
        assert_eq!(flows.open(1, 2), Opened::Retransmission);
        // Reconnected: the two still open are the client's resent PUBRELs
        // to come, not part of its new quota.
        flows.carry_over();
        assert_eq!(flows.open(3, 2), Opened::New);
        assert_eq!(flows.open(4, 2), Opened::New);
        assert_eq!(flows.open(5, 2), Opened::OverLimit);
        // A retransmission of a carried flow is still recognised.
        assert_eq!(flows.open(2, 2), Opened::Retransmission);
        // Releasing a carried flow frees nothing of this connection's quota;
        // releasing one of its own does.
        assert!(flows.release(1));
        assert_eq!(flows.open(5, 2), Opened::OverLimit);
        assert!(flows.release(3));
        assert_eq!(flows.open(5, 2), Opened::New);
        assert!(!flows.release(1));
    }

    #[test]
    fn carried_and_new_flows_together_are_bounded() {
        let mut flows = IncomingQos2::default();
        let mut id = 0;
        for _ in 0..2 {
            for _ in 0..2 {
                id += 1;
                assert_eq!(flows.open(id, 2), Opened::New);
            }
            flows.carry_over();
        }
        // Four open, none released: a new connection may open none.
        assert_eq!(flows.open(id + 1, 2), Opened::OverLimit);
        assert!(flows.release(1));
        assert_eq!(flows.open(id + 1, 2), Opened::New);
    }

    #[test]
    fn flows_restored_after_a_restart_are_carried() {
        let mut flows = IncomingQos2::default();
        flows.restore(7);
        assert_eq!(flows.open(8, 1), Opened::New);
        assert_eq!(flows.open(7, 1), Opened::Retransmission);
        assert!(flows.release(7) && flows.release(8));
        assert!(!flows.release(7) && !flows.release(8));
    }
}
