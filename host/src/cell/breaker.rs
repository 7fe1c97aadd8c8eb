//! The circuit breaker of one handler on one partition.
//!
//! It counts settled events and failed ones (dead-lettered) in one-second buckets over a sliding
//! window. When at least `min_events` were settled in the window and the failed share reaches
//! `failure_percent`, it opens ("trips"): the processor stops running the handler on that partition,
//! which then lags while other partitions and handlers go on. After `cooldown` it half-opens: one batch
//! runs as a trial; a failure in it opens the breaker again, a clean batch closes it. Events are never
//! skipped because of the breaker: they wait.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// When a breaker trips and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerOptions {
    /// Failed share of settled events, in percent, that trips the breaker.
    pub failure_percent: u32,
    /// Settled events the window must hold before the share counts.
    pub min_events: u64,
    /// Length of the sliding window.
    pub window: Duration,
    /// How long the breaker stays open before a trial batch.
    pub cooldown: Duration,
}

impl Default for BreakerOptions {
    fn default() -> Self {
        Self {
            failure_percent: 50,
            min_events: 20,
            window: Duration::from_secs(10),
            cooldown: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Closed,
    Open { until: Instant, reason: String },
    HalfOpen,
}

/// Whether the handler may run on its partition now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Run (closed, or half-open for one trial batch).
    Run,
    /// Tripped: wait until the cooldown ends.
    Wait {
        /// Why it tripped.
        reason: String,
        /// Time left until the trial batch.
        retry_in: Duration,
    },
}

/// One handler's breaker on one partition.
#[derive(Debug)]
pub(crate) struct Breaker {
    options: BreakerOptions,
    /// (bucket start, settled events, failed events), oldest first.
    buckets: VecDeque<(Instant, u64, u64)>,
    state: State,
}

impl Breaker {
    pub fn new(options: BreakerOptions) -> Self {
        Self {
            options,
            buckets: VecDeque::new(),
            state: State::Closed,
        }
    }

    /// Whether the breaker is open (tripped, trial not yet due or failed).
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    /// The state as the metrics expose it.
    pub fn state(&self) -> crate::metrics::BreakerState {
        use crate::metrics::BreakerState;
        match self.state {
            State::Closed => BreakerState::Closed,
            State::HalfOpen => BreakerState::HalfOpen,
            State::Open { .. } => BreakerState::Open,
        }
    }

    /// Records `events` settled of which `failed` were dead-lettered.
    pub fn record(&mut self, events: u64, failed: u64) {
        self.record_at(Instant::now(), events, failed);
    }

    /// Decides whether the handler may run now; an open breaker whose cooldown is over half-opens.
    pub fn admit(&mut self) -> Admit {
        self.admit_at(Instant::now())
    }

    fn record_at(&mut self, now: Instant, events: u64, failed: u64) {
        match &self.state {
            State::Open { .. } => {}
            State::HalfOpen if failed > 0 => {
                self.trip(
                    now,
                    format!(
                        "the trial batch after the cooldown failed too ({failed} of {events} events \
                         dead-lettered)"
                    ),
                );
            }
            State::HalfOpen => {
                self.state = State::Closed;
                self.buckets.clear();
            }
            State::Closed => {
                match self.buckets.back_mut() {
                    Some((start, e, f)) if now.duration_since(*start) < Duration::from_secs(1) => {
                        *e += events;
                        *f += failed;
                    }
                    _ => self.buckets.push_back((now, events, failed)),
                }
                let window = self.options.window;
                while self
                    .buckets
                    .front()
                    .is_some_and(|(start, _, _)| now.duration_since(*start) >= window)
                {
                    self.buckets.pop_front();
                }
                let (total, bad) = self
                    .buckets
                    .iter()
                    .fold((0u64, 0u64), |(t, b), (_, e, f)| (t + e, b + f));
                let o = self.options;
                if total >= o.min_events
                    && total > 0
                    && bad * 100 >= total * u64::from(o.failure_percent)
                {
                    self.trip(
                        now,
                        format!(
                            "{bad} of {total} events failed in the last {} s (threshold {}%)",
                            o.window.as_secs(),
                            o.failure_percent
                        ),
                    );
                }
            }
        }
    }

    fn admit_at(&mut self, now: Instant) -> Admit {
        match &self.state {
            State::Closed | State::HalfOpen => Admit::Run,
            State::Open { until, .. } if now >= *until => {
                self.state = State::HalfOpen;
                Admit::Run
            }
            State::Open { until, reason } => Admit::Wait {
                reason: reason.clone(),
                retry_in: until.duration_since(now),
            },
        }
    }

    fn trip(&mut self, now: Instant, reason: String) {
        self.buckets.clear();
        self.state = State::Open {
            until: now + self.options.cooldown,
            reason,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerOptions {
            failure_percent: 50,
            min_events: 10,
            window: Duration::from_secs(10),
            cooldown: Duration::from_secs(30),
        })
    }

    #[test]
    fn trips_at_the_threshold_only_with_enough_events() {
        let t0 = Instant::now();
        let mut b = breaker();
        b.record_at(t0, 4, 4);
        assert!(!b.is_open(), "4 events are fewer than min_events");
        b.record_at(t0, 6, 0);
        assert!(!b.is_open(), "4 of 10 is below 50%");
        b.record_at(t0 + Duration::from_secs(2), 2, 2);
        assert!(b.is_open(), "6 of 12 reaches 50%");
        assert!(
            matches!(b.admit_at(t0 + Duration::from_secs(3)), Admit::Wait { reason, .. } if reason.starts_with("6 of 12"))
        );
    }

    #[test]
    fn old_failures_leave_the_window() {
        let t0 = Instant::now();
        let mut b = breaker();
        b.record_at(t0, 9, 9);
        b.record_at(t0 + Duration::from_secs(11), 10, 1);
        assert!(!b.is_open(), "the 9 failures are out of the window");
    }

    #[test]
    fn half_opens_after_the_cooldown_and_closes_or_reopens_on_the_trial() {
        let t0 = Instant::now();
        let mut b = breaker();
        b.record_at(t0, 10, 10);
        assert!(b.is_open());
        let later = t0 + Duration::from_secs(31);
        assert_eq!(b.admit_at(later), Admit::Run);
        b.record_at(later, 1000, 1);
        assert!(b.is_open(), "one failure in the trial batch reopens");
        let Admit::Wait { retry_in, .. } = b.admit_at(later) else {
            panic!("open after a failed trial");
        };
        assert_eq!(retry_in, Duration::from_secs(30));
        let again = later + Duration::from_secs(30);
        assert_eq!(b.admit_at(again), Admit::Run);
        b.record_at(again, 1000, 0);
        assert!(!b.is_open());
        assert_eq!(b.admit_at(again), Admit::Run, "a clean trial closes it");
    }
}
