//! [`MemoryStore`]: the store in memory, for the `memory` durability mode and
//! for tests. Same key layout and semantics as the sled store; nothing
//! survives the process.

use std::collections::BTreeMap;
use std::ops::Bound;

use parking_lot::RwLock;

use crate::engine::{store_via_core, Core, Engine, Pairs, Writes};
use crate::error::StoreError;

/// A [`Store`](crate::Store) kept in a `BTreeMap`.
pub struct MemoryStore {
    core: Core<MemoryEngine>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore {
            core: Core::open(MemoryEngine::default(), true)
                .expect("a new memory store cannot fail"),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("keys", &self.core.engine.map.read().len())
            .finish()
    }
}

store_via_core!(MemoryStore);

#[derive(Default)]
pub(crate) struct MemoryEngine {
    map: RwLock<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl Engine for MemoryEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.read().get(key).cloned())
    }

    fn contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.map.read().contains_key(key))
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Pairs, StoreError> {
        let start = match after {
            Some(a) => Bound::Excluded(a.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        Ok(self
            .map
            .read()
            .range((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let map = self.map.read();
        let end = match prefix_end(prefix) {
            Some(end) => Bound::Excluded(end),
            None => Bound::Unbounded,
        };
        Ok(map
            .range((Bound::Included(prefix.to_vec()), end))
            .next_back()
            .map(|(k, _)| k.clone()))
    }

    fn write(&self, writes: Writes) -> Result<(), StoreError> {
        let mut map = self.map.write();
        for (k, v) in writes {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn disk_bytes(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    fn compact(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The smallest key greater than every key starting with `prefix`, if any.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}
