//! The dedup window of one partition: which event ids were appended recently, and at which offset.
//!
//! Owned by the cell writer (single owner, no lock). Bounded twice: ids older than the window are
//! forgotten, and so are the oldest ids once more than `max_ids` are held. Every id is also stored in the
//! partition's `dedup` keyspace in the same atomic batch as its event, so the window survives restarts.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Recently appended ids of one partition.
#[derive(Debug)]
pub struct DedupIndex {
    window_ms: u64,
    max_ids: usize,
    by_id: HashMap<Arc<str>, u64>,
    /// (append time, offset, id) in append order: offsets and times both ascend.
    order: VecDeque<(u64, u64, Arc<str>)>,
}

impl DedupIndex {
    /// An empty window of `window_ms` holding at most `max_ids` ids.
    pub fn new(window_ms: u64, max_ids: usize) -> Self {
        Self {
            window_ms,
            max_ids,
            by_id: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The offset an id was appended at, if it is in the window.
    pub fn lookup(&self, id: &str) -> Option<u64> {
        self.by_id.get(id).copied()
    }

    /// Records that `id` was appended at `offset` at `timestamp_ms`.
    pub fn insert(&mut self, id: &str, offset: u64, timestamp_ms: u64) {
        let id: Arc<str> = Arc::from(id);
        self.by_id.insert(id.clone(), offset);
        self.order.push_back((timestamp_ms, offset, id));
    }

    /// Forgets ids older than the window or beyond the count bound; returns the offsets forgotten so
    /// their stored entries can be deleted in the same batch.
    pub fn evict(&mut self, now_ms: u64) -> Vec<u64> {
        let oldest_kept = now_ms.saturating_sub(self.window_ms);
        let mut forgotten = Vec::new();
        while let Some((ts, offset, id)) = self.order.front() {
            if *ts >= oldest_kept && self.order.len() <= self.max_ids {
                break;
            }
            // Only unmap the id if it still points here (ids are unique in the window, but be exact).
            if self.by_id.get(id) == Some(offset) {
                self.by_id.remove(id);
            }
            forgotten.push(*offset);
            self.order.pop_front();
        }
        forgotten
    }

    /// Number of ids held.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_the_window_only() {
        let mut d = DedupIndex::new(1_000, 100);
        d.insert("a", 0, 10);
        d.insert("b", 1, 500);
        assert_eq!(d.lookup("a"), Some(0));
        assert_eq!(d.evict(1_009), Vec::<u64>::new());
        assert_eq!(d.evict(1_011), vec![0]);
        assert_eq!(d.lookup("a"), None);
        assert_eq!(d.lookup("b"), Some(1));
    }

    #[test]
    fn holds_at_most_max_ids() {
        let mut d = DedupIndex::new(u64::MAX, 3);
        for i in 0..10u64 {
            d.insert(&i.to_string(), i, 0);
            d.evict(0);
            assert!(d.len() <= 3);
        }
        assert_eq!(d.lookup("6"), None);
        assert_eq!(d.lookup("9"), Some(9));
    }
}
