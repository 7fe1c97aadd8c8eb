//! A bounded, lock-free map from small `Copy` label keys to metrics, for series whose label values
//! are only known when they first occur (a request's route and status, a refusal's reason).
//!
//! Open addressing over a fixed array of write-once slots: a key goes into the first empty slot of
//! its probe sequence, and a slot never changes once set, so two threads racing to add the same key
//! cannot both succeed (the loser finds the key in the slot it lost) and readers need no lock. When
//! every slot is taken, new keys are not recorded ([`Table::get`] returns `None`): the label values
//! fed in are static strings and status codes, so a full table means a bug, not load.

use std::hash::{BuildHasher, Hash};
use std::sync::OnceLock;

/// A fixed-capacity map of metrics, filled on first use.
pub struct Table<K, V> {
    slots: Box<[OnceLock<(K, V)>]>,
    make: fn() -> V,
    hasher: std::hash::RandomState,
}

impl<K: std::fmt::Debug, V> std::fmt::Debug for Table<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&K> = self
            .slots
            .iter()
            .filter_map(|s| s.get())
            .map(|e| &e.0)
            .collect();
        f.debug_struct("Table").field("keys", &keys).finish()
    }
}

impl<K: Copy + Eq + Hash, V> Table<K, V> {
    /// A table of `capacity` slots whose metrics `make` creates.
    pub fn new(capacity: usize, make: fn() -> V) -> Self {
        Self {
            slots: (0..capacity.max(1)).map(|_| OnceLock::new()).collect(),
            make,
            hasher: std::hash::RandomState::new(),
        }
    }

    /// The metric of `key`, created on first use; `None` if the table is full.
    pub fn get(&self, key: K) -> Option<&V> {
        let len = self.slots.len();
        let start = (self.hasher.hash_one(key) as usize) % len;
        let mut fresh = None;
        for i in 0..len {
            let slot = &self.slots[(start + i) % len];
            if slot.get().is_none() {
                // Racing threads may both build a metric here; only one is kept.
                let entry = fresh.take().unwrap_or_else(|| (key, (self.make)()));
                if let Err(lost) = slot.set(entry) {
                    fresh = Some(lost);
                }
            }
            match slot.get() {
                Some((k, v)) if *k == key => return Some(v),
                _ => continue,
            }
        }
        None
    }

    /// Every key seen so far with its metric, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = (K, &V)> {
        self.slots
            .iter()
            .filter_map(|s| s.get())
            .map(|(k, v)| (*k, v))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[test]
    fn each_key_gets_one_metric_even_when_threads_race_to_add_it() {
        let table = Arc::new(Table::<(&'static str, u16), AtomicU64>::new(
            8,
            AtomicU64::default,
        ));
        let keys = [("a", 1), ("b", 1), ("a", 2), ("c", 3)];
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let table = table.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        for key in keys {
                            if let Some(c) = table.get(key) {
                                c.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        let mut seen: Vec<_> = table
            .entries()
            .map(|(k, v)| (k, v.load(Ordering::Relaxed)))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                (("a", 1), 2000),
                (("a", 2), 2000),
                (("b", 1), 2000),
                (("c", 3), 2000)
            ]
        );
    }

    #[test]
    fn a_full_table_refuses_new_keys_and_keeps_serving_old_ones() {
        let table = Table::<u32, AtomicU64>::new(3, AtomicU64::default);
        assert!((0..3).all(|k| table.get(k).is_some()));
        assert!(table.get(3).is_none());
        assert!(table.get(1).is_some());
        assert_eq!(table.entries().count(), 3);
    }
}
