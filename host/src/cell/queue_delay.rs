//! The cell queue's standing delay, measured by the writer and read by admission.
//!
//! A queue's length says little about latency (a request may hold one event or a thousand); how long
//! requests wait does. Like CoDel, the writer keeps the *least* wait of the requests it took during
//! each interval: a burst that drains within the interval leaves it low, a standing queue (arrivals
//! above what the writer can commit) raises it. Admission sheds by it (`Priority::admits_delay`), so
//! accepted requests never wait much longer than the target, however long the queue's bound.
//!
//! Only waiting behind other requests counts. A request the writer takes in the group right after
//! the one it was collecting when the request was queued waited for that commit alone: the cell's
//! service time, which refusing requests cannot shorten. It counts as no wait, as CoDel never drops
//! from a queue holding less than one packet; so a slow disk (a commit of 150 ms) does not shed a
//! producer whose requests each fit in the next group, while requests left behind a full group
//! still measure the standing queue.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Shared;

/// How long the least wait is taken over.
const INTERVAL: Duration = Duration::from_millis(100);

/// The writer's side: the least wait seen in the current interval.
#[derive(Debug)]
pub(super) struct QueueDelay {
    since: Instant,
    least: Option<Duration>,
    /// The group being collected (the count of groups begun, published as `Shared::groups_begun`).
    group: u64,
}

impl Default for QueueDelay {
    fn default() -> Self {
        Self {
            since: Instant::now(),
            least: None,
            group: 0,
        }
    }
}

impl QueueDelay {
    /// The writer begins collecting a group.
    pub fn begin_group(&mut self, shared: &Shared) {
        self.group += 1;
        shared.groups_begun.store(self.group, Ordering::Relaxed);
    }

    /// A request that joined the queue at `queued_at`, while the writer was on group `queued_behind`,
    /// was just taken into the current group.
    pub fn observe(&mut self, shared: &Shared, queued_at: Instant, queued_behind: u64) {
        let now = Instant::now();
        let waited = if self.group <= queued_behind.saturating_add(1) {
            Duration::ZERO
        } else {
            now.saturating_duration_since(queued_at)
        };
        self.least = Some(self.least.map_or(waited, |l| l.min(waited)));
        self.tick(shared, now);
    }

    /// Publishes the interval's least wait once the interval is over. An interval in which no append
    /// was taken (all refused, only processing commits queued) publishes 0, so appends are let in
    /// again to measure the queue afresh instead of being refused on a stale figure.
    pub fn tick(&mut self, shared: &Shared, now: Instant) {
        if now.duration_since(self.since) >= INTERVAL {
            let least = self.least.take().unwrap_or_default();
            shared
                .queue_delay_us
                .store(least.as_micros() as u64, Ordering::Relaxed);
            self.since = now;
        }
    }

    /// The queue is empty: nothing waits.
    pub fn empty(&mut self, shared: &Shared) {
        shared.queue_delay_us.store(0, Ordering::Relaxed);
        self.least = None;
        self.since = Instant::now();
    }
}
