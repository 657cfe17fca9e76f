//! The subscription identifiers one delivery carries (MQTT 5, 3.3.4): the
//! identifiers of the subscriber's subscriptions that matched the topic.
//!
//! Almost every delivery carries none or one, and a delivery sits in a
//! queue slot of every subscriber it goes to, so the type is 16 bytes and
//! allocates only for two or more (a `SmallVec<[u32; 2]>` took 24, which
//! made each queued delivery 8 bytes larger for a feature most clients do
//! not use). Identifiers run from 1 to 268,435,455 (a 0 in SUBSCRIBE is a
//! protocol error, 3.8.2.1.2), so a 0 pushed here is ignored.

/// The subscription identifiers of one delivery, in the order added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionIds(Repr);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Repr {
    #[default]
    None,
    One(u32),
    /// A thin pointer on purpose: a `Box<[u32]>` would make the type 24
    /// bytes; two allocations for the rare delivery with several identifiers
    /// are the price of 16 for all the others.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<u32>>),
}

impl SubscriptionIds {
    /// No identifiers.
    pub fn new() -> SubscriptionIds {
        SubscriptionIds(Repr::None)
    }

    /// Adds `id`; a 0 (not a valid identifier) is ignored.
    pub fn push(&mut self, id: u32) {
        if id == 0 {
            return;
        }
        self.0 = match std::mem::take(&mut self.0) {
            Repr::None => Repr::One(id),
            Repr::One(first) => Repr::Many(Box::new(vec![first, id])),
            Repr::Many(mut ids) => {
                ids.push(id);
                Repr::Many(ids)
            }
        };
    }

    /// Keeps one of each identifier. Two subscriptions that matched with
    /// the same identifier tell the client nothing twice, and a client that
    /// dispatches by identifier would hand the message to the same handler
    /// twice. The order changes (MQTT-3.3.4-4: it is not significant); one
    /// sort, so a delivery matched by thousands of subscriptions costs
    /// `n log n`, not `n²`.
    pub fn dedup(&mut self) {
        if let Repr::Many(ids) = &mut self.0 {
            ids.sort_unstable();
            ids.dedup();
            if let [only] = ids[..] {
                self.0 = Repr::One(only);
            }
        }
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        matches!(self.0, Repr::None)
    }

    /// The identifiers, in the order added.
    pub fn as_slice(&self) -> &[u32] {
        match &self.0 {
            Repr::None => &[],
            Repr::One(id) => std::slice::from_ref(id),
            Repr::Many(ids) => ids,
        }
    }

    /// The identifiers as a vector (for a PUBLISH's properties or a record).
    pub fn to_vec(&self) -> Vec<u32> {
        self.as_slice().to_vec()
    }

    /// Bytes held on the heap: none for zero or one identifier. A queue
    /// counts them with the delivery: one SUBSCRIBE of thousands of
    /// overlapping filters puts thousands of identifiers on every delivery
    /// of a topic they all match.
    pub fn heap_bytes(&self) -> usize {
        match &self.0 {
            Repr::None | Repr::One(_) => 0,
            Repr::Many(ids) => std::mem::size_of::<Vec<u32>>() + ids.capacity() * 4,
        }
    }
}

impl FromIterator<u32> for SubscriptionIds {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> SubscriptionIds {
        let mut ids = SubscriptionIds::new();
        for id in iter {
            ids.push(id);
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_one_and_many_keep_their_order() {
        let mut ids = SubscriptionIds::new();
        assert!(ids.is_empty());
        assert_eq!(ids.as_slice(), &[] as &[u32]);
        ids.push(7);
        assert!(!ids.is_empty());
        assert_eq!(ids.as_slice(), &[7]);
        ids.push(3);
        ids.push(268_435_455);
        assert_eq!(ids.to_vec(), vec![7, 3, 268_435_455]);
        let collected: SubscriptionIds = [5, 0, 6].into_iter().collect();
        assert_eq!(collected.as_slice(), &[5, 6], "0 is not an identifier");
    }

    #[test]
    fn dedup_keeps_one_of_each() {
        let mut ids: SubscriptionIds = [7, 3, 7, 3, 9].into_iter().collect();
        ids.dedup();
        assert_eq!(ids.as_slice(), [3, 7, 9]);
        let mut twice: SubscriptionIds = [2333, 2333].into_iter().collect();
        twice.dedup();
        assert_eq!(twice, SubscriptionIds(Repr::One(2333)));
        assert_eq!(twice.heap_bytes(), 0);
    }

    #[test]
    fn many_identifiers_are_counted_by_what_they_hold() {
        assert_eq!(SubscriptionIds::new().heap_bytes(), 0);
        assert_eq!([1].into_iter().collect::<SubscriptionIds>().heap_bytes(), 0);
        let many: SubscriptionIds = (1..=1000).collect();
        assert!(many.heap_bytes() >= 4000, "{}", many.heap_bytes());
    }

    #[test]
    fn it_fits_in_two_words() {
        assert_eq!(std::mem::size_of::<SubscriptionIds>(), 16);
    }
}
