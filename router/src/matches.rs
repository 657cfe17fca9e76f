//! The result of routing one topic: who receives it.
//!
//! A [`Matches`] is immutable once built and is shared through an `Arc`
//! between the match cache and every publisher that asked for it, so a cache
//! hit costs a reference-count increment, never a copy.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::options::SubscriptionOptions;
use crate::shared::SharedGroup;

/// One subscriber's non-shared subscriptions that matched a topic.
///
/// A subscriber appears once per [`Matches`] however many of its filters
/// matched; `subscriptions` lists the options of every one of them, so the
/// broker can send a single copy at the highest granted QoS carrying all the
/// subscription identifiers (MQTT-3.3.5-1) and still apply `no_local` per
/// subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientMatch<S> {
    /// Who subscribed.
    pub subscriber: S,
    /// The options of each of its matching subscriptions (at least one).
    pub subscriptions: SmallVec<[SubscriptionOptions; 1]>,
}

impl<S> ClientMatch<S> {
    /// The highest QoS granted among the matching subscriptions.
    pub fn max_qos(&self) -> u8 {
        self.subscriptions.iter().map(|o| o.qos).max().unwrap_or(0)
    }

    /// The subscription identifiers of the matching subscriptions that have one.
    pub fn subscription_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.subscriptions.iter().filter_map(|o| o.subscription_id)
    }
}

/// Everyone a message published to one topic goes to.
#[derive(Debug)]
pub struct Matches<S> {
    /// Non-shared matches, one entry per subscriber, in no particular order.
    pub clients: Vec<ClientMatch<S>>,
    /// One entry per shared subscription (group name + filter) with a
    /// matching filter, in no particular order. The broker picks one member
    /// of each with [`SharedGroup::pick`].
    pub shared: Vec<Arc<SharedGroup<S>>>,
}

impl<S> Matches<S> {
    /// Whether nobody matched.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty() && self.shared.is_empty()
    }
}

impl<S> Default for Matches<S> {
    fn default() -> Self {
        Self {
            clients: Vec::new(),
            shared: Vec::new(),
        }
    }
}
