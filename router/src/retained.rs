//! [`RetainedStore`]: the last retained message of each topic, in a trie by
//! topic level, behind its own `parking_lot::RwLock`.
//!
//! Looking up a wildcard filter walks only the branches the filter can match
//! (`+` fans out over one level's children, `#` takes a whole subtree), never
//! every retained message. The `$` rule applies: a filter starting with a
//! wildcard does not descend into top-level topics starting with `$`.
//!
//! The store is generic over the message type `M` and never looks inside it;
//! expiry is the broker's policy, applied through [`RetainedStore::retain`].

use std::mem;
use std::sync::Arc;

use parking_lot::RwLock;
use smallvec::SmallVec;

use crate::levels::Levels;

/// One topic level.
struct Node<M> {
    children: Levels<Node<M>>,
    /// The retained message whose topic ends here, with that full topic.
    /// Boxed: most nodes are levels on the way to others, and a chain of
    /// them costs a few dozen bytes a level (levels.rs).
    message: Option<Box<(Arc<str>, M)>>,
}

impl<M> Node<M> {
    fn new() -> Self {
        Self {
            children: Levels::default(),
            message: None,
        }
    }
}

impl<M> Drop for Node<M> {
    /// Iterative, so a very deep trie cannot overflow the stack when dropped.
    fn drop(&mut self) {
        let mut stack: Vec<Node<M>> = Vec::new();
        self.children.take_into(&mut stack);
        while let Some(mut node) = stack.pop() {
            node.children.take_into(&mut stack);
        }
    }
}

/// Retained messages by topic.
///
/// # Invariants
///
/// The write lock must be held to change the trie or `len`, and every change
/// keeps these true when it releases the lock:
///
/// 1. `len` equals the number of nodes holding a message.
/// 2. A message is stored at the node reached by its topic's levels, together
///    with that topic.
/// 3. No node other than the root is empty (no message and no children); the
///    root never holds a message (every topic has at least one level).
pub struct RetainedStore<M> {
    state: RwLock<State<M>>,
}

struct State<M> {
    root: Node<M>,
    len: usize,
}

/// How many messages it holds (not the messages: there may be millions).
impl<M> std::fmt::Debug for RetainedStore<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetainedStore")
            .field("len", &self.state.read().len)
            .finish_non_exhaustive()
    }
}

impl<M> State<M> {
    fn node(&self, topic: &str) -> Option<&Node<M>> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        Some(node)
    }

    fn take(&mut self, topic: &str) -> Option<M> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.get_mut(level)?;
        }
        let (_, message) = *node.message.take()?;
        self.len -= 1;
        self.prune(topic);
        Some(message)
    }

    /// Removes the chain of empty nodes at the end of `topic`'s path: finds
    /// the deepest node on the path that must stay (the root, or one holding
    /// a message or a child off the path) and cuts the edge below it.
    fn prune(&mut self, topic: &str) {
        let depth = topic.split('/').count();
        let mut keep = 0;
        let mut node = &self.root;
        for (index, level) in topic.split('/').enumerate() {
            let Some(child) = node.children.get(level) else {
                return;
            };
            node = child;
            let level_depth = index + 1;
            let path_children = usize::from(level_depth < depth);
            if node.message.is_some() || node.children.len() > path_children {
                keep = level_depth;
            }
        }
        if keep == depth {
            return;
        }
        let mut levels = topic.split('/');
        let mut node = &mut self.root;
        for level in levels.by_ref().take(keep) {
            match node.children.get_mut(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        if let Some(level) = levels.next() {
            node.children.remove(level);
        }
    }
}

/// `visit` as a closure over nodes that live as long as the store's lock
/// guard (`'a`), so that it may keep references to their entries.
fn visitor<'a, M: 'a, F: FnMut(&'a Node<M>)>(visit: F) -> F {
    visit
}

/// Matches found before `take` is called for them: see [`hand_over`].
const FOUND_CHUNK: usize = 32;

/// Calls `take` for each of `found`, emptying it. Every entry is read
/// first, in a loop of independent loads the processor overlaps: `take`
/// usually clones the message, an atomic increment that on x86 also keeps
/// the next entry's load from starting before it completes, so that in one
/// pass the walk waited for each entry's cache miss in turn.
fn hand_over<M>(
    found: &mut SmallVec<[&(Arc<str>, M); FOUND_CHUNK]>,
    take: &mut impl FnMut(&Arc<str>, &M),
) {
    let touched: usize = found.iter().map(|entry| entry.0.len()).sum();
    std::hint::black_box(touched);
    for entry in found.drain(..) {
        take(&entry.0, &entry.1);
    }
}

impl<M> RetainedStore<M> {
    /// What one level of a retained topic costs the store when no other
    /// retained topic shares it, at most: its node and key (levels.rs). A
    /// level of a chain is one allocation of some 48 bytes and its key's
    /// (router/tests/memory.rs measures it); a child among more than
    /// `levels::FEW` sits in a hash map's bucket, at worst just after the
    /// map grew to twice the buckets it needs, some 100 bytes.
    pub const LEVEL_COST: usize = 104;

    /// What the store holds for a retained message on `topic` beside the
    /// message itself, at most: a node per level (none shared with another
    /// topic, at worst), the entry (the topic once more, as an `Arc<str>`,
    /// and the message's handle). A bound on the sum of these bounds the
    /// store's memory, however deep its topics.
    pub fn entry_cost(topic: &str) -> usize {
        let levels = topic.split('/').count();
        levels * Self::LEVEL_COST
            + std::mem::size_of::<(Arc<str>, M)>()
            + 2 * std::mem::size_of::<usize>()
            + topic.len()
    }
}

impl<M: Clone> RetainedStore<M> {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            state: RwLock::new(State {
                root: Node::new(),
                len: 0,
            }),
        }
    }

    /// Stores `message` as the retained message of `topic` (a valid topic
    /// name), returning the one it replaces.
    pub fn insert(&self, topic: &str, message: M) -> Option<M> {
        let mut guard = self.state.write();
        let state = &mut *guard;
        let mut node = &mut state.root;
        for level in topic.split('/') {
            node = node.children.get_or_insert_with(level, Node::new);
        }
        match &mut node.message {
            Some(entry) => Some(mem::replace(&mut entry.1, message)),
            slot @ None => {
                *slot = Some(Box::new((Arc::from(topic), message)));
                state.len += 1;
                None
            }
        }
    }

    /// Removes and returns the retained message of `topic`.
    pub fn remove(&self, topic: &str) -> Option<M> {
        self.state.write().take(topic)
    }

    /// The retained message of `topic`, if any.
    pub fn get(&self, topic: &str) -> Option<M> {
        let state = self.state.read();
        state
            .node(topic)?
            .message
            .as_ref()
            .map(|entry| entry.1.clone())
    }

    /// Every retained message whose topic matches `filter` (a valid
    /// non-shared filter), with the `$` rule applied. Order unspecified.
    pub fn matching(&self, filter: &str) -> Vec<(Arc<str>, M)> {
        self.matching_at_most(filter, usize::MAX).0
    }

    /// At most `limit` of the retained messages [`matching`](Self::matching)
    /// `filter`, and how many more matched. Only those are cloned and
    /// collected: a subscriber that can take only so many does not make the
    /// store clone a million messages (an atomic each) into a vector of
    /// tens of MB under its read lock.
    pub fn matching_at_most(&self, filter: &str, limit: usize) -> (Vec<(Arc<str>, M)>, usize) {
        let mut found = Vec::new();
        let beyond = self.for_each_matching_at_most(filter, limit, |topic, message| {
            found.push((Arc::clone(topic), message.clone()));
        });
        (found, beyond)
    }

    /// Calls `take` with the topic and message of at most `limit` of the
    /// retained messages [`matching`](Self::matching) `filter`, and returns
    /// how many more matched. A caller that needs only the messages clones
    /// nothing else, into no vector of its own. The read lock is held
    /// throughout: `take` must not use this store.
    pub fn for_each_matching_at_most(
        &self,
        filter: &str,
        limit: usize,
        mut take: impl FnMut(&Arc<str>, &M),
    ) -> usize {
        let levels: SmallVec<[&str; 16]> = filter.split('/').collect();
        let state = self.state.read();
        let mut taken = 0;
        let mut beyond = 0;
        let mut found: SmallVec<[&(Arc<str>, M); FOUND_CHUNK]> = SmallVec::new();
        let mut visit = visitor(|node| {
            if let Some(entry) = &node.message {
                if taken < limit {
                    taken += 1;
                    found.push(&**entry);
                    if found.len() == FOUND_CHUNK {
                        hand_over(&mut found, &mut take);
                    }
                } else {
                    beyond += 1;
                }
            }
        });
        let mut stack: Vec<(&Node<M>, usize)> = vec![(&state.root, 0)];
        // A wildcard first level must not enter top-level '$' topics.
        let visible = |depth: usize, key: &str| depth > 0 || !key.starts_with('$');
        while let Some((node, depth)) = stack.pop() {
            match levels.get(depth).copied() {
                None => visit(node),
                Some("#") => {
                    // The parent level itself ("sport/#" matches "sport"),
                    // then the whole subtree.
                    visit(node);
                    let mut subtree: Vec<&Node<M>> = node
                        .children
                        .iter()
                        .filter(|(key, _)| visible(depth, key))
                        .map(|(_, child)| child)
                        .collect();
                    while let Some(node) = subtree.pop() {
                        visit(node);
                        subtree.extend(node.children.values());
                    }
                }
                Some("+") => stack.extend(
                    node.children
                        .iter()
                        .filter(|(key, _)| visible(depth, key))
                        .map(|(_, child)| (child, depth + 1)),
                ),
                Some(level) => {
                    if let Some(child) = node.children.get(level) {
                        stack.push((child, depth + 1));
                    }
                }
            }
        }
        hand_over(&mut found, &mut take);
        beyond
    }

    /// Removes every entry for which `keep` returns false (e.g. expired
    /// messages) and returns them. The entries are judged under the read
    /// lock, so lookups run beside the scan (until an insert queues for the
    /// write lock: the lock is fair) and only the removals exclude them:
    /// the write lock is taken once, for the entries judged doomed, and each
    /// is asked again there (one replaced in between is judged as it is
    /// now). `keep` may thus be called twice for an entry. Visits every
    /// entry: call it off the async workers when the store is large.
    pub fn retain(&self, mut keep: impl FnMut(&str, &M) -> bool) -> Vec<(Arc<str>, M)> {
        let mut doomed: Vec<Arc<str>> = Vec::new();
        {
            let state = self.state.read();
            let mut stack = vec![&state.root];
            while let Some(node) = stack.pop() {
                if let Some(entry) = &node.message {
                    let (topic, message) = &**entry;
                    if !keep(topic, message) {
                        doomed.push(Arc::clone(topic));
                    }
                }
                stack.extend(node.children.values());
            }
        }
        if doomed.is_empty() {
            return Vec::new();
        }
        let mut state = self.state.write();
        let mut removed = Vec::with_capacity(doomed.len());
        for topic in doomed {
            let still_doomed = state
                .node(&topic)
                .and_then(|node| node.message.as_ref())
                .is_some_and(|entry| !keep(&topic, &entry.1));
            if still_doomed {
                if let Some(message) = state.take(&topic) {
                    removed.push((topic, message));
                }
            }
        }
        removed
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.state.read().len
    }

    /// Whether no message is retained.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of trie nodes, root excluded; 0 when the store is empty.
    /// For tests: walks the whole trie.
    #[doc(hidden)]
    pub fn node_count(&self) -> usize {
        let state = self.state.read();
        let mut count = 0;
        let mut stack = vec![&state.root];
        while let Some(node) = stack.pop() {
            count += node.children.len();
            stack.extend(node.children.values());
        }
        count
    }
}

impl<M: Clone> Default for RetainedStore<M> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(mut v: Vec<(Arc<str>, u32)>) -> Vec<(String, u32)> {
        v.sort();
        v.into_iter().map(|(t, m)| (t.to_string(), m)).collect()
    }

    #[test]
    fn insert_replace_get_remove() {
        let store = RetainedStore::new();
        assert!(store.is_empty());
        assert_eq!(store.insert("a/b", 1), None);
        assert_eq!(store.insert("a/b", 2), Some(1));
        assert_eq!(store.insert("a", 3), None);
        assert_eq!(store.len(), 2);
        assert_eq!(store.get("a/b"), Some(2));
        assert_eq!(store.get("a/c"), None);
        assert_eq!(store.get("a/b/c"), None);
        assert_eq!(store.remove("a/b"), Some(2));
        assert_eq!(store.remove("a/b"), None);
        assert_eq!(store.node_count(), 1);
        assert_eq!(store.remove("a"), Some(3));
        assert_eq!(store.node_count(), 0);
        assert!(store.is_empty());
    }

    /// Matches are handed over in chunks (`FOUND_CHUNK`): every one of
    /// them once, however many chunks and whatever is left of the last,
    /// and `limit` holds across chunks.
    #[test]
    fn many_matches_each_taken_once_within_the_limit() {
        let store = RetainedStore::new();
        let n = 3 * FOUND_CHUNK as u32 + 5;
        for i in 0..n {
            store.insert(&format!("a/{i}"), i);
        }
        let all = sorted(store.matching("a/#"));
        assert_eq!(all.len(), n as usize);
        let mut values: Vec<u32> = all.iter().map(|(_, m)| *m).collect();
        values.sort_unstable();
        assert_eq!(values, (0..n).collect::<Vec<_>>());
        let limit = 2 * FOUND_CHUNK + 1;
        let (some, beyond) = store.matching_at_most("a/+", limit);
        assert_eq!(some.len(), limit);
        assert_eq!(beyond, n as usize - limit);
        let (few, none_beyond) = store.matching_at_most("a/7", 10);
        assert_eq!(sorted(few), vec![("a/7".to_string(), 7)]);
        assert_eq!(none_beyond, 0);
    }

    #[test]
    fn wildcard_lookup_and_dollar_rule() {
        let store = RetainedStore::new();
        for (i, topic) in [
            "sport",
            "sport/tennis",
            "sport/tennis/p1",
            "/finance",
            "$SYS/x",
        ]
        .into_iter()
        .enumerate()
        {
            store.insert(topic, i as u32);
        }
        assert_eq!(
            sorted(store.matching("sport/#")),
            [
                ("sport".to_string(), 0),
                ("sport/tennis".to_string(), 1),
                ("sport/tennis/p1".to_string(), 2)
            ]
        );
        assert_eq!(sorted(store.matching("#")).len(), 4);
        assert_eq!(sorted(store.matching("+/+")).len(), 2);
        assert_eq!(
            sorted(store.matching("$SYS/#")),
            [("$SYS/x".to_string(), 4)]
        );
        assert!(store.matching("+/x").is_empty());
        assert_eq!(sorted(store.matching("/+")), [("/finance".to_string(), 3)]);
        assert!(store.matching("+").len() == 1);

        // A bounded lookup collects up to the limit and counts the rest.
        let (some, beyond) = store.matching_at_most("#", 1);
        assert_eq!((some.len(), beyond), (1, 3));
        let (all, beyond) = store.matching_at_most("#", 4);
        assert_eq!((all.len(), beyond), (4, 0));
        assert_eq!(store.matching_at_most("#", 0), (Vec::new(), 4));
    }

    #[test]
    fn retain_removes_and_prunes() {
        let store = RetainedStore::new();
        for i in 0..10u32 {
            store.insert(&format!("t/{i}/x"), i);
        }
        assert_eq!(store.retain(|_, m| m % 2 == 0).len(), 5);
        assert_eq!(store.len(), 5);
        assert_eq!(store.node_count(), 1 + 5 * 2);
        assert_eq!(store.retain(|topic, _| topic.starts_with('x')).len(), 5);
        assert_eq!(store.node_count(), 0);
    }

    #[test]
    fn retain_returns_what_it_removed_and_judges_it_again_before() {
        let store = RetainedStore::new();
        for i in 0..4u32 {
            store.insert(&format!("t/{i}"), i);
        }
        let mut removed = store.retain(|_, m| *m < 2);
        removed.sort();
        assert_eq!(removed, [(Arc::from("t/2"), 2), (Arc::from("t/3"), 3)]);
        // A verdict that changed by the time of the removal keeps the entry.
        let mut asked = std::collections::HashMap::new();
        let removed = store.retain(|topic, _| {
            let n = asked.entry(topic.to_string()).or_insert(0);
            *n += 1;
            topic == "t/0" || *n > 1
        });
        assert!(removed.is_empty());
        assert_eq!(asked["t/1"], 2);
        assert_eq!(store.len(), 2);
    }
}
