//! MQTT 5 topic aliases, both directions (MQTT 5 section 3.3.2.3.4).
//!
//! A topic alias is a per-connection number standing for a topic name, so
//! that a repeated topic is sent as two bytes instead of its full name.
//!
//! - [`InboundAliases`]: the aliases a client sets when it publishes, up to
//!   our Topic Alias Maximum (CONNACK). Using alias 0, one above the maximum,
//!   or an alias never set, is an error the caller turns into DISCONNECT.
//! - [`OutboundAliases`]: the aliases the broker assigns when it sends a
//!   PUBLISH, up to the client's Topic Alias Maximum (CONNECT). When every
//!   alias is taken, the least recently used one is reassigned. Only the
//!   writer, which encodes packets in the order they go on the wire, touches
//!   it, so the client always learns an alias before it sees it used alone.

use std::collections::HashMap;

use bytes::Bytes;

/// Outbound aliases the broker uses at most, whatever the client allows:
/// eviction scans the table, so it stays small enough to scan cheaply.
pub const OUTBOUND_ALIAS_LIMIT: u16 = 256;

/// Why an inbound alias was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AliasError {
    #[error("topic alias {0} is 0 or above the topic alias maximum")]
    OutOfRange(u16),
    #[error("topic alias {0} was used before it was set")]
    Unknown(u16),
}

/// Aliases set by the client. The table grows only as far as the highest
/// alias the client has set, so a client that uses none costs nothing.
#[derive(Debug)]
pub struct InboundAliases {
    maximum: u16,
    topics: Vec<Option<Bytes>>,
}

impl InboundAliases {
    /// A table accepting aliases 1..=maximum.
    pub fn new(maximum: u16) -> InboundAliases {
        InboundAliases {
            maximum,
            topics: Vec::new(),
        }
    }

    /// Resolves the topic of a PUBLISH carrying `alias`: a non-empty topic
    /// (re)defines the alias, an empty one uses it.
    pub fn resolve(&mut self, alias: u16, topic: &Bytes) -> Result<Bytes, AliasError> {
        if alias == 0 || alias > self.maximum {
            return Err(AliasError::OutOfRange(alias));
        }
        let slot = usize::from(alias) - 1;
        if topic.is_empty() {
            self.topics
                .get(slot)
                .cloned()
                .flatten()
                .ok_or(AliasError::Unknown(alias))
        } else {
            if self.topics.len() <= slot {
                self.topics.resize(slot + 1, None);
            }
            // A copy: a slice would keep the client's whole read buffer alive
            // for as long as the alias is set.
            self.topics[slot] = Some(Bytes::copy_from_slice(topic));
            Ok(topic.clone())
        }
    }
}

/// Aliases the broker assigns towards one client.
#[derive(Debug)]
pub struct OutboundAliases {
    maximum: u16,
    /// topic -> (alias, last use)
    by_topic: HashMap<Bytes, (u16, u64)>,
    /// alias - 1 -> topic
    by_alias: Vec<Option<Bytes>>,
    clock: u64,
}

impl OutboundAliases {
    /// `None` when the client allows no aliases.
    pub fn new(client_maximum: u16) -> Option<OutboundAliases> {
        let maximum = client_maximum.min(OUTBOUND_ALIAS_LIMIT);
        (maximum > 0).then(|| OutboundAliases {
            maximum,
            by_topic: HashMap::new(),
            by_alias: Vec::new(),
            clock: 0,
        })
    }

    /// Whether `topic` has an alias the client already knows: what
    /// [`assign`](Self::assign) would say, without assigning.
    pub fn is_known(&self, topic: &Bytes) -> bool {
        self.by_topic.contains_key(topic)
    }

    /// The alias to send with `topic`, and whether the client already knows
    /// it (then the topic name may be left out).
    pub fn assign(&mut self, topic: &Bytes) -> (u16, bool) {
        self.clock += 1;
        if let Some((alias, last_use)) = self.by_topic.get_mut(topic) {
            *last_use = self.clock;
            return (*alias, true);
        }
        let alias = if self.by_alias.len() < usize::from(self.maximum) {
            self.by_alias.push(None);
            self.by_alias.len() as u16
        } else {
            // Least recently used: the smallest last-use stamp.
            let (victim, _) = self
                .by_topic
                .iter()
                .min_by_key(|(_, (_, last_use))| *last_use)
                .map(|(t, v)| (t.clone(), *v))
                .expect("a full table has entries");
            self.by_topic
                .remove(&victim)
                .map(|(a, _)| a)
                .expect("victim is present")
        };
        self.by_alias[usize::from(alias) - 1] = Some(topic.clone());
        self.by_topic.insert(topic.clone(), (alias, self.clock));
        (alias, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_set_then_use() {
        let mut a = InboundAliases::new(2);
        let t = Bytes::from_static(b"a/b");
        assert_eq!(a.resolve(1, &t).unwrap(), t);
        assert_eq!(a.resolve(1, &Bytes::new()).unwrap(), t);
        assert_eq!(a.resolve(2, &Bytes::new()), Err(AliasError::Unknown(2)));
        assert_eq!(a.resolve(0, &t), Err(AliasError::OutOfRange(0)));
        assert_eq!(a.resolve(3, &t), Err(AliasError::OutOfRange(3)));
    }

    #[test]
    fn outbound_reuses_then_evicts_least_recently_used() {
        assert!(OutboundAliases::new(0).is_none());
        let mut a = OutboundAliases::new(2).unwrap();
        let (x, y, z) = (
            Bytes::from_static(b"x"),
            Bytes::from_static(b"y"),
            Bytes::from_static(b"z"),
        );
        assert_eq!(a.assign(&x), (1, false));
        assert_eq!(a.assign(&y), (2, false));
        assert_eq!(a.assign(&x), (1, true));
        // y is now least recently used: z takes its alias.
        assert_eq!(a.assign(&z), (2, false));
        assert_eq!(a.assign(&x), (1, true));
        assert_eq!(a.assign(&y), (2, false));
    }
}
