//! A fixed-bucket histogram on atomics, for the hot path.
//!
//! prometheus-client's `Histogram` takes a mutex per observation; these take none: one `fetch_add` on
//! the bucket and a compare-and-swap on the sum. Each is owned by one cell or one task, so the
//! atomics are uncontended except against a scrape. Where a batch yields many observations (one
//! latency per event), they are tallied in a task-local [`Tally`] and merged with one atomic add per
//! non-empty bucket.
//!
//! A scrape may see a bucket incremented before the sum: the count is the buckets' total, so the
//! buckets and the count always agree, and the sum catches up within one observation.

use std::sync::atomic::{AtomicU64, Ordering};

/// Request latencies, in seconds: 100 µs to 30 s (long-polls wait up to their `wait_ms`).
pub const HTTP_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];
/// A handler call on one batch, in seconds: 50 µs to the longest deadlines.
pub const BATCH_SECONDS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];
/// Event to durable commit of its effects, in seconds: timestamps are in milliseconds, and a lagging
/// handler can be hours behind.
pub const LATENCY_SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];
/// A group commit's write and fsync, in seconds.
pub const FSYNC_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Events per group commit or per batch: up to the default caps of 1000 and beyond.
pub const EVENT_COUNTS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// A histogram with fixed upper bounds (`le`), plus the implicit `+Inf` bucket.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last one is `+Inf`.
    counts: Box<[AtomicU64]>,
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
}

/// What a scrape reads from a [`Histogram`].
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound, count in that bucket alone), ending with `+Inf`; the encoder makes them
    /// cumulative.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of the observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// An empty histogram with these bounds (ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        self.add(bucket_of(self.bounds, value), 1);
        self.add_sum(value);
    }

    /// Records everything a [`Tally`] holds: one atomic add per non-empty bucket.
    pub fn merge(&self, tally: &Tally) {
        for (i, &n) in tally.counts.iter().enumerate().filter(|(_, n)| **n > 0) {
            self.add(i, n);
        }
        if tally.count > 0 {
            self.add_sum(tally.sum);
        }
    }

    /// A local tally with this histogram's bounds.
    pub fn tally(&self) -> Tally {
        Tally {
            bounds: self.bounds,
            counts: vec![0; self.bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// The current buckets, sum and count.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            count: buckets.iter().map(|(_, n)| n).sum(),
            sum: f64::from_bits(self.sum.load(Ordering::Relaxed)),
            buckets,
        }
    }

    fn add(&self, bucket: usize, n: u64) {
        if let Some(c) = self.counts.get(bucket) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn add_sum(&self, value: f64) {
        // One writer in practice (a cell's writer, a task's thread): the loop runs once.
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }
}

/// Observations gathered without atomics, merged into a [`Histogram`] at once.
#[derive(Debug, Clone)]
pub struct Tally {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Tally {
    /// Adds one observation.
    pub fn observe(&mut self, value: f64) {
        if let Some(c) = self.counts.get_mut(bucket_of(self.bounds, value)) {
            *c += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    /// Forgets every observation (the buffers are kept).
    pub fn clear(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.sum = 0.0;
        self.count = 0;
    }
}

/// The bucket of `value`: the first whose bound is at least `value` (`le` semantics), or `+Inf`.
fn bucket_of(bounds: &[f64], value: f64) -> usize {
    bounds.partition_point(|&b| b < value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[1.0, 2.0, 5.0];

    #[test]
    fn observations_land_in_the_first_bucket_whose_bound_is_at_least_them() {
        let h = Histogram::new(BOUNDS);
        for v in [0.5, 1.0, 1.5, 2.0, 4.0, 5.0, 6.0, f64::INFINITY] {
            h.observe(v);
        }
        let s = h.snapshot();
        let counts: Vec<u64> = s.buckets.iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, [2, 2, 2, 2]);
        assert_eq!(s.buckets.last().map(|(b, _)| *b), Some(f64::INFINITY));
        assert_eq!(s.count, 8);
    }

    #[test]
    fn a_merged_tally_equals_the_same_observations_one_by_one() {
        let one_by_one = Histogram::new(BOUNDS);
        let merged = Histogram::new(BOUNDS);
        let mut tally = merged.tally();
        for v in [0.1, 0.2, 3.0, 9.0, 2.0] {
            one_by_one.observe(v);
            tally.observe(v);
        }
        merged.merge(&tally);
        tally.clear();
        merged.merge(&tally);
        assert_eq!(one_by_one.snapshot(), merged.snapshot());
        let s = merged.snapshot();
        assert_eq!(s.count, 5);
        assert!((s.sum - 14.3).abs() < 1e-9);
    }

    #[test]
    fn concurrent_observers_lose_nothing() {
        let h = std::sync::Arc::new(Histogram::new(BOUNDS));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let h = h.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| h.observe(1.0)))
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        let s = h.snapshot();
        assert_eq!(s.count, 4000);
        assert_eq!(s.sum, 4000.0);
    }
}
