//! [`Levels`]: the literal child levels of a trie node (the subscription
//! trie's and the retained messages'), in as little memory as their number
//! allows.
//!
//! Most nodes of a topic trie have one child: below the first few levels,
//! topics and filters run in chains (`site/7/line/3/sensor/12/temp`). A
//! `HashMap` per node costs 48 bytes inline and, from its first entry, a
//! table of four buckets, each as large as a key and a whole child node: a
//! filter of 128 levels unique to one client cost 99 KB of subscription
//! trie (770 bytes per level), a retained message on such a topic 50 KB.
//! A client that merely subscribed or retained within every limit could so
//! make the broker hold a thousand times what it sent.
//!
//! [`Levels`] keeps up to [`FEW`] children in a boxed slice of exactly
//! their number, searched in order (a few string comparisons, no hashing),
//! and more in a hash map. A level of a chain then costs its node, its key
//! and one allocation for the two.
//!
//! The map is hashbrown's (the table behind std's), for its `entry_ref`:
//! a level is looked up by `&str` with one hash and made into a key only
//! when it is new, so replacing a retained message or subscribing beside
//! others allocates nothing. It hashes with std's `RandomState` (SipHash,
//! keyed per map), as std's map would: levels are chosen by clients.

use std::hash::RandomState;
use std::mem;

use hashbrown::hash_map::{EntryRef, HashMap};

/// Children kept in a slice, searched in order, before they move to a hash
/// map: up to eight short keys compare in less time than one is hashed, and
/// a slice has no spare room. A slice grows and shrinks by reallocating,
/// which a node of this few children can afford.
pub(crate) const FEW: usize = 8;

/// The literal child levels of a node, by level (never `+` or `#`, which
/// the subscription trie keeps apart).
pub(crate) enum Levels<N> {
    /// At most [`FEW`], in the order they were added.
    Few(Box<[(Box<str>, N)]>),
    /// More than [`FEW`] (and whatever is left after removals: a map only
    /// goes back to a slice once empty). Boxed, so that a node of few
    /// children does not carry the map's 48 bytes.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<Box<str>, N, RandomState>>),
}

impl<N> Default for Levels<N> {
    fn default() -> Self {
        Levels::Few(Box::default())
    }
}

impl<N> Levels<N> {
    /// The child at `level`.
    pub(crate) fn get(&self, level: &str) -> Option<&N> {
        match self {
            Levels::Few(few) => few.iter().find(|(k, _)| **k == *level).map(|(_, n)| n),
            Levels::Many(many) => many.get(level),
        }
    }

    /// The child at `level`, to change.
    pub(crate) fn get_mut(&mut self, level: &str) -> Option<&mut N> {
        match self {
            Levels::Few(few) => few.iter_mut().find(|(k, _)| **k == *level).map(|(_, n)| n),
            Levels::Many(many) => many.get_mut(level),
        }
    }

    /// The child at `level`, made by `new` if there is none.
    pub(crate) fn get_or_insert_with(&mut self, level: &str, new: impl FnOnce() -> N) -> &mut N {
        if let Levels::Few(few) = self {
            if few.len() == FEW && !few.iter().any(|(k, _)| **k == *level) {
                let mut many = HashMap::with_capacity_and_hasher(2 * FEW, RandomState::new());
                many.extend(mem::take(few).into_vec());
                *self = Levels::Many(Box::new(many));
            }
        }
        match self {
            Levels::Few(few) => {
                let index = match few.iter().position(|(k, _)| **k == *level) {
                    Some(index) => index,
                    None => {
                        let mut grown = Vec::with_capacity(few.len() + 1);
                        grown.extend(mem::take(few).into_vec());
                        grown.push((Box::from(level), new()));
                        *few = grown.into_boxed_slice();
                        few.len() - 1
                    }
                };
                &mut few[index].1
            }
            Levels::Many(many) => match many.entry_ref(level) {
                EntryRef::Occupied(child) => child.into_mut(),
                EntryRef::Vacant(slot) => slot.insert_with_key(Box::from(level), new()),
            },
        }
    }

    /// Removes the child at `level`, returning it.
    pub(crate) fn remove(&mut self, level: &str) -> Option<N> {
        match self {
            Levels::Few(few) => {
                let index = few.iter().position(|(k, _)| **k == *level)?;
                let mut shrunk = mem::take(few).into_vec();
                let (_, removed) = shrunk.remove(index);
                *few = shrunk.into_boxed_slice();
                Some(removed)
            }
            Levels::Many(many) => {
                let removed = many.remove(level);
                if many.is_empty() {
                    *self = Levels::default();
                }
                removed
            }
        }
    }

    /// How many children there are.
    pub(crate) fn len(&self) -> usize {
        match self {
            Levels::Few(few) => few.len(),
            Levels::Many(many) => many.len(),
        }
    }

    /// The children with their levels, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &N)> {
        let (few, many) = match self {
            Levels::Few(few) => (Some(few.iter()), None),
            Levels::Many(many) => (None, Some(many.iter())),
        };
        let few = few.into_iter().flatten().map(|(k, n)| (&**k, n));
        let many = many.into_iter().flatten().map(|(k, n)| (&**k, n));
        few.chain(many)
    }

    /// The children, in no particular order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &N> {
        self.iter().map(|(_, n)| n)
    }

    /// Moves every child into `into`, leaving none (for iterative drops).
    pub(crate) fn take_into(&mut self, into: &mut Vec<N>) {
        match mem::take(self) {
            Levels::Few(few) => into.extend(few.into_vec().into_iter().map(|(_, n)| n)),
            Levels::Many(many) => into.extend(many.into_values()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(levels: &Levels<u32>) -> Vec<(String, u32)> {
        let mut v: Vec<_> = levels.iter().map(|(k, n)| (k.to_string(), *n)).collect();
        v.sort();
        v
    }

    #[test]
    fn children_are_found_by_level_however_many_there_are() {
        let mut levels = Levels::default();
        for i in 0..40u32 {
            *levels.get_or_insert_with(&format!("l{i}"), || 0) += i;
            assert_eq!(levels.len(), i as usize + 1);
            assert_eq!(matches!(levels, Levels::Few(_)), i < FEW as u32);
            for j in 0..=i {
                assert_eq!(levels.get(&format!("l{j}")), Some(&j));
            }
            assert_eq!(levels.get("l"), None);
        }
        // An existing child is returned, not replaced.
        *levels.get_or_insert_with("l3", || 100) += 1;
        assert_eq!(levels.get("l3"), Some(&4));
        *levels.get_mut("l39").unwrap() = 7;
        assert_eq!(levels.get("l39"), Some(&7));
        assert_eq!(levels.values().count(), 40);
    }

    #[test]
    fn removing_children_keeps_the_others_and_an_empty_map_becomes_a_slice() {
        for n in [3u32, FEW as u32, 20] {
            let mut levels = Levels::default();
            for i in 0..n {
                levels.get_or_insert_with(&i.to_string(), || i);
            }
            assert_eq!(levels.remove("absent"), None);
            assert_eq!(levels.remove("1"), Some(1));
            let expected: Vec<_> = (0..n)
                .filter(|i| *i != 1)
                .map(|i| (i.to_string(), i))
                .collect();
            let mut expected = expected;
            expected.sort();
            assert_eq!(sorted(&levels), expected);
            for i in 0..n {
                levels.remove(&i.to_string());
            }
            assert_eq!(levels.len(), 0);
            assert!(matches!(&levels, Levels::Few(few) if few.is_empty()));
        }
    }

    #[test]
    fn take_into_moves_every_child_out() {
        for n in [0u32, 5, 30] {
            let mut levels = Levels::default();
            for i in 0..n {
                levels.get_or_insert_with(&i.to_string(), || i);
            }
            let mut out = Vec::new();
            levels.take_into(&mut out);
            out.sort();
            assert_eq!(out, (0..n).collect::<Vec<_>>());
            assert_eq!(levels.len(), 0);
        }
    }

    #[test]
    fn a_node_s_levels_are_small_inline() {
        assert!(mem::size_of::<Levels<u64>>() <= 24);
    }
}
