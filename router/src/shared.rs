//! Shared subscription groups (`$share/{group}/{filter}`, MQTT 5.0 section 4.8.2).
//!
//! A group is stored in the trie node of its inner filter as an immutable
//! snapshot, `Arc<SharedGroup<S>>`. Membership changes never mutate a
//! snapshot: the router builds a new one (read-copy-update) and swaps it in,
//! so match results already handed out stay valid and consistent. The
//! round-robin cursor is an `Arc<AtomicUsize>` carried over from snapshot to
//! snapshot, so members joining or leaving do not reset the rotation.
//!
//! Rebuilding a snapshot costs O(members of that group); that is the price of
//! giving `pick` a plain slice to rotate over without any lock.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::options::SubscriptionOptions;

/// An immutable snapshot of one shared subscription: a group name, the filter
/// it subscribed to, and its members in joining order.
pub struct SharedGroup<S> {
    /// The share name (the `{group}` of `$share/{group}/{filter}`).
    pub group: Arc<str>,
    /// The filter part, without the `$share/{group}/` prefix.
    pub filter: Arc<str>,
    /// The members and their options, in the order they joined.
    pub members: Vec<(S, SubscriptionOptions)>,
    /// Index of the member to try first on the next pick. Shared by every
    /// snapshot of this group; reduced modulo the member count when read.
    cursor: Arc<AtomicUsize>,
}

impl<S> SharedGroup<S> {
    /// A first snapshot with a fresh cursor.
    pub(crate) fn new(
        group: Arc<str>,
        filter: Arc<str>,
        members: Vec<(S, SubscriptionOptions)>,
    ) -> Self {
        Self {
            group,
            filter,
            members,
            cursor: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A new snapshot of the same group (same name, filter and cursor) with
    /// another member list.
    pub(crate) fn with_members(&self, members: Vec<(S, SubscriptionOptions)>) -> Self {
        Self {
            group: Arc::clone(&self.group),
            filter: Arc::clone(&self.filter),
            members,
            cursor: Arc::clone(&self.cursor),
        }
    }

    /// Round-robin: starting after the last pick, returns the first member
    /// for which `eligible` is true (for example, the member is online),
    /// advancing the cursor past it. `None` if no member is eligible.
    ///
    /// Lock-free. Concurrent picks on the same group may occasionally return
    /// the same member; the rotation stays fair over time.
    pub fn pick(&self, eligible: impl Fn(&S) -> bool) -> Option<&(S, SubscriptionOptions)> {
        let len = self.members.len();
        if len == 0 {
            return None;
        }
        let start = self.cursor.load(Ordering::Relaxed) % len;
        (0..len)
            .map(|offset| (start + offset) % len)
            .find(|&index| eligible(&self.members[index].0))
            .map(|index| {
                self.cursor.store(index + 1, Ordering::Relaxed);
                &self.members[index]
            })
    }

    /// A new snapshot of the same group without the member at `position`.
    /// The cursor keeps pointing at the same next member: removing a member
    /// before it shifts it back by one, so nobody is skipped or picked twice.
    pub(crate) fn without_member(&self, position: usize) -> Self
    where
        S: Clone,
    {
        let mut members = self.members.clone();
        if position < members.len() {
            members.remove(position);
            let next = self.cursor.load(Ordering::Relaxed) % self.members.len();
            let next = if position < next { next - 1 } else { next };
            self.cursor.store(next, Ordering::Relaxed);
        }
        self.with_members(members)
    }

    /// Whether `subscriber` is a member of this group.
    pub fn contains(&self, subscriber: &S) -> bool
    where
        S: PartialEq,
    {
        self.members.iter().any(|(member, _)| member == subscriber)
    }
}

impl<S: fmt::Debug> fmt::Debug for SharedGroup<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedGroup")
            .field("group", &self.group)
            .field("filter", &self.filter)
            .field("members", &self.members)
            .field("cursor", &self.cursor.load(Ordering::Relaxed))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(members: &[u32]) -> SharedGroup<u32> {
        SharedGroup::new(
            Arc::from("g"),
            Arc::from("a/b"),
            members
                .iter()
                .map(|&m| (m, SubscriptionOptions::default()))
                .collect(),
        )
    }

    fn pick(g: &SharedGroup<u32>, eligible: impl Fn(&u32) -> bool) -> Option<u32> {
        g.pick(eligible).map(|(m, _)| *m)
    }

    #[test]
    fn alternates() {
        let g = group(&[1, 2]);
        let picks: Vec<_> = (0..4).map(|_| pick(&g, |_| true)).collect();
        assert_eq!(picks, [Some(1), Some(2), Some(1), Some(2)]);
    }

    #[test]
    fn skips_ineligible() {
        let g = group(&[1, 2, 3]);
        let picks: Vec<_> = (0..4).map(|_| pick(&g, |&m| m != 2)).collect();
        assert_eq!(picks, [Some(1), Some(3), Some(1), Some(3)]);
        assert_eq!(pick(&g, |_| false), None);
        assert_eq!(pick(&group(&[]), |_| true), None);
    }

    #[test]
    fn cursor_survives_rebuild() {
        let g = group(&[1, 2, 3]);
        assert_eq!(pick(&g, |_| true), Some(1));
        // Member 2 (the next candidate) leaves: the pick continues with 3.
        let g2 = g.without_member(1);
        assert_eq!(pick(&g2, |_| true), Some(3));
        assert_eq!(pick(&g2, |_| true), Some(1));
        assert!(g2.contains(&3));
        assert!(!g2.contains(&2));
        // Member 1 (before the cursor) leaves: 3 is still next.
        let g3 = g2.without_member(0);
        assert_eq!(pick(&g3, |_| true), Some(3));
        // Joining keeps the rotation.
        let g4 = g3.with_members(vec![(3, Default::default()), (4, Default::default())]);
        assert_eq!(pick(&g4, |_| true), Some(4));
        assert_eq!(pick(&g4, |_| true), Some(3));
        // Out-of-range positions change nothing.
        assert_eq!(g4.without_member(7).members.len(), 2);
    }
}
