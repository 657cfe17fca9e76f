//! The subscription trie: one node per filter level.
//!
//! Shape (as in NATS's sublist): each node has a map of literal child levels
//! plus two dedicated slots for the `+` and `#` children, and holds the
//! subscriptions whose filter ends exactly at that node, non-shared ones
//! (subscriber -> options) and shared ones (group name -> group snapshot).
//!
//! Invariants, upheld by every `&mut` method here:
//! * no node other than the root is empty (no subscriptions and no children):
//!   removal prunes the chain of nodes it emptied;
//! * a `#` node has no children (`#` is always a filter's last level);
//! * a filter is stored at exactly one node, the one reached by its levels.
//!
//! Every walk is iterative, so filters and topics with tens of thousands of
//! levels cannot overflow the stack, and `Drop` is iterative for the same
//! reason.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::levels::Levels;
use crate::matches::{ClientMatch, Matches};
use crate::options::SubscriptionOptions;
use crate::shared::SharedGroup;

/// One level of the trie.
pub(crate) struct Node<S> {
    /// Literal child levels (never `+` or `#`).
    children: Levels<Node<S>>,
    /// The `+` child.
    plus: Option<Box<Node<S>>>,
    /// The `#` child (always a leaf).
    hash: Option<Box<Node<S>>>,
    /// The subscriptions whose filter ends here; `None` when there are none
    /// (never an empty box): most nodes are levels on the way to others,
    /// and a chain of them costs a few dozen bytes a level (levels.rs).
    ends: Option<Box<Subscriptions<S>>>,
}

/// The subscriptions whose filter ends at a node.
struct Subscriptions<S> {
    /// Non-shared ones: subscriber -> options.
    subs: HashMap<S, SubscriptionOptions>,
    /// Shared ones, by group name.
    shared: HashMap<Arc<str>, Arc<SharedGroup<S>>>,
}

impl<S> Node<S> {
    fn new() -> Self {
        Self {
            children: Levels::default(),
            plus: None,
            hash: None,
            ends: None,
        }
    }

    fn child(&self, level: &str) -> Option<&Node<S>> {
        match level {
            "+" => self.plus.as_deref(),
            "#" => self.hash.as_deref(),
            _ => self.children.get(level),
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<S>> {
        match level {
            "+" => self.plus.as_deref_mut(),
            "#" => self.hash.as_deref_mut(),
            _ => self.children.get_mut(level),
        }
    }

    fn child_or_insert(&mut self, level: &str) -> &mut Node<S> {
        match level {
            "+" => self.plus.get_or_insert_with(|| Box::new(Node::new())),
            "#" => self.hash.get_or_insert_with(|| Box::new(Node::new())),
            _ => self.children.get_or_insert_with(level, Node::new),
        }
    }

    fn remove_child(&mut self, level: &str) {
        match level {
            "+" => self.plus = None,
            "#" => self.hash = None,
            _ => {
                self.children.remove(level);
            }
        }
    }

    fn child_count(&self) -> usize {
        self.children.len() + usize::from(self.plus.is_some()) + usize::from(self.hash.is_some())
    }

    fn has_subscriptions(&self) -> bool {
        self.ends.is_some()
    }

    /// The subscriptions ending here, made if there are none yet.
    fn ends_mut(&mut self) -> &mut Subscriptions<S> {
        self.ends.get_or_insert_with(|| {
            Box::new(Subscriptions {
                subs: HashMap::new(),
                shared: HashMap::new(),
            })
        })
    }

    /// Drops the subscriptions' box once a removal emptied it.
    fn drop_empty_ends(&mut self) {
        if self
            .ends
            .as_ref()
            .is_some_and(|e| e.subs.is_empty() && e.shared.is_empty())
        {
            self.ends = None;
        }
    }

    /// Moves every child out of this node (used by the iterative drop and count).
    fn take_children(&mut self, into: &mut Vec<Node<S>>) {
        self.children.take_into(into);
        into.extend(self.plus.take().map(|b| *b));
        into.extend(self.hash.take().map(|b| *b));
    }

    fn all_children(&self) -> impl Iterator<Item = &Node<S>> {
        self.children
            .values()
            .chain(self.plus.as_deref())
            .chain(self.hash.as_deref())
    }
}

impl<S> Drop for Node<S> {
    /// Iterative, so a very deep trie cannot overflow the stack when dropped.
    fn drop(&mut self) {
        let mut stack = Vec::new();
        self.take_children(&mut stack);
        while let Some(mut node) = stack.pop() {
            node.take_children(&mut stack);
            // `node` now has no children: dropping it does not recurse.
        }
    }
}

/// The subscription trie. Not synchronised: [`crate::Router`] wraps it in its lock.
pub(crate) struct Tree<S> {
    root: Node<S>,
}

impl<S: Clone + Eq + Hash> Tree<S> {
    pub(crate) fn new() -> Self {
        Self { root: Node::new() }
    }

    /// The node for `filter`, created (with its ancestors) if missing.
    fn node_or_insert(&mut self, filter: &str) -> &mut Node<S> {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.child_or_insert(level);
        }
        node
    }

    fn node_mut(&mut self, filter: &str) -> Option<&mut Node<S>> {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.child_mut(level)?;
        }
        Some(node)
    }

    /// Adds or replaces a non-shared subscription; returns the old options.
    pub(crate) fn insert(
        &mut self,
        filter: &str,
        subscriber: &S,
        options: SubscriptionOptions,
    ) -> Option<SubscriptionOptions> {
        self.node_or_insert(filter)
            .ends_mut()
            .subs
            .insert(subscriber.clone(), options)
    }

    /// Adds `subscriber` to the shared group `group` on `filter`, or replaces
    /// its options there. Rebuilds the group snapshot. Returns whether it was
    /// already a member.
    pub(crate) fn insert_shared(
        &mut self,
        group: &str,
        filter: &str,
        subscriber: &S,
        options: SubscriptionOptions,
    ) -> bool {
        let shared = &mut self.node_or_insert(filter).ends_mut().shared;
        match shared.get_mut(group) {
            Some(snapshot) => {
                let mut members = snapshot.members.clone();
                let replaced = match members.iter_mut().find(|(m, _)| m == subscriber) {
                    Some(member) => {
                        member.1 = options;
                        true
                    }
                    None => {
                        members.push((subscriber.clone(), options));
                        false
                    }
                };
                *snapshot = Arc::new(snapshot.with_members(members));
                replaced
            }
            None => {
                let group: Arc<str> = Arc::from(group);
                let snapshot = SharedGroup::new(
                    Arc::clone(&group),
                    Arc::from(filter),
                    vec![(subscriber.clone(), options)],
                );
                shared.insert(group, Arc::new(snapshot));
                false
            }
        }
    }

    /// Removes a non-shared subscription; returns whether it existed.
    pub(crate) fn remove(&mut self, filter: &str, subscriber: &S) -> bool {
        let removed = self.node_mut(filter).is_some_and(|node| {
            let removed = node
                .ends
                .as_mut()
                .is_some_and(|e| e.subs.remove(subscriber).is_some());
            node.drop_empty_ends();
            removed
        });
        if removed {
            self.prune(filter);
        }
        removed
    }

    /// Removes `subscriber` from the shared group; returns whether it was a
    /// member. Rebuilds the group snapshot, or drops the group if now empty.
    pub(crate) fn remove_shared(&mut self, group: &str, filter: &str, subscriber: &S) -> bool {
        let Some(node) = self.node_mut(filter) else {
            return false;
        };
        let Some(ends) = node.ends.as_mut() else {
            return false;
        };
        let Some(snapshot) = ends.shared.get_mut(group) else {
            return false;
        };
        let Some(position) = snapshot.members.iter().position(|(m, _)| m == subscriber) else {
            return false;
        };
        if snapshot.members.len() == 1 {
            ends.shared.remove(group);
            node.drop_empty_ends();
            self.prune(filter);
        } else {
            *snapshot = Arc::new(snapshot.without_member(position));
        }
        true
    }

    /// Removes the chain of empty nodes at the end of `filter`'s path.
    ///
    /// Finds the deepest node on the path that must stay (the root, or one
    /// holding subscriptions or a child off the path) and cuts the edge below it.
    fn prune(&mut self, filter: &str) {
        let depth = filter.split('/').count();
        let mut keep = 0;
        let mut node = &self.root;
        for (index, level) in filter.split('/').enumerate() {
            let Some(child) = node.child(level) else {
                return;
            };
            node = child;
            let level_depth = index + 1;
            let path_children = usize::from(level_depth < depth);
            if node.has_subscriptions() || node.child_count() > path_children {
                keep = level_depth;
            }
        }
        if keep == depth {
            return;
        }
        let mut levels = filter.split('/');
        let mut node = &mut self.root;
        for level in levels.by_ref().take(keep) {
            match node.child_mut(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        if let Some(level) = levels.next() {
            node.remove_child(level);
        }
    }

    /// Everyone whose filter matches `topic`.
    pub(crate) fn matches(&self, topic: &str) -> Matches<S> {
        let levels: SmallVec<[&str; 16]> = topic.split('/').collect();
        // MQTT-4.7.2-1: no wildcard in the first level matches a '$' topic.
        let dollar = topic.starts_with('$');
        let mut matched: SmallVec<[&Subscriptions<S>; 8]> = SmallVec::new();
        let mut stack: SmallVec<[(&Node<S>, usize); 16]> = SmallVec::new();
        stack.push((&self.root, 0));
        while let Some((node, depth)) = stack.pop() {
            let Some(level) = levels.get(depth) else {
                // Every level consumed: this node matches, and so does its
                // '#' child ("sport/#" matches "sport").
                matched.extend(node.ends.as_deref());
                matched.extend(node.hash.as_deref().and_then(|h| h.ends.as_deref()));
                continue;
            };
            if depth > 0 || !dollar {
                matched.extend(node.hash.as_deref().and_then(|h| h.ends.as_deref()));
                if let Some(plus) = node.plus.as_deref() {
                    stack.push((plus, depth + 1));
                }
            }
            if let Some(child) = node.children.get(level) {
                stack.push((child, depth + 1));
            }
        }
        Self::aggregate(&matched)
    }

    /// Builds the result from the matching nodes, merging the subscriptions
    /// of a subscriber that matched through several filters.
    fn aggregate(matched: &[&Subscriptions<S>]) -> Matches<S> {
        let mut result = Matches::default();
        let with_subs = matched.iter().filter(|n| !n.subs.is_empty()).count();
        let client_total: usize = matched.iter().map(|n| n.subs.len()).sum();
        result.clients.reserve_exact(client_total);
        // Only when several filters matched can a subscriber appear twice.
        let mut seen: HashMap<&S, usize> = HashMap::new();
        for node in matched {
            for (subscriber, options) in &node.subs {
                if with_subs > 1 {
                    if let Some(&index) = seen.get(subscriber) {
                        if let Some(entry) = result.clients.get_mut(index) {
                            entry.subscriptions.push(*options);
                        }
                        continue;
                    }
                    seen.insert(subscriber, result.clients.len());
                }
                let mut subscriptions = SmallVec::new();
                subscriptions.push(*options);
                result.clients.push(ClientMatch {
                    subscriber: subscriber.clone(),
                    subscriptions,
                });
            }
            result.shared.extend(node.shared.values().cloned());
        }
        result.clients.shrink_to_fit();
        result
    }

    /// Number of nodes, root excluded (so an empty tree has none).
    pub(crate) fn node_count(&self) -> usize {
        let mut count = 0;
        let mut stack = vec![&self.root];
        while let Some(node) = stack.pop() {
            count += node.child_count();
            stack.extend(node.all_children());
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(id: u32) -> SubscriptionOptions {
        SubscriptionOptions {
            subscription_id: Some(id),
            ..Default::default()
        }
    }

    #[test]
    fn prune_keeps_siblings_and_ancestors_in_use() {
        let mut tree = Tree::new();
        tree.insert("a/b/c", &1, opts(1));
        tree.insert("a/b/d", &1, opts(2));
        tree.insert("a", &2, opts(3));
        assert_eq!(tree.node_count(), 4);
        assert!(tree.remove("a/b/c", &1));
        assert_eq!(tree.node_count(), 3);
        assert!(!tree.remove("a/b/c", &1));
        assert!(tree.remove("a/b/d", &1));
        assert_eq!(tree.node_count(), 1);
        assert!(tree.remove("a", &2));
        assert_eq!(tree.node_count(), 0);
    }

    #[test]
    fn prune_intermediate_node_with_subscriptions() {
        let mut tree = Tree::new();
        tree.insert("a/+/#", &1, opts(1));
        tree.insert("a/+", &2, opts(2));
        assert!(tree.remove("a/+", &2));
        assert_eq!(tree.node_count(), 3);
        assert_eq!(tree.matches("a/x/y").clients.len(), 1);
        assert!(tree.remove("a/+/#", &1));
        assert_eq!(tree.node_count(), 0);
    }

    #[test]
    fn shared_membership() {
        let mut tree = Tree::new();
        assert!(!tree.insert_shared("g", "a/#", &1, opts(1)));
        assert!(!tree.insert_shared("g", "a/#", &2, opts(2)));
        assert!(tree.insert_shared("g", "a/#", &2, opts(3)));
        let m = tree.matches("a/b");
        assert_eq!(m.shared.len(), 1);
        assert_eq!(m.shared[0].members, vec![(1, opts(1)), (2, opts(3))]);
        assert!(tree.remove_shared("g", "a/#", &1));
        assert!(!tree.remove_shared("g", "a/#", &1));
        assert!(!tree.remove_shared("h", "a/#", &2));
        assert!(tree.remove_shared("g", "a/#", &2));
        assert_eq!(tree.node_count(), 0);
    }

    #[test]
    fn very_deep_filters_do_not_overflow() {
        let deep = "a/".repeat(30_000) + "#";
        let run = move || {
            let mut tree = Tree::new();
            tree.insert(&deep, &1, opts(1));
            let topic = "a/".repeat(30_001);
            assert_eq!(tree.matches(&topic).clients.len(), 1);
            assert!(tree.node_count() > 30_000);
            tree.insert(&deep, &2, opts(1));
            assert!(tree.remove(&deep, &1));
            drop(tree);
        };
        // A small stack makes any recursion fail loudly.
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(run)
            .and_then(|h| h.join().map_err(|_| std::io::Error::other("panicked")))
            .expect("deep trie handled without recursion");
    }
}
