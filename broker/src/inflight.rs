//! A session's in-flight window: the QoS 1/2 deliveries that hold a packet
//! identifier, oldest first, and the allocation of new identifiers.
//!
//! Every outgoing QoS 1/2 delivery passes through here twice (a packet id
//! when it is sent, removal when it is acknowledged), and the window may hold
//! up to 65,535 entries (the client's Receive Maximum), so nothing on those
//! paths may scan the whole window:
//!
//! - the counts the session asks for on every delivery (how much of the
//!   client's Receive Maximum is used and how many bytes that holds, whether
//!   anything waits to be resent or to become durable) are kept as counters,
//!   updated by every change of an entry's state;
//! - a new packet id comes from a run of identifiers known to be free
//!   (`free_run` ids from `next_id` on). The run is found by one sort of the
//!   ids in use when it is exhausted, or when an entry arrived that did not
//!   take its id from the run (restored at start-up); with a window of `n`
//!   that is one `O(n log n)` search per `65535 - n` ids handed out.
//! - Acknowledgements usually arrive in order, so looking an id up from the
//!   front finds it at once.
//!
//! # Invariants
//!
//! The owning session's lock is held for every call (the type has no lock of
//! its own). `resend` and `persisting` equal the number of entries in those
//! states; `used_bytes` is the sum of the `weight`s of the entries not in
//! `Resend`; no entry's packet id lies in the `free_run` ids from `next_id` on;
//! packet ids are unique within the window.

use std::collections::VecDeque;

use crate::session::{queued_size, Delivery};

/// The number of MQTT packet identifiers (1..=65535; 0 is not one).
const ID_SPACE: u32 = u16::MAX as u32;

/// How a QoS 1/2 message waits for acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InflightState {
    /// QoS 1 sent, waiting for PUBACK; or QoS 2 sent, waiting for PUBREC.
    Sent,
    /// Sent on an earlier connection and not acknowledged; to be sent again
    /// (same packet id, DUP) as soon as the client's Receive Maximum allows.
    Resend,
    /// QoS 2 PUBREL sent, waiting for PUBCOMP.
    Released,
    /// QoS 2 PUBREC received; the PUBREL waits until the queue entry that
    /// records it is durable (durable sessions). A restart that found the
    /// entry still awaiting PUBREC would send the PUBLISH again, which a
    /// client that had its PUBREL takes for a new message.
    Releasing,
    /// QoS 2 with its packet id assigned, not yet on the wire: it is sent
    /// once the queue entry holding the id is durable (durable sessions).
    /// A QoS 1 message sent after one waits too, to keep the order.
    Persisting,
}

/// One delivery holding a packet identifier.
#[derive(Debug)]
pub(crate) struct Inflight {
    pub packet_id: u16,
    pub delivery: Delivery,
    state: InflightState,
    /// What the delivery weighed when it entered the window
    /// (`session::queued_size`, at most a packet's 256 MiB and its
    /// subscription identifiers), kept so that the byte count never drifts
    /// when a delivery's message is replaced by a copy. A `u32` beside the
    /// packet id and state keeps an entry at 56 bytes instead of 64.
    weight: u32,
}

impl Inflight {
    pub fn state(&self) -> InflightState {
        self.state
    }

    /// What the entry counts in [`InflightWindow::used_bytes`] while it is
    /// not in `Resend`.
    pub fn weight(&self) -> usize {
        self.weight as usize
    }
}

/// The in-flight deliveries of one session, in the order they took their
/// packet ids (restored ones first).
#[derive(Debug)]
pub(crate) struct InflightWindow {
    entries: VecDeque<Inflight>,
    /// Entries in `Resend`.
    resend: usize,
    /// Entries in `Persisting`.
    persisting: usize,
    /// Weight of the entries not in `Resend` (see [`used_bytes`](Self::used_bytes)).
    used_bytes: usize,
    /// The first identifier of the free run.
    next_id: u16,
    /// Identifiers from `next_id` on that no entry holds.
    free_run: u32,
}

impl Default for InflightWindow {
    fn default() -> Self {
        InflightWindow {
            entries: VecDeque::new(),
            resend: 0,
            persisting: 0,
            used_bytes: 0,
            next_id: 1,
            free_run: ID_SPACE,
        }
    }
}

impl InflightWindow {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entries that count against the client's Receive Maximum: everything
    /// sent on this connection (or about to be) and not yet acknowledged.
    pub fn used(&self) -> usize {
        self.entries.len() - self.resend
    }

    /// The bytes (`session::queued_size`) of the entries [`used`](Self::used)
    /// counts: what the client holds unacknowledged.
    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }

    /// True if an entry waits to be sent again after a reconnect.
    pub fn has_resend(&self) -> bool {
        self.resend > 0
    }

    /// True if an entry waits for its queue entry to become durable.
    pub fn has_persisting(&self) -> bool {
        self.persisting > 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &Inflight> {
        self.entries.iter()
    }

    /// Every entry's delivery, to change what it carries (not its packet id
    /// or state, which the counters follow).
    pub fn deliveries_mut(&mut self) -> impl Iterator<Item = &mut Delivery> {
        self.entries.iter_mut().map(|entry| &mut entry.delivery)
    }

    /// One entry's delivery, as [`deliveries_mut`](Self::deliveries_mut).
    pub fn delivery_mut(&mut self, index: usize) -> &mut Delivery {
        &mut self.entries[index].delivery
    }

    pub fn get(&self, index: usize) -> &Inflight {
        &self.entries[index]
    }

    /// The index of the entry holding `packet_id`.
    pub fn position(&self, packet_id: u16) -> Option<usize> {
        self.entries.iter().position(|i| i.packet_id == packet_id)
    }

    /// The index of the first entry for which `predicate` holds.
    pub fn position_where(&self, predicate: impl Fn(&Inflight) -> bool) -> Option<usize> {
        self.entries.iter().position(predicate)
    }

    /// The oldest entry waiting to be sent again.
    pub fn first_resend(&self) -> Option<usize> {
        if self.resend == 0 {
            return None;
        }
        self.position_where(|i| i.state == InflightState::Resend)
    }

    pub fn set_state(&mut self, index: usize, state: InflightState) {
        let entry = &mut self.entries[index];
        let old = std::mem::replace(&mut entry.state, state);
        let weight = entry.weight;
        self.uncount(old, weight);
        self.count(state, weight);
    }

    /// Marks the entry's delivery as a retransmission.
    pub fn set_dup(&mut self, index: usize) {
        self.entries[index].delivery.dup = true;
    }

    /// Gives `delivery` a free packet identifier and appends it. Gives the
    /// delivery back only when all 65,535 identifiers are held, which the
    /// session's window check rules out (a window is at most 65,535).
    pub fn assign(
        &mut self,
        mut delivery: Delivery,
        state: InflightState,
    ) -> Result<u16, Delivery> {
        if self.free_run == 0 {
            self.find_free_run();
        }
        if self.free_run == 0 {
            return Err(delivery);
        }
        let packet_id = self.next_id;
        self.next_id = advance(packet_id, 1);
        self.free_run -= 1;
        delivery.packet_id = Some(packet_id);
        self.append(packet_id, delivery, state);
        Ok(packet_id)
    }

    /// The newest entry.
    pub fn last(&self) -> Option<&Inflight> {
        self.entries.back()
    }

    /// Appends an entry whose packet id was given elsewhere (restored from
    /// the store). False, and nothing changed, if the id is already held.
    pub fn restore(&mut self, packet_id: u16, delivery: Delivery, state: InflightState) -> bool {
        if packet_id == 0 || self.position(packet_id).is_some() {
            return false;
        }
        // The id may lie in the free run: find a new one on next use.
        self.free_run = 0;
        self.append(packet_id, delivery, state);
        true
    }

    pub fn remove(&mut self, index: usize) -> Option<Inflight> {
        let removed = self.entries.remove(index)?;
        self.uncount(removed.state, removed.weight);
        Some(removed)
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.resend = 0;
        self.persisting = 0;
        self.used_bytes = 0;
        self.free_run = 0;
    }

    fn append(&mut self, packet_id: u16, delivery: Delivery, state: InflightState) {
        let weight = u32::try_from(queued_size(&delivery)).unwrap_or(u32::MAX);
        self.count(state, weight);
        self.entries.push_back(Inflight {
            packet_id,
            delivery,
            state,
            weight,
        });
    }

    fn count(&mut self, state: InflightState, weight: u32) {
        match state {
            InflightState::Resend => self.resend += 1,
            InflightState::Persisting => self.persisting += 1,
            InflightState::Sent | InflightState::Released | InflightState::Releasing => {}
        }
        if state != InflightState::Resend {
            self.used_bytes += weight as usize;
        }
    }

    fn uncount(&mut self, state: InflightState, weight: u32) {
        match state {
            InflightState::Resend => self.resend -= 1,
            InflightState::Persisting => self.persisting -= 1,
            InflightState::Sent | InflightState::Released | InflightState::Releasing => {}
        }
        if state != InflightState::Resend {
            self.used_bytes -= weight as usize;
        }
    }

    /// Finds the first identifier at or after `next_id` (cyclically) that no
    /// entry holds, and how many follow it free.
    fn find_free_run(&mut self) {
        let mut held: Vec<u32> = self
            .entries
            .iter()
            .map(|i| distance(self.next_id, i.packet_id))
            .collect();
        held.sort_unstable();
        let mut start = 0;
        for &d in &held {
            match d.cmp(&start) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => start += 1,
                std::cmp::Ordering::Greater => break,
            }
        }
        if start >= ID_SPACE {
            return;
        }
        let end = held
            .iter()
            .copied()
            .find(|&d| d > start)
            .unwrap_or(ID_SPACE);
        self.next_id = advance(self.next_id, start);
        self.free_run = end - start;
    }
}

/// How many steps from identifier `from` forward to `to`, wrapping from
/// 65535 to 1.
fn distance(from: u16, to: u16) -> u32 {
    (u32::from(to) + ID_SPACE - u32::from(from)) % ID_SPACE
}

/// The identifier `steps` after `id`, wrapping from 65535 to 1.
fn advance(id: u16, steps: u32) -> u16 {
    // In range: the result is 1..=65535.
    ((u32::from(id) - 1 + steps) % ID_SPACE + 1) as u16
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use bytes::Bytes;
    use tern_codec::QoS;

    use super::*;
    use crate::message::Message;

    fn delivery() -> Delivery {
        delivery_of(0)
    }

    /// A delivery of topic `t` and `payload` bytes: it weighs `1 + payload`.
    fn delivery_of(payload: usize) -> Delivery {
        let message = Message::new(
            Bytes::from_static(b"t"),
            Bytes::from(vec![0; payload]),
            QoS::AtLeastOnce,
            false,
            None,
            0,
        );
        Delivery::new(&message, QoS::AtLeastOnce, false, Default::default())
    }

    #[test]
    fn identifiers_wrap_from_65535_to_1_and_skip_held_ones() {
        let mut w = InflightWindow::default();
        assert!(w.restore(3, delivery(), InflightState::Resend));
        assert!(w.restore(65535, delivery(), InflightState::Sent));
        assert_eq!(w.assign(delivery(), InflightState::Sent).ok(), Some(1));
        assert_eq!(w.assign(delivery(), InflightState::Sent).ok(), Some(2));
        assert_eq!(w.assign(delivery(), InflightState::Sent).ok(), Some(4));
        assert_eq!(distance(65535, 1), 1);
        assert_eq!(advance(65535, 1), 1);
        assert_eq!(advance(65534, 3), 2);
    }

    #[test]
    fn used_bytes_counts_every_entry_but_those_to_resend() {
        let mut w = InflightWindow::default();
        w.assign(delivery_of(99), InflightState::Sent).unwrap();
        w.assign(delivery_of(9), InflightState::Persisting).unwrap();
        w.restore(9, delivery_of(999), InflightState::Resend);
        assert_eq!(w.used_bytes(), 100 + 10);
        assert_eq!(w.get(2).weight(), 1000);
        w.set_state(2, InflightState::Sent);
        assert_eq!(w.used_bytes(), 1110);
        w.set_state(0, InflightState::Resend);
        assert_eq!(w.used_bytes(), 1010);
        // A copy of its message does not change what an entry counts.
        *w.delivery_mut(1) = delivery_of(5000);
        assert_eq!(w.remove(1).map(|i| i.weight()), Some(10));
        assert_eq!(w.used_bytes(), 1000);
        w.remove(0);
        assert_eq!(w.used_bytes(), 1000);
        w.clear();
        assert_eq!(w.used_bytes(), 0);
    }

    /// A window may hold 65,535 entries: each is a delivery and 8 bytes.
    #[test]
    fn an_entry_is_a_delivery_and_8_bytes() {
        assert!(std::mem::size_of::<Inflight>() <= std::mem::size_of::<Delivery>() + 8);
    }

    #[test]
    fn counters_follow_every_state_change() {
        let mut w = InflightWindow::default();
        assert_eq!(w.assign(delivery(), InflightState::Sent).ok(), Some(1));
        assert_eq!(
            w.assign(delivery(), InflightState::Persisting).ok(),
            Some(2)
        );
        w.restore(9, delivery(), InflightState::Resend);
        assert_eq!((w.len(), w.used()), (3, 2));
        assert!(w.has_persisting() && w.has_resend());
        assert_eq!(w.first_resend(), Some(2));
        w.set_state(2, InflightState::Sent);
        w.set_state(1, InflightState::Released);
        assert!(!w.has_persisting() && !w.has_resend());
        assert_eq!(w.used(), 3);
        w.set_state(0, InflightState::Resend);
        assert_eq!(w.remove(0).map(|i| i.state()), Some(InflightState::Resend));
        assert!(!w.has_resend());
        w.clear();
        assert_eq!((w.len(), w.used()), (0, 0));
    }

    /// A long random run of assignments, out-of-order removals and restored
    /// entries never hands out an identifier that is held.
    #[test]
    fn never_hands_out_a_held_identifier() {
        let mut w = InflightWindow::default();
        let mut held = HashSet::new();
        let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for round in 0..400_000u32 {
            let r = next();
            if held.len() < 3000 && r % 3 != 0 {
                let id = w.assign(delivery(), InflightState::Sent).unwrap();
                assert!(held.insert(id), "id {id} handed out twice (round {round})");
            } else if r % 50 == 0 {
                let id = (next() % 65535 + 1) as u16;
                if w.restore(id, delivery(), InflightState::Resend) {
                    assert!(held.insert(id));
                }
            } else if !held.is_empty() {
                // Mostly the oldest, sometimes any.
                let index = if r % 7 == 0 {
                    (next() as usize) % w.len()
                } else {
                    0
                };
                let gone = w.remove(index).unwrap();
                assert!(held.remove(&gone.packet_id));
            }
            assert_eq!(w.len(), held.len());
        }
    }

    #[test]
    fn a_full_identifier_space_yields_none() {
        let mut w = InflightWindow::default();
        for _ in 0..ID_SPACE {
            assert!(w.assign(delivery(), InflightState::Sent).is_ok());
        }
        assert!(w.assign(delivery(), InflightState::Sent).is_err());
        w.remove(100);
        assert_eq!(w.assign(delivery(), InflightState::Sent).ok(), Some(101));
    }
}
